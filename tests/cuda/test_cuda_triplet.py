"""triplet_margin_loss on the GPU (or the simulator) against naive.py and the CPU path."""
import numpy as np
import pytest

import fastloss as fl
import naive
from naive import assert_close, check_result

DISTANCES = ["euclidean", "squared_euclidean", "cosine"]
DTYPES = [np.float64, np.float32, np.float16]
MARGIN = {"euclidean": 0.5, "squared_euclidean": 2.0, "cosine": 0.3}


def make_triplets(rng, shape, dtype=np.float64, scale=1.0):
    return tuple((rng.normal(size=shape) * scale).astype(dtype) for _ in range(3))


def host(res):
    """A LossGrad with device arrays as one of NumPy arrays."""
    loss = res.loss if isinstance(res.loss, np.ndarray) else res.loss.copy_to_host()
    grads = None if res.grad is None else tuple(
        g if isinstance(g, np.ndarray) else g.copy_to_host() for g in res.grad)
    return fl.LossGrad(loss, grads)


def check_triplet(res, want, dtype, **kw):
    """A LossGrad (grad a 3-tuple of NumPy arrays) against naive's (loss, (ga, gp, gn))."""
    want_loss, want_grads = want
    check_result((res.loss, None), want_loss, None, dtype, **kw)
    assert isinstance(res.grad, tuple) and len(res.grad) == 3
    scale = max(float(np.max(np.abs(g), initial=0.0)) for g in want_grads) or 1.0
    for got, w, what in zip(res.grad, want_grads, ("d_anchor", "d_positive", "d_negative")):
        assert isinstance(got, np.ndarray), type(got)
        assert got.shape == w.shape and got.dtype == np.dtype(dtype), (what, got.shape, got.dtype)
        assert_close(got, w, dtype, scale=scale, what=what, **kw)


def both(a, p, n, dtype, **kw):
    """The GPU result (backend="cuda", NumPy in and out) checked against the float64
    reference and against the CPU path; returns it."""
    res = fl.triplet_margin_loss(a, p, n, backend="cuda", **kw)
    check_triplet(res, naive.triplet_margin_loss(a, p, n, **kw), dtype)
    cpu = fl.triplet_margin_loss(a, p, n, **kw)
    check_triplet(res, (np.asarray(cpu.loss, np.float64), tuple(g.astype(np.float64) for g in cpu.grad)),
                  dtype)
    return res


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("distance", DISTANCES)
def test_matches_reference_and_cpu(rng, distance, dtype):
    a, p, n = make_triplets(rng, (7, 5), dtype)
    p[:3] = a[:3] + (0.2 * rng.normal(size=(3, 5))).astype(dtype)  # some rows off the hinge
    n[:2] = p[:2] + (0.1 * rng.normal(size=(2, 5))).astype(dtype)  # where swap matters
    n[2] = -3 * a[2]  # a row with z < 0
    for reduction, swap in (("mean", False), ("none", True), ("sum", True)):
        kw = dict(margin=MARGIN[distance], distance=distance, reduction=reduction, swap=swap)
        res = both(a, p, n, dtype, **kw)
        assert np.asarray(res.loss).dtype == np.dtype(dtype)
        if reduction == "none":
            want = naive.triplet_margin_loss(a, p, n, **kw)[0]
            assert 0 < np.count_nonzero(want) < 7  # both sides of the hinge


def test_swap_tie_splits_the_gradient():
    # d(a, n) == d(p, n) exactly: torch.minimum's backward gives each half
    a = np.array([[0.0, 0.0], [1.0, 2.0]])
    p = np.array([[2.0, 0.0], [3.0, 2.0]])
    n = np.array([[1.0, 3.0], [2.0, 5.0]])
    for distance in DISTANCES[:2]:
        res = both(a, p, n, np.float64, margin=8.0, distance=distance, swap=True, eps=0.0,
                   reduction="none")
        assert np.all(res.grad[1] != 0)  # d_positive: half of it through d(p, n)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_eps(rng, distance):
    a, p, n = make_triplets(rng, (5, 4))
    a[0] = 1e-3 * a[0]  # a norm below eps: the cosine clamp, no gradient through it
    for eps in (0.0, 0.05):
        both(a, p, n, np.float64, distance=distance, eps=eps, margin=MARGIN[distance])


def test_hinge_at_zero_and_zero_distance():
    # row 0: z = 0 exactly (the gradient passes, as clamp_min's); row 1: a == p (d = 0, no NaN)
    a = np.array([[0.0, 0.0], [1.0, 1.0]])
    p = np.array([[1.0, 0.0], [1.0, 1.0]])
    n = np.array([[0.0, 2.0], [1.0, 3.0]])
    res = both(a, p, n, np.float64, margin=3.0, distance="squared_euclidean", reduction="none")
    assert res.loss[0] == 0.0 and np.any(res.grad[0][0] != 0)
    res = both(a, p, n, np.float64, margin=1.0, eps=0.0, reduction="none")
    assert np.all(np.isfinite(res.grad[0]))


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: np.dtype(d).name)
def test_extreme_values_stay_finite(rng, dtype):
    a, p, n = make_triplets(rng, (4, 3), dtype, scale=1e4)
    for distance in DISTANCES:
        res = both(a, p, n, dtype, distance=distance, margin=1e4, reduction="none")
        assert np.all(np.isfinite(res.loss)) and all(np.all(np.isfinite(g)) for g in res.grad)


def test_nan_propagates_per_row(rng):
    a, p, n = make_triplets(rng, (4, 3))
    a[1, 2] = np.nan
    for distance in DISTANCES:
        res = fl.triplet_margin_loss(a, p, n, distance=distance, swap=True, reduction="none",
                                     backend="cuda")
        cpu = fl.triplet_margin_loss(a, p, n, distance=distance, swap=True, reduction="none")
        np.testing.assert_array_equal(np.isnan(res.loss), np.isnan(cpu.loss))
        assert np.isnan(res.loss[1]) and not np.any(np.isnan(res.loss[[0, 2, 3]]))
        for g, c in zip(res.grad, cpu.grad):
            np.testing.assert_array_equal(np.isnan(g), np.isnan(c))
            np.testing.assert_allclose(g, c, rtol=1e-12, atol=1e-15)
    assert np.isnan(float(fl.triplet_margin_loss(a, p, n, backend="cuda").loss))


def test_empty_batch():
    a = np.zeros((0, 4))
    res = fl.triplet_margin_loss(a, a, a, backend="cuda")
    assert np.isnan(float(res.loss)) and all(g.shape == (0, 4) for g in res.grad)
    assert float(fl.triplet_margin_loss(a, a, a, reduction="sum", backend="cuda").loss) == 0.0
    assert fl.triplet_margin_loss(a, a, a, reduction="none", backend="cuda").loss.shape == (0,)


def test_one_triplet(rng, dev):
    a, p, n = make_triplets(rng, (4,))
    res = both(a, p, n, np.float64, reduction="none", swap=True)
    assert res.loss.shape == () and all(g.shape == (4,) for g in res.grad)
    # strided 1-D device inputs and gradient buffers
    big = [dev.put(np.repeat(x, 2)) for x in (a, p, n)]
    views = [b[::2] for b in big]
    outs = tuple(dev.put(np.zeros(8))[1::2] for _ in range(3))
    got = fl.triplet_margin_loss(*views, reduction="none", swap=True, grad_out=outs)
    assert all(g is o for g, o in zip(got.grad, outs))
    check_triplet(host(got), naive.triplet_margin_loss(a, p, n, reduction="none", swap=True),
                  np.float64)


def test_device_arrays_in_and_out(rng, dev):
    a, p, n = make_triplets(rng, (6, 5), np.float32)
    da, dp, dn = (dev.put(x) for x in (a, p, n))
    for reduction in ("mean", "none"):
        kw = dict(distance="cosine", swap=True, reduction=reduction)
        res = fl.triplet_margin_loss(da, dp, dn, **kw)
        assert isinstance(res.loss, type(da))
        assert all(type(g) is type(da) for g in res.grad)
        if reduction == "mean":
            assert isinstance(float(res.loss), float)
        check_triplet(host(res), naive.triplet_margin_loss(a, p, n, **kw), np.float32)


def test_non_contiguous_device_views(rng, dev):
    big = [rng.normal(size=(14, 9)) for _ in range(3)]
    a, p, n = big[0][::2, ::3], big[1][1::2, 2::3], big[2][::2, 1::3]
    views = (dev.put(big[0])[::2, ::3], dev.put(big[1])[1::2, 2::3], dev.put(big[2])[::2, 1::3])
    kw = dict(margin=1.5, swap=True)
    check_triplet(host(fl.triplet_margin_loss(*views, **kw)), naive.triplet_margin_loss(a, p, n, **kw),
                  np.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float16], ids=lambda d: np.dtype(d).name)
def test_grad_out_reuse_and_in_place(rng, dev, dtype):
    a, p, n = make_triplets(rng, (5, 4), dtype)
    kw = dict(margin=1.0, distance="cosine", swap=True)
    fresh = host(fl.triplet_margin_loss(dev.put(a), dev.put(p), dev.put(n), **kw))
    outs = tuple(dev.put(np.full_like(a, 7.0)) for _ in range(3))
    for _ in range(2):  # reused: the same bits every time
        res = fl.triplet_margin_loss(dev.put(a), dev.put(p), dev.put(n), grad_out=outs, **kw)
        assert all(g is o for g, o in zip(res.grad, outs))
        for g, f in zip(outs, fresh.grad):
            np.testing.assert_array_equal(dev.get(g).view(np.uint8), f.view(np.uint8))
    # in place, and crossed (the anchor's gradient into the negative's buffer)
    for order in ((0, 1, 2), (2, 0, 1)):
        xs = [dev.put(x) for x in (a, p, n)]
        res = fl.triplet_margin_loss(*xs, grad_out=tuple(xs[k] for k in order), **kw)
        assert all(g is xs[k] for g, k in zip(res.grad, order))
        for g, f in zip(res.grad, fresh.grad):
            np.testing.assert_array_equal(dev.get(g), f)
    # a buffer overlapping an input elsewhere than element for element: through a temporary
    buf = dev.put(np.concatenate([a, a[:1]]))
    xa = buf[:5]
    outs = (buf[1:], dev.put(np.zeros_like(a)), dev.put(np.zeros_like(a)))
    res = fl.triplet_margin_loss(xa, dev.put(p), dev.put(n), grad_out=outs, **kw)
    assert res.grad[0] is outs[0]
    for g, f in zip(res.grad, fresh.grad):
        np.testing.assert_array_equal(dev.get(g), f)


def test_grad_out_numpy_with_backend_cuda(rng):
    a, p, n = make_triplets(rng, (5, 3))
    outs = tuple(np.full_like(a, 3.0) for _ in range(3))
    res = fl.triplet_margin_loss(a, p, n, grad_out=outs, backend="cuda")
    assert all(g is o for g, o in zip(res.grad, outs))
    check_triplet(res, naive.triplet_margin_loss(a, p, n), np.float64)


def test_grad_false(rng, dev):
    a, p, n = make_triplets(rng, (5, 3))
    res = fl.triplet_margin_loss(dev.put(a), dev.put(p), dev.put(n), grad=False)
    assert res.grad is None
    np.testing.assert_allclose(float(res.loss), naive.triplet_margin_loss(a, p, n)[0], rtol=1e-12)


def test_threads_per_block(rng, threads):
    a, p, n = make_triplets(rng, (5, 37))  # rows wider than the block at 8 threads
    for distance in DISTANCES:
        kw = dict(distance=distance, margin=MARGIN[distance] * 4, swap=True, reduction="none")
        res = fl.triplet_margin_loss(a, p, n, backend="cuda", **kw)
        check_triplet(res, naive.triplet_margin_loss(a, p, n, **kw), np.float64)
        cpu = fl.triplet_margin_loss(a, p, n, **kw)
        np.testing.assert_allclose(res.loss, cpu.loss, rtol=1e-13)


@pytest.mark.parametrize("change,name", [
    (dict(anchor=np.zeros((2, 6, 4))), "anchor"),
    (dict(positive=np.zeros((6, 3))), "positive"),
    (dict(negative=np.zeros((5, 4))), "negative"),
    (dict(anchor=np.zeros((6, 4), np.int32)), "anchor"),
    (dict(positive=np.zeros((6, 4), np.float32)), "positive"),
    (dict(margin=-0.5), "margin"),
    (dict(eps=-1e-6), "eps"),
    (dict(distance="manhattan"), "distance"),
    (dict(reduction="max"), "reduction"),
    (dict(grad_out=(np.zeros((6, 4)),) * 2), "grad_out"),
    (dict(grad_out=(np.zeros((6, 4)), np.zeros((6, 3)), np.zeros((6, 4)))), r"grad_out\[1\]"),
    (dict(grad_out=(np.zeros((6, 4)), np.zeros((6, 4)), np.zeros((6, 4), np.float32))), r"grad_out\[2\]"),
    (dict(grad_out="host"), r"grad_out\[0\]"),
    (dict(grad_out="shared"), r"grad_out\[2\] overlaps"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_raises_and_changes_nothing(rng, dev, change, name):
    a, p, n = make_triplets(rng, (6, 4))
    kw = dict(anchor=dev.put(a), positive=dev.put(p), negative=dev.put(n))
    for key, value in change.items():
        if key == "grad_out" and value == "host":  # a NumPy buffer for device inputs
            value = (np.zeros((6, 4)), dev.put(np.zeros((6, 4))), dev.put(np.zeros((6, 4))))
        elif key == "grad_out" and value == "shared":
            shared = dev.put(np.zeros((6, 4)))
            value = (shared, dev.put(np.zeros((6, 4))), shared)
        elif key == "grad_out":
            value = tuple(dev.put(v) for v in value)
        elif isinstance(value, np.ndarray):
            value = dev.put(value)
        kw[key] = value
    with pytest.raises((ValueError, TypeError), match=name):
        fl.triplet_margin_loss(**kw)
    for x, b in zip((kw["anchor"], kw["positive"], kw["negative"]), (a, p, n)):
        if x.shape == b.shape and x.dtype == b.dtype:
            np.testing.assert_array_equal(dev.get(x), b)
