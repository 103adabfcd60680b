"""Pre-stages: stand-ins for the pretrained networks that no paper stage trains, for runs without their weights.

The paper's stages start from SD's VAE and LivePortrait's motion extractor and keep both frozen; a random VAE or
motion extractor cannot stand in for them (the latents would be noise, and the keypoint canvas, the pose guider's
only input, unrelated to the head). When no pretrained weights exist (the tiny CPU-scale experiment,
`tools/cpu_scale.py`), these pre-stages train the two networks on the training frames first, then write them into
the weights folder the paper stages start from:

- `AutoencoderStage` (`pretrain_vae`): the VAE as an autoencoder, L1 reconstruction plus a tiny KL term.
- `HeadPoseStage` (`pretrain_motion_extractor`): the motion extractor regressing each frame's MediaPipe head pose.

Each stage is an `nn.Module` whose submodule is the network it trains; `forward(batch)` returns a dict with `loss`
(and logged extras), as the paper stages (`training/stages.py`) do. They run in `fit`, a plain optimiser loop (AdamW,
cosine decay, one process): the frames are few and held in memory, and `training.loop.train` is the loop of the
paper stages over a video folder (datasets, accelerate, checkpoints of the official weights layout), which trains
neither network. Their augmentations and the VAE's posterior sample draw from torch's global generator, seeded by
`seed`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from personalive import keypoints as kp
from personalive.config import PersonaLiveConfig, resolve_path
from personalive.errors import ConfigError
from personalive.io.checkpoints import CONFIG_FILES, WEIGHT_FILES, save_state_dict, write_json
from personalive.io.faces import FaceCropper
from personalive.io.images import frames_to_tensor
from personalive.training.data import motion_input

logger = logging.getLogger(__name__)

SHIFT = 4  # pixels of random shift (reflect padding) in both pre-stages
LOG_EVERY = 250  # steps between log lines


class AutoencoderStage(nn.Module):
    """The VAE as an autoencoder: L1 reconstruction of the posterior sample's decoding plus 1e-6 KL (as SD's VAE,
    latents stay about unit scale)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.train()

    def forward(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """frames (b, 3, H, W) in [-1, 1] -> {"loss", "l1" (in [0, 1] frame units)}."""
        posterior = self.vae.encode(frames).latent_dist
        l1 = (self.vae.decode(posterior.sample()).sample - frames).abs().mean()
        return {"loss": l1 + 1e-6 * posterior.kl().mean(), "l1": l1.detach() / 2}


class HeadPoseStage(nn.Module):
    """The motion extractor regressing head poses: L1 on the posed keypoints (x 10), the angles (/ 10, degrees), the
    x-y translation (x 10), the scale and the canonical keypoints (x 10)."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor.train()

    def forward(self, batch: dict[str, torch.Tensor | dict]) -> dict[str, torch.Tensor]:
        """batch: "inputs" (b, 3, s, s) in [0, 1] and "targets", the decoded pose of each (`pose_targets`)."""
        out, target = kp.decode_pose(self.extractor(batch["inputs"])), batch["targets"]  # angles decoded once
        loss = (10 * (kp.transform_keypoints(out) - kp.transform_keypoints(target)).abs().mean()
                + sum((out[a] - target[a]).abs().mean() for a in ("pitch", "yaw", "roll")) / 10
                + 10 * (out["t"] - target["t"])[:, :2].abs().mean() + (out["scale"] - target["scale"]).abs().mean()
                + 10 * (out["kp"] - target["kp"]).abs().mean())
        return {"loss": loss}


def fit(stage: nn.Module, draw: Callable[[], object], steps: int, lr: float = 1e-3, name: str = "pre-stage"
        ) -> list[dict[str, float]]:
    """Train `stage` for `steps` steps on batches from `draw()` (AdamW without weight decay, cosine decay from `lr`);
    returns each step's outputs as floats."""
    opt = torch.optim.AdamW([p for p in stage.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    logs = []
    for step in range(steps):
        out = stage(draw())
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        sched.step()
        logs.append({k: v.item() for k, v in out.items()})
        if step % LOG_EVERY == 0:
            logger.info("%s step %d/%d: %s", name, step, steps, " ".join(f"{k} {v:.4f}" for k, v in logs[-1].items()))
    stage.eval()
    return logs


def pretrain_vae(frames: np.ndarray, weights: Path, steps: int, channels: list[int], batch: int = 8,
                 lr: float = 1e-3, seed: int = 0) -> dict:
    """Replace the random VAE in the weights folder `weights` by one trained as an autoencoder (`AutoencoderStage`)
    on `frames` uint8 (n, H, W, 3).

    Random flips and shifts of up to 4 px against overfitting a clip. Its config gets `block_out_channels=channels`
    (4 widths: 8x compression, as the tiny config's and SD's; 3 widths: 4x) and `scaling_factor` = 1 / std of the
    training latents, as SD's 0.18215 was chosen.
    Returns {"seconds", "frames", "l1" (mean training L1 of the last 50 steps, frames in [0, 1]), "scaling_factor"}.
    """
    from diffusers import AutoencoderKL

    config_path = weights / CONFIG_FILES["vae"]
    config = {**json.loads(config_path.read_text()), "block_out_channels": channels,
              "down_block_types": ["DownEncoderBlock2D"] * len(channels),
              "up_block_types": ["UpDecoderBlock2D"] * len(channels)}
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    x = frames_to_tensor(frames)  # (n, 3, H, W) in [-1, 1]
    pad = torch.nn.functional.pad(x, (SHIFT,) * 4, mode="reflect")

    def draw() -> torch.Tensor:
        i, dy, dx = torch.randint(len(x), (batch,)), *torch.randint(2 * SHIFT + 1, (2,)).tolist()
        b = pad[i, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]
        return torch.where(torch.rand(batch, 1, 1, 1) < 0.5, b.flip(-1), b)

    start = time.perf_counter()
    logs = fit(AutoencoderStage(vae), draw, steps, lr, "vae")
    with torch.no_grad():
        z = torch.cat([vae.encode(c).latent_dist.mean for c in x.split(16)])
    config["scaling_factor"] = round(1 / z.std().item(), 5)
    write_json(config, config_path)
    save_state_dict(vae.state_dict(), weights / WEIGHT_FILES["vae"][-1])
    return {"seconds": time.perf_counter() - start, "frames": len(x),
            "l1": float(np.mean([log["l1"] for log in logs[-50:]])), "scaling_factor": config["scaling_factor"]}


# FaceMesh landmarks standing in for the 21 implicit keypoints. Positions 1, 2, 3, 4, 12, 15 and 20 (the ones drawn
# on the pose canvas, `keypoints.DRAWN_KEYPOINTS`, which also make the keypoint face box) are the forehead, the outer
# eye corners, the nose tip, the mouth corners and the chin.
MESH_KEYPOINTS = (168, 10, 33, 263, 1, 133, 362, 70, 300, 4, 234, 454, 61, 13, 14, 291, 0, 17, 172, 397, 152)


def face_keypoints(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MediaPipe landmarks of uint8 (n, H, W, 3) frames as keypoints: (m, 21, 3) float32 in the keypoint maths'
    coordinates (x, y in [-1, 1], z on x's scale) and the indices (m,) of the frames with a face."""
    with FaceCropper() as cropper:
        found = [(i, mesh) for i, frame in enumerate(frames) if (mesh := cropper.landmarks(frame)) is not None]
    if not found:
        raise ConfigError("the motion-extractor pre-stage needs faces, and MediaPipe finds none in the training frames")
    index, meshes = zip(*found, strict=True)
    return (np.stack(meshes)[:, MESH_KEYPOINTS] * 2 - [1, 1, 0]).astype(np.float32), np.array(index)


def canonical_keypoints(points: torch.Tensor, iterations: int = 5) -> torch.Tensor:
    """Generalised Procrustes mean of (n, k, 3) keypoint sets: (k, 3), centred, RMS radius 0.5."""

    def normalised(shape: torch.Tensor) -> torch.Tensor:
        shape = shape - shape.mean(0)
        return shape * 0.5 / shape.square().sum(1).mean().sqrt()

    shape = normalised(points[0])
    for _ in range(iterations):
        scale, rot, t = kp.fit_similarity(shape, points)
        shape = normalised(((points - t[:, None]) @ rot.transpose(1, 2) / scale[:, :, None]).mean(0))
    return shape


def pose_targets(canonical: torch.Tensor, points: torch.Tensor) -> dict[str, torch.Tensor]:
    """The similarity pose of each (n, k, 3) set on `canonical`, as the motion extractor's decoded outputs."""
    scale, rot, t = kp.fit_similarity(canonical, points)
    pitch, yaw, roll = kp.rotation_angles(rot)
    return {"pitch": pitch, "yaw": yaw, "roll": roll, "t": t * torch.tensor([1.0, 1.0, 0.0]), "scale": scale,
            "kp": canonical.reshape(1, -1).expand(len(points), -1)}


def keypoint_error(extractor: nn.Module, inputs: torch.Tensor, targets: dict[str, torch.Tensor], size: int) -> float:
    """Mean distance in pixels of a `size` frame between the extractor's posed keypoints and the targets'."""
    with torch.no_grad():
        posed = kp.transform_keypoints(extractor(inputs))
    return float((posed - kp.transform_keypoints(targets))[..., :2].norm(dim=-1).mean() * size / 2)


def pretrain_motion_extractor(frames: np.ndarray, cfg: PersonaLiveConfig, steps: int,
                              held_out: np.ndarray | None = None, batch: int = 16, lr: float = 1e-3,
                              seed: int = 0) -> dict:
    """Replace the random motion extractor in `cfg.weights_dir` by one trained (`HeadPoseStage`) to give each frame
    (uint8 (n, H, W, 3)) the head pose of its MediaPipe landmarks.

    Targets: one canonical shape (the Procrustes mean of the frames' 21 landmarks, `MESH_KEYPOINTS`), and per frame
    the rotation, scale and x-y translation that fit it to the frame's landmarks (no expression term: the canvas has
    none). Augmentation: random shifts of up to 4 px (moving the translation target) and channel gains. Returns
    {"seconds", "frames" (with a face), "pixel_error" (posed keypoints, training frames) and, given `held_out`
    frames, "pixel_error_held_out"}.
    """
    from personalive.weights import load_network

    torch.manual_seed(seed)
    extractor = load_network(cfg, "motion_extractor")
    points, found = face_keypoints(frames)
    points = torch.from_numpy(points)
    canonical = canonical_keypoints(points)
    targets = pose_targets(canonical, points)
    size = extractor.config.input_size
    inputs = motion_input(frames_to_tensor(frames[found]), size)  # (m, 3, size, size) in [0, 1]
    pad = torch.nn.functional.pad(inputs, (SHIFT,) * 4, mode="reflect")

    def draw() -> dict:
        i, (dy, dx) = torch.randint(len(inputs), (batch,)), torch.randint(-SHIFT, SHIFT + 1, (2,)).tolist()
        x = pad[i, :, SHIFT + dy:SHIFT + dy + size, SHIFT + dx:SHIFT + dx + size]
        x = x * (0.7 + 0.6 * torch.rand(batch, 3, 1, 1))
        target = {k: v[i] for k, v in targets.items()}
        target["t"] = target["t"] - torch.tensor([dx, dy, 0.0]) * 2 / size  # the content moved by -(dx, dy) px
        return {"inputs": x.clamp(0, 1), "targets": target}

    start = time.perf_counter()
    fit(HeadPoseStage(extractor), draw, steps, lr, "motion extractor")
    save_state_dict(extractor.state_dict(), resolve_path(cfg.weights_dir) / WEIGHT_FILES["motion_extractor"][-1])
    result = {"seconds": time.perf_counter() - start, "frames": len(found),
              "pixel_error": keypoint_error(extractor, inputs, targets, frames.shape[2])}
    if held_out is not None:
        points, found = face_keypoints(held_out)
        result["pixel_error_held_out"] = keypoint_error(
            extractor, motion_input(frames_to_tensor(held_out[found]), size),
            pose_targets(canonical, torch.from_numpy(points)), held_out.shape[2])
    return result
