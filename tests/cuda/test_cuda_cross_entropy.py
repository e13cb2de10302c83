"""softmax_cross_entropy on the GPU path: against the float64 reference and the CPU path.

Runs under the CUDA simulator in CI (tiny shapes) and for real on a GPU.
"""
import numpy as np
import pytest
from numba import cuda

import fastloss as fl
import naive
from naive import check_result

DTYPES = [np.float16, np.float32, np.float64]
REDUCTIONS = ["mean", "sum", "none"]
OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "sample_weight": {"sample_weight": True},
    "smoothing": {"label_smoothing": 0.2},
    "smoothing+weight": {"label_smoothing": 0.1, "weight": True},
    "z_loss+softcap": {"z_loss": 1e-2, "softcap": 4.0},
    "everything": {"weight": True, "sample_weight": True, "label_smoothing": 0.1, "z_loss": 1e-3,
                   "softcap": 5.0},
}


def _inputs(rng, batch, C, dtype, options, *, prob=False, ignore=True):
    x = (rng.normal(size=batch + (C,)) * 3).astype(dtype)
    if prob:
        t = rng.dirichlet(np.ones(C), size=batch).astype(dtype)
    else:
        t = rng.integers(0, C, size=batch)
        if ignore:
            t.reshape(-1)[::4] = -100
    kw = {k: v for k, v in options.items() if k not in ("weight", "sample_weight")}
    if options.get("weight"):
        kw["weight"] = rng.uniform(0.2, 2.0, size=C).astype(dtype)
    if options.get("sample_weight"):
        kw["sample_weight"] = rng.uniform(0.0, 2.0, size=batch).astype(dtype)
    return x, t, kw


def _on_device(dev, kw):
    return {k: dev.put(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}


def _host(res, dev):
    return fl.LossGrad(dev.get(res.loss), dev.get(res.grad))


# every option x reduction in float32; every dtype x reduction with no option and all of them
CASES = ([(np.float32, r, o) for r in REDUCTIONS for o in sorted(OPTIONS)]
         + [(d, r, o) for d in (np.float16, np.float64) for r in REDUCTIONS
            for o in ("plain", "everything")])


@pytest.mark.parametrize("dtype, reduction, option", CASES)
def test_integer_targets_match_reference_and_cpu(rng, dev, dtype, reduction, option):
    x, t, kw = _inputs(rng, (6,), 7, dtype, OPTIONS[option])
    res = fl.softmax_cross_entropy(dev.put(x), dev.put(t), reduction=reduction, **_on_device(dev, kw))
    assert isinstance(res.loss, type(dev.put(x))) and isinstance(res.grad, type(dev.put(x)))
    got = _host(res, dev)
    check_result(got, *naive.softmax_cross_entropy(x, t, reduction=reduction, **kw), dtype)
    cpu = fl.softmax_cross_entropy(x, t, reduction=reduction, **kw)
    naive.assert_close(got.grad, cpu.grad, dtype, what="grad, GPU vs CPU")
    naive.assert_close(got.loss, cpu.loss, dtype, what="loss, GPU vs CPU")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "everything"])
def test_probability_targets_match_reference(rng, dev, dtype, reduction, option):
    x, t, kw = _inputs(rng, (5,), 6, dtype, OPTIONS[option], prob=True)
    res = fl.softmax_cross_entropy(dev.put(x), dev.put(t), reduction=reduction, **_on_device(dev, kw))
    check_result(_host(res, dev), *naive.softmax_cross_entropy(x, t, reduction=reduction, **kw), dtype)


def test_batch_dimensions_and_wide_rows(rng, dev):
    # rows wider than the block (several chunks per thread) and a (2, 3) batch
    x, t, kw = _inputs(rng, (2, 3), 45, np.float32, OPTIONS["everything"])
    res = fl.softmax_cross_entropy(dev.put(x), dev.put(t), **_on_device(dev, kw))
    assert res.grad.shape == x.shape
    check_result(_host(res, dev), *naive.softmax_cross_entropy(x, t, **kw), np.float32)


def test_block_size_does_not_change_the_answer(rng, dev, threads):
    x, t, kw = _inputs(rng, (4,), 37, np.float64, OPTIONS["everything"])
    res = _host(fl.softmax_cross_entropy(dev.put(x), dev.put(t), **_on_device(dev, kw)), dev)
    check_result(res, *naive.softmax_cross_entropy(x, t, **kw), np.float64)


def test_persistent_blocks_loop_over_rows(rng, dev, monkeypatch):
    # two blocks for seven rows: each block runs the row loop several times
    from fastloss.cuda import _rows
    monkeypatch.setattr(_rows, "row_grid", lambda n, threads: 2)
    for prob in (False, True):
        x, t, kw = _inputs(rng, (7,), 70, np.float32, OPTIONS["everything"], prob=prob)
        res = fl.softmax_cross_entropy(dev.put(x), dev.put(t), **_on_device(dev, kw))
        check_result(_host(res, dev), *naive.softmax_cross_entropy(x, t, **kw), np.float32)


def test_one_class_and_more_threads_than_classes(dev):
    x = np.array([[3.0], [-2.0]], np.float32)
    res = _host(fl.softmax_cross_entropy(dev.put(x), dev.put(np.array([0, 0]))), dev)
    assert float(res.loss) == 0.0 and not res.grad.any()


def test_extreme_logits_stay_finite_and_precise(dev):
    x = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [30.0, 0.0, -5.0]], np.float32)
    t = np.array([0, 0, 0])
    got = _host(fl.softmax_cross_entropy(dev.put(x), dev.put(t), reduction="none"), dev)
    want_loss, want_grad = naive.softmax_cross_entropy(x, t, reduction="none")
    assert np.all(np.isfinite(got.loss)) and np.all(np.isfinite(got.grad))
    # p_y -> 1: -log p_y ~ exp(-30) keeps its digits (log1p of the rest), more
    # of them than the reference's float64 lse - z_y, hence the exact form here
    np.testing.assert_allclose(got.loss[2], np.log1p(np.exp(-30.0) + np.exp(-35.0)), rtol=1e-5)
    np.testing.assert_allclose(got.loss[:2], want_loss[:2], rtol=1e-6)
    np.testing.assert_allclose(got.grad, want_grad, atol=1e-6)


def test_nan_and_inf_propagate_to_their_row(dev):
    x = np.array([[np.nan, 0.0, 1.0], [0.0, 1.0, 2.0], [-np.inf, 0.0, 1.0]], np.float32)
    got = _host(fl.softmax_cross_entropy(dev.put(x), dev.put(np.array([1, 2, 1])),
                                         reduction="none"), dev)
    cpu = fl.softmax_cross_entropy(x, np.array([1, 2, 1]), reduction="none")
    np.testing.assert_array_equal(np.isnan(got.loss), np.isnan(cpu.loss))
    np.testing.assert_array_equal(np.isnan(got.grad), np.isnan(cpu.grad))
    assert np.isnan(got.loss[0]) and np.isfinite(got.loss[1:]).all()
    np.testing.assert_allclose(got.grad[1:], cpu.grad[1:], atol=1e-6)


@pytest.mark.parametrize("reduction, want", [("mean", np.nan), ("sum", 0.0)])
def test_empty_and_fully_ignored_batches(dev, reduction, want):
    for x, t in ((np.zeros((0, 3), np.float32), np.zeros(0, np.int64)),
                 (np.ones((2, 3), np.float32), np.array([-100, -100]))):
        res = _host(fl.softmax_cross_entropy(dev.put(x), dev.put(t), reduction=reduction), dev)
        np.testing.assert_equal(float(res.loss), want)
        assert res.grad.shape == x.shape and not res.grad.any()


def test_strided_device_views(rng, dev):
    big = rng.normal(size=(8, 10)).astype(np.float32)
    t = rng.integers(0, 5, size=4)
    view = dev.put(big)[::2, 1:10:2]  # every other row, every other column
    got = _host(fl.softmax_cross_entropy(view, dev.put(t), reduction="sum"), dev)
    check_result(got, *naive.softmax_cross_entropy(big[::2, 1:10:2], t, reduction="sum"), np.float32)


def test_grad_out_device_buffer_and_in_place(rng, dev):
    x, t, kw = _inputs(rng, (5,), 6, np.float32, OPTIONS["everything"])
    want = naive.softmax_cross_entropy(x, t, **kw)
    buf = dev.put(np.full_like(x, 7.0))
    res = fl.softmax_cross_entropy(dev.put(x), dev.put(t), grad_out=buf, **_on_device(dev, kw))
    assert res.grad is buf
    check_result(_host(res, dev), *want, np.float32)
    d_x = dev.put(x)
    res = fl.softmax_cross_entropy(d_x, dev.put(t), grad_out=d_x, **_on_device(dev, kw))
    assert res.grad is d_x
    check_result(fl.LossGrad(dev.get(res.loss), dev.get(d_x)), *want, np.float32)


def test_grad_false_returns_no_gradient(rng, dev):
    x, t, _ = _inputs(rng, (4,), 5, np.float32, {})
    res = fl.softmax_cross_entropy(dev.put(x), dev.put(t), grad=False)
    assert res.grad is None
    check_result(fl.LossGrad(dev.get(res.loss), None),
                 naive.softmax_cross_entropy(x, t)[0], None, np.float32)


def test_backend_cuda_with_numpy_returns_numpy(rng):
    x, t, kw = _inputs(rng, (4,), 5, np.float64, OPTIONS["weight"])
    host_buf = np.empty_like(x)
    res = fl.softmax_cross_entropy(x, t, backend="cuda", grad_out=host_buf, **kw)
    assert type(res.loss) is np.ndarray and res.grad is host_buf
    check_result(res, *naive.softmax_cross_entropy(x, t, **kw), np.float64)


def test_scalar_loss_converts_with_float(rng, dev):
    x, t, _ = _inputs(rng, (3,), 4, np.float32, {})
    loss = fl.softmax_cross_entropy(dev.put(x), dev.put(t)).loss
    assert loss.shape == () and abs(float(loss) - float(naive.softmax_cross_entropy(x, t)[0])) < 1e-5


def test_device_arrays_are_never_copied_to_or_from_the_host(rng, dev, monkeypatch):
    x, t, kw = _inputs(rng, (4,), 5, np.float32, OPTIONS["everything"])
    args = (dev.put(x), dev.put(t))
    dkw = _on_device(dev, kw)
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
    check_result(_host(res, dev), *naive.softmax_cross_entropy(x, t, **kw), np.float32)


@pytest.mark.parametrize("case, error, match", [
    ("label out of range", ValueError, r"target\[2\] = 5 is out of range"),
    ("negative label", ValueError, r"target\[0\] = -1 is out of range"),
    ("float labels of the wrong shape", ValueError, "target must have shape"),
    ("int logits", TypeError, "logits must have dtype"),
    ("weight of the wrong length", ValueError, "weight must have shape"),
    ("grad_out of the wrong dtype", TypeError, "grad_out must have dtype"),
    ("grad_out on the host", TypeError, "grad_out is on cpu"),
    ("target on the host", TypeError, "target is on cpu"),
    ("negative softcap", ValueError, "softcap must be > 0"),
])
def test_bad_input_raises_before_any_kernel(dev, case, error, match):
    x = np.zeros((3, 5), np.float32)
    t = np.array([0, 1, 2])
    args, kw = [dev.put(x), dev.put(t)], {}
    if case == "label out of range":
        args[1] = dev.put(np.array([0, 1, 5]))
    elif case == "negative label":
        args[1] = dev.put(np.array([-1, 1, 2], np.int32))
    elif case == "float labels of the wrong shape":
        args[1] = dev.put(np.zeros((3, 4), np.float32))
    elif case == "int logits":
        args[0] = dev.put(np.zeros((3, 5), np.int32))
    elif case == "weight of the wrong length":
        kw["weight"] = dev.put(np.ones(4, np.float32))
    elif case == "grad_out of the wrong dtype":
        kw["grad_out"] = dev.put(np.zeros((3, 5), np.float64))
    elif case == "grad_out on the host":
        kw["grad_out"] = np.zeros((3, 5), np.float32)
    elif case == "target on the host":
        args[1] = t
    elif case == "negative softcap":
        kw["softcap"] = -1.0
    with pytest.raises(error, match=match):
        fl.softmax_cross_entropy(*args, **kw)
