"""Offline driver: same engine as online, one output per driving frame, fps/audio kept, atomic output, bad inputs."""

import logging
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from conftest import write_sine, write_undecodable_video
from PIL import Image

from personalive.errors import (
    ConfigError,
    ImageReadError,
    NoFaceError,
    VideoReadError,
    WeightsNotFoundError,
)
from personalive.io.faces import mediapipe_available
from personalive.io.images import frames_to_tensor, load_image
from personalive.io.samples import sample_reference
from personalive.io.video import VideoReader, VideoWriter
from personalive.pipelines import offline
from personalive.pipelines.nonstream import animate_clip
from personalive.pipelines.offline import (
    DrivingFaces,
    OfflineOptions,
    reflect_index,
    run_offline,
    stream_video,
)
from personalive.pipelines.stream import StreamEngine

NTSC = Fraction(30000, 1001)
needs_mediapipe = pytest.mark.skipif(not mediapipe_available(), reason="mediapipe is not installed")


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return load_image(sample_reference())


@pytest.fixture(scope="module")
def keyframe_cfg(tiny_cfg):
    """Keyframes from step 2 on every step (capped at 3), so that the keyframe path is part of every comparison."""
    return tiny_cfg.__class__(**{**vars(tiny_cfg), "keyframe_threshold": -1.0, "keyframe_start_step": 2})


def driving_frames(n: int, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return [np.roll(base, 3 * i, axis=1) for i in range(n)]  # a moving pattern


def face_crops(n: int, size: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.rand(3, size, size, generator=g) * 2 - 1 for _ in range(n)]


def write_driving_video(path, astronaut, n=18, blank=(), size=(112, 128)):
    """n frames (H x W = size, not the model's) of the astronaut moving, `blank` frames without a face; NTSC rate,
    with a 440 Hz AAC track."""
    sine = write_sine(path.with_name("sine.m4a"), container_format="mp4")
    face = np.asarray(astronaut.resize((size[1], size[1])))[: size[0]]
    with VideoWriter(path, NTSC, audio_from=sine) as writer:
        for i in range(n):
            writer.write(np.zeros_like(face) if i in blank else np.roll(face, i, axis=1))
    sine.unlink()
    return path


# ------------------------------------------------------------------------------------------------------------------
# The streaming loop


def test_reflect_index_is_the_official_tail_and_stays_in_range():
    for n in (13, 14, 40):
        frames = list(range(n))
        assert [reflect_index(k, n) for k in range(1, 13)] == frames[-13:-1][::-1]
    assert [reflect_index(k, 4) for k in range(1, 9)] == [2, 1, 0, 1, 2, 3, 2, 1]
    assert {reflect_index(k, 1) for k in range(1, 13)} == {0}


@pytest.fixture(scope="module")
def online(tiny_models, keyframe_cfg, astronaut):
    """The online way on 18 frames: chunks straight into `engine.step`, the last one padded with frame 17, then the
    official tail (frames 16, 15, ..., 5). Chunk 0 uses keypoint boxes, the others given face crops."""
    frames, faces = driving_frames(18), face_crops(18)
    sequence = list(range(18)) + [17, 17] + list(range(16, 4, -1))
    engine = StreamEngine(tiny_models, keyframe_cfg)
    engine.fuse_reference(astronaut)
    outputs = []
    for start in range(0, len(sequence), 4):
        idx = sequence[start : start + 4]
        chunk_faces = None if start == 0 else torch.stack([faces[i] for i in idx])
        outputs.append(engine.step(frames_to_tensor(np.stack([frames[i] for i in idx])), chunk_faces))
    assert engine.bank.num_keyframes == 3
    return frames, faces, torch.cat(outputs)[12 : 12 + 18]  # the ramp dropped: output i <-> driving frame i


def test_offline_stream_runs_the_online_engine_frame_for_frame(tiny_models, keyframe_cfg, astronaut, online):
    frames, faces, expected = online
    engine = StreamEngine(tiny_models, keyframe_cfg)
    engine.fuse_reference(astronaut)
    pairs = list(stream_video(engine, ((f, None if i < 4 else faces[i]) for i, f in enumerate(frames))))
    assert len(pairs) == 18
    assert all(d is f for (d, _), f in zip(pairs, frames, strict=True))  # each output beside its driving frame
    np.testing.assert_array_equal(np.stack([out for _, out in pairs]), expected.numpy())


def test_short_clip_gets_one_output_per_frame(tiny_models, tiny_cfg, astronaut):
    engine = StreamEngine(tiny_models, tiny_cfg)
    engine.fuse_reference(astronaut)
    frames = driving_frames(3)
    pairs = list(stream_video(engine, ((f, None) for f in frames)))
    assert [d is f for (d, _), f in zip(pairs, frames, strict=True)] == [True] * 3
    assert engine.state.steps == 1 + 3  # one padded chunk, then the flush
    with pytest.raises(ValueError, match="no frames"):
        list(stream_video(engine, iter(())))


def test_non_streaming_pipeline_matches_the_engine_where_the_algorithms_coincide(
        tiny_models, keyframe_cfg, astronaut, online):
    frames, faces, expected = online
    engine = StreamEngine(tiny_models, keyframe_cfg)
    clip = frames_to_tensor(np.stack(frames))
    motion = []  # the motion tokens of every UNet call
    hook = tiny_models.denoising_unet.register_forward_hook(lambda module, args, out: motion.append(args[3]))
    try:
        chunks = list(animate_clip(engine, astronaut, clip, [None] * 4 + faces[4:]))
    finally:
        hook.remove()
    out = torch.cat(chunks)
    assert len(chunks) == 5 and out.shape == (20, 64, 64, 3) and len(motion) == 5 + 3
    assert engine.bank.num_keyframes == 3
    # chunks 0-1 never share a window with the tail: same frames up to batch-size rounding
    torch.testing.assert_close(out[:8], expected[:8], atol=2e-3, rtol=0)
    # the official tail: the last window is frames 16, 17, 17 (padding), 17 (padding), then frame 17 x 12
    last = motion[-1][0]  # (16, m, d)
    assert torch.equal(last[3:], last[3:4].expand_as(last[3:])) and not torch.equal(last[0], last[1])
    # (the streaming path flushes with frames 16, 15, ... instead; with tiny random temporal layers the effect on
    # the last 3 chunks is below 1e-5, so the outputs are not compared there)


def test_non_streaming_pipeline_checks_its_inputs(tiny_models, tiny_cfg, astronaut):
    engine = StreamEngine(tiny_models, tiny_cfg)
    with pytest.raises(ValueError, match="expected"):
        next(animate_clip(engine, astronaut, torch.zeros(4, 3, 32, 32)))
    with pytest.raises(ValueError, match="2 face crops for 4 frames"):
        next(animate_clip(engine, astronaut, torch.zeros(4, 3, 64, 64), [None, None]))


# ------------------------------------------------------------------------------------------------------------------
# Face crops


class FakeCropper:
    """Finds a face in every frame whose first pixel is non-zero."""

    def box(self, frame):
        return (0, 0, 8, 8) if frame[0, 0, 0] else None


def test_frames_without_a_face_reuse_the_last_crop_with_one_warning(caplog):
    faces = DrivingFaces(FakeCropper(), 16, "drive.mp4")
    blank, face = np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 200, np.uint8)
    with caplog.at_level(logging.WARNING):
        crops = [faces(i, f) for i, f in enumerate([blank, face, blank, blank, face])]
    assert crops[0] is None  # no face yet: keypoint boxes
    assert crops[1].shape == (3, 16, 16) and crops[2] is crops[1] and crops[3] is crops[1]
    assert crops[4] is not crops[1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["no face found in frame 0 of drive.mp4; using keypoint face boxes until a face is found "
                        "(further frames without a face are not reported)"]
    assert faces.missing == 3 and DrivingFaces(None, 16, "x")(0, face) is None


# ------------------------------------------------------------------------------------------------------------------
# The whole job


@needs_mediapipe
def test_end_to_end_keeps_frames_rate_and_audio(tmp_path, tiny_models, tiny_cfg, astronaut, caplog):
    driving = write_driving_video(tmp_path / "drive.mp4", astronaut, n=18, blank=(6, 7))
    reference = tmp_path / "ref.png"
    astronaut.save(reference)
    out = tmp_path / "out" / "result.mp4"
    with caplog.at_level(logging.WARNING):
        result = run_offline(tiny_cfg, reference, driving, out, OfflineOptions(side_by_side=True, progress=False),
                             engine=StreamEngine(tiny_models, tiny_cfg))
    assert result.frames == 18 and result.rate == NTSC
    assert sorted(p.name for p in out.parent.iterdir()) == ["result.mp4", "result.yaml", "result_side_by_side.mp4"]
    with VideoReader(out) as reader:
        assert reader.rate == NTSC and reader.size == (64, 64) and reader.has_audio
        assert len(list(reader)) == 18
    with av.open(str(out)) as container:
        audio = container.streams.audio[0]
        seconds = sum(f.samples for f in container.decode(audio)) / audio.codec_context.sample_rate
    assert abs(seconds - 18 / NTSC) < 0.05  # the audio of the driving video, trimmed to it
    with VideoReader(result.side_by_side) as reader:
        assert reader.size == (3 * 64, 64) and len(list(reader)) == 18
    assert [r.getMessage()[:38] for r in caplog.records if r.levelno == logging.WARNING] == [
        f"no face found in frame 6 of {driving}"[:38]]
    assert "height: 64" in result.config.read_text()


def test_interrupted_run_leaves_no_output(tmp_path, tiny_models, tiny_cfg, astronaut, monkeypatch):
    driving = write_driving_video(tmp_path / "drive.mp4", astronaut, n=18)
    engine = StreamEngine(tiny_models, tiny_cfg)
    step, calls = engine.step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # after the first outputs were written
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(engine, "step", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_offline(tiny_cfg, sample_reference(), driving, out / "result.mp4",
                    OfflineOptions(side_by_side=True, face_crops="keypoints", progress=False), engine=engine)
    assert list(out.iterdir()) == []  # no video, no partial file, no config


# ------------------------------------------------------------------------------------------------------------------
# Bad input: one clear line each, before any model loads (engine=None would load them)


def run(tiny_cfg, reference, driving, **options):
    return run_offline(tiny_cfg, reference, driving, driving.parent / "out.mp4",
                       OfflineOptions(progress=False, **options))


def test_bad_reference_images(tmp_path, tiny_cfg):
    video = write_driving_video(tmp_path / "drive.mp4", Image.new("RGB", (64, 64)), n=1)
    with pytest.raises(ImageReadError, match=f"^{tmp_path / 'missing.png'} not found$"):
        run(tiny_cfg, tmp_path / "missing.png", video)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageReadError, match="notes.png is not a readable image"):
        run(tiny_cfg, tmp_path / "notes.png", video)


@needs_mediapipe
def test_reference_without_a_face(tmp_path, tiny_cfg):
    video = write_driving_video(tmp_path / "drive.mp4", Image.new("RGB", (64, 64)), n=1)
    Image.new("RGB", (256, 256), (120, 160, 200)).save(tmp_path / "sky.png")
    with pytest.raises(NoFaceError, match=f"^no face found in the reference image {tmp_path / 'sky.png'}; use a"):
        run(tiny_cfg, tmp_path / "sky.png", video)


def test_bad_driving_videos(tmp_path, tiny_cfg):
    reference = sample_reference()
    with pytest.raises(VideoReadError, match=f"^{tmp_path / 'missing.mp4'} not found$"):
        run(tiny_cfg, reference, tmp_path / "missing.mp4", face_crops="keypoints")
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(VideoReadError, match="notes.mp4 is not a readable video"):
        run(tiny_cfg, reference, tmp_path / "notes.mp4", face_crops="keypoints")
    write_undecodable_video(tmp_path / "empty.mp4")
    with pytest.raises(VideoReadError, match="empty.mp4 has no decodable video frames"):  # found before any model
        run(tiny_cfg, reference, tmp_path / "empty.mp4", face_crops="keypoints")
    assert not (tmp_path / "out.mp4").exists()


def test_missing_weights_fail_before_mediapipe_starts(tmp_path, tiny_cfg, monkeypatch):
    started = []
    monkeypatch.setattr(offline, "open_face_cropper", lambda face_crops: started.append(face_crops))
    cfg = tiny_cfg.__class__(**{**vars(tiny_cfg), "weights_dir": str(tmp_path / "nowhere")})
    video = write_driving_video(tmp_path / "drive.mp4", Image.new("RGB", (64, 64)), n=1)
    with pytest.raises(WeightsNotFoundError, match="nowhere does not exist; fill it with"):
        run(cfg, sample_reference(), video, face_crops="mediapipe")
    assert started == []  # MediaPipe (and its native logging) never started


def test_bad_options(tmp_path, tiny_cfg, monkeypatch):
    with pytest.raises(ConfigError, match="-L 0"):
        run(tiny_cfg, None, tmp_path / "x.mp4", max_frames=0)
    with pytest.raises(ConfigError, match="face_crops='dlib'"):
        run(tiny_cfg, None, tmp_path / "x.mp4", face_crops="dlib")
    monkeypatch.setattr(offline, "mediapipe_available", lambda: False)
    assert offline.open_face_cropper("auto") is None  # falls back to keypoint boxes, with a warning
