"""Shared fixtures for the fastloss test suite, and the two sides it runs on.

The references live in ``naive.py`` next to this file (pytest puts this folder on
``sys.path``, so the tests ``import naive``).

Every test belongs to one side, "cpu" or "cuda":

* a test that takes the ``backend`` fixture runs once per side (``backend`` is
  ``"cpu"`` or ``"cuda"``; ``dev`` moves arrays to that side and back); a test
  whose own matrix names ``backend`` (a matrix per side) marks each entry with
  its side (``pytest.param(..., marks=pytest.mark.cuda)``);
* a test marked ``cuda`` (interop, threads per block, the device's own errors),
  and every test in ``tests/cuda/``, is on the "cuda" side only;
* every other test (marked ``cpu`` where a file holds both sides: thread
  counts, fork, the Cython update) is on the "cpu" side.

A process runs the sides it serves and deselects the others: the main process
(``python -m pytest``) serves "cpu", and "cuda" too where a GPU is present; a
process with ``NUMBA_ENABLE_CUDASIM=1`` (set before numba is imported, hence its
own process) serves "cuda" alone, under Numba's CUDA simulator, with tiny shapes
and 16 threads per block, so that CI does not run the CPU side twice.  Without a
GPU and without the simulator the "cuda" side is not run (and ``tests/cuda/``
is not collected).
"""
import functools
import os
import sys
import threading
import traceback
import zlib
from pathlib import Path

import numpy as np
import pytest

try:
    from hypothesis import HealthCheck, settings

    # First calls JIT-compile kernels: no deadline, and a modest number of examples.
    # "fastloss" (the default, CI's) draws the same examples on every run, so that a
    # run's result depends on the code alone; "explore" draws new ones each run
    # (HYPOTHESIS_PROFILE=explore python -m pytest ...) to look for new failures.
    quiet = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile("fastloss", max_examples=30, deadline=None, derandomize=True,
                              suppress_health_check=quiet)
    settings.register_profile("explore", max_examples=30, deadline=None,
                              suppress_health_check=quiet)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fastloss"))
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
SIDES = ("cpu", "cuda")
CUDA_FOLDER = Path(__file__).resolve().parent / "cuda"
SIMULATOR_THREADS = 16  # threads per block under the simulator (a block runs as Python threads)


def _serialize_simulator_shared_arrays():
    """Work around a race in numba-cuda's simulator: a block's ``cuda.shared.array`` is made
    at the first call on its line by a check-then-set that is not atomic, so two threads of
    one block racing there can each get an array of their own, and the block's reduction then
    mixes two buffers (an intermittent wrong answer or index error, more likely under load
    and with the short switch interval below).  The same lookup, keyed as numba-cuda keys it
    (the caller's file and line), under a lock."""
    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    original = kernelapi.FakeCUDAShared.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if alignment is not None or shape == 0:  # refused, or dynamic: no per-line lookup
            return original(self, shape, dtype, alignment)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = tuple(traceback.extract_stack(sys._getframe(1), limit=1)[0])[0:2]
        with lock:
            found = self._allocations.get(caller)
            if found is None:
                found = self._allocations[caller] = np.empty(shape, dtype)
        return found

    kernelapi.FakeCUDAShared.array = array


if SIMULATOR:
    _serialize_simulator_shared_arrays()


@functools.cache
def _cuda_usable():
    """A GPU, or the simulator: whether the "cuda" side can run in this process."""
    try:
        from numba import cuda
    except ImportError:
        return False
    return bool(cuda.is_available())


def _served_sides(cuda_tests=True):
    """The sides this process runs (see the module docstring); whether "cuda" is
    one is only asked when there are ``cuda_tests``."""
    cuda = ("cuda",) if cuda_tests and _cuda_usable() else ()
    return cuda if SIMULATOR else ("cpu",) + cuda


def _marked_side(node):
    """The side a test is confined to by its marker or its folder; None when it has none."""
    marked = [s for s in SIDES if node.get_closest_marker(s) is not None]
    if len(marked) > 1:
        raise pytest.UsageError(f"{node.nodeid}: marked both cpu and cuda")
    if marked:
        return marked[0]
    if CUDA_FOLDER in Path(str(node.path)).resolve().parents:
        return "cuda"
    return None


def side_of(item):
    """The side of a collected test: its marker (the test's, or its parameters': the
    ``backend`` fixture marks each of its runs) or folder, else "cpu"."""
    return _marked_side(item) or "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu: a test of the CPU side only (the main process)")
    config.addinivalue_line("markers", "cuda: a test of the CUDA side only (a GPU, or the "
                                       "NUMBA_ENABLE_CUDASIM=1 process)")
    config.addinivalue_line("markers", "gate: times the benchmark for real, tens of seconds "
                                       "(the regression gate on this machine; CI runs them)")


def pytest_ignore_collect(collection_path, config):
    """``tests/cuda/`` is not collected where the "cuda" side cannot run."""
    if collection_path.name.startswith("test_") and CUDA_FOLDER in collection_path.parents:
        return None if "cuda" in _served_sides() else True
    return None


def _parametrized(metafunc, name):
    """Whether the test's own ``parametrize`` marks set ``name`` (a matrix of its own per side)."""
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs["argnames"]
        if name in ([n.strip() for n in names.split(",")] if isinstance(names, str) else names):
            return True
    return False


def pytest_generate_tests(metafunc):
    """``backend``: both sides (or the marked one), unless the test's matrix names the sides."""
    if "backend" in metafunc.fixturenames and not _parametrized(metafunc, "backend"):
        only = _marked_side(metafunc.definition)
        sides = (only,) if only else SIDES
        metafunc.parametrize("backend", [pytest.param(s, marks=getattr(pytest.mark, s))
                                         for s in sides], indirect=True)


def pytest_collection_modifyitems(config, items):
    sides = {item: side_of(item) for item in items}
    served = _served_sides(cuda_tests="cuda" in sides.values())
    keep = [item for item in items if sides[item] in served]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if sides[item] not in served])
        items[:] = keep


@pytest.fixture
def backend(request):
    """``"cpu"`` or ``"cuda"``: the side this run of the test is on (pass it as ``backend=``)."""
    return request.param


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
def _threads_per_block(request):
    """On the "cuda" side: 16 threads per block under the simulator (the default 256
    on a GPU), and whatever a test sets restored after it."""
    if side_of(request.node) != "cuda":
        yield
        return
    from fastloss.cuda import _blocks
    saved = _blocks.threads_per_block()
    if SIMULATOR:
        _blocks.set_threads_per_block(SIMULATOR_THREADS)
    yield
    _blocks.set_threads_per_block(*saved)


@pytest.fixture(params=[8, 32])
def threads_per_block(request):
    """Run a "cuda" test again at another block size (against the usual one)."""
    from fastloss.cuda import _blocks
    _blocks.set_threads_per_block(request.param)
    return request.param


class _Host:
    """Arrays of the "cpu" side: NumPy, copied in (as a device copy would be)."""

    @staticmethod
    def put(a):
        return None if a is None else np.array(a, copy=True)

    @staticmethod
    def get(a):
        return None if a is None else np.asarray(a)


class _Device:
    """Arrays of the "cuda" side: Numba device arrays."""

    @staticmethod
    def put(a):
        from numba import cuda
        return None if a is None else cuda.to_device(np.ascontiguousarray(a))

    @staticmethod
    def get(d):
        if d is None:
            return None
        return d.copy_to_host() if hasattr(d, "copy_to_host") else np.asarray(d)


@pytest.fixture
def dev(request):
    """Host <-> the test's side: ``dev.put(a)`` (a copy on that side) and ``dev.get(d)`` (NumPy)."""
    return _Device if side_of(request.node) == "cuda" else _Host


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's id, so every test is reproducible."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)
