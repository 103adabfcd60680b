"""Weight files: safe loading (malicious pickles refused, not run), corrupt files named, atomic writes."""

import pathlib

import pytest
import torch

from personalive.errors import CheckpointError, WeightsNotFoundError
from personalive.io.checkpoints import find_weight_file, from_official, load_state_dict, read_shapes, save_state_dict


class Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_round_trip(tmp_path, suffix):
    state = {"a.weight": torch.randn(3, 4), "b": torch.arange(5)}
    save_state_dict(state, tmp_path / f"w{suffix}")
    loaded = load_state_dict(tmp_path / f"w{suffix}")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert read_shapes(tmp_path / f"w{suffix}") == {"a.weight": [3, 4], "b": [5]}
    assert [p.name for p in tmp_path.iterdir()] == [f"w{suffix}"]  # no temp file left behind


def test_malicious_pickle_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(1), "x": Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused"):
        load_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()


def test_truncated_file_names_the_path(tmp_path):
    save_state_dict({"w": torch.randn(64, 64)}, tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "w.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="w.pth.*(corrupt|truncated)"):
        load_state_dict(tmp_path / "w.pth")


def test_missing_file_says_how_to_get_it(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="pose_guider.*download_weights.py"):
        find_weight_file(tmp_path, "pose_guider")


def test_safetensors_preferred_and_pth_accepted(tmp_path):
    save_state_dict({"w": torch.zeros(1)}, tmp_path / "personalive/pose_guider.pth")
    assert find_weight_file(tmp_path, "pose_guider").suffix == ".pth"
    save_state_dict({"w": torch.zeros(1)}, tmp_path / "personalive/pose_guider.safetensors")
    assert find_weight_file(tmp_path, "pose_guider").suffix == ".safetensors"


def test_legacy_vae_attention_names_are_converted():
    legacy = {"encoder.mid_block.attentions.0.query.weight": torch.randn(8, 8, 1, 1),
              "encoder.mid_block.attentions.0.proj_attn.bias": torch.randn(8),
              "encoder.conv_in.weight": torch.randn(8, 3, 3, 3)}
    state = from_official("vae", legacy)
    assert state["encoder.mid_block.attentions.0.to_q.weight"].shape == (8, 8)
    assert "encoder.mid_block.attentions.0.to_out.0.bias" in state and "encoder.conv_in.weight" in state
    assert from_official("motion_extractor", {"idx_tensor": torch.zeros(66), "detector.x": torch.zeros(1)}).keys() == {
        "detector.x"}
