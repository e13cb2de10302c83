"""Memory (issue 6, part 4): one forward+backward allocates nothing of the input's
size beyond the gradient it returns, and nothing at all with ``grad_out=``; many
calls in a loop do not grow the process.

How it is measured: ``tracemalloc`` traces NumPy's data allocations (NumPy
reports them to it, in its own domain) and Numba's (its runtime allocates
through ``PyMem_RawMalloc``, which tracemalloc hooks, worker threads included);
the sanity tests at the top check both, and that the budget check below does
fail on a call that copies its input.  After a warm-up call (compilation,
caches), the traced peak of one call, above what was traced before it, must fit

* a fresh gradient: the gradient's bytes + the loss returned by
  ``reduction="none"`` + per-row work space + ``SLACK``;
* with ``grad_out=``: per-row work space + ``SLACK``, nothing of the input's size.

Per-row work space (``ROW_BYTES`` per row, "O(rows)"): the per-row losses the
kernels write (compute type, float64 for triplet mining), their "none" copy in
the input's dtype, int64 label copies, and the center update's grouping of rows
(counting sort, row keys: 48 bytes per row).  ``SLACK`` covers the Python
objects of a call, Numba's per-call dispatch, and the small fixed arrays
(per-task scratch rows, chunk sums, the (C,) weight vectors of the shapes
here).  batch_triplet_loss is documented as O(N**2) memory: its pairwise
buffers are budgeted explicitly, per mining mode, in ``_batch_case``.
Inputs are 4-8 MiB, so that a temporary of the input's size exceeds any
budget by megabytes, while a call stays in the milliseconds.

The losses come from the registry (``fastloss.tools.registry.LOSSES``): each one's
plain call at its registry inputs is held to the plain budget, and the small calls of
the growth tests are each loss at its registry inputs.  What the registry cannot say
is in tables here: ``MORE_CASES`` (per loss, its option families, dtypes, reductions
and shapes, with their work space), ``OWN_PLAIN`` (a loss whose plain call needs more
than the plain budget), ``SLOW`` and ``_extra_small_calls``.
"""
import functools
import gc
import inspect
import os
import sys
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field

import numba
import numpy as np
import pytest

import fastloss as fl
from fastloss.tools.registry import LOSSES

KiB, MiB = 1024, 1024 * 1024
SLACK = 64 * KiB
ROW_BYTES = 64
BATCH_ROW_BYTES = 192  # batch_triplet_loss's per-anchor bookkeeping (about 130 B measured)
F16, F32, F64 = np.float16, np.float32, np.float64


def traced_peak(call, warmup=1):
    """Bytes above the traced baseline at the peak of one ``call()`` (after
    ``warmup`` untraced calls); what the call returns is alive at its end, so
    the peak includes it."""
    for _ in range(warmup):
        call()
    # No collection inside the window: it would free memory counted in the base and so
    # hide part of the call's peak.  Disabled rather than run beforehand: a full
    # collection in a test process that has compiled hundreds of kernels takes seconds.
    collecting = gc.isenabled()
    gc.disable()
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = call()
        peak = tracemalloc.get_traced_memory()[1] - base
        del result
    finally:
        if not tracing:
            tracemalloc.stop()
        if collecting:
            gc.enable()
    return peak


# ------------------------------------------------------------------ sanity: the instrument


@numba.njit(nogil=True, cache=False)
def _allocates_inside(n):
    a = np.ones(n)
    return a.sum()


@numba.njit(nogil=True, parallel=True, cache=False)
def _allocates_in_threads(n, tasks):
    total = 0.0
    for t in numba.prange(tasks):
        a = np.ones(n)  # one per task, on Numba's worker threads
        total += a.sum()
    return total


def test_tracemalloc_sees_numpy_allocations():
    assert traced_peak(lambda: np.empty(1 << 20)) >= 8 * MiB


def test_tracemalloc_sees_numba_allocations():
    """An array allocated inside an njit function and freed there is seen: the
    budgets below cover the kernels' own scratch arrays too."""
    assert traced_peak(lambda: _allocates_inside(1 << 20)) >= 8 * MiB


def test_tracemalloc_sees_numba_allocations_in_worker_threads():
    n = 1 << 20
    peak = traced_peak(lambda: _allocates_in_threads(n, 8))
    assert peak >= 8 * n  # at least one task's array (several when threads overlap)


def test_the_budget_catches_an_input_sized_copy():
    """Non-contiguous logits are copied before the kernel (documented: kernels read
    C-contiguous rows): the check used below must flag exactly that."""
    x = np.random.default_rng(0).normal(size=(2048, 2048)).astype(F32)[:, ::2]  # 8 MiB view
    y = np.zeros(2048, np.int64)
    g = np.empty(x.shape, F32)
    peak = traced_peak(lambda: fl.softmax_cross_entropy(x, y, grad_out=g))
    assert peak >= x.size * 4  # the contiguous copy of the logits
    assert peak > _budget(0, rows=2048)


# ------------------------------------------------------------------ the cases


def _budget(grad_bytes, rows, loss_bytes=0, work=0, row_bytes=ROW_BYTES):
    return grad_bytes + loss_bytes + row_bytes * rows + work + SLACK


@dataclass
class Case:
    fresh: Callable  # one call returning a fresh gradient
    grad_bytes: int  # the bytes of that gradient (all three for triplet_margin_loss)
    rows: int  # rows for the per-row budget
    out: Callable | None = None  # the same call writing into preallocated grad_out
    loss_bytes: int = 0  # the loss returned for reduction="none" when it is input-sized
    work: int = 0  # documented work space beyond per-row (batch mining, centers copies)
    work_with_out: int | None = None  # the same with grad_out, when it differs
    row_bytes: int = ROW_BYTES  # per-row work space
    extra: dict = field(default_factory=dict)


def _rng():
    return np.random.default_rng(0)


# rows x columns of about 8 MiB for each dtype
SHAPES = {F16: (4096, 1024), F32: (4096, 512), F64: (2048, 512)}


def _class_case(fn, dtype, reduction="mean", probs=False, in_place=False, **options):
    rng = _rng()
    n, C = SHAPES[dtype]
    x = (3 * rng.normal(size=(n, C))).astype(dtype)
    target = rng.integers(0, C, size=n)
    if probs:
        t = rng.random((n, C)).astype(dtype)
        target = t / t.sum(axis=1, keepdims=True, dtype=dtype)
    opts = dict(options)
    if opts.pop("weight", False):
        opts["weight"] = rng.random(C).astype(dtype) + 0.5
    if opts.pop("alpha_vector", False):
        opts["alpha"] = rng.random(C).astype(dtype)
    if opts.pop("sample_weight", False):
        opts["sample_weight"] = rng.random(n).astype(dtype)
    if opts.pop("ignore", False):
        target[::7] = -100
    g = np.empty_like(x)
    if in_place:
        scratch = x.copy()  # overwritten by the gradient on every call
        out = lambda: fn(scratch, target, reduction=reduction, grad_out=scratch, **opts)
    else:
        out = lambda: fn(x, target, reduction=reduction, grad_out=g, **opts)
    return Case(fresh=lambda: fn(x, target, reduction=reduction, **opts), grad_bytes=x.nbytes,
                rows=n, out=out)


def _elementwise_case(fn, dtype, reduction="mean", in_place=False, weights=None, **options):
    rng = _rng()
    shape = SHAPES[dtype]
    x = (2 * rng.normal(size=shape)).astype(dtype)
    if fn is fl.sigmoid_focal_loss:
        t = (rng.random(shape) < 0.1).astype(dtype)
    else:
        t = rng.normal(size=shape).astype(dtype)
    opts = dict(options)
    if weights is not None:
        opts["sample_weight"] = rng.random(weights).astype(dtype)
    g = np.empty_like(x)
    scratch = x.copy()
    if in_place:
        out = lambda: fn(scratch, t, reduction=reduction, grad_out=scratch, **opts)
    else:
        out = lambda: fn(x, t, reduction=reduction, grad_out=g, **opts)
    return Case(fresh=lambda: fn(x, t, reduction=reduction, **opts), grad_bytes=x.nbytes,
                rows=shape[0], out=out, loss_bytes=x.nbytes if reduction == "none" else 0)


def _triplet_case(dtype, reduction="mean", **options):
    rng = _rng()
    n, d = {F16: (8192, 256), F32: (4096, 256), F64: (2048, 256)}[dtype]  # 4 MiB each
    a, p, q = (rng.normal(size=(n, d)).astype(dtype) for _ in range(3))
    outs = tuple(np.empty_like(a) for _ in range(3))
    return Case(fresh=lambda: fl.triplet_margin_loss(a, p, q, reduction=reduction, **options),
                grad_bytes=3 * a.nbytes, rows=n,
                out=lambda: fl.triplet_margin_loss(a, p, q, reduction=reduction, grad_out=outs,
                                                   **options))


def _batch_case(mining, distance="euclidean", dtype=F32, reduction="mean", soft=False):
    """batch_triplet_loss keeps O(N**2) pairwise buffers (documented); budgeted here:

    * "hard": the upper triangle of the Gram matrix by four column blocks: one
      reused block buffer of N x ceil16(N / 4) entries (about N**2 / 4);
    * "semihard": the whole Gram matrix (N**2) while mining, freed before the
      gradient is allocated; plus 2 records per anchor-positive pair (int64 index
      and coefficient, kept and sorted by endpoint for the backward: 2 x 2 x 12
      bytes per pair);
    * "all": the dense coefficient matrix S (N**2) and the Gram matrix (N**2) while
      mining; then the gradient, S and the temporary copy NumPy makes for the
      overlapping ``S += S.T`` (N**2).

    The embeddings are 8 MiB and N**2 entries 1-4 MiB, so a temporary of the
    embeddings' size would still exceed the budget."""
    rng = _rng()
    n, d = {"hard": (1024, 2048), "semihard": (1024, 2048), "all": (512, 4096)}[mining]
    if dtype == F64:
        d //= 2
    e = rng.normal(size=(n, d)).astype(dtype)
    k = 16
    labels = rng.integers(0, k, size=n)
    T = 8 if dtype == F64 else 4  # bytes of the compute type (float32 for float16)
    grad_bytes = e.nbytes
    quarter = -(-n // 4)  # columns per gemm block, as batch_hard_blocked rounds them
    width = min(n, -(-quarter // 16) * 16)
    pairs = int(sum(c * (c - 1) for c in np.bincount(labels)))
    records = 2 * pairs * (8 + T) * 2
    if mining == "hard":
        work_mine = n * width * T
        work_grad = 0
    elif mining == "semihard":
        work_mine = n * n * T + records
        work_grad = records
    else:
        work_mine = 2 * n * n * T
        work_grad = 2 * n * n * T
    copy = n * d * T if dtype == F16 else 0  # float16 embeddings are widened for BLAS
    g = np.empty_like(e)

    def call(grad_out=None):
        return fl.batch_triplet_loss(e, labels, mining=mining, distance=distance, soft=soft,
                                     reduction=reduction, grad_out=grad_out)
    # the peak is the larger of the mining phase and the gradient phase
    fresh_work = max(work_mine, grad_bytes + work_grad) - grad_bytes + copy
    out_work = max(work_mine, work_grad) + copy
    # per anchor: float64 loss, class id and size, two records (index, coefficient) and
    # their copy sorted by endpoint, offsets, the norms (7 rows of F kept for the backward)
    return Case(fresh=call, grad_bytes=grad_bytes, rows=n, out=lambda: call(g),
                work=fresh_work, work_with_out=out_work, row_bytes=BATCH_ROW_BYTES)


def _center_case(dtype=F32, centers_dtype=None, reduction="mean", update=True, object_api=False):
    rng = _rng()
    n, d = {F16: (32768, 128), F32: (16384, 128), F64: (8192, 128)}[dtype]  # 8 MiB
    x = rng.normal(size=(n, d)).astype(dtype)
    k = 1000
    labels = rng.integers(0, k, size=n)
    cdt = centers_dtype or (F32 if dtype == F16 else dtype)
    centers = rng.normal(size=(k, d)).astype(cdt)
    T = F64 if dtype == F64 else F32
    # centers of another dtype than the compute type: the loss reads a (K, D) copy
    work = centers.nbytes // np.dtype(cdt).itemsize * np.dtype(T).itemsize if cdt != T else 0
    g = np.empty_like(x)
    if object_api:
        cl = fl.CenterLoss(k, d, dtype=cdt)
        return Case(fresh=lambda: cl(x, labels, reduction=reduction), grad_bytes=x.nbytes,
                    rows=n, out=lambda: cl(x, labels, reduction=reduction, grad_out=g), work=work)
    return Case(
        fresh=lambda: fl.center_loss(x, labels, centers, reduction=reduction, update=update),
        grad_bytes=x.nbytes, rows=n, work=work,
        out=lambda: fl.center_loss(x, labels, centers, reduction=reduction, update=update,
                                   grad_out=g))


def _center_update_case(dtype=F32, centers_dtype=None):
    rng = _rng()
    n, d = {F16: (32768, 128), F32: (16384, 128), F64: (8192, 128)}[dtype]
    x = rng.normal(size=(n, d)).astype(dtype)
    labels = rng.integers(0, 1000, size=n)
    centers = rng.normal(size=(1000, d)).astype(centers_dtype or (F32 if dtype == F16 else dtype))
    # nothing returned but the centers, updated in place: no gradient at all
    return Case(fresh=lambda: fl.center_update(centers, x, labels), grad_bytes=0, rows=n)


CE, FOCAL = fl.softmax_cross_entropy, fl.focal_loss
SFOCAL, HUBER = fl.sigmoid_focal_loss, fl.huber_loss


def _takes_grad_out(info):
    """Whether the loss takes ``grad_out=`` (a tuple where it has several gradients)."""
    return "grad_out" in inspect.signature(info.function).parameters


def _registry_case(info, dtype=F32):
    """A loss's plain call: its registry inputs at about 8 MiB (``SHAPES``), default
    options, held to the plain budget (the gradients, per-row work space, ``SLACK``)."""
    args = info.make_inputs(_rng(), np.dtype(dtype), shape=SHAPES[dtype])
    grads = args[:info.n_grad]
    outs = tuple(np.empty_like(g) for g in grads)
    grad_out = outs if info.n_grad > 1 else outs[0]
    out = (lambda: info.function(*args, grad_out=grad_out)) if _takes_grad_out(info) else None
    return Case(fresh=lambda: info.function(*args), grad_bytes=sum(g.nbytes for g in grads),
                rows=args[0].shape[0], out=out)


def _linear_case(dtype, reduction="mean", *, options=False, block=256):
    """linear_cross_entropy at 2048 rows, H = 128, V = 4096 (logits of 32 MiB in float32),
    blocks of ``block`` classes.  Its work space (documented): one block of logits, the
    ``(N, H)`` accumulator of d_embeddings and one product, and for float16 the float32
    copies of the embeddings and of one classifier block and one d_classifier block."""
    n, H, V = 2048, 128, 4096
    rng = _rng()
    e = rng.normal(size=(n, H)).astype(dtype)
    w = (rng.normal(size=(V, H)) / np.sqrt(H)).astype(dtype)
    y = rng.integers(0, V, size=n)
    kw = {"reduction": reduction, "block_size": block}
    if options:
        kw.update(bias=rng.normal(size=V).astype(dtype), weight=rng.uniform(0.5, 2, V).astype(dtype),
                  sample_weight=rng.uniform(0.5, 2, n).astype(dtype), label_smoothing=0.1,
                  z_loss=1e-4, softcap=30.0)
    T = 8 if dtype == F64 else 4
    work = (n * block + 2 * n * H) * T
    if dtype == F16:
        work += (n * H + 2 * block * H) * 4
    grads = (e, w) + ((kw["bias"],) if options else ())
    outs = tuple(np.empty_like(g) for g in grads)
    return Case(fresh=lambda: fl.linear_cross_entropy(e, w, y, **kw),
                out=lambda: fl.linear_cross_entropy(e, w, y, grad_out=outs, **kw),
                grad_bytes=sum(g.nbytes for g in grads), rows=n, work=work,
                loss_bytes=n * np.dtype(dtype).itemsize if reduction == "none" else 0)


#: the losses whose plain call needs more than the plain budget: their own cases below
OWN_PLAIN = {"batch_triplet_loss",  # O(N**2) pairwise buffers, budgeted in _batch_case
             "linear_cross_entropy"}  # a block of logits, budgeted in _linear_case
#: per loss of the registry, its cases beyond the plain call (and the public forms of center
#: loss that are not loss functions, with it)
MORE_CASES = {
    # softmax cross entropy: every option family, the three dtypes, the three reductions
    "softmax_cross_entropy": {
        "ce-f16": lambda: _class_case(CE, F16),
        "ce-f64": lambda: _class_case(CE, F64),
        "ce-f32-sum": lambda: _class_case(CE, F32, "sum"),
        "ce-f32-none": lambda: _class_case(CE, F32, "none"),
        "ce-f16-none": lambda: _class_case(CE, F16, "none"),
        "ce-f32-in_place": lambda: _class_case(CE, F32, in_place=True),
        "ce-f32-weight": lambda: _class_case(CE, F32, weight=True),
        "ce-f32-sample_weight": lambda: _class_case(CE, F32, sample_weight=True),
        "ce-f32-ignore_index": lambda: _class_case(CE, F32, ignore=True),
        "ce-f32-label_smoothing": lambda: _class_case(CE, F32, label_smoothing=0.1),
        "ce-f32-z_loss": lambda: _class_case(CE, F32, z_loss=1e-4),
        "ce-f32-softcap": lambda: _class_case(CE, F32, softcap=5.0),
        "ce-f32-probs": lambda: _class_case(CE, F32, probs=True),
        "ce-f16-probs": lambda: _class_case(CE, F16, probs=True),
        "ce-f32-probs-smoothing-weight": lambda: _class_case(CE, F32, probs=True, weight=True,
                                                             label_smoothing=0.1),
        "ce-f64-everything": lambda: _class_case(CE, F64, "none", weight=True, sample_weight=True,
                                                 ignore=True, label_smoothing=0.1, z_loss=1e-4,
                                                 softcap=10.0),
    },
    # multi-class focal loss
    "focal_loss": {
        "focal-f16": lambda: _class_case(FOCAL, F16),
        "focal-f64-none": lambda: _class_case(FOCAL, F64, "none"),
        "focal-f32-in_place": lambda: _class_case(FOCAL, F32, in_place=True),
        "focal-f32-gamma0.5-alpha": lambda: _class_case(FOCAL, F32, gamma=0.5, alpha=0.25),
        "focal-f32-alpha_vector-sample_weight": lambda: _class_case(
            FOCAL, F32, alpha_vector=True, sample_weight=True, ignore=True),
        "focal-f32-probs": lambda: _class_case(FOCAL, F32, probs=True),
    },
    # sigmoid focal loss
    "sigmoid_focal_loss": {
        "sigmoid_focal-f16": lambda: _elementwise_case(SFOCAL, F16),
        "sigmoid_focal-f64": lambda: _elementwise_case(SFOCAL, F64),
        "sigmoid_focal-f32-sum": lambda: _elementwise_case(SFOCAL, F32, "sum"),
        "sigmoid_focal-f32-none": lambda: _elementwise_case(SFOCAL, F32, "none"),
        "sigmoid_focal-f16-none": lambda: _elementwise_case(SFOCAL, F16, "none"),
        "sigmoid_focal-f32-in_place": lambda: _elementwise_case(SFOCAL, F32, in_place=True),
        "sigmoid_focal-f32-no_alpha": lambda: _elementwise_case(SFOCAL, F32, alpha=-1.0, gamma=0.5),
    },
    # Huber loss, sample weights of every broadcast kind
    "huber_loss": {
        "huber-f16": lambda: _elementwise_case(HUBER, F16),
        "huber-f64": lambda: _elementwise_case(HUBER, F64),
        "huber-f32-none": lambda: _elementwise_case(HUBER, F32, "none"),
        "huber-f16-none": lambda: _elementwise_case(HUBER, F16, "none"),
        "huber-f32-in_place": lambda: _elementwise_case(HUBER, F32, in_place=True),
        "huber-f32-row_weights": lambda: _elementwise_case(HUBER, F32, weights=(SHAPES[F32][0], 1)),
        "huber-f32-column_weights": lambda: _elementwise_case(HUBER, F32,
                                                              weights=(SHAPES[F32][1],)),
        "huber-f32-full_weights": lambda: _elementwise_case(HUBER, F32, weights=SHAPES[F32]),
        "huber-f16-row_weights": lambda: _elementwise_case(HUBER, F16, weights=(SHAPES[F16][0], 1)),
    },
    # triplet margin loss: three gradients
    "triplet_margin_loss": {
        "triplet-f16": lambda: _triplet_case(F16),
        "triplet-f64-none": lambda: _triplet_case(F64, "none"),
        "triplet-f32-cosine-swap": lambda: _triplet_case(F32, distance="cosine", swap=True),
        "triplet-f32-squared": lambda: _triplet_case(F32, distance="squared_euclidean"),
    },
    # batch triplet loss, every mining mode (O(N**2) work space, budgeted)
    "batch_triplet_loss": {
        "batch-hard-f32": lambda: _batch_case("hard"),
        "batch-hard-f32-cosine-soft": lambda: _batch_case("hard", "cosine", soft=True),
        "batch-hard-f16": lambda: _batch_case("hard", dtype=F16),
        "batch-hard-f64-none": lambda: _batch_case("hard", dtype=F64, reduction="none"),
        "batch-semihard-f32": lambda: _batch_case("semihard"),
        "batch-semihard-f32-squared": lambda: _batch_case("semihard", "squared_euclidean"),
        "batch-all-f32": lambda: _batch_case("all"),
        "batch-all-f32-cosine-soft": lambda: _batch_case("all", "cosine", soft=True),
    },
    # center loss (with its update) over 1000 classes, the update alone, the object
    "center_loss": {
        "center_loss-f32": lambda: _center_case(F32),
        "center_loss-f64": lambda: _center_case(F64),
        "center_loss-f32-f64_centers": lambda: _center_case(F32, F64),
        "center_loss-f32-none": lambda: _center_case(F32, reduction="none"),
        "center_loss-f32-no_update": lambda: _center_case(F32, update=False),
        "center_loss-f16-no_update": lambda: _center_case(F16, update=False),
        "center_loss-f16": lambda: _center_case(F16),
        "CenterLoss-f32": lambda: _center_case(F32, object_api=True),
        "center_update-f32": lambda: _center_update_case(F32),
        "center_update-f64": lambda: _center_update_case(F64),
        "center_update-f32-f64_centers": lambda: _center_update_case(F32, F64),
        "center_update-f16": lambda: _center_update_case(F16),
    },
    "linear_cross_entropy": {
        "linear_ce-f32": lambda: _linear_case(F32),
        "linear_ce-f16": lambda: _linear_case(F16),
        "linear_ce-f64-none": lambda: _linear_case(F64, "none"),
        "linear_ce-f32-every_option": lambda: _linear_case(F32, "sum", options=True),
    },
}


def _cases():
    """Every loss of the registry: its plain call (unless in OWN_PLAIN), then MORE_CASES."""
    assert set(MORE_CASES) | OWN_PLAIN <= {info.name for info in LOSSES}, "not a registry loss"
    cases = {}
    for info in LOSSES:
        if info.name not in OWN_PLAIN:
            cases[f"{info.short}-f32"] = functools.partial(_registry_case, info)
        cases.update(MORE_CASES.get(info.name, {}))
    return cases


CASES = _cases()


def _params():
    return [pytest.param(make, id=name) for name, make in CASES.items()]


def _report(request, key, value):
    request.node.user_properties.append((key, value))


@pytest.mark.parametrize("make", _params())
def test_fresh_gradient_is_the_only_input_sized_allocation(make, request):
    case = make()
    peak = traced_peak(case.fresh)
    budget = _budget(case.grad_bytes, case.rows, case.loss_bytes, case.work, case.row_bytes)
    _report(request, "peak", peak)
    _report(request, "grad_bytes", case.grad_bytes)
    assert peak >= case.grad_bytes + case.loss_bytes  # the instrument sees the outputs
    assert peak <= budget, (f"peak {peak} B > budget {budget} B (gradient {case.grad_bytes} B, "
                            f"+{peak - case.grad_bytes - case.loss_bytes} B)")


@pytest.mark.parametrize("make", [p for p in _params() if "center_update" not in p.id])
def test_grad_out_allocates_nothing_of_the_input_size(make, request):
    case = make()
    peak = traced_peak(case.out)
    work = case.work if case.work_with_out is None else case.work_with_out
    budget = _budget(0, case.rows, case.loss_bytes, work, case.row_bytes)
    _report(request, "peak_with_grad_out", peak)
    assert peak <= budget, f"peak {peak} B > budget {budget} B with grad_out"


# ------------------------------------------------------------------ no growth over many calls


#: the slowest small calls: once per this many calls, cycling through their check options
SLOW = {"batch_triplet_loss"}
BATCH_EVERY = 50


def _registry_call(info, option=None):
    """A small call of ``info`` at its registry inputs, float32, with its default options
    (or ``option``'s), the gradients into preallocated buffers."""
    rng = np.random.default_rng(1)
    args = info.make_inputs(rng, np.dtype(F32))
    kwargs = {} if option is None else option.make_kwargs(rng, np.dtype(F32), args)
    if _takes_grad_out(info):
        outs = tuple(np.empty_like(g) for g in args[:info.n_grad])
        kwargs["grad_out"] = outs if info.n_grad > 1 else outs[0]
    return lambda: info.function(*args, **kwargs)


def _small_calls():
    """A mix of small calls: every loss of the registry but SLOW, then the calls of
    ``_extra_small_calls``."""
    return [_registry_call(info) for info in LOSSES if info.name not in SLOW] + _extra_small_calls()


def _extra_small_calls():
    """What the registry's inputs do not say: an option with "none", the object, a fresh
    gradient."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 10)).astype(F32)
    y = rng.integers(0, 10, size=64)
    g = np.empty_like(x)
    e = rng.normal(size=(32, 8)).astype(F32)
    el = rng.integers(0, 4, size=32)
    ge = np.empty_like(e)
    cl = fl.CenterLoss(4, 8)
    return [
        lambda: fl.softmax_cross_entropy(x, y, grad_out=g, label_smoothing=0.1, reduction="none"),
        lambda: cl(e, el, grad_out=ge),
        lambda: fl.softmax_cross_entropy(x, y),  # fresh gradients are freed too
    ]


def _run_calls(calls, n):
    slow = [_registry_call(info, option) for info in LOSSES if info.name in SLOW
            for option in info.options]
    k = len(calls)
    for i in range(n):
        if i % BATCH_EVERY == 0:
            slow[i // BATCH_EVERY % len(slow)]()
        else:
            calls[i % k]()


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_100000_calls_do_not_grow_the_process(request):
    calls = _small_calls()
    _run_calls(calls, 5000)  # warm-up: compilation, caches, allocator pools
    gc.collect()
    before = _rss_bytes()
    _run_calls(calls, 100_000)
    gc.collect()
    growth = _rss_bytes() - before
    _report(request, "rss_growth", growth)
    assert growth < 4 * MiB, f"RSS grew by {growth / MiB:.2f} MiB over 100,000 calls"


def test_calls_leave_no_traced_memory_behind(request):
    calls = _small_calls()
    _run_calls(calls, 2000)
    gc.collect()
    tracemalloc.start(5)
    try:
        # settle what tracing itself allocates, and the pools of small blocks that the slow
        # calls' kernels fill over their first hundred calls or so (not a leak: they stop
        # growing; the growth test above sees no RSS growth)
        _run_calls(calls, 10_000)
        gc.collect()
        before = tracemalloc.take_snapshot()
        base = tracemalloc.get_traced_memory()[0]
        _run_calls(calls, 10_000)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    _report(request, "traced_growth", grown)
    top = "\n".join(str(s) for s in after.compare_to(before, "traceback")[:5])
    assert grown < 64 * KiB, f"{grown} B still traced after 10,000 calls:\n{top}"
