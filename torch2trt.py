"""Export the streaming step to ONNX and build its TensorRT engine (see README, "Acceleration").

    python torch2trt.py                         # onnx/unet/unet.onnx, then tensorrt/unet_work.engine (CUDA)
    python torch2trt.py --onnx-only             # ONNX only: no GPU or TensorRT needed (--acceleration onnxruntime)
    python torch2trt.py --config configs/prompts/tiny.yaml --onnx-only device=cpu
"""

from __future__ import annotations

import argparse
import logging
import sys

from personalive.cli import add_common_arguments, run

logger = logging.getLogger("personalive")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "configs/prompts/personalive_online.yaml")
    parser.add_argument("--onnx-only", action="store_true", help="export and check the ONNX model, no TensorRT")
    parser.add_argument("--output-dir", default=None, help="where onnx/ and tensorrt/ go (default: weights_dir)")
    parser.add_argument("--force", action="store_true", help="redo every stage even when its output is cached")
    parser.add_argument("--optimize", action="store_true",
                        help="also save an optimised copy (ONNX Runtime basic optimisations) to onnx/unet_opt/")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="compare ONNX Runtime with PyTorch on random inputs after the export")
    args = parser.parse_args(argv)

    def job() -> None:
        from personalive.config import load_config
        from personalive.export.tensorrt import export_and_build

        cfg = load_config(args.config, args.overrides)
        paths = export_and_build(cfg, args.output_dir, onnx_only=args.onnx_only, force=args.force,
                                 optimize=args.optimize, verify=args.verify)
        for stage, path in paths.items():
            logger.info("%s: %s", stage, path)

    return run(job, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
