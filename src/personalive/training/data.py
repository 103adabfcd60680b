"""Training data: talking-head videos -> (reference, targets) samples, plus the optional keypoint/face-box cache.

A data folder holds videos (`*.mp4`, any depth; other extensions via `data.extensions`). Every sample comes from one
video (self-reenactment): a reference frame and target frames, random frames for stages 1-2 or a clip of
consecutive frames for stage 3. Frames get the crop and resizing of inference: `io.images.fit_frame` (centre crop
to the aspect ratio, Lanczos) to height x width; the reference is then prepared exactly as
`StreamEngine.fuse_reference` prepares a portrait (CLIP processor, VAE processor, motion-extractor input).

Face boxes and keypoints are made in the training step, on the device, with the inference functions (frozen motion
extractor, `keypoints.face_boxes`, `keypoints.crop_faces`), unless `tools/prepare_data.py` cached them: then a
sample carries the motion extractor's raw outputs per frame (and, if MediaPipe was used, its face boxes). The cache
is one `.npz` per video under `cache_dir`, mirroring the data folder; it records the video's byte size and the
sizes it was made for, and is ignored (with a warning) when either no longer matches.

A corrupt, empty, too short or (MediaPipe cache) faceless video is skipped with a warning that names it, when the
dataset is built or, if it fails later, when a sample is drawn (another video then takes its place). The order of
samples is a pure function of the seed and the epoch (`EpochSampler`, which also shards them across processes), and a
sample a pure function of its key, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from skimage.transform import AffineTransform, warp
from torch.utils.data import Dataset, Sampler
from transformers import CLIPImageProcessorPil

from personalive.config import TrainConfig, resolve_path
from personalive.errors import PersonaLiveError, VideoReadError
from personalive.io.images import fit_frame, frames_to_tensor
from personalive.io.video import VideoReader

logger = logging.getLogger(__name__)

MOTION_KEYS = ("pitch", "yaw", "roll", "t", "scale", "kp")  # raw motion-extractor outputs, packed in this order
CACHE_VERSION = 1
CACHE_DIRNAME = ".personalive_cache"
SCAN_THREADS = 8  # files opened at once while indexing a data folder


def motion_dim(num_bins: int, num_kp: int) -> int:
    """Width of one packed frame: 3 head-pose logit vectors, translation, scale, canonical keypoints (265 official)."""
    return 3 * num_bins + 3 + 1 + 3 * num_kp


def pack_motion(info: dict[str, torch.Tensor]) -> torch.Tensor:
    """Motion-extractor outputs for n frames -> (n, motion_dim) float32."""
    return torch.cat([info[k].float().reshape(info[k].shape[0], -1) for k in MOTION_KEYS], dim=1)


def unpack_motion(packed: torch.Tensor, num_bins: int, num_kp: int) -> dict[str, torch.Tensor]:
    """(n, motion_dim) -> the motion extractor's dict (pitch/yaw/roll logits (n, bins), t (n, 3), scale (n, 1),
    kp (n, 3 * num_kp))."""
    sizes = (num_bins, num_bins, num_bins, 3, 1, 3 * num_kp)
    return dict(zip(MOTION_KEYS, packed.split(sizes, dim=1), strict=True))


def motion_input(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Driving frames (n, 3, H, W) in [-1, 1] -> motion-extractor input (n, 3, size, size) in [0, 1], as
    `StreamEngine.step` makes it (bilinear, align_corners=False)."""
    return F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False) / 2 + 0.5


# ------------------------------------------------------------------------------------------------------------------
# Finding videos and their caches


@dataclass(frozen=True)
class VideoEntry:
    path: Path
    num_frames: int  # decodable frames
    cache: Path | None = None  # an up-to-date cache file, when used


def list_videos(data_dir: Path, extensions: list[str], cache_dir: Path | None = None) -> list[Path]:
    """Video files under `data_dir` (any depth, sorted, hidden folders and the cache folder excluded)."""
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    files = []
    for path in data_dir.rglob("*"):
        rel = path.relative_to(data_dir)
        if any(part.startswith(".") for part in rel.parts) or (cache_dir is not None and cache_dir in path.parents):
            continue
        if path.suffix.lower() in exts and path.is_file():
            files.append(path)
    return sorted(files)


def cache_file(video: Path, data_dir: Path, cache_dir: Path) -> Path:
    rel = video.relative_to(data_dir)
    return cache_dir / rel.with_name(rel.name + ".npz")


def default_cache_dir(cfg: TrainConfig) -> Path:
    return resolve_path(cfg.data.cache_dir) if cfg.data.cache_dir else resolve_path(cfg.data_dir) / CACHE_DIRNAME


def cache_expectations(cfg: TrainConfig) -> dict[str, int]:
    """What a cache must have been made for (sizes that change the cached keypoints)."""
    me = cfg.model.motion_extractor
    return {"version": CACHE_VERSION, "height": cfg.height, "width": cfg.width, "input_size": me.input_size,
            "motion_dim": motion_dim(me.num_bins, me.num_kp)}


def read_cache(path: Path, video: Path, expect: dict[str, int]) -> dict[str, np.ndarray] | None:
    """The cache of `video` if it exists and matches the file and `expect`; None (logged) otherwise."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        logger.warning("ignoring unreadable cache %s (%s); re-run tools/prepare_data.py", path, e)
        return None
    stale = [k for k, v in expect.items() if int(data.get(k, -1)) != v]
    if int(data.get("video_bytes", -1)) != video.stat().st_size:
        stale.append("video_bytes")
    if stale:
        logger.warning("ignoring stale cache %s (%s changed); re-run tools/prepare_data.py --force", path,
                       ", ".join(stale))
        return None
    return data


def count_frames(path: Path) -> int:
    """Frames of a video: the number its container states (no decoding: an MP4's sample table), else the frames
    decoded and dropped one at a time. A file that states more frames than it decodes fails later, when a sample
    needs them: it is then skipped by name (`TalkingHeadDataset`). Raises VideoReadError."""
    with VideoReader(path) as reader:
        return reader.stated_frames or sum(1 for _ in reader)


def scan_videos(cfg: TrainConfig, min_frames: int) -> list[VideoEntry]:
    """Every usable video of `cfg.data_dir`; the others are skipped with a warning naming them.

    Raises VideoReadError when the folder is missing or no video is usable."""
    data_dir = resolve_path(cfg.data_dir)
    if not data_dir.is_dir():
        raise VideoReadError(f"data_dir={cfg.data_dir} is not a folder; set data_dir=<folder of talking-head videos>")
    cache_dir = default_cache_dir(cfg)
    expect = cache_expectations(cfg)
    entries, cached = [], 0

    def probe(path: Path) -> tuple[Path, dict | None, int | str]:  # (path, cache, frames or why it is skipped)
        cache = read_cache(cache_file(path, data_dir, cache_dir), path, expect) if cfg.data.use_cache else None
        if cache is not None and str(cache["error"]):
            return path, cache, f"{cache['error']} (recorded by tools/prepare_data.py)"
        try:
            return path, cache, int(cache["num_frames"]) if cache is not None else count_frames(path)
        except Exception as e:  # noqa: BLE001 (any failure of one file skips that file, never the run)
            return path, cache, str(e) if isinstance(e, VideoReadError) else f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(SCAN_THREADS) as pool:  # opening files waits on the disk: overlap them
        probed = list(pool.map(probe, list_videos(data_dir, cfg.data.extensions, cache_dir)))
    for path, cache, n in probed:
        if isinstance(n, str):
            logger.warning("skipping %s: %s", path, n)
            continue
        usable = min(n, cfg.data.max_frames) if cfg.data.max_frames else n
        if usable < min_frames:
            logger.warning("skipping %s: %d usable frames, a sample needs %d", path, usable, min_frames)
            continue
        entries.append(VideoEntry(path, n, cache_file(path, data_dir, cache_dir) if cache is not None else None))
        cached += cache is not None
    if not entries:
        raise VideoReadError(f"no usable video in {data_dir} (extensions {cfg.data.extensions}, at least "
                             f"{min_frames} frames each); see the warnings above")
    logger.info("%d videos in %s (%d with cached keypoints)", len(entries), data_dir, cached)
    return entries


def read_frames(path: Path, indices: list[int]) -> dict[int, np.ndarray]:
    """Decode `path` up to the largest index and keep the frames at `indices` (uint8 (H, W, 3)); memory holds only
    those. Raises VideoReadError when the file fails or ends first."""
    wanted, last = set(indices), max(indices)
    out: dict[int, np.ndarray] = {}
    with VideoReader(path) as reader:
        for i, frame in enumerate(reader):
            if i in wanted:
                out[i] = frame
            if i >= last:
                break
    if len(out) < len(wanted):
        raise VideoReadError(f"{path} ended before frame {last} (it decoded {len(out)} of the frames needed)")
    return out


# ------------------------------------------------------------------------------------------------------------------
# The dataset


class TalkingHeadDataset(Dataset):
    """Samples of (reference frame, target frames) from talking-head videos; `dataset[key]` for any int key.

    The video is `videos[key % len]`, the frames are drawn by a generator seeded with (seed, key): a key always gives
    the same sample. An item (f = `num_frames`):

    - `key`: () int64, the sample's key;
    - `ref_clip`: (3, c, c) float32, the reference through the CLIP processor (c = the CLIP image size);
    - `ref_image`: (3, H_ref, W_ref) float32 in [-1, 1], the reference for the VAE;
    - `ref_pose`: (3, S, S) float32 in [0, 1], the reference for the motion extractor (S = its input size);
    - `frames`: (f, 3, H, W) float32 in [-1, 1], the targets;
    - `cached`: () bool, whether the two next entries hold cached motion-extractor outputs (else zeros);
    - `ref_motion`: (D,) and `motion`: (f, D) float32, packed raw motion-extractor outputs (`unpack_motion`);
    - `face_boxes`: (f, 4) float32, cached MediaPipe face boxes (x1, y1, x2, y2) as fractions of the width and
      height, or -1 where there is none (the training step then uses keypoint boxes, as online inference);
    - `driver_gain`: (3,) float32, the gain per colour channel of the driver's face crops (ones: none).

    Args:
        videos: from `scan_videos`. num_frames: targets per sample. contiguous: a clip of consecutive frames
        (every `stride`-th) instead of random frames. size / ref_size: (H, W) of targets / reference.
        pose_size: S. clip_size: c. max_frames: sample from the first frames only (0: all). motion_width: D.
        reference_gap: the first target at most this many frames from the reference (0: anywhere). color_jitter: x, the
        reference and targets get one random gain per colour channel in [1 - x, 1 + x] (0: none). driver_jitter: x,
        the same for the driver's face crops alone, as `driver_gain` (the training step applies it). hflip: the chance
        that a sample (reference and targets) is mirrored; a mirrored sample ignores the keypoint cache (`cached`
        false), whose keypoints are those of the unmirrored frames. self_reference: the chance that the reference is
        the first target itself. reference_warp: x, the reference alone gets a random similarity warp
        (`warp_reference`); such a sample ignores the keypoint cache too. still_clip: the chance that every target
        is the reference frame (a driver that stands still).
    """

    def __init__(self, videos: list[VideoEntry], num_frames: int, contiguous: bool, size: tuple[int, int],
                 ref_size: tuple[int, int], pose_size: int, clip_size: int, motion_width: int, seed: int = 0,
                 stride: int = 1, max_frames: int = 0, reference_gap: int = 0, color_jitter: float = 0.0,
                 driver_jitter: float = 0.0, hflip: float = 0.0, self_reference: float = 0.0,
                 reference_warp: float = 0.0, still_clip: float = 0.0):
        self.videos, self.num_frames, self.contiguous, self.stride = list(videos), num_frames, contiguous, stride
        self.reference_gap, self.color_jitter, self.driver_jitter = reference_gap, color_jitter, driver_jitter
        self.hflip, self.self_reference, self.reference_warp = hflip, self_reference, reference_warp
        self.still_clip = still_clip
        self.size, self.ref_size, self.pose_size, self.motion_width = size, ref_size, pose_size, motion_width
        self.seed, self.max_frames = seed, max_frames
        self.vae_processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True)  # as StreamEngine
        self.clip_processor = CLIPImageProcessorPil(size={"shortest_edge": clip_size},
                                                    crop_size={"height": clip_size, "width": clip_size})
        self._bad: set[Path] = set()

    def __len__(self) -> int:
        return len(self.videos)

    def frame_indices(self, video: VideoEntry, key: int) -> tuple[int, list[int]]:
        """(reference index, target indices) of sample `key` from `video`."""
        rng = np.random.default_rng([self.seed, key])
        limit = min(video.num_frames, self.max_frames) if self.max_frames else video.num_frames
        if self.contiguous:
            span = (self.num_frames - 1) * self.stride + 1
            start = int(rng.integers(0, limit - span + 1))
            targets = [start + i * self.stride for i in range(self.num_frames)]
        else:
            targets = sorted(int(i) for i in rng.choice(limit, self.num_frames, replace=limit < self.num_frames))
        gap = self.reference_gap or limit
        ref = int(rng.integers(max(0, targets[0] - gap), min(limit, targets[0] + gap + 1)))
        ref = targets[0] if self.rng(key, 4).random() < self.self_reference else ref
        return ref, [ref] * len(targets) if self.rng(key, 6).random() < self.still_clip else targets

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        n = len(self.videos)
        for attempt in range(n):
            video = self.videos[(key + attempt) % n]
            if video.path in self._bad:
                continue
            try:
                return self._sample(video, key)
            except Exception as e:  # noqa: BLE001 (one bad file is skipped by name, never the run)
                reason = str(e) if isinstance(e, VideoReadError) else f"{type(e).__name__}: {e}"
                logger.warning("skipping %s: %s", video.path, reason)
                self._bad.add(video.path)
        raise VideoReadError(f"no readable video left among {n}; see the warnings above")

    def rng(self, key: int, stream: int) -> np.random.Generator:
        """Random stream `stream` of sample `key`: an augmentation draws from its own, so the frame choices and the
        other augmentations stay as without it."""
        return np.random.default_rng([self.seed, key, stream])

    def gain(self, key: int, stream: int, x: float) -> np.ndarray:
        """(3,) float32 random gains in [1 - x, 1 + x] of sample `key`, from stream `stream`."""
        return self.rng(key, stream).uniform(1 - x, 1 + x, 3).astype(np.float32)

    def _sample(self, video: VideoEntry, key: int) -> dict[str, torch.Tensor]:
        ref_index, targets = self.frame_indices(video, key)
        frames = read_frames(video.path, [ref_index, *targets])
        if self.color_jitter:  # one gain for the whole sample
            gain = self.gain(key, 1, self.color_jitter)
            frames = {i: (f * gain).round().clip(0, 255).astype(np.uint8) for i, f in frames.items()}
        mirrored = self.rng(key, 3).random() < self.hflip
        if mirrored:
            frames = {i: np.ascontiguousarray(f[:, ::-1]) for i, f in frames.items()}
        ref = frames[ref_index]
        if self.reference_warp:
            ref = warp_reference(ref, self.rng(key, 5), self.reference_warp)
        ref = Image.fromarray(fit_frame(ref, *self.ref_size))
        s = self.pose_size
        item = {
            "key": torch.tensor(key, dtype=torch.int64),
            "ref_clip": self.clip_processor(images=ref, return_tensors="pt").pixel_values[0],
            "ref_image": self.vae_processor.preprocess(ref, *self.ref_size)[0],
            "ref_pose": self.vae_processor.preprocess(ref, s, s)[0] / 2 + 0.5,
            "frames": frames_to_tensor(np.stack([fit_frame(frames[i], *self.size) for i in targets])),
            "cached": torch.tensor(video.cache is not None and not mirrored and not self.reference_warp),
            "ref_motion": torch.zeros(self.motion_width),
            "motion": torch.zeros(len(targets), self.motion_width),
            "face_boxes": torch.full((len(targets), 4), -1.0),
            "driver_gain": torch.from_numpy(self.gain(key, 2, self.driver_jitter)),
        }
        if item["cached"]:
            with np.load(video.cache, allow_pickle=False) as z:
                motion, boxes = z["motion"], z["boxes"]
            item["ref_motion"] = torch.from_numpy(motion[ref_index].astype(np.float32))
            item["motion"] = torch.from_numpy(motion[targets].astype(np.float32))
            item["face_boxes"] = torch.from_numpy(boxes[targets].astype(np.float32))
        return item


def build_dataset(cfg: TrainConfig, num_frames: int, contiguous: bool, clip_size: int) -> TalkingHeadDataset:
    """The dataset of a run: `num_frames` targets per sample (a clip when `contiguous`)."""
    span = (num_frames - 1) * cfg.data.frame_stride + 1 if contiguous else 1
    me = cfg.model.motion_extractor
    return TalkingHeadDataset(
        scan_videos(cfg, span) * cfg.data.repeats, num_frames, contiguous, (cfg.height, cfg.width),
        (cfg.reference_image_height, cfg.reference_image_width), me.input_size, clip_size,
        motion_dim(me.num_bins, me.num_kp), seed=cfg.seed, stride=cfg.data.frame_stride,
        max_frames=cfg.data.max_frames, reference_gap=cfg.data.reference_gap, color_jitter=cfg.data.color_jitter,
        driver_jitter=cfg.data.driver_jitter, hflip=cfg.data.hflip, self_reference=cfg.data.self_reference,
        reference_warp=cfg.data.reference_warp, still_clip=cfg.data.still_clip)


def warp_reference(frame: np.ndarray, rng: np.random.Generator, x: float) -> np.ndarray:
    """(H, W, 3) uint8 `frame` rotated by up to 100x degrees, scaled by [1 - x, 1 + x] and shifted by up to x of its
    size, about its centre; the border repeats the edge pixels."""
    h, w = frame.shape[:2]
    angle, scale = np.deg2rad(rng.uniform(-100 * x, 100 * x)), rng.uniform(1 - x, 1 + x)
    centre, shift = np.array([w - 1, h - 1]) / 2, rng.uniform(-x, x, 2) * (w, h)
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    inverse = np.array([[cos, sin], [-sin, cos]])  # output (x, y) -> input, i.e. the warp's inverse
    matrix = np.eye(3)
    matrix[:2, :2], matrix[:2, 2] = inverse, centre - inverse @ (centre + shift)
    warped = warp(frame, AffineTransform(matrix=matrix), mode="edge", preserve_range=True)
    return warped.round().clip(0, 255).astype(np.uint8)


class EpochSampler(Sampler[int]):
    """The sample keys of one process: epoch e visits `e * n + i` for i in a permutation of range(n) drawn from
    (seed, e), cut into optimizer steps of `batch_size x num_processes x accumulation` samples (a tail too short for a
    whole step is left out of the epoch). Within a step, micro-batch j takes the next `batch_size x num_processes`
    samples and process p the `batch_size` of them at offset p x batch_size; so each sample of an epoch goes to one
    process once, and one process with batch B x P (or batch B and accumulation P) sees the batches P processes see.

    `set_epoch(e, start)` begins at sample `start` of the epoch's order (a multiple of the step's samples): a resumed
    run continues the epoch where it stopped, with any number of processes, without reading what it skips.
    """

    def __init__(self, n: int, seed: int = 0, batch_size: int = 1, num_processes: int = 1, process_index: int = 0,
                 accumulation: int = 1):
        self.n, self.seed, self.batch_size, self.num_processes = n, seed, batch_size, num_processes
        self.process_index, self.accumulation = process_index, accumulation
        self.epoch, self.start = 0, 0

    @property
    def step_samples(self) -> int:
        """Samples per optimizer step, all processes and micro-batches."""
        return self.batch_size * self.num_processes * self.accumulation

    def steps(self, start: int = 0) -> int:
        """Whole optimizer steps in an epoch begun at sample `start`."""
        return (self.n - start) // self.step_samples

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> np.ndarray:
        """(n,) the epoch's permutation of range(n)."""
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[int]:
        order, b = self.order(), self.batch_size
        micro = b * self.num_processes
        for first in range(self.start, self.start + self.steps(self.start) * self.step_samples, micro):
            for i in order[first + self.process_index * b: first + (self.process_index + 1) * b]:
                yield int(self.epoch * self.n + i)

    def __len__(self) -> int:
        return self.steps(self.start) * self.batch_size * self.accumulation


# ------------------------------------------------------------------------------------------------------------------
# The cache (tools/prepare_data.py)


def prepare_cache(cfg: TrainConfig, detector: str = "keypoints", device: str | torch.device = "cpu",
                  force: bool = False, batch_size: int = 32) -> tuple[int, int]:
    """Write the cache of every video in cfg.data_dir: per frame, the motion extractor's raw outputs (from the frame
    prepared as in training) and, with `detector="mediapipe"`, the MediaPipe face box (-1 where none is found; a
    video where no frame has a face is recorded as faceless and skipped by training). Unreadable videos are recorded
    as such. Up-to-date caches are kept unless `force`. Returns (videos written, videos recorded as bad)."""
    from personalive.weights import load_network

    if detector not in ("keypoints", "mediapipe"):
        raise PersonaLiveError(f"detector={detector!r} is not supported; use keypoints or mediapipe")
    data_dir = resolve_path(cfg.data_dir)
    if not data_dir.is_dir():
        raise VideoReadError(f"data_dir={cfg.data_dir} is not a folder; point --data_dir at the videos")
    cache_dir, expect = default_cache_dir(cfg), cache_expectations(cfg)
    cropper = None
    if detector == "mediapipe":
        from personalive.io.faces import FaceCropper

        cropper = FaceCropper()
    extractor = load_network(cfg, "motion_extractor").to(device)
    written = bad = 0
    try:
        for path in list_videos(data_dir, cfg.data.extensions, cache_dir):
            out = cache_file(path, data_dir, cache_dir)
            if not force and read_cache(out, path, expect) is not None:
                continue
            try:
                motion, boxes = _video_cache(path, cfg, extractor, cropper, batch_size)
                error = ""
                if cropper is not None and (boxes < 0).all():
                    error = "no face found in any frame (MediaPipe)"
            except VideoReadError as e:
                motion, boxes, error = np.zeros((0, expect["motion_dim"]), np.float32), np.zeros((0, 4)), str(e)
            if error:
                logger.warning("skipping %s: %s", path, error)
                bad += 1
            _write_npz(out, motion=motion, boxes=boxes.astype(np.float32), num_frames=len(motion), error=error,
                       video_bytes=path.stat().st_size, detector=detector, **expect)
            written += 1
            logger.info("cached %s: %d frames", path.relative_to(data_dir), len(motion))
    finally:
        if cropper is not None:
            cropper.close()
    return written, bad


@torch.no_grad()
def _video_cache(path: Path, cfg: TrainConfig, extractor: torch.nn.Module, cropper, batch_size: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    size = cfg.model.motion_extractor.input_size
    device = next(extractor.parameters()).device
    motion, boxes, batch = [], [], []

    def flush():
        x = motion_input(frames_to_tensor(np.stack(batch)).to(device), size)
        motion.append(pack_motion(extractor(x)).cpu().numpy())
        batch.clear()

    with VideoReader(path) as reader:
        for frame in reader:
            frame = fit_frame(frame, cfg.height, cfg.width)
            batch.append(frame)
            if cropper is not None:
                box = cropper.box(frame)
                h, w = frame.shape[:2]
                boxes.append([-1.0] * 4 if box is None else [box[0] / w, box[1] / h, box[2] / w, box[3] / h])
            if len(batch) == batch_size:
                flush()
    if batch:
        flush()
    motion = np.concatenate(motion)
    return motion, np.asarray(boxes, np.float32) if cropper is not None else np.full((len(motion), 4), -1.0)


def _write_npz(path: Path, **arrays) -> None:
    """np.savez through a temp file renamed when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
