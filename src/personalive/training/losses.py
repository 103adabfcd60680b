"""Training losses: the epsilon / clean-latent L2 losses, their optional Min-SNR-gamma weighting, and an optional
LPIPS perceptual loss (stage 2).

Min-SNR-gamma (Hang et al. 2023, diffusers' `--snr_gamma`) weighs each timestep's loss by min(SNR, gamma) in
clean-latent terms, i.e. min(SNR, gamma) / SNR in noise terms. Unweighted, a clean-latent loss at high noise is the
noise error amplified by 1 / SNR (about 5000 at t = 999 with the official beta_end 0.02), so the pure-noise steps
swamp stages 2 and 3; weighted, those steps count as noise errors and the low-noise steps, which set the output,
count up to gamma times their clean-latent error.

The perceptual loss is LPIPS v0.1 with the VGG16 backbone (as `lpips.LPIPS(net="vgg")`, the usual training choice),
the same implementation as the evaluation metric (`personalive.evaluation.networks.LPIPS`, AlexNet there). The
`lpips` package is not a dependency because its constructor downloads the VGG weights; here both files must already
be on disk.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from diffusers import SchedulerMixin
from diffusers.training_utils import compute_snr

from personalive.config import DistillConfig, resolve_path
from personalive.evaluation.networks import LPIPS

logger = logging.getLogger(__name__)


def mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in float32 (predictions may come from an autocast region); `weight`, broadcastable to the
    error, scales each element's term."""
    if weight is None:
        return F.mse_loss(pred.float(), target.float())
    return ((pred.float() - target.float()) ** 2 * weight).mean()


def snr_weights(scheduler: SchedulerMixin, t: torch.Tensor, gamma: float | None, target: str) -> torch.Tensor | None:
    """Min-SNR-gamma weights at timesteps t for a loss on the `target` "noise" or "sample" (clean latent); None
    (unweighted) when gamma is None."""
    if gamma is None:
        return None
    snr = compute_snr(scheduler, t.long()).float()
    clipped = snr.clamp(max=gamma)
    return clipped / snr if target == "noise" else clipped


def propagated_weights(scheduler: SchedulerMixin, timesteps: torch.Tensor, window: int) -> torch.Tensor:
    """(F,) loss weights of a streaming window whose frames sit at `timesteps` (chunks of `window`, oldest first): a
    chunk's clean-latent error enters its next latent times sqrt(alpha_bar) of the next level, so its squared error
    counts alpha_bar of it; the oldest chunk's next level is t = 0, the output."""
    upcoming = torch.cat([timesteps[:window], timesteps[:-window]]).long().cpu()
    return scheduler.alphas_cumprod[upcoming].float()


def load_perceptual(cfg: DistillConfig) -> LPIPS | None:
    """The LPIPS loss of `cfg` when its weight is > 0 and both files exist; None (logged) otherwise."""
    if cfg.perceptual_weight <= 0:
        return None
    backbone, linear = resolve_path(cfg.lpips_backbone), resolve_path(cfg.lpips_linear)
    missing = [str(p) for p in (backbone, linear) if not p.is_file()]
    if missing:
        logger.warning("perceptual loss off (L2 only): %s not found; put torchvision's vgg16-397923af.pth at "
                       "distill.lpips_backbone and the lpips package's weights/v0.1/vgg.pth at distill.lpips_linear "
                       "to enable it", " and ".join(missing))
        return None
    logger.info("perceptual loss: LPIPS-VGG from %s + %s, weight %g", backbone, linear, cfg.perceptual_weight)
    return LPIPS.from_files(backbone, linear, "vgg")
