"""Reductions on the GPU, shared by every loss.

A "mean" needs its denominator before the fused kernel runs, since each
gradient is scaled by it: ``class_denominator`` computes it on the device
(``stats[0]``, float64) and the kernels read it there, so nothing waits for
the host.  A denominator the host already knows (a count of rows or
elements) is passed by value instead, a float64 ``stats``: no launch, no
allocation (``denominator`` reads either).  After the fused kernel, ``finish``
sums the per-row (or per-block) losses in float64 in a single block, in a
fixed order: the same bits on every run.  ``grad_scale`` is the CPU one
(``register_jitable`` serves both).

A row kernel whose "mean" denominator ``class_denominator`` computed makes the
total itself (``last_block_total``), with no launch of its own: that kernel
also zeroes ``stats[1]``, a count of the row kernel's finished blocks; each
block, once its rows are written, fences and counts itself there (one float64
atomic add, exact for counts below 2**53), and the block that counts last sums
every per-row loss in the fixed order of ``finish``'s kernel: which block is
last changes nothing in the bits.

Elementwise kernels run ``elementwise_grid(n)``: at most
``ELEMENTWISE_BLOCKS`` blocks of ``THREADS`` threads (2048 x 256: about two
waves of an H200's 132 SMs at 8 resident blocks each), each thread taking
``ELEMENTWISE_STEP`` elements a step (their loads issued before any is used),
and as many steps as the grid-stride loop needs, with unsigned indices
(``element_at``: no negative-index wrap-around).  The grid is a function of
``n`` (and the configured block size) only, never of the GPU, so the float64
per-block partial sums, and their sum by ``finish`` (one block over at most
``ELEMENTWISE_BLOCKS`` partials), have the same bits on every GPU and run.
"""
import math

import numpy as np
from numba import cuda, float64, types, uint64
from numba.cuda.extending import overload

from fastloss._reduction import grad_scale
from fastloss.cuda import _blocks
from fastloss.cuda._arrays import flat
from fastloss.cuda._blocks import MAX_THREADS, block_sum, cast_like, kernel

__all__ = ["class_denominator", "count_denominator", "element_at", "elementwise_grid",
           "elementwise_loss", "elementwise_outputs", "finish", "grad_scale", "gradient_scale",
           "last_block_total", "per_row_losses", "set_element_at", "sum_to", "unsigned_grid_stride"]

ELEMENTWISE_BLOCKS = 2048  # the most blocks of an elementwise kernel: a few waves on any GPU
ELEMENTWISE_STEP = 4  # elements a thread of an elementwise kernel loads before using them


@kernel()
def _class_denominator_kernel(n, labels, weight, sw, ignore_index, stats):
    """stats[0] = sum over rows i not ignored of weight[labels[i]] * sw[i]
    (each factor 1 when not given; every row counts when labels is None),
    and stats[1] = 0 when there is one: the count of ``last_block_total``."""
    buf = cuda.shared.array(MAX_THREADS, float64)
    acc = 0.0
    i = cuda.threadIdx.x
    while i < n:
        v = 1.0
        keep = True
        if labels is not None:
            y = labels[i]
            keep = y != ignore_index
            if keep and weight is not None:
                v = float64(weight[y])
        if keep:
            if sw is not None:
                v *= float64(sw[i])
            acc += v
        i += cuda.blockDim.x
    total = block_sum(buf, acc)
    if cuda.threadIdx.x == 0:
        stats[0] = total
        if stats.shape[0] > 1:
            stats[1] = 0.0


@cuda.jit(device=True)
def _sum_losses(buf, losses, stats, out):
    """out[0] = sum(losses) in float64 by this block, in a fixed order, divided by
    the denominator when stats is given ("mean"; NaN over a zero denominator, as
    in PyTorch)."""
    acc = 0.0
    i = cuda.threadIdx.x
    while i < losses.shape[0]:
        acc += float64(losses[i])
        i += cuda.blockDim.x
    total = block_sum(buf, acc)
    if cuda.threadIdx.x == 0:
        if stats is not None:
            d = denominator(stats)
            total = total / d if d != 0 else math.nan
        out[0] = total


@kernel()
def _total_kernel(losses, stats, out):
    """out[0] = sum(losses) in float64, divided by the denominator when stats is
    given (``_sum_losses``), by one block."""
    buf = cuda.shared.array(MAX_THREADS, float64)
    _sum_losses(buf, losses, stats, out)


@cuda.jit(device=True)
def last_block_total(buf, losses, stats, out):
    """In a kernel whose blocks each wrote their share of ``losses``, called by
    every thread of every block at its end: the block that finishes last writes
    ``out[0]`` as ``_total_kernel`` would (sum over ``stats[0]``), in the same
    fixed order whichever block that is.  ``stats[1]`` must be 0 at launch
    (``class_denominator`` zeroes it); ``buf`` is a shared float64 buffer."""
    cuda.syncthreads()  # this block's losses are written
    if cuda.threadIdx.x == 0:
        cuda.threadfence()  # ... and visible to every block before it counts itself
        buf[0] = cuda.atomic.add(stats, 1, 1.0)
    cuda.syncthreads()
    last = buf[0] == float64(cuda.gridDim.x - 1)
    cuda.syncthreads()  # buf is reused by the sum
    if last:  # the same for every thread of the block
        cuda.threadfence()  # every other block's losses are seen after its count
        _sum_losses(buf, losses, stats, out)


def sum_to(dev, partials, stats):
    """Launch the single-block float64 sum of ``partials`` into ``stats[0]`` (a device
    array of one float64): what ``finish`` does for a loss, for a denominator."""
    dev.launch(_total_kernel, 1, _blocks.THREADS, partials, None, stats)


def class_denominator(dev, n, labels, weight, sw, ignore_index):
    """Device ``stats`` (float64, 2) holding the "mean" denominator, and 0 (the
    count of ``last_block_total``)."""
    stats = dev.scratch((2,), np.float64, "mean_stats")
    dev.launch(_class_denominator_kernel, 1, _blocks.THREADS, n, labels, weight, sw, ignore_index,
               stats)
    return stats


def per_row_losses(dev, n, reduction, dtype, compute_type):
    """``(native, view)`` for the per-row losses: in ``dtype`` for "none"
    (returned as they are), else in the compute type (summed by ``finish``)."""
    return dev.empty((n,), dtype if reduction == "none" else compute_type)


def finish(dev, losses, stats, reduction, shape, dtype):
    """The loss as returned to the caller, from ``losses = (native, view)``:
    the per-row losses reshaped to ``shape`` for "none", else a 0-d array of
    ``dtype`` (``stats`` is the "mean" denominator, None for "sum")."""
    native, view = losses
    if reduction == "none":
        return dev.give(native, shape)
    out_native, out_view = dev.empty((1,), dtype)
    dev.launch(_total_kernel, 1, _blocks.THREADS, view, stats if reduction == "mean" else None,
               out_view)
    return dev.give(out_native, ())


def elementwise_grid(n):
    """``(blocks, threads)`` of an elementwise kernel over ``n`` elements: a function
    of ``n`` and ``THREADS`` only (see the module docstring)."""
    threads = _blocks.THREADS
    return max(1, min(ELEMENTWISE_BLOCKS, -(-n // (threads * ELEMENTWISE_STEP)))), threads


@cuda.jit(device=True)
def unsigned_grid_stride():
    """``(first element, stride)`` of this thread in an elementwise kernel, unsigned."""
    return uint64(cuda.grid(1)), uint64(cuda.gridsize(1))


def element_at(a, i):
    """Element ``i`` (unsigned, C order) of a 1-D array, or of a 2-D one that may be
    strided (``a[i // W, i % W]``): the elementwise kernels read and write
    non-contiguous 2-D inputs this way, without a copy or negative-index wrap-around."""
    if a.ndim == 1:
        return a[i]
    w = uint64(a.shape[1])
    return a[i // w, i % w]


@overload(element_at, target="cuda")
def _element_at(a, i):
    if a.ndim == 1:
        return lambda a, i: a[i]

    def impl(a, i):
        w = uint64(a.shape[1])
        return a[i // w, i % w]
    return impl


@cuda.jit(device=True)
def step_at(a, i, stride):
    """``(i1, i2, i3)``, the next three indices of this thread's grid stride after ``i``,
    and ``a`` at the four: an elementwise step's loads, issued before any is used."""
    i1 = i + stride
    i2 = i1 + stride
    i3 = i2 + stride
    return (i1, i2, i3), (element_at(a, i), element_at(a, i1), element_at(a, i2),
                          element_at(a, i3))


def set_element_at(a, i, value):
    """``element_at(a, i) = value``."""
    if a.ndim == 1:
        a[i] = value
    else:
        w = uint64(a.shape[1])
        a[i // w, i % w] = value


@overload(set_element_at, target="cuda")
def _set_element_at(a, i, value):
    if a.ndim == 1:
        def impl(a, i, value):
            a[i] = value
    else:
        def impl(a, i, value):
            w = uint64(a.shape[1])
            a[i // w, i % w] = value
    return impl


def elementwise_outputs(dev, n, shape, reduction, grad, grad_out, dtype):
    """Outputs of an elementwise kernel (``elementwise_grid``) over the ``n`` elements of ``shape``:
    ``(losses, partials, g_native, g, blocks, threads)``.  ``losses`` (one per
    element, in ``dtype``, for "none") and ``partials`` (one float64 sum per
    block, otherwise) are ``(native, view)`` pairs, the unused one
    ``(None, None)``; hand the used one to ``finish``.  ``g`` is the flat view
    of the gradient (``grad_out`` or a new array), None when not asked for."""
    blocks, threads = elementwise_grid(n)
    none = (None, None)
    losses = dev.empty((n,), dtype) if reduction == "none" else none
    partials = dev.empty((blocks if n else 0,), np.float64) if reduction != "none" else none
    g_native = g = None
    if grad:
        g_native, g = (grad_out, grad_out) if grad_out is not None else dev.empty(shape, dtype)
        g = flat(g, "grad_out")
    return losses, partials, g_native, g, blocks, threads


def elementwise_loss(dev, kernel, args, n, shape, stats, reduction, grad, grad_out, dtype):
    """``(loss, g_native)`` from ``kernel(*args, stats, g, losses, partials)``, an
    elementwise kernel (``elementwise_grid``) over the ``n`` elements of ``shape`` (see
    ``elementwise_outputs``), launched when there is any element; ``stats`` is
    the "mean" denominator (None otherwise), and ``finish`` makes the loss."""
    losses, partials, g_native, g, blocks, threads = elementwise_outputs(
        dev, n, shape, reduction, grad, grad_out, dtype)
    if n:
        dev.launch(kernel, blocks, threads, *args, stats, g, losses[1], partials[1])
    return finish(dev, losses if reduction == "none" else partials, stats, reduction, shape,
                  dtype), g_native


def count_denominator(n):
    """The "mean" denominator ``n``, a count the host knows, as kernels take it
    (``stats`` by value)."""
    return float(n)


def denominator(stats):
    """In a kernel: the "mean" denominator, ``stats[0]`` (computed on the device)
    or ``stats`` itself (a float64 the host knew).  On the GPU the choice is made
    by type, at compile time."""
    return stats if isinstance(stats, float) else stats[0]


@overload(denominator, target="cuda")
def _denominator(stats):
    if isinstance(stats, types.Float):
        return lambda stats: stats
    return lambda stats: stats[0]


def gradient_scale(stats, like):
    """In a kernel: the factor of each gradient, in the type of the scalar ``like``:
    ``grad_scale`` of the "mean" denominator (``denominator``), or 1 when ``stats``
    is None.  On the GPU the choice is made by type, at compile time."""
    return cast_like(1, like) if stats is None else cast_like(grad_scale(True, denominator(stats)),
                                                              like)


@overload(gradient_scale, target="cuda")
def _gradient_scale(stats, like):
    T = like
    if isinstance(stats, types.NoneType):
        return lambda stats, like: T(1)
    return lambda stats, like: T(grad_scale(True, denominator(stats)))


def ptx_signatures():
    """Argument types of every kernel here, for the compile check."""
    from numba import types
    i64, f64 = types.int64, types.float64
    sigs = []
    for T in (types.float16, types.float32, types.float64):
        sigs.append((_total_kernel, (T[::1], f64[::1], T[::1])))
        sigs.append((_total_kernel, (T[::1], types.none, T[::1])))
        sigs.append((_total_kernel, (f64[::1], f64[::1], T[::1])))  # per-block partial sums
        sigs.append((_total_kernel, (T[::1], f64, T[::1])))  # a count as the denominator
        sigs.append((_total_kernel, (f64[::1], f64, T[::1])))
        sigs.append((_class_denominator_kernel, (i64, types.int64[:], T[::1], T[:], i64, f64[::1])))
        sigs.append((_class_denominator_kernel, (i64, types.none, types.none, T[:], i64, f64[::1])))
    sigs.append((_class_denominator_kernel,
                 (i64, types.uint8[::1], types.none, types.none, i64, f64[::1])))
    return sigs
