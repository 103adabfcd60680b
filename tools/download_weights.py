"""Download the public PersonaLive weights into the official layout, or check a weights folder.

    python tools/download_weights.py [--out pretrained_weights]     # resumable, with progress bars
    python tools/download_weights.py --with-tiny-vae                # also TAESD, the decoder of vae_decoder=tiny
    python tools/download_weights.py --check pretrained_weights     # every file, key and shape; OK or one line per problem
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from personalive.config import load_config
from personalive.errors import PersonaLiveError, WeightsNotFoundError, reason
from personalive.weights import check_weights

# (hub repository, file in it, destination under --out)
FILES = [
    *[("lambdalabs/sd-image-variations-diffusers", f, f"sd-image-variations-diffusers/{f}") for f in (
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin",
        "image_encoder/config.json", "image_encoder/pytorch_model.bin")],
    *[("stabilityai/sd-vae-ft-mse", f, f"sd-vae-ft-mse/{f}") for f in ("config.json", "diffusion_pytorch_model.bin")],
    *[("huaichang/PersonaLive", f"pretrained_weights/personalive/{n}.pth", f"personalive/{n}.pth") for n in (
        "denoising_unet", "motion_encoder", "motion_extractor", "pose_guider", "reference_unet", "temporal_module")],
]
# the optional tiny decoder (vae_decoder=tiny): TAESD in diffusers' AutoencoderTiny format
TINY_VAE_FILES = [("madebyollin/taesd", f, f"taesd/{f}") for f in ("config.json", "diffusion_pytorch_model.safetensors")]


def download(out: Path, files: list[tuple[str, str, str]] = FILES) -> None:
    from huggingface_hub import hf_hub_download

    staging = out / ".download"
    for repo, name, dest in files:
        target = out / dest
        if target.is_file() and target.stat().st_size > 0:
            logging.info("have %s", target)
            continue
        logging.info("fetching %s from %s", name, repo)
        try:  # partial files stay in the staging folder and resume on the next run
            path = hf_hub_download(repo, name, local_dir=staging / repo.replace("/", "--"))
        except Exception as e:  # network, authentication, disk: one line, and what to do
            raise WeightsNotFoundError(f"could not download {name} from https://huggingface.co/{repo} ({reason(e)}); "
                                       f"run the command again to resume, or put the file at {target}") from e
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, target)
    shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("pretrained_weights"))
    parser.add_argument("--check", type=Path, metavar="DIR", help="verify DIR instead of downloading")
    parser.add_argument("--with-tiny-vae", action="store_true",
                        help="also download TAESD (madebyollin/taesd) to OUT/taesd/, the decoder of vae_decoder=tiny")
    parser.add_argument("--config", default="configs/prompts/personalive_online.yaml",
                        help="config whose model sizes the check expects (tiny folders: configs/prompts/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.check is None:
            download(args.out, FILES + TINY_VAE_FILES * args.with_tiny_vae)
            return 0
        problems = check_weights(args.check, load_config(args.config, args.overrides))
    except PersonaLiveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in problems:
        print(line)
    if problems:
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
