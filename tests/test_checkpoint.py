"""Checkpoints: round trip, atomic replacement, and clear errors for bad folders."""

import json

import numpy as np
import pytest

from tinygrad_llm import backend
from tinygrad_llm.checkpoint import load_checkpoint, load_model, save_checkpoint, save_model
from tinygrad_llm.models.gpt import GPT, GPTConfig
from tinygrad_llm.tokenizer import CharTokenizer

CONFIG = GPTConfig(vocab_size=5, context_length=4, n_layer=1, n_head=1, n_embd=4)


def test_model_round_trip_with_tokenizer(tmp_path):
    backend.manual_seed(0)
    model, tokenizer = GPT(CONFIG), CharTokenizer("abcde")
    save_model(tmp_path / "ckpt", model, tokenizer)
    loaded, loaded_tokenizer, checkpoint = load_model(tmp_path / "ckpt")
    ids = np.array([[0, 1, 2]])
    np.testing.assert_array_equal(loaded(ids).numpy(), model(ids).numpy())
    assert loaded_tokenizer.chars == "abcde" and checkpoint["state"] is None


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
