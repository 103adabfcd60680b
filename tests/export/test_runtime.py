"""Backends behind the step signature: the ONNX Runtime engine streams the same frames as PyTorch (keyframes
included); missing, mismatched or foreign exports fail with one clear error."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from personalive.errors import BackendUnavailableError, CheckpointError, ConfigError
from personalive.export.artifacts import ONNX_PATH
from personalive.export.runtime import BACKENDS, OnnxRuntimeStep, create_step_fn
from personalive.pipelines.stream import StreamEngine


def variant(cfg, **changes):
    return cfg.__class__(**{**vars(cfg), **changes})


@pytest.fixture(scope="module")
def reference():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (80, 72, 3), dtype=np.uint8))


def stream(engine, reference, steps):
    g = torch.Generator().manual_seed(1)
    engine.fuse_reference(reference)
    frames, keyframes = [], []
    for _ in range(steps):
        frames.append(engine.step(torch.rand(4, 3, 64, 64, generator=g) * 2 - 1))
        keyframes.append(engine.bank.num_keyframes)
    return torch.stack(frames), keyframes


def test_onnxruntime_engine_streams_the_same_frames_as_torch(tiny_models, tiny_cfg, tiny_export, reference):
    cfg = variant(tiny_cfg, keyframe_threshold=-1.0)  # every frame is "far": keyframes from step 9 on
    expected, keyframes = stream(StreamEngine(tiny_models, cfg), reference, 11)  # (engines share the models:
    engine = StreamEngine(tiny_models, cfg)  # run one after the other)
    engine.step_fn = create_step_fn("onnxruntime", engine, cfg, directory=tiny_export)
    assert isinstance(engine.step_fn, OnnxRuntimeStep)
    got, keyframes_ort = stream(engine, reference, 11)
    assert keyframes == keyframes_ort == [0] * 9 + [1, 2]  # the reference inputs grew from 1 to 3 token sets
    assert got.shape == expected.shape == (11, 4, 64, 64, 3)
    # the state recurs over 11 steps and the random tiny VAE magnifies latent differences ~30x: 1e-3 on frames
    assert (got - expected).abs().max().item() <= 1e-3


def test_only_exported_backends(tiny_models, tiny_cfg):
    engine = StreamEngine(tiny_models, tiny_cfg)
    assert BACKENDS == ("tensorrt", "onnxruntime")
    for name in ("none", "xformers", "openvino"):  # the PyTorch backends are build_engine's
        with pytest.raises(ConfigError, match="onnxruntime"):
            create_step_fn(name, engine)


def test_missing_export_names_the_file_and_the_command(tiny_models, tiny_cfg, tmp_path):
    engine = StreamEngine(tiny_models, tiny_cfg)
    with pytest.raises(BackendUnavailableError, match=r"unet\.onnx not found; build it with `python torch2trt.py"):
        create_step_fn("onnxruntime", engine, directory=tmp_path)


def test_export_for_other_shapes_is_refused(tiny_models, tiny_cfg, tiny_export):
    engine = StreamEngine(tiny_models, variant(tiny_cfg, height=32, width=32))
    with pytest.raises(CheckpointError, match=r"input latents has shape \[1, 4, 12, 8, 8\], this config needs "
                                              r"\[1, 4, 12, 4, 4\]; re-export with `python torch2trt.py"):
        create_step_fn("onnxruntime", engine, directory=tiny_export)


def test_export_from_other_weights_is_refused(tiny_models, tiny_cfg, tiny_export, tmp_path):
    shutil.copytree(tiny_export / "onnx", tmp_path / "onnx")
    metadata = tmp_path / ONNX_PATH.parent / "export.json"
    data = json.loads(metadata.read_text())
    data["key"]["weights"] = "0" * 16
    metadata.write_text(json.dumps(data))
    engine = StreamEngine(tiny_models, tiny_cfg)
    with pytest.raises(CheckpointError, match="built from other weights"):
        create_step_fn("onnxruntime", engine, directory=tmp_path)
    metadata.unlink()
    with pytest.raises(CheckpointError, match="no readable export.json"):
        create_step_fn("onnxruntime", engine, directory=tmp_path)


def test_export_with_the_other_decoder_is_refused(tiny_models, tiny_cfg, tiny_export):
    """The exported step holds its decoder: an sd export does not serve vae_decoder=tiny (and the other way)."""
    engine = StreamEngine(tiny_models, tiny_cfg)
    with pytest.raises(CheckpointError, match=r"built with vae_decoder=sd, this run has vae_decoder=tiny; rebuild it "
                                              r"with `python torch2trt.py --config <this config> --onnx-only "
                                              r"vae_decoder=tiny --force`"):
        create_step_fn("onnxruntime", engine, variant(tiny_cfg, vae_decoder="tiny"), directory=tiny_export)


def test_unreadable_model_is_a_checkpoint_error(tiny_models, tiny_cfg, tiny_export, tmp_path):
    shutil.copytree(tiny_export / "onnx", tmp_path / "onnx")
    (tmp_path / ONNX_PATH).write_bytes(b"not a model")
    engine = StreamEngine(tiny_models, tiny_cfg)
    with pytest.raises(CheckpointError, match="cannot be loaded by onnxruntime"):
        create_step_fn("onnxruntime", engine, directory=tmp_path)
