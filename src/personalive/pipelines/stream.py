"""The streaming engine (paper Sec. 3.3-3.4): one micro-chunk of driving frames in, one animated chunk out.

The window holds `temporal_adaptive_step` micro-chunks of `temporal_window_size` frames (4 x 4), oldest first, at
timesteps 0, 333, 666, 999. One denoising-UNet call advances every chunk by one DDIM step; the oldest chunk is
then clean, leaves the window and is decoded, and a fresh noisy chunk of the reference latent enters. Before
the first driving chunk the window is filled with a motion ramp from the reference pose to the first driving
pose (12 frames), so the first three steps return those ramp frames. Historical keyframes: when the motion of
the frame about to leave is far from every motion seen so far, the reference UNet re-runs on its predicted clean
latent and its tokens join the reference attention (at most `max_keyframes`).

Every buffer is bounded; a step costs the same at frame 10 and at frame 10 million. Official online wrapper:
`src/wrapper.py`; where its offline pipeline disagrees, this follows the online wrapper.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor
from einops import rearrange
from PIL import Image
from transformers import CLIPImageProcessorPil

from personalive import keypoints as kp
from personalive.config import PersonaLiveConfig
from personalive.models.attention_processors import ReferenceBank, install_reference_attention
from personalive.pipelines.scheduler import StreamScheduler
from personalive.weights import PersonaLiveModels

logger = logging.getLogger(__name__)

VAE_SCALE = 0.18215  # SD-1.x latent scale, hard-coded by the official code
NoiseFn = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


@dataclass
class StreamState:
    """What one stream remembers between steps. Piles are deques of chunks, oldest first, all bounded."""

    clip_embeds: torch.Tensor  # (1, 1, d) CLIP image embedding of the reference
    ref_latents: torch.Tensor  # (1, 4, h, w) VAE latent of the reference, scaled
    ref_image: torch.Tensor  # (3, H_ref, W_ref) reference in [-1, 1] (for its face crop)
    ref_pose_input: torch.Tensor  # (1, 3, S, S) reference in [0, 1] for the motion extractor
    ref_face: torch.Tensor | None  # (1, 3, s, s) given reference face crop in [-1, 1], else cut from keypoints
    latents: deque = field(default_factory=deque)  # chunks (1, 4, w, h, w) at t = 0, 333, 666(, 999)
    pose: deque = field(default_factory=deque)  # chunks (1, c0, w, h, w) PoseGuider features
    motion: deque = field(default_factory=deque)  # chunks (1, w, m, d) motion tokens
    kp_ref: dict | None = None  # raw motion-extractor outputs of the reference
    kp_first: dict | None = None  # ... of the first driving frame
    motion_bank: torch.Tensor | None = None  # (k, m * d) motion of the reference and of every keyframe
    steps: int = 0  # UNet calls so far


class StreamEngine:
    """Streaming PersonaLive on a set of loaded models; `fuse_reference`, then `step` forever; `reset`.

    Args:
        models: the networks, already on `device` in `dtype`.
        cfg: the run config (window sizes, keyframe settings, attention backend, seed).
        noise_fn: every fresh noise tensor comes from here, in frame order (the padding frames of the
            first window, then each new chunk); default: a `torch.Generator` seeded with `cfg.seed`.
    """

    def __init__(self, models: PersonaLiveModels, cfg: PersonaLiveConfig, noise_fn: NoiseFn | None = None):
        self.models, self.cfg = models, cfg
        self.device, self.dtype = models.denoising_unet.device, models.denoising_unet.dtype
        self.window = cfg.temporal_window_size
        self.chunks = cfg.temporal_adaptive_step
        self.scheduler = StreamScheduler(cfg.noise_scheduler_kwargs, cfg.step_length)
        self.bank = ReferenceBank(cfg.max_keyframes)
        install_reference_attention(models.reference_unet, models.denoising_unet, self.bank, cfg.attention)
        self.vae_processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True)
        # PIL backend, as the official transformers 4.36 processor; 224 = its defaults for the official CLIP
        size = models.image_encoder.config.image_size
        self.clip_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        # per-frame timesteps of the window, oldest chunk first: [0]*4 + [333]*4 + [666]*4 + [999]*4
        self.timesteps = torch.tensor(cfg.timesteps[::-1], device=self.device).repeat_interleave(self.window)
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)
        self.noise_fn = noise_fn or self._default_noise
        self.stage: Callable[[str], contextlib.AbstractContextManager] = lambda name: contextlib.nullcontext()
        self.state: StreamState | None = None

    # ----------------------------------------------------------------------------------------------------------
    @property
    def num_ramp_frames(self) -> int:
        """Frames the first steps return before the first driving frame's output: 12 officially."""
        return (self.chunks - 1) * self.window

    def reset(self) -> None:
        """Forget the reference and the stream; `fuse_reference` must run again."""
        self.state = None
        self.bank.clear()
        self.generator.manual_seed(self.cfg.seed)

    def _default_noise(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, dtype=dtype, device=device)

    def _noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self.noise_fn(shape, self.dtype, self.device).to(self.device, self.dtype)

    # ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fuse_reference(self, image: Image.Image, face: torch.Tensor | None = None) -> None:
        """Take a new reference portrait (any size, RGB); starts a new stream.

        Args:
            image: the reference portrait.
            face: optional (3, s, s) face crop in [-1, 1] for the motion encoder (offline path: mediapipe box);
                by default it is cut from the reference with the keypoint-derived box.
        """
        self.reset()
        m, cfg = self.models, self.cfg
        image = image.convert("RGB")
        with self.stage("reference"):
            pixels = self.clip_processor(images=image, return_tensors="pt").pixel_values
            clip = m.image_encoder(pixels.to(self.device, self.dtype)).image_embeds.unsqueeze(1)  # (1, 1, d)
            ref = self.vae_processor.preprocess(image, cfg.reference_image_height, cfg.reference_image_width)
            ref = ref.to(self.device, self.dtype)  # (1, 3, H, W) in [-1, 1]
            latents = m.vae.encode(ref).latent_dist.mean * VAE_SCALE  # (1, 4, h, w)
            self._run_reference_unet(latents, clip)
            self.bank.set_reference()
            size = m.motion_extractor.config.input_size
            pose_input = self.vae_processor.preprocess(image, size, size).to(self.device, m.motion_extractor.dtype)
        self.state = StreamState(
            clip_embeds=clip, ref_latents=latents, ref_image=ref[0], ref_pose_input=pose_input / 2 + 0.5,
            ref_face=None if face is None else face.to(self.device).unsqueeze(0),
        )
        # the first window: ramp chunks of the reference latent noised to t = 0, 333, 666
        pad = self.num_ramp_frames
        noise = self._noise((1, latents.shape[1], pad, *latents.shape[-2:]))
        first = self.scheduler.add_noise(latents.unsqueeze(2).expand(-1, -1, pad, -1, -1), noise, self.timesteps[:pad])
        self.state.latents.extend(first.split(self.window, dim=2))

    def _run_reference_unet(self, latents: torch.Tensor, clip: torch.Tensor) -> None:
        """Write the reference UNet's self-attention inputs for `latents` (b, 4, h, w) into the bank (t = 0)."""
        t = torch.zeros(latents.shape[0], device=self.device, dtype=self.dtype)
        self.models.reference_unet(latents.to(self.dtype), t, encoder_hidden_states=clip, return_dict=False)

    # ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, frames: torch.Tensor, faces: torch.Tensor | None = None) -> torch.Tensor:
        """Animate one micro-chunk.

        Args:
            frames: (w, 3, H, W) driving frames in [-1, 1], H x W = the config's height x width.
            faces: optional (w, 3, s, s) face crops in [-1, 1] (offline path); default: keypoint boxes.
        Returns:
            (w, H, W, 3) float32 frames in [0, 1] on the CPU: the chunk given `chunks - 1` steps ago (the first
            steps return the ramp from the reference pose to the first driving pose).
        """
        state, m = self.state, self.models
        if state is None:
            raise RuntimeError("fuse_reference() must run before step()")
        w = self.window
        if frames.shape[0] != w or frames.shape[-2:] != (self.cfg.height, self.cfg.width):
            raise ValueError(f"expected ({w}, 3, {self.cfg.height}, {self.cfg.width}) frames, got {tuple(frames.shape)}")
        first = state.kp_ref is None
        frames = frames.to(self.device, self.dtype)

        with self.stage("motion_extraction"):
            size = m.motion_extractor.config.input_size
            pose_input = F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False) / 2 + 0.5
            driving = m.motion_extractor(pose_input.to(m.motion_extractor.dtype))
            if first:
                state.kp_ref = m.motion_extractor(state.ref_pose_input)
                state.kp_first = m.motion_extractor(pose_input[:1].to(m.motion_extractor.dtype))  # as official
                sets = kp.start_sets(state.kp_ref, driving, self.num_ramp_frames)  # ramp + retargeted chunk
            else:
                sets = kp.retarget(state.kp_ref, state.kp_first, driving)
            posed = kp.transform_keypoints(sets)  # (w or pad + w, K, 3) retargeted keypoints
            canvas = kp.draw_keypoints(posed, self.cfg.height, self.cfg.width)  # (n, 3, H, W)

        with self.stage("motion_encoding"):
            crop = m.motion_encoder.config.image_size
            if faces is None:
                boxes = kp.face_boxes(kp.transform_keypoints(driving), self.cfg.height, self.cfg.width)
                faces = kp.crop_faces(frames, boxes, crop)
            faces = faces.to(self.device, m.motion_encoder.dtype)
            if first:
                ref_face = state.ref_face
                if ref_face is None:
                    ref_h, ref_w = state.ref_image.shape[-2:]
                    box = kp.face_boxes(posed[:1], ref_h, ref_w)  # ramp set 0 = the reference's own pose
                    ref_face = kp.crop_faces(state.ref_image[None], box, crop)
                faces = torch.cat([ref_face.to(faces.dtype), faces])
            tokens = m.motion_encoder(rearrange(faces, "f c h w -> 1 c f h w"))  # (1, f, m, d)
            if first:
                ref_tokens, tokens = tokens[:, :1], tokens[:, 1:]
                alpha = torch.linspace(0, 1, self.num_ramp_frames + 1, device=self.device, dtype=tokens.dtype)
                alpha = alpha[:-1].view(1, -1, 1, 1)
                ramp = (1 - alpha) * ref_tokens + alpha * tokens[:, :1]  # (1, pad, m, d)
                state.motion.extend(ramp.split(w, dim=1))
                state.motion_bank = ref_tokens.flatten(1).float()  # (1, m * d)
            state.motion.append(tokens)

        with self.stage("pose_guider"):
            pose = m.pose_guider(rearrange(canvas, "f c h w -> 1 c f h w"))  # (1, c0, n, h, w)
            state.pose.extend(pose.split(w, dim=2))

        noise = self._noise((1, state.ref_latents.shape[1], w, *state.ref_latents.shape[-2:]))
        fresh = state.ref_latents.unsqueeze(2).expand(-1, -1, w, -1, -1)
        state.latents.append(self.scheduler.add_noise(fresh, noise, self.timesteps[-1:]))

        latents = torch.cat(list(state.latents), dim=2)  # (1, 4, 16, h, w), oldest chunk first
        motion = torch.cat(list(state.motion), dim=1)  # (1, 16, m, d)
        keyframe = self._is_keyframe(motion[0, 0])

        with self.stage("unet"):
            eps = m.denoising_unet(latents, self.timesteps, state.clip_embeds, motion.to(self.dtype),
                                   torch.cat(list(state.pose), dim=2))
            latents, x0 = self.scheduler.step(eps, self.timesteps, latents)
            latents = torch.cat([x0[:, :, :w], latents[:, :, w:]], dim=2).to(self.dtype)  # oldest chunk: x0

        if keyframe:
            with self.stage("keyframe"):
                self._run_reference_unet(x0[:, :, 0], state.clip_embeds)
                self.bank.add_keyframe()
                state.motion_bank = torch.cat([state.motion_bank, motion[0, :1].flatten(1).float()])
                logger.info("keyframe %d added at step %d", self.bank.num_keyframes, state.steps)

        chunks = latents.split(w, dim=2)
        state.latents = deque(chunks[1:])
        state.pose.popleft()
        state.motion.popleft()
        state.steps += 1
        with self.stage("vae_decode"):
            return self.decode(chunks[0])

    def _is_keyframe(self, tokens: torch.Tensor) -> bool:
        """Is the frame about to leave the window (tokens (m, d)) far from the reference and every keyframe?"""
        state = self.state
        if state.steps < self.cfg.keyframe_start_step or self.bank.num_keyframes >= self.cfg.max_keyframes:
            return False
        distance = torch.cdist(tokens.flatten()[None].float(), state.motion_bank).min()
        return bool(distance > self.cfg.keyframe_threshold)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(1, 4, f, h, w) latents -> (f, H, W, 3) float32 frames in [0, 1] on the CPU."""
        images = self.models.vae.decode(rearrange(latents, "1 c f h w -> f c h w") / VAE_SCALE).sample
        return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu()
