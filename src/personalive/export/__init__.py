"""Acceleration: export the streaming step to ONNX and TensorRT, and run it there behind the PyTorch signature.

`artifacts` (file names, `export.json`, optional packages, tensor types: the bottom), `specs` (names, shapes,
profile of the exported graph), `runtime` (`create_step_fn`: ONNX Runtime and TensorRT backends), `onnx` (export,
check against the runtime, optimised copy), `tensorrt` (engine build and the staged `torch2trt.py` job). Each
imports only the ones listed before it; drivers reach the runtime through `pipelines.build.build_engine`.
"""
