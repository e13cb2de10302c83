"""sigmoid_focal_loss on the GPU path: against the float64 reference and the CPU path.

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


def _inputs(rng, shape, dtype=np.float64, *, soft=False, scale=3.0):
    x = (rng.normal(size=shape) * scale).astype(dtype)
    t = rng.uniform(size=shape) if soft else (rng.random(shape) < 0.3)
    return x, t.astype(dtype)


def _host(res, dev):
    return fl.LossGrad(dev.get(res.loss), dev.get(res.grad))


def _gpu_cpu_ref(dev, x, t, **kw):
    """(GPU result on the host, CPU result, float64 reference)."""
    put = dev.put if np.ndim(x) else (lambda a: cuda.to_device(np.asarray(a)))  # keeps 0-d
    res = fl.sigmoid_focal_loss(put(x), put(t), **kw)
    return _host(res, dev), fl.sigmoid_focal_loss(x, t, **kw), naive.sigmoid_focal_loss(x, t, **kw)


def _same_as_cpu(got, cpu, dtype, **scale):
    naive.assert_close(got.loss, cpu.loss, dtype, what="loss, GPU vs CPU", **scale)
    if cpu.grad is not None:
        naive.assert_close(got.grad, cpu.grad, dtype, what="grad, GPU vs CPU")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_reference_and_cpu(rng, dev, dtype, reduction):
    x, t = _inputs(rng, (5, 7), dtype)
    res = fl.sigmoid_focal_loss(dev.put(x), dev.put(t), reduction=reduction)
    # device arrays in, device arrays out
    assert type(res.loss) is not np.ndarray and isinstance(res.grad, type(dev.put(x)))
    assert res.grad.dtype == np.dtype(dtype) and res.grad.shape == x.shape
    got = _host(res, dev)
    check_result(got, *naive.sigmoid_focal_loss(x, t, reduction=reduction), dtype)
    _same_as_cpu(got, fl.sigmoid_focal_loss(x, t, reduction=reduction), dtype)


@pytest.mark.parametrize("alpha, gamma", [(0.25, 0.0), (-1.0, 0.5), (0.9, 2.0), (-1.0, 0.0),
                                          (0.5, 3.5)])
def test_alpha_and_gamma(rng, dev, alpha, gamma):
    x, t = _inputs(rng, (6, 5), soft=True)
    got, cpu, want = _gpu_cpu_ref(dev, x, t, alpha=alpha, gamma=gamma, reduction="none")
    check_result(got, *want, np.float64)
    _same_as_cpu(got, cpu, np.float64)


@pytest.mark.parametrize("kind", [bool, np.int64, np.float64])
def test_target_dtypes_convert_like_the_cpu(rng, dev, kind):
    # bool and 0/1 integer labels; float64 targets with float16 logits (rounded to float16 first)
    x, t = _inputs(rng, (4, 6), np.float16 if kind is np.float64 else np.float32,
                   soft=kind is np.float64)
    t = t.astype(kind)
    got, cpu, _ = _gpu_cpu_ref(dev, x, t, gamma=1.5, reduction="none")
    _same_as_cpu(got, cpu, x.dtype)


@pytest.mark.parametrize("shape", [(), (17,), (2, 3, 4), (3, 1, 5)], ids=str)
def test_any_shape(rng, dev, shape):
    x, t = _inputs(rng, shape)
    for reduction in ("mean", "none"):
        got, cpu, want = _gpu_cpu_ref(dev, x, t, reduction=reduction)
        assert got.grad.shape == shape and np.shape(got.loss) == (shape if reduction == "none" else ())
        check_result(got, *want, np.float64)


def test_many_blocks_and_grid_stride(rng, dev, threads, monkeypatch):
    # more elements than one block holds, and (with 2 blocks at most) several per thread
    from fastloss.cuda import _blocks
    x, t = _inputs(rng, (9, 11), np.float64, soft=True)
    for max_blocks in (_blocks.MAX_BLOCKS, 2):
        monkeypatch.setattr(_blocks, "MAX_BLOCKS", max_blocks)
        got, cpu, want = _gpu_cpu_ref(dev, x, t, reduction="sum")
        check_result(got, *want, np.float64)
        _same_as_cpu(got, cpu, np.float64)


# ------------------------------------------------------ saturated logits


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_saturated_logits_give_finite_gradients(dev, dtype, gamma):
    # torchvision gives NaN gradients here for gamma < 1; the spec asks for finite ones
    x = np.array([1e4, 1e4, -1e4, -1e4, 50.0, -50.0, 100.0, -100.0], dtype=dtype)
    t = np.array([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=dtype)
    for alpha in (0.25, -1.0):
        got, cpu, want = _gpu_cpu_ref(dev, x, t, alpha=alpha, gamma=gamma, reduction="none")
        assert np.all(np.isfinite(got.loss)) and np.all(np.isfinite(got.grad)), got.grad
        check_result(got, *want, dtype, loss_scale=1e4)
        _same_as_cpu(got, cpu, dtype, scale=1e4)


def test_saturated_logits_float16(dev):
    x = np.array([6e4, 6e4, -6e4, -6e4, 20.0, -20.0], dtype=np.float16)
    t = np.array([1, 0, 1, 0, 1, 1], dtype=np.float16)
    got, cpu, want = _gpu_cpu_ref(dev, x, t, gamma=0.5, reduction="none")
    assert np.all(np.isfinite(got.grad))
    check_result(got, *want, np.float16, loss_scale=6e4)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the simulator computes in NumPy scalars
def test_nan_propagates_elementwise(dev):
    x = np.array([0.5, np.nan, -3.0, np.inf])
    t = np.array([1.0, 0.0, 0.0, 1.0])
    got, cpu, _ = _gpu_cpu_ref(dev, x, t, reduction="none")
    np.testing.assert_array_equal(np.isnan(got.loss), np.isnan(cpu.loss))
    np.testing.assert_array_equal(np.isnan(got.grad), np.isnan(cpu.grad))
    assert np.isnan(got.loss[1]) and np.isnan(got.grad[1])
    np.testing.assert_allclose(got.loss[[0, 2]], cpu.loss[[0, 2]], rtol=1e-12)
    np.testing.assert_allclose(got.grad[[0, 2]], cpu.grad[[0, 2]], rtol=1e-12)
    assert np.isnan(float(fl.sigmoid_focal_loss(dev.put(x), dev.put(t)).loss))


# ----------------------------------------------------------- the interface


def test_empty(dev):
    x = np.zeros((0, 4))
    assert np.isnan(float(fl.sigmoid_focal_loss(dev.put(x), dev.put(x)).loss))
    s = _host(fl.sigmoid_focal_loss(dev.put(x), dev.put(x), reduction="sum"), dev)
    assert float(s.loss) == 0.0 and s.grad.shape == (0, 4)
    assert fl.sigmoid_focal_loss(dev.put(x), dev.put(x), reduction="none").loss.shape == (0, 4)


def test_strided_device_views(rng, dev):
    xb, tb = _inputs(rng, (8, 10), np.float32, soft=True)
    x, t = dev.put(xb)[::2, 1::3], dev.put(tb)[1::2, ::4]  # two (4, 3) views
    parent = dev.put(np.full((8, 6), 5.0, np.float32))
    buf = parent[::2, ::2]  # a strided grad_out
    res = fl.sigmoid_focal_loss(x, t, gamma=1.0, grad_out=buf)
    assert res.grad is buf
    want = naive.sigmoid_focal_loss(xb[::2, 1::3], tb[1::2, ::4], gamma=1.0)
    check_result(_host(res, dev), *want, np.float32)
    rest = dev.get(parent)
    rest[::2, ::2] = 5.0
    assert np.all(rest == 5.0)  # nothing written outside the view
    # 1-D strided views
    flat, tflat = dev.put(xb.reshape(-1))[::3], dev.put(tb.reshape(-1))[1::3]
    got = _host(fl.sigmoid_focal_loss(flat, tflat, reduction="none"), dev)
    check_result(got, *naive.sigmoid_focal_loss(xb.reshape(-1)[::3], tb.reshape(-1)[1::3],
                                                reduction="none"), np.float32)


def test_grad_out_device_buffer_and_in_place(rng, dev):
    x, t = _inputs(rng, (6, 4), np.float32)
    want = naive.sigmoid_focal_loss(x, t, gamma=1.0)
    buf = dev.put(np.full_like(x, np.inf))
    res = fl.sigmoid_focal_loss(dev.put(x), dev.put(t), gamma=1.0, grad_out=buf)
    assert res.grad is buf
    check_result(_host(res, dev), *want, np.float32)
    d_x = dev.put(x)
    res = fl.sigmoid_focal_loss(d_x, dev.put(t), gamma=1.0, grad_out=d_x)
    assert res.grad is d_x
    check_result(fl.LossGrad(dev.get(res.loss), dev.get(d_x)), *want, np.float32)


def test_grad_false_returns_no_gradient(rng, dev):
    x, t = _inputs(rng, (6, 4), np.float32)
    res = fl.sigmoid_focal_loss(dev.put(x), dev.put(t), grad=False)
    assert res.grad is None
    check_result(fl.LossGrad(dev.get(res.loss), None), naive.sigmoid_focal_loss(x, t)[0], None,
                 np.float32)


def test_backend_cuda_with_numpy_returns_numpy(rng):
    x, t = _inputs(rng, (5, 3))
    want = naive.sigmoid_focal_loss(x, t)
    res = fl.sigmoid_focal_loss(x, t, backend="cuda")
    assert type(res.loss) is np.ndarray and type(res.grad) is np.ndarray
    check_result(res, *want, np.float64)
    out = np.zeros_like(x)
    res = fl.sigmoid_focal_loss(x, t, backend="cuda", grad_out=out)
    assert res.grad is out
    check_result(res, *want, np.float64)


def test_scalar_loss_converts_with_float(rng, dev):
    x, t = _inputs(rng, (3, 4), np.float32)
    loss = fl.sigmoid_focal_loss(dev.put(x), dev.put(t)).loss
    assert loss.shape == () and abs(float(loss) - float(naive.sigmoid_focal_loss(x, t)[0])) < 1e-5


def test_device_arrays_are_never_copied_to_or_from_the_host(rng, dev, monkeypatch):
    x, t = _inputs(rng, (4, 5), np.float32)
    args = (dev.put(x), dev.put(t))
    buf = dev.put(np.zeros_like(x))
    calls = []
    monkeypatch.setattr(type(args[0]), "copy_to_host", lambda *a, **k: calls.append("copy_to_host"))
    monkeypatch.setattr(cuda, "to_device", lambda *a, **k: calls.append("to_device"))
    res = fl.sigmoid_focal_loss(*args, grad_out=buf, gamma=0.5)
    assert calls == []
    monkeypatch.undo()
    check_result(_host(res, dev), *naive.sigmoid_focal_loss(x, t, gamma=0.5), np.float32)


def test_strided_arrays_of_more_than_two_dimensions_are_refused(rng, dev):
    x = dev.put(rng.normal(size=(3, 2, 4)))[:, :, ::2]
    with pytest.raises(ValueError, match="logits of shape"):
        fl.sigmoid_focal_loss(x, dev.put(np.zeros((3, 2, 2))))


@pytest.mark.parametrize("case, error, match", [
    ("targets of the wrong shape", ValueError, "targets must have shape"),
    ("string targets", TypeError, "targets must be float"),
    ("int logits", TypeError, "logits must have dtype"),
    ("negative gamma", ValueError, "gamma must be >= 0"),
    ("grad_out of the wrong shape", ValueError, "grad_out must have shape"),
    ("grad_out of the wrong dtype", TypeError, "grad_out must have dtype"),
    ("grad_out on the host", TypeError, "grad_out is on cpu"),
    ("targets on the host", TypeError, "targets is on cpu"),
    ("bad reduction", ValueError, "reduction must be one of"),
])
def test_bad_input_raises_before_any_kernel_and_changes_nothing(dev, case, error, match):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    d_x = dev.put(x)
    args, kw = [d_x, dev.put(np.zeros((3, 4), np.float32))], {"grad_out": d_x}
    if case == "targets of the wrong shape":
        args[1] = dev.put(np.zeros((4, 3), np.float32))
    elif case == "string targets":
        args[1] = cuda.to_device(np.zeros((3, 4), "S1"))
    elif case == "int logits":
        args[0] = dev.put(np.zeros((3, 4), np.int32))
        del kw["grad_out"]
    elif case == "negative gamma":
        kw["gamma"] = -1.0
    elif case == "grad_out of the wrong shape":
        kw["grad_out"] = dev.put(np.zeros((4, 3), np.float32))
    elif case == "grad_out of the wrong dtype":
        kw["grad_out"] = dev.put(np.zeros((3, 4), np.float64))
    elif case == "grad_out on the host":
        kw["grad_out"] = np.zeros((3, 4), np.float32)
    elif case == "targets on the host":
        args[1] = np.zeros((3, 4), np.float32)
    elif case == "bad reduction":
        kw["reduction"] = "mean_sum"
    with pytest.raises(error, match=match):
        fl.sigmoid_focal_loss(*args, **kw)
    np.testing.assert_array_equal(dev.get(d_x), x)
