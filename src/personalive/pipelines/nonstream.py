"""The official non-streaming offline pipeline (`Pose2VideoPipeline.__call__`, `--stream_gen false`), for comparison.

It holds the whole clip in memory: the driving frames, the pose features and motion tokens of every frame, and one
latent tensor for the ramp, the clip and its tail (about 3 MB per 512 x 512 frame in fp16, plus the frames). Use it
to compare with the streaming engine on short clips; long videos belong to `stream.StreamEngine`.

What it shares with the engine: the models, reference fusion (`StreamEngine.fuse_reference`: CLIP, reference
latent, reference attention bank, ramp noise), the noise hook (`noisy_latents`), the per-frame DDIM scheduler, the
keypoint maths and the keyframe rule (`is_keyframe`, `add_keyframe`: from step 9, at most `max_keyframes`, distance
of the window's oldest frame to the motion bank), all through the engine's public members. What it does the
official whole-clip way:

- keypoints, pose features and motion tokens of every frame are computed up front, in batches of 256 frames;
  every frame's translation is relative to frame 0 of the whole batch (`interpolate_kps`);
- the tail that flushes the window repeats the last frame's pose and motion 12 times (the streaming path
  continues with the driving frames in reverse);
- each step slices its window out of one latent tensor of 12 + n + 12 frames.

Where the two coincide: fed the same frames, face crops and noise, every chunk but the last three (whose windows
see the tail) matches the streaming engine's output up to floating-point batch effects (the networks see batches
of different sizes). The noise for the clip is drawn up front, as officially, but through the engine's `noise_fn`
one chunk at a time in frame order, so one seed gives both paths the same noise.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from personalive import keypoints as kp
from personalive.pipelines.stream import StreamEngine, decode_latents

logger = logging.getLogger(__name__)

BATCH = 256  # frames per network call when preparing the whole clip (official)


@torch.no_grad()
def animate_clip(engine: StreamEngine, reference: Image.Image, frames: torch.Tensor,
                 faces: list[torch.Tensor | None] | None = None, ref_face: torch.Tensor | None = None
                 ) -> Iterator[torch.Tensor]:
    """Animate a whole clip with the official non-streaming algorithm.

    Args:
        engine: provides the models, config, scheduler, bank and noise; its stream state is replaced.
        reference: the reference portrait.
        frames: (n, 3, H, W) driving frames in [-1, 1] at the config's size, n >= 1.
        faces: n face crops (3, s, s) in [-1, 1]; a missing one (None, or faces=None) is cut with its keypoint box.
        ref_face: (3, s, s) reference face crop; default: its keypoint box.
    Yields:
        ceil(n / w) chunks (w, H, W, 3) float32 in [0, 1] on the CPU, in order; the last one is padded by
        repeating the last frame (the caller keeps the first n frames).
    """
    cfg, m, w, ramp = engine.cfg, engine.models, engine.window, engine.num_ramp_frames
    n = frames.shape[0]
    if n < 1 or frames.shape[1:] != (3, cfg.height, cfg.width):
        raise ValueError(f"expected (n, 3, {cfg.height}, {cfg.width}) frames with n >= 1, got {tuple(frames.shape)}")
    faces = list(faces) if faces is not None else [None] * n
    if len(faces) != n:
        raise ValueError(f"got {len(faces)} face crops for {n} frames")
    extra = -n % w  # pad the clip to whole chunks with its last frame
    frames = torch.cat([frames, frames[-1:].expand(extra, -1, -1, -1)])
    faces += faces[-1:] * extra
    n_chunks = frames.shape[0] // w

    engine.fuse_reference(reference, face=ref_face)  # bank, CLIP embedding, reference latent, ramp noise
    state, device, dtype = engine.state, engine.device, engine.dtype

    with engine.stage("motion_extraction"):
        size = m.motion_extractor.config.input_size
        state.kp_ref = m.motion_extractor(state.ref_pose_input)
        driving, crops = [], []
        for i in range(0, frames.shape[0], BATCH):
            batch = frames[i : i + BATCH].to(device, dtype)  # (b, 3, H, W)
            pose_input = F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False) / 2 + 0.5
            info = m.motion_extractor(pose_input.to(m.motion_extractor.dtype))
            driving.append(info)
            boxes = kp.face_boxes(kp.transform_keypoints(info), cfg.height, cfg.width)
            cut = kp.crop_faces(batch, boxes, m.motion_encoder.config.image_size)  # keypoint-box crops
            crops += [cut[j] if face is None else face.to(device, dtype) for j, face in enumerate(faces[i : i + BATCH])]
        driving = kp.concat_info(*driving)
        posed = kp.transform_keypoints(kp.start_sets(state.kp_ref, driving, ramp))  # (ramp + N, K, 3)
        ref_face = state.ref_face
        if ref_face is None:  # the reference's own pose (ramp set 0) gives its box, as in the engine
            box = kp.face_boxes(posed[:1], *state.ref_image.shape[-2:])
            ref_face = kp.crop_faces(state.ref_image[None], box, m.motion_encoder.config.image_size)

    with engine.stage("pose_guider"):
        pose = []
        for i in range(0, posed.shape[0], BATCH):
            canvas = kp.draw_keypoints(posed[i : i + BATCH], cfg.height, cfg.width).to(dtype)
            pose.append(m.pose_guider(rearrange(canvas, "f c h w -> 1 c f h w")))
        pose = torch.cat(pose, dim=2)  # (1, c0, ramp + N, h, w)
        pose = torch.cat([pose, pose[:, :, -1:].expand(-1, -1, ramp, -1, -1)], dim=2)  # tail: the last pose

    with engine.stage("motion_encoding"):
        tokens_ref = m.motion_encoder(rearrange(ref_face.to(dtype), "f c h w -> 1 c f h w"))  # (1, 1, m, d)
        crops = torch.stack(crops)  # (N, 3, s, s)
        tokens = torch.cat([m.motion_encoder(rearrange(crops[i : i + BATCH], "f c h w -> 1 c f h w"))
                            for i in range(0, crops.shape[0], BATCH)], dim=1)  # (1, N, m, d)
        alpha = torch.linspace(0, 1, ramp + 1, device=device, dtype=tokens.dtype)[:-1].view(1, -1, 1, 1)
        motion = torch.cat([(1 - alpha) * tokens_ref + alpha * tokens[:, :1], tokens,
                            tokens[:, -1:].expand(-1, ramp, -1, -1)], dim=1)  # (1, ramp + N + ramp, m, d)
        state.motion_bank = tokens_ref[:, 0].flatten(1).float()  # (1, m * d)
    del crops

    # latents of the ramp (drawn by fuse_reference), then of the clip and its tail at t = 999, chunk by chunk
    fresh = [engine.noisy_latents(state.ref_latents, w, engine.timesteps[-1:])
             for _ in range(n_chunks + engine.chunks - 1)]
    latents = torch.cat([state.latents, *fresh], dim=2)  # (1, 4, ramp + N + ramp, h, w)
    del fresh
    window = ramp + w
    for i in range(n_chunks + engine.chunks - 1):
        lo, hi = i * w, i * w + window
        state.steps = i
        with engine.stage("unet"):
            noisy = latents[:, :, lo:hi]
            eps = m.denoising_unet(noisy, engine.timesteps, state.clip_embeds, motion[:, lo:hi], pose[:, :, lo:hi])
            stepped, x0 = engine.scheduler.step(eps, engine.timesteps, noisy)  # float32
        latents[:, :, lo + w : hi] = stepped[:, :, w:].to(dtype)  # the oldest chunk is done: it leaves as x0
        if engine.is_keyframe(motion[0, lo]):
            engine.add_keyframe(motion[0, lo], x0[:, :, 0])
        if i >= engine.chunks - 1:  # a chunk of the clip is clean (the first steps finish the ramp)
            with engine.stage("vae_decode"):  # as StreamStep decodes
                out = decode_latents(m.decoder, x0[:, :, :w].to(dtype))
            yield out.float().cpu()
