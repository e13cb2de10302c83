"""On a real GPU: a call runs on CuPy's or PyTorch's current stream, side streams included.

Each test puts the inputs on a non-default stream, queues work there that the
call must wait for, calls fastloss, and checks that every launch went to that
stream (a spy on ``_blocks.launch``) and that the answer is right without any
synchronisation in between.  tests/test_cuda_streams.py covers the same code
under the simulator, with a stand-in stream.
"""
import os

import numpy as np
import pytest

import fastloss as fl
import naive

pytestmark = pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
                                reason="needs a real GPU")


@pytest.fixture
def launch_streams(monkeypatch):
    """The stream handle of every kernel launch from now on."""
    from fastloss.cuda import _blocks
    handles, real = [], _blocks.launch

    def launch(kernel, blocks, threads, stream, *args):
        handles.append(int(stream))
        real(kernel, blocks, threads, stream, *args)

    monkeypatch.setattr(_blocks, "launch", launch)
    return handles


def _inputs(n=512, c=4099):
    rng = np.random.default_rng(3)
    return rng.normal(size=(n, c)).astype(np.float32), rng.integers(0, c, size=n)


def test_cupy_non_blocking_stream(launch_streams):
    cp = pytest.importorskip("cupy")
    x, t = _inputs()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        dx = cp.zeros(x.shape, cp.float32)
        for _ in range(20):  # keep the stream busy: the call must come after this
            dx = dx * 0.5
        dx += cp.asarray(x)
        loss, grad = fl.softmax_cross_entropy(dx, cp.asarray(t), reduction="sum")
        host_loss = float(loss)  # read back on the stream: ordered after the kernels
    stream.synchronize()
    assert launch_streams and set(launch_streams) == {stream.ptr}
    want_loss, want_grad = naive.softmax_cross_entropy(x, t, reduction="sum")
    np.testing.assert_allclose(host_loss, want_loss, rtol=1e-4)
    np.testing.assert_allclose(cp.asnumpy(grad), want_grad, rtol=1e-4, atol=1e-6)


def test_torch_side_stream(launch_streams):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no GPU")
    x, t = _inputs()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        dx = torch.zeros(x.shape, device="cuda")
        for _ in range(20):
            dx = dx * 0.5
        dx += torch.from_numpy(x).cuda()
        loss, grad = fl.softmax_cross_entropy(dx, torch.from_numpy(t).cuda(), reduction="mean")
        got_loss, got_grad = loss.cpu().item(), grad.cpu().numpy()
    side.synchronize()
    assert launch_streams and set(launch_streams) == {side.cuda_stream}
    want_loss, want_grad = naive.softmax_cross_entropy(x, t, reduction="mean")
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-4)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-7)


def test_every_kernel_launches_at_its_largest_block():
    # ptxas said so (tests/test_cuda_compile.py); the driver agrees
    cp = pytest.importorskip("cupy")
    from fastloss.cuda import _blocks
    saved = _blocks.threads_per_block()
    _blocks.set_threads_per_block(_blocks.MAX_THREADS)
    try:
        x, t = _inputs(64, 8192)
        for dtype in (np.float16, np.float32, np.float64):
            dx = cp.asarray(x.astype(dtype))
            w = cp.ones(x.shape[1], dtype)
            fl.softmax_cross_entropy(dx, cp.asarray(t), weight=w, label_smoothing=0.1,
                                     softcap=20.0, reduction="mean")
            fl.focal_loss(dx, cp.asarray(t), alpha=w, reduction="mean")
            e = cp.ascontiguousarray(dx[:, :256])
            fl.triplet_margin_loss(e, e[::-1].copy(), e[:, ::-1].copy(), reduction="mean")
            fl.batch_triplet_loss(e, cp.asarray(t % 4), mining="semihard", reduction="mean")
        cp.cuda.Device().synchronize()
    finally:
        _blocks.set_threads_per_block(*saved)
