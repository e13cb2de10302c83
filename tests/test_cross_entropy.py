"""fastloss.softmax_cross_entropy against the float64 reference in naive.py."""
import numpy as np
import pytest

import fastloss as fl
import naive
from fastloss.cpu._rows import NARROW_ROW
from naive import check_result, finite_difference

REDUCTIONS = ["mean", "sum", "none"]
# Integer-target rows of at most NARROW_ROW classes take the CPU kernel's inline
# path, wider ones the row helpers: option and edge-case tests run both.
WIDTHS = pytest.mark.parametrize("C", [7, NARROW_ROW + 3], ids=["narrow", "wide"])


def make_inputs(rng, batch, C, dtype=np.float64, *, prob=False, ignore_frac=0.0, ignore_index=-100,
                weight=False, sample_weight=False, scale=3.0):
    batch = tuple(batch)
    x = (rng.normal(size=batch + (C,)) * scale).astype(dtype)
    if prob:
        t = rng.dirichlet(np.ones(C), size=batch).astype(dtype) if C > 1 else np.ones(batch + (1,), dtype)
    else:
        t = rng.integers(0, C, size=batch)
        if ignore_frac:
            t[rng.random(batch) < ignore_frac] = ignore_index
    kw = {}
    if weight:
        kw["weight"] = rng.uniform(0.2, 2.0, size=C).astype(dtype)
    if sample_weight:
        kw["sample_weight"] = rng.uniform(0.0, 2.0, size=batch).astype(dtype)
    return x, t, kw


def run_both(x, t, **kw):
    res = fl.softmax_cross_entropy(x, t, **kw)
    want = naive.softmax_cross_entropy(x, t, **kw)
    return res, want


# --------------------------------------------------------------- options

INT_OPTIONS = {
    "plain": dict(),
    "weight": dict(weight=True),
    "sample_weight": dict(sample_weight=True),
    "ignore": dict(ignore_frac=0.3),
    "ignore_custom_in_range": dict(ignore_frac=0.3, ignore_index=2),
    "smoothing": dict(label_smoothing=0.1),
    "smoothing_one": dict(label_smoothing=1.0),
    "z_loss": dict(z_loss=0.05),
    "softcap": dict(softcap=2.5),
    "smoothing_ignore_weight": dict(weight=True, ignore_frac=0.3, label_smoothing=0.2),
    "smoothing_ignore_weight_sw_z": dict(weight=True, sample_weight=True, ignore_frac=0.3,
                                         label_smoothing=0.15, z_loss=0.01),
    "everything": dict(weight=True, sample_weight=True, ignore_frac=0.25, label_smoothing=0.1,
                       z_loss=0.02, softcap=4.0),
}

PROB_OPTIONS = {
    "plain": dict(),
    "weight": dict(weight=True),
    "smoothing": dict(label_smoothing=0.3),
    "sample_weight_z": dict(sample_weight=True, z_loss=0.03),
    "softcap": dict(softcap=3.0),
    "everything": dict(weight=True, sample_weight=True, label_smoothing=0.1, z_loss=0.02, softcap=4.0),
}

_MAKE_KEYS = {"ignore_frac", "ignore_index", "weight", "sample_weight"}


def _split(opts):
    make = {k: v for k, v in opts.items() if k in _MAKE_KEYS}
    call = {k: v for k, v in opts.items() if k not in _MAKE_KEYS}
    if "ignore_index" in opts:
        call["ignore_index"] = opts["ignore_index"]
    return make, call


@WIDTHS
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(INT_OPTIONS))
def test_integer_targets_options(rng, name, reduction, C):
    make, call = _split(INT_OPTIONS[name])
    x, t, kw = make_inputs(rng, (13,), C, **make)
    if name == "ignore_custom_in_range":
        assert np.any(t == 2)
    res, want = run_both(x, t, reduction=reduction, **kw, **call)
    check_result(res, *want, np.float64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(PROB_OPTIONS))
def test_probability_targets_options(rng, name, reduction):
    make, call = _split(PROB_OPTIONS[name])
    x, t, kw = make_inputs(rng, (11,), 6, prob=True, **make)
    res, want = run_both(x, t, reduction=reduction, **kw, **call)
    check_result(res, *want, np.float64)


def test_probability_targets_ignore_index_does_not_apply(rng):
    # with probability targets ignore_index has no meaning: nothing is ignored
    x, t, _ = make_inputs(rng, (9,), 5, prob=True)
    a = fl.softmax_cross_entropy(x, t, ignore_index=0)
    b = fl.softmax_cross_entropy(x, t)
    want = naive.softmax_cross_entropy(x, t)
    check_result(a, *want, np.float64)
    check_result(b, *want, np.float64)


def test_one_hot_probability_targets_equal_integer_targets(rng):
    x, y, kw = make_inputs(rng, (10,), 5, weight=False, sample_weight=True)
    onehot = np.eye(5)[y]
    a = fl.softmax_cross_entropy(x, y, label_smoothing=0.1, **kw)
    b = fl.softmax_cross_entropy(x, onehot, label_smoothing=0.1, **kw)
    np.testing.assert_allclose(float(a.loss), float(b.loss), rtol=1e-12)
    np.testing.assert_allclose(a.grad, b.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_none_grad_is_grad_of_sum(rng, reduction):
    x, t, kw = make_inputs(rng, (8,), 4, weight=True, sample_weight=True, ignore_frac=0.3)
    res = fl.softmax_cross_entropy(x, t, reduction=reduction, label_smoothing=0.1, **kw)
    ref = fl.softmax_cross_entropy(x, t, reduction="sum", label_smoothing=0.1, **kw)
    if reduction == "none":
        assert res.loss.shape == (8,)
        np.testing.assert_allclose(res.loss.sum(), float(ref.loss), rtol=1e-12)
        np.testing.assert_allclose(res.grad, ref.grad, rtol=1e-12, atol=1e-15)
    else:
        denom = float(np.sum(kw["weight"][t[t != -100]] * kw["sample_weight"][t != -100]))
        np.testing.assert_allclose(float(res.loss) * denom, float(ref.loss), rtol=1e-12)
        np.testing.assert_allclose(res.grad * denom, ref.grad, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------- dtypes


@WIDTHS
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", ["plain", "combo", "prob_combo"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_dtypes(rng, dtype, case, reduction, C):
    if case == "plain":
        x, t, kw = make_inputs(rng, (16,), C, dtype)
        call = {}
    elif case == "combo":
        x, t, kw = make_inputs(rng, (16,), C, dtype, weight=True, sample_weight=True, ignore_frac=0.25)
        call = dict(label_smoothing=0.1, z_loss=0.01)
    else:
        x, t, kw = make_inputs(rng, (16,), C, dtype, prob=True, weight=True, sample_weight=True)
        call = dict(label_smoothing=0.1, softcap=5.0)
    res = fl.softmax_cross_entropy(x, t, reduction=reduction, **kw, **call)
    want = naive.softmax_cross_entropy(x, t, reduction=reduction, **kw, **call)
    assert res.grad.dtype == np.dtype(dtype)
    check_result(res, *want, dtype)


@pytest.mark.parametrize("tdtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                                    np.uint64, np.intp])
def test_any_integer_label_dtype(rng, tdtype):
    x, t, _ = make_inputs(rng, (12,), 6)
    t = t.astype(tdtype)
    res, want = run_both(x, t)
    check_result(res, *want, np.float64)


def test_unsigned_labels_with_in_range_ignore_index(rng):
    x, t, _ = make_inputs(rng, (12,), 6)
    t = t.astype(np.uint8)
    t[[1, 4]] = 255
    res, want = run_both(x, t, ignore_index=255)
    check_result(res, *want, np.float64)


# ------------------------------------------------------------------ shapes


@pytest.mark.parametrize("C", [1, 2])
@pytest.mark.parametrize("prob", [False, True])
def test_tiny_class_counts(rng, C, prob):
    x, t, kw = make_inputs(rng, (6,), C, prob=prob, weight=True, sample_weight=True)
    res, want = run_both(x, t, label_smoothing=0.1, **kw)
    check_result(res, *want, np.float64)
    if C == 1:
        # a single class: log p == 0 everywhere, nothing to learn
        np.testing.assert_allclose(float(res.loss), 0.0, atol=1e-12)
        np.testing.assert_allclose(res.grad, 0.0, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_vocabulary_sized_classes(rng, dtype):
    x, t, kw = make_inputs(rng, (3,), 50257, dtype, weight=True)
    res, want = run_both(x, t, label_smoothing=0.1, z_loss=1e-4, **kw)
    check_result(res, *want, dtype)


@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_three_dimensional_batch(rng, prob, reduction):
    x, t, kw = make_inputs(rng, (2, 3), 5, prob=prob, sample_weight=True, weight=True,
                           ignore_frac=0.0 if prob else 0.3)
    res, want = run_both(x, t, reduction=reduction, label_smoothing=0.05, **kw)
    if reduction == "none":
        assert res.loss.shape == (2, 3)
    assert res.grad.shape == (2, 3, 5)
    check_result(res, *want, np.float64)


def test_single_sample_without_batch_dimension(rng):
    # logits (C,) with a 0-d target: the batch shape is ()
    x = rng.normal(size=7)
    t = np.array(3)
    res, want = run_both(x, t)
    check_result(res, *want, np.float64)
    res = fl.softmax_cross_entropy(x, t, reduction="none")
    assert np.shape(res.loss) == ()
    assert res.grad.shape == (7,)


# ------------------------------------------------------------ memory layout


def test_transposed_logits(rng):
    base = rng.normal(size=(6, 20)) * 2  # (C, N)
    x = base.T
    assert not x.flags.c_contiguous
    t = rng.integers(0, 6, size=20)
    sw = rng.uniform(size=40)[::2]
    res, want = run_both(x, t, sample_weight=sw, label_smoothing=0.1)
    check_result(res, *want, np.float64)
    assert res.grad.shape == (20, 6)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_strided_views(rng, dtype):
    base = (rng.normal(size=(30, 21)) * 2).astype(dtype)
    x = base[::3, ::2]  # (10, 11), both strides odd multiples
    tbase = rng.integers(0, 11, size=(10, 3))
    t = tbase[:, 1]
    wbase = rng.uniform(0.5, 1.5, size=22).astype(dtype)
    w = wbase[::2]
    res, want = run_both(x, t, weight=w, z_loss=0.01)
    check_result(res, *want, dtype)


def test_strided_probability_targets(rng):
    x = rng.normal(size=(8, 5))
    t = rng.dirichlet(np.ones(5), size=16)[::2]  # every other row
    assert not t.flags.c_contiguous
    res, want = run_both(x, t)
    check_result(res, *want, np.float64)
    t2 = rng.dirichlet(np.ones(8), size=5).T  # (8, 5), F-ordered; rows not normalized: still soft targets
    assert not t2.flags.c_contiguous
    res, want = run_both(x, t2)
    check_result(res, *want, np.float64)


# ------------------------------------------------------------ extreme values


@WIDTHS
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_huge_logits(rng, dtype, C):
    x = (rng.choice([-1e4, 0.0, 1e4], size=(10, C)) + rng.normal(size=(10, C))).astype(dtype)
    t = rng.integers(0, C, size=10)
    res, want = run_both(x, t, weight=rng.uniform(0.5, 1, C).astype(dtype), label_smoothing=0.1)
    assert np.isfinite(float(res.loss))
    assert np.all(np.isfinite(res.grad))
    # round-off of logits of magnitude 1e4
    check_result(res, *want, dtype, loss_scale=1e4 if dtype == np.float32 else None)


@WIDTHS
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_minus_inf_logits_off_target(rng, dtype, reduction, C):
    x = rng.normal(size=(8, C)).astype(dtype)
    t = rng.integers(0, C, size=8)
    mask = rng.random((8, C)) < 0.5
    mask[np.arange(8), t] = False
    x[mask] = -np.inf
    res, want = run_both(x, t, reduction=reduction, sample_weight=rng.uniform(size=8).astype(dtype),
                         z_loss=0.01)
    assert np.all(np.isfinite(res.loss))
    assert np.all(np.isfinite(res.grad))
    assert np.all(res.grad[mask] == 0)
    check_result(res, *want, dtype)


def test_minus_inf_logits_where_probability_target_is_zero(rng):
    x = rng.normal(size=(8, 5))
    t = rng.dirichlet(np.ones(5), size=8)
    mask = rng.random((8, 5)) < 0.4
    mask[:, 0] = False
    x[mask] = -np.inf
    t[mask] = 0.0
    t /= t.sum(axis=1, keepdims=True)
    res, want = run_both(x, t)
    assert np.isfinite(float(res.loss))
    assert np.all(np.isfinite(res.grad))
    assert np.all(res.grad[mask] == 0)
    check_result(res, *want, np.float64)


@WIDTHS
def test_nan_logit_propagates(rng, C):
    x = rng.normal(size=(4, C))
    x[1, 2] = np.nan
    res = fl.softmax_cross_entropy(x, np.array([0, 1, 2, 0]), reduction="none")
    assert np.isnan(res.loss[1])
    assert np.all(np.isfinite(res.loss[[0, 2, 3]]))
    assert np.all(np.isnan(res.grad[1]))
    assert np.all(np.isfinite(res.grad[[0, 2, 3]]))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("opts", [dict(), dict(z_loss=0.02, ignore_frac=0.3, sample_weight=True)],
                         ids=["plain", "z_ignore_sw"])
def test_inline_and_row_paths_agree_at_the_boundary(rng, dtype, opts):
    # NARROW_ROW classes take the inline path; one more class of logit -inf takes the
    # row helpers and changes neither the softmax nor the loss (no smoothing: eps/C would)
    opts = dict(opts)
    call = dict(z_loss=opts.pop("z_loss")) if "z_loss" in opts else {}
    x, t, kw = make_inputs(rng, (40,), NARROW_ROW, dtype, **opts)
    padded = np.concatenate([x, np.full((40, 1), -np.inf, dtype)], axis=1)
    for reduction in REDUCTIONS:
        narrow = fl.softmax_cross_entropy(x, t, reduction=reduction, **kw, **call)
        wide = fl.softmax_cross_entropy(padded, t, reduction=reduction, **kw, **call)
        rtol = 1e-12 if dtype == np.float64 else 2e-6
        np.testing.assert_allclose(wide.loss, narrow.loss, rtol=rtol)
        np.testing.assert_allclose(wide.grad[:, :-1], narrow.grad, rtol=rtol, atol=1e-7 * rtol)
        assert np.all(wide.grad[:, -1] == 0)


# ------------------------------------------------------------- empty / ignored


@pytest.mark.parametrize("prob", [False, True])
def test_empty_batch(prob):
    x = np.zeros((0, 4))
    t = np.zeros((0, 4)) if prob else np.zeros(0, dtype=np.int64)
    mean = fl.softmax_cross_entropy(x, t)
    assert np.isnan(float(mean.loss))
    assert mean.grad.shape == (0, 4)
    s = fl.softmax_cross_entropy(x, t, reduction="sum")
    assert float(s.loss) == 0.0
    n = fl.softmax_cross_entropy(x, t, reduction="none")
    assert n.loss.shape == (0,)
    assert n.grad.shape == (0, 4)


def test_every_row_ignored(rng):
    x = rng.normal(size=(5, 4))
    t = np.full(5, -100)
    assert np.isnan(float(fl.softmax_cross_entropy(x, t).loss))
    s = fl.softmax_cross_entropy(x, t, reduction="sum", label_smoothing=0.1, z_loss=0.1)
    assert float(s.loss) == 0.0
    assert np.all(s.grad == 0.0)
    n = fl.softmax_cross_entropy(x, t, reduction="none", label_smoothing=0.1, z_loss=0.1)
    assert np.all(n.loss == 0.0)


def test_ignored_rows_get_zero_gradient_and_loss(rng):
    x, t, kw = make_inputs(rng, (10,), 4, ignore_frac=0.5, weight=True, sample_weight=True)
    res = fl.softmax_cross_entropy(x, t, reduction="none", label_smoothing=0.3, z_loss=0.1, **kw)
    ign = t == -100
    assert ign.any() and (~ign).any()
    assert np.all(res.loss[ign] == 0.0)
    assert np.all(res.grad[ign] == 0.0)


# ------------------------------------------------------------- the interface


def test_result_is_lossgrad(rng):
    x, t, _ = make_inputs(rng, (5,), 3)
    res = fl.softmax_cross_entropy(x, t)
    assert isinstance(res, fl.LossGrad)
    assert isinstance(res, tuple) and len(res) == 2
    loss, grad = res
    assert loss is res.loss and grad is res.grad
    assert isinstance(loss, np.ndarray) and loss.shape == ()
    assert isinstance(float(loss), float)
    assert fl.LossGrad(1.0, None).loss == 1.0


def test_backend_of_numpy_is_cpu(rng):
    x = rng.normal(size=(3, 2))
    assert fl.backend_of(x) == "cpu"
    assert fl.backend_of(x, np.array([0, 1, 1])) == "cpu"
    assert fl.backend_of(x, 1.0, [1, 2]) == "cpu"


def test_explicit_cpu_backend(rng):
    x, t, kw = make_inputs(rng, (7,), 4, weight=True)
    a = fl.softmax_cross_entropy(x, t, backend="cpu", **kw)
    b = fl.softmax_cross_entropy(x, t, backend="auto", **kw)
    want = naive.softmax_cross_entropy(x, t, **kw)
    check_result(a, *want, np.float64)
    check_result(b, *want, np.float64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_grad_false(rng, reduction):
    x, t, kw = make_inputs(rng, (7,), 4, weight=True, ignore_frac=0.3)
    res = fl.softmax_cross_entropy(x, t, reduction=reduction, grad=False, label_smoothing=0.1, **kw)
    assert res.grad is None
    want_loss, _ = naive.softmax_cross_entropy(x, t, reduction=reduction, label_smoothing=0.1, **kw)
    check_result(res, want_loss, None, np.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_grad_out(rng, dtype):
    x, t, kw = make_inputs(rng, (9,), 5, dtype, ignore_frac=0.3)
    out = np.full(x.shape, 7.0, dtype=dtype)
    res = fl.softmax_cross_entropy(x, t, grad_out=out, label_smoothing=0.1, **kw)
    assert res.grad is out
    want = naive.softmax_cross_entropy(x, t, label_smoothing=0.1, **kw)
    check_result(res, *want, dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("prob", [False, True])
def test_grad_out_in_place(rng, dtype, prob):
    x, t, kw = make_inputs(rng, (9,), 5, dtype, prob=prob, weight=True, sample_weight=True)
    want = naive.softmax_cross_entropy(x.copy(), t, z_loss=0.01, softcap=3.0, **kw)
    res = fl.softmax_cross_entropy(x, t, grad_out=x, z_loss=0.01, softcap=3.0, **kw)
    assert res.grad is x
    check_result(res, *want, dtype)


# ----------------------------------------------------------- finite differences


@pytest.mark.parametrize("opts", [
    dict(),
    dict(label_smoothing=0.2, z_loss=0.05),
    dict(softcap=2.0, z_loss=0.05),
    dict(prob=True, label_smoothing=0.1, softcap=3.0),
], ids=["plain", "smoothing_z", "softcap_z", "prob"])
@WIDTHS
def test_finite_differences(rng, opts, C):
    opts = dict(opts)
    prob = opts.pop("prob", False)
    x, t, kw = make_inputs(rng, (6,), C, prob=prob, weight=True, sample_weight=True,
                           ignore_frac=0.0 if prob else 0.2)
    res = fl.softmax_cross_entropy(x, t, **kw, **opts)

    def f(z):
        return fl.softmax_cross_entropy(z, t, grad=False, **kw, **opts).loss

    for flat in rng.choice(x.size, size=6, replace=False):
        idx = np.unravel_index(flat, x.shape)
        fd = finite_difference(f, x, idx)
        np.testing.assert_allclose(res.grad[idx], fd, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------ serial / parallel


def test_tiny_input_serial_path(rng):
    x, t, kw = make_inputs(rng, (2,), 3, weight=True, sample_weight=True)
    res, want = run_both(x, t, label_smoothing=0.1, **kw)
    check_result(res, *want, np.float64)


@pytest.mark.parametrize("C", [10, 300], ids=["narrow", "wide"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("prob", [False, True])
def test_large_input_parallel_path(rng, dtype, prob, C):
    N = 4096 if C > NARROW_ROW else 16384  # over the parallel threshold either way
    x, t, kw = make_inputs(rng, (N,), C, dtype, prob=prob, weight=True, sample_weight=True,
                           ignore_frac=0.0 if prob else 0.1)
    for reduction in ["mean", "none"]:
        res, want = run_both(x, t, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, **kw)
        check_result(res, *want, dtype)


# ---------------------------------------------------------------- bad input


def _bad_cases(x, t):
    N, C = x.shape
    return {
        "label_too_big": (dict(target=np.where(t == t[0], C, t)), "target"),
        "label_negative": (dict(target=np.where(t == t[0], -1, t)), "target"),
        "label_huge": (dict(target=np.full(N, 2**40)), "target"),
        "target_shape": (dict(target=t[:-1]), "target"),
        "target_2d_wrong": (dict(target=np.zeros((N, C + 1))), "target"),
        "float_class_indices": (dict(target=t.astype(np.float64)), "target"),
        "weight_shape": (dict(weight=np.ones(C + 1)), "weight"),
        "sample_weight_shape": (dict(sample_weight=np.ones(N + 1)), "sample_weight"),
        "softcap_zero": (dict(softcap=0.0), "softcap"),
        "softcap_negative": (dict(softcap=-1.0), "softcap"),
        "smoothing_negative": (dict(label_smoothing=-0.1), "label_smoothing"),
        "smoothing_above_one": (dict(label_smoothing=1.5), "label_smoothing"),
        "reduction": (dict(reduction="avg"), "reduction"),
    }


_BAD_NAMES = list(_bad_cases(np.zeros((3, 4)), np.zeros(3, dtype=int)))


@pytest.mark.parametrize("mode", ["grad_out", "in_place"])
@pytest.mark.parametrize("case", _BAD_NAMES)
def test_bad_input_raises_and_changes_nothing(rng, case, mode):
    x, t, _ = make_inputs(rng, (6,), 4)
    kwargs, name = _bad_cases(x, t)[case]
    kwargs = dict(kwargs)
    target = kwargs.pop("target", t)
    x_before = x.copy()
    out = np.full_like(x, 123.0)
    grad_out = out if mode == "grad_out" else x
    with pytest.raises((ValueError, TypeError), match=name):
        fl.softmax_cross_entropy(x, target, grad_out=grad_out, **kwargs)
    np.testing.assert_array_equal(x, x_before)
    assert np.all(out == 123.0)


def test_out_of_range_label_is_value_error(rng):
    x, t, _ = make_inputs(rng, (6,), 4)
    t[3] = 4
    with pytest.raises(ValueError, match="target"):
        fl.softmax_cross_entropy(x, t)


@pytest.mark.parametrize("ignore_index", [-1, 4, 1000, -100])
def test_label_equal_to_ignore_index_is_allowed(rng, ignore_index):
    x, t, _ = make_inputs(rng, (6,), 4)
    t[[0, 3]] = ignore_index
    res, want = run_both(x, t, ignore_index=ignore_index)
    check_result(res, *want, np.float64)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, bool])
def test_non_float_logits_rejected(dtype):
    x = np.zeros((3, 4), dtype=dtype)
    with pytest.raises((TypeError, ValueError), match="logits"):
        fl.softmax_cross_entropy(x, np.array([0, 1, 2]))


@pytest.mark.parametrize("bad", ["shape", "dtype", "transposed_shape"])
def test_bad_grad_out_rejected(rng, bad):
    x, t, _ = make_inputs(rng, (6,), 4, np.float32)
    if bad == "shape":
        out = np.zeros((6, 5), np.float32)
    elif bad == "dtype":
        out = np.zeros((6, 4), np.float64)
    else:
        out = np.zeros((4, 6), np.float32)
    before = out.copy()
    with pytest.raises((ValueError, TypeError), match="grad_out"):
        fl.softmax_cross_entropy(x, t, grad_out=out)
    np.testing.assert_array_equal(out, before)


def test_logits_must_have_a_class_axis():
    with pytest.raises((ValueError, TypeError), match="logits"):
        fl.softmax_cross_entropy(np.float64(1.0), np.array(0))


# ------------------------------------------------------------------ purity


def test_inputs_are_not_modified(rng):
    x, t, kw = make_inputs(rng, (64,), 9, np.float32, weight=True, sample_weight=True, ignore_frac=0.2)
    copies = [a.copy() for a in (x, t, kw["weight"], kw["sample_weight"])]
    fl.softmax_cross_entropy(x, t, label_smoothing=0.1, z_loss=0.01, softcap=5.0, **kw)
    for before, after in zip(copies, (x, t, kw["weight"], kw["sample_weight"])):
        np.testing.assert_array_equal(before, after)


def test_non_contiguous_grad_out_is_written_or_rejected(rng):
    # the spec does not say whether a strided grad_out is accepted: either it is filled
    # correctly, or it is refused with an error naming grad_out, untouched
    x, t, _ = make_inputs(rng, (10,), 6)
    buf = np.full((6, 10), 5.0)
    out = buf.T
    try:
        res = fl.softmax_cross_entropy(x, t, grad_out=out)
    except (ValueError, TypeError) as e:
        assert "grad_out" in str(e)
        assert np.all(buf == 5.0)
    else:
        assert res.grad is out
        check_result(res, *naive.softmax_cross_entropy(x, t), np.float64)


def test_cuda_row_kernels_load_unroll_columns_per_group(monkeypatch):
    # The CUDA row kernels (cross entropy, focal) unpack one load_group per step and then
    # advance by UNROLL columns: a load_group of another count would skip columns or read
    # some twice.  Its Python body runs here with a stand-in block size.
    pytest.importorskip("numba.cuda")
    from types import SimpleNamespace

    from fastloss.cuda import _blocks
    threads = 3
    monkeypatch.setattr(_blocks, "cuda", SimpleNamespace(blockDim=SimpleNamespace(x=threads)))
    a = np.arange(2 * 40).reshape(2, 40)
    got = _blocks.load_group.py_func(a, 1, 2)
    assert list(got) == [a[1, 2 + k * threads] for k in range(_blocks.UNROLL)]
    assert _blocks.group_end.py_func(40) == 40 - (_blocks.UNROLL - 1) * threads
