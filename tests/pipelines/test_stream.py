"""The streaming engine on tiny random weights: shapes, determinism, noise order, keyframes, bounded state."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from personalive.pipelines.stream import StreamEngine


@pytest.fixture(scope="module")
def reference():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (80, 72, 3), dtype=np.uint8))


def driving(n_chunks: int, seed: int = 1, size: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(4, 3, size, size, generator=g) * 2 - 1 for _ in range(n_chunks)]


def run(engine, reference, chunks):
    engine.fuse_reference(reference)
    return torch.cat([engine.step(c) for c in chunks])


def test_shapes_range_and_determinism(tiny_models, tiny_cfg, reference):
    chunks = driving(5)
    a = run(StreamEngine(tiny_models, tiny_cfg), reference, chunks)
    assert a.shape == (20, 64, 64, 3) and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1 and a.std() > 0
    engine = StreamEngine(tiny_models, tiny_cfg)
    assert torch.equal(run(engine, reference, chunks), a)  # same seed, same frames: bit for bit
    assert torch.equal(run(engine, reference, chunks), a)  # fuse_reference starts over, noise included
    other = StreamEngine(tiny_models, tiny_cfg.__class__(**{**vars(tiny_cfg), "seed": 7}))
    b = run(other, reference, chunks)
    assert not torch.equal(b, a)
    engine = StreamEngine(tiny_models, tiny_cfg)  # (engines share the models: the newest one runs)
    engine.fuse_reference(reference, seed=7)  # the seed as an argument: as the config's, the config unchanged
    assert torch.equal(torch.cat([engine.step(c) for c in chunks]), b) and engine.cfg.seed == tiny_cfg.seed != 7
    assert torch.equal(run(engine, reference, chunks), a)  # the next fuse_reference is back on the config's seed


def test_noise_is_asked_in_frame_order(tiny_models, tiny_cfg, reference):
    shapes = []

    def noise_fn(shape, dtype, device):
        shapes.append(tuple(shape))
        return torch.zeros(shape, dtype=dtype, device=device)

    run(StreamEngine(tiny_models, tiny_cfg, noise_fn=noise_fn), reference, driving(3))
    assert shapes == [(1, 4, 12, 8, 8)] + [(1, 4, 4, 8, 8)] * 3


def test_first_steps_return_the_ramp_then_follow_the_driver(tiny_models, tiny_cfg, reference):
    engine = StreamEngine(tiny_models, tiny_cfg)
    assert engine.num_ramp_frames == 12
    engine.fuse_reference(reference)
    chunks = driving(4)
    outs = [engine.step(c) for c in chunks]
    # frames returned at step 3 animate the chunk given at step 0: changing that chunk changes them; changing the
    # chunk given at step 3 reaches them only through temporal attention over the window (a trace)
    engine.fuse_reference(reference)
    late = [engine.step(c) for c in chunks[:3] + [chunks[3].flip(-1)]]
    engine.fuse_reference(reference)
    early = [engine.step(c) for c in [chunks[0].flip(-1)] + chunks[1:]]
    assert all(torch.equal(a, b) for a, b in zip(outs[:3], late[:3], strict=True))
    assert (outs[3] - late[3]).abs().max() < (outs[3] - early[3]).abs().max() / 100


def test_step_before_fuse_and_wrong_sizes_fail_clearly(tiny_models, tiny_cfg, reference):
    engine = StreamEngine(tiny_models, tiny_cfg)
    with pytest.raises(RuntimeError, match="fuse_reference"):
        engine.step(driving(1)[0])
    engine.fuse_reference(reference)
    with pytest.raises(ValueError, match="expected"):
        engine.step(torch.zeros(4, 3, 32, 32))


def test_keyframes_follow_the_threshold_and_the_cap(tiny_models, tiny_cfg, reference):
    def keyframes(threshold):
        cfg = tiny_cfg.__class__(**{**vars(tiny_cfg), "keyframe_threshold": threshold})
        engine = StreamEngine(tiny_models, cfg)
        engine.fuse_reference(reference)
        counts = []
        for chunk in driving(14):
            engine.step(chunk)
            counts.append(engine.bank.num_keyframes)
        return counts, engine

    counts, engine = keyframes(-1.0)  # every frame is "far": one keyframe per step from step 9, capped at 3
    assert counts == [0] * 9 + [1, 2, 3, 3, 3]
    assert engine.state.motion_bank.shape[0] == 1 + 3
    counts, engine = keyframes(float("inf"))
    assert counts == [0] * 14 and engine.state.motion_bank.shape[0] == 1


def test_keyframe_test_uses_the_distance_to_the_bank(tiny_models, tiny_cfg, reference):
    engine = StreamEngine(tiny_models, tiny_cfg)
    engine.fuse_reference(reference)
    engine.state.steps = tiny_cfg.keyframe_start_step
    engine.state.motion_bank = torch.zeros(2, 32 * 16)
    engine.state.motion_bank[1, 0] = 100.0
    near, far = torch.zeros(32, 16), torch.zeros(32, 16)
    near[0, 0], far[0, 1] = 16.9, 17.1  # L2 distance to the nearest bank entry: 16.9 and 17.1
    assert not engine.is_keyframe(near) and engine.is_keyframe(far)
    engine.state.steps -= 1  # not before the start step
    assert not engine.is_keyframe(far)


def test_long_run_keeps_every_buffer_bounded(tiny_models, tiny_cfg, reference):
    cfg = tiny_cfg.__class__(**{**vars(tiny_cfg), "keyframe_threshold": -1.0})
    engine = StreamEngine(tiny_models, cfg)
    engine.fuse_reference(reference)
    frames = driving(1)[0]
    for _ in range(120):
        engine.step(frames)
        s = engine.state
        assert s.latents.shape[2] == s.pose.shape[2] == s.motion.shape[1] == 12
        assert s.motion_bank.shape[0] <= 1 + cfg.max_keyframes and engine.bank.num_keyframes <= cfg.max_keyframes
    name = next(iter(engine.bank.state()))
    assert engine.bank.tokens(name).shape[1] == (1 + cfg.max_keyframes) * 64


def test_reset_forgets_everything(tiny_models, tiny_cfg, reference):
    engine = StreamEngine(tiny_models, tiny_cfg)
    engine.fuse_reference(reference)
    engine.step(driving(1)[0])
    engine.reset()
    assert engine.state is None and not engine.bank.has_reference


@torch.no_grad()
def test_latent_scale_is_the_vae_configs(tiny_models, tiny_cfg, reference):
    """Encoding and decoding use the VAE's own scaling_factor (SD's VAE: 0.18215; a VAE trained here has its own)."""
    vae, engine = tiny_models.vae, StreamEngine(tiny_models, tiny_cfg)
    try:
        for scale in (1.0, 5.0):  # latents large enough that the t = 0 noise barely moves them
            vae.register_to_config(scaling_factor=scale)
            engine.fuse_reference(reference)
            mean = vae.encode(engine.state.ref_image[None]).latent_dist.mean
            torch.testing.assert_close(engine.state.ref_latents, mean * scale)
            first = engine.step(driving(1)[0])  # the ramp's first chunk: the reference latent at t = 0, decoded
            round_trip = (vae.decode(mean).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
            assert (first - round_trip).abs().mean() < 0.03, scale  # a decode at another scale: > 0.1
    finally:
        vae.register_to_config(scaling_factor=0.18215)


def test_half_precision_resizes_and_crops_in_float32_then_casts(tiny_cfg, reference, monkeypatch):
    """Official order in fp16/bf16: the driving frames are resized (motion-extractor input) and cropped (face
    crops) in float32 and cast afterwards; casting first would round the pixels before the resampling."""
    from personalive import keypoints as kp
    from personalive.weights import load_models

    models = load_models(tiny_cfg, "cpu", torch.bfloat16)
    engine = StreamEngine(models, tiny_cfg)
    seen, boxes = {}, []
    models.motion_extractor.register_forward_pre_hook(lambda m, args: seen.__setitem__("extractor", args[0]))
    models.motion_encoder.register_forward_pre_hook(lambda m, args: seen.__setitem__("encoder", args[0]))
    face_boxes = kp.face_boxes
    monkeypatch.setattr(kp, "face_boxes", lambda *a: boxes.append(face_boxes(*a)) or boxes[-1])
    chunks = driving(2)
    engine.fuse_reference(reference)
    engine.step(chunks[0])
    engine.step(chunks[1])  # a step past the start: the motion encoder sees exactly this chunk's crops
    size, crop = models.motion_extractor.config.input_size, models.motion_encoder.config.image_size
    expected = F.interpolate(chunks[1], size=(size, size), mode="bilinear", align_corners=False) / 2 + 0.5
    assert seen["extractor"].dtype == torch.bfloat16
    assert torch.equal(seen["extractor"], expected.to(torch.bfloat16))
    faces = kp.crop_faces(chunks[1], boxes[-1], crop).to(torch.bfloat16)  # (4, 3, s, s)
    assert torch.equal(seen["encoder"], faces.permute(1, 0, 2, 3).unsqueeze(0))


def test_channels_last_engine_gives_the_same_frames(tiny_cfg, reference):
    from personalive.pipelines.build import build_engine

    chunks = driving(5)
    contiguous = build_engine(dataclasses.replace(tiny_cfg, channels_last=False), "cpu")
    engine = build_engine(dataclasses.replace(tiny_cfg, channels_last=True), "cpu")
    conv = engine.models.denoising_unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert contiguous.models.denoising_unet.conv_in.weight.is_contiguous()
    # float rounding only: other convolution kernels sum in another order (the official-fixture frame tolerance)
    torch.testing.assert_close(run(engine, reference, chunks), run(contiguous, reference, chunks), rtol=0, atol=1e-4)


def test_private_members_stay_inside_the_engine():
    """Drivers (offline, non-streaming, server, tools) use the engine's public members only."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    files = [*(root / "src/personalive").rglob("*.py"), *(root / "tools").rglob("*.py"), *root.glob("*.py")]
    private = re.compile(r"\bengine\._[a-z]\w*")
    found = [f"{path.relative_to(root)}: {match}" for path in files if path.name != "stream.py"
             for match in private.findall(path.read_text())]
    assert len(files) > 20 and not found, found


def test_tiny_decoder_decodes_the_unet_latents_as_diffusers_gives_them(tiny_cfg, reference, monkeypatch):
    """vae_decoder=tiny: TAESD (diffusers' AutoencoderTiny) decodes, the SD VAE still encodes the reference. TAESD
    takes the UNets' latents as they are (diffusers' `decode(latents / vae.config.scaling_factor)` with TAESD's 1.0;
    the SD VAE's 0.18215 would scale them by 5.5), and the frames are (f, H, W, 3) in [0, 1], unlike the SD decode."""
    from diffusers import AutoencoderTiny

    from personalive.pipelines.build import build_engine

    chunks = driving(4)
    sd = run(build_engine(tiny_cfg, "cpu"), reference, chunks)
    engine = build_engine(dataclasses.replace(tiny_cfg, vae_decoder="tiny"), "cpu")
    tiny_vae = engine.models.tiny_vae
    assert isinstance(tiny_vae, AutoencoderTiny) and engine.step_module.decoder is tiny_vae
    assert tiny_vae.config.scaling_factor == 1.0
    clean, decoded = [], []
    step, decode = engine.scheduler.step, tiny_vae.decode

    def spy_step(*args):
        stepped, x0 = step(*args)
        clean.append(x0)
        return stepped, x0

    monkeypatch.setattr(engine.scheduler, "step", spy_step)
    monkeypatch.setattr(tiny_vae, "decode", lambda x, **k: decoded.append(x) or decode(x, **k))
    frames = run(engine, reference, chunks)
    mean = engine.models.vae.encode(engine.state.ref_image[None]).latent_dist.mean  # the SD VAE encodes
    torch.testing.assert_close(engine.state.ref_latents, mean * engine.models.vae.config.scaling_factor)
    assert len(decoded) == len(clean) == len(chunks)
    for x, x0 in zip(decoded, clean, strict=True):  # the oldest chunk's clean latents, not divided by 0.18215
        assert torch.equal(x, x0[0, :, :4].permute(1, 0, 2, 3))
    assert frames.shape == sd.shape == (16, 64, 64, 3) and frames.dtype == torch.float32
    assert 0 <= frames.min() and frames.max() <= 1 and frames.std() > 0
    assert (frames - sd).abs().mean() > 0.05  # another decoder
