"""PoseGuider: official keys on the meta device, tiny forward shapes, zero start, determinism, round trip."""

import dataclasses

import pytest
import torch
from conftest import ROOT, official_keys, state_shapes

from personalive.config import load_config
from personalive.models.pose_guider import PoseGuider


def tiny_kwargs() -> dict:
    return dataclasses.asdict(load_config(ROOT / "configs/prompts/tiny.yaml").model.pose_guider)


def build(seed: int = 0) -> PoseGuider:
    torch.manual_seed(seed)
    model = PoseGuider(**tiny_kwargs()).eval()
    with torch.no_grad():  # the output conv starts at zero; give it weights so outputs depend on the input
        model.conv_out_modify.weight.normal_(0, 0.1)
    return model


def canvas(f=3, size=64, seed=0):
    return torch.rand(1, 3, f, size, size, generator=torch.Generator().manual_seed(seed))


def test_full_size_keys_and_shapes_match_official():
    with torch.device("meta"):
        model = PoseGuider()
    assert state_shapes(model) == official_keys("pose_guider")
    model.load_state_dict(
        {k: torch.empty(s) for k, s in official_keys("pose_guider").items()}, strict=True, assign=True
    )


def test_starts_with_no_effect():
    with torch.no_grad():
        assert not PoseGuider(**tiny_kwargs())(canvas()).any()


def test_forward_shape_and_determinism():
    model = build()
    with torch.no_grad():
        out = model(canvas())
        assert torch.equal(out, model(canvas())) and torch.equal(out, build()(canvas()))
        assert not torch.equal(out, build(1)(canvas()))
    assert out.shape == (1, 32, 3, 8, 8) and out.abs().sum() > 0


def test_frames_are_independent():
    model, x = build(), canvas()
    with torch.no_grad():
        alone = torch.cat([model(x[:, :, i : i + 1]) for i in range(3)], dim=2)
        torch.testing.assert_close(model(x), alone)


def test_round_trip(tmp_path):
    model = build()
    model.save_pretrained(tmp_path)
    loaded = PoseGuider.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(canvas()), model(canvas()))


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_runs_in_low_precision(dtype):
    model = build().to(dtype)
    with torch.no_grad():
        out = model(canvas())  # fp32 canvas is cast to the model dtype
    assert out.dtype == dtype and torch.isfinite(out).all()
