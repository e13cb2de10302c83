"""The compiled checks of a caller's NumPy ``grad_out`` (``fastloss/cpu/_buffer_checks.pyx``).

Each check is held to a plain Python statement of what it answers (``np.may_share_memory``,
attribute reads), over every pair of a family of views of one buffer: offsets, steps of
either sign, transposes, reshapes, other dtypes, empty and zero-dimensional views.  Then the
behaviour they decide: the first argument overwritten in place while another input overlaps
it (the gradient must still be right), and every loss with ``grad_out`` in a source tree
whose extension was never built (the Python fallback of ``fastloss.cpu._storage``).
"""
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastloss as fl
from fastloss import _validation as check

pytestmark = pytest.mark.cpu


@pytest.fixture
def compiled():
    """The extension (a tree never built runs only the fallback's test, at the end)."""
    return pytest.importorskip("fastloss.cpu._buffer_checks")


def _views():
    """Arrays over one 96-byte buffer, some over another, and arrays that are not NumPy's own."""
    buf = np.arange(12, dtype=np.float64)
    other = np.zeros(12)
    m = buf.reshape(3, 4)
    readonly = buf[2:6]
    readonly = readonly.view()
    readonly.flags.writeable = False
    return [buf, buf[:6], buf[6:], buf[5:7], buf[::2], buf[1::2], buf[::-1], buf[::-3], m, m.T,
            m[:, 1:3], m[::-1, ::2], m[1:2], buf[3:3], m[:, 4:], buf[4:5].reshape(()),
            buf.view(np.float32), buf.view(np.int64)[7:], buf.view(np.uint8)[17:23], readonly,
            other, other[::3], np.asfortranarray(m), np.zeros(0),
            np.frombuffer(bytearray(96), np.float64)]


VIEWS = _views()


def _apart_reference(a, b):
    return b is None or not np.may_share_memory(a, b)


def _ready_reference(g, shape, dtype):
    return (type(g) is np.ndarray and g.flags.writeable and g.dtype is dtype
            and type(shape) is tuple and g.shape == shape)


def _same_view(a, b):
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype)


def _writes_directly_reference(g, inplace_ok, reads):
    if type(g) is not np.ndarray or not g.flags.c_contiguous:
        return False
    if g.size == 0:
        return True
    if inplace_ok is not None and inplace_ok is not g and not _same_view(g, inplace_ok):
        if not _apart_reference(g, inplace_ok):
            return False
    return all(_apart_reference(g, b) for b in reads)


def test_apart_is_may_share_memory_negated(compiled):
    pairs = 0
    for a, b in itertools.product(VIEWS, VIEWS + [None]):
        assert compiled.apart(a, b) == _apart_reference(a, b), (a.shape, a.strides,
                                                                 None if b is None else b.strides)
        pairs += 1
    assert pairs == len(VIEWS) * (len(VIEWS) + 1)


def test_apart_refuses_what_it_cannot_read(compiled):
    # a list or a device-like object is never shown apart: the caller takes its full path
    a = np.zeros(3)
    assert not compiled.apart(a, [0.0, 1.0])
    assert not compiled.apart([0.0], a)
    assert compiled.apart([0.0], None) and compiled.apart(None, a)  # None holds no memory


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int64])
def test_ready_matches_its_definition(compiled, dtype):
    dtype = np.dtype(dtype)
    fresh = np.zeros((3, 4), dtype)
    readonly = fresh.copy()
    readonly.flags.writeable = False

    class Sub(np.ndarray):
        pass

    candidates = [fresh, fresh.T, fresh[:, :2], fresh.reshape(12), readonly, fresh.view(Sub),
                  np.zeros((3, 4), np.dtype(dtype).newbyteorder()), np.zeros((3, 4), np.float64),
                  fresh.tolist(), None, np.zeros((3, 4, 1), dtype)]
    shapes = [(3, 4), (4, 3), (12,), (3, 4, 1), [3, 4], (), (3, 4.0), (3, 2 ** 70), (3, -4)]
    for g, shape in itertools.product(candidates, shapes):
        answer = compiled.ready(g, shape, dtype)
        assert answer == (_ready_reference(g, shape, dtype) and all(type(d) is int for d in shape)), (
            g, shape)
        if answer:  # what the fast path lets through, the full check accepts
            assert check.grad_buffer(g, shape, dtype) is g
    assert compiled.ready(fresh, (3, 4), dtype)  # the common case is answered True


def test_ready_apart_matches_its_definition(compiled):
    base = np.zeros(24, np.float32)
    like = np.zeros((2, 3), np.float32)
    pieces = [base[:6].reshape(2, 3), base[6:12].reshape(2, 3), base[3:9].reshape(2, 3),
              base[12:24:2].reshape(2, 3), np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32),
              np.zeros((2, 3), np.float64), base[:6].reshape(2, 3).T.copy().T]
    inputs = [(), (base[18:],), (None, base[20:21]), (np.zeros(3),)]

    def reference(buffers, likes, extra):
        return (len(buffers) == len(likes)
                and all(type(b) is np.ndarray and b.flags.writeable and b.shape == k.shape
                        and b.dtype is k.dtype for b, k in zip(buffers, likes))
                and all(_apart_reference(b, c) for b, c in itertools.combinations(buffers, 2))
                and all(_apart_reference(b, x) for b in buffers for x in extra))

    checked = 0
    for n in (1, 2, 3):
        for buffers in itertools.permutations(pieces, n):
            for extra in inputs:
                assert compiled.ready_apart(buffers, (like,) * n, extra) == reference(
                    buffers, (like,) * n, extra)
                checked += 1
    assert checked > 1000
    assert not compiled.ready_apart((pieces[0], pieces[1]), (like,))  # one like per buffer


def test_writes_directly_matches_its_definition(compiled):
    checked = 0
    for g in VIEWS:
        # the same first element as g, but another layout or dtype: not the same view
        other_layout = np.lib.stride_tricks.as_strided(g, strides=tuple(2 * t for t in g.strides))
        other_dtype = g.view(np.int64) if g.dtype.itemsize == 8 and g.ndim else g
        for inplace_ok in [None, g, g[...], VIEWS[0], VIEWS[21], other_layout, other_dtype]:
            for reads in [(), (None,), (VIEWS[1],), (VIEWS[21], None), (VIEWS[2], VIEWS[12])]:
                assert compiled.writes_directly(g, inplace_ok, reads) == _writes_directly_reference(
                    g, inplace_ok, reads), (g.shape, g.strides)
                checked += 1
    assert checked == len(VIEWS) * 35


# ---------------------------------------------------------------------- what they decide


def _in_place_cases():
    """(name, call, first argument, the overlapping argument): ``call(x, other, **kw)`` runs
    a loss with ``x`` first; ``x`` and ``other`` are views of one buffer, ``x`` starting
    ``shift`` elements after ``other``, so a row of ``x`` written early is a row of ``other``
    that a later row reads."""
    rng = np.random.default_rng(5)

    def pair(shape, dtype, shift):
        size = int(np.prod(shape))
        buf = rng.standard_normal(size + shift).astype(dtype)
        return buf[shift:].reshape(shape), buf[:size].reshape(shape)

    for dtype in (np.float32,):  # the choice of buffer does not depend on the dtype
        d = np.dtype(dtype).name
        positive = rng.standard_normal((4, 3)).astype(dtype)
        target = rng.standard_normal(9).astype(dtype)
        yield (f"ce probabilities {d}", fl.softmax_cross_entropy, *pair((6, 5), dtype, 5))
        yield (f"focal probabilities {d}", fl.focal_loss, *pair((6, 5), dtype, 5))
        yield (f"sigmoid focal {d}", fl.sigmoid_focal_loss, *pair((7, 3), dtype, 1))
        yield (f"huber target {d}", fl.huber_loss, *pair((9,), dtype, 1))
        yield (f"huber sample_weight {d}",
               lambda x, w, target=target, **kw: fl.huber_loss(x, target, sample_weight=w, **kw),
               *pair((9,), dtype, 1))
        yield (f"triplet negative {d}",
               lambda x, n, positive=positive, **kw: fl.triplet_margin_loss(x, positive, n, **kw),
               *pair((4, 3), dtype, 3))


@pytest.mark.parametrize("case", list(_in_place_cases()), ids=lambda c: c[0])
def test_in_place_with_another_input_overlapping_the_first(case):
    """``grad_out=<first argument>`` is SPEC's in-place mode; another input that overlaps
    the first argument, shifted, must still be read as it was: the CPU writes through a
    temporary then (it once wrote in place, and later rows read gradients as targets)."""
    name, call, x, other = case
    want_loss, want_grad = call(x.copy(), other.copy())
    if "triplet" in name:
        outs = (x, np.empty_like(x), np.empty_like(x))
        loss, grads = call(x, other, grad_out=outs)
        assert all(g is o for g, o in zip(grads, outs))
        for g, w in zip(grads, want_grad):
            np.testing.assert_array_equal(g, w, err_msg=name)
    else:
        loss, grad = call(x, other, grad_out=x)
        assert grad is x
        np.testing.assert_array_equal(grad, want_grad, err_msg=name)
    np.testing.assert_array_equal(np.asarray(loss), np.asarray(want_loss), err_msg=name)


_UNBUILT_SCRIPT = r"""
import sys
sys.modules["fastloss.cpu._buffer_checks"] = None  # as in a source tree never built
sys.path.insert(0, sys.argv[1])
import numpy as np
import fastloss as fl
from fastloss.cpu import _storage
import naive
assert not _storage.ready(np.zeros(2), (2,), np.dtype(np.float64)), "the compiled checks loaded"
rng = np.random.default_rng(0)
x = rng.standard_normal((5, 4)).astype(np.float32)
y = rng.integers(0, 4, 5)
t = rng.standard_normal(x.shape).astype(np.float32)
cases = {
    "ce": (lambda **kw: fl.softmax_cross_entropy(x, y, **kw), x),
    "focal": (lambda **kw: fl.focal_loss(x, y, **kw), x),
    "sigmoid focal": (lambda **kw: fl.sigmoid_focal_loss(x, t, **kw), x),
    "huber": (lambda **kw: fl.huber_loss(x, t, **kw), x),
    "center": (lambda **kw: fl.center_loss(x, y, np.zeros((4, 4), np.float32), **kw), x),
    "batch triplet": (lambda **kw: fl.batch_triplet_loss(x, y, **kw), x),
}
for name, (call, like) in cases.items():
    want_loss, want_grad = call()
    for layout in ("c", "fortran", "strided"):
        g = np.empty_like(like) if layout == "c" else (
            np.asfortranarray(np.empty_like(like)) if layout == "fortran"
            else np.empty((like.shape[0], 2 * like.shape[1]), like.dtype)[:, ::2])
        loss, grad = call(grad_out=g)
        assert grad is g, name
        naive.assert_close(grad, want_grad, np.float32, what=f"{name} {layout}")
        naive.assert_close(loss, want_loss, np.float32, what=f"{name} {layout}")
    try:
        call(grad_out=np.empty((2, 2), np.float32))
    except ValueError as exc:
        assert "grad_out" in str(exc), exc
    else:
        raise AssertionError(f"{name}: a grad_out of the wrong shape was taken")
a, p, n = (rng.standard_normal((3, 4)).astype(np.float32) for _ in range(3))
want = fl.triplet_margin_loss(a, p, n).grad
outs = tuple(np.empty_like(a) for _ in range(3))
got = fl.triplet_margin_loss(a, p, n, grad_out=outs).grad
assert all(g is o for g, o in zip(got, outs))
for g, w in zip(got, want):
    naive.assert_close(g, w, np.float32, what="triplet")
E, W = rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32)
want = fl.linear_cross_entropy(E, W, y).grad
outs = (np.empty_like(E), np.empty_like(W))
got = fl.linear_cross_entropy(E, W, y, grad_out=outs).grad
for g, w in zip(got, want):
    naive.assert_close(g, w, np.float32, what="linear cross-entropy")
print("ok")
"""


def test_every_grad_out_path_without_the_compiled_checks():
    """A source tree whose extension was never built runs the Python fallback: the full
    checks and a temporary for every ``grad_out``; the results and errors are the same."""
    done = subprocess.run([sys.executable, "-c", _UNBUILT_SCRIPT, str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (
        f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


_OUTCOMES_SCRIPT = r"""
import sys
if sys.argv[1] == "fallback":
    sys.modules["fastloss.cpu._buffer_checks"] = None
import numpy as np
import fastloss as fl
from fastloss.cpu import _storage
assert _storage.ready(np.zeros(1), (1,), np.dtype(np.float64)) == (sys.argv[1] == "compiled")
rng = np.random.default_rng(3)
f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
x, y = f32(5, 4), rng.integers(0, 4, 5)
a, p, n = f32(3, 4), f32(3, 4), f32(3, 4)
E, W, b = f32(5, 3), f32(4, 3), f32(4)
buf = np.zeros(40, np.float32)
readonly = np.zeros((5, 4), np.float32)
readonly.flags.writeable = False


class Sub(np.ndarray):
    pass


def outs(*likes):
    return tuple(np.zeros_like(v) for v in likes)


def buffers():
    # (name, call): every way a grad_out reaches the checks, fresh buffers each time
    yield "ce fresh", lambda: fl.softmax_cross_entropy(x, y, grad_out=np.zeros_like(x))
    yield "ce in place", lambda: (lambda x2: fl.softmax_cross_entropy(x2, y, grad_out=x2))(x.copy())
    yield "ce wrong shape", lambda: fl.softmax_cross_entropy(x, y, grad_out=np.zeros((4, 5), np.float32))
    yield "ce wrong dtype", lambda: fl.softmax_cross_entropy(x, y, grad_out=np.zeros((5, 4)))
    yield "ce read-only", lambda: fl.softmax_cross_entropy(x, y, grad_out=readonly)
    yield "ce subclass", lambda: fl.softmax_cross_entropy(x, y, grad_out=np.zeros_like(x).view(Sub))
    yield "ce fortran", lambda: fl.softmax_cross_entropy(x, y, grad_out=np.asfortranarray(np.zeros_like(x)))
    yield "ce over probs", lambda: (lambda g: fl.softmax_cross_entropy(
        x, np.abs(g) + 0.1, grad_out=g))(np.ones_like(x))
    yield "huber over target", lambda: (lambda t: fl.huber_loss(x, t, grad_out=t))(f32(5, 4))
    yield "center over centers", lambda: (lambda c: fl.center_loss(
        x, y, c, grad_out=np.broadcast_to(c[:1], x.shape)))(f32(4, 4))
    yield "center over centers 2", lambda: (lambda c: fl.center_loss(x, y, c[:4], grad_out=c[2:7]))(f32(9, 4))
    yield "center beside centers", lambda: (lambda c: fl.center_loss(x, y, c[:4], grad_out=c[4:9]))(f32(9, 4))
    yield "center fresh", lambda: fl.center_loss(x, y, f32(4, 4), grad_out=np.zeros_like(x))
    yield "triplet fresh", lambda: fl.triplet_margin_loss(a, p, n, grad_out=outs(a, a, a))
    yield "triplet in place", lambda: (lambda a2, p2, n2: fl.triplet_margin_loss(
        a2, p2, n2, grad_out=(a2, p2, n2)))(a.copy(), p.copy(), n.copy())
    yield "triplet crossed", lambda: (lambda a2, p2, n2: fl.triplet_margin_loss(
        a2, p2, n2, grad_out=(p2, n2, a2)))(a.copy(), p.copy(), n.copy())
    yield "triplet one buffer twice", lambda: (lambda g: fl.triplet_margin_loss(
        a, p, n, grad_out=(g, g, np.zeros_like(a))))(np.zeros_like(a))
    yield "triplet overlapping", lambda: fl.triplet_margin_loss(
        a, p, n, grad_out=(buf[:12].reshape(3, 4), buf[10:22].reshape(3, 4), np.zeros_like(a)))
    yield "triplet list", lambda: fl.triplet_margin_loss(a, p, n, grad_out=list(outs(a, a, a)))
    yield "triplet wrong dtype", lambda: fl.triplet_margin_loss(a, p, n, grad_out=outs(a, a, a.astype(float)))
    yield "triplet read-only", lambda: fl.triplet_margin_loss(a, p, n, grad_out=(readonly[:3], ) + outs(a, a))
    yield "linear fresh", lambda: fl.linear_cross_entropy(E, W, y, grad_out=outs(E, W))
    yield "linear with bias", lambda: fl.linear_cross_entropy(E, W, y, bias=b, grad_out=outs(E, W, b))
    yield "linear missing bias grad", lambda: fl.linear_cross_entropy(E, W, y, bias=b, grad_out=outs(E, W))
    yield "linear extra grad", lambda: fl.linear_cross_entropy(E, W, y, grad_out=outs(E, W, b))
    yield "linear over embeddings", lambda: (lambda E2: fl.linear_cross_entropy(
        E2, W, y, grad_out=(E2, np.zeros_like(W))))(E.copy())
    yield "linear outputs overlapping", lambda: fl.linear_cross_entropy(
        E, W, y, grad_out=(buf[:15].reshape(5, 3), buf[12:24].reshape(4, 3)))
    yield "linear over sample_weight", lambda: (lambda g: fl.linear_cross_entropy(
        E, W, y, sample_weight=g.reshape(-1)[:5], grad_out=(g, np.zeros_like(W))))(np.ones_like(E))
    yield "linear strided", lambda: fl.linear_cross_entropy(
        E, W, y, grad_out=(np.zeros((5, 6), np.float32)[:, ::2], np.zeros_like(W)))
    yield "linear list target", lambda: fl.linear_cross_entropy(E, W, y.tolist(), grad_out=outs(E, W))


for name, call in buffers():
    try:
        loss, grad = call()
    except (TypeError, ValueError) as exc:
        print(name, "|", type(exc).__name__, exc)
        continue
    grads = grad if isinstance(grad, tuple) else (grad,)
    print(name, "|", repr(float(loss)), [np.asarray(g).tobytes().hex() for g in grads])
"""


def test_compiled_and_fallback_agree_on_every_grad_out_case():
    """The compiled checks change nothing but speed: with and without the extension, each
    grad_out case (fresh, in place, crossed, overlapping, of the wrong kind) gives the
    same bits or the same error message."""
    pytest.importorskip("fastloss.cpu._buffer_checks")
    runs = [subprocess.run([sys.executable, "-c", _OUTCOMES_SCRIPT, how], capture_output=True,
                           text=True, timeout=600, check=False) for how in ("compiled", "fallback")]
    for done in runs:
        assert done.returncode == 0, done.stderr[-4000:]
    compiled, fallback = (done.stdout.splitlines() for done in runs)
    assert len(compiled) == 30 and any("Error" in line for line in compiled)
    for a, b in zip(compiled, fallback):
        assert a == b
