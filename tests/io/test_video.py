"""Video reading and writing: exact fps, audio carried over, atomic output, one-line errors on bad files."""

import logging
import re
from fractions import Fraction

import av
import numpy as np
import pytest
from conftest import write_sine, write_undecodable_video

from personalive.errors import VideoReadError
from personalive.io.samples import sample_driving_video
from personalive.io.video import VideoReader, VideoWriter

NTSC = Fraction(30000, 1001)


def coloured_frames(n, height=48, width=64):
    return [np.full((height, width, 3), (10 * i, 255 - 10 * i, 128), np.uint8) for i in range(n)]


def message(path, rest):
    """A regex for a whole one-line message: the path, then `rest` (a regex)."""
    return f"^{re.escape(str(path))}{rest}$"


def audio_seconds(path):
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return sum(frame.samples for frame in container.decode(stream)) / stream.codec_context.sample_rate


@pytest.mark.parametrize("audio", ["aac-copied", "pcm-transcoded"])
def test_round_trip_keeps_frames_fps_size_and_audio(tmp_path, audio):
    if audio == "aac-copied":
        source = write_sine(tmp_path / "sine.m4a", container_format="mp4")
    else:
        source = write_sine(tmp_path / "sine.wav", codec="pcm_s16le")
    out = tmp_path / "out.mp4"
    frames = coloured_frames(13)
    with VideoWriter(out, NTSC, audio_from=source) as writer:
        for frame in frames:
            writer.write(frame)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.mp4", source.name])  # no temp file left

    with VideoReader(out) as reader:
        assert reader.rate == NTSC and reader.fps == pytest.approx(29.97003)
        assert reader.size == (64, 48) and reader.has_audio
        decoded = list(reader)
    assert len(decoded) == 13
    for got, want in zip(decoded, frames, strict=True):
        assert got.shape == want.shape and got.dtype == np.uint8
        assert np.abs(got.astype(int) - want).max() <= 6  # yuv420p round trip
    with av.open(str(out)) as container:
        assert container.streams.audio[0].codec_context.name == "aac"
    video_seconds = 13 / NTSC
    assert abs(audio_seconds(out) - video_seconds) < 0.05  # trimmed to the video (to an AAC frame)


def test_float_fps_is_kept_exactly(tmp_path):
    with VideoWriter(tmp_path / "a.mp4", 29.97) as writer:
        for frame in coloured_frames(3):
            writer.write(frame)
    with VideoReader(tmp_path / "a.mp4") as reader:
        assert reader.rate == Fraction(2997, 100) and not reader.has_audio


def test_odd_size_is_padded_by_repeating_the_edge(tmp_path):
    frame = np.zeros((33, 45, 3), np.uint8)
    frame[:, -1] = 200  # last column
    with VideoWriter(tmp_path / "odd.mp4", 25) as writer:
        writer.write(frame)
    with VideoReader(tmp_path / "odd.mp4") as reader:
        assert reader.size == (46, 34)
        (decoded,) = list(reader)
    assert decoded.shape == (34, 46, 3)
    assert abs(int(decoded[10, 45, 0]) - 200) <= 6  # the padded column repeats the last one


def test_audio_source_without_audio_writes_video_only(tmp_path):
    with VideoWriter(tmp_path / "silent.mp4", 25) as writer:
        writer.write(coloured_frames(1)[0])
    with VideoWriter(tmp_path / "out.mp4", 25, audio_from=tmp_path / "silent.mp4") as writer:
        writer.write(coloured_frames(1)[0])
    with VideoReader(tmp_path / "out.mp4") as reader:
        assert not reader.has_audio


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt])
def test_interrupted_writer_leaves_nothing(tmp_path, interruption):
    source = write_sine(tmp_path / "sine.m4a", container_format="mp4")
    with pytest.raises(interruption):
        with VideoWriter(tmp_path / "out.mp4", NTSC, audio_from=source) as writer:
            for frame in coloured_frames(5):
                writer.write(frame)
            raise interruption("stop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sine.m4a"]


def test_interrupted_writer_keeps_the_previous_file(tmp_path):
    (tmp_path / "out.mp4").write_bytes(b"previous result")
    with pytest.raises(ValueError, match="frame 1 is 32x32"):
        with VideoWriter(tmp_path / "out.mp4", 25) as writer:
            writer.write(coloured_frames(1)[0])
            writer.write(np.zeros((32, 32, 3), np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]
    assert (tmp_path / "out.mp4").read_bytes() == b"previous result"


def test_writer_without_frames_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="no frames"):
        with VideoWriter(tmp_path / "out.mp4", 25):
            pass
    assert list(tmp_path.iterdir()) == []


def test_missing_file(tmp_path):
    with pytest.raises(VideoReadError, match=message(tmp_path / "missing.mp4", " not found")):
        VideoReader(tmp_path / "missing.mp4")


def test_text_file_named_mp4(tmp_path):
    (tmp_path / "notes.mp4").write_text("not a video\n")
    with pytest.raises(VideoReadError, match=message(tmp_path / "notes.mp4", r" is not a readable video \(.+\)")):
        VideoReader(tmp_path / "notes.mp4")


def test_audio_only_file(tmp_path):
    write_sine(tmp_path / "sine.m4a", container_format="mp4")
    with pytest.raises(VideoReadError, match=message(tmp_path / "sine.m4a", " has no video stream")):
        VideoReader(tmp_path / "sine.m4a")


def test_zero_frame_file(tmp_path):
    with av.open(str(tmp_path / "empty.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
    with pytest.raises(VideoReadError, match=re.escape(str(tmp_path / "empty.mp4"))):
        list(VideoReader(tmp_path / "empty.mp4"))


def test_no_decodable_frame(tmp_path):
    """A video stream whose only packet is garbage: opens, then iteration raises instead of ending empty."""
    write_undecodable_video(tmp_path / "garbage.mp4")
    with VideoReader(tmp_path / "garbage.mp4") as reader:
        with pytest.raises(VideoReadError, match=message(tmp_path / "garbage.mp4", " has no decodable video frames")):
            list(reader)


def test_corrupt_data_mid_stream_is_skipped_with_one_warning(tmp_path, caplog):
    rng = np.random.default_rng(0)
    with VideoWriter(tmp_path / "v.mp4", 25) as writer:
        for _ in range(30):
            writer.write(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = bytearray((tmp_path / "v.mp4").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 3000] = rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()
    (tmp_path / "v.mp4").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="personalive.io.video"), VideoReader(tmp_path / "v.mp4") as reader:
        frames = list(reader)  # no exception from av
    assert 0 < len(frames) <= 30
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) <= 1


def test_sample_driving_video_header():
    with VideoReader(sample_driving_video()) as reader:
        assert reader.rate == NTSC and reader.size == (176, 144) and reader.num_frames == 120
        assert not reader.has_audio
        first = next(iter(reader))
    assert first.shape == (144, 176, 3) and first.dtype == np.uint8


def test_reader_iterates_once(tmp_path):
    with VideoWriter(tmp_path / "a.mp4", 25) as writer:
        writer.write(coloured_frames(1)[0])
    with VideoReader(tmp_path / "a.mp4") as reader:
        list(reader)
        with pytest.raises(RuntimeError, match="only once"):
            iter(reader)


@pytest.mark.parametrize("name", ["missing.mp4", "notes.txt"])
def test_bad_audio_source_fails_before_any_frame(tmp_path, name):
    (tmp_path / "notes.txt").write_text("not media\n")
    with pytest.raises(VideoReadError, match=re.escape(str(tmp_path / name))):
        with VideoWriter(tmp_path / "out.mp4", 25, audio_from=tmp_path / name):
            pytest.fail("the writer should not open")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
