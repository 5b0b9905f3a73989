"""The BLAS the matrix products run on: NumPy's own, called directly where NumPy cannot, or MKL.

Two things here, both measured on a 2-core Intel Xeon (docs/performance.md, "Batched products
and MKL"):

1. **A batched product.** Attention multiplies a stack of small matrices, one per sequence and
   head: ``(B, H, T, D) @ (B, H, D, T)``. ``np.matmul`` hands them to BLAS one at a time, and
   OpenBLAS splits each small product over its threads, where they spend as long handing work
   over as multiplying. OpenBLAS (NumPy's wheels ship 0.3.31) also has ``cblas_?gemm_batch``:
   one call that takes the whole stack and gives each thread whole matrices. That made ``q @
   k^T`` at (48, 128, 64) x (48, 64, 256) 1.6-1.8x faster.
2. **Intel's MKL, when installed** (``pip install "tinygrad-llm[mkl]"``, 300 MB of Intel's
   libraries under the Intel Simplified Software License). PyTorch's CPU build multiplies with
   MKL; at the shapes of a 6 x 384 GPT, MKL's products took 94 ms per layer where NumPy's
   OpenBLAS took 113. With MKL present, the products of linear layers and of the fused LM head
   (``gemm``, through ``backend.matmul``) and attention's large stacks (``matmul_into``) go to
   it, and NumPy's OpenBLAS -- which still runs every other ``@`` (``F.matmul``, the BLAS row
   sums of ``fused.py``, small stacks) -- is put on one thread: two pools of threads that spin
   after each product, on the same two cores, made a training step twice as slow. That is a
   change to the whole process, made on the first product (or ``backend.set_num_threads``).
   ``TINYGRAD_LLM_MKL=0``, read then, leaves MKL unloaded.

``gemm(a, b, out)`` and ``matmul_into(a, b, out)`` equal ``np.matmul`` up to rounding. Whatever
they cannot hand to BLAS goes to ``np.matmul``, which also raises for shapes that do not match:
float16, strides BLAS cannot read, overlapping or read-only arrays, leading shapes that
broadcast, stacks of small matrices (below), machines other than x86-64, and, for ``gemm``,
everything when MKL is not installed. ``TINYGRAD_LLM_BATCHED_BLAS=0`` (read at every call)
sends every stack to ``np.matmul``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import os
import platform
import site
import sys
import threading
from typing import NamedTuple

import numpy as np

from . import cpu_kernels

ROW_MAJOR, NO_TRANSPOSE, TRANSPOSE = 101, 111, 112  # the CBLAS enums (C ints)
# OpenBLAS up to 0.3.31 crashes (SIGSEGV) in the batched product of small matrices in builds for
# several CPUs such as NumPy's (OpenMathLib/OpenBLAS pull request #5980, merged August 2026).
# Small means M N K <= 100^3: there its AVX-512 kernels take their small-matrix path
# (kernel/x86_64/?gemm_small_kernel_permit_skylakex.c). Those are OpenBLAS's only small-matrix
# kernels on x86-64; other CPUs have their own, with limits we have not checked, so the batched
# call is made only on x86-64, and only for matrices above that size (with MKL too: smaller
# stacks, such as decoding's (1 x 64) @ (64 x T), gained nothing from it). Attention's
# products at context 256 and longer are 128 x 64 x 128 and up.
SMALL_MATRIX_LIMIT = 100**3
_X86 = platform.machine().lower() in ("x86_64", "amd64")
_LOADING = threading.Lock()  # two threads' first products load MKL once


def _char(dtype) -> str:
    """The BLAS prefix of a dtype: 's' for float32, 'd' for float64."""
    return "s" if np.dtype(dtype) == np.float32 else "d"


def mkl():
    """MKL's runtime library (``libmkl_rt``, loaded and set up; NumPy's OpenBLAS put on one
    thread), or None when it is not installed in this environment (``sys.prefix/lib``, where
    the ``mkl`` wheel puts it, or the user's ``site.USER_BASE/lib``), ``TINYGRAD_LLM_MKL=0``,
    or not on x86-64 Linux. Decided once per process."""
    with _LOADING:
        return _load_mkl()


@functools.cache
def _load_mkl():
    if os.environ.get("TINYGRAD_LLM_MKL", "1") == "0" or not (_X86 and sys.platform == "linux"):
        return None
    paths = [path for folder in (sys.prefix, site.USER_BASE or "")  # this environment's first
             for path in sorted(glob.glob(os.path.join(folder, "lib", "libmkl_rt.so*")))]
    try:
        library = ctypes.CDLL(paths[0])
        if library.MKL_Set_Interface_Layer(0) != 0:  # LP64 (32-bit integers, as the argtypes
            return None  # below); another layer already chosen in this process: leave it
    except (IndexError, OSError, AttributeError):
        return None
    for dtype_char in "sd":
        gemm_function = getattr(library, f"cblas_{dtype_char}gemm")
        scalar = ctypes.c_float if dtype_char == "s" else ctypes.c_double
        integer, pointer = ctypes.c_int, ctypes.c_void_p
        # (order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
        gemm_function.argtypes = ([integer] * 6 + [scalar, pointer, integer, pointer, integer,
                                                   scalar, pointer, integer])
        gemm_function.restype = None
        gemv_function = getattr(library, f"cblas_{dtype_char}gemv")
        # (order, trans, m, n, alpha, a, lda, x, incx, beta, y, incy)
        gemv_function.argtypes = ([integer] * 4 + [scalar, pointer, integer, pointer, integer,
                                                   scalar, pointer, integer])
        gemv_function.restype = None
    from threadpoolctl import ThreadpoolController

    for openblas in ThreadpoolController().select(internal_api="openblas").lib_controllers:
        openblas.set_num_threads(1)  # one pool of threads that spin after a product, not two
    return library


def share_cores_with_threads(threads: int) -> bool:
    """Set MKL up for the library's own threads (``backend.set_num_threads``): its products use
    ``threads`` threads, except where the library's threads each multiply their own share of a
    split op (``one_thread_here``, ``one_thread_from_now``). And MKL's threads sleep as soon as
    a product ends (``sleep_after_products``). Returns whether MKL is loaded."""
    library = mkl()
    if library is None:
        return False
    library.MKL_Set_Num_Threads(threads)  # every thread's ...
    library.MKL_Set_Num_Threads_Local(0)  # ... this one's too (threadpoolctl set it to one)
    sleep_after_products()
    return True


_SLEEPING = threading.local()  # .done: sleep_after_products has run on this thread


def sleep_after_products() -> None:
    """Have MKL's threads sleep as soon as a product called from this thread ends. Intel's
    OpenMP (MKL's, unless PyTorch was imported first) lets them spin for 200 ms by default,
    taking a core from the library's threads that run next: a 6 x 384 training step with the
    library's two threads was 8% slower that way, and 6% faster than without them once MKL's
    slept. The setting is per calling thread; GNU's OpenMP (MKL's when PyTorch was imported
    first) has no such call and is left as it is."""
    if getattr(_SLEEPING, "done", False) or mkl() is None:
        return
    _SLEEPING.done = True
    from threadpoolctl import ThreadpoolController

    for openmp in ThreadpoolController().select(internal_api="openmp").lib_controllers:
        if openmp.prefix == "libiomp":  # ms to spin after a parallel region this thread starts
            ctypes.CDLL(openmp.filepath).kmp_set_blocktime(0)


@contextlib.contextmanager
def one_thread_here():
    """Inside, MKL runs this thread's products on one thread (its share of a split op, while the
    library's other threads run theirs); nothing changes without MKL."""
    library = mkl()
    before = 0 if library is None else library.MKL_Set_Num_Threads_Local(1)  # 0: none of its own
    try:
        yield
    finally:
        if library is not None:
            library.MKL_Set_Num_Threads_Local(before)


def one_thread_from_now() -> None:
    """MKL runs this thread's products on one thread from now on (for the library's workers)."""
    library = mkl()
    if library is not None:
        library.MKL_Set_Num_Threads_Local(1)


class _Batched(NamedTuple):
    function: object  # cblas_?gemm_batch
    integer: type  # the library's integer: np.int32 (MKL, LP64) or np.int64 (NumPy's OpenBLAS)


@functools.cache
def _batched_gemm(dtype_char: str):
    """``cblas_?gemm_batch`` for 's' (float32) or 'd' (float64): MKL's when it is installed,
    else OpenBLAS's from NumPy's wheels (scipy-openblas, 64-bit integers: the ``64_`` in the
    name tells the integer width for certain); None for any other BLAS or an older OpenBLAS."""
    if mkl() is not None:
        function, integer = getattr(mkl(), f"cblas_{dtype_char}gemm_batch"), np.int32
    else:
        try:
            from threadpoolctl import threadpool_info

            libraries = [info for info in threadpool_info() if info["internal_api"] == "openblas"
                         and info.get("prefix") == "libscipy_openblas"]
            function = getattr(ctypes.CDLL(libraries[0]["filepath"]),
                               f"scipy_cblas_{dtype_char}gemm_batch64_")
        except (ImportError, IndexError, OSError, AttributeError):
            return None
        integer = np.int64
    pointer, count = ctypes.c_void_p, ctypes.c_int if integer is np.int32 else ctypes.c_int64
    # (order, *trans_a, *trans_b, *m, *n, *k, *alpha, **a, *lda, **b, *ldb, *beta, **c, *ldc,
    #  group_count, *group_size): every argument but the order and the group count is an array
    # with one entry per group of products that share their sizes; we pass one group
    function.argtypes = [ctypes.c_int] + [pointer] * 13 + [count, pointer]
    function.restype = None
    return _Batched(function, integer)


def can_batch(dtype=np.float32) -> bool:
    """Whether ``matmul_into`` can make a batched call for ``dtype`` (x86-64 only: see
    SMALL_MATRIX_LIMIT)."""
    return (os.environ.get("TINYGRAD_LLM_BATCHED_BLAS", "1") != "0" and _X86
            and np.dtype(dtype) in (np.float32, np.float64)
            and _batched_gemm(_char(dtype)) is not None)


def _layout(x: np.ndarray):
    """How row-major BLAS reads each matrix (rows, cols) of the stack x (..., rows, cols):
    (TRANSPOSE or NO_TRANSPOSE, leading dimension), or None when it cannot."""
    item, (rows, cols), (row_step, col_step) = x.itemsize, x.shape[-2:], x.strides[-2:]
    if col_step == item and row_step % item == 0 and row_step >= max(cols, 1) * item:
        return NO_TRANSPOSE, row_step // item  # rows laid out one after another
    if row_step == item and col_step % item == 0 and col_step >= max(rows, 1) * item:
        return TRANSPOSE, col_step // item  # a transposed view: columns one after another
    return None


def _one_row_layouts(a, b, out):
    """``_blas_layouts`` for the product decoding makes, one row times a weight matrix, in the
    few checks that case needs: a (1, K) and out (1, N) contiguous, b (K, N) contiguous or a
    transposed contiguous matrix (a tied LM head's), one float dtype, no overlap; None for
    anything else (``_blas_layouts`` then decides). A token's 49 products each run right after
    a stream of weights has pushed Python's objects out of the caches, so every check costs
    more there than timed alone; these and ``_compiled_gemv`` together saved 3-4% of a token."""
    (k, n), item = b.shape, b.itemsize
    if (a.shape != (1, k) or out.shape != (1, n) or not a.dtype == b.dtype == out.dtype
            or a.dtype not in (np.float32, np.float64) or 0 in b.shape
            or a.strides != (k * item, item) or out.strides != (n * item, item)
            or not (out.flags.writeable and a.flags.aligned and b.flags.aligned
                    and out.flags.aligned)
            or np.may_share_memory(out, a) or np.may_share_memory(out, b)):
        return None
    if b.strides == (n * item, item):  # rows one after another
        return (NO_TRANSPOSE, k), (NO_TRANSPOSE, n), n
    if b.strides == (item, k * item):  # columns one after another: b^T is contiguous
        return (NO_TRANSPOSE, k), (TRANSPOSE, k), n
    return None


def _blas_layouts(a, b, out):
    """How BLAS reads a, b and out for out = a @ b as they are -- ((trans_a, lda), (trans_b,
    ldb), ldc) -- or None when it cannot: shapes that do not match or are empty, not one float
    dtype, strides BLAS cannot read, the output's rows not contiguous, unaligned or read-only
    arrays, or an output that overlaps an operand."""
    layouts = _layout(a), _layout(b), _layout(out)
    if (a.shape[-1] != b.shape[-2] or out.shape[-2:] != (a.shape[-2], b.shape[-1])
            or 0 in a.shape + b.shape or not a.dtype == b.dtype == out.dtype
            or a.dtype not in (np.float32, np.float64)
            or None in layouts or layouts[2][0] != NO_TRANSPOSE
            or not (a.flags.aligned and b.flags.aligned and out.flags.aligned)
            or not out.flags.writeable
            or np.may_share_memory(out, a) or np.may_share_memory(out, b)):
        return None
    return layouts[0], layouts[1], layouts[2][1]


COPY_TRANSPOSED_MIN_ROWS = 16  # see _numpy_matmul
# A matrix-vector product of at most this many matrix elements goes to NumPy's BLAS (mkl_gemm
# declines it): decoding a token of the baby model multiplies one row by 128 x 384 .. 512 x 128
# weights, which took 15-21 us through np.matmul and 32-39 us through MKL's sgemv, whose call
# from Python (the layout checks, three addresses, ctypes' conversions) costs more than the
# product; 384 x 384: 30 against 37 us. From 512 x 512 on, MKL's two threads read the weights
# faster (46 against 52 us; 384 x 1152: 75 against 85).
SMALL_GEMV_ELEMENTS = 200_000


def _numpy_matmul(a, b, out, add: bool) -> None:
    if (b.ndim > 2 and b.strides[-1] != b.itemsize and 0 not in b.strides
            and a.shape[-2] >= COPY_TRANSPOSED_MIN_ROWS):
        # a stack of transposed matrices (not one broadcast), such as attention's k^T, times
        # matrices of many rows: np.matmul took 206 us on (48, 64, 32) x (48, 32, 64) as it is,
        # 132 us with the stack copied contiguous first. With few rows the copy costs more than
        # it saves: decoding's (12, 1, 64) x (12, 64, 200) took 13 us as it is, 78 us copied
        # (16 rows: even)
        b = np.ascontiguousarray(b)
    if add:
        out += a @ b
    elif out.dtype == np.result_type(a.dtype, b.dtype):
        np.matmul(a, b, out=out)
    else:  # mixed precision: float16 operands, a float32 product (or the reverse)
        out[...] = a @ b


def mkl_gemm(a: np.ndarray, b: np.ndarray, out: np.ndarray, add: bool = False,
             bias: np.ndarray | None = None) -> bool:
    """out[...] = a @ b (with ``add``: out += a @ b; with ``bias`` (N,): out[...] = a @ b +
    bias) for matrices a (M, K), b (K, N), out (M, N) on MKL's ``cblas_?gemm``. The bias is
    written into ``out`` first and the product added to it (beta = 1), as PyTorch's ``addmm``
    does: a pass that only writes the output, where adding it after would read and write it
    (on a large output by a compiled kernel on the team of threads, ``cpu_kernels.fill_rows``).
    Returns False, having done nothing, when MKL is not installed, for arrays that are not
    matrices or that it cannot read (``_blas_layouts``), or for a small matrix-vector product
    (``SMALL_GEMV_ELEMENTS``).
    ``add`` and ``bias`` do not go together (the bias would overwrite what ``out`` held)."""
    if add and bias is not None:
        raise ValueError("mkl_gemm: add=True and a bias do not go together")
    library = mkl()
    if library is None or a.ndim != 2 or b.ndim != 2 or out.ndim != 2:
        return False
    one_row = a.shape[0] == 1
    if one_row and a.shape[1] * b.shape[1] <= SMALL_GEMV_ELEMENTS:
        return False
    layouts = (one_row and _one_row_layouts(a, b, out)) or _blas_layouts(a, b, out)
    if layouts is None:
        return False
    if bias is not None:
        if out.size >= cpu_kernels.PARALLEL_MIN_ELEMENTS and cpu_kernels.enabled(np, out, bias):
            cpu_kernels.fill_rows(out, bias)  # on the team of threads
        else:
            out[...] = bias
    beta = 1.0 if add or bias is not None else 0.0
    (trans_a, lda), (trans_b, ldb), ldc = layouts
    single = out.dtype == np.float32
    (m, k), n = a.shape, b.shape[1]
    if m == 1 and a.strides[1] == a.itemsize:  # one row (decoding a token): a matrix-vector
        # product, y = b^T x, with b as it lies in memory: (K, N) rows, or (N, K) when transposed
        rows, columns = (k, n) if trans_b == NO_TRANSPOSE else (n, k)
        trans = TRANSPOSE if trans_b == NO_TRANSPOSE else NO_TRANSPOSE
        compiled = _compiled_gemv(_char(out.dtype))
        if compiled is not None:
            compiled(trans, rows, columns, b, ldb, a, beta, out)
        else:
            (library.cblas_sgemv if single else library.cblas_dgemv)(
                ROW_MAJOR, trans, rows, columns, 1.0, b.ctypes.data, ldb, a.ctypes.data, 1,
                beta, out.ctypes.data, 1)
        return True
    if cpu_kernels.enabled(np):  # with numba: the call from compiled code (cheaper)
        cpu_kernels.gemm(trans_a, trans_b, a, lda, b, ldb, beta, out, ldc)
        return True
    (library.cblas_sgemm if single else library.cblas_dgemm)(
        ROW_MAJOR, trans_a, trans_b, m, n, k, 1.0, a.ctypes.data, lda, b.ctypes.data, ldb,
        beta, out.ctypes.data, ldc)
    return True


def _compiled_gemv(dtype_char: str):
    """MKL's ``cblas_?gemv`` called from a numba function, or None without numba (the ``cpu``
    extra) or with ``TINYGRAD_LLM_CPU_KERNELS=0``: ``f(trans, rows, columns, matrix, ld, x,
    beta, y)`` computes y = op(matrix) x + beta y, alpha 1, as the ctypes call in ``mkl_gemm``.

    Why: decoding makes 49 one-row products per GPT-2 token, and from Python each pays for
    ctypes -- three ``.ctypes.data`` reads (1.5-2.5 us each) and the conversion of twelve
    arguments. Compiled, the addresses are read in machine code: 768 x 768 took 33.4 us where
    the ctypes call took 42.9 (34.9 with the addresses ready). With ``_one_row_layouts``, a
    GPT-2 token took 0.958-0.967x the time, the 6 x 384 model's 0.961x (docs/performance.md).
    numba cannot cache a function that holds a C function's address on disk, so each process
    compiles it (~0.3 s) for each layout of the matrices it meets: rows, and a tied LM head's
    transposed matrix."""
    return _build_gemv(dtype_char) if cpu_kernels.enabled(np) else None  # numba, not switched off


@functools.cache
def _build_gemv(dtype_char: str):
    """The compiled caller of ``_compiled_gemv``, tried once on a 1 x 1 product; None when MKL
    is not loaded or numba cannot compile it (the ctypes call then runs)."""
    import numba

    if mkl() is None:
        return None
    scalar = ctypes.c_float if dtype_char == "s" else ctypes.c_double
    integer, pointer = ctypes.c_int, ctypes.c_void_p
    signature = ctypes.CFUNCTYPE(None, *[integer] * 4, scalar, pointer, integer, pointer,
                                 integer, scalar, pointer, integer)
    gemv = signature(ctypes.cast(getattr(mkl(), f"cblas_{dtype_char}gemv"), pointer).value)
    one = np.float32(1) if dtype_char == "s" else np.float64(1)

    @numba.njit(nogil=True)
    def call(trans, rows, columns, matrix, ld, x, beta, y):
        gemv(ROW_MAJOR, trans, rows, columns, one, matrix.ctypes.data, ld, x.ctypes.data, 1,
             beta, y.ctypes.data, 1)

    probe = np.ones((1, 1), np.float32 if dtype_char == "s" else np.float64)
    try:
        call(TRANSPOSE, 1, 1, probe, 1, probe, 0.0, probe.copy())
    except Exception as error:  # noqa: BLE001 -- any failure: the ctypes call, and say why
        import warnings

        warnings.warn(f"numba could not compile the call of MKL's gemv ({error}); one-row "
                      "products use ctypes", stacklevel=2)
        return None
    return call


def gemm(a: np.ndarray, b: np.ndarray, out: np.ndarray, add: bool = False) -> np.ndarray:
    """out[...] = a @ b (with ``add``: out += a @ b) for matrices a (M, K), b (K, N), out (M, N):
    MKL's ``cblas_?gemm`` when it can (``mkl_gemm``), ``np.matmul`` otherwise. Returns ``out``."""
    if not mkl_gemm(a, b, out, add):
        _numpy_matmul(a, b, out, add)
    return out


def _addresses(x: np.ndarray) -> np.ndarray:
    """The address of each matrix of the stack x (..., rows, cols), leading axes in C order."""
    offsets = np.zeros((), np.int64)
    for count, stride in zip(x.shape[:-2], x.strides[:-2], strict=True):
        offsets = np.add.outer(offsets, np.arange(count, dtype=np.int64) * stride)
    return offsets.ravel() + x.ctypes.data


def matmul_into(a: np.ndarray, b: np.ndarray, out: np.ndarray, add: bool = False) -> None:
    """out[...] = a @ b (with ``add``: out += a @ b) for stacks a (..., M, K), b (..., K, N),
    out (..., M, N) of NumPy arrays with the same leading shape. One batched BLAS call when it
    can (MKL's or OpenBLAS's); ``np.matmul`` otherwise."""
    stack, (m, k), n = out.shape[:-2], a.shape[-2:], b.shape[-1]
    batched = can_batch(out.dtype) and _batched_gemm(_char(out.dtype))
    layouts = None
    if (batched and a.ndim >= 3 and a.shape[:-2] == b.shape[:-2] == stack
            and m * n * k > SMALL_MATRIX_LIMIT):
        layouts = _blas_layouts(a, b, out)
    if layouts is None:
        _numpy_matmul(a, b, out, add)
        return
    (trans_a, lda), (trans_b, ldb), ldc = layouts

    def one(value, dtype=batched.integer):  # a one-entry array: the group's value
        return np.array([value], dtype)

    arguments = [one(trans_a, np.int32), one(trans_b, np.int32), one(m), one(n), one(k),
                 one(1, out.dtype), _addresses(a), one(lda), _addresses(b), one(ldb),
                 one(1 if add else 0, out.dtype), _addresses(out), one(ldc)]
    group_size = one(int(np.prod(stack)))
    batched.function(ROW_MAJOR, *[x.ctypes.data for x in arguments], 1, group_size.ctypes.data)
