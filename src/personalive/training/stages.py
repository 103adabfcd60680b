"""The three training stages of the paper: what each trains and freezes, and the loss of one batch.

Every stage is an `nn.Module` whose submodules are exactly the networks it trains (what accelerate prepares, wraps
for DDP and checkpoints); the frozen networks are held aside in inference mode. `forward(batch, rng)`
returns a dict with `loss` (and logged extras); all randomness comes from `rng`, a `Randomness`: one
generator per sample, seeded by (seed, sample key), and one per optimizer step, seeded by (seed, step) and shared by
every process and micro-batch of the step. A sample therefore draws the same noise whichever process, batch or
micro-step it lands in: one process with batch 2 computes what two processes with batch 1 compute.

Conditions are made as the streaming engine makes them: the frozen motion extractor (or the data cache) gives the
keypoints of every target frame; face boxes come from the target's own keypoints (`keypoints.face_boxes`, or a
cached MediaPipe box) and `keypoints.crop_faces` cuts the motion encoder's input; the pose canvas draws the
target's keypoints retargeted onto the reference (`keypoints.retarget`: the target's rotation, the reference's
canonical keypoints and scale) with the reference as translation origin and gain 1, so the canvas puts the head
where the target frame has it (inference uses the first driving frame as origin and gain 0.5 because the driver is
another person). The reference goes through CLIP, the VAE (posterior mean, x 0.18215) and the reference UNet at
t = 0, whose self-attention inputs fill the `ReferenceBank` read by the denoising UNet.

1. `HybridMotionStage` (image-level hybrid motion training): targets are single frames; noise at a uniform
   timestep in [0, 1000), epsilon loss; the denoising UNet runs without its temporal modules.
2. `DistillationStage` (fewer-step appearance distillation): the 4-step schedule [999, 666, 333, 0] of inference,
   starting like a streaming chunk from the reference latent noised to t = 999. A number of steps k in 1..4 is
   drawn per batch; steps 1..k-1 run without gradients, step k with them; the loss is L2 between its predicted
   clean latent and the target latent, plus LPIPS on the decoded prediction when its weights are present.
3. `SlidingStage` (sliding training of the temporal module): a clip of (chunks + rollout_steps) micro-chunks. The
   window starts as the first chunks - 1 ground-truth chunks noised to the staggered timesteps [0, 333, 666]; then
   `rollout_steps` gradient-free steps of the inference streaming step slide it over the clip exactly as streaming
   does (a new chunk enters as the reference latent noised to t = 999, every chunk advances one DDIM step, the
   oldest leaves), so that the window holds the model's own outputs; they skip the VAE decode of the frame that
   leaves (`rollout_step`: inference shows it, training throws it away). Historical keyframes follow the inference
   rule (`sliding.keyframe_rule=distance`, the default): a frame leaving the window whose motion tokens are farther
   than `keyframe_threshold` from the reference's and every keyframe's (`pipelines.keyframes.far_from_bank`)
   joins the bank (reference UNet on its predicted clean latent, `ReferenceBank.add_keyframe`), up to
   `max_keyframes`; `keyframe_rule=random` instead makes the frame leaving at the last rollout step a keyframe
   with probability `keyframe_prob`. The next step runs with gradients: the denoising UNet, temporal modules on, on
   the 16-frame window at the per-frame timesteps of inference, and the loss is L2 between every frame's predicted
   clean latent and its ground-truth latent. Not simulated: the ramp from the reference pose that starts a stream,
   and so inference's `keyframe_start_step` (every rollout step tests the frame that leaves; the ramp frames it
   waits for do not exist here).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from torch import nn

from personalive import keypoints as kp
from personalive.config import TrainConfig
from personalive.errors import ConfigError
from personalive.models.attention_processors import cross_attention_layers
from personalive.models.container import PersonaLiveModels
from personalive.pipelines.keyframes import far_from_bank
from personalive.pipelines.stream import StreamEngine
from personalive.training.data import motion_input, unpack_motion
from personalive.training.losses import LPIPS, mse, propagated_weights, snr_weights
from personalive.weights import OFFICIAL_FILES

logger = logging.getLogger(__name__)

# what each paper stage trains (official file names; "denoising_unet" = its 2-D layers and motion modules)
STAGE_MODULES: dict[int, tuple[str, ...]] = {
    1: ("reference_unet", "denoising_unet", "pose_guider", "motion_encoder"),
    2: ("reference_unet", "denoising_unet"),
    3: ("temporal_module",),
}
VAE_CHUNK = 8  # frames per VAE encoder call


def seeded_generator(device: torch.device, *entropy: int) -> torch.Generator:
    """A torch generator on `device` seeded from the integers `entropy` (numpy's SeedSequence: distinct tuples give
    independent streams)."""
    state = int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0]) >> 1
    return torch.Generator(device).manual_seed(state)


SAMPLE_STREAM, STEP_STREAM = 1, 2  # SeedSequence tags of the two kinds of generator


@dataclass
class Randomness:
    """The randomness of one micro-batch: `samples[i]` draws sample i's noise, timesteps and coin flips, `step`
    what the whole optimizer step shares (stage 2's number of steps)."""

    samples: list[torch.Generator]
    step: torch.Generator

    @classmethod
    def of(cls, seed: int, keys: torch.Tensor, step: int, device: torch.device) -> Randomness:
        """Generators of the samples with these keys ((b,) int64) at optimizer step `step`, on `device`."""
        return cls([seeded_generator(device, seed, SAMPLE_STREAM, int(k)) for k in keys.tolist()],
                   seeded_generator(device, seed, STEP_STREAM, step))

    @property
    def device(self) -> torch.device:
        return self.step.device

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        """(b, *shape) standard normal float32, row i from sample i's generator."""
        return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in self.samples])

    def randint(self, high: int) -> torch.Tensor:
        """(b,) int64 uniform in [0, high), one per sample."""
        return torch.cat([torch.randint(0, high, (1,), generator=g, device=g.device) for g in self.samples])

    def rand(self) -> torch.Tensor:
        """(b,) float32 uniform in [0, 1), one per sample."""
        return torch.cat([torch.rand((1,), generator=g, device=g.device) for g in self.samples])


def trainable_modules(cfg: TrainConfig) -> tuple[str, ...]:
    """`cfg.trainable_modules`, or the stage's default; unknown names are a ConfigError."""
    names = tuple(cfg.trainable_modules) if cfg.trainable_modules is not None else STAGE_MODULES[cfg.stage]
    allowed = [n for n in OFFICIAL_FILES if n != "motion_extractor"]
    if "motion_extractor" in names:  # its outputs reach the model only as drawn keypoints and crop boxes
        raise ConfigError("trainable_modules: the motion extractor cannot train (no gradient reaches it); remove it")
    if not names or any(n not in allowed for n in names):
        raise ConfigError(f"trainable_modules={list(names)}: use names among {allowed}")
    return names


def set_trainable(models: PersonaLiveModels, names: tuple[str, ...]) -> dict[str, nn.Module]:
    """Freeze every network (eval mode, no gradients), then let the parameters of `names` train; returns the
    networks holding trainable parameters, in train mode."""
    models.eval()
    nets = {}
    for file in names:
        net, which = OFFICIAL_FILES[file]
        model = getattr(models, net)
        for name, param in model.named_parameters():
            if which == "all" or (".temporal_modules." in f".{name}") == (which == "temporal"):
                param.requires_grad_(True)
        for name in inert_parameters(model):
            model.get_parameter(name).requires_grad_(False)
        nets[net] = model.train()
    return nets


def inert_parameters(model: nn.Module) -> list[str]:
    """Parameters that cannot change any output: the UNets' cross-attentions attend to one token (the CLIP
    embedding), whose softmax weight is 1 whatever the query and key, so `norm2` (their only input), `to_q` and `to_k`
    get no gradient (an exact zero without the attention savings). They stay frozen, so that every trained parameter
    has optimizer state (FSDP2 loads a checkpoint only then) and none is weight-decayed for nothing."""
    names = []
    for attn2 in cross_attention_layers(model):
        for sub in (f"{attn2.removesuffix('.attn2')}.norm2", f"{attn2}.to_q", f"{attn2}.to_k"):
            names += [f"{sub}.{p}" for p, _ in model.get_submodule(sub).named_parameters()]
    return names


class TrainingStage(nn.Module):
    """Base of the stages: the trained networks as submodules, the rest aside; shared condition making.

    Args:
        models: every network, already on the training device (trained ones in fp32, frozen ones in `cfg.dtype`).
        cfg: the run config. lpips: the perceptual loss (stage 2), or None.
        sharded: trained under FSDP (see `forward`).
    """

    def __init__(self, models: PersonaLiveModels, cfg: TrainConfig, lpips: LPIPS | None = None,
                 sharded: bool = False):
        super().__init__()
        self.sharded, self._dangling = sharded, []
        self.trainable = trainable_modules(cfg)
        self.nets = nn.ModuleDict(set_trainable(models, self.trainable))
        self.models, self.cfg = models, cfg  # a dataclass, not a submodule: frozen networks stay out of DDP
        self.engine = StreamEngine(models, cfg)  # installs reference attention; its bank, scheduler and timesteps
        self.bank, self.scheduler = self.engine.bank, self.engine.scheduler
        self.temporal = cfg.stage == 3 or "temporal_module" in self.trainable
        self.__dict__["lpips"] = lpips  # frozen, not checkpointed
        if cfg.gradient_checkpointing:
            for name in ("reference_unet", "denoising_unet"):
                if name in self.nets:
                    self.nets[name].enable_gradient_checkpointing()

    def forward(self, batch: dict, rng: Randomness) -> dict[str, torch.Tensor]:
        """`losses(batch, rng)`. Sharded, the loss also takes 0 x the reference UNet's output: its last transformer
        block gets gradients only through the bank (its LN1 output), and FSDP fails on a wrapped block whose
        output is not in the loss's graph (DDP's find_unused_parameters covers it)."""
        self._dangling.clear()
        out = self.losses(batch, rng)
        if self._dangling:
            out["loss"] = out["loss"] + 0 * sum(t.float().sum() for t in self._dangling)
            self._dangling.clear()
        return out

    def losses(self, batch: dict, rng: Randomness) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def snr_weights(self, t: torch.Tensor, target: str) -> torch.Tensor | None:
        """Min-SNR-gamma loss weights at timesteps t (`cfg.snr_gamma`), or None (unweighted)."""
        return snr_weights(self.scheduler.ddim, t, self.cfg.snr_gamma, target)

    def trains(self, net: str) -> bool:
        return net in self.nets and any(p.requires_grad for p in self.nets[net].parameters())

    def grad(self, net: str) -> contextlib.AbstractContextManager:
        return torch.set_grad_enabled(torch.is_grad_enabled() and self.trains(net))

    @property
    def device(self) -> torch.device:
        return self.models.denoising_unet.device

    # ----------------------------------------------------------------------------------------------------------
    def reference(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP embeddings (b, 1, d) and VAE latents (b, 4, h, w) of the references; fills the bank (reference
        UNet at t = 0, with gradients when it trains)."""
        m = self.models
        with self.grad("image_encoder"):
            clip = m.image_encoder(batch["ref_clip"].to(m.image_encoder.dtype)).image_embeds.unsqueeze(1)
        latents = self.encode(batch["ref_image"][:, None])[:, :, 0]  # (b, 4, h, w)
        self.bank.clear()
        self.reference_pass(latents, clip)
        self.bank.set_reference()
        return clip, latents

    def reference_pass(self, latents: torch.Tensor, clip: torch.Tensor) -> None:
        """Reference UNet on latents (b, 4, h, w) at t = 0: writes the bank (then set_reference/add_keyframe)."""
        unet = self.models.reference_unet
        with self.grad("reference_unet"):
            t = torch.zeros(latents.shape[0], device=latents.device)
            out = unet(latents.to(unet.dtype), t, encoder_hidden_states=clip, return_dict=False)[0]
            if self.sharded and out.requires_grad:
                self._dangling.append(out)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (b, f, 3, H, W) in [-1, 1] -> scaled VAE latents (b, 4, f, h, w) (posterior mean, as inference)."""
        vae = self.models.vae
        flat = rearrange(frames, "b f c h w -> (b f) c h w").to(vae.dtype)
        with self.grad("vae"):
            z = torch.cat([vae.encode(x).latent_dist.mean for x in flat.split(VAE_CHUNK)]) * vae.config.scaling_factor
        return rearrange(z, "(b f) c h w -> b c f h w", f=frames.shape[1]).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (b, 4, f, h, w) -> images ((b f), 3, H, W), about [-1, 1] (gradients flow to the latents)."""
        vae = self.models.vae
        return vae.decode(rearrange(latents, "b c f h w -> (b f) c h w").to(vae.dtype)
                          / vae.config.scaling_factor).sample

    def conditions(self, batch: dict, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Face crops (b, 3, f, s, s) in [-1, 1] and pose canvases (b, 3, f, H, W) in [0, 1] of frames
        (b, f, 3, H, W) in [-1, 1]."""
        m = self.models
        me = m.motion_extractor.config
        b, f, _, height, width = frames.shape
        flat = rearrange(frames, "b f c h w -> (b f) c h w")
        with torch.no_grad():  # keypoints, boxes and canvases are data: no gradients
            if bool(batch["cached"].all()):
                driving = unpack_motion(rearrange(batch["motion"], "b f d -> (b f) d"), me.num_bins, me.num_kp)
                ref = unpack_motion(batch["ref_motion"], me.num_bins, me.num_kp)
            else:
                dtype = m.motion_extractor.dtype
                driving = m.motion_extractor(motion_input(flat, me.input_size).to(dtype))
                ref = m.motion_extractor(batch["ref_pose"].to(dtype))
            ref = {k: v.repeat_interleave(f, dim=0) for k, v in ref.items()}  # one row per target frame
            boxes = kp.face_boxes(kp.transform_keypoints(driving), height, width)  # (b f, 4): own keypoints
            cached = rearrange(batch["face_boxes"], "b f k -> (b f) k")
            scale = torch.tensor([width, height, width, height], device=cached.device)
            boxes = torch.where(cached[:, :1] >= 0, (cached * scale).long(), boxes)
            faces = kp.crop_faces(flat, boxes, m.motion_encoder.config.image_size)
            gain = batch["driver_gain"].to(faces).repeat_interleave(f, dim=0)[:, :, None, None]  # (b f, 3, 1, 1)
            faces = ((faces + 1) * gain - 1).clamp(-1, 1)  # a gain on the [0, 1] values
            posed = kp.transform_keypoints(kp.retarget(ref, ref, driving, t_scale=1.0))
            canvas = kp.draw_keypoints(posed, height, width)
        faces, canvas = (rearrange(x, "(b f) c h w -> b c f h w", f=f) for x in (faces, canvas))
        return faces, canvas

    def motion_and_pose(self, faces: torch.Tensor, canvas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Motion tokens (b, f, m, d) and PoseGuider features (b, c0, f, h, w), with gradients where trained."""
        m = self.models
        with self.grad("motion_encoder"):
            motion = m.motion_encoder(faces)
        with self.grad("pose_guider"):
            pose = m.pose_guider(canvas)
        return motion, pose

    def noisy_reference(self, latents: torch.Tensor, frames: int, t: int, rng: Randomness) -> torch.Tensor:
        """`frames` copies of the reference latents (b, 4, h, w) noised to timestep t -> (b, 4, frames, h, w), as a
        streaming chunk enters the window."""
        b, c, h, w = latents.shape
        noise = rng.randn((c, frames, h, w))
        copies = latents.unsqueeze(2).expand(-1, -1, frames, -1, -1)
        return self.scheduler.add_noise(copies, noise, torch.full((1,), int(t), device=latents.device)).float()

    def unet(self, latents: torch.Tensor, t: torch.Tensor, clip: torch.Tensor, motion: torch.Tensor,
             pose: torch.Tensor) -> torch.Tensor:
        """Denoising UNet (b, 4, f, h, w) -> predicted noise, with gradients when any of its parameters train."""
        with self.grad("denoising_unet"):
            if torch.is_grad_enabled() and not latents.requires_grad:
                # torch 2.13 (CPU) segfaults in the backward of a GroupNorm whose affine parameters need gradients
                # but whose channels-last input does not (the first temporal module when only those train)
                latents = latents.detach().requires_grad_()
            return self.models.denoising_unet(latents, t, clip, motion, pose, temporal=self.temporal)


class HybridMotionStage(TrainingStage):
    """Stage 1: image-level hybrid motion training, epsilon loss at a uniform timestep."""

    def losses(self, batch: dict, rng: Randomness) -> dict[str, torch.Tensor]:
        frames = batch["frames"]  # (b, f, 3, H, W)
        f = frames.shape[1]
        clip, _ = self.reference(batch)
        motion, pose = self.motion_and_pose(*self.conditions(batch, frames))
        latents = self.encode(frames)  # (b, 4, f, h, w)
        noise = rng.randn(tuple(latents.shape[1:]))
        t = rng.randint(self.scheduler.ddim.config.num_train_timesteps).repeat_interleave(f)
        noisy = self.scheduler.add_noise(latents, noise, t)  # t in "(b f)" order
        eps = self.unet(noisy, t, clip, motion, pose)
        weight = self.snr_weights(t, "noise")
        return {"loss": mse(eps, noise, None if weight is None else rearrange(weight, "(b f) -> b 1 f 1 1", f=f))}


class DistillationStage(TrainingStage):
    """Stage 2: fewer-step appearance distillation on the inference schedule, loss on the clean prediction."""

    def losses(self, batch: dict, rng: Randomness) -> dict[str, torch.Tensor]:
        frames = batch["frames"]
        b, f = frames.shape[:2]
        clip, ref_latents = self.reference(batch)
        motion, pose = self.motion_and_pose(*self.conditions(batch, frames))
        target = self.encode(frames)
        timesteps = self.cfg.timesteps  # [999, 666, 333, 0]
        # one number of steps per optimizer step, the same in every process and micro-batch
        k = int(torch.randint(1, len(timesteps) + 1, (1,), generator=rng.step, device=rng.device))
        x = self.noisy_reference(ref_latents, f, timesteps[0], rng)
        for i, step in enumerate(timesteps[:k]):
            t = torch.full((b * f,), step, device=x.device)
            with torch.set_grad_enabled(torch.is_grad_enabled() and i == k - 1):  # only the last sampled step
                eps = self.unet(x, t, clip, motion, pose)
                x_prev, x0 = self.scheduler.step(eps, t, x)
            x = x_prev
        out = {"l2": mse(x0, target), "num_steps": torch.tensor(float(k), device=x.device)}
        weight = self.snr_weights(t[:1], "sample")  # one timestep for the whole batch
        out["loss"] = out["l2"] if weight is None else mse(x0, target, weight)
        pixel_weight = self.cfg.distill.pixel_weight
        if self.lpips is not None or pixel_weight:
            decoded, flat = self.decode(x0), rearrange(frames, "b f c h w -> (b f) c h w").to(x0.dtype)
        if self.lpips is not None:
            out["lpips"] = self.lpips(decoded, flat).mean()
            out["loss"] = out["loss"] + self.cfg.distill.perceptual_weight * out["lpips"]
        if pixel_weight:  # the metric's own space: the decoder's errors count as the evaluation counts them
            error = (decoded.float() - flat.float()).abs() / 2  # frames in [0, 1] units
            out["pixel_l1"] = error.mean()
            out["loss"] = out["loss"] + pixel_weight * (out["pixel_l1"] if weight is None else (error * weight).mean())
        return out


class SlidingStage(TrainingStage):
    """Stage 3: the streaming window simulated over a clip; loss on the window step that carries gradients."""

    def rollout_step(self, latents: torch.Tensor, new_latents: torch.Tensor, clip: torch.Tensor,
                     motion: torch.Tensor, faces: torch.Tensor, pose: torch.Tensor, canvas: torch.Tensor
                     ) -> tuple[torch.Tensor, ...]:
        """The inference streaming step (`StreamStep.forward`, same arguments and shapes) without its VAE decode of
        the leaving chunk, which inference shows and training would throw away. Returns latents (1, 4, F - w, h, w),
        motion (1, F - w, m, d) and pose (1, c0, F - w, h, w) of the chunks that stay, motion_first (1, m, d) and
        x0_first (1, 4, h, w) of the frame that left."""
        step = self.engine.step_module
        w, timesteps = step.window, step.timesteps
        latents = torch.cat([latents, new_latents.to(latents.dtype)], dim=2)
        motion = torch.cat([motion, self.models.motion_encoder(faces).to(motion.dtype)], dim=1)
        pose = torch.cat([pose, self.models.pose_guider(canvas).to(pose.dtype)], dim=2)
        eps = self.models.denoising_unet(latents, timesteps, clip, motion, pose)
        stepped, x0 = self.scheduler.step(eps, timesteps, latents)
        return stepped[:, :, w:].to(latents.dtype).float(), motion[:, w:], pose[:, :, w:], motion[:, 0], x0[:, :, 0]

    def reference_motion(self, batch: dict) -> torch.Tensor:
        """(1, m * d) float32: the motion tokens of the reference, as the engine makes them (face crop cut with the
        box of the reference's own keypoints): the first row of the keyframe rule's bank."""
        m, me = self.models, self.models.motion_extractor.config
        ref_image = batch["ref_image"]  # (1, 3, H_ref, W_ref) in [-1, 1]
        if bool(batch["cached"].all()):
            ref = unpack_motion(batch["ref_motion"], me.num_bins, me.num_kp)
        else:
            ref = m.motion_extractor(batch["ref_pose"].to(m.motion_extractor.dtype))
        box = kp.face_boxes(kp.transform_keypoints(ref), *ref_image.shape[-2:])
        face = kp.crop_faces(ref_image.to(m.motion_encoder.dtype), box, m.motion_encoder.config.image_size)
        return m.motion_encoder(rearrange(face, "f c h w -> 1 c f h w"))[:, 0].flatten(1).float()

    def losses(self, batch: dict, rng: Randomness) -> dict[str, torch.Tensor]:
        frames = batch["frames"]  # (1, L, 3, H, W)
        length = clip_frames(self.cfg)[0]
        if frames.shape[:2] != (1, length):
            raise ValueError(f"expected (1, {length}, 3, H, W) clips, got {tuple(frames.shape)}")
        w, rollout, sliding = self.cfg.temporal_window_size, self.cfg.sliding.rollout_steps, self.cfg.sliding
        timesteps = self.engine.timesteps  # (F,): [0]*w + [333]*w + [666]*w + [999]*w
        start = len(timesteps) - w  # frames already in the window before a step (12)
        clip, ref_latents = self.reference(batch)
        faces, canvas = self.conditions(batch, frames)
        target = self.encode(frames)  # (1, 4, L, h, w)
        coin = sliding.keyframe_rule == "random" and rollout > 0 and float(rng.rand()[0]) < sliding.keyframe_prob
        with torch.no_grad():
            noise = rng.randn(tuple(target[0, :, :start].shape))
            latents = self.scheduler.add_noise(target[:, :, :start], noise, timesteps[:start]).float()
            motion, pose = self.motion_and_pose(faces[:, :, :start], canvas[:, :, :start])
            bank = self.reference_motion(batch) if sliding.keyframe_rule == "distance" and rollout > 0 else None
            for k in range(rollout):
                new = slice(start + k * w, start + (k + 1) * w)
                latents, motion, pose, motion_first, x0_first = self.rollout_step(
                    latents, self.noisy_reference(ref_latents, w, timesteps[-1], rng), clip, motion,
                    faces[:, :, new], pose, canvas[:, :, new])
                if self.bank.num_keyframes >= self.cfg.max_keyframes:
                    continue
                if far_from_bank(motion_first[0], bank, self.cfg.keyframe_threshold) if bank is not None else \
                        coin and k == rollout - 1:  # the frame that just left becomes a historical keyframe
                    self.reference_pass(x0_first, clip)
                    self.bank.add_keyframe()
                    if bank is not None:
                        bank = torch.cat([bank, motion_first.flatten(1).float()])
        new = slice(start + rollout * w, start + (rollout + 1) * w)
        new_motion, new_pose = self.motion_and_pose(faces[:, :, new], canvas[:, :, new])
        window = torch.cat([latents, self.noisy_reference(ref_latents, w, timesteps[-1], rng)], dim=2)
        motion = torch.cat([motion, new_motion.to(motion.dtype)], dim=1)
        pose = torch.cat([pose, new_pose.to(pose.dtype)], dim=2)
        eps = self.unet(window, timesteps, clip, motion, pose)
        _, x0 = self.scheduler.step(eps, timesteps, window)
        truth = target[:, :, rollout * w: rollout * w + len(timesteps)]  # the window's frames, oldest chunk first
        out = {"l2": mse(x0, truth), "keyframes": torch.tensor(float(self.bank.num_keyframes), device=x0.device)}
        weight = self.snr_weights(timesteps, "sample")  # per frame
        if self.cfg.sliding.chunk_weighting == "propagated":
            propagated = propagated_weights(self.scheduler.ddim, timesteps, w).to(x0.device)
            weight = propagated if weight is None else weight * propagated
        out["loss"] = out["l2"] if weight is None else mse(x0, truth, weight[:, None, None])
        return out


STAGES: dict[int, type[TrainingStage]] = {1: HybridMotionStage, 2: DistillationStage, 3: SlidingStage}


def build_stage(models: PersonaLiveModels, cfg: TrainConfig, lpips: LPIPS | None = None,
                sharded: bool = False) -> TrainingStage:
    return STAGES[cfg.stage](models, cfg, lpips, sharded)


def clip_frames(cfg: TrainConfig) -> tuple[int, bool]:
    """(target frames per sample, contiguous clip?) that the stage's dataset must give. Stage 3: (chunks - 1) start
    chunks + `rollout_steps` chunks + the trained step's new chunk."""
    if cfg.stage == 3:
        return (cfg.temporal_adaptive_step + cfg.sliding.rollout_steps) * cfg.temporal_window_size, True
    return cfg.data.frames_per_sample, False
