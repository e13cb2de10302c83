"""focal_loss on the GPU path: against the float64 reference and the CPU path.

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


def _inputs(rng, batch, C, dtype, *, prob=False, ignore=True, alpha="array", sample_weight=True):
    x = (rng.normal(size=batch + (C,)) * 3).astype(dtype)
    if prob:
        t = rng.dirichlet(np.ones(C), size=batch).astype(dtype)
    else:
        t = rng.integers(0, C, size=batch)
        if ignore:
            t.reshape(-1)[1::4] = -100
    kw = {}
    if alpha == "array":
        kw["alpha"] = rng.uniform(0.1, 1.0, size=C).astype(dtype)
    elif alpha == "scalar":
        kw["alpha"] = 0.25
    if sample_weight:
        kw["sample_weight"] = rng.uniform(0.0, 2.0, size=batch).astype(dtype)
    return x, t, kw


def _on_device(dev, kw):
    return {k: dev.put(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}


def _host(res, dev):
    return fl.LossGrad(dev.get(res.loss), dev.get(res.grad))


def _gpu_cpu_ref(dev, x, t, **kw):
    """(GPU result on the host, CPU result, float64 reference)."""
    res = fl.focal_loss(dev.put(x), dev.put(t), **_on_device(dev, kw))
    return _host(res, dev), fl.focal_loss(x, t, **kw), naive.focal_loss(x, t, **kw)


def _same_as_cpu(got, cpu, dtype):
    naive.assert_close(got.loss, cpu.loss, dtype, what="loss, GPU vs CPU")
    if cpu.grad is not None:
        naive.assert_close(got.grad, cpu.grad, dtype, what="grad, GPU vs CPU")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_integer_targets_match_reference_and_cpu(rng, dev, dtype, reduction):
    x, t, kw = _inputs(rng, (6,), 7, dtype)
    res = fl.focal_loss(dev.put(x), dev.put(t), gamma=0.5, reduction=reduction,
                        **_on_device(dev, kw))
    # device arrays in, device arrays out
    assert type(res.loss) is not np.ndarray and isinstance(res.grad, type(dev.put(x)))
    assert res.grad.dtype == np.dtype(dtype) and res.grad.shape == x.shape
    got = _host(res, dev)
    check_result(got, *naive.focal_loss(x, t, gamma=0.5, reduction=reduction, **kw), dtype)
    _same_as_cpu(got, fl.focal_loss(x, t, gamma=0.5, reduction=reduction, **kw), dtype)


@pytest.mark.parametrize("alpha", ["none", "scalar", "array"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.7])
def test_alpha_and_gamma(rng, dev, alpha, gamma):
    x, t, kw = _inputs(rng, (5,), 6, np.float64, alpha=alpha, sample_weight=(alpha != "none"))
    got, cpu, want = _gpu_cpu_ref(dev, x, t, gamma=gamma, **kw)
    check_result(got, *want, np.float64)
    _same_as_cpu(got, cpu, np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_probability_targets_match_reference_and_cpu(rng, dev, dtype, reduction):
    x, t, kw = _inputs(rng, (5,), 6, dtype, prob=True)
    got, cpu, want = _gpu_cpu_ref(dev, x, t, gamma=2.0, reduction=reduction, **kw)
    check_result(got, *want, dtype)
    _same_as_cpu(got, cpu, dtype)


def test_probability_targets_of_another_dtype_round_like_the_cpu(rng, dev):
    # float64 probabilities with float16 logits: both paths round them to float16 first
    x, t, kw = _inputs(rng, (4,), 5, np.float16, prob=True, alpha="none", sample_weight=False)
    t = rng.dirichlet(np.ones(5), size=4)
    got, cpu, _ = _gpu_cpu_ref(dev, x, t, gamma=0.5, reduction="none")
    np.testing.assert_allclose(got.loss.astype(float), cpu.loss.astype(float), rtol=2e-3)
    np.testing.assert_allclose(got.grad.astype(float), cpu.grad.astype(float), rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("prob", [False, True])
def test_gamma_zero_equals_cross_entropy_on_the_gpu(rng, dev, prob):
    x, t, kw = _inputs(rng, (5,), 6, np.float64, prob=prob, alpha="none")
    a = _host(fl.focal_loss(dev.put(x), dev.put(t), gamma=0.0, **_on_device(dev, kw)), dev)
    b = _host(fl.softmax_cross_entropy(dev.put(x), dev.put(t), **_on_device(dev, kw)), dev)
    np.testing.assert_allclose(float(a.loss), float(b.loss), rtol=1e-12)
    np.testing.assert_allclose(a.grad, b.grad, rtol=1e-10, atol=1e-14)


def test_batch_dimensions_wide_rows_and_one_class(rng, dev):
    # rows wider than the block (groups of UNROLL loads, then the rest) and a (2, 3) batch
    x, t, kw = _inputs(rng, (2, 3), 100, np.float32)
    got, cpu, want = _gpu_cpu_ref(dev, x, t, gamma=1.5, reduction="none", **kw)
    assert got.loss.shape == (2, 3) and got.grad.shape == x.shape
    check_result(got, *want, np.float32)
    _same_as_cpu(got, cpu, np.float32)
    x1 = np.array([[3.0], [-2.0]], np.float32)
    got = _host(fl.focal_loss(dev.put(x1), dev.put(np.array([0, 0])), alpha=0.3), dev)
    assert float(got.loss) == 0.0 and not got.grad.any()


@pytest.mark.parametrize("prob", [False, True])
def test_block_size_does_not_change_the_answer(rng, dev, threads, prob):
    x, t, kw = _inputs(rng, (3,), 37, np.float64, prob=prob)
    got, cpu, want = _gpu_cpu_ref(dev, x, t, gamma=0.7, **kw)
    check_result(got, *want, np.float64)
    _same_as_cpu(got, cpu, np.float64)


@pytest.mark.parametrize("prob", [False, True])
def test_blocks_loop_over_several_rows(rng, dev, monkeypatch, prob):
    # two persistent blocks for nine rows (ignored ones among them), wide enough to unroll
    from fastloss.cuda import _blocks
    monkeypatch.setattr(_blocks, "SM_THREADS", 1)
    x, t, kw = _inputs(rng, (9,), 70, np.float64, prob=prob)
    d_x = dev.put(x)
    res = fl.focal_loss(d_x, dev.put(t), gamma=0.5, grad_out=d_x, **_on_device(dev, kw))
    got = fl.LossGrad(dev.get(res.loss), dev.get(d_x))
    check_result(got, *naive.focal_loss(x, t, gamma=0.5, **kw), np.float64)


# ----------------------------------------------------- saturated logits


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [0.25, 0.5, 2.0])
def test_saturated_logits_give_finite_gradients(rng, dev, dtype, gamma):
    # p_y == 1 exactly: (1 - p)**(gamma - 1) is infinite for gamma < 1, the gradient is not
    C = 4
    big = 1e4 if dtype != np.float16 else 6e4
    x = np.zeros((6, C), dtype)
    t = np.array([0, 1, 2, 3, 0, 1])
    x[np.arange(6), t] = big  # confident and right
    x[4] = 0
    x[4, 2] = big  # confident and wrong
    x[5] = rng.normal(size=C)
    x[3, 0] = -big
    got, cpu, want = _gpu_cpu_ref(dev, x, t, gamma=gamma, reduction="none")
    assert np.all(np.isfinite(got.grad)) and np.all(np.isfinite(got.loss[[0, 1, 2, 3, 5]]))
    check_result(got, *want, dtype, loss_scale=float(big))
    np.testing.assert_array_equal(np.isfinite(got.loss), np.isfinite(cpu.loss))
    naive.assert_close(got.grad, cpu.grad, dtype, what="grad, GPU vs CPU")


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_saturated_probability_targets(dev, gamma):
    x = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [30.0, 0.0, -5.0]])
    t = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.7, 0.3, 0.0]])
    got, cpu, want = _gpu_cpu_ref(dev, x, t, gamma=gamma, reduction="none")
    assert np.all(np.isfinite(got.grad)) and np.all(np.isfinite(got.loss))
    check_result(got, *want, np.float64, loss_scale=1e4)
    _same_as_cpu(got, cpu, np.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_nearly_saturated_logits_keep_relative_precision(dev, dtype):
    # 1 - p_y from 1e-3 down to 1e-30: tiny losses and gradients keep their digits
    margins = [7.0, 15.0, 30.0, 50.0, 70.0] if dtype == np.float64 else [7.0, 12.0, 15.0, 20.0]
    x = np.zeros((len(margins), 3), dtype)
    x[:, 0] = margins
    t = np.zeros(len(margins), dtype=int)
    got, _, (loss, grad) = _gpu_cpu_ref(dev, x, t, gamma=0.3, reduction="none")
    rtol = 1e-9 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(got.loss, loss, rtol=rtol, atol=0)
    np.testing.assert_allclose(got.grad, grad, rtol=rtol, atol=0)


def test_minus_inf_where_probability_target_is_zero(rng, dev):
    x = rng.normal(size=(4, 4))
    t = rng.dirichlet(np.ones(4), size=4)
    x[:, 3] = -np.inf
    t[:, 3] = 0.0
    t /= t.sum(axis=1, keepdims=True)
    got, cpu, want = _gpu_cpu_ref(dev, x, t, gamma=0.5)
    assert np.isfinite(float(got.loss)) and np.all(np.isfinite(got.grad))
    check_result(got, *want, np.float64)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the simulator computes in NumPy scalars
@pytest.mark.parametrize("prob", [False, True])
def test_nan_and_inf_propagate_to_their_row(dev, prob):
    x = np.array([[0.5, np.nan, 1.0], [0.0, 1.0, 2.0], [np.inf, 0.0, 1.0]], np.float32)
    t = (np.array([[0.2, 0.3, 0.5]] * 3, np.float32) if prob else np.array([0, 2, 1]))
    got, cpu, _ = _gpu_cpu_ref(dev, x, t, gamma=2.0, reduction="none")
    np.testing.assert_array_equal(np.isnan(got.loss), np.isnan(cpu.loss))
    np.testing.assert_array_equal(np.isnan(got.grad), np.isnan(cpu.grad))
    assert np.isnan(got.loss[0]) and np.all(np.isnan(got.grad[0]))
    naive.assert_close(got.loss[1], cpu.loss[1], np.float32)
    naive.assert_close(got.grad[1], cpu.grad[1], np.float32)


# ----------------------------------------------------------- the interface


@pytest.mark.parametrize("reduction, want", [("mean", np.nan), ("sum", 0.0)])
def test_empty_and_fully_ignored_batches(dev, reduction, want):
    for x, t in ((np.zeros((0, 3), np.float32), np.zeros(0, np.int64)),
                 (np.ones((2, 3), np.float32), np.array([-100, -100]))):
        got = _host(fl.focal_loss(dev.put(x), dev.put(t), reduction=reduction), dev)
        np.testing.assert_equal(float(got.loss), want)
        assert got.grad.shape == x.shape and not got.grad.any()
    none = fl.focal_loss(dev.put(np.zeros((0, 3))), dev.put(np.zeros(0, np.int64)), reduction="none")
    assert none.loss.shape == (0,)


def test_strided_device_views(rng, dev):
    big = (rng.normal(size=(8, 10)) * 2).astype(np.float32)
    labels = rng.integers(0, 5, size=8)
    sw = rng.uniform(size=12).astype(np.float32)
    alpha = rng.uniform(0.1, 1, size=10).astype(np.float32)
    kw = dict(gamma=0.5, reduction="sum")
    res = fl.focal_loss(dev.put(big)[::2, 1:10:2], dev.put(labels)[::2],
                        sample_weight=dev.put(sw)[::3], alpha=dev.put(alpha)[::2], **kw)
    host = dict(sample_weight=sw[::3], alpha=alpha[::2], **kw)
    got = _host(res, dev)
    check_result(got, *naive.focal_loss(big[::2, 1:10:2], labels[::2], **host), np.float32)
    _same_as_cpu(got, fl.focal_loss(big[::2, 1:10:2], labels[::2], **host), np.float32)
    probs = rng.dirichlet(np.ones(5), size=8).astype(np.float32)
    got = _host(fl.focal_loss(dev.put(big)[1::2, ::2], dev.put(probs)[::2], gamma=2.0), dev)
    check_result(got, *naive.focal_loss(big[1::2, ::2], probs[::2], gamma=2.0), np.float32)


def test_strided_batch_of_more_than_two_dimensions_is_refused(rng, dev):
    x = dev.put(rng.normal(size=(3, 2, 4)))[:, :, ::2]
    with pytest.raises(ValueError, match="logits of shape"):
        fl.focal_loss(x.T, dev.put(np.zeros((2, 2), np.int64)))


@pytest.mark.parametrize("prob", [False, True])
def test_grad_out_device_buffer_and_in_place(rng, dev, prob):
    x, t, kw = _inputs(rng, (5,), 6, np.float32, prob=prob)
    want = naive.focal_loss(x, t, gamma=1.5, **kw)
    buf = dev.put(np.full_like(x, 7.0))
    res = fl.focal_loss(dev.put(x), dev.put(t), gamma=1.5, grad_out=buf, **_on_device(dev, kw))
    assert res.grad is buf
    check_result(_host(res, dev), *want, np.float32)
    d_x = dev.put(x)
    res = fl.focal_loss(d_x, dev.put(t), gamma=1.5, grad_out=d_x, **_on_device(dev, kw))
    assert res.grad is d_x
    check_result(fl.LossGrad(dev.get(res.loss), dev.get(d_x)), *want, np.float32)


def test_grad_false_returns_no_gradient(rng, dev):
    x, t, kw = _inputs(rng, (4,), 5, np.float32)
    res = fl.focal_loss(dev.put(x), dev.put(t), grad=False, **_on_device(dev, kw))
    assert res.grad is None
    check_result(fl.LossGrad(dev.get(res.loss), None), naive.focal_loss(x, t, **kw)[0], None,
                 np.float32)


def test_backend_cuda_with_numpy_returns_numpy(rng):
    x, t, kw = _inputs(rng, (4,), 5, np.float64)
    want = naive.focal_loss(x, t, gamma=2.0, **kw)
    res = fl.focal_loss(x, t, gamma=2.0, backend="cuda", **kw)
    assert type(res.loss) is np.ndarray and type(res.grad) is np.ndarray
    check_result(res, *want, np.float64)
    x_copy = x.copy()
    res = fl.focal_loss(x_copy, t, gamma=2.0, backend="cuda", grad_out=x_copy, **kw)
    assert res.grad is x_copy
    check_result(res, *want, np.float64)


@pytest.mark.parametrize("alpha", [np.float32(0.25), np.array(0.25), "device 0-d"])
def test_scalar_alpha_kinds_with_device_logits(rng, dev, alpha):
    x, t, _ = _inputs(rng, (4,), 5, np.float32, alpha="none", sample_weight=False)
    if isinstance(alpha, str):
        alpha = cuda.to_device(np.array(0.25, np.float32))  # its value is read back
    got = _host(fl.focal_loss(dev.put(x), dev.put(t), alpha=alpha), dev)
    check_result(got, *naive.focal_loss(x, t, alpha=0.25), np.float32)


def test_scalar_loss_converts_with_float(rng, dev):
    x, t, _ = _inputs(rng, (3,), 4, np.float32, sample_weight=False, alpha="none")
    loss = fl.focal_loss(dev.put(x), dev.put(t)).loss
    assert loss.shape == () and abs(float(loss) - float(naive.focal_loss(x, t)[0])) < 1e-5


def test_device_arrays_are_never_copied_to_or_from_the_host(rng, dev, monkeypatch):
    # probability targets: integer labels are range-checked by a kernel that sends back an index
    x, t, kw = _inputs(rng, (4,), 5, np.float32, prob=True)
    args = (dev.put(x), dev.put(t))
    dkw = _on_device(dev, kw)
    buf = dev.put(np.zeros_like(x))
    calls = []
    monkeypatch.setattr(type(args[0]), "copy_to_host", lambda *a, **k: calls.append("copy_to_host"))
    monkeypatch.setattr(cuda, "to_device", lambda *a, **k: calls.append("to_device"))
    res = fl.focal_loss(*args, grad_out=buf, gamma=0.5, **dkw)
    assert calls == []
    monkeypatch.undo()
    check_result(_host(res, dev), *naive.focal_loss(x, t, gamma=0.5, **kw), np.float32)


@pytest.mark.parametrize("case, error, match", [
    ("label out of range", ValueError, r"target\[2\] = 5 is out of range"),
    ("negative label", ValueError, r"target\[0\] = -1 is out of range"),
    ("probabilities of the wrong shape", ValueError, "target must have shape"),
    ("int logits", TypeError, "logits must have dtype"),
    ("alpha of the wrong length", ValueError, "alpha must have shape"),
    ("alpha on the host", TypeError, "alpha is on cpu"),
    ("negative gamma", ValueError, "gamma must be >= 0"),
    ("sample_weight of the wrong shape", ValueError, "sample_weight must have shape"),
    ("grad_out of the wrong dtype", TypeError, "grad_out must have dtype"),
    ("grad_out on the host", TypeError, "grad_out is on cpu"),
    ("bad reduction", ValueError, "reduction must be one of"),
])
def test_bad_input_raises_before_any_kernel_and_changes_nothing(dev, case, error, match):
    x = np.arange(15, dtype=np.float32).reshape(3, 5)
    t = np.array([0, 1, 2])
    d_x = dev.put(x)
    args, kw = [d_x, dev.put(t)], {"grad_out": d_x}
    if case == "label out of range":
        args[1] = dev.put(np.array([0, 1, 5]))
    elif case == "negative label":
        args[1] = dev.put(np.array([-1, 1, 2], np.int32))
    elif case == "probabilities of the wrong shape":
        args[1] = dev.put(np.zeros((3, 4), np.float32))
    elif case == "int logits":
        args[0] = dev.put(np.zeros((3, 5), np.int32))
        del kw["grad_out"]
    elif case == "alpha of the wrong length":
        kw["alpha"] = dev.put(np.ones(4, np.float32))
    elif case == "alpha on the host":
        kw["alpha"] = np.ones(5, np.float32)
    elif case == "negative gamma":
        kw["gamma"] = -0.5
    elif case == "sample_weight of the wrong shape":
        kw["sample_weight"] = dev.put(np.ones(2, np.float32))
    elif case == "grad_out of the wrong dtype":
        kw["grad_out"] = dev.put(np.zeros((3, 5), np.float64))
    elif case == "grad_out on the host":
        kw["grad_out"] = np.zeros((3, 5), np.float32)
    elif case == "bad reduction":
        kw["reduction"] = "average"
    with pytest.raises(error, match=match):
        fl.focal_loss(*args, **kw)
    np.testing.assert_array_equal(dev.get(d_x), x)
