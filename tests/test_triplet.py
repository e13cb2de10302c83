"""fastloss.triplet_margin_loss against naive.py and torch.nn.functional.triplet_margin_loss."""
import numpy as np
import pytest

import fastloss as fl
import naive
from fastloss.cpu import triplet_margin
from naive import assert_close, check_result, finite_difference

REDUCTIONS = ["mean", "sum", "none"]
DISTANCES = ["euclidean", "squared_euclidean", "cosine"]
DTYPES = [np.float64, np.float32, np.float16]


def make_triplets(rng, shape, dtype=np.float64, scale=1.0):
    return tuple((rng.normal(size=shape) * scale).astype(dtype) for _ in range(3))


def check_triplet(res, want, dtype, **kw):
    """fastloss LossGrad (grad a 3-tuple) against naive's (loss, (ga, gp, gn))."""
    want_loss, want_grads = want
    check_result((res.loss, None), want_loss, None, dtype, **kw)
    assert isinstance(res.grad, tuple) and len(res.grad) == 3
    scale = max(float(np.max(np.abs(g), initial=0.0)) for g in want_grads) or 1.0
    for got, w, what in zip(res.grad, want_grads, ("d_anchor", "d_positive", "d_negative")):
        assert got.shape == w.shape and got.dtype == np.dtype(dtype), (what, got.shape, got.dtype)
        assert_close(got, w, dtype, scale=scale, what=what)


def margin_for(distance):
    # about half of the rows active for N(0, 1) inputs in 5 dimensions
    return {"euclidean": 0.5, "squared_euclidean": 2.0, "cosine": 0.3}[distance]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_matches_reference(rng, distance, reduction, dtype):
    a, p, n = make_triplets(rng, (13, 5), dtype)
    kw = dict(margin=margin_for(distance), distance=distance, reduction=reduction)
    res = fl.triplet_margin_loss(a, p, n, **kw)
    want = naive.triplet_margin_loss(a, p, n, **kw)
    if reduction == "none":
        assert 0 < np.count_nonzero(want[0]) < 13  # both sides of the hinge are exercised
    check_triplet(res, want, dtype)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: np.dtype(d).name)
def test_swap(rng, distance, dtype):
    a, p, n = make_triplets(rng, (17, 3), dtype)
    # rows 0-5: the negative sits next to the positive, so the swap changes the negative distance
    n[:6] = p[:6] + (0.1 * rng.normal(size=(6, 3))).astype(dtype)
    kw = dict(margin=margin_for(distance), distance=distance, swap=True, reduction="none")
    res = fl.triplet_margin_loss(a, p, n, **kw)
    check_triplet(res, naive.triplet_margin_loss(a, p, n, **kw), dtype)
    plain = fl.triplet_margin_loss(a, p, n, **dict(kw, swap=False))
    assert np.any(res.loss > plain.loss)


def test_swap_tie_splits_the_gradient():
    # d(a, n) == d(p, n) exactly: torch.minimum's backward gives each side half
    a = np.array([[1.0, 0.0]])
    p = np.array([[-1.0, 0.0]])
    n = np.array([[0.0, 1.0]])
    res = fl.triplet_margin_loss(a, p, n, margin=1.0, eps=0.0, swap=True)
    r = np.sqrt(0.5)
    # d(a,p) = 2, d_neg = sqrt(2): loss 3 - sqrt(2)
    np.testing.assert_allclose(float(res.loss), 3.0 - np.sqrt(2.0), rtol=1e-15)
    ga, gp, gn = res.grad
    np.testing.assert_allclose(ga, [[1.0 - 0.5 * r, 0.5 * r]], rtol=1e-15)
    np.testing.assert_allclose(gp, [[-1.0 + 0.5 * r, 0.5 * r]], rtol=1e-15)
    np.testing.assert_allclose(gn, [[0.0, -2 * 0.5 * r]], rtol=1e-15, atol=1e-16)
    check_triplet(res, naive.triplet_margin_loss(a, p, n, margin=1.0, eps=0.0, swap=True), np.float64)


@pytest.mark.parametrize("eps", [0.0, 1e-6, 0.25])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_eps(rng, eps, distance):
    a, p, n = make_triplets(rng, (9, 4))
    kw = dict(eps=eps, distance=distance, margin=margin_for(distance), reduction="none")
    check_triplet(fl.triplet_margin_loss(a, p, n, **kw), naive.triplet_margin_loss(a, p, n, **kw),
                  np.float64)


def test_euclidean_eps_shifts_every_coordinate():
    a = np.zeros((1, 3))
    res = fl.triplet_margin_loss(a, a, a + 2.0, margin=0.0, eps=0.5, reduction="none")
    # d(a, p) = ||0 + 0.5|| = 0.5 sqrt(3); d(a, n) = ||-2 + 0.5|| = 1.5 sqrt(3): hinge at 0
    assert float(res.loss[0]) == 0.0
    res = fl.triplet_margin_loss(a, a, a + 2.0, margin=2.0, eps=0.5, reduction="none")
    np.testing.assert_allclose(res.loss, [2.0 - np.sqrt(3.0)], rtol=1e-14)


def test_cosine_tiny_norm_is_clamped():
    a = np.array([[1e-9, 0.0], [3.0, 4.0]])
    p = np.array([[1.0, 1.0], [1e-9, -1e-9]])
    n = np.array([[0.0, 2.0], [-1.0, 0.5]])
    kw = dict(distance="cosine", eps=1e-6, margin=0.5, reduction="none")
    res = fl.triplet_margin_loss(a, p, n, **kw)
    assert all(np.all(np.isfinite(g)) for g in res.grad)
    check_triplet(res, naive.triplet_margin_loss(a, p, n, **kw), np.float64)


@pytest.mark.parametrize("distance", DISTANCES)
def test_margin_zero_and_large(rng, distance):
    a, p, n = make_triplets(rng, (11, 3))
    for margin in [0.0, 100.0]:
        kw = dict(margin=margin, distance=distance, reduction="sum")
        res = fl.triplet_margin_loss(a, p, n, **kw)
        check_triplet(res, naive.triplet_margin_loss(a, p, n, **kw), np.float64)
    # margin 100: every row active; rows active at margin 0 have a loss 100 lower there
    big = fl.triplet_margin_loss(a, p, n, margin=100.0, distance=distance, reduction="none")
    zero = fl.triplet_margin_loss(a, p, n, margin=0.0, distance=distance, reduction="none")
    active = zero.loss > 0
    assert np.all(big.loss > 0) and 0 < np.count_nonzero(active) < 11
    np.testing.assert_allclose(big.loss[active], zero.loss[active] + 100.0, rtol=1e-13)


def test_hinge_passes_the_gradient_at_zero():
    # z == 0 exactly: torch's clamp_min backward passes the gradient (z >= 0)
    a = np.array([[0.0, 0.0]])
    p = np.array([[1.0, 0.0]])
    n = np.array([[0.0, 2.0]])
    res = fl.triplet_margin_loss(a, p, n, margin=1.0, eps=0.0)
    assert float(res.loss) == 0.0
    np.testing.assert_allclose(res.grad[0], [[-1.0, 1.0]])
    np.testing.assert_allclose(res.grad[1], [[1.0, 0.0]])
    np.testing.assert_allclose(res.grad[2], [[0.0, -1.0]])


def test_zero_distance_has_zero_gradient():
    a = np.array([[1.0, 2.0], [0.5, 0.5]])
    res = fl.triplet_margin_loss(a, a.copy(), a + 1.0, margin=5.0, eps=0.0, reduction="none")
    assert all(np.all(np.isfinite(g)) for g in res.grad)
    check_triplet(res, naive.triplet_margin_loss(a, a, a + 1.0, margin=5.0, eps=0.0, reduction="none"),
                  np.float64)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("swap", [False, True])
def test_finite_differences(rng, distance, swap):
    a, p, n = make_triplets(rng, (6, 4))
    margin = margin_for(distance)
    base = naive.triplet_margin_loss(a, p, n, margin=margin, distance=distance, swap=swap,
                                     reduction="none")[0]
    # keep every row away from the hinge's kink
    keep = np.abs(base) > 1e-3
    res = fl.triplet_margin_loss(a, p, n, margin=margin, distance=distance, swap=swap)
    inputs = [a, p, n]
    for which in range(3):
        def f(x, which=which):
            args = list(inputs)
            args[which] = x
            return fl.triplet_margin_loss(*args, margin=margin, distance=distance, swap=swap,
                                          grad=False).loss

        for flat in rng.choice(a.size, size=6, replace=False):
            idx = np.unravel_index(flat, a.shape)
            if not keep[idx[0]]:
                continue
            np.testing.assert_allclose(res.grad[which][idx], finite_difference(f, inputs[which], idx),
                                       rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------ torch parity


def _torch_triplet(torch, a, p, n, *, margin, distance, swap, eps, reduction):
    F = torch.nn.functional
    red = {"mean": 1, "sum": 2, "none": 0}[reduction]
    if distance == "euclidean":
        # the ATen op: F.triplet_margin_loss refuses margin=0, the operator computes it
        return torch.triplet_margin_loss(a, p, n, margin, 2.0, eps, swap, red)
    if distance == "squared_euclidean":
        def dist(x, y):
            return ((x - y) ** 2).sum(-1)
    else:
        def dist(x, y):
            return 1.0 - F.cosine_similarity(x, y, dim=-1, eps=eps)
    # torch.nn.functional.triplet_margin_with_distance_loss's body (its wrapper refuses margin=0)
    d_neg = dist(a, n)
    if swap:
        d_neg = torch.minimum(d_neg, dist(p, n))
    out = torch.clamp_min(margin + dist(a, p) - d_neg, 0)
    return {"mean": out.mean, "sum": out.sum, "none": lambda: out}[reduction]()


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_torch_parity(rng, distance, reduction, dtype):
    torch = pytest.importorskip("torch")
    a, p, n = make_triplets(rng, (15, 6), dtype)
    n[:4] = p[:4] + (0.2 * rng.normal(size=(4, 6))).astype(dtype)  # swap matters there
    for swap, eps, margin in [(False, 1e-6, margin_for(distance)), (True, 1e-6, margin_for(distance)),
                              (True, 0.1, 0.0)]:
        res = fl.triplet_margin_loss(a, p, n, margin=margin, distance=distance, swap=swap, eps=eps,
                                     reduction=reduction)
        ts = [torch.tensor(x, requires_grad=True) for x in (a, p, n)]
        out = _torch_triplet(torch, *ts, margin=margin, distance=distance, swap=swap, eps=eps,
                             reduction=reduction)
        out.sum().backward()
        want = (out.detach().numpy(), tuple(t.grad.numpy() for t in ts))
        check_triplet(res, want, dtype)


def test_torch_parity_one_dimensional_input(rng):
    torch = pytest.importorskip("torch")
    a, p, n = make_triplets(rng, (7,))
    for reduction in REDUCTIONS:
        res = fl.triplet_margin_loss(a, p, n, margin=3.0, reduction=reduction)
        ts = [torch.tensor(x, requires_grad=True) for x in (a, p, n)]
        out = torch.nn.functional.triplet_margin_loss(*ts, margin=3.0, reduction=reduction)
        out.sum().backward()
        assert np.shape(res.loss) == tuple(out.shape) == ()
        check_triplet(res, (out.detach().numpy(), tuple(t.grad.numpy() for t in ts)), np.float64)


# ---------------------------------------------------------------- the interface


def test_one_dimensional_input_is_one_triplet(rng):
    a, p, n = make_triplets(rng, (5,))
    res = fl.triplet_margin_loss(a, p, n, margin=2.0, reduction="none")
    assert res.loss.shape == () and all(g.shape == (5,) for g in res.grad)
    rows = fl.triplet_margin_loss(a[None], p[None], n[None], margin=2.0, reduction="none")
    np.testing.assert_array_equal(res.loss, rows.loss[0])
    for g, gr in zip(res.grad, rows.grad):
        np.testing.assert_array_equal(g, gr[0])


def test_empty_batch():
    e = np.zeros((0, 4), np.float32)
    res = fl.triplet_margin_loss(e, e, e)
    assert np.isnan(float(res.loss)) and all(g.shape == (0, 4) for g in res.grad)
    assert float(fl.triplet_margin_loss(e, e, e, reduction="sum").loss) == 0.0
    assert fl.triplet_margin_loss(e, e, e, reduction="none").loss.shape == (0,)


def test_nan_propagates_per_row(rng):
    a, p, n = make_triplets(rng, (4, 3))
    a[1, 2] = np.nan
    res = fl.triplet_margin_loss(a, p, n, margin=10.0, reduction="none")
    assert np.isnan(res.loss[1]) and not np.any(np.isnan(res.loss[[0, 2, 3]]))
    for g in res.grad:  # as torch: the norm's backward spreads the NaN over the row
        assert np.all(np.isnan(g[1])) and np.all(np.isfinite(g[[0, 2, 3]]))
    assert np.isnan(float(fl.triplet_margin_loss(a, p, n).loss))


def test_grad_false(rng):
    a, p, n = make_triplets(rng, (8, 3))
    res = fl.triplet_margin_loss(a, p, n, grad=False)
    assert res.grad is None
    np.testing.assert_allclose(float(res.loss), naive.triplet_margin_loss(a, p, n)[0], rtol=1e-12)


def test_non_contiguous(rng):
    big = [rng.normal(size=(14, 9)) for _ in range(3)]
    a, p, n = big[0][::2, ::3], big[1].T[::3, ::2].T, big[2][1::2, 2::3]
    assert a.shape == p.shape == n.shape == (7, 3)
    kw = dict(margin=1.5, swap=True)
    check_triplet(fl.triplet_margin_loss(a, p, n, **kw), naive.triplet_margin_loss(a, p, n, **kw),
                  np.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_grad_out_reuse_and_in_place(rng, dtype):
    a, p, n = make_triplets(rng, (9, 5), dtype)
    kw = dict(margin=1.0, distance="cosine", swap=True)
    fresh = fl.triplet_margin_loss(a, p, n, **kw)
    outs = tuple(np.full_like(a, 7.0) for _ in range(3))
    for _ in range(2):  # reused: the same bits every time
        res = fl.triplet_margin_loss(a, p, n, grad_out=outs, **kw)
        assert all(g is o for g, o in zip(res.grad, outs))
        for g, f in zip(res.grad, fresh.grad):
            np.testing.assert_array_equal(g.view(np.uint8), f.view(np.uint8))
    # in place: the inputs themselves receive their gradients
    a2, p2, n2 = a.copy(), p.copy(), n.copy()
    res = fl.triplet_margin_loss(a2, p2, n2, grad_out=(a2, p2, n2), **kw)
    assert res.grad[0] is a2 and res.grad[1] is p2 and res.grad[2] is n2
    for g, f in zip(res.grad, fresh.grad):
        np.testing.assert_array_equal(g, f)
    # crossed: the anchor's gradient into the negative's buffer (goes through a temporary)
    a3, p3, n3 = a.copy(), p.copy(), n.copy()
    res = fl.triplet_margin_loss(a3, p3, n3, grad_out=(n3, a3, p3), **kw)
    for g, f in zip(res.grad, fresh.grad):
        np.testing.assert_array_equal(g, f)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: np.dtype(d).name)
def test_parallel_path_matches_reference_and_serial(rng, dtype, monkeypatch):
    a, p, n = make_triplets(rng, (2000, 17), dtype)  # 34000 elements: the parallel path
    assert triplet_margin.use_threads(a)
    kw = dict(margin=4.0, distance="squared_euclidean", swap=True, reduction="none")
    res = fl.triplet_margin_loss(a, p, n, **kw)
    check_triplet(res, naive.triplet_margin_loss(a, p, n, **kw), dtype)
    monkeypatch.setattr(triplet_margin, "use_threads", lambda x: False)
    serial = fl.triplet_margin_loss(a, p, n, **kw)
    np.testing.assert_array_equal(res.loss, serial.loss)
    for g, s in zip(res.grad, serial.grad):
        np.testing.assert_array_equal(g, s)


# ---------------------------------------------------------------- bad input


def _args(rng):
    return make_triplets(rng, (6, 4))


@pytest.mark.parametrize("change,name", [
    (dict(anchor=np.zeros((2, 6, 4))), "anchor"),
    (dict(anchor=np.zeros(())), "anchor"),
    (dict(positive=np.zeros((6, 3))), "positive"),
    (dict(negative=np.zeros((5, 4))), "negative"),
    (dict(anchor=np.zeros((6, 4), np.int32)), "anchor"),
    (dict(positive=np.zeros((6, 4), np.float32)), "positive"),
    (dict(negative=np.zeros((6, 4), np.int64)), "negative"),
    (dict(margin=-0.5), "margin"),
    (dict(margin="big"), "margin"),
    (dict(eps=-1e-6), "eps"),
    (dict(distance="manhattan"), "distance"),
    (dict(reduction="max"), "reduction"),
    (dict(grad_out=np.zeros((6, 4))), "grad_out"),
    (dict(grad_out=(np.zeros((6, 4)), np.zeros((6, 4)))), "grad_out"),
    (dict(grad_out=(np.zeros((6, 4)), np.zeros((6, 3)), np.zeros((6, 4)))), r"grad_out\[1\]"),
    (dict(grad_out=(np.zeros((6, 4)), np.zeros((6, 4)), np.zeros((6, 4), np.float32))), r"grad_out\[2\]"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_raises_and_changes_nothing(rng, change, name):
    a, p, n = _args(rng)
    kw = dict(anchor=a, positive=p, negative=n)
    kw.update(change)
    before = [x.copy() for x in (a, p, n)]
    with pytest.raises((ValueError, TypeError), match=name):
        fl.triplet_margin_loss(**kw)
    for x, b in zip((a, p, n), before):
        np.testing.assert_array_equal(x, b)


def test_overlapping_grad_out_rejected(rng):
    a, p, n = _args(rng)
    buf = np.full((6, 4), 3.0)
    with pytest.raises(ValueError, match="grad_out"):
        fl.triplet_margin_loss(a, p, n, grad_out=(buf, np.zeros((6, 4)), buf))
    assert np.all(buf == 3.0)
    read_only = np.zeros((6, 4))
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match=r"grad_out\[0\]"):
        fl.triplet_margin_loss(a, p, n, grad_out=(read_only, np.zeros((6, 4)), np.zeros((6, 4))))
