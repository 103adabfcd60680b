"""MotionEncoder: official keys on the meta device, tiny forward shapes, determinism, round trip, frame independence."""

import dataclasses

import pytest
import torch
from conftest import ROOT, official_keys, state_shapes

from personalive.config import load_config
from personalive.models import cast_model
from personalive.models.motion_encoder import MotionEncoder


def tiny_kwargs() -> dict:
    return dataclasses.asdict(load_config(ROOT / "configs/prompts/tiny.yaml").model.motion_encoder)


def build(seed: int = 0) -> MotionEncoder:
    torch.manual_seed(seed)
    model = MotionEncoder(**tiny_kwargs()).eval()
    with torch.no_grad():  # make the zero-initialised transformer outputs and the BN statistics count
        for name, t in model.state_dict().items():
            if "proj_out" in name:
                t.normal_(0, 0.1)
            elif "running_mean" in name:
                t.normal_(0, 0.1)
            elif "running_var" in name:
                t.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def tiny() -> MotionEncoder:
    return build()


def faces(b=1, f=3, size=64, seed=0):
    return torch.rand(b, 3, f, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_full_size_keys_and_shapes_match_official():
    with torch.device("meta"):
        model = MotionEncoder()
    assert state_shapes(model) == official_keys("motion_encoder")
    model.load_state_dict(
        {k: torch.empty(s) for k, s in official_keys("motion_encoder").items()}, strict=True, assign=True
    )
    assert "model.att_1.pos_embed.pos_embed" in dict(model.named_buffers())  # present, but not persistent


def test_official_details():
    model = MotionEncoder(**tiny_kwargs())
    assert model.model.conv2.downsample[0].eps == 1e-4  # FAN_feature_extractor.ConvBlock
    assert model.model.conv2.bn1.eps == model.model.bn1.eps == 1e-5
    for att in (model.model.att_1, model.model.att_2, model.model.att_3):
        assert not att.proj_out.weight.any() and not att.proj_out.bias.any()
    assert (model.model.att_1.patch_size, model.model.att_2.patch_size) == (4, 2)
    pe = model.pe[0]  # (32, 16): [sin(l w_i), cos(l w_i)], w_i = 10000^(-i/8)
    torch.testing.assert_close(pe[3, :8], torch.sin(3 / 10000 ** (torch.arange(8) / 8)))
    torch.testing.assert_close(pe[3, 8:], torch.cos(3 / 10000 ** (torch.arange(8) / 8)))


def test_forward_shape_and_determinism(tiny):
    with torch.no_grad():
        out, again = tiny(faces(b=2)), tiny(faces(b=2))
    assert out.shape == (2, 3, 32, 16) and torch.isfinite(out).all()
    assert torch.equal(out, again)
    with torch.no_grad():
        assert torch.equal(build(0)(faces()), tiny(faces()))


def test_frames_are_encoded_independently(tiny):
    x = faces(f=3)
    with torch.no_grad():
        together = tiny(x)
        alone = torch.cat([tiny(x[:, :, i : i + 1]) for i in range(3)], dim=1)
        changed = x.clone()
        changed[:, :, 2] = 0
        other = tiny(changed)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(other[:, :2], together[:, :2]) or torch.allclose(other[:, :2], together[:, :2], atol=1e-5)
    assert not torch.allclose(other[:, 2], together[:, 2], atol=1e-4)


def public(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    loaded = MotionEncoder.from_pretrained(tmp_path).eval()
    assert public(loaded.config) == public(tiny.config)
    with torch.no_grad():
        assert torch.equal(loaded(faces()), tiny(faces()))


def test_cast_bf16_runs():
    model = cast_model(build(), "cpu", torch.bfloat16)
    with torch.no_grad():
        out = model(faces())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_bad_config_and_input_are_refused(tiny):
    with pytest.raises(ValueError, match="image_size=60"):
        MotionEncoder(**dict(tiny_kwargs(), image_size=60))
    with pytest.raises(ValueError, match=r"\(b, 3, f, 64, 64\)"):
        tiny(faces(size=32))
