"""Shared test set-up: hypothesis profiles and the devices every op is tested on.

With ``TINYGRAD_LLM_FAKE_CUDA=1`` the ``cuda`` device is the CuPy stand-in of fakecupy.py.

Profiles: ``ci`` (default, bounded), ``quick`` and ``thorough`` (many more examples), chosen with
``TINYGRAD_LLM_PROFILE=thorough python -m pytest``.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

if os.environ.get("TINYGRAD_LLM_FAKE_CUDA") == "1":
    # a strict CuPy stand-in (tests/fakecupy.py) as ``cupy``: the cuda half of every
    # device-parametrised test runs on the CPU, with CuPy's rules (no silent NumPy conversion,
    # no NumPy operands, no index wrapping) and a count of host syncs
    import fakecupy

    fakecupy.install()
    # and the CPU's products on NumPy's own BLAS even where MKL is installed: the first run
    # tests the MKL road (tinygrad_llm/blas.py), this one NumPy's
    os.environ.setdefault("TINYGRAD_LLM_MKL", "0")

from tinygrad_llm.backend import cuda_available  # noqa: E402  (after the stand-in, if any)

settings.register_profile(
    "ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow],
    derandomize=False,
)
settings.register_profile(
    "thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(  # a short look, e.g. on a GPU machine lent for minutes
    "quick", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("TINYGRAD_LLM_PROFILE", "ci"))

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not cuda_available(),
                                                  reason="needs CuPy and a CUDA GPU")),
]
