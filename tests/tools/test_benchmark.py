"""tools/benchmark.py on the tiny config: runs, reports every number in its JSON."""

import json

import pytest
from conftest import ROOT, run_tool


def test_benchmark_writes_its_numbers(tmp_path, tiny_weights):
    out = tmp_path / "bench.json"
    argv = ["--config", str(ROOT / "configs/prompts/tiny.yaml"), f"weights_dir={tiny_weights}", "--frames", "16",
            "--warmup", "0", "--json", str(out), "--log-level", "WARNING"]
    assert run_tool("benchmark", argv) == 0
    result = json.loads(out.read_text())
    assert result["frames"] == 16 and result["steps"] == 4 and result["fps"] > 0
    assert set(result["stage_ms_per_step"]) >= {"motion_extraction", "motion_encoding", "pose_guider", "unet",
                                                "vae_decode", "other"}
    assert 0 <= result["outside_networks_fraction"] < 1
    assert result["latency_ms"]["mean"] >= result["step_ms"]["mean"]  # a chunk leaves 3 steps after it entered
    assert result["first_frame_latency_ms"] > result["fuse_reference_ms"]
    assert result["memory"]["peak_rss_mb"] > 0 and result["memory"]["rss_end_mb"] > 0
    assert result["memory"]["growth_fraction"] is None  # fewer than 100 frames


def test_benchmark_help_names_the_malloc_settings(capsys):
    with pytest.raises(SystemExit) as e:
        run_tool("benchmark", ["--help"])
    assert e.value.code == 0
    assert "MALLOC_MMAP_THRESHOLD_=17179869184" in capsys.readouterr().out
