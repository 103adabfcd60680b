"""The paper's evaluation protocols on a folder of test videos, and the table of results (paper Table 1 layout).

- self-reenactment: each test video animates its own first frame (reference = frame 0, driver = the video); the
  result is compared with the video itself (L1, SSIM, PSNR, LPIPS, FVD, tLP; ID-SIM, AED and APD as extras).
- cross-reenactment: each test video drives a portrait of another identity: the first frame of the next video in
  sorted order (cyclically), or the images of `--references` in sorted order (video i gets image i mod m). There is
  no ground truth: ID-SIM (reference vs result), AED and APD (result vs driver), FVD (results vs drivers), tLP.

Every video is read whole (at most `max_frames` frames), centre-cropped and resized to the model size (so that
the result and the video it is scored against share their geometry), animated with the streaming engine as the
offline driver animates (`pipelines.offline.animate_frames`: ramp frames dropped, the window flushed, one output
frame per driving frame), scored, and released: memory holds one video.
Metrics are averaged over all frames (all transitions for tLP) of all videos; FVD is computed once over the
16-frame clips of all videos.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from personalive.errors import ConfigError, ImageReadError, VideoReadError
from personalive.evaluation import metrics as M
from personalive.evaluation.networks import METRIC_TITLES, EvalNetworks, motion_descriptors
from personalive.io.faces import FaceCropper, crop_face
from personalive.io.images import fit_frame, load_image, to_uint8
from personalive.io.video import DEFAULT_FPS, VideoReader, VideoWriter
from personalive.pipelines.offline import DrivingFaces, animate_frames, face_cropper
from personalive.pipelines.stream import StreamEngine

logger = logging.getLogger(__name__)

PROTOCOLS = ("self", "cross")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FRAME_METRICS = ("l1", "ssim", "psnr", "lpips", "tlp", "id_sim", "aed", "apd")  # averaged over frames/transitions
# paper Table 1: (protocol, metric, column title, format)
TABLE_COLUMNS = (
    ("self", "l1", "L1↓", ".3f"), ("self", "ssim", "SSIM↑", ".3f"), ("self", "lpips", "LPIPS↓", ".3f"),
    ("self", "fvd", "FVD↓", ".1f"), ("self", "tlp", "tLP↓", ".3f"),
    ("cross", "id_sim", "ID-SIM↑", ".3f"), ("cross", "aed", "AED↓", ".3f"), ("cross", "apd", "APD↓", ".3f"),
    ("cross", "fvd", "FVD↓", ".1f"), ("cross", "tlp", "tLP↓", ".3f"),
    ("efficiency", "fps", "FPS↑", ".2f"), ("efficiency", "latency_s", "Latency (s)↓", ".3f"),
)
# the paper's own row (arXiv 2512.11253, Table 1); values not quoted here are left empty
PAPER_ROW = {"self": {"l1": 0.039, "ssim": 0.807, "lpips": 0.129},
             "cross": {"id_sim": 0.698, "aed": 0.703, "apd": 0.030},
             "efficiency": {"fps": 15.82, "latency_s": 0.253}}


# ------------------------------------------------------------------------------------------------------------------
# Inputs


def list_clips(folder: str | os.PathLike) -> list[Path]:
    """Test videos in `folder`, sorted by name: video files and sub-folders of frame images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--videos {folder}: not a folder; give a folder of test videos (or of frame folders)")
    clips = sorted(p for p in folder.iterdir() if (p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
                   or (p.is_dir() and any(q.suffix.lower() in IMAGE_SUFFIXES for q in p.iterdir())))
    if not clips:
        raise ConfigError(f"no test videos in {folder}: expected {'/'.join(VIDEO_SUFFIXES)} files or folders of "
                          f"{'/'.join(IMAGE_SUFFIXES)} frames")
    return clips


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not images:
        raise ConfigError(f"--references {folder}: no {'/'.join(IMAGE_SUFFIXES)} images there")
    return images


def read_clip(path: str | os.PathLike, height: int | None = None, width: int | None = None,
              max_frames: int | None = None) -> tuple[np.ndarray, Fraction]:
    """A video file or a folder of frames (sorted by name) -> uint8 (n, H, W, 3) and its frame rate (25 for
    folders). With `height`/`width` each frame is centre-cropped and resized (`io.images.fit_frame`); otherwise all
    frames must share the first one's size.

    Raises:
        VideoReadError: unreadable or empty, or frames of different sizes.
    """
    path = Path(path)

    def fit(frames: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        for i, frame in enumerate(frames):
            if max_frames is not None and i >= max_frames:
                return
            yield fit_frame(frame, height, width) if height and width else frame

    if path.is_dir():
        files = [p for p in sorted(path.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        try:
            frames = list(fit(np.asarray(load_image(p)) for p in files))
        except ImageReadError as e:
            raise VideoReadError(f"{path}: {e}") from e
        rate = Fraction(DEFAULT_FPS)
    else:
        with VideoReader(path) as reader:
            frames, rate = list(fit(iter(reader))), reader.rate
    if not frames:
        raise VideoReadError(f"{path} has no frames")
    if len({f.shape for f in frames}) > 1:
        raise VideoReadError(f"{path}: frames of different sizes; pass a size to resize them")
    return np.stack(frames), rate


# ------------------------------------------------------------------------------------------------------------------
# Animation


def animate(engine: StreamEngine, reference: np.ndarray, driver: np.ndarray, cropper: FaceCropper | None = None,
            source: str = "driver") -> np.ndarray:
    """Animate `reference` uint8 (H, W, 3) with `driver` uint8 (n, H, W, 3), both at the engine's size ->
    uint8 (n, H, W, 3), output i the animation of driving frame i (the offline driver's streaming loop).

    Inputs prepared as the offline driver prepares them (`pipelines.offline.driving_frames`). Face crops as in the
    offline driver: MediaPipe boxes with `cropper` (the reference falls back to the keypoint
    box when no face is found, with a warning), keypoint boxes without.
    """
    crop_size = engine.cfg.model.motion_encoder.image_size
    ref_face = None
    if cropper is not None:
        box = cropper.box(reference)
        if box is None:
            logger.warning("no face found in the reference for %s; using the keypoint face box", source)
        else:
            ref_face = crop_face(reference, box, crop_size)
    faces = DrivingFaces(cropper, crop_size, source)
    pairs = animate_frames(engine, Image.fromarray(reference), ref_face, driver, faces)
    out = to_uint8(np.stack([frame for _, frame in pairs]))
    faces.summary()
    return out


# ------------------------------------------------------------------------------------------------------------------
# Scores


@dataclass
class VideoScores:
    """Per-frame values of one video (arrays empty when a metric does not apply or its network is missing)."""

    name: str
    frames: int
    reference: str = ""
    values: dict[str, np.ndarray] = field(default_factory=dict)  # metric -> (n,) or (n - 1,) for tLP
    features_pred: np.ndarray | None = None  # (clips, d) I3D features of the result
    features_real: np.ndarray | None = None  # ... of the ground truth (self) or driver (cross)
    faces_missed: int = 0  # result frames where no face was found for ID-SIM

    def summary(self) -> dict:
        out = {"name": self.name, "reference": self.reference, "frames": self.frames}
        out.update({k: float(v.mean()) for k, v in self.values.items() if len(v)})
        if self.faces_missed:
            out["id_sim_frames_without_face"] = self.faces_missed
        return out


@torch.no_grad()
def score_video(nets: EvalNetworks, pred: np.ndarray, driver: np.ndarray, gt: np.ndarray | None = None,
                reference: np.ndarray | None = None, name: str = "", reference_name: str = "") -> VideoScores:
    """Every available metric of one generated video.

    Args:
        pred: uint8 (n, H, W, 3) the result; driver: uint8 (n, H, W, 3) the driving frames;
        gt: uint8 (n, H, W, 3) ground truth (self-reenactment: the driver itself) or None (cross);
        reference: uint8 (H, W, 3) the portrait animated (for ID-SIM) or None.
    """
    if pred.shape != driver.shape or (gt is not None and gt.shape != pred.shape):
        raise ValueError(f"{name}: result {pred.shape}, driver {driver.shape} and ground truth "
                         f"{None if gt is None else gt.shape} must have one shape")
    scores = VideoScores(name, len(pred), reference_name)
    v = scores.values
    pred_t, driver_t = M.to_tensor_frames(pred), M.to_tensor_frames(driver)  # (n, 3, H, W) in [-1, 1]
    if gt is not None:
        p, g = M.to_unit_frames(pred), M.to_unit_frames(gt)
        v["l1"], v["ssim"], v["psnr"] = M.l1_per_frame(p, g), M.ssim_per_frame(p, g), M.psnr_per_frame(p, g)
    real_t = M.to_tensor_frames(gt) if gt is not None else driver_t  # FVD's real set
    if nets.lpips is not None:
        device = nets.lpips.shift.device
        lpips = lambda a, b: nets.lpips(a.to(device), b.to(device))  # noqa: E731
        if gt is not None:
            v["lpips"] = M.paired_distances(lpips, pred_t, real_t)
        v["tlp"] = M.tlp_per_transition(lpips, pred_t, driver_t)
    if nets.i3d is not None:
        scores.features_pred, scores.features_real = nets.i3d(pred_t), nets.i3d(real_t)
    if nets.motion_extractor is not None:
        (angles_p, exp_p), (angles_d, exp_d) = (motion_descriptors(nets.motion_extractor, x) for x in (pred_t, driver_t))
        v["apd"], v["aed"] = M.mean_abs_distance(angles_p, angles_d), M.mean_abs_distance(exp_p, exp_d)
    if reference is not None and nets.available("id_sim"):
        ref_embedding = nets.arcface(_aligned(nets, reference[None]))[0]
        _reset(nets.aligner)
        v["id_sim"] = M.cosine_similarity(ref_embedding, nets.arcface(_aligned(nets, pred)))
        scores.faces_missed = getattr(nets.aligner, "missed", 0)
    return scores


def _aligned(nets: EvalNetworks, frames: np.ndarray) -> np.ndarray:
    _reset(nets.aligner)
    return nets.aligner(frames)


def _reset(aligner) -> None:
    if hasattr(aligner, "reset"):
        aligner.reset()


def summarise(videos: list[VideoScores], nets: EvalNetworks) -> dict:
    """Test-set numbers: frame-weighted means of the per-frame metrics, FVD over all clips, and why any is missing."""
    result: dict = {"videos": len(videos), "frames": sum(s.frames for s in videos), "metrics": {}, "skipped": {}}
    for metric in FRAME_METRICS:
        values = [s.values[metric] for s in videos if metric in s.values]
        if values and sum(len(x) for x in values):
            result["metrics"][metric] = float(np.concatenate(values).mean())
    missed = sum(s.faces_missed for s in videos)
    if missed:
        result["id_sim_frames_without_face"] = missed
    if nets.i3d is not None:
        pred = [s.features_pred for s in videos if s.features_pred is not None and len(s.features_pred)]
        real = [s.features_real for s in videos if s.features_real is not None and len(s.features_real)]
        n_pred, n_real = sum(len(x) for x in pred), sum(len(x) for x in real)
        result["fvd_clips"] = n_pred
        if min(n_pred, n_real) >= 2:
            result["metrics"]["fvd"] = M.fvd(np.concatenate(pred), np.concatenate(real))
        else:
            result["skipped"]["fvd"] = (f"FVD needs at least 2 clips of {nets.i3d.clip_len} frames on "
                                        f"each side, got {n_pred} generated and {n_real} real; use longer or more "
                                        "videos")
    result["skipped"].update({m: r for m, r in nets.skip_reasons().items() if m not in result["metrics"]})
    result["per_video"] = [s.summary() for s in videos]
    return result


# ------------------------------------------------------------------------------------------------------------------
# Protocols


@dataclass
class ProtocolOptions:
    """What `run_protocols` does besides the engine and the networks."""

    protocols: tuple[str, ...] = ("self",)  # any of PROTOCOLS
    max_frames: int | None = None  # frames per test video (default: all)
    references: Path | None = None  # cross: folder of reference images (default: next video's first frame)
    face_crops: str = "auto"  # motion-encoder face crops: auto | mediapipe | keypoints (as the offline driver)
    save_videos: Path | None = None  # write every result here as <protocol>/<video>.mp4
    progress: bool = True


def pairs_for(protocol: str, clips: list[Path], references: list[Path] | None) -> list[tuple[Path, Path]]:
    """(driver clip, reference source) per test video: itself for self; for cross, the next clip cyclically or
    image i mod m of `references`."""
    if protocol == "self":
        return [(clip, clip) for clip in clips]
    if references:
        return [(clip, references[i % len(references)]) for i, clip in enumerate(clips)]
    if len(clips) < 2:
        raise ConfigError("cross-reenactment needs at least 2 test videos (references come from other videos) "
                          "or --references DIR")
    return [(clip, clips[(i + 1) % len(clips)]) for i, clip in enumerate(clips)]


def plan(videos: str | os.PathLike, options: ProtocolOptions) -> dict[str, list[tuple[Path, Path]]]:
    """Check the inputs of `run_protocols` (before any model loads) -> {protocol: [(driver clip, reference source)]}.

    Raises:
        ConfigError: unknown protocol, bad --frames, no test videos, no references, or cross with one video.
    """
    unknown = [p for p in options.protocols if p not in PROTOCOLS]
    if unknown or not options.protocols:
        raise ConfigError(f"protocol {unknown or '(none)'}; use self, cross or both")
    if options.max_frames is not None and options.max_frames < 1:
        raise ConfigError(f"--frames {options.max_frames}: give at least 1 frame per video")
    clips = list_clips(videos)
    references = list_images(options.references) if options.references else None
    return {p: pairs_for(p, clips, references) for p in options.protocols}


def run_protocols(engine: StreamEngine, videos: str | os.PathLike, nets: EvalNetworks,
                  options: ProtocolOptions | None = None) -> dict:
    """Animate and score every test video under each protocol -> {protocol: `summarise` dict}."""
    options = options or ProtocolOptions()
    plans = plan(videos, options)
    height, width = engine.cfg.height, engine.cfg.width
    results = {}
    with face_cropper(options.face_crops) as cropper:
        for protocol, pairs in plans.items():
            scores = []
            for clip, ref_source in tqdm(pairs, unit="video", desc=f"{protocol}-reenactment",
                                         disable=not options.progress):
                driver, rate = read_clip(clip, height, width, options.max_frames)
                if ref_source == clip:
                    reference = driver[0]
                elif ref_source.is_file() and ref_source.suffix.lower() in IMAGE_SUFFIXES:
                    reference = fit_frame(np.asarray(load_image(ref_source)), height, width)
                else:
                    reference = read_clip(ref_source, height, width, 1)[0][0]
                pred = animate(engine, reference, driver, cropper, str(clip))
                if options.save_videos is not None:
                    with VideoWriter(Path(options.save_videos) / protocol / f"{clip.stem}.mp4", rate) as writer:
                        for frame in pred:
                            writer.write(frame)
                gt = driver if protocol == "self" else None
                scores.append(score_video(nets, pred, driver, gt, reference, clip.name, ref_source.name))
                logger.info("%s %s: %s", protocol, clip.name, _brief(scores[-1].summary()))
            results[protocol] = summarise(scores, nets)
    return results


def compare_videos(pred: str | os.PathLike, gt: str | os.PathLike, nets: EvalNetworks,
                   max_frames: int | None = None) -> dict:
    """Frame metrics (and, with the networks, LPIPS, tLP, FVD, AED, APD) of a result against its ground truth,
    both videos or frame folders; the ground truth is resized to the result's size and both are cut to the shorter
    length. ID-SIM needs a reference and is not computed here."""
    a, _ = read_clip(pred, max_frames=max_frames)
    b, _ = read_clip(gt, a.shape[1], a.shape[2], max_frames)
    n = min(len(a), len(b))
    if len(a) != len(b):
        logger.warning("%s has %d frames, %s %d: comparing the first %d", pred, len(a), gt, len(b), n)
    scores = score_video(nets, a[:n], b[:n], b[:n], None, Path(pred).name, "")
    result = summarise([scores], nets)
    result["skipped"].setdefault("id_sim", "ID-SIM needs the reference portrait; use --protocol")
    return result


def _brief(summary: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if isinstance(v, float))


# ------------------------------------------------------------------------------------------------------------------
# Tables


def _cell(value: float | None, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, fmt)


def table_row(results: dict, efficiency: dict | None = None) -> dict[str, dict[str, float]]:
    """{protocol or "efficiency": {metric: value}} of one method, from `run_protocols` results."""
    row = {p: dict(r["metrics"]) for p, r in results.items()}
    if efficiency:
        row["efficiency"] = {k: efficiency[k] for k in ("fps", "latency_s") if efficiency.get(k) is not None}
    return row


def markdown_table(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    """Paper Table 1 layout: a group header (self-reenactment | cross-reenactment | efficiency), the metric names,
    one line per method; "—" where a value is missing."""
    groups = ["", "Self-reenactment", "", "", "", "", "Cross-reenactment", "", "", "", "", "Efficiency", ""]
    lines = ["| " + " | ".join(groups) + " |", "|" + "---|" * len(groups),
             "| **Method** | " + " | ".join(f"**{title}**" for _, _, title, _ in TABLE_COLUMNS) + " |"]
    for method, row in rows.items():
        cells = [_cell(row.get(group, {}).get(metric), fmt) for group, metric, _, fmt in TABLE_COLUMNS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(results: dict, out_dir: str | os.PathLike, method: str, efficiency: dict | None = None,
                 settings: dict | None = None) -> tuple[Path, Path]:
    """`table.md` (paper layout, the paper's row first, then notes on what was skipped) and `table.json` (every
    number, per video, the settings and the skip reasons) in `out_dir`, each written whole and renamed."""
    out_dir = Path(out_dir)
    rows = {"PersonaLive (paper)": PAPER_ROW, method: table_row(results, efficiency)}
    notes = [f"- {p}-reenactment: {r['videos']} videos, {r['frames']} frames" for p, r in results.items()]
    for protocol, r in results.items():
        notes += [f"- {protocol}: {METRIC_TITLES[metric]} skipped: {reason}"
                  for metric, reason in r["skipped"].items()]
        if r.get("id_sim_frames_without_face"):
            notes.append(f"- {protocol}: no face found in {r['id_sim_frames_without_face']} result frames for ID-SIM "
                         "(last alignment reused, or the whole frame)")
    if not efficiency:
        notes.append("- FPS / latency: not measured (pass --benchmark)")
    notes.append("- The paper's row lists the values it reports; its FVD and tLP are not filled in here.")
    text = markdown_table(rows) + "\n" + "\n".join(notes) + "\n"
    data = {"method": method, "results": results, "efficiency": efficiency, "settings": settings or {},
            "table": rows}
    md, js = out_dir / "table.md", out_dir / "table.json"
    _write_text(md, text)
    _write_text(js, json.dumps(data, indent=2, default=_json_default) + "\n")
    return md, js


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)
