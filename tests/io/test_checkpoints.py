"""Weight files: safe loading (malicious pickles refused, not run), corrupt files named, atomic writes."""

import pathlib

import pytest
import torch

from personalive.errors import CheckpointError, WeightsNotFoundError
from personalive.io.checkpoints import (
    check_weights_folder,
    find_weight_file,
    from_official,
    load_state_dict,
    load_strict,
    read_shapes,
    save_state_dict,
)


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


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".safetensors"])
def test_zero_byte_file_is_one_line(tmp_path, suffix):
    (tmp_path / f"w{suffix}").touch()
    for read in (load_state_dict, read_shapes):
        with pytest.raises(CheckpointError, match=rf"^{tmp_path / f'w{suffix}'}: empty file \(0 bytes\); re-download it$"):
            read(tmp_path / f"w{suffix}")


@pytest.mark.parametrize("text", ["", "   ", "\n\n", "first line\nsecond line", "x" * 1000])
def test_any_exception_text_gives_one_line(tmp_path, monkeypatch, text):
    save_state_dict({"w": torch.zeros(1)}, tmp_path / "w.pth")
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(EOFError(text)))
    with pytest.raises(CheckpointError) as e:
        load_state_dict(tmp_path / "w.pth")
    message = str(e.value)
    assert len(message.splitlines()) == 1 and "w.pth: corrupt or truncated weights file (" in message
    assert ("EOFError" in message) == (not text.strip()) and len(message) < len(str(tmp_path)) + 250


def test_empty_or_missing_folder_names_the_folder_and_one_command(tmp_path):
    command = "python tools/download_weights.py --out X"
    cases = {tmp_path / "missing": "does not exist", tmp_path / "empty": "is empty", tmp_path / "other": "holds no "}
    (tmp_path / "empty" / "sub").mkdir(parents=True)  # empty folders inside are still empty
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hi")
    for folder, state in cases.items():
        with pytest.raises(WeightsNotFoundError) as e:
            check_weights_folder(folder, command)
        assert str(e.value) == f"weights folder {folder} {state}" + (
            "PersonaLive weights" if state == "holds no " else "") + f"; fill it with `{command}`, or set weights_dir=<folder>"
    (tmp_path / "file").touch()
    with pytest.raises(WeightsNotFoundError, match="is a file, not a folder"):
        check_weights_folder(tmp_path / "file", command)
    save_state_dict({"w": torch.zeros(1)}, tmp_path / "some" / "personalive/pose_guider.pth")
    check_weights_folder(tmp_path / "some", command)  # partly filled: each missing file is named by its reader


def test_load_strict_names_the_file_and_the_problems():
    model = torch.nn.Linear(2, 3)
    with pytest.raises(CheckpointError, match=r"^w\.pth: 1 missing keys, e\.g\. bias \(and 1 more problems\)$"):
        load_strict(model, {"weight": torch.zeros(3, 2), "extra": torch.zeros(1)}, "linear", "w.pth")
    with pytest.raises(CheckpointError, match=r"weight has shape \[2, 3\], expected \[3, 2\]$"):
        load_strict(model, {"weight": torch.zeros(2, 3), "bias": torch.zeros(3)}, "linear", "w.pth")
    load_strict(model, {"weight": torch.ones(3, 2), "bias": torch.zeros(3)}, "linear", "w.pth")
    assert model.weight.sum() == 6
