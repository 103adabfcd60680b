"""Denoising UNet: official keys on the meta device, tiny forward shapes, determinism, reference attention."""

import json

import pytest
import torch
from conftest import ROOT, official_keys, state_shapes
from omegaconf import OmegaConf

from personalive.config import load_config
from personalive.errors import ConfigError
from personalive.models.attention_processors import ReferenceBank, install_reference_attention
from personalive.models.denoising_unet import DenoisingUNet
from personalive.models.reference_unet import reference_unet_from_config


def unet_config(size: str) -> dict:
    return json.loads((ROOT / f"configs/weights/{size}/unet.json").read_text())


def extra_kwargs() -> dict:
    return OmegaConf.to_container(OmegaConf.structured(load_config(None).unet_additional_kwargs))


@pytest.fixture(scope="module")
def tiny_unets():
    torch.manual_seed(0)
    unet = DenoisingUNet.from_unet2d_config(unet_config("tiny"), extra_kwargs()).eval()
    for name, p in unet.named_parameters():  # make the zero-initialised modules count
        if "proj_out" in name and not p.any():
            p.data.normal_(0, 0.02)
    return unet, reference_unet_from_config(unet_config("tiny")).eval()


def test_full_size_keys_and_shapes_match_official():
    with torch.device("meta"):
        unet = DenoisingUNet.from_unet2d_config(unet_config("full"), extra_kwargs())
        ref = reference_unet_from_config(unet_config("full"))
    assert state_shapes(unet) == official_keys("denoising_unet_full")
    assert state_shapes(ref) == official_keys("reference_unet")
    two_d = {k: v for k, v in official_keys("denoising_unet_full").items() if "_modules." not in k}
    assert two_d == official_keys("sd_image_variations_unet")  # the 2-D part is the SD UNet, key for key


def inputs(f=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(1, 4, f, 8, 8, generator=g),
        timestep=torch.tensor([0, 333, 666, 999]).repeat_interleave(f // 4),
        clip_embeds=torch.randn(1, 1, 32, generator=g),
        motion_tokens=torch.randn(1, f, 32, 16, generator=g),
        pose_features=torch.randn(1, 32, f, 8, 8, generator=g),
    )


def test_forward_shape_and_determinism(tiny_unets):
    unet, _ = tiny_unets
    with torch.no_grad():
        a, b = unet(**inputs()), unet(**inputs())
    assert a.shape == (1, 4, 8, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_every_conditioning_matters(tiny_unets):
    unet, _ = tiny_unets
    base = inputs()
    with torch.no_grad():
        out = unet(**base)
        for key in ("timestep", "clip_embeds", "motion_tokens", "pose_features"):
            changed = dict(base, **{key: base[key] + 1 if key != "timestep" else base[key].flip(0)})
            assert not torch.allclose(unet(**changed), out, atol=1e-6), key


def test_frames_interact_only_through_temporal_modules(tiny_unets):
    unet, _ = tiny_unets
    x = inputs()
    with torch.no_grad():
        out = unet(**x)
        x2 = dict(x, sample=x["sample"].clone())
        x2["sample"][:, :, -1] += 1  # change the last frame only
        out2 = unet(**x2)
        assert not torch.allclose(out[:, :, 0], out2[:, :, 0], atol=1e-7)  # temporal attention spreads it
        a, b = unet(**x, temporal=False), unet(**x2, temporal=False)  # without them, frames are independent
    assert torch.allclose(a[:, :, :-1], b[:, :, :-1], atol=1e-6)


def test_reference_attention_reads_what_the_reference_unet_wrote(tiny_unets):
    unet, ref = tiny_unets
    bank = ReferenceBank(max_keyframes=1)
    install_reference_attention(ref, unet, bank)
    clip = torch.randn(1, 1, 32)
    with torch.no_grad():
        plain = unet(**inputs())
        ref(torch.randn(1, 4, 8, 8), torch.zeros(1), encoder_hidden_states=clip, return_dict=False)
        bank.set_reference()
        with_ref = unet(**inputs())
        ref(torch.randn(1, 4, 8, 8), torch.zeros(1), encoder_hidden_states=clip, return_dict=False)
        assert bank.add_keyframe() and bank.num_keyframes == 1
        with_kf = unet(**inputs())
        ref(torch.randn(1, 4, 8, 8), torch.zeros(1), encoder_hidden_states=clip, return_dict=False)
        assert not bank.add_keyframe() and bank.num_keyframes == 1  # capped
    assert not torch.allclose(plain, with_ref) and not torch.allclose(with_ref, with_kf)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert bank.tokens(name).shape == (1, 2 * 64, 32)  # reference + 1 keyframe, 8x8 tokens each
    bank.clear()
    assert not bank.has_reference


def test_unsupported_2d_config_is_a_config_error():
    bad = dict(unet_config("tiny"), mid_block_type="UNetMidBlock2DSimpleCrossAttn")
    with pytest.raises(ConfigError, match="mid_block_type"):
        DenoisingUNet.from_unet2d_config(bad, extra_kwargs())


def test_save_pretrained_round_trip(tiny_unets, tmp_path):
    unet, _ = tiny_unets
    unet.save_pretrained(tmp_path)
    again = DenoisingUNet.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(unet(**inputs()), again(**inputs()))


def test_motion_and_temporal_modules_normalise_over_32_groups_whatever_the_unet_uses(tiny_unets):
    # the official get_motion_module never passes the UNet's norm_num_groups on; no weights file records it
    unet, _ = tiny_unets
    assert unet.down_blocks[0].resnets[0].norm1.num_groups != 32  # the tiny UNet itself uses fewer groups
    norms = [m for name, m in unet.named_modules() if isinstance(m, torch.nn.GroupNorm)
             and ("motion_modules" in name or "temporal_modules" in name)]
    assert norms and all(m.num_groups == 32 for m in norms)
