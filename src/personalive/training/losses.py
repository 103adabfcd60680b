"""Training losses: the epsilon / clean-latent L2 losses and an optional LPIPS perceptual loss (stage 2).

The perceptual loss is LPIPS v0.1 with the VGG16 backbone (as `lpips.LPIPS(net="vgg")`, the usual training choice),
the same implementation as the evaluation metric (`personalive.evaluation.networks.LPIPS`, AlexNet there). The
`lpips` package is not a dependency because its constructor downloads the VGG weights; here both files must already
be on disk.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from personalive.config import DistillConfig, resolve_path
from personalive.evaluation.networks import LPIPS

logger = logging.getLogger(__name__)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32 (predictions may come from an autocast region)."""
    return F.mse_loss(pred.float(), target.float())


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
