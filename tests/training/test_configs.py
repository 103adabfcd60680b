"""The six training configs: each loads with the schema and takes the documented overrides; the paper-scale ones
build the full-size networks (on the meta device: no memory, no weights) with what their stage trains."""

import json

import pytest
import torch
from synthetic import ROOT, one_thread  # noqa: F401 (fixture)

from personalive.config import TrainConfig, load_config
from personalive.training.stages import STAGE_MODULES, set_trainable, trainable_modules
from personalive.weights import build_models

CONFIGS = [f"{prefix}stage{stage}" for prefix in ("", "tiny_") for stage in (1, 2, 3)]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_takes_the_overrides(name, tmp_path):
    cfg = load_config(ROOT / f"configs/train/{name}.yaml",
                      [f"data_dir={tmp_path / 'data'}", f"output_dir={tmp_path / 'out'}", "max_train_steps=7",
                       f"init_from={tmp_path / 'previous'}"], schema=TrainConfig)
    assert isinstance(cfg, TrainConfig) and cfg.stage == int(name[-1])
    assert (cfg.data_dir, cfg.output_dir, cfg.max_train_steps) == (str(tmp_path / "data"), str(tmp_path / "out"), 7)
    assert cfg.init_from == str(tmp_path / "previous")
    default = load_config(ROOT / f"configs/train/{name}.yaml", [], schema=TrainConfig)
    assert (default.init_from is None) == (default.stage == 1)  # stages 2-3 name the previous stage's output
    assert trainable_modules(default) == STAGE_MODULES[default.stage]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_paper_scale_config_builds_the_full_networks(stage):
    cfg = load_config(ROOT / f"configs/train/stage{stage}.yaml", [], schema=TrainConfig)
    assert (cfg.height, cfg.width) == (512, 512) and cfg.mixed_precision in ("fp16", "bf16")
    assert cfg.dtype == {"fp16": "fp16", "bf16": "bf16"}[cfg.mixed_precision]
    configs = {n: json.loads((ROOT / f"configs/weights/full/{n}.json").read_text())
               for n in ("unet", "vae", "image_encoder")}
    with torch.device("meta"):
        models = build_models(cfg, configs)
    nets = set_trainable(models, trainable_modules(cfg))
    trained = sum(p.numel() for net in nets.values() for p in net.parameters() if p.requires_grad)
    frozen = sum(p.numel() for _, m in models.items() for p in m.parameters() if not p.requires_grad)
    expected = {1: (1.5e9, 2.5e9), 2: (1.5e9, 2.5e9), 3: (1e7, 5e8)}[stage]  # parameters, order of magnitude
    assert expected[0] < trained < expected[1], trained
    assert frozen > 0
