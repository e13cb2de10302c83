"""fastloss.softmax_cross_entropy against the float64 reference in naive.py, on both sides.

A test that takes ``backend`` runs on the CPU and on the GPU path (``dev`` moves its
arrays to that side and back); on the "cuda" side the option matrix and the NaN test also
check the CPU path's answer.
A test marked ``cpu`` or ``cuda`` is about that side alone: the CPU's inline and row
paths, serial and parallel; the GPU's blocks and device arrays.  The simulator runs tiny
shapes: a test's matrix (``per_side``) gives each side its own rows where they differ.
"""
import numpy as np
import pytest

import fastloss as fl
import naive
import sides
from fastloss.cpu._rows import NARROW_ROW
from naive import check_result, finite_difference

DTYPES = [np.float16, np.float32, np.float64]
REDUCTIONS = ["mean", "sum", "none"]
# Integer-target rows of at most NARROW_ROW classes take the CPU kernel's inline
# path, wider ones the row helpers: option and edge-case tests run both.
WIDTHS = pytest.mark.parametrize("C", [7, NARROW_ROW + 3], ids=["narrow", "wide"])
#: per side, every how many rows the integer targets of a batch are ignored besides the
#: random ones: none on the CPU, every 4th in the simulator's few rows (which chance
#: could leave without one)
IGNORE_EVERY = {"cpu": None, "cuda": 4}


def make_inputs(rng, batch, C, dtype=np.float64, *, prob=False, ignore_frac=0.0, ignore_index=-100,
                ignore_every=None, weight=False, sample_weight=False, scale=3.0):
    batch = tuple(batch)
    x = (rng.normal(size=batch + (C,)) * scale).astype(dtype)
    if prob:
        t = rng.dirichlet(np.ones(C), size=batch).astype(dtype) if C > 1 else np.ones(batch + (1,), dtype)
    else:
        t = rng.integers(0, C, size=batch)
        if ignore_frac:
            t[rng.random(batch) < ignore_frac] = ignore_index
        if ignore_every:
            t.reshape(-1)[::ignore_every] = ignore_index
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




def run(dev, x, t, **kw):
    """(softmax_cross_entropy on the test's side, on the host; the float64 reference)."""
    got = sides.on_host(fl.softmax_cross_entropy(dev.put(x), dev.put(t), **sides.on_side(dev, kw)), dev)
    return got, naive.softmax_cross_entropy(x, t, **kw)


# --------------------------------------------------------------- options

INT_OPTIONS = {
    "plain": dict(),
    "weight": dict(weight=True),
    "sample_weight": dict(sample_weight=True),
    "ignore": dict(ignore_frac=0.3),
    "ignore_custom_in_range": dict(ignore_frac=0.3, ignore_index=2),
    "smoothing": dict(label_smoothing=0.1),
    "smoothing_one": dict(label_smoothing=1.0),
    "smoothing_weight": dict(weight=True, label_smoothing=0.2),
    "z_loss": dict(z_loss=0.05),
    "softcap": dict(softcap=2.5),
    "z_loss_softcap": dict(z_loss=0.01, softcap=4.0),
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
#: the options the simulator runs: each of them in float32, and none or all of them in the
#: other dtypes
CUDA_INT_OPTIONS = ["plain", "weight", "sample_weight", "smoothing", "smoothing_weight",
                    "z_loss_softcap", "everything"]


def _split(opts):
    make = {k: v for k, v in opts.items() if k in _MAKE_KEYS}
    call = {k: v for k, v in opts.items() if k not in _MAKE_KEYS}
    if "ignore_index" in opts:
        call["ignore_index"] = opts["ignore_index"]
    return make, call


def _int_option_rows(side):
    """(option, reduction, classes, dtype, rows)"""
    if side == "cpu":
        return [(o, r, C, np.float64, 13) for o in INT_OPTIONS for r in REDUCTIONS
                for C in (7, NARROW_ROW + 3)]
    return ([(o, r, 7, np.float32, 6) for r in REDUCTIONS for o in CUDA_INT_OPTIONS]
            + [(o, r, 7, d, 6) for d in (np.float16, np.float64) for r in REDUCTIONS
               for o in ("plain", "everything")])


@pytest.mark.parametrize("backend, name, reduction, C, dtype, n", sides.per_side(_int_option_rows))
def test_integer_targets_options(rng, backend, dev, name, reduction, C, dtype, n):
    make, call = _split(INT_OPTIONS[name])
    x, t, kw = make_inputs(rng, (n,), C, dtype, ignore_every=IGNORE_EVERY[backend], **make)
    if name == "ignore_custom_in_range":
        t[0] = 2  # at least one label equal to the in-range ignore_index
    res = fl.softmax_cross_entropy(dev.put(x), dev.put(t), reduction=reduction,
                                   **sides.on_side(dev, kw), **call)
    # the side's arrays in, the side's arrays out
    assert isinstance(res.loss, type(dev.put(x))) and isinstance(res.grad, type(dev.put(x)))
    got = sides.on_host(res, dev)
    check_result(got, *naive.softmax_cross_entropy(x, t, reduction=reduction, **kw, **call), dtype)
    sides.assert_same_as_cpu(backend, got, fl.softmax_cross_entropy, x, t, reduction=reduction, **kw, **call)


def _prob_option_rows(side):
    """(option, reduction, dtype, rows)"""
    if side == "cpu":
        return [(o, r, np.float64, 11) for o in PROB_OPTIONS for r in REDUCTIONS]
    return [(o, r, d, 5) for o in ("plain", "everything") for r in REDUCTIONS for d in DTYPES]


@pytest.mark.parametrize("backend, name, reduction, dtype, n", sides.per_side(_prob_option_rows))
def test_probability_targets_options(rng, backend, dev, name, reduction, dtype, n):
    make, call = _split(PROB_OPTIONS[name])
    x, t, kw = make_inputs(rng, (n,), 6, dtype, prob=True, **make)
    got, want = run(dev, x, t, reduction=reduction, **kw, **call)
    check_result(got, *want, dtype)


@pytest.mark.cpu
def test_probability_targets_ignore_index_does_not_apply(rng):
    # with probability targets ignore_index has no meaning: nothing is ignored
    x, t, _ = make_inputs(rng, (9,), 5, prob=True)
    a = fl.softmax_cross_entropy(x, t, ignore_index=0)
    b = fl.softmax_cross_entropy(x, t)
    want = naive.softmax_cross_entropy(x, t)
    check_result(a, *want, np.float64)
    check_result(b, *want, np.float64)


@pytest.mark.cpu
def test_one_hot_probability_targets_equal_integer_targets(rng):
    x, y, kw = make_inputs(rng, (10,), 5, weight=False, sample_weight=True)
    onehot = np.eye(5)[y]
    a = fl.softmax_cross_entropy(x, y, label_smoothing=0.1, **kw)
    b = fl.softmax_cross_entropy(x, onehot, label_smoothing=0.1, **kw)
    np.testing.assert_allclose(float(a.loss), float(b.loss), rtol=1e-12)
    np.testing.assert_allclose(a.grad, b.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.cpu
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


@pytest.mark.cpu
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


@pytest.mark.cpu
@pytest.mark.parametrize("tdtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                                    np.uint64, np.intp])
def test_any_integer_label_dtype(rng, tdtype):
    x, t, _ = make_inputs(rng, (12,), 6)
    t = t.astype(tdtype)
    res, want = run_both(x, t)
    check_result(res, *want, np.float64)


@pytest.mark.cpu
def test_unsigned_labels_with_in_range_ignore_index(rng):
    x, t, _ = make_inputs(rng, (12,), 6)
    t = t.astype(np.uint8)
    t[[1, 4]] = 255
    res, want = run_both(x, t, ignore_index=255)
    check_result(res, *want, np.float64)


# ------------------------------------------------------------------ shapes


@pytest.mark.parametrize("backend, C, prob, dtype, n", sides.per_side(
    lambda side: [(C, p, np.float64, 6) for C in (1, 2) for p in (False, True)] if side == "cpu"
    else [(1, False, np.float32, 2)]))
def test_tiny_class_counts(rng, backend, dev, C, prob, dtype, n):
    # one class (on the GPU: more threads than classes) and two
    x, t, kw = make_inputs(rng, (n,), C, dtype, prob=prob, weight=True, sample_weight=True)
    got, want = run(dev, x, t, label_smoothing=0.1, **kw)
    check_result(got, *want, dtype)
    if C == 1:
        # a single class: log p == 0 everywhere, nothing to learn (exactly so without options)
        np.testing.assert_allclose(float(got.loss), 0.0, atol=1e-12)
        np.testing.assert_allclose(got.grad, 0.0, atol=1e-12)
        plain = sides.on_host(fl.softmax_cross_entropy(dev.put(x), dev.put(t)), dev)
        assert float(plain.loss) == 0.0 and not plain.grad.any()


@pytest.mark.cpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_vocabulary_sized_classes(rng, dtype):
    x, t, kw = make_inputs(rng, (3,), 50257, dtype, weight=True)
    res, want = run_both(x, t, label_smoothing=0.1, z_loss=1e-4, **kw)
    check_result(res, *want, dtype)


@pytest.mark.parametrize("backend, prob, reduction, C, dtype", sides.per_side(
    lambda side: [(p, r, 5, np.float64) for p in (False, True) for r in REDUCTIONS] if side == "cpu"
    # rows wider than the block: several chunks per thread
    else [(False, "mean", 45, np.float32)]))
def test_three_dimensional_batch(rng, backend, dev, prob, reduction, C, dtype):
    x, t, kw = make_inputs(rng, (2, 3), C, dtype, prob=prob, sample_weight=True, weight=True,
                           ignore_frac=0.0 if prob else 0.3, ignore_every=IGNORE_EVERY[backend])
    got, want = run(dev, x, t, reduction=reduction, label_smoothing=0.05, z_loss=1e-3,
                    softcap=5.0, **kw)
    if reduction == "none":
        assert got.loss.shape == (2, 3)
    assert got.grad.shape == (2, 3, C)
    check_result(got, *want, dtype)


@pytest.mark.cpu
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


@pytest.mark.cpu
def test_transposed_logits(rng):
    base = rng.normal(size=(6, 20)) * 2  # (C, N)
    x = base.T
    assert not x.flags.c_contiguous
    t = rng.integers(0, 6, size=20)
    sw = rng.uniform(size=40)[::2]
    res, want = run_both(x, t, sample_weight=sw, label_smoothing=0.1)
    check_result(res, *want, np.float64)
    assert res.grad.shape == (20, 6)


@pytest.mark.parametrize("backend, dtype, n, C", sides.per_side(
    lambda side: [(d, 10, 11) for d in (np.float64, np.float32, np.float16)] if side == "cpu"
    else [(np.float32, 4, 5)]))
def test_strided_views(rng, backend, dev, dtype, n, C):
    base = (rng.normal(size=(3 * n, 2 * C + 1)) * 2).astype(dtype)
    tbase = rng.integers(0, C, size=(n, 3))
    wbase = rng.uniform(0.5, 1.5, size=2 * C).astype(dtype)
    # (n, C) logits, both strides odd multiples, the first column skipped; strided labels
    # and class weights
    x, t, w = dev.put(base)[::3, 1::2], dev.put(tbase)[:, 1], dev.put(wbase)[::2]
    for reduction in ("mean", "sum") if backend == "cpu" else ("sum",):
        got = sides.on_host(fl.softmax_cross_entropy(x, t, weight=w, z_loss=0.01, reduction=reduction), dev)
        want = naive.softmax_cross_entropy(base[::3, 1::2], tbase[:, 1], weight=wbase[::2],
                                           z_loss=0.01, reduction=reduction)
        check_result(got, *want, dtype)


@pytest.mark.cpu
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


@pytest.mark.cpu
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


def test_extreme_logits_stay_finite_and_precise(backend, dev):
    x = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [30.0, 0.0, -5.0]], np.float32)
    t = np.array([0, 0, 0])
    got, (want_loss, want_grad) = run(dev, x, t, reduction="none")
    assert np.all(np.isfinite(got.loss)) and np.all(np.isfinite(got.grad))
    # p_y -> 1: -log p_y ~ exp(-30) keeps its digits (log1p of the rest), more
    # of them than the reference's float64 lse - z_y, hence the exact form here
    np.testing.assert_allclose(got.loss[2], np.log1p(np.exp(-30.0) + np.exp(-35.0)), rtol=1e-5)
    np.testing.assert_allclose(got.loss[:2], want_loss[:2], rtol=1e-6)
    np.testing.assert_allclose(got.grad, want_grad, atol=1e-6)


@pytest.mark.cpu
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


@pytest.mark.cpu
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


@pytest.mark.parametrize("backend, C, dtype", sides.per_side(
    lambda side: [(7, np.float64), (NARROW_ROW + 3, np.float64)] if side == "cpu"
    else [(7, np.float32)]))
def test_nan_and_minus_inf_logits_stay_in_their_row(rng, backend, dev, C, dtype):
    x = rng.normal(size=(4, C)).astype(dtype)
    x[1, 2] = np.nan
    x[2, 0] = -np.inf  # off target
    t = np.array([0, 1, 2, 0])
    got, (want_loss, want_grad) = run(dev, x, t, reduction="none")
    # on the GPU, NaN where the CPU path has NaN (and the same numbers elsewhere)
    sides.assert_same_as_cpu(backend, got, fl.softmax_cross_entropy, x, t, reduction="none")
    assert np.isnan(got.loss[1]) and np.all(np.isnan(got.grad[1]))
    rest = [0, 2, 3]
    assert np.all(np.isfinite(got.loss[rest])) and np.all(np.isfinite(got.grad[rest]))
    assert got.grad[2, 0] == 0
    check_result(fl.LossGrad(got.loss[rest], got.grad[rest]), want_loss[rest], want_grad[rest], dtype)


@pytest.mark.cpu
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
def test_empty_batch(backend, dev, prob):
    x = dev.put(np.zeros((0, 4)))
    t = dev.put(np.zeros((0, 4)) if prob else np.zeros(0, dtype=np.int64))
    mean = sides.on_host(fl.softmax_cross_entropy(x, t), dev)
    assert np.isnan(float(mean.loss))
    assert mean.grad.shape == (0, 4)
    s = sides.on_host(fl.softmax_cross_entropy(x, t, reduction="sum"), dev)
    assert float(s.loss) == 0.0 and s.grad.shape == (0, 4)
    n = sides.on_host(fl.softmax_cross_entropy(x, t, reduction="none"), dev)
    assert n.loss.shape == (0,)
    assert n.grad.shape == (0, 4)


def test_every_row_ignored(rng, backend, dev):
    x = dev.put(rng.normal(size=(2, 3)).astype(np.float32))
    t = dev.put(np.full(2, -100))
    mean = sides.on_host(fl.softmax_cross_entropy(x, t), dev)
    assert np.isnan(float(mean.loss))
    assert mean.grad.shape == (2, 3) and not mean.grad.any()
    for kw in ({}, dict(label_smoothing=0.1, z_loss=0.1)):
        s = sides.on_host(fl.softmax_cross_entropy(x, t, reduction="sum", **kw), dev)
        assert float(s.loss) == 0.0
        assert np.all(s.grad == 0.0)
    n = sides.on_host(fl.softmax_cross_entropy(x, t, reduction="none", label_smoothing=0.1, z_loss=0.1), dev)
    assert np.all(n.loss == 0.0)


@pytest.mark.cpu
def test_ignored_rows_get_zero_gradient_and_loss(rng):
    x, t, kw = make_inputs(rng, (10,), 4, ignore_frac=0.5, weight=True, sample_weight=True)
    res = fl.softmax_cross_entropy(x, t, reduction="none", label_smoothing=0.3, z_loss=0.1, **kw)
    ign = t == -100
    assert ign.any() and (~ign).any()
    assert np.all(res.loss[ign] == 0.0)
    assert np.all(res.grad[ign] == 0.0)


# ------------------------------------------------------------- the interface


def test_result_is_lossgrad(rng, backend, dev):
    x, t, _ = make_inputs(rng, (5,), 3, np.float32)
    res = fl.softmax_cross_entropy(dev.put(x), dev.put(t))
    assert isinstance(res, fl.LossGrad)
    assert isinstance(res, tuple) and len(res) == 2
    loss, grad = res
    assert loss is res.loss and grad is res.grad
    assert isinstance(loss, type(dev.put(x))) and loss.shape == ()
    assert isinstance(float(loss), float)  # a 0-d array of the side converts with float
    assert abs(float(loss) - float(naive.softmax_cross_entropy(x, t)[0])) < 1e-5
    assert fl.LossGrad(1.0, None).loss == 1.0


@pytest.mark.cpu
def test_backend_of_numpy_is_cpu(rng):
    x = rng.normal(size=(3, 2))
    assert fl.backend_of(x) == "cpu"
    assert fl.backend_of(x, np.array([0, 1, 1])) == "cpu"
    assert fl.backend_of(x, 1.0, [1, 2]) == "cpu"


def test_explicit_backend_with_numpy_returns_numpy(rng, backend):
    x, t, kw = make_inputs(rng, (4,), 5, weight=True)
    want = naive.softmax_cross_entropy(x, t, **kw)
    for name in [backend] + (["auto"] if backend == "cpu" else []):  # "auto": the CPU path
        res = fl.softmax_cross_entropy(x, t, backend=name, **kw)
        assert type(res.loss) is np.ndarray and type(res.grad) is np.ndarray
        check_result(res, *want, np.float64)
    host_buf = np.empty_like(x)
    res = fl.softmax_cross_entropy(x, t, backend=backend, grad_out=host_buf, **kw)
    assert type(res.loss) is np.ndarray and res.grad is host_buf
    check_result(res, *want, np.float64)


@pytest.mark.parametrize("backend, reduction, dtype", sides.per_side(
    lambda side: [(r, np.float64) for r in REDUCTIONS] if side == "cpu"
    else [("mean", np.float32)]))
def test_grad_false(rng, backend, dev, reduction, dtype):
    x, t, kw = make_inputs(rng, (7,), 4, dtype, weight=True, ignore_frac=0.3)
    res = fl.softmax_cross_entropy(dev.put(x), dev.put(t), reduction=reduction, grad=False,
                                   label_smoothing=0.1, **sides.on_side(dev, kw))
    assert res.grad is None
    want_loss, _ = naive.softmax_cross_entropy(x, t, reduction=reduction, label_smoothing=0.1, **kw)
    check_result(fl.LossGrad(dev.get(res.loss), None), want_loss, None, dtype)


def _everything(rng, dtype, prob=False, ignore_every=None):
    """Inputs of six rows and five classes, and every option of the loss at once."""
    x, t, kw = make_inputs(rng, (6,), 5, dtype, prob=prob, weight=True, sample_weight=True,
                           ignore_frac=0.0 if prob else 0.3, ignore_every=ignore_every)
    return x, t, dict(kw, label_smoothing=0.1, z_loss=0.01, softcap=3.0)


@pytest.mark.parametrize("backend, dtype", sides.per_side(
    lambda side: [(d,) for d in (np.float64, np.float32, np.float16)] if side == "cpu"
    else [(np.float32,)]))
def test_grad_out(rng, backend, dev, dtype):
    x, t, kw = _everything(rng, dtype, ignore_every=IGNORE_EVERY[backend])
    out = dev.put(np.full(x.shape, 7.0, dtype=dtype))
    res = fl.softmax_cross_entropy(dev.put(x), dev.put(t), grad_out=out, **sides.on_side(dev, kw))
    assert res.grad is out
    check_result(sides.on_host(res, dev), *naive.softmax_cross_entropy(x, t, **kw), dtype)


@pytest.mark.parametrize("backend, dtype, prob", sides.per_side(
    lambda side: [(d, p) for d in (np.float64, np.float32, np.float16) for p in (False, True)]
    if side == "cpu" else [(np.float32, False)]))
def test_grad_out_in_place(rng, backend, dev, dtype, prob):
    x, t, kw = _everything(rng, dtype, prob, ignore_every=IGNORE_EVERY[backend])
    want = naive.softmax_cross_entropy(x, t, **kw)
    d_x = dev.put(x)
    res = fl.softmax_cross_entropy(d_x, dev.put(t), grad_out=d_x, **sides.on_side(dev, kw))
    assert res.grad is d_x
    check_result(fl.LossGrad(dev.get(res.loss), dev.get(d_x)), *want, dtype)


@pytest.mark.cpu
def test_grad_out_beside_views_and_over_them(rng):
    """Inputs sliced from larger arrays: a ``grad_out`` owning its memory is written in
    place; one that overlaps the logits' rows (a view of the same array) still gets the
    right gradient, through a temporary."""
    big = rng.normal(size=(128, 10)).astype(np.float32)
    labels = rng.integers(0, 10, size=256)
    x, t = big[32:96], labels[::4]
    want = fl.softmax_cross_entropy(x.copy(), t.copy())
    out = np.full(x.shape, 7.0, np.float32)
    res = fl.softmax_cross_entropy(x, t, grad_out=out)
    assert res.grad is out
    np.testing.assert_array_equal(res.grad, want.grad)
    over = big[:64]  # rows 32..63 are also the logits' rows 0..31
    res = fl.softmax_cross_entropy(x, t, grad_out=over)
    assert res.grad is over
    np.testing.assert_array_equal(over, want.grad)
    assert float(res.loss) == float(want.loss)


# ----------------------------------------------------------- finite differences


@pytest.mark.cpu
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


# ---------------------------------------------------- serial / parallel / blocks


@pytest.mark.cpu
def test_tiny_input_serial_path(rng):
    x, t, kw = make_inputs(rng, (2,), 3, weight=True, sample_weight=True)
    res, want = run_both(x, t, label_smoothing=0.1, **kw)
    check_result(res, *want, np.float64)


@pytest.mark.cpu
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


@pytest.mark.cuda
def test_block_size_does_not_change_the_answer(rng, dev, threads_per_block):
    x, t, kw = make_inputs(rng, (4,), 37, ignore_every=4, weight=True, sample_weight=True)
    got, want = run(dev, x, t, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, **kw)
    check_result(got, *want, np.float64)


@pytest.mark.cuda
def test_persistent_blocks_loop_over_rows(rng, dev, monkeypatch):
    # two blocks for seven rows: each block runs the row loop several times
    from fastloss.cuda import _rows
    monkeypatch.setattr(_rows, "row_grid", lambda n, threads: 2)
    for prob in (False, True):
        x, t, kw = make_inputs(rng, (7,), 70, np.float32, prob=prob, ignore_every=None if prob else 4,
                               weight=True, sample_weight=True)
        kw.update(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
        res = fl.softmax_cross_entropy(dev.put(x), dev.put(t), **sides.on_side(dev, kw))
        check_result(sides.on_host(res, dev), *naive.softmax_cross_entropy(x, t, **kw), np.float32)


# ---------------------------------------------------------------- bad input

F32 = np.float32
GRAD_OUT_BAD, GRAD_OUT_ON_THE_HOST = sides.grad_out_cases((3, 5))
#: one bad argument per case, as ``put`` (the side's) places it, beside (3, 5) float32
#: logits and the labels [0, 1, 2]: (the call's arguments that change, the error, its
#: message); the "cuda" side also refuses host arrays beside its own
BAD_INPUT = {
    "label too big": (lambda put: {"target": put(np.array([0, 1, 5]))},
                      ValueError, r"target\[2\] = 5 is out of range"),
    "negative label": (lambda put: {"target": put(np.array([-1, 1, 2], np.int32))},
                       ValueError, r"target\[0\] = -1 is out of range"),
    "huge label": (lambda put: {"target": put(np.full(3, 2**40))},
                   ValueError, rf"target\[0\] = {2**40} is out of range"),
    "target of the wrong length": (lambda put: {"target": put(np.array([0, 1]))},
                                   ValueError, "target must have shape"),
    "probabilities of the wrong shape": (lambda put: {"target": put(np.zeros((3, 4), F32))},
                                         ValueError, "target must have shape"),
    "float class indices": (lambda put: {"target": put(np.array([0.0, 1.0, 2.0]))},
                            ValueError, "target must have shape"),
    "int64 logits": (lambda put: {"logits": put(np.zeros((3, 5), np.int64))},
                     TypeError, "logits must have dtype"),
    "int32 logits": (lambda put: {"logits": put(np.zeros((3, 5), np.int32))},
                     TypeError, "logits must have dtype"),
    "bool logits": (lambda put: {"logits": put(np.zeros((3, 5), bool))},
                    TypeError, "logits must have dtype"),
    "weight of the wrong length": (lambda put: {"weight": put(np.ones(4, F32))},
                                   ValueError, "weight must have shape"),
    "sample_weight of the wrong length": (lambda put: {"sample_weight": put(np.ones(4, F32))},
                                          ValueError, "sample_weight must have shape"),
    "zero softcap": (lambda put: {"softcap": 0.0}, ValueError, "softcap must be > 0"),
    "negative softcap": (lambda put: {"softcap": -1.0}, ValueError, "softcap must be > 0"),
    "negative label_smoothing": (lambda put: {"label_smoothing": -0.1},
                                 ValueError, r"label_smoothing must be in \[0, 1\]"),
    "label_smoothing above one": (lambda put: {"label_smoothing": 1.5},
                                  ValueError, r"label_smoothing must be in \[0, 1\]"),
    "bad reduction": (lambda put: {"reduction": "avg"}, ValueError, "reduction must be one of"),
    **GRAD_OUT_BAD,
}
ON_THE_HOST = {
    **GRAD_OUT_ON_THE_HOST,
    "target on the host": (lambda put: {"target": np.array([0, 1, 2])},
                           TypeError, "target is on cpu"),
}


@pytest.mark.parametrize("backend, case", sides.bad_input_cases(BAD_INPUT, ON_THE_HOST))
def test_bad_input_raises_before_any_kernel_and_changes_nothing(backend, dev, case):
    sides.assert_rejected_unchanged(dev, fl.softmax_cross_entropy, ("logits", "target"), np.array([0, 1, 2]),
                                    np.arange(15, dtype=F32).reshape(3, 5), case)


@pytest.mark.cpu
@pytest.mark.parametrize("ignore_index", [-1, 4, 1000, -100])
def test_label_equal_to_ignore_index_is_allowed(rng, ignore_index):
    x, t, _ = make_inputs(rng, (6,), 4)
    t[[0, 3]] = ignore_index
    res, want = run_both(x, t, ignore_index=ignore_index)
    check_result(res, *want, np.float64)


@pytest.mark.cpu
def test_logits_must_have_a_class_axis():
    with pytest.raises((ValueError, TypeError), match="logits"):
        fl.softmax_cross_entropy(np.float64(1.0), np.array(0))


# ------------------------------------------------------------------ purity


@pytest.mark.cpu
def test_inputs_are_not_modified(rng):
    x, t, kw = make_inputs(rng, (64,), 9, np.float32, weight=True, sample_weight=True, ignore_frac=0.2)
    copies = [a.copy() for a in (x, t, kw["weight"], kw["sample_weight"])]
    fl.softmax_cross_entropy(x, t, label_smoothing=0.1, z_loss=0.01, softcap=5.0, **kw)
    for before, after in zip(copies, (x, t, kw["weight"], kw["sample_weight"])):
        np.testing.assert_array_equal(before, after)


@pytest.mark.cpu
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


@pytest.mark.cuda
def test_device_arrays_are_never_copied_to_or_from_the_host(rng, dev, monkeypatch):
    from numba import cuda
    x, t, kw = _everything(rng, np.float32, ignore_every=4)
    args = (dev.put(x), dev.put(t))
    dkw = sides.on_side(dev, kw)
    buf = dev.put(np.zeros_like(x))
    cls = type(args[0])
    copies = []
    copy_to_host = cls.copy_to_host

    def counted(self, *a, **k):
        copies.append(self.size)
        return copy_to_host(self, *a, **k)

    monkeypatch.setattr(cls, "copy_to_host", counted)
    monkeypatch.setattr(cuda, "to_device", lambda *a, **k: copies.append("to_device"))
    res = fl.softmax_cross_entropy(*args, grad_out=buf, **dkw)
    # the one transfer: the label check's answer (one index); no array crosses
    assert copies == [1]
    assert res.grad is buf and type(res.loss).__mro__[1] is cls
    monkeypatch.undo()
    check_result(sides.on_host(res, dev), *naive.softmax_cross_entropy(x, t, **kw), np.float32)


@pytest.mark.cpu
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
