"""The GPU path, run under Numba's CUDA simulator or on a real GPU.

Every test here is on the "cuda" side: ``tests/conftest.py`` runs it in the
``NUMBA_ENABLE_CUDASIM=1`` process (CI) or, with a GPU, in the main process,
and does not collect it in a process with neither.  The fixtures live there
too (16 threads per block under the simulator, ``dev``, ``threads_per_block``).
"""
import pytest


@pytest.fixture
def threads(threads_per_block):
    """Run a test again with another block size (8 and 32)."""
    return threads_per_block
