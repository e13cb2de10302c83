"""fastloss.huber_loss (torch.nn.functional.huber_loss) against naive.py."""
import numpy as np
import pytest

import fastloss as fl
import naive
from naive import check_result, finite_difference

REDUCTIONS = ["mean", "sum", "none"]


def make_inputs(rng, shape, dtype=np.float64, scale=2.0):
    x = (rng.normal(size=shape) * scale).astype(dtype)
    t = (rng.normal(size=shape) * scale).astype(dtype)
    return x, t


def run_both(x, t, **kw):
    return fl.huber_loss(x, t, **kw), naive.huber_loss(x, t, **kw)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("delta", [1.0, 0.3, 2.5, 1e3])
def test_matches_reference(rng, delta, reduction):
    x, t = make_inputs(rng, (10, 6))
    res, want = run_both(x, t, delta=delta, reduction=reduction)
    check_result(res, *want, np.float64)


def test_default_delta_is_one(rng):
    x, t = make_inputs(rng, (20,))
    check_result(fl.huber_loss(x, t), *naive.huber_loss(x, t, delta=1.0), np.float64)


def test_both_branches_and_the_kink():
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 3.0, -3.0, 1e6])
    t = np.zeros_like(x)
    res = fl.huber_loss(x, t, reduction="none")
    np.testing.assert_allclose(res.loss, [0, 0.125, 0.125, 0.5, 0.5, 2.5, 2.5, 1e6 - 0.5], rtol=1e-15)
    np.testing.assert_allclose(res.grad, [0, 0.5, -0.5, 1, -1, 1, -1, 1], rtol=1e-15)


@pytest.mark.parametrize("wshape", [(10, 6), (10, 1), (6,), (1, 6), ()], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sample_weight_broadcasting(rng, wshape, reduction):
    x, t = make_inputs(rng, (10, 6))
    sw = rng.uniform(0.0, 2.0, size=wshape)
    res, want = run_both(x, t, delta=0.8, sample_weight=sw, reduction=reduction)
    check_result(res, *want, np.float64)
    if reduction == "mean":
        # the mean divides by the sum of the broadcast weights
        s = fl.huber_loss(x, t, delta=0.8, sample_weight=sw, reduction="sum")
        np.testing.assert_allclose(float(res.loss) * np.broadcast_to(sw, x.shape).sum(), float(s.loss),
                                   rtol=1e-12)


@pytest.mark.parametrize("shape", [(7,), (2, 3, 4), (1,), (5, 1, 3)], ids=str)
def test_any_shape(rng, shape):
    x, t = make_inputs(rng, shape)
    for reduction in REDUCTIONS:
        res, want = run_both(x, t, reduction=reduction)
        check_result(res, *want, np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_dtypes(rng, dtype, reduction):
    x, t = make_inputs(rng, (16, 9), dtype)
    sw = rng.uniform(size=(16, 1)).astype(dtype)
    res, want = run_both(x, t, delta=1.5, sample_weight=sw, reduction=reduction)
    assert res.grad.dtype == np.dtype(dtype)
    check_result(res, *want, dtype)


def test_non_contiguous(rng):
    xb, tb = make_inputs(rng, (12, 9))
    x = xb[::2, ::3]
    t = tb.T[::3, ::2].T  # another (6, 3) strided view
    assert x.shape == t.shape == (6, 3)
    sw = rng.uniform(size=(6, 2))[:, :1]
    res, want = run_both(x, t, sample_weight=sw)
    check_result(res, *want, np.float64)


def test_huge_values(rng):
    x = np.array([1e30, -1e30, 1e4, -1e4, 0.0])
    t = np.array([0.0, 0.0, -1e4, 1e4, 1e-300])
    for dtype in [np.float64, np.float32]:
        xd, td = x.astype(dtype), t.astype(dtype)
        res, want = run_both(xd, td, reduction="none")
        assert np.all(np.isfinite(res.grad))
        check_result(res, *want, dtype)


# ----------------------------------------------------------- the interface


def test_nan_propagates_elementwise():
    x = np.array([0.5, np.nan, -3.0])
    res = fl.huber_loss(x, np.zeros(3), reduction="none")
    assert np.isnan(res.loss[1]) and np.isnan(res.grad[1])
    np.testing.assert_allclose(res.loss[[0, 2]], [0.125, 2.5])
    np.testing.assert_allclose(res.grad[[0, 2]], [0.5, -1.0])
    assert np.isnan(float(fl.huber_loss(x, np.zeros(3)).loss))


def test_inputs_are_not_modified(rng):
    x, t = make_inputs(rng, (40, 3), np.float32)
    sw = rng.uniform(size=(40, 1)).astype(np.float32)
    copies = [a.copy() for a in (x, t, sw)]
    fl.huber_loss(x, t, sample_weight=sw)
    for before, after in zip(copies, (x, t, sw)):
        np.testing.assert_array_equal(before, after)


def test_empty():
    x = np.zeros((0,))
    assert np.isnan(float(fl.huber_loss(x, x).loss))
    s = fl.huber_loss(x, x, reduction="sum")
    assert float(s.loss) == 0.0
    assert s.grad.shape == (0,)


@pytest.mark.parametrize("shape,wshape", [((0,), (0,)), ((0, 3), (3,)), ((0, 3), (0, 1))], ids=str)
def test_empty_with_sample_weight(shape, wshape):
    x = np.zeros(shape)
    sw = np.ones(wshape)
    assert np.isnan(float(fl.huber_loss(x, x, sample_weight=sw).loss))
    s = fl.huber_loss(x, x, sample_weight=sw, reduction="sum")
    assert float(s.loss) == 0.0
    assert s.grad.shape == shape
    assert fl.huber_loss(x, x, sample_weight=sw, reduction="none").loss.shape == shape


def test_grad_false(rng):
    x, t = make_inputs(rng, (8, 2))
    res = fl.huber_loss(x, t, grad=False)
    assert res.grad is None
    check_result(res, naive.huber_loss(x, t)[0], None, np.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_grad_out_and_in_place(rng, dtype):
    x, t = make_inputs(rng, (8, 5), dtype)
    sw = rng.uniform(size=5).astype(dtype)
    want = naive.huber_loss(x, t, delta=0.7, sample_weight=sw)
    out = np.zeros_like(x)
    res = fl.huber_loss(x, t, delta=0.7, sample_weight=sw, grad_out=out)
    assert res.grad is out
    check_result(res, *want, dtype)
    res = fl.huber_loss(x, t, delta=0.7, sample_weight=sw, grad_out=x)
    assert res.grad is x
    check_result(res, *want, dtype)


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


def test_tiny_input_serial_path(rng):
    x, t = make_inputs(rng, (3,))
    res, want = run_both(x, t)
    check_result(res, *want, np.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_large_input_parallel_path(rng, dtype):
    x, t = make_inputs(rng, (4096, 300), dtype)
    sw = rng.uniform(size=(4096, 1)).astype(dtype)
    for reduction in ["mean", "none"]:
        res, want = run_both(x, t, sample_weight=sw, reduction=reduction)
        check_result(res, *want, dtype)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("case,kwargs,name", [
    ("delta_zero", dict(delta=0.0), "delta"),
    ("delta_negative", dict(delta=-1.0), "delta"),
    ("target_shape", dict(target=np.zeros((6, 5))), "target"),
    ("sample_weight_shape", dict(sample_weight=np.ones(6)), "sample_weight"),
    ("reduction", dict(reduction="max"), "reduction"),
], ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("mode", ["grad_out", "in_place"])
def test_bad_input_raises_and_changes_nothing(rng, case, kwargs, name, mode):
    x = rng.normal(size=(6, 4))
    kwargs = dict(kwargs)
    t = kwargs.pop("target", np.zeros((6, 4)))
    before = x.copy()
    out = np.full_like(x, 9.0)
    with pytest.raises((ValueError, TypeError), match=name):
        fl.huber_loss(x, t, grad_out=out if mode == "grad_out" else x, **kwargs)
    np.testing.assert_array_equal(x, before)
    assert np.all(out == 9.0)


@pytest.mark.parametrize("bad", [np.zeros((6, 4), np.float32), np.zeros((6, 3)), np.zeros(24)],
                         ids=["dtype", "shape", "flat"])
def test_bad_grad_out_rejected(rng, bad):
    x = rng.normal(size=(6, 4))
    before = bad.copy()
    with pytest.raises((TypeError, ValueError), match="grad_out"):
        fl.huber_loss(x, np.zeros((6, 4)), grad_out=bad)
    np.testing.assert_array_equal(bad, before)


def test_non_float_input_rejected():
    with pytest.raises((TypeError, ValueError), match="input"):
        fl.huber_loss(np.arange(6), np.zeros(6))
