"""Shared fixtures: offline hub, seeded RNGs, tiny configs."""

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def official_keys(name: str) -> dict[str, list[int]]:
    """Key -> shape of an official checkpoint file (tests/data/keys/<name>.json)."""
    return json.loads((DATA / "keys" / f"{name}.json").read_text())


def state_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}
