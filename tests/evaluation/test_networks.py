"""Metric networks: key layouts of the files they load, plumbing with random weights, missing files -> skip."""

import numpy as np
import pytest
import torch
from conftest import official_keys, state_shapes
from eval_helpers import write_tiny_arcface

from personalive.errors import CheckpointError, WeightsNotFoundError
from personalive.evaluation import networks as N
from personalive.evaluation.networks import (
    LPIPS,
    ArcFace,
    EvalNetworks,
    I3DFeatures,
    InceptionI3D,
    load_arcface,
    load_eval_networks,
    load_i3d,
    load_lpips,
    load_motion_extractor,
    motion_descriptors,
)
from personalive.io.checkpoints import save_state_dict


@pytest.fixture(scope="module")
def tiny_arcface(tmp_path_factory):
    return write_tiny_arcface(tmp_path_factory.mktemp("eval") / "w600k_r50.onnx")


def _random_state(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.05 for k, shape in shapes.items()}


# ------------------------------------------------------------------------------------------------------------------
# LPIPS


def test_lpips_keys_are_torchvision_alexnet_features_and_lpips_heads():
    shapes = state_shapes(LPIPS())
    alex = {f"net.{k}": v for k, v in official_keys("eval_alexnet_owt").items() if k.startswith("features.")}
    assert shapes == {**alex, **official_keys("eval_lpips_alex_v0.1")}


def test_lpips_plumbing_with_random_weights():
    torch.manual_seed(0)
    net = LPIPS().eval()
    for p in net.parameters():
        p.data.abs_()  # LPIPS heads are non-negative, so distances are too
    a, b = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        same, diff, swapped = net(a, a), net(a, b), net(b, a)
    assert same.shape == (2,) and torch.all(same == 0)
    assert torch.all(diff > 0) and torch.allclose(diff, swapped)


def _write_lpips_files(folder, seed=0):
    alex = _random_state({k: v for k, v in official_keys("eval_alexnet_owt").items() if k.startswith("features.")},
                         seed)
    alex["classifier.1.weight"] = torch.zeros(2, 2)  # the classifier is in the file but unused (kept small here)
    save_state_dict(alex, folder / N.EVAL_FILES["alexnet"].name)
    heads = {k: v.abs() for k, v in _random_state(official_keys("eval_lpips_alex_v0.1"), seed + 1).items()}
    save_state_dict(heads, folder / N.EVAL_FILES["lpips"].name)
    return alex, heads


def test_load_lpips_from_files(tmp_path):
    alex, heads = _write_lpips_files(tmp_path)
    net = load_lpips(tmp_path)
    assert torch.equal(net.net.features[0].weight, alex["features.0.weight"])
    assert torch.equal(net.lin4.model[1].weight, heads["lin4.model.1.weight"])
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert net(x, x).item() == 0


def test_load_lpips_refuses_wrong_files(tmp_path):
    _write_lpips_files(tmp_path)
    save_state_dict({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / N.EVAL_FILES["lpips"].name)
    with pytest.raises(CheckpointError, match="lpips_alex_v0.1.pth: 4 missing keys"):
        load_lpips(tmp_path)


# ------------------------------------------------------------------------------------------------------------------
# I3D


def test_i3d_keys_are_pytorch_i3d():
    shapes = {k: v for k, v in state_shapes(InceptionI3D()).items() if not k.endswith("num_batches_tracked")}
    assert shapes == official_keys("eval_i3d_rgb_imagenet")


def test_i3d_features_plumbing():
    torch.manual_seed(0)
    features = I3DFeatures(InceptionI3D().eval(), size=32, clip_len=4, batch=2)
    video = torch.rand(11, 3, 40, 48) * 2 - 1  # 2 clips of 4 frames, 3 frames dropped
    out = features(video)
    assert out.shape == (2, 400) and out.dtype == np.float64 and np.isfinite(out).all()
    assert np.allclose(features(video[:8]), out)  # the partial clip does not count
    assert features(video[:3]).shape == (0, 400)


def test_load_i3d_fills_missing_batch_norm_counters(tmp_path):
    state = _random_state(official_keys("eval_i3d_rgb_imagenet"))  # no num_batches_tracked, as in old files
    state = {k: v.abs() + 0.5 if k.endswith("running_var") else v for k, v in state.items()}
    save_state_dict(state, tmp_path / "rgb_imagenet.pt")
    net = load_i3d(tmp_path)
    assert torch.equal(net.Mixed_5c.b1b.conv3d.weight, state["Mixed_5c.b1b.conv3d.weight"])
    assert not net.training


# ------------------------------------------------------------------------------------------------------------------
# ArcFace


def test_arcface_onnx_plumbing(tiny_arcface):
    model = ArcFace(tiny_arcface)
    assert (model.size, model.mean, model.std, model.fixed_batch) == (112, 127.5, 127.5, None)
    faces = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    emb = model(faces)
    assert emb.shape == (3, 8) and np.allclose(np.linalg.norm(emb, axis=1), 1)
    assert np.allclose(model(faces[:1]), emb[:1])
    with pytest.raises(ValueError, match="uint8 faces"):
        model(faces[:, :64])


def test_arcface_with_its_own_normalisation_gets_raw_pixels(tmp_path):
    own = ArcFace(write_tiny_arcface(tmp_path / "own.onnx", with_norm_nodes=True))
    plain = ArcFace(write_tiny_arcface(tmp_path / "plain.onnx"))
    assert (own.mean, own.std) == (0.0, 1.0)
    faces = np.random.default_rng(1).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    assert np.allclose(own(faces), plain(faces), atol=1e-5)  # same weights, same normalisation, done in-graph


def test_corrupt_onnx_is_a_checkpoint_error(tmp_path):
    path = tmp_path / N.EVAL_FILES["arcface"].name
    path.write_bytes(b"not an onnx file")
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        load_arcface(tmp_path)


# ------------------------------------------------------------------------------------------------------------------
# Motion extractor


def test_motion_descriptors_from_the_project_extractor(tiny_cfg, tiny_weights):
    extractor = load_motion_extractor(tiny_cfg, tiny_weights)
    frames = torch.rand(5, 3, 48, 48) * 2 - 1
    angles, exp = motion_descriptors(extractor, frames, batch=2)
    assert angles.shape == (5, 3) and exp.shape == (5, 63)
    assert np.all(np.abs(angles) <= np.deg2rad(97.5) + 1e-9)  # 66 bins cover [-97.5, 97.5] degrees
    again, _ = motion_descriptors(extractor, frames[:2])
    assert np.allclose(again, angles[:2], atol=1e-6)
    with torch.no_grad():
        out = extractor(torch.rand(1, 3, 64, 64), with_expression=True)
        plain = extractor(torch.rand(1, 3, 64, 64))
    assert out["exp"].shape == (1, 63) and "exp" not in plain


# ------------------------------------------------------------------------------------------------------------------
# Missing files


@pytest.mark.parametrize("key", ["alexnet", "lpips", "i3d", "arcface"])
def test_missing_file_names_the_file_and_its_source(tmp_path, key, monkeypatch):
    monkeypatch.setattr(N, "_installed_lpips_weights", lambda: None)
    with pytest.raises(WeightsNotFoundError) as e:
        N.eval_file(tmp_path, key)
    message = str(e.value)
    assert N.EVAL_FILES[key].name in message and N.EVAL_FILES[key].source in message and "\n" not in message


def test_missing_weights_skip_their_metrics_and_keep_the_rest(tmp_path, caplog, monkeypatch, tiny_cfg, tiny_weights):
    monkeypatch.setattr(N, "_installed_lpips_weights", lambda: None)
    extractor = load_motion_extractor(tiny_cfg, tiny_weights)
    with caplog.at_level("WARNING"):
        nets = load_eval_networks(tmp_path, extractor)
    assert nets.lpips is None and nets.i3d is None and nets.arcface is None and nets.motion_extractor is extractor
    reasons = nets.skip_reasons()
    assert set(reasons) == {"lpips", "tlp", "fvd", "id_sim"}
    assert "alexnet-owt-7be5be79.pth" in reasons["lpips"] and "rgb_imagenet.pt" in reasons["fvd"]
    assert "w600k_r50.onnx" in reasons["id_sim"]
    assert "LPIPS, tLP skipped" in caplog.text and "FVD skipped" in caplog.text and "ID-SIM skipped" in caplog.text
    assert EvalNetworks().skip_reasons()["aed"].startswith("no motion_extractor")


def test_available_networks_load(tmp_path, tiny_arcface, monkeypatch):
    _write_lpips_files(tmp_path)
    (tmp_path / "w600k_r50.onnx").write_bytes(tiny_arcface.read_bytes())
    monkeypatch.setattr(N, "FaceAligner", lambda size: f"aligner {size}")  # MediaPipe is tested in test_alignment
    nets = load_eval_networks(tmp_path)
    assert isinstance(nets.lpips, LPIPS) and isinstance(nets.arcface, ArcFace) and nets.aligner == "aligner 112"
    assert set(nets.skip_reasons()) == {"fvd", "aed", "apd"}
