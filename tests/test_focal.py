"""fastloss.focal_loss (multi-class softmax focal loss) against naive.py, on both sides.

A test that takes ``backend`` runs on the CPU and on the GPU path (``dev`` moves its
arrays to that side and back); on the "cuda" side it also checks the CPU path's answer.
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
WIDTHS = pytest.mark.parametrize("C", [6, NARROW_ROW + 3], ids=["narrow", "wide"])
#: per side, every how many rows the integer targets of a batch are ignored besides the
#: random ones: none on the CPU, every 4th in the simulator's few rows (which chance
#: could leave without one)
IGNORE_EVERY = {"cpu": None, "cuda": 4}


def make_inputs(rng, batch, C, dtype=np.float64, *, prob=False, ignore_frac=0.0, ignore_index=-100,
                ignore_every=None, sample_weight=False, scale=3.0):
    batch = tuple(batch)
    x = (rng.normal(size=batch + (C,)) * scale).astype(dtype)
    if prob:
        t = rng.dirichlet(np.ones(C), size=batch).astype(dtype)
    else:
        t = rng.integers(0, C, size=batch)
        if ignore_frac:
            t[rng.random(batch) < ignore_frac] = ignore_index
        if ignore_every:
            t.reshape(-1)[1::ignore_every] = ignore_index
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




def run(backend, dev, x, t, *, loss_scale=None, **kw):
    """(focal_loss on the test's side, on the host; the float64 reference)."""
    got = sides.on_host(fl.focal_loss(dev.put(x), dev.put(t), **sides.on_side(dev, kw)), dev)
    sides.assert_same_as_cpu(backend, got, fl.focal_loss, x, t, loss_scale=loss_scale, **kw)
    return got, naive.focal_loss(x, t, **kw)


def _integer_rows(side):
    """(alpha, gamma, reduction, classes, dtype, rows)"""
    if side == "cpu":
        return [(a, g, r, C, np.float64, 12) for a in ("none", "scalar", "array")
                for g in (0.0, 0.5, 2.0, 3.7) for r in REDUCTIONS for C in (6, NARROW_ROW + 3)]
    # every alpha and gamma; every dtype and reduction (the first row covers float64's mean)
    return ([(a, g, "mean", 6, np.float64, 5) for a in ("none", "scalar", "array")
             for g in (0.0, 0.5, 2.0, 3.7)]
            + [("array", 0.5, r, 7, d, 6) for d in DTYPES for r in REDUCTIONS
               if (d, r) != (np.float64, "mean")])


@pytest.mark.parametrize("backend, alpha, gamma, reduction, C, dtype, n", sides.per_side(_integer_rows))
def test_integer_targets(rng, backend, dev, alpha, gamma, reduction, C, dtype, n):
    x, t, kw = make_inputs(rng, (n,), C, dtype, ignore_frac=0.25, ignore_every=IGNORE_EVERY[backend],
                           sample_weight=(alpha != "none"))
    kw.update(gamma=gamma, alpha=_alpha(alpha, C, rng, dtype), reduction=reduction)
    res = fl.focal_loss(dev.put(x), dev.put(t), **sides.on_side(dev, kw))
    # the side's arrays in, the side's arrays out
    assert (type(res.loss) is np.ndarray) == (backend == "cpu")
    assert isinstance(res.grad, type(dev.put(x)))
    assert res.grad.dtype == np.dtype(dtype) and res.grad.shape == x.shape
    got = sides.on_host(res, dev)
    check_result(got, *naive.focal_loss(x, t, **kw), dtype)
    sides.assert_same_as_cpu(backend, got, fl.focal_loss, x, t, **kw)


@pytest.mark.parametrize("backend, alpha, gamma, reduction, dtype, n", sides.per_side(
    lambda side: [(a, g, r, np.float64, 10) for a in ("none", "array") for g in (0.0, 0.5, 2.0)
                  for r in REDUCTIONS] if side == "cpu"
    else [("array", 2.0, r, d, 5) for d in DTYPES for r in REDUCTIONS]))
def test_probability_targets(rng, backend, dev, alpha, gamma, reduction, dtype, n):
    x, t, kw = make_inputs(rng, (n,), 5, dtype, prob=True, sample_weight=True)
    got, want = run(backend, dev, x, t, gamma=gamma, alpha=_alpha(alpha, 5, rng, dtype),
                    reduction=reduction, **kw)
    check_result(got, *want, dtype)


@pytest.mark.cuda
def test_probability_targets_of_another_dtype_round_like_the_cpu(rng, dev):
    # float64 probabilities with float16 logits: both paths round them to float16 first
    x, _, _ = make_inputs(rng, (4,), 5, np.float16, prob=True)
    t = rng.dirichlet(np.ones(5), size=4)
    got = sides.on_host(fl.focal_loss(dev.put(x), dev.put(t), gamma=0.5, reduction="none"), dev)
    cpu = fl.focal_loss(x, t, gamma=0.5, reduction="none")
    np.testing.assert_allclose(got.loss.astype(float), cpu.loss.astype(float), rtol=2e-3)
    np.testing.assert_allclose(got.grad.astype(float), cpu.grad.astype(float), rtol=2e-3, atol=1e-3)


@pytest.mark.cpu
def test_alpha_not_in_mean_denominator(rng):
    x, t, kw = make_inputs(rng, (10,), 4, ignore_frac=0.3, sample_weight=True)
    a = fl.focal_loss(x, t, alpha=0.5, **kw)
    b = fl.focal_loss(x, t, **kw)
    np.testing.assert_allclose(float(a.loss), 0.5 * float(b.loss), rtol=1e-12)
    np.testing.assert_allclose(a.grad, 0.5 * b.grad, rtol=1e-12, atol=1e-16)
    s = fl.focal_loss(x, t, reduction="sum", **kw)
    keep = t != -100
    np.testing.assert_allclose(float(b.loss) * kw["sample_weight"][keep].sum(), float(s.loss), rtol=1e-12)


@pytest.mark.parametrize("backend, prob, reduction, batch", sides.per_side(
    lambda side: [(p, r, (2, 5)) for p in (False, True) for r in REDUCTIONS] if side == "cpu"
    else [(p, "mean", (5,)) for p in (False, True)]))
def test_gamma_zero_equals_cross_entropy(rng, backend, dev, prob, reduction, batch):
    x, t, kw = make_inputs(rng, batch, 7, prob=prob, ignore_frac=0.0 if prob else 0.3,
                           ignore_every=None if prob else IGNORE_EVERY[backend], sample_weight=True)
    args = (dev.put(x), dev.put(t))
    a = sides.on_host(fl.focal_loss(*args, gamma=0.0, reduction=reduction, **sides.on_side(dev, kw)), dev)
    b = sides.on_host(fl.softmax_cross_entropy(*args, reduction=reduction, **sides.on_side(dev, kw)), dev)
    np.testing.assert_allclose(np.asarray(a.loss), np.asarray(b.loss), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(a.grad, b.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.cpu
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


@pytest.mark.parametrize("backend, C, dtype", sides.per_side(
    lambda side: [(1, np.float64), (2, np.float64)] if side == "cpu" else [(1, np.float32)]))
def test_tiny_class_counts(rng, backend, dev, C, dtype):
    # one class (on the GPU: more threads than classes) and two
    x, t, _ = make_inputs(rng, (7,), C, dtype)
    got, want = run(backend, dev, x, t, gamma=1.5, alpha=0.3)
    check_result(got, *want, dtype)
    if C == 1:  # p == 1: nothing to learn
        assert float(got.loss) == 0.0 and not got.grad.any()


@pytest.mark.cpu
def test_vocabulary_sized_classes(rng):
    x, t, _ = make_inputs(rng, (3,), 50257, np.float32)
    res, want = run_both(x, t, gamma=2.0)
    check_result(res, *want, np.float32)


@pytest.mark.parametrize("backend, C, dtype, alpha, gamma, reduction", sides.per_side(
    lambda side: [(5, np.float64, "scalar", 2.0, r) for r in REDUCTIONS] if side == "cpu"
    # rows wider than the block: groups of UNROLL loads, then the rest
    else [(100, np.float32, "array", 1.5, "none")]))
def test_three_dimensional_batch(rng, backend, dev, C, dtype, alpha, gamma, reduction):
    x, t, kw = make_inputs(rng, (2, 3), C, dtype, ignore_frac=0.3, ignore_every=IGNORE_EVERY[backend],
                           sample_weight=True)
    got, want = run(backend, dev, x, t, gamma=gamma, alpha=_alpha(alpha, C, rng, dtype),
                    reduction=reduction, **kw)
    check_result(got, *want, dtype)
    assert got.grad.shape == x.shape
    if reduction == "none":
        assert got.loss.shape == (2, 3)


@pytest.mark.cpu
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


def test_strided_views(rng, backend, dev):
    big = (rng.normal(size=(8, 10)) * 2).astype(np.float32)
    labels = rng.integers(0, 5, size=8)
    sw = rng.uniform(size=12).astype(np.float32)
    alpha = rng.uniform(0.1, 1, size=10).astype(np.float32)
    kw = dict(gamma=0.5, reduction="sum")
    res = fl.focal_loss(dev.put(big)[::2, 1:10:2], dev.put(labels)[::2],
                        sample_weight=dev.put(sw)[::3], alpha=dev.put(alpha)[::2], **kw)
    host = dict(sample_weight=sw[::3], alpha=alpha[::2], **kw)
    got = sides.on_host(res, dev)
    check_result(got, *naive.focal_loss(big[::2, 1:10:2], labels[::2], **host), np.float32)
    sides.assert_same_as_cpu(backend, got, fl.focal_loss, big[::2, 1:10:2], labels[::2], **host)
    probs = rng.dirichlet(np.ones(5), size=8).astype(np.float32)
    got = sides.on_host(fl.focal_loss(dev.put(big)[1::2, ::2], dev.put(probs)[::2], gamma=2.0), dev)
    check_result(got, *naive.focal_loss(big[1::2, ::2], probs[::2], gamma=2.0), np.float32)


# ----------------------------------------------------- saturated logits


@pytest.mark.parametrize("backend, dtype, gamma, C", sides.per_side(
    lambda side: [(d, g, C) for C in (4, NARROW_ROW + 3) for d in (np.float64, np.float32, np.float16)
                  for g in (0.0, 0.25, 0.5, 0.9, 1.0, 2.0)] if side == "cpu"
    else [(d, g, 4) for d in DTYPES for g in (0.25, 0.5, 2.0)]))
def test_saturated_logits_finite_gradient(rng, backend, dev, dtype, gamma, C):
    # p_y == 1 exactly in floating point: (1 - p)**(gamma - 1) is infinite for gamma < 1,
    # but the gradient is finite (the NaN of optax/kornia)
    big = 1e4 if dtype != np.float16 else 6e4
    x = np.zeros((6, C), dtype)
    t = np.array([0, 1, 2, 3, 0, 1])
    x[np.arange(6), t] = big  # confident and right
    x[4] = 0
    x[4, 2] = big  # confident and wrong
    x[5] = rng.normal(size=C)
    x[3, 0] = -big
    # on the GPU: the same losses (inf where the CPU's are) and gradients as the CPU's
    got, want = run(backend, dev, x, t, gamma=gamma, reduction="none", loss_scale=float(big))
    assert np.all(np.isfinite(got.grad)), got.grad
    assert np.all(np.isfinite(got.loss[[0, 1, 2, 3, 5]]))
    check_result(got, *want, dtype, loss_scale=float(big))


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_saturated_probability_targets(backend, dev, gamma):
    x = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [30.0, 0.0, -5.0]])
    t = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.7, 0.3, 0.0]])
    got, want = run(backend, dev, x, t, gamma=gamma, reduction="none")
    assert np.all(np.isfinite(got.grad)) and np.all(np.isfinite(got.loss))
    check_result(got, *want, np.float64, loss_scale=1e4)


@pytest.mark.parametrize("backend, dtype, gamma, C", sides.per_side(
    lambda side: [(d, g, C) for C in (3, NARROW_ROW + 3) for d in (np.float64, np.float32)
                  for g in (0.3, 0.7, 2.0)] if side == "cpu"
    else [(d, 0.3, 3) for d in (np.float64, np.float32)]))
def test_nearly_saturated_logits_keep_relative_precision(backend, dev, dtype, gamma, C):
    # 1 - p_y between 1e-3 and 1e-30: each row's loss and gradient, tiny as they are, keep
    # their relative precision (1 - p_y = sum of the other probabilities, no cancellation)
    # (float32 stops where q**(1+gamma) would leave the normal range)
    margins = [7.0, 15.0, 30.0, 50.0, 70.0] if dtype == np.float64 else [7.0, 12.0, 15.0, 20.0]
    x = np.full((len(margins), C), -np.inf, dtype)  # beyond 3 classes: logits of -inf
    x[:, 1:3] = 0
    x[:, 0] = margins
    t = np.zeros(len(margins), dtype=int)
    got = sides.on_host(fl.focal_loss(dev.put(x), dev.put(t), gamma=gamma, reduction="none"), dev)
    loss, grad = naive.focal_loss(x, t, gamma=gamma, reduction="none")
    assert np.all(np.isfinite(got.grad))
    rtol = 1e-9 if dtype == np.float64 else 1e-4
    for i, margin in enumerate(margins):
        np.testing.assert_allclose(float(got.loss[i]), loss[i], rtol=rtol, atol=0,
                                   err_msg=f"loss of the row with margin {margin}")
        np.testing.assert_allclose(got.grad[i], grad[i], rtol=rtol, atol=0,
                                   err_msg=f"grad of the row with margin {margin}")


def test_minus_inf_where_probability_target_is_zero(rng, backend, dev):
    x = rng.normal(size=(4, 4))
    t = rng.dirichlet(np.ones(4), size=4)
    x[:, 3] = -np.inf
    t[:, 3] = 0.0
    t /= t.sum(axis=1, keepdims=True)
    got, want = run(backend, dev, x, t, gamma=0.5)
    assert np.isfinite(float(got.loss))
    assert np.all(np.isfinite(got.grad))
    check_result(got, *want, np.float64)


# ----------------------------------------------------------- the interface


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the simulator computes in NumPy scalars
@pytest.mark.parametrize("backend, C, prob, dtype", sides.per_side(
    lambda side: [(6, False, np.float64), (NARROW_ROW + 3, False, np.float64), (6, True, np.float64)]
    if side == "cpu" else [(6, False, np.float32), (6, True, np.float32)]))
def test_nan_and_inf_logits_stay_in_their_row(rng, backend, dev, C, prob, dtype):
    x = rng.normal(size=(4, C)).astype(dtype)
    x[2, 1] = np.nan
    x[3, 1] = np.inf  # off target
    t = rng.dirichlet(np.ones(C), size=4).astype(dtype) if prob else np.array([0, 1, 2, 0])
    # on the GPU, NaN where the CPU path has NaN (and the same numbers elsewhere)
    got, (loss, grad) = run(backend, dev, x, t, gamma=2.0, reduction="none")
    assert np.isnan(got.loss[2]) and np.all(np.isnan(got.grad[2]))
    rest = [0, 1]
    assert np.all(np.isfinite(got.loss[rest])) and np.all(np.isfinite(got.grad[rest]))
    check_result(fl.LossGrad(got.loss[rest], got.grad[rest]), loss[rest], grad[rest], dtype)


@pytest.mark.cpu
def test_inputs_are_not_modified(rng):
    x, t, kw = make_inputs(rng, (50,), 6, np.float32, ignore_frac=0.2, sample_weight=True)
    alpha = rng.uniform(size=6).astype(np.float32)
    copies = [a.copy() for a in (x, t, kw["sample_weight"], alpha)]
    fl.focal_loss(x, t, alpha=alpha, gamma=0.5, **kw)
    for before, after in zip(copies, (x, t, kw["sample_weight"], alpha)):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("reduction, want", [("mean", np.nan), ("sum", 0.0)])
def test_empty_and_fully_ignored_batches(backend, dev, reduction, want):
    for x, t in ((np.zeros((0, 3), np.float32), np.zeros(0, np.int64)),
                 (np.ones((2, 3), np.float32), np.array([-100, -100]))):
        got = sides.on_host(fl.focal_loss(dev.put(x), dev.put(t), reduction=reduction), dev)
        np.testing.assert_equal(float(got.loss), want)
        assert got.grad.shape == x.shape and not got.grad.any()
    none = fl.focal_loss(dev.put(np.zeros((0, 3))), dev.put(np.zeros(0, np.int64)), reduction="none")
    assert none.loss.shape == (0,)


@pytest.mark.parametrize("backend, dtype", sides.per_side(
    lambda side: [(np.float64,)] if side == "cpu" else [(np.float32,)]))
def test_grad_false(rng, backend, dev, dtype):
    x, t, kw = make_inputs(rng, (7,), 4, dtype, ignore_frac=0.3, ignore_every=IGNORE_EVERY[backend],
                           sample_weight=True)
    kw.update(gamma=2.0, alpha=_alpha("array", 4, rng, dtype))
    res = fl.focal_loss(dev.put(x), dev.put(t), grad=False, **sides.on_side(dev, kw))
    assert res.grad is None
    check_result(fl.LossGrad(dev.get(res.loss), None), naive.focal_loss(x, t, **kw)[0], None, dtype)


@pytest.mark.parametrize("backend, dtype, prob, alpha", sides.per_side(
    lambda side: [(d, False, "scalar") for d in (np.float64, np.float32)] if side == "cpu"
    else [(np.float32, p, "array") for p in (False, True)]))
def test_grad_out_and_in_place(rng, backend, dev, dtype, prob, alpha):
    x, t, kw = make_inputs(rng, (6,), 5, dtype, prob=prob, ignore_frac=0.0 if prob else 0.2,
                           ignore_every=None if prob else IGNORE_EVERY[backend], sample_weight=True)
    kw.update(gamma=1.5, alpha=_alpha(alpha, 5, rng, dtype))
    want = naive.focal_loss(x, t, **kw)
    out = dev.put(np.full_like(x, np.nan))
    res = fl.focal_loss(dev.put(x), dev.put(t), grad_out=out, **sides.on_side(dev, kw))
    assert res.grad is out
    check_result(sides.on_host(res, dev), *want, dtype)
    d_x = dev.put(x)
    res = fl.focal_loss(d_x, dev.put(t), grad_out=d_x, **sides.on_side(dev, kw))
    assert res.grad is d_x
    check_result(fl.LossGrad(dev.get(res.loss), dev.get(d_x)), *want, dtype)


def test_backend_with_numpy_returns_numpy(rng, backend):
    x, t, kw = make_inputs(rng, (4,), 5, ignore_frac=0.3, sample_weight=True)
    kw.update(gamma=2.0, alpha=_alpha("array", 5, rng))
    want = naive.focal_loss(x, t, **kw)
    res = fl.focal_loss(x, t, backend=backend, **kw)
    assert type(res.loss) is np.ndarray and type(res.grad) is np.ndarray
    check_result(res, *want, np.float64)
    res = fl.focal_loss(x, t, backend=backend, grad_out=x, **kw)
    assert res.grad is x
    check_result(res, *want, np.float64)


def _device_scalar():
    from numba import cuda
    return cuda.to_device(np.array(0.25, np.float32))  # its value is read back


#: a scalar alpha of each kind
SCALAR_ALPHAS = {"NumPy scalar": lambda: np.float32(0.25), "0-d array": lambda: np.array(0.25),
                 "0-d device array": _device_scalar}


@pytest.mark.parametrize("backend, kind", sides.per_side(
    lambda side: [(k,) for k in SCALAR_ALPHAS if side == "cuda" or "device" not in k]))
def test_scalar_alpha_kinds(rng, backend, dev, kind):
    x, t, _ = make_inputs(rng, (4,), 5, np.float32)
    got = sides.on_host(fl.focal_loss(dev.put(x), dev.put(t), alpha=SCALAR_ALPHAS[kind]()), dev)
    check_result(got, *naive.focal_loss(x, t, alpha=0.25), np.float32)


def test_scalar_loss_converts_with_float(rng, backend, dev):
    x, t, _ = make_inputs(rng, (3,), 4, np.float32)
    loss = fl.focal_loss(dev.put(x), dev.put(t)).loss
    assert loss.shape == () and abs(float(loss) - float(naive.focal_loss(x, t)[0])) < 1e-5


@pytest.mark.cpu
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


# ---------------------------------------------------- serial / parallel / blocks


@pytest.mark.cpu
def test_tiny_input_serial_path(rng):
    x, t, _ = make_inputs(rng, (2,), 3)
    res, want = run_both(x, t, gamma=2.0, alpha=0.25)
    check_result(res, *want, np.float64)


@pytest.mark.cpu
@pytest.mark.parametrize("C", [10, 300], ids=["narrow", "wide"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_large_input_parallel_path(rng, dtype, C):
    N = 4096 if C > NARROW_ROW else 16384  # over the parallel threshold either way
    x, t, kw = make_inputs(rng, (N,), C, dtype, ignore_frac=0.1, sample_weight=True)
    alpha = rng.uniform(0.1, 1, C).astype(dtype)
    for reduction in ["mean", "none"]:
        res, want = run_both(x, t, gamma=2.0, alpha=alpha, reduction=reduction, **kw)
        check_result(res, *want, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("prob", [False, True])
def test_block_size_does_not_change_the_answer(rng, dev, threads_per_block, prob):
    x, t, kw = make_inputs(rng, (3,), 37, prob=prob, ignore_every=None if prob else 4,
                           sample_weight=True)
    got, want = run("cuda", dev, x, t, gamma=0.7, alpha=_alpha("array", 37, rng), **kw)
    check_result(got, *want, np.float64)


@pytest.mark.cuda
@pytest.mark.parametrize("prob", [False, True])
def test_blocks_loop_over_several_rows(rng, dev, monkeypatch, prob):
    # two persistent blocks for nine rows (ignored ones among them), wide enough to unroll
    from fastloss.cuda import _blocks
    monkeypatch.setattr(_blocks, "SM_THREADS", 1)
    x, t, kw = make_inputs(rng, (9,), 70, prob=prob, ignore_every=None if prob else 4,
                           sample_weight=True)
    kw.update(gamma=0.5, alpha=_alpha("array", 70, rng))
    d_x = dev.put(x)
    res = fl.focal_loss(d_x, dev.put(t), grad_out=d_x, **sides.on_side(dev, kw))
    got = fl.LossGrad(dev.get(res.loss), dev.get(d_x))
    check_result(got, *naive.focal_loss(x, t, **kw), np.float64)


@pytest.mark.cuda
def test_strided_batch_of_more_than_two_dimensions_is_refused(rng, dev):
    x = dev.put(rng.normal(size=(3, 2, 4)))[:, :, ::2]
    with pytest.raises(ValueError, match="logits of shape"):
        fl.focal_loss(x.T, dev.put(np.zeros((2, 2), np.int64)))


@pytest.mark.cuda
def test_device_arrays_are_never_copied_to_or_from_the_host(rng, dev, monkeypatch):
    # probability targets: integer labels are range-checked by a kernel that sends back an index
    from numba import cuda
    x, t, kw = make_inputs(rng, (4,), 5, np.float32, prob=True, sample_weight=True)
    kw["alpha"] = _alpha("array", 5, rng, np.float32)
    args = (dev.put(x), dev.put(t))
    dkw = sides.on_side(dev, kw)
    buf = dev.put(np.zeros_like(x))
    calls = []
    monkeypatch.setattr(type(args[0]), "copy_to_host", lambda *a, **k: calls.append("copy_to_host"))
    monkeypatch.setattr(cuda, "to_device", lambda *a, **k: calls.append("to_device"))
    res = fl.focal_loss(*args, grad_out=buf, gamma=0.5, **dkw)
    assert calls == []
    monkeypatch.undo()
    check_result(sides.on_host(res, dev), *naive.focal_loss(x, t, gamma=0.5, **kw), np.float32)


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
    "target of the wrong length": (lambda put: {"target": put(np.array([0, 1]))},
                                   ValueError, "target must have shape"),
    "probabilities of the wrong shape": (lambda put: {"target": put(np.full((3, 6), 0.1, F32))},
                                         ValueError, "target must have shape"),
    "int logits": (lambda put: {"logits": put(np.zeros((3, 5), np.int32))},
                   TypeError, "logits must have dtype"),
    "negative gamma": (lambda put: {"gamma": -0.5}, ValueError, "gamma must be >= 0"),
    "alpha of the wrong length": (lambda put: {"alpha": put(np.ones(7, F32))},
                                  ValueError, "alpha must have shape"),
    "sample_weight of the wrong shape": (lambda put: {"sample_weight": put(np.ones(2, F32))},
                                         ValueError, "sample_weight must have shape"),
    "bad reduction": (lambda put: {"reduction": "average"}, ValueError, "reduction must be one of"),
    **GRAD_OUT_BAD,
}
ON_THE_HOST = {
    **GRAD_OUT_ON_THE_HOST,
    "alpha on the host": (lambda put: {"alpha": np.ones(5, F32)}, TypeError, "alpha is on cpu"),
}


@pytest.mark.parametrize("backend, case", sides.bad_input_cases(BAD_INPUT, ON_THE_HOST))
def test_bad_input_raises_before_any_kernel_and_changes_nothing(backend, dev, case):
    sides.assert_rejected_unchanged(dev, fl.focal_loss, ("logits", "target"), np.array([0, 1, 2]),
                                    np.arange(15, dtype=F32).reshape(3, 5), case)


@pytest.mark.cpu
def test_ignore_index_label_allowed(rng):
    x = rng.normal(size=(4, 3))
    t = np.array([0, 7, 2, 7])
    res, want = run_both(x, t, ignore_index=7)
    check_result(res, *want, np.float64)
    assert np.all(res.grad[[1, 3]] == 0)
