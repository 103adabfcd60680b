"""From a config to a ready engine: device and dtype resolution, weights loading, backend checks."""

from __future__ import annotations

import logging

import torch

from personalive.config import PersonaLiveConfig
from personalive.errors import BackendUnavailableError
from personalive.pipelines.stream import NoiseFn, StreamEngine
from personalive.weights import load_models

logger = logging.getLogger(__name__)


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


def build_engine(cfg: PersonaLiveConfig, device: str | torch.device | None = None,
                 noise_fn: NoiseFn | None = None) -> StreamEngine:
    """Load the models of `cfg` onto `device` (default: `cfg.device`) and wrap them in a streaming engine."""
    device = resolve_device(str(device or cfg.device))
    check_attention(cfg, device)
    models = load_models(cfg, device, resolve_dtype(cfg, device))
    if cfg.channels_last:
        models.channels_last()
    return StreamEngine(models, cfg, noise_fn=noise_fn)
