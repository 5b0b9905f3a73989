"""The fused transformer ops: each equals a short formula of the primitives, in fewer passes.

Written with ``F.softmax``, ``F.log``, ``F.sum`` ... these ops would be correct but slow: every
step would save its own arrays and allocate its own temporaries. Here each is one ``Function``
whose forward and backward take a few in-place array passes, keep only what the backward needs,
and do row sums through BLAS (``sum_last``, ``sum_leading``, ``dot_last``). Each docstring names
the unfused formula the op equals, and the tests check it against exactly that.

    cross_entropy          -mean over counted rows of log_softmax(logits)[i, t_i]
    linear_cross_entropy   cross_entropy(linear(x, W, b), t), never holding all the logits
    layer_norm, rms_norm   (x - mean) / sqrt(var + eps) * w + b,   x / sqrt(mean(x^2) + eps) * w
    embedding              weight[ids], with a sort-based backward
    scaled_dot_product_attention   softmax(q k^T / sqrt(D) + mask) v

Use them as ``F.<name>``: ``functional.py`` re-exports them. This module imports only ``tensor``
and ``backend`` (never ``functional``), so its imports go one way.

Integer inputs (ids, targets) that arrive on the host are checked against the table or class
count here, before they reach a device: CuPy would silently wrap an out-of-range index around.
Arrays already on the GPU are not checked (that would cost a device sync on every call): keeping
them in range is the caller's responsibility.
"""

from __future__ import annotations

import builtins
import functools
import math
import threading

import numpy as np

from . import backend, blas, cpu_kernels, cuda_kernels
from .tensor import Function, Tensor, array_on

get_xp = backend.get_array_module

# Logits per chunk of the fused LM head + loss: large enough that the products of a chunk are
# efficient (dW = x^T dlogits sums over the chunk's rows: a few hundred rows make a thin, slow
# product), small enough that no (B, T, V) array is held for long sequences (GPT-2 at batch 8 x
# 1024 has 1.6 GB of logits). On the CPU the chunk's logits and dW partial live in buffers kept
# between steps (``_kept``; ``release_kept_buffers`` frees them), so their size costs no page
# faults. A GPT-2-sized step (12 x 768, 1,024 positions, 50,257 tokens) on a 2-core Intel Xeon:
# the head took 3.3 s with 30 MiB chunks and fresh buffers, 1.3 s with one 206 MB chunk.
HEAD_CHUNK_BYTES = 256 << 20
_KEPT = threading.local()  # name -> a NumPy buffer reused by every call, one set per thread


def release_kept_buffers() -> None:
    """Free the fused head's kept buffers (this thread's): up to HEAD_CHUNK_BYTES of logits and
    one vocabulary x width dW partial (154 MB for GPT-2), held between steps for speed."""
    vars(_KEPT).clear()


def _kept(name: str, shape: tuple, dtype, xp):
    """A scratch array of ``shape`` kept between calls, on the CPU (NumPy). Arrays above 32 MiB
    are mapped fresh by glibc on every allocation -- a page fault per 4 KiB, each step, as costly
    as the arithmetic -- so the fused head's largest temporaries are allocated once. On a GPU,
    CuPy's memory pool already reuses blocks: a new array."""
    if xp is not np:
        return xp.empty(shape, dtype)
    kept = vars(_KEPT)
    buffer = kept.get(name)
    needed = math.prod(shape)
    if buffer is None or buffer.dtype != dtype or buffer.size < needed:
        buffer = kept[name] = np.empty(needed, dtype)
    return buffer[:needed].reshape(shape)


# ========================================================================== fast sums
# NumPy's ``sum(axis=-1)`` over short rows is slow (a Python-level loop in C per row). A
# matrix-vector product with a vector of ones computes the same sums in BLAS, 5-7x faster, and
# ``einsum`` forms row-wise dot products without the product temporary.
def sum_last(x):
    """sum(x, axis=-1, keepdims=True) through BLAS: (..., C) -> (..., 1)."""
    ones = get_xp(x).ones(x.shape[-1], dtype=x.dtype)
    return (x.reshape(-1, x.shape[-1]) @ ones).reshape(x.shape[:-1] + (1,))


def sum_leading(x):
    """Sum over every axis but the last through BLAS: (..., C) -> (C,). A (1, N) @ (N, C)
    product on ``backend.matmul``'s threads (MKL's, when installed): a linear layer's bias
    gradient, the column sums of a 2048 x 1536 gradient, took 0.29 ms there and 0.49 ms in
    ``sum(axis=0)``."""
    rows = x.reshape(-1, x.shape[-1])
    return backend.matmul(get_xp(x).ones((1, rows.shape[0]), dtype=x.dtype), rows).reshape(-1)


def dot_last(a, b):
    """sum(a * b, axis=-1, keepdims=True): (..., C) -> (..., 1). On NumPy without materialising
    a * b (einsum); on CuPy, whose einsum took 0.38 ms where multiply-then-sum took 0.05 ms for
    (8, 12, 1024, 64) arrays on an H100, as the plain expression."""
    xp = get_xp(a)
    if xp is not np:
        return (a * b).sum(axis=-1, keepdims=True)
    return xp.einsum("...i,...i->...", a, b)[..., None]  # strided views as they are


# ====================================================================== integer inputs
def first_invalid_id(ids, size: int, allowed: int | None = None):
    """The first id of a NumPy array outside 0..size-1 (and not equal to ``allowed``), else None.

    Arrays on the GPU give None: checking them would cost a device sync (the caller's job).
    """
    if get_xp(ids) is not np or ids.size == 0:
        return None
    if ids.min() >= 0 and ids.max() < size:  # the common case: two passes, no temporaries
        return None
    bad = (ids < 0) | (ids >= size)
    if allowed is not None:
        bad &= ids != allowed
    return int(ids[bad][0]) if bad.any() else None


def _host_array(x):
    """The array of a Tensor, list or array: NumPy, unless it already lives on the GPU."""
    x = x.data if isinstance(x, Tensor) else x
    return x if get_xp(x) is not np else np.asarray(x)


# ====================================================================== cross-entropy
def mean_of_counted(total, valid):
    """total / (number of True in ``valid``), NaN when none counts -- all on the arrays' device
    (deciding ``if count == 0`` on the host would make a GPU wait)."""
    xp = get_xp(valid)
    count = valid.sum()
    return xp.where(count > 0, total / xp.maximum(count, 1), xp.nan)


class CrossEntropy(Function):
    """Mean negative log-likelihood of integer targets under softmax(logits)."""

    def forward(self, logits, targets, ignore_index):
        xp = get_xp(logits)
        self.shape = logits.shape
        if logits.dtype == np.float16:  # mixed precision: the loss in float32, as autocast does
            logits = logits.astype(np.float32)  # (float16's sum of 50,257 exps can overflow)
        logits = logits.reshape(-1, logits.shape[-1])  # (B, T, C) -> (N, C)
        targets = targets.reshape(-1)  # (B, T) -> (N,)
        self.valid = targets != ignore_index
        # how many positions count, kept as a 0-d array: int() would make a GPU wait here
        self.count = xp.maximum(self.valid.sum(), 1).astype(logits.dtype)
        self.rows = xp.arange(targets.shape[0])
        self.safe_targets = xp.where(self.valid, targets, 0)  # ignored rows read class 0
        # loss_i = logsumexp(x_i) - x_i[t_i], with the max shifted out for stability
        probs = logits - logits.max(axis=1, keepdims=True)
        target_logit = probs[self.rows, self.safe_targets]
        xp.exp(probs, out=probs)
        total = sum_last(probs)  # (N, 1)
        probs /= total
        total = total[:, 0]
        self.probs = probs
        losses = xp.log(total) - target_logit
        return mean_of_counted((losses * self.valid).sum(), self.valid).astype(logits.dtype)

    def backward(self, g):
        # d loss / d logits_i = (softmax(x_i) - onehot(t_i)) / count on counted rows, 0 elsewhere
        scale = self.valid * (g / self.count)  # (N,)
        grad = self.probs * scale[:, None].astype(self.probs.dtype)
        grad[self.rows, self.safe_targets] -= scale.astype(grad.dtype)
        return grad.reshape(self.shape)


def _targets_on(targets, lead_shape: tuple, classes: int, ignore_index: int, device: str):
    """Integer targets checked (shape; range, when on the host) and moved to ``device``."""
    targets = _host_array(targets)
    if targets.shape != lead_shape:
        raise ValueError(f"targets of shape {targets.shape} do not match the inputs' leading "
                         f"shape {lead_shape}: one target per position")
    bad = first_invalid_id(targets, classes, allowed=ignore_index)
    if bad is not None:
        raise ValueError(f"target {bad} is out of range for {classes} classes: targets must be in "
                         f"0..{classes - 1}, or ignore_index={ignore_index} to skip a position; "
                         "check that the labels and the model's vocabulary size agree")
    return backend.to_device(targets, device)


def cross_entropy(logits: Tensor, targets, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy; logits (N, C) or (B, T, C), integer targets (N,) or (B, T).

    Equals ``-mean(F.log_softmax(logits)[i, t_i])`` over the positions i whose target is not
    ``ignore_index`` (those are left out of both the sum and the count).
    """
    targets = _targets_on(targets, logits.shape[:-1], logits.shape[-1], ignore_index,
                          logits.device)
    return CrossEntropy.apply(logits, targets=targets, ignore_index=ignore_index)


# ============================================================ fused LM head + loss
class LinearCrossEntropy(Function):
    """cross_entropy(x @ weight + bias, targets) without ever holding all the logits.

    With a large vocabulary the logits (N, V) are the largest arrays of a training step (154 MB
    for 768 positions of GPT-2's 50,257 tokens). Here the rows go through in chunks of
    ``chunk_rows``: logits, softmax and loss of one chunk, then -- because the loss is the last
    op, its upstream gradient is a scalar -- that chunk's contribution to dx, dW and db right
    away, for an upstream gradient of 1. Backward only scales them by the real upstream gradient.
    """

    def forward(self, x, weight, bias=None, *, targets, ignore_index, chunk_rows):
        xp = get_xp(x)
        self.x_shape, self.has_bias = x.shape, bias is not None
        x2, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)  # (N, C), (N,)
        valid = targets != ignore_index
        count = xp.maximum(valid.sum(), 1).astype(x.dtype)  # 0-d, on the device: no wait
        need_x, need_w = self.needs_input_grad[0], self.needs_input_grad[1]
        need_b = self.has_bias and self.needs_input_grad[2]
        self.gx = xp.empty_like(x2) if need_x else None
        self.gw = None  # the first chunk writes dW, later chunks add to it
        self.gb = xp.zeros_like(bias) if need_b else None
        total = xp.zeros((), xp.float64)  # summed on the device, chunk by chunk
        need_grad = need_x or need_w or need_b
        for start in range(0, len(x2), chunk_rows):
            rows = slice(start, start + chunk_rows)
            n = len(x2[rows])
            dtype = np.result_type(x2.dtype, weight.dtype)
            logits = _kept("head logits", (n, weight.shape[1]), dtype, xp)
            backend.matmul(x2[rows], weight, out=logits)  # (n, C) @ (C, V) -> (n, V)
            if bias is not None:
                logits += bias
            counted = valid[rows]
            picked = xp.where(counted, targets[rows], 0)  # ignored rows read class 0
            # d loss / d logits = (softmax - onehot) / count on counted rows, 0 elsewhere
            weight_of_row = (counted / count).astype(logits.dtype)
            if cuda_kernels.enabled(xp, logits):  # the loss and d loss / d logits, one kernel
                total += cuda_kernels.cross_entropy_rows(logits, picked, weight_of_row).sum()
            else:
                losses = xp.empty(len(picked), logits.dtype)  # (n,) log sum exp - target logit
                softmax_rows = functools.partial(_cross_entropy_rows, gradient=need_grad)
                backend.parallel_rows(softmax_rows, logits, picked, weight_of_row, losses)
                total += (losses * counted).sum()
            if need_grad:  # logits now hold d loss / d logits
                self._chunk_backward(x2, weight, logits, rows, need_x, need_w, need_b)
        if need_w and self.gw is None:  # no rows at all
            self.gw = xp.zeros_like(weight)
        return mean_of_counted(total, valid).astype(x.dtype)

    def _chunk_backward(self, x2, weight, dlogits, rows, need_x, need_w, need_b) -> None:
        """A chunk's share of dx, dW and db, from d loss / d logits (n, V) of its rows."""
        if need_x:
            backend.matmul(dlogits, weight.T, out=self.gx[rows])  # (n, V) @ (V, C)
        if need_w and self.gw is None:
            self.gw = backend.matmul(x2[rows].T, dlogits)  # (C, n) @ (n, V)
        elif need_w:
            partial = _kept("head dW", self.gw.shape, self.gw.dtype, get_xp(dlogits))
            self.gw += backend.matmul(x2[rows].T, dlogits, out=partial)
        if need_b:
            self.gb += sum_leading(dlogits)


    def backward(self, g):
        # every gradient was computed for d loss = 1; the chain rule scales it by g
        gx = None if self.gx is None else (self.gx * g).reshape(self.x_shape)
        gw = None if self.gw is None else self.gw * g
        if not self.has_bias:
            return gx, gw
        return gx, gw, (None if self.gb is None else self.gb * g)


def _cross_entropy_rows(logits, picked, weight_of_row, losses, *, gradient) -> None:
    """Loss of a block of rows of logits (n, V), and (with ``gradient``) d loss / d logits in
    place of the logits: weight_of_row * (softmax - onehot(picked))."""
    xp = get_xp(logits)
    # parallel_rows hands the (n,) arrays over as (n, 1) blocks
    picked, weight_of_row, losses = picked[:, 0], weight_of_row[:, 0], losses[:, 0]
    index = xp.arange(len(picked))
    logits -= logits.max(axis=1, keepdims=True)  # loss_i = log sum exp - target logit
    target_logit = logits[index, picked]
    probs = xp.exp(logits, out=logits)
    sums = sum_last(probs)  # (n, 1)
    losses[:] = xp.log(sums[:, 0]) - target_logit
    if gradient:
        probs *= weight_of_row[:, None] / sums
        probs[index, picked] -= weight_of_row


def linear_cross_entropy(x: Tensor, weight: Tensor, targets, bias: Tensor | None = None,
                         ignore_index: int = -100, chunk_bytes: int = HEAD_CHUNK_BYTES) -> Tensor:
    """The LM head and the loss in one op: equals ``F.cross_entropy(F.linear(x, weight, bias),
    targets, ignore_index)``; x (..., C), weight (C, V), bias (V,), targets x.shape[:-1].

    Computed in row chunks of about ``chunk_bytes`` of logits (see ``HEAD_CHUNK_BYTES``).
    """
    targets = _targets_on(targets, x.shape[:-1], weight.shape[1], ignore_index, x.device)
    rows = builtins.max(1, chunk_bytes // (weight.shape[1] * weight.dtype.itemsize))
    inputs = (x, weight) if bias is None else (x, weight, bias)
    return LinearCrossEntropy.apply(*inputs, targets=targets, ignore_index=ignore_index,
                                    chunk_rows=rows)


# ======================================================================= embedding
class Embedding(Function):
    fresh_grads = True  # the table's gradient: a new array

    def forward(self, weight, ids):
        self.ids, self.weight_shape, self.dtype = ids, weight.shape, weight.dtype
        return weight[ids]  # gather rows: (B, T) ids -> (B, T, C)

    def backward(self, g):
        # each row of the table gets the sum of the gradients at every position that read it:
        # d weight[v] = sum of g[i] over the positions i with ids[i] == v (sorted runs of ids)
        grad = get_xp(g).zeros(self.weight_shape, dtype=self.dtype)
        backend.index_add_rows(grad, self.ids.reshape(-1), g.reshape(-1, self.weight_shape[1]))
        return grad


def embedding(ids, weight: Tensor) -> Tensor:
    """Rows of ``weight`` (V, C) picked by integer ``ids`` of any shape -> ids.shape + (C,).

    Equals ``weight[ids]`` (``F.getitem``), with a faster backward. Host ids must be in 0..V-1.
    """
    ids = _host_array(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding ids must be integers, got dtype {ids.dtype}")
    bad = first_invalid_id(ids, weight.shape[0])
    if bad is not None:
        raise ValueError(f"embedding id {bad} is out of range for a table of {weight.shape[0]} "
                         f"rows: ids must be in 0..{weight.shape[0] - 1}; check that the ids come "
                         "from the tokenizer this table was built for")
    return Embedding.apply(weight, ids=backend.to_device(ids, weight.device))


# =================================================================== normalization
class LayerNorm(Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last axis."""

    fresh_grads = True  # dx, dw and db: new arrays

    def forward(self, x, weight, bias=None, eps=1e-5):
        xp = get_xp(x)
        self.weight, self.has_bias = weight, bias is not None
        self.fused = cuda_kernels.enabled(xp, x, weight)
        self.compiled = False
        if self.fused:  # the lines below as one GPU kernel, one block per row
            y, self.xhat, self.rstd = cuda_kernels.layer_norm_forward(x, weight, bias, eps)
            return y
        x = xp.ascontiguousarray(x)
        xhat, y = xp.empty_like(x), xp.empty_like(x)
        rstd = xp.empty(x.shape[:-1] + (1,), x.dtype)
        self.compiled = cpu_kernels.enabled(xp, x, weight, *(() if bias is None else (bias,)))
        if self.compiled:  # the lines of _layer_norm_rows as one compiled loop (numba)
            rows = functools.partial(cpu_kernels.layer_norm_forward_rows, weight=weight,
                                     bias=bias, eps=eps)
            backend.parallel_rows(rows, x, xhat, rstd, y)  # rows, all cores
        else:
            rows = functools.partial(_layer_norm_rows, weight=weight, bias=bias, eps=eps)
            backend.parallel_rows(rows, x, xhat, rstd, y, cache_blocks=True)
        self.xhat, self.rstd = xhat, rstd
        return y

    def backward(self, g):
        # with gx̂ = g * w and averages over the C features:
        #   dx = rstd * (gx̂ - mean(gx̂) - x̂ * mean(gx̂ * x̂)),  dw = sum(g * x̂),  db = sum(g)
        xhat, rstd = self.xhat, self.rstd
        xp = get_xp(xhat)
        g = xp.ascontiguousarray(g)
        gx = None
        if self.compiled:  # dx, and each block's share of dw and db, in one compiled pass
            gx, sums = xp.empty_like(g), {}
            rows = functools.partial(cpu_kernels.layer_norm_backward_rows, weight=self.weight,
                                     sums=sums)
            backend.parallel_rows(rows, g, xhat, rstd, gx)
            dweights, dbiases = zip(*[sums[address] for address in sorted(sums)], strict=True)
            gw, gb = (sum(shares).astype(self.weight.dtype) for shares in (dweights, dbiases))
            return (gx, gw) if not self.has_bias else (gx, gw, gb)
        if self.needs_input_grad[0] and self.fused:
            gx = cuda_kernels.layer_norm_backward(g, xhat, self.weight, rstd)
        elif self.needs_input_grad[0]:
            gx = xp.empty_like(g)
            rows = functools.partial(_layer_norm_backward_rows, weight=self.weight)
            backend.parallel_rows(rows, g, xhat, rstd, gx, cache_blocks=True)
        gw = sum_leading(g * xhat) if self.needs_input_grad[1] else None
        if not self.has_bias:
            return gx, gw
        return gx, gw, (sum_leading(g) if self.needs_input_grad[2] else None)


def _layer_norm_rows(x, xhat, rstd, y, *, weight, bias, eps) -> None:
    """Layer norm of a block of rows (N, C), written into xhat, rstd (N, 1) and y."""
    xp = get_xp(x)
    width = x.shape[-1]
    xp.subtract(x, sum_last(x) / width, out=xhat)  # centered
    rstd[...] = 1 / xp.sqrt(dot_last(xhat, xhat) / width + eps)  # 1 / std of each row
    xhat *= rstd  # normalized
    xp.multiply(xhat, weight, out=y)
    if bias is not None:
        y += bias


def _layer_norm_backward_rows(g, xhat, rstd, gx, *, weight) -> None:
    """dx of a block of rows: rstd * (gx̂ - mean(gx̂) - x̂ * mean(gx̂ * x̂)), gx̂ = g * w."""
    width = xhat.shape[-1]
    get_xp(g).multiply(g, weight, out=gx)  # gx̂
    correction = xhat * (dot_last(gx, xhat) / width)  # the path through the variance
    correction += sum_last(gx) / width  # the path through the mean
    gx -= correction
    gx *= rstd


class RMSNorm(Function):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last axis (Llama's norm)."""

    def forward(self, x, weight, eps=1e-6):
        xp = get_xp(x)
        rstd = 1 / xp.sqrt(dot_last(x, x) / x.shape[-1] + eps)  # (..., 1)
        xhat = x * rstd
        self.xhat, self.rstd, self.weight = xhat, rstd, weight
        return xhat * weight

    def backward(self, g):
        # with gx̂ = g * w:  dx = rstd * (gx̂ - x̂ * mean(gx̂ * x̂)),  dw = sum(g * x̂)
        xhat, rstd = self.xhat, self.rstd
        gx = None
        if self.needs_input_grad[0]:
            gx = g * self.weight  # gx̂, (..., C)
            gx -= xhat * (dot_last(gx, xhat) / xhat.shape[-1])
            gx *= rstd
        gw = sum_leading(g * xhat) if self.needs_input_grad[1] else None
        return gx, gw


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Layer normalization over the last axis; x (..., C), weight and bias (C,).

    Equals ``(x - x.mean(-1)) / F.sqrt(x.var(-1) + eps) * weight + bias`` (keepdims means).
    """
    if bias is None:
        return LayerNorm.apply(x, weight, eps=eps)
    return LayerNorm.apply(x, weight, bias, eps=eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMS normalization over the last axis; x (..., C), weight (C,).

    Equals ``x / F.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight``.
    """
    return RMSNorm.apply(x, weight, eps=eps)


# ======================================================================== attention
def causal_mask(query_length: int, key_length: int, xp=np):
    """Boolean (Tq, Tk) mask, True where query i may NOT see key j.

    Queries are the last ``query_length`` positions of the keys (bottom-right aligned), so with
    a KV cache query i sits at position i + Tk - Tq and sees keys 0 .. i + Tk - Tq.
    """
    return xp.triu(xp.ones((query_length, key_length), dtype=bool), k=1 + key_length - query_length)


def make_additive_mask(blocked, dtype):
    """The additive form of a boolean mask (True = blocked), same shape: 0 where attention is
    allowed, the most negative finite float of ``dtype`` where it is blocked.

    Adding it is one pass over the scores (cheaper than a masked copy), and a finite minimum
    makes a fully blocked row come out uniform instead of NaN. Never add two of them: the sum
    of two minima overflows to -inf; combine the boolean masks first (``a | b``).
    """
    xp = get_xp(blocked)
    return xp.where(blocked, np.finfo(dtype).min, 0).astype(dtype)


def _dropout_keep(shape, p: float, dtype, device: str):
    """F.dropout's scaled Bernoulli mask: 1/(1-p) with probability 1-p, else 0 (seeded)."""
    keep = backend.generator(device).random(shape, dtype=np.float32) >= p
    return keep.astype(dtype) * (1.0 / (1.0 - p))


# Causal attention on the CPU skips the keys its queries may not see. The queries go in blocks of
# CAUSAL_BLOCK_ROWS, and block [q0, q1) meets only keys [0, k1), k1 - 1 being the last key its
# last query sees. With n blocks that is (n + 1) / 2n of the T x T scores (3/4 at n = 2, 9/16 at
# n = 8): of their two products, their softmax passes and the memory P is kept in. In a whole
# training step at context 256 on a 2-core Intel Xeon, blocks of 128 were fastest, then 64, then
# 32 (docs/performance.md): smaller blocks make smaller, less efficient products.
CAUSAL_BLOCK_ROWS = 128


def causal_blocks(query_length: int, key_length: int, rows: int) -> list:
    """[(q0, q1, k1), ...]: blocks of ``rows`` queries; queries q0..q1-1 see keys 0..k1-1 under
    the causal mask, where query i (bottom-right aligned, as ``causal_mask``) sees keys
    0 .. i + key_length - query_length. The last block sees every key."""
    return [(q0, min(q0 + rows, query_length), min(q0 + rows, query_length) + key_length
             - query_length) for q0 in range(0, query_length, rows)]


class ScaledDotProductAttention(Function):
    """softmax(q k^T / sqrt(D) + mask) v for q (B, H, Tq, D), k and v (B, H, Tk, D).

    Saves the scaled queries, k, v, the attention probabilities P (B, H, Tq, Tk) -- one array
    per block of queries when causal blocks skip the hidden keys -- the output and, with
    dropout, the scaled keep mask (B, H, Tq, Tk): exactly what the backward needs, and no
    score matrix besides. When q, k and v are views of one array, those views too (no memory
    of their own): the backward lays their gradients out as they lie.
    """

    def forward(self, q, k, v, mask, dropout_p, device, mask_is_causal=False):
        # reference: out = softmax(q @ k^T / sqrt(D) + mask) @ v, with dropout on the softmax
        xp = get_xp(q)
        self.scale = scale = 1.0 / math.sqrt(q.shape[-1])
        # on a GPU, with the kernels on, causal attention without dropout may run as kernels
        # that never hold the T x T matrix (cuda_kernels.use_flash says when)
        self.flash = (mask_is_causal and dropout_p == 0 and cuda_kernels.enabled(xp, q, k, v)
                      and cuda_kernels.use_flash(q, k, v))
        if self.flash:
            out, self.lse = cuda_kernels.flash_attention_forward(q, k, v, scale)
            self.q, self.k, self.v, self.out = q, k, v, out
            return out
        # decoding on the CPU without gradients: one query, which sees every key, in a few
        # NumPy calls (nothing saved for a backward)
        if (xp is np and q.shape[-2] == 1 and dropout_p == 0 and not any(self.needs_input_grad)
                and q.dtype == k.dtype == v.dtype and (mask is None or mask.dtype == q.dtype)):
            return _one_query_attention(q, k, v, None if mask_is_causal else mask, scale)
        # q, k and v as they came, when they are views of one array (a GPT's qkv): the backward
        # lays their gradients out the same way (held only then: k and v keep that array
        # alive anyway, where a q of its own would be one more array kept until the backward)
        self.given = (q, k, v) if _views_of_one_array(q, k, v) else None
        q = q * scale  # scaling q (T x D) is cheaper than scaling the scores (T x T)
        # float16 scores (mixed precision) meet a float32 mask: the softmax runs in float32,
        # where the mask's minimum exists, as PyTorch's autocast runs softmax in float32
        dtype = q.dtype if mask is None else np.promote_types(q.dtype, mask.dtype)
        (query_length, key_length), batch = (q.shape[-2], k.shape[-2]), q.shape[:-2]
        out_dtype = np.promote_types(dtype, v.dtype)
        if xp is np and q.ndim == 4:  # (B, H, Tq, D) laid out as (B, Tq, H, D): the model's
            # transpose(1, 2).reshape(B, Tq, H D) that follows is then a view, not a copy
            out = np.empty((q.shape[0], query_length, q.shape[1], v.shape[-1]),
                           out_dtype).transpose(0, 2, 1, 3)
        else:
            out = xp.empty(q.shape[:-1] + (v.shape[-1],), out_dtype)
        self.keep = None  # dropout on the attention weights (GPT-2's attn_pdrop), drawn at once
        if dropout_p > 0:
            self.keep = _dropout_keep(batch + (query_length, key_length), dropout_p, dtype,
                                      device)
        # the sequences of the batch are independent: a block of them per thread
        split_mask = mask is not None and mask.ndim == 4 and mask.shape[0] == q.shape[0] > 1
        # on a GPU, with the kernels on: the causal mask, max, exp, sum and division in one kernel
        self.fused_softmax = (mask_is_causal and key_length >= query_length
                              and cuda_kernels.enabled(xp) and dtype == np.float32)
        # on the CPU, causal attention in blocks of queries that skip the keys they may not see
        self.blocks = [(0, query_length, key_length)]  # one block: every query, every key
        causal_cpu = mask_is_causal and xp is np and key_length >= query_length
        if (causal_cpu and mask is not None and not split_mask
                and mask.shape[-2:] == (query_length, key_length)):
            self.blocks = causal_blocks(query_length, key_length, CAUSAL_BLOCK_ROWS)
        # with numba: the causal softmax as compiled loops that apply the mask by index
        self.compiled_softmax = (causal_cpu and cpu_kernels.enabled(xp)
                                 and dtype in (np.float32, np.float64))
        # with numba and MKL: each (sequence, head)'s products and softmax in one kernel, the
        # pairs on the team of threads (cpu_kernels, "attention on MKL's team")
        self.pairs_kernel = (self.compiled_softmax and self.keep is None and q.ndim == 4
                             and dtype == q.dtype and cpu_kernels.attention_fits(q, k, v, out))

        def sequences(q, k, v, probs, out, *optional_blocks, shared_mask, first_query):
            # the optional arrays in the order they were passed: keep (with dropout), then the
            # mask (when it has one per sequence; else every block shares ``shared_mask``)
            blocks = list(optional_blocks)
            keep = blocks.pop(0) if self.keep is not None else None
            block_mask = blocks.pop(0) if split_mask else shared_mask
            _matmul_into(q, k.swapaxes(-1, -2), probs)  # (.., Tq, D) @ (.., D, Tk): scores
            if self.fused_softmax:  # mask by index, max, exp, sum and divide, in place
                cuda_kernels.causal_softmax(probs)
            elif self.compiled_softmax:  # mask by index, max, shift; exp; sum and divide (query
                # r of this block sees keys 0 .. first_query + r + Tk - Tq)
                cpu_kernels.causal_softmax(probs, first_query + key_length - query_length)
            else:
                if block_mask is not None:
                    probs += block_mask  # additive: 0 = may attend, the float minimum = blocked
                _softmax_in_place(probs)  # over the keys
            dropped = probs if keep is None else probs * keep
            _matmul_into(dropped, v, out)  # (.., Tq, Tk) @ (.., Tk, D) -> (.., Tq, D)

        self.probs = []  # P of each block of queries, (B, H, q1 - q0, k1)
        for q0, q1, k1 in self.blocks:
            rows, keys = slice(q0, q1), slice(0, k1)
            probs = xp.empty(batch + (q1 - q0, k1), dtype)
            if self.pairs_kernel:  # query q0 + r sees keys 0 .. q0 + r + Tk - Tq
                cpu_kernels.attention_forward(q[..., rows, :], k[..., keys, :], v[..., keys, :],
                                              probs, out[..., rows, :],
                                              q0 + key_length - query_length)
                self.probs.append(probs)
                continue
            optional = [a[..., rows, keys] for a in (self.keep, mask if split_mask else None)
                        if a is not None]
            shared = None if mask is None or split_mask else mask[..., rows, keys]
            backend.parallel_batches(functools.partial(sequences, shared_mask=shared,
                                                       first_query=q0),
                                     q[..., rows, :], k[..., keys, :], v[..., keys, :], probs,
                                     out[..., rows, :], *optional, work=probs.size)
            self.probs.append(probs)
        self.q, self.k, self.v, self.out = q, k, v, out
        return out

    def backward(self, g):
        # out = P' v with P' = P * keep;  dv = P'^T g;  dP = (g v^T) * keep
        # softmax backward: dS = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(g * out)
        # (the FlashAttention identity: sum_j P_ij dP_ij = g_i . out_i), then with scores
        # S = (s q) k^T:  dq = s dS k,  dk = dS^T (s q)
        # In blocks of queries, each block adds its share to dk and dv of the keys it saw.
        xp = get_xp(g)
        q, k, v = self.q, self.k, self.v
        if self.flash:  # the same formulas, p recomputed from the saved lse, tile by tile
            return cuda_kernels.flash_attention_backward(q, k, v, self.out, self.lse, g,
                                                         self.scale)
        if self.given is not None:  # laid out as q, k and v were: one array, as qkv's
            dq, dk, dv = _empty_like_views(*self.given)
        else:
            dq, dk, dv = xp.empty_like(q), xp.empty_like(k), xp.empty_like(v)
        if xp is not np:  # NumPy's BLAS reads g as it is (from (B, Tq, H D) in a GPT: strided)
            g = xp.ascontiguousarray(g)

        def sequences(q, k, v, probs, out, g, dq, dk, dv, *keep, add):
            dropped = probs * keep[0] if keep else probs
            _matmul_transposed_into(dropped, g, dv, add)  # (.., Tk, Tq) @ (.., Tq, D)
            dscores = xp.empty(probs.shape, np.result_type(g.dtype, v.dtype))
            _matmul_into(g, v.swapaxes(-1, -2), dscores)  # (.., Tq, D) @ (.., D, Tk)
            if keep:
                dscores *= keep[0]
            if self.fused_softmax and cuda_kernels.enabled(xp, dscores, out):
                cuda_kernels.softmax_backward(dscores, probs, dot_last(g, out))
            elif cpu_kernels.enabled(xp, dscores, probs):  # any mask: one pass for two
                cpu_kernels.softmax_backward(dscores, probs, dot_last(g, out))
            else:
                dscores -= dot_last(g, out)
                dscores *= probs
            _matmul_into(dscores, k, dq)  # (.., Tq, D)
            dq *= self.scale
            _matmul_transposed_into(dscores, q, dk, add)  # (.., Tk, D); q is already scaled

        pairs_kernel = self.pairs_kernel  # as the forward, if the gradients fit it too
        if pairs_kernel and g.dtype == q.dtype and not cpu_kernels.attention_enabled(g):
            g = np.ascontiguousarray(g)  # (a broadcast gradient has no rows BLAS can read)
        pairs_kernel = pairs_kernel and cpu_kernels.attention_fits(q, k, v, self.out, g, dq, dk,
                                                                   dv)
        # the last block sees every key: it writes dk and dv, and the blocks before it add theirs
        for (q0, q1, k1), probs in reversed(list(zip(self.blocks, self.probs, strict=True))):
            rows, keys = slice(q0, q1), slice(0, k1)
            if pairs_kernel:
                cpu_kernels.attention_backward(q[..., rows, :], k[..., keys, :], v[..., keys, :],
                                               probs, self.out[..., rows, :], g[..., rows, :],
                                               dq[..., rows, :], dk[..., keys, :],
                                               dv[..., keys, :], self.scale,
                                               add=q1 != self.blocks[-1][1],
                                               diagonal=q0 + k.shape[-2] - q.shape[-2])
                continue
            keep = [] if self.keep is None else [self.keep[..., rows, keys]]
            backend.parallel_batches(functools.partial(sequences, add=q1 != self.blocks[-1][1]),
                                     q[..., rows, :], k[..., keys, :], v[..., keys, :], probs,
                                     self.out[..., rows, :], g[..., rows, :], dq[..., rows, :],
                                     dk[..., keys, :], dv[..., keys, :], *keep, work=probs.size)
        return dq, dk, dv


def _views_of_one_array(*arrays) -> bool:
    """Whether ``arrays`` are views of one C-contiguous NumPy array, each with its elements
    apart (no broadcast axis) and none overlapping another: attention's q, k and v, cut from
    the qkv projection in a GPT."""
    base = arrays[0].base
    return (get_xp(arrays[0]) is np and isinstance(base, np.ndarray) and base.flags.c_contiguous
            and all(a.base is base and a.dtype == base.dtype and cpu_kernels.elements_apart(a)
                    for a in arrays)
            and all(cpu_kernels.apart(a, b) for i, a in enumerate(arrays)
                    for b in arrays[i + 1:]))


def _empty_like_views(*arrays):
    """For views of one array (``_views_of_one_array``): empty views of one new array of its
    shape, at the same places and strides. The gradients of q, k and v then lie side by side as
    the gradient of qkv does, and the backward walk takes that array as it is instead of
    copying the three into it (``SliceGrad.dense``)."""
    base = arrays[0].base
    new, start = np.empty_like(base), base.ctypes.data
    return [np.ndarray(a.shape, a.dtype, new, a.ctypes.data - start, a.strides) for a in arrays]


def _one_query_attention(q, k, v, mask, scale):
    """softmax(q k^T s + mask) v for one query per sequence and head: q (B, H, 1, D), k and v
    (B, H, Tk, D) -> (B, H, 1, D); the general forward's formula without its blocks, threads
    and compiled passes, which cost more than this arithmetic when decoding (docs/performance.md,
    "Decoding"). The last query sees every key, so a causal mask is passed as None; any other
    mask (padding: (B, 1, 1, Tk)) is added."""
    q = q * scale  # before the product, as the general forward does: float16 scores stay finite
    scores = np.matmul(q, k.swapaxes(-1, -2))  # (B, H, 1, D) @ (B, H, D, Tk) -> (B, H, 1, Tk)
    if mask is not None:
        scores += mask
    _softmax_in_place(scores)  # over the keys
    return np.matmul(scores, v)  # (B, H, 1, Tk) @ (B, H, Tk, D) -> (B, H, 1, D)


def _softmax_in_place(scores) -> None:
    """scores (..., Tk) -> softmax over the last axis, written back into ``scores``: the row's
    maximum subtracted first (exp never overflows), then exp, then each row divided by its sum."""
    scores -= scores.max(axis=-1, keepdims=True)
    get_xp(scores).exp(scores, out=scores)
    scores *= 1 / sum_last(scores)


def _matmul_into(a, b, out, add: bool = False) -> None:
    """out[...] = a @ b, or out += a @ b with ``add``, for stacks of matrices (.., M, K) @
    (.., K, N). On NumPy through ``blas.matmul_into``: one batched BLAS call (MKL's or
    OpenBLAS's) that gives each thread whole matrices, where it can. On CuPy straight into
    ``out`` when the dtypes agree, and through a temporary when mixed precision mixes float16
    and float32 (CuPy's ``out=`` wants the product's own dtype)."""
    if get_xp(a) is np:
        blas.matmul_into(a, b, out, add)
    elif add:
        out += a @ b
    elif out.dtype == np.result_type(a.dtype, b.dtype):
        get_xp(a).matmul(a, b, out=out)
    else:
        out[...] = a @ b


def _matmul_transposed_into(a, b, out, add: bool = False) -> None:
    """out[...] = a^T @ b, or out += a^T @ b with ``add``; a^T is ``a`` with its last two axes
    swapped: a (.., Tq, Tk) is attention's probabilities or score gradients, b (.., Tq, D) ->
    out (.., Tk, D).

    NumPy's BLAS takes the transposed operand as it is. On CuPy the product with the transposed
    batched (8, 12, 1024, 1024) operand took 1.11 ms against 0.30 ms untransposed (an H100), as
    if that 400 MB operand were copied first (inferred from the timing, not traced), so on a GPU
    this computes (b^T a)^T, whose transpose is of the small (.., D, Tk) result."""
    if get_xp(a) is np:
        _matmul_into(a.swapaxes(-1, -2), b, out, add)
    elif add:
        out += (b.swapaxes(-1, -2) @ a).swapaxes(-1, -2)
    else:
        out[...] = (b.swapaxes(-1, -2) @ a).swapaxes(-1, -2)


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, mask=None,
                                 dropout_p: float = 0.0, additive_mask=None,
                                 mask_is_causal: bool = False) -> Tensor:
    """Fused attention on (B, H, T, D) tensors: equals softmax(q k^T / sqrt(D) + mask) v.

    Args:
        q: (B, H, Tq, D); k, v: (B, H, Tk, D) with Tk >= Tq (a KV cache holds the earlier keys).
        causal: each query sees only keys at or before its own position (bottom-right aligned);
            the mask is built on every call.
        mask: optional boolean array broadcastable to (B, H, Tq, Tk); True = may attend.
        dropout_p: dropout on the attention weights (training only; pass 0 in eval).
        additive_mask: instead of ``causal`` and ``mask``, the whole mask already in additive
            form (``make_additive_mask``), broadcastable to (B, H, Tq, Tk): how a model passes
            the causal mask it caches (``models.gpt.CausalMaskCache``).
        mask_is_causal: a promise that ``additive_mask`` is exactly the causal mask (as
            PyTorch's ``is_causal`` hint beside ``attn_mask``): on a GPU, a kernel that applies
            the causal rule by index -- the fused causal softmax, or the flash kernels where
            ``cuda_kernels.use_flash`` picks them -- may then leave the mask unread.
    """
    if additive_mask is not None:
        if causal or mask is not None:
            raise ValueError("scaled_dot_product_attention: additive_mask is the whole mask; pass "
                             "causal=False and no mask with it (or build it from both)")
        additive_mask = array_on(additive_mask, q.device)
    elif causal or mask is not None:
        xp = backend.array_module(q.device)
        blocked = causal_mask(q.shape[-2], k.shape[-2], xp) if causal else False
        if mask is not None:  # True = may attend (PyTorch's convention)
            blocked = blocked | ~xp.asarray(array_on(mask, q.device), dtype=bool)
        additive_mask = make_additive_mask(blocked, q.dtype)
        mask_is_causal = causal and mask is None
    return ScaledDotProductAttention.apply(q, k, v, mask=additive_mask, dropout_p=dropout_p,
                                           device=q.device, mask_is_causal=mask_is_causal)


# ============================================================================ DPO loss
class DPOLoss(Function):
    """Mean over the batch of -log sigmoid(beta * ((pc - pr) - (rc - rr))), stably."""

    def forward(self, policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta):
        xp = get_xp(policy_chosen)
        z = beta * ((policy_chosen - policy_rejected) - (ref_chosen - ref_rejected))  # (B,)
        self.beta, self.count = beta, z.shape[0]
        # -log sigmoid(z) = softplus(-z) = max(-z, 0) + log1p(exp(-|z|)): no exp overflows
        losses = xp.maximum(-z, 0) + xp.log1p(xp.exp(-xp.abs(z)))
        self.sigmoid_minus_z = 0.5 * (1.0 - xp.tanh(0.5 * z))  # sigmoid(-z), stable for any z
        return xp.asarray(losses.mean(), dtype=z.dtype)

    def backward(self, g):
        # d/dz softplus(-z) = -sigmoid(-z); the mean divides by B; dz/d(pc, pr, rc, rr) is
        # beta * (1, -1, -1, 1). g is a scalar, every gradient (B,).
        dz = self.sigmoid_minus_z * (-g * self.beta / self.count)
        return dz, -dz, -dz, dz


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
             ref_rejected: Tensor, beta: float = 0.1) -> Tensor:
    """The DPO loss: mean of -log sigmoid(beta * ((pc - pr) - (rc - rr))), all four (B,).

    Arguments are per-example sequence log-probabilities of the chosen and rejected answers
    under the policy and the frozen reference. Equals ``mean(softplus(-z))``; finite for any z.
    """
    shapes = {t.shape for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"dpo_loss: expected four (B,) tensors of one shape, got shapes "
                         f"{sorted(shapes)}")
    return DPOLoss.apply(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                         beta=float(beta))
