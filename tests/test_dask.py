"""Every loss on Dask arrays, on a real ``distributed.LocalCluster`` of worker processes.

Each loss and option set of the registry, every reduction, against the in-memory call on
the same rows (``batch_triplet_loss``: on each chunk's rows, a chunk being a batch); the
center update against the in-memory update; the layout and mixing errors; laziness.

These tests run NumPy chunks on the CPU kernels: they are on the "cpu" side (no marker),
so the ``NUMBA_ENABLE_CUDASIM=1`` process of CI deselects them rather than run them twice.
One test, marked ``cuda``, runs CuPy chunks on a real GPU (Dask cannot chunk the
simulator's device arrays: there it skips).  One cluster serves the module (2 workers x 1
thread); the in-memory call runs first, so the workers load its kernels from Numba's disk
cache instead of compiling them.
"""
import inspect
import subprocess
import sys

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")

import fastloss as fl  # noqa: E402
import naive  # noqa: E402
from fastloss import _dask  # noqa: E402
from fastloss.tools.registry import LOSSES  # noqa: E402

ROWS_PER_CHUNK = 4
TIMEOUT_S = 120  # a compute on the cluster that takes longer has hung


@pytest.fixture(scope="module")
def client():
    """A client of a local cluster of 2 worker processes, 1 thread each, small memory."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  memory_limit="384MiB", dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        yield client


def on_dask(a, rows):
    """``a`` as a Dask array of ``rows`` rows per chunk (the other axes whole)."""
    return da.from_array(a, chunks=(rows,) + a.shape[1:])


def computed(client, *collections):
    """The collections computed on the cluster (past ``TIMEOUT_S``, the test fails: a hang)."""
    return [future.result(timeout=TIMEOUT_S) for future in client.compute(list(collections))]


CASES = [pytest.param(info, option, id=f"{info.short}-{option.label}")
         for info in LOSSES if info.name in _dask.ENTRIES for option in info.options]


def _dask_call(info, args, kwargs):
    """The per-row inputs, positional or keyword, as Dask arrays chunked along the rows: the
    first by ``ROWS_PER_CHUNK`` (both batch axes of 3-D logits), the others by 3 rows (they
    are rechunked to the first's)."""
    entry = _dask.ENTRIES[info.name]
    positional = list(inspect.signature(info.function).parameters)[:len(args)]
    first = args[0]
    chunks = (2, 3, first.shape[2]) if first.ndim == 3 else (ROWS_PER_CHUNK,) + first.shape[1:]
    dargs = [da.from_array(first, chunks=chunks)]
    dargs += [on_dask(a, 3) if name in entry.rows else a for name, a in zip(positional[1:], args[1:])]
    dkw = {k: on_dask(v, 3) if k in entry.rows else v for k, v in kwargs.items()}
    return dargs, dkw


def _assert_same(got, want, dtype, what):
    if isinstance(want, tuple):
        for k, (g, w) in enumerate(zip(got, want)):
            naive.assert_close(g, w, dtype, what=f"{what}[{k}]")
    else:
        naive.assert_close(got, want, dtype, what=what)


@pytest.mark.parametrize("info, option", CASES)
def test_every_loss_and_reduction_equals_the_in_memory_call(client, info, option):
    if "_dask" not in inspect.getsource(info.function):
        pytest.skip(f"{info.name} does not hand Dask arrays to fastloss._dask yet")
    rng = np.random.default_rng(0)
    dtype = np.float32
    args, kwargs = info.case(rng, dtype, option)
    if info.name == "batch_triplet_loss":
        args = info.make_inputs(rng, np.dtype(dtype), shape=(16, 3), classes=2)
    lazy, want = {}, {}
    for reduction in ("mean", "sum", "none"):
        memory_args = [np.array(a, copy=True) for a in args]
        if info.name == "batch_triplet_loss":  # a chunk is a batch
            parts = [info.function(*[a[k:k + ROWS_PER_CHUNK] for a in memory_args], reduction=reduction,
                                   **kwargs) for k in range(0, len(args[0]), ROWS_PER_CHUNK)]
            losses = [np.asarray(p.loss, np.float64) for p in parts]
            n = len(parts)
            loss = (np.concatenate(losses) if reduction == "none"
                    else np.sum(losses) / (n if reduction == "mean" else 1))
            grad = np.concatenate([p.grad for p in parts]) / (n if reduction == "mean" else 1)
            want[reduction] = (loss, grad, None)
        else:
            res = info.function(*memory_args, reduction=reduction, **kwargs)
            want[reduction] = (res.loss, res.grad, memory_args[info.updates] if info.updates else None)
        dargs, dkw = _dask_call(info, [np.array(a, copy=True) for a in args], kwargs)
        res = info.function(*dargs, reduction=reduction, **dkw)
        assert isinstance(res.loss, da.Array)
        rows_grads = res.grad[:_dask.ENTRIES[info.name].n_grad] if isinstance(res.grad, tuple) else (res.grad,)
        assert all(g.chunks == dargs[0].chunks for g in rows_grads)  # the first input's chunks
        lazy[reduction] = (res, dargs[info.updates] if info.updates else None)
    results = computed(client, *[(r.loss, r.grad) for r, _ in lazy.values()])
    for (reduction, (_, centers)), (loss, grad) in zip(lazy.items(), results):
        want_loss, want_grad, want_centers = want[reduction]
        naive.assert_close(loss, want_loss, dtype, what=f"{reduction} loss")
        assert np.asarray(loss).dtype == np.dtype(dtype)
        _assert_same(grad, want_grad, dtype, f"{reduction} grad")
        if want_centers is not None:  # updated in place before the call returned
            naive.assert_close(centers, want_centers, dtype, what=f"{reduction} centers")


def test_center_update_equals_the_in_memory_update_and_repeats_its_bits(client):
    rng = np.random.default_rng(1)
    features = rng.standard_normal((40, 3)).astype(np.float32)
    labels = rng.integers(0, 5, 40)
    labels[labels == 2] = 3  # class 2 absent: its center must not move
    start = rng.standard_normal((5, 3)).astype(np.float32)
    want = fl.center_update(start.copy(), features, labels, alpha=0.3)
    runs = []
    for _ in range(2):
        centers = start.copy()
        returned = fl.center_update(centers, on_dask(features, 7), on_dask(labels, 9), alpha=0.3)
        assert returned is centers
        runs.append(centers)
    naive.assert_close(runs[0], want, np.float32, what="centers")
    np.testing.assert_array_equal(runs[0][2], start[2])
    np.testing.assert_array_equal(runs[0], runs[1])  # a fixed merge tree: the same bits


def test_center_loss_with_a_bad_label_raises_before_returning_and_changes_nothing(client):
    features = on_dask(np.ones((10, 2), np.float32), 4)
    labels = np.zeros(10, np.int64)
    labels[7] = 9
    centers = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match="labels"):
        fl.center_loss(features, on_dask(labels, 4), centers)
    assert not centers.any()


def test_huber_weights_of_the_feature_axis_with_chunks_along_every_axis(client):
    # an elementwise loss may be chunked along any axis; (D,) weights broadcast over the rows
    rng = np.random.default_rng(2)
    x, t = rng.standard_normal((2, 9, 6))
    w = rng.uniform(0.0, 2.0, 6)
    want = fl.huber_loss(x, t, sample_weight=w, delta=0.5)
    res = fl.huber_loss(da.from_array(x, chunks=(4, 2)), da.from_array(t, chunks=(3, 3)),
                        sample_weight=da.from_array(w, chunks=4), delta=0.5)
    loss, grad = computed(client, res.loss, res.grad)
    naive.assert_close(loss, want.loss, np.float64, what="loss")
    naive.assert_close(grad, want.grad, np.float64, what="grad")


def test_a_mean_over_no_weight_is_nan_with_a_zero_gradient_and_grad_false_gives_none(client):
    x = on_dask(np.ones((6, 3)), 4)
    res = fl.softmax_cross_entropy(x, on_dask(np.full(6, -100), 4))
    loss, grad = computed(client, res.loss, res.grad)
    assert np.isnan(loss) and not grad.any()
    res = fl.softmax_cross_entropy(x, on_dask(np.zeros(6, np.int64), 4), grad=False)
    assert res.grad is None
    assert np.isclose(computed(client, res.loss)[0], np.log(3))


X = np.zeros((6, 4), np.float32)
Y = np.zeros(6, np.int64)

BAD_CALLS = {
    "NumPy labels beside Dask logits": (
        lambda: fl.softmax_cross_entropy(on_dask(X, 3), Y), TypeError, "target is a numpy.ndarray"),
    "Dask labels beside NumPy logits": (
        lambda: fl.focal_loss(X, on_dask(Y, 3)), TypeError, "logits is a numpy.ndarray"),
    "NumPy sample weights beside Dask logits": (
        lambda: fl.softmax_cross_entropy(on_dask(X, 3), on_dask(Y, 3), sample_weight=np.ones(6)),
        TypeError, "sample_weight is a numpy.ndarray"),
    "a Dask class weight": (
        lambda: fl.softmax_cross_entropy(on_dask(X, 3), on_dask(Y, 3), weight=da.ones(4)),
        TypeError, "weight must be an in-memory array"),
    "Dask centers": (
        lambda: fl.center_loss(on_dask(X, 3), on_dask(Y, 3), da.zeros((2, 4))),
        TypeError, "centers must be an in-memory array"),
    "logits chunked across the classes": (
        lambda: fl.softmax_cross_entropy(da.from_array(X, chunks=(3, 2)), on_dask(Y, 3)),
        ValueError, r"logits is split into 2 chunks along axis 1.*rechunk"),
    "features chunked across the features": (
        lambda: fl.center_update(np.zeros((2, 4)), da.from_array(X, chunks=(3, 2)), on_dask(Y, 3)),
        ValueError, "features is split"),
    "grad_out": (
        lambda: fl.huber_loss(on_dask(X, 3), on_dask(X, 3), grad_out=np.zeros_like(X)),
        TypeError, "grad_out is not supported"),
    "a bad option": (
        lambda: fl.softmax_cross_entropy(on_dask(X, 3), on_dask(Y, 3), label_smoothing=2.0),
        ValueError, "label_smoothing"),
    "labels of another row count": (
        lambda: fl.batch_triplet_loss(on_dask(X, 3), on_dask(np.zeros(5, np.int64), 3)),
        ValueError, "labels has 5 rows but embeddings has 6"),
    "targets of another width": (
        lambda: fl.sigmoid_focal_loss(on_dask(X, 3), on_dask(np.zeros((6, 3), np.float32), 3)),
        ValueError, "targets"),
}


@pytest.mark.parametrize("case", BAD_CALLS.values(), ids=BAD_CALLS)
def test_bad_layouts_and_mixed_inputs_raise_at_once_naming_the_argument(case):
    call, error, match = case
    with pytest.raises(error, match=match):
        call()


def test_a_float16_chunk_sums_its_losses_in_float64_and_ignored_rows_leave_the_mean(client):
    """A float16 chunk whose loss sum passes 65504 (in memory the mean is 20); a NaN sample
    weight on an ignored row stays out of the denominator, as in memory."""
    x = np.tile(np.array([[10.0, -10.0]], np.float16), (8000, 1))
    y = np.ones(8000, np.int64)
    res = fl.softmax_cross_entropy(da.from_array(x, chunks=(8000, 2)), da.from_array(y, chunks=8000))
    assert computed(client, res.loss)[0] == float(fl.softmax_cross_entropy(x, y).loss)
    t, sw = np.array([0, 1, -100, 2]), np.array([1.0, 1.0, np.nan, 1.0])
    lg = np.zeros((4, 3))
    res = fl.softmax_cross_entropy(da.from_array(lg, chunks=(2, 3)), da.from_array(t, chunks=2),
                                   sample_weight=da.from_array(sw, chunks=2))
    np.testing.assert_allclose(computed(client, res.loss)[0], np.log(3))


def test_importing_fastloss_or_a_numpy_call_loads_no_dask():
    code = ("import sys, numpy as np, fastloss as fl\n"
            "fl.huber_loss(np.zeros(3), np.ones(3))\n"
            "sys.exit(', '.join(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')) or None)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.cuda
def test_cupy_chunks_run_the_cuda_kernels_and_come_back_as_cupy():
    # a real GPU with CuPy only: Dask cannot chunk the simulator's device arrays
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(6)
    x = rng.standard_normal((10, 5)).astype(np.float32)
    y = rng.integers(0, 5, 10)
    y[:2] = -100
    w = rng.uniform(0.5, 2.0, 5).astype(np.float32)
    want = fl.softmax_cross_entropy(x, y, weight=w)
    res = fl.softmax_cross_entropy(da.from_array(cp.asarray(x), chunks=(4, 5), asarray=False),
                                   da.from_array(cp.asarray(y), chunks=4, asarray=False),
                                   weight=cp.asarray(w))
    loss, grad = dask.compute(res.loss, res.grad, scheduler="threads")
    assert isinstance(loss, cp.ndarray) and isinstance(grad, cp.ndarray)
    naive.assert_close(loss.get(), want.loss, np.float32, what="loss")
    naive.assert_close(grad.get(), want.grad, np.float32, what="grad")
