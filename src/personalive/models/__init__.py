"""The networks of PersonaLive. Each is built from its config; none knows about files, devices or I/O."""

from __future__ import annotations

import torch
from torch import nn


def cast_model(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """`model.to(device, dtype)`, keeping in fp32 the submodules whose class is in `_keep_in_fp32_modules`."""
    model.to(device=device, dtype=dtype)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in keep:
            module.float()
    return model
