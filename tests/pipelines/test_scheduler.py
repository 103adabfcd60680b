"""Per-frame DDIM: official constants, and equal to diffusers' DDIM step frame by frame."""

import torch
from diffusers import DDIMScheduler

from personalive.config import SchedulerKwargs
from personalive.pipelines.scheduler import StreamScheduler


def test_official_alphas_cumprod():
    s = StreamScheduler(SchedulerKwargs())
    expected = {0: 0.99914998, 333: 0.44681713, 666: 0.03764106, 999: 0.00023001}  # ARCHITECTURE.md 2.10
    for t, a in expected.items():
        assert abs(s.alphas_cumprod[t].item() - a) < 1e-7


def test_step_matches_diffusers_ddim_per_frame():
    s = StreamScheduler(SchedulerKwargs(), step_length=333)
    t = torch.tensor([0, 0, 333, 666, 999])
    x, eps = torch.randn(1, 4, 5, 3, 3), torch.randn(1, 4, 5, 3, 3)
    x_prev, x0 = s.step(eps, t, x)
    ref = DDIMScheduler(**vars(SchedulerKwargs()))
    ref.set_timesteps(3)  # diffusers' previous timestep is then t - 1000 // 3 = t - 333
    for i, ti in enumerate(t.tolist()):
        if ti == 0:  # t = 0: the previous alpha is 1, so x_prev is x0
            assert torch.allclose(x_prev[:, :, i], x0[:, :, i])
            continue
        out = ref.step(eps[:, :, i], ti, x[:, :, i], eta=0.0)
        assert torch.allclose(out.prev_sample, x_prev[:, :, i], atol=1e-5)
        assert torch.allclose(out.pred_original_sample, x0[:, :, i], atol=1e-4)


def test_add_noise_per_frame_and_broadcast():
    s = StreamScheduler(SchedulerKwargs())
    x, n = torch.randn(1, 4, 8, 2, 2), torch.randn(1, 4, 8, 2, 2)
    t = torch.tensor([0] * 4 + [999] * 4)
    y = s.add_noise(x, n, t)
    a = s.alphas_cumprod
    assert torch.allclose(y[:, :, 5], a[999].sqrt() * x[:, :, 5] + (1 - a[999]).sqrt() * n[:, :, 5])
    assert torch.allclose(s.add_noise(x, n, torch.tensor([999])), s.add_noise(x, n, torch.full((8,), 999)))
