"""Layers: Module (the container of parameters) and the building blocks of a GPT.

A Module finds its parameters by looking at its attributes: every ``Parameter``, every
sub-``Module`` and every ``ModuleList``, in the order they were assigned. Their dotted names
(``h.0.attn.c_attn.weight``) are the keys of ``state_dict``, of checkpoints and of GPT-2's own
files.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from . import backend
from . import functional as F
from .tensor import Tensor, array_on


class Parameter(Tensor):
    """A Tensor that a Module trains (requires_grad=True unless frozen)."""

    __slots__ = ()

    def __init__(self, data, requires_grad: bool = True):
        super().__init__(data, requires_grad=requires_grad)


class Module:
    """Base class: parameters, state_dict, train/eval, device and dtype moves, freezing."""

    training = True

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ------------------------------------------------------------------ walking the tree
    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """(dotted name, parameter) for every parameter below, each once, in definition order."""
        seen = set()
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                if id(value) not in seen:
                    seen.add(id(value))
                    yield prefix + name, value
            elif isinstance(value, Module):
                for sub_name, parameter in value.named_parameters(prefix + name + "."):
                    if id(parameter) not in seen:
                        seen.add(id(parameter))
                        yield sub_name, parameter

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def modules(self) -> Iterator[Module]:
        yield self
        for _, child in self.named_children():
            yield from child.modules()

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.size for p in self.parameters() if p.requires_grad or not trainable_only)

    # --------------------------------------------------------------------------- modes
    def train(self, mode: bool = True) -> Module:
        for module in self.modules():
            module.training = mode
        return self

    def eval(self) -> Module:
        return self.train(False)

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        """Freeze (False) or unfreeze (True) every parameter below."""
        for parameter in self.parameters():
            parameter.requires_grad = requires_grad
        return self

    def zero_grad(self) -> None:
        for parameter in self.parameters():
            parameter.grad = None

    def to(self, device=None, dtype=None) -> Module:
        """Move every parameter to ``device`` and/or cast it to ``dtype``, in place."""
        for parameter in self.parameters():
            data = parameter.data
            if device is not None:
                data = backend.to_device(data, device)
                parameter.device = backend.normalize_device(device)
            if dtype is not None:
                data = data.astype(dtype)
            parameter.data, parameter.grad = data, None
        return self

    @property
    def device(self) -> str:
        """Where the first parameter lives. Only the first is looked at: ``parameters()``
        walks the whole tree, which cost 1.5 ms per token GPT-2 generated."""
        return next(parameter for _, parameter in self.named_parameters()).device

    # ------------------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameter name -> NumPy array (copied off the GPU)."""
        return {name: backend.to_numpy(p.data) for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays into the parameters, checking names and shapes first.

        Raises a ValueError that lists every missing, unexpected and mis-shaped entry; nothing is
        changed unless everything matches (with ``strict=False`` missing/unexpected are allowed).
        The arrays may be NumPy or CuPy arrays or Tensors, on any device: each is copied onto the
        model's device and cast to its parameter's dtype.
        """
        own = dict(self.named_parameters())
        missing = [name for name in own if name not in state]
        unexpected = [name for name in state if name not in own]
        wrong = [f"{name} is {tuple(state[name].shape)} in the checkpoint but {own[name].shape} "
                 "in the model" for name in own
                 if name in state and tuple(state[name].shape) != own[name].shape]
        problems = []
        if wrong:
            problems.append("shape mismatch: " + _first(wrong))
        if strict and missing:
            problems.append("missing from the checkpoint: " + _first(missing))
        if strict and unexpected:
            problems.append("not in the model: " + _first(unexpected))
        if problems:  # one line: the first few of each kind, and how many more
            raise ValueError("the weights do not fit this model (another architecture or "
                             "config?): " + "; ".join(problems))
        for name, parameter in own.items():
            if name in state:
                array = array_on(state[name], parameter.device)  # NumPy -> CuPy when on the GPU
                parameter.data = array.astype(parameter.dtype, copy=True)


def _first(names: list, shown: int = 3) -> str:
    """The first few entries of a list, and how many more there are."""
    more = f" (and {len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


class ModuleList(Module):
    """A list of modules whose parameters are named by position: ``h.0.``, ``h.1.`` ..."""

    def __init__(self, modules=()):
        for i, module in enumerate(modules):
            setattr(self, str(i), module)

    def __iter__(self) -> Iterator[Module]:
        return (getattr(self, str(i)) for i in range(len(self)))

    def __getitem__(self, index: int) -> Module:
        return getattr(self, str(range(len(self))[index]))

    def __len__(self) -> int:
        return sum(1 for name in vars(self) if name.isdigit())


def _normal(shape: tuple, std: float) -> np.ndarray:
    return backend.generator("cpu").standard_normal(shape, dtype=np.float32) * np.float32(std)


class Linear(Module):
    """y = x @ weight + bias, weight (in_features, out_features) as in GPT-2's checkpoints."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, std: float = 0.02):
        self.weight = Parameter(_normal((in_features, out_features), std))
        self.bias = Parameter(np.zeros(out_features, np.float32)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)  # (..., in) -> (..., out)


class Embedding(Module):
    """A table of ``num_embeddings`` vectors of size ``dim``, looked up by integer ids."""

    def __init__(self, num_embeddings: int, dim: int, std: float = 0.02):
        self.weight = Parameter(_normal((num_embeddings, dim), std))

    def forward(self, ids) -> Tensor:
        return F.embedding(ids, self.weight)  # (B, T) -> (B, T, dim)


class LayerNorm(Module):
    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        self.weight = Parameter(np.ones(dim, np.float32))
        self.bias = Parameter(np.zeros(dim, np.float32)) if bias else None
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        self.weight = Parameter(np.ones(dim, np.float32))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.weight, self.eps)


class Dropout(Module):
    def __init__(self, p: float = 0.1):
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training)
