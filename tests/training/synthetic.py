"""Helpers and fixtures of the training tests: synthetic talking-head videos and tiny training configs.

The fixtures live here, not in a tests/training/conftest.py: a second `conftest` module would shadow the root one
that other test files import by name (`from conftest import ROOT`). Test modules import the fixtures they use.
"""

import subprocess
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import write_video

from personalive.config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


def face_frames(n: int, seed: int, size: int = 64) -> np.ndarray:
    """`n` uint8 frames (n, size, size, 3) of a drawn "face" (skin ellipse, eyes, mouth) that moves and talks."""
    rng = np.random.default_rng(seed)
    background = rng.integers(30, 200, 3)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    frames = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        phase = 2 * np.pi * i / n
        cx, cy = size / 2 + 4 * np.sin(phase + seed), size / 2 + 3 * np.cos(phase)
        img = np.empty((size, size, 3), np.float32)
        img[:] = background
        face = ((xx - cx) / (size * 0.28)) ** 2 + ((yy - cy) / (size * 0.36)) ** 2 <= 1
        img[face] = (224, 172, 140)
        for ex in (cx - size * 0.11, cx + size * 0.11):  # eyes
            img[(xx - ex) ** 2 + (yy - (cy - size * 0.08)) ** 2 <= (size * 0.04) ** 2] = (40, 30, 30)
        mouth = (abs(xx - cx) <= size * 0.1) & (abs(yy - (cy + size * 0.15)) <= 1 + 2 * abs(np.sin(3 * phase)))
        img[mouth] = (150, 40, 50)
        frames[i] = img.astype(np.uint8)
    return frames


def write_empty_video(path: Path) -> Path:
    """An MP4 with a video stream and no frame at all."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        container.start_encoding()  # write the header: a valid file with no frame
    return path


def write_dataset(folder: Path) -> Path:
    """Three 32-frame 64x64 synthetic talking-head videos (one in a sub-folder)."""
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    for i, rel in enumerate(["a.mp4", "b.mp4", "sub/c.mp4"]):
        write_video(folder / rel, face_frames(32, seed=i))
    return folder


def train_cfg(stage: int, weights: Path, data: Path, out: Path, *overrides: str, init_from: Path | None = None
              ) -> TrainConfig:
    """A tiny config of `stage` on the tiny random weights (stages 2-3 start from `init_from`, default them too)."""
    extra = [f"init_from={init_from or weights}"] if stage > 1 else []
    return load_config(ROOT / f"configs/train/tiny_stage{stage}.yaml",
                       [f"weights_dir={weights}", f"data_dir={data}", f"output_dir={out}", *extra, *overrides],
                       schema=TrainConfig)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny networks gain nothing from more, a shared CPU loses a lot (threads spinning
    against other processes), and the in-process runs then match the `OMP_NUM_THREADS=1` subprocesses bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory) -> Path:
    """Three 32-frame 64x64 synthetic talking-head videos (one in a sub-folder)."""
    return write_dataset(tmp_path_factory.mktemp("videos"))


def wait_for_checkpoint(proc: subprocess.Popen, folder: Path, timeout: float = 600) -> None:
    """Until `folder` (a checkpoint, renamed into place only when complete) exists, with `proc` still running."""
    deadline = time.monotonic() + timeout
    while not folder.is_dir():
        assert proc.poll() is None, f"the run ended before {folder.name}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
