"""tools/cpu_scale.py, the fast version: the whole chain (random weights, stages 1-3, held-out self-reenactment
against the baselines, picture) runs end to end on a short synthetic clip, one step per stage."""

import json

import numpy as np
from conftest import run_tool
from PIL import Image

from personalive.io.video import VideoWriter


def test_chain_runs_end_to_end(tmp_path):
    clip = tmp_path / "clip.mp4"
    base = np.random.default_rng(0).integers(0, 256, (8, 10, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    with VideoWriter(clip, 25) as writer:  # 40 frames of 64x80 sliding one pixel per frame
        for t in range(40):
            writer.write(np.roll(base, t, axis=1))
    out = tmp_path / "out"
    argv = ["--out", str(out), "--video", str(clip), "--train-frames", "32", "--test-frames", "8",
            "--steps", "1", "1", "1", "--log-level", "WARNING"]
    assert run_tool("cpu_scale", argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["train_frames"] == 32 and result["test_frames"] == 8 and set(result["train_seconds"]) == {
        "stage1", "stage2", "stage3"}
    for name in ("reference", "untrained", "trained", "vae_ceiling"):
        s = result["scores"][name]
        assert 0 <= s["l1"] <= 1 and -1 <= s["ssim"] <= 1 and np.isfinite(s["psnr"]), name
    assert result["scores"]["reference"]["l1"] > 0  # the clip moves
    for stage in (1, 2, 3):
        assert (out / f"train/stage{stage}/final/personalive/denoising_unet.pth").is_file()
    assert Image.open(out / "strip.png").size == (6 * 64 * 2, 5 * 64 * 2)  # 6 frames x (driver + 4 rows), 2x


def test_too_short_a_clip_is_one_line(tmp_path, caplog):
    clip = tmp_path / "short.mp4"
    with VideoWriter(clip, 25) as writer:
        for _ in range(5):
            writer.write(np.zeros((64, 64, 3), np.uint8))
    assert run_tool("cpu_scale", ["--out", str(tmp_path / "o"), "--video", str(clip)]) == 2
    assert "has 5 frames" in caplog.text
