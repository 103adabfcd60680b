"""Attention backends and reference attention (paper Sec. 3.2): the only place attention is customised.

The reference UNet runs once on the reference latent; each of its spatial self-attention layers *writes* its
input tokens (the normalised hidden states) to a `ReferenceBank`. The denoising UNet's layer of the same name
*reads* them: its keys and values are `[own tokens, reference tokens, keyframe tokens]`, its queries its own
tokens. Historical keyframes (Sec. 3.4) append more tokens, up to `max_keyframes` sets.

Exact savings (the same numbers up to float rounding): the reference and keyframe tokens' keys and values are
projected once per bank entry, not once per frame of every step (`ReferenceBank.projections`); and the CLIP
cross-attention, which has a single key, is `to_out(to_v(clip))` (softmax over one key is 1), so it skips the
queries and the attention itself (`SingleTokenCrossAttnProcessor`). Both fall back to the plain processor for
anything they do not cover (masks, group/spatial norms, 4-D inputs, xformers).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, XFormersAttnProcessor
from torch import nn

from personalive.errors import BackendUnavailableError


def backend_processor(attention: str = "sdpa"):
    """A diffusers processor for `attention`: "sdpa" (PyTorch scaled_dot_product_attention) or "xformers"."""
    if attention == "sdpa":
        return AttnProcessor2_0()
    if attention == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise BackendUnavailableError(
                "attention=xformers but xformers is not installed; `pip install -r requirements-gpu.txt` or use sdpa")
        return XFormersAttnProcessor()
    raise BackendUnavailableError(f"unknown attention backend {attention!r}; use sdpa or xformers")


def set_attention_backend(model: nn.Module, attention: str = "sdpa") -> None:
    """Use `attention` in every attention layer of `model`; reference processors keep their role."""
    for module in model.modules():
        if isinstance(module, Attention):
            processor = module.processor
            if isinstance(processor, (ReferenceWriteProcessor, ReferenceReadProcessor, SingleTokenCrossAttnProcessor)):
                processor.inner = backend_processor(attention)
            else:
                module.set_processor(backend_processor(attention))


def self_attention_layers(unet: nn.Module) -> dict[str, Attention]:
    """The spatial self-attention (`attn1`) layers of a UNet's transformer blocks, by module name."""
    return {name: m for name, m in unet.named_modules() if isinstance(m, Attention) and name.endswith(".attn1")}


class ReferenceBank:
    """Reference tokens per self-attention layer: the reference image's, then up to `max_keyframes` keyframes'.

    The reference UNet writes one set per pass; `set_reference()` or `add_keyframe()` then commits that pass.
    Tokens are (b, n, c) in the model's dtype; `tokens(name)` is (b, n * (1 + num_keyframes), c).
    """

    def __init__(self, max_keyframes: int = 3):
        self.max_keyframes = max_keyframes
        self.clear()

    def clear(self) -> None:
        self._pending: dict[str, torch.Tensor] = {}
        self._sets: list[dict[str, torch.Tensor]] = []  # [reference, keyframe 1, ...]
        self._tokens: dict[str, torch.Tensor] = {}
        self._projected: dict[str, tuple] = {}  # name -> (weight versions, keys, values) of `_tokens[name]`

    @property
    def num_keyframes(self) -> int:
        return max(len(self._sets) - 1, 0)

    @property
    def has_reference(self) -> bool:
        return bool(self._tokens)

    def write(self, name: str, tokens: torch.Tensor) -> None:
        self._pending[name] = tokens

    def set_reference(self) -> None:
        """Make the last reference-UNet pass the reference; drops all keyframes."""
        self._sets = [self._take_pending()]
        self._rebuild()

    def add_keyframe(self) -> bool:
        """Append the last reference-UNet pass as a keyframe; False (and nothing added) when the bank is full."""
        pending = self._take_pending()
        if not self._sets:
            raise RuntimeError("add_keyframe() before set_reference()")
        if self.num_keyframes >= self.max_keyframes:
            return False
        self._sets.append(pending)
        self._rebuild()
        return True

    def tokens(self, name: str) -> torch.Tensor | None:
        return self._tokens.get(name)

    def state(self) -> dict[str, torch.Tensor]:
        """All layers' concatenated tokens (what an exported graph takes as explicit inputs)."""
        return dict(self._tokens)

    def load(self, tokens: dict[str, torch.Tensor]) -> None:
        """Set the concatenated tokens directly (explicit-input mode, e.g. under ONNX export)."""
        if any(self._tokens.get(name) is not t for name, t in tokens.items()) or len(tokens) != len(self._tokens):
            self._projected = {}
        self._tokens = dict(tokens)

    def projections(self, name: str, attn: Attention, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (b, n * (1 + num_keyframes), inner) of layer `name`'s tokens under `attn`'s projections.

        Computed once per bank entry and reused while the tokens and the projection weights stay the same; always
        recomputed with gradients on or under tracing/compilation (then the tokens are graph inputs).
        """
        if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            tokens = self._tokens[name].to(dtype)
            return attn.to_k(tokens), attn.to_v(tokens)
        weights = (attn.to_k.weight, attn.to_v.weight)
        key = (dtype, *(w._version for w in weights))  # in-place weight updates bump the versions
        cached = self._projected.get(name)
        if cached is None or cached[0] != key or any(a is not b for a, b in zip(cached[1], weights, strict=True)):
            tokens = self._tokens[name].to(dtype)
            cached = self._projected[name] = (key, weights, attn.to_k(tokens), attn.to_v(tokens))
        return cached[2], cached[3]

    def _take_pending(self) -> dict[str, torch.Tensor]:
        if not self._pending:
            raise RuntimeError("no reference-UNet pass was written to the bank")
        pending, self._pending = self._pending, {}
        return pending

    def _rebuild(self) -> None:
        self._tokens = {name: torch.cat([s[name] for s in self._sets], dim=1) for name in self._sets[0]}
        self._projected = {}


class ReferenceWriteProcessor:
    """Reference UNet side: store the self-attention input, then attend as usual."""

    def __init__(self, bank: ReferenceBank, name: str, inner=None):
        self.bank, self.name, self.inner = bank, name, inner or AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, **kwargs) -> torch.Tensor:
        self.bank.write(self.name, hidden_states)  # (b, n, c): LN1 output of the block
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)


class ReferenceReadProcessor:
    """Denoising UNet side: keys/values = [own tokens, reference and keyframe tokens of the same layer].

    The reference tokens' keys and values come from `ReferenceBank.projections` (once per bank entry), shared by
    every frame; with a non-sdpa backend or an unusual layer it projects `[own, reference]` tokens per frame.
    """

    def __init__(self, bank: ReferenceBank, name: str, inner=None):
        self.bank, self.name, self.inner = bank, name, inner or AttnProcessor2_0()
        self.savings = True  # False: project [own, reference] tokens per frame (the official way; benchmarks)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, **kwargs) -> torch.Tensor:
        ref = self.bank.tokens(self.name)  # (b, n_ref, c)
        if ref is None:
            return self.inner(attn, hidden_states, None, attention_mask)
        frames = hidden_states.shape[0] // ref.shape[0]
        if not self.savings or not _plain_sdpa(attn, self.inner, hidden_states, attention_mask):
            kv = torch.cat([hidden_states, per_frame(ref, frames).to(hidden_states.dtype)], dim=1)
            return self.inner(attn, hidden_states, kv, attention_mask)  # ((b f), n + n_ref, c) keys and values
        key_ref, value_ref = self.bank.projections(self.name, attn, hidden_states.dtype)  # (b, n_ref, inner)
        key = torch.cat([attn.to_k(hidden_states), per_frame(key_ref, frames)], dim=1)
        value = torch.cat([attn.to_v(hidden_states), per_frame(value_ref, frames)], dim=1)
        return _attend(attn, hidden_states, attn.to_q(hidden_states), key, value)


class SingleTokenCrossAttnProcessor:
    """Cross-attention to a single token (the CLIP embedding): softmax over one key is 1, so the output is
    `to_out(to_v(token))` for every query; the queries and the attention are skipped. Otherwise `inner`."""

    def __init__(self, inner=None):
        self.inner = inner or AttnProcessor2_0()
        self.savings = True  # False: always `inner` (benchmarks)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, **kwargs) -> torch.Tensor:
        if (not self.savings or encoder_hidden_states is None or encoder_hidden_states.shape[1] != 1 or attn.norm_cross
                or not _plain_sdpa(attn, self.inner, hidden_states, attention_mask)):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)
        out = attn.to_out[1](attn.to_out[0](attn.to_v(encoder_hidden_states)))  # (b, 1, c)
        if attn.residual_connection:
            return (out + hidden_states) / attn.rescale_output_factor
        return (out / attn.rescale_output_factor).expand(*hidden_states.shape[:2], -1)  # the same for every query


def per_frame(tokens: torch.Tensor, frames: int) -> torch.Tensor:
    """(b, n, c) per-clip tensors -> ((b f), n, c), each clip's row repeated for its `frames` frames."""
    return tokens.expand(frames, -1, -1) if tokens.shape[0] == 1 else tokens.repeat_interleave(frames, dim=0)


def _plain_sdpa(attn: Attention, inner, hidden_states: torch.Tensor, attention_mask) -> bool:
    """Is this call what `AttnProcessor2_0` does with nothing but projections, sdpa and `to_out`?"""
    dropout = attn.to_out[1]
    return (type(inner) is AttnProcessor2_0 and attention_mask is None and hidden_states.ndim == 3
            and attn.spatial_norm is None and attn.group_norm is None and attn.norm_q is None
            and attn.norm_k is None and not attn.norm_cross and not (dropout.training and dropout.p > 0))


def _attend(attn: Attention, hidden_states: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
            value: torch.Tensor) -> torch.Tensor:
    """The rest of `AttnProcessor2_0` from projected (b, n, inner) queries, keys and values."""
    b, head_dim = query.shape[0], key.shape[-1] // attn.heads
    query, key, value = (x.view(b, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + hidden_states
    return out / attn.rescale_output_factor


def cross_attention_layers(unet: nn.Module) -> dict[str, Attention]:
    """The spatial cross-attention (`attn2`) layers of a UNet's transformer blocks, by module name."""
    return {name: m for name, m in unet.named_modules()
            if isinstance(m, Attention) and name.endswith(".attn2") and ".attentions." in name}


def set_attention_savings(model: nn.Module, on: bool = True) -> None:
    """Turn the exact attention savings of `model`'s processors on (the default) or off (to measure them)."""
    for module in model.modules():
        if isinstance(module, Attention) and hasattr(module.processor, "savings"):
            module.processor.savings = on


def install_reference_attention(reference_unet: nn.Module, denoising_unet: nn.Module, bank: ReferenceBank,
                                attention: str = "sdpa") -> None:
    """Pair the two UNets' self-attention layers by name: the reference UNet writes, the denoising UNet reads."""
    writers, readers = self_attention_layers(reference_unet), self_attention_layers(denoising_unet)
    if set(writers) != set(readers):
        raise ValueError(f"reference/denoising UNets do not pair: {sorted(set(writers) ^ set(readers))[:4]}")
    set_attention_backend(reference_unet, attention)
    set_attention_backend(denoising_unet, attention)
    for name in writers:
        writers[name].set_processor(ReferenceWriteProcessor(bank, name, backend_processor(attention)))
        readers[name].set_processor(ReferenceReadProcessor(bank, name, backend_processor(attention)))
    for layer in cross_attention_layers(denoising_unet).values():  # the CLIP cross-attention: one token
        layer.set_processor(SingleTokenCrossAttnProcessor(backend_processor(attention)))
