"""fastloss.huber_loss (torch.nn.functional.huber_loss) against naive.py, on both sides.

A test that takes ``backend`` runs on the CPU and on the GPU path (``dev`` moves its
arrays to that side and back); on the "cuda" side it also checks the CPU path's answer.
A test marked ``cpu`` or ``cuda`` is about that side alone: the CPU's serial and
parallel paths, the GPU's blocks and device arrays.  The simulator runs tiny shapes:
``SHAPES`` holds each side's where they differ.
"""
import numpy as np
import pytest

import fastloss as fl
import naive
import sides
from naive import check_result, finite_difference

DTYPES = [np.float16, np.float32, np.float64]
REDUCTIONS = ["mean", "sum", "none"]

#: per side, the 2-D inputs of the tests that name them: the CPU tests' and the simulator's
SHAPES = {"cpu": {"deltas": (10, 6), "dtypes": (16, 9), "weights": (10, 6)},
          "cuda": {"deltas": (4, 6), "dtypes": (6, 5), "weights": (6, 5)}}


def make_inputs(rng, shape, dtype=np.float64, scale=2.0):
    x = np.asarray(rng.normal(size=shape) * scale).astype(dtype)
    t = np.asarray(rng.normal(size=shape) * scale).astype(dtype)
    return x, t


def _same_as_cpu(got, cpu, dtype):
    naive.assert_close(got.loss, cpu.loss, dtype, what="loss, GPU vs CPU")
    if cpu.grad is not None:
        naive.assert_close(got.grad, cpu.grad, dtype, what="grad, GPU vs CPU")


def run(backend, dev, x, t, sample_weight=None, **kw):
    """(huber_loss on the test's side, on the host; the float64 reference); on the "cuda"
    side the result is checked against the CPU path's too."""
    res = fl.huber_loss(sides.put(backend, dev, x), sides.put(backend, dev, t),
                        sample_weight=sides.put(backend, dev, sample_weight), **kw)
    got = sides.on_host(res, dev)
    if backend == "cuda":
        _same_as_cpu(got, fl.huber_loss(x, t, sample_weight=sample_weight, **kw), x.dtype)
    return got, naive.huber_loss(x, t, sample_weight=sample_weight, **kw)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("delta", [1.0, 0.3, 2.5, 1e3])
def test_matches_reference(rng, backend, dev, delta, reduction):
    x, t = make_inputs(rng, SHAPES[backend]["deltas"])
    got, want = run(backend, dev, x, t, delta=delta, reduction=reduction)
    check_result(got, *want, np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_dtype_with_sample_weight(rng, backend, dev, dtype, reduction):
    shape = SHAPES[backend]["dtypes"]
    x, t = make_inputs(rng, shape, dtype)
    sw = rng.uniform(0.0, 2.0, size=(shape[0], 1)).astype(dtype)
    res = fl.huber_loss(dev.put(x), dev.put(t), delta=1.5, sample_weight=dev.put(sw),
                        reduction=reduction)
    # the side's arrays in, the side's arrays out
    assert (type(res.loss) is np.ndarray) == (backend == "cpu")
    assert isinstance(res.grad, type(dev.put(x)))
    assert res.grad.dtype == np.dtype(dtype) and res.grad.shape == x.shape
    got = sides.on_host(res, dev)
    check_result(got, *naive.huber_loss(x, t, delta=1.5, sample_weight=sw, reduction=reduction),
                 dtype)
    if backend == "cuda":
        _same_as_cpu(got, fl.huber_loss(x, t, delta=1.5, sample_weight=sw, reduction=reduction),
                     dtype)


@pytest.mark.cpu
def test_default_delta_is_one(rng):
    x, t = make_inputs(rng, (20,))
    check_result(fl.huber_loss(x, t), *naive.huber_loss(x, t, delta=1.0), np.float64)


def test_both_branches_and_the_kink(backend, dev):
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 3.0, -3.0, 1e6])
    got = sides.on_host(fl.huber_loss(dev.put(x), dev.put(np.zeros_like(x)), reduction="none"), dev)
    np.testing.assert_allclose(got.loss, [0, 0.125, 0.125, 0.5, 0.5, 2.5, 2.5, 1e6 - 0.5], rtol=1e-15)
    np.testing.assert_allclose(got.grad, [0, 0.5, -0.5, 1, -1, 1, -1, 1], rtol=1e-15)


def _weight_cases(side):
    """(shape of the input, shape of the weights): one weight per run of trailing elements,
    weights cycling along trailing axes, full weights, one weight, and the weights that vary
    along two groups of axes (compacted on the host for the GPU)."""
    n, c = SHAPES[side]["weights"]
    return [((n, c), (n, c)), ((n, c), (n, 1)), ((n, c), (c,)), ((n, c), (1, c)), ((n, c), ()),
            ((2, 3, 4), (3, 1)), ((2, 3, 4), (2, 1, 1)), ((2, 3, 4), (3, 4)), ((2, 3, 4), (1, 3, 1)),
            ((2, 3, 4), (2, 1, 4)), ((2, 3, 4), (2, 3, 4)), ((3, 1, 4), (3, 1, 1))]


@pytest.mark.parametrize("backend, shape, wshape", sides.per_side(_weight_cases), ids=str)
def test_sample_weight_broadcasting(rng, backend, dev, shape, wshape):
    x, t = make_inputs(rng, shape)
    sw = np.asarray(rng.uniform(0.0, 2.0, size=wshape))
    got = {}
    for reduction in REDUCTIONS:
        got[reduction], want = run(backend, dev, x, t, delta=0.8, sample_weight=sw,
                                   reduction=reduction)
        check_result(got[reduction], *want, np.float64)
    # the mean divides by the sum of the broadcast weights
    total = np.broadcast_to(sw, shape).sum()
    np.testing.assert_allclose(float(got["mean"].loss) * total, float(got["sum"].loss), rtol=1e-12)
    np.testing.assert_allclose(float(got["none"].loss.sum()) / total, float(got["mean"].loss),
                               rtol=1e-12)


def test_strided_sample_weights(rng, backend, dev):
    x, t = make_inputs(rng, (6, 5), np.float32)
    base = rng.uniform(size=(6, 10)).astype(np.float32)
    d_base = dev.put(base)
    for view, host in ((d_base[:, :1], base[:, :1]),  # (6, 1), strided
                       (d_base[:, ::2], base[:, ::2]),  # (6, 5), strided 2-D
                       (d_base[0, ::2], base[0, ::2])):  # (5,), strided 1-D
        res = fl.huber_loss(dev.put(x), dev.put(t), sample_weight=view)
        check_result(sides.on_host(res, dev), *naive.huber_loss(x, t, sample_weight=host), np.float32)
    # a strided view of more than two varying axes (the GPU compacts it on the host)
    x3, t3 = make_inputs(rng, (2, 3, 4))
    w3 = rng.uniform(size=(2, 3, 8))
    res = fl.huber_loss(dev.put(x3), dev.put(t3), sample_weight=dev.put(w3)[:, :, ::2])
    check_result(sides.on_host(res, dev), *naive.huber_loss(x3, t3, sample_weight=w3[:, :, ::2]),
                 np.float64)


def test_strided_views(rng, backend, dev):
    xb, tb = make_inputs(rng, (12, 9), np.float32)
    x, t = dev.put(xb)[::2, ::3], dev.put(tb)[1::2, 1::3]  # two (6, 3) views
    swb = rng.uniform(size=(6, 2)).astype(np.float32)
    parent = dev.put(np.full((6, 6), 9.0, np.float32))
    buf = parent[:, ::2]  # a strided grad_out
    res = fl.huber_loss(x, t, delta=0.7, sample_weight=dev.put(swb)[:, :1], grad_out=buf)
    assert res.grad is buf
    want = naive.huber_loss(xb[::2, ::3], tb[1::2, 1::3], delta=0.7, sample_weight=swb[:, :1])
    check_result(sides.on_host(res, dev), *want, np.float32)
    rest = dev.get(parent)
    assert np.all(rest[:, 1::2] == 9.0)  # nothing written outside the view


@pytest.mark.parametrize("shape", [(), (1,), (7,), (2, 3, 4), (5, 1, 3)], ids=str)
def test_any_shape(rng, backend, dev, shape):
    x, t = make_inputs(rng, shape)
    for reduction in REDUCTIONS:
        got, want = run(backend, dev, x, t, reduction=reduction)
        assert got.grad.shape == shape
        assert np.shape(got.loss) == (shape if reduction == "none" else ())
        check_result(got, *want, np.float64)


@pytest.mark.cuda
def test_many_blocks_and_grid_stride(rng, dev, threads_per_block, monkeypatch):
    # more elements (and weights) than one block holds, and several per thread
    from fastloss.cuda import _blocks
    x, t = make_inputs(rng, (9, 11))
    sw = rng.uniform(size=(9, 11))
    for max_blocks in (_blocks.MAX_BLOCKS, 2):
        monkeypatch.setattr(_blocks, "MAX_BLOCKS", max_blocks)
        got, want = run("cuda", dev, x, t, sample_weight=sw)
        check_result(got, *want, np.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_extreme_values(backend, dev, dtype):
    x = np.array([1e30, -1e30, 1e4, -1e4, 0.0, 1e4, 0.0], dtype)
    t = np.array([0.0, 0.0, -1e4, 1e4, 1e-300, 1e4, 1e-30], dtype)
    got, want = run(backend, dev, x, t, reduction="none")
    assert np.all(np.isfinite(got.grad))
    check_result(got, *want, dtype)


def test_nan_propagates_elementwise(backend, dev):
    x = np.array([0.5, np.nan, -3.0])
    t = np.zeros(3)
    got, _ = run(backend, dev, x, t, reduction="none")
    assert np.isnan(got.loss[1]) and np.isnan(got.grad[1])
    np.testing.assert_allclose(got.loss[[0, 2]], [0.125, 2.5])
    np.testing.assert_allclose(got.grad[[0, 2]], [0.5, -1.0])
    assert np.isnan(float(fl.huber_loss(dev.put(x), dev.put(t)).loss))
    # a NaN weight poisons the mean's denominator, on either side
    got, _ = run(backend, dev, np.ones(3), t, sample_weight=np.array([1.0, 1.0, np.nan]))
    assert np.isnan(float(got.loss))


# ----------------------------------------------------------- the interface


@pytest.mark.cpu
def test_inputs_are_not_modified(rng):
    x, t = make_inputs(rng, (40, 3), np.float32)
    sw = rng.uniform(size=(40, 1)).astype(np.float32)
    copies = [a.copy() for a in (x, t, sw)]
    fl.huber_loss(x, t, sample_weight=sw)
    for before, after in zip(copies, (x, t, sw)):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("shape, wshape", [((0,), None), ((0,), (0,)), ((0, 3), (3,)),
                                           ((0, 3), (0, 1))], ids=str)
def test_empty(backend, dev, shape, wshape):
    x = np.zeros(shape)
    sw = None if wshape is None else dev.put(np.ones(wshape))
    assert np.isnan(float(fl.huber_loss(dev.put(x), dev.put(x), sample_weight=sw).loss))
    s = sides.on_host(fl.huber_loss(dev.put(x), dev.put(x), sample_weight=sw, reduction="sum"), dev)
    assert float(s.loss) == 0.0 and s.grad.shape == shape
    none = fl.huber_loss(dev.put(x), dev.put(x), sample_weight=sw, reduction="none")
    assert none.loss.shape == shape


def test_grad_false_returns_no_gradient(rng, backend, dev):
    x, t = make_inputs(rng, (8, 2))
    res = fl.huber_loss(dev.put(x), dev.put(t), grad=False)
    assert res.grad is None
    check_result(fl.LossGrad(dev.get(res.loss), None), naive.huber_loss(x, t)[0], None, np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_out_buffer_and_in_place(rng, backend, dev, dtype):
    x, t = make_inputs(rng, (8, 5), dtype)
    sw = rng.uniform(size=5).astype(dtype)
    want = naive.huber_loss(x, t, delta=0.7, sample_weight=sw)
    buf = dev.put(np.zeros_like(x))
    res = fl.huber_loss(dev.put(x), dev.put(t), delta=0.7, sample_weight=dev.put(sw), grad_out=buf)
    assert res.grad is buf
    check_result(sides.on_host(res, dev), *want, dtype)
    d_x = dev.put(x)
    res = fl.huber_loss(d_x, dev.put(t), delta=0.7, sample_weight=dev.put(sw), grad_out=d_x)
    assert res.grad is d_x
    check_result(fl.LossGrad(dev.get(res.loss), dev.get(d_x)), *want, dtype)


@pytest.mark.cpu
def test_finite_differences(rng):
    x, t = make_inputs(rng, (6, 4))
    # keep every |x - t| away from the kink at delta
    d = x - t
    near = np.abs(np.abs(d) - 1.2) < 1e-3
    x[near] += 0.1
    sw = rng.uniform(size=(6, 1))
    res = fl.huber_loss(x, t, delta=1.2, sample_weight=sw)

    def f(z):
        return fl.huber_loss(z, t, delta=1.2, sample_weight=sw, grad=False).loss

    for flat in rng.choice(x.size, size=8, replace=False):
        idx = np.unravel_index(flat, x.shape)
        np.testing.assert_allclose(res.grad[idx], finite_difference(f, x, idx), rtol=1e-6, atol=1e-9)


@pytest.mark.cpu
def test_tiny_input_serial_path(rng):
    x, t = make_inputs(rng, (3,))
    check_result(fl.huber_loss(x, t), *naive.huber_loss(x, t), np.float64)


@pytest.mark.cpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_large_input_parallel_path(rng, dtype):
    x, t = make_inputs(rng, (4096, 300), dtype)
    sw = rng.uniform(size=(4096, 1)).astype(dtype)
    for reduction in ["mean", "none"]:
        res = fl.huber_loss(x, t, sample_weight=sw, reduction=reduction)
        check_result(res, *naive.huber_loss(x, t, sample_weight=sw, reduction=reduction), dtype)


@pytest.mark.cuda
def test_target_of_another_dtype_rounds_like_the_cpu(rng, dev):
    x, _ = make_inputs(rng, (4, 5), np.float16)
    t = rng.normal(size=(4, 5))  # float64 target, float16 input: rounded to float16 first
    got = sides.on_host(fl.huber_loss(dev.put(x), dev.put(t), reduction="none"), dev)
    cpu = fl.huber_loss(x, t, reduction="none")
    np.testing.assert_array_equal(got.loss, cpu.loss)
    np.testing.assert_array_equal(got.grad, cpu.grad)


def test_backend_with_numpy_returns_numpy(rng, backend):
    x, t = make_inputs(rng, (5, 3))
    sw = rng.uniform(size=(5, 1))
    want = naive.huber_loss(x, t, sample_weight=sw)
    res = fl.huber_loss(x, t, sample_weight=sw, backend=backend)
    assert type(res.loss) is np.ndarray and type(res.grad) is np.ndarray
    check_result(res, *want, np.float64)
    res = fl.huber_loss(x, t, sample_weight=sw, backend=backend, grad_out=x)
    assert res.grad is x
    check_result(res, *want, np.float64)


def test_scalar_loss_converts_with_float(rng, backend, dev):
    x, t = make_inputs(rng, (3, 4), np.float32)
    loss = fl.huber_loss(dev.put(x), dev.put(t)).loss
    assert loss.shape == () and abs(float(loss) - float(naive.huber_loss(x, t)[0])) < 1e-5


@pytest.mark.cuda
def test_device_arrays_are_never_copied_to_or_from_the_host(rng, dev, monkeypatch):
    from numba import cuda
    x, t = make_inputs(rng, (4, 5), np.float32)
    sw = rng.uniform(size=(4, 1)).astype(np.float32)
    args = (dev.put(x), dev.put(t))
    d_sw = dev.put(sw)
    buf = dev.put(np.zeros_like(x))
    calls = []
    monkeypatch.setattr(type(args[0]), "copy_to_host", lambda *a, **k: calls.append("copy_to_host"))
    monkeypatch.setattr(cuda, "to_device", lambda *a, **k: calls.append("to_device"))
    res = fl.huber_loss(*args, sample_weight=d_sw, grad_out=buf)
    assert calls == []
    monkeypatch.undo()
    check_result(sides.on_host(res, dev), *naive.huber_loss(x, t, sample_weight=sw), np.float32)


# ---------------------------------------------------------------- bad input

F32 = np.float32
GRAD_OUT_BAD, GRAD_OUT_ON_THE_HOST = sides.grad_out_cases((3, 4))
#: one bad argument per case, as ``put`` (the side's) places it: (the call's arguments that
#: change, the error, its message); the "cuda" side also refuses host arrays beside its own
BAD_INPUT = {
    "zero delta": (lambda put: {"delta": 0.0}, ValueError, "delta must be > 0"),
    "negative delta": (lambda put: {"delta": -1.0}, ValueError, "delta must be > 0"),
    "target of the wrong shape": (lambda put: {"target": put(np.zeros((4, 3), F32))},
                                  ValueError, "target must have shape"),
    "int input": (lambda put: {"input": put(np.zeros((3, 4), np.int32))},
                  TypeError, "input must have dtype"),
    "sample_weight that does not broadcast": (lambda put: {"sample_weight": put(np.ones(3, F32))},
                                              ValueError, "does not broadcast"),
    "sample_weight that broadcasts too far": (
        lambda put: {"sample_weight": put(np.ones((2, 1, 4), F32))}, ValueError, "to a larger shape"),
    "bad reduction": (lambda put: {"reduction": "max"}, ValueError, "reduction must be one of"),
    **GRAD_OUT_BAD,
}
ON_THE_HOST = {
    **GRAD_OUT_ON_THE_HOST,
    "sample_weight on the host": (lambda put: {"sample_weight": np.ones(4, F32)},
                                  TypeError, "sample_weight is on cpu"),
}


@pytest.mark.parametrize("backend, case", sides.bad_input_cases(BAD_INPUT, ON_THE_HOST))
def test_bad_input_raises_before_any_kernel_and_changes_nothing(backend, dev, case):
    sides.assert_rejected_unchanged(dev, fl.huber_loss, ("input", "target"), np.zeros((3, 4), F32),
                                    np.arange(12, dtype=F32).reshape(3, 4), case)
