"""The networks of PersonaLive. Each is built from its config; none knows about files, devices or I/O."""

from __future__ import annotations

import torch
from torch import nn


def cast_model(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """`model.to(device, dtype)`, except that submodules whose class is in `_keep_in_fp32_modules` (and their
    children) get float32 straight from their current values, never via `dtype`."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    kept = {id(d) for m in model.modules() if type(m).__name__ in keep for d in m.modules()}
    nn.Module.to(model, device=device)  # diffusers' ModelMixin.to warns on every dtype cast
    for module in model.modules():
        target = torch.float32 if id(module) in kept else dtype
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(target)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                module._buffers[name] = buffer.to(target)
    return model
