"""tools/training_memory.py: exact parameter, gradient and optimizer bytes from the full-size networks on the meta
device; activations measured on the tiny networks, smaller with gradient checkpointing; JSON out."""

import json

import pytest
from conftest import run_tool


def test_stage3_memory_table(tiny_weights, tmp_path, capsys):
    out = tmp_path / "memory.json"
    assert run_tool("training_memory", ["--weights", str(tiny_weights), "--stages", "3", "--gpus", "4",
                                        "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    s = result["stages"]["3"]
    assert 1e7 < s["trained_params"] < 5e8 and s["frozen_params"] > 1e9  # the temporal modules train
    assert s["grads_gib"] == pytest.approx(s["trained_params"] * 4 / 2**30)
    assert s["optimizer_gib"] == pytest.approx(2 * s["grads_gib"]) and s["grads_sharded_gib"] == s["grads_gib"] / 4
    assert 0 < s["activations_checkpointing_gib"] < s["activations_no_checkpointing_gib"]
    assert s["total_sharded_checkpointing_gib"] < s["total_ddp_checkpointing_gib"]


def test_help_and_a_missing_weights_folder(tmp_path):
    with pytest.raises(SystemExit) as e:
        run_tool("training_memory", ["--help"])
    assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        run_tool("training_memory", ["--weights", str(tmp_path / "none")])
    assert e.value.code == 2
