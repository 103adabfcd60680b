"""`train.py` under accelerate's FSDP on the CPU, for the tests:

    accelerate launch --config_file configs/accelerate/fsdp_8_gpus.yaml --num_processes 2 \
        tests/training/fsdp_on_cpu.py train.py --config ...

accelerate (1.15) turns FSDP on only for accelerators (CUDA, XPU, ...): on a machine without one it makes the
processes a MULTI_CPU (DDP) group and ignores the FSDP settings. torch's FSDP2 runs on the CPU over gloo, so this
starts the gloo group itself and reports it to accelerate as a GPU group on the CPU device; everything after that is
the real code path (wrapping by block class, sharded gradients and optimizer state, gathered state dicts).
"""

import os
import runpy
import sys

import accelerate.state
import torch.distributed
from accelerate.utils import DistributedType

_prepare_backend = accelerate.state.PartialState._prepare_backend


def prepare_backend(self, *args, **kwargs):
    backend, kind = _prepare_backend(self, *args, **kwargs)
    return backend, DistributedType.MULTI_GPU if kind == DistributedType.MULTI_CPU else kind


if __name__ == "__main__":
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    accelerate.state.PartialState._prepare_backend = prepare_backend
    torch.distributed.init_process_group("gloo")
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
