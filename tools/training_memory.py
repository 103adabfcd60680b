"""Memory per GPU of each training stage: weights, gradients and AdamW state counted from the networks, activations
estimated from a measurement at a small size. JSON out.

    python tools/training_memory.py --weights pretrained_weights/tiny            # the table of the README
    python tools/training_memory.py --weights DIR --stages 3 --gpus 16

Weights, gradients and optimizer state are exact: the full-size networks of `configs/train/stage{1,2,3}.yaml` and
`configs/weights/full/*.json` are built on the meta device (no memory), the trained parameters counted in fp32 with
fp32 gradients and two fp32 AdamW moments, the frozen ones in the config's dtype. Sharded = FSDP2 without resharding after forward
(ZeRO-2, `configs/accelerate/fsdp_8_gpus.yaml`) over --gpus: gradients and optimizer state divided among them.

Activations are an estimate: one training step of the stage runs on the CPU with the tiny networks of
`configs/train/tiny_stage{1,2,3}.yaml` (random weights from --weights, random frames) at 64x64, with and without
gradient checkpointing, and the bytes that autograd keeps for the backward pass (saved tensors, parameters
excluded, each storage once) are counted; they are then scaled to 512x512 and the full size as activations scale in
a UNet: by the pixels (x 64), by the UNet's channels weighted by the share of pixels at each level (full
[320, 640, 1280, 1280] against tiny [32, 32, 64, 64]), by the full config's batch against the tiny one's, and by 2/4
bytes in bf16/fp16 against fp32. Attention maps are not saved by memory-efficient attention (SDPA, xformers) on GPUs;
not counted: the CUDA context, allocator fragmentation and the frozen networks' transient activations.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3


def unet_scale(tiny: list[int], full: list[int]) -> float:
    """Activations of the full UNet over the tiny one's at the same pixels: channels weighted by pixel share."""
    def weighted(channels):
        return sum(c / 4**i for i, c in enumerate(channels))

    return weighted(full) / weighted(tiny)


def static_memory(stage: int, gpus: int) -> dict:
    """Parameter counts and bytes per GPU of the full-size stage (meta device)."""
    import torch

    from personalive.config import TrainConfig, load_config
    from personalive.training.loop import DTYPES
    from personalive.training.stages import set_trainable, trainable_modules
    from personalive.weights import build_models, network_configs

    cfg = load_config(ROOT / f"configs/train/stage{stage}.yaml", [], schema=TrainConfig)
    configs = network_configs(ROOT / "configs/weights/full")
    with torch.device("meta"):
        models = build_models(cfg, configs)
    set_trainable(models, trainable_modules(cfg))
    params = [p for _, m in models.items() for p in m.parameters()]
    trained = sum(p.numel() for p in params if p.requires_grad)
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    frozen_bytes = torch.empty((), dtype=DTYPES[cfg.dtype]).element_size()
    weights = trained * 4 + frozen * frozen_bytes
    grads, optimizer = trained * 4, trained * 8
    return {"trained_params": trained, "frozen_params": frozen, "weights_gib": weights / GIB,
            "grads_gib": grads / GIB, "optimizer_gib": optimizer / GIB,
            "grads_sharded_gib": grads / gpus / GIB, "optimizer_sharded_gib": optimizer / gpus / GIB,
            "batch": cfg.train_batch_size, "dtype": cfg.dtype, "height": cfg.height}


def random_batch(cfg, stage: int, clip_size: int) -> dict:
    """A batch of random frames with the dataset's keys and shapes (see `TalkingHeadDataset`)."""
    import torch

    from personalive.training.data import motion_dim
    from personalive.training.stages import clip_frames

    g = torch.Generator().manual_seed(0)
    b, f = cfg.train_batch_size, clip_frames(cfg)[0]
    me = cfg.model.motion_extractor
    s, width = me.input_size, motion_dim(me.num_bins, me.num_kp)
    return {"key": torch.arange(b), "ref_clip": torch.randn(b, 3, clip_size, clip_size, generator=g),
            "ref_image": torch.rand(b, 3, cfg.reference_image_height, cfg.reference_image_width, generator=g) * 2 - 1,
            "ref_pose": torch.rand(b, 3, s, s, generator=g),
            "frames": torch.rand(b, f, 3, cfg.height, cfg.width, generator=g) * 2 - 1,
            "cached": torch.zeros(b, dtype=torch.bool), "ref_motion": torch.zeros(b, width),
            "motion": torch.zeros(b, f, width), "face_boxes": torch.full((b, f, 4), -1.0),
            "driver_gain": torch.ones(b, 3)}


def measured_activations(stage: int, weights: Path, checkpointing: bool) -> tuple[int, dict]:
    """Bytes autograd saves for the backward of one tiny training step (parameters excluded, each storage once)."""
    import torch

    from personalive.config import TrainConfig, load_config
    from personalive.training.stages import Randomness, build_stage
    from personalive.weights import init_training_models

    cfg = load_config(ROOT / f"configs/train/tiny_stage{stage}.yaml",
                      [f"weights_dir={weights}", f"gradient_checkpointing={str(checkpointing).lower()}"],
                      schema=TrainConfig)
    torch.manual_seed(0)
    models = init_training_models(cfg)
    net = build_stage(models, cfg)
    own = {p.untyped_storage().data_ptr() for _, m in models.items() for p in m.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    batch = random_batch(cfg, stage, models.image_encoder.config.image_size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = net(batch, Randomness.of(0, batch["key"], 0, torch.device("cpu")))["loss"]
    loss.backward()
    unet = json.loads((weights / "sd-image-variations-diffusers/unet/config.json").read_text())
    return sum(saved.values()), {"batch": cfg.train_batch_size, "height": cfg.height,
                                 "channels": unet["block_out_channels"]}


def stage_memory(stage: int, weights: Path, gpus: int) -> dict:
    out = static_memory(stage, gpus)
    full = json.loads((ROOT / "configs/weights/full/unet.json").read_text())["block_out_channels"]
    for checkpointing in (False, True):
        measured, tiny = measured_activations(stage, weights, checkpointing)
        scale = ((out["height"] / tiny["height"]) ** 2 * unet_scale(tiny["channels"], full)
                 * out["batch"] / tiny["batch"] * (0.5 if out["dtype"] in ("bf16", "fp16") else 1.0))
        key = "checkpointing" if checkpointing else "no_checkpointing"
        out[f"activations_{key}_measured_mib"] = measured / 2**20
        out[f"activations_{key}_gib"] = measured * scale / GIB
    base = out["weights_gib"]
    for key in ("no_checkpointing", "checkpointing"):
        act = out[f"activations_{key}_gib"]
        out[f"total_ddp_{key}_gib"] = base + out["grads_gib"] + out["optimizer_gib"] + act
        out[f"total_sharded_{key}_gib"] = base + out["grads_sharded_gib"] + out["optimizer_sharded_gib"] + act
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True,
                        help="tiny random weights for the activation measurement (tools/make_random_weights.py)")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the sharded set-up divides among (default 8)")
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    args = parser.parse_args(argv)
    if not (args.weights / "personalive").is_dir():
        parser.error(f"--weights {args.weights}: not a weights folder; make one with "
                     "python tools/make_random_weights.py --size tiny --out DIR")
    import torch

    torch.set_num_threads(1)
    result = {"note": "per GPU at 512x512; weights/gradients/optimizer exact, activations an estimate (see --help)",
              "gpus": args.gpus, "stages": {str(s): stage_memory(s, args.weights, args.gpus) for s in args.stages}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
