"""Tensor and Function: a reverse-mode automatic differentiation engine in one reading.

A ``Tensor`` wraps an array (NumPy or CuPy). Every differentiable operation is a ``Function``
(see ``functional.py``) with a ``forward`` that computes the output array and a ``backward`` that
maps the gradient of the output to gradients of the inputs. Applying a Function to tensors that
require gradients records the Function on its output (``out._ctx``); ``loss.backward()`` then
walks that graph from the loss back to the leaves in reverse topological order.

Three rules keep it correct and lean:
- Broadcasting is undone in one place (``unbroadcast``), so a backward may return a gradient of
  the broadcast shape and never has to think about it.
- Gradients accumulate into the ``.grad`` of leaves across backward calls (zero them yourself).
- After backward the graph is freed (each Function drops its saved arrays as soon as it has run),
  unless ``retain_graph=True``.

Imports: the only import cycle of the library is tensor.py <-> functional.py. Tensor's operators
(``a + b``, ``x.sum()``) call the ops in functional.py, which build on Function and Tensor here,
so functional.py is imported at the end of this file, once both exist. Every other import in the
library goes one way, downwards (fused.py, for one, imports this module and never functional.py).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from . import backend


class _GradMode:
    """Whether operations record a graph; switched off by ``no_grad()``."""

    enabled = True


@contextlib.contextmanager
def no_grad():
    """Context manager: operations inside it record no graph (inference, optimizer updates)."""
    previous = _GradMode.enabled
    _GradMode.enabled = False
    try:
        yield
    finally:
        _GradMode.enabled = previous


def is_grad_enabled() -> bool:
    return _GradMode.enabled


def unbroadcast(grad, shape: tuple):
    """Sum ``grad`` down to ``shape``: the backward of NumPy broadcasting.

    Broadcasting (a) prepends dimensions and (b) stretches size-1 dimensions; an input used that
    way contributed to every position it was copied to, so its gradient is the sum over them.
    """
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)  # (a) leading dimensions that the input did not have
    stretched = tuple(extra + i for i, n in enumerate(shape)  # (b) size-1 dims that grew
                      if n == 1 and grad.shape[extra + i] != 1)
    return grad.sum(axis=tuple(range(extra)) + stretched).reshape(shape)


class SliceGrad:
    """A gradient that is zero except at ``x[index]`` (a basic index: ints and slices), where it
    is ``values``: what ``x[index]`` hands back to ``x`` (``F.getitem``'s backward).

    The backward walk keeps it in this form until a gradient of another kind arrives or ``x``'s
    turn comes, and the gradients of other slices of ``x`` join it as more parts (``join``; they
    stay alive until then). So the slices ``q, k, v = qkv[0], qkv[1], qkv[2]`` of one array are
    written into one new array, slice by slice, instead of three full arrays summed in two more
    passes; and as those three cover the array once each, it is not even zeroed first (only
    parts of the form ``x[i]``, ``x[i, ...]`` or ``x[i, :, ...]`` are recognised as covering;
    any other set of parts gets a zeroed array, and they add up in it). ``order``: x's axes in
    the order they lie in memory (``memory_order(x)``); the dense gradient is laid out the same
    way, so that it reaches the array x was viewed from (e.g. qkv before its permute)
    contiguous, and a reshape there needs no copy.
    """

    def __init__(self, shape: tuple, dtype, index, values, order=None):
        self.shape, self.dtype = shape, dtype
        self.parts = [(index, values)]  # (index, values) of each slice, in arrival order
        self.in_place = None  # set by ``dense``: the array the parts already lay in, if any
        self.order = tuple(range(len(shape))) if order is None else tuple(order)

    def join(self, other: SliceGrad) -> SliceGrad:
        """Add ``other``'s parts (a SliceGrad of the same tensor) to this one's: self + other."""
        self.parts += other.parts
        return self

    def dense(self):
        """The gradient as one array of x's shape. It is a new array, unless the parts already
        lie in one (``in_place``): then that array, which other code may also hold."""
        xp = backend.get_array_module(self.parts[0][1])
        tiles = self._tiles_first_axis()
        self.in_place = self._parts_in_place() if tiles and xp is np else None
        if self.in_place is not None:
            return self.in_place
        allocate = xp.empty if tiles else xp.zeros  # every position written, or zeros between
        in_memory = allocate(tuple(self.shape[axis] for axis in self.order), dtype=self.dtype)
        grad = in_memory.transpose(tuple(np.argsort(self.order)))  # axes back in x's order
        for number, (index, values) in enumerate(self.parts):
            if tiles or number == 0:  # no other part wrote here
                grad[index] = values
            else:  # parts may overlap: they add up
                grad[index] += values
        return grad

    def _parts_in_place(self):
        """When the parts are views of one C-contiguous array and each already lies where
        ``dense`` would write it: that array, seen in x's shape; else None. Attention's backward
        writes the gradients of q, k and v so (``fused._empty_like_views``): the gradient of the
        qkv projection is then not copied together from three arrays."""
        base = self.parts[0][1].base
        in_memory = tuple(self.shape[axis] for axis in self.order)
        if (not isinstance(base, np.ndarray) or base.dtype != self.dtype
                or not base.flags.c_contiguous
                or base.size != math.prod(in_memory)):
            return None
        grad = base.reshape(in_memory).transpose(tuple(np.argsort(self.order)))
        for index, values in self.parts:
            place = grad[index]
            if (values.base is not base or place.shape != values.shape
                    or place.strides != values.strides
                    or place.ctypes.data != values.ctypes.data):
                return None
        return grad

    def _tiles_first_axis(self) -> bool:
        """Whether the parts are x[0], x[1], ... x[n - 1] (in any order, each once), each written
        ``x[i]``, ``x[i, ...]`` or ``x[i, :, ...]``."""
        positions = []
        for index, _ in self.parts:
            if index == ():  # x[()]: the whole of x, not recognised
                return False
            first, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
            whole = all(i is Ellipsis or i == slice(None) for i in rest)
            if not whole or not isinstance(first, int) or isinstance(first, bool):
                return False
            positions.append(first % self.shape[0])
        return sorted(positions) == list(range(self.shape[0]))


def memory_order(x) -> tuple:
    """x's axes from the largest stride to the smallest: the order its elements lie in memory
    ((0, 1, ..) for a C-contiguous array; ties keep their order)."""
    return tuple(sorted(range(x.ndim), key=lambda axis: -abs(x.strides[axis])))


def _add_gradients(total, new, owned: set):
    """total + new, two gradients of one tensor (arrays or ``SliceGrad``s). Adds in place into an
    array that nothing else holds (its id in ``owned``: made by this walk, or returned by a
    Function with ``fresh_grads``), never into any other a backward returned: a backward may hand
    the same array to several inputs."""
    if isinstance(total, SliceGrad) and isinstance(new, SliceGrad):
        return total.join(new)  # made dense once, when the walk reaches the tensor
    if isinstance(total, SliceGrad) or (id(new) in owned and id(total) not in owned):
        total, new = new, total  # the full array first, one this walk may add into if any
    if id(total) not in owned:
        if not isinstance(new, SliceGrad):
            total = backend.add(total, new)
            owned.add(id(total))
            return total
        total = total.copy()
    owned.add(id(total))
    if isinstance(new, SliceGrad):
        for index, values in new.parts:
            total[index] += values
    else:
        backend.add(total, new, out=total)  # total += new
    return total


class Function:
    """One differentiable operation.

    Subclasses define ``forward(*arrays, **params) -> array`` and ``backward(grad) -> grads``
    (one gradient per input tensor, ``None`` where an input needs none). ``forward`` saves on
    ``self`` whatever ``backward`` needs. ``self.needs_input_grad`` says which inputs want a
    gradient, so a backward can skip work. A backward must never modify ``grad`` in place: the
    same array may also be handed to other Functions.
    """

    inputs: tuple = ()
    needs_input_grad: tuple = ()
    # True where every gradient ``backward`` returns is a new array that nothing else holds:
    # the walk may then keep it as a leaf's ``.grad`` and add into it without copying it first
    fresh_grads: bool = False

    def forward(self, *arrays, **params):
        raise NotImplementedError

    def backward(self, grad):
        raise NotImplementedError

    @classmethod
    def apply(cls, *tensors: Tensor, **params) -> Tensor:
        """Run ``forward`` on the tensors' arrays; record the graph when gradients are wanted."""
        device = tensors[0].device
        for tensor in tensors[1:]:
            if tensor.device != device:
                raise RuntimeError(
                    f"{cls.__name__}: inputs are on different devices ({device} and "
                    f"{tensor.device}); move them with .to(device) first"
                )
        ctx = cls()
        ctx.needs_input_grad = tuple(t.requires_grad for t in tensors)
        record = _GradMode.enabled and any(ctx.needs_input_grad)
        if not record:
            ctx.needs_input_grad = (False,) * len(tensors)
        out = Tensor._wrap(ctx.forward(*[t.data for t in tensors], **params), device, record)
        if record:
            ctx.inputs = tensors
            out._ctx = ctx
        return out


class _FreedGraph(Function):
    """Stands where a Function was after backward released it (``retain_graph=False``)."""

    def backward(self, grad):
        raise RuntimeError(
            "Trying to backward through the graph a second time: its saved arrays were freed. "
            "Pass retain_graph=True to the first backward() if you need a second one."
        )


_FREED = _FreedGraph()


class Tensor:
    """An n-dimensional array with an optional gradient.

    Its operators and methods forward to ``functional`` (``F``): the only import cycle, see the
    module docstring.

    Args:
        data: a NumPy/CuPy array, a Python number or nested list, or a Tensor.
        requires_grad: record operations on it and fill ``.grad`` on backward (floats only).
        device: 'cpu' (NumPy) or 'cuda' (CuPy); default: where ``data`` already lives, else CPU.
        dtype: array dtype; Python floats become float32, arrays keep their dtype.
    """

    __slots__ = ("data", "grad", "requires_grad", "device", "_ctx", "__weakref__")
    __array_ufunc__ = None  # make `numpy_array + tensor` call Tensor.__radd__

    def __init__(self, data, requires_grad: bool = False, device=None, dtype=None):
        if isinstance(data, Tensor):
            data = data.data
        if device is None:
            device = backend.device_of(data)
        device = backend.normalize_device(device)
        if backend.get_array_module(data) is np and not isinstance(data, np.ndarray):
            data = np.asarray(data)  # Python numbers and lists
            if dtype is None and data.dtype == np.float64:
                dtype = backend.DEFAULT_DTYPE
        data = backend.to_device(data, device)  # no copy when it is already there
        if dtype is not None and data.dtype != dtype:
            data = data.astype(dtype)
        if requires_grad and not np.issubdtype(data.dtype, np.floating):
            raise ValueError(
                f"only floating-point tensors can require gradients, got dtype {data.dtype} "
                "(integer tensors such as token ids never do)"
            )
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self.device = device
        self._ctx: Function | None = None

    @classmethod
    def _wrap(cls, data, device: str, requires_grad: bool) -> Tensor:
        """Fast constructor for arrays produced by ops (no conversion or checks)."""
        out = cls.__new__(cls)
        out.data, out.grad, out.requires_grad, out.device, out._ctx = (
            data, None, requires_grad, device, None)
        return out

    # ----------------------------------------------------------------------------- properties
    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def is_leaf(self) -> bool:
        """A tensor made by the user, not by an op; only leaves keep ``.grad``."""
        return self._ctx is None

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({backend.to_numpy(self.data)!r}, device='{self.device}'{grad})"

    # ------------------------------------------------------------------------------ conversion
    def numpy(self) -> np.ndarray:
        """The data as a NumPy array (a copy when it lives on the GPU)."""
        return backend.to_numpy(self.data)

    def item(self) -> float:
        """The value of a one-element tensor as a Python number."""
        return self.data.item()

    def tolist(self) -> list:
        return self.numpy().tolist()

    def detach(self) -> Tensor:
        """The same data, cut off from the graph (shares memory)."""
        return Tensor._wrap(self.data, self.device, False)

    def to(self, device) -> Tensor:
        """A copy on ``device`` (differentiable); ``self`` when it is already there."""
        return F.to_device(self, device)

    def cpu(self) -> Tensor:
        return self.to("cpu")

    # -------------------------------------------------------------------------------- backward
    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) * grad into ``leaf.grad`` for every leaf that requires it.

        Args:
            grad: upstream gradient of ``self``'s shape; may be omitted for a one-element tensor.
            retain_graph: keep the saved arrays so that backward can run through the graph again.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad (no graph)")
        xp = backend.array_module(self.device)
        if grad is None:
            if self.size != 1:
                raise RuntimeError(
                    f"backward() without a gradient needs a one-element output, got shape "
                    f"{self.shape}; pass grad= of that shape"
                )
            grad = xp.ones_like(self.data)
        else:
            grad = xp.asarray(grad.data if isinstance(grad, Tensor) else grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"grad has shape {grad.shape}, expected {self.shape}")

        grads = {id(self): grad}  # gradient of each node seen so far, summed over its uses
        owned = set()  # ids of the arrays in `grads` that nothing else holds (free to add into)
        for node in reversed(self._topological_order()):  # every consumer before its inputs
            grad = grads.pop(id(node), None)
            if grad is None:
                continue
            ours = id(grad) in owned
            owned.discard(id(grad))
            if isinstance(grad, SliceGrad):
                sliced, grad = grad, grad.dense()
                ours = sliced.in_place is None  # a new array, unless the parts lay in one
            if node._ctx is None:  # a leaf: accumulate into .grad
                grad = grad.astype(node.dtype, copy=False)
                if node.grad is None:  # own it: a backward's `grad` may alias another's
                    node.grad = grad if ours else grad.copy()
                else:
                    node.grad += grad
                continue
            ctx = node._ctx
            input_grads = ctx.backward(grad)
            if not isinstance(input_grads, tuple):
                input_grads = (input_grads,)
            for tensor, input_grad in zip(ctx.inputs, input_grads, strict=True):
                if input_grad is None or not tensor.requires_grad:
                    continue
                if not isinstance(input_grad, SliceGrad):  # (a SliceGrad has x's shape and dtype)
                    returned = input_grad
                    input_grad = unbroadcast(input_grad, tensor.shape)
                    if input_grad.dtype != tensor.dtype:  # a gradient has its tensor's dtype
                        input_grad = input_grad.astype(tensor.dtype)  # (float32 meets float16)
                    if ctx.fresh_grads or input_grad is not returned:  # a new array: ours
                        owned.add(id(input_grad))
                key = id(tensor)
                if key in grads:
                    total = _add_gradients(grads[key], input_grad, owned)
                    if total is not input_grad:  # added into the other one, or into a new one
                        owned.discard(id(input_grad))
                    grads[key] = total
                else:
                    grads[key] = input_grad
            if not retain_graph:
                node._ctx = _FREED  # drop saved activations now, not when the loss dies

    def _topological_order(self) -> list:
        """Tensors of the graph below ``self``, each after all of its inputs (iterative DFS)."""
        order, visited = [], set()
        stack = [(self, False)]
        while stack:
            node, inputs_done = stack.pop()
            if inputs_done:
                order.append(node)
                continue
            if id(node) in visited:
                continue
            visited.add(id(node))
            stack.append((node, True))  # comes back once every input below is placed
            if node._ctx is not None:
                for parent in node._ctx.inputs:
                    if parent.requires_grad and id(parent) not in visited:
                        stack.append((parent, False))
        return order

    def zero_grad(self) -> None:
        self.grad = None

    # -------------------------------------------------------------------- factory functions
    @staticmethod
    def zeros(*shape, requires_grad=False, device="cpu", dtype=backend.DEFAULT_DTYPE) -> Tensor:
        xp = backend.array_module(device)
        return Tensor(xp.zeros(_shape(shape), dtype=dtype), requires_grad, device)

    @staticmethod
    def ones(*shape, requires_grad=False, device="cpu", dtype=backend.DEFAULT_DTYPE) -> Tensor:
        xp = backend.array_module(device)
        return Tensor(xp.ones(_shape(shape), dtype=dtype), requires_grad, device)

    @staticmethod
    def randn(*shape, std=1.0, requires_grad=False, device="cpu",
              dtype=backend.DEFAULT_DTYPE) -> Tensor:
        """Normal(0, std) samples from the device's seeded generator."""
        data = backend.generator(device).standard_normal(_shape(shape), dtype=dtype)
        if std != 1.0:
            data *= std
        return Tensor(data, requires_grad, device)

    # --------------------------------------------------- operators and NumPy-style methods
    # Each forwards to the op of the same name in functional.py, where forward and backward live.
    def __add__(self, other): return F.add(self, other)
    def __radd__(self, other): return F.add(other, self)
    def __sub__(self, other): return F.sub(self, other)
    def __rsub__(self, other): return F.sub(other, self)
    def __mul__(self, other): return F.mul(self, other)
    def __rmul__(self, other): return F.mul(other, self)
    def __truediv__(self, other): return F.div(self, other)
    def __rtruediv__(self, other): return F.div(other, self)
    def __matmul__(self, other): return F.matmul(self, other)
    def __rmatmul__(self, other): return F.matmul(other, self)
    def __pow__(self, exponent): return F.pow(self, exponent)
    def __neg__(self): return F.neg(self)
    def __getitem__(self, index): return F.getitem(self, index)

    # comparisons give boolean tensors that never require grad; array operands move to our device
    def __lt__(self, other): return self._compare(self.data < array_on(other, self.device))
    def __le__(self, other): return self._compare(self.data <= array_on(other, self.device))
    def __gt__(self, other): return self._compare(self.data > array_on(other, self.device))
    def __ge__(self, other): return self._compare(self.data >= array_on(other, self.device))
    def _compare(self, result) -> Tensor: return Tensor._wrap(result, self.device, False)

    def exp(self): return F.exp(self)
    def log(self): return F.log(self)
    def sqrt(self): return F.sqrt(self)
    def tanh(self): return F.tanh(self)
    def relu(self): return F.relu(self)
    def sum(self, axis=None, keepdims=False): return F.sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return F.mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return F.max(self, axis, keepdims)
    def var(self, axis=None, keepdims=False, ddof=0): return F.var(self, axis, keepdims, ddof)
    def reshape(self, *shape): return F.reshape(self, _shape(shape))
    def transpose(self, *axes): return F.transpose(self, _shape(axes) or None)
    def permute(self, *axes): return F.transpose(self, _shape(axes))
    def swapaxes(self, axis1, axis2): return F.swapaxes(self, axis1, axis2)
    def softmax(self, axis=-1): return F.softmax(self, axis)
    def log_softmax(self, axis=-1): return F.log_softmax(self, axis)

    @property
    def T(self): return F.transpose(self, None)


def _shape(args: tuple) -> tuple:
    """Accept both f(2, 3) and f((2, 3))."""
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return tuple(args[0])
    return tuple(args)


def array_on(x, device: str):
    """``x`` as an array of ``device``: a Tensor's array, or an array or list moved there.

    Operands that are not Tensors (conditions, masks, ids, state dicts) often arrive as NumPy
    arrays while the tensor they meet lives on the GPU, and CuPy refuses NumPy arrays: they are
    copied over here (no copy when already there). Python numbers are returned as they are.
    """
    if isinstance(x, Tensor):
        x = x.data
    if isinstance(x, (bool, int, float)):
        return x
    return backend.to_device(x, device)


# functional.py builds on Function and Tensor above, so it is imported last.
from . import functional as F  # noqa: E402
