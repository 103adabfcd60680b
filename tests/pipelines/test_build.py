"""The one place a backend is chosen: names, the export runtime imported only when asked, checks before any model
loads, xformers as an attention setting."""

import sys

import pytest
import torch

from personalive.errors import BackendUnavailableError, ConfigError
from personalive.pipelines import build
from personalive.pipelines.build import ACCELERATIONS, build_engine, check_acceleration, exported_step_factory

CPU = torch.device("cpu")


def test_backend_names():
    assert ACCELERATIONS == ("none", "xformers", "tensorrt", "onnxruntime")
    assert exported_step_factory("none") is None and exported_step_factory("xformers") is None
    with pytest.raises(ConfigError, match="--acceleration turbo is unknown"):
        exported_step_factory("turbo")


def test_export_runtime_is_imported_only_when_asked(monkeypatch):
    try:
        factory = exported_step_factory("onnxruntime")
    except BackendUnavailableError as e:
        assert "--acceleration onnxruntime" in str(e)
    else:
        assert callable(factory)
    monkeypatch.setitem(sys.modules, "personalive.export.runtime", None)  # as if not installed
    with pytest.raises(BackendUnavailableError, match="--acceleration tensorrt is unavailable"):
        exported_step_factory("tensorrt")
    assert exported_step_factory("none") is None  # the PyTorch backends need no runtime


def test_checks_before_any_model_loads(tiny_cfg, monkeypatch):
    monkeypatch.setattr(build, "load_models", lambda *args: pytest.fail("the models must not load"))
    with pytest.raises(BackendUnavailableError, match="tensorrt needs a CUDA device"):
        check_acceleration("tensorrt", CPU)
    with pytest.raises(ConfigError, match="unknown"):
        build_engine(tiny_cfg, "cpu", "turbo")
    with pytest.raises(BackendUnavailableError, match="xformers needs a CUDA device"):
        build_engine(tiny_cfg, "cpu", "xformers")  # xformers is the attention setting, checked for the device


def test_exported_backend_is_set_on_the_engine(tiny_cfg, tiny_weights, monkeypatch):
    calls = []
    def factory(acceleration):  # stands in for the export runtime (tests/export run the real one)
        return (lambda *args: calls.append(args) or len) if acceleration == "onnxruntime" else None

    monkeypatch.setattr(build, "exported_step_factory", factory)
    engine = build_engine(tiny_cfg, "cpu", "onnxruntime")
    assert engine.step_fn is len and calls == [("onnxruntime", engine, tiny_cfg)]
    assert build_engine(tiny_cfg, "cpu").step_fn is None
