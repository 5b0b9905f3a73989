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
float32 (GELU: float16 too), and ``TINYGRAD_LLM_CUDA_KERNELS=0`` is not set (it switches them
all off, leaving the array code).

``bench/gpu.py`` times a GPT-2 training step with and without them on a GPU; each kernel here
was kept because that run showed it faster (the figures are in docs/gpu.md), and the flash
attention kernels are used only where the T x T matrix would be large (``use_flash``).
"""

from __future__ import annotations

import functools
import os

import numpy as np


def enabled(xp, *arrays, dtypes=(np.float32,)) -> bool:
    """Whether an op on these arrays of module ``xp`` should use its fused kernel."""
    if xp is np or os.environ.get("TINYGRAD_LLM_CUDA_KERNELS") == "0":
        return False
    if not hasattr(xp, "RawKernel"):  # the CPU stand-in for CuPy in tests: no compiler
        return False
    return all(a.dtype in dtypes for a in arrays)


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


GELU_DTYPES = (np.float32, np.float16)  # float16 arrays (mixed precision) compute in float32


@functools.cache
def _gelu_kernels():
    import cupy

    forward = cupy.ElementwiseKernel(
        "T x", "T y",
        GELU_BODY + """
        float v = (float)x;
        y = (T)(0.5f * v * (1.0f + tanhf(c * v * (1.0f + a * v * v))));
        """,
        "tinygrad_llm_gelu_forward")
    # the backward recomputes tanh from x instead of saving it: one array less kept per layer
    backward = cupy.ElementwiseKernel(
        "T x, G g", "T dx",
        GELU_BODY + """
        float v = (float)x;
        float t = tanhf(c * v * (1.0f + a * v * v));
        float slope = 0.5f * (1.0f + t + v * (1.0f - t * t) * c * (1.0f + 3.0f * a * v * v));
        dx = (T)((float)g * slope);
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
    // __fmul_rn: g * w rounded the same in both loops (never fused into an FMA), so a row whose
    // gxh are all equal (C = 1) gets gxh - mean = 0 exactly, as in the array code; else the
    // FMA's unrounded product leaves ~1e-8 that rstd (up to 1/sqrt(eps)) blows up
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        float gxh = __fmul_rn(gr[i], w[i]);
        sum += gxh;
        dot += gxh * hr[i];
    }
    float mean = block_sum(sum, shared) / C;
    float mean_dot = block_sum(dot, shared) / C;
    for (int i = threadIdx.x; i < C; i += blockDim.x)
        dx[row * C + i] = rstd[row] * (__fmul_rn(gr[i], w[i]) - mean - hr[i] * mean_dot);
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


# ------------------------------------------------------------------ attention softmax
# The softmax of attention's scores S (B, H, Tq, Tk), causal, in place: one block per row, the
# mask applied by index (query row i sees keys 0 .. i + Tk - Tq) instead of adding a mask
# array, and the max, exp, sum and division in one kernel instead of five passes over the
# T x T matrix. The products before and after stay cuBLAS's (``q @ k^T``, ``P @ v``).
_CAUSAL_SOFTMAX = _BLOCK_SUM + r"""
extern "C" __global__
void causal_softmax_rows(float* scores, int Tq, int Tk) {
    __shared__ float shared[32];
    size_t row = blockIdx.x;
    int last = (int)(row % Tq) + Tk - Tq;          // the last key this query row sees
    float* r = scores + row * Tk;
    float top = MINUS_INFINITY;
    for (int j = threadIdx.x; j <= last; j += blockDim.x) top = fmaxf(top, r[j]);
    top = block_max(top, shared);
    float sum = 0.0f;
    for (int j = threadIdx.x; j <= last; j += blockDim.x) sum += expf(r[j] - top);
    float inverse = 1.0f / block_sum(sum, shared);
    for (int j = threadIdx.x; j < Tk; j += blockDim.x)
        r[j] = j <= last ? expf(r[j] - top) * inverse : 0.0f;
}
"""


@functools.cache
def _causal_softmax_kernels():
    import cupy

    forward = cupy.RawModule(code=_CAUSAL_SOFTMAX).get_function("causal_softmax_rows")
    # dS = P * (dP - delta), delta (..., Tq, 1) = rowsum(g * out): in place of dP, one pass
    backward = cupy.ElementwiseKernel("float32 p, float32 delta", "float32 ds",
                                      "ds = p * (ds - delta);", "tinygrad_llm_softmax_backward")
    return forward, backward


def causal_softmax(scores) -> None:
    """In place: scores (..., Tq, Tk), C-contiguous -> the causal softmax over the last axis
    (zeros where a query may not look)."""
    Tq, Tk = scores.shape[-2:]
    _causal_softmax_kernels()[0]((scores.size // Tk,), (ROW_THREADS,),
                                 (scores, np.int32(Tq), np.int32(Tk)))


def softmax_backward(dprobs, probs, delta) -> None:
    """In place: dprobs (..., Tq, Tk) -> dS = probs * (dprobs - delta), delta (..., Tq, 1)."""
    _causal_softmax_kernels()[1](probs, delta, dprobs)


# --------------------------------------------------------------------- flash attention
# Causal attention without the T x T matrix (Dao et al., 2022, "FlashAttention"): each thread
# owns one query row and walks the keys in tiles of TILE rows, which the block's threads load
# together into shared memory. The softmax is computed online: the thread keeps its running
# maximum m, its running sum l = sum_j exp(s_j - m) and its running output acc = sum_j
# exp(s_j - m) v_j, and rescales l and acc by exp(m_old - m_new) when a tile raises the maximum.
# The forward saves only the output and lse = m + log(l) per row (B, H, Tq), so the backward
# recomputes each probability as p_ij = exp(s_ij - lse_i) without storing it.
#
# Backward, with delta_i = sum_d dout_id out_id (= sum_j p_ij dp_ij, the FlashAttention identity):
#   dp_ij = dout_i . v_j     ds_ij = p_ij (dp_ij - delta_i)
#   dq_i = scale sum_j ds_ij k_j     dk_j = sum_i ds_ij (scale q_i)     dv_j = sum_i p_ij dout_i
# Three kernels, each writing its own rows, so no atomic adds and the same result every run:
# dq (a thread per query row, tiles of keys), dk and dv (a thread per key row, tiles of queries).
#
# Query row i sits at key position i + Tk - Tq (bottom-right aligned, as F.causal_mask), so it
# sees keys 0 .. i + Tk - Tq. Only float32, head sizes that are a multiple of 4 up to 128.
FLASH_ROWS = 64  # threads per block = query (or key) rows per block
FLASH_TILE = 32  # key (or query) rows per tile in shared memory

_FLASH = r"""
#define D HEAD_DIM_VALUE
#define D4 (D / 4)
#define ROWS FLASH_ROWS_VALUE
#define TILE FLASH_TILE_VALUE
#define MINUS_INFINITY __int_as_float(0xff800000)

__device__ __forceinline__ float dot4(const float* a, float4 b, int d4) {
    return a[4 * d4] * b.x + a[4 * d4 + 1] * b.y + a[4 * d4 + 2] * b.z + a[4 * d4 + 3] * b.w;
}

__device__ __forceinline__ void add4(float* acc, float p, float4 b, int d4) {
    acc[4 * d4] += p * b.x; acc[4 * d4 + 1] += p * b.y;
    acc[4 * d4 + 2] += p * b.z; acc[4 * d4 + 3] += p * b.w;
}

// Load rows start .. start+TILE-1 of a (rows, D) matrix into shared memory (zeros past the end),
// every thread of the block taking part.
__device__ __forceinline__ void load_tile(float4* tile, const float* m, int start, int rows,
                                          float scale) {
    const float4* m4 = reinterpret_cast<const float4*>(m);
    for (int idx = threadIdx.x; idx < TILE * D4; idx += blockDim.x) {
        int row = start + idx / D4;
        float4 value = row < rows ? m4[(size_t)start * D4 + idx] : make_float4(0, 0, 0, 0);
        value.x *= scale; value.y *= scale; value.z *= scale; value.w *= scale;
        tile[idx] = value;
    }
}

extern "C" __global__
void flash_forward(const float* q, const float* k, const float* v, float* out, float* lse,
                   int Tq, int Tk, float scale) {
    __shared__ float4 ks[TILE * D4], vs[TILE * D4];
    size_t head = blockIdx.y;
    q += head * Tq * D; k += head * Tk * D; v += head * Tk * D; out += head * Tq * D;
    lse += head * Tq;
    int row = blockIdx.x * ROWS + threadIdx.x;
    bool active = row < Tq;
    int shift = Tk - Tq;
    int last_key = row + shift;                                     // this row sees keys <= it
    int block_last_key = min(Tk - 1, blockIdx.x * ROWS + ROWS - 1 + shift);
    float qr[D], acc[D];
    #pragma unroll
    for (int d = 0; d < D; d++) {
        qr[d] = active ? q[(size_t)row * D + d] * scale : 0.0f;
        acc[d] = 0.0f;
    }
    float m = MINUS_INFINITY, l = 0.0f;
    for (int start = 0; start <= block_last_key; start += TILE) {
        __syncthreads();                                            // the last tile is read
        load_tile(ks, k, start, Tk, 1.0f);
        load_tile(vs, v, start, Tk, 1.0f);
        __syncthreads();
        if (!active || start > last_key) continue;
        float s[TILE];
        float tile_max = MINUS_INFINITY;
        #pragma unroll
        for (int j = 0; j < TILE; j++) {
            float dot = 0.0f;
            #pragma unroll
            for (int d4 = 0; d4 < D4; d4++) dot += dot4(qr, ks[j * D4 + d4], d4);
            s[j] = start + j <= last_key ? dot : MINUS_INFINITY;    // also masks keys >= Tk
            tile_max = fmaxf(tile_max, s[j]);
        }
        float m_new = fmaxf(m, tile_max);
        float correction = expf(m - m_new);                         // 0 on the first tile
        l *= correction;
        #pragma unroll
        for (int d = 0; d < D; d++) acc[d] *= correction;
        #pragma unroll
        for (int j = 0; j < TILE; j++) {
            float p = expf(s[j] - m_new);                           // 0 for masked keys
            l += p;
            #pragma unroll
            for (int d4 = 0; d4 < D4; d4++) add4(acc, p, vs[j * D4 + d4], d4);
        }
        m = m_new;
    }
    if (!active) return;
    float inverse = 1.0f / l;
    #pragma unroll
    for (int d = 0; d < D; d++) out[(size_t)row * D + d] = acc[d] * inverse;
    lse[row] = m + logf(l);
}

// dq_i = scale sum_j ds_ij k_j: a thread per query row, tiles of keys (as the forward)
extern "C" __global__
void flash_backward_dq(const float* q, const float* k, const float* v, const float* dout,
                       const float* lse, const float* delta, float* dq, int Tq, int Tk,
                       float scale) {
    __shared__ float4 ks[TILE * D4], vs[TILE * D4];
    size_t head = blockIdx.y;
    q += head * Tq * D; k += head * Tk * D; v += head * Tk * D; dout += head * Tq * D;
    dq += head * Tq * D; lse += head * Tq; delta += head * Tq;
    int row = blockIdx.x * ROWS + threadIdx.x;
    bool active = row < Tq;
    int shift = Tk - Tq;
    int last_key = row + shift;
    int block_last_key = min(Tk - 1, blockIdx.x * ROWS + ROWS - 1 + shift);
    float qr[D], gr[D], dqr[D];
    #pragma unroll
    for (int d = 0; d < D; d++) {
        qr[d] = active ? q[(size_t)row * D + d] * scale : 0.0f;
        gr[d] = active ? dout[(size_t)row * D + d] : 0.0f;
        dqr[d] = 0.0f;
    }
    float row_lse = active ? lse[row] : 0.0f, row_delta = active ? delta[row] : 0.0f;
    for (int start = 0; start <= block_last_key; start += TILE) {
        __syncthreads();
        load_tile(ks, k, start, Tk, 1.0f);
        load_tile(vs, v, start, Tk, 1.0f);
        __syncthreads();
        if (!active || start > last_key) continue;
        #pragma unroll 4
        for (int j = 0; j < TILE; j++) {
            if (start + j > last_key) break;
            float s = 0.0f, dp = 0.0f;
            #pragma unroll
            for (int d4 = 0; d4 < D4; d4++) {
                s += dot4(qr, ks[j * D4 + d4], d4);
                dp += dot4(gr, vs[j * D4 + d4], d4);
            }
            float ds = expf(s - row_lse) * (dp - row_delta);
            #pragma unroll
            for (int d4 = 0; d4 < D4; d4++) add4(dqr, ds, ks[j * D4 + d4], d4);
        }
    }
    if (!active) return;
    #pragma unroll
    for (int d = 0; d < D; d++) dq[(size_t)row * D + d] = dqr[d] * scale;
}

// dk_j = sum_i ds_ij (scale q_i) and dv_j = sum_i p_ij dout_i: a thread per key row, tiles of
// queries; `which` = 0 computes dk, 1 computes dv (two launches: the four rows of k, v, dk and
// dv would not fit one thread's registers)
extern "C" __global__
void flash_backward_dkv(const float* q, const float* k, const float* v, const float* dout,
                        const float* lse, const float* delta, float* result, int Tq, int Tk,
                        float scale, int which) {
    __shared__ float4 qs[TILE * D4], gs[TILE * D4];
    __shared__ float lses[TILE], deltas[TILE];
    size_t head = blockIdx.y;
    q += head * Tq * D; k += head * Tk * D; v += head * Tk * D; dout += head * Tq * D;
    result += head * Tk * D; lse += head * Tq; delta += head * Tq;
    int key = blockIdx.x * ROWS + threadIdx.x;
    bool active = key < Tk;
    int shift = Tk - Tq;
    int first_query = max(0, key - shift);                          // the queries that see key
    int block_first_query = max(0, (int)(blockIdx.x * ROWS) - shift);
    float kr[D], vr[D], accr[D];
    #pragma unroll
    for (int d = 0; d < D; d++) {
        kr[d] = active ? k[(size_t)key * D + d] : 0.0f;
        vr[d] = active && which == 0 ? v[(size_t)key * D + d] : 0.0f;
        accr[d] = 0.0f;
    }
    for (int start = block_first_query; start < Tq; start += TILE) {
        __syncthreads();
        load_tile(qs, q, start, Tq, scale);                         // the scaled queries
        load_tile(gs, dout, start, Tq, 1.0f);
        for (int j = threadIdx.x; j < TILE; j += blockDim.x) {
            lses[j] = start + j < Tq ? lse[start + j] : 0.0f;
            deltas[j] = start + j < Tq ? delta[start + j] : 0.0f;
        }
        __syncthreads();
        if (!active) continue;
        #pragma unroll 4
        for (int j = 0; j < TILE; j++) {
            int i = start + j;
            if (i >= Tq) break;
            if (i < first_query) continue;
            float s = 0.0f;
            #pragma unroll
            for (int d4 = 0; d4 < D4; d4++) s += dot4(kr, qs[j * D4 + d4], d4);
            float p = expf(s - lses[j]);
            if (which == 1) {
                #pragma unroll
                for (int d4 = 0; d4 < D4; d4++) add4(accr, p, gs[j * D4 + d4], d4);
            } else {
                float dp = 0.0f;
                #pragma unroll
                for (int d4 = 0; d4 < D4; d4++) dp += dot4(vr, gs[j * D4 + d4], d4);
                float ds = p * (dp - deltas[j]);
                #pragma unroll
                for (int d4 = 0; d4 < D4; d4++) add4(accr, ds, qs[j * D4 + d4], d4);
            }
        }
    }
    if (!active) return;
    #pragma unroll
    for (int d = 0; d < D; d++) result[(size_t)key * D + d] = accr[d];
}
"""


FLASH_ABOVE_BYTES = 1 << 30  # flash attention where one layer's P (B, H, Tq, Tk) would be larger


def use_flash(q, k, v) -> bool:
    """Flash attention (no T x T matrix) or cuBLAS products around the fused softmax (which keeps
    P for the backward, as the array code does)? ``TINYGRAD_LLM_FLASH_ATTENTION=1`` or ``0``
    decides; by default flash where one layer's P would take more than FLASH_ABOVE_BYTES."""
    if not flash_fits(q, k, v):
        return False
    choice = os.environ.get("TINYGRAD_LLM_FLASH_ATTENTION")
    if choice in ("0", "1"):
        return choice == "1"
    return q.size // q.shape[-1] * k.shape[-2] * 4 > FLASH_ABOVE_BYTES


def flash_fits(q, k, v) -> bool:
    """Whether the flash kernels take this causal attention (float32 is ``enabled``'s check).

    The kernels index q (B, H, Tq, D), k and v (B, H, Tk, D) alike, as (B * H, T, D) arrays, so
    all three need the same leading axes (a k or v broadcast over them would be read out of
    bounds) and the same head size D: a multiple of 4 up to 128. At least as many keys as
    queries, and more than a few queries (a decoding step's single query row would leave all but
    one of a block's threads idle)."""
    D, Tq = q.shape[-1], q.shape[-2]
    same_layout = q.shape[:-2] == k.shape[:-2] and k.shape == v.shape and k.shape[-1] == D
    return same_layout and D % 4 == 0 and D <= 128 and k.shape[-2] >= Tq >= 16


def flash_source(head_dim: int) -> str:
    """The flash kernels' CUDA source for one head size (tests/cuda_on_cpu.py runs it on a CPU)."""
    return (_FLASH.replace("HEAD_DIM_VALUE", str(head_dim))
            .replace("FLASH_ROWS_VALUE", str(FLASH_ROWS))
            .replace("FLASH_TILE_VALUE", str(FLASH_TILE)))


@functools.cache
def _flash_kernels(head_dim: int):
    import cupy

    module = cupy.RawModule(code=flash_source(head_dim), options=("--use_fast_math",))
    return tuple(module.get_function(name) for name in
                 ("flash_forward", "flash_backward_dq", "flash_backward_dkv"))


def _heads(x):
    """(B, H, T, D) -> a contiguous (B * H, T, D) array, the kernels' layout."""
    import cupy

    return cupy.ascontiguousarray(x).reshape(-1, x.shape[-2], x.shape[-1])


def flash_attention_forward(q, k, v, scale: float):
    """Causal softmax(scale q k^T) v for q (B, H, Tq, D), k, v (B, H, Tk, D), Tk >= Tq:
    (out (B, H, Tq, D), lse (B, H, Tq)), lse_i = log sum_j exp(s_ij) over the keys row i sees."""
    import cupy

    *lead, Tq, D = q.shape
    Tk = k.shape[-2]
    q3, k3, v3 = _heads(q), _heads(k), _heads(v)
    out = cupy.empty_like(q3)
    lse = cupy.empty(q3.shape[:2], np.float32)
    grid = ((Tq + FLASH_ROWS - 1) // FLASH_ROWS, q3.shape[0])
    _flash_kernels(D)[0](grid, (FLASH_ROWS,), (q3, k3, v3, out, lse, np.int32(Tq), np.int32(Tk),
                                               np.float32(scale)))
    return out.reshape(q.shape), lse.reshape(*lead, Tq)


def flash_attention_backward(q, k, v, out, lse, g, scale: float):
    """(dq, dk, dv) of ``flash_attention_forward`` for the upstream gradient g (B, H, Tq, D)."""
    import cupy

    *lead, Tq, D = q.shape
    Tk = k.shape[-2]
    q3, k3, v3, out3, g3 = (_heads(a) for a in (q, k, v, out, g))
    delta = (g3 * out3).sum(axis=-1)  # (B H, Tq): sum_j p_ij dp_ij
    lse3 = cupy.ascontiguousarray(lse).reshape(q3.shape[:2])
    dq, dk, dv = cupy.empty_like(q3), cupy.empty_like(k3), cupy.empty_like(v3)
    forward, backward_dq, backward_dkv = _flash_kernels(D)
    sizes = (np.int32(Tq), np.int32(Tk), np.float32(scale))
    backward_dq(((Tq + FLASH_ROWS - 1) // FLASH_ROWS, q3.shape[0]), (FLASH_ROWS,),
                (q3, k3, v3, g3, lse3, delta, dq, *sizes))
    key_grid = ((Tk + FLASH_ROWS - 1) // FLASH_ROWS, q3.shape[0])
    for which, result in ((0, dk), (1, dv)):
        backward_dkv(key_grid, (FLASH_ROWS,),
                     (q3, k3, v3, g3, lse3, delta, result, *sizes, np.int32(which)))
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)
