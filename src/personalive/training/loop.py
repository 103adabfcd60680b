"""The training loop on accelerate: one function, `train(cfg)`, for every stage, one process or many.

Distribution, mixed precision, gradient accumulation and checkpointing are accelerate's (`prepare`, `accumulate`,
`save_state`/`load_state`); launch several GPUs or machines with `accelerate launch train.py --config ...`.

Outputs under `output_dir`:
- `checkpoint-<step>/`: accelerate's full state (trained networks, optimizer, LR schedule, scaler, RNG) for resume,
  `training_state.json`, and a complete weights folder in the official layout (`personalive/*.pth`, the VAE and
  CLIP files, the diffusers/transformers `config.json` folders) with the resolved `config.yaml`, so that
  `weights_dir=<checkpoint>` works for inference and `init_from=<checkpoint>` for the next stage;
- `final/`: the weights folder of the last step; `metrics.jsonl`: one line per step (loss, lr, epoch, sample keys);
  `logs/`: tensorboard events when tensorboard is installed.
With `ema_decay`, every weights folder holds the moving average of the trained networks; the accelerate state holds
both the raw weights (which training continues from) and the average.
Every folder is written under a temporary name and renamed when complete.

Several processes: `EpochSampler` gives each process its share of every optimizer step (no sample twice in an
epoch), gradients are averaged by DDP, and a sample's noise comes from a generator seeded with (seed, its key), the
step's shared draws from one seeded with (seed, step) (`stages.Randomness`): the global batch
train_batch_size x processes x gradient_accumulation_steps, not how it is split, sets the result: N processes
compute what one process accumulating N micro-batches computes, to float rounding (and what one process with N times
the batch computes, but for BatchNorm, which normalises over each process's batch).

Resume: `resume_from_checkpoint=latest` (the default) continues from the newest checkpoint at the same step and at
the same sample of the same epoch (`training_state.json` records both), with the same or another number of
processes; the data order is a function of (seed, epoch), so with the same global batch the resumed run sees the
same next batches and draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import (
    DistributedType,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    is_tensorboard_available,
)
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from personalive.config import TrainConfig, resolve_path
from personalive.errors import ConfigError, WeightsNotFoundError
from personalive.io.checkpoints import find_weight_file
from personalive.models import cast_model
from personalive.models.container import PersonaLiveModels
from personalive.training.data import EpochSampler, build_dataset
from personalive.training.losses import load_perceptual
from personalive.training.stages import Randomness, build_stage, clip_frames, trainable_modules
from personalive.weights import (
    OFFICIAL_FILES,
    init_training_models,
    load_models,
    network_configs,
    save_models,
)

logger = get_logger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PERSONALIVE_FILES = tuple(f for f in OFFICIAL_FILES if f not in ("vae", "image_encoder"))
STATE_FILE = "training_state.json"


def train(cfg: TrainConfig) -> Path:
    """Run one training stage of `cfg`; returns the `final` weights folder."""
    output_dir = Path(cfg.output_dir)
    source = _check_inputs(cfg)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.gradient_accumulation_steps, sync_with_dataloader=False),  # steps = micro-steps / n
        log_with="tensorboard" if cfg.report_to == "tensorboard" and is_tensorboard_available() else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        cpu=cfg.device == "cpu",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],  # e.g. the reference
    )                                                                                 # UNet's unused last layers
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError("accelerate's DeepSpeed is not supported by train.py (never run with our networks); shard "
                          "with FSDP instead: configs/accelerate/fsdp_8_gpus.yaml")
    if sharded and cfg.ema_decay is not None:
        raise ConfigError(f"ema_decay={cfg.ema_decay} cannot be used with FSDP (the average would follow each "
                          "process's shard of the weights); set ema_decay=null or launch with DDP")
    if cfg.report_to == "tensorboard" and accelerator.log_with == []:
        logger.info("tensorboard is not installed: logging to the console and metrics.jsonl only")
    device, frozen_dtype = accelerator.device, DTYPES[cfg.dtype]
    logger.info("stage %d on %s (%d process(es), mixed precision %s), training %s", cfg.stage, device,
                accelerator.num_processes, cfg.mixed_precision, ", ".join(trainable_modules(cfg)))

    # networks: trained ones in fp32 (accelerate autocasts), frozen ones in cfg.dtype
    torch.manual_seed(cfg.seed)  # the constructors' initialisation of networks that start from scratch
    models = init_training_models(cfg) if cfg.init_from is None else load_models(
        _with_weights(cfg, cfg.init_from), "cpu", torch.float32)
    trained = {OFFICIAL_FILES[f][0] for f in trainable_modules(cfg)}
    for name, model in models.items():
        cast_model(model, device, torch.float32 if name in trained else frozen_dtype)
    lpips = load_perceptual(cfg.distill) if cfg.stage == 2 else None
    if lpips is not None:
        lpips.to(device)
    stage = build_stage(models, cfg, lpips, sharded)
    params = [p for p in stage.parameters() if p.requires_grad]
    logger.info("%.2f M trainable parameters", sum(p.numel() for p in params) / 1e6)
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2),
                                  weight_decay=o.adam_weight_decay, eps=o.adam_epsilon)
    # the schedule is a function of the optimizer step alone (not prepared: accelerate's would step once per process)
    lr_scheduler = get_scheduler(o.lr_scheduler, optimizer, num_warmup_steps=o.lr_warmup_steps,
                                 num_training_steps=cfg.max_train_steps)

    num_frames, contiguous = clip_frames(cfg)
    dataset = build_dataset(cfg, num_frames, contiguous, models.image_encoder.config.image_size)
    accum = cfg.gradient_accumulation_steps
    sampler = EpochSampler(len(dataset), cfg.seed, cfg.train_batch_size, accelerator.num_processes,
                           accelerator.process_index, accum)  # this process's share of every step
    workers = cfg.data.num_workers
    dataloader = DataLoader(dataset, batch_size=cfg.train_batch_size, sampler=sampler, num_workers=workers,
                            persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    stage, optimizer = accelerator.prepare(stage, optimizer)
    params = [p for p in stage.parameters() if p.requires_grad]  # FSDP2 replaces them with sharded ones
    accelerator.register_for_checkpointing(lr_scheduler)
    if sampler.steps() == 0:
        raise ConfigError(f"{len(dataset) // cfg.data.repeats} usable videos x data.repeats={cfg.data.repeats} cannot "
                          f"fill one step of train_batch_size={cfg.train_batch_size} x {accelerator.num_processes} "
                          f"process(es) x gradient_accumulation_steps={accum}; add videos, lower them or raise "
                          "data.repeats")
    ema = None
    if cfg.ema_decay is not None:
        ema = EMAModel(params, decay=cfg.ema_decay)
        accelerator.register_for_checkpointing(ema)  # saved with, and restored from, every checkpoint
    configs = network_configs(source)

    def write(out_dir: Path) -> None:  # a weights folder of the current weights (their average, with ema_decay)
        with averaged(ema, params):  # every process gathers (FSDP shards the trained networks); the main one writes
            states = trained_states(accelerator, stage)
            if accelerator.is_main_process:
                write_weights(models, cfg, configs, source, out_dir, states)

    global_step, epoch, position = 0, 0, 0  # position: samples of the epoch's order already trained on
    resume = _resume_checkpoint(cfg, output_dir)
    if resume is not None:
        accelerator.load_state(str(resume))
        global_step, epoch, position = _read_state(resume, sampler)
        logger.info("resumed from %s at step %d (epoch %d, sample %d of %d)", resume, global_step, epoch, position,
                    len(dataset))
    metrics = output_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics, global_step)
    if accelerator.is_main_process and accelerator.log_with:
        accelerator.init_trackers(f"personalive_stage{cfg.stage}", config={
            "stage": cfg.stage, "learning_rate": o.learning_rate, "train_batch_size": cfg.train_batch_size,
            "gradient_accumulation_steps": accum, "num_processes": accelerator.num_processes,
            "max_train_steps": cfg.max_train_steps})

    saved_step = global_step if resume is not None else -1
    logs: dict[str, float] = {}
    keys: list[int] = []
    progress = tqdm(total=cfg.max_train_steps, initial=global_step, desc=f"stage {cfg.stage}", unit="step",
                    disable=not accelerator.is_local_main_process)
    while global_step < cfg.max_train_steps:
        if sampler.steps(position) == 0:  # what is left of the epoch cannot fill a step
            epoch, position = epoch + 1, 0
        sampler.set_epoch(epoch, position)
        for batch in dataloader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            rng = Randomness.of(cfg.seed, batch["key"], global_step, device)
            with accelerator.accumulate(stage):
                out = stage(batch, rng)
                accelerator.backward(out["loss"])
                if accelerator.sync_gradients and cfg.optim.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for key, value in out.items():  # mean over processes and micro-batches of this step
                mean = accelerator.gather(value.detach().float().reshape(1)).mean().item()
                logs[key] = logs.get(key, 0.0) + mean / accum
            keys += accelerator.gather(batch["key"]).tolist()
            if not accelerator.sync_gradients:
                continue
            if not accelerator.optimizer_step_was_skipped:  # fp16: a step skipped on overflow keeps its lr
                lr_scheduler.step()
            global_step += 1
            position += sampler.step_samples
            if ema is not None:
                ema.step(params)
            logs["lr"] = lr_scheduler.get_last_lr()[0]
            if not all(math.isfinite(v) for v in logs.values()):
                logger.warning("step %d: non-finite %s", global_step, logs)
            accelerator.log(logs, step=global_step)
            if accelerator.is_main_process:
                with metrics.open("a") as f:
                    f.write(json.dumps({"step": global_step, "epoch": epoch, **logs, "keys": keys}) + "\n")
            if global_step % cfg.log_every == 0:
                logger.info("step %d: %s", global_step, " ".join(f"{k}={v:.6g}" for k, v in logs.items()))
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.4g}", lr=f"{logs['lr']:.2e}")
            logs, keys = {}, []
            if global_step % cfg.checkpointing_steps == 0 or global_step == cfg.max_train_steps:
                save_checkpoint(accelerator, cfg, write, global_step, _state(global_step, epoch, position, sampler))
                saved_step = global_step
            if global_step >= cfg.max_train_steps:
                break
    progress.close()
    if saved_step != global_step:
        save_checkpoint(accelerator, cfg, write, global_step, _state(global_step, epoch, position, sampler))
    final = output_dir / "final"
    _atomic_dir(final, write, accelerator)
    if accelerator.is_main_process:
        logger.info("wrote %s (weights_dir=%s works for inference, init_from=%s for the next stage)", final, final,
                    final)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def trained_states(accelerator: Accelerator, stage: torch.nn.Module) -> dict[str, dict] | None:
    """Network name -> full state dict of each network the stage trains, on the main process (None on the others).
    Every process must call it: under FSDP it gathers the shards."""
    full = accelerator.get_state_dict(stage)  # keys "nets.<network>.<parameter>", wrappers' prefixes removed
    if not accelerator.is_main_process:
        return None
    states: dict[str, dict] = {}
    for key, value in full.items():
        net, name = key.removeprefix("nets.").split(".", 1)
        states.setdefault(net, {})[name] = value
    return states


def write_weights(models: PersonaLiveModels, cfg: TrainConfig, configs: dict, source: Path, out_dir: Path,
                  states: dict[str, dict] | None = None) -> None:
    """A complete weights folder in the official layout: the six `personalive/*.pth` files and the network configs
    from memory (`states` of the trained networks where given, in cfg.save_dtype); VAE and CLIP hard-linked (else
    copied) from `source` unless they were trained; plus the resolved `config.yaml`."""
    trained = set(trainable_modules(cfg))
    files = PERSONALIVE_FILES + tuple(f for f in ("vae", "image_encoder") if f in trained)
    save_models(models, out_dir, configs, DTYPES[cfg.save_dtype], files, states)
    for name in ("vae", "image_encoder"):
        if name in trained:
            continue
        src = find_weight_file(source, name)
        dst = out_dir / src.relative_to(source)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src.resolve(), dst)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(src, dst)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


@contextlib.contextmanager
def averaged(ema: EMAModel | None, params: list[torch.nn.Parameter]):
    """Within the block, `params` hold the moving average of `ema` (if any); their own values afterwards."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def save_checkpoint(accelerator: Accelerator, cfg: TrainConfig, write: Callable[[Path], None], step: int,
                    state: dict | None = None) -> Path:
    """`output_dir/checkpoint-<step>`: accelerate state + the weights folder `write(folder)` writes (called on
    every process) + `state` (the step and the data position) in `training_state.json`, renamed into place when
    complete. The main process writes all but accelerate's per-process RNG files."""
    output_dir = Path(cfg.output_dir)
    out, tmp = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    write(tmp)
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"global_step": step, "stage": cfg.stage, **(state or {})}) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        logger.info("saved %s", out)
        if cfg.checkpoints_total_limit is not None:
            for old in _checkpoints(output_dir)[: -cfg.checkpoints_total_limit]:
                shutil.rmtree(old)
                logger.info("removed %s (checkpoints_total_limit=%d)", old, cfg.checkpoints_total_limit)
    accelerator.wait_for_everyone()
    return out


# ----------------------------------------------------------------------------------------------------------------


def _check_inputs(cfg: TrainConfig) -> Path:
    """Fail before any work: the data folder, the weights the run starts from. Returns the folder of the VAE/CLIP."""
    if not resolve_path(cfg.data_dir).is_dir():
        raise ConfigError(f"data_dir={cfg.data_dir} is not a folder; set data_dir=<folder of talking-head videos>")
    source = resolve_path(cfg.init_from or cfg.weights_dir)
    if cfg.init_from is not None and not source.is_dir():
        raise WeightsNotFoundError(f"init_from={cfg.init_from} not found; pass the previous stage's output "
                                   "(<output_dir>/final or a checkpoint-<step> folder)")
    needed = OFFICIAL_FILES if cfg.init_from else ("base_unet", "motion_extractor", "vae", "image_encoder")
    for name in needed:
        find_weight_file(source, name)  # WeightsNotFoundError names the file and how to get it
    network_configs(source)
    return source


def _with_weights(cfg: TrainConfig, weights_dir: str) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(cfg, weights_dir=str(resolve_path(weights_dir)))


def _checkpoints(output_dir: Path) -> list[Path]:
    """Complete `checkpoint-<step>` folders, oldest first."""
    found = [p for p in output_dir.glob("checkpoint-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _resume_checkpoint(cfg: TrainConfig, output_dir: Path) -> Path | None:
    if cfg.resume_from_checkpoint is None:
        if _checkpoints(output_dir):
            logger.warning("%s has checkpoints but resume_from_checkpoint=null: starting over, they will be "
                           "overwritten", output_dir)
        return None
    if cfg.resume_from_checkpoint == "latest":
        found = _checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(cfg.resume_from_checkpoint)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"resume_from_checkpoint={path} is not a checkpoint folder (no {STATE_FILE}); use latest, "
                          "null or an <output_dir>/checkpoint-<step> folder")
    return path


def _state(step: int, epoch: int, position: int, sampler: EpochSampler) -> dict:
    """What `training_state.json` records besides the step: where the data stands, and the run's shape."""
    return {"epoch": epoch, "position": position, "samples_per_step": sampler.step_samples,
            "num_processes": sampler.num_processes, "num_samples": sampler.n}


def _read_state(checkpoint: Path, sampler: EpochSampler) -> tuple[int, int, int]:
    """(step, epoch, position) to resume from. A checkpoint without a position (written before it was recorded)
    resumes at the position the step gives with this run's step size."""
    state = json.loads((checkpoint / STATE_FILE).read_text())
    step = state["global_step"]
    if "position" not in state or state.get("num_samples") != sampler.n:
        if "position" in state:
            logger.warning("the data set changed since %s (%s samples, now %d): its epoch is restarted", checkpoint,
                           state.get("num_samples"), sampler.n)
        epoch, steps = divmod(step, sampler.steps())
        return step, epoch, steps * sampler.step_samples
    if state["samples_per_step"] != sampler.step_samples:
        logger.info("%s was written with %d samples per step (%d process(es)); this run takes %d: the epoch goes on "
                    "from its sample %d with the new step size", checkpoint, state["samples_per_step"],
                    state["num_processes"], sampler.step_samples, state["position"])
    return step, state["epoch"], state["position"]


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics of steps <= `step` (a resumed run rewrites what came after its checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line torn by a kill mid-write
            continue
    path.write_text("".join(line + "\n" for line in kept))


def _atomic_dir(out: Path, write, accelerator: Accelerator) -> None:
    """`write(folder)` on every process (the main one writes) into a temporary folder renamed to `out`."""
    tmp = out.with_name(f".{out.name}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    write(tmp)
    if accelerator.is_main_process:
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
