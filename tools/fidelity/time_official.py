"""Time the official online wrapper's step on the CPU (what `tools/benchmark.py --official` compares with).

Runs a checkout of GVCLab/PersonaLive that you supply (imported at run time, never copied here) in the scratch
venv of `record_official.py`, on the same random weights, fp32, 512 x 512, with the recorder's inputs (the
astronaut, carphone frames upsampled): fuse_reference, `--warmup` untimed `process_input` calls of 4 frames, then
`--steps` timed ones. Prints JSON: the step times and the time per step in the denoising UNet, the motion encoder,
the PoseGuider, the motion extractor (its keypoint methods) and the VAE decoder (hooks and wrappers on the
loaded instances; no official file changes).

Patches, as the recorder's: the PoseGuider's output width follows the small UNet, and the reference bank keeps
fp32 (as ours). The keyframe threshold stays the official 17, as in our fidelity config.

    ../official-venv/bin/python tools/fidelity/time_official.py --official PersonaLive --weights DIR --steps 4
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from record_official import Recorder  # noqa: E402


def timed(totals: dict[str, float], name: str, module: torch.nn.Module) -> None:
    """Add the time of every `module` forward to `totals[name]`."""
    starts: list[float] = []
    module.register_forward_pre_hook(lambda m, i: starts.append(time.perf_counter()))
    module.register_forward_hook(lambda m, i, o: totals.__setitem__(name, totals[name] + time.perf_counter()
                                                                   - starts.pop()))


def timed_method(totals: dict[str, float], name: str, obj, attr: str) -> None:
    """Add the time of every `obj.attr(...)` call to `totals[name]` (an instance attribute wraps the method)."""
    method = getattr(obj, attr)

    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start

    setattr(obj, attr, call)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="a checkout of GVCLab/PersonaLive")
    parser.add_argument("--weights", type=Path, required=True, help="make_random_weights.py --size fidelity output")
    parser.add_argument("--steps", type=int, default=4, help="timed steps of 4 frames (4)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (1)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    official, weights = args.official.resolve(), args.weights.resolve()
    sys.path.insert(0, str(official))
    import src.models.mutual_self_attention as msa
    import src.wrapper as wrapper
    from PIL import Image
    from src.models.pose_guider import PoseGuider

    unet = json.loads((weights / "sd-image-variations-diffusers/unet/config.json").read_text())
    wrapper.PoseGuider = functools.partial(PoseGuider, conditioning_embedding_channels=unet["block_out_channels"][0])
    for name in ("update", "update_hkf"):
        setattr(msa.ReferenceAttentionControl, name,
                functools.partialmethod(getattr(msa.ReferenceAttentionControl, name), dtype=torch.float32))
    with tempfile.TemporaryDirectory() as tmp:
        config = Recorder._online_config(SimpleNamespace(weights=weights, official=official), Path(tmp))
        model = wrapper.PersonaLive(SimpleNamespace(config_path=str(config)), device="cpu")
    totals: dict[str, float] = defaultdict(float)
    for name, module in (("unet", model.denoising_unet), ("motion_encoding", model.motion_encoder),
                         ("pose_guider", model.pose_guider), ("vae_decode", model.vae.decoder)):
        timed(totals, name, module)
    for attr in ("get_kps", "interpolate_kps_online"):  # the motion extractor is called through these
        timed_method(totals, "motion_extraction", model.pose_encoder, attr)
    frames = common.to_model(common.upsample(common.driving_clip(4 * (args.warmup + args.steps))))
    model.fuse_reference(Image.open(common.reference_path()).convert("RGB"))
    for step in range(args.warmup):
        model.process_input(frames[4 * step: 4 * step + 4])
    totals.clear()
    steps = []
    for step in range(args.warmup, args.warmup + args.steps):
        start = time.perf_counter()
        model.process_input(frames[4 * step: 4 * step + 4])
        steps.append(time.perf_counter() - start)
    stages = {name: t / args.steps * 1000 for name, t in sorted(totals.items())}
    stages["other"] = sum(steps) / args.steps * 1000 - sum(stages.values())
    print(json.dumps({"step_s": steps, "step_ms_mean": sum(steps) / len(steps) * 1000, "stage_ms_per_step": stages,
                      "keyframes": model.num_khf, "threads": torch.get_num_threads(),
                      "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
