"""GPT-2 checkpoints in the Hugging Face layout: load, save, download.

A Hugging Face GPT-2 folder holds ``config.json`` (a ``GPT2Config``) and ``model.safetensors``.
GPT-2's parameter names and its (in, out) linear weights are exactly ours, so loading is a
copy. Two key layouts exist: with a ``transformer.`` prefix (what ``save_pretrained`` writes)
and without it (the hub's ``openai-community/gpt2*`` files); both carry ``attn.bias`` /
``attn.masked_bias`` causal-mask buffers that are not parameters and are skipped.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from .checkpoint import read_json, read_safetensors
from .models.gpt import GPT, GPTConfig
from .tokenizer import GPT2Tokenizer

HUB_NAMES = {  # short name -> hub repository
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
HUB_URL = "https://huggingface.co/{repo}/resolve/main/{file}"
FILES = ("config.json", "model.safetensors")
BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers (c_attn.bias is real)


def is_hf_gpt2_folder(path) -> bool:
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        return False
    config = read_json(path / "config.json", "config")
    return config.get("model_type") == "gpt2"


def config_from_hf(hf: dict) -> GPTConfig:
    """Our GPTConfig from a Hugging Face GPT2Config dict."""
    activation = hf.get("activation_function", "gelu_new")
    if activation != "gelu_new":
        raise ValueError(f"unsupported activation {activation!r}: only GPT-2's 'gelu_new' (the "
                         "tanh approximation) is implemented")
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        context_length=hf.get("n_positions", hf.get("n_ctx", 1024)),
        n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
        dropout=0.0, bias=True, qkv_bias=True,
        tie_weights=hf.get("tie_word_embeddings", True),
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )


def config_to_hf(config: GPTConfig) -> dict:
    """A GPT2Config dict that ``transformers`` reads."""
    if not (config.bias and config.qkv_bias):
        raise ValueError("the Hugging Face GPT-2 layout needs biases (bias=True, qkv_bias=True)")
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.context_length,
        "n_ctx": config.context_length, "n_embd": config.n_embd, "n_layer": config.n_layer,
        "n_head": config.n_head, "n_inner": None, "activation_function": "gelu_new",
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout, "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": 0.02, "tie_word_embeddings": config.tie_weights,
        "bos_token_id": 50256, "eos_token_id": 50256,
    }


def state_from_hf(tensors: dict) -> dict:
    """Strip the ``transformer.`` prefix and drop mask buffers: HF names -> our names."""
    state = {}
    for name, array in tensors.items():
        if name.endswith(BUFFERS):
            continue
        if name.startswith("transformer."):
            name = name[len("transformer."):]
        if array.dtype != np.float32:
            array = array.astype(np.float32)
        state[name] = array
    return state


def load_gpt2(path_or_name, device: str = "cpu", cache_dir=None):
    """Load a Hugging Face GPT-2: returns (model, GPT2Tokenizer).

    ``path_or_name`` is a local folder, or one of gpt2, gpt2-medium, gpt2-large, gpt2-xl
    (downloaded once into ``cache_dir``; needs the network).
    """
    path = Path(path_or_name)
    if not path.is_dir():
        if str(path_or_name) not in HUB_NAMES:
            raise FileNotFoundError(f"{path_or_name} is neither a folder nor one of "
                                    f"{', '.join(HUB_NAMES)}")
        path = download_gpt2(str(path_or_name), cache_dir=cache_dir)
    for file in FILES:
        if not (path / file).is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face GPT-2 folder: {file} is missing")
    config = config_from_hf(read_json(path / "config.json", "config"))
    state = state_from_hf(read_safetensors(path / "model.safetensors"))
    if config.tie_weights:
        state.pop("lm_head.weight", None)  # the same matrix as wte
    elif "lm_head.weight" in state:
        state["lm_head.weight"] = state["lm_head.weight"].T  # PyTorch's Linear is (out, in)
    model = GPT(config)
    model.load_state_dict(state)
    return model.to(device), GPT2Tokenizer()


def save_gpt2(model, folder) -> Path:
    """Write ``model`` as a Hugging Face GPT-2 folder (``GPT2LMHeadModel.from_pretrained`` reads
    it). Written to a temporary name first, then renamed."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, array in model.state_dict().items():
        if name == "lm_head.weight":
            tensors[name] = np.ascontiguousarray(array.T)  # ours (in, out) -> PyTorch (out, in)
        else:
            tensors["transformer." + name] = np.ascontiguousarray(array)
    tmp = folder / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2))
    return folder


def default_cache_dir() -> Path:
    base = os.environ.get("TINYGRAD_LLM_CACHE") or Path.home() / ".cache" / "tinygrad_llm"
    return Path(base) / "hf"


def download_gpt2(name: str, out=None, cache_dir=None, timeout: float = 10.0) -> Path:
    """Download a GPT-2 checkpoint from the Hugging Face hub into ``out`` (or the cache).

    Resumable: a partial ``.part`` file is continued with an HTTP range request. Each file's
    size is checked against what the server announced. Offline, it fails at once and says how
    to use a local folder instead.
    """
    if name not in HUB_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(HUB_NAMES)}")
    folder = Path(out) if out else Path(cache_dir or default_cache_dir()) / name
    folder.mkdir(parents=True, exist_ok=True)
    for file in FILES:
        target = folder / file
        if target.is_file():
            continue
        url = HUB_URL.format(repo=HUB_NAMES[name], file=file)
        try:
            _download(url, target, timeout)
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            raise ConnectionError(
                f"could not download {url} ({error}). Without a network connection, copy a "
                f"Hugging Face GPT-2 folder (config.json + model.safetensors) to this machine "
                f"and pass its path instead of {name!r}."
            ) from None
    return folder


def _download(url: str, target: Path, timeout: float) -> None:
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if have and response.status != 206:  # the server ignored the range: start over
            have = 0
        remaining = int(response.headers.get("Content-Length", -1))
        expected = have + remaining if remaining >= 0 else None
        with open(part, "ab" if have else "wb") as f:
            done = have
            while chunk := response.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                if expected:
                    print(f"\r{target.name}: {done / 2**20:.0f} / {expected / 2**20:.0f} MiB",
                          end="", file=sys.stderr)
    print(file=sys.stderr)
    size = part.stat().st_size
    if expected is not None and size != expected:
        raise ConnectionError(f"{target.name}: got {size} bytes, expected {expected}; run the "
                              "download again to resume")
    os.replace(part, target)
