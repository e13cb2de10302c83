"""Every launch, copy and allocation of a GPU call goes to the caller's stream.

The simulator has no streams (it runs each launch at once, and refuses
``cuda.external_stream``), so these tests give it one: an input whose
``__cuda_array_interface__`` (version 3) names a stream handle, resolved by a
stand-in for ``external_stream``, and a spy on ``_blocks.launch``, the one
launch point.  tests/cuda/test_gpu_streams.py does the same with CuPy and
PyTorch streams on a real GPU.
"""
import ast
import os
import pathlib

import numpy as np
import pytest

import fastloss as fl
from simulated_streams import CALLER_STREAM, OTHER_STREAM, FakeStream, stream_array

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1",
                                 reason="stands in for the simulator's missing streams")]


@pytest.fixture
def streams(monkeypatch):
    """``(streams by handle, launches)``: the fake streams that ``external_stream``
    hands out, and the ``(kernel name, stream)`` of every launch."""
    from fastloss.cuda import _arrays, _blocks
    made, launches = {}, []
    real_external, real_launch = _arrays.external_stream, _blocks.launch

    def external_stream(cuda, handle):
        if handle in (CALLER_STREAM, OTHER_STREAM):
            return made.setdefault(handle, FakeStream(handle))
        return real_external(cuda, handle)

    def launch(kernel, blocks, threads, stream, *args):
        launches.append((kernel.__name__, stream))
        real_launch(kernel, blocks, threads, stream, *args)

    monkeypatch.setattr(_arrays, "external_stream", external_stream)
    monkeypatch.setattr(_blocks, "launch", launch)
    return made, launches


def _logits(rng, n=6, c=9):
    return rng.normal(size=(n, c)).astype(np.float32), rng.integers(0, c, size=n)


def test_cross_entropy_runs_on_the_stream_its_inputs_name(rng, streams):
    made, launches = streams
    x, t = _logits(rng)
    loss, grad = fl.softmax_cross_entropy(stream_array(x, CALLER_STREAM),
                                          stream_array(t, CALLER_STREAM), reduction="mean")
    caller = made[CALLER_STREAM]
    assert launches and all(stream is caller for _, stream in launches), launches
    assert grad.stream is caller and loss.stream is caller  # allocated on it, and bound to it
    assert caller.synchronized == 1  # the label check's one read back, nothing else
    want = fl.softmax_cross_entropy(x, t, reduction="mean")
    np.testing.assert_allclose(float(loss), float(want.loss), rtol=1e-5)
    np.testing.assert_allclose(grad.copy_to_host(), want.grad, rtol=1e-5, atol=1e-7)


def test_a_mean_over_a_count_the_host_knows_launches_nothing_for_it(rng, streams):
    # the count reaches the kernels by value: the loss kernel and the sum, no fill or count
    _, launches = streams
    put = lambda a: stream_array(a, CALLER_STREAM)  # noqa: E731
    x, _ = _logits(rng)
    fl.triplet_margin_loss(put(x), put(x[::-1].copy()), put(x[:, ::-1].copy()), reduction="mean")
    fl.sigmoid_focal_loss(put(x), put((x > 0).astype(np.float32)), reduction="mean")
    fl.huber_loss(put(x), put(x[::-1].copy()), reduction="mean")
    assert [name for name, _ in launches] == [
        "triplet_rows_kernel", "_total_kernel", "sigmoid_focal_kernel", "_total_kernel",
        "huber_elements_kernel", "_total_kernel"]


def test_input_written_on_another_stream_is_waited_for_on_the_device(rng, streams, monkeypatch):
    from numba import cuda
    made, launches = streams
    events = []

    class Event:
        def record(self, stream=0):
            events.append(("record", stream))

        def wait(self, stream=0):
            events.append(("wait", stream))

    monkeypatch.setattr(cuda, "event", lambda **options: Event())
    x, t = _logits(rng)
    fl.softmax_cross_entropy(stream_array(x, CALLER_STREAM), stream_array(t, OTHER_STREAM))
    caller, other = made[CALLER_STREAM], made[OTHER_STREAM]
    assert events == [("record", other), ("wait", caller)]
    assert other.synchronized == 0  # the host did not wait for it
    assert all(stream is caller for _, stream in launches)


@pytest.mark.parametrize("call", ["center", "huber", "sigmoid_focal", "focal", "triplet",
                                  "batch_triplet"])
def test_every_loss_launches_on_the_callers_stream(rng, streams, call):
    made, launches = streams
    put = lambda a: stream_array(a, CALLER_STREAM)  # noqa: E731
    x, t = _logits(rng)
    e = rng.normal(size=(6, 4)).astype(np.float32)
    labels = np.array([0, 1, 0, 1, 2, 2])
    if call == "center":
        fl.center_loss(put(e), put(labels), put(np.zeros((3, 4), np.float32)), update=True,
                       reduction="mean")
    elif call == "huber":
        fl.huber_loss(put(e), put(e[::-1].copy()), sample_weight=put(np.ones(4, np.float32)))
    elif call == "sigmoid_focal":
        fl.sigmoid_focal_loss(put(x), put((x > 0).astype(np.float32)))
    elif call == "focal":
        fl.focal_loss(put(x), put(t), reduction="mean")
    elif call == "triplet":
        fl.triplet_margin_loss(put(e), put(e[::-1].copy()), put(e[:, ::-1].copy()),
                               reduction="mean")
    else:
        fl.batch_triplet_loss(put(e), put(labels), reduction="mean")
    assert launches and all(stream is made[CALLER_STREAM] for _, stream in launches), launches


def test_torch_calls_follow_torchs_current_stream(monkeypatch):
    torch = pytest.importorskip("torch")
    from fastloss.cuda._arrays import caller_stream

    class Current:
        cuda_stream = CALLER_STREAM

    asked = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: asked.append(device) or Current)
    tensor = type("Tensor", (), {"device": type("device", (), {"index": 1})()})()
    assert caller_stream(tensor, "torch") == (CALLER_STREAM, 1)
    assert asked == [tensor.device]


def test_no_kernel_is_launched_around_the_launch_point():
    # kernel[blocks, threads](...) would run on the default stream; only
    # _blocks.launch may subscript a kernel
    folder = pathlib.Path(fl.__file__).parent / "cuda"
    found = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                    and not (path.name == "_blocks.py" and isinstance(node.func.value, ast.Name)
                             and node.func.value.id == "kernel")):
                found.append(f"{path.name}:{node.lineno}")
    assert not found, f"launches that bypass _blocks.launch: {found}"
