"""Training losses: the epsilon / clean-latent L2 losses and an optional LPIPS perceptual loss (stage 2).

LPIPS re-implements `lpips.LPIPS(net="vgg", version="0.1")` (Zhang et al. 2018, "The Unreasonable Effectiveness of
Deep Features as a Perceptual Metric"; the `lpips` package): VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3
and relu5_3 of the scaled input, each unit-normalised over channels, squared differences weighted per channel by
the learned linear layers, averaged over space and summed over layers. The package is not a dependency because its
constructor downloads the VGG weights; here both weight files must already be on disk.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from personalive.config import DistillConfig, resolve_path
from personalive.io.checkpoints import load_state_dict

logger = logging.getLogger(__name__)

# torchvision's VGG16 ("D") feature layers: conv widths, "M" = 2x2 max-pool; indices match `features.<i>` keys
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
LPIPS_TAPS = (3, 8, 15, 22, 29)  # `features` indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # lpips ScalingLayer, for inputs in [-1, 1]
LPIPS_SCALE = (0.458, 0.448, 0.450)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32 (predictions may come from an autocast region)."""
    return F.mse_loss(pred.float(), target.float())


class _Linear(nn.Module):
    """One LPIPS per-channel weighting (key layout of the lpips package: `lin<k>.model.1.weight`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))


class LPIPS(nn.Module):
    """LPIPS distance (VGG, v0.1): images (n, 3, H, W) in [-1, 1] -> (n,) distances. Frozen, eval mode."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in VGG16_LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                channels = v
        self.features = nn.Sequential(*layers[: LPIPS_TAPS[-1] + 1])
        for k, width in enumerate((64, 128, 256, 512, 512)):
            setattr(self, f"lin{k}", _Linear(width))
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always frozen: dropout off

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LPIPS_TAPS:
                out.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))  # unit norm over channels
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        dtype = self.shift.dtype
        a, b = ((x.to(dtype) - self.shift) / self.scale for x in (a, b))
        total = 0
        for k, (fa, fb) in enumerate(zip(self._taps(a), self._taps(b), strict=True)):
            weighted = getattr(self, f"lin{k}").model((fa - fb) ** 2)  # (n, 1, h, w)
            total = total + weighted.mean(dim=(1, 2, 3))
        return total

    @classmethod
    def from_files(cls, backbone: str | Path, linear: str | Path) -> LPIPS:
        """torchvision's `vgg16-397923af.pth` (only `features.*` is used) + the lpips v0.1 `vgg.pth`."""
        model = cls()
        vgg = {k: v for k, v in load_state_dict(backbone).items() if k.startswith("features.")}
        lins = load_state_dict(linear)
        model.load_state_dict({**vgg, **lins}, strict=True)
        return model


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
    return LPIPS.from_files(backbone, linear)
