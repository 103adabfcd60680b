"""The paper's metrics as pure functions: frames or features in, numbers out (no files, no weights).

Frames are float arrays or tensors in [0, 1], either `(n, H, W, 3)` (numpy, as decoded) or `(n, 3, H, W)`
(torch, as the networks take them); every function says which. Per-frame values are returned as arrays so that a
caller can average over a whole test set (frame-weighted) rather than over videos.

- L1: mean absolute difference over pixels and channels.
- SSIM: scikit-image `structural_similarity` with Wang et al.'s settings (11x11 Gaussian window, sigma 1.5,
  population covariances, data range 1), per frame on RGB (channel_axis), averaged over channels.
- PSNR: scikit-image `peak_signal_noise_ratio` (data range 1) per frame, capped at `PSNR_CAP_DB` so that identical
  frames (infinite PSNR) keep the mean finite.
- LPIPS / tLP: distances from an `LPIPS` network (see `networks.py`), tLP as defined in `tlp`.
- FVD: Fréchet distance between Gaussians fitted to I3D features (`frechet_distance`, `fvd`).
- ID-SIM: cosine similarity of face-recognition embeddings (`cosine_similarity`).
- AED / APD: mean absolute difference of expression deltas / head-pose angles in radians (`mean_abs_distance`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from scipy import linalg
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

logger = logging.getLogger(__name__)

PSNR_CAP_DB = 100.0  # per-frame PSNR of identical frames is infinite; capped here
SSIM_SIGMA = 1.5  # Wang et al. 2004 (Gaussian window, 11x11 at scikit-image's truncate=3.5)


def _check_pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape or pred.ndim != 4 or pred.shape[-1] != 3:
        raise ValueError(f"expected two (n, H, W, 3) frame arrays of one shape, got {pred.shape} and {target.shape}")
    return pred, target


def l1_per_frame(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """pred, target: (n, H, W, 3) in [0, 1] -> (n,) mean absolute difference of each frame."""
    pred, target = _check_pair(pred, target)
    return np.abs(pred - target).mean(axis=(1, 2, 3))


def ssim_per_frame(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """pred, target: (n, H, W, 3) in [0, 1], H and W at least 11 -> (n,) SSIM of each frame (1 when identical)."""
    pred, target = _check_pair(pred, target)
    return np.array([
        structural_similarity(p, t, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=SSIM_SIGMA,
                              use_sample_covariance=False)
        for p, t in zip(pred, target, strict=True)
    ])


def psnr_per_frame(pred: np.ndarray, target: np.ndarray, cap: float = PSNR_CAP_DB) -> np.ndarray:
    """pred, target: (n, H, W, 3) in [0, 1] -> (n,) PSNR in dB of each frame, at most `cap`."""
    pred, target = _check_pair(pred, target)
    values = []
    for p, t in zip(pred, target, strict=True):
        with np.errstate(divide="ignore"):  # identical frames: log10(1 / 0) = inf, then capped
            values.append(min(float(peak_signal_noise_ratio(t, p, data_range=1.0)), cap))
    return np.array(values)


Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (n, 3, H, W), (n, 3, H, W) -> (n,)


def paired_distances(distance: Distance, a: torch.Tensor, b: torch.Tensor, batch: int = 8) -> np.ndarray:
    """`distance` (e.g. an `LPIPS` network) over frame pairs in batches: a, b (n, 3, H, W) -> (n,) float64."""
    if a.shape != b.shape:
        raise ValueError(f"expected frames of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    out = [distance(a[i : i + batch], b[i : i + batch]).detach().double().cpu() for i in range(0, len(a), batch)]
    return torch.cat(out).numpy() if out else np.zeros(0)


def tlp_per_transition(distance: Distance, pred: torch.Tensor, driver: torch.Tensor, batch: int = 8) -> np.ndarray:
    """Temporal LPIPS (TecoGAN's tLP, not scaled by 100): for t = 1..n-1,
    |LPIPS(pred_t, pred_{t-1}) - LPIPS(driver_t, driver_{t-1})|.

    The generated video should change between frames as much as the driver (its ground truth) does: 0 when it
    does, large for flicker (generated changes more) or a frozen result (changes less).
    pred, driver: (n, 3, H, W) -> (n - 1,) values (empty for n < 2).
    """
    if pred.shape != driver.shape:
        raise ValueError(f"expected frames of one shape, got {tuple(pred.shape)} and {tuple(driver.shape)}")
    if len(pred) < 2:
        return np.zeros(0)
    pred_change = paired_distances(distance, pred[1:], pred[:-1], batch)
    driver_change = paired_distances(distance, driver[1:], driver[:-1], batch)
    return np.abs(pred_change - driver_change)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """features (n, d), n >= 2 -> mean (d,) and covariance (d, d) (unbiased, as in the FID/FVD references)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need at least 2 feature vectors (n, d) for a covariance, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), with scipy's `sqrtm`.

    A singular product (fewer samples than dimensions) is retried with `eps` added to both diagonals, as the FID
    reference code does; a negligible imaginary part from round-off is dropped.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched Gaussians: means {mu1.shape}, {mu2.shape}; covariances {sigma1.shape}, "
                         f"{sigma2.shape}")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        logger.warning("Fréchet distance: singular covariance product; adding %g to the diagonals", eps)
        offset = np.eye(len(mu1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: sqrtm has a large imaginary part "
                             f"({np.abs(covmean.imag).max():.3g}); the covariances are ill-conditioned")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fvd(features_pred: np.ndarray, features_real: np.ndarray) -> float:
    """Fréchet distance between the I3D features (n, d) of generated and real clips (n >= 2 each)."""
    return frechet_distance(*gaussian_stats(features_pred), *gaussian_stats(features_real))


def cosine_similarity(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """Row-wise cosine similarity: a (n, d) or (d,) (broadcast), b (n, d) -> (n,) in [-1, 1]."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = np.broadcast_arrays(np.atleast_2d(a), np.atleast_2d(b))
    dot = (a * b).sum(axis=1)
    return dot / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def mean_abs_distance(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per-row mean absolute difference: a, b (n, d) -> (n,).

    APD uses it on (pitch, yaw, roll) in radians (d = 3), AED on the motion extractor's expression deltas (d = 63).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two (n, d) arrays of one shape, got {a.shape} and {b.shape}")
    return np.abs(a - b).mean(axis=1)


def to_unit_frames(frames: np.ndarray) -> np.ndarray:
    """uint8 (n, H, W, 3) -> float64 (n, H, W, 3) in [0, 1] (x / 255)."""
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype}")
    return frames.astype(np.float64) / 255.0


def to_tensor_frames(frames: np.ndarray, low: float = -1.0) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float32 tensor (n, 3, H, W) in [low, 1] ([-1, 1] by default, [0, 1] with low=0)."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (n, H, W, 3), got {frames.dtype} {frames.shape}")
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0  # (n, 3, H, W)
    return x * (1.0 - low) + low
