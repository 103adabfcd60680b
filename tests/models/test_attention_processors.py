"""Reference attention and the exact attention savings: the same numbers as the plain processors, on and off."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from PIL import Image

from personalive.models.attention_processors import (
    ReferenceBank,
    ReferenceReadProcessor,
    SingleTokenCrossAttnProcessor,
    set_attention_savings,
)
from personalive.pipelines.stream import StreamEngine


def layer(cross: int | None = None) -> Attention:
    return Attention(32, cross_attention_dim=cross, heads=4, dim_head=8, out_bias=True).eval()


def filled_bank(tokens: torch.Tensor, keyframe: torch.Tensor | None = None) -> ReferenceBank:
    bank = ReferenceBank(max_keyframes=2)
    bank.write("l", tokens)
    bank.set_reference()
    if keyframe is not None:
        bank.write("l", keyframe)
        bank.add_keyframe()
    return bank


def test_reference_keys_are_projected_once_and_match_the_per_frame_projection():
    attn, hs, ref = layer(), torch.randn(6, 10, 32), torch.randn(1, 7, 32)
    bank = filled_bank(ref, keyframe=torch.randn(1, 7, 32))
    processor = ReferenceReadProcessor(bank, "l")
    plain = AttnProcessor2_0()(attn, hs, torch.cat([hs, bank.tokens("l").expand(6, -1, -1)], dim=1))
    with torch.no_grad():
        torch.testing.assert_close(processor(attn, hs), plain, rtol=1e-5, atol=1e-6)
        cached = bank.projections("l", attn, hs.dtype)
        assert bank.projections("l", attn, hs.dtype)[0] is cached[0]  # reused while nothing changed
        attn.to_k.weight.mul_(2)  # an in-place weight update: projected again
        assert bank.projections("l", attn, hs.dtype)[0] is not cached[0]
        plain = AttnProcessor2_0()(attn, hs, torch.cat([hs, bank.tokens("l").expand(6, -1, -1)], dim=1))
        torch.testing.assert_close(processor(attn, hs), plain, rtol=1e-5, atol=1e-6)


def test_reference_attention_gradients_match_the_plain_processor():
    attn, hs = layer(), torch.randn(4, 10, 32)
    ref = torch.randn(1, 7, 32, requires_grad=True)
    bank = filled_bank(ref)
    grads = []
    for savings in (True, False):
        processor = ReferenceReadProcessor(bank, "l")
        processor.savings = savings
        attn.zero_grad()
        ref.grad = None
        processor(attn, hs).square().sum().backward()
        grads.append((ref.grad.clone(), attn.to_k.weight.grad.clone()))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("residual", [False, True])
def test_one_token_cross_attention_is_the_projected_value(residual):
    attn, hs, clip = layer(cross=16), torch.randn(6, 10, 32), torch.randn(6, 1, 16)
    attn.residual_connection = residual
    out = SingleTokenCrossAttnProcessor()(attn, hs, clip)
    torch.testing.assert_close(out, AttnProcessor2_0()(attn, hs, clip), rtol=1e-5, atol=1e-6)
    many = torch.randn(6, 3, 16)  # more than one token: the plain attention
    torch.testing.assert_close(SingleTokenCrossAttnProcessor()(attn, hs, many), AttnProcessor2_0()(attn, hs, many))


def test_engine_with_and_without_savings_gives_the_same_frames(tiny_models, tiny_cfg):
    cfg = tiny_cfg.__class__(**{**vars(tiny_cfg), "keyframe_threshold": 0.0, "keyframe_start_step": 0})
    engine = StreamEngine(tiny_models, cfg)
    g = torch.Generator().manual_seed(3)
    reference = Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy())
    chunks = [torch.rand(4, 3, 64, 64, generator=g) * 2 - 1 for _ in range(4)]
    outputs = []
    try:
        for on in (False, True):
            set_attention_savings(tiny_models.denoising_unet, on)
            engine.grad_mode = torch.inference_mode if on else torch.no_grad
            engine.fuse_reference(reference)
            outputs.append(torch.cat([engine.step(c) for c in chunks]))
            assert engine.bank.num_keyframes > 0  # the keyframes' bank entries were projected too
    finally:
        set_attention_savings(tiny_models.denoising_unet, True)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-5)
    outputs[1].mul_(2)  # the engine returns ordinary tensors, not inference tensors
