"""huber_loss on the GPU path: against the float64 reference and the CPU path.

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


def _inputs(rng, shape, dtype=np.float64, scale=2.0):
    x = np.asarray(rng.normal(size=shape) * scale).astype(dtype)
    t = np.asarray(rng.normal(size=shape) * scale).astype(dtype)
    return x, t


def _put(dev, a):
    """To the device, 0-d arrays staying 0-d (``dev.put`` makes them 1-d)."""
    return None if a is None else (dev.put(a) if np.ndim(a) else cuda.to_device(np.asarray(a)))


def _host(res, dev):
    return fl.LossGrad(dev.get(res.loss), dev.get(res.grad))


def _gpu_cpu_ref(dev, x, t, sample_weight=None, **kw):
    """(GPU result on the host, CPU result, float64 reference)."""
    res = fl.huber_loss(_put(dev, x), _put(dev, t), sample_weight=_put(dev, sample_weight), **kw)
    return (_host(res, dev), fl.huber_loss(x, t, sample_weight=sample_weight, **kw),
            naive.huber_loss(x, t, sample_weight=sample_weight, **kw))


def _same_as_cpu(got, cpu, dtype):
    naive.assert_close(got.loss, cpu.loss, dtype, what="loss, GPU vs CPU")
    if cpu.grad is not None:
        naive.assert_close(got.grad, cpu.grad, dtype, what="grad, GPU vs CPU")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_reference_and_cpu(rng, dev, dtype, reduction):
    x, t = _inputs(rng, (6, 5), dtype)
    sw = rng.uniform(0.0, 2.0, size=(6, 1)).astype(dtype)
    res = fl.huber_loss(dev.put(x), dev.put(t), delta=1.5, sample_weight=dev.put(sw),
                        reduction=reduction)
    # device arrays in, device arrays out
    assert type(res.loss) is not np.ndarray and isinstance(res.grad, type(dev.put(x)))
    assert res.grad.dtype == np.dtype(dtype) and res.grad.shape == x.shape
    got = _host(res, dev)
    check_result(got, *naive.huber_loss(x, t, delta=1.5, sample_weight=sw, reduction=reduction),
                 dtype)
    _same_as_cpu(got, fl.huber_loss(x, t, delta=1.5, sample_weight=sw, reduction=reduction), dtype)


@pytest.mark.parametrize("delta", [0.3, 1.0, 1e3])
def test_deltas_without_weights(rng, dev, delta):
    x, t = _inputs(rng, (4, 6))
    got, cpu, want = _gpu_cpu_ref(dev, x, t, delta=delta)
    check_result(got, *want, np.float64)
    _same_as_cpu(got, cpu, np.float64)


def test_both_branches_and_the_kink(dev):
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 3.0, -3.0, 1e6])
    got = _host(fl.huber_loss(dev.put(x), dev.put(np.zeros_like(x)), reduction="none"), dev)
    np.testing.assert_allclose(got.loss, [0, 0.125, 0.125, 0.5, 0.5, 2.5, 2.5, 1e6 - 0.5], rtol=1e-15)
    np.testing.assert_allclose(got.grad, [0, 0.5, -0.5, 1, -1, 1, -1, 1], rtol=1e-15)


# The weights' shapes: (shape of the input, shape of the weights), covering one weight per
# run of trailing elements, weights cycling along trailing axes, full weights, one weight,
# and the weights that vary along two groups of axes (compacted on the host).
WEIGHT_CASES = [
    ((6, 5), (6, 5)), ((6, 5), (6, 1)), ((6, 5), (5,)), ((6, 5), (1, 5)), ((6, 5), ()),
    ((2, 3, 4), (3, 1)), ((2, 3, 4), (2, 1, 1)), ((2, 3, 4), (3, 4)), ((2, 3, 4), (1, 3, 1)),
    ((2, 3, 4), (2, 1, 4)), ((2, 3, 4), (2, 3, 4)), ((3, 1, 4), (3, 1, 1)),
]


@pytest.mark.parametrize("shape, wshape", WEIGHT_CASES, ids=str)
def test_sample_weight_broadcasting(rng, dev, shape, wshape):
    x, t = _inputs(rng, shape)
    sw = np.asarray(rng.uniform(0.0, 2.0, size=wshape))
    for reduction in ("mean", "none"):
        got, cpu, want = _gpu_cpu_ref(dev, x, t, delta=0.8, sample_weight=sw, reduction=reduction)
        check_result(got, *want, np.float64)
        _same_as_cpu(got, cpu, np.float64)
    # the mean divides by the sum of the broadcast weights
    np.testing.assert_allclose(float(got.loss.sum()) / np.broadcast_to(sw, shape).sum(),
                               float(_gpu_cpu_ref(dev, x, t, delta=0.8, sample_weight=sw)[0].loss),
                               rtol=1e-12)


def test_strided_sample_weights(rng, dev):
    x, t = _inputs(rng, (6, 5), np.float32)
    base = rng.uniform(size=(6, 10)).astype(np.float32)
    d_base = dev.put(base)
    for view, host in ((d_base[:, :1], base[:, :1]),  # (6, 1), strided
                       (d_base[:, ::2], base[:, ::2]),  # (6, 5), strided 2-D
                       (d_base[0, ::2], base[0, ::2])):  # (5,), strided 1-D
        res = fl.huber_loss(dev.put(x), dev.put(t), sample_weight=view)
        check_result(_host(res, dev), *naive.huber_loss(x, t, sample_weight=host), np.float32)
    # a strided view of more than two varying axes goes through the host
    x3, t3 = _inputs(rng, (2, 3, 4))
    w3 = rng.uniform(size=(2, 3, 8))
    res = fl.huber_loss(dev.put(x3), dev.put(t3), sample_weight=dev.put(w3)[:, :, ::2])
    check_result(_host(res, dev), *naive.huber_loss(x3, t3, sample_weight=w3[:, :, ::2]),
                 np.float64)


@pytest.mark.parametrize("shape", [(), (7,), (2, 3, 4), (5, 1, 3)], ids=str)
def test_any_shape(rng, dev, shape):
    x, t = _inputs(rng, shape)
    for reduction in ("sum", "none"):
        got, cpu, want = _gpu_cpu_ref(dev, x, t, reduction=reduction)
        assert got.grad.shape == shape
        assert np.shape(got.loss) == (shape if reduction == "none" else ())
        check_result(got, *want, np.float64)


def test_many_blocks_and_grid_stride(rng, dev, threads, monkeypatch):
    # more elements (and weights) than one block holds, and several per thread
    from fastloss.cuda import _blocks
    x, t = _inputs(rng, (9, 11))
    sw = rng.uniform(size=(9, 11))
    for max_blocks in (_blocks.MAX_BLOCKS, 2):
        monkeypatch.setattr(_blocks, "MAX_BLOCKS", max_blocks)
        got, cpu, want = _gpu_cpu_ref(dev, x, t, sample_weight=sw)
        check_result(got, *want, np.float64)
        _same_as_cpu(got, cpu, np.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_extreme_values(dev, dtype):
    x = np.array([1e30, -1e30, 1e4, -1e4, 0.0, 1e4], dtype)
    t = np.array([0.0, 0.0, -1e4, 1e4, 1e-30, 1e4], dtype)
    got, cpu, want = _gpu_cpu_ref(dev, x, t, reduction="none")
    assert np.all(np.isfinite(got.grad))
    check_result(got, *want, dtype)
    _same_as_cpu(got, cpu, dtype)


def test_nan_propagates_elementwise(dev):
    x = np.array([0.5, np.nan, -3.0])
    t = np.zeros(3)
    got, cpu, _ = _gpu_cpu_ref(dev, x, t, reduction="none")
    assert np.isnan(got.loss[1]) and np.isnan(got.grad[1])
    np.testing.assert_allclose(got.loss[[0, 2]], [0.125, 2.5])
    np.testing.assert_allclose(got.grad[[0, 2]], [0.5, -1.0])
    assert np.isnan(float(fl.huber_loss(dev.put(x), dev.put(t)).loss))
    # a NaN weight poisons the mean's denominator, as on the CPU
    sw = np.array([1.0, 1.0, np.nan])
    got, cpu, _ = _gpu_cpu_ref(dev, np.ones(3), t, sample_weight=sw)
    assert np.isnan(float(got.loss)) and np.isnan(float(cpu.loss))


# ----------------------------------------------------------- the interface


@pytest.mark.parametrize("shape, wshape", [((0,), None), ((0,), (0,)), ((0, 3), (3,)),
                                           ((0, 3), (0, 1))], ids=str)
def test_empty(dev, shape, wshape):
    x = np.zeros(shape)
    sw = None if wshape is None else dev.put(np.ones(wshape))
    assert np.isnan(float(fl.huber_loss(dev.put(x), dev.put(x), sample_weight=sw).loss))
    s = _host(fl.huber_loss(dev.put(x), dev.put(x), sample_weight=sw, reduction="sum"), dev)
    assert float(s.loss) == 0.0 and s.grad.shape == shape
    none = fl.huber_loss(dev.put(x), dev.put(x), sample_weight=sw, reduction="none")
    assert none.loss.shape == shape


def test_strided_device_views(rng, dev):
    xb, tb = _inputs(rng, (12, 9), np.float32)
    x, t = dev.put(xb)[::2, ::3], dev.put(tb)[1::2, 1::3]  # two (6, 3) views
    parent = dev.put(np.full((6, 6), 9.0, np.float32))
    buf = parent[:, ::2]  # a strided grad_out
    res = fl.huber_loss(x, t, delta=0.7, grad_out=buf)
    assert res.grad is buf
    want = naive.huber_loss(xb[::2, ::3], tb[1::2, 1::3], delta=0.7)
    check_result(_host(res, dev), *want, np.float32)
    rest = dev.get(parent)
    assert np.all(rest[:, 1::2] == 9.0)  # nothing written outside the view


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_grad_out_device_buffer_and_in_place(rng, dev, dtype):
    x, t = _inputs(rng, (8, 5), dtype)
    sw = rng.uniform(size=5).astype(dtype)
    want = naive.huber_loss(x, t, delta=0.7, sample_weight=sw)
    buf = dev.put(np.zeros_like(x))
    res = fl.huber_loss(dev.put(x), dev.put(t), delta=0.7, sample_weight=dev.put(sw), grad_out=buf)
    assert res.grad is buf
    check_result(_host(res, dev), *want, dtype)
    d_x = dev.put(x)
    res = fl.huber_loss(d_x, dev.put(t), delta=0.7, sample_weight=dev.put(sw), grad_out=d_x)
    assert res.grad is d_x
    check_result(fl.LossGrad(dev.get(res.loss), dev.get(d_x)), *want, dtype)


def test_target_of_another_dtype_rounds_like_the_cpu(rng, dev):
    x, _ = _inputs(rng, (4, 5), np.float16)
    t = rng.normal(size=(4, 5))  # float64 target, float16 input: rounded to float16 first
    got, cpu, _ = _gpu_cpu_ref(dev, x, t, reduction="none")
    np.testing.assert_array_equal(got.loss, cpu.loss)
    np.testing.assert_array_equal(got.grad, cpu.grad)


def test_grad_false_returns_no_gradient(rng, dev):
    x, t = _inputs(rng, (8, 2))
    res = fl.huber_loss(dev.put(x), dev.put(t), grad=False)
    assert res.grad is None
    check_result(fl.LossGrad(dev.get(res.loss), None), naive.huber_loss(x, t)[0], None, np.float64)


def test_backend_cuda_with_numpy_returns_numpy(rng):
    x, t = _inputs(rng, (5, 3))
    sw = rng.uniform(size=(5, 1))
    want = naive.huber_loss(x, t, sample_weight=sw)
    res = fl.huber_loss(x, t, sample_weight=sw, backend="cuda")
    assert type(res.loss) is np.ndarray and type(res.grad) is np.ndarray
    check_result(res, *want, np.float64)
    res = fl.huber_loss(x, t, sample_weight=sw, backend="cuda", grad_out=x)
    assert res.grad is x
    check_result(res, *want, np.float64)


def test_scalar_loss_converts_with_float(rng, dev):
    x, t = _inputs(rng, (3, 4), np.float32)
    loss = fl.huber_loss(dev.put(x), dev.put(t)).loss
    assert loss.shape == () and abs(float(loss) - float(naive.huber_loss(x, t)[0])) < 1e-5


def test_device_arrays_are_never_copied_to_or_from_the_host(rng, dev, monkeypatch):
    x, t = _inputs(rng, (4, 5), np.float32)
    sw = rng.uniform(size=(4, 1)).astype(np.float32)
    args = (dev.put(x), dev.put(t))
    d_sw = dev.put(sw)
    buf = dev.put(np.zeros_like(x))
    calls = []
    monkeypatch.setattr(type(args[0]), "copy_to_host", lambda *a, **k: calls.append("copy_to_host"))
    monkeypatch.setattr(cuda, "to_device", lambda *a, **k: calls.append("to_device"))
    res = fl.huber_loss(*args, sample_weight=d_sw, grad_out=buf)
    assert calls == []
    monkeypatch.undo()
    check_result(_host(res, dev), *naive.huber_loss(x, t, sample_weight=sw), np.float32)


@pytest.mark.parametrize("case, error, match", [
    ("target of the wrong shape", ValueError, "target must have shape"),
    ("int input", TypeError, "input must have dtype"),
    ("zero delta", ValueError, "delta must be > 0"),
    ("sample_weight that does not broadcast", ValueError, "does not broadcast"),
    ("sample_weight that broadcasts too far", ValueError, "to a larger shape"),
    ("grad_out of the wrong shape", ValueError, "grad_out must have shape"),
    ("grad_out on the host", TypeError, "grad_out is on cpu"),
    ("sample_weight on the host", TypeError, "sample_weight is on cpu"),
    ("bad reduction", ValueError, "reduction must be one of"),
])
def test_bad_input_raises_before_any_kernel_and_changes_nothing(dev, case, error, match):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    d_x = dev.put(x)
    args, kw = [d_x, dev.put(np.zeros((3, 4), np.float32))], {"grad_out": d_x}
    if case == "target of the wrong shape":
        args[1] = dev.put(np.zeros((4, 3), np.float32))
    elif case == "int input":
        args[0] = dev.put(np.zeros((3, 4), np.int32))
        del kw["grad_out"]
    elif case == "zero delta":
        kw["delta"] = 0.0
    elif case == "sample_weight that does not broadcast":
        kw["sample_weight"] = dev.put(np.ones(3, np.float32))
    elif case == "sample_weight that broadcasts too far":
        kw["sample_weight"] = dev.put(np.ones((2, 1, 4), np.float32))
    elif case == "grad_out of the wrong shape":
        kw["grad_out"] = dev.put(np.zeros(12, np.float32))
    elif case == "grad_out on the host":
        kw["grad_out"] = np.zeros((3, 4), np.float32)
    elif case == "sample_weight on the host":
        kw["sample_weight"] = np.ones(4, np.float32)
    elif case == "bad reduction":
        kw["reduction"] = "max"
    with pytest.raises(error, match=match):
        fl.huber_loss(*args, **kw)
    np.testing.assert_array_equal(dev.get(d_x), x)
