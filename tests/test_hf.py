"""Hugging Face GPT-2 layout: both key layouts load, saving round-trips, downloads fail clearly
offline and resume. With transformers and torch installed, logits are compared both ways."""

import io
import json
import urllib.error

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tinygrad_llm import backend, hf
from tinygrad_llm.loading import load_model
from tinygrad_llm.models.gpt import GPT, GPTConfig
from tinygrad_llm.tokenizer import GPT2Tokenizer

CONFIG = GPTConfig(vocab_size=50257, context_length=16, n_layer=2, n_head=2, n_embd=8)
IDS = np.array([[15496, 11, 995, 50256, 0]])


@pytest.fixture(scope="module")
def model():
    backend.manual_seed(0)
    return GPT(CONFIG)


def write_hub_style_folder(model, folder, prefix: str):
    """A GPT-2 folder as the hub (prefix '') or save_pretrained ('transformer.') lays it out."""
    folder.mkdir()
    tensors = {prefix + name: array for name, array in model.state_dict().items()}
    for i in range(model.config.n_layer):  # the causal-mask buffers real files carry
        tensors[f"{prefix}h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), np.float32))
        tensors[f"{prefix}h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf.config_to_hf(model.config)))


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_both_key_layouts_load_to_the_same_logits(tmp_path, model, prefix):
    write_hub_style_folder(model, tmp_path / "gpt2", prefix)
    loaded, tokenizer = hf.load_gpt2(tmp_path / "gpt2")
    np.testing.assert_array_equal(loaded(IDS).numpy(), model(IDS).numpy())
    assert isinstance(tokenizer, GPT2Tokenizer)
    generic, _, _ = load_model(tmp_path / "gpt2")  # the commands' loader recognises the folder
    np.testing.assert_array_equal(generic(IDS).numpy(), model(IDS).numpy())


def test_save_gpt2_round_trips_in_save_pretrained_layout(tmp_path, model):
    hf.save_gpt2(model, tmp_path / "out")
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert "transformer.h.0.attn.c_attn.weight" in tensors and "lm_head.weight" not in tensors
    loaded, _ = hf.load_gpt2(tmp_path / "out")
    np.testing.assert_array_equal(loaded(IDS).numpy(), model(IDS).numpy())


def test_an_untied_head_is_transposed_to_pytorch_layout_and_back(tmp_path):
    backend.manual_seed(1)
    untied = GPT(GPTConfig(**{**CONFIG.to_dict(), "tie_weights": False}))
    hf.save_gpt2(untied, tmp_path / "out")
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["lm_head.weight"].shape == \
        (50257, 8)
    loaded, _ = hf.load_gpt2(tmp_path / "out")
    np.testing.assert_array_equal(loaded(IDS).numpy(), untied(IDS).numpy())


def test_unknown_names_and_incomplete_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a folder nor one of"):
        hf.load_gpt2("gpt5")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        hf.load_gpt2(tmp_path / "half")


def test_offline_download_fails_at_once_and_names_the_local_route(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(hf.urllib.request, "urlopen", offline)
    with pytest.raises(ConnectionError, match="pass its path instead"):
        hf.download_gpt2("gpt2", out=tmp_path / "gpt2")


class FakeResponse(io.BytesIO):
    def __init__(self, body: bytes, status: int):
        super().__init__(body)
        self.status = status
        self.headers = {"Content-Length": str(len(body))}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def test_download_resumes_a_partial_file_and_checks_its_size(tmp_path, monkeypatch):
    content = {"config.json": b'{"model_type": "gpt2"}', "model.safetensors": bytes(range(200))}
    requests = []

    def server(request, timeout):
        file = request.full_url.rsplit("/", 1)[1]
        start = int(request.headers.get("Range", "bytes=0-")[6:-1])
        requests.append((file, start))
        return FakeResponse(content[file][start:], 206 if start else 200)

    monkeypatch.setattr(hf.urllib.request, "urlopen", server)
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "model.safetensors.part").write_bytes(content["model.safetensors"][:120])
    hf.download_gpt2("gpt2", out=folder)
    assert (folder / "model.safetensors").read_bytes() == content["model.safetensors"]
    assert ("model.safetensors", 120) in requests  # continued, not restarted


def test_transformers_gives_the_same_logits_both_ways(tmp_path, model):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf.save_gpt2(model, tmp_path / "ours")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        their_logits = theirs(torch.from_numpy(IDS)).logits.numpy()
    np.testing.assert_allclose(their_logits, model(IDS).numpy(), rtol=1e-4, atol=1e-4)

    torch.manual_seed(0)
    other = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50257, n_positions=16, n_embd=8, n_layer=2, n_head=2)).eval()
    other.save_pretrained(tmp_path / "theirs")
    loaded, _ = hf.load_gpt2(tmp_path / "theirs")
    with torch.no_grad():
        expected = other(torch.from_numpy(IDS)).logits.numpy()
    np.testing.assert_allclose(loaded(IDS).numpy(), expected, rtol=1e-4, atol=1e-4)
