"""inference_offline.py: official flags (booleans that really turn off), config mapping, a run, one-line errors."""

import importlib.util
import logging
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from personalive.io.samples import sample_reference
from personalive.io.video import VideoReader, VideoWriter


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("inference_offline", ROOT / "inference_offline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def captured(script, monkeypatch):
    """Run main(argv) without animating: returns what run_offline would have received."""
    calls = []
    monkeypatch.setattr(script, "run_offline", lambda cfg, ref, drv, out, options: calls.append(
        (cfg, ref, drv, out, options)))

    def main(*argv):
        assert script.main(["--config", "configs/prompts/tiny.yaml", *argv]) == 0
        return calls.pop()

    return main


@pytest.mark.parametrize("argv, attention", [
    ([], "sdpa"), (["--use_xformers"], "xformers"), (["--use_xformers", "true"], "xformers"),
    (["--use_xformers", "false"], "sdpa"), (["--use_xformers", "False"], "sdpa"), (["--use_xformers=no"], "sdpa"),
    (["--no-use_xformers"], "sdpa")])
def test_use_xformers_really_turns_off(captured, argv, attention):
    cfg, *_ = captured(*argv)
    assert cfg.attention == attention


def test_acceleration_reaches_the_options(captured):
    cfg, *_, options = captured("--acceleration", "xformers")  # build_engine then sets attention=xformers
    assert options.acceleration == "xformers" and cfg.attention == "sdpa"


def test_flags_and_overrides_reach_the_config(captured):
    cfg, ref, drv, out, options = captured(
        "--stream_gen", "false", "seed=3", "-W", "128", "-H", "96", "-L", "7", "--device", "cpu",
        "--reference_image", "r.png", "--driving_video", "d.mp4", "--output", "o.mp4", "--side_by_side",
        "keyframe_threshold=20", "--face_crops", "keypoints")
    assert (cfg.width, cfg.height, cfg.reference_image_width, cfg.reference_image_height) == (128, 96, 128, 96)
    assert (cfg.seed, cfg.device, cfg.keyframe_threshold) == (3, "cpu", 20.0)
    assert (ref, drv, out) == ("r.png", "d.mp4", "o.mp4")
    assert not options.stream and options.side_by_side and options.max_frames == 7
    assert options.face_crops == "keypoints" and options.name == "personalive_offline"
    cfg, ref, drv, out, options = captured("--seed", "9")
    assert options.stream and not options.side_by_side and options.max_frames is None and cfg.seed == 9
    assert (ref, drv, out) == (None, None, None)  # samples, default output


def test_bad_flag_values_are_refused(script):
    with pytest.raises(SystemExit) as e:
        script.main(["--stream_gen=maybe"])
    assert e.value.code == 2


def test_non_streaming_run_through_the_script(tmp_path, script, tiny_weights):
    with VideoWriter(tmp_path / "drive.mp4", 25) as writer:
        for i in range(8):
            writer.write(np.full((48, 80, 3), 20 * i, np.uint8))
    out = tmp_path / "out.mp4"
    code = script.main(["--config", "configs/prompts/tiny.yaml", f"weights_dir={tiny_weights}", "--reference_image",
                        str(sample_reference()), "--driving_video", str(tmp_path / "drive.mp4"), "--output", str(out),
                        "--stream_gen", "false", "-L", "5", "--face_crops", "keypoints", "--log-level", "WARNING"])
    assert code == 0
    with VideoReader(out) as reader:
        assert reader.rate == 25 and reader.size == (64, 64) and len(list(reader)) == 5


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, script, caplog):
    with caplog.at_level(logging.ERROR):
        code = script.main(["--config", "configs/prompts/tiny.yaml", "--reference_image", str(tmp_path / "no.png")])
    assert code == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [f"{tmp_path / 'no.png'} not found"]


def test_missing_weights_from_the_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "inference_offline.py"), "--config", str(ROOT / "configs/prompts/tiny.yaml"),
         f"weights_dir={tmp_path / 'nowhere'}", "--face_crops", "keypoints", "-L", "4"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and errors[0].endswith(
        f"weights folder {tmp_path / 'nowhere'} does not exist; fill it with `python tools/make_random_weights.py "
        f"--size tiny --out {tmp_path / 'nowhere'}`, or set weights_dir=<folder>")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "results").exists()


def test_zero_byte_weights_file_is_one_line(tmp_path, script, tiny_weights, caplog):
    import shutil

    weights = tmp_path / "w"
    shutil.copytree(tiny_weights, weights)
    (weights / "personalive/motion_encoder.pth").write_bytes(b"")
    with caplog.at_level(logging.ERROR):
        code = script.main(["--config", "configs/prompts/tiny.yaml", f"weights_dir={weights}", "-L", "4",
                            "--face_crops", "keypoints", "--output", str(tmp_path / "out.mp4")])
    assert code == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        f"{weights / 'personalive/motion_encoder.pth'}: empty file (0 bytes); re-download it"]


@pytest.mark.skipif(importlib.util.find_spec("mediapipe") is None, reason="needs mediapipe")
def test_a_run_prints_no_native_log_lines(tmp_path, tiny_weights):
    """MediaPipe's C++ logging (absl, TensorFlow Lite) stays off the console; every stderr line is ours or tqdm's."""
    from personalive.io.native_logs import NATIVE_LINE

    proc = subprocess.run(
        [sys.executable, str(ROOT / "inference_offline.py"), "--config", str(ROOT / "configs/prompts/tiny.yaml"),
         f"weights_dir={tiny_weights}", "--face_crops", "mediapipe", "-L", "4", "--output", str(tmp_path / "o.mp4")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.replace("\r", "\n").splitlines()
    assert not [line for line in lines if NATIVE_LINE.match(line.encode()) or "absl" in line or "TensorFlow" in line]
    ours = [line for line in lines if line.strip() and not line.startswith("animating")]
    assert ours and all(" INFO personalive" in line or " WARNING personalive" in line for line in ours), ours
