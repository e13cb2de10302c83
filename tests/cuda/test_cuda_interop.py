"""CuPy, PyTorch and bare ``__cuda_array_interface__`` arrays in and out, on a real GPU.

The simulator cannot run these (its device arrays are NumPy underneath and it
cannot dereference a device pointer): they run where CuPy or PyTorch has a
GPU, e.g. in bench/gpu_check.sh.  The simulator covers the same code path
with Numba device arrays (the "cuda" side of tests/test_<loss>.py).
"""
import os

import numpy as np
import pytest

import fastloss as fl
import naive

pytestmark = pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
                                reason="needs a real GPU")


class BareInterface:
    """Only ``__cuda_array_interface__``: the generic kind, answered with Numba arrays."""

    def __init__(self, array):
        self.array = array
        self.__cuda_array_interface__ = array.__cuda_array_interface__


def _inputs():
    rng = np.random.default_rng(0)
    return rng.normal(size=(6, 9)).astype(np.float32), rng.integers(0, 9, size=6)


def test_cupy_in_cupy_out_without_copies():
    cp = pytest.importorskip("cupy")
    x, t = _inputs()
    dx, dt = cp.asarray(x), cp.asarray(t)
    buf = cp.empty_like(dx)
    loss, grad = fl.softmax_cross_entropy(dx, dt, grad_out=buf)
    assert isinstance(loss, cp.ndarray) and loss.shape == ()
    assert grad is buf and grad.data.ptr == buf.data.ptr
    want_loss, want_grad = naive.softmax_cross_entropy(x, t)
    assert abs(float(loss) - want_loss) < 1e-5
    np.testing.assert_allclose(cp.asnumpy(grad), want_grad, atol=1e-6)
    losses, grad = fl.softmax_cross_entropy(dx, dt, reduction="none")
    assert isinstance(losses, cp.ndarray) and isinstance(grad, cp.ndarray)
    # in place on the caller's CuPy array
    loss, grad = fl.softmax_cross_entropy(dx, dt, grad_out=dx)
    assert grad is dx
    np.testing.assert_allclose(cp.asnumpy(dx), want_grad, atol=1e-6)


def test_torch_in_torch_out():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no GPU here")
    x, t = _inputs()
    dx, dt = torch.tensor(x, device="cuda"), torch.tensor(t, device="cuda")
    loss, grad = fl.softmax_cross_entropy(dx, dt, label_smoothing=0.1)
    assert isinstance(loss, torch.Tensor) and loss.device.type == "cuda"
    ref = dx.clone().requires_grad_(True)
    want = torch.nn.functional.cross_entropy(ref, dt, label_smoothing=0.1)
    want.backward()
    assert abs(float(loss) - float(want)) < 1e-5
    torch.testing.assert_close(grad, ref.grad, atol=1e-6, rtol=1e-5)


def test_bare_interface_gives_numba_device_arrays():
    cp = pytest.importorskip("cupy")
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    x, t = _inputs()
    loss, grad = fl.softmax_cross_entropy(BareInterface(cp.asarray(x)), BareInterface(cp.asarray(t)))
    assert isinstance(grad, DeviceNDArray) and isinstance(loss, DeviceNDArray)
    assert abs(float(loss) - naive.softmax_cross_entropy(x, t)[0]) < 1e-5


def test_every_loss_takes_cupy_arrays():
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(1)
    x = cp.asarray(rng.normal(size=(8, 5)).astype(np.float32))
    y = cp.asarray(rng.integers(0, 4, size=8))
    cases = {
        "focal_loss": lambda: fl.focal_loss(x, y),
        "sigmoid_focal_loss": lambda: fl.sigmoid_focal_loss(x, (x > 0).astype(cp.float32)),
        "huber_loss": lambda: fl.huber_loss(x, x * 0.5),
        "triplet_margin_loss": lambda: fl.triplet_margin_loss(x, x * 0.9, -x),
        "batch_triplet_loss": lambda: fl.batch_triplet_loss(x, y),
        "center_loss": lambda: fl.center_loss(x, y, cp.zeros((4, 5), cp.float32)),
    }
    for name, call in cases.items():
        loss, grad = call()
        assert isinstance(loss, cp.ndarray), name
        grads = grad if isinstance(grad, tuple) else (grad,)
        assert all(isinstance(g, cp.ndarray) for g in grads), name
