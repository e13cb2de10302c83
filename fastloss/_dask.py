"""Every loss on Dask arrays: the one place that knows Dask (imported only when one is passed).

A Dask array given to a loss reaches ``call`` through the wrapper's first branch
(``_dispatch.select_backend`` answers ``"dask"``).  ``ENTRIES`` holds one ``Entry`` per
function: which arguments are per-row (Dask arrays, chunked along the rows), which
trailing axes must sit whole in one chunk, which arguments stay in memory, and how the
``"mean"`` denominator is formed.  A new loss is one entry.

How a call becomes a graph (the choices, stated once):

* The in-memory public function runs on every chunk, unchanged (same validation,
  same CPU or CUDA kernel, NumPy or CuPy chunks): with ``reduction="sum"`` for
  ``"mean"`` and ``"sum"``, ``"none"`` for ``"none"``.  Before the graph is built it
  also runs once on zero rows of each input (a *probe*), so that bad options, dtypes
  and shapes raise at once, with the in-memory message, and so that the metas
  (array kind and dtype of loss and gradient) are the in-memory ones.
* ``"mean"``: the denominator of the whole array (the in-memory one on the
  concatenated rows: class weights, ``ignore_index``, sample weights) is summed in
  float64 over the chunks of the *label-side* inputs only, in the same graph; each
  chunk's gradient of the sum is scaled by ``1 / denominator`` (0 when it is 0, as
  in memory) inside the task that computes it.  The predictions are therefore read
  once and each gradient chunk is final as soon as it is computed (nothing waits for
  the whole array).  The rounding differs from one in-memory call by round-off: the
  sum's gradient is rounded to the input's dtype before the scaling.  A chunk's loss is
  the float64 sum of its rows' losses (asked with ``"none"``), so that a float16
  chunk does not overflow; the summed gradients of ``linear_cross_entropy``
  (classifier, bias) are the chunk's sums in the input's dtype, so in float16 a chunk
  whose unscaled sum passes 65504 overflows where one in-memory "mean" would not:
  give float16 embeddings in chunks small enough, or float32.
* The loss of ``"mean"``/``"sum"``: the float64 sum of the chunks' sums, in a fixed
  tree (Dask's ``sum``), divided by the denominator for ``"mean"`` (NaN when it is
  0), in the input's dtype, of the chunks' array kind.  ``"none"``: the chunks' own
  losses, chunked like the rows.
* Per-row inputs must all be Dask arrays (``None`` aside); a NumPy array, list or
  CUDA array among them is a ``TypeError`` naming it.  Those listed in ``memory``
  (``weight``, ``alpha``, ``centers``) must not be Dask arrays; they are sent once
  to each worker (one key of the graph).  Other per-row inputs are rechunked to the
  first argument's row chunks; the first argument chunked across an axis that must
  be whole (the class or feature axis) is a ``ValueError`` naming it (rechunking it
  here could make every chunk many times larger than the caller planned).
* Values are checked where the rows are: a label out of range raises when its chunk
  runs (at compute time), with the in-memory message, whose row index counts from the
  start of that chunk.
* ``grad_out=`` is refused with Dask inputs (the gradient is a lazy Dask array; write
  it somewhere with ``dask.array.store``).
* ``batch_triplet_loss``: a chunk is a batch; mining stays within each chunk.
  ``"mean"`` is the mean over the chunks of each chunk's mean (every chunk weighs the
  same, as the batches of an epoch: the denominator of a chunk depends on what its
  own rows select), ``"sum"`` the sum, ``"none"`` the chunks' per-anchor losses.
* ``center_loss(update=True)`` and ``center_update``: the per-class sums of
  ``c_j - x_i`` (float64) and counts are formed per chunk on the host, merged in a
  fixed tree (the same bits on every run, whatever the scheduler), computed at once
  (the call does not return before), then applied once to ``centers`` in place.
  Loss and gradient stay lazy and read a copy of the centers as they were before.
"""
import inspect
import uuid
from dataclasses import dataclass
from typing import Callable

import dask
import dask.array as da
import numpy as np
from dask.array.utils import asarray_safe

from fastloss._dispatch import is_dask
from fastloss._result import LossGrad

MERGE_FAN_IN = 8  # partial results (center sums, classifier gradients) added per task of a merge tree


# ------------------------------------------------------------ the mean denominators


def _class_weights(target, sample_weight, weight, ignore_index):
    """Per row of one chunk: the weight the row brings to the ``"mean"`` denominator of an
    integer target (0 when ignored), in float64.  Out-of-range labels are clipped here:
    the chunk's own call rejects them with the in-memory message."""
    valid = target != ignore_index
    w = valid.astype(np.float64)
    if weight is not None:  # in the chunk's array kind (a NumPy weight for CuPy chunks)
        weight = asarray_safe(weight, like=target)
        w *= weight[target.clip(0, weight.shape[0] - 1)].astype(np.float64)
    if sample_weight is not None:
        w *= sample_weight.astype(np.float64)
    w[~valid] = 0.0  # an ignored row brings nothing, even a NaN sample weight (as in memory)
    return w


def _class_denominator(use_class_weight):
    """Denominator of the softmax losses (cross entropy and linear cross entropy with
    ``use_class_weight``; focal loss, whose ``alpha`` stays out of it, without): integer
    targets sum the weights of the rows not ignored; probability targets the sample weights,
    or count the rows."""
    def denominator(rows, options, kept):
        first, target, sw = next(iter(rows.values())), rows["target"], rows.get("sample_weight")
        if target.ndim == first.ndim:  # probabilities: ignore_index does not apply
            return sw.sum(dtype=np.float64) if sw is not None else float(first.size // first.shape[-1])
        weight = options.get("weight") if use_class_weight else None
        if isinstance(weight, (list, tuple)):
            weight = np.asarray(weight)
        per_row = da.map_blocks(_class_weights, target, sw, _one_key(weight),
                                options.get("ignore_index", -100), dtype=np.float64)
        return per_row.sum(dtype=np.float64)
    return denominator


def _element_count(rows, options, kept):
    """Denominator of the elementwise losses: the input's size, or (Huber) the sum of the
    sample weights broadcast against it, where each weight covers ``size / sw.size`` elements."""
    first = next(iter(rows.values()))
    sw = rows.get("sample_weight")
    if sw is None:
        return float(first.size)
    if sw.size == 0:
        return 0.0
    return sw.sum(dtype=np.float64) * float(first.size // sw.size)


def _row_count(rows, options, kept):
    """Denominator of the row losses (triplet margin, center): the number of rows."""
    first = next(iter(rows.values()))
    return float(first.shape[0]) if first.ndim > kept else 1.0


@dataclass(frozen=True)
class Entry:
    """How one public function runs on Dask arrays (see the module docstring).

    ``rows``: the per-row arguments, first the one the gradient is taken against (the
    first ``n_grad``); ``kept``: trailing axes of the first argument that must be whole in
    each chunk (the class or feature axis; 0 for the elementwise losses, whose other
    per-row inputs broadcast against the first as NumPy does); ``memory``: arguments that
    stay in memory; ``denominator(rows, options, kept)``: the ``"mean"`` denominator over
    the whole arrays (a float, or a 0-d Dask array reading only label-side inputs), None
    where a chunk is a batch (``batch_triplet_loss``); ``n_grad``: how many gradients are
    chunked like the rows (a tuple when more than one); ``updates``: the in-memory argument
    updated in place (``center_loss``'s centers); ``summed``: whether ``grad`` is a tuple
    whose parts after the first are gradients of in-memory arguments
    (``linear_cross_entropy``'s classifier and bias): the chunks' ones are added in a fixed
    tree into one array of the argument's shape.
    """
    rows: tuple
    kept: int
    memory: tuple = ()
    denominator: Callable | None = None
    n_grad: int = 1
    updates: str | None = None
    summed: bool = False


ENTRIES = {
    "softmax_cross_entropy": Entry(("logits", "target", "sample_weight"), 1, ("weight",),
                                   _class_denominator(True)),
    "focal_loss": Entry(("logits", "target", "sample_weight"), 1, ("alpha",), _class_denominator(False)),
    "sigmoid_focal_loss": Entry(("logits", "targets"), 0, (), _element_count),
    "huber_loss": Entry(("input", "target", "sample_weight"), 0, (), _element_count),
    "triplet_margin_loss": Entry(("anchor", "positive", "negative"), 1, (), _row_count, n_grad=3),
    "batch_triplet_loss": Entry(("embeddings", "labels"), 1),
    "center_loss": Entry(("features", "labels"), 1, ("centers",), _row_count, updates="centers"),
    "linear_cross_entropy": Entry(("embeddings", "target", "sample_weight"), 1,
                                  ("classifier", "bias", "weight"), _class_denominator(True), summed=True),
}


# ------------------------------------------------------------ arguments


def _one_key(value):
    """``value`` as one key of the graph (a Delayed), so that an in-memory array is sent
    once to each worker rather than inside every task; None and scalars as they are."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return dask.delayed(value, name=f"fastloss-in-memory-{uuid.uuid4().hex}", traverse=False)


def _alignment(arg, first, kept):
    """For each axis of ``arg``, the axis of ``first`` it runs along (None: none): the
    leading axes for a per-row input of the batch's shape (the labels of ``(N, C)``
    logits), else NumPy's broadcasting from the right."""
    if kept and arg.ndim == first.ndim - kept:
        return list(range(arg.ndim))
    shift = first.ndim - arg.ndim
    return [k + shift if k + shift >= 0 else None for k in range(arg.ndim)]


def _per_row(entry, arguments):
    """``(rows, first_name)``: the per-row Dask arrays by name (absent ones left out),
    checked for kind and layout, the others rechunked to the first one's row chunks."""
    first_name = entry.rows[0]
    first = arguments[first_name]
    if first is None:
        raise TypeError(f"{first_name} must be an array, got None")
    for name in entry.memory:
        if is_dask(arguments[name]):
            raise TypeError(f"{name} must be an in-memory array (NumPy or CUDA), not a Dask array: "
                            "it is small and is sent whole to every chunk (call .compute() first)")
    for name in entry.rows:
        a = arguments[name]
        if a is not None and not is_dask(a):
            dask_name = next(n for n in entry.rows if is_dask(arguments[n]))
            raise TypeError(
                f"{name} is a {type(a).__module__}.{type(a).__name__} but {dask_name} is a Dask "
                f"array: the per-row inputs ({', '.join(entry.rows)}) must all be Dask arrays "
                f"(wrap it with dask.array.from_array)")
    rows = {name: arguments[name] for name in entry.rows if arguments[name] is not None}
    for name, a in rows.items():
        if not isinstance(a, da.Array):
            raise TypeError(f"{name} must be a dask.array.Array, got {type(a).__name__}")
        if any(np.isnan(c) for axis in a.chunks for c in axis):
            raise ValueError(f"{name} has unknown chunk sizes: call {name}.compute_chunk_sizes() first")
    for axis in range(max(first.ndim - entry.kept, 0), first.ndim):
        if first.numblocks[axis] > 1:
            raise ValueError(
                f"{first_name} is split into {first.numblocks[axis]} chunks along axis {axis}: each "
                f"row must lie whole in one chunk; rechunk it with {first_name}.rechunk({{{axis}: -1}})")
    for name, a in rows.items():
        if name == first_name:
            continue
        along = {k: first.chunks[m] for k, m in enumerate(_alignment(a, first, entry.kept))
                 if m is not None and a.shape[k] == first.shape[m]}
        if along and any(a.chunks[k] != chunks for k, chunks in along.items()):
            rows[name] = a.rechunk(along)
    return rows, first_name


def _probe_rows(rows, first_name, entry):
    """Zero rows of each per-row input, of its array kind and dtype (the other axes kept,
    so that the in-memory checks see every shape but the row count)."""
    first = rows[first_name]
    probe = {}
    for name, a in rows.items():
        axes = _alignment(a, first, entry.kept)
        shape = tuple(0 if m == 0 and first.ndim > entry.kept and n != 1 else n
                      for n, m in zip(a.shape, axes))
        probe[name] = np.zeros_like(a._meta, shape=shape, dtype=a.dtype)
    return probe


def _probe(fn, rows, first_name, entry, options, **flags):
    """``fn`` on zero rows of each per-row input: the in-memory checks of everything but the
    row count, raising what they raise (with a word on the empty first axis it saw)."""
    try:
        return fn(**_probe_rows(rows, first_name, entry), **options, **flags)
    except (TypeError, ValueError) as exc:
        first = rows[first_name]
        if first.ndim <= entry.kept:
            raise
        raise type(exc)(f"{exc} (checked on 0 of the {first.shape[0]} rows of the Dask inputs, "
                        "so read 0 as that row count)") from None


def _check_row_counts(rows, first_name, entry):
    """The row count along the first axis, which the probe could not see."""
    first = rows[first_name]
    if first.ndim <= entry.kept:
        return
    for name, a in rows.items():
        axes = _alignment(a, first, entry.kept)
        if 0 in axes:
            n = a.shape[axes.index(0)]
            if n != first.shape[0] and not (entry.kept == 0 and n == 1):
                raise ValueError(f"{name} has {n} rows but {first_name} has {first.shape[0]}")


# ------------------------------------------------------------ the graph


def _run_chunk(*args, fn, names, options, reduction, grad):
    """One chunk: the in-memory call, its gradient scaled by ``1 / divisor`` (the last
    argument; None: unscaled, 0: zero gradient, as an in-memory mean over zero weight).
    Returns ``(loss, grad)``: the loss a float for "sum", the chunk's array for "none"."""
    *values, divisor = args
    # "sum" is asked as "none" (the same gradient) and the rows' losses summed here in
    # float64: a float16 chunk's own sum would overflow at 65504 long before the mean
    asked = "none" if reduction == "sum" else reduction
    loss, g = fn(**options, **dict(zip(names, values)), reduction=asked, grad=grad)
    if reduction == "sum":
        loss = float(loss.astype(np.float64).sum())
    elif reduction != "none":
        loss = float(loss)
    if g is not None and divisor is not None:
        divisor = float(divisor)
        scale = 1.0 / divisor if divisor != 0 else 0.0
        for part in (g if isinstance(g, tuple) else (g,)):
            part *= scale
    return loss, g


def _grad_part(part, k):
    """The chunk's gradient (its ``k``-th one when there are several)."""
    return part[1] if k is None else part[1][k]


def _loss_part(part, depth):
    """The chunk's loss; ``part`` comes nested in ``depth`` one-element lists (one per kept axis)."""
    for _ in range(depth):
        part = part[0]
    return part[0]


def _loss_total(part, ndim):
    """The chunk's summed loss as a one-element float64 array, to be summed over the chunks."""
    return np.full((1,) * ndim, part[0], np.float64)


def _finish(total, divisor, loss_dtype, like):
    """The reduced loss: ``total / divisor`` (NaN when 0; None: the sum), 0-d, in
    ``loss_dtype``, of ``like``'s array kind."""
    value = float(total)
    if divisor is not None:
        divisor = float(divisor)
        value = value / divisor if divisor != 0 else float("nan")
    return asarray_safe(np.asarray(value, loss_dtype), like=like)


def _graph_argument(value):
    """A value as a blockwise argument (a 0-d Dask array as the one key it is computed to)."""
    return (value.to_delayed().item() if isinstance(value, da.Array) else value), None


def _chunk_parts(fn, entry, rows, first_name, options, reduction, grad, divisor):
    """The blockwise array of ``(loss, grad)`` pairs, one per chunk of the first argument."""
    first = rows[first_name]
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = letters[:first.ndim]
    fresh = iter(letters[::-1])
    pairs = []
    for name, a in rows.items():
        index = "".join(out[m] if m is not None and a.shape[k] == first.shape[m] else next(fresh)
                        for k, m in enumerate(_alignment(a, first, entry.kept)))
        pairs += [a, index]
    return da.blockwise(
        _run_chunk, out, *pairs, *_graph_argument(divisor), dtype=object,
        meta=np.empty((0,) * first.ndim, object), concatenate=True, fn=fn, names=tuple(rows),
        options=_one_key(options), reduction=reduction, grad=grad)


def call(fn, arguments):
    """``fn`` (a public loss) on Dask arrays: the lazy ``LossGrad`` (module docstring).

    ``arguments``: the wrapper's ``locals()`` at its Dask branch; those that are not
    parameters of ``fn`` are dropped.
    """
    entry = ENTRIES[fn.__name__]
    arguments = {k: arguments[k] for k in inspect.signature(fn).parameters}
    if arguments.pop("grad_out", None) is not None:
        raise TypeError("grad_out is not supported with Dask inputs: the gradient is a lazy Dask "
                        "array (write it where you want with dask.array.store)")
    rows, first_name = _per_row(entry, arguments)
    options = {k: v for k, v in arguments.items() if k not in entry.rows}
    reduction, grad = options.pop("reduction"), bool(options.pop("grad"))
    # the summed gradients' arguments (a classifier of a whole vocabulary) probed at one row:
    # the probe checks kinds and dtypes, and need not allocate a full gradient on the client
    probe_options = {k: (v[:1] if entry.summed and k in entry.memory and v is not None else v)
                     for k, v in options.items()}
    probe = _probe(fn, rows, first_name, entry, probe_options, reduction=reduction, grad=grad)
    _check_row_counts(rows, first_name, entry)
    first = rows[first_name]

    if entry.updates is not None and options.get("update"):
        old = options[entry.updates].copy()
        _update_centers(options[entry.updates], old, rows, options["alpha"])
        options[entry.updates] = old
        options["update"] = False

    if entry.denominator is None:  # a chunk is a batch: the mean of the chunks' means
        chunk_reduction = reduction
        divisor = float(np.prod(first.numblocks)) if reduction == "mean" else None
    else:
        chunk_reduction = "none" if reduction == "none" else "sum"
        divisor = entry.denominator(rows, options, entry.kept) if reduction == "mean" else None
    parts = _chunk_parts(fn, entry, rows, first_name, options, chunk_reduction, grad, divisor)

    if reduction == "none":
        batch = "abcdefghijklmnopqrstuvwxyz"[:first.ndim]
        kept = min(entry.kept, first.ndim)
        loss = da.blockwise(_loss_part, batch[:first.ndim - kept], parts, batch, depth=kept,
                            meta=probe.loss, concatenate=False)
    else:
        totals = parts.map_blocks(_loss_total, first.ndim, chunks=tuple((1,) * n for n in parts.numblocks),
                                  meta=np.empty((0,) * first.ndim, np.float64))
        loss = da.blockwise(_finish, "", totals.sum(dtype=np.float64), "", *_graph_argument(divisor),
                            dtype=probe.loss.dtype, meta=probe.loss, loss_dtype=probe.loss.dtype,
                            like=probe.loss)
    if not grad:
        return LossGrad(loss, None)
    if entry.summed:
        # gradients of the in-memory arguments, in the order of ``memory``, of their shapes
        shapes = [options[k].shape for k in entry.memory if options.get(k) is not None]
        return LossGrad(loss, (parts.map_blocks(_grad_part, 0, meta=probe.grad[0]),
                               *(_summed(parts, k, probe.grad[k], shapes[k - 1])
                                 for k in range(1, len(probe.grad)))))
    if entry.n_grad == 1:
        return LossGrad(loss, parts.map_blocks(_grad_part, None, meta=probe.grad))
    return LossGrad(loss, tuple(parts.map_blocks(_grad_part, k, meta=probe.grad[k])
                                for k in range(entry.n_grad)))


def _add(*arrays):
    """The sum of the arrays, in the order given, into a new array."""
    total = arrays[0].copy()
    for a in arrays[1:]:
        total += a
    return total


def _merge_tree(level, merge):
    """One Delayed: ``merge`` over ``level`` in groups of ``MERGE_FAN_IN``, level after level
    (a fixed tree: the same bits on every run, whatever the scheduler)."""
    level = list(level)
    while len(level) > 1:
        level = [dask.delayed(merge)(*level[k:k + MERGE_FAN_IN]) for k in range(0, len(level), MERGE_FAN_IN)]
    return level[0]


def _summed(parts, k, like, shape):
    """The ``k``-th gradient of every chunk, added over the chunks: one Dask array of ``shape``,
    of ``like``'s dtype and kind."""
    grads = [dask.delayed(_grad_part)(part, k) for part in parts.to_delayed().ravel()]
    return da.from_delayed(_merge_tree(grads, _add), shape=shape, dtype=like.dtype, meta=like)


# ------------------------------------------------------------ the center update


def _host(a):
    """A NumPy array of ``a`` (a CuPy or Numba device array is copied to the host)."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "get"):  # CuPy
        return a.get()
    return a.copy_to_host()


def _center_sums(features, labels, centers):
    """One chunk's part of the update: ``(classes, counts, sums)``, the present classes in
    ascending order, their row counts and the float64 sums of ``c_j - x_i`` over their rows
    (in row order).  Labels outside ``[0, K)`` raise the in-memory message."""
    from fastloss import _validation as check
    x, y = _host(features), _host(labels)
    y = check.row_labels(y, x.shape[0], "labels", upper=centers.shape[0])
    order = np.argsort(y, kind="stable")
    y = y[order]
    classes, starts, counts = np.unique(y, return_index=True, return_counts=True)
    if classes.size == 0:
        return classes, counts, np.zeros((0, x.shape[1]))
    diff = centers[y].astype(np.float64) - x[order].astype(np.float64)
    return classes, counts, np.add.reduceat(diff, starts, axis=0)


def _merge_sums(*parts):
    """Several chunks' ``(classes, counts, sums)`` as one, added in the order given."""
    classes = np.concatenate([p[0] for p in parts])
    merged, inverse = np.unique(classes, return_inverse=True)
    counts = np.zeros(merged.size, np.int64)
    sums = np.zeros((merged.size, parts[0][2].shape[1]))
    np.add.at(counts, inverse, np.concatenate([p[1] for p in parts]))
    np.add.at(sums, inverse, np.concatenate([p[2] for p in parts]))
    return merged, counts, sums


def _update_centers(centers, old, rows, alpha):
    """The center update of all the rows, in place: per-chunk sums merged in a fixed tree
    (``MERGE_FAN_IN`` per task), computed now, then ``c_j -= alpha * S_j / (1 + n_j)``."""
    old_host = _host(old)
    features, labels = rows["features"], rows["labels"]
    parts = da.blockwise(_center_sums, "ab", features, "ab", labels, "a", _one_key(old_host), None,
                         dtype=object, meta=np.empty((0, 0), object), concatenate=True)
    classes, counts, sums = dask.compute(_merge_tree(parts.to_delayed().ravel(), _merge_sums))[0]
    new = old_host.copy()
    new[classes] = old_host[classes] - float(alpha) * sums / (1.0 + counts)[:, None]
    if isinstance(centers, np.ndarray):
        centers[...] = new
    elif hasattr(centers, "set"):  # CuPy
        centers.set(new)
    else:
        centers.copy_to_device(new)


def center_update(fn, arguments):
    """``fn`` (:func:`fastloss.center_update`) on Dask features and labels: checked by ``fn``
    on zero rows (which moves no center), then the update of all the rows
    (``_update_centers``); returns the centers.  ``arguments``: the wrapper's ``locals()``."""
    entry = ENTRIES["center_loss"]
    centers, alpha, backend = arguments["centers"], arguments["alpha"], arguments["backend"]
    rows, first_name = _per_row(entry, {"features": arguments["features"],
                                        "labels": arguments["labels"], "centers": centers})
    _probe(lambda features, labels, **flags: fn(centers, features, labels, **flags),
           rows, first_name, entry, {}, alpha=alpha, backend=backend)
    _check_row_counts(rows, first_name, entry)
    _update_centers(centers, centers.copy(), rows, alpha)
    return centers
