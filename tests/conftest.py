"""Shared test set-up: hypothesis profiles and the devices every op is tested on.

Profiles: ``ci`` (default, bounded), ``quick`` and ``thorough`` (many more examples), chosen with
``TINYGRAD_LLM_PROFILE=thorough python -m pytest``.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

from tinygrad_llm.backend import cuda_available

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
