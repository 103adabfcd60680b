"""Fixtures of the training tests (helpers in synthetic.py)."""

from pathlib import Path

import pytest
import torch
from synthetic import write_dataset


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
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
