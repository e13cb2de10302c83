"""fastloss inside other people's programs: thread pools and forking data loaders.

Each threading layer runs ``threads_probe.py`` in a fresh interpreter
(``NUMBA_THREADING_LAYER`` is read once, at the first parallel kernel):
8 threads x 50 concurrent calls of every loss give the serial calls' bits, and a
child forked after the parent ran every kernel computes the parent's results.
Two control runs switch fastloss's guards off and show the process dying, so
these tests would fail without them.
"""
import importlib.metadata
import os
import subprocess
import sys
import threading

import pytest

from fastloss.cpu import _threads

PROBE = os.path.join(os.path.dirname(__file__), "threads_probe.py")
LAYERS = ("workqueue", "omp", "tbb")


def _tbb_installed():
    try:
        importlib.metadata.version("tbb")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _probe(layer, mode, timeout=240):
    env = dict(os.environ, NUMBA_THREADING_LAYER=layer)
    return subprocess.run([sys.executable, PROBE, mode], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _layer_param(layer):
    marks = [pytest.mark.skipif(not _tbb_installed(), reason="the tbb wheel (fastloss[tbb]) is not installed")] \
        if layer == "tbb" else []
    return pytest.param(layer, marks=marks)


@pytest.mark.parametrize("layer", [_layer_param(la) for la in LAYERS])
@pytest.mark.parametrize("mode", ["threads", "fork"])
def test_every_layer_survives_threads_and_fork(layer, mode):
    run = _probe(layer, mode)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"layer={layer} ok" in run.stdout


def test_without_the_launch_lock_workqueue_aborts_the_process():
    run = _probe("workqueue", "threads-unlocked")
    assert run.returncode != 0
    assert "Concurrent access has been detected" in run.stderr


def test_without_the_fork_guard_gnu_openmp_kills_the_child():
    run = _probe("omp", "fork-unguarded")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "exitcode=-15" in run.stdout or "exitcode=hung" in run.stdout, run.stdout


@pytest.mark.skipif(not _tbb_installed(), reason="the tbb wheel (fastloss[tbb]) is not installed")
def test_the_tbb_extra_loads_by_default():
    """pip's tbb wheel puts libtbb.so.12 in <venv>/lib, off the loader's path;
    fastloss preloads it, so Numba's default choice lands on TBB."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    code = ("import numpy as np, fastloss as fl; from fastloss.cpu import _threads; "
            "fl.huber_loss(np.ones(1 << 16, np.float32), np.zeros(1 << 16, np.float32)); "
            "print(_threads.threading_layer())")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == "tbb"


def test_concurrent_calls_in_this_process_match_serial_calls(monkeypatch):
    """The layer this test session uses (whatever Numba chose), in-process."""
    from fastloss.cpu import batch_mining
    monkeypatch.setattr(batch_mining, "BATCH_PARALLEL_MIN_WORK", 0)
    sys.path.insert(0, os.path.dirname(__file__))
    try:
        import threads_probe
    finally:
        sys.path.pop(0)
    threads_probe.threads_mode()  # exits with a message on any difference
    assert _threads.threading_layer() in LAYERS


def test_launch_takes_the_lock_unless_the_layer_is_thread_safe(monkeypatch):
    held = []

    def parallel(x):
        held.append(_threads._launch_lock.locked())
        return x

    for layer, locked in [("workqueue", True), ("tbb", False), ("omp", False)]:
        monkeypatch.setattr(_threads, "_layer", layer)
        held.clear()
        assert _threads.launch(parallel, None, True, 5) == 5
        assert held == [locked]


def test_launch_takes_the_serial_kernel_for_small_work_and_in_a_forked_child(monkeypatch):
    calls = []
    parallel = lambda x: calls.append("parallel")  # noqa: E731
    serial = lambda x: calls.append("serial")  # noqa: E731
    _threads.launch(parallel, serial, False, 0)
    monkeypatch.setattr(_threads, "_serial_only", True)
    _threads.launch(parallel, serial, True, 0)
    assert calls == ["serial", "serial"]


def test_the_launch_lock_is_fresh_in_a_forked_child(monkeypatch):
    """A fork while another thread holds the lock must not deadlock the child."""
    monkeypatch.setattr(_threads, "_launch_lock", threading.Lock())
    monkeypatch.setattr(_threads, "_serial_only", False)
    monkeypatch.setattr(_threads, "_gnu_openmp_used", False)
    with _threads._launch_lock:
        _threads._after_fork_in_child()  # what os.register_at_fork runs in the child
    assert not _threads._launch_lock.locked()
    assert _threads.threads_allowed()
    monkeypatch.setattr(_threads, "_gnu_openmp_used", True)
    _threads._after_fork_in_child()
    assert not _threads.threads_allowed()


def test_preload_tbb_respects_a_layer_that_excludes_it(monkeypatch):
    import numba
    monkeypatch.setattr(_threads, "_tbb_tried", False)
    monkeypatch.setattr(numba.config, "THREADING_LAYER", "workqueue")
    assert _threads.preload_tbb() is False
    assert _threads._tbb_tried
