"""tools/cpu_scale.py, the fast version: the whole chain (random weights, stages 1-3, held-out self-reenactment
against the baselines, picture) runs end to end on a short synthetic clip, one step per stage."""

import json

import numpy as np
import pytest
import torch
from conftest import ROOT, load_tool, run_tool, write_video
from PIL import Image

from personalive.config import TrainConfig, load_config
from personalive.errors import ConfigError
from personalive.evaluation.protocol import animate, read_clip
from personalive.io.samples import sample_reference
from personalive.pipelines.build import build_engine
from personalive.training.pretraining import pretrain_vae
from personalive.weights import load_network


def sliding_frames(n: int, height: int = 64, width: int = 80) -> np.ndarray:
    """`n` uint8 frames of a random 8x8-pixel block pattern sliding one pixel per frame."""
    base = np.random.default_rng(0).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return np.stack([np.roll(base.repeat(8, 0).repeat(8, 1), t, axis=1) for t in range(n)])


def test_chain_runs_end_to_end(tmp_path):
    clip = write_video(tmp_path / "clip.mp4", sliding_frames(40))
    out = tmp_path / "out"
    argv = ["--out", str(out), "--video", str(clip), "--train-frames", "32", "--test-frames", "8",
            "--steps", "1", "1", "1", "--vae-steps", "2", "--vae-channels", "8", "8", "16", "16",
            "--log-level", "WARNING"]
    extra = write_video(tmp_path / "other.mp4", sliding_frames(40, height=72, width=96)[:, ::-1])
    assert run_tool("cpu_scale", [*argv, "--latent-channels", "8",  # 4, SD's, everywhere else in the suite
                                  "--extra-video", str(extra), "--extra-frames", "30"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["face_crops"] == "keypoints"
    # another clip trained on, never scored: its first 30 frames, at the model's size, in the training folder and
    # the VAE pre-stage
    assert result["extra_videos"] == {"extra0_other.mp4": 30} and result["vae_pretraining"]["frames"] == 32 + 30
    assert read_clip(out / "data/extra0_other.mp4")[0].shape == (30, 64, 64, 3)
    assert result["train_frames"] == 32 and result["test_frames"] == 8 and set(result["train_seconds"]) == {
        "stage1", "stage2", "stage3"}
    for name in ("reference", "untrained", "stage1", "stage2", "trained", "vae_ceiling", "reference_latent"):
        s = result["scores"][name]
        assert 0 <= s["l1"] <= 1 and -1 <= s["ssim"] <= 1 and np.isfinite(s["psnr"]), name
    assert result["scores"]["reference"]["l1"] > 0  # the clip moves
    assert result["vae_pretraining"]["block_out_channels"] == [8, 8, 16, 16] and result["latent_channels"] == 8
    for stage in (1, 2, 3):
        assert (out / f"train/stage{stage}/final/personalive/denoising_unet.pth").is_file()
    for picture in ("strip.png", "strip_frame0.png"):  # 6 frames x (driver + 4 rows), 2x
        assert Image.open(out / picture).size == (6 * 64 * 2, 5 * 64 * 2)
    assert result["scores_frame0"]["reference"]["l1"] > result["scores"]["reference"]["l1"]  # a farther pose
    assert result["scores_frame0"]["vae_ceiling"] == result["scores"]["vae_ceiling"]
    assert set(result["scores_grey"]) == {"reference", "untrained", "stage1", "stage2", "trained", "vae_ceiling",
                                          "reference_latent"}
    # the protocol on the training frames: 4 segments of 8 frames, each its own first frame as the reference
    assert [s["first_frame"] for s in result["scores_train"]] == [0, 8, 16, 24]
    for segment in result["scores_train"]:
        assert segment["reference"]["l1"] > 0 and 0 <= segment["trained"]["l1"] <= 1
        assert 0 < segment["vae_ceiling"]["l1"] <= 1

    (out / "strip.png").unlink()
    assert run_tool("cpu_scale", [*argv, "--rescore"]) == 0  # no training: the same numbers and pictures again
    again = json.loads((out / "results.json").read_text())
    assert again == result and (out / "strip.png").is_file()

    # the same VAE, other training settings (the first target near its reference in all three stages, loss
    # weighting in stage 2 only), and the held-out frames trained on too (--oracle)
    out2 = tmp_path / "out2"
    assert run_tool("cpu_scale", [*argv[2:], "--out", str(out2), "--weights-from", str(out), "--oracle",
                                  "data.reference_gap=27", "stage2:snr_gamma=5"]) == 0
    second = json.loads((out2 / "results.json").read_text())
    assert not result["oracle"] and second["oracle"]
    assert len(read_clip(out / "data/clip_train.mp4")[0]) == 32 and len(read_clip(out2 / "data/clip_train.mp4")[0]) == 40
    assert second["vae_pretraining"] == result["vae_pretraining"] and second["weights_from"] == str(out)
    assert {"data.reference_gap=27", "stage2:snr_gamma=5"} <= set(second["overrides"])
    for stage in (1, 2, 3):
        cfg = load_config(out2 / f"train/stage{stage}/final/config.yaml", schema=TrainConfig)
        assert cfg.data.reference_gap == 27 and cfg.snr_gamma == (5 if stage == 2 else None)
    vae = "random_weights/sd-vae-ft-mse/diffusion_pytorch_model.bin"
    assert (out2 / vae).read_bytes() == (out / vae).read_bytes()
    assert second["scores"]["vae_ceiling"] == result["scores"]["vae_ceiling"]

    # the same VAE, wider UNets (new random ones; the pose guider, which adds to their first block, follows)
    out3 = tmp_path / "out3"
    assert run_tool("cpu_scale", [*argv[2:], "--out", str(out3), "--weights-from", str(out),
                                  "--unet-channels", "64", "64", "64", "64"]) == 0
    third = json.loads((out3 / "results.json").read_text())
    assert result["unet_channels"] == [32, 32, 64, 64] and third["unet_channels"] == [64, 64, 64, 64]
    assert third["latent_channels"] == 8  # the new UNets take the earlier VAE's latents
    assert json.loads((out3 / "random_weights/sd-image-variations-diffusers/unet/config.json").read_text())[
        "in_channels"] == 8
    assert load_config(out3 / "train/stage3/final/config.yaml", schema=TrainConfig).model.pose_guider.out_channels == 64
    assert (out3 / vae).read_bytes() == (out / vae).read_bytes()
    assert third["scores"]["vae_ceiling"] == result["scores"]["vae_ceiling"]

    # the first run's stages 1-2 kept, stage 3 again with its settings and one more (--from-stage)
    out4 = tmp_path / "out4"
    assert run_tool("cpu_scale", [*argv[2:], "--out", str(out4), "--weights-from", str(out2), "--from-stage", "3",
                                  "--steps", "5", "5", "2", "stage3:seed=7"]) == 0
    fourth = json.loads((out4 / "results.json").read_text())
    assert fourth["from_stage"] == 3 and fourth["steps"] == [1, 1, 2] and fourth["oracle"]
    assert fourth["overrides"][-1] == "stage3:seed=7" and "stage2:snr_gamma=5" in fourth["overrides"]
    unet = "train/stage2/final/personalive/denoising_unet.pth"
    assert (out4 / unet).read_bytes() == (out2 / unet).read_bytes()
    assert fourth["scores"]["stage2"] == second["scores"]["stage2"]
    cfg = load_config(out4 / "train/stage3/final/config.yaml", schema=TrainConfig)
    assert cfg.seed == 7 and cfg.data.reference_gap == 27 and cfg.max_train_steps == 2
    with pytest.raises(SystemExit):
        load_tool("cpu_scale").main(["--out", str(tmp_path / "o5"), "--from-stage", "2"])
    with pytest.raises(SystemExit):  # the training folder is the earlier run's
        load_tool("cpu_scale").main([*argv, "--rescore", "--extra-video", str(extra)])
    with pytest.raises(SystemExit):
        load_tool("cpu_scale").main([*argv, "--extra-video", str(extra), "--extra-frames", "0"])


def test_too_short_a_clip_is_one_line(tmp_path, caplog):
    clip = write_video(tmp_path / "short.mp4", np.zeros((5, 64, 64, 3), np.uint8))
    assert run_tool("cpu_scale", ["--out", str(tmp_path / "o"), "--video", str(clip)]) == 2
    assert "has 5 frames" in caplog.text


def test_rescore_or_weights_from_without_a_run_is_one_line(tmp_path, caplog):
    clip = write_video(tmp_path / "clip.mp4", sliding_frames(12))
    argv = ["--out", str(tmp_path / "o"), "--video", str(clip), "--train-frames", "8", "--test-frames", "4"]
    assert run_tool("cpu_scale", [*argv, "--rescore"]) == 2
    assert "no finished run in" in caplog.text
    assert run_tool("cpu_scale", [*argv, "--weights-from", str(tmp_path / "none")]) == 2
    assert f"--weights-from {tmp_path / 'none'}: no finished run there" in caplog.text


def test_motion_extractor_steps_reach_the_prestage(tmp_path, caplog):
    """--motion-extractor-steps runs the package's pre-stage on the training frames (after the random weights): a
    clip without a face is one line."""
    clip = write_video(tmp_path / "clip.mp4", sliding_frames(12, width=64))
    argv = ["--out", str(tmp_path / "o"), "--video", str(clip), "--train-frames", "8", "--test-frames", "4",
            "--vae-steps", "0", "--motion-extractor-steps", "1"]
    assert run_tool("cpu_scale", argv) == 2
    assert "MediaPipe finds none in the training frames" in caplog.text
    assert (tmp_path / "o/random_weights/personalive/motion_extractor.pth").is_file()


def test_a_stage_scoped_override_names_a_stage(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_tool("cpu_scale").main(["--out", str(tmp_path), "stage4:snr_gamma=5"])
    assert "stage1:key=value" in capsys.readouterr().err


def test_latent_channels_come_from_the_earlier_run_with_weights_from(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_tool("cpu_scale").main(["--out", str(tmp_path), "--weights-from", str(tmp_path), "--latent-channels", "8"])
    assert "--weights-from run's VAE" in capsys.readouterr().err


def test_a_vae_of_three_blocks_compresses_4x_and_the_pose_guider_follows(tmp_path):
    """--vae-channels with 3 widths: a 16x16 latent for a 64x64 frame. The pose guider loses a stride-2 stage to
    match it, in the random weights, in training and in the engine that scores."""
    cpu_scale, weights, data = load_tool("cpu_scale"), tmp_path / "weights", tmp_path / "data"
    pose = cpu_scale.pose_guider_widths(3)
    assert pose == ["model.pose_guider.block_out_channels=[4,8,16]"] and cpu_scale.pose_guider_widths(4) == []
    assert run_tool("make_random_weights", ["--size", "tiny", "--out", str(weights), *pose]) == 0
    frames = sliding_frames(28, width=64)
    pretrain_vae(frames, weights, steps=2, channels=[8, 8, 16])
    assert cpu_scale.width_overrides(weights) == ["model.pose_guider.out_channels=32", *pose]
    data.mkdir()
    write_video(data / "clip.mp4", frames)
    trained, _ = cpu_scale.train_stages(data, weights, tmp_path / "train", [1, 1, 1], [])
    cfg = load_config(ROOT / "configs/prompts/tiny.yaml", [f"weights_dir={trained}", *pose])
    assert load_network(cfg, "vae").encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean.shape == (1, 4, 16, 16)
    engine = build_engine(cfg, device="cpu")
    assert animate(engine, frames[0], frames[:4]).shape == (4, 64, 64, 3)


def test_mediapipe_face_crops_are_cached_for_training(tiny_weights, tmp_path):
    """--face-crops mediapipe caches every training frame's MediaPipe box, so training crops the motion encoder's
    input around the face (the tiny random motion extractor's keypoint boxes may miss it); a clip without a face
    is one line."""
    cpu_scale, data, faceless = load_tool("cpu_scale"), tmp_path / "data", tmp_path / "faceless"
    face = np.asarray(Image.open(sample_reference()).convert("RGB").crop((100, 0, 400, 300)).resize((64, 64)))
    data.mkdir(), faceless.mkdir()
    write_video(data / "clip.mp4", np.stack([np.roll(face, t, axis=1) for t in range(6)]))
    cpu_scale.cache_face_boxes(data, tiny_weights)
    with np.load(data / ".personalive_cache/clip.mp4.npz") as z:
        boxes = z["boxes"] * 64  # (6, 4) x1, y1, x2, y2 in pixels; -1 where no face was found
    centres = (boxes[:, 0] + boxes[:, 2]) / 2
    assert (boxes >= 0).all() and (centres > 20).all() and (centres < 36).all()  # the face, moving right
    write_video(faceless / "clip.mp4", sliding_frames(6, width=64))
    with pytest.raises(ConfigError, match="use --face-crops keypoints"):
        cpu_scale.cache_face_boxes(faceless, tiny_weights)
