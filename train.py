"""Train PersonaLive, one paper stage per run (see README "Training").

    python train.py --config configs/train/stage1.yaml data_dir=DIR output_dir=DIR [key=value ...]
    python train.py --config configs/train/stage2.yaml init_from=outputs/stage1/final ...
    accelerate launch train.py --config configs/train/stage3.yaml ...     # several GPUs or machines

Running the same command again resumes from the newest checkpoint in output_dir (resume_from_checkpoint=latest).
"""

from __future__ import annotations

import argparse
import sys

from personalive.cli import add_common_arguments, parse_args, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "configs/train/stage1.yaml")
    args = parse_args(parser, argv)

    def job() -> None:
        from personalive.config import TrainConfig, load_config
        from personalive.training.loop import train

        train(load_config(args.config, args.overrides, schema=TrainConfig))

    return run(job, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
