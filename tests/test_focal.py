"""fastloss.focal_loss (multi-class softmax focal loss) against naive.py."""
import numpy as np
import pytest

import fastloss as fl
import naive
from fastloss.cpu._rows import NARROW_ROW
from naive import check_result, finite_difference

REDUCTIONS = ["mean", "sum", "none"]
# Integer-target rows of at most NARROW_ROW classes take the CPU kernel's inline
# path, wider ones the row helpers: option and edge-case tests run both.
WIDTHS = pytest.mark.parametrize("C", [6, NARROW_ROW + 3], ids=["narrow", "wide"])


def make_inputs(rng, batch, C, dtype=np.float64, *, prob=False, ignore_frac=0.0, ignore_index=-100,
                sample_weight=False, scale=3.0):
    batch = tuple(batch)
    x = (rng.normal(size=batch + (C,)) * scale).astype(dtype)
    if prob:
        t = rng.dirichlet(np.ones(C), size=batch).astype(dtype)
    else:
        t = rng.integers(0, C, size=batch)
        if ignore_frac:
            t[rng.random(batch) < ignore_frac] = ignore_index
    kw = {}
    if sample_weight:
        kw["sample_weight"] = rng.uniform(0.0, 2.0, size=batch).astype(dtype)
    return x, t, kw


def run_both(x, t, **kw):
    return fl.focal_loss(x, t, **kw), naive.focal_loss(x, t, **kw)


def _alpha(kind, C, rng, dtype=np.float64):
    if kind == "none":
        return None
    if kind == "scalar":
        return 0.25
    return rng.uniform(0.1, 1.0, size=C).astype(dtype)


@WIDTHS
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.7])
@pytest.mark.parametrize("alpha", ["none", "scalar", "array"])
def test_integer_targets(rng, gamma, alpha, reduction, C):
    x, t, kw = make_inputs(rng, (12,), C, ignore_frac=0.25, sample_weight=(alpha == "array"))
    res, want = run_both(x, t, gamma=gamma, alpha=_alpha(alpha, C, rng), reduction=reduction, **kw)
    check_result(res, *want, np.float64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("alpha", ["none", "array"])
def test_probability_targets(rng, gamma, alpha, reduction):
    x, t, kw = make_inputs(rng, (10,), 5, prob=True, sample_weight=True)
    res, want = run_both(x, t, gamma=gamma, alpha=_alpha(alpha, 5, rng), reduction=reduction, **kw)
    check_result(res, *want, np.float64)


def test_alpha_not_in_mean_denominator(rng):
    x, t, kw = make_inputs(rng, (10,), 4, ignore_frac=0.3, sample_weight=True)
    a = fl.focal_loss(x, t, alpha=0.5, **kw)
    b = fl.focal_loss(x, t, **kw)
    np.testing.assert_allclose(float(a.loss), 0.5 * float(b.loss), rtol=1e-12)
    np.testing.assert_allclose(a.grad, 0.5 * b.grad, rtol=1e-12, atol=1e-16)
    s = fl.focal_loss(x, t, reduction="sum", **kw)
    keep = t != -100
    np.testing.assert_allclose(float(b.loss) * kw["sample_weight"][keep].sum(), float(s.loss), rtol=1e-12)


@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gamma_zero_equals_cross_entropy(rng, prob, reduction):
    x, t, kw = make_inputs(rng, (2, 5), 7, prob=prob, ignore_frac=0.0 if prob else 0.3, sample_weight=True)
    a = fl.focal_loss(x, t, gamma=0.0, reduction=reduction, **kw)
    b = fl.softmax_cross_entropy(x, t, reduction=reduction, **kw)
    np.testing.assert_allclose(np.asarray(a.loss), np.asarray(b.loss), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(a.grad, b.grad, rtol=1e-10, atol=1e-14)


@WIDTHS
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("prob", [False, True])
def test_low_precision_dtypes(rng, dtype, reduction, prob, C):
    x, t, kw = make_inputs(rng, (16,), C, dtype, prob=prob, ignore_frac=0.0 if prob else 0.2,
                           sample_weight=True)
    alpha = _alpha("array", C, rng, dtype)
    res, want = run_both(x, t, gamma=2.0, alpha=alpha, reduction=reduction, **kw)
    assert res.grad.dtype == np.dtype(dtype)
    check_result(res, *want, dtype)


@pytest.mark.parametrize("C", [1, 2])
def test_tiny_class_counts(rng, C):
    x, t, _ = make_inputs(rng, (7,), C)
    res, want = run_both(x, t, gamma=1.5, alpha=0.3)
    check_result(res, *want, np.float64)


def test_vocabulary_sized_classes(rng):
    x, t, _ = make_inputs(rng, (3,), 50257, np.float32)
    res, want = run_both(x, t, gamma=2.0)
    check_result(res, *want, np.float32)


def test_three_dimensional_batch(rng):
    x, t, kw = make_inputs(rng, (2, 3), 5, ignore_frac=0.3, sample_weight=True)
    for reduction in REDUCTIONS:
        res, want = run_both(x, t, gamma=2.0, alpha=0.5, reduction=reduction, **kw)
        check_result(res, *want, np.float64)
    assert fl.focal_loss(x, t, reduction="none").loss.shape == (2, 3)


def test_non_contiguous(rng):
    x = (rng.normal(size=(5, 14)) * 2).T[::2]  # (7, 5), strided and F-ordered
    assert not x.flags.c_contiguous and not x.flags.f_contiguous
    t = rng.integers(0, 5, size=(7, 2))[:, 1]
    sw = rng.uniform(size=21)[::3]
    alpha = rng.uniform(0.1, 1, size=10)[::2]
    res, want = run_both(x, t, gamma=2.0, alpha=alpha, sample_weight=sw)
    check_result(res, *want, np.float64)
    tp = rng.dirichlet(np.ones(5), size=14)[::2]
    res, want = run_both(x, tp, gamma=0.5)
    check_result(res, *want, np.float64)


# ----------------------------------------------------- saturated logits


@pytest.mark.parametrize("C", [4, NARROW_ROW + 3], ids=["narrow", "wide"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 0.9, 1.0, 2.0])
def test_saturated_logits_finite_gradient(rng, dtype, gamma, C):
    # p_y == 1 exactly in floating point: (1 - p)**(gamma - 1) is infinite for gamma < 1,
    # but the gradient is finite (the NaN of optax/kornia)
    big = 1e4 if dtype != np.float16 else 6e4
    x = np.zeros((6, C), dtype)
    t = np.array([0, 1, 2, 3, 0, 1])
    x[np.arange(6), t] = big  # confident and right
    x[4] = 0
    x[4, 2] = big  # confident and wrong
    x[5] = rng.normal(size=C)
    res = fl.focal_loss(x, t, gamma=gamma, reduction="none")
    assert np.all(np.isfinite(res.grad)), res.grad
    assert np.all(np.isfinite(res.loss[[0, 1, 2, 3, 5]]))
    want = naive.focal_loss(x, t, gamma=gamma, reduction="none")
    check_result(res, *want, dtype, loss_scale=float(big))


@pytest.mark.parametrize("C", [3, NARROW_ROW + 3], ids=["narrow", "wide"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("gamma", [0.3, 0.7, 2.0])
def test_nearly_saturated_logits_keep_relative_precision(dtype, gamma, C):
    # 1 - p_y between 1e-3 and 1e-30: each row's loss and gradient, tiny as they are, keep
    # their relative precision (1 - p_y = sum of the other probabilities, no cancellation)
    # (float32 stops where q**(1+gamma) would leave the normal range)
    margins = [7.0, 15.0, 30.0, 50.0, 70.0] if dtype == np.float64 else [7.0, 12.0, 15.0, 20.0]
    x = np.full((len(margins), C), -np.inf, dtype)  # beyond 3 classes: logits of -inf
    x[:, 1:3] = 0
    x[:, 0] = margins
    t = np.zeros(len(margins), dtype=int)
    res = fl.focal_loss(x, t, gamma=gamma, reduction="none")
    loss, grad = naive.focal_loss(x, t, gamma=gamma, reduction="none")
    assert np.all(np.isfinite(res.grad))
    rtol = 1e-9 if dtype == np.float64 else 1e-4
    for i, margin in enumerate(margins):
        np.testing.assert_allclose(float(res.loss[i]), loss[i], rtol=rtol, atol=0,
                                   err_msg=f"loss of the row with margin {margin}")
        np.testing.assert_allclose(res.grad[i], grad[i], rtol=rtol, atol=0,
                                   err_msg=f"grad of the row with margin {margin}")


def test_minus_inf_where_probability_target_is_zero(rng):
    x = rng.normal(size=(6, 4))
    t = rng.dirichlet(np.ones(4), size=6)
    x[:, 3] = -np.inf
    t[:, 3] = 0.0
    t /= t.sum(axis=1, keepdims=True)
    res, want = run_both(x, t, gamma=0.5)
    assert np.isfinite(float(res.loss))
    assert np.all(np.isfinite(res.grad))
    check_result(res, *want, np.float64)


# ----------------------------------------------------------- the interface


@WIDTHS
def test_nan_logit_propagates_to_its_row(rng, C):
    x = rng.normal(size=(4, C))
    x[2, 1] = np.nan
    res = fl.focal_loss(x, np.array([0, 1, 2, 0]), reduction="none")
    assert np.isnan(res.loss[2]) and np.all(np.isnan(res.grad[2]))
    assert np.all(np.isfinite(res.loss[[0, 1, 3]])) and np.all(np.isfinite(res.grad[[0, 1, 3]]))


def test_inputs_are_not_modified(rng):
    x, t, kw = make_inputs(rng, (50,), 6, np.float32, ignore_frac=0.2, sample_weight=True)
    alpha = rng.uniform(size=6).astype(np.float32)
    copies = [a.copy() for a in (x, t, kw["sample_weight"], alpha)]
    fl.focal_loss(x, t, alpha=alpha, gamma=0.5, **kw)
    for before, after in zip(copies, (x, t, kw["sample_weight"], alpha)):
        np.testing.assert_array_equal(before, after)


def test_empty_batch():
    x = np.zeros((0, 3))
    t = np.zeros(0, dtype=np.int64)
    assert np.isnan(float(fl.focal_loss(x, t).loss))
    s = fl.focal_loss(x, t, reduction="sum")
    assert float(s.loss) == 0.0
    assert s.grad.shape == (0, 3)
    assert fl.focal_loss(x, t, reduction="none").loss.shape == (0,)


def test_grad_false(rng):
    x, t, kw = make_inputs(rng, (7,), 4, ignore_frac=0.3)
    res = fl.focal_loss(x, t, gamma=2.0, grad=False)
    assert res.grad is None
    check_result(res, naive.focal_loss(x, t, gamma=2.0)[0], None, np.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_grad_out_and_in_place(rng, dtype):
    x, t, kw = make_inputs(rng, (9,), 5, dtype, ignore_frac=0.2, sample_weight=True)
    want = naive.focal_loss(x, t, gamma=1.5, alpha=0.4, **kw)
    out = np.full_like(x, np.nan)
    res = fl.focal_loss(x, t, gamma=1.5, alpha=0.4, grad_out=out, **kw)
    assert res.grad is out
    check_result(res, *want, dtype)
    res = fl.focal_loss(x, t, gamma=1.5, alpha=0.4, grad_out=x, **kw)
    assert res.grad is x
    check_result(res, *want, dtype)


@WIDTHS
@pytest.mark.parametrize("prob", [False, True])
def test_finite_differences(rng, prob, C):
    x, t, kw = make_inputs(rng, (6,), C, prob=prob, sample_weight=True, ignore_frac=0.0 if prob else 0.2)
    alpha = rng.uniform(0.2, 1, C)
    for gamma in [0.5, 2.0]:
        res = fl.focal_loss(x, t, gamma=gamma, alpha=alpha, **kw)

        def f(z):
            return fl.focal_loss(z, t, gamma=gamma, alpha=alpha, grad=False, **kw).loss

        for flat in rng.choice(x.size, size=5, replace=False):
            idx = np.unravel_index(flat, x.shape)
            np.testing.assert_allclose(res.grad[idx], finite_difference(f, x, idx), rtol=1e-6, atol=1e-8)


def test_tiny_input_serial_path(rng):
    x, t, _ = make_inputs(rng, (2,), 3)
    res, want = run_both(x, t, gamma=2.0, alpha=0.25)
    check_result(res, *want, np.float64)


@pytest.mark.parametrize("C", [10, 300], ids=["narrow", "wide"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_large_input_parallel_path(rng, dtype, C):
    N = 4096 if C > NARROW_ROW else 16384  # over the parallel threshold either way
    x, t, kw = make_inputs(rng, (N,), C, dtype, ignore_frac=0.1, sample_weight=True)
    alpha = rng.uniform(0.1, 1, C).astype(dtype)
    for reduction in ["mean", "none"]:
        res, want = run_both(x, t, gamma=2.0, alpha=alpha, reduction=reduction, **kw)
        check_result(res, *want, dtype)


# ---------------------------------------------------------------- bad input


def _bad_cases(N, C):
    t = np.arange(N) % C
    return {
        "label_too_big": (dict(target=np.where(t == 0, C, t)), "target"),
        "label_negative": (dict(target=np.where(t == 0, -3, t)), "target"),
        "target_shape": (dict(target=t[:-1]), "target"),
        "prob_target_shape": (dict(target=np.full((N, C + 1), 0.1)), "target"),
        "gamma_negative": (dict(gamma=-0.5), "gamma"),
        "alpha_shape": (dict(alpha=np.ones(C + 2)), "alpha"),
        "sample_weight_shape": (dict(sample_weight=np.ones(N - 1)), "sample_weight"),
        "reduction": (dict(reduction="average"), "reduction"),
    }


@pytest.mark.parametrize("mode", ["grad_out", "in_place"])
@pytest.mark.parametrize("case", list(_bad_cases(6, 4)))
def test_bad_input_raises_and_changes_nothing(rng, case, mode):
    x = rng.normal(size=(6, 4))
    kwargs, name = _bad_cases(6, 4)[case]
    kwargs = dict(kwargs)
    target = kwargs.pop("target", np.arange(6) % 4)
    before = x.copy()
    out = np.full_like(x, -5.0)
    with pytest.raises((ValueError, TypeError), match=name):
        fl.focal_loss(x, target, grad_out=out if mode == "grad_out" else x, **kwargs)
    np.testing.assert_array_equal(x, before)
    assert np.all(out == -5.0)


def test_out_of_range_label_is_value_error(rng):
    with pytest.raises(ValueError, match="target"):
        fl.focal_loss(rng.normal(size=(3, 4)), np.array([0, 4, 1]))


def test_ignore_index_label_allowed(rng):
    x = rng.normal(size=(4, 3))
    t = np.array([0, 7, 2, 7])
    res, want = run_both(x, t, ignore_index=7)
    check_result(res, *want, np.float64)
    assert np.all(res.grad[[1, 3]] == 0)


def test_non_float_logits_rejected():
    with pytest.raises((TypeError, ValueError), match="logits"):
        fl.focal_loss(np.ones((3, 4), dtype=np.int32), np.array([0, 1, 2]))


@pytest.mark.parametrize("bad", [np.zeros((6, 4), np.float32), np.zeros((6, 3)), np.zeros((4, 6))],
                         ids=["dtype", "shape", "transposed"])
def test_bad_grad_out_rejected(rng, bad):
    x = rng.normal(size=(6, 4))
    before = bad.copy()
    with pytest.raises((TypeError, ValueError), match="grad_out"):
        fl.focal_loss(x, np.arange(6) % 4, grad_out=bad)
    np.testing.assert_array_equal(bad, before)
