"""The pre-stages standing in for the pretrained VAE and motion extractor: each learns what it stands in for in a
few hundred steps, and the weights folder it writes still loads."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

from personalive import keypoints as kp
from personalive.config import load_config
from personalive.errors import ConfigError
from personalive.io.images import frames_to_tensor
from personalive.io.samples import sample_reference
from personalive.training import pretraining as P
from personalive.weights import load_network


def sliding_frames(n: int, size: int = 64) -> np.ndarray:
    """`n` uint8 frames of a random 8x8-pixel block pattern sliding one pixel per frame."""
    base = np.random.default_rng(0).integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    return np.stack([np.roll(base.repeat(8, 0).repeat(8, 1), t, axis=1) for t in range(n)])


@pytest.fixture
def weights(tiny_weights, tmp_path):
    """A copy of the tiny random weights that a pre-stage may overwrite."""
    shutil.copytree(tiny_weights, tmp_path / "weights")
    return tmp_path / "weights"


def test_vae_prestage_learns_to_reconstruct(weights):
    """A few steps already beat the random VAE's round trip; the config gets the new widths and the latent scale,
    and the weights folder still loads."""
    frames = sliding_frames(16)
    cfg = load_config(ROOT / "configs/prompts/tiny.yaml", [f"weights_dir={weights}"])

    def round_trip_l1() -> float:
        vae, x = load_network(cfg, "vae"), frames_to_tensor(frames)
        with torch.no_grad():
            y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        return float((y - x).abs().mean() / 2)

    before = round_trip_l1()
    info = P.pretrain_vae(frames, weights, steps=150, channels=[8, 8, 16, 16])
    after = round_trip_l1()
    assert after < 0.7 * before, (before, after)
    assert info["frames"] == 16 and 0 < info["l1"] < before, info
    config = json.loads((weights / "sd-vae-ft-mse/config.json").read_text())
    assert config["block_out_channels"] == [8, 8, 16, 16] and config["scaling_factor"] == info["scaling_factor"] > 0


def test_fit_steps_a_stage_and_returns_its_logs():
    """`fit` runs the stage's loss `steps` times on drawn batches and leaves it in eval mode."""
    class Stage(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(3, 3)

        def forward(self, x):
            return {"loss": (self.net(x) - x).square().mean()}

    torch.manual_seed(0)
    stage = Stage()
    logs = P.fit(stage, lambda: torch.randn(8, 3), steps=200, lr=0.05)
    first, last = (np.mean([log["loss"] for log in part]) for part in (logs[:10], logs[-10:]))
    assert len(logs) == 200 and last < 0.01 * first and not stage.training, (first, last)


def test_motion_extractor_prestage_follows_the_head(weights):
    """The random tiny extractor learns the MediaPipe head pose of each frame, so its roll follows a tilted face and
    its keypoints land on the face; the file still loads; a faceless clip is one line."""
    face = Image.open(sample_reference()).convert("RGB").crop((100, 0, 400, 300))
    tilts = np.tile([-20, -10, 0, 10, 20], 2)
    frames = np.stack([np.asarray(face.rotate(a, resample=Image.Resampling.BILINEAR).resize((64, 64))) for a in tilts])
    cfg = load_config(ROOT / "configs/prompts/tiny.yaml", [f"weights_dir={weights}"])
    points, found = P.face_keypoints(frames)
    assert points.shape == (10, 21, 3) and (found == np.arange(10)).all()
    targets = P.pose_targets(P.canonical_keypoints(torch.from_numpy(points)), torch.from_numpy(points))
    assert np.corrcoef(targets["roll"], tilts)[0, 1] < -0.99  # PIL turns counter-clockwise; roll turns the other way

    info = P.pretrain_motion_extractor(frames, cfg, steps=1200, held_out=frames[:3])
    extractor = load_network(cfg, "motion_extractor")
    with torch.no_grad():
        out = extractor(torch.from_numpy(frames).permute(0, 3, 1, 2) / 255)
    roll = kp.decode_pose(out)["roll"]
    assert (roll - targets["roll"]).abs().max() < 4, (roll, targets["roll"])  # 0 to -38 degrees
    assert info["frames"] == 10 and info["pixel_error"] < 1.0 and info["pixel_error_held_out"] < 1.0, info
    x1, y1, x2, y2 = kp.face_boxes(kp.transform_keypoints(out), 64, 64).float().mean(0).tolist()
    assert 20 < (x1 + x2) / 2 < 44 and 15 < (y1 + y2) / 2 < 45  # the face of the 64x64 crop

    with pytest.raises(ConfigError, match="MediaPipe finds none"):
        P.pretrain_motion_extractor(sliding_frames(4), cfg, steps=1)
