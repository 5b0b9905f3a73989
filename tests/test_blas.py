"""blas.gemm and blas.matmul_into against np.matmul: MKL's products where it is installed (and
TINYGRAD_LLM_MKL is not 0), else NumPy's OpenBLAS and its batched product."""

import functools
import importlib.util
import itertools
import os
import platform
import sys

import numpy as np
import pytest

from tinygrad_llm import blas

needs_batched = pytest.mark.skipif(not blas.can_batch(), reason="no batched product we call "
                                   "(neither MKL nor NumPy's OpenBLAS wheel, or not x86-64)")


@pytest.fixture
def counted(monkeypatch):
    """Counts the batched BLAS calls matmul_into makes (and still makes them)."""
    calls = []
    real = blas._batched_gemm

    def counting(dtype_char):
        batched = real(dtype_char)
        if batched is None:
            return None

        def call(*args):
            calls.append(dtype_char)
            return batched.function(*args)
        return batched._replace(function=call)
    monkeypatch.setattr(blas, "_batched_gemm", counting)
    return calls


def stack(rng, shape, dtype, transposed=False):
    """A random stack of matrices; ``transposed``: a transposed view (columns contiguous)."""
    if transposed:
        return rng.standard_normal(shape[:-2] + shape[-2:][::-1]).astype(dtype).swapaxes(-1, -2)
    return rng.standard_normal(shape).astype(dtype)


@needs_batched
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("add", [False, True])
def test_the_batched_product_equals_numpys(counted, dtype, transpose_a, transpose_b, add):
    rng = np.random.default_rng(0)
    a = stack(rng, (2, 3, 130, 70), dtype, transpose_a)  # 130 x 70 x 120 > SMALL_MATRIX_LIMIT
    b = stack(rng, (2, 3, 70, 120), dtype, transpose_b)
    out = rng.standard_normal((2, 3, 130, 120)).astype(dtype)
    expected = out + a @ b if add else a @ b
    blas.matmul_into(a, b, out, add=add)
    np.testing.assert_allclose(out, expected, rtol=1e-4 if dtype == np.float32 else 1e-12,
                               atol=1e-4 if dtype == np.float32 else 1e-12)
    assert len(counted) == 1


@needs_batched
def test_strided_stacks_as_attention_has_them(counted):
    # k and v are views of one (B, T, 3, H, D) array; the output is (B, H, T, D) laid out as
    # (B, T, H, D): no stride of the leading axes is a multiple of a matrix's size
    rng = np.random.default_rng(1)
    qkv = rng.standard_normal((2, 160, 3, 3, 64)).astype(np.float32).transpose(2, 0, 3, 1, 4)
    q, k = np.ascontiguousarray(qkv[0]), qkv[1]
    scores = np.empty((2, 3, 160, 160), np.float32)
    blas.matmul_into(q, k.swapaxes(-1, -2), scores)  # (.., T, D) @ (.., D, T)
    np.testing.assert_allclose(scores, q @ k.swapaxes(-1, -2), rtol=1e-4, atol=1e-4)
    out = np.empty((2, 160, 3, 64), np.float32).transpose(0, 2, 1, 3)
    blas.matmul_into(scores, qkv[2], out)  # (.., T, T) @ (.., T, D) into a strided output
    np.testing.assert_allclose(out, scores @ qkv[2], rtol=1e-3, atol=1e-3)
    assert len(counted) == 2


@needs_batched
def test_what_it_cannot_batch_goes_to_numpy(counted, monkeypatch):
    rng = np.random.default_rng(2)
    half = stack(rng, (2, 128, 96), np.float16)  # float16 operands, a float32 product
    wide = np.empty((2, 128, 128), np.float32)
    blas.matmul_into(half, half.swapaxes(-1, -2).astype(np.float32), wide)
    np.testing.assert_allclose(wide, half.astype(np.float32) @ half.swapaxes(-1, -2), rtol=1e-3)
    a, b = stack(rng, (2, 128, 96), np.float32), stack(rng, (1, 96, 128), np.float32)
    broadcast = np.empty((2, 128, 128), np.float32)  # leading shapes differ: np.matmul broadcasts
    blas.matmul_into(a, b, broadcast)
    np.testing.assert_allclose(broadcast, a @ b, rtol=1e-4)
    monkeypatch.setenv("TINYGRAD_LLM_BATCHED_BLAS", "0")
    big = stack(rng, (2, 128, 96), np.float32)
    blas.matmul_into(big, big.swapaxes(-1, -2), broadcast)
    np.testing.assert_allclose(broadcast, big @ big.swapaxes(-1, -2), rtol=1e-4)
    assert counted == []


@needs_batched
def test_small_matrices_stay_away_from_the_batched_call(counted):
    # M N K <= 100^3: OpenBLAS 0.3.31's batched call crashes there
    rng = np.random.default_rng(3)
    small = stack(rng, (4, 8, 8), np.float32)
    out = np.empty((4, 8, 8), np.float32)
    blas.matmul_into(small, small, out)
    np.testing.assert_allclose(out, small @ small, rtol=1e-6)
    assert counted == []


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled call", "ctypes call"])
def test_gemm_equals_numpys(dtype, transpose_a, transpose_b, add, compiled, monkeypatch):
    # with MKL installed through cblas_?gemm (x W, g W^T and x^T g of a linear layer), called
    # from compiled code where numba is installed (cpu_kernels.gemm) or through ctypes; without
    # MKL through np.matmul. M, K and N differ, and one operand's rows are a wider array's.
    from tinygrad_llm import cpu_kernels

    if compiled and not (blas.mkl() and cpu_kernels.enabled(np)):
        pytest.skip("needs MKL and numba")
    if not compiled:
        monkeypatch.setattr(cpu_kernels, "SWITCHED_OFF", True)
    calls = []
    real = cpu_kernels.gemm
    monkeypatch.setattr(cpu_kernels, "gemm", lambda *args: calls.append(1) or real(*args))
    rng = np.random.default_rng(4)
    a, b = stack(rng, (70, 50), dtype, transpose_a), stack(rng, (50, 30), dtype, transpose_b)
    for wide_rows in (False, True):
        if wide_rows:  # rows 80 elements apart (BLAS's leading dimension > the columns)
            a = stack(rng, (70, 80), dtype, transpose_a)[:, 10:60]
        out = rng.standard_normal((70, 30)).astype(dtype)
        expected = out + a @ b if add else a @ b
        assert blas.gemm(a, b, out, add=add) is out
        np.testing.assert_allclose(out, expected, rtol=1e-4 if dtype == np.float32 else 1e-12,
                                   atol=1e-4 if dtype == np.float32 else 1e-12)
    assert len(calls) == (2 if compiled else 0)


def test_gemm_of_what_blas_cannot_take():
    rng = np.random.default_rng(5)
    half = stack(rng, (6, 5), np.float16)
    out = np.empty((6, 6), np.float32)  # float16 operands, a float32 product
    blas.gemm(half, half.T, out)
    np.testing.assert_allclose(out, half.astype(np.float32) @ half.T.astype(np.float32), rtol=1e-2)
    a = stack(rng, (6, 5), np.float32)
    stepped = np.empty((6, 12), np.float32)[:, ::2]  # columns two apart: no BLAS layout
    blas.gemm(a, a.T, stepped)
    np.testing.assert_allclose(stepped, a @ a.T, rtol=1e-5)
    untouched = np.full((6, 6), 7, np.float32)  # mkl_gemm declines, and writes nothing (not
    assert not blas.mkl_gemm(half, half.T, untouched, bias=np.ones(6, np.float32))  # the bias)
    assert (untouched == 7).all()
    with pytest.raises(ValueError, match="do not go together"):  # the bias would overwrite out
        blas.mkl_gemm(a, a.T, untouched, add=True, bias=np.ones(6, np.float32))


def test_mkl_is_used_where_it_is_installed():
    # the mkl extra installed (and not switched off): the products must really go to it, or
    # the tests above compare np.matmul with itself
    installed = importlib.util.find_spec("mkl") is not None or bool(
        [p for p in os.listdir(os.path.join(sys.prefix, "lib")) if p.startswith("libmkl_rt.so")])
    wanted = os.environ.get("TINYGRAD_LLM_MKL", "1") != "0"
    if not (installed and wanted and sys.platform == "linux" and platform.machine() == "x86_64"):
        pytest.skip("MKL not installed here, or switched off (TINYGRAD_LLM_MKL=0)")
    assert blas.mkl() is not None
    from threadpoolctl import threadpool_info

    assert all(info["num_threads"] == 1 for info in threadpool_info()
               if info["internal_api"] == "openblas")  # one pool of spinning threads


def test_shapes_that_do_not_match_raise_as_numpy_does():
    # never handed to BLAS, which would read past the arrays: np.matmul says what is wrong
    rng = np.random.default_rng(6)
    with pytest.raises(ValueError):
        blas.gemm(stack(rng, (200, 120), np.float32), stack(rng, (121, 130), np.float32),
                  np.empty((200, 130), np.float32))
    with pytest.raises(ValueError):
        blas.matmul_into(stack(rng, (2, 200, 120), np.float32),
                         stack(rng, (2, 120, 130), np.float32), np.empty((2, 200, 131), np.float32))


@pytest.mark.parametrize("mkl", [True, False], ids=["mkl where installed", "numpy"])
@pytest.mark.parametrize("threads", [1, 2])
def test_backend_matmul_adds_the_bias_as_numpy_would(mkl, threads, monkeypatch):
    # MKL: the output filled with the bias (a 300 x 130 output by cpu_kernels.fill_rows where
    # numba is installed), then the product added (beta = 1); otherwise each block of rows gets
    # the bias after its product
    from tinygrad_llm import backend

    if not mkl:
        monkeypatch.setattr(blas, "mkl", lambda: None)
    monkeypatch.setattr(backend, "PARALLEL_MIN_ELEMENTS", 0)
    monkeypatch.setattr(backend, "_threads", threads)
    rng = np.random.default_rng(7)
    for dtype, (rows, columns) in itertools.product((np.float32, np.float64),
                                                    ((37, 23), (300, 130))):
        a = stack(rng, (rows, 19), dtype)
        for b in (stack(rng, (19, columns), dtype),
                  stack(rng, (19, columns), dtype, transposed=True)):
            bias = rng.standard_normal(columns).astype(dtype)
            expected = a @ b + bias
            got = backend.matmul(a, b, bias=bias)
            np.testing.assert_allclose(got, expected, rtol=1e-5 if dtype == np.float32 else 1e-12)
            np.testing.assert_allclose(backend.matmul(a, b), a @ b,
                                       rtol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("transposed", [False, True])
def test_one_row_products_small_to_numpy_large_to_mkl(transposed, monkeypatch):
    # decoding multiplies one row by a weight matrix (a tied LM head's is transposed): up to
    # SMALL_GEMV_ELEMENTS elements mkl_gemm declines (NumPy's call is cheaper), above it MKL's
    # sgemv takes it where MKL is installed; backend.matmul gives a @ b + bias either way
    from tinygrad_llm import backend

    monkeypatch.setattr(blas, "SMALL_GEMV_ELEMENTS", 40 * 30)
    rng = np.random.default_rng(8)
    for k, n, small in ((40, 30, True), (40, 31, False)):
        a = stack(rng, (1, k), np.float32)
        b = stack(rng, (k, n), np.float32, transposed=transposed)
        bias = rng.standard_normal(n).astype(np.float32)
        out = np.full((1, n), 7, np.float32)
        taken = blas.mkl_gemm(a, b, out, bias=bias)
        assert taken == (not small and blas.mkl() is not None)
        if not taken:
            assert (out == 7).all()  # declined: nothing written
        np.testing.assert_allclose(backend.matmul(a, b, bias=bias), a @ b + bias, rtol=1e-5,
                                   atol=1e-5)


def test_mkl_shares_the_cores_with_the_library_threads():
    # set_num_threads with MKL: its products on all the threads, from any thread; on one inside
    # one_thread_here (the caller's block of a split op) and on a thread after
    # one_thread_from_now (the pool's workers); and MKL's Intel OpenMP threads sleep as soon as
    # a product that this thread called ends (blocktime 0)
    import ctypes
    import threading

    from threadpoolctl import ThreadpoolController

    library = blas.mkl()
    if library is None:
        pytest.skip("MKL not installed here, or switched off (TINYGRAD_LLM_MKL=0)")

    def on_another_thread(first=lambda: None):
        seen = []

        def run():
            first()
            seen.append(library.MKL_Get_Max_Threads())
        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
        return seen[0]

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: MKL uses no more threads than cores")
    default, own = on_another_thread(), library.MKL_Set_Num_Threads_Local(0)
    try:
        assert blas.share_cores_with_threads(2)
        assert library.MKL_Get_Max_Threads() == 2 and on_another_thread() == 2
        with blas.one_thread_here():
            assert library.MKL_Get_Max_Threads() == 1
        assert library.MKL_Get_Max_Threads() == 2
        assert on_another_thread(blas.one_thread_from_now) == 1
        for openmp in ThreadpoolController().select(internal_api="openmp").lib_controllers:
            if openmp.prefix == "libiomp":
                assert ctypes.CDLL(openmp.filepath).kmp_get_blocktime() == 0
    finally:
        library.MKL_Set_Num_Threads(default)
        library.MKL_Set_Num_Threads_Local(own)


def test_one_row_checks_agree_with_the_general_ones():
    # the quick checks of decoding's one-row products (_one_row_layouts) must say what the
    # general ones say wherever they say anything, and decline the rest
    rng = np.random.default_rng(9)
    row = stack(rng, (1, 40), np.float32)
    weights = {"rows": stack(rng, (40, 30), np.float32),
               "transposed": stack(rng, (40, 30), np.float32, transposed=True),
               "every other column": np.empty((40, 60), np.float32)[:, ::2],
               "float64": stack(rng, (40, 30), np.float64),
               "one column": stack(rng, (40, 1), np.float32)}
    outs = {"fresh": lambda n: np.empty((1, n), np.float32),
            "every other": lambda n: np.empty((1, 2 * n), np.float32)[:, ::2],
            "read-only": lambda n: np.frombuffer(bytes(4 * n), np.float32).reshape(1, n)}
    agreed = 0
    for b_name, b in weights.items():
        for out_name, make in outs.items():
            out = make(b.shape[1])
            quick = blas._one_row_layouts(row, b, out)
            if quick is not None:
                assert quick == blas._blas_layouts(row, b, out), (b_name, out_name)
                agreed += 1
    assert agreed == 3  # rows, transposed and one column, each into a fresh output
    square = stack(rng, (40, 40), np.float32)
    assert blas._one_row_layouts(row, square, row) is None  # the output is the input


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["bias", "add", "plain"])
def test_the_compiled_gemv_call_equals_the_ctypes_call(dtype, mode, monkeypatch):
    # with numba, one-row products call MKL's gemv from compiled code (blas._compiled_gemv);
    # the same call made through ctypes is the reference
    if blas.mkl() is None or blas._compiled_gemv(blas._char(dtype)) is None:
        pytest.skip("needs MKL and numba")
    monkeypatch.setattr(blas, "SMALL_GEMV_ELEMENTS", 0)
    rng = np.random.default_rng(10)
    a = stack(rng, (1, 50), dtype)
    start = rng.standard_normal((1, 70)).astype(dtype)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    real, calls = blas._compiled_gemv, []

    def spy(dtype_char, compiled):
        calls.append(compiled)
        return real(dtype_char) if compiled else None

    for transposed in (False, True):
        b = stack(rng, (50, 70), dtype, transposed=transposed)
        bias = rng.standard_normal(70).astype(dtype) if mode == "bias" else None
        expected = a @ b + (bias if mode == "bias" else start if mode == "add" else 0)
        results = []
        calls.clear()
        for compiled in (True, False):
            monkeypatch.setattr(blas, "_compiled_gemv",
                                functools.partial(spy, compiled=compiled))
            out = start.copy()
            assert blas.mkl_gemm(a, b, out, add=mode == "add", bias=bias)
            results.append(out)
        assert calls == [True, False]  # each way really went through mkl_gemm's gemv
        np.testing.assert_allclose(results[0], results[1], rtol=tolerance, atol=tolerance)
        np.testing.assert_allclose(results[0], expected, rtol=tolerance, atol=tolerance)
