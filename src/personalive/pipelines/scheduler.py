"""DDIM with one timestep per frame, as the streaming window needs (paper Sec. 3.3).

The noise schedule is diffusers' `DDIMScheduler` (its `alphas_cumprod` from the config); what diffusers lacks
is a step over frames that sit at different timesteps, with a fixed step length (official: 333, so the window
holds frames at t = 0, 333, 666, 999). `step` re-implements diffusers' `DDIMScheduler.step` for eta = 0 and
epsilon prediction with a timestep vector (tests compare the two frame by frame).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from einops import rearrange

from personalive.config import SchedulerKwargs
from personalive.errors import ConfigError


class StreamScheduler:
    """Per-frame DDIM steps of fixed length over diffusers' noise schedule."""

    def __init__(self, kwargs: SchedulerKwargs | dict, step_length: int = 333):
        kwargs = kwargs if isinstance(kwargs, dict) else vars(kwargs)
        if kwargs.get("prediction_type", "epsilon") != "epsilon":
            raise ConfigError(f"prediction_type={kwargs['prediction_type']!r} is not supported; use epsilon")
        self.ddim = DDIMScheduler(**kwargs)
        self.alphas_cumprod = self.ddim.alphas_cumprod  # (1000,) float32
        self.step_length = step_length

    def _alphas(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_bar at t and at t - step_length (1 below t = 0), shaped (n, 1, 1, 1), float32."""
        ac = self.alphas_cumprod.to(like.device)
        t = t.to(like.device).long()
        prev = t - self.step_length
        a_t = ac[t]
        a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.ones_like(a_t))
        return a_t.view(-1, 1, 1, 1), a_prev.view(-1, 1, 1, 1)

    def step(self, eps: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step (eta = 0) per frame.

        Args:
            eps: (b, c, f, h, w) predicted noise; x: (b, c, f, h, w) latents at t;
            t: (f,) or (b*f,) int timesteps in "(b f)" order.
        Returns:
            (x_prev, x0), float32 (b, c, f, h, w): latents one step less noisy, and the predicted clean latents.
        """
        f = x.shape[2]
        eps2, x2 = (rearrange(v, "b c f h w -> (b f) c h w") for v in (eps, x))
        t = t.reshape(-1).repeat(x2.shape[0] // t.numel())
        a_t, a_prev = self._alphas(t, x2)
        x0 = (x2 - (1 - a_t) ** 0.5 * eps2) / a_t**0.5
        x_prev = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps2
        return tuple(rearrange(v, "(b f) c h w -> b c f h w", f=f) for v in (x_prev, x0))

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """sqrt(a) x + sqrt(1 - a) noise per frame; x, noise: (b, c, f, h, w); t: (f,), (b*f,) or (1,).

        As official, alpha_bar is cast to the sample dtype before the square roots.
        """
        f = x.shape[2]
        x2, n2 = (rearrange(v, "b c f h w -> (b f) c h w") for v in (x, noise))
        t = t.reshape(-1).to(x.device)
        t = t.repeat(x2.shape[0] // t.numel())
        out = self.ddim.add_noise(x2, n2, t)  # diffusers casts alphas_cumprod to x's dtype first
        return rearrange(out, "(b f) c h w -> b c f h w", f=f)
