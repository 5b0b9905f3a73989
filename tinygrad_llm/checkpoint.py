"""Checkpoints: a folder of safetensors weights and JSON metadata, written atomically.

    DIR/model.safetensors       parameter name -> array
    DIR/optimizer.safetensors   optimizer moments (only while training)
    DIR/config.json             {"model": {...GPTConfig...}, "tokenizer": {...}, ...}
    DIR/state.json              training position: step, random generator states, ...

Nothing is ever unpickled. A checkpoint is first written to a sibling temporary folder and then
renamed into place, so an interrupted save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

FORMAT = "tinygrad_llm.checkpoint/1"


def _contiguous(arrays: dict) -> dict:
    return {name: np.ascontiguousarray(array) for name, array in arrays.items()}


def save_checkpoint(directory, weights: dict, config: dict, state: dict | None = None,
                    optimizer: dict | None = None) -> Path:
    """Write a checkpoint folder atomically (replacing an existing one).

    Args:
        weights: parameter name -> NumPy array (``model.state_dict()``).
        config: JSON-serialisable model and tokenizer description.
        state: JSON-serialisable training state (step, generator states ...).
        optimizer: name -> NumPy array (``optimizer.state_dict()``).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        save_file(_contiguous(weights), str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        if optimizer:
            save_file(_contiguous(optimizer), str(tmp / "optimizer.safetensors"))
        (tmp / "config.json").write_text(json.dumps({"format": FORMAT, **config}, indent=1))
        if state is not None:
            (tmp / "state.json").write_text(json.dumps(state))
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(directory, old)  # keep the previous one until the new one is in place
        os.replace(tmp, directory)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path} is not valid JSON (line {error.lineno}, column "
                         f"{error.colno}: {error.msg})") from None


def read_safetensors(path: Path) -> dict:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}); the checkpoint "
                         "is corrupt or incomplete") from None


def load_checkpoint(directory) -> dict:
    """Read a checkpoint folder: {'weights', 'config', 'state', 'optimizer'} (the last two may
    be None)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint folder {directory} does not exist")
    for name in ("model.safetensors", "config.json"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a checkpoint: {name} is missing")
    config = read_json(directory / "config.json", "checkpoint config")
    state_path, optimizer_path = directory / "state.json", directory / "optimizer.safetensors"
    return {
        "weights": read_safetensors(directory / "model.safetensors"),
        "config": config,
        "state": read_json(state_path, "training state") if state_path.is_file() else None,
        "optimizer": read_safetensors(optimizer_path) if optimizer_path.is_file() else None,
    }


def is_checkpoint(directory) -> bool:
    directory = Path(directory)
    return (directory / "model.safetensors").is_file() and (directory / "config.json").is_file()


def save_model(directory, model, tokenizer, state: dict | None = None, optimizer=None,
               extra: dict | None = None) -> Path:
    """Save a GPT with its config and tokenizer (and, while training, optimizer and state)."""
    config = {"model": model.config.to_dict(), "tokenizer": tokenizer.to_config(), **(extra or {})}
    return save_checkpoint(directory, model.state_dict(), config, state,
                           optimizer.state_dict() if optimizer is not None else None)


def load_model(directory, device: str = "cpu"):
    """Load a GPT from a checkpoint of this project (or the run folder holding one) or a
    Hugging Face GPT-2 folder.

    Returns (model, tokenizer, checkpoint dict); for a Hugging Face folder the dict holds only
    its config.
    """
    from . import hf
    from .models.gpt import GPT, GPTConfig
    from .tokenizer import tokenizer_from_config

    directory = Path(directory)
    if not is_checkpoint(directory) and is_checkpoint(directory / "checkpoint"):
        directory = directory / "checkpoint"  # a run folder of `tinygrad-llm pretrain --out`
    if hf.is_hf_gpt2_folder(directory):
        model, tokenizer = hf.load_gpt2(directory, device)
        return model, tokenizer, {"config": {"model": model.config.to_dict(),
                                             "tokenizer": tokenizer.to_config()},
                                  "state": None, "optimizer": None, "weights": None}
    checkpoint = load_checkpoint(directory)
    config = checkpoint["config"]
    if "model" not in config or "tokenizer" not in config:
        raise ValueError(f"{directory}/config.json has no 'model' and 'tokenizer' entries: it is "
                         "not a tinygrad_llm GPT checkpoint")
    model = GPT(GPTConfig.from_dict(config["model"]))
    model.load_state_dict(checkpoint["weights"])
    model.to(device)
    return model, tokenizer_from_config(config["tokenizer"]), checkpoint
