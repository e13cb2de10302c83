"""Starting the parallel kernels safely inside other people's programs.

Every CPU loss picks its parallel or its serial kernel through ``launch``.
Numba's three threading layers fail in different ways (Numba's documentation,
"The Threading Layers"; seen here in the tests of ``tests/test_threads.py``):

* ``workqueue`` aborts the whole process when two Python threads run parallel
  kernels at the same time: ``launch`` serialises parallel kernels with a lock
  unless the layer in use is known to be thread-safe (``tbb``, ``omp``).
  Before the first parallel kernel the layer is unknown, so that one is
  serialised too.
* GNU OpenMP (``omp``) kills a child process forked after the parent ran a
  parallel region ("fork() called from a process already using GNU OpenMP"),
  and the Cython center update uses the same libgomp: such a child runs every
  kernel serially, with the same results.
* ``tbb`` survives both, but pip's ``tbb`` wheel (the ``fastloss[tbb]`` extra)
  puts ``libtbb.so.12`` in ``<venv>/lib``, where the dynamic loader does not
  look, so Numba silently skips it.  ``preload_tbb`` loads it by path first.

``NUMBA_THREADING_LAYER`` still chooses the layer, as Numba documents.
"""
import ctypes
import os
import sys
import threading

import numba

THREAD_SAFE_LAYERS = frozenset({"tbb", "omp"})

_launch_lock = threading.Lock()
_layer = None            # Numba's threading layer, once a parallel kernel has run
_layer_is_gnu_openmp = False
_tbb_tried = False
_gnu_openmp_used = False  # this process ran a GNU OpenMP parallel region
_serial_only = False      # forked from a process that had: threads would kill this one


def threading_layer():
    """Numba's threading layer in use (``"tbb"``, ``"omp"`` or ``"workqueue"``),
    or None before this process has run a parallel kernel."""
    global _layer, _layer_is_gnu_openmp
    if _layer is None:
        try:
            _layer = numba.threading_layer()
        except ValueError:  # no parallel kernel has run yet
            return None
        if _layer == "omp":
            from numba.np.ufunc import omppool
            _layer_is_gnu_openmp = getattr(omppool, "openmp_vendor", "GNU") == "GNU"
    return _layer


def threads_allowed():
    """False in a child forked from a process that used GNU OpenMP: there,
    starting OpenMP threads would kill (or hang) the child."""
    return not _serial_only


def launch(parallel, serial, threaded, *args):
    """``parallel(*args)`` when ``threaded`` and this process may start threads,
    else ``serial(*args)``; parallel kernels run one at a time unless the
    threading layer is known to be thread-safe."""
    if not threaded or _serial_only:
        return serial(*args)
    layer = threading_layer()
    if layer in THREAD_SAFE_LAYERS:
        result = parallel(*args)
    else:
        if layer is None:
            preload_tbb()
        with _launch_lock:
            result = parallel(*args)
        layer = threading_layer()
    if _layer_is_gnu_openmp:
        note_gnu_openmp()
    return result


def note_gnu_openmp():
    """Record that this process ran a libgomp parallel region (Numba's ``omp``
    layer is libgomp on Linux; so is the Cython center update)."""
    global _gnu_openmp_used
    _gnu_openmp_used = True


def preload_tbb():
    """Load pip's ``libtbb.so.12`` from ``<prefix>/lib`` by path, once, so that
    Numba's TBB layer (linked against that name) can start.  Returns whether a
    library was loaded; does nothing when ``NUMBA_THREADING_LAYER`` excludes TBB."""
    global _tbb_tried
    if _tbb_tried or not sys.platform.startswith("linux"):
        return False
    _tbb_tried = True
    if str(numba.config.THREADING_LAYER) in ("omp", "workqueue"):
        return False
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        path = os.path.join(prefix, "lib", "libtbb.so.12")
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return True
            except OSError:
                return False
    return False


def _after_fork_in_child():
    global _launch_lock, _serial_only
    _launch_lock = threading.Lock()  # the parent may have held it while forking
    _serial_only = _serial_only or _gnu_openmp_used


os.register_at_fork(after_in_child=_after_fork_in_child)
