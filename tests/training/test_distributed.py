"""Training with several processes (`accelerate launch`, torchrun + gloo on the CPU) against one process at the same
global batch: the same samples, the same logged losses and the same final weights to float rounding; each sample
once per epoch across the processes; one writer; a run killed mid-way resumed with another number of processes."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from synthetic import ROOT, one_thread, video_dir, wait_for_checkpoint  # noqa: F401 (fixtures)

from personalive.io.checkpoints import find_weight_file, load_state_dict

pytestmark = pytest.mark.slow
FSDP_ON_CPU = Path(__file__).with_name("fsdp_on_cpu.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(processes, stage, weights, data, out, *overrides, sharded=False):
    """`python train.py` for one process, else `accelerate launch --multi_gpu` (torchrun; the config's device=cpu
    makes it gloo on the CPU: accelerate's own `--cpu` flag runs one process unless given an MPI host file);
    sharded: with configs/accelerate/fsdp_8_gpus.yaml, through fsdp_on_cpu.py."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port())] if processes > 1 else [sys.executable]
    if sharded:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(ROOT / "configs/accelerate/fsdp_8_gpus.yaml"), "--num_processes", str(processes),
                    "--main_process_port", str(free_port()), str(FSDP_ON_CPU)]
    init = [f"init_from={weights}"] if stage > 1 else []
    return [*launcher, str(ROOT / "train.py"), "--config", str(ROOT / f"configs/train/tiny_stage{stage}.yaml"),
            f"weights_dir={weights}", f"data_dir={data}", f"output_dir={out}", *init, "data.repeats=2", *overrides]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def run(cmd):
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(folder):
    return {name: load_state_dict(find_weight_file(folder, name))
            for name in ("denoising_unet", "reference_unet", "motion_encoder", "pose_guider")}


def assert_same_run(expected, got, steps):
    a, b = metrics(expected), metrics(got)
    assert [m["step"] for m in b] == list(range(1, steps + 1))
    for x, y in zip(a, b, strict=True):
        assert x["keys"] == y["keys"] and x["epoch"] == y["epoch"], (x, y)  # the same samples, in the same order
        # step 1 differs by rounding only; later steps start from weights that differ by rounding, which the
        # stage-3 loss (in the thousands, from the t = 999 chunk) magnifies
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5 if x["step"] == 1 else 1e-3, abs=1e-6), (x, y)
        assert y["lr"] == x["lr"]
    wa, wb = weights(expected / "final"), weights(got / "final")
    for name in wa:
        for key in wa[name]:
            if ".running_" in key or key.endswith("num_batches_tracked"):  # BatchNorm statistics: the main process's
                continue
            # within a third of one step's size (lr = 1e-4): the few weights whose gradients are near 0 take the
            # rounding of the gradient sums (an all-reduce against an accumulation) through AdamW's normalisation
            torch.testing.assert_close(wb[name][key], wa[name][key], rtol=1e-4, atol=3e-5, msg=f"{name}.{key}")


def assert_once_per_epoch(out, samples):
    by_epoch = {}
    for m in metrics(out):
        by_epoch.setdefault(m["epoch"], []).extend(m["keys"])
    assert len(by_epoch) >= 2  # the runs cross an epoch
    for epoch, keys in by_epoch.items():
        assert len(keys) == len(set(keys)) and all(epoch * samples <= k < (epoch + 1) * samples for k in keys)


def files(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


@pytest.mark.parametrize("stage", [1, 3])
def test_two_processes_equal_one_at_the_same_global_batch(stage, tiny_weights, video_dir, tmp_path):
    """2 processes x batch 1 (2 loader workers each) = 1 process x batch 1 x 2 accumulated micro-batches (the motion encoder's BatchNorms
    normalise over each process's batch, as over each micro-batch). 3 videos x repeats 2 = 6 samples: 3 steps an
    epoch, so 4 steps cross one. AdamW's first steps move a weight by about lr x sign(gradient), so a weight whose
    gradient is at rounding level moves by +-lr on either side of a rounding difference: adam_epsilon=1e-3 makes
    small gradients' steps proportional to them, so that the comparison is one of gradients, not of signs of noise."""
    steps = ["max_train_steps=4", "checkpointing_steps=2", "train_batch_size=1", "optim.adam_epsilon=1e-3"]
    extra = ["sliding.rollout_steps=1"] if stage == 3 else []
    run(command(1, stage, tiny_weights, video_dir, tmp_path / "one", *steps, *extra, "gradient_accumulation_steps=2"))
    two = run(command(2, stage, tiny_weights, video_dir, tmp_path / "two", *steps, *extra, "data.num_workers=2"))
    assert "(2 process(es)" in two.stderr
    assert_same_run(tmp_path / "one", tmp_path / "two", 4)
    assert_once_per_epoch(tmp_path / "two", 6)
    # one writer: the same files as one process, plus the second process's RNG state in each checkpoint
    extra_files = {f"checkpoint-{s}/random_states_1.pkl" for s in (2, 4)}
    assert set(files(tmp_path / "two")) - set(files(tmp_path / "one")) == extra_files
    assert set(files(tmp_path / "one")) <= set(files(tmp_path / "two"))


def test_a_killed_run_resumes_with_another_number_of_processes(tiny_weights, video_dir, tmp_path):
    """Killed (SIGKILL to the launcher and its workers) after checkpoint-2 of a 2-process run, resumed by one process at
    the same global batch: the same samples and, to float rounding, the same losses and weights as an uninterrupted
    2-process run. Resumed with another global batch, the epoch goes on from the sample it had reached."""
    steps = ["max_train_steps=6", "checkpointing_steps=2", "train_batch_size=1", "optim.adam_epsilon=1e-3"]
    run(command(2, 1, tiny_weights, video_dir, tmp_path / "whole", *steps))
    out = tmp_path / "run"
    proc = subprocess.Popen(command(2, 1, tiny_weights, video_dir, out, *steps), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill():  # the launcher and its workers (torchrun starts them in sessions of their own)
        try:
            family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
        except psutil.NoSuchProcess:
            return
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(family, timeout=60)
        proc.wait()

    try:
        wait_for_checkpoint(proc, out / "checkpoint-2")
        kill()  # SIGKILL to the launcher and both workers: no clean-up of any kind
    finally:
        kill()
    assert not (out / "final").exists()
    for later in out.glob("checkpoint-*"):  # the kill may land after a later checkpoint: resume from step 2
        if later.name != "checkpoint-2":
            shutil.rmtree(later)
    other = tmp_path / "other"
    subprocess.run(["cp", "-r", str(out), str(other)], check=True)

    resumed = run(command(1, 1, tiny_weights, video_dir, out, *steps, "gradient_accumulation_steps=2"))
    lines = [line for line in resumed.stderr.splitlines() if "resumed" in line]
    assert any(f"resumed from {out / 'checkpoint-2'} at step 2 (epoch 0, sample 4 of 6)" in x for x in lines), lines
    assert_same_run(tmp_path / "whole", out, 6)

    # one process with batch 1: half the global batch. Step 3 takes the epoch's 5th sample (the 6th follows)
    resumed = run(command(1, 1, tiny_weights, video_dir, other, *steps))
    assert "the epoch goes on from its sample 4" in resumed.stderr
    before, after = metrics(tmp_path / "whole"), metrics(other)
    assert [m["keys"] for m in after[:2]] == [m["keys"] for m in before[:2]]
    assert after[2]["keys"] + after[3]["keys"] == before[2]["keys"] and after[2]["epoch"] == 0


@pytest.mark.parametrize("stage", [1, 3])
def test_fsdp_equals_one_process_and_resumes(stage, tiny_weights, video_dir, tmp_path):
    """configs/accelerate/fsdp_8_gpus.yaml (FSDP2: gradients and optimizer state sharded) with 2 processes, stopped
    after its checkpoint-2 and resumed to step 4: the same run as one uninterrupted process at the same global batch,
    with one writer of full weights folders."""
    steps = ["checkpointing_steps=2", "train_batch_size=1", "optim.adam_epsilon=1e-3"]
    extra = ["sliding.rollout_steps=1"] if stage == 3 else []
    run(command(1, stage, tiny_weights, video_dir, tmp_path / "one", *steps, *extra, "max_train_steps=4",
                "gradient_accumulation_steps=2"))
    out = tmp_path / "fsdp"
    first = run(command(2, stage, tiny_weights, video_dir, out, *steps, *extra, "max_train_steps=2", sharded=True))
    assert "Saving FSDP model" in first.stderr  # sharded, not DDP
    resumed = run(command(2, stage, tiny_weights, video_dir, out, *steps, *extra, "max_train_steps=4", sharded=True))
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in resumed.stderr
    assert_same_run(tmp_path / "one", out, 4)
    assert_once_per_epoch(out, 6)
    # the weights folders hold the same files as one process's (accelerate's own checkpoint files differ)
    assert {f for f in files(tmp_path / "one") if "personalive/" in f} <= set(files(out))
