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


def test_backends_compared_in_one_run_report_speedups(tmp_path, tiny_weights, monkeypatch):
    import personalive.pipelines.build as build

    def fake_factory(acceleration):  # a second backend without exporting: the torch step, renamed
        return (lambda acceleration, engine, cfg: engine.step_module) if acceleration == "onnxruntime" else None

    monkeypatch.setattr(build, "exported_step_factory", fake_factory)
    out = tmp_path / "bench.json"
    argv = ["--config", str(ROOT / "configs/prompts/tiny.yaml"), f"weights_dir={tiny_weights}", "--frames", "8",
            "--warmup", "0", "--rounds", "2", "--acceleration", "none,onnxruntime", "--json", str(out),
            "--log-level", "WARNING"]
    assert run_tool("benchmark", argv) == 0
    result = json.loads(out.read_text())
    assert set(result["backends"]) == {"none", "onnxruntime"} and result["rounds"] == 2
    assert result["speedup"]["none"] == 1.0 and result["speedup"]["onnxruntime"] > 0
    assert result["backends"]["onnxruntime"]["acceleration"] == "onnxruntime"


def test_benchmark_refuses_unknown_backends():
    with pytest.raises(SystemExit) as e:
        run_tool("benchmark", ["--acceleration", "none,warp"])
    assert e.value.code == 2


def compare_tiny(tmp_path, tiny_weights, *options: str) -> dict:
    """The JSON of a 4-frame, one-round benchmark of the tiny config with `options`."""
    out = tmp_path / "bench.json"
    argv = ["--config", str(ROOT / "configs/prompts/tiny.yaml"), f"weights_dir={tiny_weights}", "--frames", "4",
            "--warmup", "0", "--rounds", "1", *options, "--json", str(out), "--log-level", "WARNING"]
    assert run_tool("benchmark", argv) == 0
    return json.loads(out.read_text())


def test_savings_compared_in_one_run(tmp_path, tiny_weights):
    result = compare_tiny(tmp_path, tiny_weights, "--savings", "before,after", "--threads", "1")
    assert set(result["backends"]) == {"none:before", "none:after"}
    assert [result["backends"][b]["savings"] for b in ("none:before", "none:after")] == ["before", "after"]
    assert result["speedup"]["none:before"] == 1.0 and result["stage_speedup"]["none:after"]["unet"] > 0


def test_config_variants_compared_in_one_run(tmp_path, tiny_weights):
    result = compare_tiny(tmp_path, tiny_weights, "--compare", "channels_last=false,channels_last=true+seed=3")
    labels = ["none:after:channels_last=false", "none:after:channels_last=true+seed=3"]
    assert list(result["backends"]) == labels
    assert [result["backends"][b]["variant"] for b in labels] == ["channels_last=false", "channels_last=true+seed=3"]
    assert result["speedup"][labels[0]] == 1.0


def test_flops_per_stage_on_the_meta_device(tmp_path, capsys):
    out = tmp_path / "flops.json"
    argv = ["--config", str(ROOT / "configs/prompts/personalive_online.yaml"), "--flops",
            str(ROOT / "configs/weights/full"), "--json", str(out), "--log-level", "WARNING"]
    assert run_tool("benchmark", argv) == 0
    result = json.loads(out.read_text())
    stages = result["tflop_per_frame"]
    assert set(stages) == {"motion_extraction", "motion_encoding", "pose_guider", "unet", "vae_decode"}
    assert 5 < stages["unet"] < 7 and 2 < stages["vae_decode"] < 3  # SD-size UNet on 16 frames, SD VAE at 512
    assert 0 < result["removed_tflop_per_frame"]["exact_attention_savings"] < stages["unet"]
    assert "TFLOP per output frame" in capsys.readouterr().err


def test_tiny_decoder_compared_in_one_run(tmp_path, tiny_weights):
    result = compare_tiny(tmp_path, tiny_weights, "--compare", "vae_decoder=sd,vae_decoder=tiny")
    labels = ["none:after:vae_decoder=sd", "none:after:vae_decoder=tiny"]
    assert list(result["backends"]) == labels and result["stage_speedup"][labels[1]]["vae_decode"] > 0
    flops = tmp_path / "flops.json"  # the tiny folder's own TAESD size
    argv = ["--config", str(ROOT / "configs/prompts/tiny.yaml"), "--flops", str(tiny_weights), "--json", str(flops)]
    assert run_tool("benchmark", argv) == 0
    removed = json.loads(flops.read_text())["removed_tflop_per_frame"]["vae_decoder=tiny"]
    assert 0 < removed < json.loads(flops.read_text())["tflop_per_frame"]["vae_decode"]
