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


def write_video(path: Path, frames, fps: int = 25) -> Path:
    """uint8 (n, H, W, 3) frames as an MP4 at `path`."""
    from personalive.io.video import VideoWriter

    with VideoWriter(path, fps) as writer:
        for frame in frames:
            writer.write(frame)
    return path


def load_tool(name: str):
    """`tools/<name>.py` as a module (the tools are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(name: str, argv: list[str]) -> int:
    """Run `tools/<name>.py`'s main() in-process (same code as the command line, without the import cost)."""
    return load_tool(name).main(argv)


def write_sine(path, codec="aac", container_format=None, seconds=1.0, rate=44100):
    """An audio-only file holding a 440 Hz sine (the audio track of test videos)."""
    import av
    import numpy as np

    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        t = np.arange(int(seconds * rate)) / rate
        samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        for start in range(0, len(samples), 1024):
            frame = av.AudioFrame.from_ndarray(samples[None, start : start + 1024], format="flt", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def write_undecodable_video(path):
    """An MP4 with an H.264 stream whose only packet is garbage: it opens, and no frame decodes."""
    from fractions import Fraction

    import av

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
        packet = av.Packet(b"\x00\x00\x00\x01" + bytes(range(200)))
        packet.stream, packet.pts, packet.dts, packet.time_base = stream, 0, 0, Fraction(1, 25)
        container.mux(packet)
    return path


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A tiny random weights folder in the official layout, written by tools/make_random_weights.py."""
    out = tmp_path_factory.mktemp("weights") / "tiny"
    assert run_tool("make_random_weights", ["--size", "tiny", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_cfg(tiny_weights):
    from personalive.config import load_config

    return load_config(ROOT / "configs/prompts/tiny.yaml", [f"weights_dir={tiny_weights}"])


@pytest.fixture(scope="session")
def tiny_models(tiny_cfg):
    from personalive.weights import load_models

    return load_models(tiny_cfg)


@pytest.fixture(scope="session")
def tiny_export(tiny_cfg, tmp_path_factory) -> Path:
    """A folder holding the tiny streaming step exported to `onnx/unet/unet.onnx` (fp32, CPU, weights in
    `unet.onnx.data`), as `torch2trt.py --onnx-only` writes it (tests/export)."""
    from personalive.export.onnx import export_onnx
    from personalive.pipelines.stream import StreamEngine
    from personalive.weights import load_models

    out = tmp_path_factory.mktemp("export")
    engine = StreamEngine(load_models(tiny_cfg), tiny_cfg)  # its own models: tracing loads sample tokens in its bank
    export_onnx(engine, out, external_data=True)
    return out
