"""`python train.py`: a run killed mid-way (a subprocess, SIGKILL) resumes at its last checkpoint with the same data
order and the same losses as an uninterrupted run; bad configs and missing data are one error and exit code 2."""

import json
import os
import signal
import subprocess
import sys

import pytest
from synthetic import ROOT, one_thread, video_dir, wait_for_checkpoint  # noqa: F401 (fixtures)

STEPS = 4


def command(weights, data, out, *overrides):
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/train/tiny_stage1.yaml"),
            f"weights_dir={weights}", f"data_dir={data}", f"output_dir={out}", f"max_train_steps={STEPS}",
            "checkpointing_steps=2", *overrides]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_killed_run_resumes_with_the_same_batches_and_losses(tiny_weights, video_dir, tmp_path):
    reference, out = tmp_path / "uninterrupted", tmp_path / "run"
    log = tmp_path / "uninterrupted.log"
    with log.open("w") as f:
        uninterrupted = subprocess.Popen(command(tiny_weights, video_dir, reference), env=env(),
                                         stdout=subprocess.DEVNULL, stderr=f)
    proc = subprocess.Popen(command(tiny_weights, video_dir, out), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_checkpoint(proc, out / "checkpoint-2")
        proc.send_signal(signal.SIGKILL)  # in the middle of step 3: no clean-up of any kind
        proc.wait()
        assert not (out / "final").exists() and not (out / f"checkpoint-{STEPS}").exists()

        resumed = subprocess.run(command(tiny_weights, video_dir, out), env=env(), capture_output=True, text=True,
                                 timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert uninterrupted.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        for p in (proc, uninterrupted):
            p.kill()
            p.wait()
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in resumed.stderr
    expected, got = metrics(reference), metrics(out)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for a, b in zip(expected, got, strict=True):
        assert a["keys"] == b["keys"], (a, b)  # the same batches, before and after the kill
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7), (a, b)
    assert (out / "final/personalive/denoising_unet.pth").is_file()


@pytest.mark.parametrize("override, message", [
    ("max_train_steps=0", "max_train_steps=0 must be at least 1"),
    ("not_a_key=1", "Key 'not_a_key' not in 'TrainConfig'"),
    ("mixed_precision=fp8", "mixed_precision='fp8' is not supported"),
    ("data_dir=/nonexistent/videos", "data_dir=/nonexistent/videos is not a folder"),
])
def test_bad_config_or_missing_data_is_exit_code_2_and_one_error(override, message, tiny_weights, video_dir, tmp_path,
                                                                 caplog):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(command(tiny_weights, video_dir, tmp_path / "out", override)[2:]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0], errors
