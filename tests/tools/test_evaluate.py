"""tools/evaluate.py: --help, the --pred/--gt mode, a protocol with --benchmark, skip messages, bad usage."""

import json

import numpy as np
import pytest
from conftest import ROOT, run_tool, write_video

TINY = ["--config", str(ROOT / "configs/prompts/tiny.yaml"), "--log-level", "WARNING"]


def evaluate_main(argv: list[str]) -> int:
    return run_tool("evaluate", argv)


def moving_pattern(n: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, 64, 64, 3): a smooth pattern sliding one pixel per frame."""
    base = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    return np.stack([np.roll(base, t, axis=1) for t in range(n)])


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--protocol" in text and "pretrained_weights/eval" in text and "--pred" in text


@pytest.mark.parametrize("argv, message", [
    (["--pred", "a.mp4"], "--pred and --gt go together"),
    (["--protocol", "self"], "give --protocol"),
    (["--protocol", "self", "--videos", "v", "--pred", "a", "--gt", "b"], "either --protocol"),
])
def test_bad_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate_main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_pred_gt_mode_computes_what_it_can(tmp_path, tiny_weights, capsys):
    pred = write_video(tmp_path / "pred.mp4", moving_pattern(5, seed=0))
    gt = write_video(tmp_path / "gt.mp4", moving_pattern(5, seed=1))
    out = tmp_path / "out"
    argv = [*TINY, "--pred", str(pred), "--gt", str(gt), "--weights-dir", str(tiny_weights),
            "--eval-weights", str(tmp_path / "no_eval_weights"), "--out", str(out)]
    assert evaluate_main(argv) == 0
    data = json.loads((out / "table.json").read_text())
    metrics, skipped = data["results"]["self"]["metrics"], data["results"]["self"]["skipped"]
    assert set(metrics) == {"l1", "ssim", "psnr", "aed", "apd"} and metrics["l1"] > 0
    assert "alexnet-owt-7be5be79.pth" in skipped["lpips"] and "rgb_imagenet.pt" in skipped["fvd"]
    assert "| tiny |" in capsys.readouterr().out  # the table is the tool's product on stdout


def test_protocol_with_benchmark(tmp_path, tiny_weights):
    videos = tmp_path / "videos"
    write_video(videos / "clip.mp4", moving_pattern(4))
    out = tmp_path / "out"
    argv = [*TINY, "--protocol", "self", "--videos", str(videos), "--weights-dir", str(tiny_weights),
            "--eval-weights", str(tmp_path / "none"), "--face-crops", "keypoints", "--benchmark",
            "--benchmark-frames", "16", "--method", "tiny-random", "--out", str(out)]
    assert evaluate_main(argv) == 0
    data = json.loads((out / "table.json").read_text())
    assert data["efficiency"]["fps"] > 0 and data["efficiency"]["latency_s"] > 0
    assert data["results"]["self"]["frames"] == 4 and "l1" in data["results"]["self"]["metrics"]
    assert data["settings"]["definitions"]["apd"].endswith("in radians (motion extractor)")
    row = (out / "table.md").read_text().splitlines()[4]
    assert row.startswith("| tiny-random | ") and "—" in row


def test_bad_inputs_exit_2_before_loading_models(tmp_path, tiny_weights, caplog):
    videos = tmp_path / "videos"
    write_video(videos / "only.mp4", moving_pattern(2))
    argv = [*TINY, "--protocol", "cross", "--videos", str(videos), "--weights-dir", str(tmp_path / "nothing")]
    assert evaluate_main(argv) == 2  # the missing weights folder would fail later: the input check comes first
    assert "at least 2 test videos" in caplog.text
