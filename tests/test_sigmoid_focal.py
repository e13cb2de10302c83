"""fastloss.sigmoid_focal_loss (torchvision.ops.sigmoid_focal_loss) against naive.py, on both
sides.

A test that takes ``backend`` runs on the CPU and on the GPU path (``dev`` moves its
arrays to that side and back); on the "cuda" side it also checks the CPU path's answer.
A test marked ``cpu`` or ``cuda`` is about that side alone: the CPU's loops, serial and
parallel paths; the GPU's blocks and device arrays.  The simulator runs tiny shapes: a
test's matrix (``per_side``) gives each side its own rows where they differ.
"""
import numpy as np
import pytest

import fastloss as fl
import naive
import sides
from naive import check_result, finite_difference

DTYPES = [np.float16, np.float32, np.float64]
REDUCTIONS = ["mean", "sum", "none"]


def make_inputs(rng, shape, dtype=np.float64, *, soft=False, scale=3.0):
    x = (rng.normal(size=shape) * scale).astype(dtype)
    if soft:
        t = rng.uniform(size=shape).astype(dtype)
    else:
        t = (rng.random(shape) < 0.3).astype(dtype)
    return x, t


def run_both(x, t, **kw):
    return fl.sigmoid_focal_loss(x, t, **kw), naive.sigmoid_focal_loss(x, t, **kw)




def run(backend, dev, x, t, *, loss_scale=None, **kw):
    """(sigmoid_focal_loss on the test's side, on the host; the float64 reference)."""
    got = sides.on_host(fl.sigmoid_focal_loss(sides.put(backend, dev, x), sides.put(backend, dev, t), **kw), dev)
    sides.assert_same_as_cpu(backend, got, fl.sigmoid_focal_loss, x, t, loss_scale=loss_scale, **kw)
    return got, naive.sigmoid_focal_loss(x, t, **kw)


@pytest.mark.parametrize("backend, alpha, gamma, reduction, dtype, n", sides.per_side(
    lambda side: [(a, g, r, np.float64, 9) for a in (0.25, -1.0, 0.9) for g in (0.0, 0.5, 2.0)
                  for r in REDUCTIONS] if side == "cpu"
    else [(0.25, 2.0, r, d, 5) for d in DTYPES for r in REDUCTIONS]))
def test_matches_reference(rng, backend, dev, alpha, gamma, reduction, dtype, n):
    x, t = make_inputs(rng, (n, 7), dtype)
    kw = dict(alpha=alpha, gamma=gamma, reduction=reduction)
    res = fl.sigmoid_focal_loss(dev.put(x), dev.put(t), **kw)
    # the side's arrays in, the side's arrays out
    assert (type(res.loss) is np.ndarray) == (backend == "cpu")
    assert isinstance(res.grad, type(dev.put(x)))
    assert res.grad.dtype == np.dtype(dtype) and res.grad.shape == x.shape
    got = sides.on_host(res, dev)
    check_result(got, *naive.sigmoid_focal_loss(x, t, **kw), dtype)
    sides.assert_same_as_cpu(backend, got, fl.sigmoid_focal_loss, x, t, **kw)


def test_defaults_are_torchvision_defaults(rng, backend, dev):
    x, t = make_inputs(rng, (5, 4))
    got, _ = run(backend, dev, x, t)
    check_result(got, *naive.sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0, reduction="mean"), np.float64)


@pytest.mark.parametrize("backend, alpha, gamma, reduction", sides.per_side(
    lambda side: [(0.3, g, "mean") for g in (0.0, 1.5, 2.0)] if side == "cpu"
    else [(a, g, "none") for a, g in ((0.25, 0.0), (-1.0, 0.5), (0.9, 2.0), (-1.0, 0.0), (0.5, 3.5))]))
def test_soft_targets(rng, backend, dev, alpha, gamma, reduction):
    x, t = make_inputs(rng, (6, 5), soft=True)
    got, want = run(backend, dev, x, t, alpha=alpha, gamma=gamma, reduction=reduction)
    check_result(got, *want, np.float64)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", [bool, np.int64, np.float64])
def test_target_dtypes_convert_like_the_cpu(rng, dev, kind):
    # bool and 0/1 integer labels; float64 targets with float16 logits (rounded to float16 first)
    x, t = make_inputs(rng, (4, 6), np.float16 if kind is np.float64 else np.float32,
                       soft=kind is np.float64)
    t = t.astype(kind)
    got = sides.on_host(fl.sigmoid_focal_loss(dev.put(x), dev.put(t), gamma=1.5, reduction="none"), dev)
    sides.assert_same_as_cpu("cuda", got, fl.sigmoid_focal_loss, x, t, gamma=1.5, reduction="none")


@pytest.mark.cpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gamma_two_loop_agrees_with_the_general_one(rng, dtype):
    # gamma == 2 has a loop of its own (u * u for u**gamma); the next float above 2
    # takes the general one (exp(gamma log u)): the two agree to round-off
    x, t = make_inputs(rng, (40, 30), dtype)
    x[0, :4] = [30.0, -30.0, 80.0, -80.0]  # saturated: u underflows or ce is 0
    above = float(np.nextafter(dtype(2.0), dtype(3.0)))
    for reduction in ["none", "sum"]:
        two = fl.sigmoid_focal_loss(x, t, gamma=2.0, reduction=reduction)
        general = fl.sigmoid_focal_loss(x, t, gamma=above, reduction=reduction)
        rtol = 1e-11 if dtype == np.float64 else 1e-4  # u**(2+d) = u**2 * exp(d log u)
        np.testing.assert_allclose(two.loss, general.loss, rtol=rtol, atol=1e-30)
        np.testing.assert_allclose(two.grad, general.grad, rtol=rtol, atol=1e-30)


@pytest.mark.cpu
def test_gamma_zero_alpha_off_is_binary_cross_entropy(rng):
    x, t = make_inputs(rng, (8, 3), soft=True)
    res = fl.sigmoid_focal_loss(x, t, alpha=-1, gamma=0.0, reduction="none")
    bce = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
    np.testing.assert_allclose(res.loss, bce, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(res.grad, 1 / (1 + np.exp(-x)) - t, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("backend, shape", sides.per_side(
    lambda side: [(s,) for s in [(), (17,), (2, 3, 4), (3, 1, 5)] + ([(1,)] if side == "cpu" else [])]),
    ids=str)
def test_any_shape(rng, backend, dev, shape):
    x, t = make_inputs(rng, shape)
    for reduction in REDUCTIONS if backend == "cpu" else ("mean", "none"):
        got, want = run(backend, dev, x, t, reduction=reduction)
        assert got.grad.shape == shape
        assert np.shape(got.loss) == (shape if reduction == "none" else ())
        check_result(got, *want, np.float64)


@pytest.mark.cpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_dtypes(rng, dtype, reduction):
    x, t = make_inputs(rng, (12, 10), dtype)
    res, want = run_both(x, t, reduction=reduction)
    assert res.grad.dtype == np.dtype(dtype)
    check_result(res, *want, dtype)


@pytest.mark.cpu
def test_non_contiguous(rng):
    xb, tb = make_inputs(rng, (10, 12))
    x = xb.T[::2]  # (6, 10)
    t = tb.T[1::2]  # (6, 10)
    assert not x.flags.c_contiguous and not t.flags.c_contiguous
    res, want = run_both(x, t, gamma=1.0)
    check_result(res, *want, np.float64)


def test_strided_views(rng, backend, dev):
    xb, tb = make_inputs(rng, (8, 10), np.float32, soft=True)
    x, t = dev.put(xb)[::2, 1::3], dev.put(tb)[1::2, ::4]  # two (4, 3) views
    parent = dev.put(np.full((8, 6), 5.0, np.float32))
    buf = parent[::2, ::2]  # a strided grad_out
    res = fl.sigmoid_focal_loss(x, t, gamma=1.0, grad_out=buf)
    assert res.grad is buf
    want = naive.sigmoid_focal_loss(xb[::2, 1::3], tb[1::2, ::4], gamma=1.0)
    check_result(sides.on_host(res, dev), *want, np.float32)
    rest = dev.get(parent)
    rest[::2, ::2] = 5.0
    assert np.all(rest == 5.0)  # nothing written outside the view
    # 1-D strided views
    flat, tflat = dev.put(xb.reshape(-1))[::3], dev.put(tb.reshape(-1))[1::3]
    got = sides.on_host(fl.sigmoid_focal_loss(flat, tflat, reduction="none"), dev)
    check_result(got, *naive.sigmoid_focal_loss(xb.reshape(-1)[::3], tb.reshape(-1)[1::3],
                                                reduction="none"), np.float32)


# ------------------------------------------------------ saturated logits


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_saturated_logits_finite(backend, dev, dtype, gamma):
    # torchvision gives NaN gradients here for gamma < 1; the spec asks for finite ones
    x = np.array([1e4, 1e4, -1e4, -1e4, 50.0, -50.0, 100.0, -100.0], dtype=dtype)
    t = np.array([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=dtype)
    for alpha in [0.25, -1.0]:
        for reduction in ["none", "sum"] if backend == "cpu" else ["none"]:
            got, want = run(backend, dev, x, t, alpha=alpha, gamma=gamma, reduction=reduction,
                            loss_scale=1e4)
            assert np.all(np.isfinite(got.loss))
            assert np.all(np.isfinite(got.grad)), got.grad
            check_result(got, *want, dtype, loss_scale=1e4)


def test_saturated_logits_float16(backend, dev):
    x = np.array([6e4, 6e4, -6e4, -6e4, 20.0, -20.0], dtype=np.float16)
    t = np.array([1, 0, 1, 0, 1, 1], dtype=np.float16)
    for gamma in [0.0, 0.5, 2.0] if backend == "cpu" else [0.5]:
        got, want = run(backend, dev, x, t, gamma=gamma, reduction="none", loss_scale=6e4)
        assert np.all(np.isfinite(got.grad))
        check_result(got, *want, np.float16, loss_scale=6e4)


# ----------------------------------------------------------- the interface


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the simulator computes in NumPy scalars
def test_nan_propagates_elementwise(backend, dev):
    x = np.array([0.5, np.nan, -3.0, np.inf])
    t = np.array([1.0, 0.0, 0.0, 1.0])
    # on the GPU, NaN where the CPU path has NaN (and the same numbers elsewhere)
    got, (want_loss, want_grad) = run(backend, dev, x, t, reduction="none")
    assert np.isnan(got.loss[1]) and np.isnan(got.grad[1])
    np.testing.assert_allclose(got.loss[[0, 2]], want_loss[[0, 2]], rtol=1e-12)
    np.testing.assert_allclose(got.grad[[0, 2]], want_grad[[0, 2]], rtol=1e-12)
    assert np.isnan(float(fl.sigmoid_focal_loss(dev.put(x), dev.put(t)).loss))


@pytest.mark.cpu
def test_inputs_are_not_modified(rng):
    x, t = make_inputs(rng, (40, 3), np.float32, soft=True)
    xc, tc = x.copy(), t.copy()
    fl.sigmoid_focal_loss(x, t)
    np.testing.assert_array_equal(x, xc)
    np.testing.assert_array_equal(t, tc)


def test_empty(backend, dev):
    x = np.zeros((0, 4))
    assert np.isnan(float(fl.sigmoid_focal_loss(dev.put(x), dev.put(x)).loss))
    s = sides.on_host(fl.sigmoid_focal_loss(dev.put(x), dev.put(x), reduction="sum"), dev)
    assert float(s.loss) == 0.0 and s.grad.shape == (0, 4)
    assert fl.sigmoid_focal_loss(dev.put(x), dev.put(x), reduction="none").loss.shape == (0, 4)


def test_grad_false_grad_out_and_in_place(rng, backend, dev):
    x, t = make_inputs(rng, (6, 4), np.float32)
    want = naive.sigmoid_focal_loss(x, t, gamma=1.0)
    res = fl.sigmoid_focal_loss(dev.put(x), dev.put(t), gamma=1.0, grad=False)
    assert res.grad is None
    check_result(fl.LossGrad(dev.get(res.loss), None), want[0], None, np.float32)
    buf = dev.put(np.full_like(x, np.inf))
    res = fl.sigmoid_focal_loss(dev.put(x), dev.put(t), gamma=1.0, grad_out=buf)
    assert res.grad is buf
    check_result(sides.on_host(res, dev), *want, np.float32)
    d_x = dev.put(x)
    res = fl.sigmoid_focal_loss(d_x, dev.put(t), gamma=1.0, grad_out=d_x)
    assert res.grad is d_x
    check_result(fl.LossGrad(dev.get(res.loss), dev.get(d_x)), *want, np.float32)


def test_backend_with_numpy_returns_numpy(rng, backend):
    x, t = make_inputs(rng, (5, 3))
    want = naive.sigmoid_focal_loss(x, t)
    res = fl.sigmoid_focal_loss(x, t, backend=backend)
    assert type(res.loss) is np.ndarray and type(res.grad) is np.ndarray
    check_result(res, *want, np.float64)
    out = np.zeros_like(x)
    res = fl.sigmoid_focal_loss(x, t, backend=backend, grad_out=out)
    assert res.grad is out
    check_result(res, *want, np.float64)


def test_scalar_loss_converts_with_float(rng, backend, dev):
    x, t = make_inputs(rng, (3, 4), np.float32)
    loss = fl.sigmoid_focal_loss(dev.put(x), dev.put(t)).loss
    assert loss.shape == () and abs(float(loss) - float(naive.sigmoid_focal_loss(x, t)[0])) < 1e-5


@pytest.mark.cpu
def test_finite_differences(rng):
    x, t = make_inputs(rng, (5, 4), soft=True)
    for gamma, alpha in [(2.0, 0.25), (0.5, -1.0)]:
        res = fl.sigmoid_focal_loss(x, t, gamma=gamma, alpha=alpha)

        def f(z):
            return fl.sigmoid_focal_loss(z, t, gamma=gamma, alpha=alpha, grad=False).loss

        for flat in rng.choice(x.size, size=5, replace=False):
            idx = np.unravel_index(flat, x.shape)
            np.testing.assert_allclose(res.grad[idx], finite_difference(f, x, idx), rtol=1e-6, atol=1e-9)


# ---------------------------------------------------- serial / parallel / blocks


@pytest.mark.cpu
def test_large_input_parallel_path(rng):
    x, t = make_inputs(rng, (4096, 300), np.float32)
    for reduction in ["mean", "none"]:
        res, want = run_both(x, t, reduction=reduction)
        check_result(res, *want, np.float32)


@pytest.mark.cpu
def test_tiny_input_serial_path(rng):
    x, t = make_inputs(rng, (3,))
    res, want = run_both(x, t)
    check_result(res, *want, np.float64)


@pytest.mark.cuda
def test_many_blocks_and_grid_stride(rng, dev, threads_per_block, monkeypatch):
    # more elements than one block holds, and (with 2 blocks at most) several per thread
    from fastloss.cuda import _blocks
    x, t = make_inputs(rng, (9, 11), soft=True)
    for max_blocks in (_blocks.MAX_BLOCKS, 2):
        monkeypatch.setattr(_blocks, "MAX_BLOCKS", max_blocks)
        got, want = run("cuda", dev, x, t, reduction="sum")
        check_result(got, *want, np.float64)


@pytest.mark.cuda
def test_device_arrays_are_never_copied_to_or_from_the_host(rng, dev, monkeypatch):
    from numba import cuda
    x, t = make_inputs(rng, (4, 5), np.float32)
    args = (dev.put(x), dev.put(t))
    buf = dev.put(np.zeros_like(x))
    calls = []
    monkeypatch.setattr(type(args[0]), "copy_to_host", lambda *a, **k: calls.append("copy_to_host"))
    monkeypatch.setattr(cuda, "to_device", lambda *a, **k: calls.append("to_device"))
    res = fl.sigmoid_focal_loss(*args, grad_out=buf, gamma=0.5)
    assert calls == []
    monkeypatch.undo()
    check_result(sides.on_host(res, dev), *naive.sigmoid_focal_loss(x, t, gamma=0.5), np.float32)


@pytest.mark.cuda
def test_strided_arrays_of_more_than_two_dimensions_are_refused(rng, dev):
    x = dev.put(rng.normal(size=(3, 2, 4)))[:, :, ::2]
    with pytest.raises(ValueError, match="logits of shape"):
        fl.sigmoid_focal_loss(x, dev.put(np.zeros((3, 2, 2))))


# ---------------------------------------------------------------- bad input

F32 = np.float32
GRAD_OUT_BAD, GRAD_OUT_ON_THE_HOST = sides.grad_out_cases((3, 4))
#: one bad argument per case, as ``put`` (the side's) places it, beside (3, 4) float32
#: logits and targets: (the call's arguments that change, the error, its message); the
#: "cuda" side also refuses host arrays beside its own
BAD_INPUT = {
    "targets of the wrong shape": (lambda put: {"targets": put(np.zeros((4, 3), F32))},
                                   ValueError, "targets must have shape"),
    "string targets": (lambda put: {"targets": put(np.zeros((3, 4), "S1"))},
                       TypeError, "targets must be float"),
    "int32 logits": (lambda put: {"logits": put(np.zeros((3, 4), np.int32))},
                     TypeError, "logits must have dtype"),
    "int64 logits": (lambda put: {"logits": put(np.zeros((3, 4), np.int64))},
                     TypeError, "logits must have dtype"),
    "negative gamma": (lambda put: {"gamma": -1.0}, ValueError, "gamma must be >= 0"),
    "bad reduction": (lambda put: {"reduction": "mean_sum"}, ValueError, "reduction must be one of"),
    **GRAD_OUT_BAD,
}
ON_THE_HOST = {
    **GRAD_OUT_ON_THE_HOST,
    "targets on the host": (lambda put: {"targets": np.zeros((3, 4), F32)},
                            TypeError, "targets is on cpu"),
}


@pytest.mark.parametrize("backend, case", sides.bad_input_cases(BAD_INPUT, ON_THE_HOST))
def test_bad_input_raises_before_any_kernel_and_changes_nothing(backend, dev, case):
    sides.assert_rejected_unchanged(dev, fl.sigmoid_focal_loss, ("logits", "targets"), np.zeros((3, 4), F32),
                                    np.arange(12, dtype=F32).reshape(3, 4), case)
