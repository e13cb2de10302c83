"""Determinism (issue 6, part 6): the same inputs give the same bits, on both sides.

What holds, and is asserted here:

* both sides, every loss, every option family, every mining mode and distance:
  repeated calls with the same inputs (and the same Numba thread count on the CPU,
  1 or 2; the same threads per block on the GPU) return the same bits, loss and
  gradient: no float atomics anywhere, every sum in a fixed order;
* CPU: every loss returns the same bits at 1 and 2 Numba threads: the parallel
  kernels split rows (or fixed chunks of elements) into blocks whose per-row math
  does not depend on the split, write one loss per row (chunk) and sum those
  serially in float64 after the parallel loop; batch mining owns each anchor's
  outputs and the backward each row's gradient.  (The Gram matrix of
  ``batch_triplet_loss`` comes from BLAS, whose own threads Numba does not set.)
* CPU: the center update (Cython) gives the same bits for any thread count and
  any permutation of the rows, equal to a NumPy transcription of the rule that
  sums each class's rows in float64 in the lexicographic order of their bytes.
* GPU: the same bits for any threads per block for the center update (one thread
  per feature sums its class's rows serially, in ascending row order), the
  gradients of center loss, sigmoid focal and Huber (elementwise), and the
  gradient of batch_triplet_loss in every mining mode (tiled pairwise matrix,
  pair coefficients summed serially, one thread per column in the backward).

What does not hold: the *loss value* of ``center_loss`` on the CPU (a float64 sum
of the per-row terms in row order) is not bitwise invariant under a permutation of
the rows, only to round-off (``test_center_loss_value_under_permutation``).  On the
GPU, every loss value and the gradients of softmax cross entropy, focal loss and
triplet_margin_loss come from block reductions, so another threads-per-block can
change them by round-off (they agree to a few ulps); and the GPU center update sums
each class in row order, so a permutation of the rows changes it by round-off (the
CPU's is row-order invariant).

The matrix comes from the registry (``fastloss.tools.registry.LOSSES``): every loss
with its default options and with each of its check options, on each side at that
side's shapes (``SIZES``).  What the registry cannot say is in tables here:
``SIZES`` (the CPU shapes that take each kernel's threaded path, the tiny shapes of
the simulator; a loss not listed runs at its registry default shape), ``EXTRA``
(the option families beyond the check options, each on the sides it runs on),
``MORE_VARIANTS`` (the families run in other dtypes and reductions besides the
defaults) and ``THREAD_INVARIANT`` (what the GPU keeps bit for bit across block
sizes).  A loss added to the registry is covered with its defaults and its check
options.
"""
import importlib
import inspect
import pkgutil
import re
import zlib

import numba
import numpy as np
import pytest

import fastloss as fl
from fastloss.tools.registry import LOSSES, Option

F16, F32, F64 = np.float16, np.float32, np.float64
TWO_THREADS = numba.config.NUMBA_NUM_THREADS >= 2
BOTH, CPU, CUDA = ("cpu", "cuda"), ("cpu",), ("cuda",)


def _name(dtype):
    return np.dtype(dtype).name


def _rng(seed=0):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------ the families

#: per side and loss, (shape, classes) for the registry's ``make_inputs``.  CPU: every
#: kernel's threaded path (at least 2 * 16384 elements; 256 x 300 is 5 blocks of 54
#: rows); the simulator runs each block as Python threads: tiny shapes.
SIZES = {
    "cpu": {"softmax_cross_entropy": ((256, 300), None), "focal_loss": ((256, 300), None),
            "sigmoid_focal_loss": ((256, 300), None), "huber_loss": ((256, 300), None),
            "triplet_margin_loss": ((512, 96), None), "batch_triplet_loss": ((96, 40), 6),
            "center_loss": ((4000, 24), 37)},
    "cuda": {"softmax_cross_entropy": ((5, 37), None), "focal_loss": ((5, 37), None),
             "sigmoid_focal_loss": ((6, 29), None), "huber_loss": ((6, 29), None),
             "triplet_margin_loss": ((5, 37), None), "batch_triplet_loss": ((12, 9), 4),
             "center_loss": ((11, 21), 4)},
}


def _options(inputs=None, **fixed):
    """An option family: ``fixed`` keywords, where ``weight``/``sample_weight``/``alpha``
    True draw an array (per class, per row, ``(N, 1)`` rows, ``(C,)`` columns or ``(N, C)``
    with ``sample_weight`` "rows"/"columns"/"full"), ``ignore`` True ignores every 7th row."""
    def make_kwargs(rng, dtype, args):
        kw = dict(fixed)
        x = args[0]
        if kw.pop("ignore", False):
            args[1][::7] = -100
        if kw.pop("weight", False):
            kw["weight"] = (rng.random(x.shape[-1]) + 0.5).astype(dtype)
        if kw.pop("alpha_vector", False):
            kw["alpha"] = rng.random(x.shape[-1]).astype(dtype)
        weights = kw.pop("sample_weight", None)
        if weights is not None:
            shape = {True: x.shape[:-1], "rows": (x.shape[0], 1), "columns": (x.shape[-1],),
                     "full": x.shape}[weights]
            kw["sample_weight"] = rng.random(shape).astype(dtype)
        return kw
    return Option("extra", make_kwargs, **(inputs or {}))


def _float64_centers(args):
    return args[:2] + (args[2].astype(F64),)


def _nan_embedding(args):
    e = args[0].copy()
    e[7, 3] = np.nan
    return (e,) + args[1:]


def _update_only(args, kwargs):
    """``center_update`` on ``center_loss``'s arguments (no reduction): the centers are
    the result."""
    features, labels, centers = args
    return np.float64(0), fl.center_update(centers, features, labels, **kwargs)


_MINING = [(m, d, s) for m in ("hard", "semihard", "all")
           for d in ("euclidean", "squared_euclidean", "cosine") for s in (False, True)]

#: the option families beyond the registry's check options, as (label, option, sides,
#: edit of the drawn arguments, call): the CPU's and the GPU's lists before the registry
EXTRA = {
    "softmax_cross_entropy": [
        ("weight", _options(weight=True), CPU, None, None),
        ("sample_weight", _options(sample_weight=True), CPU, None, None),
        ("ignore_index", _options(ignore=True), CPU, None, None),
        ("softcap", _options(softcap=5.0), CPU, None, None),
        ("probs", _options({"prob": True}), CPU, None, None),
        ("probs-smoothing-weight", _options({"prob": True}, label_smoothing=0.2, weight=True),
         CPU, None, None),
        ("everything", _options(weight=True, sample_weight=True, ignore=True, label_smoothing=0.1,
                                z_loss=1e-4, softcap=10.0), CPU, None, None),
        ("options", _options(weight=True, sample_weight=True, label_smoothing=0.1, z_loss=1e-3,
                             softcap=5.0), CUDA, None, None),
    ],
    "focal_loss": [
        ("gamma0.5-alpha", _options(gamma=0.5, alpha=0.25), CPU, None, None),
        ("gamma0.5-alpha_vector", _options(gamma=0.5, alpha_vector=True), CUDA, None, None),
        ("probs", _options({"prob": True}), BOTH, None, None),
        ("sample_weight-ignore", _options(sample_weight=True, ignore=True), CPU, None, None),
    ],
    "sigmoid_focal_loss": [
        ("no_alpha", _options(alpha=-1.0), CPU, None, None),
        ("gamma0.5", _options(gamma=0.5), CPU, None, None),
    ],
    "huber_loss": [
        ("delta0.5", _options(delta=0.5), CPU, None, None),
        ("row_weights", _options(sample_weight="rows"), BOTH, None, None),
        ("column_weights", _options(sample_weight="columns"), CPU, None, None),
        ("full_weights", _options(sample_weight="full"), CPU, None, None),
    ],
    "triplet_margin_loss": [
        ("cosine-swap", _options(distance="cosine", swap=True), CPU, None, None),
    ],
    "batch_triplet_loss": [  # (the registry's options: each mining mode, euclidean; hard, soft)
        (f"{m}-{d}{'-soft' if s else ''}", _options(mining=m, distance=d, soft=s, margin=0.5),
         BOTH if not s or (m, d) == ("all", "cosine") else CPU, None, None)
        for m, d, s in _MINING if d != "euclidean" or (s and m != "hard")
    ] + [("hard-euclidean-nan", _options(mining="hard", margin=0.5), CPU, _nan_embedding, None)],
    "center_loss": [
        ("f64_centers", _options(), CPU, _float64_centers, None),
        ("no_update", _options(update=False), BOTH, None, None),
        ("update_only", _options(), CPU, None, _update_only),
    ],
}


class Family:
    """One option family of a loss on the sides it runs on: ``build`` makes the call."""

    def __init__(self, info, option, sides=BOTH, edit=None, call=None):
        self.info, self.option, self.sides, self.edit, self.call = info, option, sides, edit, call

    def arguments(self, side, dtype, seed):
        """The positional and keyword arguments (NumPy) of the family at ``side``'s shape."""
        rng = _rng(seed)
        shape, classes = SIZES[side].get(self.info.name, (None, None))
        inputs = dict(self.option.inputs)
        if shape is not None:
            inputs.update(shape=shape, classes=classes)
        args = tuple(self.info.make_inputs(rng, np.dtype(dtype), **inputs))
        kwargs = self.option.make_kwargs(rng, np.dtype(dtype), args)
        if self.info.updates is not None and args[self.info.updates].dtype == F16:
            # updated arrays (centers) are float32 or float64
            k = self.info.updates
            args = args[:k] + (args[k].astype(F32),) + args[k + 1:]
        return (self.edit(args) if self.edit else args), kwargs

    def build(self, side, dev, dtype, reduction, seed):
        """A callable computing one result from the side's arrays, made once (an argument
        updated in place gets a fresh copy per call, returned with the result)."""
        args, kwargs = self.arguments(side, dtype, seed)
        on_side = [dev.put(a) if isinstance(a, np.ndarray) else a for a in args]
        kwargs = {k: dev.put(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
        k = self.info.updates

        def call():
            a = list(on_side)
            if k is not None:
                a[k] = dev.put(args[k])
            if self.call is not None:
                result = self.call(a, kwargs)
            else:
                result = self.info.function(*a, reduction=reduction, **kwargs)
            return result, (None if k is None else a[k])
        return call


def _slug(label):
    """A registry option's label as a test id: "weight, ignore_index=1" gives
    "weight_ignore_index=1"."""
    return re.sub(r"[^A-Za-z0-9=.]+|\.(?!\d)", "_", label).strip("_").replace("__", "_")


def _only_defaults(info, option):
    """Whether a registry option is the loss's default call (shape aside)."""
    if set(option.inputs) - {"shape"}:
        return False
    args = info.make_inputs(_rng(), np.dtype(F32))
    drawn = option.make_kwargs(_rng(), np.dtype(F32), args)
    defaults = inspect.signature(info.function).parameters
    return all(k in defaults and not isinstance(v, np.ndarray) and v == defaults[k].default
               for k, v in drawn.items())


def _families():
    assert set(EXTRA) <= {info.name for info in LOSSES}, "EXTRA names a loss the registry lacks"
    families = {}
    for info in LOSSES:
        families[info.short] = Family(info, Option("defaults", lambda rng, dtype, args: {}))
        for option in info.options:
            if not _only_defaults(info, option):
                families[f"{info.short}-{_slug(option.label)}"] = Family(info, option)
        for label, option, sides, edit, call in EXTRA.get(info.name, ()):
            families[f"{info.short}-{label}"] = Family(info, option, sides, edit, call)
    return families


FAMILIES = _families()

#: besides every loss's defaults, the families also run in other dtypes and reductions (CPU)
MORE_VARIANTS = ["ce-probs", "focal-probs", "huber-row_weights", "triplet-cosine",
                 "batch_triplet-semihard", "batch_triplet-all", "batch_triplet-all-cosine-soft",
                 "center-update_only"]
assert set(MORE_VARIANTS) <= set(FAMILIES), set(MORE_VARIANTS) - set(FAMILIES)
OTHER_DTYPES = {"cpu": [(F16, "mean"), (F64, "mean"), (F32, "sum"), (F32, "none")],
                "cuda": [(F16, "mean"), (F64, "sum"), (F32, "none")]}


def _variants(side):
    """(family, dtype, reduction, parallel_mining) of a side: every family in float32 with
    "mean", the defaults (and MORE_VARIANTS on the CPU) in the other dtypes and reductions;
    on the CPU, every batch_triplet_loss case again with its parallel mining threshold at 0
    (it takes the threaded mining and backward only for large work)."""
    out = [(f, F32, "mean") for f, fam in FAMILIES.items() if side in fam.sides]
    base = [info.short for info in LOSSES] + (MORE_VARIANTS if side == "cpu" else [])
    out += [(f, d, r) for f in base for d, r in OTHER_DTYPES[side]]
    out = [(f, d, r, False) for f, d, r in out]
    if side == "cpu":
        out += [(f, d, r, True) for f, d, r, _ in out
                if FAMILIES[f].info.name == "batch_triplet_loss"]
    return out


def _variant_id(side, f, d, r, parallel_mining):
    return f"{side}-{f}-{_name(d)}-{r}{'-parallel_mining' if parallel_mining else ''}"


def _seed(family):
    return zlib.crc32(family.encode())


def _arrays(outcome, dev):
    """The arrays of a result on the host: loss, every gradient, the updated argument."""
    (loss, grad), updated = outcome
    out = [np.asarray(dev.get(loss))]
    for g in grad if isinstance(grad, tuple) else (grad,):
        if g is not None:
            out.append(dev.get(g))
    if updated is not None:
        out.append(dev.get(updated))
    return out


def _bits(arrays):
    return [(a.dtype.str, a.shape, a.tobytes()) for a in arrays]


def _max_difference(r1, r2):
    worst = 0.0
    for a, b in zip(r1, r2):
        a64, b64 = a.astype(F64), b.astype(F64)
        both_nan = np.isnan(a64) & np.isnan(b64)
        d = np.where(both_nan, 0.0, np.abs(a64 - b64))
        worst = max(worst, float(np.nanmax(d, initial=0.0)) if d.size else 0.0)
    return worst


@pytest.fixture
def numba_threads():
    """Set Numba's thread count for one test; restored afterwards."""
    saved = numba.get_num_threads()
    yield numba.set_num_threads
    numba.set_num_threads(saved)


def _needs_threads(n):
    if n > numba.config.NUMBA_NUM_THREADS:
        pytest.skip(f"needs {n} Numba threads (NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS})")


def _mining_modules():
    """The CPU modules that read batch mining's parallel threshold."""
    import fastloss.cpu
    names = [m.name for m in pkgutil.iter_modules(fastloss.cpu.__path__)]
    found = [mod for mod in (importlib.import_module(f"fastloss.cpu.{n}") for n in names)
             if hasattr(mod, "BATCH_PARALLEL_MIN_WORK")]
    assert found, "no CPU module holds BATCH_PARALLEL_MIN_WORK"
    return found


def _parallel_mining(monkeypatch):
    for module in _mining_modules():
        monkeypatch.setattr(module, "BATCH_PARALLEL_MIN_WORK", 0)


# ------------------------------------------------------------------ both sides

def _repeated():
    """The matrix of both sides, each entry marked with its side (see conftest.py)."""
    rows = [("cpu",) + v + (n,) for v in _variants("cpu") for n in (1, 2)]
    rows += [("cuda",) + v + (None,) for v in _variants("cuda")]
    return [pytest.param(*row, marks=getattr(pytest.mark, row[0]),
                         id=_variant_id(*row[:5]) + (f"-{row[5]}" if row[5] else ""))
            for row in rows]


@pytest.mark.parametrize("backend, family, dtype, reduction, parallel_mining, nthreads",
                         _repeated())
def test_repeated_calls_give_the_same_bits(backend, dev, family, dtype, reduction,
                                           parallel_mining, nthreads, numba_threads, monkeypatch):
    """The CPU at 1 and at 2 Numba threads; the GPU at its usual threads per block."""
    if nthreads is not None:
        _needs_threads(nthreads)
        numba_threads(nthreads)
    if parallel_mining:
        _parallel_mining(monkeypatch)
    call = FAMILIES[family].build(backend, dev, dtype, reduction, _seed(family))
    want = _bits(_arrays(call(), dev))
    for _ in range(3 if backend == "cpu" else 2):
        assert _bits(_arrays(call(), dev)) == want


# ------------------------------------------------------------------ the CPU: thread counts

CPU_VARIANTS = _variants("cpu")


@pytest.mark.cpu
@pytest.mark.parametrize("family, dtype, reduction, parallel_mining", CPU_VARIANTS,
                         ids=[_variant_id("cpu", *v) for v in CPU_VARIANTS])
def test_same_bits_at_one_and_two_threads(dev, family, dtype, reduction, parallel_mining,
                                          numba_threads, monkeypatch):
    _needs_threads(2)
    if parallel_mining:
        _parallel_mining(monkeypatch)
    call = FAMILIES[family].build("cpu", dev, dtype, reduction, _seed(family))
    numba_threads(1)
    one = _arrays(call(), dev)
    numba_threads(2)
    two = _arrays(call(), dev)
    assert _bits(one) == _bits(two), f"max difference {_max_difference(one, two)}"


# ------------------------------------------------------------------ the GPU: threads per block

#: per loss, which results are the same bits for any threads per block (see the module
#: docstring): index 0 is the loss, then the gradient(s), then the updated argument.
#: Batch mining: the pairwise matrix is tiled by ``PAIR_TILE`` (``fastloss/cuda/triplet.py``,
#: not by the threads per block), each pair coefficient is summed serially by one thread,
#: the "mean" denominator is a count, and the backward sums each column over its compacted
#: list of selected pairs in increasing order.  A loss not listed agrees to round-off.
THREAD_INVARIANT = {
    "sigmoid_focal_loss": [1],  # elementwise gradients
    "huber_loss": [1],
    "center_loss": [1, 2],  # elementwise gradient; the update (one thread per feature)
    "batch_triplet_loss": [1],
}
CUDA_VARIANTS = [v[:3] for v in _variants("cuda") if v[2] != "sum"]


@pytest.mark.cuda
@pytest.mark.parametrize("family, dtype, reduction", CUDA_VARIANTS,
                         ids=[_variant_id("cuda", *v, False) for v in CUDA_VARIANTS])
def test_threads_per_block(dev, family, dtype, reduction, threads_per_block):
    """At 8 or 32 threads per block (the ``threads_per_block`` fixture) against 16: the
    parts listed in THREAD_INVARIANT are the same bits, the rest agree to round-off."""
    from fastloss.cuda import _blocks
    call = FAMILIES[family].build("cuda", dev, dtype, reduction, _seed(family))
    got = _arrays(call(), dev)
    _blocks.set_threads_per_block(16)
    want = _arrays(call(), dev)
    invariant = THREAD_INVARIANT.get(FAMILIES[family].info.name, [])
    tol = {F16: 2e-3, F32: 2e-5, F64: 1e-12}[dtype]
    for k, (a, b) in enumerate(zip(got, want)):
        if k in invariant:
            assert a.tobytes() == b.tobytes(), f"part {k} changed with the block size"
        else:
            np.testing.assert_allclose(a.astype(F64), b.astype(F64), rtol=tol, atol=tol)


@pytest.mark.cuda
@pytest.mark.parametrize("centers_dtype", [F32, F64], ids=_name)
@pytest.mark.parametrize("dtype", [F16, F32, F64], ids=_name)
def test_center_update_same_bits_for_any_threads_per_block(dev, dtype, centers_dtype,
                                                           threads_per_block):
    from fastloss.cuda import _blocks
    rng = _rng(7)
    x = rng.normal(size=(20, 19)).astype(dtype)
    x[3, 2] = np.nan
    labels = rng.integers(0, 5, size=20)
    labels[:8] = 2  # one big class
    centers = rng.normal(size=(6, 19)).astype(centers_dtype)
    d_c = dev.put(centers)
    fl.center_update(d_c, dev.put(x), dev.put(labels), alpha=0.3)
    got = dev.get(d_c)
    _blocks.set_threads_per_block(16)
    d_c = dev.put(centers)
    fl.center_update(d_c, dev.put(x), dev.put(labels), alpha=0.3)
    assert got.tobytes() == dev.get(d_c).tobytes()


@pytest.mark.cuda
def test_center_update_row_order_changes_only_round_off(dev):
    """Not promised on the GPU: a permutation reorders each class's float64 sum
    (stable grouping in row order), so only round-off may change."""
    rng = _rng(8)
    x = (rng.normal(size=(40, 7)) * 10.0 ** rng.integers(-6, 7, size=(40, 1))).astype(F64)
    labels = np.zeros(40, np.int64)
    centers = rng.normal(size=(1, 7))
    results = []
    for seed in range(3):
        perm = _rng(seed).permutation(40)
        d_c = dev.put(centers)
        fl.center_update(d_c, dev.put(x[perm]), dev.put(labels), alpha=0.5)
        results.append(dev.get(d_c))
    cpu = fl.center_update(centers.copy(), x, labels, alpha=0.5)
    scale = np.abs(x).max() + np.abs(centers).max()
    for r in results:
        np.testing.assert_allclose(r, cpu, rtol=0, atol=64 * np.finfo(F64).eps * scale)


# ------------------------------------------------------------------ the CPU: the center update


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
UPDATE_SIZES = {"serial": (300, 7, 11), "threaded": (4000, 24, 37), "wide": (600, 130, 5)}


@pytest.mark.cpu
@pytest.mark.parametrize("size", list(UPDATE_SIZES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("centers_dtype", CENTER_DTYPES, ids=_name)
@pytest.mark.parametrize("dtype", FEATURE_DTYPES, ids=_name)
def test_update_is_the_same_bits_for_any_row_order_and_thread_count(
        dtype, centers_dtype, kind, size, numba_threads):
    rng = _rng(zlib.crc32(f"{kind}-{size}-{_name(dtype)}-{_name(centers_dtype)}".encode()))
    n, d, k = UPDATE_SIZES[size]
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
            numba_threads(nthreads)
            got = fl.center_update(centers.copy(), xp, lp, alpha=alpha)
            assert got.tobytes() == want.tobytes(), (trial, nthreads)
    if kind in ("random", "one_class", "ties") and size != "serial" and centers_dtype == F64:
        # the data would catch a row-order sum (float64 centers: float32 ones mostly round
        # the float64 sum's round-off away): the test is not vacuous
        assert sensitive


@pytest.mark.cpu
def test_update_order_within_a_class_is_by_content(numba_threads):
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


@pytest.mark.cpu
def test_update_through_center_loss_is_row_order_invariant(numba_threads):
    rng = _rng(11)
    x = rng.normal(size=(3000, 40)).astype(F32)
    labels = rng.integers(0, 9, size=3000)
    c0 = rng.normal(size=(9, 40)).astype(F32)
    want = None
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(3000)
        for nthreads in ([1, 2] if TWO_THREADS else [1]):
            numba_threads(nthreads)
            c = c0.copy()
            fl.center_loss(x[perm], labels[perm], c)
            want = c.tobytes() if want is None else want
            assert c.tobytes() == want


@pytest.mark.cpu
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
