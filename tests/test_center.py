"""fastloss.center_loss / center_update / CenterLoss against naive.py and the seed's rule,
on both sides.

A test that takes ``backend`` runs on the CPU and on the GPU path (``dev`` moves its
arrays to that side and back); on the "cuda" side it also checks the CPU path's answer.
A test marked ``cpu`` or ``cuda`` is about that side alone: the CPU's parallel path,
thread counts and Cython update; the GPU's counting sort, whose bits must not depend on
the threads per block or its chunking, and its device arrays.  The simulator runs tiny
batches: ``SIZES`` holds each side's where they differ.
"""
import numba
import numpy as np
import pytest

import fastloss as fl
import naive
import sides
from naive import check_result, finite_difference

REDUCTIONS = ["mean", "sum", "none"]
DTYPES = [np.float16, np.float32, np.float64]

#: per side, (rows, features, classes) of the tests that name them: the CPU tests' and the
#: simulator's
SIZES = {"cpu": {"update_false": (9, 5, 4), "duplicates": (40, 6, 8), "absent": (30, 4, 6),
                 "one_class": (50, 3, 2), "mixed": (20, 5, 4)},
         "cuda": {"update_false": (6, 3, 3), "duplicates": (25, 4, 8), "absent": (20, 4, 6),
                  "one_class": (40, 3, 2), "mixed": (10, 5, 4)}}


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


def update_tol(features_dtype, centers_dtype):
    eps = ulps(centers_dtype)
    if np.dtype(features_dtype) != np.float64:
        eps = max(eps, ulps(np.float32))
    return 4 * eps


@pytest.fixture
def chunk_rows():
    """Restores the counting sort's chunking after a test that sets it."""
    from fastloss.cuda import center as gpu
    saved = gpu.CHUNK_ROWS
    yield gpu
    gpu.CHUNK_ROWS = saved


# ------------------------------------------------------------------ loss, gradient, update


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_grad_and_update_match_reference(rng, backend, dev, dtype, reduction):
    x, labels, centers = make_batch(rng, n=11, d=7, k=5, dtype=dtype)
    d_centers = dev.put(centers)
    res = fl.center_loss(dev.put(x), dev.put(labels), d_centers, reduction=reduction)
    # the side's arrays in, the side's arrays out
    assert (type(res.loss) is np.ndarray) == (backend == "cpu")
    assert isinstance(res.grad, type(d_centers))
    got = sides.on_host(res, dev)
    check_result(got, *naive.center_loss(x, labels, centers, reduction=reduction), dtype)
    tol = update_tol(dtype, centers.dtype)
    np.testing.assert_allclose(dev.get(d_centers), naive.center_update(centers, x, labels), rtol=tol, atol=tol)
    if backend == "cuda":
        cpu_centers = centers.copy()
        cpu = fl.center_loss(x, labels, cpu_centers, reduction=reduction)
        naive.assert_close(got.loss, cpu.loss, dtype, what="loss, GPU vs CPU")
        naive.assert_close(got.grad, cpu.grad, dtype, what="grad, GPU vs CPU")
        np.testing.assert_allclose(dev.get(d_centers), cpu_centers, rtol=tol, atol=tol)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_update_false_reads_only_and_grad_false(rng, backend, dev, reduction):
    n, d, k = SIZES[backend]["update_false"]
    x, labels, centers = make_batch(rng, n=n, d=d, k=k)
    d_centers = dev.put(centers)
    if backend == "cpu":
        d_centers.flags.writeable = False  # read-only centers are fine without an update
    res = fl.center_loss(dev.put(x), dev.put(labels), d_centers, update=False, reduction=reduction)
    check_result(sides.on_host(res, dev), *naive.center_loss(x, labels, centers, reduction=reduction), np.float64)
    assert dev.get(d_centers).tobytes() == centers.tobytes()
    d_centers = dev.put(centers)
    res = fl.center_loss(dev.put(x), dev.put(labels), d_centers, grad=False, reduction=reduction)
    assert res.grad is None
    naive.assert_close(dev.get(res.loss), naive.center_loss(x, labels, centers, reduction=reduction)[0],
                       np.float64)
    np.testing.assert_allclose(dev.get(d_centers), naive.center_update(centers, x, labels), rtol=1e-13)


@pytest.mark.cpu
def test_sum_is_tf_l2_loss(rng):
    x, labels, centers = make_batch(rng, n=6, d=3, k=2)
    diff = x - centers[labels]
    want = np.sum(diff ** 2) / 2  # tf.nn.l2_loss
    got = fl.center_loss(x, labels, centers, reduction="sum", update=False).loss
    np.testing.assert_allclose(float(got), want, rtol=1e-13)


@pytest.mark.cpu
def test_gradient_by_finite_differences(rng):
    x, labels, centers = make_batch(rng, n=5, d=4, k=3)
    _, grad = fl.center_loss(x, labels, centers, update=False)
    f = lambda xx: fl.center_loss(xx, labels, centers, update=False, grad=False).loss
    for index in [(0, 0), (2, 3), (4, 1)]:
        assert grad[index] == pytest.approx(finite_difference(f, x, index), rel=1e-6, abs=1e-9)


def test_loss_uses_centers_before_the_update(rng, backend, dev):
    x, labels, centers = make_batch(rng, n=8, d=3, k=3)
    d_centers = dev.put(centers)
    res = fl.center_loss(dev.put(x), dev.put(labels), d_centers, alpha=1.0, reduction="none")
    check_result(sides.on_host(res, dev), *naive.center_loss(x, labels, centers, reduction="none"), np.float64)
    assert not np.array_equal(dev.get(d_centers), centers)


@pytest.mark.cuda
def test_wide_rows_and_many_feature_tiles(rng, dev):
    # D larger than the block: several features per thread, several feature tiles
    x, labels, centers = make_batch(rng, n=5, d=45, k=3, dtype=np.float32)
    d_centers = dev.put(centers)
    res = fl.center_loss(dev.put(x), dev.put(labels), d_centers)
    check_result(sides.on_host(res, dev), *naive.center_loss(x, labels, centers), np.float32)
    np.testing.assert_allclose(dev.get(d_centers), naive.center_update(centers, x, labels),
                               rtol=4e-7, atol=4e-7)


@pytest.mark.cpu
@pytest.mark.parametrize("n,d", [(2000, 32), (300, 257)])
def test_parallel_path_matches_reference(rng, n, d):
    x, labels, centers = make_batch(rng, n=n, d=d, k=50, dtype=np.float32)
    before = centers.copy()
    res = fl.center_loss(x, labels, centers, reduction="mean")
    check_result(res, *naive.center_loss(x, labels, before), np.float32)
    np.testing.assert_allclose(centers, naive.center_update(before, x, labels), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the GPU's counting sort


@pytest.mark.cuda
@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_grouping_is_a_stable_sort(rng, dev, threads_per_block, chunk_rows, chunk):
    from fastloss.cuda._arrays import Device
    chunk_rows.CHUNK_ROWS = chunk
    labels = rng.choice([0, 2, 2, 2, 5, 6, 6], size=25)  # duplicates, absent classes
    d_labels = dev.put(labels)
    order, starts = chunk_rows.group_rows(Device(d_labels), d_labels, 8)
    assert np.array_equal(dev.get(order), np.argsort(labels, kind="stable"))
    assert np.array_equal(dev.get(starts), np.r_[0, np.cumsum(np.bincount(labels, minlength=8))])


@pytest.mark.cuda
def test_update_same_bits_for_any_block_size_and_chunking(rng, dev, threads_per_block, chunk_rows):
    dtype = np.float32
    x, labels, centers = make_batch(rng, n=24, d=6, k=5, dtype=dtype)
    labels[:10] = 3  # one big class among small ones
    results = []
    for chunk in (None, 5, 11):
        chunk_rows.CHUNK_ROWS = chunk
        d_centers = dev.put(centers)
        fl.center_update(d_centers, dev.put(x), dev.put(labels))
        results.append(dev.get(d_centers).tobytes())
    assert len(set(results)) == 1
    chunk_rows.CHUNK_ROWS = None
    from fastloss.cuda import _blocks
    _blocks.set_threads_per_block(16)
    d_centers = dev.put(centers)
    fl.center_update(d_centers, dev.put(x), dev.put(labels))
    assert dev.get(d_centers).tobytes() == results[0]  # 8 or 32 threads == 16 threads
    tol = update_tol(dtype, dtype)
    cpu = fl.center_update(centers.copy(), x, labels)
    np.testing.assert_allclose(np.frombuffer(results[0], dtype).reshape(centers.shape), cpu, rtol=tol, atol=tol)


@pytest.mark.cuda
def test_loss_and_grad_for_any_block_size(rng, dev, threads_per_block):
    x, labels, centers = make_batch(rng, n=7, d=37, k=3, dtype=np.float32)
    res = fl.center_loss(dev.put(x), dev.put(labels), dev.put(centers), reduction="none")
    check_result(sides.on_host(res, dev), *naive.center_loss(x, labels, centers, reduction="none"), np.float32)
    cpu = fl.center_loss(x, labels, centers.copy(), reduction="none")
    assert dev.get(res.grad).tobytes() == cpu.grad.tobytes()  # elementwise: the same bits


# ------------------------------------------------------------------ the update


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 0.05])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_update_matches_the_seed_rule(rng, backend, dev, alpha, dtype):
    n, d, k = SIZES[backend]["duplicates"]
    x, _, centers = make_batch(rng, n=n, d=d, k=k, dtype=dtype)
    labels = rng.choice([1, 1, 1, 3, 3, 5, 6], size=n)  # many duplicates, absent classes
    want = seed_update(centers, x, labels, alpha)
    np.testing.assert_allclose(naive.center_update(centers, x, labels, alpha=alpha), want, rtol=1e-12, atol=1e-14)
    d_centers = dev.put(centers)
    got = fl.center_update(d_centers, dev.put(x), dev.put(labels), alpha=alpha)
    assert got is d_centers
    after = dev.get(d_centers)
    tol = 4 * ulps(dtype)
    np.testing.assert_allclose(after, want, rtol=tol, atol=tol)
    np.testing.assert_allclose(after, naive.center_update(centers, x, labels, alpha=alpha), rtol=tol, atol=tol)
    if backend == "cuda":
        cpu = fl.center_update(centers.copy(), x, labels, alpha=alpha)
        np.testing.assert_allclose(after, cpu, rtol=tol, atol=tol)


def test_absent_classes_are_untouched_bitwise(rng, backend, dev):
    n, d, k = SIZES[backend]["absent"]
    x, _, centers = make_batch(rng, n=n, d=d, k=k, dtype=np.float32)
    labels = rng.choice([0, 2, 5], size=n)
    d_centers = dev.put(centers)
    fl.center_update(d_centers, dev.put(x), dev.put(labels))
    after = dev.get(d_centers)
    for k in (1, 3, 4):
        assert after[k].tobytes() == centers[k].tobytes()
    for k in (0, 2, 5):
        assert not np.array_equal(after[k], centers[k])


def test_one_class_takes_every_row(rng, backend, dev):
    n, d, k = SIZES[backend]["one_class"]
    x, _, centers = make_batch(rng, n=n, d=d, k=k)
    labels = np.ones(n, np.int8)  # a narrow label dtype, on the side as it is
    d_centers = dev.put(centers)
    fl.center_loss(dev.put(x), dev.put(labels), d_centers)
    after = dev.get(d_centers)
    np.testing.assert_allclose(after, seed_update(centers, x, labels, 0.5), rtol=1e-13)
    np.testing.assert_allclose(after, naive.center_update(centers, x, labels), rtol=1e-13)
    assert after[0].tobytes() == centers[0].tobytes()


@pytest.mark.cuda
def test_more_classes_than_rows_and_label_dtypes(rng, dev):
    x, _, centers = make_batch(rng, n=6, d=3, k=20, dtype=np.float32)
    labels = np.array([19, 0, 17, 19, 3, 17])
    want = naive.center_update(centers, x, labels)
    for ldtype in (np.uint8, np.int32, np.uint64):
        d_centers = dev.put(centers)
        fl.center_update(d_centers, dev.put(x), dev.put(labels.astype(ldtype)))
        np.testing.assert_allclose(dev.get(d_centers), want, rtol=4e-7, atol=4e-7)


@pytest.mark.parametrize("features_dtype,centers_dtype", [(np.float32, np.float64), (np.float64, np.float32),
                                                          (np.float16, np.float32), (np.float16, np.float64)])
def test_mixed_dtypes(rng, backend, dev, features_dtype, centers_dtype):
    n, d, k = SIZES[backend]["mixed"]
    x, labels, centers = make_batch(rng, n=n, d=d, k=k, dtype=features_dtype, centers_dtype=centers_dtype)
    d_centers = dev.put(centers)
    res = fl.center_loss(dev.put(x), dev.put(labels), d_centers)
    check_result(sides.on_host(res, dev), *naive.center_loss(x, labels, centers), features_dtype)
    after = dev.get(d_centers)
    assert after.dtype == centers_dtype
    tol = update_tol(features_dtype, centers_dtype)
    np.testing.assert_allclose(after, naive.center_update(centers, x, labels), rtol=tol, atol=tol)
    if backend == "cuda":
        cpu = centers.copy()
        fl.center_loss(x, labels, cpu)
        np.testing.assert_allclose(after, cpu, rtol=tol, atol=tol)


def _threads(n):
    old = numba.get_num_threads()
    numba.set_num_threads(n)
    return old


@pytest.mark.cpu
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


@pytest.mark.cpu
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


def test_nan_reaches_only_its_class(rng, backend, dev):
    x, _, centers = make_batch(rng, n=12, d=3, k=4)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    x[4, 1] = np.nan
    d_centers = dev.put(centers)
    res = fl.center_loss(dev.put(x), dev.put(labels), d_centers, reduction="none")
    loss, grad = sides.on_host(res, dev)
    assert np.isnan(loss[4]) and np.isfinite(np.delete(loss, 4)).all()
    assert np.isnan(grad[4, 1]) and np.isfinite(np.delete(grad, 4, axis=0)).all()
    after = dev.get(d_centers)
    assert np.isnan(after[1, 1]) and np.isfinite(after[1, [0, 2]]).all()
    assert np.isfinite(after[[0, 2, 3]]).all()
    assert after[3].tobytes() == centers[3].tobytes()
    if backend == "cuda":
        cpu = centers.copy()
        fl.center_loss(x, labels, cpu)
        np.testing.assert_allclose(after, cpu, rtol=1e-13)


def test_extreme_values_stay_finite(backend, dev):
    x = np.array([[1e4, -1e4], [1e4, -1e4], [-1e4, 1e4]], np.float32)
    d_centers = dev.put(np.zeros((2, 2), np.float32))
    res = fl.center_loss(dev.put(x), dev.put(np.array([0, 0, 1])), d_centers, reduction="sum")
    assert float(res.loss) == pytest.approx(3e8, rel=1e-6)
    np.testing.assert_allclose(dev.get(d_centers), [[1e4 / 3, -1e4 / 3], [-2.5e3, 2.5e3]], rtol=1e-6)


def test_zero_distance(rng, backend, dev):
    centers = rng.normal(size=(3, 4))
    x = centers[[2, 0, 2]].copy()
    d_centers = dev.put(centers)
    loss, grad = fl.center_loss(dev.put(x), dev.put(np.array([2, 0, 2])), d_centers)
    assert float(loss) == 0.0 and not dev.get(grad).any()
    assert dev.get(d_centers).tobytes() == centers.tobytes()  # x == c: the update moves nothing


@pytest.mark.parametrize("reduction,want", [("mean", np.nan), ("sum", 0.0)])
def test_empty_batch(backend, dev, reduction, want):
    d_centers = dev.put(np.ones((3, 2), np.float32))
    loss, grad = fl.center_loss(dev.put(np.zeros((0, 2), np.float32)), dev.put(np.zeros(0, np.int64)),
                                d_centers, reduction=reduction)
    np.testing.assert_equal(float(loss), want)
    assert grad.shape == (0, 2)
    assert (dev.get(d_centers) == 1).all()
    fl.center_update(d_centers, dev.put(np.zeros((0, 2))), dev.put(np.zeros(0, np.int64)))
    assert (dev.get(d_centers) == 1).all()


# ------------------------------------------------------------------ layouts and buffers


def test_strided_features_and_centers(rng, backend, dev):
    big_x = rng.normal(size=(20, 10))
    x = big_x[::2, 1::3]  # (10, 3), not contiguous
    labels = rng.integers(0, 4, size=10)
    big_c = rng.normal(size=(4, 7))
    centers = big_c[:, 1:4]
    d_big_c = dev.put(big_c)
    # the update lands in big_c
    res = fl.center_loss(dev.put(big_x)[::2, 1::3], dev.put(labels), d_big_c[:, 1:4])
    check_result(sides.on_host(res, dev), *naive.center_loss(x, labels, centers), np.float64)
    after = dev.get(d_big_c)
    np.testing.assert_allclose(after[:, 1:4], naive.center_update(centers, x, labels), rtol=1e-13)
    assert np.array_equal(np.delete(after, [1, 2, 3], axis=1), np.delete(big_c, [1, 2, 3], axis=1))


@pytest.mark.cpu
def test_fortran_ordered_centers(rng):
    x = rng.normal(size=(20, 10))[::2, 1::3]
    labels = rng.integers(0, 4, size=10)
    centers = rng.normal(size=(4, 3))
    fortran = np.asfortranarray(centers)
    fl.center_update(fortran, x, labels)
    np.testing.assert_allclose(fortran, naive.center_update(centers, x, labels), rtol=1e-13)


@pytest.mark.parametrize("update", [True, False])
def test_grad_out_reuse_and_in_place(rng, backend, dev, update):
    x, labels, centers = make_batch(rng, n=10, d=4, k=3, dtype=np.float32)
    want_centers = naive.center_update(centers, x, labels) if update else centers
    want = fl.center_loss(x, labels, centers.copy(), update=update)
    buf = dev.put(np.full_like(x, np.nan))
    res = fl.center_loss(dev.put(x), dev.put(labels), dev.put(centers), update=update, grad_out=buf)
    assert res.grad is buf and dev.get(buf).tobytes() == want.grad.tobytes()
    # grad_out=features: the gradient replaces the features, after the update has read them
    d_x = dev.put(x)
    d_centers = dev.put(centers)
    res = fl.center_loss(d_x, dev.put(labels), d_centers, update=update, grad_out=d_x)
    assert res.grad is d_x and dev.get(d_x).tobytes() == want.grad.tobytes()
    np.testing.assert_allclose(dev.get(d_centers), want_centers, rtol=1e-6)
    # grad_out overlapping the features one row off
    big = dev.put(np.concatenate([x, x[:1]]))
    d_centers = dev.put(centers)
    res = fl.center_loss(big[:10], dev.put(labels), d_centers, update=update, grad_out=big[1:])
    assert dev.get(big)[1:].tobytes() == want.grad.tobytes()
    np.testing.assert_allclose(dev.get(d_centers), want_centers, rtol=1e-6)


@pytest.mark.cuda
def test_features_that_are_the_centers(rng, dev):
    centers = rng.normal(size=(6, 3))
    labels = np.array([1, 0, 1, 3, 3, 3])
    d_centers = dev.put(centers)
    fl.center_update(d_centers, d_centers, dev.put(labels))  # reads rows of the centers it updates
    cpu = centers.copy()
    fl.center_update(cpu, cpu, labels)
    np.testing.assert_allclose(dev.get(d_centers), cpu, rtol=1e-14)
    np.testing.assert_allclose(cpu, naive.center_update(centers, centers, labels), rtol=1e-14)


def test_numpy_inputs_with_backend(rng, backend):
    x, labels, centers = make_batch(rng, n=9, d=3, k=4, dtype=np.float32)
    big_c = np.zeros((4, 5), np.float32)
    big_c[:, 1:4] = centers
    host_centers = big_c[:, 1:4]  # strided: the update must land in big_c
    buf = np.empty_like(x)
    res = fl.center_loss(x, labels.tolist(), host_centers, grad_out=buf, backend=backend)
    assert isinstance(res.loss, np.ndarray) and res.loss.shape == () and res.grad is buf
    check_result(res, *naive.center_loss(x, labels, centers), np.float32)
    np.testing.assert_allclose(big_c[:, 1:4], naive.center_update(centers, x, labels), rtol=4e-7, atol=4e-7)
    assert not big_c[:, [0, 4]].any()
    c2 = centers.copy()
    assert fl.center_update(c2, x, labels, backend=backend) is c2
    np.testing.assert_allclose(c2, naive.center_update(centers, x, labels), rtol=4e-7, atol=4e-7)
    x2 = x.copy()  # grad_out=features with NumPy arrays
    res = fl.center_loss(x2, labels, centers.copy(), grad_out=x2, backend=backend)
    assert res.grad is x2
    naive.assert_close(x2, naive.center_loss(x, labels, centers)[1], np.float32)
    with pytest.raises(ValueError, match="grad_out must not share memory with centers"):
        big = np.empty((9, 3), np.float32)
        fl.center_loss(x, labels, big[:4], grad_out=big, backend=backend)


# ------------------------------------------------------------------ bad input changes nothing


def _bad_cases(x, labels, centers, backend, put):
    """One bad argument per case: (the arguments that change, the error, its message)."""
    if backend == "cpu":
        ro = centers.copy()
        ro.flags.writeable = False
        centers_of_the_side = (dict(centers=ro), ValueError, "writable")
    else:  # a NumPy array beside CUDA features
        centers_of_the_side = (dict(centers=centers), TypeError, "centers")
    return [
        (dict(labels=np.r_[labels[:-1], 4]), ValueError, "labels"),
        (dict(labels=np.r_[labels[:-1], -1]), ValueError, "labels"),
        (dict(labels=labels[:-1]), ValueError, "labels"),
        (dict(labels=labels.astype(float)), TypeError, "labels"),
        (dict(features=x[:, :3]), ValueError, "centers"),
        (dict(features=x[0]), ValueError, "features"),
        (dict(features=x.astype(np.int32)), TypeError, "features"),
        (dict(centers=put(centers.astype(np.float16))), TypeError, "centers"),
        (dict(centers=put(centers.astype(np.int64))), TypeError, "centers"),
        (dict(centers=centers.tolist()), TypeError, "centers"),
        centers_of_the_side,
        (dict(alpha=1.5), ValueError, "alpha"),
        (dict(alpha=-0.1), ValueError, "alpha"),
        (dict(alpha="big"), TypeError, "alpha"),
    ]


@pytest.mark.parametrize("case", range(14))
def test_bad_input_raises_and_changes_nothing(rng, backend, dev, case):
    x, labels, centers = make_batch(rng, n=8, d=4, k=4)
    kwargs, exc, word = _bad_cases(x, labels, centers, backend, dev.put)[case]
    args = {"features": x, "labels": labels, "centers": dev.put(centers), **kwargs}
    features, labels = dev.put(args["features"]), dev.put(args["labels"])
    target = args["centers"]
    before = np.array(dev.get(target), copy=True)
    with pytest.raises(exc, match=word):
        fl.center_loss(features, labels, target, alpha=args.get("alpha", 0.5))
    with pytest.raises(exc, match=word):
        fl.center_update(target, features, labels, alpha=args.get("alpha", 0.5))
    assert np.array_equal(dev.get(target), before)


@pytest.mark.cuda
@pytest.mark.parametrize("case", [0, 2, 3, 4, 9, 11])
def test_bad_numpy_input_with_backend_cuda(rng, case):
    x, labels, centers = make_batch(rng, n=8, d=4, k=4)
    kwargs, exc, word = _bad_cases(x, labels, centers, "cuda", lambda a: a)[case]
    args = {"features": x, "labels": labels, "centers": centers, **kwargs}
    target = args["centers"]
    before = np.array(target, copy=True)
    with pytest.raises(exc, match=word):
        fl.center_loss(args["features"], args["labels"], target, alpha=args.get("alpha", 0.5),
                       backend="cuda")
    with pytest.raises(exc, match=word):
        fl.center_update(target, args["features"], args["labels"], alpha=args.get("alpha", 0.5),
                         backend="cuda")
    assert np.array_equal(np.asarray(target), before)
    ro = centers.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        fl.center_update(ro, x, labels, backend="cuda")


def test_bad_grad_out_and_reduction(rng, backend, dev):
    x, labels, centers = make_batch(rng, n=8, d=4, k=4)
    d_x, d_labels, d_centers = dev.put(x), dev.put(labels), dev.put(centers)
    with pytest.raises(ValueError, match="grad_out"):
        fl.center_loss(d_x, d_labels, d_centers, grad_out=dev.put(np.empty((8, 5))))
    with pytest.raises(TypeError, match="grad_out"):
        fl.center_loss(d_x, d_labels, d_centers, grad_out=dev.put(np.empty((8, 4), np.float32)))
    if backend == "cuda":
        with pytest.raises(TypeError, match="grad_out"):  # on the host
            fl.center_loss(d_x, d_labels, d_centers, grad_out=np.empty((8, 4)))
    with pytest.raises(ValueError, match="reduction"):
        fl.center_loss(d_x, d_labels, d_centers, reduction="max")
    big = dev.put(rng.normal(size=(8, 4)))
    snapshot = np.array(dev.get(big), copy=True)
    with pytest.raises(ValueError, match="grad_out must not share memory with centers"):
        fl.center_loss(d_x, d_labels, big[:4], grad_out=big)
    with pytest.raises(ValueError, match="grad_out must not share memory with centers"):
        fl.center_loss(d_x, d_labels, big[4:], grad_out=big)
    assert dev.get(big).tobytes() == snapshot.tobytes()
    assert dev.get(d_centers).tobytes() == centers.tobytes()
    fl.center_loss(d_x, d_labels, big[:4], grad_out=dev.put(np.empty((8, 4))))  # no overlap: fine


# ------------------------------------------------------------------ CenterLoss


def test_center_loss_object_starts_at_zero_and_updates(rng, backend, dev):
    cl = fl.CenterLoss(5, 3, alpha=0.3, device=backend)
    assert isinstance(cl.centers, type(dev.put(np.zeros(1)))) and cl.centers.shape == (5, 3)
    assert cl.centers.dtype == np.float32 and not dev.get(cl.centers).any()
    assert f"device='{backend}'" in repr(cl)
    centers = np.zeros((5, 3))
    cpu = fl.CenterLoss(5, 3, alpha=0.3)
    for _ in range(2):
        x = rng.normal(size=(12, 3)).astype(np.float32)
        labels = rng.integers(0, 5, size=12)
        loss, grad = cl(dev.put(x), dev.put(labels))
        check_result((dev.get(loss), dev.get(grad)), *naive.center_loss(x, labels, centers), np.float32)
        centers = naive.center_update(centers, x, labels, alpha=0.3)
        np.testing.assert_allclose(dev.get(cl.centers), centers, rtol=1e-6)
        if backend == "cuda":
            want_loss, want_grad = cpu(x, labels)
            naive.assert_close(dev.get(loss), want_loss, np.float32)
            naive.assert_close(dev.get(grad), want_grad, np.float32)
            np.testing.assert_allclose(dev.get(cl.centers), cpu.centers, rtol=1e-6, atol=1e-6)
    if backend == "cuda":
        with pytest.raises(TypeError, match="features"):
            cl(x, labels)  # NumPy features beside GPU centers


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_center_loss_object_state_round_trip(rng, backend, dev, dtype):
    name = np.dtype(dtype).name
    init = rng.normal(size=(4, 2))
    cl = fl.CenterLoss(4, 2, alpha=0.3, init=init, dtype=name, device=backend)  # float64 init
    assert dev.get(cl.centers).tobytes() == init.astype(dtype).tobytes() and cl.centers is not init
    state = cl.state_dict()
    assert isinstance(state["centers"], np.ndarray) and state["centers"].dtype == dtype
    state["centers"][0] = 99.0  # a copy: the object is not affected
    assert dev.get(cl.centers)[0, 0] == dtype(init[0, 0])
    cl(dev.put(rng.normal(size=(6, 2)).astype(dtype)), dev.put(np.array([0, 1, 2, 3, 0, 1])))
    other = fl.CenterLoss(4, 2, dtype=name, device=backend)
    other.load_state_dict(cl.state_dict())
    assert dev.get(other.centers).tobytes() == dev.get(cl.centers).tobytes() and other.alpha == 0.3
    on_cpu = fl.CenterLoss(4, 2, dtype=name)
    on_cpu.load_state_dict(other.state_dict())  # to the CPU through NumPy
    assert on_cpu.centers.tobytes() == dev.get(cl.centers).tobytes()
    before = np.array(dev.get(other.centers), copy=True)
    with pytest.raises(ValueError, match="centers"):
        other.load_state_dict({"centers": np.zeros((3, 2))})
    with pytest.raises(ValueError, match="alpha"):
        other.load_state_dict({"centers": np.zeros((4, 2)), "alpha": 2.0})
    assert dev.get(other.centers).tobytes() == before.tobytes()
    other.load_state_dict({"centers": cl.centers})  # the side's own array is read too
    assert dev.get(other.centers).tobytes() == dev.get(cl.centers).tobytes()


@pytest.mark.cpu
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


# ------------------------------------------------------------------ the CPU's Cython update


def _update_in_child(x, labels, queue):
    c = np.zeros((37, x.shape[1]), x.dtype)
    fl.center_update(c, x, labels)
    queue.put(c)


@pytest.mark.cpu
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


@pytest.mark.cpu
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
