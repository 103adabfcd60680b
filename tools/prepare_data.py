"""Cache per-frame keypoints (and optionally MediaPipe face boxes) of a training data folder.

    python tools/prepare_data.py --data_dir DIR [--config configs/train/stage1.yaml] [--detector mediapipe]

For every video under DIR, the frozen motion extractor of the config's weights (weights_dir, LivePortrait's
`personalive/motion_extractor.pth`) runs on every frame, prepared exactly as in training (centre crop and resize to
height x width, then the motion-extractor input); its raw outputs are written to <DIR>/.personalive_cache/<video>.npz
(or data.cache_dir). With --detector mediapipe each frame's MediaPipe face box is stored too, and a video where no
frame shows a face is recorded as faceless. Unreadable videos are recorded as such; training skips both with a
warning. Up-to-date caches are kept unless --force.
"""

from __future__ import annotations

import argparse
import logging
import sys

from personalive.cli import add_common_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "configs/train/stage1.yaml")
    parser.add_argument("--data_dir", help="folder of talking-head videos (default: the config's data_dir)")
    parser.add_argument("--detector", choices=["keypoints", "mediapipe"], default="keypoints",
                        help="face boxes: from keypoints at training time (default) or cached MediaPipe boxes")
    parser.add_argument("--device", default="cpu", help="device of the motion extractor (cpu, cuda, cuda:N)")
    parser.add_argument("--force", action="store_true", help="rewrite caches that are up to date")
    args = parser.parse_args(argv)

    def job() -> None:
        from personalive.config import TrainConfig, load_config
        from personalive.pipelines.build import resolve_device
        from personalive.training.data import prepare_cache

        overrides = list(args.overrides) + ([f"data_dir={args.data_dir}"] if args.data_dir else [])
        cfg = load_config(args.config, overrides, schema=TrainConfig)
        written, bad = prepare_cache(cfg, args.detector, resolve_device(args.device), args.force)
        logging.getLogger("personalive").info("cached %d video(s), %d recorded as unusable", written, bad)

    return run(job, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
