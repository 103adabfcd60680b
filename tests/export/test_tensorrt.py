"""TensorRT: without CUDA or tensorrt every path says what is missing; with both, the engine builds from the tiny
export, runs with the valid reference tokens only, and refuses an engine built for other shapes."""

import importlib.util

import pytest
import torch

from personalive.errors import BackendUnavailableError, CheckpointError
from personalive.export.artifacts import ENGINE_PATH, ONNX_PATH, require_cuda, require_tensorrt
from personalive.export.runtime import TensorRTStep, create_step_fn
from personalive.export.specs import ExportableStep, StreamStepSpec
from personalive.export.tensorrt import build_tensorrt_engine
from personalive.pipelines.stream import StreamEngine

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAVE_GPU = torch.cuda.is_available() and HAVE_TENSORRT
NO_GPU_REASON = ("needs a CUDA GPU and tensorrt (pip install -r requirements-gpu.txt); this machine has "
                 + ("no CUDA GPU" if not torch.cuda.is_available() else "no tensorrt"))


@pytest.mark.skipif(HAVE_GPU, reason="CUDA and tensorrt are both here: the GPU test covers this machine")
def test_without_gpu_or_tensorrt_every_path_says_what_is_missing(tiny_models, tiny_cfg, tiny_export, tmp_path):
    with pytest.raises(BackendUnavailableError, match=r"TensorRT is not installed|needs a CUDA GPU"):
        require_tensorrt()
        require_cuda()
    engine = StreamEngine(tiny_models, tiny_cfg)
    spec = StreamStepSpec.from_engine(engine)
    with pytest.raises(BackendUnavailableError, match="--onnx-only"):
        build_tensorrt_engine(tiny_export / ONNX_PATH, tmp_path / ENGINE_PATH, spec)
    with pytest.raises(BackendUnavailableError, match=r"TensorRT is not installed|needs a CUDA device"):
        create_step_fn("tensorrt", engine, directory=tiny_export)


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_GPU, reason=NO_GPU_REASON)
def test_engine_builds_runs_like_torch_and_refuses_other_shapes(tiny_cfg, tiny_export, tmp_path):
    from personalive.weights import load_models

    cfg = tiny_cfg.__class__(**{**vars(tiny_cfg), "device": "cuda"})
    engine = StreamEngine(load_models(cfg, "cuda", torch.float32), cfg)
    spec = StreamStepSpec.from_engine(engine)
    path = build_tensorrt_engine(tiny_export / ONNX_PATH, tiny_export / ENGINE_PATH, spec)
    assert path.exists() and build_tensorrt_engine(tiny_export / ONNX_PATH, path, spec) == path  # cached
    step = create_step_fn("tensorrt", engine, directory=tiny_export)
    assert isinstance(step, TensorRTStep)
    for keyframes in (0, 1, 3):  # the profile covers the reference alone up to max_keyframes keyframes
        inputs = spec.sample_inputs(keyframes=keyframes, device="cuda")
        with torch.no_grad():
            expected = ExportableStep(engine.step_module, spec)(*inputs)
        fixed = len(inputs) - len(spec.layers)
        got = step(*inputs[:fixed], reference=dict(zip(spec.layers, inputs[fixed:], strict=True)))
        for g, e in zip(got, expected, strict=True):
            assert g.shape == e.shape and g.dtype == e.dtype
            assert (g.float() - e.float()).abs().max().item() < 5e-2  # fp16 engine
    other = StreamEngine(engine.models, cfg.__class__(**{**vars(cfg), "height": 32, "width": 32}))
    with pytest.raises(CheckpointError, match="rebuild it with"):
        create_step_fn("tensorrt", other, directory=tiny_export)
