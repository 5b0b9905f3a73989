"""Fused CUDA kernels for the elementwise and row-wise ops of a training step, beside their
NumPy bodies (Chainer's pattern).

On a GPU every array operation is one kernel launch and one pass over memory. The plain array
code of AdamW is eight of them per parameter, GELU's forward six, a layer norm's about seven,
the loss head's softmax five over the largest array of the step. Each kernel here does the same
arithmetic in one launch and one pass, in float32.

The array code in ``optim.py``, ``functional.py`` and ``fused.py`` stays the reference: it runs
on NumPy, on CuPy by default, and under the test stand-in (which cannot compile CUDA), and
``tests/test_cuda_kernels.py`` compares every kernel with it on a real GPU. An op calls its
kernel only when ``enabled(xp)``: ``xp`` is a real CuPy that can compile kernels, the arrays are
float32, and ``TINYGRAD_LLM_CUDA_KERNELS=1`` is set.

Status: written, not yet run on a GPU -- so off unless asked for. ``bench/gpu.py`` times a
GPT-2 training step with and without them; a kernel stays (and becomes the default) only where
that run shows it faster.
"""

from __future__ import annotations

import functools
import os

import numpy as np


def enabled(xp, *arrays) -> bool:
    """Whether an op on these arrays of module ``xp`` should use its fused kernel."""
    if xp is np or os.environ.get("TINYGRAD_LLM_CUDA_KERNELS") != "1":
        return False
    if not hasattr(xp, "RawKernel"):  # the CPU stand-in for CuPy in tests: no compiler
        return False
    return all(a.dtype == np.float32 for a in arrays)


# ------------------------------------------------------------------------------ AdamW
@functools.cache
def _adamw_kernel():
    import cupy

    # p, m, v are read and written in place; the bias corrections are folded into step_size
    # and eps by the caller (optim.AdamW.step), exactly as its array code does
    return cupy.ElementwiseKernel(
        "float32 g, float32 b1, float32 b2, float32 step_size, float32 eps, float32 decay",
        "float32 p, float32 m, float32 v",
        """
        m = b1 * m + (1.0f - b1) * g;
        v = b2 * v + (1.0f - b2) * g * g;
        p = p * decay - step_size * m / (sqrtf(v) + eps);
        """,
        "tinygrad_llm_adamw")


def adamw_update(p, g, m, v, b1, b2, step_size, eps, decay) -> None:
    """In place: m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
    p = p * decay - step_size * m / (sqrt(v) + eps)."""
    _adamw_kernel()(g, b1, b2, step_size, eps, decay, p, m, v)


# ------------------------------------------------------------------------------- GELU
GELU_BODY = "const float c = 0.7978845608028654f, a = 0.044715f;"  # sqrt(2/pi), GPT-2's 0.044715


@functools.cache
def _gelu_kernels():
    import cupy

    forward = cupy.ElementwiseKernel(
        "float32 x", "float32 y",
        GELU_BODY + "y = 0.5f * x * (1.0f + tanhf(c * x * (1.0f + a * x * x)));",
        "tinygrad_llm_gelu_forward")
    # the backward recomputes tanh from x instead of saving it: one array less kept per layer
    backward = cupy.ElementwiseKernel(
        "float32 x, float32 g", "float32 dx",
        GELU_BODY + """
        float t = tanhf(c * x * (1.0f + a * x * x));
        dx = g * 0.5f * (1.0f + t + x * (1.0f - t * t) * c * (1.0f + 3.0f * a * x * x));
        """,
        "tinygrad_llm_gelu_backward")
    return forward, backward


def gelu_forward(x):
    return _gelu_kernels()[0](x)


def gelu_backward(x, g):
    return _gelu_kernels()[1](x, g)


# ------------------------------------------------------------------------ row kernels
# One thread block per row; the threads stride over the row's C values and add up their partial
# sums with warp shuffles, then across warps through shared memory.
ROW_THREADS = 256

_BLOCK_SUM = r"""
#define MINUS_INFINITY __int_as_float(0xff800000)  // NVRTC has no <math.h> macros

__device__ float block_sum(float value, float* shared) {
    for (int offset = 16; offset > 0; offset >>= 1)
        value += __shfl_xor_sync(0xffffffff, value, offset);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();                       // shared may still be read by a previous call
    if (lane == 0) shared[warp] = value;
    __syncthreads();
    value = threadIdx.x < (blockDim.x >> 5) ? shared[threadIdx.x] : 0.0f;
    if (warp == 0)
        for (int offset = 16; offset > 0; offset >>= 1)
            value += __shfl_xor_sync(0xffffffff, value, offset);
    if (threadIdx.x == 0) shared[0] = value;
    __syncthreads();
    return shared[0];
}

__device__ float block_max(float value, float* shared) {
    for (int offset = 16; offset > 0; offset >>= 1)
        value = fmaxf(value, __shfl_xor_sync(0xffffffff, value, offset));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = value;
    __syncthreads();
    value = threadIdx.x < (blockDim.x >> 5) ? shared[threadIdx.x] : MINUS_INFINITY;
    if (warp == 0)
        for (int offset = 16; offset > 0; offset >>= 1)
            value = fmaxf(value, __shfl_xor_sync(0xffffffff, value, offset));
    if (threadIdx.x == 0) shared[0] = value;
    __syncthreads();
    return shared[0];
}
"""

_LAYER_NORM = _BLOCK_SUM + r"""
extern "C" __global__
void layer_norm_forward(const float* x, const float* w, const float* b, float* y, float* xhat,
                        float* rstd_out, int C, float eps, int has_bias) {
    __shared__ float shared[32];
    size_t row = blockIdx.x;
    const float* xr = x + row * C;
    float sum = 0.0f;
    for (int i = threadIdx.x; i < C; i += blockDim.x) sum += xr[i];
    float mean = block_sum(sum, shared) / C;
    float squares = 0.0f;
    for (int i = threadIdx.x; i < C; i += blockDim.x) { float d = xr[i] - mean; squares += d * d; }
    float rstd = rsqrtf(block_sum(squares, shared) / C + eps);
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        float h = (xr[i] - mean) * rstd;
        xhat[row * C + i] = h;
        y[row * C + i] = h * w[i] + (has_bias ? b[i] : 0.0f);
    }
    if (threadIdx.x == 0) rstd_out[row] = rstd;
}

// dx = rstd * (gxh - mean(gxh) - xhat * mean(gxh * xhat)),  gxh = g * w
extern "C" __global__
void layer_norm_backward(const float* g, const float* xhat, const float* w, const float* rstd,
                         float* dx, int C) {
    __shared__ float shared[32];
    size_t row = blockIdx.x;
    const float* gr = g + row * C;
    const float* hr = xhat + row * C;
    float sum = 0.0f, dot = 0.0f;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        float gxh = gr[i] * w[i];
        sum += gxh;
        dot += gxh * hr[i];
    }
    float mean = block_sum(sum, shared) / C;
    float mean_dot = block_sum(dot, shared) / C;
    for (int i = threadIdx.x; i < C; i += blockDim.x)
        dx[row * C + i] = rstd[row] * (gr[i] * w[i] - mean - hr[i] * mean_dot);
}
"""


@functools.cache
def _layer_norm_kernels():
    import cupy

    module = cupy.RawModule(code=_LAYER_NORM)
    return module.get_function("layer_norm_forward"), module.get_function("layer_norm_backward")


def layer_norm_forward(x, weight, bias, eps: float):
    """(y, xhat, rstd) of a layer norm over the last axis: x (..., C) -> (..., C), (..., 1)."""
    import cupy

    C = x.shape[-1]
    rows = x.size // C
    x = cupy.ascontiguousarray(x)
    y, xhat = cupy.empty_like(x), cupy.empty_like(x)
    rstd = cupy.empty(x.shape[:-1] + (1,), np.float32)
    has_bias = bias is not None
    b = bias if has_bias else weight  # any float pointer; not read
    _layer_norm_kernels()[0]((rows,), (ROW_THREADS,),
                             (x, weight, b, y, xhat, rstd, np.int32(C), np.float32(eps),
                              np.int32(has_bias)))
    return y, xhat, rstd


def layer_norm_backward(g, xhat, weight, rstd):
    """dx of a layer norm (..., C) from its saved xhat and rstd."""
    import cupy

    C = xhat.shape[-1]
    g = cupy.ascontiguousarray(g)
    dx = cupy.empty_like(g)
    _layer_norm_kernels()[1]((xhat.size // C,), (ROW_THREADS,),
                             (g, xhat, weight, rstd, dx, np.int32(C)))
    return dx


_CROSS_ENTROPY = _BLOCK_SUM + r"""
// One row of logits (V,) -> its loss, and in place the gradient of `scale * loss`:
// scale * (softmax(logits) - onehot(target)). A row with scale 0 (an ignored position) gets
// loss 0 and a zero gradient.
extern "C" __global__
void cross_entropy_rows(float* logits, const long long* targets, const float* scale,
                        float* loss, int V) {
    __shared__ float shared[32];
    size_t row = blockIdx.x;
    float* lr = logits + row * V;
    float top = MINUS_INFINITY;
    for (int i = threadIdx.x; i < V; i += blockDim.x) top = fmaxf(top, lr[i]);
    top = block_max(top, shared);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) sum += expf(lr[i] - top);
    sum = block_sum(sum, shared);
    long long target = targets[row];
    float w = scale[row];
    float target_logit = lr[target];
    __syncthreads();                    // every thread has read lr[target] before it changes
    for (int i = threadIdx.x; i < V; i += blockDim.x)
        lr[i] = w * (expf(lr[i] - top) / sum - (i == target ? 1.0f : 0.0f));
    if (threadIdx.x == 0) loss[row] = w != 0.0f ? logf(sum) - (target_logit - top) : 0.0f;
}
"""


@functools.cache
def _cross_entropy_kernel():
    import cupy

    return cupy.RawModule(code=_CROSS_ENTROPY).get_function("cross_entropy_rows")


def cross_entropy_rows(logits, targets, scale):
    """Per-row losses (n,) of logits (n, V) with int64 targets (n,) (valid ids only: ignored
    rows read class 0 and have ``scale`` 0); ``logits`` is overwritten with the gradient
    ``scale[:, None] * (softmax(logits) - onehot(targets))``."""
    import cupy

    n, V = logits.shape
    loss = cupy.empty(n, np.float32)
    _cross_entropy_kernel()((n,), (ROW_THREADS,),
                            (logits, cupy.ascontiguousarray(targets, dtype=np.int64),
                             cupy.ascontiguousarray(scale, dtype=np.float32), loss,
                             np.int32(V)))
    return loss
