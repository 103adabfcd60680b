"""The streaming engine (paper Sec. 3.3-3.4): one micro-chunk of driving frames in, one animated chunk out.

The window holds `temporal_adaptive_step` micro-chunks of `temporal_window_size` frames (4 x 4), oldest first, at
timesteps 0, 333, 666, 999. One denoising-UNet call advances every chunk by one DDIM step; the oldest chunk is
then clean, leaves the window and is decoded, and a fresh noisy chunk of the reference latent enters. Before
the first driving chunk the window is filled with a motion ramp from the reference pose to the first driving
pose (12 frames), so the first three steps return those ramp frames. Historical keyframes: when the motion of
one frame (the frame leaving the window, as the official online wrapper tests; or the first frame of the newest
chunk, as the official offline script does: `keyframe_motion`) is far from the reference's and every keyframe's,
the reference UNet re-runs on the leaving frame's clean latent and its tokens join the reference attention (at
most `max_keyframes`).

`StreamStep` is the tensor-only part of a step (what `torch2trt.py` exports); `StreamEngine` around it does the
rest (reference fusion, keypoints, face crops, noise, keyframe decisions) and keeps the state. Every buffer is
bounded: a step costs the same at frame 10 and at frame 10 million. Official reference: the online wrapper
`src/wrapper.py`; the official offline script's other preparation of the same inputs (the motion-extractor input,
the face crops, the CLIP input) is made by its driver (`pipelines/offline.py`) and passed in.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor
from einops import rearrange
from PIL import Image
from torch import nn
from transformers import CLIPImageProcessorPil

from personalive import keypoints as kp
from personalive.config import PersonaLiveConfig
from personalive.models.attention_processors import ReferenceBank, install_reference_attention
from personalive.models.container import PersonaLiveModels
from personalive.pipelines.scheduler import StreamScheduler

logger = logging.getLogger(__name__)

NoiseFn = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]
Stage = Callable[[str], contextlib.AbstractContextManager]


def no_stage(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def decode_latents(decoder: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Latents (1, 4, f, h, w) in the UNets' space (the SD VAE's, scaled by its 0.18215) -> frames (f, H, W, 3) in
    [0, 1], by `decoder` (`PersonaLiveModels.decoder`).

    diffusers' convention for every autoencoder: `decode(latents / decoder.config.scaling_factor)`. The SD VAE undoes
    its 0.18215 there; TAESD (AutoencoderTiny, scaling_factor 1.0) was trained to decode the scaled SD latents
    themselves, as diffusers' pipelines give it. Both return [-1, 1] (TAESD's own [0, 1] mapped by diffusers).
    """
    frames = decoder.decode(rearrange(latents, "1 c f h w -> f c h w") / decoder.config.scaling_factor).sample
    return (frames / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


class StreamStep(nn.Module):
    """One streaming step on explicit tensors: new chunk's conditions in, one decoded chunk and the next state out.

    Args:
        models: the networks; scheduler: the per-frame DDIM; bank: the reference attention bank.
        window: frames per chunk; timesteps: (chunks * window,) per-frame timesteps, oldest chunk first.
    """

    def __init__(self, models: PersonaLiveModels, scheduler: StreamScheduler, bank: ReferenceBank, window: int,
                 timesteps: torch.Tensor):
        super().__init__()
        self.pose_guider, self.motion_encoder = models.pose_guider, models.motion_encoder
        self.denoising_unet, self.decoder = models.denoising_unet, models.decoder
        self.scheduler, self.bank, self.window = scheduler, bank, window
        self.register_buffer("timesteps", timesteps, persistent=False)
        self.stage: Stage = no_stage

    def forward(self, latents: torch.Tensor, new_latents: torch.Tensor, clip_embeds: torch.Tensor,
                motion: torch.Tensor, faces: torch.Tensor, pose: torch.Tensor, canvas: torch.Tensor,
                reference: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
        """
        Args:
            latents: (1, 4, F - w, h, w) the chunks already in the window, oldest first (F = 16).
            new_latents: (1, 4, w, h, w) the entering chunk, already noised to the last timestep.
            clip_embeds: (1, 1, d) CLIP embedding of the reference.
            motion: (1, F - w, m, d) motion tokens of the older chunks; faces: (1, 3, w, s, s) new face crops in [-1, 1].
            pose: (1, c0, F - w, h, w) PoseGuider features of the older chunks; canvas: (1, 3, w, H, W) new canvases.
            reference: explicit reference tokens per attention layer (exported graphs); default: the bank's.
        Returns:
            frames (w, H, W, 3) in [0, 1]; latents (1, 4, F - w, h, w), motion (1, F - w, m, d) and pose
            (1, c0, F - w, h, w) of the chunks that stay; motion_first (1, m, d) of the frame that left and its
            clean latent x0_first (1, 4, h, w) (for the keyframe decision).
        """
        w = self.window
        latents = torch.cat([latents, new_latents.to(latents.dtype)], dim=2)  # (1, 4, F, h, w): the window shift
        if reference is not None:
            self.bank.load(reference)
        with self.stage("motion_encoding"):
            motion = torch.cat([motion, self.motion_encoder(faces).to(motion.dtype)], dim=1)  # (1, F, m, d)
        with self.stage("pose_guider"):
            pose = torch.cat([pose, self.pose_guider(canvas).to(pose.dtype)], dim=2)  # (1, c0, F, h, w)
        with self.stage("unet"):
            eps = self.denoising_unet(latents, self.timesteps, clip_embeds, motion, pose)
            stepped, x0 = self.scheduler.step(eps, self.timesteps, latents)  # float32
        with self.stage("vae_decode"):  # the oldest chunk is clean: x0
            frames = decode_latents(self.decoder, x0[:, :, :w].to(latents.dtype))
        return (frames, stepped[:, :, w:].to(latents.dtype), motion[:, w:], pose[:, :, w:], motion[:, 0],
                x0[:, :, 0])


@dataclass
class StreamState:
    """What one stream remembers between steps; every tensor has a fixed size."""

    clip_embeds: torch.Tensor  # (1, 1, d) CLIP image embedding of the reference
    ref_latents: torch.Tensor  # (1, 4, h, w) VAE latent of the reference, scaled
    ref_image: torch.Tensor  # (3, H_ref, W_ref) reference in [-1, 1] (for its face crop)
    ref_pose_input: torch.Tensor  # (1, 3, S, S) reference in [0, 1] for the motion extractor
    ref_face: torch.Tensor | None  # (1, 3, s, s) given reference face crop in [-1, 1], else cut from keypoints
    latents: torch.Tensor  # (1, 4, F - w, h, w) the chunks at t = 0, 333, 666 before the next step
    pose: torch.Tensor | None = None  # (1, c0, F - w, h, w) their PoseGuider features
    motion: torch.Tensor | None = None  # (1, F - w, m, d) their motion tokens
    kp_ref: dict | None = None  # raw motion-extractor outputs of the reference
    kp_first: dict | None = None  # ... of the first driving frame
    motion_bank: torch.Tensor | None = None  # (k, m * d) motion of the reference and of every keyframe
    keyframe_motion: str = "leaving"  # whose motion the keyframe test reads (`PersonaLiveConfig.keyframe_motion`)
    steps: int = 0  # steps taken


class StreamEngine:
    """Streaming PersonaLive on a set of loaded models: `fuse_reference`, then `step` forever; `reset`.

    Args:
        models: the networks, already on their device in their dtype.
        cfg: the run config (window sizes, keyframe settings, attention backend, seed).
        noise_fn: every fresh noise tensor comes from here, in frame order (the padding frames of the first window,
            then each new chunk); default: a `torch.Generator` on the device, seeded by `reset`/`fuse_reference`
            with their `seed` (default `cfg.seed`).
        step_fn: what runs `StreamStep` (the PyTorch module by default; an ONNX Runtime or TensorRT session with
            the same signature and `reference` passed explicitly otherwise).
    """

    def __init__(self, models: PersonaLiveModels, cfg: PersonaLiveConfig, noise_fn: NoiseFn | None = None,
                 step_fn: Callable[..., tuple] | None = None):
        self.models, self.cfg = models, cfg
        self.device, self.dtype = models.denoising_unet.device, models.denoising_unet.dtype
        self.window, self.chunks = cfg.temporal_window_size, cfg.temporal_adaptive_step
        self.scheduler = StreamScheduler(cfg.noise_scheduler_kwargs, cfg.step_length)
        self.bank = ReferenceBank(cfg.max_keyframes)
        install_reference_attention(models.reference_unet, models.denoising_unet, self.bank, cfg.attention)
        self.vae_processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True)
        # PIL backend, as the official transformers 4.36 processor; 224 = its defaults for the official CLIP
        size = models.image_encoder.config.image_size
        self.clip_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        # per-frame timesteps of the window, oldest chunk first: [0]*4 + [333]*4 + [666]*4 + [999]*4
        timesteps = torch.tensor(cfg.timesteps[::-1], device=self.device).repeat_interleave(self.window)
        self.step_module = StreamStep(models, self.scheduler, self.bank, self.window, timesteps)
        self.step_fn = step_fn
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)
        self.noise_fn = noise_fn or self._default_noise
        self.stage: Stage = no_stage
        self.state: StreamState | None = None
        self.grad_mode: Callable[[], contextlib.AbstractContextManager] = torch.inference_mode  # torch.no_grad: benchmarks

    @property
    def num_ramp_frames(self) -> int:
        """Frames the first steps return before the first driving frame's output: 12 officially."""
        return (self.chunks - 1) * self.window

    @property
    def timesteps(self) -> torch.Tensor:
        return self.step_module.timesteps

    def reset(self, seed: int | None = None) -> None:
        """Forget the reference and the stream (`fuse_reference` must run again) and seed the noise generator with
        `seed` (default: `cfg.seed`)."""
        self.state = None
        self.bank.clear()
        self.generator.manual_seed(self.cfg.seed if seed is None else seed)

    def _default_noise(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, dtype=dtype, device=device)

    def noisy_latents(self, latents: torch.Tensor, frames: int, timesteps: torch.Tensor) -> torch.Tensor:
        """`frames` copies of `latents` (1, 4, h, w) noised at `timesteps` with fresh noise -> (1, 4, frames, h, w)."""
        noise = self.noise_fn((1, latents.shape[1], frames, *latents.shape[-2:]), self.dtype, self.device)
        copies = latents.unsqueeze(2).expand(-1, -1, frames, -1, -1)
        return self.scheduler.add_noise(copies, noise.to(self.device, self.dtype), timesteps)

    # ----------------------------------------------------------------------------------------------------------
    def fuse_reference(self, image: Image.Image, face: torch.Tensor | None = None,
                       clip_image: Image.Image | None = None, keyframe_motion: str | None = None,
                       seed: int | None = None) -> None:
        """Take a new reference portrait (any size, RGB); starts a new stream (`reset(seed)` first).

        Args:
            image: the reference portrait.
            face: optional (3, s, s) face crop in [-1, 1] for the motion encoder (offline path: mediapipe box);
                by default it is cut from the reference with the keypoint-derived box.
            clip_image: what the CLIP encoder sees (default: `image`, whose centre square the CLIP processor
                takes; the official offline script squashes the whole portrait to 224 x 224 first).
            keyframe_motion: "leaving" or "entering" (see `PersonaLiveConfig.keyframe_motion`); default: the
                config's, else "leaving" (the official online wrapper).
            seed: the stream's noise seed (default: `cfg.seed`).
        """
        if keyframe_motion not in (None, "leaving", "entering"):
            raise ValueError(f"keyframe_motion={keyframe_motion!r}; use 'leaving' or 'entering'")
        with self.grad_mode():
            self._fuse(image, face, clip_image, keyframe_motion, seed)

    def _fuse(self, image: Image.Image, face: torch.Tensor | None, clip_image: Image.Image | None,
              keyframe_motion: str | None, seed: int | None) -> None:
        self.reset(seed)
        m, cfg = self.models, self.cfg
        image = image.convert("RGB")
        with self.stage("reference"):
            pixels = self.clip_processor(images=(clip_image or image).convert("RGB"), return_tensors="pt").pixel_values
            clip = m.image_encoder(pixels.to(self.device, self.dtype)).image_embeds.unsqueeze(1)  # (1, 1, d)
            ref = self.vae_processor.preprocess(image, cfg.reference_image_height, cfg.reference_image_width)
            ref = ref.to(self.device, self.dtype)  # (1, 3, H, W) in [-1, 1]
            # the VAE's own latent scale: 0.18215 for SD's (the official code hard-codes that number)
            latents = m.vae.encode(ref).latent_dist.mean * m.vae.config.scaling_factor  # (1, 4, h, w)
            self._run_reference_unet(latents, clip)
            self.bank.set_reference()
            size = m.motion_extractor.config.input_size
            pose_input = self.vae_processor.preprocess(image, size, size).to(self.device, m.motion_extractor.dtype)
        pad = self.num_ramp_frames  # the first window: ramp chunks of the reference latent at t = 0, 333, 666
        self.state = StreamState(
            clip_embeds=clip, ref_latents=latents, ref_image=ref[0], ref_pose_input=pose_input / 2 + 0.5,
            ref_face=None if face is None else face.to(self.device).unsqueeze(0),
            keyframe_motion=keyframe_motion or cfg.keyframe_motion or "leaving",
            latents=self.noisy_latents(latents, pad, self.timesteps[:pad]),
        )

    def _run_reference_unet(self, latents: torch.Tensor, clip: torch.Tensor) -> None:
        """Write the reference UNet's self-attention inputs for `latents` (b, 4, h, w) into the bank (t = 0)."""
        t = torch.zeros(latents.shape[0], device=self.device, dtype=self.dtype)
        self.models.reference_unet(latents.to(self.dtype), t, encoder_hidden_states=clip, return_dict=False)

    # ----------------------------------------------------------------------------------------------------------
    def step(self, frames: torch.Tensor, faces: torch.Tensor | None = None,
             motion_input: torch.Tensor | None = None) -> torch.Tensor:
        """Animate one micro-chunk.

        Frames are resized and cropped in float32 and cast to the models' dtype afterwards, as officially. It runs
        under `torch.inference_mode` (as does `fuse_reference`): the stream state holds inference tensors, to read
        but not to update in place or to use in autograd outside it; the returned frames are ordinary tensors.

        Args:
            frames: (w, 3, H, W) float32 driving frames in [-1, 1], H x W = the config's height x width.
            faces: optional (w, 3, s, s) face crops in [-1, 1] (offline path); default: keypoint boxes.
            motion_input: optional (w, 3, S, S) motion-extractor input in [0, 1] (offline path: the native
                frames resized to S x S); default: `frames` resized bilinearly.
        Returns:
            (w, H, W, 3) float32 frames in [0, 1] on the CPU: the chunk given `chunks - 1` steps ago (the first
            steps return the ramp from the reference pose to the first driving pose).
        """
        with self.grad_mode():
            out = self._step(frames, faces, motion_input)
        return out.clone()  # an ordinary tensor: the caller may change it in place (inference tensors refuse)

    def _step(self, frames: torch.Tensor, faces: torch.Tensor | None,
              motion_input: torch.Tensor | None) -> torch.Tensor:
        state, m, w = self.state, self.models, self.window
        if state is None:
            raise RuntimeError("fuse_reference() must run before step()")
        if frames.shape[0] != w or frames.shape[-2:] != (self.cfg.height, self.cfg.width):
            raise ValueError(f"expected ({w}, 3, {self.cfg.height}, {self.cfg.width}) frames, got {tuple(frames.shape)}")
        frames = frames.to(self.device)  # resized and cropped in its own dtype (float32), cast afterwards
        with self.stage("motion_extraction"):
            if motion_input is None:
                size = m.motion_extractor.config.input_size
                motion_input = F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False) / 2 + 0.5
            pose_input = motion_input.to(self.device, m.motion_extractor.dtype)
            driving = m.motion_extractor(pose_input)
            if faces is None:
                boxes = kp.face_boxes(kp.transform_keypoints(driving), self.cfg.height, self.cfg.width)
                faces = kp.crop_faces(frames, boxes, m.motion_encoder.config.image_size)
            faces = faces.to(self.device, self.dtype)  # given crops may be on the CPU
        if state.kp_ref is None:
            posed = self._start(pose_input, driving, faces[:1])
        else:
            posed = kp.transform_keypoints(kp.retarget(state.kp_ref, state.kp_first, driving))  # (w, K, 3)
        canvas = kp.draw_keypoints(posed, self.cfg.height, self.cfg.width)  # (w, 3, H, W)
        new_latents = self.noisy_latents(state.ref_latents, w, self.timesteps[-1:])  # (1, 4, w, h, w) at t = 999
        args = (state.latents, new_latents, state.clip_embeds, state.motion,
                rearrange(faces, "f c h w -> 1 c f h w"), state.pose,
                rearrange(canvas.to(self.dtype), "f c h w -> 1 c f h w"))
        if self.step_fn is None:
            self.step_module.stage = self.stage
            out = self.step_module(*args)
        else:
            with self.stage("step"):
                out = self.step_fn(*args, reference=self.bank.state())
        frames_out, state.latents, state.motion, state.pose, motion_first, x0_first = out
        tested = motion_first[0] if state.keyframe_motion == "leaving" else state.motion[0, -w]  # (m, d)
        if self.is_keyframe(tested):
            self.add_keyframe(tested, x0_first)  # the leaving frame's latent, in both rules
        state.steps += 1
        return frames_out.float().cpu()

    def _start(self, pose_input: torch.Tensor, driving: dict, face0: torch.Tensor) -> torch.Tensor:
        """First chunk: keypoints of the reference and of driving frame 0, then the ramp of poses and motion from
        the reference to frame 0 (official `interpolate_kps_online` and motion interpolation).

        pose_input: (w, 3, S, S) motion-extractor input; driving: its raw outputs; face0: (1, 3, s, s) frame 0's
        face crop. Returns the chunk's retargeted keypoints (w, K, 3).
        """
        state, m, pad = self.state, self.models, self.num_ramp_frames
        with self.stage("motion_extraction"):
            state.kp_ref = m.motion_extractor(state.ref_pose_input)
            state.kp_first = m.motion_extractor(pose_input[:1])  # as official: frame 0 on its own
            posed = kp.transform_keypoints(kp.start_sets(state.kp_ref, driving, pad))  # (pad + w, K, 3)
            ramp_canvas = kp.draw_keypoints(posed[:pad], self.cfg.height, self.cfg.width)
            ref_face = state.ref_face
            if ref_face is None:  # cut with the box of ramp set 0 = the reference's own pose
                box = kp.face_boxes(posed[:1], *state.ref_image.shape[-2:])
                ref_face = kp.crop_faces(state.ref_image[None], box, m.motion_encoder.config.image_size)
        with self.stage("motion_encoding"):
            faces = torch.cat([ref_face.to(self.dtype), face0])
            tokens = m.motion_encoder(rearrange(faces, "f c h w -> 1 c f h w"))  # (1, 2, m, d): reference, frame 0
            alpha = torch.linspace(0, 1, pad + 1, device=self.device, dtype=tokens.dtype)[:-1].view(1, -1, 1, 1)
            state.motion = (1 - alpha) * tokens[:, :1] + alpha * tokens[:, 1:]  # (1, pad, m, d)
            state.motion_bank = tokens[:, 0].flatten(1).float()  # (1, m * d)
        with self.stage("pose_guider"):
            state.pose = m.pose_guider(rearrange(ramp_canvas.to(self.dtype), "f c h w -> 1 c f h w"))
        return posed[pad:]

    def is_keyframe(self, tokens: torch.Tensor) -> bool:
        """Are a frame's motion tokens (m, d) far from the reference's and every keyframe's (from step
        `keyframe_start_step`, while the bank has room)?"""
        state = self.state
        if state.steps < self.cfg.keyframe_start_step or self.bank.num_keyframes >= self.cfg.max_keyframes:
            return False
        distance = torch.cdist(tokens.flatten()[None].float(), state.motion_bank).min()
        return bool(distance > self.cfg.keyframe_threshold)

    def add_keyframe(self, tokens: torch.Tensor, x0: torch.Tensor) -> None:
        """A historical keyframe: the reference UNet runs on the clean latent `x0` (1, 4, h, w), whose tokens join the
        reference attention, and the motion tokens `tokens` (m, d) join the motion bank."""
        state = self.state
        with self.stage("keyframe"):
            self._run_reference_unet(x0, state.clip_embeds)
            self.bank.add_keyframe()
            state.motion_bank = torch.cat([state.motion_bank, tokens.flatten()[None].float()])  # (k + 1, m * d)
            logger.info("keyframe %d added at step %d", self.bank.num_keyframes, state.steps)
