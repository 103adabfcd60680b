"""MotionExtractor: LivePortrait's ConvNeXt-V2 regressor of implicit 3D keypoints and head pose (paper Sec. 3.1).

One frame in, one set of motion parameters out: canonical keypoints x_c, head-pose bins (pitch, yaw, roll),
translation t and scale s. The keypoint maths (angle decoding, s * x_c R + t, retargeting, drawing) is in
`personalive.keypoints`. Attribute names follow the official checkpoint (`detector.*`); the expression head
`fc_exp` (LivePortrait's expression deformation) is not evaluated by the animation pipeline, as officially; the
evaluation asks for it (`with_expression=True`) to measure expression distances (AED).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from einops import rearrange
from torch import nn

logger = logging.getLogger(__name__)


class ConvNeXtLayerNorm(FP32LayerNorm):
    """LayerNorm computed in fp32 and cast back; `channels_first` normalises dim 1 of (n, c, h, w) maps.

    Listed in `MotionExtractor._keep_in_fp32_modules`, so `cast_model` also keeps its weights fp32 (the official
    `LayerNorm` does the same by overriding `_apply`).
    """

    def __init__(self, dim: int, eps: float = 1e-6, channels_first: bool = False):
        super().__init__(dim, eps=eps)
        self.channels_first = channels_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.channels_first:
            return super().forward(x)
        return rearrange(super().forward(rearrange(x, "n c h w -> n h w c")), "n h w c -> n c h w")


class GRN(nn.Module):
    """ConvNeXt-V2 global response normalisation on channels-last maps (n, h, w, d)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)  # (n, 1, 1, d): L2 over space
        return self.gamma * (x * (g / (g.mean(dim=-1, keepdim=True) + 1e-6))) + self.beta + x


class Block(nn.Module):
    """ConvNeXt-V2 block: depthwise 7x7 -> LN -> Linear(d, 4d) -> GELU -> GRN -> Linear(4d, d), residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = ConvNeXtLayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(rearrange(self.dwconv(x), "n c h w -> n h w c"))
        h = self.pwconv2(self.grn(F.gelu(self.pwconv1(h))))
        return x + rearrange(h, "n h w c -> n c h w")


class ConvNeXtV2(nn.Module):
    """Backbone (stem 4x4/4, then 2x2/2 downsampling before stages 2-4), global average pool, LN and linear heads."""

    def __init__(self, depths: list[int], dims: list[int], num_kp: int, num_bins: int):
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(3, dims[0], kernel_size=4, stride=4), ConvNeXtLayerNorm(dims[0], channels_first=True)
                )
            ]
        )
        for c_in, c_out in zip(dims[:-1], dims[1:], strict=True):
            self.downsample_layers.append(
                nn.Sequential(
                    ConvNeXtLayerNorm(c_in, channels_first=True), nn.Conv2d(c_in, c_out, kernel_size=2, stride=2)
                )
            )
        self.stages = nn.ModuleList(
            nn.Sequential(*(Block(d) for _ in range(n))) for n, d in zip(depths, dims, strict=True)
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)  # plain LayerNorm: follows the model dtype, as official
        self.fc_kp = nn.Linear(dims[-1], 3 * num_kp)
        self.fc_scale = nn.Linear(dims[-1], 1)
        self.fc_pitch = nn.Linear(dims[-1], num_bins)
        self.fc_yaw = nn.Linear(dims[-1], num_bins)
        self.fc_roll = nn.Linear(dims[-1], num_bins)
        self.fc_t = nn.Linear(dims[-1], 3)
        self.fc_exp = nn.Linear(dims[-1], 3 * num_kp)  # expression deformation: only for evaluation (AED)

    def forward(self, x: torch.Tensor, with_expression: bool = False) -> dict[str, torch.Tensor]:
        for down, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(down(x))
        x = self.norm(x.mean(dim=(-2, -1)))  # (n, dims[-1])
        out = {
            "pitch": self.fc_pitch(x),
            "yaw": self.fc_yaw(x),
            "roll": self.fc_roll(x),
            "t": self.fc_t(x),
            "scale": self.fc_scale(x),
            "kp": self.fc_kp(x),
        }
        if with_expression:
            out["exp"] = self.fc_exp(x)
        return out


class MotionExtractor(ModelMixin, ConfigMixin):
    """Frame -> implicit keypoints and head pose (LivePortrait motion extractor M).

    Head-pose logits decode to degrees with `keypoints.headpose_to_degrees` (the official `idx_tensor` buffer is
    not needed: the bin indices are built there in the logits' dtype).
    """

    _keep_in_fp32_modules = ["ConvNeXtLayerNorm"]

    @register_to_config
    def __init__(
        self,
        depths: tuple[int, ...] = (3, 3, 9, 3),
        dims: tuple[int, ...] = (96, 192, 384, 768),
        num_kp: int = 21,
        num_bins: int = 66,
        input_size: int = 256,
    ):
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"depths and dims need 4 stages each, got depths={list(depths)} dims={list(dims)}")
        if input_size % 32:
            raise ValueError(f"input_size={input_size} must be a multiple of 32 (total stride of the backbone)")
        self.detector = ConvNeXtV2(list(depths), list(dims), num_kp, num_bins)

    def forward(self, x: torch.Tensor, with_expression: bool = False) -> dict[str, torch.Tensor]:
        """x: (n, 3, input_size, input_size) RGB in [0, 1], no mean/std normalisation.

        Returns a dict of tensors in the model dtype: `pitch`, `yaw`, `roll` (n, num_bins) logits, `t` (n, 3),
        `scale` (n, 1), `kp` (n, 3 * num_kp) canonical keypoints, and with `with_expression` also `exp`
        (n, 3 * num_kp) expression deformations (LivePortrait's delta; used by the evaluation, not the pipeline).
        """
        size = self.config.input_size
        if x.ndim != 4 or x.shape[1:] != (3, size, size):
            raise ValueError(f"expected (n, 3, {size}, {size}) frames, got {tuple(x.shape)}")
        return self.detector(x.to(self.detector.fc_kp.weight.dtype), with_expression)
