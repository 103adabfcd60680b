"""The staged build behind `torch2trt.py`: ONNX export -> check against PyTorch -> optimised copy -> TensorRT engine.

Each stage is reused when its output exists with the same key (shapes, dtype, versions, weights), unless
`force=True`. The engine (`tensorrt/unet_work.engine`, fp16, static shapes of the streaming configuration and
one optimisation profile over the reference token length) is GPU- and TensorRT-version-specific; its key records
both. tensorrt is imported only here and only when an engine is built or loaded.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from personalive.config import PersonaLiveConfig, resolve_path
from personalive.errors import BackendUnavailableError, CheckpointError
from personalive.export.artifacts import ENGINE_PATH, METADATA, read_metadata, require_cuda, require_tensorrt
from personalive.export.onnx import export_onnx, optimize_onnx, verify_onnx
from personalive.export.specs import StreamStepSpec

logger = logging.getLogger(__name__)


def engine_key(onnx_path: Path, trt) -> dict:
    """What an engine depends on: the ONNX export's key, TensorRT's version and the GPU."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"onnx": read_metadata(onnx_path).get("key"), "precision": "fp16", "tensorrt": trt.__version__,
            "gpu": props.name, "compute_capability": f"{props.major}.{props.minor}"}


def _progress_monitor(trt):
    """A TensorRT progress monitor drawing one tqdm bar per build phase."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars: dict[str, tqdm] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.bars[phase_name] = tqdm(total=num_steps, desc=phase_name, unit="step", leave=parent_phase is None,
                                         position=len(self.bars))

        def step_complete(self, phase_name, step):
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.update(step + 1 - bar.n)
            return True  # keep building

        def phase_finish(self, phase_name):
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return Monitor()


def build_tensorrt_engine(onnx_path: str | Path, engine_path: str | Path, spec: StreamStepSpec, *,
                          force: bool = False) -> Path:
    """Build the fp16 TensorRT engine of the exported step (static shapes, one profile over reference tokens)."""
    trt = require_tensorrt()
    require_cuda()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    key = engine_key(onnx_path, trt)
    metadata_path = engine_path.with_suffix(".json")
    if not force and engine_path.exists() and metadata_path.exists():
        if json.loads(metadata_path.read_text()).get("key") == key:
            logger.info("reusing %s (same ONNX export, TensorRT version and GPU; --force rebuilds)", engine_path)
            return engine_path
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, trt_logger)
    if hasattr(trt.OnnxParserFlag, "NATIVE_INSTANCENORM"):
        parser.set_flag(trt.OnnxParserFlag.NATIVE_INSTANCENORM)  # group norms export as InstanceNormalization
    logger.info("parsing %s ...", onnx_path)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CheckpointError(f"TensorRT cannot parse {onnx_path}: {errors}; re-export with "
                              f"`python torch2trt.py --force`")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    dynamic = {t.name for t in spec.reference_inputs}  # every other input has static dims in the graph
    for name, (low, opt, high) in spec.profile().items():
        if name in dynamic:
            profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    if hasattr(trt, "IProgressMonitor"):
        config.progress_monitor = _progress_monitor(trt)
    logger.info("building the TensorRT engine (fp16; this takes minutes, ~20 on a big GPU at 512x512) ...")
    start = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CheckpointError(f"TensorRT could not build an engine from {onnx_path} (see its messages above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_name(f".{engine_path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(bytes(serialized))
    metadata_path.with_suffix(".json.tmp").write_text(json.dumps({"key": key, "profile": {
        n: [list(s) for s in p] for n, p in spec.profile().items()}}, indent=1) + "\n")
    tmp.replace(engine_path)
    metadata_path.with_suffix(".json.tmp").replace(metadata_path)
    # the runtime checks the weights through the ONNX export's metadata, kept beside the engine too
    (engine_path.parent / METADATA).write_text((onnx_path.parent / METADATA).read_text())
    logger.info("built %s in %.0f s", engine_path, time.monotonic() - start)
    return engine_path


def export_and_build(cfg: PersonaLiveConfig, output_dir: str | Path | None = None, *, onnx_only: bool = False,
                     force: bool = False, optimize: bool = False, verify: bool = True) -> dict[str, Path]:
    """`torch2trt.py`: export the streaming step of `cfg` to ONNX, check it, and build its TensorRT engine.

    Args:
        cfg: the run config (shapes, dtype, device, weights).
        output_dir: where `onnx/` and `tensorrt/` go (default: `cfg.weights_dir`, where the runtime looks).
        onnx_only: stop after the ONNX stages (no GPU or TensorRT needed).
        force: redo every stage even when its cached output matches.
        optimize: also save ONNX Runtime's basic graph optimisations to `onnx/unet_opt/unet_opt.onnx`.
        verify: compare ONNX Runtime with PyTorch on random inputs (0 and 1 keyframes) after the export.
    Returns:
        the written paths by stage ("onnx", "onnx_opt", "tensorrt").
    """
    from personalive.pipelines.build import build_engine, resolve_device

    if not onnx_only:  # fail before any work
        require_tensorrt()
        require_cuda()
    output_dir = resolve_path(output_dir or cfg.weights_dir)
    device = resolve_device(cfg.device)
    if cfg.dtype == "bf16":
        logger.warning("dtype=bf16: exporting in fp32 (TensorRT builds fp16 from it)")
        cfg = type(cfg)(**{**vars(cfg), "dtype": "fp32"})
    stages = ["onnx"] + (["verify"] if verify else []) + (["onnx_opt"] if optimize else []) + (
        [] if onnx_only else ["tensorrt"])
    logger.info("stages: %s -> %s", " -> ".join(stages), output_dir)
    engine = build_engine(cfg, device)
    paths = {"onnx": export_onnx(engine, output_dir, force=force)}
    if verify:
        try:
            verify_onnx(paths["onnx"], engine)
        except BackendUnavailableError as e:  # e.g. a CUDA engine without onnxruntime-gpu: onnx.checker only
            logger.warning("skipped the ONNX Runtime check: %s", e)
    if optimize:
        paths["onnx_opt"] = optimize_onnx(paths["onnx"], output_dir, force=force)
    if not onnx_only:
        spec = StreamStepSpec.from_engine(engine)
        del engine  # free the PyTorch models before TensorRT needs the GPU memory
        torch.cuda.empty_cache()
        paths["tensorrt"] = build_tensorrt_engine(paths["onnx"], output_dir / ENGINE_PATH, spec, force=force)
    return paths
