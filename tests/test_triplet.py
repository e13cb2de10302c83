"""fastloss.triplet_margin_loss against naive.py and torch.nn.functional.triplet_margin_loss,
on both sides.

A test that takes ``backend`` runs on the CPU and on the GPU path (``dev`` moves its
arrays to that side and back); on the "cuda" side ``run`` also checks the CPU path's
answer.  A test marked ``cpu`` or ``cuda`` is about that side alone: the CPU's serial and
parallel paths, finite differences and torch; the GPU's threads per block.  The simulator
runs tiny shapes: ``SHAPES`` holds each side's where they differ.
"""
import numpy as np
import pytest

import fastloss as fl
import naive
import sides
from fastloss.cpu import triplet_margin
from naive import assert_close, check_result, finite_difference

REDUCTIONS = ["mean", "sum", "none"]
DISTANCES = ["euclidean", "squared_euclidean", "cosine"]
DTYPES = [np.float64, np.float32, np.float16]

#: per side, the (rows, features) of the tests that name them: the CPU tests' and the simulator's
SHAPES = {"cpu": {"reference": (13, 5), "eps": (9, 4), "margins": (11, 3), "grad_false": (8, 3),
                  "grad_out": (9, 5)},
          "cuda": {"reference": (7, 5), "eps": (5, 4), "margins": (6, 3), "grad_false": (5, 3),
                   "grad_out": (5, 4)}}


def dtype_id(d):
    return np.dtype(d).name


def make_triplets(rng, shape, dtype=np.float64, scale=1.0):
    return tuple((rng.normal(size=shape) * scale).astype(dtype) for _ in range(3))


def check_triplet(res, want, dtype, **kw):
    """fastloss LossGrad (grad a 3-tuple of NumPy arrays) against naive's (loss, (ga, gp, gn))."""
    want_loss, want_grads = want
    check_result((res.loss, None), want_loss, None, dtype, **kw)
    assert isinstance(res.grad, tuple) and len(res.grad) == 3
    scale = max(float(np.max(np.abs(g[np.isfinite(g)]), initial=0.0)) for g in want_grads) or 1.0
    for got, w, what in zip(res.grad, want_grads, ("d_anchor", "d_positive", "d_negative")):
        assert isinstance(got, np.ndarray), type(got)
        assert got.shape == w.shape and got.dtype == np.dtype(dtype), (what, got.shape, got.dtype)
        assert_close(got, w, dtype, scale=scale, what=what, **kw)


def margin_for(distance):
    # about half of the rows active for N(0, 1) inputs in 5 dimensions
    return {"euclidean": 0.5, "squared_euclidean": 2.0, "cosine": 0.3}[distance]


def _host(res, dev):
    return fl.LossGrad(dev.get(res.loss),
                       None if res.grad is None else tuple(dev.get(g) for g in res.grad))


def _same_as_cpu(got, a, p, n, **kw):
    """The GPU's answer against the CPU path's, within the inputs' round-off."""
    cpu = fl.triplet_margin_loss(a, p, n, **kw)
    want = (np.asarray(cpu.loss, np.float64),
            None if cpu.grad is None else tuple(g.astype(np.float64) for g in cpu.grad))
    if want[1] is None:
        check_result((got.loss, None), want[0], None, a.dtype)
    else:
        check_triplet(got, want, a.dtype)


def run(backend, dev, a, p, n, **kw):
    """(triplet_margin_loss on the test's side, on the host; the float64 reference); the
    side's arrays in, the side's arrays out; on the "cuda" side the result is checked
    against the CPU path's too."""
    args = [dev.put(x) for x in (a, p, n)]
    res = fl.triplet_margin_loss(*args, **kw)
    assert isinstance(res.loss, type(args[0]))
    assert res.grad is None or all(type(g) is type(args[0]) for g in res.grad)
    got = _host(res, dev)
    if backend == "cuda":
        _same_as_cpu(got, a, p, n, **kw)
    return got, naive.triplet_margin_loss(a, p, n, **kw)


# ------------------------------------------------------------------ the reference


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_matches_reference(rng, backend, dev, distance, reduction, dtype):
    rows, d = SHAPES[backend]["reference"]
    a, p, n = make_triplets(rng, (rows, d), dtype)
    p[:3] = a[:3] + (0.2 * rng.normal(size=(3, d))).astype(dtype)  # some rows off the hinge
    n[:2] = p[:2] + (0.1 * rng.normal(size=(2, d))).astype(dtype)  # where swap matters
    n[2] = -3 * a[2]  # a row with z < 0
    # the CPU without and with swap; the simulator one of them per reduction
    swaps = (False, True) if backend == "cpu" else (reduction != "mean",)
    for swap in swaps:
        kw = dict(margin=margin_for(distance), distance=distance, reduction=reduction, swap=swap)
        got, want = run(backend, dev, a, p, n, **kw)
        check_triplet(got, want, dtype)
        assert np.asarray(got.loss).dtype == np.dtype(dtype)
        if reduction == "mean":
            assert isinstance(float(got.loss), float)
        if reduction == "none":
            assert 0 < np.count_nonzero(want[0]) < rows  # both sides of the hinge are exercised
            if swap and dtype != np.float16:  # the swap raised some row's loss
                plain = naive.triplet_margin_loss(a, p, n, **dict(kw, swap=False))[0]
                assert np.any(got.loss > plain + 1e-4)


def test_swap_tie_splits_the_gradient(backend, dev):
    # d(a, n) == d(p, n) exactly: torch.minimum's backward gives each side half
    a = np.array([[1.0, 0.0]])
    p = np.array([[-1.0, 0.0]])
    n = np.array([[0.0, 1.0]])
    got, want = run(backend, dev, a, p, n, margin=1.0, eps=0.0, swap=True)
    r = np.sqrt(0.5)
    # d(a,p) = 2, d_neg = sqrt(2): loss 3 - sqrt(2)
    np.testing.assert_allclose(float(got.loss), 3.0 - np.sqrt(2.0), rtol=1e-15)
    ga, gp, gn = got.grad
    np.testing.assert_allclose(ga, [[1.0 - 0.5 * r, 0.5 * r]], rtol=1e-15)
    np.testing.assert_allclose(gp, [[-1.0 + 0.5 * r, 0.5 * r]], rtol=1e-15)
    np.testing.assert_allclose(gn, [[0.0, -2 * 0.5 * r]], rtol=1e-15, atol=1e-16)
    check_triplet(got, want, np.float64)
    # ties on several rows, the squared distance too
    a = np.array([[0.0, 0.0], [1.0, 2.0]])
    p = np.array([[2.0, 0.0], [3.0, 2.0]])
    n = np.array([[1.0, 3.0], [2.0, 5.0]])
    for distance in DISTANCES[:2]:
        got, want = run(backend, dev, a, p, n, margin=8.0, distance=distance, swap=True, eps=0.0,
                        reduction="none")
        check_triplet(got, want, np.float64)
        assert np.all(got.grad[1] != 0)  # d_positive: half of it through d(p, n)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_eps(rng, backend, dev, distance):
    a, p, n = make_triplets(rng, SHAPES[backend]["eps"])
    a[0] = 1e-3 * a[0]  # a norm below eps: the cosine clamp, no gradient through it
    for eps in ((0.0, 1e-6, 0.05, 0.25) if backend == "cpu" else (0.0, 0.05)):
        kw = dict(eps=eps, distance=distance, margin=margin_for(distance), reduction="none")
        check_triplet(*run(backend, dev, a, p, n, **kw), np.float64)


def test_euclidean_eps_shifts_every_coordinate(backend, dev):
    a = np.zeros((1, 3))
    got, _ = run(backend, dev, a, a, a + 2.0, margin=0.0, eps=0.5, reduction="none")
    # d(a, p) = ||0 + 0.5|| = 0.5 sqrt(3); d(a, n) = ||-2 + 0.5|| = 1.5 sqrt(3): hinge at 0
    assert float(got.loss[0]) == 0.0
    got, _ = run(backend, dev, a, a, a + 2.0, margin=2.0, eps=0.5, reduction="none")
    np.testing.assert_allclose(got.loss, [2.0 - np.sqrt(3.0)], rtol=1e-14)


def test_cosine_tiny_norm_is_clamped(backend, dev):
    a = np.array([[1e-9, 0.0], [3.0, 4.0]])
    p = np.array([[1.0, 1.0], [1e-9, -1e-9]])
    n = np.array([[0.0, 2.0], [-1.0, 0.5]])
    got, want = run(backend, dev, a, p, n, distance="cosine", eps=1e-6, margin=0.5,
                    reduction="none")
    assert all(np.all(np.isfinite(g)) for g in got.grad)
    check_triplet(got, want, np.float64)


@pytest.mark.parametrize("distance", DISTANCES)
def test_margin_zero_and_large(rng, backend, dev, distance):
    rows, d = SHAPES[backend]["margins"]
    a, p, n = make_triplets(rng, (rows, d))
    losses = {}
    for margin in [0.0, 100.0]:
        for reduction in (["sum", "none"] if backend == "cpu" else ["none"]):
            got, want = run(backend, dev, a, p, n, margin=margin, distance=distance,
                            reduction=reduction)
            check_triplet(got, want, np.float64)
        losses[margin] = got.loss
    # margin 100: every row active; rows active at margin 0 have a loss 100 lower there
    active = losses[0.0] > 0
    assert np.all(losses[100.0] > 0) and 0 < np.count_nonzero(active) < rows
    np.testing.assert_allclose(losses[100.0][active], losses[0.0][active] + 100.0, rtol=1e-13)


def test_hinge_passes_the_gradient_at_zero(backend, dev):
    # z == 0 exactly: torch's clamp_min backward passes the gradient (z >= 0)
    a = np.array([[0.0, 0.0]])
    p = np.array([[1.0, 0.0]])
    n = np.array([[0.0, 2.0]])
    got, _ = run(backend, dev, a, p, n, margin=1.0, eps=0.0)
    assert float(got.loss) == 0.0
    np.testing.assert_allclose(got.grad[0], [[-1.0, 1.0]])
    np.testing.assert_allclose(got.grad[1], [[1.0, 0.0]])
    np.testing.assert_allclose(got.grad[2], [[0.0, -1.0]])
    # squared distances: 3 + 1 - 4 == 0 exactly
    got, want = run(backend, dev, a, p, n, margin=3.0, distance="squared_euclidean",
                    reduction="none")
    assert got.loss[0] == 0.0 and np.any(got.grad[0][0] != 0)
    check_triplet(got, want, np.float64)


def test_zero_distance_has_zero_gradient(backend, dev):
    a = np.array([[1.0, 2.0], [0.5, 0.5]])
    got, want = run(backend, dev, a, a.copy(), a + 1.0, margin=5.0, eps=0.0, reduction="none")
    assert all(np.all(np.isfinite(g)) for g in got.grad)
    check_triplet(got, want, np.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=dtype_id)
def test_extreme_values_stay_finite(rng, backend, dev, dtype):
    a, p, n = make_triplets(rng, (4, 3), dtype, scale=1e4)
    for distance in DISTANCES:
        got, want = run(backend, dev, a, p, n, distance=distance, margin=1e4, reduction="none")
        check_triplet(got, want, dtype)
        assert np.all(np.isfinite(got.loss)) and all(np.all(np.isfinite(g)) for g in got.grad)


@pytest.mark.cpu
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


@pytest.mark.cpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=dtype_id)
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


@pytest.mark.cpu
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


def test_one_dimensional_input_is_one_triplet(rng, backend, dev):
    a, p, n = make_triplets(rng, (5,))
    kw = dict(margin=2.0, swap=True, reduction="none")
    got, want = run(backend, dev, a, p, n, **kw)
    assert got.loss.shape == () and all(g.shape == (5,) for g in got.grad)
    check_triplet(got, want, np.float64)
    rows, _ = run(backend, dev, a[None], p[None], n[None], **kw)
    np.testing.assert_array_equal(got.loss, rows.loss[0])
    for g, gr in zip(got.grad, rows.grad):
        np.testing.assert_array_equal(g, gr[0])
    # strided 1-D inputs and gradient buffers
    views = [dev.put(np.repeat(x, 2))[::2] for x in (a, p, n)]
    parents = [dev.put(np.zeros(10)) for _ in range(3)]
    outs = tuple(b[1::2] for b in parents)
    res = fl.triplet_margin_loss(*views, grad_out=outs, **kw)
    assert all(g is o for g, o in zip(res.grad, outs))
    check_triplet(_host(res, dev), want, np.float64)
    assert all(not dev.get(b)[::2].any() for b in parents)  # nothing written outside the views


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=dtype_id)
def test_empty_batch(backend, dev, dtype):
    e = dev.put(np.zeros((0, 4), dtype))
    res = fl.triplet_margin_loss(e, e, e)
    assert np.isnan(float(res.loss)) and all(g.shape == (0, 4) for g in res.grad)
    assert float(fl.triplet_margin_loss(e, e, e, reduction="sum").loss) == 0.0
    assert fl.triplet_margin_loss(e, e, e, reduction="none").loss.shape == (0,)


def test_nan_propagates_per_row(rng, backend, dev):
    a, p, n = make_triplets(rng, (4, 3))
    a[1, 2] = np.nan
    got, _ = run(backend, dev, a, p, n, margin=10.0, reduction="none")
    assert np.isnan(got.loss[1]) and not np.any(np.isnan(got.loss[[0, 2, 3]]))
    for g in got.grad:  # as torch: the norm's backward spreads the NaN over the row
        assert np.all(np.isnan(g[1])) and np.all(np.isfinite(g[[0, 2, 3]]))
    for distance in DISTANCES:  # on the "cuda" side, NaN for NaN as on the CPU (``run``)
        got, _ = run(backend, dev, a, p, n, distance=distance, swap=True, reduction="none")
        assert np.isnan(got.loss[1]) and not np.any(np.isnan(got.loss[[0, 2, 3]]))
    assert np.isnan(float(fl.triplet_margin_loss(dev.put(a), dev.put(p), dev.put(n)).loss))


def test_grad_false(rng, backend, dev):
    a, p, n = make_triplets(rng, SHAPES[backend]["grad_false"])
    res = fl.triplet_margin_loss(dev.put(a), dev.put(p), dev.put(n), grad=False)
    assert res.grad is None
    np.testing.assert_allclose(float(res.loss), naive.triplet_margin_loss(a, p, n)[0], rtol=1e-12)


def test_non_contiguous(rng, backend, dev):
    big = [rng.normal(size=(14, 9)) for _ in range(3)]
    d_big = [dev.put(b) for b in big]
    if backend == "cpu":  # a column-major view too (a device array has no transposed view)
        a, p, n = big[0][::2, ::3], big[1].T[::3, ::2].T, big[2][1::2, 2::3]
        views = (a, p, n)
    else:
        a, p, n = big[0][::2, ::3], big[1][1::2, 2::3], big[2][1::2, 2::3]
        views = (d_big[0][::2, ::3], d_big[1][1::2, 2::3], d_big[2][1::2, 2::3])
    assert a.shape == p.shape == n.shape == (7, 3)
    kw = dict(margin=1.5, swap=True)
    check_triplet(_host(fl.triplet_margin_loss(*views, **kw), dev),
                  naive.triplet_margin_loss(a, p, n, **kw), np.float64)


@pytest.mark.parametrize("backend, dtype", sides.per_side(
    lambda side: [(d,) for d in (DTYPES if side == "cpu" else [np.float64, np.float16])]),
    ids=lambda v: dtype_id(v) if isinstance(v, type) else v)
def test_grad_out_reuse_and_in_place(rng, backend, dev, dtype):
    a, p, n = make_triplets(rng, SHAPES[backend]["grad_out"], dtype)
    kw = dict(margin=1.0, distance="cosine", swap=True)
    fresh = _host(fl.triplet_margin_loss(dev.put(a), dev.put(p), dev.put(n), **kw), dev)
    outs = tuple(dev.put(np.full_like(a, 7.0)) for _ in range(3))
    for _ in range(2):  # reused: the same bits every time
        res = fl.triplet_margin_loss(dev.put(a), dev.put(p), dev.put(n), grad_out=outs, **kw)
        assert all(g is o for g, o in zip(res.grad, outs))
        for g, f in zip(outs, fresh.grad):
            np.testing.assert_array_equal(dev.get(g).view(np.uint8), f.view(np.uint8))
    # in place: the inputs themselves receive their gradients; then crossed: the anchor's
    # gradient into the negative's buffer (through a temporary)
    for order in ((0, 1, 2), (2, 0, 1)):
        xs = [dev.put(x) for x in (a, p, n)]
        res = fl.triplet_margin_loss(*xs, grad_out=tuple(xs[k] for k in order), **kw)
        assert all(g is xs[k] for g, k in zip(res.grad, order))
        for g, f in zip(res.grad, fresh.grad):
            np.testing.assert_array_equal(dev.get(g), f)
    # a buffer overlapping an input elsewhere than element for element: through a temporary
    buf = dev.put(np.concatenate([a, a[:1]]))
    xa = buf[:len(a)]
    outs = (buf[1:], dev.put(np.zeros_like(a)), dev.put(np.zeros_like(a)))
    res = fl.triplet_margin_loss(xa, dev.put(p), dev.put(n), grad_out=outs, **kw)
    assert res.grad[0] is outs[0]
    for g, f in zip(res.grad, fresh.grad):
        np.testing.assert_array_equal(dev.get(g), f)


def test_backend_with_numpy_returns_numpy(rng, backend):
    a, p, n = make_triplets(rng, (5, 3))
    outs = tuple(np.full_like(a, 3.0) for _ in range(3))
    res = fl.triplet_margin_loss(a, p, n, grad_out=outs, backend=backend)
    assert type(res.loss) is np.ndarray and all(g is o for g, o in zip(res.grad, outs))
    check_triplet(res, naive.triplet_margin_loss(a, p, n), np.float64)


@pytest.mark.cpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=dtype_id)
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


@pytest.mark.cuda
def test_threads_per_block(rng, threads_per_block):
    a, p, n = make_triplets(rng, (5, 37))  # rows wider than the block at 8 threads
    for distance in DISTANCES:
        kw = dict(distance=distance, margin=margin_for(distance) * 4, swap=True, reduction="none")
        res = fl.triplet_margin_loss(a, p, n, backend="cuda", **kw)
        check_triplet(res, naive.triplet_margin_loss(a, p, n, **kw), np.float64)
        cpu = fl.triplet_margin_loss(a, p, n, **kw)
        np.testing.assert_allclose(res.loss, cpu.loss, rtol=1e-13)


# ---------------------------------------------------------------- bad input


BAD_INPUT = [
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
]
#: a NumPy buffer beside device inputs
ON_THE_HOST = [(dict(grad_out="host"), r"grad_out\[0\]")]


@pytest.mark.parametrize("backend, change, name", sides.per_side(
    lambda side: BAD_INPUT + (ON_THE_HOST if side == "cuda" else [])),
    ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_raises_and_changes_nothing(rng, backend, dev, change, name):
    a, p, n = make_triplets(rng, (6, 4))
    kw = dict(anchor=dev.put(a), positive=dev.put(p), negative=dev.put(n))
    for key, value in change.items():
        if key == "grad_out" and isinstance(value, str):  # "host": for device inputs
            value = (np.zeros((6, 4)), dev.put(np.zeros((6, 4))), dev.put(np.zeros((6, 4))))
        elif key == "grad_out" and isinstance(value, tuple):
            value = tuple(dev.put(v) for v in value)
        elif isinstance(value, np.ndarray):
            value = sides.put(backend, dev, value)
        kw[key] = value
    passed = [kw[k] for k in ("anchor", "positive", "negative")]
    passed += list(kw["grad_out"]) if isinstance(kw.get("grad_out"), tuple) else []
    befores = [np.array(dev.get(x), copy=True) for x in passed]
    with pytest.raises((ValueError, TypeError), match=name):
        fl.triplet_margin_loss(**kw)
    for x, before in zip(passed, befores):
        np.testing.assert_array_equal(dev.get(x), before)


def test_overlapping_grad_out_rejected(rng, backend, dev):
    a, p, n = (dev.put(x) for x in make_triplets(rng, (6, 4)))
    shared = dev.put(np.full((6, 4), 3.0))
    with pytest.raises(ValueError, match=r"grad_out\[2\] overlaps"):
        fl.triplet_margin_loss(a, p, n, grad_out=(shared, dev.put(np.zeros((6, 4))), shared))
    assert np.all(dev.get(shared) == 3.0)
    if backend == "cpu":
        read_only = np.zeros((6, 4))
        read_only.flags.writeable = False
        with pytest.raises(ValueError, match=r"grad_out\[0\]"):
            fl.triplet_margin_loss(a, p, n,
                                   grad_out=(read_only, np.zeros((6, 4)), np.zeros((6, 4))))
