"""The GPU path, run under Numba's CUDA simulator or on a real GPU.

CI runs this folder in its own process with ``NUMBA_ENABLE_CUDASIM=1`` (the
variable must be set before numba is imported); on a machine with a GPU the
same tests run for real.  In a process with neither, the folder is skipped.
Under the simulator each block runs as Python threads: shapes stay tiny and
blocks have 16 threads (the ``threads`` fixture tries 8 and 32 too).
"""
import os
import sys

import numpy as np
import pytest

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _gpu_or_simulator():
    try:
        from numba import cuda
    except ImportError:
        return False
    return bool(cuda.is_available())


if not _gpu_or_simulator():
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(autouse=True, scope="session")
def _quick_thread_switches():
    """The simulator runs a block as Python threads that a polling loop
    barriers: switching threads every 0.5 ms instead of 5 ms makes its
    barriers several times cheaper."""
    saved = sys.getswitchinterval()
    if SIMULATOR:
        sys.setswitchinterval(5e-4)
    yield
    sys.setswitchinterval(saved)


@pytest.fixture(autouse=True)
def _threads_per_block():
    """16 threads per block under the simulator (the default 256 on a GPU)."""
    from fastloss.cuda import _blocks
    saved = _blocks.threads_per_block()
    if SIMULATOR:
        _blocks.set_threads_per_block(16)
    yield
    _blocks.set_threads_per_block(*saved)


@pytest.fixture(params=[8, 32])
def threads(request):
    """Run a test again with another block size."""
    from fastloss.cuda import _blocks
    _blocks.set_threads_per_block(request.param)
    return request.param


@pytest.fixture
def dev():
    """Host <-> device helpers: ``dev.put(a)`` and ``dev.get(d)``."""
    from numba import cuda

    class Helpers:
        @staticmethod
        def put(a):
            return None if a is None else cuda.to_device(np.ascontiguousarray(a))

        @staticmethod
        def get(d):
            return None if d is None else d.copy_to_host()

    return Helpers
