"""Kernel launches per call, and the kernels that make a total without a launch of
their own: CE and focal "mean" finish in the row kernel's last block
(``_reduction.last_block_total``), the elementwise kernels run a grid of at most
``ELEMENTWISE_BLOCKS`` blocks with several elements per thread.

Launches are counted by a spy on ``_blocks.launch``, the one launch point (as in
tests/test_cuda_streams.py).  References are float64 NumPy formulas.
"""
import numpy as np
import pytest

import fastloss as fl

pytestmark = pytest.mark.cuda


@pytest.fixture
def launches(monkeypatch):
    """The kernel names of every launch, in order."""
    from fastloss.cuda import _blocks
    names, real = [], _blocks.launch

    def launch(kernel, blocks, threads, stream, *args):
        names.append(kernel.__name__)
        real(kernel, blocks, threads, stream, *args)

    monkeypatch.setattr(_blocks, "launch", launch)
    return names


def _rows(rng, n=40, c=11):
    x = rng.normal(size=(n, c)).astype(np.float32)
    return x, rng.integers(0, c, size=n)


def _ce_rows(x, t):
    """float64 per-row CE losses."""
    z = x.astype(np.float64)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    return lse - z[np.arange(len(t)), t]


@pytest.mark.parametrize("reduction, count", [("none", 2), ("sum", 3), ("mean", 3)])
def test_cross_entropy_launches(rng, dev, launches, reduction, count):
    # label check, ["mean": the denominator], the row kernel, ["sum": the total];
    # "mean" makes its total in the row kernel's last block
    x, t = _rows(rng)
    loss, _ = fl.softmax_cross_entropy(dev.put(x), dev.put(t), reduction=reduction)
    assert len(launches) == count, launches
    assert launches.count("cross_entropy_kernel") == 1
    rows = _ce_rows(x, t)
    want = {"none": rows, "sum": rows.sum(), "mean": rows.mean()}[reduction]
    np.testing.assert_allclose(dev.get(loss), want, rtol=2e-6)


def test_cross_entropy_mean_is_made_by_the_last_of_many_blocks(rng, dev, launches):
    from fastloss.cuda import _blocks
    x, t = _rows(rng, n=70)
    t[[3, 17]] = -100  # ignored rows: out of the sum and of the denominator
    sw = rng.uniform(0.5, 2.0, size=70).astype(np.float32)
    assert _blocks.row_grid(70, _blocks.threads_for(11)) > 1  # several blocks count themselves
    loss, grad = fl.softmax_cross_entropy(dev.put(x), dev.put(t), sample_weight=dev.put(sw))
    assert launches == ["_first_bad_label_kernel", "_class_denominator_kernel",
                        "cross_entropy_kernel"]
    keep = t != -100
    want = (sw[keep] * _ce_rows(x[keep], t[keep])).sum() / sw[keep].astype(np.float64).sum()
    np.testing.assert_allclose(float(dev.get(loss)), want, rtol=2e-6)
    again, _ = fl.softmax_cross_entropy(dev.put(x), dev.put(t), sample_weight=dev.put(sw))
    assert dev.get(again).tobytes() == dev.get(loss).tobytes()


def test_cross_entropy_mean_of_no_rows_is_nan(dev, launches):
    loss, _ = fl.softmax_cross_entropy(dev.put(np.zeros((0, 5), np.float32)),
                                       dev.put(np.zeros(0, np.int64)))
    assert np.isnan(dev.get(loss))


def test_probability_targets_mean_launches_two(rng, dev, launches):
    x, _ = _rows(rng)
    p = rng.dirichlet(np.ones(11), size=40).astype(np.float32)
    fl.softmax_cross_entropy(dev.put(x), dev.put(p))
    assert launches == ["_class_denominator_kernel", "cross_entropy_kernel"]


@pytest.mark.parametrize("reduction, count", [("none", 2), ("sum", 3), ("mean", 3)])
def test_focal_launches(rng, dev, launches, reduction, count):
    x, t = _rows(rng)
    loss, _ = fl.focal_loss(dev.put(x), dev.put(t), reduction=reduction)
    assert len(launches) == count, launches
    want = fl.focal_loss(x, t, reduction=reduction, backend="cpu").loss
    np.testing.assert_allclose(dev.get(loss), want, rtol=2e-5)


def _huber(r, delta):
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _sigmoid_focal(x, t, alpha, gamma):
    """float64 loss and d loss / dx of torchvision's sigmoid focal loss."""
    x = x.astype(np.float64)
    p = 1 / (1 + np.exp(-x))
    ce = np.logaddexp(0, x) - t * x
    u = p * (1 - t) + (1 - p) * t
    at = alpha * t + (1 - alpha) * (1 - t)
    du = p * (1 - p) * (1 - 2 * t)
    d = (p - t) * u ** gamma + gamma * u ** (gamma - 1) * du * ce
    return at * u ** gamma * ce, at * d


@pytest.mark.parametrize("reduction, count", [("none", 1), ("sum", 2), ("mean", 2)])
def test_elementwise_launches(rng, dev, launches, reduction, count):
    x = rng.normal(size=(6, 9)).astype(np.float32)
    t = (rng.random((6, 9)) > 0.5).astype(np.float32)
    fl.huber_loss(dev.put(x), dev.put(t), reduction=reduction)
    assert len(launches) == count, launches
    del launches[:]
    fl.sigmoid_focal_loss(dev.put(x), dev.put(t), reduction=reduction)
    assert len(launches) == count, launches


def test_elementwise_grid_depends_on_the_size_only(monkeypatch):
    from fastloss.cuda import _blocks, _reduction
    for n in (1, 1000, 10 ** 9):
        first = _reduction.elementwise_grid(n)
        monkeypatch.setattr(_blocks, "sm_count", lambda: 7)
        assert _reduction.elementwise_grid(n) == first
        assert first[0] <= _reduction.ELEMENTWISE_BLOCKS
    assert _reduction.elementwise_grid(10 ** 9)[0] == _reduction.ELEMENTWISE_BLOCKS


@pytest.fixture
def few_blocks(monkeypatch):
    """Two blocks of 8 threads: each thread takes many elements, through the
    unrolled steps and the tail."""
    from fastloss.cuda import _blocks, _reduction
    monkeypatch.setattr(_reduction, "ELEMENTWISE_BLOCKS", 2)
    _blocks.set_threads_per_block(8)


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 2e-6), (np.float16, 2e-3),
                                         (np.float64, 1e-12)])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_huber_with_many_elements_per_thread(rng, dev, few_blocks, dtype, rtol, reduction):
    x = (rng.normal(size=(7, 31)) * 2).astype(dtype)  # 217 elements: 13 or 14 per thread
    t = rng.normal(size=(7, 31)).astype(dtype)
    w = rng.uniform(0.5, 2, size=31).astype(dtype)
    r = x.astype(np.float64) - t.astype(np.float64)
    wl = w.astype(np.float64) * _huber(r, 1.5)
    want = {"none": wl, "sum": wl.sum(), "mean": wl.sum() / (7 * w.astype(np.float64).sum())}
    want_g = w * np.clip(r, -1.5, 1.5) / ((7 * w.astype(np.float64).sum())
                                          if reduction == "mean" else 1)
    xd = dev.put(x)
    loss, g = fl.huber_loss(xd, dev.put(t), delta=1.5, sample_weight=dev.put(w),
                            reduction=reduction, grad_out=xd)  # in place, as allowed
    np.testing.assert_allclose(dev.get(loss).astype(np.float64), want[reduction], rtol=rtol,
                               atol=1e-3 if dtype == np.float16 else 1e-12)
    np.testing.assert_allclose(dev.get(xd).astype(np.float64), want_g, rtol=rtol,
                               atol=1e-3 if dtype == np.float16 else 1e-12)


@pytest.mark.parametrize("gamma", [2.0, 1.5, 0.0])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_sigmoid_focal_with_many_elements_per_thread(rng, dev, few_blocks, gamma, reduction):
    x = (rng.normal(size=(9, 25)) * 3).astype(np.float32)
    t = (rng.random((9, 25)) > 0.7).astype(np.float32)
    loss_e, g_e = _sigmoid_focal(x, t, 0.25, gamma)
    n = x.size
    want = {"none": loss_e, "sum": loss_e.sum(), "mean": loss_e.mean()}[reduction]
    loss, g = fl.sigmoid_focal_loss(dev.put(x), dev.put(t), gamma=gamma, reduction=reduction)
    np.testing.assert_allclose(dev.get(loss), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dev.get(g), g_e / (n if reduction == "mean" else 1), rtol=1e-4,
                               atol=1e-7)


def test_sigmoid_focal_strided_input(rng, dev, few_blocks):
    x = (rng.normal(size=(30, 12)) * 3).astype(np.float32)
    t = (rng.random((30, 12)) > 0.5).astype(np.float32)
    xd = dev.put(x)[:, ::2]  # 2-D strided: element (i // 6, i % 6)
    loss, g = fl.sigmoid_focal_loss(xd, dev.put(t[:, ::2].copy()), reduction="sum")
    loss_e, g_e = _sigmoid_focal(x[:, ::2], t[:, ::2], 0.25, 2.0)
    np.testing.assert_allclose(float(dev.get(loss)), loss_e.sum(), rtol=1e-5)
    np.testing.assert_allclose(dev.get(g), g_e, rtol=1e-4, atol=1e-7)
