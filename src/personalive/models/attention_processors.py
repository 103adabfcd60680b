"""Attention backends and reference attention (paper Sec. 3.2): the only place attention is customised.

The reference UNet runs once on the reference latent; each of its spatial self-attention layers *writes* its
input tokens (the normalised hidden states) to a `ReferenceBank`. The denoising UNet's layer of the same name
*reads* them: its keys and values are `[own tokens, reference tokens, keyframe tokens]`, its queries its own
tokens. Historical keyframes (Sec. 3.4) append more tokens, up to `max_keyframes` sets.
"""

from __future__ import annotations

import importlib.util

import torch
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
            if isinstance(processor, (ReferenceWriteProcessor, ReferenceReadProcessor)):
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
        self._tokens = dict(tokens)

    def _take_pending(self) -> dict[str, torch.Tensor]:
        if not self._pending:
            raise RuntimeError("no reference-UNet pass was written to the bank")
        pending, self._pending = self._pending, {}
        return pending

    def _rebuild(self) -> None:
        self._tokens = {name: torch.cat([s[name] for s in self._sets], dim=1) for name in self._sets[0]}


class ReferenceWriteProcessor:
    """Reference UNet side: store the self-attention input, then attend as usual."""

    def __init__(self, bank: ReferenceBank, name: str, inner=None):
        self.bank, self.name, self.inner = bank, name, inner or AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, **kwargs) -> torch.Tensor:
        self.bank.write(self.name, hidden_states)  # (b, n, c): LN1 output of the block
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)


class ReferenceReadProcessor:
    """Denoising UNet side: keys/values = [own tokens, reference and keyframe tokens of the same layer]."""

    def __init__(self, bank: ReferenceBank, name: str, inner=None):
        self.bank, self.name, self.inner = bank, name, inner or AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, **kwargs) -> torch.Tensor:
        ref = self.bank.tokens(self.name)  # (b, n_ref, c)
        if ref is None:
            return self.inner(attn, hidden_states, None, attention_mask)
        frames = hidden_states.shape[0] // ref.shape[0]
        ref = ref.expand(frames, -1, -1) if ref.shape[0] == 1 else ref.repeat_interleave(frames, dim=0)
        kv = torch.cat([hidden_states, ref.to(hidden_states.dtype)], dim=1)  # ((b f), n + n_ref, c)
        return self.inner(attn, hidden_states, kv, attention_mask)


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
