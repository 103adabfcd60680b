"""Weight files: where they live in the official layout, reading them safely, writing them atomically.

A `.pth`/`.bin` is read with `torch.load(weights_only=True)`, so a pickle that would run code is refused;
`.safetensors` is accepted wherever a `.pth`/`.bin` is. Key names are converted here where the official files
differ from our modules (see `from_official`).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from personalive.errors import CheckpointError, WeightsNotFoundError, reason

logger = logging.getLogger(__name__)

_PTH = (".safetensors", ".bin", ".pth")  # the last one is the official name


def _personalive(name: str) -> tuple[str, ...]:
    return tuple(f"personalive/{name}{ext}" for ext in _PTH)


# The one table of weight files. Logical name -> (accepted files under weights_dir, preferred first, the last one
# the official download layout's; the network of `PersonaLiveModels` it loads into, None if inference reads none;
# which of that network's keys the file holds: all | temporal (every key under `temporal_modules`) | not temporal)
WEIGHTS: dict[str, tuple[tuple[str, ...], str | None, str]] = {
    "denoising_unet": (_personalive("denoising_unet"), "denoising_unet", "not temporal"),  # 2-D UNet, motion modules
    "temporal_module": (_personalive("temporal_module"), "denoising_unet", "temporal"),
    **{name: (_personalive(name), name, "all")
       for name in ("reference_unet", "pose_guider", "motion_encoder", "motion_extractor")},
    "vae": (("sd-vae-ft-mse/diffusion_pytorch_model.safetensors", "sd-vae-ft-mse/diffusion_pytorch_model.bin"),
            "vae", "all"),
    "image_encoder": (("sd-image-variations-diffusers/image_encoder/model.safetensors",
                       "sd-image-variations-diffusers/image_encoder/pytorch_model.bin"), "image_encoder", "all"),
    # the SD UNet: only its config is needed for inference; its weights initialise training
    "base_unet": (("sd-image-variations-diffusers/unet/diffusion_pytorch_model.safetensors",
                   "sd-image-variations-diffusers/unet/diffusion_pytorch_model.bin"), None, "all"),
    # optional (OPTIONAL_FILES): TAESD (madebyollin/taesd), diffusers' AutoencoderTiny, decodes with vae_decoder=tiny
    "taesd": (("taesd/diffusion_pytorch_model.safetensors",), "tiny_vae", "all"),
}
# files read only when an option asks for them: file -> that option; no other path requires or writes them
OPTIONAL_FILES: dict[str, str] = {"taesd": "vae_decoder=tiny"}
WEIGHT_FILES: dict[str, tuple[str, ...]] = {name: files for name, (files, _, _) in WEIGHTS.items()}
# the files inference always loads: official file -> (network, which of its keys the file holds)
OFFICIAL_FILES: dict[str, tuple[str, str]] = {name: (net, keys) for name, (_, net, keys) in WEIGHTS.items()
                                              if net and name not in OPTIONAL_FILES}
CONFIG_FILES: dict[str, str] = {
    "unet": "sd-image-variations-diffusers/unet/config.json",
    "vae": "sd-vae-ft-mse/config.json",
    "image_encoder": "sd-image-variations-diffusers/image_encoder/config.json",
}
OPTIONAL_CONFIG_FILES: dict[str, str] = {"taesd": "taesd/config.json"}
FETCH_HINT = ("run `python tools/download_weights.py --out {dir}` (real weights) or "
              "`python tools/make_random_weights.py --out {dir}` (random, for tests), or set weights_dir=<folder>")
TINY_VAE_HINT = ("vae_decoder=tiny needs TAESD: run `python tools/download_weights.py --with-tiny-vae --out {dir}` "
                 "(or `python tools/make_random_weights.py --out {dir}`: random), or set vae_decoder=sd")


def _fetch_hint(name: str, weights_dir: Path) -> str:
    return (TINY_VAE_HINT if name == "taesd" else FETCH_HINT).format(dir=weights_dir)


def optional_files(cfg) -> list[str]:
    """The optional weight files (`OPTIONAL_FILES`) that a run config's options ask for."""
    options = {"vae_decoder=tiny": cfg.vae_decoder == "tiny"}
    return [file for file, option in OPTIONAL_FILES.items() if options[option]]


def find_weight_file(weights_dir: str | Path, name: str) -> Path:
    """The file holding weights `name` under `weights_dir`; WeightsNotFoundError names it and how to get it."""
    weights_dir = Path(weights_dir)
    for rel in WEIGHT_FILES[name]:
        if (weights_dir / rel).is_file():
            return weights_dir / rel
    raise WeightsNotFoundError(f"{weights_dir / WEIGHT_FILES[name][-1]} not found; {_fetch_hint(name, weights_dir)}")


def check_weights_folder(weights_dir: str | Path, command: str) -> None:
    """WeightsNotFoundError when `weights_dir` does not exist, is not a folder, or holds no file of the layout; the
    message names the folder and `command`, the one command that fills it."""
    weights_dir = Path(weights_dir)
    fix = f"fill it with `{command}`, or set weights_dir=<folder>"
    if not weights_dir.exists():
        raise WeightsNotFoundError(f"weights folder {weights_dir} does not exist; {fix}")
    if not weights_dir.is_dir():
        raise WeightsNotFoundError(f"weights_dir={weights_dir} is a file, not a folder; set weights_dir=<folder>")
    layout = [rel for rels in WEIGHT_FILES.values() for rel in rels] + list(CONFIG_FILES.values())
    if not any((weights_dir / rel).is_file() for rel in layout):
        anything = any(p.is_file() for p in weights_dir.rglob("*"))
        state = "holds no PersonaLive weights" if anything else "is empty"
        raise WeightsNotFoundError(f"weights folder {weights_dir} {state}; {fix}")


def read_config(weights_dir: str | Path, name: str) -> dict:
    """A diffusers/transformers `config.json` from the layout (`CONFIG_FILES`, `OPTIONAL_CONFIG_FILES`), as a dict."""
    path = Path(weights_dir) / {**CONFIG_FILES, **OPTIONAL_CONFIG_FILES}[name]
    if not path.is_file():
        raise WeightsNotFoundError(f"{path} not found; {_fetch_hint(name, Path(weights_dir))}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download it") from e


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict on the CPU without running code: safetensors, or a weights-only torch pickle."""
    path = Path(path)
    _check_not_empty(path)
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # legacy (non-zip) serialisation cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load, the file would run code when unpickled "
                              "(not a plain state dict); get the file from its official source") from e
    except (RuntimeError, EOFError, OSError, SafetensorError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated weights file ({reason(e, 120)}); re-download it") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors (got {type(state).__name__})")
    return state


def read_shapes(path: str | Path) -> dict[str, list[int]]:
    """Key -> shape of a weights file, reading as little as the format allows."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        _check_not_empty(path)
        try:
            with safe_open(path, framework="pt") as f:
                return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: corrupt or truncated weights file ({reason(e, 120)}); re-download it") from e
    return {k: list(v.shape) for k, v in load_state_dict(path).items()}


def _check_not_empty(path: Path) -> None:
    """A 0-byte file (an interrupted copy or download) is named as such, before any reader sees it."""
    try:
        empty = path.stat().st_size == 0
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the weights file ({reason(e, 120)})") from e
    if empty:
        raise CheckpointError(f"{path}: empty file (0 bytes); re-download it")


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write `.safetensors` or a torch pickle (by suffix) through a temp file renamed when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        state = {k: v.detach().contiguous() for k, v in state.items()}
        if path.suffix == ".safetensors":
            save_file(state, tmp)
        else:
            torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(data: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------------------------
# Key conversion between the official files and our modules

_LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_DROPPED = {
    "motion_extractor": ("idx_tensor",),  # a constant arange; ours is a non-persistent buffer
    "image_encoder": ("vision_model.embeddings.position_ids",),  # stored by old transformers versions
}


def from_official(name: str, state: dict) -> dict:
    """Official/hub key names -> ours (renames legacy VAE attention keys, drops constant buffers).

    Values are tensors, or shapes (lists of ints) when only checking a file."""
    state = {k: v for k, v in state.items() if k not in _DROPPED.get(name, ())}
    if name == "vae":
        out = {}
        for key, value in state.items():
            prefix, _, leaf = key.rpartition(".")
            module_prefix, _, layer = prefix.rpartition(".")
            if "mid_block.attentions" in key and layer in _LEGACY_VAE_ATTENTION:
                key = f"{module_prefix}.{_LEGACY_VAE_ATTENTION[layer]}.{leaf}"
                if len(value.shape if isinstance(value, torch.Tensor) else value) == 4:  # 1x1 conv, oldest files
                    value = value[:, :, 0, 0] if isinstance(value, torch.Tensor) else value[:2]
            out[key] = value
        state = out
    return state


def check_keys(name: str, state: dict[str, list[int]] | dict[str, torch.Tensor], expected: dict[str, list[int]],
               path: str | Path) -> list[str]:
    """Problems (missing, unexpected, wrong shape) of `state` against `expected` shapes, one line each."""
    shapes = {k: list(v.shape) if isinstance(v, torch.Tensor) else list(v) for k, v in state.items()}
    problems = []
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    if missing:
        problems.append(f"{path}: {len(missing)} missing keys, e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{path}: {len(unexpected)} unexpected keys, e.g. {', '.join(unexpected[:3])}")
    wrong = [k for k in expected if k in shapes and shapes[k] != expected[k]]
    for k in wrong[:3]:
        problems.append(f"{path}: {k} has shape {shapes[k]}, expected {expected[k]}")
    if len(wrong) > 3:
        problems.append(f"{path}: {len(wrong) - 3} more keys with wrong shapes")
    return problems


def require_keys(name: str, state: dict[str, list[int]] | dict[str, torch.Tensor], expected: dict[str, list[int]],
                 path: str | Path) -> None:
    """`check_keys`, as a `CheckpointError` naming the first problem (and how many more there are)."""
    problems = check_keys(name, state, expected, path)
    if problems:
        raise CheckpointError(problems[0] + ("" if len(problems) == 1 else f" (and {len(problems) - 1} more problems)"))


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str, path: str | Path,
                assign: bool = False) -> None:
    """Load `state` into `model` (`strict=True`) after a key and shape check that names `path` (`require_keys`)."""
    require_keys(name, state, {k: list(v.shape) for k, v in model.state_dict().items()}, path)
    model.load_state_dict(state, strict=True, assign=assign)
