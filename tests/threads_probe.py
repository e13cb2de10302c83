"""Run by tests/test_threads.py in a fresh interpreter, one per threading layer.

    NUMBA_THREADING_LAYER=<layer> python tests/threads_probe.py <mode>

Every case calls a public loss on inputs large enough for its parallel kernel
(batch mining's threshold is lowered for that), so the probe exercises what a
thread pool or a forking data loader would.  Modes:

* ``threads``: 8 Python threads x 50 calls of every case, interleaved; each
  result must equal, bit for bit, the same call made serially first.
* ``threads-unlocked``: the same with fastloss's launch lock switched off, to
  show what the lock prevents (``workqueue`` aborts the process).
* ``fork``: after the parent has run every case, a ``fork``-started pool runs
  them all again in its children; the children's results must equal the
  parent's (a child may use the serial kernels: same losses, same reduction
  order within a row, so the comparison is to float tolerance).
* ``fork-unguarded``: the same child, with fastloss's fork guard switched off,
  to show what the guard prevents; prints the child's exit code (or ``hung``).

Prints ``layer=<layer actually used> ok`` (or the exit code) on success.
"""
import multiprocessing
import sys
import threading

import numpy as np

import fastloss as fl
from fastloss.cpu import _threads
from fastloss.cpu import batch_mining

THREADS = 8
CALLS = 50
UNGUARDED_WAIT_S = 15  # a child that runs every case takes well under a second


def _inputs():
    rng = np.random.default_rng(0)
    f32 = np.float32
    logits = rng.normal(size=(64, 512)).astype(f32)          # 32768 values: the parallel kernels
    labels = rng.integers(0, 512, 64)
    feats = rng.normal(size=(256, 128)).astype(f32)
    classes = rng.integers(0, 16, 256)
    return {
        "logits": logits, "labels": labels,
        "targets": (rng.random(logits.shape) < 0.05).astype(f32),
        "pred": rng.normal(size=32768).astype(f32), "truth": rng.normal(size=32768).astype(f32),
        "a": feats, "p": rng.normal(size=feats.shape).astype(f32), "n": rng.normal(size=feats.shape).astype(f32),
        "classes": classes, "centers": rng.normal(size=(16, 128)).astype(f32),
    }


def cases(d):
    """name -> zero-argument call returning a tuple of arrays (the outputs)."""
    def center_update():
        return (fl.center_update(d["centers"].copy(), d["a"], d["classes"]),)

    return {
        "softmax_cross_entropy": lambda: fl.softmax_cross_entropy(d["logits"], d["labels"], label_smoothing=0.1),
        "focal_loss": lambda: fl.focal_loss(d["logits"], d["labels"], gamma=2.0),
        "sigmoid_focal_loss": lambda: fl.sigmoid_focal_loss(d["logits"], d["targets"]),
        "huber_loss": lambda: fl.huber_loss(d["pred"], d["truth"]),
        "triplet_margin_loss": lambda: (lambda r: (r.loss, *r.grad))(
            fl.triplet_margin_loss(d["a"], d["p"], d["n"], swap=True)),
        "batch_triplet_loss": lambda: fl.batch_triplet_loss(d["a"], d["classes"], mining="semihard"),
        "center_loss": lambda: fl.center_loss(d["a"], d["classes"], d["centers"], update=False),
        "center_update": center_update,
    }


def run_all():
    return {name: tuple(np.asarray(a).copy() for a in call()) for name, call in cases(_inputs()).items()}


def _same_bits(a, b):
    return all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes() for x, y in zip(a, b))


def _close(a, b):
    return all(np.allclose(x, y, rtol=1e-5, atol=1e-6, equal_nan=True) for x, y in zip(a, b))


def threads_mode():
    calls = cases(_inputs())
    expected = {name: tuple(np.asarray(a).copy() for a in call()) for name, call in calls.items()}
    names = list(calls)
    failures = []

    def worker(k):
        for i in range(CALLS):
            name = names[(i + k) % len(names)]
            got = tuple(np.asarray(a) for a in calls[name]())
            if not _same_bits(got, expected[name]):
                failures.append((k, i, name))

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if failures:
        sys.exit(f"results differ from serial calls: {failures[:5]}")


def threads_unlocked_mode():
    _threads.THREAD_SAFE_LAYERS = frozenset({"tbb", "omp", "workqueue"})
    threads_mode()


def _child_results(_):
    return run_all()


def fork_mode():
    parent = run_all()
    with multiprocessing.get_context("fork").Pool(2) as pool:
        children = pool.map(_child_results, range(2))
    for child in children:
        bad = [name for name in parent if not _close(child[name], parent[name])]
        if bad:
            sys.exit(f"a forked child computed different results for {bad}")


def _unguarded_child():
    _threads._serial_only = False
    run_all()


def fork_unguarded_mode():
    run_all()
    child = multiprocessing.get_context("fork").Process(target=_unguarded_child)
    child.start()
    child.join(UNGUARDED_WAIT_S)
    if child.exitcode is None:  # hung (libgomp's pool in a forked child)
        child.kill()
        child.join()
        print("exitcode=hung")
    else:
        print(f"exitcode={child.exitcode}")


if __name__ == "__main__":
    batch_mining.BATCH_PARALLEL_MIN_WORK = 0  # batch mining's parallel kernels at a test's size
    mode = sys.argv[1]
    {"threads": threads_mode, "threads-unlocked": threads_unlocked_mode, "fork": fork_mode, "fork-unguarded": fork_unguarded_mode}[mode]()
    print(f"layer={_threads.threading_layer()} ok")
