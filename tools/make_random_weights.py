"""Write random weights in the official layout (PersonaLive .pth files + diffusers/transformers folders).

    python tools/make_random_weights.py --size tiny                 # -> pretrained_weights/tiny
    python tools/make_random_weights.py --size full --out DIR --dtype fp16
    python tools/make_random_weights.py --size fidelity            # -> pretrained_weights/fidelity

Every test and demo then runs the real loading code on these files. Sizes with a `configs/weights/<size>/taesd.json`
(tiny, full) also get random TAESD weights in `taesd/` (the optional decoder of vae_decoder=tiny).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderTiny

from personalive.config import PROJECT_ROOT, load_config
from personalive.errors import PersonaLiveError
from personalive.io.checkpoints import OPTIONAL_CONFIG_FILES, WEIGHT_FILES, save_state_dict, write_json
from personalive.weights import OFFICIAL_FILES, build_models, official_state_dicts, perturb_zero_init, save_models

SIZES = {"tiny": ("configs/prompts/tiny.yaml", "pretrained_weights/tiny"),
         "full": ("configs/prompts/personalive_online.yaml", "pretrained_weights/random-full"),
         # small UNets, VAE and CLIP, full-size motion networks, 512 x 512: the fidelity fixtures' set-up
         "fidelity": ("configs/prompts/fidelity.yaml", "pretrained_weights/fidelity")}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--out", type=Path, help="weights folder (default: pretrained_weights/<size>; random-full for full)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    parser.add_argument("--unet-channels", type=int, nargs="+", metavar="C",
                        help="the UNets' block_out_channels instead of the size's (the pose guider follows)")
    parser.add_argument("--latent-channels", type=int, metavar="N",
                        help="the VAE's latent channels, and so the UNets' input and output, instead of the size's")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. model.pose_guider...)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config_path, default_out = SIZES[args.size]
    out = args.out or Path(default_out)
    widths = [f"model.pose_guider.out_channels={args.unet_channels[0]}"] if args.unet_channels else []
    try:
        cfg = load_config(PROJECT_ROOT / config_path, [*widths, *args.overrides])
        existing = [out / WEIGHT_FILES[f][-1] for f in OFFICIAL_FILES if (out / WEIGHT_FILES[f][-1]).exists()]
        if existing and not args.force:
            raise PersonaLiveError(f"{existing[0]} exists; pass --force to overwrite (is {out} a real weights folder?)")
        configs = {name: _read_json(PROJECT_ROOT / f"configs/weights/{args.size}/{name}.json")
                   for name in ("unet", "vae", "image_encoder")}
        if args.unet_channels:
            if len(args.unet_channels) != len(configs["unet"]["block_out_channels"]):
                raise PersonaLiveError(f"--unet-channels needs {len(configs['unet']['block_out_channels'])} widths, "
                                       f"one per UNet block; got {len(args.unet_channels)}")
            configs["unet"]["block_out_channels"] = args.unet_channels
        if args.latent_channels:
            configs["vae"]["latent_channels"] = args.latent_channels
            configs["unet"].update(in_channels=args.latent_channels, out_channels=args.latent_channels)
        torch.manual_seed(args.seed)
        models = build_models(cfg, configs)
        perturb_zero_init(models)
        dtype = DTYPES[args.dtype]
        save_models(models, out, configs, dtype)
        # the SD UNet the denoising UNet inflates: same 2-D keys (its weights only initialise training)
        base = {k: v for k, v in official_state_dicts(models, dtype)["denoising_unet"].items()
                if ".motion_modules." not in k}
        save_state_dict(base, out / WEIGHT_FILES["base_unet"][-1])
        write_json(_read_json(PROJECT_ROOT / f"configs/weights/{args.size}/model_index.json"),
                   out / "sd-image-variations-diffusers/model_index.json")
        taesd = PROJECT_ROOT / f"configs/weights/{args.size}/taesd.json"
        if taesd.is_file():  # the optional tiny decoder (vae_decoder=tiny), drawn after the rest: they stay the same
            config = _read_json(taesd) | ({"latent_channels": args.latent_channels} if args.latent_channels else {})
            tiny_vae = AutoencoderTiny.from_config({k: v for k, v in config.items() if not k.startswith("_")})
            write_json(config, out / OPTIONAL_CONFIG_FILES["taesd"])
            save_state_dict({k: v.to(dtype) for k, v in tiny_vae.state_dict().items()},
                            out / WEIGHT_FILES["taesd"][0])
    except PersonaLiveError as e:
        logging.error("error: %s", e)
        return 2
    logging.info("wrote %s random weights (%s, seed %d) to %s", args.size, args.dtype, args.seed, out)
    return 0


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


if __name__ == "__main__":
    sys.exit(main())
