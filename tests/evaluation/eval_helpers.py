"""Helpers of the evaluation tests: a tiny random ArcFace-shaped ONNX model, an aligner without MediaPipe, synthetic
frames.

(A module of its own rather than a conftest.py: `conftest` is the root conftest's module name.)
"""

from pathlib import Path

import numpy as np
from PIL import Image


def moving_pattern(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size, 3): a smooth random pattern sliding one pixel per frame (compresses well)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))
    return np.stack([np.roll(base, t, axis=1) for t in range(n)])


def write_tiny_arcface(path: Path, dim: int = 8, seed: int = 0, with_norm_nodes: bool = False) -> Path:
    """An ONNX model with ArcFace's interface: input (n, 3, 112, 112) float -> (n, dim) embedding.

    Global average pool, flatten, a random (3, dim) matrix plus a bias; `with_norm_nodes` prepends Sub and Mul
    nodes as older MXNet ArcFace exports have (their input is then 0..255)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, first = [], "input.1"
    inits = [numpy_helper.from_array(rng.normal(size=(3, dim)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(size=(dim,)).astype(np.float32), "B")]
    if with_norm_nodes:
        inits += [numpy_helper.from_array(np.array(127.5, np.float32), "mean"),
                  numpy_helper.from_array(np.array(1 / 127.5, np.float32), "inv_std")]
        nodes += [helper.make_node("Sub", ["input.1", "mean"], ["centred"], name="Sub_0"),
                  helper.make_node("Mul", ["centred", "inv_std"], ["normed"], name="Mul_1")]
        first = "normed"
    nodes += [helper.make_node("GlobalAveragePool", [first], ["pooled"], name="pool"),
              helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
              helper.make_node("MatMul", ["flat", "W"], ["mm"], name="matmul"),
              helper.make_node("Add", ["mm", "B"], ["683"], name="add")]
    graph = helper.make_graph(
        nodes, "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["n", 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["n", dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


class ResizeAligner:
    """Stands in for `FaceAligner` (MediaPipe) in plumbing tests: the whole frame resized to 112 x 112."""

    def __init__(self, size: int = 112):
        self.size, self.missed, self.total = size, 0, 0

    def reset(self) -> None:
        self.missed = self.total = 0

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        self.total += len(frames)
        return np.stack([np.asarray(Image.fromarray(f).resize((self.size, self.size), Image.Resampling.BILINEAR))
                         for f in frames])

