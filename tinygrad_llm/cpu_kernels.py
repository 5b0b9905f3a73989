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
NumPy, float32 or float64 and C-contiguous, numba imports, and ``TINYGRAD_LLM_CPU_KERNELS=0`` was
not set when the library was imported (it switches them off, leaving the array code); the
attention kernels, which read strided views through BLAS, have ``attention_fits`` instead. Each
kernel is compiled on its first call for each dtype, once for one thread and once for several
(a second or a few each), and cached on disk by numba after that.

Threads: with MKL installed (``pip install "tinygrad-llm[mkl]"``), a kernel on an array of
PARALLEL_MIN_ELEMENTS or more splits its rows over the team of threads that runs MKL's products
("threads: MKL's team of threads" below says how and why); otherwise, and inside a share of an
op the library's own threads split (``--threads``), it runs on the thread that called it.

Which ops have a kernel was decided by measurement (docs/performance.md): layer norm, AdamW,
GELU, the sum of two large arrays, attention's causal softmax and the softmax's backward; with
MKL, causal attention forward and backward per (sequence, head), its products MKL's called from
the kernel ("attention on MKL's team"); and, for decoding with a KV cache, the whole attention of
one query (``models.gpt``'s one-position path). numba calls the C library's
scalar ``tanh`` and ``exp``, 40x and 8x slower than NumPy's vectorized ones here, so in float32
the kernels compute them with arithmetic of their own that the compiler vectorizes ("exp and
tanh, float32"): GELU and the softmax are one pass each.

Sums and means accumulate in float64 (the ``0.0`` they start from), which is more exact than
the float32 of the array code (the decoding attention's dot products excepted: they sum in the
arrays' dtype, as BLAS does); the passes over the elements run in the arrays' own dtype (a
float64 scalar inside a float32 loop would make it a float64 loop: see each kernel). They are
compiled with NumPy's error model: a division by zero gives inf or nan, as in the array code,
where numba's default (Python's) tests every divisor and raises, which keeps a loop that divides
from being vectorized -- AdamW's update took 38 ms on 10.7M floats that way, 12 ms now.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import threading
import types
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


# TINYGRAD_LLM_CPU_KERNELS=0 as the environment had it when the library was imported: ops ask
# ``enabled`` a hundred times and more per training step, and reading the environment each time
# cost 2-5% of a small model's step. Tests switch the kernels off by setting this.
SWITCHED_OFF = os.environ.get("TINYGRAD_LLM_CPU_KERNELS") == "0"


def enabled(xp, *arrays) -> bool:
    """Whether an op on these arrays of module ``xp`` should use its compiled kernel."""
    if xp is not np or SWITCHED_OFF or not available():
        return False
    return all(a.dtype in (np.float32, np.float64) and a.flags.c_contiguous for a in arrays)


# ------------------------------------------------------------ threads: MKL's team of threads
# A kernel compiled with ``parallel=True`` splits its ``prange`` loop over numba's threads. Asked
# for its OpenMP threading layer, numba runs that loop as an OpenMP parallel region, and the
# dynamic linker looks its OpenMP functions (GOMP_parallel ...) up in the whole process first:
# once MKL is loaded, it finds MKL's Intel OpenMP (libiomp5), which implements them too. The
# kernels then run on the very team of threads that runs MKL's products -- PyTorch's arrangement,
# one team for the products and the elementwise ops. A region starts on threads still spinning
# from the product before it (3-7 microseconds; the library's Python thread pool takes 50-70 per
# split, docs/performance.md), and no second team fights MKL's spinning threads for the cores,
# which is why the elementwise work ran on one thread beside MKL until now.
PARALLEL_MIN_ELEMENTS = 1 << 15  # smaller arrays: one thread (starting a region costs more)


@functools.cache
def _shares_mkl_team() -> bool:
    """Whether numba's parallel kernels run on MKL's OpenMP team (decided once: the first
    parallel kernel starts numba's threading layer, which cannot change afterwards). Not
    without MKL (NumPy's OpenBLAS keeps threads of its own, which would fight a second team),
    nor where the user chose another layer (``NUMBA_THREADING_LAYER``, ``numba.config``), other
    code started numba's threads first, or its OpenMP calls reach another runtime (GNU's, when
    PyTorch was imported first)."""
    import numba
    from numba.np.ufunc import parallel
    from threadpoolctl import ThreadpoolController

    from tinygrad_llm import blas

    if blas.mkl() is None:  # loads MKL, and with it Intel's OpenMP, before numba's layer
        return False
    if parallel._is_initialized:  # numba's layer was started before (by other code), perhaps
        return False  # before MKL was loaded: which OpenMP it bound to cannot be told from here
    chosen = numba.config.THREADING_LAYER
    if chosen == "default":  # not chosen by the user (NUMBA_THREADING_LAYER or in code)
        numba.config.THREADING_LAYER = "omp"
    # Starting its OpenMP layer, numba sets this thread's OpenMP thread count to its own
    # (NUMBA_NUM_THREADS: every core), over the user's OMP_NUM_THREADS, and MKL follows
    # OpenMP's count: the count is put back as it was once the layer has started.
    process = ctypes.CDLL(None)
    threads = process.omp_get_max_threads() if hasattr(process, "omp_get_max_threads") else 0
    try:
        _start_threads.threaded(np.zeros(1, np.float32))  # a parallel kernel starts the layer
    except (ValueError, ImportError):  # numba: the layer asked for is not available
        numba.config.THREADING_LAYER = chosen
        return False
    finally:
        if threads > 0:
            process.omp_set_num_threads(threads)
    runtimes = [c.filepath for c in ThreadpoolController().select(internal_api="openmp")
                .lib_controllers if c.prefix == "libiomp"]
    if numba.threading_layer() != "omp" or not runtimes:
        return False

    def address(library):
        return ctypes.cast(library.GOMP_parallel, ctypes.c_void_p).value

    # where the process's GOMP_parallel is (where numba's layer found it) vs. Intel's
    return address(process) == address(ctypes.CDLL(runtimes[0]))


def team_threads() -> int:
    """How many threads a parallel kernel called from this thread runs on: as many as MKL's
    products here (its cores, ``OMP_NUM_THREADS``, ``--threads``; one inside the share of a
    split op, ``blas.one_thread_here``) when the kernels share MKL's team, else one."""
    return _mkl_max_threads()() if _shares_mkl_team() else 1


@functools.cache
def _mkl_max_threads():
    from tinygrad_llm import blas

    return blas.mkl().MKL_Get_Max_Threads  # the C function (asked at every call: it may change)


_NUMBA_THREADS = threading.local()  # .count: what numba.set_num_threads was last given here


_COMPILING = threading.Lock()  # two threads' first calls compile a kernel once


def _compile(function=None, *, parallel: bool = False):
    """numba's ``njit`` of ``function``, made on first use (importing numba takes a while).

    ``parallel``: the function's ``prange`` loops may run on the team of threads
    (``team_threads``), for arrays of PARALLEL_MIN_ELEMENTS and more (the first argument's
    size); elsewhere the same function compiled without it runs them as plain loops."""
    if function is None:
        return functools.partial(_compile, parallel=parallel)
    compiled = {}  # parallel (bool) -> numba's compiled function

    def get(threaded):
        if threaded not in compiled:
            with _COMPILING:
                if threaded not in compiled:
                    import numba

                    _load_numba()  # prange, exp and tanh for the kernels
                    # numba's disk cache keys a function by its name, not by how it was
                    # compiled: the parallel build is compiled from a copy named apart
                    source = _renamed(function, "_threaded") if threaded else function
                    compiled[threaded] = numba.njit(
                        cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy",
                        parallel=threaded)(source)
        return compiled[threaded]

    @functools.wraps(function)
    def call(*args):
        if parallel and args[0].size >= PARALLEL_MIN_ELEMENTS and (threads := team_threads()) > 1:
            if getattr(_NUMBA_THREADS, "count", None) != threads:  # numba's count is per thread
                import numba

                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
                _NUMBA_THREADS.count = threads
            return get(True)(*args)
        return get(False)(*args)

    call.threaded = lambda *args: get(True)(*args)  # the parallel build, whatever the size
    return call


def _renamed(function, suffix: str):
    """A copy of ``function`` whose qualified name ends in ``suffix``."""
    copy = types.FunctionType(function.__code__, function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)
    copy.__qualname__ = function.__qualname__ + suffix
    return copy


@_compile(parallel=True)
def _start_threads(x):
    for i in prange(x.shape[0]):
        x[i] = 0


# ------------------------------------------------------------------- exp and tanh, float32
# numba compiles math.exp and math.tanh to calls of the C library's scalar functions, one element
# at a time: 8x and 40x slower than NumPy's vectorised ones here. The kernels used to leave exp
# and tanh to NumPy, in passes of their own between the compiled ones, on the calling thread
# only. In float32 they are written out below as arithmetic the compiler vectorises (8-16 lanes
# at once), so that a softmax or a GELU is one pass, on the team; float64 keeps the C library's
# (exact) functions.
#
# exp(x) = 2^k e^r with k = round(x / ln 2) and r = x - k ln 2, |r| <= ln(2)/2: e^r from its
# Taylor series to r^7 (the first term left out, r^8/8! < 1.2e-9, is below float32's rounding),
# and 2^k made directly: 2^j is the float whose exponent field holds j + 127 and whose mantissa
# is 0 (for j in -126..127; 2^k is made as two such factors, as k reaches 128 near the top).
# ln 2 is split in two (a part with few mantissa bits, so k ln2_high is exact, and the rest) to
# keep r exact. Measured over 4 million points of [-87, 88.72]: within 1.2 units in the last
# place of the exact result (NumPy's own float32 exp: 2.4). Below -87 (near e^-87.3, the smallest
# normal float32) it returns 0, so that a softmax's masked keys (-inf) come out exactly 0.
#
# tanh(u) = sign(u) (1 - 2 / (exp(2|u|) + 1)), from the exp above. Near +-1 (large |u|) the
# subtraction leaves the tiny 2 / (exp + 1) exact, so 1 - tanh^2, which GELU's backward needs, is
# as exact as from NumPy's tanh; near 0 it is within 6e-8 of tanh (absolute), far below what
# GELU's x/2 (1 + tanh) resolves. (With exp(2u) for either sign, tanh near -1 lost that.)
LN2_HIGH, LN2_LOW = 0.693359375, -2.12194440e-4  # ln 2 = LN2_HIGH + LN2_LOW (LN2_LOW's
# float32 rounding leaves ln 2 off by ~1e-11: 1e-9 of r at k = 127, below float32's resolution)

# what the kernels call besides arithmetic, set by _load_numba before the first one compiles:
# exp and tanh (above), numba's prange, a loop whose iterations may run on several threads,
# _gemm, a call of MKL's cblas_?gemm from inside a kernel ("attention on MKL's team" below), and
# the compiled helpers the kernels share (_softmax_row, _at, _leading)
_exp = _tanh = _gemm = _softmax_row = _at = _leading = None
prange = range


def _load_numba() -> None:
    global _exp, _tanh, _gemm, prange, _softmax_row, _at, _leading
    if _exp is not None:
        return
    import math

    import numba
    from llvmlite import ir
    from numba.core import types as numba_types
    from numba.extending import intrinsic, overload

    @intrinsic
    def float32_from_bits(typing_context, bits):  # the int32's 32 bits read as a float32
        def codegen(context, builder, signature, arguments):
            return builder.bitcast(arguments[0], ir.FloatType())

        return numba_types.float32(numba_types.int32), codegen

    f32 = np.float32

    def exp_float32(x):
        clamped = max(min(x, f32(88.75)), f32(-87.5))  # beyond: 0 or inf, chosen at the end
        k = np.floor(clamped * f32(1.4426950408889634) + f32(0.5))  # round(x / ln 2)
        r = clamped - k * f32(LN2_HIGH) - k * f32(LN2_LOW)
        p = f32(1 / 5040)  # e^r = 1 + r + r^2/2! + ... + r^7/7!, by Horner's rule
        p = p * r + f32(1 / 720)
        p = p * r + f32(1 / 120)
        p = p * r + f32(1 / 24)
        p = p * r + f32(1 / 6)
        p = p * r + f32(0.5)
        p = p * r + f32(1.0)
        p = p * r + f32(1.0)
        n = np.int32(k)  # 2^n as 2^(n//2) 2^(n - n//2): both normal for n in [-126, 128]
        half = n >> np.int32(1)
        scaled = (p * float32_from_bits((half + np.int32(127)) << np.int32(23))
                  * float32_from_bits((n - half + np.int32(127)) << np.int32(23)))
        if x > f32(88.72284):  # above log(largest float32)
            return f32(np.inf)
        if x >= f32(-87.0):
            return scaled
        # below -87: 0; and NaN, for which no comparison holds, stays NaN (an overflowed float16
        # step must still be seen). Choosing x here, not testing x != x first, kept the loop as
        # fast as without NaN's case (a test first: 17% slower)
        return f32(0.0) if x < f32(-87.0) else x

    def tanh_float32(x):
        magnitude = f32(1.0) - f32(2.0) / (exp(f32(2.0) * abs(x)) + f32(1.0))  # tanh(|x|)
        return magnitude if x >= f32(0.0) else -magnitude

    def exp(x):  # the Python names the kernels call; numba compiles them by dtype
        return math.exp(x)

    def tanh(x):
        return math.tanh(x)

    def by_dtype(float32_body, float64_body):  # numba picks the body by the argument's type
        return lambda x: float32_body if x == numba_types.float32 else float64_body

    # inlined into each kernel, they are compiled with the kernel's options (fastmath ...)
    overload(exp, inline="always")(by_dtype(exp_float32, lambda x: math.exp(x)))
    overload(tanh, inline="always")(by_dtype(tanh_float32, lambda x: math.tanh(x)))

    @intrinsic
    def gemm(typing_context, function, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta,
             c, ldc):
        # a call of the C function at address ``function`` with the matrices' addresses a, b, c
        # as integers; alpha's type (float32 or float64) decides the C signature, float or
        # double scalars: the caller passes cblas_sgemm's address with float32 scalars and
        # cblas_dgemm's with float64 (``_gemm_address(dtype)``). The address comes in as an
        # argument, so that a kernel that calls it holds no address of this process and numba
        # can cache it on disk
        scalar = ir.FloatType() if alpha == numba_types.float32 else ir.DoubleType()
        integer, pointer = ir.IntType(32), ir.IntType(8).as_pointer()
        c_type = ir.FunctionType(ir.VoidType(), [integer] * 6 + [scalar, pointer, integer,
                                                                 pointer, integer, scalar,
                                                                 pointer, integer])

        def codegen(context, builder, signature, arguments):
            def cast(index, to):
                return context.cast(builder, arguments[index], signature.args[index], to)

            trans_a, trans_b, m, n, k, lda, ldb, ldc = (cast(i, numba_types.int32)
                                                        for i in (1, 2, 3, 4, 5, 8, 10, 13))
            a, b, c = (builder.inttoptr(cast(i, numba_types.intp), pointer) for i in (7, 9, 12))
            target = builder.inttoptr(cast(0, numba_types.intp), c_type.as_pointer())
            row_major = ir.Constant(integer, 101)  # CBLAS's enum
            builder.call(target, [row_major, trans_a, trans_b, m, n, k, cast(6, alpha), a, lda,
                                  b, ldb, cast(11, alpha), c, ldc])
            return context.get_dummy_value()

        return numba_types.void(function, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb,
                                beta, c, ldc), codegen

    _exp, _tanh, _gemm, prange = exp, tanh, gemm, numba.prange
    # the helpers the kernels share (numba compiles them into each kernel that calls them)
    _softmax_row, _at, _leading = (
        numba.njit(nogil=True, fastmath=_FASTMATH, error_model="numpy")(code)
        for code in (_softmax_row_code, _at_code, _leading_code))


# ------------------------------------------------------------------------------ layer norm
@_compile(parallel=True)
def _layer_norm_forward_rows(x, weight, bias, eps, y, xhat, rstd, mean):
    # x, y, xhat (N, C); weight, bias (C,); rstd, mean (N,); the rows on the team's threads
    rows, width = x.shape
    for i in prange(rows):
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


LAYER_NORM_CHUNK_ROWS = 64  # rows per partial sum of dweight and dbias


@_compile(parallel=True)
def _layer_norm_backward_rows(g, xhat, weight, rstd, dx, dweight, dbias, means, chunk):
    # with gx̂ = g w and means over the C features of a row:
    #   dx = rstd (gx̂ - mean(gx̂) - x̂ mean(gx̂ x̂));  dw += g x̂ and db += g over the rows
    # The rows in chunks of ``chunk`` rows, on the team's threads; chunk k adds its rows' share
    # of dw and db into dweight[k] and dbias[k] (float64), so no two threads add into the same
    # sum, and the chunks, not the threads, decide the order of the additions (the same result
    # on every run, with any number of threads)
    rows, width = g.shape
    for k in prange(len(dweight)):
        for i in range(k * chunk, min(rows, (k + 1) * chunk)):
            mean_g = 0.0  # mean(gx̂)
            mean_gx = 0.0  # mean(gx̂ x̂)
            for j in range(width):
                gxhat = g[i, j] * weight[j]
                mean_g += gxhat
                mean_gx += gxhat * xhat[i, j]
                dweight[k, j] += g[i, j] * xhat[i, j]
                dbias[k, j] += g[i, j]
            means[i, 0], means[i, 1] = mean_g / width, mean_gx / width  # in g's dtype
            shift, slope = means[i, 0], means[i, 1]
            for j in range(width):
                dx[i, j] = rstd[i] * (g[i, j] * weight[j] - shift - xhat[i, j] * slope)


def layer_norm_backward_rows(g, xhat, rstd, dx, *, weight, sums: dict) -> None:
    """dx of a block of rows (N, C) from g and the forward's xhat and rstd (N, 1), as
    ``fused._layer_norm_backward_rows``, in one pass that also sums the block's share of
    dweight = sum(g x̂) and dbias = sum(g) over its rows (in float64): ``sums[address] =
    (dweight, dbias)``, keyed by the address of the block's first row, so that the shares can
    be added in the order of the rows (the same result on every run)."""
    chunks = -(-len(g) // LAYER_NORM_CHUNK_ROWS)
    dweight, dbias = (np.zeros((chunks, xhat.shape[-1]), np.float64) for _ in range(2))
    _layer_norm_backward_rows(g, xhat, weight, rstd.reshape(-1), dx, dweight, dbias,
                              np.empty((len(g), 2), g.dtype), LAYER_NORM_CHUNK_ROWS)
    sums[g.ctypes.data] = dweight.sum(axis=0), dbias.sum(axis=0)


# ----------------------------------------------------------------------------------- AdamW
@_compile(parallel=True)
def _adamw_rows(p, g, m, v, b1, c1, b2, c2, step_size, eps, decay):
    # p, g, m, v flat; m and v updated in place, then p (the formulas of optim.AdamW.step,
    # with c1 = 1 - b1 and c2 = 1 - b2); every scalar is of the arrays' dtype, so a float32
    # update stays in float32 and runs 16 floats per AVX-512 instruction
    for i in prange(p.shape[0]):
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
def _softmax_row_code(row, seen, factor):
    # row (Tk,), in place: the softmax of row[:seen], zeros beyond. Its maximum, then
    # exp(s - max) and their sum (in float64), then the division, as a multiplication by
    # factor[0] = 1 / sum: a one-element array of the row's dtype, so that this pass runs in it
    # (a float64 factor made a float32 row 3.5-5x slower).
    # The maximum as eight running maxima, one per position modulo 8: a single running maximum
    # waits for its previous value at every element (numba does not vectorise this reduction);
    # eight independent ones keep the CPU busy (2.8x faster here).
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = row[0]
    whole = seen - seen % 8
    for j in range(0, whole, 8):
        m0, m1, m2, m3 = (max(m0, row[j]), max(m1, row[j + 1]), max(m2, row[j + 2]),
                          max(m3, row[j + 3]))
        m4, m5, m6, m7 = (max(m4, row[j + 4]), max(m5, row[j + 5]), max(m6, row[j + 6]),
                          max(m7, row[j + 7]))
    for j in range(whole, seen):
        m0 = max(m0, row[j])
    largest = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    total = 0.0
    for j in range(seen):
        e = _exp(row[j] - largest)
        row[j] = e
        total += e
    factor[0] = 1.0 / total
    scale = factor[0]
    for j in range(seen):
        row[j] *= scale
    for j in range(seen, len(row)):
        row[j] = 0


@_compile(parallel=True)
def _causal_softmax_rows(scores, diagonal, factors):
    # scores (M, Tq, Tk), in place: row r sees keys 0..r + diagonal; each row's softmax over
    # those (_softmax_row), the rows on the team's threads; factors (M Tq,): one slot per row
    matrices, queries, keys = scores.shape
    for row_index in prange(matrices * queries):
        r = row_index % queries
        _softmax_row(scores[row_index // queries, r], min(keys, r + diagonal + 1),
                     factors[row_index:row_index + 1])


def causal_softmax(scores, diagonal: int) -> None:
    """In place: scores (..., Tq, Tk), C-contiguous -> the softmax over the last axis, where
    query r sees keys 0..r + diagonal (zeros beyond; ``diagonal = Tk - Tq`` for a whole causal
    matrix, bottom-right aligned as ``fused.causal_mask``). One compiled pass per row where
    the array code makes six over the whole array (add the mask, max, subtract, exp, sum,
    scale)."""
    queries, keys = scores.shape[-2:]
    matrices = scores.reshape(-1, queries, keys)
    _causal_softmax_rows(matrices, diagonal, np.empty(len(matrices) * queries, scores.dtype))


@_compile(parallel=True)
def _softmax_backward_rows(dprobs, probs, delta):
    for i in prange(dprobs.shape[0]):
        for j in range(dprobs.shape[1]):
            dprobs[i, j] = probs[i, j] * (dprobs[i, j] - delta[i])


def softmax_backward(dprobs, probs, delta) -> None:
    """In place: dprobs (..., Tq, Tk) -> dS = probs * (dprobs - delta), delta (..., Tq, 1): one
    pass for the array code's two."""
    keys = dprobs.shape[-1]
    _softmax_backward_rows(dprobs.reshape(-1, keys), probs.reshape(-1, keys), delta.reshape(-1))


# ------------------------------------------------------------------- a product, from Python
@_compile
def _gemm_arrays(gemm_address, trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, out, ldc, one):
    _gemm(gemm_address, trans_a, trans_b, m, n, k, one, a.ctypes.data, lda, b.ctypes.data, ldb,
          beta, out.ctypes.data, ldc)


def gemm(trans_a: int, trans_b: int, a, lda: int, b, ldb: int, beta: float, out, ldc: int) -> None:
    """out = a @ b + beta out for matrices a (M, K), b (K, N), out (M, N) through MKL's
    cblas_?gemm, called from compiled code, with the layouts ``blas.mkl_gemm`` works out (how
    BLAS reads a and b, row-major: transposed or not, and leading dimensions; one float dtype).
    Through ctypes the call of a tiny product took 9.4 us, most of it in reading the three
    arrays' addresses (``.ctypes.data``); this way 2.6 (docs/performance.md, "Attention on
    MKL's team")."""
    (m, k), n = a.shape, out.shape[1]  # a (M, K) as a matrix, whichever way it lies
    if not (b.shape == (k, n) and out.shape == (m, n) and a.dtype == b.dtype == out.dtype
            and out.dtype in (np.float32, np.float64)):
        raise ValueError(f"gemm: {a.shape} {a.dtype} @ {b.shape} {b.dtype} into {out.shape} "
                         f"{out.dtype} do not fit")
    scalar = out.dtype.type
    _gemm_arrays(_gemm_address(out.dtype), trans_a, trans_b, m, n, k, a, lda, b, ldb,
                 scalar(beta), out, ldc, scalar(1))


# ------------------------------------------------------------------ attention on MKL's team
# Causal attention for training, per (sequence, head): its products are small (the baby model's
# 64 x 32 by 32 x 64), so NumPy's batched products and the softmax kernel between them ran as
# three calls, the products on one core. These kernels take the (sequence, head) pairs on the
# team of threads instead, and each pair's products run as MKL's cblas_?gemm called from inside
# the kernel (one thread each: MKL runs sequentially inside the team's parallel region), its
# softmax between them while the pair's scores are still in the core's cache -- the layout of
# PyTorch's CPU attention. The arrays are (B, H, T, D) views whose rows lie ``strides[2]``
# bytes apart (the model's (B, T, H, D) memory, read as it is: BLAS takes a row stride); the
# probabilities (B, H, Tq, Tk) are C-contiguous. ``gemm_address``: MKL's function's address.
NO_TRANSPOSE, TRANSPOSE = 111, 112  # CBLAS's enums
# Each pair's queries in blocks of this many rows, each block multiplied by the keys its last
# query sees and no further (PyTorch's CPU attention splits the queries so too: blocks of 32,
# 64 from 192 queries on). Against whole rows, 6 x 384's attention (blocks of 128 queries, up
# to 256 keys) took 0.916-0.934x the time with 64, 0.926-0.955x with 32; the baby's (64
# queries) 0.99-1.00x with 32: what 32 saves in arithmetic, the twice as many calls cost.
# (These blocks lie inside the op's own causal blocks, ``fused.CAUSAL_BLOCK_ROWS`` = 128
# queries, each one kernel call with its own array of probabilities.)
ATTENTION_BLOCK_ROWS = 64


def _at_code(x, b, h):
    # the address of matrix x[b, h]
    return x.ctypes.data + b * x.strides[0] + h * x.strides[1]


def _leading_code(x):
    # BLAS's leading dimension of each matrix x[b, h] (T, D): how many elements apart its rows
    # are (any number >= D for a matrix of one row, whose row stride NumPy leaves arbitrary)
    return x.strides[2] // x.itemsize if x.shape[2] > 1 else x.shape[3]


@_compile(parallel=True)
def _attention_forward_pairs(probs, q, k, v, out, diagonal, rows, gemm_address, zero, one):
    # probs = softmax(q k^T), query r seeing keys 0..r + diagonal; out = probs v (q already
    # scaled by 1 / sqrt(D)). Each _gemm: C = alpha op(A) op(B) + beta C, with op(X) = X or
    # X^T (TRANSPOSE), the matrices given as (address, leading dimension). The queries go in
    # blocks of ``rows``, each multiplied by the keys its last query sees and no further.
    batch, heads, queries, width = q.shape
    keys = k.shape[2]
    q_step, out_step = q.strides[2], out.strides[2]  # bytes from one row to the next
    for pair in prange(batch * heads):
        b, h = pair // heads, pair % heads
        p = probs[b, h]  # (Tq, Tk)
        factor = np.empty(1, probs.dtype)
        for r0 in range(0, queries, rows):
            r1 = min(queries, r0 + rows)
            seen = min(keys, r1 + diagonal)  # keys 0 .. seen - 1: those query r1 - 1 sees
            scores = p.ctypes.data + r0 * p.strides[0]  # rows r0 .. r1 - 1 of P
            _gemm(gemm_address, NO_TRANSPOSE, TRANSPOSE, r1 - r0, seen, width,  # S = q k^T
                  one, _at(q, b, h) + r0 * q_step, _leading(q), _at(k, b, h), _leading(k),
                  zero, scores, keys)
            for r in range(r0, r1):
                _softmax_row(p[r], min(keys, r + diagonal + 1), factor)
            _gemm(gemm_address, NO_TRANSPOSE, NO_TRANSPOSE, r1 - r0, width, seen,  # out = P v
                  one, scores, keys, _at(v, b, h), _leading(v),
                  zero, _at(out, b, h) + r0 * out_step, _leading(out))


@_compile(parallel=True)
def _attention_backward_pairs(probs, q, k, v, out, g, dq, dk, dv, scale, beta, diagonal, rows,
                              gemm_address, zero, one):
    # dv (+)= P^T g;  dP = g v^T;  dS = P * (dP - rowsum(g * out)) elementwise;
    # dq = scale dS k;  dk (+)= dS^T q (q already scaled). beta: 1 adds into dk and dv, 0
    # writes them. In the forward's blocks of queries, the last block first: it sees every key
    # its earlier blocks see, and writes (beta) the rows of dk and dv they then add to.
    batch, heads, queries, width = q.shape
    keys = k.shape[2]
    q_step, g_step, dq_step = q.strides[2], g.strides[2], dq.strides[2]
    last = (queries - 1) // rows * rows  # the first query of the last block
    for pair in prange(batch * heads):
        b, h = pair // heads, pair % heads
        p = probs[b, h]  # (Tq, Tk)
        ds = np.empty((queries, keys), probs.dtype)
        delta = np.empty(1, probs.dtype)
        for r0 in range(last, -1, -rows):
            r1 = min(queries, r0 + rows)
            seen = min(keys, r1 + diagonal)  # keys 0 .. seen - 1: those query r1 - 1 sees
            add = one if r0 != last else beta
            if r0 == last and beta == zero:  # keys no query sees (none in causal attention)
                for j in range(seen, keys):
                    for d in range(width):
                        dk[b, h, j, d] = 0
                        dv[b, h, j, d] = 0
            block_p = p.ctypes.data + r0 * p.strides[0]  # rows r0 .. r1 - 1 of P and of dS
            block_ds = ds.ctypes.data + r0 * ds.strides[0]
            block_q, block_g = _at(q, b, h) + r0 * q_step, _at(g, b, h) + r0 * g_step
            _gemm(gemm_address, TRANSPOSE, NO_TRANSPOSE, seen, width, r1 - r0,  # dv (+)= P^T g
                  one, block_p, keys, block_g, _leading(g),
                  add, _at(dv, b, h), _leading(dv))
            _gemm(gemm_address, NO_TRANSPOSE, TRANSPOSE, r1 - r0, seen, width,  # dP = g v^T
                  one, block_g, _leading(g), _at(v, b, h), _leading(v),
                  zero, block_ds, keys)
            for r in range(r0, r1):
                total = 0.0
                for d in range(width):
                    total += g[b, h, r, d] * out[b, h, r, d]
                delta[0] = total  # in the arrays' dtype, so that the pass below runs in it
                shift = delta[0]
                for j in range(seen):
                    ds[r, j] = p[r, j] * (ds[r, j] - shift)
            _gemm(gemm_address, NO_TRANSPOSE, NO_TRANSPOSE, r1 - r0, width, seen,  # dq = s dS k
                  scale, block_ds, keys, _at(k, b, h), _leading(k),
                  zero, _at(dq, b, h) + r0 * dq_step, _leading(dq))
            _gemm(gemm_address, TRANSPOSE, NO_TRANSPOSE, seen, width, r1 - r0,  # dk (+)= dS^T q
                  one, block_ds, keys, block_q, _leading(q),
                  add, _at(dk, b, h), _leading(dk))


def _rows_for_blas(x) -> bool:
    """Whether BLAS can read (or write) each matrix x[b, h] (T, D) as it lies: unit steps along
    a row, rows a whole number of elements apart and at least a row long (``_leading``), aligned.
    (NumPy gives an axis of length 1 any stride: it is never stepped along.)"""
    (rows, width), (row_step, step), item = x.shape[2:], x.strides[2:], x.itemsize
    return ((step == item or width == 1) and x.flags.aligned
            and (rows == 1 or (row_step % item == 0 and row_step >= width * item)))


def attention_enabled(*arrays) -> bool:
    """Whether the attention kernels can read these (B, H, T, D) arrays: numba and MKL are there
    (neither switched off), one float dtype, no empty axis, BLAS can read every matrix as it
    lies, and numba's threads are MKL's team (inside the team's parallel region MKL runs each
    product on the thread that calls it) or MKL has one thread: else each kernel thread's
    product would start threads of MKL's own, more threads than cores."""
    from tinygrad_llm import blas

    if not (enabled(np) and blas.mkl() is not None):
        return False
    dtype = arrays[0].dtype
    return (dtype in (np.float32, np.float64)
            and all(a.ndim == 4 and a.size > 0 and a.dtype == dtype and _rows_for_blas(a)
                    for a in arrays)
            and (_shares_mkl_team() or _mkl_max_threads()() == 1))


def attention_fits(q, k, v, out, g=None, dq=None, dk=None, dv=None) -> bool:
    """Whether ``attention_forward`` (q, k, v, out) or ``attention_backward`` (and g, dq, dk,
    dv) takes these arrays: ``attention_enabled``, shapes that fit -- q, out, g, dq (B, H, Tq,
    D), k, v, dk, dv (B, H, Tk, D), the same B and H everywhere (no broadcast) -- and at least as
    many (sequence, head) pairs as the team has threads (with fewer, threads would sit idle
    that the batched products of the array code keep busy)."""
    (batch, heads, _, width), keys = q.shape, k.shape[2]
    return (k.shape == v.shape == (batch, heads, keys, width) and out.shape == q.shape
            and (g is None or g.shape == dq.shape == q.shape and dk.shape == dv.shape == k.shape)
            and batch * heads >= team_threads()
            and attention_enabled(*[a for a in (q, k, v, out, g, dq, dk, dv) if a is not None]))


@functools.cache
def _gemm_address(dtype) -> int:
    """The address of MKL's cblas_sgemm (float32) or cblas_dgemm (float64)."""
    from tinygrad_llm import blas

    function = blas.mkl().cblas_sgemm if dtype == np.float32 else blas.mkl().cblas_dgemm
    return ctypes.cast(function, ctypes.c_void_p).value


def attention_forward(q, k, v, probs, out, diagonal: int) -> None:
    """probs[...] = the causal softmax of q k^T (query r sees keys 0..r + diagonal, zeros
    beyond) and out[...] = probs v, for q (B, H, Tq, D) already scaled by 1 / sqrt(D), k and v
    (B, H, Tk, D), probs (B, H, Tq, Tk) C-contiguous, out (B, H, Tq, D): one kernel call, the
    (sequence, head) pairs on the team of threads (``attention_fits`` says when it can)."""
    _check_attention(q, k, v, probs, out, (q, k, v), (probs, out))
    scalar = q.dtype.type
    _on_team_or_alone(_attention_forward_pairs, probs, q, k, v, out, diagonal,
                      ATTENTION_BLOCK_ROWS, _gemm_address(q.dtype), scalar(0), scalar(1))


def attention_backward(q, k, v, probs, out, g, dq, dk, dv, scale: float, add: bool,
                       diagonal: int) -> None:
    """The gradients of ``attention_forward`` for the upstream g (B, H, Tq, D): dq[...] =
    scale dS k, and dk, dv (B, H, Tk, D) written (``add``: added to) with dS^T q and P^T g,
    where dS = P * (g v^T - rowsum(g * out)) -- ``fused.ScaledDotProductAttention.backward``'s
    formulas, one kernel call. ``probs`` and ``diagonal`` as ``attention_forward`` wrote and
    took them (zeros beyond each query's keys: the blocks of queries read only the keys their
    last query sees)."""
    _check_attention(q, k, v, probs, out, (q, k, v, probs, out, g), (dq, dk, dv), g, dq, dk, dv)
    scalar = q.dtype.type
    _on_team_or_alone(_attention_backward_pairs, probs, q, k, v, out, g, dq, dk, dv,
                      scalar(scale), scalar(1 if add else 0), diagonal, ATTENTION_BLOCK_ROWS,
                      _gemm_address(q.dtype), scalar(0), scalar(1))


def _on_team_or_alone(kernel, probs, *arguments) -> None:
    # the kernel's parallel build on the team when the scores are large enough (as ``_compile``
    # decides from its first argument, probs); else its serial build, with MKL's products on
    # this thread alone (with its whole team each, they would start threads for tiny products)
    from tinygrad_llm import blas

    if probs.size >= PARALLEL_MIN_ELEMENTS and team_threads() > 1:
        kernel(probs, *arguments)
        return
    with blas.one_thread_here():
        kernel(probs, *arguments)


def _check_attention(q, k, v, probs, out, reads, writes, *backward) -> None:
    # the kernels do not check their indices, and BLAS reads and writes by address: the shapes
    # must fit, and what is written be writable, apart from what is read and from each other,
    # each of its matrices [b, h] apart from the others (each pair's thread writes its own)
    fits = (attention_fits(q, k, v, out, *backward)
            and probs.shape == q.shape[:3] + k.shape[2:3] and probs.flags.c_contiguous
            and probs.dtype == q.dtype
            and all(a.flags.writeable and elements_apart(a) for a in writes)
            and all(apart(a, b) for i, a in enumerate(writes) for b in reads + writes[:i]))
    if not fits:
        raise ValueError(f"attention kernels: q {q.shape}, k {k.shape}, v {v.shape}, probs "
                         f"{probs.shape}, out {out.shape} do not fit (or BLAS cannot read them, "
                         "or what they write overlaps)")


def apart(a, b) -> bool:
    """Whether arrays a and b share no memory. NumPy's quick test compares the ranges of
    addresses only, and views that interleave in one array -- the gradients of q, k and v
    written side by side (``fused._empty_like_views``) -- span overlapping ranges: those are
    then checked element by element (``np.shares_memory``, bounded; too hard counts as
    overlapping)."""
    if not np.may_share_memory(a, b):
        return True
    try:
        return not np.shares_memory(a, b, max_work=100_000)
    except np.exceptions.TooHardError:
        return False


def elements_apart(x) -> bool:
    """Whether no two elements of x share memory: each axis, from the smallest step up, steps
    past everything the smaller ones span (a sufficient test; axes of length 1 are never
    stepped)."""
    span = x.itemsize
    axes = sorted((abs(step), length) for step, length in zip(x.strides, x.shape, strict=True)
                  if length > 1)
    for step, length in axes:
        if step < span:
            return False
        span += step * (length - 1)
    return True


# --------------------------------------------------------- decoding: one query's attention
@_compile(parallel=True)
def _decode_attention_heads(keys, values, qkv, position, allowed, scale, zero, one, out, scores):
    # keys, values (B, H, L, D): the KV cache's whole buffers; qkv (B, 3 H D): the new
    # position's q, k, v side by side; allowed (B, position + 1); out (B, H D); scores (B H, L).
    # One (sequence, head) per iteration, on the team's threads. The sums run in the arrays'
    # dtype (from ``zero``), as a BLAS dot product does: a float64 sum would slow every pass.
    batch, heads, _, width = keys.shape
    embd = heads * width
    for pair in prange(batch * heads):
        b, h = pair // heads, pair % heads
        start = h * width  # this head's columns in q (and in k, v and out, after an offset)
        q, k, v = qkv[b, start:start + width], keys[b, h], values[b, h]
        k[position] = qkv[b, embd + start:embd + start + width]  # into the cache
        v[position] = qkv[b, 2 * embd + start:2 * embd + start + width]
        s = scores[pair]
        largest, first = zero, True  # the largest score of a visible key
        for j in range(position + 1):
            if allowed[b, j]:
                dot = zero
                for d in range(width):
                    dot += q[d] * k[j, d]
                s[j] = dot * scale
                largest = s[j] if first else max(largest, s[j])
                first = False
        total = zero
        for j in range(position + 1):  # exp(s - max), 0 for a hidden key, and their sum
            weight = _exp(s[j] - largest) if allowed[b, j] else zero
            s[j] = weight
            total += weight
        o = out[b, start:start + width]
        o[:] = zero
        for j in range(position + 1):  # the values weighted by the softmax
            if s[j] != zero:
                for d in range(width):
                    o[d] += s[j] * v[j, d]
        o *= one / total  # total >= 1: the largest visible score gives exp(0)


def decode_attention(keys, values, qkv, position: int, allowed, out) -> None:
    """Attention of one new position per sequence, as decoding with a KV cache does, in one call.

    keys, values (B, H, L, D): a KV cache's buffers (C-contiguous), positions 0..position-1
    filled; qkv (B, 3 H D): the new position's query, key and value (the attention's input
    projection); allowed (B, position + 1) bool: which keys each sequence sees (False at left
    padding; the new position itself True: a sequence that saw no key would come out NaN,
    where the array code gives the mean of the values); out (B, H D): where the heads' outputs
    go, side by side. Writes the new key and value at ``position`` of the buffers, then computes
    ``softmax(q k^T / sqrt(D)) v`` over the allowed keys, as ``fused.ScaledDotProductAttention``
    does with the cache's keys and a padding mask. The heads go on the team of threads (the
    buffers' size decides, see ``_compile``: GPT-2's cache is large enough).

    Why a kernel: for one query the arithmetic is tiny (12 heads x 64 keys x 64), and the array
    code's dozen NumPy calls cost more than it, most of all when decoding, where each call finds
    its code and data evicted from the caches by the weights the matrix-vector products stream
    through (docs/performance.md, "Decoding on arrays")."""
    batch, heads, length, width = keys.shape
    # the kernel does not check its indices: what it reads and writes must be there
    if not (0 <= position < length and qkv.shape == (batch, 3 * heads * width)
            and out.shape == (batch, heads * width) and allowed.shape == (batch, position + 1)
            and values.shape == keys.shape):
        raise ValueError(f"decode_attention: cache {keys.shape}, qkv {qkv.shape}, out "
                         f"{out.shape}, allowed {allowed.shape} do not fit position {position}")
    scalar = qkv.dtype.type
    scale = scalar(1 / np.sqrt(width))  # 1 / sqrt(D)
    scores = np.empty((batch * heads, position + 1), qkv.dtype)
    _decode_attention_heads(keys, values, qkv, position, allowed, scale, scalar(0), scalar(1),
                            out, scores)


# ------------------------------------------------------------------------------------ GELU
# The constants come in as arguments of the arrays' dtype: a literal such as 0.5 is a float64 to
# numba, and would make the float32 loops compute in float64, at half the speed or less.
@_compile(parallel=True)
def _gelu_forward_flat(x, t, y, c, a, half, one):
    # t = tanh(u), u = c x (1 + a x^2), and y = x/2 (1 + t) (flat arrays)
    for i in prange(x.shape[0]):
        tanh_u = _tanh(c * x[i] * (one + a * x[i] * x[i]))
        t[i] = tanh_u
        y[i] = half * x[i] * (one + tanh_u)


def gelu_forward_rows(x, t, y, *, c, a) -> None:
    """GELU of a block, as ``functional._gelu_forward_rows``: t = tanh(c (x + a x^3)) and
    y = x/2 (1 + t), written into t and y. One pass, for eight."""
    scalar = x.dtype.type
    _gelu_forward_flat(x.reshape(-1), t.reshape(-1), y.reshape(-1), scalar(c), scalar(a),
                       scalar(0.5), scalar(1))


@_compile(parallel=True)
def _gelu_backward_flat(x, t, g, dx, c, a, half, one, three):
    # dx = g dy/dx,  dy/dx = (1 + t)/2 + x/2 (1 - t^2) c (1 + 3 a x^2)
    for i in prange(x.shape[0]):
        slope = (half * (one + t[i])
                 + half * x[i] * (one - t[i] * t[i]) * c * (one + three * a * x[i] * x[i]))
        dx[i] = g[i] * slope


def gelu_backward_rows(x, t, g, dx, *, c, a) -> None:
    """dx of a block from x, the saved t = tanh(u) and g, as ``functional._gelu_backward_rows``:
    one pass, for eleven."""
    scalar = x.dtype.type
    _gelu_backward_flat(x.reshape(-1), t.reshape(-1), g.reshape(-1), dx.reshape(-1), scalar(c),
                        scalar(a), scalar(0.5), scalar(1), scalar(3))


# ------------------------------------------------------------------- a sum of two arrays
@_compile(parallel=True)
def _add_flat(a, b, out):
    for i in prange(a.shape[0]):
        out[i] = a[i] + b[i]


def add(a, b, out) -> None:
    """out[...] = a + b for arrays of one shape and dtype, C-contiguous (out may be a or b): the
    residual stream's sums and the gradients that meet where it forks, on the team of threads
    for arrays of PARALLEL_MIN_ELEMENTS and more, where NumPy's ``+`` takes one."""
    if not (a.shape == b.shape == out.shape and a.dtype == b.dtype == out.dtype
            and enabled(np, a, b, out)):  # (the kernel indexes without checks)
        raise ValueError(f"add: {a.shape} {a.dtype} + {b.shape} {b.dtype} into {out.shape} "
                         f"{out.dtype}: not one shape and float dtype, C-contiguous")
    _add_flat(a.reshape(-1), b.reshape(-1), out.reshape(-1))


# ------------------------------------------------------------------------ a linear layer's bias
@_compile(parallel=True)
def _fill_rows(out, row):
    for i in prange(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = row[j]


def fill_rows(out, row) -> None:
    """out[...] = row for out (N, M) and row (M,): the bias a product then adds to
    (``blas.mkl_gemm``, for outputs of PARALLEL_MIN_ELEMENTS and more), on the team of threads
    where NumPy's broadcast copy takes one. A
    768 x 128 x 384 product with its bias took 445 against 510 us (no bias: 392); a training
    step 0.971x the time on the baby, 0.975x on 6 x 384 (docs/performance.md, "Decoding on
    arrays")."""
    _fill_rows(out, row)
