"""Determinism on the CPU (issue 6, part 6): the same inputs and thread count give the
same bits, for every loss; which results also hold across thread counts; and the
center update gives the same bits for any thread count and any row order.

What holds (and is asserted here):

* every loss, every option family, every mining mode and distance: repeated calls
  at a fixed thread count (1 and 2) return the same bits, loss and gradient;
* every loss returns the same bits at 1 and 2 Numba threads: the parallel kernels
  split rows (or fixed chunks of elements) into blocks whose per-row math does
  not depend on the split, write one loss per row (chunk) and sum those serially
  in float64 after the parallel loop; batch mining owns each anchor's outputs and
  the backward each row's gradient.  (The Gram matrix of ``batch_triplet_loss``
  comes from BLAS, whose own threads Numba does not set.)
* the center update (Cython): the same bits for any thread count and any
  permutation of the rows, equal to a NumPy transcription of the rule that sums
  each class's rows in float64 in the lexicographic order of their bytes.

What does not hold: the *loss value* of ``center_loss`` (a float64 sum of the
per-row terms in row order) is not bitwise invariant under a permutation of the
rows, only to round-off (``test_center_loss_value_under_permutation``).
"""
import zlib

import numba
import numpy as np
import pytest

import fastloss as fl
from fastloss.cpu import triplet as cpu_triplet

F16, F32, F64 = np.float16, np.float32, np.float64
TWO_THREADS = numba.config.NUMBA_NUM_THREADS >= 2


def _name(dtype):
    return np.dtype(dtype).name


def _rng(seed=0):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------ the cases
# Each builder takes (dtype, reduction) and returns a callable computing one result
# from inputs fixed at build time (the inputs are never written: center_loss gets a
# copy of its centers, returned with the result).  The shapes take the threaded
# path of every kernel (at least 2 * 16384 elements).

N, C = 256, 300  # rows x classes: 76800 elements, 5 blocks of 54 rows


def _logits(dtype, seed=0):
    rng = _rng(seed)
    x = (3 * rng.normal(size=(N, C))).astype(dtype)
    y = rng.integers(0, C, size=N)
    return rng, x, y


def _probs(rng, dtype):
    t = rng.random((N, C)) ** 4
    return (t / t.sum(axis=1, keepdims=True)).astype(dtype)


def ce(**options):
    def build(dtype, reduction):
        rng, x, y = _logits(dtype)
        kw = dict(options)
        target = y
        if kw.pop("probs", False):
            target = _probs(rng, dtype)
        if kw.pop("ignore", False):
            y[::7] = -100
        if kw.pop("weight", False):
            kw["weight"] = rng.random(C).astype(dtype) + 0.5
        if kw.pop("sample_weight", False):
            kw["sample_weight"] = rng.random(N).astype(dtype)
        return lambda: fl.softmax_cross_entropy(x, target, reduction=reduction, **kw)
    return build


def focal(**options):
    def build(dtype, reduction):
        rng, x, y = _logits(dtype, 1)
        kw = dict(options)
        target = y
        if kw.pop("probs", False):
            target = _probs(rng, dtype)
        if kw.pop("ignore", False):
            y[::5] = -100
        if kw.pop("alpha_vector", False):
            kw["alpha"] = rng.random(C).astype(dtype)
        if kw.pop("sample_weight", False):
            kw["sample_weight"] = rng.random(N).astype(dtype)
        return lambda: fl.focal_loss(x, target, reduction=reduction, **kw)
    return build


def sigmoid_focal(**options):
    def build(dtype, reduction):
        rng = _rng(2)
        x = (4 * rng.normal(size=(N, C))).astype(dtype)
        t = (rng.random((N, C)) < 0.1).astype(dtype)
        return lambda: fl.sigmoid_focal_loss(x, t, reduction=reduction, **options)
    return build


def huber(weights=None, **options):
    def build(dtype, reduction):
        rng = _rng(3)
        x = (2 * rng.normal(size=(N, C))).astype(dtype)
        t = rng.normal(size=(N, C)).astype(dtype)
        kw = dict(options)
        if weights is not None:
            kw["sample_weight"] = rng.random(weights).astype(dtype)
        return lambda: fl.huber_loss(x, t, reduction=reduction, **kw)
    return build


def triplet(**options):
    def build(dtype, reduction):
        rng = _rng(4)
        a, p, n = (rng.normal(size=(512, 96)).astype(dtype) for _ in range(3))
        return lambda: fl.triplet_margin_loss(a, p, n, reduction=reduction, **options)
    return build


def batch(mining, distance, soft=False, nan=False, n=96, d=40):
    def build(dtype, reduction):
        rng = _rng(5)
        e = rng.normal(size=(n, d)).astype(dtype)
        labels = rng.integers(0, 6, size=n)
        if nan:
            e[7, 3] = np.nan
        return lambda: fl.batch_triplet_loss(e, labels, mining=mining, distance=distance,
                                             soft=soft, margin=0.5, reduction=reduction)
    return build


def center(centers_dtype=None, update=True):
    def build(dtype, reduction):
        rng = _rng(6)
        x = rng.normal(size=(4000, 24)).astype(dtype)
        labels = rng.integers(0, 37, size=4000)
        c0 = rng.normal(size=(37, 24)).astype(centers_dtype or (F32 if dtype == F16 else dtype))

        def call():
            c = c0.copy()
            loss, grad = fl.center_loss(x, labels, c, update=update, reduction=reduction)
            return loss, (grad, c)
        return call
    return build


def center_update_only():
    def build(dtype, reduction):
        rng = _rng(7)
        x = rng.normal(size=(4000, 24)).astype(dtype)
        labels = rng.integers(0, 37, size=4000)
        c0 = rng.normal(size=(37, 24)).astype(F32 if dtype == F16 else dtype)
        return lambda: (np.float64(0), fl.center_update(c0.copy(), x, labels))
    return build


FAMILIES = {
    "ce": ce(),
    "ce-weight": ce(weight=True),
    "ce-sample_weight": ce(sample_weight=True),
    "ce-ignore_index": ce(ignore=True),
    "ce-label_smoothing": ce(label_smoothing=0.1),
    "ce-z_loss": ce(z_loss=1e-3),
    "ce-softcap": ce(softcap=5.0),
    "ce-probs": ce(probs=True),
    "ce-probs-smoothing-weight": ce(probs=True, label_smoothing=0.2, weight=True),
    "ce-everything": ce(weight=True, sample_weight=True, ignore=True, label_smoothing=0.1,
                        z_loss=1e-4, softcap=10.0),
    "focal": focal(),
    "focal-gamma0.5-alpha": focal(gamma=0.5, alpha=0.25),
    "focal-alpha_vector": focal(alpha_vector=True),
    "focal-probs": focal(probs=True),
    "focal-sample_weight-ignore": focal(sample_weight=True, ignore=True),
    "sigmoid_focal": sigmoid_focal(),
    "sigmoid_focal-no_alpha": sigmoid_focal(alpha=-1.0),
    "sigmoid_focal-gamma0.5": sigmoid_focal(gamma=0.5),
    "huber": huber(),
    "huber-delta0.5": huber(delta=0.5),
    "huber-row_weights": huber(weights=(N, 1)),
    "huber-column_weights": huber(weights=(C,)),
    "huber-full_weights": huber(weights=(N, C)),
    "triplet-euclidean": triplet(),
    "triplet-squared": triplet(distance="squared_euclidean"),
    "triplet-cosine": triplet(distance="cosine"),
    "triplet-euclidean-swap": triplet(swap=True),
    "triplet-cosine-swap": triplet(distance="cosine", swap=True),
    "center_loss": center(),
    "center_loss-f64_centers": center(centers_dtype=F64),
    "center_loss-no_update": center(update=False),
    "center_update": center_update_only(),
}
for _mining in ("hard", "semihard", "all"):
    for _distance in ("euclidean", "squared_euclidean", "cosine"):
        for _soft in (False, True):
            FAMILIES[f"batch-{_mining}-{_distance}{'-soft' if _soft else ''}"] = batch(
                _mining, _distance, _soft)
FAMILIES["batch-hard-euclidean-nan"] = batch("hard", "euclidean", nan=True)

# every family in float32 with "mean"; the other dtypes and reductions on the base families
VARIANTS = [(f, F32, "mean") for f in FAMILIES]
for _f in ("ce", "ce-probs", "focal", "focal-probs", "sigmoid_focal", "huber",
           "huber-row_weights", "triplet-euclidean", "triplet-cosine", "batch-hard-euclidean",
           "batch-semihard-euclidean", "batch-all-euclidean", "batch-all-cosine-soft",
           "center_loss", "center_update"):
    VARIANTS += [(_f, F16, "mean"), (_f, F64, "mean"), (_f, F32, "sum"), (_f, F32, "none")]
# batch_triplet_loss takes its threaded mining/backward only for large work: its cases run
# again with the threshold at 0 ("parallel_mining"), so that both paths are covered here
VARIANTS = [(f, d, r, False) for f, d, r in VARIANTS] + [
    (f, d, r, True) for f, d, r in VARIANTS if f.startswith("batch")]
VARIANT_IDS = [f"{f}-{_name(d)}-{r}{'-parallel_mining' if p else ''}" for f, d, r, p in VARIANTS]


def _arrays(result):
    """The arrays of a result: loss, then every gradient (and updated centers)."""
    loss, grad = result
    out = [np.asarray(loss)]
    for g in grad if isinstance(grad, tuple) else (grad,):
        if g is not None:
            out.append(np.asarray(g))
    return out


def _bits(result):
    return [(a.dtype.str, a.shape, a.tobytes()) for a in _arrays(result)]


def _max_difference(r1, r2):
    worst = 0.0
    for a, b in zip(_arrays(r1), _arrays(r2)):
        a64, b64 = a.astype(F64), b.astype(F64)
        both_nan = np.isnan(a64) & np.isnan(b64)
        d = np.where(both_nan, 0.0, np.abs(a64 - b64))
        worst = max(worst, float(np.nanmax(d, initial=0.0)) if d.size else 0.0)
    return worst


@pytest.fixture
def threads():
    """Set Numba's thread count for one test; restored afterwards."""
    saved = numba.get_num_threads()
    yield numba.set_num_threads
    numba.set_num_threads(saved)


def _needs_two_threads(n):
    if n > numba.config.NUMBA_NUM_THREADS:
        pytest.skip(f"needs {n} Numba threads (NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS})")


@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("family, dtype, reduction, parallel_mining", VARIANTS, ids=VARIANT_IDS)
def test_repeated_calls_give_the_same_bits(family, dtype, reduction, parallel_mining, nthreads,
                                           threads, monkeypatch):
    _needs_two_threads(nthreads)
    if parallel_mining:
        monkeypatch.setattr(cpu_triplet, "BATCH_PARALLEL_MIN_WORK", 0)
    threads(nthreads)
    call = FAMILIES[family](dtype, reduction)
    first = call()
    want = _bits(first)
    for _ in range(3):
        assert _bits(call()) == want


@pytest.mark.parametrize("family, dtype, reduction, parallel_mining", VARIANTS, ids=VARIANT_IDS)
def test_same_bits_at_one_and_two_threads(family, dtype, reduction, parallel_mining, threads,
                                          monkeypatch):
    _needs_two_threads(2)
    if parallel_mining:
        monkeypatch.setattr(cpu_triplet, "BATCH_PARALLEL_MIN_WORK", 0)
    call = FAMILIES[family](dtype, reduction)
    threads(1)
    one = call()
    threads(2)
    two = call()
    assert _bits(one) == _bits(two), f"max difference {_max_difference(one, two)}"


# ------------------------------------------------------------------ the center update

def _row_order_reference(centers, features, labels, alpha, canonical):
    """The CPU rule in NumPy: per class, acc = float64 sum of (c - x_i) over its rows,
    in row order, or (``canonical``) in the lexicographic order of the rows' bytes
    (as the kernel sees them: float16 rows as their own bits); then
    c <- (c - alpha / (1 + n) * acc) rounded to the centers' dtype."""
    raw = np.ascontiguousarray(features)
    x = features.astype(F32) if features.dtype == F16 else raw
    out = centers.copy()
    for j in np.unique(labels):
        rows = np.flatnonzero(labels == j)
        if canonical:
            rows = sorted(rows, key=lambda i: raw[i].tobytes())
        c = centers[j].astype(F64)
        acc = np.zeros(centers.shape[1], F64)
        for i in rows:
            acc += c - x[i].astype(F64)
        out[j] = (c - alpha / (1.0 + len(rows)) * acc).astype(centers.dtype)
    return out


def _update_batch(rng, n, d, k, dtype, kind):
    """Features (n, d) and labels with the troubles of ``kind``."""
    spread = 2 if dtype == F16 else 8  # magnitudes over many binades: float64 sums round
    x = rng.normal(size=(n, d)) * 10.0 ** rng.integers(-spread, spread + 1, size=(n, 1))
    labels = rng.integers(0, k, size=n)
    if kind == "duplicates":  # every row repeated several times, in several classes
        x = x[rng.integers(0, max(1, n // 5), size=n)]
    elif kind == "ties":  # rows equal in their first columns (ReLU-like zeros), then distinct
        x[:, : min(d, 3)] = 0.0
        x[rng.random(n) < 0.5, min(d, 3) - 1] = 1.0
    elif kind == "nan":
        x[rng.random(n) < 0.05, 0] = np.nan
        x[rng.random(n) < 0.05, -1] = np.inf
    elif kind == "signed_zeros":  # rows that differ only in the sign of a zero
        base = rng.normal(size=(max(1, n // 8), d))
        x = base[rng.integers(0, base.shape[0], size=n)]
        x[:, 0] = np.where(rng.random(n) < 0.5, 0.0, -0.0)
    elif kind == "one_class":
        labels = np.full(n, k - 1)
    x = x.astype(dtype)
    return x, labels


KINDS = ["random", "duplicates", "ties", "nan", "signed_zeros", "one_class"]
FEATURE_DTYPES = [F16, F32, F64]
CENTER_DTYPES = [F32, F64]
SIZES = {"serial": (300, 7, 11), "threaded": (4000, 24, 37), "wide": (600, 130, 5)}


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("centers_dtype", CENTER_DTYPES, ids=_name)
@pytest.mark.parametrize("dtype", FEATURE_DTYPES, ids=_name)
def test_update_is_the_same_bits_for_any_row_order_and_thread_count(
        dtype, centers_dtype, kind, size, threads):
    rng = _rng(zlib.crc32(f"{kind}-{size}-{_name(dtype)}-{_name(centers_dtype)}".encode()))
    n, d, k = SIZES[size]
    x, labels = _update_batch(rng, n, d, k, dtype, kind)
    centers = (rng.normal(size=(k, d)) * 3).astype(centers_dtype)
    centers[0, 0] = -0.0
    alpha = 0.37
    want = _row_order_reference(centers, x, labels, alpha, canonical=True)
    sensitive = False  # whether row order changes the plain row-order sum of this data
    plain = _row_order_reference(centers, x, labels, alpha, canonical=False).tobytes()
    counts = [1, 2] if TWO_THREADS else [1]
    for trial in range(4):
        perm = np.arange(n) if trial == 0 else rng.permutation(n)
        if trial == 3:
            perm = perm[::-1]
        xp, lp = x[perm], labels[perm]
        if trial:
            sensitive |= (_row_order_reference(centers, xp, lp, alpha, canonical=False).tobytes()
                          != plain)
        for nthreads in counts:
            threads(nthreads)
            got = fl.center_update(centers.copy(), xp, lp, alpha=alpha)
            assert got.tobytes() == want.tobytes(), (trial, nthreads)
    if kind in ("random", "one_class", "ties") and size != "serial" and centers_dtype == F64:
        # the data would catch a row-order sum (float64 centers: float32 ones mostly round
        # the float64 sum's round-off away): the test is not vacuous
        assert sensitive


def test_update_order_within_a_class_is_by_content(threads):
    """Two rows of one class whose float64 sum depends on their order: whichever comes
    first in the batch, the result is that of the canonical (byte) order."""
    big, small = np.float64(2.0 ** 53), np.float64(1.0)
    x = np.array([[big], [small], [-big]], F64)
    want = _row_order_reference(np.zeros((1, 1)), x, np.zeros(3, np.int64), 0.5, True)
    for perm in ([0, 1, 2], [2, 1, 0], [1, 0, 2], [0, 2, 1], [2, 0, 1], [1, 2, 0]):
        got = fl.center_update(np.zeros((1, 1)), x[perm], np.zeros(3, np.int64), alpha=0.5)
        assert got.tobytes() == want.tobytes(), perm
    # and the orders do differ in a plain row-order sum
    sums = {(_row_order_reference(np.zeros((1, 1)), x[p], np.zeros(3, np.int64), 0.5, False)
             .tobytes()) for p in ([0, 1, 2], [0, 2, 1])}
    assert len(sums) == 2


def test_update_through_center_loss_is_row_order_invariant(threads):
    rng = _rng(11)
    x = rng.normal(size=(3000, 40)).astype(F32)
    labels = rng.integers(0, 9, size=3000)
    c0 = rng.normal(size=(9, 40)).astype(F32)
    want = None
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(3000)
        for nthreads in ([1, 2] if TWO_THREADS else [1]):
            threads(nthreads)
            c = c0.copy()
            fl.center_loss(x[perm], labels[perm], c)
            want = c.tobytes() if want is None else want
            assert c.tobytes() == want


def test_center_loss_value_under_permutation():
    """The loss is a float64 sum of per-row terms in row order: a permutation changes
    it by round-off only (it is not promised bitwise); the per-row losses and the
    gradient rows move with their rows, bit for bit."""
    rng = _rng(12)
    x = rng.normal(size=(5000, 64)).astype(F32)
    labels = rng.integers(0, 10, size=5000)
    c0 = rng.normal(size=(10, 64)).astype(F32)
    perm = rng.permutation(5000)
    a = fl.center_loss(x, labels, c0.copy(), update=False, reduction="sum")
    b = fl.center_loss(x[perm], labels[perm], c0.copy(), update=False, reduction="sum")
    assert b.grad.tobytes() == a.grad[perm].tobytes()
    rows_a = fl.center_loss(x, labels, c0.copy(), update=False, reduction="none").loss
    rows_b = fl.center_loss(x[perm], labels[perm], c0.copy(), update=False, reduction="none").loss
    assert rows_b.tobytes() == rows_a[perm].tobytes()
    np.testing.assert_allclose(float(b.loss), float(a.loss), rtol=1e-6)
