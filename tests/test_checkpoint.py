"""Checkpoints: round trip, atomic replacement, and clear errors for bad folders."""

import json

import numpy as np
import pytest
from conftest import DEVICES

from tinygrad_llm import backend
from tinygrad_llm.checkpoint import is_checkpoint, load_checkpoint, save_checkpoint
from tinygrad_llm.loading import load_model, save_model
from tinygrad_llm.models.gpt import GPT, GPTConfig
from tinygrad_llm.tokenizer import CharTokenizer

CONFIG = GPTConfig(vocab_size=5, context_length=4, n_layer=1, n_head=1, n_embd=4)


@pytest.mark.parametrize("device", DEVICES)
def test_model_round_trip_with_tokenizer(tmp_path, device):
    backend.manual_seed(0)
    model, tokenizer = GPT(CONFIG).to(device), CharTokenizer("abcde")
    save_model(tmp_path / "ckpt", model, tokenizer)
    loaded, loaded_tokenizer, checkpoint = load_model(tmp_path / "ckpt", device)
    assert loaded.device == device
    assert all(backend.device_of(p.data) == device for p in loaded.parameters())
    ids = np.array([[0, 1, 2]])
    np.testing.assert_array_equal(loaded(ids).numpy(), model(ids).numpy())
    assert loaded_tokenizer.chars == "abcde" and checkpoint["state"] is None


# tests about files and their errors (host logic) stay CPU only
def test_an_interrupted_save_leaves_the_old_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "ckpt", {"w": np.ones(2, np.float32)}, {"v": 1})

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "ckpt", {"w": np.zeros(2, np.float32)}, {"v": Unserialisable()})
    checkpoint = load_checkpoint(tmp_path / "ckpt")
    np.testing.assert_array_equal(checkpoint["weights"]["w"], np.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left behind


def test_missing_corrupt_and_mismatched_checkpoints_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    save_model(tmp_path / "ckpt", GPT(CONFIG), CharTokenizer("abcde"))
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(tmp_path / "ckpt")

    save_model(tmp_path / "ckpt", GPT(CONFIG), CharTokenizer("abcde"))
    config_path = tmp_path / "ckpt" / "config.json"
    config_path.write_text('{\n "model": {\n  "n_layer": 1,,\n}')
    with pytest.raises(ValueError, match="not valid JSON \\(line 3"):
        load_checkpoint(tmp_path / "ckpt")

    save_model(tmp_path / "ckpt", GPT(CONFIG), CharTokenizer("abcde"))
    config = json.loads(config_path.read_text())
    config["model"]["n_embd"] = 8  # claims another architecture than the weights have
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_model(tmp_path / "ckpt")


def test_a_kill_between_the_two_renames_leaves_a_checkpoint_that_is_found(tmp_path):
    save_checkpoint(tmp_path / "ckpt", {"w": np.ones(2, np.float32)}, {"v": 1})
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt.old")  # the state right after the first rename
    (tmp_path / ".ckpt.tmp-dead").mkdir()  # and a killed save's temporary folder
    assert is_checkpoint(tmp_path / "ckpt")
    assert load_checkpoint(tmp_path / "ckpt")["config"]["v"] == 1  # the reader falls back
    save_checkpoint(tmp_path / "ckpt", {"w": np.zeros(2, np.float32)}, {"v": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # recovered and cleaned
    assert load_checkpoint(tmp_path / "ckpt")["config"]["v"] == 2


def test_checkpoint_folders_get_the_users_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "ckpt", {"w": np.ones(2, np.float32)}, {"v": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "ckpt" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_a_full_or_read_only_disk_says_the_previous_checkpoint_is_intact(tmp_path, monkeypatch):
    from tinygrad_llm import checkpoint

    save_checkpoint(tmp_path / "ckpt", {"w": np.ones(2, np.float32)}, {"v": 1})

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", no_space)
    with pytest.raises(checkpoint.CheckpointSaveError, match="previous checkpoint.*intact"):
        save_checkpoint(tmp_path / "ckpt", {"w": np.zeros(2, np.float32)}, {"v": 2})
    assert load_checkpoint(tmp_path / "ckpt")["config"]["v"] == 1


@pytest.mark.parametrize("device", DEVICES)
def test_a_checkpoint_with_nan_weights_is_refused(tmp_path, device):
    model = GPT(CONFIG).to(device)
    model.wte.weight.data[0, 0] = np.nan
    save_model(tmp_path / "ckpt", model, CharTokenizer("abcde"))
    with pytest.raises(ValueError, match="NaN"):
        load_model(tmp_path / "ckpt", device)


def test_a_config_missing_a_setting_is_refused_not_filled_with_gpt2s(tmp_path):
    save_model(tmp_path / "ckpt", GPT(CONFIG), CharTokenizer("abcde"))
    path = tmp_path / "ckpt" / "config.json"
    config = json.loads(path.read_text())
    del config["model"]["n_embd"]
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'n_embd' is missing"):
        load_model(tmp_path / "ckpt")
    config["model"]["n_embd"] = "4"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'n_embd' should be a positive int"):
        load_model(tmp_path / "ckpt")
