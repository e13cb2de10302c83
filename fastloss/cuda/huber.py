r"""Fused Huber loss (CUDA), elementwise, grid-stride: the kernels and their launch.

With ``r = input - target`` and weight ``w``, ``L = w * huber(r)`` and
``dL/dinput = w * huber_slope(r)``: the formulas of ``fastloss.formulas.huber``,
which the CPU kernel shares.

Sample weights reach the kernel compactly, never broadcast to the input's
size, as on the CPU: element ``i`` has weight ``w[(i // inner) % period]``,
where ``w`` is a view of the caller's weights (1-D, or 2-D strided: see
``_reduction.element_at``) holding the axes along which they vary, and ``inner``
the number of elements over the trailing axes they are broadcast along.
Weights that vary along two groups of axes with a broadcast axis between
them (shape ``(N, 1, K)`` against ``(N, M, K)``, say), or along several
non-contiguous axes, are the exception: they are copied to the host once and
compacted there, by the CPU's ``_storage.compact_weights``.

"mean" divides by the sum of the broadcast weights, computed on the device
before the fused kernel (each block sums a share of ``w``, in float64, times
the number of times each weight repeats; one block adds the partial sums),
so that nothing waits for the host.  The target is rounded to the input's
dtype first, as the CPU path does.

The fused kernel runs on ``_reduction.elementwise_grid(n)``, a grid that
depends on ``n`` only (at most ``ELEMENTWISE_BLOCKS`` blocks: a few waves),
each thread loading ``ELEMENTWISE_STEP`` elements of the input, target and
weights before using any, with unsigned indices; float16 is stored as float16
and computed in float32.  Each thread sums its losses in float64, each block
writes one partial sum, and ``finish`` adds the at most ``ELEMENTWISE_BLOCKS``
partials in one block: the same bits on every GPU and run.
"""
import math

import numpy as np
from numba import cuda, float64, uint64

from fastloss.cpu._storage import compact_weights as compact_on_host
from fastloss.cuda._arrays import compute_type, flat
from fastloss.cuda._blocks import MAX_THREADS, block_sum, cast_like, kernel
from fastloss.cuda._formulas import huber
from fastloss.cuda._reduction import (ELEMENTWISE_STEP, count_denominator, element_at,
                                      elementwise_grid, elementwise_loss, gradient_scale,
                                      set_element_at, step_at, sum_to, unsigned_grid_stride)


@cuda.jit(device=True)
def _weight(sw, i, every, cycle, one):
    """The weight of element ``i``: ``sw[(i // every) % cycle]`` (all unsigned), 1
    when ``sw`` is None."""
    if sw is None:
        return one
    j = i % cycle if every == 1 else (i // every) % cycle
    return cast_like(element_at(sw, j), one)


@cuda.jit(device=True)
def _huber_element(xv, tv, w, i, delta, half, zero, scale, g, losses, acc):
    """One element's loss (into ``losses[i]`` with "none") and gradient (into ``g``),
    from its stored input and target and its weight; ``acc`` plus the loss."""
    r = cast_like(xv, zero) - cast_like(cast_like(tv, xv), zero)
    loss = w * huber.huber(r, delta, half)
    if losses is not None:
        losses[i] = loss
    if g is not None:
        set_element_at(g, i, scale * w * huber.huber_slope(r, delta, zero))
    return acc + float64(loss)


@kernel()
def huber_elements_kernel(x, t, n, sw, inner, period, delta, stats, g, losses, partials):
    """Elements ``0 <= i < n`` of ``x`` and ``t`` (1-D, or 2-D strided), on
    ``elementwise_grid(n)``: ``ELEMENTWISE_STEP`` elements a step per thread, all
    loaded before any is used (``g`` may be ``x``: each element is read and
    written by one thread, read first).  ``sw`` (None: weight 1) gives element
    i the weight ``sw[(i // inner) % period]``; ``losses`` (n,) gets every
    element's loss ("none"), ``partials`` (blocks,) each block's float64 sum
    (otherwise); ``stats`` (the "mean" denominator) and ``g`` are optional."""
    buf = cuda.shared.array(MAX_THREADS, float64)
    zero = cast_like(0, delta)
    one = cast_like(1, zero)
    half = cast_like(0.5, zero)
    scale = gradient_scale(stats, zero)
    acc = 0.0
    i, stride = unsigned_grid_stride()
    end = uint64(n)
    every = uint64(inner)  # inner and period, unsigned
    cycle = uint64(period)
    ahead = stride * uint64(ELEMENTWISE_STEP - 1)
    while i + ahead < end:  # unchecked since i + ahead < n <= 2**63
        (i1, i2, i3), (x0, x1, x2, x3) = step_at(x, i, stride)
        _, (t0, t1, t2, t3) = step_at(t, i, stride)
        w0, w1 = _weight(sw, i, every, cycle, one), _weight(sw, i1, every, cycle, one)
        w2, w3 = _weight(sw, i2, every, cycle, one), _weight(sw, i3, every, cycle, one)
        acc = _huber_element(x0, t0, w0, i, delta, half, zero, scale, g, losses, acc)
        acc = _huber_element(x1, t1, w1, i1, delta, half, zero, scale, g, losses, acc)
        acc = _huber_element(x2, t2, w2, i2, delta, half, zero, scale, g, losses, acc)
        acc = _huber_element(x3, t3, w3, i3, delta, half, zero, scale, g, losses, acc)
        i = i3 + stride
    while i < end:
        acc = _huber_element(element_at(x, i), element_at(t, i),
                             _weight(sw, i, every, cycle, one), i, delta, half, zero, scale, g,
                             losses, acc)
        i += stride
    if partials is not None:
        total = block_sum(buf, acc)
        if cuda.threadIdx.x == 0:
            partials[cuda.blockIdx.x] = total


@kernel()
def weight_partials_kernel(w, period, reps, partials):
    """partials[b] = reps * (float64 sum of block b's share of w[0:period])."""
    buf = cuda.shared.array(MAX_THREADS, float64)
    acc = 0.0
    j, stride = unsigned_grid_stride()
    while j < uint64(period):
        acc += float64(element_at(w, j))
        j += stride
    total = block_sum(buf, acc)
    if cuda.threadIdx.x == 0:
        partials[cuda.blockIdx.x] = total * reps


def compact_weights(dev, sw, shape, T):
    """``(w, inner, period)`` for device weights ``sw`` broadcasting against
    ``shape`` (of at least one element): element i (C order) has weight
    ``w[(i // inner) % period]``, ``w`` a view of ``sw`` without a copy, except
    in the cases the module docstring names."""
    nd = len(shape)
    ws = (1,) * (nd - sw.ndim) + tuple(sw.shape)
    varying = [k for k in range(nd) if ws[k] != 1]  # there ws[k] == shape[k] > 1
    if not varying:
        one = sw.reshape((1,)) if sw.ndim == 0 else sw[(slice(0, 1),) * sw.ndim].reshape((1,))
        return one, 1, 1
    lo, hi = varying[0], varying[-1]
    broadcast_between = any(ws[k] == 1 and shape[k] > 1 for k in range(lo, hi + 1))
    if not broadcast_between:
        inner = math.prod(shape[hi + 1:])
        period = math.prod(shape[k] for k in varying)
        if sw.is_c_contiguous():
            return sw.reshape((period,)), inner, period
        # the same elements, with the size-1 axes indexed away: a strided view
        pad = nd - sw.ndim
        v = sw[tuple(slice(None) if ws[k + pad] != 1 else 0 for k in range(sw.ndim))]
        if v.ndim <= 2:
            return v, inner, period
    # several groups of varying axes (or a strided view of more than 2 axes)
    w, inner, period = compact_on_host(dev.to_host(sw), shape, T)
    return dev.view(w, "sample_weight"), inner, period


def weight_denominator(dev, w, period, n):
    """Device ``stats`` (float64, 1): the sum of the weights broadcast to ``n``
    elements, each of the ``period`` weights ``w`` repeating ``n / period`` times."""
    blocks, threads = elementwise_grid(period)
    partials = dev.scratch((blocks,), np.float64, "weight_partials")
    dev.launch(weight_partials_kernel, blocks, threads, w, period, float(n // period), partials)
    stats = dev.scratch((1,), np.float64, "weight_sum")
    sum_to(dev, partials, stats)
    return stats


def huber_loss(dev, input, target, sample_weight, delta, reduction, grad, grad_out,
               caller_grad_out):
    """``(loss, grad)`` of ``fastloss.huber_loss`` on checked device views of any
    shape, as native arrays of the call's kind (``grad`` the caller's
    ``grad_out`` when given).  ``sample_weight`` is None or a device view
    broadcasting against ``input``."""
    shape = tuple(input.shape)
    n = math.prod(shape)
    T = compute_type(input.dtype)
    x, t = flat(input, "input"), flat(target, "target")
    sw, inner, period = None, 1, 1
    if sample_weight is not None and n:
        sw, inner, period = compact_weights(dev, sample_weight, shape, T)
    stats = None
    if reduction == "mean":
        stats = weight_denominator(dev, sw, period, n) if sw is not None else count_denominator(n)
    loss, g = elementwise_loss(dev, huber_elements_kernel, (x, t, n, sw, inner, period, T(delta)),
                               n, shape, stats, reduction, grad, grad_out, input.dtype)
    return loss, dev.give_grad(g, caller_grad_out)


def ptx_signatures():
    """Argument types of every kernel here, for the compile check (tests/test_cuda_compile.py)."""
    from numba import types
    i64, f64, N = types.int64, types.float64, types.none
    sigs = []
    for X, T in ((types.float16, types.float32), (types.float32, types.float32),
                 (types.float64, types.float64)):
        # x, t, sw, stats, g, losses, partials
        for case in ((X[::1], X[::1], N, f64, X[::1], N, f64[::1]),  # "mean", a count
                     (X[::1], X[::1], X[::1], f64[::1], X[::1], N, f64[::1]),
                     (X[::1], X[::1], X[:], N, X[::1], X[::1], N),  # "none"
                     (X[:, :], X[:], X[:, :], N, X[:, :], N, f64[::1]),  # strided, "sum"
                     (X[::1], f64[::1], T[::1], f64[::1], N, N, f64[::1]),  # no gradient
                     (X[:], X[:, :], f64[::1], N, X[::1], X[::1], N)):
            x, t, sw, stats, g, losses, partials = case
            sigs.append((huber_elements_kernel,
                         (x, t, i64, sw, i64, i64, T, stats, g, losses, partials)))
        for w in (X[::1], X[:], X[:, :]):
            sigs.append((weight_partials_kernel, (w, i64, f64, f64[::1])))
    sigs.append((weight_partials_kernel, (f64[::1], i64, f64, f64[::1])))
    return sigs
