"""Reference UNet (ReferenceNet, paper Sec. 3.2): diffusers' `UNet2DConditionModel` without its output head.

It runs on the reference latent at t = 0 only to fill the reference attention bank; its output is never used,
so, as in the official `reference_unet.pth`, `conv_norm_out` and `conv_out` do not exist.
"""

from __future__ import annotations

from typing import Any

from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import nn


def reference_unet_from_config(config: dict[str, Any]) -> UNet2DConditionModel:
    """Build the reference UNet from the SD image-variations UNet config."""
    unet = UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    unet.conv_norm_out = None  # diffusers skips the norm and activation when this is None
    unet.conv_out = nn.Identity()
    return unet
