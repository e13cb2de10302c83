r"""Fused softmax cross-entropy kernels (CPU).

Per row, with ``z`` the (optionally soft-capped) logits, ``m = max z``,
``s = sum_c exp(z_c - m)``, ``lse = m + log s``, ``p = softmax(z)``, class
weights ``w`` (ones when not given), smoothing ``eps``, z-loss coefficient
``zc`` and sample weight ``sw``:

integer target ``y``::

    L = sw * [(1-eps) w_y (lse - z_y) + eps/C * sum_c w_c (lse - z_c) + zc lse^2]
    dL/dz_c = sw * [p_c ((1-eps) w_y + eps/C * sum_k w_k + 2 zc lse)
                    - (1-eps) w_y [c == y] - eps/C * w_c]

probability target ``t`` (smoothed ``t' = (1-eps) t + eps/C``)::

    L = sw * [sum_c t'_c w_c (lse - z_c) + zc lse^2]
    dL/dz_c = sw * [p_c (sum_k t'_k w_k + 2 zc lse) - t'_c w_c]

Soft-capping ``z = cap tanh(x / cap)`` multiplies the gradient by
``dz/dx = sech(x / cap)^2``.  The gradient is then multiplied by the
reduction's scale (1/denominator for "mean").

A row is read from memory once and written once; the passes in between run
on data in L1 (L2 for very wide rows): max (and the smoothing sum), exp into
a per-task scratch row, its sums, and the gradient.  Each row reads its
logits before it writes its gradient row, so the gradient may alias the
logits.  ``T`` is the compute type (float32 or float64); float16 rows arrive
as uint16 storage and are widened on load.

Rows of at most ``NARROW_ROW`` classes with integer targets and no soft-cap
(classification heads: 64x10 is a typical batch) run every pass inline in one
loop body (``_narrow_label_rows``): there the calls to the row helpers cost
more than their arithmetic.  Both paths share the loss and gradient formulas
(``_label_terms``) and differ only in the order of their sums.
"""
import math

import numpy as np
from numba import njit, prange
from numba.core.extending import register_jitable

from fastloss._reduction import grad_scale
from fastloss.cpu._math import load, store
from fastloss.cpu._rows import (KERNEL_OPTIONS, NARROW_ROW, ROW_BLOCK_ELEMENTS, exp_shifted,
                                ignored_row, jit, loss_total, mean_denominator, narrow_softmax,
                                reduction_jit, row_dot, row_max, softcap_row, softmax_grad_row,
                                use_threads)
from fastloss.cpu._threads import launch


@register_jitable(inline="always")
def _label_terms(zy, m, s, rest, ey, sz, wy, wsum, eps, zcoef, gscale, smooth, T):
    """Loss of a row with integer target y, before its sample weight, and its
    gradient as g_c = e_c a - b w_c for c != y, g_y = gy (before the soft-cap's
    slope); ``s`` = sum of e, ``rest`` = that sum without e_y, ``sz`` = sum w_c z_c."""
    one = T(1.0)
    lse = m + T(math.log(s))
    # -log p_y: lse - z_y cancels as p_y -> 1, log1p(rest / e_y) does not
    nll = T(math.log1p(rest / ey)) if ey >= rest else lse - zy
    loss = (one - eps) * wy * nll
    if eps > 0:
        loss += smooth * (wsum * lse - sz)
    if zcoef > 0:
        loss += zcoef * lse * lse
    spread = smooth * wsum + T(2.0) * zcoef * lse  # p_c's factor beyond the target's
    a = gscale * ((one - eps) * wy + spread) / s
    # the target's entry, with (p_y - 1) as -rest/s: no cancellation as p_y -> 1
    gy = gscale * ((ey / s) * spread - smooth * wy - (one - eps) * wy * (rest / s))
    return loss, a, gscale * smooth, gy


@jit
def _label_row(src, y, weight, wsum, sw, eps, zcoef, slope, gscale, e, g, grad, T):
    """Loss of one row with integer target y; writes its gradient when grad."""
    m = row_max(src, T(-np.inf))
    sz = row_dot(src, weight, T(0.0)) if eps > 0 else T(0.0)
    s, rest = exp_shifted(src, m, e, y)
    loss, a, b, gy = _label_terms(load(src, y), m, s, rest, e[y], sz, weight[y], wsum, eps,
                                  zcoef, gscale, eps / T(src.shape[0]), T)
    if grad:
        softmax_grad_row(e, a, b, weight, g, slope)
        store(g, y, gy * slope[y] if slope.shape[0] > 0 else gy)
    return sw * loss


@jit
def _narrow_label_rows(first, last, x, labels, weight, wsum, sw, ignore_index, eps, zcoef,
                       scale, g, grad, losses, T):
    """Rows [first, last) with integer labels and no soft-cap, at most NARROW_ROW
    classes: ``_label_row`` with every step inline (see ``narrow_softmax``)."""
    C = x.shape[1]
    e = np.empty(C, T)
    smooth = eps / T(C)
    for i in range(first, last):
        y = labels[i]
        if y == ignore_index:
            ignored_row(y, ignore_index, losses, i, g[i if grad else 0], grad)
            continue
        m, s, rest = narrow_softmax(x, i, y, e, T(-np.inf))
        sz = T(0.0)
        if eps > 0:
            for c in range(C):
                wc = weight[c]
                sz += T(0.0) if wc == 0 else wc * load(x, (i, c))
        swi = sw[i] if sw.shape[0] > 0 else T(1.0)
        loss, a, b, gy = _label_terms(load(x, (i, y)), m, s, rest, e[y], sz, weight[y], wsum, eps,
                                      zcoef, swi * scale, smooth, T)
        losses[i] = swi * loss
        if grad:
            for c in range(C):
                store(g, (i, c), e[c] * a - b * weight[c])
            store(g, (i, y), gy)


@reduction_jit
def _target_sums(src, t, weight, keep, smooth):
    """sum_c t'_c w_c and sum_c t'_c w_c z_c with t' = keep * t + smooth
    (a class without target mass contributes 0, even at z = -inf)."""
    zero = smooth - smooth
    tw_sum = zero
    twz_sum = zero
    for c in range(src.shape[0]):
        tw = (keep * load(t, c) + smooth) * weight[c]
        tw_sum += tw
        twz_sum += zero if tw == 0 else tw * load(src, c)
    return tw_sum, twz_sum


@jit
def _prob_row(src, t, weight, sw, eps, zcoef, slope, gscale, e, g, grad, T):
    """Loss of one row with probability target t; writes its gradient when grad."""
    C = src.shape[0]
    one = T(1.0)
    smooth = eps / T(C)
    m = row_max(src, T(-np.inf))
    tw_sum, twz_sum = _target_sums(src, t, weight, one - eps, smooth)
    s, _ = exp_shifted(src, m, e, -1)
    lse = m + T(math.log(s))
    loss = tw_sum * lse - twz_sum + zcoef * lse * lse
    if grad:
        a = gscale * (tw_sum + T(2.0) * zcoef * lse) / s
        keep = gscale * (one - eps)
        b = gscale * smooth
        for c in range(C):
            d = slope[c] if slope.shape[0] > 0 else one
            store(g, c, (e[c] * a - (keep * load(t, c) + b) * weight[c]) * d)
    return sw * loss


@jit
def _rows(first, last, x, labels, probs, weight, wsum, sw, ignore_index, eps, zcoef,
          cap, inv_cap, scale, g, grad, losses, T):
    """Rows [first, last): integer ``labels`` or ``probs`` (the other is None;
    Numba prunes the branch that tests the None one at compile time)."""
    C = x.shape[1]
    if labels is not None and cap == 0 and C <= NARROW_ROW:
        _narrow_label_rows(first, last, x, labels, weight, wsum, sw, ignore_index, eps, zcoef,
                           scale, g, grad, losses, T)
        return
    e = np.empty(C, T)  # exp(z - m) of the current row, kept in L1 for the gradient
    capped = np.empty(C if cap > 0 else 0, T)  # soft-capped logits of the current row
    slope = np.empty(C if cap > 0 else 0, T)  # their derivative; empty: no soft-cap
    one = T(1.0)
    for i in range(first, last):
        gi = g[i if grad else 0]
        swi = sw[i] if sw.shape[0] > 0 else one
        if labels is not None:
            y = labels[i]
            if ignored_row(y, ignore_index, losses, i, gi, grad):
                continue
            if cap > 0:
                softcap_row(x[i], capped, slope, cap, inv_cap)
                losses[i] = _label_row(capped, y, weight, wsum, swi, eps, zcoef, slope,
                                       swi * scale, e, gi, grad, T)
            else:
                losses[i] = _label_row(x[i], y, weight, wsum, swi, eps, zcoef, slope,
                                       swi * scale, e, gi, grad, T)
        if probs is not None:
            if cap > 0:
                softcap_row(x[i], capped, slope, cap, inv_cap)
                losses[i] = _prob_row(capped, probs[i], weight, swi, eps, zcoef, slope,
                                      swi * scale, e, gi, grad, T)
            else:
                losses[i] = _prob_row(x[i], probs[i], weight, swi, eps, zcoef, slope,
                                      swi * scale, e, gi, grad, T)


@njit(parallel=True, **KERNEL_OPTIONS)
def _rows_parallel(x, labels, probs, weight, sw, ignore_index, params, mean, g, grad, losses):
    T = losses.dtype.type
    n, C = x.shape
    wsum, eps, zcoef, cap = T(params[0]), T(params[1]), T(params[2]), T(params[3])
    inv_cap = T(1.0) / cap if cap > 0 else T(0.0)
    denom = mean_denominator(labels, probs, ignore_index, weight, sw)
    scale = T(grad_scale(mean, denom))
    block = max(1, ROW_BLOCK_ELEMENTS // C)
    for b in prange((n + block - 1) // block):
        _rows(b * block, min(n, (b + 1) * block), x, labels, probs, weight, wsum, sw,
              ignore_index, eps, zcoef, cap, inv_cap, scale, g, grad, losses, T)
    return loss_total(losses), denom


@jit
def _rows_serial(x, labels, probs, weight, sw, ignore_index, params, mean, g, grad, losses):
    T = losses.dtype.type
    wsum, eps, zcoef, cap = T(params[0]), T(params[1]), T(params[2]), T(params[3])
    inv_cap = T(1.0) / cap if cap > 0 else T(0.0)
    denom = mean_denominator(labels, probs, ignore_index, weight, sw)
    scale = T(grad_scale(mean, denom))
    _rows(0, x.shape[0], x, labels, probs, weight, wsum, sw, ignore_index, eps, zcoef,
          cap, inv_cap, scale, g, grad, losses, T)
    return loss_total(losses), denom


def cross_entropy_rows(x, labels, probs, weight, sw, ignore_index, params, mean, g, grad, losses):
    """Fill ``losses`` (and ``g`` when ``grad``) for all rows of ``x`` (N, C).

    ``params`` is float64 ``[sum of class weights, label_smoothing, z_loss,
    softcap or 0]``.  Returns ``(sum of losses, "mean" denominator)``; runs
    serially when the input is small.
    """
    return launch(_rows_parallel, _rows_serial, use_threads(x),
                  x, labels, probs, weight, sw, ignore_index, params, mean, g, grad, losses)
