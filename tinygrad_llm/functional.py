"""The primitives: every basic differentiable op, each a ``Function`` with forward and backward.

Imported as ``F``. Each op is a small class (the math) plus a lowercase function (the public
name, with PyTorch's argument order and NumPy's ``axis=``). Bodies use ``xp``, the array module of
their inputs, so the same code runs on NumPy and CuPy. Backwards may return gradients of the
broadcast shape: ``tensor.unbroadcast`` sums them back in one place.

This file reads like micrograd: arithmetic, unary math, activations, matmul and linear,
reductions, shape ops, indexing, masks, softmax and dropout, each written as its plain formula.
The performance-tuned transformer ops (cross-entropy, the fused LM head + loss, layer and RMS
norm, embedding, attention) live in ``fused.py`` and are re-exported at the end of this file, so
``F.<name>`` is the one spelling of every op.

Notation in comments: ``g`` is the gradient of the loss with respect to the op's output.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import math
import threading

import numpy as np

from . import backend, cpu_kernels, cuda_kernels
from .tensor import Function, SliceGrad, Tensor, array_on, memory_order, unbroadcast

get_xp = backend.get_array_module


def _as_tensor(x, like: Tensor) -> Tensor:
    """Wrap a Python number or array as a constant on ``like``'s device (numbers take its dtype)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (int, float)):
        data = backend.array_module(like.device).asarray(x, dtype=like.dtype)
    else:
        data = array_on(x, like.device)  # a NumPy operand of a GPU tensor is copied over
    return Tensor._wrap(data, like.device, False)


def _operands(a, b) -> tuple[Tensor, Tensor]:
    if isinstance(a, Tensor):
        return a, _as_tensor(b, a)
    if isinstance(b, Tensor):
        return _as_tensor(a, b), b
    raise TypeError("at least one operand must be a Tensor")


# ================================================================ elementwise arithmetic
class Add(Function):
    def forward(self, a, b):
        return backend.add(a, b)  # a + b (large arrays on all the cores)

    def backward(self, g):
        return g, g  # d(a+b)/da = d(a+b)/db = 1


class Sub(Function):
    def forward(self, a, b):
        return a - b

    def backward(self, g):
        return g, (-g if self.needs_input_grad[1] else None)


class Mul(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        # d(ab)/da = b, d(ab)/db = a
        ga = g * self.b if self.needs_input_grad[0] else None
        gb = g * self.a if self.needs_input_grad[1] else None
        return ga, gb


class Div(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, g):
        # d(a/b)/da = 1/b, d(a/b)/db = -a/b^2
        ga = g / self.b if self.needs_input_grad[0] else None
        gb = -g * self.a / (self.b * self.b) if self.needs_input_grad[1] else None
        return ga, gb


class Neg(Function):
    def forward(self, x):
        return -x

    def backward(self, g):
        return -g


def _power(x, p: float):
    """x ** p with the common exponents as multiplications (NumPy's float power is slow)."""
    if p == 1:
        return x
    if p == 2:
        return x * x
    if p == 3:
        return x * x * x
    if p == 0.5:
        return get_xp(x).sqrt(x)
    if p == -1:
        return 1 / x
    return x ** p


class Pow(Function):
    def forward(self, x, exponent):
        self.x, self.exponent = x, exponent
        return _power(x, exponent)

    def backward(self, g):
        # d(x^p)/dx = p x^(p-1)
        p = self.exponent
        return g * (p * _power(self.x, p - 1)) if p != 0 else g * 0


def add(a, b) -> Tensor:
    return Add.apply(*_operands(a, b))


def sub(a, b) -> Tensor:
    return Sub.apply(*_operands(a, b))


def mul(a, b) -> Tensor:
    return Mul.apply(*_operands(a, b))


def div(a, b) -> Tensor:
    return Div.apply(*_operands(a, b))


def neg(x: Tensor) -> Tensor:
    return Neg.apply(x)


def pow(x: Tensor, exponent: float) -> Tensor:  # noqa: A001 - the name PyTorch uses
    """x ** exponent for a scalar exponent."""
    if isinstance(exponent, Tensor) or not np.isscalar(exponent):
        raise TypeError("pow takes a scalar exponent; use exp(y * log(x)) for a tensor one")
    return Pow.apply(x, exponent=float(exponent))


# ======================================================================= unary math
class Exp(Function):
    def forward(self, x):
        self.y = get_xp(x).exp(x)
        return self.y

    def backward(self, g):
        return g * self.y  # d e^x / dx = e^x


class Log(Function):
    def forward(self, x):
        self.x = x
        return get_xp(x).log(x)

    def backward(self, g):
        return g / self.x  # d log x / dx = 1/x


class Sqrt(Function):
    def forward(self, x):
        self.y = get_xp(x).sqrt(x)
        return self.y

    def backward(self, g):
        return g / (2 * self.y)  # d sqrt(x) / dx = 1 / (2 sqrt(x))


class Tanh(Function):
    def forward(self, x):
        self.y = get_xp(x).tanh(x)
        return self.y

    def backward(self, g):
        return g * (1 - self.y * self.y)  # d tanh / dx = 1 - tanh^2


def exp(x: Tensor) -> Tensor:
    return Exp.apply(x)


def log(x: Tensor) -> Tensor:
    return Log.apply(x)


def sqrt(x: Tensor) -> Tensor:
    return Sqrt.apply(x)


def tanh(x: Tensor) -> Tensor:
    return Tanh.apply(x)


# ====================================================================== activations
class ReLU(Function):
    def forward(self, x):
        self.positive = x > 0
        return x * self.positive

    def backward(self, g):
        return g * self.positive  # slope 1 where x > 0, else 0


GELU_C = math.sqrt(2.0 / math.pi)  # Python floats keep float32 arrays float32
GELU_A = 0.044715


class GELU(Function):
    """GELU, tanh approximation (GPT-2): y = x/2 (1 + tanh(c (x + a x^3)))."""

    def forward(self, x):
        # reference: y = 0.5 * x * (1 + tanh(GELU_C * (x + GELU_A * x * x * x)))
        xp = get_xp(x)
        self.fused = cuda_kernels.enabled(xp, x, dtypes=cuda_kernels.GELU_DTYPES)
        if self.fused:  # one GPU kernel; its backward recomputes tanh
            self.x = x
            return cuda_kernels.gelu_forward(x)
        x = xp.ascontiguousarray(x)
        t, y = xp.empty_like(x), xp.empty_like(x)
        if cpu_kernels.enabled(xp, x):  # with numba: the same in one pass
            rows = functools.partial(cpu_kernels.gelu_forward_rows, c=GELU_C, a=GELU_A)
            backend.parallel_rows(rows, x, t, y)
        else:  # eight passes, over blocks of rows that stay in the cache, on all cores
            backend.parallel_rows(_gelu_forward_rows, x, t, y, cache_blocks=True)
        self.x, self.t = x, t
        return y

    def backward(self, g):
        if self.fused:
            return cuda_kernels.gelu_backward(self.x, g)
        x, t = self.x, self.t
        xp = get_xp(x)
        dx = xp.empty_like(x)
        g = xp.ascontiguousarray(g)
        if cpu_kernels.enabled(xp, x, t, g):  # with numba: the same in one pass
            rows = functools.partial(cpu_kernels.gelu_backward_rows, c=GELU_C, a=GELU_A)
            backend.parallel_rows(rows, x, t, g, dx)
        else:
            backend.parallel_rows(_gelu_backward_rows, x, t, g, dx, cache_blocks=True)
        return dx


def _gelu_forward_rows(x, t, y) -> None:
    """GELU of a block: t = tanh(u), u = c x (1 + a x^2), and y = x/2 (1 + t), written in place."""
    xp = get_xp(x)
    xp.multiply(x, x, out=t)  # building u in t
    t *= GELU_A * GELU_C
    t += GELU_C
    t *= x
    xp.tanh(t, out=t)
    xp.add(t, 1, out=y)
    y *= x
    y *= 0.5


def _gelu_backward_rows(x, t, g, dx) -> None:
    """dx = g dy/dx of a block, dy/dx = (1 + t)/2 + x/2 (1 - t^2) c (1 + 3 a x^2)."""
    xp = get_xp(x)
    square = xp.multiply(t, t)  # 1 - t^2 = 1 - tanh(u)^2, the derivative of tanh
    xp.subtract(1, square, out=square)
    xp.multiply(x, x, out=dx)  # du/dx = c (1 + 3 a x^2)
    dx *= 3 * GELU_A * GELU_C
    dx += GELU_C
    dx *= square
    dx *= x
    dx += t
    dx += 1
    dx *= 0.5
    dx *= g


class SiLU(Function):
    """SiLU (swish): y = x sigmoid(x)."""

    def forward(self, x):
        xp = get_xp(x)
        s = xp.tanh(x * 0.5)  # sigmoid(x) = (1 + tanh(x/2)) / 2 never overflows
        s += 1
        s *= 0.5
        self.x, self.s = x, s
        return x * s

    def backward(self, g):
        # dy/dx = s + x s (1 - s) = s (1 + x (1 - s))
        s = self.s
        return g * s * (1 + self.x * (1 - s))


def relu(x: Tensor) -> Tensor:
    return ReLU.apply(x)


def gelu(x: Tensor) -> Tensor:
    """GELU with GPT-2's tanh approximation."""
    return GELU.apply(x)


def silu(x: Tensor) -> Tensor:
    return SiLU.apply(x)


# ================================================================ matmul and linear
def _swap_last(a):
    return a.swapaxes(-1, -2)


class MatMul(Function):
    """a @ b with NumPy semantics: batched over leading dimensions, which broadcast."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a @ b

    def backward(self, g):
        # y = a b  =>  da = g b^T,  db = a^T g  (summed over broadcast batch dims)
        a, b = self.a, self.b
        # a vector acts as a matrix with a size-1 dimension that the product drops:
        # on the left (n,) is (1, n), on the right (n,) is (n, 1)
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        if a.ndim == 1:
            g = g[..., None, :]
        if b.ndim == 1:
            g = g[..., None]
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = unbroadcast(g @ _swap_last(b2), a2.shape).reshape(a.shape)
        if self.needs_input_grad[1]:
            if b2.ndim == 2 and a2.ndim > 2:  # a shared matrix: one GEMM over all rows
                gb = a2.reshape(-1, a2.shape[-1]).T @ g.reshape(-1, g.shape[-1])
            else:
                gb = unbroadcast(_swap_last(a2) @ g, b2.shape)
            gb = gb.reshape(b.shape)
        return ga, gb


class Linear(Function):
    """y = x @ W + b with x (..., in), W (in, out), b (out,) -- GPT-2's layout.

    With ``compute_dtype`` (mixed precision, see ``autocast``) the product runs in that dtype:
    x, W and b are cast to it, y comes out in it, and the gradients go back in the dtypes of x,
    W and b (float32 master weights get float32 gradients).
    """

    fresh_grads = True  # dx, dW and db: new arrays (products and sums)

    def forward(self, x, weight, bias=None, *, compute_dtype=None):
        self.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        if compute_dtype is not None:
            x = x.astype(compute_dtype, copy=False)
            weight = weight.astype(compute_dtype, copy=False)
            bias = None if bias is None else bias.astype(compute_dtype, copy=False)
        self.x, self.weight, self.has_bias = x, weight, bias is not None
        # all leading positions as the rows of one matrix: one large GEMM instead of a batch of
        # small ones (NumPy loops over the batch of a 3-D @ 2-D product)
        x2 = x.reshape(-1, x.shape[-1])
        y = backend.matmul(x2, weight, bias=bias)  # (N, in) @ (in, out) + (out,) -> (N, out)
        return y.reshape(x.shape[:-1] + (weight.shape[1],))

    def backward(self, g):
        # dx = g W^T;  dW = x^T g and db = sum(g), both over all leading positions
        x, weight = self.x, self.weight
        g2 = g.reshape(-1, g.shape[-1]).astype(weight.dtype, copy=False)  # (N, out)
        x_dtype, w_dtype, b_dtype = self.dtypes
        gx = gw = gb = None
        if self.needs_input_grad[0]:  # (N, out) @ (out, in): the rows of g over the threads
            gx = backend.matmul(g2, weight.T).reshape(x.shape).astype(x_dtype, copy=False)
        if self.needs_input_grad[1]:  # (in, N) @ (N, out): the rows of x^T (inputs) split
            gw = backend.matmul(x.reshape(-1, x.shape[-1]).T, g2).astype(w_dtype, copy=False)
        if not self.has_bias:
            return gx, gw
        if self.needs_input_grad[2]:
            # db = the column sums of g2, in the bias's dtype: a BLAS (1, N) @ (N, out)
            # (sum_leading) when g2 has it; under autocast g2 is float16 and the bias float32,
            # and NumPy sums it into float32
            gb = sum_leading(g2) if g2.dtype == b_dtype else g2.sum(axis=0, dtype=b_dtype)
        return gx, gw, gb


_AUTOCAST = threading.local()  # .dtype: what ``linear`` multiplies in inside ``autocast``, per
# thread (a server thread generating in float32 is not switched by a training thread's autocast)


@contextlib.contextmanager
def autocast(dtype):
    """Mixed precision: inside, every ``linear`` of float32 inputs multiplies in ``dtype``
    (float16), as PyTorch's autocast does. The weights stay float32 (the master copy the
    optimizer updates); each product casts them on the way in, and its gradients go back in
    float32. What is not a matrix product (layer norm, softmax, the loss) runs in the dtype of its
    inputs. Use it with loss scaling (``optim.LossScaler``): float16 gradients smaller than 6e-8
    would round to zero. ``autocast(None)`` switches it off inside an outer one.
    """
    previous = getattr(_AUTOCAST, "dtype", None)
    _AUTOCAST.dtype = None if dtype is None else np.dtype(dtype)
    try:
        yield
    finally:
        _AUTOCAST.dtype = previous


def matmul(a, b) -> Tensor:
    return MatMul.apply(*_operands(a, b))


def autocast_dtype():
    """The dtype ``linear`` multiplies float32 inputs in on this thread (inside ``autocast``),
    or None."""
    return getattr(_AUTOCAST, "dtype", None)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight + bias; x (..., in), weight (in, out), bias (out,) -> (..., out)."""
    inputs = (x, weight) if bias is None else (x, weight, bias)
    cast = autocast_dtype()
    if cast is not None and weight.dtype == np.float32:
        return Linear.apply(*inputs, compute_dtype=cast)
    return Linear.apply(*inputs)


# ====================================================================== reductions
def _normalize_axis(axis, ndim: int) -> tuple:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(a % ndim for a in axes) if ndim else ()


def _expand_reduced(g, shape: tuple, axes: tuple, keepdims: bool):
    """Put back the reduced axes of ``g`` as size-1 dimensions so it broadcasts over ``shape``."""
    if keepdims:
        return g
    return g.reshape(tuple(1 if i in axes else n for i, n in enumerate(shape)))


class Sum(Function):
    def forward(self, x, axis, keepdims):
        self.shape, self.axes, self.keepdims = x.shape, _normalize_axis(axis, x.ndim), keepdims
        return x.sum(axis=self.axes, keepdims=keepdims)

    def backward(self, g):
        # every summed element gets the gradient of the sum
        g = _expand_reduced(g, self.shape, self.axes, self.keepdims)
        return get_xp(g).broadcast_to(g, self.shape)


class Mean(Function):
    def forward(self, x, axis, keepdims):
        self.shape, self.axes, self.keepdims = x.shape, _normalize_axis(axis, x.ndim), keepdims
        self.count = math.prod(x.shape[a] for a in self.axes)
        return x.mean(axis=self.axes, keepdims=keepdims)

    def backward(self, g):
        # each of the n averaged elements gets g / n
        g = _expand_reduced(g, self.shape, self.axes, self.keepdims) / self.count
        return get_xp(g).broadcast_to(g, self.shape)


class Max(Function):
    def forward(self, x, axis, keepdims):
        self.x, self.axes, self.keepdims = x, _normalize_axis(axis, x.ndim), keepdims
        self.y = x.max(axis=self.axes, keepdims=True)
        return self.y if keepdims else self.y.reshape(
            tuple(n for i, n in enumerate(x.shape) if i not in self.axes))

    def backward(self, g):
        # the gradient flows to the maximum; tied maxima share it equally
        is_max = self.x == self.y
        share = is_max / is_max.sum(axis=self.axes, keepdims=True)
        return _expand_reduced(g, self.x.shape, self.axes, self.keepdims) * share


class Var(Function):
    def forward(self, x, axis, keepdims, ddof):
        self.axes, self.keepdims = _normalize_axis(axis, x.ndim), keepdims
        self.centered = x - x.mean(axis=self.axes, keepdims=True)
        self.divisor = math.prod(x.shape[a] for a in self.axes) - ddof
        var = (self.centered * self.centered).sum(axis=self.axes, keepdims=keepdims)
        return var / self.divisor

    def backward(self, g):
        # var = sum((x - mean)^2) / (n - ddof)  =>  dvar/dx = 2 (x - mean) / (n - ddof)
        # (the mean's own dependence on x cancels, since sum(x - mean) = 0)
        g = _expand_reduced(g, self.centered.shape, self.axes, self.keepdims)
        return g * self.centered * (2.0 / self.divisor)


def sum(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001
    return Sum.apply(x, axis=axis, keepdims=keepdims)


def mean(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    return Mean.apply(x, axis=axis, keepdims=keepdims)


def max(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001
    return Max.apply(x, axis=axis, keepdims=keepdims)


def var(x: Tensor, axis=None, keepdims: bool = False, ddof: int = 0) -> Tensor:
    """Variance (NumPy's default ddof=0, the biased estimate layer norm uses)."""
    return Var.apply(x, axis=axis, keepdims=keepdims, ddof=ddof)


# ==================================================================== shape changes
class Reshape(Function):
    def forward(self, x, shape):
        self.shape = x.shape
        return x.reshape(shape)

    def backward(self, g):
        return g.reshape(self.shape)


class Transpose(Function):
    def forward(self, x, axes):
        self.axes = tuple(range(x.ndim))[::-1] if axes is None else tuple(a % x.ndim for a in axes)
        return x.transpose(self.axes)

    def backward(self, g):
        return g.transpose(np.argsort(self.axes))  # the inverse permutation


def reshape(x: Tensor, shape: tuple) -> Tensor:
    return Reshape.apply(x, shape=tuple(shape))


def transpose(x: Tensor, axes=None) -> Tensor:
    """Permute axes like ``numpy.transpose`` (reverse them when ``axes`` is None)."""
    return Transpose.apply(x, axes=None if axes is None else tuple(axes))


def permute(x: Tensor, *axes) -> Tensor:
    return transpose(x, axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes)


def swapaxes(x: Tensor, axis1: int, axis2: int) -> Tensor:
    axes = list(range(x.ndim))
    axes[axis1], axes[axis2] = axes[axis2], axes[axis1]
    return transpose(x, axes)


class ToDevice(Function):
    def forward(self, x, device):
        self.source = backend.device_of(x)
        return backend.to_device(x, device)

    def backward(self, g):
        return backend.to_device(g, self.source)


def to_device(x: Tensor, device) -> Tensor:
    """A copy of ``x`` on ``device``; gradients flow back to the original device."""
    device = backend.normalize_device(device)
    if device == x.device:
        return x
    out = ToDevice.apply(x, device=device)
    out.device = device
    return out


# ============================================================ indexing and joining
def _is_advanced(index) -> bool:
    """Whether an index uses integer/boolean arrays (then positions may repeat)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(not isinstance(p, (int, slice, type(None), type(Ellipsis))) for p in parts)


class GetItem(Function):
    def forward(self, x, index):
        self.shape, self.dtype, self.index = x.shape, x.dtype, index
        self.order = memory_order(x)  # the gradient is laid out as x is (see SliceGrad)
        return x[index]

    def backward(self, g):
        # route g back to the positions that were read; repeated positions add up
        if not _is_advanced(self.index):  # basic slicing reads each position at most once:
            return SliceGrad(self.shape, self.dtype, self.index, g, self.order)  # 0, g at x[index]
        grad = get_xp(g).zeros(self.shape, dtype=self.dtype)
        backend.scatter_add(grad, self.index, g)
        return grad


def _index_to_device(index, xp):
    """Move array parts of an index to the array module of the tensor being indexed."""
    if isinstance(index, tuple):
        return tuple(_index_to_device(i, xp) for i in index)
    if isinstance(index, Tensor):
        index = index.data
    if isinstance(index, list) or (hasattr(index, "shape") and get_xp(index) is not xp):
        return xp.asarray(backend.to_numpy(index) if hasattr(index, "shape") else index)
    return index


def getitem(x: Tensor, index) -> Tensor:
    """x[index] for basic (ints, slices, None, ...) and integer/boolean-array indexing."""
    return GetItem.apply(x, index=_index_to_device(index, backend.array_module(x.device)))


class Concatenate(Function):
    def forward(self, *arrays, axis):
        self.axis = axis
        self.splits = np.cumsum([a.shape[axis] for a in arrays])[:-1].tolist()
        return get_xp(arrays[0]).concatenate(arrays, axis=axis)

    def backward(self, g):
        # each input gets back its own slab of g
        return tuple(get_xp(g).split(g, self.splits, axis=self.axis))


class Stack(Function):
    def forward(self, *arrays, axis):
        self.axis = axis
        return get_xp(arrays[0]).stack(arrays, axis=axis)

    def backward(self, g):
        xp = get_xp(g)
        return tuple(xp.take(g, i, axis=self.axis) for i in range(g.shape[self.axis]))


def concatenate(tensors, axis: int = 0) -> Tensor:
    tensors = list(tensors)
    axis = axis % tensors[0].ndim
    return Concatenate.apply(*tensors, axis=axis)


cat = concatenate


def stack(tensors, axis: int = 0) -> Tensor:
    tensors = list(tensors)
    axis = axis % (tensors[0].ndim + 1)
    return Stack.apply(*tensors, axis=axis)


def split(x: Tensor, split_size_or_sections, axis: int = 0) -> list[Tensor]:
    """Split like ``torch.split``: an int is the size of each piece, a list the sizes."""
    length = x.shape[axis]
    if isinstance(split_size_or_sections, int):
        sizes = [split_size_or_sections] * (length // split_size_or_sections)
        if length % split_size_or_sections:
            sizes.append(length % split_size_or_sections)
    else:
        sizes = list(split_size_or_sections)
        if builtins.sum(sizes) != length:
            raise ValueError(f"split sizes {sizes} do not add up to {length}")
    axis = axis % x.ndim
    pieces, start = [], 0
    for size in sizes:
        index = (slice(None),) * axis + (slice(start, start + size),)
        pieces.append(getitem(x, index))
        start += size
    return pieces


# ============================================================ selection by a mask
class Where(Function):
    def forward(self, a, b, condition):
        self.condition = condition
        return get_xp(a).where(condition, a, b)

    def backward(self, g):
        # each output position came from a (where condition) or from b (elsewhere)
        xp = get_xp(g)
        ga = xp.where(self.condition, g, 0) if self.needs_input_grad[0] else None
        gb = xp.where(self.condition, 0, g) if self.needs_input_grad[1] else None
        return ga, gb


def where(condition, a, b) -> Tensor:
    """Elementwise ``a if condition else b`` (condition: boolean array or Tensor, broadcastable)."""
    a, b = _operands(a, b)
    return Where.apply(a, b, condition=array_on(condition, a.device))


def masked_fill(x: Tensor, mask, value: float) -> Tensor:
    """``x`` with ``value`` wherever ``mask`` is True (the gradient there is zero)."""
    return where(mask, value, x)


# ===================================================================== softmax family
class Softmax(Function):
    def forward(self, x, axis):
        xp = get_xp(x)
        y = x - x.max(axis=axis, keepdims=True)  # shift by the max: exp never overflows
        xp.exp(y, out=y)
        y /= y.sum(axis=axis, keepdims=True)
        self.y, self.axis = y, axis
        return y

    def backward(self, g):
        # dx = y * (g - sum(g * y)): the Jacobian diag(y) - y y^T applied to g
        y = self.y
        return y * (g - (g * y).sum(axis=self.axis, keepdims=True))


class LogSoftmax(Function):
    def forward(self, x, axis):
        xp = get_xp(x)
        shifted = x - x.max(axis=axis, keepdims=True)
        y = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        self.y, self.axis = y, axis
        return y

    def backward(self, g):
        # y = x - logsumexp(x)  =>  dx = g - softmax(x) * sum(g)
        return g - get_xp(g).exp(self.y) * g.sum(axis=self.axis, keepdims=True)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    return Softmax.apply(x, axis=axis)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    return LogSoftmax.apply(x, axis=axis)


# ========================================================================= dropout
def _keep_mask(shape, p: float, dtype, device: str):
    """Scaled Bernoulli mask: 1/(1-p) with probability 1-p, else 0 (seeded by the backend)."""
    keep = backend.generator(device).random(shape, dtype=np.float32) >= p
    return keep.astype(dtype) * (1.0 / (1.0 - p))


class Dropout(Function):
    def forward(self, x, p, device):
        self.mask = _keep_mask(x.shape, p, x.dtype, device)
        return x * self.mask

    def backward(self, g):
        return g * self.mask  # kept units pass the gradient, scaled like the forward


def dropout(x: Tensor, p: float = 0.1, training: bool = True) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1/(1-p); identity in eval."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0:
        return x
    return Dropout.apply(x, p=p, device=x.device)




# ============================================================ the fused transformer ops
# Written for speed in fused.py (which imports only tensor and backend), and spelled F.<name>
# like every op: F.cross_entropy, F.linear_cross_entropy, F.layer_norm, F.rms_norm, F.embedding,
# F.scaled_dot_product_attention, and the mask and BLAS helpers they use.
from .fused import (  # noqa: E402, F401
    HEAD_CHUNK_BYTES,
    CrossEntropy,
    Embedding,
    LayerNorm,
    LinearCrossEntropy,
    RMSNorm,
    ScaledDotProductAttention,
    causal_mask,
    cross_entropy,
    dot_last,
    dpo_loss,
    embedding,
    first_invalid_id,
    layer_norm,
    linear_cross_entropy,
    make_additive_mask,
    rms_norm,
    scaled_dot_product_attention,
    sum_last,
    sum_leading,
)
