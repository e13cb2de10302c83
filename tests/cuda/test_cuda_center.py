"""center_loss, center_update and CenterLoss(device="cuda") on the GPU path.

Against the float64 references of naive.py and the CPU path; the update's
bits must not depend on the threads per block or on the chunking of its
counting sort.  Runs under the CUDA simulator in CI (tiny shapes) and for real
on a GPU.
"""
import numpy as np
import pytest

import fastloss as fl
import naive
from naive import check_result

DTYPES = [np.float16, np.float32, np.float64]
REDUCTIONS = ["mean", "sum", "none"]


def make_batch(rng, n=9, d=5, k=4, dtype=np.float64, centers_dtype=None):
    x = rng.normal(size=(n, d)).astype(dtype)
    labels = rng.integers(0, k, size=n)
    centers = rng.normal(size=(k, d)).astype(centers_dtype or (np.float32 if dtype == np.float16 else dtype))
    return x, labels, centers


def update_tol(features_dtype, centers_dtype):
    eps = np.finfo(centers_dtype).eps
    if np.dtype(features_dtype) != np.float64:
        eps = max(eps, np.finfo(np.float32).eps)
    return 4 * eps


def _host(res, dev):
    return fl.LossGrad(dev.get(res.loss), dev.get(res.grad))


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
def test_loss_grad_and_update_match_reference_and_cpu(rng, dev, dtype, reduction):
    x, labels, centers = make_batch(rng, n=11, d=7, k=5, dtype=dtype)
    d_centers = dev.put(centers)
    res = fl.center_loss(dev.put(x), dev.put(labels), d_centers, reduction=reduction)
    assert type(res.loss) is not np.ndarray and isinstance(res.grad, type(d_centers))
    got = _host(res, dev)
    check_result(got, *naive.center_loss(x, labels, centers, reduction=reduction), dtype)
    cpu_centers = centers.copy()
    cpu = fl.center_loss(x, labels, cpu_centers, reduction=reduction)
    naive.assert_close(got.loss, cpu.loss, dtype, what="loss, GPU vs CPU")
    naive.assert_close(got.grad, cpu.grad, dtype, what="grad, GPU vs CPU")
    tol = update_tol(dtype, centers.dtype)
    np.testing.assert_allclose(dev.get(d_centers), naive.center_update(centers, x, labels), rtol=tol, atol=tol)
    np.testing.assert_allclose(dev.get(d_centers), cpu_centers, rtol=tol, atol=tol)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_update_false_reads_only_and_grad_false(rng, dev, reduction):
    x, labels, centers = make_batch(rng, n=6, d=3, k=3)
    d_centers = dev.put(centers)
    res = fl.center_loss(dev.put(x), dev.put(labels), d_centers, update=False, reduction=reduction)
    check_result(_host(res, dev), *naive.center_loss(x, labels, centers, reduction=reduction), np.float64)
    assert dev.get(d_centers).tobytes() == centers.tobytes()
    res = fl.center_loss(dev.put(x), dev.put(labels), d_centers, grad=False, reduction=reduction)
    assert res.grad is None
    naive.assert_close(dev.get(res.loss), naive.center_loss(x, labels, centers, reduction=reduction)[0],
                       np.float64)
    np.testing.assert_allclose(dev.get(d_centers), naive.center_update(centers, x, labels), rtol=1e-13)


def test_loss_uses_centers_before_the_update(rng, dev):
    x, labels, centers = make_batch(rng, n=8, d=3, k=3)
    d_centers = dev.put(centers)
    res = fl.center_loss(dev.put(x), dev.put(labels), d_centers, alpha=1.0, reduction="none")
    check_result(_host(res, dev), *naive.center_loss(x, labels, centers, reduction="none"), np.float64)
    assert not np.array_equal(dev.get(d_centers), centers)


def test_wide_rows_and_many_feature_tiles(rng, dev):
    # D larger than the block: several features per thread, several feature tiles
    x, labels, centers = make_batch(rng, n=5, d=45, k=3, dtype=np.float32)
    d_centers = dev.put(centers)
    res = fl.center_loss(dev.put(x), dev.put(labels), d_centers)
    check_result(_host(res, dev), *naive.center_loss(x, labels, centers), np.float32)
    np.testing.assert_allclose(dev.get(d_centers), naive.center_update(centers, x, labels),
                               rtol=4e-7, atol=4e-7)


# ------------------------------------------------------------------ the counting sort


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_grouping_is_a_stable_sort(rng, dev, threads, chunk_rows, chunk):
    from fastloss.cuda._arrays import Device
    chunk_rows.CHUNK_ROWS = chunk
    labels = rng.choice([0, 2, 2, 2, 5, 6, 6], size=25)  # duplicates, absent classes
    d_labels = dev.put(labels)
    order, starts = chunk_rows.group_rows(Device(d_labels), d_labels, 8)
    assert np.array_equal(dev.get(order), np.argsort(labels, kind="stable"))
    assert np.array_equal(dev.get(starts), np.r_[0, np.cumsum(np.bincount(labels, minlength=8))])


def test_update_same_bits_for_any_block_size_and_chunking(rng, dev, threads, chunk_rows):
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


def test_loss_and_grad_for_any_block_size(rng, dev, threads):
    x, labels, centers = make_batch(rng, n=7, d=37, k=3, dtype=np.float32)
    res = fl.center_loss(dev.put(x), dev.put(labels), dev.put(centers), reduction="none")
    check_result(_host(res, dev), *naive.center_loss(x, labels, centers, reduction="none"), np.float32)
    cpu = fl.center_loss(x, labels, centers.copy(), reduction="none")
    assert dev.get(res.grad).tobytes() == cpu.grad.tobytes()  # elementwise: the same bits


# ------------------------------------------------------------------ the update's edge cases


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 0.05])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_update_with_duplicates_matches_cpu(rng, dev, alpha, dtype):
    x, _, centers = make_batch(rng, n=25, d=4, k=8, dtype=dtype)
    labels = rng.choice([1, 1, 1, 3, 3, 5, 6], size=25)
    d_centers = dev.put(centers)
    got = fl.center_update(d_centers, dev.put(x), dev.put(labels), alpha=alpha)
    assert got is d_centers
    tol = update_tol(dtype, dtype)
    np.testing.assert_allclose(dev.get(d_centers), naive.center_update(centers, x, labels, alpha=alpha),
                               rtol=tol, atol=tol)
    np.testing.assert_allclose(dev.get(d_centers), fl.center_update(centers.copy(), x, labels, alpha=alpha),
                               rtol=tol, atol=tol)


def test_absent_classes_are_untouched_bitwise(rng, dev):
    x, _, centers = make_batch(rng, n=20, d=4, k=6, dtype=np.float32)
    labels = rng.choice([0, 2, 5], size=20)
    d_centers = dev.put(centers)
    fl.center_update(d_centers, dev.put(x), dev.put(labels))
    after = dev.get(d_centers)
    for k in (1, 3, 4):
        assert after[k].tobytes() == centers[k].tobytes()
    for k in (0, 2, 5):
        assert not np.array_equal(after[k], centers[k])


def test_one_class_takes_every_row(rng, dev):
    x, _, centers = make_batch(rng, n=40, d=3, k=2)
    labels = np.ones(40, np.int8)  # a narrow label dtype, on the device as it is
    d_centers = dev.put(centers)
    fl.center_loss(dev.put(x), dev.put(labels), d_centers)
    after = dev.get(d_centers)
    np.testing.assert_allclose(after, naive.center_update(centers, x, labels), rtol=1e-13)
    assert after[0].tobytes() == centers[0].tobytes()


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
def test_mixed_dtypes(rng, dev, features_dtype, centers_dtype):
    x, labels, centers = make_batch(rng, n=10, d=5, k=4, dtype=features_dtype, centers_dtype=centers_dtype)
    d_centers = dev.put(centers)
    res = fl.center_loss(dev.put(x), dev.put(labels), d_centers)
    check_result(_host(res, dev), *naive.center_loss(x, labels, centers), features_dtype)
    after = dev.get(d_centers)
    assert after.dtype == centers_dtype
    tol = update_tol(features_dtype, centers_dtype)
    np.testing.assert_allclose(after, naive.center_update(centers, x, labels), rtol=tol, atol=tol)
    cpu = centers.copy()
    fl.center_loss(x, labels, cpu)
    np.testing.assert_allclose(after, cpu, rtol=tol, atol=tol)


def test_nan_reaches_only_its_class(rng, dev):
    x, _, centers = make_batch(rng, n=12, d=3, k=4)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    x[4, 1] = np.nan
    d_centers = dev.put(centers)
    res = fl.center_loss(dev.put(x), dev.put(labels), d_centers, reduction="none")
    loss, grad = _host(res, dev)
    assert np.isnan(loss[4]) and np.isfinite(np.delete(loss, 4)).all()
    assert np.isnan(grad[4, 1]) and np.isfinite(np.delete(grad, 4, axis=0)).all()
    after = dev.get(d_centers)
    assert np.isnan(after[1, 1]) and np.isfinite(after[1, [0, 2]]).all()
    assert np.isfinite(after[[0, 2, 3]]).all()
    assert after[3].tobytes() == centers[3].tobytes()
    cpu = centers.copy()
    fl.center_loss(x, labels, cpu)
    np.testing.assert_allclose(after, cpu, rtol=1e-13)


def test_extreme_values_stay_finite(dev):
    x = np.array([[1e4, -1e4], [1e4, -1e4], [-1e4, 1e4]], np.float32)
    d_centers = dev.put(np.zeros((2, 2), np.float32))
    res = fl.center_loss(dev.put(x), dev.put(np.array([0, 0, 1])), d_centers, reduction="sum")
    assert float(res.loss) == pytest.approx(3e8, rel=1e-6)
    np.testing.assert_allclose(dev.get(d_centers), [[1e4 / 3, -1e4 / 3], [-2.5e3, 2.5e3]], rtol=1e-6)


def test_zero_distance(rng, dev):
    centers = rng.normal(size=(3, 4))
    x = centers[[2, 0, 2]].copy()
    d_centers = dev.put(centers)
    loss, grad = fl.center_loss(dev.put(x), dev.put(np.array([2, 0, 2])), d_centers)
    assert float(loss) == 0.0 and not dev.get(grad).any()
    assert dev.get(d_centers).tobytes() == centers.tobytes()


@pytest.mark.parametrize("reduction,want", [("mean", np.nan), ("sum", 0.0)])
def test_empty_batch(dev, reduction, want):
    d_centers = dev.put(np.ones((3, 2), np.float32))
    loss, grad = fl.center_loss(dev.put(np.zeros((0, 2), np.float32)), dev.put(np.zeros(0, np.int64)),
                                d_centers, reduction=reduction)
    np.testing.assert_equal(float(loss), want)
    assert grad.shape == (0, 2)
    assert (dev.get(d_centers) == 1).all()
    fl.center_update(d_centers, dev.put(np.zeros((0, 2))), dev.put(np.zeros(0, np.int64)))
    assert (dev.get(d_centers) == 1).all()


# ------------------------------------------------------------------ layouts and buffers


def test_strided_features_and_centers(rng, dev):
    big_x = rng.normal(size=(20, 10))
    x = big_x[::2, 1::3]  # (10, 3)
    labels = rng.integers(0, 4, size=10)
    big_c = rng.normal(size=(4, 7))
    centers = big_c[:, 1:4]
    d_big_c = dev.put(big_c)
    res = fl.center_loss(dev.put(big_x)[::2, 1::3], dev.put(labels), d_big_c[:, 1:4])
    check_result(_host(res, dev), *naive.center_loss(x, labels, centers), np.float64)
    after = dev.get(d_big_c)
    np.testing.assert_allclose(after[:, 1:4], naive.center_update(centers, x, labels), rtol=1e-13)
    assert np.array_equal(np.delete(after, [1, 2, 3], axis=1), np.delete(big_c, [1, 2, 3], axis=1))


@pytest.mark.parametrize("update", [True, False])
def test_grad_out_reuse_and_in_place(rng, dev, update):
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
    np.testing.assert_allclose(dev.get(d_centers), want_centers, rtol=1e-6, atol=1e-6)
    # grad_out overlapping the features one row off
    big = dev.put(np.concatenate([x, x[:1]]))
    d_centers = dev.put(centers)
    res = fl.center_loss(big[:10], dev.put(labels), d_centers, update=update, grad_out=big[1:])
    assert dev.get(big)[1:].tobytes() == want.grad.tobytes()
    np.testing.assert_allclose(dev.get(d_centers), want_centers, rtol=1e-6, atol=1e-6)


def test_features_that_are_the_centers(rng, dev):
    centers = rng.normal(size=(6, 3))
    labels = np.array([1, 0, 1, 3, 3, 3])
    d_centers = dev.put(centers)
    fl.center_update(d_centers, d_centers, dev.put(labels))  # reads rows of the centers it updates
    cpu = centers.copy()
    fl.center_update(cpu, cpu, labels)
    np.testing.assert_allclose(dev.get(d_centers), cpu, rtol=1e-14)
    np.testing.assert_allclose(cpu, naive.center_update(centers, centers, labels), rtol=1e-14)


def test_bad_grad_out(rng, dev):
    x, labels, centers = make_batch(rng, n=8, d=4, k=4)
    d_x, d_labels, d_centers = dev.put(x), dev.put(labels), dev.put(centers)
    with pytest.raises(ValueError, match="grad_out"):
        fl.center_loss(d_x, d_labels, d_centers, grad_out=dev.put(np.empty((8, 5))))
    with pytest.raises(TypeError, match="grad_out"):
        fl.center_loss(d_x, d_labels, d_centers, grad_out=dev.put(np.empty((8, 4), np.float32)))
    with pytest.raises(TypeError, match="grad_out"):
        fl.center_loss(d_x, d_labels, d_centers, grad_out=np.empty((8, 4)))
    with pytest.raises(ValueError, match="reduction"):
        fl.center_loss(d_x, d_labels, d_centers, reduction="max")
    big = dev.put(rng.normal(size=(8, 4)))
    snapshot = dev.get(big)
    with pytest.raises(ValueError, match="grad_out must not share memory with centers"):
        fl.center_loss(d_x, d_labels, big[:4], grad_out=big)
    with pytest.raises(ValueError, match="grad_out must not share memory with centers"):
        fl.center_loss(d_x, d_labels, big[4:], grad_out=big)
    assert dev.get(big).tobytes() == snapshot.tobytes()
    assert dev.get(d_centers).tobytes() == centers.tobytes()
    fl.center_loss(d_x, d_labels, big[:4], grad_out=dev.put(np.empty((8, 4))))  # no overlap: fine


# ------------------------------------------------------------------ NumPy in, NumPy out


def test_backend_cuda_with_numpy_inputs(rng):
    x, labels, centers = make_batch(rng, n=9, d=3, k=4, dtype=np.float32)
    big_c = np.zeros((4, 5), np.float32)
    big_c[:, 1:4] = centers
    host_centers = big_c[:, 1:4]  # strided: the update must land in big_c
    buf = np.empty_like(x)
    res = fl.center_loss(x, labels.tolist(), host_centers, grad_out=buf, backend="cuda")
    assert isinstance(res.loss, np.ndarray) and res.loss.shape == () and res.grad is buf
    check_result(res, *naive.center_loss(x, labels, centers), np.float32)
    np.testing.assert_allclose(big_c[:, 1:4], naive.center_update(centers, x, labels), rtol=4e-7, atol=4e-7)
    assert not big_c[:, [0, 4]].any()
    c2 = centers.copy()
    assert fl.center_update(c2, x, labels, backend="cuda") is c2
    np.testing.assert_allclose(c2, naive.center_update(centers, x, labels), rtol=4e-7, atol=4e-7)
    x2 = x.copy()  # grad_out=features with NumPy arrays on the GPU
    res = fl.center_loss(x2, labels, centers.copy(), grad_out=x2, backend="cuda")
    assert res.grad is x2
    naive.assert_close(x2, naive.center_loss(x, labels, centers)[1], np.float32)
    with pytest.raises(ValueError, match="grad_out must not share memory with centers"):
        big = np.empty((9, 3), np.float32)
        fl.center_loss(x, labels, big[:4], grad_out=big, backend="cuda")


# ------------------------------------------------------------------ bad input changes nothing


def _bad_cases(x, labels, centers, put):
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
        (dict(centers=centers), TypeError, "centers"),  # a NumPy array beside CUDA features
        (dict(alpha=1.5), ValueError, "alpha"),
        (dict(alpha=-0.1), ValueError, "alpha"),
        (dict(alpha="big"), TypeError, "alpha"),
    ]


@pytest.mark.parametrize("case", range(14))
def test_bad_input_raises_and_changes_nothing(rng, dev, case):
    x, labels, centers = make_batch(rng, n=8, d=4, k=4)
    kwargs, exc, word = _bad_cases(x, labels, centers, dev.put)[case]
    args = {"features": x, "labels": labels, "centers": dev.put(centers), **kwargs}
    features, labels = dev.put(args["features"]), dev.put(args["labels"])
    target = args["centers"]
    before = dev.get(target) if isinstance(target, type(features)) else np.array(target, copy=True)
    with pytest.raises(exc, match=word):
        fl.center_loss(features, labels, target, alpha=args.get("alpha", 0.5))
    with pytest.raises(exc, match=word):
        fl.center_update(target, features, labels, alpha=args.get("alpha", 0.5))
    after = dev.get(target) if isinstance(target, type(features)) else np.array(target)
    assert np.array_equal(after, before)


@pytest.mark.parametrize("case", [0, 2, 3, 4, 9, 11])
def test_bad_numpy_input_with_backend_cuda(rng, case):
    x, labels, centers = make_batch(rng, n=8, d=4, k=4)
    kwargs, exc, word = _bad_cases(x, labels, centers, lambda a: a)[case]
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


# ------------------------------------------------------------------ CenterLoss(device="cuda")


def test_center_loss_object_on_the_gpu(rng, dev):
    cl = fl.CenterLoss(5, 3, alpha=0.3, device="cuda")
    assert isinstance(cl.centers, type(dev.put(np.zeros(1)))) and cl.centers.dtype == np.float32
    assert not dev.get(cl.centers).any() and "device='cuda'" in repr(cl)
    cpu = fl.CenterLoss(5, 3, alpha=0.3)
    for _ in range(2):
        x = rng.normal(size=(12, 3)).astype(np.float32)
        labels = rng.integers(0, 5, size=12)
        loss, grad = cl(dev.put(x), dev.put(labels))
        want_loss, want_grad = cpu(x, labels)
        naive.assert_close(dev.get(loss), want_loss, np.float32)
        naive.assert_close(dev.get(grad), want_grad, np.float32)
        np.testing.assert_allclose(dev.get(cl.centers), cpu.centers, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="features"):
        cl(x, labels)  # NumPy features beside GPU centers


def test_center_loss_object_state_round_trip_on_the_gpu(rng, dev):
    init = rng.normal(size=(4, 2))
    cl = fl.CenterLoss(4, 2, alpha=0.3, init=init, device="cuda")  # float64 init into float32
    assert np.array_equal(dev.get(cl.centers), init.astype(np.float32))
    state = cl.state_dict()
    assert isinstance(state["centers"], np.ndarray) and state["centers"].dtype == np.float32
    state["centers"][0] = 99.0  # a copy: the object is not affected
    assert dev.get(cl.centers)[0, 0] == np.float32(init[0, 0])
    cl(dev.put(rng.normal(size=(6, 2)).astype(np.float32)), dev.put(np.array([0, 1, 2, 3, 0, 1])))
    other = fl.CenterLoss(4, 2, device="cuda")
    other.load_state_dict(cl.state_dict())
    assert dev.get(other.centers).tobytes() == dev.get(cl.centers).tobytes() and other.alpha == 0.3
    on_cpu = fl.CenterLoss(4, 2)
    on_cpu.load_state_dict(other.state_dict())  # GPU -> CPU through NumPy
    assert on_cpu.centers.tobytes() == dev.get(cl.centers).tobytes()
    before = dev.get(other.centers)
    with pytest.raises(ValueError, match="centers"):
        other.load_state_dict({"centers": np.zeros((3, 2))})
    with pytest.raises(ValueError, match="alpha"):
        other.load_state_dict({"centers": np.zeros((4, 2)), "alpha": 2.0})
    assert dev.get(other.centers).tobytes() == before.tobytes()
    other.load_state_dict({"centers": cl.centers})  # a device array is read back too
    assert dev.get(other.centers).tobytes() == dev.get(cl.centers).tobytes()
