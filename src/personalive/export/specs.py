"""What an exported streaming step looks like: tensor names, shapes, dynamic axes, sample inputs, TensorRT profile.

One graph is exported: `StreamStep` (PoseGuider on the new canvases, motion encoder on the new face crops, the
denoising UNet over the whole window with the reference and keyframe tokens as explicit inputs, the per-frame
DDIM step, the window shift, and the VAE decode of the chunk that leaves). Its recurrent state is three outputs
bound back to inputs of the next call (`STATE_BINDINGS`). Reference inputs are one per self-attention layer,
named `ref.<layer>`, with a dynamic token axis: the reference's tokens, then those of each keyframe added so far
(1 to 1 + max_keyframes sets), never padding.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass, field

import torch
from torch import nn

from personalive.config import PersonaLiveConfig, resolve_path
from personalive.io.checkpoints import OFFICIAL_FILES, find_weight_file, optional_files
from personalive.models.attention_processors import self_attention_layers

GRAPH_VERSION = 1  # bump when the exported graph changes meaning; cached exports with another number are rebuilt
OPSET = 17  # official; LayerNormalization is native from 17 on
REFERENCE_PREFIX = "ref."
STATE_BINDINGS = {"next_latents": "latents", "next_motion": "motion", "next_pose": "pose"}  # output -> input
OUTPUT_NAMES = ("frames", "next_latents", "next_motion", "next_pose", "motion_first", "x0_first")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output; `dynamic` maps an axis to its symbolic name (reference token axes only)."""

    name: str
    shape: tuple[int, ...]
    dynamic: dict[int, str] = field(default_factory=dict)


@dataclass
class StreamStepSpec:
    """Names and shapes of the exported `StreamStep` for one streaming configuration.

    Reference input shapes are those of the reference alone (one set of tokens); at run time the token axis holds
    1 + k sets for k keyframes, k <= max_keyframes.
    """

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    layers: list[str]  # the denoising UNet's self-attention layers, in reference-input order
    max_keyframes: int
    dtype: torch.dtype

    @classmethod
    def from_engine(cls, engine) -> StreamStepSpec:
        """The spec of `engine.step_module` (a `StreamEngine`) under the engine's config."""
        cfg, m = engine.cfg, engine.models
        w, frames = engine.window, engine.window * engine.chunks
        h, wd = cfg.height // 8, cfg.width // 8
        c = m.denoising_unet.in_channels
        tokens, dim = m.motion_encoder.config.num_tokens, m.motion_encoder.config.token_dim
        face = m.motion_encoder.config.image_size
        pose_c = m.pose_guider.config.out_channels
        clip_d = m.image_encoder.config.projection_dim
        rest = frames - w
        inputs = [
            TensorSpec("latents", (1, c, rest, h, wd)),
            TensorSpec("new_latents", (1, c, w, h, wd)),
            TensorSpec("clip_embeds", (1, 1, clip_d)),
            TensorSpec("motion", (1, rest, tokens, dim)),
            TensorSpec("faces", (1, 3, w, face, face)),
            TensorSpec("pose", (1, pose_c, rest, h, wd)),
            TensorSpec("canvas", (1, 3, w, cfg.height, cfg.width)),
        ]
        layers = reference_token_shapes(m.reference_unet, cfg.reference_image_height // 8,
                                        cfg.reference_image_width // 8)
        for name, (n, channels) in layers.items():
            inputs.append(TensorSpec(REFERENCE_PREFIX + name, (1, n, channels), {1: f"ref_tokens_{n}"}))
        outputs = [
            TensorSpec("frames", (w, cfg.height, cfg.width, 3)),
            TensorSpec("next_latents", (1, c, rest, h, wd)),
            TensorSpec("next_motion", (1, rest, tokens, dim)),
            TensorSpec("next_pose", (1, pose_c, rest, h, wd)),
            TensorSpec("motion_first", (1, tokens, dim)),
            TensorSpec("x0_first", (1, c, h, wd)),
        ]
        return cls(inputs, outputs, list(layers), cfg.max_keyframes, engine.dtype)

    # ------------------------------------------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def reference_inputs(self) -> list[TensorSpec]:
        return [t for t in self.inputs if t.dynamic]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: dict(t.dynamic) for t in self.inputs if t.dynamic}

    def input_shape(self, spec: TensorSpec, keyframes: int = 0) -> tuple[int, ...]:
        """The shape of input `spec` with `keyframes` keyframes in the bank."""
        return tuple(s * (1 + keyframes) if axis in spec.dynamic else s for axis, s in enumerate(spec.shape))

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """TensorRT optimisation profile: (min, opt, max) per input; only the reference token axes vary."""
        opt = min(1, self.max_keyframes)
        return {t.name: (self.input_shape(t, 0), self.input_shape(t, opt), self.input_shape(t, self.max_keyframes))
                for t in self.inputs}

    def sample_inputs(self, keyframes: int = 0, seed: int = 0, device: torch.device | str = "cpu"
                      ) -> tuple[torch.Tensor, ...]:
        """Random inputs in the right ranges (images in [-1, 1] / [0, 1], latents and features ~ N(0, 1))."""
        g = torch.Generator().manual_seed(seed)
        out = []
        for t in self.inputs:
            shape = self.input_shape(t, keyframes)
            if t.name == "faces":
                x = torch.rand(shape, generator=g) * 2 - 1
            elif t.name == "canvas":
                x = torch.rand(shape, generator=g)
            else:
                x = torch.randn(shape, generator=g)
            out.append(x.to(device, self.dtype))
        return tuple(out)

    def key(self) -> dict:
        """What an export depends on besides the weights: graph version, shapes, dtype, token ranges."""
        return {
            "graph": "stream_step",
            "graph_version": GRAPH_VERSION,
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_keyframes": self.max_keyframes,
            "inputs": {t.name: list(t.shape) for t in self.inputs},
            "outputs": {t.name: list(t.shape) for t in self.outputs},
        }

    def check_shapes(self, found: dict[str, tuple], where: str) -> str | None:
        """Compare the static input shapes of an exported graph (`found`: name -> shape, symbolic axes as
        strings or -1) with this spec; a one-line description of the first difference, or None."""
        missing = [n for n in self.input_names if n not in found]
        if missing:
            return f"{where} has no input {missing[0]!r} (it was exported for other models or another version)"
        for t in self.inputs:
            shape = tuple(found[t.name])
            static = [s for axis, s in enumerate(shape) if axis not in t.dynamic]
            wanted = [s for axis, s in enumerate(t.shape) if axis not in t.dynamic]
            if len(shape) != len(t.shape) or static != wanted:
                return f"{where} input {t.name} has shape {list(shape)}, this config needs {list(t.shape)}"
        return None


def reference_token_shapes(reference_unet: nn.Module, h: int, w: int) -> dict[str, tuple[int, int]]:
    """Tokens and channels that each self-attention layer writes for an (h, w) reference latent.

    Down level i works at the latent size halved i times (stride-2 convs round up); up block i at the size of
    down level (levels - 1 - i); the mid block at the smallest size.
    """
    levels = len(reference_unet.down_blocks)
    sizes = [(h, w)]
    for _ in range(levels - 1):
        sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
    shapes = {}
    for name, attn in self_attention_layers(reference_unet).items():
        part, index = name.split(".")[:2]
        if part == "down_blocks":
            level = int(index)
        elif part == "up_blocks":
            level = levels - 1 - int(index)
        else:  # mid_block
            level = levels - 1
        shapes[name] = (sizes[level][0] * sizes[level][1], attn.to_q.in_features)
    return shapes


def weights_fingerprint(cfg: PersonaLiveConfig) -> str:
    """A short content hash of the weight files of `cfg` (name, size, first and last MiB of each)."""
    digest = hashlib.sha256()
    weights_dir = resolve_path(cfg.weights_dir)
    for file in [*OFFICIAL_FILES, *optional_files(cfg)]:
        path = find_weight_file(weights_dir, file)
        size = path.stat().st_size
        digest.update(f"{file}:{path.name}:{size}".encode())
        with path.open("rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(size - (1 << 20), 0))
            digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of `packages` (missing ones as "")."""
    found = {}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = ""
    return found


class ExportableStep(nn.Module):
    """`StreamStep` with every input a positional tensor, in `spec.input_names` order (what exporters trace).

    The reference tensors go to the step's `reference` dict, which loads them into the bank that the denoising
    UNet's reference processors read: the same UNet and processors as eager mode, no second model.
    """

    def __init__(self, step: nn.Module, spec: StreamStepSpec):
        super().__init__()
        self.step, self.layers = step, list(spec.layers)
        self.fixed = len(spec.inputs) - len(spec.layers)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fixed, refs = inputs[: self.fixed], inputs[self.fixed:]
        return self.step(*fixed, reference=dict(zip(self.layers, refs, strict=True)))
