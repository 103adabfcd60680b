"""Weights in the official layout: random tiny folder round trip, --check, strict loading, full-size key lists."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, load_tool, official_keys, run_tool

from personalive.config import load_config
from personalive.errors import CheckpointError, ConfigError, WeightsNotFoundError
from personalive.io.checkpoints import find_weight_file, from_official, load_state_dict, read_config, save_state_dict
from personalive.weights import OFFICIAL_FILES, build_models, expected_shapes, load_models, network_configs

TINY = str(ROOT / "configs/prompts/tiny.yaml")


def check(folder) -> int:
    return run_tool("download_weights", ["--check", str(folder), "--config", TINY])


@pytest.fixture
def broken(tiny_weights, tmp_path):
    """A private copy of the tiny weights folder to damage."""
    copy = tmp_path / "w"
    shutil.copytree(tiny_weights, copy)
    return copy


def test_full_size_files_have_the_official_keys_and_shapes():
    configs = {n: __import__("json").loads((ROOT / f"configs/weights/full/{n}.json").read_text())
               for n in ("unet", "vae", "image_encoder")}
    with torch.device("meta"):
        models = build_models(load_config(None), configs)
    shapes = expected_shapes(models)
    for file in ("denoising_unet", "temporal_module", "reference_unet", "pose_guider", "motion_encoder"):
        assert shapes[file] == official_keys(file), file
    assert shapes["vae"] == official_keys("sd_vae_ft_mse")
    assert shapes["image_encoder"] == official_keys("image_encoder")
    # the official class also registers the constant `idx_tensor`; the file (and our module) has only detector.*
    assert shapes["motion_extractor"] == {k: v for k, v in official_keys("motion_extractor").items() if k != "idx_tensor"}


def test_round_trip_make_check_load(tiny_weights, tiny_cfg, capsys):
    assert check(tiny_weights) == 0
    assert capsys.readouterr().out.strip() == "OK"
    models = load_models(tiny_cfg)
    for file, (net, _) in OFFICIAL_FILES.items():
        state = from_official(file, load_state_dict(find_weight_file(tiny_weights, file)))
        ours = getattr(models, net).state_dict()
        assert all(torch.equal(ours[k], v) for k, v in state.items()), file
    assert read_config(tiny_weights, "unet")["block_out_channels"] == [32, 32, 64, 64]
    assert network_configs(tiny_weights)["vae"]["latent_channels"] == 4


def test_check_reports_a_missing_file(broken, capsys):
    (broken / "personalive/pose_guider.pth").unlink()
    assert check(broken) == 1
    assert "pose_guider" in capsys.readouterr().out


def test_check_reports_a_missing_key_and_a_wrong_shape(broken, capsys):
    path = broken / "personalive/motion_encoder.pth"
    state = load_state_dict(path)
    del state["final_proj.bias"]
    state["pe"] = torch.zeros(1, 31, 16)
    save_state_dict(state, path)
    assert check(broken) == 1
    out = capsys.readouterr().out
    assert "missing keys" in out and "final_proj.bias" in out and "pe has shape [1, 31, 16]" in out


def test_check_refuses_a_malicious_pickle_without_running_it(broken, capsys):
    import pathlib

    marker = broken / "pwned"

    class Payload:
        def __reduce__(self):
            return pathlib.Path.touch, (marker,)

    torch.save({"conv_in.weight": torch.zeros(1), "x": Payload()}, broken / "personalive/pose_guider.pth")
    assert check(broken) == 1
    assert "refused" in capsys.readouterr().out and not marker.exists()


def test_load_names_the_missing_file_and_the_fix(broken, tiny_cfg):
    (broken / "personalive/temporal_module.pth").unlink()
    cfg = load_config(TINY, [f"weights_dir={broken}"])
    with pytest.raises(WeightsNotFoundError, match="temporal_module.pth not found.*download_weights.py"):
        load_models(cfg)


def test_load_rejects_wrong_keys_strictly(broken):
    path = broken / "personalive/temporal_module.pth"
    state = load_state_dict(path)
    state.pop(next(iter(state)))
    save_state_dict(state, path)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_models(load_config(TINY, [f"weights_dir={broken}"]))


def test_safetensors_beside_pth(broken):
    path = broken / "personalive/pose_guider.pth"
    save_state_dict(load_state_dict(path), path.with_suffix(".safetensors"))
    path.unlink()
    assert check(broken) == 0



@pytest.fixture
def fake_hub(monkeypatch):
    """huggingface_hub.hf_hub_download replaced by a stub that writes the file into local_dir, as the hub does."""
    import huggingface_hub

    calls = []

    def hf_hub_download(repo_id, filename, local_dir):
        calls.append((repo_id, filename))
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(filename.encode())
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return calls


def test_download_writes_the_official_layout_and_skips_what_is_there(fake_hub, tmp_path):
    out = tmp_path / "pretrained_weights"
    assert run_tool("download_weights", ["--out", str(out)]) == 0
    expected = [f"personalive/{name}.pth" for name in OFFICIAL_FILES if name not in ("vae", "image_encoder")] + [
        "sd-vae-ft-mse/config.json", "sd-vae-ft-mse/diffusion_pytorch_model.bin",
        "sd-image-variations-diffusers/unet/config.json", "sd-image-variations-diffusers/unet/diffusion_pytorch_model.bin",
        "sd-image-variations-diffusers/image_encoder/config.json",
        "sd-image-variations-diffusers/image_encoder/pytorch_model.bin"]
    for rel in expected:
        assert (out / rel).is_file(), rel
    assert not (out / ".download").exists()
    fetched = len(fake_hub)
    assert run_tool("download_weights", ["--out", str(out)]) == 0
    assert len(fake_hub) == fetched  # nothing fetched twice


def test_download_failure_is_one_line_naming_the_file(monkeypatch, tmp_path, capsys):
    import huggingface_hub

    def offline(repo_id, filename, local_dir):
        raise OSError("Connection refused\nmore detail")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert run_tool("download_weights", ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "could not download model_index.json" in err and "Connection refused" in err and "again" in err


def test_check_and_load_name_a_zero_byte_file_in_one_line(broken, capsys):
    (broken / "personalive/pose_guider.pth").write_bytes(b"")
    assert check(broken) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"{broken / 'personalive/pose_guider.pth'}: empty file (0 bytes); re-download it"]
    with pytest.raises(CheckpointError, match=r"pose_guider.pth: empty file \(0 bytes\)"):
        load_models(load_config(TINY, [f"weights_dir={broken}"]))


@pytest.mark.parametrize("config, command", [
    (TINY, "python tools/make_random_weights.py --size tiny --out {}"), (None, "python tools/download_weights.py --out {}")])
def test_empty_or_missing_folder_says_so_with_the_one_command_that_fills_it(tmp_path, capsys, config, command):
    (tmp_path / "empty").mkdir()
    for folder, state in ((tmp_path / "empty", "is empty"), (tmp_path / "missing", "does not exist")):
        message = f"weights folder {folder} {state}; fill it with `{command.format(folder)}`, or set weights_dir=<folder>"
        with pytest.raises(WeightsNotFoundError) as e:
            load_models(load_config(config, [f"weights_dir={folder}"]))
        assert str(e.value) == message
        argv = ["--check", str(folder)] + (["--config", config] if config else [])
        assert run_tool("download_weights", argv) == 1
        assert capsys.readouterr().out.strip() == message


def test_tiny_vae_is_optional_named_when_missing_and_checked(broken, capsys):
    """TAESD (taesd/) is read only with vae_decoder=tiny; missing, it is one line naming the file and the command."""
    for config in (TINY, *sorted(str(p) for p in (ROOT / "configs/prompts").glob("personalive_*.yaml")), None):
        assert load_config(config).vae_decoder == "sd"  # never the default
    tiny = load_config(TINY, [f"weights_dir={broken}", "vae_decoder=tiny"])
    assert type(load_models(tiny).tiny_vae).__name__ == "AutoencoderTiny"
    assert check(broken) == 0 and run_tool("download_weights", ["--check", str(broken), "--config", TINY,
                                                                "vae_decoder=tiny"]) == 0
    path = broken / "taesd/diffusion_pytorch_model.safetensors"
    state = load_state_dict(path)
    state.pop(next(iter(state)))
    save_state_dict(state, path)
    assert check(broken) == 1 and "taesd/diffusion_pytorch_model.safetensors: 1 missing keys" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="missing keys"):
        load_models(tiny)
    path.unlink()
    assert load_models(load_config(TINY, [f"weights_dir={broken}"])).tiny_vae is None  # sd needs no TAESD
    message = (f"{path} not found; vae_decoder=tiny needs TAESD: run `python tools/download_weights.py "
               f"--with-tiny-vae --out {broken}` (or `python tools/make_random_weights.py --out {broken}`: random), "
               "or set vae_decoder=sd")
    with pytest.raises(WeightsNotFoundError) as e:
        load_models(tiny)
    assert str(e.value) == message
    assert run_tool("download_weights", ["--check", str(broken), "--config", TINY, "vae_decoder=tiny"]) == 1
    assert capsys.readouterr().out.strip() == message
    with pytest.raises(ConfigError, match="vae_decoder='big' is not supported"):
        load_config(TINY, ["vae_decoder=big"])


def test_full_size_tiny_vae_config_is_taesds():
    """configs/weights/full/taesd.json = madebyollin/taesd's config.json = AutoencoderTiny's defaults."""
    from diffusers import AutoencoderTiny

    config = json.loads((ROOT / "configs/weights/full/taesd.json").read_text())
    def plain(model):  # tuples as JSON lists, without diffusers' bookkeeping
        return {k: v for k, v in json.loads(json.dumps(dict(model.config))).items() if not k.startswith("_")}

    assert plain(AutoencoderTiny.from_config(config)) == plain(AutoencoderTiny())
    assert config["scaling_factor"] == 1.0 and config["latent_channels"] == 4


def test_download_with_tiny_vae_fetches_taesd(fake_hub, tmp_path):
    out = tmp_path / "pretrained_weights"
    assert run_tool("download_weights", ["--out", str(out)]) == 0
    assert not (out / "taesd").exists() and all(repo != "madebyollin/taesd" for repo, _ in fake_hub)
    assert run_tool("download_weights", ["--out", str(out), "--with-tiny-vae"]) == 0
    assert fake_hub[-2:] == [("madebyollin/taesd", "config.json"),
                             ("madebyollin/taesd", "diffusion_pytorch_model.safetensors")]
    assert (out / "taesd/config.json").is_file() and (out / "taesd/diffusion_pytorch_model.safetensors").is_file()


def test_download_with_tiny_vae_offline_is_one_line(tmp_path, capsys, monkeypatch):
    """The real hub client in offline mode (no network here): the TAESD file it could not fetch, in one line."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tool = load_tool("download_weights")
    for _, _, dest in tool.FILES:  # everything else is there already
        (tmp_path / dest).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / dest).write_bytes(b"x")
    assert tool.main(["--out", str(tmp_path), "--with-tiny-vae"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "could not download config.json from https://huggingface.co/madebyollin/taesd" in err
