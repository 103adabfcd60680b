"""Protocols: inputs, pairing, tables, and a tiny end-to-end run of both protocols with random metric networks."""

import json

import numpy as np
import pytest
import torch
from conftest import write_video
from eval_helpers import ResizeAligner, moving_pattern, write_tiny_arcface
from PIL import Image

from personalive.errors import ConfigError, VideoReadError
from personalive.evaluation.networks import LPIPS, ArcFace, EvalNetworks, I3DFeatures, InceptionI3D
from personalive.evaluation.protocol import (
    PAPER_ROW,
    ProtocolOptions,
    compare_videos,
    list_clips,
    markdown_table,
    pairs_for,
    plan,
    read_clip,
    run_protocols,
    write_tables,
)
from personalive.pipelines.stream import StreamEngine


def _frames_folder(folder, frames):
    folder.mkdir(parents=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i:04d}.png")
    return folder


@pytest.fixture
def videos(tmp_path):
    """Two 4-frame test videos: an mp4 and a folder of PNG frames (64 x 64, one engine step each)."""
    folder = tmp_path / "videos"
    write_video(folder / "a.mp4", moving_pattern(4, seed=0))
    _frames_folder(folder / "b", moving_pattern(4, seed=1))
    (folder / "notes.txt").write_text("not a video")
    return folder


def test_inputs_and_pairing(videos, tmp_path):
    clips = list_clips(videos)
    assert [c.name for c in clips] == ["a.mp4", "b"]
    frames, rate = read_clip(clips[1])
    assert frames.shape == (4, 64, 64, 3) and rate == 25
    assert np.array_equal(frames, moving_pattern(4, seed=1))
    assert read_clip(clips[0], 32, 48, max_frames=2)[0].shape == (2, 32, 48, 3)
    assert pairs_for("self", clips, None) == [(clips[0], clips[0]), (clips[1], clips[1])]
    assert pairs_for("cross", clips, None) == [(clips[0], clips[1]), (clips[1], clips[0])]
    refs = [tmp_path / "r.png"]
    assert pairs_for("cross", clips, refs) == [(clips[0], refs[0]), (clips[1], refs[0])]


def test_bad_inputs_fail_before_work(tmp_path, videos):
    with pytest.raises(ConfigError, match="no test videos"):
        list_clips(_frames_folder(tmp_path / "e", []))
    with pytest.raises(ConfigError, match="not a folder"):
        list_clips(tmp_path / "missing")
    one = tmp_path / "one"
    write_video(one / "a.mp4", moving_pattern(2))
    with pytest.raises(ConfigError, match="at least 2 test videos"):
        plan(one, ProtocolOptions(("self", "cross")))
    with pytest.raises(ConfigError, match="use self, cross or both"):
        plan(videos, ProtocolOptions(("selfie",)))
    with pytest.raises(ConfigError, match="no .png"):
        plan(videos, ProtocolOptions(("cross",), references=tmp_path / "e"))
    (tmp_path / "broken.mp4").write_bytes(b"nope")
    with pytest.raises(VideoReadError):
        read_clip(tmp_path / "broken.mp4")


def test_table_layout(tmp_path):
    results = {"self": {"videos": 2, "frames": 8, "metrics": {"l1": 0.1234, "fvd": 12.345}, "skipped":
                        {"lpips": "alexnet-owt-7be5be79.pth not found"}}}
    md, js = write_tables(results, tmp_path / "out", "mine", {"fps": 3.0, "latency_s": 1.5}, {"config": "x"})
    lines = md.read_text().splitlines()
    assert lines[0].split("|")[2].strip() == "Self-reenactment" and lines[0].split("|")[7].strip() == "Cross-reenactment"
    assert lines[2].startswith("| **Method** | **L1↓** | **SSIM↑** | **LPIPS↓** | **FVD↓** | **tLP↓** | **ID-SIM↑**")
    assert lines[3].startswith("| PersonaLive (paper) | 0.039 | 0.807 | 0.129 | — | — | 0.698 | 0.703 | 0.030 |")
    assert lines[4] == "| mine | 0.123 | — | — | 12.3 | — | — | — | — | — | — | 3.00 | 1.500 |"
    assert "self: LPIPS skipped: alexnet-owt-7be5be79.pth not found" in md.read_text()
    data = json.loads(js.read_text())
    assert data["table"]["mine"]["self"] == {"l1": 0.1234, "fvd": 12.345} and data["settings"] == {"config": "x"}
    assert markdown_table({"p": PAPER_ROW}).count("\n") == 4
    assert not list((tmp_path / "out").glob(".*"))  # no partial files left


@pytest.fixture
def random_nets(tmp_path, tiny_models):
    torch.manual_seed(0)
    lpips = LPIPS().eval()
    for p in lpips.parameters():
        p.data.abs_()
    return EvalNetworks(lpips=lpips, i3d=I3DFeatures(InceptionI3D().eval(), size=32, clip_len=2),
                        arcface=ArcFace(write_tiny_arcface(tmp_path / "arcface.onnx")), aligner=ResizeAligner(),
                        motion_extractor=tiny_models.motion_extractor)


def test_both_protocols_end_to_end(videos, tiny_cfg, tiny_models, random_nets, tmp_path):
    engine = StreamEngine(tiny_models, tiny_cfg)
    options = ProtocolOptions(("self", "cross"), face_crops="keypoints", save_videos=tmp_path / "saved",
                              progress=False)
    results = run_protocols(engine, videos, random_nets, options)
    self_, cross = results["self"], results["cross"]
    assert (self_["videos"], self_["frames"], cross["frames"]) == (2, 8, 8)
    assert set(self_["metrics"]) == {"l1", "ssim", "psnr", "lpips", "tlp", "fvd", "id_sim", "aed", "apd"}
    assert set(cross["metrics"]) == {"tlp", "fvd", "id_sim", "aed", "apd"}
    assert not self_["skipped"] and not cross["skipped"]
    assert 0 < self_["metrics"]["l1"] < 1 and -1 <= cross["metrics"]["id_sim"] <= 1
    assert [v["reference"] for v in cross["per_video"]] == ["b", "a.mp4"]
    assert self_["fvd_clips"] == 4  # 2 videos x 4 frames / clip_len 2
    assert read_clip(tmp_path / "saved" / "cross" / "b.mp4")[0].shape == (4, 64, 64, 3)
    md, _ = write_tables(results, tmp_path / "out", "tiny")
    row = md.read_text().splitlines()[4]
    assert row.startswith("| tiny | ") and row.count("—") == 2  # only FPS and latency are missing


def test_compare_identical_videos(tmp_path, random_nets):
    frames = moving_pattern(6)
    path = _frames_folder(tmp_path / "gt", frames)
    result = compare_videos(path, path, random_nets)
    m = result["metrics"]
    assert m["l1"] == 0 and m["ssim"] == pytest.approx(1) and m["psnr"] == 100.0
    assert m["lpips"] == 0 and m["tlp"] == 0 and m["aed"] == 0 and m["apd"] == 0
    assert "id_sim" in result["skipped"] and "fvd" in m


def test_compare_resizes_and_cuts_the_ground_truth(tmp_path, caplog):
    pred = _frames_folder(tmp_path / "pred", moving_pattern(3, size=32))
    gt = _frames_folder(tmp_path / "gt", moving_pattern(5, size=64))
    with caplog.at_level("WARNING"):
        result = compare_videos(pred, gt, EvalNetworks())
    assert "comparing the first 3" in caplog.text and result["frames"] == 3
    assert {"l1", "ssim", "psnr"} == set(result["metrics"])
    assert {"lpips", "tlp", "fvd", "aed", "apd", "id_sim"} <= set(result["skipped"])
