"""How far a lower-precision run is from the official fp32 frames: our engine streams the online fixture stream
(the recording's inputs, noise and keyframe threshold) in --dtype, and its frames are compared with the official
online wrapper's recorded fp32 frames (the grid pixels and block means of tests/fixtures/official/official.npz).

    python tools/make_random_weights.py --size fidelity --seed 0 --out weights/fidelity
    python tools/fidelity/dtype_difference.py --weights weights/fidelity --dtype bf16

Prints one JSON line: max and mean absolute difference and PSNR (dB, frames in [0, 1]) of the pixels and means.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from personalive.config import load_config  # noqa: E402
from personalive.pipelines.build import build_engine  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True, help="make_random_weights.py --size fidelity --seed 0")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    official = dict(np.load(common.FIXTURE, allow_pickle=False))
    meta = json.loads(str(official["meta"]))
    if common.weights_hash(args.weights) != meta["weights_hash"]:
        sys.exit(f"{args.weights} is not the recording's weights; write them with "
                 "`python tools/make_random_weights.py --size fidelity --seed 0 --out DIR`")
    cfg = load_config(ROOT / "configs/prompts/fidelity.yaml",
                      [f"weights_dir={args.weights}", f"dtype={args.dtype}", f"device={args.device}",
                       f"keyframe_threshold={meta['online_threshold']}"])
    engine = build_engine(cfg, noise_fn=common.FrameNoise(meta["noise_seed"]))
    engine.fuse_reference(Image.open(common.reference_path()).convert("RGB"))
    frames = common.to_model(common.upsample(common.driving_clip(common.ONLINE_FRAMES)))
    ours = torch.cat([engine.step(frames[i : i + engine.window]) for i in range(0, len(frames), engine.window)])
    result = {"dtype": args.dtype, "device": args.device, "frames": len(ours)}
    for kind, values in common.frame_summary(ours).items():
        diff = np.abs(values - official[f"online/{kind}"])
        mse = float((diff**2).mean())
        result[kind] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                        "psnr_db": float(10 * np.log10(1 / mse)) if mse else float("inf")}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
