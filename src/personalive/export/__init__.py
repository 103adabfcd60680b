"""Acceleration: export the streaming step to ONNX and TensorRT, and run it there behind the PyTorch signature.

`specs` (names, shapes, profile of the exported graph), `onnx` (export, check, optimised copy), `tensorrt` (engine
build and the staged `torch2trt.py` job), `runtime` (`create_step_fn`: ONNX Runtime and TensorRT backends).
"""
