"""Device mapping, the CuPy error message and seeded generators."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tinygrad_llm import Tensor, backend


def test_device_names():
    assert backend.normalize_device("CPU") == "cpu"
    assert backend.normalize_device("cuda:0") == "cuda"
    with pytest.raises(ValueError, match="expected 'cpu' or 'cuda'"):
        backend.normalize_device("tpu")


@pytest.mark.skipif(backend.cuda_available(), reason="checks the message shown without a GPU")
def test_cuda_without_cupy_or_gpu_says_how_to_fix_it():
    with pytest.raises(RuntimeError, match="(pip install|device='cpu')"):
        Tensor([1.0], device="cuda")


def test_manual_seed_makes_random_numbers_repeat():
    backend.manual_seed(123)
    first = Tensor.randn(5).numpy()
    backend.manual_seed(123)
    np.testing.assert_array_equal(Tensor.randn(5).numpy(), first)
    backend.manual_seed(124)
    assert not np.array_equal(Tensor.randn(5).numpy(), first)


def test_a_seed_and_step_pair_gives_its_own_repeatable_stream():
    backend.manual_seed((5, 7))
    first = Tensor.randn(4).numpy()
    backend.manual_seed((5, 7))
    np.testing.assert_array_equal(Tensor.randn(4).numpy(), first)
    backend.manual_seed((5, 8))
    assert not np.array_equal(Tensor.randn(4).numpy(), first)
    backend.manual_seed(5)
    assert not np.array_equal(Tensor.randn(4).numpy(), first)


def test_scatter_add_adds_repeated_indices():
    target = np.zeros(3)
    backend.scatter_add(target, np.array([0, 2, 2, 2]), np.array([1.0, 1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(target, [1, 0, 6])


def test_index_add_rows_matches_add_at_with_repeats():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 7, 50)
    rows = rng.standard_normal((50, 3))
    expected = np.zeros((7, 3))
    np.add.at(expected, ids, rows)
    target = np.zeros((7, 3))
    backend.index_add_rows(target, ids, rows)
    np.testing.assert_allclose(target, expected, rtol=1e-12)


def test_importing_the_library_leaves_the_allocator_alone():
    """No import-time side effects: only an explicit tune_cpu_allocator() calls into libc."""
    code = (
        "import ctypes, numpy\n"
        "calls = []\n"
        "load = ctypes.CDLL\n"
        "ctypes.CDLL = lambda name, *a, **k: calls.append(name) or load(name, *a, **k)\n"
        "import tinygrad_llm, tinygrad_llm.models.gpt, tinygrad_llm.optim\n"
        "assert not [c for c in calls if 'libc.so' in str(c)], calls\n"
        "tinygrad_llm.backend.tune_cpu_allocator()\n"
        "import sys; assert sys.platform != 'linux' or 'libc.so.6' in calls, calls\n"
    )
    env = {**os.environ, "TINYGRAD_LLM_TUNE_MALLOC": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_tune_cpu_allocator_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("TINYGRAD_LLM_TUNE_MALLOC", "0")
    assert backend.tune_cpu_allocator() is False
