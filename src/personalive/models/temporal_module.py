"""Motion modules and temporal modules of the denoising UNet (AnimateDiff "Vanilla" modules, paper Sec. 3).

Both wrap one transformer over a frame-flattened feature map:
- motion module (`Spatial_Cross`): every frame's pixels cross-attend to that frame's motion tokens;
- temporal module (`Temporal_Self`): every pixel attends over the frames of the window, with a sinusoidal
  position encoding of the frame index.
The FAN motion encoder reuses `TransformerBlock` with a single `Spatial_Self` attention.
Attribute names follow the official checkpoints (`attention_blocks.i`, `norms.i`, `ff`, `ff_norm`, `pos_encoder.pe`).
"""

from __future__ import annotations

import math

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from einops import rearrange
from torch import nn

BLOCK_TYPES = ("Spatial_Cross", "Spatial_Self", "Temporal_Self")


class PositionalEncoding(nn.Module):
    """Fixed sin/cos table: pe[0, p, 2i] = sin(p * w_i), pe[0, p, 2i+1] = cos(p * w_i), w_i = 10000^(-2i/dim)."""

    def __init__(self, dim: int, max_len: int = 32):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        freq = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        pe = torch.zeros(1, max_len, dim)
        pe[0, :, 0::2] = torch.sin(position * freq)
        pe[0, :, 1::2] = torch.cos(position * freq)
        self.register_buffer("pe", pe)  # persistent: the official checkpoints carry it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, f, dim) -> x + pe[:, :f]."""
        return x + self.pe[:, : x.shape[1]]


class TransformerBlock(nn.Module):
    """Pre-norm residual attention sub-blocks (one per entry of `block_types`), then a GEGLU feed-forward."""

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        block_types: tuple[str, ...] | list[str],
        cross_attention_dim: int | None = None,
        position_encoding_max_len: int | None = None,
    ):
        super().__init__()
        unknown = set(block_types) - set(BLOCK_TYPES)
        if unknown:
            raise ValueError(f"unknown attention block types {sorted(unknown)}; use {BLOCK_TYPES}")
        self.block_types = tuple(block_types)
        self.attention_blocks = nn.ModuleList()
        self.norms = nn.ModuleList()
        for kind in self.block_types:
            attn = Attention(
                query_dim=dim,
                cross_attention_dim=cross_attention_dim if kind == "Spatial_Cross" else None,
                heads=num_attention_heads,
                dim_head=attention_head_dim,
            )
            if kind == "Temporal_Self" and position_encoding_max_len:
                attn.pos_encoder = PositionalEncoding(dim, position_encoding_max_len)  # official key path
            self.attention_blocks.append(attn)
            self.norms.append(nn.LayerNorm(dim))
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, num_frames: int = 1
    ) -> torch.Tensor:
        """x: ((b f), n, dim); context: ((b f), m, d) tokens for Spatial_Cross blocks."""
        for kind, attn, norm in zip(self.block_types, self.attention_blocks, self.norms, strict=True):
            h = norm(x)
            if kind == "Temporal_Self":
                n = h.shape[1]
                h = rearrange(h, "(b f) n c -> (b n) f c", f=num_frames)
                if hasattr(attn, "pos_encoder"):
                    h = attn.pos_encoder(h)  # feeds q, k and v; the residual stays un-encoded
                h = rearrange(attn(h), "(b n) f c -> (b f) n c", n=n)
            else:
                h = attn(h, encoder_hidden_states=context if kind == "Spatial_Cross" else None)
            x = x + h
        return x + self.ff(self.ff_norm(x))


class TemporalTransformer3D(nn.Module):
    """GroupNorm -> per-pixel Linear -> transformer blocks -> Linear (zero-initialised) -> residual."""

    def __init__(self, in_channels: int, num_attention_heads: int, attention_head_dim: int, num_layers: int,
                 block_types: list[str], norm_num_groups: int = 32, cross_attention_dim: int | None = None,
                 position_encoding_max_len: int | None = None):
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(in_channels, inner_dim)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner_dim, num_attention_heads, attention_head_dim, block_types,
                             cross_attention_dim, position_encoding_max_len)
            for _ in range(num_layers)
        )
        self.proj_out = nn.Linear(inner_dim, in_channels)
        nn.init.zeros_(self.proj_out.weight)  # a fresh module starts as the identity
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, num_frames: int) -> torch.Tensor:
        """x: ((b f), c, h, w); context: ((b f), m, d) or None -> ((b f), c, h, w)."""
        h, w = x.shape[-2:]
        hidden = rearrange(self.norm(x), "n c h w -> n (h w) c")
        hidden = self.proj_in(hidden)
        for block in self.transformer_blocks:
            hidden = block(hidden, context, num_frames)
        hidden = self.proj_out(hidden)
        return rearrange(hidden, "n (h w) c -> n c h w", h=h, w=w) + x


class VanillaTemporalModule(nn.Module):
    """One motion or temporal module of the denoising UNet (official `VanillaTemporalModule`)."""

    def __init__(self, in_channels: int, num_attention_heads: int = 8, num_transformer_block: int = 1,
                 attention_block_types: list[str] = ("Temporal_Self", "Temporal_Self"),
                 cross_attention_dim: int | None = None, temporal_position_encoding: bool = False,
                 temporal_position_encoding_max_len: int = 32, temporal_attention_dim_div: int = 1,
                 norm_num_groups: int = 32):
        super().__init__()
        self.temporal_transformer = TemporalTransformer3D(
            in_channels,
            num_attention_heads,
            in_channels // num_attention_heads // temporal_attention_dim_div,
            num_transformer_block,
            list(attention_block_types),
            norm_num_groups,
            cross_attention_dim,
            temporal_position_encoding_max_len if temporal_position_encoding else None,
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, num_frames: int) -> torch.Tensor:
        return self.temporal_transformer(x, context, num_frames)
