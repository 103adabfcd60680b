"""MotionExtractor: official keys on the meta device, tiny forward shapes, determinism, round trip, fp32 LayerNorms."""

import dataclasses

import pytest
import torch
from conftest import ROOT, official_keys, state_shapes

from personalive.config import load_config
from personalive.models import cast_model
from personalive.models.motion_extractor import ConvNeXtLayerNorm, MotionExtractor


def tiny_kwargs() -> dict:
    return dataclasses.asdict(load_config(ROOT / "configs/prompts/tiny.yaml").model.motion_extractor)


@pytest.fixture
def tiny() -> MotionExtractor:
    torch.manual_seed(0)
    model = MotionExtractor(**tiny_kwargs()).eval()
    with torch.no_grad():  # GRN starts as the identity; make it count
        for name, p in model.named_parameters():
            if "grn" in name:
                p.normal_(0, 0.5)
    return model


def frames(n=2, size=64, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_full_size_keys_and_shapes_match_official():
    with torch.device("meta"):
        model = MotionExtractor()
    expected = {k: v for k, v in official_keys("motion_extractor").items() if k != "idx_tensor"}
    assert state_shapes(model) == expected
    model.load_state_dict({k: torch.empty(s) for k, s in expected.items()}, strict=True, assign=True)


def test_forward_shapes_and_determinism(tiny):
    with torch.no_grad():
        out, again = tiny(frames()), tiny(frames())
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    assert shapes == {"pitch": (2, 66), "yaw": (2, 66), "roll": (2, 66), "t": (2, 3), "scale": (2, 1), "kp": (2, 63)}
    assert all(torch.equal(out[k], again[k]) for k in out)


def test_same_seed_same_weights():
    def build(seed):
        torch.manual_seed(seed)
        return MotionExtractor(**tiny_kwargs()).state_dict()

    a, b, c = build(0), build(0), build(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["detector.fc_kp.weight"], c["detector.fc_kp.weight"])


def public(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    loaded = MotionExtractor.from_pretrained(tmp_path).eval()
    assert public(loaded.config) == public(tiny.config)
    sa, sb = tiny.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():  # equal weights; loaded tensors may differ in memory layout, hence last-bit differences
        a, b = tiny(frames()), loaded(frames())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)


def test_cast_keeps_layernorms_fp32(tiny):
    cast_model(tiny, "cpu", torch.bfloat16)
    norms = [m for m in tiny.modules() if isinstance(m, ConvNeXtLayerNorm)]
    assert len(norms) == 4 + 4  # stem + 3 downsampling norms, one per block (tiny: 1 block per stage)
    assert all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    assert tiny.detector.norm.weight.dtype == torch.bfloat16  # the head LayerNorm is plain, as official
    assert tiny.dtype == torch.bfloat16
    with torch.no_grad():
        out = tiny(frames())
    assert all(v.dtype == torch.bfloat16 and torch.isfinite(v).all() for v in out.values())


def test_channels_first_norm_equals_layer_norm_over_channels():
    norm = ConvNeXtLayerNorm(8, channels_first=True)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(2, 8, 5, 3)
    expected = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (8,), norm.weight, norm.bias, 1e-6)
    torch.testing.assert_close(norm(x), expected.permute(0, 3, 1, 2))
    assert norm(x.half()).dtype == torch.float16


def test_wrong_input_size_is_refused(tiny):
    with pytest.raises(ValueError, match=r"\(n, 3, 64, 64\)"):
        tiny(frames(size=32))


def test_cast_keeps_layernorm_weights_exact(tiny):
    with torch.no_grad():
        for m in tiny.modules():
            if isinstance(m, ConvNeXtLayerNorm):
                m.weight.normal_()  # values that bf16 cannot hold exactly
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    cast_model(tiny, "cpu", torch.bfloat16)
    norms = [n for n, m in tiny.named_modules() if isinstance(m, ConvNeXtLayerNorm)]
    assert all(torch.equal(tiny.state_dict()[f"{n}.weight"], before[f"{n}.weight"]) for n in norms)
