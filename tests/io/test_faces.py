"""Face boxes (MediaPipe FaceMesh, official offline recipe) and crops for the motion encoder."""

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from personalive.errors import BackendUnavailableError, NoFaceError
from personalive.io import faces
from personalive.io.faces import FaceCropper, crop_face, mediapipe_available, scale_box
from personalive.io.images import load_image
from personalive.io.samples import sample_reference

needs_mediapipe = pytest.mark.skipif(not mediapipe_available(), reason="mediapipe is not installed")


@pytest.fixture(scope="module")
def cropper():
    with FaceCropper() as cropper:
        yield cropper


@pytest.fixture(scope="module")
def astronaut():
    return np.asarray(load_image(sample_reference()))  # 512 x 512, face around x 180-300, y 60-220


@needs_mediapipe
def test_astronaut_face_box_is_plausible(cropper, astronaut):
    x1, y1, x2, y2 = cropper.box(astronaut)
    assert 0 <= x1 < x2 <= 511 and 0 <= y1 < y2 <= 511
    assert abs((x2 - x1) - (y2 - y1)) <= 2  # square unless clipped by the border
    assert 60 <= x2 - x1 <= 260
    assert 170 <= (x1 + x2) / 2 <= 310 and 50 <= (y1 + y2) / 2 <= 230  # centred on the face


@needs_mediapipe
def test_astronaut_landmarks_are_in_face_order(cropper, astronaut):
    points = cropper.landmarks(astronaut)
    assert points.shape == (468, 3) and (0 < points[:, :2]).all() and (points[:, :2] < 1).all()
    (ex1, ey1), (ex2, ey2), (nx, ny), (mx, my), (cx, cy) = points[[33, 263, 1, 13, 152], :2]  # eyes, nose, mouth, chin
    assert ex1 < nx < ex2 and max(ey1, ey2) < ny < my < cy
    assert cropper.landmarks(np.zeros((64, 64, 3), np.uint8)) is None


@needs_mediapipe
def test_blank_image_has_no_face(cropper):
    assert cropper.box(np.zeros((256, 256, 3), np.uint8)) is None
    with pytest.raises(NoFaceError, match="no face found in blank.png"):
        cropper.box_or_raise(np.full((64, 64, 3), 255, np.uint8), "blank.png")


@needs_mediapipe
def test_crop_of_detected_face(cropper, astronaut):
    face = cropper.crop(astronaut, cropper.box(astronaut), 224)
    assert face.shape == (3, 224, 224) and face.dtype == torch.float32
    assert face.min() >= -1 and face.max() <= 1 and face.std() > 0.1


def test_missing_mediapipe_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(faces, "mediapipe_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="pip install mediapipe==0.10.21"):
        FaceCropper()


@pytest.mark.parametrize(
    "box",
    [(5, 5, 5, 5), (300, 300, 100, 100), (-40, -40, -5, -5), (600, 600, 700, 700), (0, 0, 512, 1), (511, 0, 512, 3)],
)
def test_degenerate_boxes_still_crop(astronaut, box):
    face = crop_face(astronaut, box, 64)
    assert face.shape == (3, 64, 64) and torch.isfinite(face).all()


def test_tiny_frame_and_odd_size():
    assert crop_face(np.zeros((3, 2, 3), np.uint8), (0, 0, 0, 0), 17).shape == (3, 17, 17)


def test_crop_matches_official_preprocessing(astronaut):
    """Official offline: numpy slice of the box, then VaeImageProcessor(do_normalize) at 224 x 224."""
    box = (167, 65, 281, 180)
    official = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=True).preprocess(
        Image.fromarray(astronaut[65:180, 167:281]), height=224, width=224
    )[0]
    torch.testing.assert_close(crop_face(astronaut, box, 224), official, rtol=0, atol=0)


def test_scale_box_matches_official_scale_bb():
    # official scale_bb((100, 50, 140, 110), 1.1, (200, 300)) -> side 66 around (120, 80); right/bottom clipped to size-1
    assert scale_box((100, 50, 140, 110), 1.1, 200, 300) == (87, 47, 153, 113)
    assert scale_box((0, 0, 40, 40), 1.1, 30, 30) == (0, 0, 29, 29)
