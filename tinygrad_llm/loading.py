"""Models from folders and back: the one place that turns a checkpoint into a model.

    load_model(DIR)   a checkpoint of this project, the run folder holding one (DIR/checkpoint),
                      or a Hugging Face GPT-2 folder  ->  (model, tokenizer, checkpoint dict)
    save_model(DIR, model, tokenizer, ...)   the reverse, for this project's layout
    build_model(config)                      a GPT from the "model" entry of a config.json

It sits above ``checkpoint.py`` (folder I/O) and ``hf.py`` (the Hugging Face layout) and is the
only module that knows both.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np

from . import hf
from .checkpoint import find_checkpoint, is_checkpoint, load_checkpoint, save_checkpoint
from .models.gpt import GPT, GPTConfig
from .tokenizer import tokenizer_from_config


def model_config(values, source="config.json") -> GPTConfig:
    """A GPTConfig from a config dict, every field present and of the right type.

    A missing field is an error rather than GPT-2's default: a checkpoint whose config lost its
    ``n_embd`` must not silently become a 768-wide model.
    """
    if not isinstance(values, dict):
        raise ValueError(f"{source}: the 'model' entry should be a JSON object, got "
                         f"{type(values).__name__}")
    unknown = sorted(set(values) - {f.name for f in fields(GPTConfig)})
    if unknown:
        raise ValueError(f"{source}: unknown model settings {', '.join(unknown)}")
    checked = {}
    for field in fields(GPTConfig):
        if field.name not in values:
            raise ValueError(f"{source}: the model setting {field.name!r} is missing; the file "
                             "is damaged or not from tinygrad_llm")
        value, kind = values[field.name], GPTConfig.__annotations__[field.name]
        ok = {"int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool),
              "bool": isinstance(value, bool)}[kind]
        if not ok or (kind == "int" and value <= 0):
            raise ValueError(f"{source}: the model setting {field.name!r} should be a "
                             f"{'positive ' if kind == 'int' else ''}{kind}, got {value!r}")
        checked[field.name] = value
    return GPTConfig(**checked)


def build_model(config: dict, source="config.json") -> GPT:
    """A freshly initialised GPT of the shape that a config.json's 'model' entry describes."""
    return GPT(model_config(config, source))


def _checkpoint_folder(directory: Path) -> Path:
    """A run folder of `pretrain --out` holds its checkpoint in checkpoint/."""
    if not is_checkpoint(directory) and is_checkpoint(directory / "checkpoint"):
        return directory / "checkpoint"
    return directory


def check_finite(model, source) -> None:
    """Refuse weights with NaN or infinity: such a model generates garbage and trains on NaN."""
    for name, parameter in model.named_parameters():
        if not np.isfinite(parameter.numpy()).all():
            raise ValueError(f"{source}: the weights of {name} hold NaN or infinite values; the "
                             "checkpoint is damaged (or its training diverged)")


def load_model(directory, device: str = "cpu"):
    """Load a GPT from a checkpoint of this project (or the run folder holding one) or a
    Hugging Face GPT-2 folder.

    Returns (model, tokenizer, checkpoint dict); for a Hugging Face folder the dict holds only
    its config.
    """
    directory = _checkpoint_folder(Path(directory))
    if hf.is_hf_gpt2_folder(directory):
        model, tokenizer = hf.load_gpt2(directory)
        check_finite(model, directory)
        return model.to(device), tokenizer, {
            "config": {"model": model.config.to_dict(), "tokenizer": tokenizer.to_config()},
            "state": None, "optimizer": None, "weights": None, "path": directory}
    checkpoint = load_checkpoint(directory)
    config = checkpoint["config"]
    source = f"{checkpoint['path'] / 'config.json'}"
    if "model" not in config or "tokenizer" not in config:
        raise ValueError(f"{source} has no 'model' and 'tokenizer' entries: it is not a "
                         "tinygrad_llm GPT checkpoint")
    if "classifier" in config:
        raise ValueError(f"{checkpoint['path']} is a classifier (finetune-classifier), not a "
                         "language model; use `tinygrad-llm classify` with it")
    if not isinstance(config["tokenizer"], dict):
        raise ValueError(f"{source}: the 'tokenizer' entry should be a JSON object")
    model = build_model(config["model"], source)
    model.load_state_dict(checkpoint["weights"])
    check_finite(model, checkpoint["path"])
    tokenizer = tokenizer_from_config(config["tokenizer"])
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the "
                         f"model only {model.config.vocab_size}; the checkpoint is inconsistent")
    return model.to(device), tokenizer, checkpoint


def save_model(directory, model, tokenizer, state: dict | None = None, optimizer=None,
               extra: dict | None = None) -> Path:
    """Save a GPT with its config and tokenizer (and, while training, optimizer and state)."""
    config = {"model": model.config.to_dict(), "tokenizer": tokenizer.to_config(), **(extra or {})}
    return save_checkpoint(directory, model.state_dict(), config, state,
                           optimizer.state_dict() if optimizer is not None else None)


__all__ = ["load_model", "save_model", "build_model", "model_config", "check_finite",
           "find_checkpoint"]
