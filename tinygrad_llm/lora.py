"""LoRA: a trainable low-rank update beside frozen linear layers (Hu et al. 2021), its adapter
files, and the Hugging Face PEFT layout.

    y = x @ W + b                                        a frozen Linear, W (in, out)
    y = x @ W + b + (alpha / r) * dropout(x) @ A @ B     A (in, r), B (r, out), r << in, out

Only A and B train: r (in + out) numbers per layer instead of in * out. B starts at zero, so a
freshly wrapped model computes exactly what its base computes. ``merge_lora`` folds the update
into W (W + (alpha / r) A @ B), so a finished adapter costs nothing at inference.

Adapter folders (``save_adapter`` / ``load_adapter``)::

    DIR/adapter.safetensors     h.0.attn.c_attn.lora_A (in, r), h.0.attn.c_attn.lora_B (r, out) ...
    DIR/adapter_config.json     rank, alpha, targets, dropout, base, wrapped layer names

The PEFT layout (``export_peft``; ``load_adapter`` reads it too), which ``peft.PeftModel`` loads
onto ``transformers``' GPT2LMHeadModel. PyTorch stores weights (out, in), so A and B are
transposed; GPT-2's c_attn/c_proj/c_fc are ``Conv1D`` layers with (in, out) weights, hence
``fan_in_fan_out: true``::

    DIR/adapter_model.safetensors   base_model.model.transformer.h.0.attn.c_attn.lora_A.weight
                                    (r, in), ...lora_B.weight (out, r), ...
    DIR/adapter_config.json         peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, ...
"""

from __future__ import annotations

import copy
import fnmatch
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from . import backend
from . import functional as F
from .checkpoint import read_json, write_json
from .nn import Linear, Module, Parameter
from .tensor import array_on

FORMAT = "tinygrad_llm.lora/1"
WEIGHTS = "adapter.safetensors"
CONFIG = "adapter_config.json"  # the same name in both layouts
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc")  # every attention and MLP projection of GPT-2


@dataclass
class LoRAConfig:
    """What ``apply_lora`` (or ``load_adapter``) did to a model; kept as ``model.lora_config``."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple = DEFAULT_TARGETS
    dropout: float = 0.0
    base: str | None = None  # the base model the adapter was trained on, when known


def kaiming_uniform(in_features: int, rank: int) -> np.ndarray:
    """A's initialisation (in, r): PyTorch's kaiming_uniform_(a=sqrt(5)), as PEFT uses."""
    # PEFT stores A as (r, in) with fan_in = in. gain = sqrt(2 / (1 + a^2)) = sqrt(1/3) and
    # bound = gain * sqrt(3 / fan_in) = 1 / sqrt(in): A ~ U(-1/sqrt(in), 1/sqrt(in))
    bound = 1.0 / math.sqrt(in_features)
    rng = backend.generator("cpu")  # like nn's initialisation: the same numbers on every device
    return rng.uniform(-bound, bound, (in_features, rank)).astype(np.float32)


class LoRALinear(Module):
    """A frozen Linear plus a trainable low-rank update: x (..., in) -> (..., out).

    Args:
        base: the Linear to adapt, weight (in, out); its parameters are frozen.
        rank: r, the inner size of lora_A (in, r) and lora_B (r, out).
        alpha: the update is scaled by alpha / rank.
        dropout: probability of zeroing inputs of the LoRA path, while training only.
    """

    def __init__(self, base: Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        _check_settings(rank, alpha, dropout)
        in_features, out_features = base.weight.shape
        device, dtype = base.weight.device, base.weight.dtype
        self.base = base.requires_grad_(False)
        a = array_on(kaiming_uniform(in_features, rank), device).astype(dtype)
        self.lora_A = Parameter(a)  # (in, r), random
        b = backend.array_module(device).zeros((rank, out_features), dtype)
        self.lora_B = Parameter(b)  # (r, out), zero: the update B A starts at 0
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.scale = alpha / rank
        self.merged = False  # True while base.weight holds W + scale A B
        self.training = base.training

    def forward(self, x):
        y = self.base(x)  # x @ W + b: (..., in) -> (..., out)
        if self.merged:
            return y  # W already includes the update
        x = F.dropout(x, self.dropout, self.training)  # only on the LoRA path
        h = F.linear(x, self.lora_A) * self.scale  # x @ A * (alpha / r): (..., in) -> (..., r)
        return y + F.linear(h, self.lora_B)  # + h @ B: (..., r) -> (..., out)

    def delta(self):
        """The update scale * A @ B as an array (in, out) on the layer's device."""
        update = self.lora_A.data @ self.lora_B.data  # (in, r) @ (r, out) -> (in, out)
        return (update * self.scale).astype(self.lora_A.dtype, copy=False)

    def merge(self) -> None:
        """W <- W + scale A B; the LoRA path is skipped until ``unmerge``."""
        if not self.merged:
            weight = self.base.weight
            weight.data = weight.data + self.delta()  # a new array: never change one a caller holds
            self.merged = True

    def unmerge(self) -> None:
        """W <- W - scale A B: the base weight again (up to float rounding)."""
        if self.merged:
            weight = self.base.weight
            weight.data = weight.data - self.delta()
            self.merged = False


# ---------------------------------------------------------------------- finding layers
def _walk(module: Module, prefix: str = ""):
    """(dotted name, parent, attribute, child) for every module below ``module``; the insides of a
    LoRALinear are not entered (its ``base`` is not a layer of its own)."""
    for attribute, child in module.named_children():
        yield prefix + attribute, module, attribute, child
        if not isinstance(child, LoRALinear):
            yield from _walk(child, f"{prefix}{attribute}.")


def lora_layers(model: Module) -> dict[str, LoRALinear]:
    """Dotted name -> LoRALinear, in model order."""
    return {name: child for name, _, _, child in _walk(model) if isinstance(child, LoRALinear)}


def _matches(name: str, pattern: str) -> bool:
    """PEFT's rule: the full name, or its last components (``c_proj``, ``attn.c_proj``); a
    pattern with * ? [ is a glob over the full name (``h.1?.mlp.*``)."""
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def _describe(names) -> str:
    """Layer names with block numbers folded: 'h.N.attn.c_attn (N = 0..11), lm_head'."""
    folded, numbers = {}, set()
    for name in names:
        parts = name.split(".")
        numbers |= {int(p) for p in parts if p.isdigit()}
        folded.setdefault(".".join("N" if p.isdigit() else p for p in parts), None)
    text = ", ".join(folded)
    if numbers:
        text += f" (N = {min(numbers)}..{max(numbers)})"
    return text or "none"


def _some(names, shown: int = 3) -> str:
    """'a, b, c and 5 more': a list that stays one readable line."""
    names = list(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _select(model: Module, targets, exact: bool = False) -> list[tuple]:
    """The (name, parent, attribute, Linear) to wrap: matching any of ``targets`` (or equal to
    one, with ``exact``). A target that matches nothing is an error."""
    if isinstance(targets, str):
        targets = (targets,)
    if not targets:
        raise ValueError("no LoRA targets given: name the layers to adapt, e.g. c_attn c_proj")
    linears = [entry for entry in _walk(model) if isinstance(entry[3], Linear)]
    match = (lambda name, target: name == target) if exact else _matches
    chosen = [entry for entry in linears if any(match(entry[0], t) for t in targets)]
    unmatched = [t for t in targets if not any(match(entry[0], t) for entry in linears)]
    if unmatched:
        raise ValueError(f"LoRA target{'s' if len(unmatched) > 1 else ''} "
                         f"{', '.join(map(repr, unmatched))} match{'es' * (len(unmatched) == 1)} "
                         f"no linear layer of the model; its linear layers are "
                         f"{_describe(e[0] for e in linears)}")
    return chosen


def _refuse_existing(model: Module) -> None:
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers: remove them (remove_lora) before "
                         "adding new ones, or start from a fresh model")


def _check_settings(rank, alpha, dropout) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 \
            or not math.isfinite(alpha):
        raise ValueError(f"LoRA alpha must be a number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
            or not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be a probability in [0, 1), got {dropout!r}")


# ------------------------------------------------------------------- adding and folding
def _wrap(model: Module, chosen: list, config: LoRAConfig) -> list[str]:
    model.requires_grad_(False)  # only A and B train
    for _, parent, attribute, linear in chosen:
        setattr(parent, attribute, LoRALinear(linear, config.rank, config.alpha, config.dropout))
    model.lora_config = config
    return [entry[0] for entry in chosen]


def apply_lora(model: Module, rank: int = 8, alpha: float = 16.0, targets=DEFAULT_TARGETS,
               dropout: float = 0.0) -> list[str]:
    """Wrap the Linear layers whose names match ``targets`` in LoRALinear, in place, and freeze
    every other parameter; returns the wrapped names (``h.0.attn.c_attn``, ...).

    Args:
        rank: r of every A (in, r) and B (r, out).
        alpha: the update is scaled by alpha / rank.
        targets: name patterns: a layer's full name or its last components (``c_proj`` matches
            both h.N.attn.c_proj and h.N.mlp.c_proj), or a glob (``h.1?.*``).
        dropout: probability of zeroing inputs of the LoRA path while training.
    """
    _check_settings(rank, alpha, dropout)
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    _refuse_existing(model)
    chosen = _select(model, targets)
    return _wrap(model, chosen, LoRAConfig(int(rank), alpha, targets, dropout))


def _require_lora(model: Module) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers: call apply_lora or load_adapter first")
    return layers


def merge_lora(model: Module) -> None:
    """Fold every update into its weight (W + scale A B); the LoRA paths are skipped until
    ``unmerge_lora``."""
    for layer in _require_lora(model).values():
        layer.merge()


def unmerge_lora(model: Module) -> None:
    """Take every update out of its weight again, so A and B can train on."""
    for layer in _require_lora(model).values():
        layer.unmerge()


def remove_lora(model: Module) -> Module:
    """Merge every update and put the plain Linear layers back, in place: the model is then an
    ordinary one (every parameter trainable again), ready for ``loading.save_model``."""
    for _, parent, attribute, child in list(_walk(model)):
        if isinstance(child, LoRALinear):
            child.merge()
            setattr(parent, attribute, child.base)
    model.requires_grad_(True)
    vars(model).pop("lora_config", None)
    return model


def merged_model(model: Module) -> Module:
    """A copy of ``model`` with every update merged and no LoRA layers; ``model`` is unchanged."""
    _require_lora(model)
    return remove_lora(copy.deepcopy(model))


def lora_state_dict(model: Module) -> dict[str, np.ndarray]:
    """Only the adapter, copied: ``h.0.attn.c_attn.lora_A`` (in, r), ``...lora_B`` (r, out) ..."""
    state = {}
    for name, layer in _require_lora(model).items():
        state[f"{name}.lora_A"] = np.array(backend.to_numpy(layer.lora_A.data), copy=True)
        state[f"{name}.lora_B"] = np.array(backend.to_numpy(layer.lora_B.data), copy=True)
    return state


def _settings(model: Module) -> LoRAConfig:
    """The model's LoRAConfig, checked against its layers (one rank, alpha, dropout for all)."""
    layers = _require_lora(model)
    found = {(layer.rank, layer.alpha, layer.dropout) for layer in layers.values()}
    if len(found) > 1:
        raise ValueError("the LoRA layers differ in rank, alpha or dropout: an adapter file holds "
                         "one setting for all layers")
    rank, alpha, dropout = found.pop()
    saved = getattr(model, "lora_config", None)
    targets = saved.targets if saved is not None else tuple(layers)
    return LoRAConfig(rank, alpha, tuple(targets), dropout, saved.base if saved else None)


# ------------------------------------------------------------------------ adapter files
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_tensors(path: Path, tensors: dict, metadata: dict) -> None:
    """Write a safetensors file atomically: a temporary file renamed over the old one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
                  metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes 0600; give it the umask's mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _number(value):
    """16.0 -> 16 (JSON that reads like what the user typed); other numbers as they are."""
    return int(value) if float(value).is_integer() else float(value)


def save_adapter(directory, model: Module, base: str | None = None) -> Path:
    """Write the adapter of ``model`` (only A and B) to ``directory``: adapter.safetensors and
    adapter_config.json, each written to a temporary file and renamed into place (the weights
    first, the config last).

    Args:
        base: the base model's folder, recorded in the config (default: the one the model's
            adapter was loaded with, if any).
    """
    config = _settings(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base = str(base) if base is not None else config.base
    _write_tensors(directory / WEIGHTS, lora_state_dict(model), {"format": FORMAT})
    write_json(directory / CONFIG, {
        "format": FORMAT, "rank": config.rank, "alpha": _number(config.alpha),
        "targets": list(config.targets), "dropout": config.dropout, "base": base,
        "wrapped": list(lora_layers(model)),
    })
    return directory


def _read_tensors(path: Path) -> dict:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}); the adapter is "
                         "corrupt or incomplete") from None


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the adapter folder is incomplete")
    config = read_json(path, "adapter config")
    if not isinstance(config, dict):
        raise ValueError(f"{path} should hold a JSON object")
    return config


def _field(config: dict, key: str, kinds: tuple, path: Path, default=None):
    """config[key], checked to be one of ``kinds`` (bool is not a number here)."""
    value = config.get(key, default)
    if not isinstance(value, kinds) or isinstance(value, bool):
        expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise ValueError(f"{path}: {key!r} is {value!r}, expected {expected}; the adapter "
                         "config is damaged")
    return value


def _read_ours(directory: Path) -> tuple[LoRAConfig, list[str], dict]:
    path = directory / CONFIG
    config = _read_config(path)
    settings = LoRAConfig(
        rank=_field(config, "rank", (int,), path),
        alpha=_field(config, "alpha", (int, float), path),
        targets=tuple(_field(config, "targets", (list,), path)),
        dropout=_field(config, "dropout", (int, float), path, 0.0),
        base=_field(config, "base", (str, type(None)), path))
    wrapped = _field(config, "wrapped", (list,), path)
    if not wrapped or not all(isinstance(name, str) for name in wrapped):
        raise ValueError(f"{path}: 'wrapped' should list the adapted layers' names")
    try:
        _check_settings(settings.rank, settings.alpha, settings.dropout)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return settings, wrapped, _read_tensors(directory / WEIGHTS)


def _read_peft(directory: Path) -> tuple[LoRAConfig, list[str], dict]:
    """A PEFT LoRA adapter of GPT-2 in our names and layout: A (in, r), B (r, out)."""
    path = directory / CONFIG
    config = _read_config(path)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters "
                         "(peft_type LORA) can be loaded")
    unsupported = [key for key in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern",
                                   "modules_to_save", "lora_bias", "layers_to_transform")
                   if config.get(key)] + (["bias"] if config.get("bias", "none") != "none" else [])
    if unsupported:
        raise ValueError(f"{path}: the adapter uses PEFT features this project does not "
                         f"implement ({', '.join(unsupported)}); only plain LoRA loads")
    targets = config.get("target_modules")
    settings = LoRAConfig(
        rank=_field(config, "r", (int,), path),
        alpha=_field(config, "lora_alpha", (int, float), path),
        targets=(targets,) if isinstance(targets, str) else tuple(targets or ()),
        dropout=_field(config, "lora_dropout", (int, float), path, 0.0),
        base=_field(config, "base_model_name_or_path", (str, type(None)), path))
    try:
        _check_settings(settings.rank, settings.alpha, settings.dropout)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    tensors, wrapped = {}, []
    pattern = re.compile(rf"{re.escape(PEFT_PREFIX)}(?:transformer\.)?(.+)\.lora_([AB])\.weight")
    for key, array in _read_tensors(directory / PEFT_WEIGHTS).items():
        found = pattern.fullmatch(key)
        if found is None:
            raise ValueError(f"{directory / PEFT_WEIGHTS}: unexpected tensor {key}: not a LoRA "
                             "weight of a GPT-2 layer (base_model.model.transformer.h.N.*."
                             "lora_A.weight)")
        name, which = found.groups()
        if name not in wrapped:
            wrapped.append(name)
        tensors[f"{name}.lora_{which}"] = array.T  # PyTorch's (out, in) -> ours (in, out)
    return settings, wrapped, tensors


def load_adapter(directory, model: Module) -> list[str]:
    """Apply LoRA to ``model`` as the adapter in ``directory`` was trained, and load its A and B;
    returns the wrapped names. Reads this project's layout (adapter.safetensors) or PEFT's
    (adapter_model.safetensors). Nothing changes in ``model`` unless the adapter fits it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter folder {directory} does not exist")
    if (directory / WEIGHTS).is_file():
        settings, wrapped, tensors = _read_ours(directory)
        source = directory / WEIGHTS
    elif (directory / PEFT_WEIGHTS).is_file():
        settings, wrapped, tensors = _read_peft(directory)
        source = directory / PEFT_WEIGHTS
    else:
        raise FileNotFoundError(f"{directory} is not a LoRA adapter: it holds neither {WEIGHTS} "
                                f"(save_adapter) nor {PEFT_WEIGHTS} (PEFT)")
    _refuse_existing(model)
    layers = [name for name, _, _, child in _walk(model) if isinstance(child, Linear)]
    absent = [name for name in wrapped if name not in layers]
    if absent:
        raise ValueError(f"{directory}: the adapter adapts layers this model does not have "
                         f"({_some(absent)}; the model's linear layers are {_describe(layers)}); "
                         "it was trained on another base model")
    chosen = _select(model, wrapped, exact=True)
    _check_tensors(chosen, settings.rank, tensors, source)
    names = _wrap(model, chosen, settings)
    for name, layer in lora_layers(model).items():
        for which in ("A", "B"):
            parameter = getattr(layer, f"lora_{which}")
            parameter.data = array_on(tensors[f"{name}.lora_{which}"], parameter.device) \
                .astype(parameter.dtype, copy=True)
    return names


def _check_tensors(chosen: list, rank: int, tensors: dict, source: Path) -> None:
    """Every A (in, r) and B (r, out) present, of the shape its layer needs, and finite."""
    needed = {}
    for name, _, _, linear in chosen:
        in_features, out_features = linear.weight.shape
        needed[f"{name}.lora_A"] = (in_features, rank)
        needed[f"{name}.lora_B"] = (rank, out_features)
    missing = [key for key in needed if key not in tensors]
    unexpected = [key for key in tensors if key not in needed]
    if missing or unexpected:
        parts = ([f"missing {_some(missing)}"] if missing else []) + \
                ([f"unexpected {_some(unexpected)}"] if unexpected else [])
        raise ValueError(f"{source} does not match its adapter config: {'; '.join(parts)}; the "
                         "adapter is corrupt or incomplete")
    wrong = [f"{key} has shape {tuple(tensors[key].shape)} but this model needs {shape}"
             for key, shape in needed.items() if tuple(tensors[key].shape) != shape]
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ValueError(f"adapter tensor {wrong[0]}{more}: the adapter in {source.parent} was "
                         "trained on a base model of another shape (or with another rank)")
    for key in needed:
        if not np.isfinite(tensors[key]).all():
            raise ValueError(f"adapter tensor {key} in {source} holds NaN or infinite values; "
                             "the adapter is damaged (or its training diverged)")


# ---------------------------------------------------------------------- the PEFT layout
GPT2_LAYER = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)|lm_head")


def _hf_name(name: str) -> str:
    """Our layer name -> the module name inside transformers' GPT2LMHeadModel."""
    return name if name == "lm_head" else "transformer." + name


def _peft_targets(model: Module, wrapped: list[str]) -> list[str]:
    """target_modules: the short names (c_attn, c_proj ...) when they select exactly the wrapped
    layers (they do for the default targets), else every wrapped layer's full name."""
    short = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in wrapped))
    linears = [name for name, _, _, child in _walk(model)
               if isinstance(child, (Linear, LoRALinear))]
    if {name for name in linears if name.rsplit(".", 1)[-1] in short} == set(wrapped):
        return short
    return [_hf_name(name) for name in wrapped]


def export_peft(directory, model: Module, base: str | None = None) -> Path:
    """Write the adapter of a GPT in Hugging Face PEFT's layout: adapter_model.safetensors
    (A as (r, in), B as (out, r)) and adapter_config.json, which ``PeftModel.from_pretrained``
    loads onto ``GPT2LMHeadModel`` to give the same logits.

    Args:
        base: recorded as base_model_name_or_path (a hub name or folder of the base model).
    """
    config = _settings(model)
    layers = lora_layers(model)
    foreign = [name for name in layers if not GPT2_LAYER.fullmatch(name)]
    if foreign:
        raise ValueError(f"export_peft writes GPT-2's layout; the LoRA layers {', '.join(foreign)} "
                         "have no counterpart in transformers' GPT2LMHeadModel")
    tensors = {}
    for name, layer in layers.items():
        key = PEFT_PREFIX + _hf_name(name)
        tensors[f"{key}.lora_A.weight"] = backend.to_numpy(layer.lora_A.data).T  # (r, in)
        tensors[f"{key}.lora_B.weight"] = backend.to_numpy(layer.lora_B.data).T  # (out, r)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_tensors(directory / PEFT_WEIGHTS, tensors, {"format": "pt"})
    write_json(directory / CONFIG, {  # fields every PEFT version since 0.3 understands
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base) if base is not None else config.base,
        "inference_mode": True, "r": config.rank, "lora_alpha": _number(config.alpha),
        "lora_dropout": config.dropout, "target_modules": _peft_targets(model, list(layers)),
        "fan_in_fan_out": True,  # GPT-2's Conv1D weights are (in, out)
        "bias": "none", "modules_to_save": None, "init_lora_weights": True,
    })
    return directory


__all__ = ["LoRAConfig", "LoRALinear", "apply_lora", "merge_lora", "unmerge_lora", "remove_lora",
           "merged_model", "lora_layers", "lora_state_dict", "save_adapter", "load_adapter",
           "export_peft", "kaiming_uniform", "DEFAULT_TARGETS"]
