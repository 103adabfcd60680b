"""All of PersonaLive's networks: built from config, loaded from and saved to the official weights layout.

Sizes of the reference UNet, denoising UNet, VAE and CLIP encoder come from the `config.json` files in the
weights folder (as `from_pretrained` would read them); the denoising UNet inflates the SD UNet config with the
motion/temporal settings of the inference config; the PersonaLive-specific networks take their sizes from
`cfg.model`. Every official file must load with no missing and no unexpected keys.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, AutoencoderTiny
from omegaconf import OmegaConf
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from personalive.config import PROJECT_ROOT, PersonaLiveConfig, load_config, resolve_path
from personalive.errors import ConfigError, PersonaLiveError
from personalive.io.checkpoints import (
    CONFIG_FILES,
    OFFICIAL_FILES,
    WEIGHT_FILES,
    check_keys,
    check_weights_folder,
    find_weight_file,
    from_official,
    load_state_dict,
    load_strict,
    optional_files,
    read_config,
    read_shapes,
    require_keys,
    save_state_dict,
    write_json,
)
from personalive.models import cast_model
from personalive.models.container import PersonaLiveModels
from personalive.models.denoising_unet import DenoisingUNet
from personalive.models.motion_encoder import MotionEncoder
from personalive.models.motion_extractor import MotionExtractor
from personalive.models.pose_guider import PoseGuider
from personalive.models.reference_unet import reference_unet_from_config

logger = logging.getLogger(__name__)

TINY_CONFIG = PROJECT_ROOT / "configs/prompts/tiny.yaml"


def fill_command(cfg: PersonaLiveConfig, weights_dir: str | Path) -> str:
    """The one command that fills `weights_dir` for `cfg`: random tiny weights for the tiny model, else the
    official download."""
    if cfg.model == _tiny_model():
        return f"python tools/make_random_weights.py --size tiny --out {weights_dir}"
    return f"python tools/download_weights.py --out {weights_dir}"


@functools.cache
def _tiny_model():
    return load_config(TINY_CONFIG).model


def require_weights(cfg: PersonaLiveConfig, weights_dir: str | Path | None = None) -> Path:
    """`weights_dir` (default cfg.weights_dir), resolved, once it holds every file inference reads; checks only that
    the files exist (cheap), so a run can fail before any other work starts.

    Raises:
        WeightsNotFoundError: the folder is missing or empty (naming the command that fills it), or a file is missing.
    """
    weights_dir = resolve_path(weights_dir or cfg.weights_dir)
    check_weights_folder(weights_dir, fill_command(cfg, weights_dir))
    for name in CONFIG_FILES:
        read_config(weights_dir, name)
    for file in OFFICIAL_FILES:
        find_weight_file(weights_dir, file)
    for file in optional_files(cfg):
        read_config(weights_dir, file)
        find_weight_file(weights_dir, file)
    return weights_dir


def _no_meta(config: dict) -> dict:
    """A diffusers config without its `_class_name`/`_diffusers_version` entries."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def load_tiny_vae(weights_dir: str | Path) -> AutoencoderTiny:
    """TAESD (diffusers' AutoencoderTiny) from `weights_dir/taesd/` (its `config.json` and safetensors), strictly,
    fp32 on the CPU, in eval mode."""
    config = read_config(weights_dir, "taesd")
    path = find_weight_file(weights_dir, "taesd")
    with init_empty_weights():
        model = AutoencoderTiny.from_config(_no_meta(config))
    state = load_state_dict(path)
    load_strict(model, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, "taesd", path,
                assign=True)
    logger.info("read %s: %d tensors", path, len(state))
    return cast_model(model, "cpu", torch.float32).eval()


def network_configs(weights_dir: str | Path) -> dict[str, dict]:
    """The `config.json` of the SD UNet, the VAE and the CLIP image encoder in `weights_dir`, or the `<name>.json`
    files of a sizes folder (`configs/weights/<size>/`)."""
    if (Path(weights_dir) / "unet.json").is_file():
        return {name: json.loads((Path(weights_dir) / f"{name}.json").read_text()) for name in CONFIG_FILES}
    return {name: read_config(weights_dir, name) for name in CONFIG_FILES}


def build_models(cfg: PersonaLiveConfig, configs: dict[str, dict]) -> PersonaLiveModels:
    """Instantiate every network (random init; wrap in `init_empty_weights()` or a meta device to skip it)."""
    unet, model = configs["unet"], cfg.model
    extra = OmegaConf.to_container(OmegaConf.structured(cfg.unet_additional_kwargs))
    width = unet["block_out_channels"][0]
    checks = [
        (model.pose_guider.out_channels == width, f"model.pose_guider.out_channels={model.pose_guider.out_channels} "
         f"must equal the UNet's block_out_channels[0]={width}"),
        (configs["image_encoder"].get("projection_dim") == unet["cross_attention_dim"],
         f"CLIP projection_dim={configs['image_encoder'].get('projection_dim')} must equal the UNet's "
         f"cross_attention_dim={unet['cross_attention_dim']}"),
        (extra["motion_module_kwargs"]["cross_attention_dim"] == model.motion_encoder.token_dim,
         f"motion_module_kwargs.cross_attention_dim={extra['motion_module_kwargs']['cross_attention_dim']} must "
         f"equal model.motion_encoder.token_dim={model.motion_encoder.token_dim}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return PersonaLiveModels(
        reference_unet=reference_unet_from_config(unet),
        denoising_unet=DenoisingUNet.from_unet2d_config(unet, extra),
        pose_guider=PoseGuider(**dataclasses.asdict(model.pose_guider)),
        motion_encoder=MotionEncoder(**dataclasses.asdict(model.motion_encoder)),
        motion_extractor=MotionExtractor(**dataclasses.asdict(model.motion_extractor)),
        vae=AutoencoderKL.from_config(_no_meta(configs["vae"])),
        image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(configs["image_encoder"])),
    )


def _select(state: dict, which: str) -> dict:
    if which == "all":
        return dict(state)
    temporal = which == "temporal"
    return {k: v for k, v in state.items() if (".temporal_modules." in k) == temporal}


def expected_shapes(models: PersonaLiveModels) -> dict[str, dict[str, list[int]]]:
    """Official file -> key -> shape, from the built networks."""
    return {file: {k: list(v.shape) for k, v in _select(getattr(models, net).state_dict(), which).items()}
            for file, (net, which) in OFFICIAL_FILES.items()}


def load_models(cfg: PersonaLiveConfig, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> PersonaLiveModels:
    """Build every network from the configs in `cfg.weights_dir` and load its official weights (strictly)."""
    weights_dir = require_weights(cfg)  # all present before any work
    configs = network_configs(weights_dir)
    paths = {file: find_weight_file(weights_dir, file) for file in OFFICIAL_FILES}
    with init_empty_weights():
        models = build_models(cfg, configs)
    expected = expected_shapes(models)
    states: dict[str, dict] = {}
    for file, (net, _) in OFFICIAL_FILES.items():
        state = from_official(file, load_state_dict(paths[file]))
        states.setdefault(net, {}).update(state)
        logger.info("read %s: %d tensors", paths[file], len(state))
    full = {net: {} for net in states}
    for file, (net, _) in OFFICIAL_FILES.items():
        full[net].update(expected[file])
    for net, state in states.items():
        files = [f for f, (n, _) in OFFICIAL_FILES.items() if n == net]
        require_keys(net, state, full[net], " + ".join(str(paths[f]) for f in files))
        getattr(models, net).load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                                             strict=True, assign=True)
    if "taesd" in optional_files(cfg):
        models.tiny_vae = load_tiny_vae(weights_dir)
    return models.to(device, dtype).eval()


def check_weights(weights_dir: str | Path, cfg: PersonaLiveConfig) -> list[str]:
    """Every problem of a weights folder (missing file, unreadable file, missing key, wrong shape), one line each."""
    weights_dir = Path(weights_dir)
    try:
        check_weights_folder(weights_dir, fill_command(cfg, weights_dir))
        configs = network_configs(weights_dir)
        with torch.device("meta"):
            models = build_models(cfg, configs)
    except PersonaLiveError as e:
        return [str(e)]
    expected = expected_shapes(models)
    problems, union = [], {}
    for file, (net, _) in OFFICIAL_FILES.items():
        try:
            path = find_weight_file(weights_dir, file)
            shapes = from_official(file, read_shapes(path))
        except PersonaLiveError as e:
            problems.append(str(e))
            continue
        union.setdefault(net, ({}, {}, []))
        union[net][0].update(shapes)
        union[net][1].update(expected[file])
        union[net][2].append(str(path))
    for net, (shapes, wanted, paths) in union.items():
        problems += check_keys(net, shapes, wanted, " + ".join(paths))
    if "taesd" in optional_files(cfg) or (weights_dir / WEIGHT_FILES["taesd"][0]).exists():
        try:
            with torch.device("meta"):
                tiny = AutoencoderTiny.from_config(_no_meta(read_config(weights_dir, "taesd")))
            path = find_weight_file(weights_dir, "taesd")
            problems += check_keys("taesd", read_shapes(path), {k: list(v.shape) for k, v in tiny.state_dict().items()},
                                   path)
        except PersonaLiveError as e:
            problems.append(str(e))
    return problems


def official_state_dicts(models: PersonaLiveModels, dtype: torch.dtype | None = None,
                         states: dict[str, dict] | None = None) -> dict[str, dict]:
    """Official file -> state dict, e.g. to save training results in the layout inference loads; `states` (network
    name -> state dict) replaces the state dicts of those networks (e.g. gathered from shards)."""
    out, states = {}, states or {}
    for file, (net, which) in OFFICIAL_FILES.items():
        state = _select(states[net] if net in states else getattr(models, net).state_dict(), which)
        out[file] = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in state.items()}
    return out


def save_models(models: PersonaLiveModels, out_dir: str | Path, configs: dict[str, dict],
                dtype: torch.dtype | None = None, files: tuple[str, ...] = tuple(OFFICIAL_FILES),
                states: dict[str, dict] | None = None) -> None:
    """Write `files` (official names) and the network configs in the official layout under `out_dir` (`states`: as
    in `official_state_dicts`)."""
    out_dir = Path(out_dir)
    for name, rel in CONFIG_FILES.items():
        write_json(configs[name], out_dir / rel)
    for file, state in official_state_dicts(models, dtype, states).items():
        if file in files:
            save_state_dict(state, out_dir / WEIGHT_FILES[file][-1])  # .pth/.bin, the official format


def perturb_zero_init(models: PersonaLiveModels, std: float = 0.02) -> None:
    """Give small random values to layers the models zero-initialise, so random weights exercise every path.

    A zero PoseGuider output would make pose irrelevant; zero motion/temporal `proj_out` would make those modules
    the identity; zero GRN gamma/beta would skip the ConvNeXt response normalisation.
    """
    names = ("conv_out_modify", "proj_out", "grn")
    with torch.no_grad():
        for _, model in models.items():
            for name, param in model.named_parameters():
                if any(f".{n}." in f".{name}" for n in names) and not param.any():
                    param.normal_(0.0, std)


def load_network(cfg: PersonaLiveConfig, name: str, weights_dir: str | Path | None = None) -> torch.nn.Module:
    """One network (`motion_extractor`, `vae`, ... as in OFFICIAL_FILES, not the denoising UNet's two files) from
    `weights_dir` (default cfg.weights_dir), strictly, fp32 on the CPU, in eval mode."""
    if OFFICIAL_FILES.get(name, ("", ""))[1] != "all":
        raise ValueError(f"load_network() loads single-file networks, not {name!r}")
    weights_dir = resolve_path(weights_dir or cfg.weights_dir)
    check_weights_folder(weights_dir, fill_command(cfg, weights_dir))
    with init_empty_weights():
        model = getattr(build_models(cfg, network_configs(weights_dir)), name)
    path = find_weight_file(weights_dir, name)
    state = from_official(name, load_state_dict(path))
    load_strict(model, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, name, path,
                assign=True)
    return cast_model(model, "cpu", torch.float32).eval()


def init_training_models(cfg: PersonaLiveConfig) -> PersonaLiveModels:
    """The start of training (paper stage 1), fp32 on the CPU: "load what exists, initialise the rest".

    Both UNets take the SD image-variations UNet weights (`base_unet`) key for key (the reference UNet minus its
    output head; the denoising UNet's 2-D layers); the motion extractor (LivePortrait), VAE and CLIP encoder load
    from their files in cfg.weights_dir. The motion and temporal modules (zero `proj_out`), PoseGuider (zero
    output conv) and motion encoder keep their constructors' initialisation. Seed the global RNG first for a
    reproducible start.
    """
    weights_dir = resolve_path(cfg.weights_dir)
    check_weights_folder(weights_dir, fill_command(cfg, weights_dir))
    models = build_models(cfg, network_configs(weights_dir))
    base_path = find_weight_file(weights_dir, "base_unet")
    base = load_state_dict(base_path)
    logger.info("read %s: %d tensors (SD UNet -> reference and denoising UNets)", base_path, len(base))
    ref_state = {k: v for k, v in base.items() if not k.startswith(("conv_norm_out.", "conv_out."))}
    load_strict(models.reference_unet, ref_state, "reference_unet", base_path)
    full = models.denoising_unet.state_dict()
    two_d = {k for k in full if "_modules." not in k}  # everything but motion_modules / temporal_modules
    require_keys("denoising_unet (2-D part)", base, {k: list(full[k].shape) for k in two_d}, base_path)
    load_strict(models.denoising_unet, {**full, **base}, "denoising_unet", base_path)
    for name in ("motion_extractor", "vae", "image_encoder"):
        path = find_weight_file(weights_dir, name)
        load_strict(getattr(models, name), from_official(name, load_state_dict(path)), name, path)
        logger.info("read %s", path)
    return models.to("cpu", torch.float32)
