"""From a config to a ready engine: device and dtype resolution, weights loading, the acceleration backend.

`build_engine(cfg, device, acceleration)` is the one place where a backend is chosen; every driver (offline
script, web server, benchmark, export) calls it. The backends (`ACCELERATIONS`):

- "none": the PyTorch step with the config's attention (SDPA by default);
- "xformers": the PyTorch step with xformers attention (`attention=xformers`; CUDA only);
- "tensorrt", "onnxruntime": the exported step of `torch2trt.py`, run by `personalive.export.runtime` (imported
  only when asked for).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch

from personalive.config import PersonaLiveConfig
from personalive.errors import BackendUnavailableError, ConfigError
from personalive.pipelines.stream import NoiseFn, StreamEngine
from personalive.weights import load_models

logger = logging.getLogger(__name__)

EXPORTED = ("tensorrt", "onnxruntime")  # backends that run the step exported by torch2trt.py
ACCELERATIONS = ("none", "xformers", *EXPORTED)


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> the first CUDA device if there is one, else the CPU; a CUDA device without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise BackendUnavailableError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device={name} but this machine has no CUDA GPU; use device=cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise BackendUnavailableError(f"device={name} but only {torch.cuda.device_count()} CUDA devices exist")
    return device


def resolve_dtype(cfg: PersonaLiveConfig, device: torch.device) -> torch.dtype:
    """The config's dtype, except fp16 on the CPU (slow and partly unsupported there) which runs in fp32."""
    if device.type == "cpu" and cfg.torch_dtype == torch.float16:
        logger.warning("dtype=fp16 on the CPU runs in fp32 (use dtype=bf16 for a faster, lower-precision CPU run)")
        return torch.float32
    return cfg.torch_dtype


def check_attention(cfg: PersonaLiveConfig, device: torch.device) -> None:
    if cfg.attention == "xformers" and device.type != "cuda":
        raise BackendUnavailableError("attention=xformers needs a CUDA device; use attention=sdpa")


def exported_step_factory(acceleration: str) -> Callable[..., Callable | None] | None:
    """`create_step_fn(acceleration, engine, cfg)` of the export runtime for tensorrt/onnxruntime, else None.

    Raises:
        ConfigError: unknown acceleration; BackendUnavailableError: the runtime or its package is not installed.
    """
    if acceleration not in ACCELERATIONS:
        raise ConfigError(f"--acceleration {acceleration} is unknown; use one of {', '.join(ACCELERATIONS)}")
    if acceleration not in EXPORTED:
        return None
    try:
        from personalive.export.runtime import create_step_fn  # heavy, optional: only when asked for
    except ModuleNotFoundError as e:
        missing = ("this installation has no personalive.export.runtime" if (e.name or "").startswith("personalive")
                   else f"{e.name} is not installed; `pip install -r requirements-gpu.txt`")
        raise BackendUnavailableError(
            f"--acceleration {acceleration} is unavailable ({missing}); use --acceleration none") from e
    return create_step_fn


def check_acceleration(acceleration: str, device: torch.device) -> Callable[..., Callable | None] | None:
    """Everything about `acceleration` on `device` that can fail before the models load; returns
    `exported_step_factory(acceleration)`.

    Raises:
        ConfigError: unknown acceleration; BackendUnavailableError: its package is missing or it needs CUDA.
    """
    factory = exported_step_factory(acceleration)
    if acceleration == "tensorrt" and device.type != "cuda":
        raise BackendUnavailableError(f"--acceleration tensorrt needs a CUDA device, not {device}; "
                                      "use --acceleration onnxruntime or none")
    return factory


def build_engine(cfg: PersonaLiveConfig, device: str | torch.device | None = None, acceleration: str = "none",
                 noise_fn: NoiseFn | None = None) -> StreamEngine:
    """Load the models of `cfg` onto `device` (default: `cfg.device`), wrap them in a streaming engine and put its
    step on `acceleration` (one of `ACCELERATIONS`; "xformers" sets `attention=xformers`).
    Checks that can fail without the models run before they load.

    Raises:
        ConfigError, BackendUnavailableError, WeightsNotFoundError, CheckpointError.
    """
    device = resolve_device(str(device or cfg.device))
    factory = check_acceleration(acceleration, device)
    if acceleration == "xformers":
        cfg = dataclasses.replace(cfg, attention="xformers")
    check_attention(cfg, device)
    models = load_models(cfg, device, resolve_dtype(cfg, device))
    if cfg.channels_last:
        models.channels_last()
    engine = StreamEngine(models, cfg, noise_fn=noise_fn)
    if factory is not None:
        engine.step_fn = factory(acceleration, engine, cfg)
    return engine
