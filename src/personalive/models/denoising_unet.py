"""Denoising UNet: the SD-1.x UNet applied per frame, with motion and temporal modules at every level (paper Sec. 3).

The 2-D layers are diffusers' own (built by `UNet2DConditionModel` from the SD image-variations config and taken
over), so their parameter names are diffusers' and the official `denoising_unet.pth` loads key for key. A video
runs as a batch of frames, `(b f) c h w`: every 2-D layer (convs, group norms, spatial attention) is per frame
exactly like the official "inflated" 3-D layers, and each frame gets its own timestep embedding. Each layer is

    resnet -> spatial transformer (reference self-attention, CLIP cross-attention) -> motion module -> temporal module

(levels without attention skip the transformer). Reference attention is installed by `attention_processors`.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from einops import rearrange
from torch import nn

from personalive.errors import ConfigError
from personalive.models.temporal_module import VanillaTemporalModule

SUPPORTED_2D = {
    "down_block_types": {"CrossAttnDownBlock2D", "DownBlock2D"},
    "up_block_types": {"CrossAttnUpBlock2D", "UpBlock2D"},
    "mid_block_type": {"UNetMidBlock2DCrossAttn"},
}
UNSUPPORTED_2D = ("class_embed_type", "addition_embed_type", "encoder_hid_dim", "time_cond_proj_dim", "num_class_embeds")


class DenoisingUNet(ModelMixin, ConfigMixin, AttentionMixin):
    """Frame-inflated SD UNet with motion modules (cross-attention to motion tokens) and temporal modules.

    Args:
        unet2d_config: the SD UNet `config.json` (diffusers `UNet2DConditionModel` arguments).
        motion_module_kwargs / temporal_module_kwargs: official `inference_stage3.yaml` module settings.
        use_motion_module, use_temporal_module, motion_module_resolutions, motion_module_mid_block,
        motion_module_decoder_only: where modules go, with the official meaning (resolution 2**level).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        unet2d_config: dict[str, Any],
        motion_module_kwargs: dict[str, Any] | None = None,
        temporal_module_kwargs: dict[str, Any] | None = None,
        use_motion_module: bool = True,
        use_temporal_module: bool = True,
        motion_module_resolutions: tuple[int, ...] = (1, 2, 4, 8),
        motion_module_mid_block: bool = True,
        motion_module_decoder_only: bool = False,
    ):
        super().__init__()
        unet2d_config = {k: v for k, v in unet2d_config.items() if not k.startswith("_")}
        _check_2d_config(unet2d_config)
        unet = UNet2DConditionModel.from_config(unet2d_config)
        for name in ("conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block", "up_blocks",
                     "conv_norm_out", "conv_act", "conv_out"):
            setattr(self, name, getattr(unet, name))
        self.gradient_checkpointing = False

        levels = len(self.down_blocks)

        def modules(channels: int, count: int, kwargs: dict | None, enabled: bool) -> nn.ModuleList | None:
            if not enabled or kwargs is None:
                return None
            # GroupNorm(32) whatever the UNet's norm_num_groups: the official code never passes it on (the group
            # count is in no weights file, so a wrong one would load cleanly and compute something else)
            return nn.ModuleList(VanillaTemporalModule(channels, **kwargs) for _ in range(count))

        for i, block in enumerate(self.down_blocks):
            here = 2**i in motion_module_resolutions and not motion_module_decoder_only
            channels, count = block.resnets[0].out_channels, len(block.resnets)
            block.motion_modules = modules(channels, count, motion_module_kwargs, use_motion_module and here)
            block.temporal_modules = modules(channels, count, temporal_module_kwargs, use_temporal_module and here)
        mid_channels = self.mid_block.resnets[0].out_channels
        self.mid_block.motion_modules = modules(
            mid_channels, 1, motion_module_kwargs, use_motion_module and motion_module_mid_block)
        self.mid_block.temporal_modules = modules(
            mid_channels, 1, temporal_module_kwargs, use_temporal_module and motion_module_mid_block)
        for i, block in enumerate(self.up_blocks):
            here = 2 ** (levels - 1 - i) in motion_module_resolutions
            channels, count = block.resnets[0].out_channels, len(block.resnets)
            block.motion_modules = modules(channels, count, motion_module_kwargs, use_motion_module and here)
            block.temporal_modules = modules(channels, count, temporal_module_kwargs, use_temporal_module and here)

    @classmethod
    def from_unet2d_config(cls, unet2d_config: dict[str, Any], unet_additional_kwargs: dict[str, Any]) -> DenoisingUNet:
        """Inflate an SD UNet config with the official `unet_additional_kwargs` (inference_stage3.yaml)."""
        extra = dict(unet_additional_kwargs)
        keep = ("use_motion_module", "use_temporal_module", "motion_module_resolutions", "motion_module_mid_block",
                "motion_module_decoder_only", "motion_module_kwargs", "temporal_module_kwargs")
        for key in ("motion_module_type", "temporal_module_type"):
            if extra.get(key, "Vanilla") != "Vanilla":
                raise ConfigError(f"{key}={extra[key]!r} is not supported; use Vanilla")
        return cls(unet2d_config=dict(unet2d_config), **{k: extra[k] for k in keep if k in extra})

    @property
    def in_channels(self) -> int:
        return self.conv_in.in_channels

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        clip_embeds: torch.Tensor,
        motion_tokens: torch.Tensor | None,
        pose_features: torch.Tensor | None = None,
        temporal: bool = True,
    ) -> torch.Tensor:
        """Predict the noise of a window of frames.

        Args:
            sample: (b, c, f, h, w) noisy latents.
            timestep: one per frame, (f,) or (b*f,) in "(b f)" order, or a scalar for all frames.
            clip_embeds: (b, n, d) CLIP image embeddings (n = 1 in PersonaLive).
            motion_tokens: (b, f, m, d_motion) motion tokens, one set per frame.
            pose_features: (b, c0, f, h, w) PoseGuider output, added after `conv_in`.
            temporal: False skips the temporal modules (image-level training, paper stage 1).
        Returns:
            (b, c, f, h, w) predicted noise.
        """
        b, _, f, _, _ = sample.shape
        x = rearrange(sample, "b c f h w -> (b f) c h w")
        t = torch.as_tensor(timestep, device=x.device).reshape(-1)
        t = t.repeat(b * f // t.numel()) if t.numel() in (1, f) else t  # (b f,)
        emb = self.time_embedding(self.time_proj(t).to(x.dtype))  # (b f, d_t): each frame its own timestep
        x = self.conv_in(x)
        if pose_features is not None:
            x = x + rearrange(pose_features, "b c f h w -> (b f) c h w")
        clip = clip_embeds.repeat_interleave(f, dim=0)  # (b f, n, d)
        motion = None if motion_tokens is None else rearrange(motion_tokens, "b f m d -> (b f) m d")
        ctx = (emb, clip, motion, f, temporal)

        skips = [x]
        for block in self.down_blocks:
            for j in range(len(block.resnets)):
                x = self._layer(block, j, x, ctx)
                skips.append(x)
            for down in block.downsamplers or ():
                x = down(x)
                skips.append(x)

        mid = self.mid_block
        x = mid.resnets[0](x, emb)
        for j, resnet in enumerate(mid.resnets[1:]):
            x = resnet(self._layer(mid, j, x, ctx, resnet=False), emb)

        for block in self.up_blocks:
            for j in range(len(block.resnets)):
                x = self._layer(block, j, torch.cat([x, skips.pop()], dim=1), ctx)
            for up in block.upsamplers or ():
                x = up(x, skips[-1].shape[-2:])  # to the size of the skip it meets next

        x = self.conv_out(self.conv_act(self.conv_norm_out(x)))
        return rearrange(x, "(b f) c h w -> b c f h w", f=f)

    def _layer(self, block: nn.Module, j: int, x: torch.Tensor, ctx: tuple, resnet: bool = True) -> torch.Tensor:
        """One layer of a block: resnet j (unless `resnet=False`), attention j, motion module j, temporal module j."""
        emb, clip, motion, f, temporal = ctx
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(self._layer_body, block, j, x, emb, clip, motion, f, temporal,
                                                     resnet)
        return self._layer_body(block, j, x, emb, clip, motion, f, temporal, resnet)

    @staticmethod
    def _layer_body(block, j, x, emb, clip, motion, f, temporal, resnet):
        if resnet:
            x = block.resnets[j](x, emb)
        if getattr(block, "attentions", None) is not None:
            x = block.attentions[j](x, encoder_hidden_states=clip, return_dict=False)[0]
        if block.motion_modules is not None:
            x = block.motion_modules[j](x, motion, f)
        if temporal and block.temporal_modules is not None:
            x = block.temporal_modules[j](x, None, f)
        return x


def _check_2d_config(config: dict[str, Any]) -> None:
    for key, allowed in SUPPORTED_2D.items():
        values = config.get(key, "UNetMidBlock2DCrossAttn" if key == "mid_block_type" else None)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if value not in allowed:
                raise ConfigError(f"UNet config {key}={value!r} is not supported; use {sorted(allowed)}")
    for key in UNSUPPORTED_2D:
        if config.get(key) is not None:
            raise ConfigError(f"UNet config {key}={config[key]!r} is not supported by the denoising UNet")
