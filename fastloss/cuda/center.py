r"""Center loss (CUDA): the fused loss+gradient kernel and a deterministic center update.

Loss and gradient, one block per row ``i`` with label ``y = y_i``, the centers
as they are before any update (``T`` the compute type: float32 for
float16/float32 features, float64 for float64; centers are read in ``T``)::

    L_i = 0.5 * ||x_i - c_y||^2                (float64 block sum of T partials)
    dL/dx_i = scale * (x_i - c_y)              (scale = 1/N for "mean", else 1)

Each element of the gradient is written by the thread that read the same
element of the features, after its read: the gradient may be the features
themselves when the centers are not updated afterwards.

The update (Wen et al. 2016), for every class ``j`` present with ``n_j`` rows::

    c_j <- c_j - alpha * sum_{i: y_i = j} (c_j - x_i) / (1 + n_j)

is built like the CPU's Cython one, with no float atomics:

1. group the rows by label, a stable counting sort on the device.  The rows
   are cut into ``P`` contiguous chunks; ``counts[p, j]`` (integer atomics:
   the counts do not depend on timing) is turned, one thread per class, into
   the rows of class ``j`` in the chunks before ``p``; one block then scans
   the per-class totals into ``starts`` (``K + 1`` offsets).  Finally one
   block per chunk walks its rows in tiles of ``blockDim`` rows, in order: a
   row's place is ``starts[j] + (rows of j in earlier chunks and tiles) +
   (rows of j before it in its tile)``, the last by a loop over the tile's
   labels in shared memory.  ``order[starts[j]:starts[j+1]]`` is then the
   rows of class ``j`` in ascending row index, whatever the block size, the
   chunking or the scheduling.
2. one block per (class, tile of features): each thread owns features ``d``
   and sums ``c_j[d] - x_i[d]`` in float64 over the class's rows in that
   ascending order, then writes ``c_j[d]`` once.  A class absent from the
   batch returns before touching its center; no two threads write the same
   element, and no sum depends on the number of threads: the same bits for
   any threads per block and any run.  The CPU sums each class in the order
   of its rows' contents (so that it is row-order invariant), this kernel in
   row order: the two agree to round-off.

Costs: the counting sort reads the labels twice and writes ``N`` row
indices, plus ``P x K`` int64 counters (``P`` is kept so that they stay under
16 MiB) and a single-block scan over ``K``.  Each class's rows are summed
serially per feature (like the CPU's one thread per class), so one class with
very many rows and few features leaves most of the GPU idle.
"""
from typing import NamedTuple

import numpy as np
from numba import cuda, float64, int64, types

from fastloss import _validation as check
from fastloss._reduction import grad_scale
from fastloss.cuda import _blocks
from fastloss.cuda._arrays import Device, compute_type, fill
from fastloss.cuda._checks import label_check, same_view, shares_memory
from fastloss.cuda._blocks import (MAX_THREADS, block_sum, cast_like, fit, grid_for, kernel,
                                   threads_for)
from fastloss.cuda._reduction import count_denominator, finish, per_row_losses

#: at most this many int64 chunk counters (P x K): 16 MiB
MAX_COUNTERS = 1 << 21
#: at most this many chunks (the per-class scan over chunks is serial)
MAX_CHUNKS = 1024
#: rows per chunk of the counting sort, None: chosen from N and K (tests set it)
CHUNK_ROWS = None
MAX_GRID_Y = 65535


# ----------------------------------------------------------------- loss and gradient


@kernel()
def center_rows_kernel(x, labels, centers, scale, g, losses):
    """One block per row of ``x`` (n, D): ``losses[row] = 0.5 ||x_row - c_y||^2``
    and, when ``g`` is not None, ``g[row] = scale * (x_row - c_y)``.  ``scale``
    carries the compute type; ``centers`` (K, D) may be float32 or float64."""
    buf = cuda.shared.array(MAX_THREADS, float64)
    row = int64(cuda.blockIdx.x)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    zero = scale - scale
    half = cast_like(0.5, zero)
    y = int64(labels[row])
    s = zero
    for d in range(t, x.shape[1], nt):
        diff = cast_like(x[row, d], zero) - cast_like(centers[y, d], zero)
        s += diff * diff
        if g is not None:
            g[row, d] = diff * scale
    total = block_sum(buf, s)
    if t == 0:
        losses[row] = half * cast_like(total, zero)


# ----------------------------------------------------------------- grouping rows by label


@kernel()
def count_labels_kernel(labels, chunk, counts):
    """counts[p, j] += 1 for every row i of label j in chunk p = i // chunk
    (integer atomics: the totals do not depend on the order)."""
    i = int64(cuda.grid(1))
    stride = int64(cuda.gridsize(1))
    while i < labels.shape[0]:
        cuda.atomic.add(counts, (i // chunk, int64(labels[i])), 1)
        i += stride


@kernel()
def chunk_offsets_kernel(counts, totals):
    """One thread per class j: counts[p, j] <- sum_{q < p} counts[q, j] (in
    place), totals[j] <- the class's row count."""
    j = int64(cuda.grid(1))
    stride = int64(cuda.gridsize(1))
    P = counts.shape[0]
    while j < totals.shape[0]:
        run = int64(0)
        for p in range(P):
            c = counts[p, j]
            counts[p, j] = run
            run += c
        totals[j] = run
        j += stride


@kernel()
def exclusive_scan_kernel(totals, starts):
    """One block: starts[0] = 0, starts[j + 1] = totals[0] + ... + totals[j]."""
    buf = cuda.shared.array(MAX_THREADS, int64)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    K = totals.shape[0]
    if t == 0:
        starts[0] = 0
    carry = int64(0)
    for base in range(0, K, nt):
        j = base + t
        v = int64(0)
        if j < K:
            v = totals[j]
        buf[t] = v
        cuda.syncthreads()
        off = 1
        while off < nt:  # Hillis-Steele inclusive scan of the tile
            add = int64(0)
            if t >= off:
                add = buf[t - off]
            cuda.syncthreads()
            buf[t] += add
            cuda.syncthreads()
            off *= 2
        if j < K:
            starts[j + 1] = carry + buf[t]
        carry += buf[nt - 1]
        cuda.syncthreads()  # buf is rewritten by the next tile


@kernel()
def scatter_rows_kernel(labels, starts, offsets, chunk, order):
    """One block per chunk p of rows [p * chunk, (p + 1) * chunk), walked in
    tiles of blockDim rows, in order: order[starts[j] + k] = the k-th row of
    label j (ascending).  ``offsets[p, j]`` enters as the rows of j in chunks
    before p and is advanced tile by tile (only this block touches row p)."""
    lab = cuda.shared.array(MAX_THREADS, int64)
    p = int64(cuda.blockIdx.x)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    lo = p * chunk
    hi = min(int64(labels.shape[0]), lo + chunk)
    for base in range(lo, hi, nt):
        i = base + t
        m = min(int64(nt), hi - base)
        y = int64(-1)
        if i < hi:
            y = int64(labels[i])
        lab[t] = y
        cuda.syncthreads()
        rank = int64(0)  # rows of label y before row i in this tile
        last = True  # no row of label y after row i in this tile
        for k in range(m):
            if lab[k] == y:
                if k < t:
                    rank += 1
                elif k > t:
                    last = False
        at = int64(0)
        if i < hi:
            at = offsets[p, y]
            order[starts[y] + at + rank] = i
        cuda.syncthreads()  # every read of offsets[p, .] for this tile is done
        if i < hi and last:
            offsets[p, y] = at + rank + 1
        cuda.syncthreads()  # the new offsets are seen by the next tile; lab is free


# ----------------------------------------------------------------- the update


@kernel()
def update_classes_kernel(x, order, starts, alpha, centers):
    """Block (j, f): class j, features f * blockDim + t, stepping by
    blockDim * gridDim.y.  Absent classes (starts[j] == starts[j + 1]) return
    at once; the others get c_j -= alpha * sum (c_j - x_i) / (1 + n_j), the sum
    in float64 over the rows ``order[starts[j]:starts[j + 1]]`` in that order."""
    j = int64(cuda.blockIdx.x)
    lo = starts[j]
    hi = starts[j + 1]
    if hi == lo:
        return
    scale = alpha / (1.0 + float64(hi - lo))
    D = centers.shape[1]
    step = int64(cuda.blockDim.x) * int64(cuda.gridDim.y)
    d = int64(cuda.blockIdx.y) * int64(cuda.blockDim.x) + int64(cuda.threadIdx.x)
    while d < D:
        c = float64(centers[j, d])
        acc = 0.0
        for r in range(lo, hi):
            acc += c - float64(x[order[r], d])
        centers[j, d] = c - scale * acc
        d += step


@kernel()
def copy_rows_kernel(src, dst):
    """dst[r, c] = src[r, c] for 2-D arrays of one shape (any strides)."""
    i = int64(cuda.grid(1))
    stride = int64(cuda.gridsize(1))
    D = int64(src.shape[1])
    total = int64(src.shape[0]) * D
    while i < total:
        r = i // D
        dst[r, i - r * D] = src[r, i - r * D]
        i += stride


# ----------------------------------------------------------------- host side


class Call(NamedTuple):
    """A GPU call's checked arguments: device views of the features, labels and
    centers; ``host``, the caller's NumPy centers when ``backend="cuda"`` was
    given NumPy arrays (copied over, and back after an update), else None."""
    dev: Device
    features: object
    labels: object
    centers: object
    host: object
    alpha: float


def _centers_view(original, centers, width, writable):
    """The checks of ``_validation.centers_array`` on a device view of the centers;
    "writable" is the read-only flag of ``__cuda_array_interface__``, where the
    caller's array has one."""
    check.centers_layout(centers, width)
    iface = getattr(original, "__cuda_array_interface__", None)
    if writable and iface is not None and iface["data"][1]:
        raise ValueError("centers must be writable: it is updated in place (or pass update=False)")
    return centers


def checked_call(features, labels, centers, alpha, update):
    """The CPU's checks (``fastloss.center``) on device views of the arguments,
    with the GPU's own: device centers, labels range-checked on the device.
    With NumPy inputs the centers are checked on the host, then copied over."""
    dev = Device(features)
    features, labels = dev.views(features=features, labels=labels)
    features = check.feature_rows(features, "features")
    width = features.shape[1]
    host = None
    if dev.kind == "numpy":
        host = check.centers_array(centers, width, writable=update)
        view = dev.view(host, "centers")
    else:
        view = _centers_view(centers, dev.view(centers, "centers"), width, update)
    labels = check.row_labels(labels, features.shape[0], "labels", upper=view.shape[0],
                              first_bad=label_check(dev))
    alpha = check.unit_interval(alpha, "alpha")
    return Call(dev, features, labels, view, host, alpha)


def checked_grad_out(call, grad_out):
    """The device view of the caller's ``grad_out`` (checked; apart from the
    centers), or None: when not given, or with NumPy inputs, where it is
    checked on the host and the gradient copied into it at the end."""
    if grad_out is None:
        return None
    shape, dtype = call.features.shape, call.features.dtype
    if call.dev.kind == "numpy":
        check.grad_buffer(grad_out, shape, dtype)
        if np.may_share_memory(grad_out, call.host):
            raise ValueError("grad_out must not share memory with centers")
        return None
    g = check.grad_buffer(call.dev.view(grad_out, "grad_out"), shape, dtype, device=True)
    if shares_memory(g, call.centers):
        raise ValueError("grad_out must not share memory with centers")
    return g


def copy_rows(dev, src, dst):
    """``dst[...] = src`` for 2-D device views of one shape, on the call's stream."""
    blocks, threads = grid_for(src.shape[0] * src.shape[1])
    dev.launch(copy_rows_kernel, blocks, threads, src, dst)


def _chunks(n, K):
    """(P, rows per chunk) of the counting sort."""
    if CHUNK_ROWS is not None:
        chunk = max(1, int(CHUNK_ROWS))
    else:
        tiles = -(-n // (4 * _blocks.THREADS))  # about four tiles of rows per chunk
        P = max(1, min(tiles, MAX_CHUNKS, MAX_COUNTERS // max(K, 1)))
        chunk = -(-n // P)
    return -(-n // chunk), chunk


def group_rows(dev, labels, K):
    """``(order, starts)``: device int64 arrays, ``order[starts[j]:starts[j+1]]``
    the rows of label ``j`` in ascending order (``labels`` in ``[0, K)``, n > 0)."""
    n = labels.shape[0]
    P, chunk = _chunks(n, K)
    counts = dev.scratch((P * K,), np.int64, "center_counts")
    totals = dev.scratch((K,), np.int64, "center_totals")
    starts = dev.scratch((K + 1,), np.int64, "center_starts")
    order = dev.scratch((n,), np.int64, "center_order")
    fill(dev, counts, 0)
    counts = counts.reshape((P, K))
    blocks, threads = grid_for(n)
    dev.launch(count_labels_kernel, blocks, threads, labels, chunk, counts)
    blocks, threads = grid_for(K)
    dev.launch(chunk_offsets_kernel, blocks, threads, counts, totals)
    dev.launch(exclusive_scan_kernel, 1, _blocks.THREADS, totals, starts)
    dev.launch(scatter_rows_kernel, P, _blocks.THREADS, labels, starts, counts, chunk, order)
    return order, starts


def _apply_update(dev, centers, x, order, starts, alpha):
    K, D = tuple(centers.shape)
    if shares_memory(x, centers):  # the features are read while the centers are written
        x_copy = dev.scratch(tuple(x.shape), x.dtype, "center_features")
        copy_rows(dev, x, x_copy)
        x = x_copy
    threads = fit(update_classes_kernel, threads_for(D))
    tiles = max(1, min(-(-D // threads), MAX_GRID_Y))
    dev.launch(update_classes_kernel, (K, tiles), threads, x, order, starts, np.float64(alpha),
               centers)


def center_update(call):
    """``fastloss.center_update`` on a ``checked_call``: ``call.centers`` in place,
    then the caller's NumPy centers, when there are any."""
    if call.features.shape[0]:
        order, starts = group_rows(call.dev, call.labels, call.centers.shape[0])
        _apply_update(call.dev, call.centers, call.features, order, starts, call.alpha)
    if call.host is not None:
        np.copyto(call.host, call.dev.to_host(call.centers))


def center_loss(call, update, reduction, grad, grad_out, g_view):
    """``(loss, grad)`` of ``fastloss.center_loss`` on a ``checked_call``, with the
    centers as given, then the update when ``update``.  ``g_view`` is
    ``checked_grad_out``'s view of the caller's ``grad_out`` (returned as the
    gradient when given).

    The kernel writes ``g_view`` directly unless it overlaps what is read
    after it is written: the labels, the features other than element for
    element, or the features at all when the update reads them afterwards
    (``grad_out=features``); then it writes a scratch array, copied into
    ``g_view`` after the update."""
    dev, x, labels, centers = call.dev, call.features, call.labels, call.centers
    n, D = tuple(x.shape)
    dtype = x.dtype
    T = compute_type(dtype)
    stats = count_denominator(n) if reduction == "mean" else None
    losses = per_row_losses(dev, n, reduction, dtype, T)
    g_native = g = scratch_for = None
    if grad:
        if g_view is None:
            g_native, g = dev.empty((n, D), dtype)
        elif (shares_memory(g_view, labels)
              or (shares_memory(g_view, x) and (update or not same_view(g_view, x)))):
            g = dev.scratch((n, D), dtype, "center_grad")
            g_native = scratch_for = g_view
        else:
            g_native = g = g_view
    if n:
        scale = T(grad_scale(reduction == "mean", n))
        dev.launch(center_rows_kernel, n, threads_for(D), x, labels, centers, scale, g, losses[1])
    if update:
        center_update(call)
    if n and scratch_for is not None:
        copy_rows(dev, g, scratch_for)
    loss = finish(dev, losses, stats, reduction, (n,), dtype)
    return loss, (dev.give_grad(g_native, grad_out) if grad else None)


def ptx_signatures():
    """Every kernel of this module with the argument types it is launched with:
    per dtype, the loss pass with and without a gradient (centers of the
    other float width in one of them), the update on strided and contiguous
    arrays; the grouping kernels once per label width."""
    f16, f32, f64, i64 = types.float16, types.float32, types.float64, types.int64
    sigs = []
    for X in (f16, f32, f64):
        T = f64 if X is f64 else f32
        other = f32 if T is f64 else f64
        sigs.append((center_rows_kernel, (X[:, ::1], i64[::1], T[:, ::1], T, types.none, T[::1])))
        sigs.append((center_rows_kernel,
                     (X[:, :], types.int32[:], other[:, :], T, X[:, :], X[::1])))
        sigs.append((update_classes_kernel, (X[:, :], i64[::1], i64[::1], f64, other[:, :])))
        sigs.append((update_classes_kernel, (X[:, ::1], i64[::1], i64[::1], f64, T[:, ::1])))
        sigs.append((copy_rows_kernel, (X[:, :], X[:, ::1])))
    for L in (i64, types.uint8):
        sigs.append((count_labels_kernel, (L[:], i64, i64[:, ::1])))
        sigs.append((scatter_rows_kernel, (L[:], i64[::1], i64[:, ::1], i64, i64[::1])))
    sigs.append((chunk_offsets_kernel, (i64[:, ::1], i64[::1])))
    sigs.append((exclusive_scan_kernel, (i64[::1], i64[::1])))
    return sigs


__all__ = ["Call", "center_loss", "center_update", "checked_call", "checked_grad_out",
           "group_rows", "ptx_signatures"]
