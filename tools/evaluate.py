"""The paper's evaluation: metrics of a result video, or a whole self-/cross-reenactment protocol -> Table 1.

    # a protocol on a folder of test videos (video files or folders of frames), any weights folder
    python tools/evaluate.py --protocol self --videos data/test --weights-dir pretrained_weights
    python tools/evaluate.py --protocol both --videos data/test --weights-dir W --frames 100 --benchmark
    # cross-reenactment with given portraits (image i drives ... video i mod m), tiny random weights
    python tools/evaluate.py --protocol cross --videos DIR --references PORTRAITS --config configs/prompts/tiny.yaml

    # one result against its ground truth (videos or folders of frames)
    python tools/evaluate.py --pred result.mp4 --gt driver.mp4

Writes OUT/table.md (the paper's Table 1 layout: self-reenactment L1, SSIM, LPIPS, FVD, tLP; cross-reenactment
ID-SIM, AED, APD, FVD, tLP; FPS and latency with --benchmark) and OUT/table.json (every number, per video, the
settings, and why any metric was skipped). Default OUT: results/evaluation/<method>/.

Networks of the metrics come from --eval-weights (default pretrained_weights/eval/): alexnet-owt-7be5be79.pth and
lpips_alex_v0.1.pth (LPIPS, tLP), rgb_imagenet.pt (FVD), w600k_r50.onnx (ID-SIM); AED/APD use the motion extractor
of the PersonaLive weights. A missing file skips its metrics with a message naming the file to fetch; the rest is
computed. See the README section "Evaluation" for exact definitions.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

from personalive.cli import add_common_arguments, run
from personalive.config import load_config
from personalive.errors import WeightsNotFoundError
from personalive.evaluation.networks import DEFAULT_EVAL_DIR, load_eval_networks, load_motion_extractor
from personalive.evaluation.protocol import ProtocolOptions, compare_videos, plan, run_protocols, write_tables
from personalive.pipelines.offline import FACE_CROPS

logger = logging.getLogger("evaluate")

DEFINITIONS = {
    "l1": "mean |result - ground truth| over pixels and channels, frames in [0, 1]",
    "ssim": "scikit-image SSIM, Gaussian 11x11 window, sigma 1.5, data range 1, RGB channels averaged",
    "psnr": "scikit-image PSNR, data range 1, per frame, capped at 100 dB",
    "lpips": "LPIPS v0.1 AlexNet at the model resolution, inputs in [-1, 1]",
    "tlp": "mean over t of |LPIPS(result_t, result_t-1) - LPIPS(driver_t, driver_t-1)| (not x100)",
    "fvd": "Frechet distance of I3D (Kinetics-400 rgb_imagenet) logits of non-overlapping 16-frame clips, "
           "224x224 bilinear, [-1, 1]; real set = ground truth (self) or drivers (cross)",
    "id_sim": "cosine similarity of ArcFace embeddings, reference vs each result frame, 5-point MediaPipe "
              "alignment to the 112x112 ArcFace template",
    "aed": "mean |expression delta (motion extractor fc_exp, 63 values) of result - of driver|",
    "apd": "mean |(pitch, yaw, roll) of result - of driver| in radians (motion extractor)",
    "averaging": "frame-weighted over all videos (tLP over all transitions); FVD over all clips",
}


def load_benchmark():
    """tools/benchmark.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("personalive_benchmark", Path(__file__).with_name("benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "configs/prompts/personalive_offline.yaml")
    parser.add_argument("--protocol", choices=["self", "cross", "both"], help="run a protocol on --videos")
    parser.add_argument("--videos", type=Path, help="folder of test videos (files, or folders of frames)")
    parser.add_argument("--weights-dir", help="PersonaLive weights to evaluate (default: the config's weights_dir)")
    parser.add_argument("--eval-weights", default=DEFAULT_EVAL_DIR,
                        help=f"folder of the metrics' networks (default {DEFAULT_EVAL_DIR})")
    parser.add_argument("--frames", type=int, help="frames per test video (default: all)")
    parser.add_argument("--references", type=Path, help="cross: folder of reference portraits (default: the first "
                                                        "frame of the next test video)")
    parser.add_argument("--face-crops", choices=FACE_CROPS, default="auto",
                        help="motion-encoder face crops, as inference_offline.py (default auto)")
    parser.add_argument("--method", help="row name in the table (default: the weights folder's name)")
    parser.add_argument("--out", type=Path, help="output folder (default results/evaluation/<method>)")
    parser.add_argument("--save-videos", action="store_true", help="also write every result to OUT/videos/")
    parser.add_argument("--benchmark", action="store_true", help="add FPS and latency (tools/benchmark.py)")
    parser.add_argument("--benchmark-frames", type=int, default=200, help="frames timed by --benchmark (200)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: the config's)")
    parser.add_argument("--pred", type=Path, help="a result video (or frame folder) to compare with --gt")
    parser.add_argument("--gt", type=Path, help="its ground truth")
    args = parser.parse_intermixed_args(argv)
    if (args.pred is None) != (args.gt is None):
        parser.error("--pred and --gt go together")
    if args.pred is not None and args.protocol:
        parser.error("use either --protocol with --videos, or --pred with --gt")
    if args.pred is None and not (args.protocol and args.videos):
        parser.error("give --protocol self|cross|both with --videos DIR, or --pred A --gt B")
    if args.frames is not None and args.frames < 1:
        parser.error("--frames must be at least 1")
    if args.benchmark_frames < 1:
        parser.error("--benchmark-frames must be at least 1")

    def job() -> None:
        overrides = [f"device={args.device}"] * bool(args.device) + (
            [f"weights_dir={args.weights_dir}"] if args.weights_dir else []) + args.overrides
        cfg = load_config(args.config, overrides)
        method = args.method or Path(cfg.weights_dir).name or "PersonaLive"
        out = args.out or Path("results") / "evaluation" / method
        settings = {"config": str(args.config), "overrides": overrides, "weights_dir": str(cfg.weights_dir),
                    "eval_weights": str(args.eval_weights), "frames_per_video": args.frames,
                    "face_crops": args.face_crops, "definitions": DEFINITIONS}
        if args.pred is not None:
            try:
                extractor = load_motion_extractor(cfg)
            except WeightsNotFoundError as e:
                logger.warning("AED, APD skipped: %s", e)
                extractor = None
            nets = load_eval_networks(args.eval_weights, extractor)
            results = {"self": compare_videos(args.pred, args.gt, nets, args.frames)}
            settings.update(pred=str(args.pred), gt=str(args.gt))
            md, js = write_tables(results, out, method, settings=settings)
        else:
            from personalive.pipelines.build import build_engine

            protocols = ("self", "cross") if args.protocol == "both" else (args.protocol,)
            options = ProtocolOptions(protocols, args.frames, args.references, args.face_crops,
                                      out / "videos" if args.save_videos else None)
            plan(args.videos, options)  # bad inputs fail here, before the models load
            engine = build_engine(cfg)
            nets = load_eval_networks(args.eval_weights, engine.models.motion_extractor, engine.device)
            results = run_protocols(engine, args.videos, nets, options)
            efficiency = None
            if args.benchmark:
                bench = load_benchmark().benchmark(engine, args.benchmark_frames, warmup=4)
                latency = bench["latency_ms"].get("mean")
                if latency is None:
                    logger.warning("--benchmark-frames %d is too few for a latency (a chunk leaves %d steps after it "
                                   "enters); use at least %d", args.benchmark_frames, engine.chunks - 1,
                                   engine.chunks * engine.window)
                efficiency = {"fps": bench["fps"], "latency_s": None if latency is None else latency / 1000,
                              "device": str(engine.device), "benchmark": bench}
            settings.update(videos=str(args.videos), protocols=list(protocols), device=str(engine.device),
                            dtype=str(engine.dtype).split(".")[-1])
            md, js = write_tables(results, out, method, efficiency, settings)
        logger.info("wrote %s and %s", md, js)
        print(md.read_text())

    return run(job, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
