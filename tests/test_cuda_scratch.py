"""Scratch buffers of Numba and NumPy calls, which have no caller's pool
(``Device.scratch``): kept per host thread, device, stream and slot, grown when a
call needs more, allocated per call past ``SCRATCH_CACHE_BYTES``.

Allocations are counted by a spy on ``cuda.device_array`` made inside
``Device.scratch``; buffers are told apart by whether their views share memory.
References are the float64 formulas of tests/naive.py.
"""
import os
import threading

import naive
import numpy as np
import pytest

import fastloss as fl
from simulated_streams import CALLER_STREAM, OTHER_STREAM, FakeStream, stream_array

pytestmark = pytest.mark.cuda

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


class Record:
    """What ``Device.scratch`` did: ``allocations`` (thread, slot, shape) of every
    ``cuda.device_array`` it made, ``views`` (thread, slot, view) of every buffer it
    handed out (held, so that no address is reused within a test)."""

    def __init__(self):
        self.allocations, self.views = [], []

    def clear(self):
        del self.allocations[:], self.views[:]

    def slots(self, thread=None):
        """The slots allocated for, sorted (in ``thread`` only, when given)."""
        return sorted(s for t, s, _ in self.allocations if thread is None or t == thread)

    def view(self, slot, thread=None):
        """The only view handed out for ``slot`` (in ``thread``)."""
        found = [v for t, s, v in self.views if s == slot and (thread is None or t == thread)]
        assert len(found) == 1, (slot, len(found))
        return found[0]


@pytest.fixture
def scratch(monkeypatch):
    """A ``Record`` of this test's scratch buffers, which start from an empty cache."""
    from numba import cuda

    from fastloss.cuda import _arrays
    monkeypatch.setattr(_arrays, "_SCRATCH", threading.local())
    record, inside = Record(), threading.local()
    real_scratch, real_device_array = _arrays.Device.scratch, cuda.device_array

    def scratch(self, shape, dtype, slot=None):
        inside.slot = slot
        try:
            view = real_scratch(self, shape, dtype, slot)
        finally:
            del inside.slot
        record.views.append((threading.get_ident(), slot, view))
        return view

    def device_array(shape, *args, **kwargs):
        if hasattr(inside, "slot"):
            record.allocations.append((threading.get_ident(), inside.slot, tuple(shape)))
        return real_device_array(shape, *args, **kwargs)

    monkeypatch.setattr(_arrays.Device, "scratch", scratch)
    monkeypatch.setattr(cuda, "device_array", device_array)
    return record


def _put(a):
    from numba import cuda
    return cuda.to_device(np.ascontiguousarray(a))


def _get(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def _same_buffer(a, b):
    from fastloss.cuda._checks import shares_memory
    return shares_memory(a, b)


def _rows(rng, n, c):
    return rng.normal(size=(n, c)).astype(np.float32), rng.integers(0, c, size=n)


CE_SLOTS = ["first_bad_label", "mean_stats"]  # CE "mean" with integer labels


def _ce_mean(logits, labels, **kwargs):
    """``(loss, grad)`` of CE "mean" as NumPy arrays."""
    loss, grad = fl.softmax_cross_entropy(logits, labels, reduction="mean", **kwargs)
    return _get(loss), _get(grad)


def _check_ce(got, x, t):
    want_loss, want_grad = naive.softmax_cross_entropy(x, t, reduction="mean")
    np.testing.assert_allclose(got[0], want_loss, rtol=2e-6)
    np.testing.assert_allclose(got[1], want_grad, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["numba", "numpy"])
def test_a_second_identical_call_allocates_no_scratch(rng, scratch, kind):
    x, t = _rows(rng, 12, 7)
    put = _put if kind == "numba" else np.asarray  # NumPy: backend="cuda"
    first = _ce_mean(put(x), put(t), backend="cuda")
    assert scratch.slots() == CE_SLOTS
    scratch.clear()
    second = _ce_mean(put(x), put(t), backend="cuda")
    assert scratch.slots() == []
    assert second[0].tobytes() == first[0].tobytes()
    assert second[1].tobytes() == first[1].tobytes()
    _check_ce(first, x, t)
    _check_ce(second, x, t)


def _center_call(rng, n, K, D=5, centers=None):
    """One ``center_loss`` with its update on Numba arrays, checked against the
    float64 references; returns the updated centers (NumPy)."""
    x = rng.normal(size=(n, D)).astype(np.float32)
    labels = rng.integers(0, K, size=n)
    labels[:K] = np.arange(K)  # every class present: every counter is used
    c = rng.normal(size=(K, D)).astype(np.float32) if centers is None else centers
    d_centers = _put(c)
    loss, grad = fl.center_loss(_put(x), _put(labels), d_centers, alpha=0.5, update=True,
                                reduction="mean")
    want_loss, want_grad = naive.center_loss(x, labels, c, reduction="mean")
    np.testing.assert_allclose(_get(loss), want_loss, rtol=2e-6)
    np.testing.assert_allclose(_get(grad), want_grad, rtol=2e-5, atol=1e-7)
    updated = _get(d_centers)
    np.testing.assert_allclose(updated, naive.center_update(c, x, labels, alpha=0.5),
                               rtol=2e-6, atol=1e-6)
    return updated


# center loss with its update: the label check, then the update's grouping of rows
CENTER_SLOTS = ["center_counts", "center_order", "center_starts", "center_totals",
                "first_bad_label"]


def test_a_larger_call_grows_the_buffers_and_a_smaller_one_reuses_them(rng, scratch):
    _center_call(rng, 6, 3)
    assert scratch.slots() == CENTER_SLOTS
    small_totals = scratch.view("center_totals")
    scratch.clear()
    _center_call(rng, 30, 9)  # more rows, more classes: every buffer of the update grows
    assert scratch.slots() == CENTER_SLOTS[:-1]  # the label check's is of one size
    assert scratch.view("center_totals").shape == (9,)
    assert not _same_buffer(scratch.view("center_totals"), small_totals)
    scratch.clear()
    _center_call(rng, 6, 3)  # the first elements of the larger buffers, left as they were
    assert scratch.slots() == []
    assert scratch.view("center_totals").shape == (3,)


def test_a_larger_weight_period_grows_the_partial_sums(rng, scratch):
    from fastloss.cuda import _reduction
    shapes = []
    for period in (40, 300):
        x = rng.normal(size=(2, period)).astype(np.float32)
        y = rng.normal(size=(2, period)).astype(np.float32)
        w = rng.uniform(0.5, 2.0, size=period).astype(np.float32)
        loss, grad = fl.huber_loss(_put(x), _put(y), sample_weight=_put(w), reduction="mean")
        want_loss, want_grad = naive.huber_loss(x, y, sample_weight=w, reduction="mean")
        np.testing.assert_allclose(_get(loss), want_loss, rtol=2e-6)
        np.testing.assert_allclose(_get(grad), want_grad, rtol=2e-5, atol=1e-8)
        shapes.append(scratch.view("weight_partials").shape)
        assert "weight_partials" in scratch.slots()
        scratch.clear()
    assert shapes == [(_reduction.elementwise_grid(p)[0],) for p in (40, 300)]
    assert shapes[0] != shapes[1]


@pytest.mark.skipif(not SIMULATOR, reason="stands in for the simulator's missing streams")
def test_two_streams_get_buffers_of_their_own(rng, scratch, monkeypatch):
    from fastloss.cuda import _arrays
    made, real_external = {}, _arrays.external_stream

    def external_stream(cuda, handle):
        if handle in (CALLER_STREAM, OTHER_STREAM):
            return made.setdefault(handle, FakeStream(handle))
        return real_external(cuda, handle)

    monkeypatch.setattr(_arrays, "external_stream", external_stream)
    x, t = _rows(rng, 10, 6)
    views = []
    for handle in (CALLER_STREAM, OTHER_STREAM, CALLER_STREAM):
        got = _ce_mean(stream_array(x, handle), stream_array(t, handle))
        _check_ce(got, x, t)
        views.append({slot: scratch.view(slot) for slot in CE_SLOTS})
        assert scratch.slots() == ([] if len(views) == 3 else CE_SLOTS)
        scratch.clear()
    for slot in CE_SLOTS:
        assert not _same_buffer(views[0][slot], views[1][slot])
        assert _same_buffer(views[0][slot], views[2][slot])


@pytest.mark.skipif(not SIMULATOR, reason="the simulator's streams have no handle")
def test_streams_without_a_handle_are_told_apart_by_themselves(rng, scratch):
    from numba import cuda
    x, t = _rows(rng, 10, 6)
    one, two = cuda.stream(), cuda.stream()
    views = []
    for stream in (one, two, one):
        got = _ce_mean(_put(x).bind(stream), _put(t).bind(stream))
        _check_ce(got, x, t)
        views.append(scratch.view("mean_stats"))
        scratch.clear()
    assert not _same_buffer(views[0], views[1])
    assert _same_buffer(views[0], views[2])


def test_another_thread_gets_buffers_of_its_own(rng, scratch):
    x, t = _rows(rng, 10, 6)
    main = threading.get_ident()
    _check_ce(_ce_mean(_put(x), _put(t)), x, t)
    results, errors = [], []

    def call_twice():
        try:
            for _ in range(2):
                results.append(_ce_mean(_put(x), _put(t)))
        except Exception as exc:  # reported by the main thread
            errors.append(exc)

    worker = threading.Thread(target=call_twice)
    worker.start()
    worker.join()
    assert not errors, errors
    for got in results:
        _check_ce(got, x, t)
    other = worker.ident
    assert scratch.slots(main) == CE_SLOTS and scratch.slots(other) == CE_SLOTS  # once each
    for slot in CE_SLOTS:
        thread_views = [v for t_, s, v in scratch.views if s == slot and t_ == other]
        assert len(thread_views) == 2 and _same_buffer(*thread_views)
        assert not _same_buffer(scratch.view(slot, main), thread_views[0])
    scratch.clear()
    _check_ce(_ce_mean(_put(x), _put(t)), x, t)
    assert scratch.slots() == []  # the main thread's own buffers, untouched


def test_a_buffer_over_the_limit_is_allocated_per_call(rng, scratch, monkeypatch):
    from fastloss.cuda import _arrays
    monkeypatch.setattr(_arrays, "SCRATCH_CACHE_BYTES", 8)  # the label check's one int64 fits
    x, t = _rows(rng, 10, 6)
    _check_ce(_ce_mean(_put(x), _put(t)), x, t)
    assert scratch.slots() == CE_SLOTS
    first_stats = scratch.view("mean_stats")
    scratch.clear()
    _check_ce(_ce_mean(_put(x), _put(t)), x, t)
    assert scratch.slots() == ["mean_stats"]  # two float64: 16 bytes, over the limit
    assert not _same_buffer(scratch.view("mean_stats"), first_stats)


def test_a_buffer_of_another_context_is_not_reused(rng, scratch, monkeypatch):
    # cuda.close() makes a new context: the old one's memory is gone
    from fastloss.cuda import _arrays
    x, t = _rows(rng, 10, 6)
    for context in (object(), object()):  # stand-ins for two Numba contexts of device 0
        monkeypatch.setattr(_arrays.Device, "_scratch_context",
                            lambda self, context=context: (0, context))
        _check_ce(_ce_mean(_put(x), _put(t)), x, t)
        assert scratch.slots() == CE_SLOTS
        scratch.clear()


def test_center_loss_twice_in_a_row(rng, scratch):
    centers = _center_call(rng, 12, 4)
    _center_call(rng, 12, 4, centers=centers)  # the updated centers, through reused buffers
    assert scratch.slots() == CENTER_SLOTS  # the first call's only


def test_center_loss_gradient_through_a_scratch_copy_twice(rng, scratch):
    # grad_out=features with the update: the gradient goes to a scratch array first
    K, D = 3, 4
    c = rng.normal(size=(K, D)).astype(np.float32)
    for _ in range(2):
        x = rng.normal(size=(8, D)).astype(np.float32)
        labels = rng.integers(0, K, size=8)
        d_x, d_c = _put(x), _put(c)
        loss, grad = fl.center_loss(d_x, _put(labels), d_c, update=True, grad_out=d_x)
        want_loss, want_grad = naive.center_loss(x, labels, c, reduction="mean")
        np.testing.assert_allclose(_get(loss), want_loss, rtol=2e-6)
        np.testing.assert_allclose(_get(grad), want_grad, rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(_get(d_c), naive.center_update(c, x, labels), rtol=2e-6,
                                   atol=1e-6)
        c = _get(d_c)
    assert [s for _, s, _ in scratch.views].count("center_grad") == 2


def test_huber_mean_with_sample_weights_twice(rng, scratch):
    x = rng.normal(size=(3, 50)).astype(np.float32) * 2
    y = rng.normal(size=(3, 50)).astype(np.float32)
    w = rng.uniform(0.5, 2.0, size=(3, 1)).astype(np.float32)
    want_loss, want_grad = naive.huber_loss(x, y, sample_weight=w, reduction="mean")
    got = []
    for _ in range(2):
        loss, grad = fl.huber_loss(_put(x), _put(y), sample_weight=_put(w), reduction="mean")
        got.append((_get(loss), _get(grad)))
        np.testing.assert_allclose(got[-1][0], want_loss, rtol=2e-6)
        np.testing.assert_allclose(got[-1][1], want_grad, rtol=2e-5, atol=1e-8)
    assert got[0][0].tobytes() == got[1][0].tobytes()
    assert sorted(s for _, s, _ in scratch.allocations) == ["weight_partials", "weight_sum"]


@pytest.mark.parametrize("mining", ["hard", "semihard", "all"])
def test_batch_mining_twice_reuses_its_buffers(rng, scratch, mining):
    # the counts, the "mean" denominator and the backward's weights (and partners) of
    # the first call are reused by the second, whose results are the same bits
    E = rng.normal(size=(10, 6)).astype(np.float32)
    labels = rng.integers(0, 3, size=10)
    want_loss, want_grad = naive.batch_triplet_loss(E.astype(np.float64), labels, mining=mining)
    got = []
    for _ in range(2):
        loss, grad = fl.batch_triplet_loss(_put(E), _put(labels), mining=mining)
        got.append((_get(loss), _get(grad)))
        np.testing.assert_allclose(got[-1][0], want_loss, rtol=1e-5)
        np.testing.assert_allclose(got[-1][1], want_grad, rtol=1e-4, atol=1e-6)
    slots = ["batch_counts", "batch_mean_stats", "batch_weights"] + (
        [] if mining == "all" else ["batch_partners"])
    assert sorted(s for _, s, _ in scratch.allocations) == sorted(slots)  # the first call's only
    assert got[0][0].tobytes() == got[1][0].tobytes()
    assert got[0][1].tobytes() == got[1][1].tobytes()
