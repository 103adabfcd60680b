"""MotionEncoder: face crop -> implicit facial-motion tokens (paper Sec. 3.1; official `MotEncoder` over `FAN_SA`).

A FAN landmark network (stem, pre-activation ConvBlocks, one HourGlass) with three patch-wise spatial
self-attention transformers inserted, whose heat-map layer is squeezed to a 512-vector and projected to
`num_tokens` tokens of `token_dim` features plus a fixed sin-cos position table. Frames are encoded
independently. Attribute names follow the official checkpoint (`model.*`, `final_proj`, `pe`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import PatchEmbed, get_1d_sincos_pos_embed_from_grid
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from torch import nn

from personalive.models.temporal_module import TransformerBlock

logger = logging.getLogger(__name__)


def conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False)


class ConvBlock(nn.Module):
    """FAN bottleneck: three pre-activated (BN, ReLU) 3x3 convs of out/2, out/4, out/4 channels, concatenated,
    plus the input (through BN(eps 1e-4) -> ReLU -> 1x1 conv when the width changes)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = conv3x3(c_in, c_out // 2)
        self.bn2 = nn.BatchNorm2d(c_out // 2)
        self.conv2 = conv3x3(c_out // 2, c_out // 4)
        self.bn3 = nn.BatchNorm2d(c_out // 4)
        self.conv3 = conv3x3(c_out // 4, c_out // 4)
        self.downsample = None
        if c_in != c_out:
            self.downsample = nn.Sequential(
                nn.BatchNorm2d(c_in, eps=1e-4), nn.ReLU(), nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o1 = self.conv1(F.relu(self.bn1(x)))
        o2 = self.conv2(F.relu(self.bn2(o1)))
        o3 = self.conv3(F.relu(self.bn3(o2)))
        residual = x if self.downsample is None else self.downsample(x)
        return torch.cat([o1, o2, o3], dim=1) + residual


class HourGlass(nn.Module):
    """Recursive hourglass of ConvBlocks: level L keeps `b1_L(x)` and adds the upsampled result of
    `b3_L(inner(b2_L(maxpool(x))))`, where inner is level L-1 (or `b2_plus_1` at the bottom)."""

    def __init__(self, depth: int, channels: int):
        super().__init__()
        self.depth = depth
        self.dropout = nn.Dropout(0.5)
        for level in range(depth, 0, -1):  # registration order = official recursion order
            self.add_module(f"b1_{level}", ConvBlock(channels, channels))
            self.add_module(f"b2_{level}", ConvBlock(channels, channels))
        self.b2_plus_1 = ConvBlock(channels, channels)
        for level in range(1, depth + 1):
            self.add_module(f"b3_{level}", ConvBlock(channels, channels))

    def _level(self, level: int, x: torch.Tensor) -> torch.Tensor:
        up = self.dropout(getattr(self, f"b1_{level}")(x))
        low = getattr(self, f"b2_{level}")(F.max_pool2d(x, 2, stride=2))
        low = self._level(level - 1, low) if level > 1 else self.b2_plus_1(low)
        low = getattr(self, f"b3_{level}")(low)
        return up + F.interpolate(low, size=up.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._level(self.depth, x)


class SpatialTransformer(nn.Module):
    """Residual patch transformer: GroupNorm -> p x p patch embedding with 2-D sin-cos positions -> one
    self-attention + GEGLU block -> each token's features split into p x p sub-vectors, mapped back to channels by
    `proj_out` (zero-initialised) and scattered to their pixels."""

    def __init__(self, channels: int, sample_size: int, patch_size: int, dim: int, heads: int, norm_num_groups: int):
        super().__init__()
        self.patch_size = patch_size
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=1e-6, affine=True)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(dim, heads, dim // heads, ("Spatial_Self",))])
        self.proj_out = nn.Linear(dim // patch_size**2, channels)
        nn.init.zeros_(self.proj_out.weight)  # official init: the block starts as the identity
        nn.init.zeros_(self.proj_out.bias)
        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=channels,
            embed_dim=dim,
            interpolation_scale=1,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, c, h, w), h and w multiples of the patch size -> same shape."""
        p = self.patch_size
        tokens = self.pos_embed(self.norm(x))  # (n, (h/p w/p), dim)
        for block in self.transformer_blocks:
            tokens = block(tokens)
        tokens = rearrange(tokens, "n (gh gw) (p q d) -> n gh gw p q d", gh=x.shape[-2] // p, p=p, q=p)
        return x + rearrange(self.proj_out(tokens), "n gh gw p q c -> n c (gh p) (gw q)")


class FAN(nn.Module):
    """FAN_SA backbone: (n, 3, S, S) -> (n, out_dim). Resolutions S/2 (att_1), S/4 (att_2, hourglass, att_3), S/8."""

    def __init__(
        self,
        image_size: int,
        channels: list[int],
        hourglass_depth: int,
        num_landmarks: int,
        attention_dim: int,
        attention_heads: int,
        norm_num_groups: int,
        out_dim: int,
    ):
        super().__init__()
        c0, c1, c2 = channels
        self.conv1 = nn.Conv2d(3, c0, kernel_size=7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(c0)
        self.conv2 = ConvBlock(c0, c1)
        self.conv3 = ConvBlock(c1, c1)
        self.conv4 = ConvBlock(c1, c2)
        self.m0 = HourGlass(hourglass_depth, c2)
        self.top_m_0 = ConvBlock(c2, c2)
        self.conv_last0 = nn.Conv2d(c2, c2, kernel_size=1)
        self.l0 = nn.Conv2d(c2, num_landmarks, kernel_size=1)  # heat-map layer
        self.bn_end0 = nn.BatchNorm2d(c2)
        self.conv6 = nn.Conv2d(num_landmarks, 1, kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear((image_size // 8) ** 2, out_dim)
        self.bn5 = nn.BatchNorm2d(num_landmarks)
        attn = dict(dim=attention_dim, heads=attention_heads, norm_num_groups=norm_num_groups)
        self.att_1 = SpatialTransformer(c1, image_size // 2, 4, **attn)
        self.att_2 = SpatialTransformer(c2, image_size // 4, 2, **attn)
        self.att_3 = SpatialTransformer(c2, image_size // 4, 2, **attn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.att_1(self.conv2(F.relu(self.bn1(self.conv1(x)))))  # (n, c1, S/2, S/2)
        x = self.att_2(self.conv4(self.conv3(F.max_pool2d(x, 2))))  # (n, c2, S/4, S/4)
        x = self.att_3(self.bn_end0(self.conv_last0(self.top_m_0(self.m0(x)))))
        x = F.relu(self.bn5(self.l0(F.relu(x))))  # (n, num_landmarks, S/4, S/4)
        x = F.relu(self.conv6(x).flatten(1))  # (n, (S/8)^2)
        return self.fc(x)


class MotionEncoder(ModelMixin, ConfigMixin):
    """Face crops -> motion tokens (BatchNorms use running statistics in eval mode)."""

    @register_to_config
    def __init__(
        self,
        image_size: int = 224,
        channels: tuple[int, ...] = (64, 128, 256),
        hourglass_depth: int = 4,
        num_landmarks: int = 68,
        attention_dim: int = 1024,
        attention_heads: int = 8,
        norm_num_groups: int = 32,
        num_tokens: int = 32,
        token_dim: int = 16,
    ):
        super().__init__()
        self._check_config()
        width = num_tokens * token_dim  # 512 official
        self.model = FAN(
            image_size,
            list(channels),
            hourglass_depth,
            num_landmarks,
            attention_dim,
            attention_heads,
            norm_num_groups,
            width,
        )
        pe = get_1d_sincos_pos_embed_from_grid(token_dim, torch.arange(num_tokens, dtype=torch.float64))
        self.register_buffer("pe", pe.float()[None])  # (1, num_tokens, token_dim), persistent as official
        self.final_proj = nn.Linear(width, width)

    def _check_config(self):
        c = self.config
        problems = []
        if c.image_size % 8:
            problems.append(f"image_size={c.image_size} must be a multiple of 8 (patches 4 at S/2 and 2 at S/4)")
        if len(c.channels) != 3 or any(ch % 4 for ch in c.channels[1:]):
            problems.append(f"channels={list(c.channels)} must be 3 widths, the last two multiples of 4")
        elif any(ch % c.norm_num_groups for ch in c.channels[1:]):
            problems.append(f"norm_num_groups={c.norm_num_groups} must divide channels[1:]={list(c.channels[1:])}")
        if c.attention_dim % c.attention_heads or c.attention_dim % 16:
            problems.append(f"attention_dim={c.attention_dim} must be a multiple of 16 and of attention_heads")
        if c.token_dim % 2:
            problems.append(f"token_dim={c.token_dim} must be even (sin-cos position table)")
        if problems:
            raise ValueError("MotionEncoder config: " + "; ".join(problems))

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """faces: (b, 3, f, S, S) RGB face crops in [-1, 1], S = image_size -> (b, f, num_tokens, token_dim)."""
        s = self.config.image_size
        if faces.ndim != 5 or faces.shape[1] != 3 or faces.shape[-2:] != (s, s):
            raise ValueError(f"expected (b, 3, f, {s}, {s}) face crops, got {tuple(faces.shape)}")
        f = faces.shape[2]
        x = self.final_proj(self.model(rearrange(faces.to(self.dtype), "b c f h w -> (b f) c h w")))
        x = rearrange(x, "n (l d) -> n l d", d=self.config.token_dim) + self.pe
        return rearrange(x, "(b f) l d -> b f l d", f=f)
