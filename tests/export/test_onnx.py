"""ONNX export of the tiny streaming step: a valid graph, its names and dynamic axes, ONNX Runtime = PyTorch."""

import importlib.util
import json
import logging
from pathlib import Path

import onnx
import pytest
import torch

from personalive.export.artifacts import ONNX_PATH, OPTIMIZED_PATH, read_metadata
from personalive.export.onnx import export_onnx, optimize_onnx, verify_onnx
from personalive.export.runtime import OnnxRuntimeStep
from personalive.export.specs import OPSET, OUTPUT_NAMES, ExportableStep, StreamStepSpec
from personalive.pipelines.stream import StreamEngine

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def engine(tiny_models, tiny_cfg):
    return StreamEngine(tiny_models, tiny_cfg)


def test_export_is_a_valid_graph_with_named_state_and_reference_inputs(tiny_export, engine):
    path = tiny_export / ONNX_PATH
    onnx.checker.check_model(str(path))  # external data: checked by path
    data = path.parent / "unet.onnx.data"
    assert data.exists() and path.stat().st_size < data.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    assert model.opset_import[0].version >= OPSET >= 17
    spec = StreamStepSpec.from_engine(engine)
    inputs = {i.name: i for i in model.graph.input}
    assert list(inputs)[:7] == ["latents", "new_latents", "clip_embeds", "motion", "faces", "pose", "canvas"]
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)
    assert len(spec.layers) == 16  # every self-attention layer of the denoising UNet, as in the full model
    for layer in spec.layers:
        dims = inputs[f"ref.{layer}"].type.tensor_type.shape.dim
        assert dims[1].dim_param.startswith("ref_tokens_") and dims[0].dim_value == 1
    # the recurrent state comes back with the shape it went in
    shapes = {t.name: t.shape for t in spec.inputs + spec.outputs}
    assert shapes["next_latents"] == shapes["latents"] and shapes["next_pose"] == shapes["pose"]
    assert shapes["next_motion"] == shapes["motion"] and shapes["latents"][2] == 12
    key = read_metadata(path)["key"]
    assert key["dtype"] == "float32" and key["opset"] == OPSET and key["inputs"]["latents"] == [1, 4, 12, 8, 8]


def test_reference_shapes_match_the_bank(engine, tiny_models):
    """The spec's per-layer token counts are what the reference UNet really writes."""
    from PIL import Image

    engine.fuse_reference(Image.new("RGB", (64, 64), (120, 90, 60)))
    spec = StreamStepSpec.from_engine(engine)
    bank = engine.bank.state()
    assert set(bank) == set(spec.layers)
    for t in spec.reference_inputs:
        assert tuple(bank[t.name.removeprefix("ref.")].shape) == t.shape


@pytest.mark.parametrize("keyframes", [0, 1, 3])
def test_onnxruntime_matches_torch_fp32(tiny_export, engine, keyframes):
    """Same inputs, 1 + k sets of reference tokens: every output within 1e-4."""
    spec = StreamStepSpec.from_engine(engine)
    session = OnnxRuntimeStep(tiny_export / ONNX_PATH, spec, "cpu")
    inputs = spec.sample_inputs(keyframes=keyframes, seed=10 + keyframes)
    with torch.no_grad():
        expected = ExportableStep(engine.step_module, spec)(*inputs)
    fixed = len(inputs) - len(spec.layers)
    got = session(*inputs[:fixed], reference=dict(zip(spec.layers, inputs[fixed:], strict=True)))
    assert [tuple(g.shape) for g in got] == [tuple(e.shape) for e in expected]
    assert [g.dtype for g in got] == [e.dtype for e in expected]
    for name, g, e in zip(OUTPUT_NAMES, got, expected, strict=True):  # 1e-4 of the output's scale (latents ~ 20)
        assert (g - e).abs().max().item() <= 1e-4 * max(1.0, e.abs().max().item()), name


def test_export_is_reused_when_nothing_changed_and_verify_reports(tiny_export, engine, caplog):
    path = tiny_export / ONNX_PATH
    before = path.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="personalive"):
        assert export_onnx(engine, tiny_export) == path
    assert path.stat().st_mtime_ns == before and "reusing" in caplog.text
    worst = verify_onnx(path, engine, keyframes=(2,), atol=1e-4)
    assert set(worst) == set(OUTPUT_NAMES) and max(worst.values()) <= 1e-4


def test_optimized_copy_runs_the_same(tiny_export, engine, tmp_path):
    opt = optimize_onnx(tiny_export / ONNX_PATH, tmp_path)
    assert opt == tmp_path / OPTIMIZED_PATH and opt.exists()
    assert "onnxruntime" in read_metadata(opt)["optimized"]
    assert read_metadata(opt)["key"] == read_metadata(tiny_export / ONNX_PATH)["key"]
    assert verify_onnx(opt, engine, keyframes=(1,), atol=1e-4)


def _torch2trt():
    spec = importlib.util.spec_from_file_location("torch2trt_script", ROOT / "torch2trt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torch2trt_onnx_only_reuses_the_export_and_tensorrt_says_what_is_missing(tiny_export, tiny_weights, caplog):
    script = _torch2trt()
    argv = ["--config", str(ROOT / "configs/prompts/tiny.yaml"), "--output-dir", str(tiny_export), "--no-verify",
            f"weights_dir={tiny_weights}", "device=cpu"]
    path = tiny_export / ONNX_PATH
    before = path.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="personalive"):
        assert script.main(["--onnx-only", *argv]) == 0
    assert path.stat().st_mtime_ns == before and "reusing" in caplog.text
    caplog.clear()
    if importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available():
        assert script.main(argv) == 2  # stops before any work, naming what is missing
        message = caplog.records[-1].getMessage()
        assert ("TensorRT is not installed" in message or "CUDA GPU" in message) and "--onnx-only" in message
    meta = json.loads((path.parent / "export.json").read_text())
    assert meta["config"]["height"] == 64
