"""Image loading (modes, EXIF, size cap, bad files) and frame <-> tensor conversions."""

import logging
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from personalive.errors import ImageReadError
from personalive.io.images import as_rgb_frame, crop_around, fit_frame, frames_to_tensor, load_image, to_uint8


def write_png16_rgb(path, pixels):
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)  # filter type 0 per row

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # bit depth 16, colour type 2 (RGB)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def loaded_pixels(path, **kwargs):
    image = load_image(path, **kwargs)
    assert image.mode == "RGB"
    return np.asarray(image)


def test_rgb_is_unchanged(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    np.testing.assert_array_equal(loaded_pixels(tmp_path / "a.png"), pixels)


def test_grayscale_becomes_rgb(tmp_path):
    Image.fromarray(np.full((4, 5), 77, np.uint8)).save(tmp_path / "g.png")
    np.testing.assert_array_equal(loaded_pixels(tmp_path / "g.png"), np.full((4, 5, 3), 77, np.uint8))


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 0, 0)  # transparent
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    pixels = loaded_pixels(tmp_path / "a.png")
    assert tuple(pixels[0, 0]) == (255, 0, 0)
    assert tuple(pixels[0, 1]) == (255, 255, 255)
    assert all(abs(int(v) - 127) <= 1 for v in pixels[0, 2])


def test_palette_with_transparency_is_composited(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 255, 10, 20, 30])
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "p.png", transparency=1)
    pixels = loaded_pixels(tmp_path / "p.png")
    assert tuple(pixels[0, 0]) == (0, 0, 255) and tuple(pixels[0, 1]) == (255, 255, 255)


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    np.testing.assert_array_equal(loaded_pixels(tmp_path / "g16.png")[0, :, 0], [0, 100, 255])


def test_16bit_rgb_is_scaled_not_clipped(tmp_path):
    values = np.array([[[0, 0x8000, 0xFFFF], [0x0100, 0x4000, 0xC000]]], np.uint16)
    write_png16_rgb(tmp_path / "c16.png", values)
    np.testing.assert_array_equal(loaded_pixels(tmp_path / "c16.png"), values >> 8)


def test_huge_image_is_downscaled_with_a_warning(tmp_path, caplog):
    Image.new("L", (6000, 30), 200).save(tmp_path / "wide.png")
    with caplog.at_level(logging.WARNING, logger="personalive.io.images"):
        image = load_image(tmp_path / "wide.png")
    assert image.size == (4096, 20)
    assert "downscaled" in caplog.text and "wide.png" in caplog.text
    assert load_image(tmp_path / "wide.png", max_side=600).size == (600, 3)


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red
    stored[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "r.jpg", exif=exif, quality=95)
    pixels = loaded_pixels(tmp_path / "r.jpg")
    assert pixels.shape == (40, 20, 3)
    assert pixels[5, 10, 0] > 200 and pixels[5, 10, 2] < 50  # red on top
    assert pixels[35, 10, 2] > 200 and pixels[35, 10, 0] < 50  # blue at the bottom


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match=f"^{re.escape(str(tmp_path / 'nope.png'))} not found$"):
        load_image(tmp_path / "nope.png")


def test_non_image_file(tmp_path):
    (tmp_path / "notes.png").write_text("not an image\n")
    with pytest.raises(ImageReadError, match=r"notes\.png is not a readable image \(.+\)"):
        load_image(tmp_path / "notes.png")


def test_truncated_image(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"t\.png is not a readable image"):
        load_image(tmp_path / "t.png")


def test_frames_to_tensor_matches_official_normalisation():
    frames = np.random.default_rng(0).integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    x = frames_to_tensor(frames)
    assert x.shape == (2, 3, 5, 6) and x.dtype == torch.float32
    expected = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    assert x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError, match=r"\(n, H, W, 3\)"):
        frames_to_tensor(frames[0])


def test_to_uint8_truncates_like_official():
    x = np.array([[[[0.0, 0.5, 1.0]], [[0.999, -0.2, 1.7]]]], np.float32)  # (1, 2, 1, 3)
    np.testing.assert_array_equal(to_uint8(x)[0, :, 0], [[0, 127, 255], [254, 0, 255]])
    np.testing.assert_array_equal(to_uint8(torch.from_numpy(x)), to_uint8(x))


def test_fit_frame_crops_the_centre_then_resizes():
    frame = np.zeros((100, 200, 3), np.uint8)
    frame[:, 50:150] = 255  # the centre square is white, the sides black
    fitted = fit_frame(frame, 32, 32)
    assert fitted.shape == (32, 32, 3) and fitted.dtype == np.uint8
    assert fitted.min() >= 250  # the black sides were cropped away
    assert fit_frame(frame, 50, 100).shape == (50, 100, 3)  # same aspect: plain resize
    assert fit_frame(frame, 100, 200) is frame


def test_crop_around_keeps_the_face_in_a_tall_portrait():
    tall = np.zeros((300, 100, 3), np.uint8)
    tall[20:60, 30:70] = 255  # the "face", near the top
    centred = crop_around(tall, 50, 50)  # middle crop: rows 100..200, no face
    around = crop_around(tall, 50, 50, center=(50, 40))  # rows 0..100: the face
    assert centred.shape == around.shape == (50, 50, 3)
    assert centred.max() == 0 and around.mean() > 30
    wide = crop_around(np.zeros((100, 300, 3), np.uint8), 64, 64, center=(290, 50))  # clamped to the edge
    assert wide.shape == (64, 64, 3)


def test_as_rgb_frame_converts_grey_alpha_and_float():
    assert as_rgb_frame(np.zeros((5, 6), np.uint8)).shape == (5, 6, 3)
    assert as_rgb_frame(np.zeros((5, 6, 4), np.uint8)).shape == (5, 6, 3)
    assert as_rgb_frame(np.ones((5, 6, 3), np.float32)).max() == 255
    with pytest.raises(ValueError, match="shape"):
        as_rgb_frame(np.zeros((5, 6, 3, 1), np.uint8))
