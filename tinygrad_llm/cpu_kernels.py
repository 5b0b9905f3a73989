"""Compiled CPU kernels for the row-wise ops NumPy needs many passes for (optional: numba).

NumPy runs every ufunc as its own loop over the whole array, so a formula of six operations reads
and writes memory six times, and a per-row value (a mean, a 1/std) is broadcast by an inner loop
per row. Layer norm's forward is four such passes and two BLAS row sums, its backward six passes
and three row sums; PyTorch does each in one pass. These kernels are the same arithmetic written
as the loops a C programmer would write -- one row at a time, each row read once or twice while
it sits in the L1 cache -- and compiled by numba (``pip install "tinygrad-llm[cpu]"``). They
compute the same formulas as the GPU kernels in ``cuda_kernels.py``.

The array code in ``fused.py``, ``functional.py`` and ``optim.py`` stays the reference: it runs
wherever numba is not installed (or does not import), and ``tests/test_cpu_kernels.py`` compares
every kernel with it. An op calls its kernel only when ``enabled(xp, *arrays)``: the arrays are
NumPy, float32 or float64 and C-contiguous, numba imports, and ``TINYGRAD_LLM_CPU_KERNELS=0`` is
not set (it switches them off, leaving the array code). Each kernel is compiled on its first call
for each dtype (about a second) and cached on disk by numba after that. Each call runs on one
thread: GELU, layer norm and the softmax are called per block of rows or sequences from the
library's threads (``--threads``), AdamW once per array.

Which ops have a kernel was decided by measurement (docs/performance.md): layer norm, AdamW,
GELU, and attention's causal softmax and the softmax's backward. GELU's ``tanh`` and the
softmax's ``exp`` stay NumPy's, between compiled passes: numba calls the C library's scalar
``tanh`` and ``exp``, 40x and 8x slower than NumPy's vectorized ones here.

Sums and means accumulate in float64 (the ``0.0`` they start from), which is more exact than
the float32 of the array code; the passes over the elements run in the arrays' own dtype (a
float64 scalar inside a float32 loop would make it a float64 loop: see each kernel). They are
compiled with NumPy's error model: a division by zero gives inf or nan, as in the array code,
where numba's default (Python's) tests every divisor and raises, which keeps a loop that divides
from being vectorized -- AdamW's update took 38 ms on 10.7M floats that way, 12 ms now.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
import warnings

import numpy as np

# the kernels may reorder sums (to vectorise them) and fuse a multiply with an add; NaN and inf
# keep their meaning (an overflowing float16 step must still be seen as one)
_FASTMATH = {"reassoc", "contract"}


@functools.cache
def available() -> bool:
    """Whether numba is installed and imports (tried once; a numba built for another NumPy
    fails here, with a warning, and the array code runs instead)."""
    if importlib.util.find_spec("numba") is None:
        return False
    try:
        import numba  # noqa: F401
    except Exception as error:  # noqa: BLE001 -- any failure: fall back, say why
        warnings.warn(f"numba is installed but does not import ({error}); tinygrad_llm runs its "
                      "NumPy code instead of the compiled CPU kernels", stacklevel=2)
        return False
    return True


def enabled(xp, *arrays) -> bool:
    """Whether an op on these arrays of module ``xp`` should use its compiled kernel."""
    if xp is not np or os.environ.get("TINYGRAD_LLM_CPU_KERNELS") == "0" or not available():
        return False
    return all(a.dtype in (np.float32, np.float64) and a.flags.c_contiguous for a in arrays)


_COMPILING = threading.Lock()  # two threads' first calls compile a kernel once


def _compile(function):
    """numba's ``njit`` of ``function``, made on first use (importing numba takes a while)."""
    compiled = None

    @functools.wraps(function)
    def call(*args):
        nonlocal compiled
        if compiled is None:
            with _COMPILING:
                if compiled is None:
                    import numba

                    compiled = numba.njit(cache=True, nogil=True, fastmath=_FASTMATH,
                                          error_model="numpy")(function)
        return compiled(*args)

    return call


# ------------------------------------------------------------------------------ layer norm
@_compile
def _layer_norm_forward_rows(x, weight, bias, eps, y, xhat, rstd, mean):
    # x, y, xhat (N, C); weight, bias (C,); rstd, mean (N,)
    rows, width = x.shape
    for i in range(rows):
        total = 0.0
        for j in range(width):
            total += x[i, j]
        # the statistics go through arrays of x's dtype and are read back from them, so the
        # passes over the row run in that dtype (a float64 scalar in a float32 loop makes it a
        # float64 loop, 1.5x slower here)
        mean[i] = total / width
        m = mean[i]
        squares = 0.0
        for j in range(width):
            centered = x[i, j] - m
            squares += centered * centered
        rstd[i] = 1.0 / np.sqrt(squares / width + eps)  # 1 / std of the row
        r = rstd[i]
        for j in range(width):
            normalized = (x[i, j] - m) * r
            xhat[i, j] = normalized
            y[i, j] = normalized * weight[j] + bias[j]


def layer_norm_forward_rows(x, xhat, rstd, y, *, weight, bias, eps: float) -> None:
    """Layer norm of a block of rows x (N, C), as ``fused._layer_norm_rows``: xhat = (x - mean)
    / sqrt(var + eps), y = xhat w + b, rstd (N, 1) = 1 / sqrt(var + eps), written in place."""
    _layer_norm_forward_rows(x, weight, np.zeros_like(weight) if bias is None else bias,
                             x.dtype.type(eps), y, xhat, rstd.reshape(-1),
                             np.empty(len(x), x.dtype))


@_compile
def _layer_norm_backward_rows(g, xhat, weight, rstd, dx, dweight, dbias, means):
    # with gx̂ = g w and means over the C features of a row:
    #   dx = rstd (gx̂ - mean(gx̂) - x̂ mean(gx̂ x̂));  dw += g x̂ and db += g over the rows
    rows, width = g.shape
    for i in range(rows):
        mean_g = 0.0  # mean(gx̂)
        mean_gx = 0.0  # mean(gx̂ x̂)
        for j in range(width):
            gxhat = g[i, j] * weight[j]
            mean_g += gxhat
            mean_gx += gxhat * xhat[i, j]
            dweight[j] += g[i, j] * xhat[i, j]
            dbias[j] += g[i, j]
        means[0], means[1] = mean_g / width, mean_gx / width  # in g's dtype, as in the forward
        shift, slope = means[0], means[1]
        for j in range(width):
            dx[i, j] = rstd[i] * (g[i, j] * weight[j] - shift - xhat[i, j] * slope)


def layer_norm_backward_rows(g, xhat, rstd, dx, *, weight, sums: dict) -> None:
    """dx of a block of rows (N, C) from g and the forward's xhat and rstd (N, 1), as
    ``fused._layer_norm_backward_rows``, in one pass that also sums the block's share of
    dweight = sum(g x̂) and dbias = sum(g) over its rows (in float64): ``sums[address] =
    (dweight, dbias)``, keyed by the address of the block's first row, so that the shares can
    be added in the order of the rows (the same result on every run)."""
    width = xhat.shape[-1]
    dweight, dbias = np.zeros(width, np.float64), np.zeros(width, np.float64)
    _layer_norm_backward_rows(g, xhat, weight, rstd.reshape(-1), dx, dweight, dbias,
                              np.empty(2, g.dtype))
    sums[g.ctypes.data] = dweight, dbias


# ----------------------------------------------------------------------------------- AdamW
@_compile
def _adamw_rows(p, g, m, v, b1, c1, b2, c2, step_size, eps, decay):
    # p, g, m, v flat; m and v updated in place, then p (the formulas of optim.AdamW.step,
    # with c1 = 1 - b1 and c2 = 1 - b2); every scalar is of the arrays' dtype, so a float32
    # update stays in float32 and runs 16 floats per AVX-512 instruction
    for i in range(p.shape[0]):
        gradient = g[i]
        m_i = b1 * m[i] + c1 * gradient
        v_i = b2 * v[i] + c2 * gradient * gradient
        m[i] = m_i
        v[i] = v_i
        p[i] = p[i] * decay - step_size * m_i / (np.sqrt(v_i) + eps)


def adamw_update(p, g, m, v, b1, b2, step_size, eps, decay) -> None:
    """One AdamW update of ``p`` in place, with its moments ``m`` and ``v`` (all of one shape
    and dtype, C-contiguous); the scalars as ``optim.AdamW.step`` folds them."""
    scalar = p.dtype.type
    _adamw_rows(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), scalar(b1),
                scalar(1 - b1), scalar(b2), scalar(1 - b2), scalar(step_size), scalar(eps),
                scalar(decay))


# ------------------------------------------------------------------- attention's softmax
@_compile
def _causal_shift_rows(scores, diagonal):
    # scores (M, Tq, Tk): row r sees keys 0..r + diagonal; subtract its maximum over them, and
    # make the keys it may not see -inf (exp turns them into 0).
    # The maximum as eight running maxima, one per position modulo 8: a single running maximum
    # waits for its previous value at every element (numba does not vectorise this reduction);
    # eight independent ones keep the CPU busy (2.8x faster here).
    matrices, queries, keys = scores.shape
    for b in range(matrices):
        for r in range(queries):
            seen = min(keys, r + diagonal + 1)
            row = scores[b, r]
            m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = row[0]
            whole = seen - seen % 8
            for j in range(0, whole, 8):
                m0, m1, m2, m3 = (max(m0, row[j]), max(m1, row[j + 1]), max(m2, row[j + 2]),
                                  max(m3, row[j + 3]))
                m4, m5, m6, m7 = (max(m4, row[j + 4]), max(m5, row[j + 5]),
                                  max(m6, row[j + 6]), max(m7, row[j + 7]))
            for j in range(whole, seen):
                m0 = max(m0, row[j])
            largest = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
            for j in range(seen):
                row[j] -= largest
            for j in range(seen, keys):
                row[j] = -np.inf


@_compile
def _normalize_rows(probs, scale):
    # probs (N, Tk): divide each row by its sum. The sum is taken in float64; 1 / sum goes
    # through ``scale`` (one element of probs' dtype) so that the multiplying pass runs in that
    # dtype: with a float64 scale it ran 3.5-5x slower on float32 rows
    for i in range(probs.shape[0]):
        total = 0.0
        for j in range(probs.shape[1]):
            total += probs[i, j]
        scale[0] = 1.0 / total
        factor = scale[0]
        for j in range(probs.shape[1]):
            probs[i, j] *= factor


def causal_softmax(scores, diagonal: int) -> None:
    """In place: scores (..., Tq, Tk), C-contiguous -> the softmax over the last axis, where
    query r sees keys 0..r + diagonal (zeros beyond; ``diagonal = Tk - Tq`` for a whole causal
    matrix, bottom-right aligned as ``fused.causal_mask``). Two compiled passes and NumPy's exp
    between them, where the array code makes six (add the mask, max, subtract, exp, sum,
    scale)."""
    queries, keys = scores.shape[-2:]
    _causal_shift_rows(scores.reshape(-1, queries, keys), diagonal)
    np.exp(scores, out=scores)
    _normalize_rows(scores.reshape(-1, keys), np.empty(1, scores.dtype))


@_compile
def _softmax_backward_rows(dprobs, probs, delta):
    for i in range(dprobs.shape[0]):
        for j in range(dprobs.shape[1]):
            dprobs[i, j] = probs[i, j] * (dprobs[i, j] - delta[i])


def softmax_backward(dprobs, probs, delta) -> None:
    """In place: dprobs (..., Tq, Tk) -> dS = probs * (dprobs - delta), delta (..., Tq, 1): one
    pass for the array code's two."""
    keys = dprobs.shape[-1]
    _softmax_backward_rows(dprobs.reshape(-1, keys), probs.reshape(-1, keys), delta.reshape(-1))


# ------------------------------------------------------------------------------------ GELU
# The constants come in as arguments of the arrays' dtype: a literal such as 0.5 is a float64 to
# numba, and would make the float32 loops compute in float64, at half the speed or less.
@_compile
def _gelu_argument(x, u, c, a, one):
    # u = c (x + a x^3), the argument of tanh (flat arrays)
    for i in range(x.shape[0]):
        u[i] = c * x[i] * (one + a * x[i] * x[i])


@_compile
def _gelu_output(x, t, y, half, one):
    # y = x/2 (1 + t), t = tanh(u)
    for i in range(x.shape[0]):
        y[i] = half * x[i] * (one + t[i])


def gelu_forward_rows(x, t, y, *, c, a) -> None:
    """GELU of a block, as ``functional._gelu_forward_rows``: t = tanh(c (x + a x^3)) and
    y = x/2 (1 + t), written into t and y. Three passes (NumPy's tanh in the middle), for eight."""
    flat_t, scalar = t.reshape(-1), x.dtype.type
    _gelu_argument(x.reshape(-1), flat_t, scalar(c), scalar(a), scalar(1))
    np.tanh(flat_t, out=flat_t)
    _gelu_output(x.reshape(-1), flat_t, y.reshape(-1), scalar(0.5), scalar(1))


@_compile
def _gelu_backward_flat(x, t, g, dx, c, a, half, one, three):
    # dx = g dy/dx,  dy/dx = (1 + t)/2 + x/2 (1 - t^2) c (1 + 3 a x^2)
    for i in range(x.shape[0]):
        slope = (half * (one + t[i])
                 + half * x[i] * (one - t[i] * t[i]) * c * (one + three * a * x[i] * x[i]))
        dx[i] = g[i] * slope


def gelu_backward_rows(x, t, g, dx, *, c, a) -> None:
    """dx of a block from x, the saved t = tanh(u) and g, as ``functional._gelu_backward_rows``:
    one pass, for eleven."""
    scalar = x.dtype.type
    _gelu_backward_flat(x.reshape(-1), t.reshape(-1), g.reshape(-1), dx.reshape(-1), scalar(c),
                        scalar(a), scalar(0.5), scalar(1), scalar(3))
