"""Metric functions against values computed by hand on tiny synthetic inputs."""

import math

import numpy as np
import pytest
import torch

from personalive.evaluation import metrics as M


@pytest.fixture
def frames() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(0.2, 0.8, size=(3, 24, 20, 3))


def test_identical_frames(frames):
    assert np.all(M.l1_per_frame(frames, frames) == 0)
    assert np.allclose(M.ssim_per_frame(frames, frames), 1.0)
    assert np.all(M.psnr_per_frame(frames, frames) == M.PSNR_CAP_DB)  # infinite PSNR is capped


@pytest.mark.parametrize("d", [0.01, 0.1, 0.15])
def test_constant_shift_gives_known_l1_and_psnr(frames, d):
    shifted = frames + d  # stays inside [0, 1]: frames are in [0.2, 0.8]
    assert np.allclose(M.l1_per_frame(shifted, frames), d)
    assert np.allclose(M.psnr_per_frame(shifted, frames), 10 * math.log10(1 / d**2))  # MSE = d^2, peak 1


def test_ssim_of_a_constant_shift_matches_the_formula():
    # constant frames a and b: variances and covariance are 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = 0.5, 0.3
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    ssim = M.ssim_per_frame(np.full((1, 16, 16, 3), b), np.full((1, 16, 16, 3), a))
    assert ssim[0] == pytest.approx(expected, rel=1e-9)


def test_ssim_drops_with_noise(frames):
    noisy = np.clip(frames + np.random.default_rng(1).normal(0, 0.1, frames.shape), 0, 1)
    assert np.all(M.ssim_per_frame(noisy, frames) < 0.9)


def test_frame_metrics_refuse_mismatched_shapes(frames):
    with pytest.raises(ValueError, match="one shape"):
        M.l1_per_frame(frames, frames[:, :10])


def test_frechet_distance_of_known_gaussians():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with s the standard deviations
    assert M.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[1.0]])) == \
        pytest.approx(4.0 + 1.0)
    # diagonal covariances: |dmu|^2 + sum (sqrt(v1) - sqrt(v2))^2
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2
    assert M.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected)
    # the same Gaussian, rotated covariance: 0
    rot = np.array([[0.6, -0.8], [0.8, 0.6]])
    cov = rot @ np.diag([2.0, 0.5]) @ rot.T
    assert M.frechet_distance(np.zeros(2), cov, np.zeros(2), cov) == pytest.approx(0.0, abs=1e-9)


def test_fvd_of_samples_approaches_the_gaussian_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, size=(20000, 2))
    b = rng.normal([2.0, 0.0], [1.0, 3.0], size=(20000, 2))
    assert M.fvd(a, b) == pytest.approx(4.0 + 4.0, rel=0.05)  # |dmu|^2 = 4; (1 - 3)^2 = 4
    with pytest.raises(ValueError, match="at least 2"):
        M.fvd(a[:1], b)


def test_fvd_with_fewer_samples_than_dimensions_is_finite():
    rng = np.random.default_rng(0)
    value = M.fvd(rng.normal(size=(3, 16)), rng.normal(size=(4, 16)))
    assert np.isfinite(value) and value > 0


def test_pose_distance_of_two_known_rotations():
    # APD: mean |(pitch, yaw, roll) difference| in radians
    a = np.deg2rad([[10.0, 20.0, 30.0], [0.0, 0.0, 0.0]])
    b = np.deg2rad([[10.0, -10.0, 0.0], [0.0, 0.0, 90.0]])
    expected = np.deg2rad([(0 + 30 + 30) / 3, 90 / 3])
    assert np.allclose(M.mean_abs_distance(a, b), expected)
    assert np.all(M.mean_abs_distance(a, a) == 0)


def test_cosine_similarity():
    ref = np.array([1.0, 0.0])
    others = np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 1.0]])
    assert np.allclose(M.cosine_similarity(ref, others), [1.0, 0.0, -1.0, 1 / math.sqrt(2)])


def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().mean(dim=(1, 2, 3))


def test_tlp_definition():
    video = torch.rand(5, 3, 8, 8)
    assert np.all(M.tlp_per_transition(_mean_abs, video, video) == 0)
    frozen = video[:1].expand(5, -1, -1, -1)  # a result that does not move while the driver does
    expected = _mean_abs(video[1:], video[:-1]).double().numpy()
    assert np.allclose(M.tlp_per_transition(_mean_abs, frozen, video, batch=2), expected)
    assert M.tlp_per_transition(_mean_abs, video[:1], video[:1]).size == 0


def test_paired_distances_batches():
    a, b = torch.rand(7, 3, 4, 4), torch.rand(7, 3, 4, 4)
    assert np.allclose(M.paired_distances(_mean_abs, a, b, batch=3), _mean_abs(a, b).numpy())


def test_frame_conversions():
    frames = np.array([[[[0, 128, 255]]]], dtype=np.uint8)  # (1, 1, 1, 3)
    assert np.allclose(M.to_unit_frames(frames)[0, 0, 0], [0, 128 / 255, 1])
    t = M.to_tensor_frames(frames)
    assert t.shape == (1, 3, 1, 1) and t[0, 0].item() == -1 and t[0, 2].item() == 1
    assert M.to_tensor_frames(frames, low=0.0)[0, 2].item() == 1
