"""Reductions on the GPU, shared by every loss.

A "mean" needs its denominator before the fused kernel runs, since each
gradient is scaled by it: ``class_denominator`` computes it on the device
(``stats[0]``, float64) and the kernels read it there, so nothing waits for
the host.  A denominator the host already knows (a count of rows or
elements) is passed by value instead, a float64 ``stats``: no launch, no
allocation (``denominator`` reads either).  After the fused kernel, ``finish`` sums the per-row (or per-block)
losses in float64 in a single block, in a fixed order: the same bits on every
run.  ``grad_scale`` is the CPU one (``register_jitable`` serves both).
"""
import math

import numpy as np
from numba import cuda, float64, types
from numba.cuda.extending import overload

from fastloss._reduction import grad_scale
from fastloss.cuda import _blocks
from fastloss.cuda._arrays import flat
from fastloss.cuda._blocks import MAX_THREADS, block_sum, cast_like, kernel

__all__ = ["class_denominator", "count_denominator", "elementwise_loss", "elementwise_outputs",
           "finish", "grad_scale", "gradient_scale", "per_row_losses", "sum_to"]


@kernel()
def _class_denominator_kernel(n, labels, weight, sw, ignore_index, stats):
    """stats[0] = sum over rows i not ignored of weight[labels[i]] * sw[i]
    (each factor 1 when not given; every row counts when labels is None)."""
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


@kernel()
def _total_kernel(losses, stats, out):
    """out[0] = sum(losses) in float64, divided by stats[0] when stats is given
    ("mean"; NaN over a zero denominator, as in PyTorch)."""
    buf = cuda.shared.array(MAX_THREADS, float64)
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


def sum_to(dev, partials, stats):
    """Launch the single-block float64 sum of ``partials`` into ``stats[0]`` (a device
    array of one float64): what ``finish`` does for a loss, for a denominator."""
    dev.launch(_total_kernel, 1, _blocks.THREADS, partials, None, stats)


def class_denominator(dev, n, labels, weight, sw, ignore_index):
    """Device ``stats`` (float64, 1) holding the "mean" denominator."""
    stats = dev.scratch((1,), np.float64)
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


def elementwise_outputs(dev, n, shape, reduction, grad, grad_out, dtype):
    """Outputs of a grid-stride kernel over the ``n`` elements of ``shape``:
    ``(losses, partials, g_native, g, blocks, threads)``.  ``losses`` (one per
    element, in ``dtype``, for "none") and ``partials`` (one float64 sum per
    block, otherwise) are ``(native, view)`` pairs, the unused one
    ``(None, None)``; hand the used one to ``finish``.  ``g`` is the flat view
    of the gradient (``grad_out`` or a new array), None when not asked for."""
    blocks, threads = _blocks.grid_for(n)
    none = (None, None)
    losses = dev.empty((n,), dtype) if reduction == "none" else none
    partials = dev.empty((blocks if n else 0,), np.float64) if reduction != "none" else none
    g_native = g = None
    if grad:
        g_native, g = (grad_out, grad_out) if grad_out is not None else dev.empty(shape, dtype)
        g = flat(g, "grad_out")
    return losses, partials, g_native, g, blocks, threads


def elementwise_loss(dev, kernel, args, n, shape, stats, reduction, grad, grad_out, dtype):
    """``(loss, g_native)`` from ``kernel(*args, stats, g, losses, partials)``, a
    grid-stride kernel over the ``n`` elements of ``shape`` (see
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
