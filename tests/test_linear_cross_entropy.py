"""fastloss.linear_cross_entropy against the float64 reference of naive.py, and PyTorch.

``naive.linear_cross_entropy`` forms the ``(N, V)`` logits whole and applies the cross-entropy
reference, gradients by the chain rule; fastloss never forms them, walking the classes in
blocks (``block_size``) or, by default on the CPU, in chunks of whole rows, so the tests here
cross both: one class per block, ragged blocks that cut a row's target from its max, one block
for everything, chunks of two rows (``CHUNKS``), the default.

The tests marked ``cuda`` (at the end) take the GPU path, under the simulator in CI: there
the products are the plain kernel's, the matrix smaller.
"""
import tracemalloc

import numpy as np
import pytest

import fastloss as fl
import naive
import sides
from fastloss.cpu import linear_cross_entropy as cpu_linear
from fastloss.cpu._rows import use_threads
from naive import assert_close, finite_difference

DTYPES = [np.float16, np.float32, np.float64]
REDUCTIONS = ["mean", "sum", "none"]
#: every option, alone and all together (True: drawn at random by ``make``)
OPTIONS = {
    "plain": {},
    "bias": {"bias": True},
    "weight, sample_weight": {"weight": True, "sample_weight": True},
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 0.05},
    "softcap": {"softcap": 2.0},
    "every option": {"bias": True, "weight": True, "sample_weight": True, "label_smoothing": 0.2,
                     "z_loss": 0.01, "softcap": 3.0},
}
CHUNKS = "chunks of 2 rows"
BLOCKS = [None, CHUNKS, 1, 7, 10_000]


def walk(block, w, monkeypatch):
    """The ``block_size`` argument of a ``BLOCKS`` entry: ``CHUNKS`` is the default (None)
    with the CPU's chunks of whole rows set to two rows."""
    if block != CHUNKS:
        return block
    monkeypatch.setattr(cpu_linear, "CHUNK_BYTES", 2 * w.shape[0] * w.itemsize)
    monkeypatch.setattr(cpu_linear, "MIN_CHUNK_ROWS", 1)
    return None


def make(rng, batch, H, V, dtype, options=(), *, scale=1.0, ignore=True):
    """``(embeddings, classifier, target, kwargs)``: logits of about ``scale`` standard
    deviations; the target of one row in four ignored (``ignore``)."""
    batch = tuple(batch)
    e = (rng.normal(size=batch + (H,)) * scale).astype(dtype)
    w = (rng.normal(size=(V, H)) / np.sqrt(H)).astype(dtype)
    y = rng.integers(0, V, size=batch)
    if ignore and y.size:
        y.reshape(-1)[::4] = -100
    kw = {}
    for k, v in dict(options).items():
        if v is not True:
            kw[k] = v
        elif k == "bias":
            kw[k] = rng.normal(size=V).astype(dtype)
        elif k == "weight":
            kw[k] = rng.uniform(0.2, 2.0, size=V).astype(dtype)
        elif k == "sample_weight":
            kw[k] = rng.uniform(0.0, 2.0, size=batch).astype(dtype)
    return e, w, y, kw


def check(res, want, dtype, what=""):
    """fastloss's LossGrad against naive's ``(loss, grads)``: values within the dtype's
    round-off, gradients of the inputs' dtype."""
    loss, grads = res
    want_loss, want_grads = want
    assert np.asarray(loss).dtype == dtype, what
    finite = np.abs(np.asarray(want_loss)[np.isfinite(want_loss)])
    assert_close(loss, want_loss, dtype, scale=max(1.0, float(finite.max())) if finite.size else 1.0,
                 what=f"{what} loss")
    if want_grads is None:
        assert grads is None
        return
    assert isinstance(grads, tuple) and len(grads) == len(want_grads), what
    for k, (g, w) in enumerate(zip(grads, want_grads)):
        assert g.dtype == dtype, (what, k, g.dtype)
        assert_close(g, w, dtype, what=f"{what} grad[{k}]")


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_the_reference(dtype, reduction, option, block, monkeypatch):
    rng = np.random.default_rng([DTYPES.index(dtype), len(option), BLOCKS.index(block)])
    e, w, y, kw = make(rng, (3, 5), 6, 23, dtype, OPTIONS[option])
    res = fl.linear_cross_entropy(e, w, y, reduction=reduction,
                                  block_size=walk(block, w, monkeypatch), **kw)
    check(res, naive.linear_cross_entropy(e, w, y, reduction=reduction, **kw), np.dtype(dtype),
          f"{option} block={block}")


@pytest.mark.parametrize("block", [1024, None])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_parallel_path_matches_the_reference(dtype, block, monkeypatch):
    """Blocks of 96 x 1024 logits, or chunks of 40 rows x 2500 classes, take the threaded
    kernels."""
    assert use_threads(np.empty((96, 1024))) and use_threads(np.empty((40, 2500)))
    monkeypatch.setattr(cpu_linear, "CHUNK_BYTES", 40 * 2500 * np.dtype(dtype).itemsize)
    monkeypatch.setattr(cpu_linear, "MIN_CHUNK_ROWS", 40)
    rng = np.random.default_rng(5)
    e, w, y, kw = make(rng, (96,), 16, 2500, dtype, OPTIONS["every option"], scale=3.0)
    res = fl.linear_cross_entropy(e, w, y, block_size=block, **kw)
    check(res, naive.linear_cross_entropy(e, w, y, **kw), np.dtype(dtype))


def test_chunks_of_rows_where_they_pay():
    """The default walk: chunks of whole rows within ``CHUNK_BYTES`` while they are tall,
    else blocks of classes (None): a wide vocabulary, float16 (W would be widened whole), a
    block size the caller set."""
    f32, f16 = np.dtype(np.float32), np.dtype(np.float16)
    fit = cpu_linear.CHUNK_BYTES // (32768 * 4)
    assert fit >= cpu_linear.MIN_CHUNK_ROWS
    assert cpu_linear.chunk_rows(2048, 32768, f32, None) == fit
    assert cpu_linear.chunk_rows(10, 32768, f32, None) == 10
    wide = cpu_linear.CHUNK_BYTES // (4 * (cpu_linear.MIN_CHUNK_ROWS - 1))
    assert cpu_linear.chunk_rows(2048, wide, f32, None) is None
    assert cpu_linear.chunk_rows(2048, 32768, f16, None) is None
    assert cpu_linear.chunk_rows(2048, 32768, f32, 512) is None


@pytest.mark.parametrize("rows", [1, 3, 7, 1000])
@pytest.mark.parametrize("option", ["plain", "bias", "every option"])
def test_chunks_of_rows_change_only_round_off(option, rows, monkeypatch):
    """Chunks of 1, 3 (ragged), 7 rows and one chunk against one block of every class;
    ``grad_out`` written directly, or through the strided and transposed buffers a chunk
    cannot write in place."""
    rng = np.random.default_rng(13)
    e, w, y, kw = make(rng, (20,), 8, 45, np.float64, OPTIONS[option], scale=3.0)
    whole = fl.linear_cross_entropy(e, w, y, block_size=45, **kw)
    monkeypatch.setattr(cpu_linear, "CHUNK_BYTES", rows * 45 * 8)
    monkeypatch.setattr(cpu_linear, "MIN_CHUNK_ROWS", 1)
    assert cpu_linear.chunk_rows(20, 45, e.dtype, None) == min(20, rows)
    shapes = [e.shape, w.shape] + ([(45,)] if "bias" in kw else [])
    direct = tuple(np.full(s, 7.0) for s in shapes)
    strided = (np.full(e.shape[::-1], 7.0).T, np.full((45, 16), 7.0)[:, ::2],
               np.full(90, 7.0)[::2])[:len(shapes)]
    for outs in (None, direct, strided):
        part = fl.linear_cross_entropy(e, w, y, grad_out=outs, **kw)
        np.testing.assert_allclose(part.loss, whole.loss, rtol=1e-13)
        for k, (g, f) in enumerate(zip(part.grad, whole.grad)):
            assert outs is None or g is outs[k]
            np.testing.assert_allclose(g, f, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("option", OPTIONS)
def test_gradients_match_finite_differences(option):
    rng = np.random.default_rng(11)
    e, w, y, kw = make(rng, (4,), 3, 9, np.float64, OPTIONS[option])
    _, grads = fl.linear_cross_entropy(e, w, y, block_size=4, **kw)
    inputs = [e, w] + ([kw["bias"]] if "bias" in kw else [])
    for k, x in enumerate(inputs):
        for index in [(0,) * x.ndim, tuple(s - 1 for s in x.shape), tuple(s // 2 for s in x.shape)]:
            def f(v, k=k):
                args = [v if j == k else a for j, a in enumerate(inputs)]
                extra = {"bias": args[2]} if len(args) == 3 else {}
                return fl.linear_cross_entropy(args[0], args[1], y, grad=False,
                                               **{**kw, **extra}).loss
            want = finite_difference(f, x, index)
            assert abs(grads[k][index] - want) <= 1e-7 * max(1.0, abs(want)), (option, k, index)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_false_gives_the_same_loss_and_no_gradient(dtype):
    rng = np.random.default_rng(2)
    e, w, y, kw = make(rng, (7,), 5, 40, dtype, OPTIONS["every option"])
    full = fl.linear_cross_entropy(e, w, y, block_size=16, reduction="none", **kw)
    alone = fl.linear_cross_entropy(e, w, y, block_size=16, reduction="none", grad=False, **kw)
    assert alone.grad is None
    np.testing.assert_array_equal(alone.loss, full.loss)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_out_is_written_and_returned(dtype, bias):
    rng = np.random.default_rng(3)
    e, w, y, kw = make(rng, (2, 3), 4, 11, dtype, {"bias": True} if bias else {})
    fresh = fl.linear_cross_entropy(e, w, y, block_size=5, **kw)
    outs = tuple(np.full(a.shape, 7, dtype) for a in (e, w) + ((kw["bias"],) if bias else ()))
    res = fl.linear_cross_entropy(e, w, y, block_size=5, grad_out=outs, **kw)
    assert all(g is o for g, o in zip(res.grad, outs))
    for g, f in zip(res.grad, fresh.grad):
        np.testing.assert_array_equal(g, f)
    np.testing.assert_array_equal(res.loss, fresh.loss)


def test_grad_out_may_be_non_contiguous():
    rng = np.random.default_rng(4)
    e, w, y, kw = make(rng, (6,), 4, 9, np.float32, {"bias": True})
    fresh = fl.linear_cross_entropy(e, w, y, **kw)
    outs = (np.zeros((4, 6), np.float32).T, np.zeros((9, 8), np.float32)[:, ::2],
            np.zeros(18, np.float32)[::2])
    res = fl.linear_cross_entropy(e, w, y, grad_out=outs, **kw)
    for g, f in zip(res.grad, fresh.grad):
        np.testing.assert_array_equal(g, f)


def test_the_block_size_changes_only_round_off():
    rng = np.random.default_rng(6)
    e, w, y, kw = make(rng, (33,), 8, 301, np.float64, OPTIONS["every option"], scale=4.0)
    whole = fl.linear_cross_entropy(e, w, y, block_size=301, **kw)
    for block in (1, 2, 64, 300):
        part = fl.linear_cross_entropy(e, w, y, block_size=block, **kw)
        np.testing.assert_allclose(part.loss, whole.loss, rtol=1e-13)
        for g, f in zip(part.grad, whole.grad):
            np.testing.assert_allclose(g, f, rtol=1e-12, atol=1e-15)


def test_non_contiguous_inputs():
    rng = np.random.default_rng(7)
    e, w, y, kw = make(rng, (10,), 6, 30, np.float32, OPTIONS["every option"])
    want = fl.linear_cross_entropy(e, w, y, block_size=8, **kw)
    strided = {k: (np.repeat(v, 2)[::2] if getattr(v, "ndim", 0) == 1 else v) for k, v in kw.items()}
    got = fl.linear_cross_entropy(np.asfortranarray(e), np.repeat(w, 2, axis=1)[:, ::2],
                                  np.repeat(y, 2)[::2], block_size=8, **strided)
    np.testing.assert_array_equal(got.loss, want.loss)
    for g, f in zip(got.grad, want.grad):
        np.testing.assert_array_equal(g, f)


# ----------------------------------------------------------------- numerics at the extremes


@pytest.mark.parametrize("level", [1e4, -1e4, 88.0, -88.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_of_equal_large_logits_keep_their_digits(dtype, level):
    """SPEC's numerics: logits all equal to ``level`` (a zero classifier and a bias of
    ``level``) give log V to round-off in every dtype, across blocks."""
    V = 7
    e = np.ones((3, 2), dtype)
    w = np.zeros((V, 2), dtype)
    bias = np.full(V, level, dtype)
    if dtype == np.float16 and abs(level) > 6e4:
        pytest.skip("not a float16 value")
    loss, grads = fl.linear_cross_entropy(e, w, np.array([0, 3, 6]), bias=bias, block_size=3)
    rtol = {np.float16: 1e-3, np.float32: 1e-6, np.float64: 1e-14}[dtype]
    np.testing.assert_allclose(float(loss), np.log(V), rtol=rtol)
    want_db = (np.full(V, 3 / V) - np.bincount([0, 3, 6], minlength=V)) / 3
    np.testing.assert_allclose(grads[2].astype(np.float64), want_db, atol=10 * rtol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_dominant_logit_in_another_block(dtype):
    """One class far above the others, in a block after the target's: loss ~ its margin,
    no overflow; the target's probability ~ 0."""
    V = 12
    e = np.ones((2, 1), dtype)
    w = np.zeros((V, 1), dtype)
    bias = np.zeros(V, dtype)
    bias[10] = 5e3 if dtype != np.float16 else 6e3
    loss, grads = fl.linear_cross_entropy(e, w, np.array([1, 10]), bias=bias, block_size=4,
                                          reduction="none")
    assert np.isfinite(loss).all() and all(np.isfinite(g).all() for g in grads)
    want, want_grads = naive.linear_cross_entropy(e, w, np.array([1, 10]), bias=bias, reduction="none")
    assert_close(loss, want, dtype, scale=float(np.abs(want).max()))
    assert_close(grads[2], want_grads[2], dtype)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_a_first_block_of_masked_classes(smoothing):
    """Classes masked by a -inf bias fill the first blocks: the loss stays finite (inf with
    smoothing, whose sum takes every class, as in the whole row) and matches the reference."""
    rng = np.random.default_rng(15)
    e, w, y, _ = make(rng, (6,), 4, 40, np.float64, ignore=False)
    bias = np.zeros(40)
    bias[:16] = -np.inf
    y[:] = rng.integers(16, 40, size=6)
    res = fl.linear_cross_entropy(e, w, y, bias=bias, block_size=8, label_smoothing=smoothing)
    want = naive.linear_cross_entropy(e, w, y, bias=bias, label_smoothing=smoothing)
    if smoothing:
        assert np.isposinf(res.loss)
        return
    check(res, want, np.dtype(np.float64))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_logits_of_1e4_match_the_reference(dtype):
    rng = np.random.default_rng(8)
    e, w, y, kw = make(rng, (9,), 4, 50, dtype, OPTIONS["every option"], scale=1e4)
    kw.pop("softcap")
    res = fl.linear_cross_entropy(e, w, y, block_size=16, **kw)
    want = naive.linear_cross_entropy(e, w, y, **kw)
    assert np.isfinite(res.loss) and all(np.isfinite(g).all() for g in res.grad)
    check(res, want, np.dtype(dtype))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_an_empty_batch(reduction):
    e, w = np.zeros((0, 3), np.float32), np.ones((5, 3), np.float32)
    loss, (de, dw, db) = fl.linear_cross_entropy(e, w, np.zeros(0, np.int64), bias=np.ones(5, np.float32),
                                                 reduction=reduction)
    if reduction == "mean":
        assert np.isnan(loss)
    else:
        assert loss.shape == ((0,) if reduction == "none" else ()) and not np.any(loss)
    assert de.shape == (0, 3) and not dw.any() and not db.any()


def test_every_row_ignored():
    e, w = np.ones((3, 2), np.float64), np.ones((4, 2), np.float64)
    loss, (de, dw) = fl.linear_cross_entropy(e, w, np.full(3, -100))
    assert np.isnan(loss) and not de.any() and not dw.any()


# ----------------------------------------------------------------- PyTorch


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_pytorch_autograd(dtype, reduction, option):
    """Against autograd of ``cross_entropy(E @ W.T + b)`` (z-loss, soft-cap and sample weights in
    tensor ops: PyTorch has no keyword for them)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    e, w, y, kw = make(rng, (2, 6), 8, 37, dtype, OPTIONS[option])
    res = fl.linear_cross_entropy(e, w, y, reduction=reduction, block_size=16, **kw)
    te, tw = torch.tensor(e, requires_grad=True), torch.tensor(w, requires_grad=True)
    leaves = [te, tw]
    z = te @ tw.T
    if "bias" in kw:
        tb = torch.tensor(kw["bias"], requires_grad=True)
        leaves.append(tb)
        z = z + tb
    if "softcap" in kw:
        z = kw["softcap"] * torch.tanh(z / kw["softcap"])
    z = z.reshape(-1, w.shape[0])
    ty = torch.tensor(y.reshape(-1))
    cw = torch.tensor(kw["weight"]) if "weight" in kw else None
    per = torch.nn.functional.cross_entropy(z, ty, weight=cw, reduction="none",
                                            label_smoothing=kw.get("label_smoothing", 0.0))
    kept = ty != -100
    per = per + kw.get("z_loss", 0.0) * torch.logsumexp(z, 1) ** 2 * kept
    sw = torch.tensor(kw["sample_weight"].reshape(-1)) if "sample_weight" in kw else torch.ones_like(per)
    per = per * sw
    if reduction == "mean":
        wy = cw[torch.where(kept, ty, 0)] if cw is not None else torch.ones_like(per)
        total = per.sum() / (wy * sw * kept).sum()
    else:
        total = per.sum()
    grads = torch.autograd.grad(total, leaves)
    want = per.reshape(y.shape) if reduction == "none" else total
    tol = 2e-5 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(res.loss, want.detach().numpy(), rtol=tol, atol=tol)
    for g, t in zip(res.grad, grads):
        np.testing.assert_allclose(g, t.numpy(), rtol=tol, atol=tol * float(t.abs().max()))


# ----------------------------------------------------------------- bad input


def _call(**change):
    rng = np.random.default_rng(10)
    e, w, y, kw = make(rng, (4,), 3, 6, np.float32, {"bias": True, "weight": True, "sample_weight": True})
    args = {"embeddings": e, "classifier": w, "target": y, **kw}
    args.update(change)
    return args


BAD = {
    "integer embeddings": ({"embeddings": np.ones((4, 3), np.int64)}, TypeError, "embeddings"),
    "scalar embeddings": ({"embeddings": np.float32(1.0)}, ValueError, "embeddings"),
    "classifier of another H": ({"classifier": np.ones((6, 4), np.float32)}, ValueError, "classifier"),
    "classifier of one axis": ({"classifier": np.ones(6, np.float32)}, ValueError, "classifier"),
    "no classes": ({"classifier": np.ones((0, 3), np.float32), "bias": None, "weight": None},
                   ValueError, "classifier"),
    "classifier of another dtype": ({"classifier": np.ones((6, 3), np.float64)}, TypeError, "classifier"),
    "bias of another length": ({"bias": np.ones(5, np.float32)}, ValueError, "bias"),
    "bias of another dtype": ({"bias": np.ones(6, np.float64)}, TypeError, "bias"),
    "float target": ({"target": np.zeros(4, np.float32)}, TypeError, "target"),
    "target of another shape": ({"target": np.zeros(5, np.int64)}, ValueError, "target"),
    "target out of range": ({"target": np.array([0, 1, 6, 2])}, ValueError, "target"),
    "negative target": ({"target": np.array([0, -1, 2, 2])}, ValueError, "target"),
    "weight of another length": ({"weight": np.ones(5, np.float32)}, ValueError, "weight"),
    "sample_weight of another shape": ({"sample_weight": np.ones(3, np.float32)}, ValueError,
                                       "sample_weight"),
    "label_smoothing above 1": ({"label_smoothing": 1.5}, ValueError, "label_smoothing"),
    "negative z_loss": ({"z_loss": -0.1}, ValueError, "z_loss"),
    "zero softcap": ({"softcap": 0.0}, ValueError, "softcap"),
    "unknown reduction": ({"reduction": "avg"}, ValueError, "reduction"),
    "zero block_size": ({"block_size": 0}, ValueError, "block_size"),
    "float block_size": ({"block_size": 2.5}, TypeError, "block_size"),
    "ignore_index not an integer": ({"ignore_index": 0.5}, TypeError, "ignore_index"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_refused_naming_the_argument(case):
    change, error, name = BAD[case]
    args = _call(**change)
    outs = (np.full((4, 3), 7, np.float32), np.full((6, 3), 7, np.float32), np.full(6, 7, np.float32))
    with pytest.raises(error, match=name):
        fl.linear_cross_entropy(**args, grad_out=outs)
    assert all((o == 7).all() for o in outs), "a grad_out buffer changed on an error"


def _grad_outs(args):
    return [np.empty_like(args[k]) for k in ("embeddings", "classifier", "bias")]


BAD_GRAD_OUT = {
    "one array": (lambda a, o: o[0], TypeError),
    "two without the bias's": (lambda a, o: tuple(o[:2]), TypeError),
    "wrong shape": (lambda a, o: (o[0][:2], o[1], o[2]), ValueError),
    "wrong dtype": (lambda a, o: (o[0], o[1].astype(np.float64), o[2]), TypeError),
    "read-only": (lambda a, o: (o[0], o[1], np.frombuffer(bytes(24), np.float32)), ValueError),
    "the embeddings": (lambda a, o: (a["embeddings"], o[1], o[2]), ValueError),
    "the classifier twice": (lambda a, o: (o[0], a["classifier"], o[2]), ValueError),
    "two outputs in one buffer": (lambda a, o: (o[0], o[1], o[1][:, 0]), ValueError),
}


@pytest.mark.parametrize("case", BAD_GRAD_OUT)
def test_bad_grad_out_is_refused_and_nothing_changes(case):
    make_out, error = BAD_GRAD_OUT[case]
    args = _call()
    before = {k: np.array(v, copy=True) for k, v in args.items() if isinstance(v, np.ndarray)}
    outs = _grad_outs(args)
    with pytest.raises(error, match="grad_out"):
        fl.linear_cross_entropy(**args, grad_out=make_out(args, outs))
    for k, v in before.items():
        np.testing.assert_array_equal(args[k], v, err_msg=k)


# ----------------------------------------------------------------- memory


@pytest.mark.parametrize("block", [None, 1024])
def test_memory_beyond_the_gradients_is_a_tenth_of_the_logits_at_most(block):
    """The issue's size: N = 2048, H = 256, V = 32768 float32, the default chunks of rows and
    blocks of 1024 classes; the traced peak above the returned gradients is at most 10% of
    the (N, V) logits."""
    rng = np.random.default_rng(12)
    n, H, V = 2048, 256, 32768
    e = rng.standard_normal((n, H), dtype=np.float32)
    w = rng.standard_normal((V, H), dtype=np.float32) * np.float32(1 / 16)
    y = rng.integers(0, V, n)
    fl.linear_cross_entropy(e[:64], w[:512], y[:64] % 512, block_size=block)  # compiled beforehand
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        res = fl.linear_cross_entropy(e, w, y, block_size=block)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    beyond = peak - sum(g.nbytes for g in res.grad)
    logits = n * V * 4
    assert beyond <= 0.10 * logits, f"{beyond / 2**20:.1f} MiB beyond the gradients"
    held = n * block if block else cpu_linear.chunk_rows(n, V, e.dtype, None) * V
    assert held * 4 <= beyond  # the instrument sees the block


# ----------------------------------------------------------------- the GPU path


def _on_gpu(dev, e, w, y, **kw):
    """The call on device arrays; its answer on the host."""
    res = fl.linear_cross_entropy(dev.put(e), dev.put(w), dev.put(y), **sides.on_side(dev, kw))
    grads = None if res.grad is None else tuple(dev.get(g) for g in res.grad)
    return fl.LossGrad(dev.get(res.loss), grads)


@pytest.mark.cuda
@pytest.mark.parametrize("option", ["plain", "every option"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_matches_the_reference(dev, dtype, reduction, option):
    rng = np.random.default_rng([DTYPES.index(dtype), len(option)])
    e, w, y, kw = make(rng, (2, 3), 4, 11, dtype, OPTIONS[option])
    got = _on_gpu(dev, e, w, y, reduction=reduction, block_size=4, **kw)
    check(got, naive.linear_cross_entropy(e, w, y, reduction=reduction, **kw), np.dtype(dtype))


@pytest.mark.cuda
@pytest.mark.parametrize("option", ["label_smoothing", "softcap", "bias"])
def test_gpu_options_match_the_reference(dev, option):
    rng = np.random.default_rng(13)
    e, w, y, kw = make(rng, (5,), 3, 9, np.float64, OPTIONS[option])
    got = _on_gpu(dev, e, w, y, block_size=4, **kw)
    check(got, naive.linear_cross_entropy(e, w, y, **kw), np.dtype(np.float64))


@pytest.mark.cuda
def test_gpu_grad_false_grad_out_and_host_inputs(dev):
    rng = np.random.default_rng(14)
    e, w, y, kw = make(rng, (4,), 3, 7, np.float32, {"bias": True})
    want = naive.linear_cross_entropy(e, w, y, **kw)
    alone = _on_gpu(dev, e, w, y, grad=False, block_size=3, **kw)
    assert alone.grad is None
    assert_close(alone.loss, want[0], np.float32)
    outs = tuple(dev.put(np.full(a.shape, 7, np.float32)) for a in (e, w, kw["bias"]))
    res = fl.linear_cross_entropy(dev.put(e), dev.put(w), dev.put(y), bias=dev.put(kw["bias"]),
                                  grad_out=outs, block_size=3)
    assert all(g is o for g, o in zip(res.grad, outs))
    check(fl.LossGrad(dev.get(res.loss), tuple(dev.get(g) for g in res.grad)), want,
          np.dtype(np.float32))
    host = fl.linear_cross_entropy(e, w, y, backend="cuda", block_size=3, **kw)  # copied over and back
    assert isinstance(host.grad[1], np.ndarray)
    check(host, want, np.dtype(np.float32))


@pytest.mark.cuda
def test_gpu_refuses_host_grad_out_and_one_aliasing_a_host_input(dev):
    rng = np.random.default_rng(16)
    e, w, y, _ = make(rng, (4,), 3, 7, np.float32)
    with pytest.raises(TypeError, match=r"grad_out\[0\]"):
        fl.linear_cross_entropy(dev.put(e), dev.put(w), dev.put(y),
                                grad_out=(np.zeros_like(e), dev.put(np.zeros_like(w))))
    before = e.copy()
    with pytest.raises(ValueError, match=r"grad_out\[0\] shares memory with embeddings"):
        fl.linear_cross_entropy(e, w, y, backend="cuda", grad_out=(e, np.zeros_like(w)))
    np.testing.assert_array_equal(e, before)


@pytest.mark.cuda
@pytest.mark.parametrize("level", [1e4, -1e4])
def test_gpu_rows_of_equal_large_logits_keep_their_digits(dev, level):
    V = 7
    res = _on_gpu(dev, np.ones((2, 2), np.float32), np.zeros((V, 2), np.float32), np.array([0, 6]),
                  bias=np.full(V, level, np.float32), block_size=3)
    np.testing.assert_allclose(float(res.loss), np.log(V), rtol=1e-6)


@pytest.mark.cuda
def test_gpu_empty_batch_and_bad_labels(dev):
    res = _on_gpu(dev, np.zeros((0, 2), np.float32), np.ones((3, 2), np.float32),
                  np.zeros(0, np.int64), reduction="sum")
    assert float(res.loss) == 0 and not res.grad[1].any()
    with pytest.raises(ValueError, match="target"):
        _on_gpu(dev, np.ones((2, 2), np.float32), np.ones((3, 2), np.float32), np.array([0, 3]))
    with pytest.raises(ValueError, match="grad_out"):
        w = dev.put(np.ones((3, 2), np.float32))
        fl.linear_cross_entropy(dev.put(np.ones((2, 2), np.float32)), w, dev.put(np.array([0, 1])),
                                grad_out=(dev.put(np.ones((2, 2), np.float32)), w))
