"""Accelerated backends for the streaming step, behind `StreamStep`'s call signature.

`create_step_fn(acceleration, engine)` returns what `StreamEngine(step_fn=...)` calls in place of its PyTorch
step: `fn(latents, new_latents, clip_embeds, motion, faces, pose, canvas, reference={layer: tokens})` -> the same
six torch tensors on the engine's device. Everything else (reference fusion, keypoints, face crops, noise,
keyframe decisions) stays in PyTorch. The reference inputs always carry exactly the valid tokens (the reference
and the keyframes added so far): no padding to a maximum length.

- "onnxruntime": `onnx/unet_opt/unet_opt.onnx` if present, else `onnx/unet/unet.onnx`; CPU execution provider
  on the CPU, CUDA execution provider on a CUDA device (needs onnxruntime-gpu). Tensors are bound in place.
- "tensorrt": `tensorrt/unet_work.engine` (TensorRT 10, CUDA only), torch tensors as device buffers.

tensorrt and onnxruntime are imported only when asked for. The PyTorch backends ("none", "xformers") and the
choice between all of them are `personalive.pipelines.build.build_engine`'s. A missing file is a
`BackendUnavailableError`, a file built for other shapes or other weights a `CheckpointError`; both name the file
and the command that fixes it. The runtime reads what the exporter wrote through `artifacts` only: it does not
import the exporter.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from personalive.config import resolve_path
from personalive.errors import BackendUnavailableError, CheckpointError, ConfigError, reason
from personalive.export.artifacts import (
    ENGINE_PATH,
    EXPORT_HINT,
    ONNX_PATH,
    OPTIMIZED_PATH,
    ORT_TYPES,
    numpy_dtype,
    read_metadata,
    require_tensorrt,
    trt_torch_dtype,
)
from personalive.export.specs import StreamStepSpec, weights_fingerprint

logger = logging.getLogger(__name__)

BACKENDS = ("tensorrt", "onnxruntime")
StepFn = Callable[..., tuple]


def create_step_fn(acceleration: str, engine, cfg=None, directory: str | Path | None = None) -> StepFn:
    """The exported step for `acceleration`, for `engine` (a `StreamEngine`).

    Args:
        acceleration: one of `BACKENDS`.
        engine: the streaming engine (its models, device, dtype and config define the expected shapes).
        cfg: the run config (default: the engine's).
        directory: where `onnx/` and `tensorrt/` are (default: the config's weights_dir, torch2trt.py's default).
    Use: `engine.step_fn = create_step_fn("onnxruntime", engine)`.
    """
    cfg = cfg or engine.cfg
    if acceleration not in BACKENDS:
        raise ConfigError(f"acceleration={acceleration!r} has no exported step; use one of {', '.join(BACKENDS)}")
    directory = resolve_path(directory or cfg.weights_dir)
    spec = StreamStepSpec.from_engine(engine)
    if acceleration == "onnxruntime":
        optimized = directory / OPTIMIZED_PATH
        path = optimized if optimized.exists() else directory / ONNX_PATH
        _check_export(path, cfg, "--onnx-only")
        return OnnxRuntimeStep(path, spec, engine.device)
    require_tensorrt()  # what is missing first, then which file
    _require_cuda_for_tensorrt(engine.device)  # before the file check: the first thing to fix
    path = directory / ENGINE_PATH
    _check_export(path, cfg, "")
    return TensorRTStep(path, spec, engine.device)


def _require_cuda_for_tensorrt(device: torch.device) -> None:
    if device.type != "cuda":
        raise BackendUnavailableError(f"acceleration=tensorrt needs a CUDA device, the engine runs on {device}; "
                                      "use device=cuda or --acceleration onnxruntime")


def _check_export(path: Path, cfg, flags: str) -> None:
    """The file exists and was made from the weights that `cfg` loads."""
    hint = EXPORT_HINT.format(flags=flags).strip()
    if not path.exists():
        raise BackendUnavailableError(f"{path} not found; build it with `{hint}` (or pass its folder)")
    metadata = read_metadata(path)
    if not metadata:
        raise CheckpointError(f"{path} has no readable export.json beside it; rebuild it with `{hint} --force`")
    built_with = metadata.get("key", {}).get("vae_decoder", "sd")  # exports before the option decode with sd
    if built_with != cfg.vae_decoder:
        raise CheckpointError(f"{path} was built with vae_decoder={built_with}, this run has vae_decoder="
                              f"{cfg.vae_decoder}; rebuild it with `{hint} vae_decoder={cfg.vae_decoder} --force`")
    if metadata.get("key", {}).get("weights") != weights_fingerprint(cfg):
        raise CheckpointError(f"{path} was built from other weights than {cfg.weights_dir}; "
                              f"rebuild it with `{hint} --force`")


def _gather(spec: StreamStepSpec, args: tuple, reference: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The positional inputs in graph order, reference tokens last."""
    fixed = len(spec.inputs) - len(spec.layers)
    if len(args) != fixed:
        raise TypeError(f"expected {fixed} tensors ({', '.join(spec.input_names[:fixed])}), got {len(args)}")
    missing = [name for name in spec.layers if name not in reference]
    if missing:
        raise ValueError(f"reference tokens of layer {missing[0]} are missing (was fuse_reference() run?)")
    return [*args, *(reference[name] for name in spec.layers)]


def _output_dtypes(spec: StreamStepSpec) -> list[torch.dtype]:
    """The dtypes the PyTorch step returns: the model's, except the float32 clean latent of the scheduler."""
    return [torch.float32 if name == "x0_first" else spec.dtype for name in spec.output_names]


class OnnxRuntimeStep:
    """The exported step in an ONNX Runtime session; inputs and outputs are torch tensors bound in place.

    Args:
        path: the ONNX model; spec: the shapes the engine needs; device: the engine's device (cpu or cuda).
    """

    def __init__(self, path: str | Path, spec: StreamStepSpec, device: torch.device | str):
        if importlib.util.find_spec("onnxruntime") is None:
            raise BackendUnavailableError("onnxruntime is not installed; `pip install -r requirements.txt`")
        import onnxruntime as ort

        self.path, self.spec, self.device = Path(path), spec, torch.device(device)
        options = ort.SessionOptions()
        if self.device.type == "cpu":
            providers = ["CPUExecutionProvider"]
            options.intra_op_num_threads = torch.get_num_threads()  # share the CPU as PyTorch does
        elif self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailableError(
                    "onnxruntime has no CUDA execution provider; replace onnxruntime with onnxruntime-gpu "
                    "(see requirements-gpu.txt) or use --acceleration tensorrt")
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0})]
        else:
            raise BackendUnavailableError(f"onnxruntime runs on cpu or cuda, not {self.device}; "
                                          f"use --acceleration none")
        from onnxruntime.capi import onnxruntime_pybind11_state as state

        unreadable = (state.Fail, state.InvalidArgument, state.InvalidProtobuf, state.InvalidGraph, state.NoSuchFile)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except unreadable as e:
            raise CheckpointError(f"{self.path} cannot be loaded by onnxruntime ({reason(e)}); "
                                  f"re-export with `{EXPORT_HINT.format(flags='--onnx-only --force')}`") from e
        found = {i.name: tuple(s if isinstance(s, int) else -1 for s in i.shape)  # symbolic axes -> -1
                 for i in self.session.get_inputs()}
        problem = spec.check_shapes(found, str(self.path))
        if problem:
            raise CheckpointError(f"{problem}; re-export with `{EXPORT_HINT.format(flags='--onnx-only --force')}`")
        types = {i.name: i.type for i in self.session.get_inputs()}
        types.update({o.name: o.type for o in self.session.get_outputs()})
        unknown = sorted({t for t in types.values() if t not in ORT_TYPES})
        if unknown:
            raise CheckpointError(f"{self.path} uses tensor types {unknown}; export it in fp32 or fp16")
        self.input_dtypes = [ORT_TYPES[types[name]] for name in spec.input_names]
        self.graph_output_dtypes = [ORT_TYPES[types[name]] for name in spec.output_names]
        self.output_dtypes = _output_dtypes(spec)
        self._where = ("cuda", self.device.index or 0) if self.device.type == "cuda" else ("cpu", 0)
        logger.info("onnxruntime session on %s (%s)", self.path, self.session.get_providers()[0])

    def __call__(self, *args: torch.Tensor, reference: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        inputs = [t.to(self.device, dtype).contiguous()
                  for t, dtype in zip(_gather(self.spec, args, reference), self.input_dtypes, strict=True)]
        outputs = [torch.empty(t.shape, dtype=dtype, device=self.device)
                   for t, dtype in zip(self.spec.outputs, self.graph_output_dtypes, strict=True)]
        binding = self.session.io_binding()
        for name, t in zip(self.spec.input_names, inputs, strict=True):
            binding.bind_input(name, *self._where, numpy_dtype(t.dtype), tuple(t.shape), t.data_ptr())
        for name, t in zip(self.spec.output_names, outputs, strict=True):
            binding.bind_output(name, *self._where, numpy_dtype(t.dtype), tuple(t.shape), t.data_ptr())
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch are ready
        self.session.run_with_iobinding(binding)
        return tuple(t.to(dtype) for t, dtype in zip(outputs, self.output_dtypes, strict=True))


class TensorRTStep:
    """The exported step as a TensorRT 10 engine; torch CUDA tensors are its buffers, on torch's current stream.

    Args:
        path: the engine file; spec: the shapes the engine needs; device: the engine's CUDA device.
    """

    def __init__(self, path: str | Path, spec: StreamStepSpec, device: torch.device | str):
        trt = require_tensorrt()
        self.path, self.spec, self.device = Path(path), spec, torch.device(device)
        _require_cuda_for_tensorrt(self.device)
        hint = EXPORT_HINT.format(flags="--force")
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise CheckpointError(f"{self.path} cannot be loaded by TensorRT {trt.__version__} on this GPU "
                                      f"(built by another version or for another GPU); rebuild it with `{hint}`")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        found = {n: tuple(self.engine.get_tensor_shape(n)) for n in names
                 if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        problem = spec.check_shapes(found, str(self.path))
        if problem is None:
            for t in spec.reference_inputs:  # the profile must reach the config's keyframe cap
                longest = self.engine.get_tensor_profile_shape(t.name, 0)[2][1]
                if longest < spec.input_shape(t, spec.max_keyframes)[1]:
                    problem = (f"{self.path} takes at most {longest} tokens at {t.name}, max_keyframes="
                               f"{spec.max_keyframes} needs {spec.input_shape(t, spec.max_keyframes)[1]}")
                    break
        if problem:
            raise CheckpointError(f"{problem}; rebuild it with `{hint}`")
        self.input_dtypes = [trt_torch_dtype(self.engine.get_tensor_dtype(n)) for n in spec.input_names]
        self.graph_output_dtypes = [trt_torch_dtype(self.engine.get_tensor_dtype(n)) for n in spec.output_names]
        self.output_dtypes = _output_dtypes(spec)
        logger.info("TensorRT %s engine %s", trt.__version__, self.path)

    def __call__(self, *args: torch.Tensor, reference: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        inputs = [t.to(self.device, dtype).contiguous()
                  for t, dtype in zip(_gather(self.spec, args, reference), self.input_dtypes, strict=True)]
        outputs = [torch.empty(t.shape, dtype=dtype, device=self.device)
                   for t, dtype in zip(self.spec.outputs, self.graph_output_dtypes, strict=True)]
        for name, t in zip(self.spec.input_names, inputs, strict=True):
            self.context.set_input_shape(name, tuple(t.shape))  # reference inputs: exactly the valid tokens
            self.context.set_tensor_address(name, t.data_ptr())
        for name, t in zip(self.spec.output_names, outputs, strict=True):
            self.context.set_tensor_address(name, t.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT could not run {self.path} (see the TensorRT messages above)")
        return tuple(t.to(dtype) for t, dtype in zip(outputs, self.output_dtypes, strict=True))
