"""What the exporter writes and the runtime reads: file names, the `export.json` metadata, the optional packages and
the tensor types of ONNX Runtime and TensorRT. The bottom of `export/`: it imports no other export module.

Layout under the export folder (default: the config's weights_dir): `onnx/unet/unet.onnx` (+ `unet.onnx.data` when
large), `onnx/unet_opt/unet_opt.onnx` (ONNX Runtime's basic optimisations), `tensorrt/unet_work.engine`; each
folder holds an `export.json` (the cache key and the resolved config).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import torch

from personalive.errors import BackendUnavailableError, CheckpointError

ONNX_PATH = Path("onnx/unet/unet.onnx")
OPTIMIZED_PATH = Path("onnx/unet_opt/unet_opt.onnx")
ENGINE_PATH = Path("tensorrt/unet_work.engine")
METADATA = "export.json"
EXPORT_HINT = "python torch2trt.py --config <this config> {flags}"

ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64}


def read_metadata(model_path: str | Path) -> dict:
    """The `export.json` beside a model file ({} when missing or unreadable)."""
    path = Path(model_path).parent / METADATA
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_metadata(model_path: Path, key: dict, cfg, **extra) -> None:
    data = {"key": key, **extra, "config": dataclasses.asdict(cfg)}
    (model_path.parent / METADATA).write_text(json.dumps(data, indent=1, default=str) + "\n")


def require_tensorrt():
    """The tensorrt module (TensorRT 10), or a `BackendUnavailableError` saying what is missing."""
    if importlib.util.find_spec("tensorrt") is None:
        raise BackendUnavailableError(
            "TensorRT is not installed; on a CUDA machine `pip install -r requirements-gpu.txt`, "
            "or export only the ONNX model with `python torch2trt.py --onnx-only`")
    import tensorrt as trt

    if int(trt.__version__.split(".")[0]) != 10:
        raise BackendUnavailableError(f"TensorRT {trt.__version__} is installed, this code uses the TensorRT 10 API; "
                                      f"`pip install -r requirements-gpu.txt` (tensorrt 10)")
    return trt


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "building or running a TensorRT engine needs a CUDA GPU and this machine has none; "
            "`python torch2trt.py --onnx-only` exports the ONNX model (usable with --acceleration onnxruntime)")


def trt_torch_dtype(dtype) -> torch.dtype:
    """The torch dtype of a TensorRT tensor type."""
    trt = require_tensorrt()
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}
    if dtype not in table:
        raise CheckpointError(f"TensorRT tensor type {dtype} is not supported; rebuild with python torch2trt.py")
    return table[dtype]


def numpy_dtype(dtype: torch.dtype):
    """The numpy dtype of a float torch dtype (ONNX Runtime's I/O binding takes numpy types)."""
    import numpy as np

    return {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}[dtype]
