"""PoseGuider: keypoint canvas -> pose features added to the denoising UNet's first feature map (paper Sec. 3.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from torch import nn


class PoseGuider(ModelMixin, ConfigMixin):
    """Conv stack applied per frame: 3 stride-2 stages take the canvas to latent resolution (1/8)."""

    @register_to_config
    def __init__(self, block_out_channels: tuple[int, ...] = (16, 32, 96, 256), out_channels: int = 320,
                 in_channels: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(block_out_channels[:-1], block_out_channels[1:], strict=True):
            self.blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=2))
        self.conv_out_modify = nn.Conv2d(block_out_channels[-1], out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_out_modify.weight)  # official init: pose starts with no effect
        nn.init.zeros_(self.conv_out_modify.bias)

    def forward(self, canvas: torch.Tensor) -> torch.Tensor:
        """canvas: (b, 3, f, H, W) in [0, 1] -> (b, out_channels, f, H/8, W/8)."""
        f = canvas.shape[2]
        x = F.silu(self.conv_in(rearrange(canvas.to(self.dtype), "b c f h w -> (b f) c h w")))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return rearrange(self.conv_out_modify(x), "(b f) c h w -> b c f h w", f=f)
