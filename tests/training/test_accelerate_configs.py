"""configs/accelerate/: every file loads with accelerate's own reader, with the process counts its name says; the
FSDP file wraps block classes that the full-size UNets (built on the meta device) are made of."""

import json

import pytest
from accelerate.commands.config.config_args import ClusterConfig
from synthetic import ROOT

from personalive.config import TrainConfig, load_config
from personalive.weights import build_models

FILES = {"one_gpu": (1, 1, "NO"), "one_machine_8_gpus": (1, 8, "MULTI_GPU"),
         "two_machines_8_gpus": (2, 16, "MULTI_GPU"), "fsdp_8_gpus": (1, 8, "FSDP")}


@pytest.mark.parametrize("name", sorted(FILES))
def test_config_loads_with_accelerate(name):
    cfg = ClusterConfig.from_yaml_file(str(ROOT / f"configs/accelerate/{name}.yaml"))
    assert (cfg.num_machines, cfg.num_processes, str(cfg.distributed_type).split(".")[-1]) == FILES[name]
    assert cfg.use_cpu is False


def test_fsdp_wraps_blocks_of_our_unets():
    import torch

    fsdp = ClusterConfig.from_yaml_file(str(ROOT / "configs/accelerate/fsdp_8_gpus.yaml")).fsdp_config
    classes = set(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","))
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is False  # ZeRO-2, as the README says
    cfg = load_config(ROOT / "configs/train/stage1.yaml", [], schema=TrainConfig)
    configs = {n: json.loads((ROOT / f"configs/weights/full/{n}.json").read_text())
               for n in ("unet", "vae", "image_encoder")}
    with torch.device("meta"):
        models = build_models(cfg, configs)
    for unet in (models.reference_unet, models.denoising_unet):
        found = {type(m).__name__ for m in unet.modules()} & classes
        wrapped = sum(p.numel() for m in unet.modules() if type(m).__name__ in classes for p in m.parameters())
        assert found and wrapped > 0.8 * sum(p.numel() for p in unet.parameters()), (found, wrapped)
    temporal = [n for n, m in models.denoising_unet.named_modules()
                if ".temporal_modules." in f".{n}." and type(m).__name__ in classes]
    assert temporal  # stage 3's trained blocks are wrapped units of their own
