"""Export the streaming step to ONNX (`onnx/unet/unet.onnx`), check it, and optionally save an optimised copy.

Each artefact folder holds the model, its external data when it is large (`unet.onnx.data`, one file), and
`export.json`: the cache key (graph version, shapes, dtype, opset, library versions, weights fingerprint) and the
resolved config. An export whose key matches is reused unless `force=True`. Folders are written under a temporary
name and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import onnx
import torch

from personalive.errors import CheckpointError
from personalive.export.artifacts import METADATA, ONNX_PATH, OPTIMIZED_PATH, read_metadata, write_metadata
from personalive.export.specs import OPSET, ExportableStep, StreamStepSpec, versions, weights_fingerprint

logger = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31  # a single ONNX file cannot exceed 2 GB; larger models keep their weights beside it


def export_key(spec: StreamStepSpec, cfg) -> dict:
    """Everything a cached export depends on."""
    return {**spec.key(), "opset": OPSET, "vae_decoder": cfg.vae_decoder, "weights": weights_fingerprint(cfg),
            "versions": versions("torch", "onnx", "diffusers", "personalive")}


def export_onnx(engine, directory: str | Path, *, force: bool = False, external_data: bool | None = None) -> Path:
    """Export `engine.step_module` (a `StreamEngine`'s step) to `directory/onnx/unet/unet.onnx`.

    Args:
        engine: the streaming engine whose models, config, device and dtype define the graph. Tracing loads
            sample reference tokens into its bank: use an engine made for the export.
        directory: the output root (`onnx/` goes below it).
        force: export even when a matching export exists.
        external_data: keep the weights in `unet.onnx.data`; default: only when the model exceeds 2 GB.
    Returns:
        the path of the ONNX model.
    """
    spec = StreamStepSpec.from_engine(engine)
    key = export_key(spec, engine.cfg)
    path = Path(directory) / ONNX_PATH
    if not force and path.exists() and read_metadata(path).get("key") == key:
        logger.info("reusing %s (same shapes, dtype, versions and weights; --force re-exports)", path)
        return path
    path.parent.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".unet-", dir=path.parent.parent))
    try:
        raw = work / "raw" / path.name
        raw.parent.mkdir()
        start = time.monotonic()
        logger.info("exporting the streaming step (%d inputs, %s, opset %d) ...", len(spec.inputs),
                    spec.key()["dtype"], OPSET)
        module = ExportableStep(engine.step_module, spec).eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(module, spec.sample_inputs(device=engine.device), str(raw),
                              input_names=spec.input_names, output_names=spec.output_names,
                              dynamic_axes=spec.dynamic_axes(), opset_version=OPSET, dynamo=False,
                              do_constant_folding=True)
        logger.info("traced and exported in %.0f s", time.monotonic() - start)
        out = work / "model" / path.name
        out.parent.mkdir()
        if external_data is None and len(list(raw.parent.iterdir())) == 1:
            external_data = False  # the exporter wrote one file: under 2 GB
        if external_data is False and len(list(raw.parent.iterdir())) == 1:
            raw.rename(out)
        else:  # gather the weights into one data file beside the model
            model = onnx.load(str(raw))
            size = sum(len(t.raw_data) for t in model.graph.initializer)
            external = size > PROTOBUF_LIMIT if external_data is None else external_data
            onnx.save_model(model, str(out), save_as_external_data=external, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=1024)
            del model
        onnx.checker.check_model(str(out))  # by path: works with external data
        write_metadata(out, key, engine.cfg, checked="onnx.checker")
        _replace_dir(out.parent, path.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("wrote %s", path)
    return path


def _replace_dir(new: Path, dest: Path) -> None:
    """Move the complete folder `new` to `dest`, replacing what was there."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}-old-{time.time_ns()}")
        dest.rename(old)
    new.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def verify_onnx(path: str | Path, engine, keyframes: tuple[int, ...] = (0, 1), atol: float | None = None
                ) -> dict[str, float]:
    """Run the ONNX model (ONNX Runtime, on the engine's device) and `engine.step_module` on the same random
    inputs, with 1 + k sets of reference tokens for each k in `keyframes`.

    Returns the largest absolute difference per output; raises `CheckpointError` above `atol` (default: 1e-3 in
    fp32, 5e-2 in fp16/bf16). Loads sample tokens into the engine's bank.
    """
    from personalive.export.runtime import OnnxRuntimeStep

    spec = StreamStepSpec.from_engine(engine)
    atol = atol if atol is not None else (1e-3 if engine.dtype == torch.float32 else 5e-2)
    session = OnnxRuntimeStep(path, spec, engine.device)
    module = ExportableStep(engine.step_module, spec).eval()
    worst: dict[str, float] = {}
    for k in keyframes:
        inputs = spec.sample_inputs(keyframes=k, seed=k, device=engine.device)
        with torch.no_grad():
            expected = module(*inputs)
        fixed = inputs[: len(inputs) - len(spec.layers)]
        got = session(*fixed, reference=dict(zip(spec.layers, inputs[len(fixed):], strict=True)))
        for name, a, b in zip(spec.output_names, got, expected, strict=True):
            diff = (a.float() - b.float()).abs().max().item()
            worst[name] = max(worst.get(name, 0.0), diff)
    logger.info("ONNX Runtime vs PyTorch, max abs difference: %s",
                ", ".join(f"{n} {d:.1e}" for n, d in worst.items()))
    bad = {n: d for n, d in worst.items() if not d <= atol}
    if bad:
        name, diff = next(iter(bad.items()))
        raise CheckpointError(f"{path}: output {name} differs from PyTorch by {diff:.2e} (> {atol:.0e}); "
                              f"re-export with python torch2trt.py --force")
    return worst


def optimize_onnx(path: str | Path, directory: str | Path, *, force: bool = False) -> Path:
    """Save ONNX Runtime's basic graph optimisations of `path` (constant folding, redundant-node elimination,
    fusions into standard ONNX ops; no runtime-specific ops) to `directory/onnx/unet_opt/unet_opt.onnx`."""
    import onnxruntime as ort

    path = Path(path)
    key = read_metadata(path).get("key")
    dest = Path(directory) / OPTIMIZED_PATH
    if not force and dest.exists() and key is not None and read_metadata(dest).get("key") == key:
        logger.info("reusing %s", dest)
        return dest
    dest.parent.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".unet_opt-", dir=dest.parent.parent))
    try:
        out = work / dest.name
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(out)
        if (path.parent / (path.name + ".data")).exists():  # large model: keep the weights in one file beside it
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             dest.name + ".data")
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                             "1024")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        onnx.checker.check_model(str(out))
        metadata = read_metadata(path)
        metadata["optimized"] = f"onnxruntime {ort.__version__} ORT_ENABLE_BASIC"
        (work / METADATA).write_text(json.dumps(metadata, indent=1, default=str) + "\n")
        _replace_dir(work, dest.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("wrote %s", dest)
    return dest
