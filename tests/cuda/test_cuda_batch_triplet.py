"""batch_triplet_loss on the GPU (or the simulator) against naive.py's brute force and the CPU path."""
import numpy as np
import pytest

import fastloss as fl
import naive
from naive import check_result

DISTANCES = ["euclidean", "squared_euclidean", "cosine"]
MININGS = ["hard", "semihard", "all"]
MARGIN = {"euclidean": 0.7, "squared_euclidean": 3.0, "cosine": 0.3}


def make_batch(rng, n=10, d=5, classes=3, dtype=np.float64):
    e = rng.normal(size=(n, d)).astype(dtype)
    labels = rng.integers(0, classes, size=n)
    labels[:classes] = np.arange(classes)  # every class present
    return e, labels


def host(res):
    loss = res.loss if isinstance(res.loss, np.ndarray) else res.loss.copy_to_host()
    grad = res.grad if res.grad is None or isinstance(res.grad, np.ndarray) else res.grad.copy_to_host()
    return fl.LossGrad(loss, grad)


def both(e, labels, dtype=np.float64, **kw):
    """The GPU result (backend="cuda": NumPy in, NumPy out) checked against the float64
    reference and against the CPU path; returns it."""
    res = fl.batch_triplet_loss(e, labels, backend="cuda", **kw)
    want = naive.batch_triplet_loss(e, labels, **kw)
    check_result(res, *want, dtype)
    cpu = fl.batch_triplet_loss(e, labels, **kw)
    check_result(res, np.asarray(cpu.loss, np.float64), cpu.grad.astype(np.float64), dtype)
    assert np.asarray(res.loss).dtype == np.dtype(dtype)
    return res


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", MININGS)
def test_matches_reference_and_cpu(rng, mining, distance):
    e, labels = make_batch(rng)
    for reduction in ("mean", "none"):
        both(e, labels, mining=mining, distance=distance, margin=MARGIN[distance],
             reduction=reduction)


@pytest.mark.parametrize("mining", MININGS)
def test_soft_margin_and_sum(rng, mining):
    e, labels = make_batch(rng, n=9, d=4)
    for distance, margin, reduction in (("euclidean", 0.0, "mean"), ("cosine", 0.3, "sum"),
                                        ("squared_euclidean", 1.0, "none")):
        both(e, labels, mining=mining, distance=distance, soft=True, margin=margin,
             reduction=reduction)
    both(e, labels, mining=mining, reduction="sum")


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("mining", MININGS)
def test_low_precision(rng, mining, dtype):
    e, labels = make_batch(rng, n=11, d=7, dtype=dtype)
    for distance in ("euclidean", "cosine"):
        res = both(e, labels, dtype, mining=mining, distance=distance, margin=MARGIN[distance])
        assert res.grad.dtype == np.dtype(dtype)


def test_hard_mining_ties_go_to_the_lowest_index():
    # 1-D embeddings: anchor 3 (at 2) has two nearest negatives, rows 1 and 2, both at 1
    e = np.array([[0.0], [1.0], [3.0], [2.0], [5.0]])
    labels = np.array([0, 0, 0, 1, 1])
    res = both(e, labels, margin=1.0, reduction="none")
    np.testing.assert_allclose(res.loss, [2.0, 2.0, 3.0, 3.0, 2.0], rtol=1e-12)
    mean = fl.batch_triplet_loss(e, labels, margin=1.0, backend="cuda")
    np.testing.assert_allclose(mean.grad[[1, 2], 0], [1.0 / 5, 3.0 / 5], rtol=1e-12)
    # exact ties everywhere (integer points, several tiles), squared distances too.  (Not cosine:
    # there 1 - g / (|x| |y|) of equal angles may differ in the last bit, FMA or not, and a tie
    # broken by round-off may go either way on either backend.)
    rng = np.random.default_rng(5)
    e = rng.integers(-2, 3, size=(12, 3)).astype(np.float64)
    labels = np.arange(12) % 3
    for distance in DISTANCES[:2]:
        both(e, labels, distance=distance, margin=MARGIN[distance], reduction="none")


def test_semihard_prefers_the_nearest_negative_farther_than_the_positive():
    e = np.array([[0.0], [2.0], [1.0], [3.0], [-2.5]])
    labels = np.array([0, 0, 1, 1, 1])
    res = both(e, labels, mining="semihard", margin=1.0, reduction="none")
    np.testing.assert_allclose(res.loss[:3], [0.5, 0.0, 2.0 + 3.5], rtol=1e-12)
    # strictly farther: a negative at exactly d(a, p) does not qualify
    e = np.array([[0.0], [2.0], [-2.0], [3.0]])
    res = fl.batch_triplet_loss(e, [0, 0, 1, 1], mining="semihard", margin=1.0, reduction="none",
                                backend="cuda")
    assert res.loss[0] == 0.0


def test_all_mean_counts_positive_terms_and_empty_mean(rng):
    e, labels = make_batch(rng, n=8, d=3)
    both(e, labels, mining="all", margin=0.5)
    # two far-apart clusters: no positive term, an empty "all" mean is 0 with a zero gradient
    e = np.concatenate([rng.normal(size=(3, 2)) * 0.01, 100 + rng.normal(size=(3, 2)) * 0.01])
    res = fl.batch_triplet_loss(e, np.repeat([0, 1], 3), mining="all", backend="cuda")
    assert float(res.loss) == 0.0
    np.testing.assert_array_equal(res.grad, np.zeros_like(e))


@pytest.mark.parametrize("mining", MININGS)
def test_anchors_without_positive_or_negative(rng, mining):
    e = rng.normal(size=(6, 3))
    both(e, np.array([0, 1, 1, 2, 2, 3]), mining=mining, reduction="none")  # singletons
    res = fl.batch_triplet_loss(e, np.zeros(6, np.int64), mining=mining, backend="cuda")  # one class
    cpu = fl.batch_triplet_loss(e, np.zeros(6, np.int64), mining=mining)
    assert np.isnan(float(res.loss)) == np.isnan(float(cpu.loss)) == (mining != "all")
    np.testing.assert_array_equal(res.grad, np.zeros_like(e))


@pytest.mark.parametrize("distance", DISTANCES)
def test_identical_embeddings_and_duplicates(rng, distance):
    e = np.tile(np.array([[0.3, -1.2, 2.0]]), (6, 1))
    labels = np.array([0, 0, 1, 1, 2, 2])
    for mining in MININGS:
        res = fl.batch_triplet_loss(e, labels, mining=mining, distance=distance, margin=0.5,
                                    backend="cuda")
        assert np.isfinite(float(res.loss)) and np.all(np.isfinite(res.grad))
        np.testing.assert_allclose(float(res.loss), 0.5, atol=1e-6)
        if distance != "cosine":
            np.testing.assert_array_equal(res.grad, np.zeros_like(e))
    e, labels = make_batch(rng, n=9, d=3)
    e[4] = e[1]  # a positive at distance exactly 0
    labels[4] = labels[1]
    e[6] = e[2]  # a negative at distance exactly 0
    labels[6] = (labels[2] + 1) % 3
    for mining in MININGS:
        res = both(e, labels, mining=mining, distance=distance, margin=MARGIN[distance])
        assert np.all(np.isfinite(res.grad))


def test_extreme_values_stay_finite(rng):
    e, labels = make_batch(rng, n=8, d=3)
    e *= 1e4
    for mining, distance in (("hard", "euclidean"), ("semihard", "cosine"), ("all", "euclidean")):
        res = both(e, labels, mining=mining, distance=distance, margin=1e4)
        assert np.isfinite(float(res.loss)) and np.all(np.isfinite(res.grad))


def test_nan_propagates_as_on_the_cpu(rng):
    e, labels = make_batch(rng, n=8, d=3)
    e[2, 1] = np.nan
    for mining in MININGS:
        for distance in ("euclidean", "cosine"):
            kw = dict(mining=mining, distance=distance, reduction="none")
            res = fl.batch_triplet_loss(e, labels, backend="cuda", **kw)
            cpu = fl.batch_triplet_loss(e, labels, **kw)
            np.testing.assert_array_equal(np.isnan(res.loss), np.isnan(cpu.loss))
            np.testing.assert_array_equal(np.isnan(res.grad), np.isnan(cpu.grad))
            np.testing.assert_allclose(res.loss, cpu.loss, rtol=1e-10)
            np.testing.assert_allclose(res.grad, cpu.grad, rtol=1e-9, atol=1e-12)
        assert np.isnan(float(fl.batch_triplet_loss(e, labels, mining=mining, backend="cuda").loss))


def test_empty_batch():
    e = np.zeros((0, 4))
    labels = np.zeros(0, np.int64)
    for mining in MININGS:
        res = fl.batch_triplet_loss(e, labels, mining=mining, backend="cuda")
        assert res.grad.shape == (0, 4)
        assert (float(res.loss) == 0.0) if mining == "all" else np.isnan(float(res.loss))
    assert float(fl.batch_triplet_loss(e, labels, reduction="sum", backend="cuda").loss) == 0.0
    assert fl.batch_triplet_loss(e, labels, reduction="none", backend="cuda").loss.shape == (0,)


def test_device_arrays_and_any_integer_labels(rng, dev):
    e, labels = make_batch(rng, n=9, d=4, dtype=np.float32)
    de = dev.put(e)
    for dtype, reduction in ((np.int8, "mean"), (np.uint64, "none"), (np.int32, "sum")):
        lab = (labels - 1).astype(dtype) if dtype != np.uint64 else labels.astype(dtype) + 2**40
        res = fl.batch_triplet_loss(de, dev.put(lab), mining="semihard", reduction=reduction)
        assert isinstance(res.loss, type(de)) and type(res.grad) is type(de)
        if reduction != "none":
            assert isinstance(float(res.loss), float)
        check_result(host(res), *naive.batch_triplet_loss(e, labels, mining="semihard",
                                                          reduction=reduction), np.float32)


def test_non_contiguous_device_views(rng, dev):
    big = rng.normal(size=(22, 9))
    e = big[::2, ::3]
    labels = np.arange(22) % 4
    res = fl.batch_triplet_loss(dev.put(big)[::2, ::3], dev.put(labels)[::2], mining="all",
                                distance="cosine")
    check_result(host(res), *naive.batch_triplet_loss(e, labels[::2], mining="all",
                                                      distance="cosine"), np.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float16], ids=lambda d: np.dtype(d).name)
def test_grad_out_reuse_and_in_place(rng, dev, dtype):
    e, labels = make_batch(rng, n=8, d=3, dtype=dtype)
    dl = dev.put(labels)
    for mining in (("hard", "all") if dtype == np.float64 else ("semihard",)):
        fresh = host(fl.batch_triplet_loss(dev.put(e), dl, mining=mining))
        out = dev.put(np.full_like(e, 9.0))
        for _ in range(2):
            res = fl.batch_triplet_loss(dev.put(e), dl, mining=mining, grad_out=out)
            assert res.grad is out
            np.testing.assert_array_equal(dev.get(out).view(np.uint8), fresh.grad.view(np.uint8))
        de = dev.put(e)
        res = fl.batch_triplet_loss(de, dl, mining=mining, grad_out=de)  # through a temporary
        assert res.grad is de
        np.testing.assert_array_equal(dev.get(de), fresh.grad)
    host_out = np.zeros_like(e)
    res = fl.batch_triplet_loss(e, labels, grad_out=host_out, backend="cuda")
    assert res.grad is host_out
    np.testing.assert_array_equal(host_out, fl.batch_triplet_loss(e, labels, backend="cuda").grad)


def test_grad_false(rng, dev):
    e, labels = make_batch(rng, n=8)
    for mining in MININGS:
        res = fl.batch_triplet_loss(dev.put(e), dev.put(labels), mining=mining, grad=False)
        assert res.grad is None
        np.testing.assert_allclose(float(res.loss), naive.batch_triplet_loss(e, labels, mining=mining)[0],
                                   rtol=1e-12)


def test_threads_per_block(rng, threads):
    e, labels = make_batch(rng, n=12, d=8, classes=4)
    for mining, distance in (("hard", "cosine"), ("semihard", "euclidean"), ("all", "squared_euclidean")):
        kw = dict(mining=mining, distance=distance, margin=MARGIN[distance], reduction="none")
        res = fl.batch_triplet_loss(e, labels, backend="cuda", **kw)
        check_result(res, *naive.batch_triplet_loss(e, labels, **kw), np.float64)


@pytest.mark.parametrize("change,name", [
    (dict(embeddings=np.zeros(12)), "embeddings"),
    (dict(embeddings=np.zeros((2, 6, 3))), "embeddings"),
    (dict(embeddings=np.zeros((12, 3), np.int32)), "embeddings"),
    (dict(labels=np.zeros(11, np.int64)), "labels"),
    (dict(labels=np.zeros(12)), "labels"),
    (dict(mining="easy"), "mining"),
    (dict(distance="l1"), "distance"),
    (dict(margin=-1.0), "margin"),
    (dict(reduction="max"), "reduction"),
    (dict(grad_out=np.zeros((12, 4))), "grad_out"),
    (dict(grad_out=np.zeros((12, 3), np.float32)), "grad_out"),
    (dict(grad_out="host"), "grad_out"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_raises_and_changes_nothing(rng, dev, change, name):
    e = rng.normal(size=(12, 3))
    kw = dict(embeddings=dev.put(e), labels=dev.put(np.arange(12) % 3))
    for key, value in change.items():
        if isinstance(value, str) and value == "host":  # a NumPy buffer for device inputs
            value = np.zeros((12, 3))
        elif isinstance(value, np.ndarray):
            value = dev.put(value)
        kw[key] = value
    with pytest.raises((ValueError, TypeError), match=name):
        fl.batch_triplet_loss(**kw)
    if "embeddings" not in change:
        np.testing.assert_array_equal(dev.get(kw["embeddings"]), e)
