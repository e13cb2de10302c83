"""fastloss.center_loss / center_update / CenterLoss against naive.py and the seed's rule."""
import numba
import numpy as np
import pytest

import fastloss as fl
import naive
from naive import check_result, finite_difference

REDUCTIONS = ["mean", "sum", "none"]
DTYPES = [np.float16, np.float32, np.float64]


def make_batch(rng, n=9, d=5, k=4, dtype=np.float64, centers_dtype=None):
    x = rng.normal(size=(n, d)).astype(dtype)
    labels = rng.integers(0, k, size=n)
    centers = rng.normal(size=(k, d)).astype(centers_dtype or (np.float32 if dtype == np.float16 else dtype))
    return x, labels, centers


def seed_update(centers, features, labels, alpha):
    """The seed's TensorFlow rule, transcribed literally in float64:
    unique_with_counts -> diff = (c[y] - x) / (1 + count[y]) -> scatter_sub(alpha * diff)."""
    c = np.asarray(centers, np.float64).copy()
    x = np.asarray(features, np.float64)
    _, idx, counts = np.unique(labels, return_inverse=True, return_counts=True)
    diff = (c[labels] - x) / (1.0 + counts[idx])[:, None]
    np.subtract.at(c, labels, alpha * diff)
    return c


def ulps(dtype):
    return np.finfo(dtype).eps


# ------------------------------------------------------------------ loss and gradient


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_and_grad_match_reference(rng, dtype, reduction):
    x, labels, centers = make_batch(rng, n=11, d=7, k=5, dtype=dtype)
    before = centers.copy()
    res = fl.center_loss(x, labels, centers, reduction=reduction)
    check_result(res, *naive.center_loss(x, labels, before, reduction=reduction), dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_update_false_reads_only(rng, reduction):
    x, labels, centers = make_batch(rng)
    before = centers.copy()
    centers.flags.writeable = False  # read-only centers are fine without an update
    res = fl.center_loss(x, labels, centers, update=False, reduction=reduction)
    check_result(res, *naive.center_loss(x, labels, before, reduction=reduction), np.float64)
    assert np.array_equal(centers, before)


def test_sum_is_tf_l2_loss(rng):
    x, labels, centers = make_batch(rng, n=6, d=3, k=2)
    diff = x - centers[labels]
    want = np.sum(diff ** 2) / 2  # tf.nn.l2_loss
    got = fl.center_loss(x, labels, centers, reduction="sum", update=False).loss
    np.testing.assert_allclose(float(got), want, rtol=1e-13)


def test_gradient_by_finite_differences(rng):
    x, labels, centers = make_batch(rng, n=5, d=4, k=3)
    _, grad = fl.center_loss(x, labels, centers, update=False)
    f = lambda xx: fl.center_loss(xx, labels, centers, update=False, grad=False).loss
    for index in [(0, 0), (2, 3), (4, 1)]:
        assert grad[index] == pytest.approx(finite_difference(f, x, index), rel=1e-6, abs=1e-9)


def test_loss_uses_centers_before_the_update(rng):
    x, labels, centers = make_batch(rng, n=8, d=3, k=3)
    before = centers.copy()
    res = fl.center_loss(x, labels, centers, alpha=1.0, reduction="none")
    check_result(res, *naive.center_loss(x, labels, before, reduction="none"), np.float64)
    assert not np.array_equal(centers, before)


def test_grad_false_returns_none(rng):
    x, labels, centers = make_batch(rng)
    res = fl.center_loss(x, labels, centers, grad=False)
    assert res.grad is None


@pytest.mark.parametrize("n,d", [(2000, 32), (300, 257)])
def test_parallel_path_matches_reference(rng, n, d):
    x, labels, centers = make_batch(rng, n=n, d=d, k=50, dtype=np.float32)
    before = centers.copy()
    res = fl.center_loss(x, labels, centers, reduction="mean")
    check_result(res, *naive.center_loss(x, labels, before), np.float32)
    np.testing.assert_allclose(centers, naive.center_update(before, x, labels), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the update


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 0.05])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_update_matches_the_seed_rule(rng, alpha, dtype):
    x, _, centers = make_batch(rng, n=40, d=6, k=8, dtype=dtype)
    labels = rng.choice([1, 1, 1, 3, 3, 5, 6], size=40)  # many duplicates, absent classes
    want = seed_update(centers, x, labels, alpha)
    np.testing.assert_allclose(naive.center_update(centers, x, labels, alpha=alpha), want, rtol=1e-12, atol=1e-14)
    got = fl.center_update(centers, x, labels, alpha=alpha)
    assert got is centers
    np.testing.assert_allclose(centers, want, rtol=4 * ulps(dtype), atol=4 * ulps(dtype))


def test_absent_classes_are_untouched_bitwise(rng):
    x, _, centers = make_batch(rng, n=30, d=4, k=6, dtype=np.float32)
    labels = rng.choice([0, 2, 5], size=30)
    before = centers.copy()
    fl.center_update(centers, x, labels)
    for k in (1, 3, 4):
        assert centers[k].tobytes() == before[k].tobytes()
    for k in (0, 2, 5):
        assert not np.array_equal(centers[k], before[k])


def test_one_class_takes_every_row(rng):
    x, _, centers = make_batch(rng, n=50, d=3, k=2)
    labels = np.ones(50, np.int8)
    want = seed_update(centers, x, labels, 0.5)
    fl.center_loss(x, labels, centers)
    np.testing.assert_allclose(centers, want, rtol=1e-13)


@pytest.mark.parametrize("features_dtype,centers_dtype", [(np.float32, np.float64), (np.float64, np.float32),
                                                          (np.float16, np.float32), (np.float16, np.float64)])
def test_mixed_dtypes(rng, features_dtype, centers_dtype):
    x, labels, centers = make_batch(rng, n=20, d=5, k=4, dtype=features_dtype, centers_dtype=centers_dtype)
    before = centers.copy()
    res = fl.center_loss(x, labels, centers)
    check_result(res, *naive.center_loss(x, labels, before), features_dtype)
    assert centers.dtype == centers_dtype
    tol = 4 * max(ulps(centers_dtype), ulps(np.float32) if features_dtype != np.float64 else 0)
    np.testing.assert_allclose(centers, naive.center_update(before, x, labels), rtol=tol, atol=tol)


def _threads(n):
    old = numba.get_num_threads()
    numba.set_num_threads(n)
    return old


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_update_is_the_same_bits_for_any_thread_count(rng, dtype):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    x, labels, centers = make_batch(rng, n=4000, d=24, k=37, dtype=dtype)  # parallel path
    results = []
    for n in (1, 2):
        c = centers.copy()
        old = _threads(n)
        try:
            res = fl.center_loss(x, labels, c)
        finally:
            numba.set_num_threads(old)
        results.append((c.tobytes(), res.loss.tobytes(), res.grad.tobytes()))
    assert results[0] == results[1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_permuted_rows_agree_to_round_off(rng, dtype):
    x, labels, centers = make_batch(rng, n=4000, d=24, k=37, dtype=dtype)
    perm = rng.permutation(x.shape[0])
    a = fl.center_update(centers.copy(), x, labels)
    b = fl.center_update(centers.copy(), x[perm], labels[perm])
    # float64 sums in another order: round-off of eps64 * n * max|c - x| scaled by
    # alpha / (1 + n), then the final rounding to dtype
    bound = ulps(dtype) + 4 * ulps(np.float64) * (np.abs(centers).max() + np.abs(x).max())
    np.testing.assert_allclose(a, b, rtol=ulps(dtype), atol=bound)
    assert not np.array_equal(a, centers)


def test_nan_reaches_only_its_class(rng):
    x, _, centers = make_batch(rng, n=12, d=3, k=4)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    x[4, 1] = np.nan
    before = centers.copy()
    res = fl.center_loss(x, labels, centers, reduction="none")
    assert np.isnan(res.loss[4]) and np.isfinite(np.delete(res.loss, 4)).all()
    assert np.isnan(centers[1]).any()
    assert np.isfinite(centers[[0, 2, 3]]).all()
    assert centers[3].tobytes() == before[3].tobytes()


def test_extreme_values_stay_finite(rng):
    x = np.array([[1e4, -1e4], [1e4, -1e4], [-1e4, 1e4]], np.float32)
    centers = np.zeros((2, 2), np.float32)
    res = fl.center_loss(x, [0, 0, 1], centers, reduction="sum")
    assert float(res.loss) == pytest.approx(3e8, rel=1e-6)
    np.testing.assert_allclose(centers, [[1e4 / 3, -1e4 / 3], [-2.5e3, 2.5e3]], rtol=1e-6)


def test_zero_distance(rng):
    centers = rng.normal(size=(3, 4))
    x = centers[[2, 0, 2]].copy()
    before = centers.copy()
    loss, grad = fl.center_loss(x, [2, 0, 2], centers)
    assert float(loss) == 0.0 and not grad.any()
    assert np.array_equal(centers, before)  # x == c: the update moves nothing


@pytest.mark.parametrize("reduction,want", [("mean", np.nan), ("sum", 0.0)])
def test_empty_batch(reduction, want):
    centers = np.ones((3, 2), np.float32)
    loss, grad = fl.center_loss(np.zeros((0, 2), np.float32), np.zeros(0, np.int64), centers,
                                reduction=reduction)
    np.testing.assert_equal(float(loss), want)
    assert grad.shape == (0, 2)
    assert (centers == 1).all()


# ------------------------------------------------------------------ layouts and buffers


def test_strided_features_and_centers(rng):
    big_x = rng.normal(size=(20, 10))
    x = big_x[::2, 1::3]  # (10, 3), not contiguous
    labels = rng.integers(0, 4, size=10)
    big_c = rng.normal(size=(4, 7))
    centers = big_c[:, 1:4]  # a view: the update must land in big_c
    before = centers.copy()
    res = fl.center_loss(x, labels, centers)
    check_result(res, *naive.center_loss(x, labels, before), np.float64)
    np.testing.assert_allclose(big_c[:, 1:4], naive.center_update(before, x, labels), rtol=1e-13)
    fortran = np.asfortranarray(before)
    fl.center_update(fortran, x, labels)
    np.testing.assert_allclose(fortran, naive.center_update(before, x, labels), rtol=1e-13)


@pytest.mark.parametrize("update", [True, False])
def test_grad_out_reuse_and_in_place(rng, update):
    x, labels, centers = make_batch(rng, n=10, d=4, k=3, dtype=np.float32)
    before = centers.copy()
    want = fl.center_loss(x, labels, centers.copy(), update=update)
    buf = np.full_like(x, np.nan)
    res = fl.center_loss(x, labels, centers.copy(), update=update, grad_out=buf)
    assert res.grad is buf and buf.tobytes() == want.grad.tobytes()
    # grad_out=features: the gradient replaces the features, after the update has read them
    x2 = x.copy()
    c2 = before.copy()
    res = fl.center_loss(x2, labels, c2, update=update, grad_out=x2)
    assert res.grad is x2 and x2.tobytes() == want.grad.tobytes()
    if update:
        np.testing.assert_allclose(c2, naive.center_update(before, x, labels), rtol=1e-6)


# ------------------------------------------------------------------ bad input changes nothing


def _bad_cases(x, labels, centers):
    ro = centers.copy()
    ro.flags.writeable = False
    return [
        (dict(labels=np.r_[labels[:-1], 4]), ValueError, "labels"),
        (dict(labels=np.r_[labels[:-1], -1]), ValueError, "labels"),
        (dict(labels=labels[:-1]), ValueError, "labels"),
        (dict(labels=labels.astype(float)), TypeError, "labels"),
        (dict(features=x[:, :3]), ValueError, "centers"),
        (dict(features=x[0]), ValueError, "features"),
        (dict(features=x.astype(np.int32)), TypeError, "features"),
        (dict(centers=centers.astype(np.float16)), TypeError, "centers"),
        (dict(centers=centers.astype(np.int64)), TypeError, "centers"),
        (dict(centers=centers.tolist()), TypeError, "centers"),
        (dict(centers=ro), ValueError, "writable"),
        (dict(alpha=1.5), ValueError, "alpha"),
        (dict(alpha=-0.1), ValueError, "alpha"),
        (dict(alpha="big"), TypeError, "alpha"),
    ]


@pytest.mark.parametrize("case", range(14))
def test_bad_input_raises_and_changes_nothing(rng, case):
    x, labels, centers = make_batch(rng, n=8, d=4, k=4)
    kwargs, exc, word = _bad_cases(x, labels, centers)[case]
    args = {"features": x, "labels": labels, "centers": centers, **kwargs}
    target = args["centers"]
    before = np.array(target, copy=True)
    with pytest.raises(exc, match=word):
        fl.center_loss(args["features"], args["labels"], target, alpha=args.get("alpha", 0.5))
    with pytest.raises(exc, match=word):
        fl.center_update(target, args["features"], args["labels"], alpha=args.get("alpha", 0.5))
    assert np.array_equal(np.asarray(target), before)


def test_bad_grad_out_and_reduction(rng):
    x, labels, centers = make_batch(rng, n=8, d=4, k=4)
    before = centers.copy()
    with pytest.raises(ValueError, match="grad_out"):
        fl.center_loss(x, labels, centers, grad_out=np.empty((8, 5)))
    with pytest.raises(TypeError, match="grad_out"):
        fl.center_loss(x, labels, centers, grad_out=np.empty((8, 4), np.float32))
    with pytest.raises(ValueError, match="grad_out must not share memory with centers"):
        big = np.empty((8, 4))
        fl.center_loss(x, labels, big[:4], grad_out=big)
    with pytest.raises(ValueError, match="reduction"):
        fl.center_loss(x, labels, centers, reduction="max")
    assert np.array_equal(centers, before)


# ------------------------------------------------------------------ CenterLoss


def test_center_loss_object_starts_at_zero_and_updates(rng):
    cl = fl.CenterLoss(5, 3)
    assert cl.centers.shape == (5, 3) and cl.centers.dtype == np.float32 and not cl.centers.any()
    x = rng.normal(size=(12, 3)).astype(np.float32)
    labels = rng.integers(0, 5, size=12)
    loss, grad = cl(x, labels)
    want_loss, want_grad = naive.center_loss(x, labels, np.zeros((5, 3)))
    check_result((loss, grad), want_loss, want_grad, np.float32)
    np.testing.assert_allclose(cl.centers, naive.center_update(np.zeros((5, 3)), x, labels), rtol=1e-6)


def test_center_loss_object_state_round_trip(rng):
    init = rng.normal(size=(4, 2))
    cl = fl.CenterLoss(4, 2, alpha=0.3, init=init, dtype="float64")
    assert np.array_equal(cl.centers, init) and cl.centers is not init
    state = cl.state_dict()
    state["centers"][0] = 99.0  # a copy: the object is not affected
    assert cl.centers[0, 0] == init[0, 0]
    cl(rng.normal(size=(6, 2)), [0, 1, 2, 3, 0, 1])
    other = fl.CenterLoss(4, 2, dtype="float64")
    other.load_state_dict(cl.state_dict())
    assert np.array_equal(other.centers, cl.centers) and other.alpha == 0.3
    before = other.centers.copy()
    with pytest.raises(ValueError, match="centers"):
        other.load_state_dict({"centers": np.zeros((3, 2))})
    with pytest.raises(ValueError, match="alpha"):
        other.load_state_dict({"centers": np.zeros((4, 2)), "alpha": 2.0})
    assert np.array_equal(other.centers, before)


def test_center_loss_object_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        fl.CenterLoss(0, 3)
    with pytest.raises(TypeError, match="dtype"):
        fl.CenterLoss(2, 3, dtype="float16")
    with pytest.raises(ValueError, match="device"):
        fl.CenterLoss(2, 3, device="tpu")
    with pytest.raises(ValueError, match="centers"):
        fl.CenterLoss(2, 3, init=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="labels"):
        fl.CenterLoss(2, 3)(np.zeros((2, 3), np.float32), [0, 2])


def _update_in_child(x, labels, queue):
    c = np.zeros((37, x.shape[1]), x.dtype)
    fl.center_update(c, x, labels)
    queue.put(c)


def test_forked_child_updates_centers(rng):
    """A child forked after the parent ran the threaded (OpenMP) update computes the
    same centers (serially: libgomp cannot start threads in such a child)."""
    import multiprocessing

    x, labels, _ = make_batch(rng, n=4000, d=24, k=37, dtype=np.float32)
    want = fl.center_update(np.zeros((37, 24), np.float32), x, labels)  # parent: threaded path
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_update_in_child, args=(x, labels, queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("centers_dtype", [np.float32, np.float64])
def test_update_reads_every_float16_value_exactly(centers_dtype):
    """float16 features reach the Cython update as their bits (no float32 copy); each of
    the 65536 patterns must convert exactly: one row per class, zero centers, alpha=1
    moves each center to x / 2."""
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(-1, 1)
    centers = np.zeros((1 << 16, 1), centers_dtype)
    fl.center_update(centers, x, np.arange(1 << 16), alpha=1.0)
    want = (0.5 * x.astype(np.float64)).astype(centers_dtype)
    assert np.array_equal(centers, want, equal_nan=True)
