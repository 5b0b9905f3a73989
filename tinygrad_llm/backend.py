"""Devices, array modules and random generators: the one place that knows NumPy from CuPy.

Every op is written once against an "array module" ``xp`` -- ``numpy`` on the CPU, ``cupy`` on a
CUDA GPU -- taken from its inputs (the Chainer pattern). CuPy is imported only when a CUDA device
is first asked for, so a CPU-only machine never needs it.
"""

from __future__ import annotations

import ctypes
import os
import sys

import numpy as np

from . import blas, cpu_kernels

DEFAULT_DTYPE = np.float32  # every float tensor is float32 unless asked otherwise

_cupy = None  # the cupy module, once a CUDA device has been asked for
_seed = 0  # the seed the generators below were last set from
_generators: dict = {}  # device name -> random generator of that device's array module

CUPY_HINT = (
    "Install CuPy for your CUDA version: pip install 'tinygrad_llm[gpu]' (CUDA 12, cupy-cuda12x) "
    "or pip install cupy-cuda13x (CUDA 13). Or run on the CPU with device='cpu'."
)


def normalize_device(device) -> str:
    """Map a device name to 'cpu' or 'cuda' ('cuda:0' and 'gpu' are accepted)."""
    if device is None:
        return "cpu"
    name = str(device).lower()
    if name in ("cpu", "numpy"):
        return "cpu"
    if name in ("cuda", "gpu", "cupy") or name.startswith("cuda:"):
        return "cuda"
    raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'cuda'")


def _load_cupy():
    """Import CuPy and check that it sees a GPU; raise a message that says how to fix it."""
    global _cupy
    if _cupy is not None:
        return _cupy
    try:
        import cupy
    except ImportError as error:
        message = f"device='cuda' needs CuPy, which is not installed. {CUPY_HINT}"
        raise RuntimeError(message) from error
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CuPy raises its own CUDARuntimeError when no driver is present
        raise RuntimeError(
            f"CuPy is installed but could not reach a CUDA GPU ({error}). "
            "Check the NVIDIA driver, or run with device='cpu'."
        ) from error
    if count == 0:
        raise RuntimeError("CuPy is installed but no CUDA GPU is visible; use device='cpu'.")
    _cupy = cupy
    return cupy


def cuda_available() -> bool:
    """True when CuPy imports and sees at least one GPU (never raises)."""
    try:
        _load_cupy()
    except RuntimeError:
        return False
    return True


def array_module(device: str):
    """The array module (numpy or cupy) that holds arrays of ``device``."""
    return np if normalize_device(device) == "cpu" else _load_cupy()


def get_array_module(array):
    """The array module an array belongs to (numpy for NumPy arrays and Python scalars)."""
    if _cupy is None and type(array).__module__.startswith("cupy"):
        _load_cupy()  # a CuPy array made before anything here asked for the GPU
    if _cupy is not None and isinstance(array, _cupy.ndarray):
        return _cupy
    return np


def device_of(array) -> str:
    """'cuda' for a CuPy array, 'cpu' for anything else."""
    return "cuda" if get_array_module(array) is not np else "cpu"


def to_device(array, device: str):
    """Return ``array`` on ``device`` (no copy when it is already there)."""
    device = normalize_device(device)
    if device == "cpu":
        return to_numpy(array)
    return _load_cupy().asarray(array)


def to_numpy(array) -> np.ndarray:
    """Return a NumPy array for a NumPy or CuPy array (copies from the GPU)."""
    if _cupy is not None and isinstance(array, _cupy.ndarray):
        return _cupy.asnumpy(array)
    return np.asarray(array)


def _seed_int(seed) -> int:
    """An int seed as is; a tuple of ints such as (seed, step) mixed into one 63-bit int."""
    if isinstance(seed, (tuple, list)):
        mixed = np.random.SeedSequence([int(s) for s in seed]).generate_state(1, np.uint64)[0]
        return int(mixed >> np.uint64(1))
    return int(seed)


def manual_seed(seed) -> None:
    """Reseed the random generators of every device (dropout, initialisation, sampling).

    ``seed`` is an int, or a tuple of ints such as ``(seed, step)``: the trainer reseeds this way
    before every step, so the dropout masks of step n are the same whether or not the run was
    interrupted and resumed before it -- on every device, with no generator state to save.
    """
    global _seed
    _seed = _seed_int(seed)
    _generators.clear()


def generator(device: str = "cpu"):
    """The seeded random generator of ``device``: a ``Generator`` of NumPy or CuPy."""
    device = normalize_device(device)
    if device not in _generators:
        xp = array_module(device)
        _generators[device] = xp.random.default_rng(_seed)
    return _generators[device]


def set_tf32(enabled: bool) -> None:
    """Let float32 matrix products on the GPU use TF32 tensor cores (Ampere and later).

    TF32 keeps float32's range but rounds the inputs of each product to 10 mantissa bits
    (float16's precision); the sums stay float32. On an H100 that makes float32 matrix products
    several times faster, at about 1e-3 relative error per product -- PyTorch's
    ``torch.backends.cuda.matmul.allow_tf32``. CuPy reads the ``CUPY_TF32`` variable the first
    time it multiplies float32 matrices and then remembers its choice, so once CuPy is loaded
    the choice is also set directly. No effect on the CPU.
    """
    os.environ["CUPY_TF32"] = "1" if enabled else "0"
    if _cupy is None:
        return  # read when CuPy first multiplies float32 matrices
    try:  # CuPy's own switch (not public API): the compute type cuBLAS is called with
        from cupy._core import _routines_linalg as linalg

        kind = linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT
        linalg.set_compute_type(np.float32, kind)
    except (ImportError, AttributeError):  # another CuPy layout: CUPY_TF32 still applies later
        pass


def index_add_rows(target, ids, rows) -> None:
    """In place: ``target[ids[i]] += rows[i]`` for every i, adding up repeated ids.

    target (V, C), ids (N,) integers, rows (N, C) -- the backward of an embedding lookup. The ids
    are sorted so equal ids sit side by side, each run of rows is summed, and each sum is added
    once. On the CPU ``add.reduceat`` sums the runs (6x faster than ``numpy.add.at`` here).

    On the GPU the same result must come out every time (atomic adds of many rows to one id
    round differently from run to run, and a resumed run could then never match an uninterrupted
    one), without reading anything back to the host (the run boundaries' positions have a
    data-dependent count, and finding them would make the GPU wait). So each run's sum is the
    difference of a float64 running sum between its last row and the row before its first
    (found with ``searchsorted``, fixed shapes), placed on the run's last row, zeros elsewhere;
    then every row is scatter-added: each id receives one non-zero sum and exact zeros.
    """
    xp = get_array_module(target)
    order = xp.argsort(ids, kind="stable") if xp is np else xp.argsort(ids)  # CuPy: stable
    sorted_ids = ids[order]
    if xp is np:
        run_starts = np.flatnonzero(np.concatenate(([True], sorted_ids[1:] != sorted_ids[:-1])))
        target[sorted_ids[run_starts]] += np.add.reduceat(rows[order], run_starts, axis=0)
        return
    running = xp.cumsum(rows[order].astype(xp.float64), axis=0)  # (N, C)
    starts = xp.searchsorted(sorted_ids, sorted_ids, side="left")  # (N,) first row of each run
    before = xp.where((starts > 0)[:, None], running[xp.maximum(starts - 1, 0)], 0.0)
    is_last = xp.concatenate((sorted_ids[1:] != sorted_ids[:-1], xp.ones(1, dtype=bool)))
    sums = xp.where(is_last[:, None], running - before, 0.0).astype(target.dtype)  # (N, C)
    scatter_add(target, sorted_ids, sums)


def scatter_add(target, indices, values) -> None:
    """In place: ``target[indices] += values``, adding up repeated indices (unlike ``+=``)."""
    if get_array_module(target) is np:
        np.add.at(target, indices, values)
    else:
        import cupyx

        cupyx.scatter_add(target, indices, values)


# ------------------------------------------------------------------ threads on the CPU
# NumPy runs each ufunc on one core. Its BLAS (OpenBLAS) has threads of its own for matrix
# products, but they spin for a while after each product, waiting for the next -- competing for
# the cores with whatever runs next. ``set_num_threads(n)`` (``--threads n`` on the command line)
# splits the library's own work -- the rows of an elementwise or row-wise op, the sequences of a
# batch in attention -- over n threads that sleep while idle. NumPy and BLAS release the GIL
# while they compute, so the blocks really run at once, as PyTorch's one OpenMP pool does. The
# products of linear layers run on MKL's own n threads when MKL is installed (its threads can be
# told to sleep as soon as a product ends: ``blas.share_cores_with_threads``); with NumPy's
# OpenBLAS, which cannot, BLAS runs on one thread and the rows of each product are split too.
# Without the call (the default), NumPy's elementwise ops run on one thread and BLAS on its own
# threads; with numba and MKL installed, the compiled kernels (layer norm, GELU, the softmax,
# AdamW) run on MKL's threads too (``cpu_kernels.team_threads``), which made the default the
# faster mode on the 2-core Intel Xeon (docs/performance.md, "One team of threads").
PARALLEL_MIN_ELEMENTS = 1 << 15  # below this, handing work to threads costs more than it saves
_threads = 1  # set_num_threads
_pool = None


def default_threads() -> int:
    """OMP_NUM_THREADS when set, else every core this process may run on."""
    from_env = os.environ.get("OMP_NUM_THREADS", "")
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_num_threads(threads: int | None = None) -> int:
    """Split CPU work over ``threads`` threads (default: ``default_threads()``): NumPy's BLAS on
    one thread per call, MKL's products on ``threads`` of its own (one per call inside a split
    op). Returns the number used."""
    global _threads, _pool
    threads = default_threads() if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    from threadpoolctl import threadpool_limits  # finds whichever BLAS NumPy loaded

    blas.mkl()  # loads MKL first when it is installed, so that the limit reaches it too
    threadpool_limits(1, user_api="blas")  # NumPy's BLAS on one thread
    blas.share_cores_with_threads(threads)  # MKL: products on all of them, the rest on ours
    if _pool is not None:
        _pool.shutdown()
        _pool = None
    _threads = threads
    return threads


def _split(body, arrays, count: int, work: int) -> None:
    """body(*blocks) over ``_threads`` ranges of axis 0 of ``arrays``, at once."""
    global _pool
    threads = min(_threads, count)
    if threads < 2 or work < PARALLEL_MIN_ELEMENTS or get_array_module(arrays[0]) is not np:
        body(*arrays)
        return
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(_threads - 1, thread_name_prefix="tinygrad-llm",
                                   initializer=blas.one_thread_from_now)  # MKL: one each
    blas.sleep_after_products()  # this thread's MKL products: their threads sleep right after
    bounds = [k * count // threads for k in range(threads + 1)]  # sizes differ by at most 1
    blocks = [[a[lo:hi] for a in arrays] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    others = [_pool.submit(body, *block) for block in blocks[1:]]
    try:
        with blas.one_thread_here():  # the other threads are busy with their blocks
            body(*blocks[0])  # this thread takes the first block
    finally:
        for done in others:
            done.result()  # waits, and raises what a block raised


# An op made of several elementwise passes (GELU: eight) reads and writes its whole array once
# per pass. When the array is larger than the cache, every pass goes to memory; run on blocks of
# rows that fit in the cache instead, all passes but the first find their data there.
CACHE_BLOCK_ELEMENTS = 1 << 15  # per array: 128 KiB of float32, a few arrays fit in L2


def parallel_rows(body, *arrays, cache_blocks: bool = False) -> None:
    """Run ``body(*blocks)`` on blocks of rows of ``arrays``, one block per thread, at once.

    arrays: NumPy arrays whose leading dimensions agree, e.g. x (..., C), out (..., C) and
    rstd (..., 1); each is seen as (N, C) and the N rows are split. Outputs must be
    C-contiguous (their blocks are views that ``body`` writes through); arrays every row shares,
    like a weight, reach ``body`` by closure. On a GPU, with one thread, or for small arrays:
    ``body(*arrays)``, once. ``cache_blocks``: each thread walks its rows in blocks of about
    CACHE_BLOCK_ELEMENTS (for bodies of several passes over their arrays; on NumPy only).
    """
    first = arrays[0]
    rows = first.size // first.shape[-1] if first.ndim and first.shape[-1] else 1
    if cache_blocks and get_array_module(first) is np and first.size > 2 * CACHE_BLOCK_ELEMENTS:
        step = max(1, CACHE_BLOCK_ELEMENTS // max(1, first.size // rows))  # rows per block

        def blocked(*blocks, body=body):
            for start in range(0, len(blocks[0]), step):
                body(*[b[start:start + step] for b in blocks])

        body = blocked
    _split(body, [a.reshape(rows, -1) for a in arrays], rows, first.size)


def parallel_batches(body, *arrays, work: int | None = None) -> None:
    """Like ``parallel_rows``, but split along axis 0 as it is (the sequences of a batch (B, ...)).
    ``work``: elements of work, for the small-array cut-off (default: the first array's size)."""
    _split(body, arrays, len(arrays[0]), arrays[0].size if work is None else work)


def add(a, b, out=None):
    """a + b for arrays, into ``out`` if given (which may be ``a``: a += b). Two large arrays of
    one shape and float dtype, C-contiguous, on the CPU with the compiled kernels: summed by
    ``cpu_kernels.add``, on the team of threads where NumPy's ``+`` runs on one -- the residual
    stream's sums in the forward, and in the backward the gradients that meet where it forks.
    The same sums either way (one addition each)."""
    if (a.shape == b.shape and a.dtype == b.dtype
            and a.size >= cpu_kernels.PARALLEL_MIN_ELEMENTS
            and cpu_kernels.enabled(get_array_module(a), a, b, *(() if out is None else (out,)))
            and (out is None or (out.shape, out.dtype) == (a.shape, a.dtype))):
        out = np.empty_like(a) if out is None else out
        cpu_kernels.add(a, b, out)
        return out
    if out is None:
        return a + b
    get_array_module(a).add(a, b, out=out)
    return out


def matmul(a, b, out=None, bias=None):
    """a @ b (+ bias) for a (N, K), b (K, M) and bias (M,) -> (N, M): with MKL one call on all
    the threads (MKL's own, ``blas.share_cores_with_threads``) that also adds the bias
    (``blas.mkl_gemm``), else the rows of ``a`` split over the threads."""
    xp = get_array_module(a)
    if out is None:
        out = xp.empty((a.shape[0], b.shape[1]), np.result_type(a.dtype, b.dtype))
    if xp is np and blas.mkl_gemm(a, b, out, bias=bias):
        return out

    def rows_times_b(rows, into):  # on NumPy through blas.gemm: MKL when it is installed
        if xp is np:
            blas.gemm(rows, b, into)
        else:
            xp.matmul(rows, b, out=into)
        if bias is not None:
            into += bias

    parallel_batches(rows_times_b, a, out, work=a.shape[0] * b.shape[1] * max(1, a.shape[1] // 16))
    return out


def tune_cpu_allocator() -> bool:
    """Let glibc keep freed array buffers for reuse instead of handing them back to the OS.

    Every op allocates fresh NumPy arrays. By default glibc serves each allocation above 128 KiB
    with a new ``mmap`` and releases it with ``munmap`` when freed, so the next array of that size
    starts on fresh pages and pays a page fault per 4 KiB on first touch -- in a training step
    that costs as much as the arithmetic. Raising the mmap threshold to its maximum (32 MiB) and
    the heap trim threshold to 1 GiB makes freed buffers get reused, warm. This sped a baby-GPT
    training step up 1.7x here (see docs/performance.md). Linux/glibc only; set
    ``TINYGRAD_LLM_TUNE_MALLOC=0`` to leave the allocator alone. Returns whether it applied.

    It changes the whole process's allocator, so importing the library never does it: programs
    call it once at start-up (the ``tinygrad-llm`` command and the bench scripts do).
    """
    if os.environ.get("TINYGRAD_LLM_TUNE_MALLOC", "1") == "0":
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024) and mallopt(M_TRIM_THRESHOLD, 1 << 30))
