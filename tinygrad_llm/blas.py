"""NumPy's OpenBLAS, called directly for the one thing NumPy does not offer: a batched product.

Attention multiplies a stack of small matrices, one per sequence and head: ``(B, H, T, D) @
(B, H, D, T)``. ``np.matmul`` hands them to BLAS one at a time, and OpenBLAS splits each small
product over its threads, where they spend as long handing work over as multiplying. OpenBLAS
(0.3.29 and later, which NumPy's wheels ship) also has ``cblas_?gemm_batch``: one call that takes
the whole stack and gives each of its threads whole matrices. On a 2-core Intel Xeon that made
``q @ k^T`` at (48, 128, 64) x (48, 64, 256) 1.8x faster (docs/performance.md).

``matmul_into(a, b, out)`` is ``out[...] = a @ b`` through that call when it can be made (NumPy's
own OpenBLAS, float32 or float64, strides BLAS can read) and ``np.matmul`` otherwise, with the
same result up to rounding. ``TINYGRAD_LLM_BATCHED_BLAS=0`` always takes ``np.matmul``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

import numpy as np

ROW_MAJOR, NO_TRANSPOSE, TRANSPOSE = 101, 111, 112  # the CBLAS enums
# OpenBLAS up to 0.3.31 crashes (SIGSEGV) in the batched product of small matrices in builds for
# several CPUs such as NumPy's (OpenMathLib/OpenBLAS pull request #5980, merged August 2026).
# Small means M N K <= 100^3, where its AVX-512 kernels take their small-matrix path
# (kernel/x86_64/?gemm_small_kernel_permit_skylakex.c), the only small-matrix kernels it has on
# x86-64. So the batched call is made only on x86-64 and only above that size: the products
# of attention at context 256 and longer are (128 x 64 x 128 and up); smaller ones are cheap
# enough for np.matmul anyway.
SMALL_MATRIX_LIMIT = 100**3


@functools.cache
def _batched_gemm(dtype_char: str):
    """OpenBLAS's ``cblas_?gemm_batch`` for 's' (float32) or 'd' (float64), or None.

    Only the build NumPy's wheels bundle (scipy-openblas, 64-bit integers: the ``64_`` in the
    name) is used, where the name tells the integer width for certain."""
    try:
        from threadpoolctl import threadpool_info

        libraries = [info for info in threadpool_info() if info["internal_api"] == "openblas"
                     and info.get("prefix") == "libscipy_openblas"]
        function = getattr(ctypes.CDLL(libraries[0]["filepath"]),
                           f"scipy_cblas_{dtype_char}gemm_batch64_")
    except (ImportError, IndexError, OSError, AttributeError):  # another BLAS, or an older one
        return None
    pointer = ctypes.c_void_p
    # (order, *trans_a, *trans_b, *m, *n, *k, *alpha, **a, *lda, **b, *ldb, *beta, **c, *ldc,
    #  group_count, *group_size): every argument but the order and the group count is an array
    # with one entry per group of products that share their sizes; we pass one group
    function.argtypes = [ctypes.c_int] + [pointer] * 13 + [ctypes.c_int64, pointer]
    function.restype = None
    return function


def available(dtype=np.float32) -> bool:
    """Whether ``matmul_into`` can use OpenBLAS's batched product for ``dtype``."""
    return (os.environ.get("TINYGRAD_LLM_BATCHED_BLAS", "1") != "0"
            and platform.machine().lower() in ("x86_64", "amd64")
            and np.dtype(dtype) in (np.float32, np.float64)
            and _batched_gemm(np.dtype(dtype).char.replace("f", "s")) is not None)


def _layout(x: np.ndarray):
    """How row-major BLAS reads each matrix (rows, cols) of the stack x (..., rows, cols):
    (TRANSPOSE or NO_TRANSPOSE, leading dimension), or None when it cannot."""
    item, (rows, cols), (row_step, col_step) = x.itemsize, x.shape[-2:], x.strides[-2:]
    if col_step == item and row_step % item == 0 and row_step >= max(cols, 1) * item:
        return NO_TRANSPOSE, row_step // item  # rows laid out one after another
    if row_step == item and col_step % item == 0 and col_step >= max(rows, 1) * item:
        return TRANSPOSE, col_step // item  # a transposed view: columns one after another
    return None


def _addresses(x: np.ndarray) -> np.ndarray:
    """The address of each matrix of the stack x (..., rows, cols), leading axes in C order."""
    offsets = np.zeros((), np.int64)
    for count, stride in zip(x.shape[:-2], x.strides[:-2], strict=True):
        offsets = np.add.outer(offsets, np.arange(count, dtype=np.int64) * stride)
    return offsets.ravel() + x.ctypes.data


def matmul_into(a: np.ndarray, b: np.ndarray, out: np.ndarray, add: bool = False) -> None:
    """out[...] = a @ b (with ``add``: out += a @ b) for stacks a (..., M, K), b (..., K, N),
    out (..., M, N) of NumPy arrays with the same leading shape; ``out`` must not overlap them.
    One batched OpenBLAS call when it can; ``np.matmul`` otherwise."""
    stack, (m, k), n = out.shape[:-2], a.shape[-2:], b.shape[-1]
    layouts = (_layout(a), _layout(b), _layout(out))
    if (a.ndim < 3 or not a.shape[:-2] == b.shape[:-2] == stack or m * n * k <= SMALL_MATRIX_LIMIT
            or not a.dtype == b.dtype == out.dtype or not available(out.dtype)
            or None in layouts or layouts[2][0] != NO_TRANSPOSE
            or not (a.flags.aligned and b.flags.aligned and out.flags.aligned)
            or np.may_share_memory(out, a) or np.may_share_memory(out, b)):
        if add:
            out += a @ b
        elif out.dtype == np.result_type(a.dtype, b.dtype):
            np.matmul(a, b, out=out)
        else:  # mixed precision: float16 operands, a float32 product (or the reverse)
            out[...] = a @ b
        return
    (trans_a, lda), (trans_b, ldb), (_, ldc) = layouts

    def one(value, dtype=np.int64):  # a one-entry array: the group's value of an argument
        return np.array([value], dtype)

    arguments = [one(trans_a, np.int32), one(trans_b, np.int32), one(m), one(n), one(k),
                 one(1, out.dtype), _addresses(a), one(lda), _addresses(b), one(ldb),
                 one(1 if add else 0, out.dtype), _addresses(out), one(ldc)]
    group_size = one(int(np.prod(stack)))
    _batched_gemm(out.dtype.char.replace("f", "s"))(
        ROW_MAJOR, *[x.ctypes.data for x in arguments], 1, group_size.ctypes.data)
