"""fastloss.sigmoid_focal_loss (torchvision.ops.sigmoid_focal_loss) against naive.py."""
import numpy as np
import pytest

import fastloss as fl
import naive
from naive import check_result, finite_difference

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


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("alpha", [0.25, -1.0, 0.9])
def test_matches_reference(rng, gamma, alpha, reduction):
    x, t = make_inputs(rng, (9, 7))
    res, want = run_both(x, t, alpha=alpha, gamma=gamma, reduction=reduction)
    check_result(res, *want, np.float64)


def test_defaults_are_torchvision_defaults(rng):
    x, t = make_inputs(rng, (5, 4))
    res = fl.sigmoid_focal_loss(x, t)
    check_result(res, *naive.sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0, reduction="mean"), np.float64)


@pytest.mark.parametrize("gamma", [0.0, 1.5, 2.0])
def test_soft_targets(rng, gamma):
    x, t = make_inputs(rng, (6, 5), soft=True)
    res, want = run_both(x, t, alpha=0.3, gamma=gamma)
    check_result(res, *want, np.float64)


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


def test_gamma_zero_alpha_off_is_binary_cross_entropy(rng):
    x, t = make_inputs(rng, (8, 3), soft=True)
    res = fl.sigmoid_focal_loss(x, t, alpha=-1, gamma=0.0, reduction="none")
    bce = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
    np.testing.assert_allclose(res.loss, bce, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(res.grad, 1 / (1 + np.exp(-x)) - t, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("shape", [(17,), (2, 3, 4), (1,), (3, 1, 5)])
def test_any_shape(rng, shape):
    x, t = make_inputs(rng, shape)
    for reduction in REDUCTIONS:
        res, want = run_both(x, t, reduction=reduction)
        check_result(res, *want, np.float64)
    assert fl.sigmoid_focal_loss(x, t, reduction="none").loss.shape == shape


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_dtypes(rng, dtype, reduction):
    x, t = make_inputs(rng, (12, 10), dtype)
    res, want = run_both(x, t, reduction=reduction)
    assert res.grad.dtype == np.dtype(dtype)
    check_result(res, *want, dtype)


def test_non_contiguous(rng):
    xb, tb = make_inputs(rng, (10, 12))
    x = xb.T[::2]  # (6, 10)
    t = tb.T[1::2]  # (6, 10)
    assert not x.flags.c_contiguous and not t.flags.c_contiguous
    res, want = run_both(x, t, gamma=1.0)
    check_result(res, *want, np.float64)


# ------------------------------------------------------ saturated logits


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("alpha", [0.25, -1.0])
def test_saturated_logits_finite(dtype, gamma, alpha):
    # torchvision gives NaN gradients here for gamma < 1; the spec asks for finite ones
    x = np.array([1e4, 1e4, -1e4, -1e4, 50.0, -50.0, 100.0, -100.0], dtype=dtype)
    t = np.array([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=dtype)
    for reduction in ["none", "sum"]:
        res = fl.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction=reduction)
        assert np.all(np.isfinite(res.loss))
        assert np.all(np.isfinite(res.grad)), res.grad
        want = naive.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction=reduction)
        check_result(res, *want, dtype, loss_scale=1e4)


def test_saturated_logits_float16():
    x = np.array([6e4, 6e4, -6e4, -6e4, 20.0, -20.0], dtype=np.float16)
    t = np.array([1, 0, 1, 0, 1, 1], dtype=np.float16)
    for gamma in [0.0, 0.5, 2.0]:
        res = fl.sigmoid_focal_loss(x, t, gamma=gamma, reduction="none")
        assert np.all(np.isfinite(res.grad))
        check_result(res, *naive.sigmoid_focal_loss(x, t, gamma=gamma, reduction="none"), np.float16,
                     loss_scale=6e4)


# ----------------------------------------------------------- the interface


def test_nan_propagates_elementwise():
    x = np.array([0.5, np.nan, -3.0])
    t = np.array([1.0, 0.0, 0.0])
    res = fl.sigmoid_focal_loss(x, t, reduction="none")
    want_loss, want_grad = naive.sigmoid_focal_loss(x[[0, 2]], t[[0, 2]], reduction="none")
    assert np.isnan(res.loss[1]) and np.isnan(res.grad[1])
    np.testing.assert_allclose(res.loss[[0, 2]], want_loss, rtol=1e-12)
    np.testing.assert_allclose(res.grad[[0, 2]], want_grad, rtol=1e-12)


def test_inputs_are_not_modified(rng):
    x, t = make_inputs(rng, (40, 3), np.float32, soft=True)
    xc, tc = x.copy(), t.copy()
    fl.sigmoid_focal_loss(x, t)
    np.testing.assert_array_equal(x, xc)
    np.testing.assert_array_equal(t, tc)


def test_empty():
    x = np.zeros((0, 4))
    assert np.isnan(float(fl.sigmoid_focal_loss(x, x).loss))
    s = fl.sigmoid_focal_loss(x, x, reduction="sum")
    assert float(s.loss) == 0.0
    assert s.grad.shape == (0, 4)


def test_grad_false_and_grad_out(rng):
    x, t = make_inputs(rng, (6, 4), np.float32)
    want = naive.sigmoid_focal_loss(x, t, gamma=1.0)
    res = fl.sigmoid_focal_loss(x, t, gamma=1.0, grad=False)
    assert res.grad is None
    check_result(res, want[0], None, np.float32)
    out = np.full_like(x, np.inf)
    res = fl.sigmoid_focal_loss(x, t, gamma=1.0, grad_out=out)
    assert res.grad is out
    check_result(res, *want, np.float32)


def test_finite_differences(rng):
    x, t = make_inputs(rng, (5, 4), soft=True)
    for gamma, alpha in [(2.0, 0.25), (0.5, -1.0)]:
        res = fl.sigmoid_focal_loss(x, t, gamma=gamma, alpha=alpha)

        def f(z):
            return fl.sigmoid_focal_loss(z, t, gamma=gamma, alpha=alpha, grad=False).loss

        for flat in rng.choice(x.size, size=5, replace=False):
            idx = np.unravel_index(flat, x.shape)
            np.testing.assert_allclose(res.grad[idx], finite_difference(f, x, idx), rtol=1e-6, atol=1e-9)


def test_large_input_parallel_path(rng):
    x, t = make_inputs(rng, (4096, 300), np.float32)
    for reduction in ["mean", "none"]:
        res, want = run_both(x, t, reduction=reduction)
        check_result(res, *want, np.float32)


def test_tiny_input_serial_path(rng):
    x, t = make_inputs(rng, (3,))
    res, want = run_both(x, t)
    check_result(res, *want, np.float64)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("case,kwargs,name", [
    ("targets_shape", dict(targets=np.zeros((6, 3))), "target"),
    ("gamma_negative", dict(gamma=-1.0), "gamma"),
    ("reduction", dict(reduction="mean_sum"), "reduction"),
    ("grad_out_shape", dict(grad_out=np.zeros((4, 6))), "grad_out"),
    ("grad_out_dtype", dict(grad_out=np.zeros((6, 4), np.float32)), "grad_out"),
])
def test_bad_input(rng, case, kwargs, name):
    x = rng.normal(size=(6, 4))
    kwargs = dict(kwargs)
    t = kwargs.pop("targets", np.zeros((6, 4)))
    out = kwargs.get("grad_out", np.full((6, 4), 3.0))
    kwargs["grad_out"] = out
    before = out.copy()
    xb = x.copy()
    with pytest.raises((ValueError, TypeError), match=name):
        fl.sigmoid_focal_loss(x, t, **kwargs)
    np.testing.assert_array_equal(out, before)
    np.testing.assert_array_equal(x, xb)


def test_non_float_logits_rejected():
    with pytest.raises((TypeError, ValueError), match="logits"):
        fl.sigmoid_focal_loss(np.zeros((3, 2), dtype=np.int64), np.zeros((3, 2)))
