"""Shared fixtures for the fastloss test suite.

The references live in ``naive.py`` next to this file (pytest puts this folder on
``sys.path``, so the tests ``import naive``).
"""
import os
import zlib

import numpy as np
import pytest

try:
    from hypothesis import HealthCheck, settings

    # First calls JIT-compile kernels: no deadline, and a modest number of examples.
    settings.register_profile(
        "fastloss",
        max_examples=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fastloss"))
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's id, so every test is reproducible."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)
