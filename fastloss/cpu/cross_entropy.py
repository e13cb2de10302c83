r"""Fused softmax cross-entropy kernels (CPU).

The loss and gradient of a row are ``fastloss.formulas.softmax``'s; the soft-cap's
slope ``dz/dx = sech(x / cap)^2`` comes from ``softcap_row``.

A row is read from memory once and written once; the passes in between run
on data in L1 (L2 for very wide rows): max (and the smoothing sum), exp into
a per-task scratch row, its sums, and the gradient.  Each row reads its
logits before it writes its gradient row, so the gradient may alias the
logits.  ``T`` is the compute type (float32 or float64); float16 rows arrive
as uint16 storage and are widened on load.

Rows of at most ``NARROW_ROW`` classes with integer targets and no soft-cap
(classification heads: 64x10 is a typical batch) run every pass inline in one
loop body (``_narrow_label_rows``): there the calls to the row helpers cost
more than their arithmetic.  Both paths share the formulas and differ only in
the order of their sums.

Absent options are None (``weight``, ``sw``, ``cap``, the gradient ``g``):
Numba compiles a specialization per combination and prunes the branches that
test them.
"""

import numpy as np
from numba import njit, prange

from fastloss._reduction import grad_scale
from fastloss.cpu import _storage
from fastloss.cpu._formulas import softmax
from fastloss.cpu._math import load, store
from fastloss.cpu._jit import KERNEL_OPTIONS, jit, reduction_jit
from fastloss.cpu._rows import (NARROW_ROW, ROW_BLOCK_ELEMENTS, exp_shifted, ignored_row,
                                loss_total, mean_denominator, narrow_softmax, path, row_dot, row_loss,
                                row_max, softcap_row, softmax_grad_row)


@jit
def _label_row(src, y, weight, wsum, keep, eps, smooth, zcoef, slope, gscale, e, g, i):
    """Loss of one row with integer target y, before its sample weight; writes
    its gradient into ``g[i]`` unless ``g`` is None."""
    T = e.dtype.type
    m = row_max(src, T(-np.inf))
    szm = row_dot(src, weight, m, T(0.0)) if eps > 0 else T(0.0)
    s, rest = exp_shifted(src, m, e, y)
    wy = T(1.0) if weight is None else weight[y]
    loss, lse = softmax.label_loss(load(src, y), m, s, rest, e[y], szm, wy, wsum, keep, smooth,
                                   eps, zcoef)
    if g is not None:
        a, b, gy = softmax.label_gradient(lse, s, rest, e[y], wy, wsum, keep, smooth, zcoef,
                                          gscale, T(2.0))
        softmax_grad_row(e, a, b, weight, g[i], slope)
        gy = gy if slope is None else gy * slope[y]  # named: see softmax_grad_row
        store(g, (i, y), gy)
    return loss


@jit
def _narrow_label_rows(first, last, x, labels, weight, wsum, sw, ignore_index, keep, eps, smooth,
                       zcoef, scale, g, losses):
    """Rows [first, last) with integer labels and no soft-cap, at most NARROW_ROW
    classes: ``_label_row`` with every step inline (see ``narrow_softmax``)."""
    T = losses.dtype.type
    C = x.shape[1]
    e = np.empty(C, T)
    for i in range(first, last):
        swi = T(1.0) if sw is None else sw[i]
        y = labels[i]
        if ignored_row(y, ignore_index, losses, g, i):
            continue
        m, s, rest = narrow_softmax(x, i, y, e, T(-np.inf))
        szm = T(0.0)
        if eps > 0:
            for c in range(C):
                wc = T(1.0) if weight is None else weight[c]
                szm += T(0.0) if wc == 0 else wc * (load(x, (i, c)) - m)
        wy = T(1.0) if weight is None else weight[y]
        loss, lse = softmax.label_loss(load(x, (i, y)), m, s, rest, e[y], szm, wy, wsum, keep,
                                       smooth, eps, zcoef)
        losses[i] = swi * loss
        if g is not None:
            a, b, gy = softmax.label_gradient(lse, s, rest, e[y], wy, wsum, keep, smooth, zcoef,
                                              swi * scale, T(2.0))
            for c in range(C):
                wc = T(1.0) if weight is None else weight[c]
                store(g, (i, c), softmax.class_gradient(e[c], a, b, wc))
            store(g, (i, y), gy)


@reduction_jit
def _target_sums(src, t, weight, m, keep, smooth, one):
    """sum_c t'_c w_c and sum_c t'_c w_c (z_c - m) (a class without target mass
    contributes 0, even at z = -inf)."""
    zero = smooth - smooth
    tw_sum = zero
    twzm_sum = zero
    for c in range(src.shape[0]):
        wc = one if weight is None else weight[c]
        tw = softmax.target_weight(load(t, c), wc, keep, smooth)
        tw_sum += tw
        twzm_sum += zero if tw == 0 else tw * (load(src, c) - m)
    return tw_sum, twzm_sum


@jit
def _prob_row(src, t, weight, keep, smooth, zcoef, slope, gscale, e, g, i):
    """Loss of one row with probability target t, before its sample weight;
    writes its gradient into ``g[i]`` unless ``g`` is None."""
    T = e.dtype.type
    m = row_max(src, T(-np.inf))
    tw_sum, twzm_sum = _target_sums(src, t, weight, m, keep, smooth, T(1.0))
    s, _ = exp_shifted(src, m, e, -1)
    loss, lse = softmax.prob_loss(tw_sum, twzm_sum, m, s, zcoef)
    if g is not None:
        a = softmax.prob_gradient(tw_sum, lse, s, zcoef, T(2.0), gscale)
        kg = gscale * keep
        b = gscale * smooth
        gi = g[i]
        for c in range(src.shape[0]):
            wc = T(1.0) if weight is None else weight[c]
            v = softmax.prob_class_gradient(e[c], a, kg, load(t, c), b, wc)
            gc = v if slope is None else v * slope[c]
            store(gi, c, gc)
    return loss


@jit
def rows(first, last, x, labels, probs, weight, wsum, sw, ignore_index, eps, zcoef, cap, narrow,
         wide, scale, g, losses):
    """Rows [first, last): integer ``labels`` or ``probs`` (the other is None);
    the options in the compute type T but ``cap`` (float64 or None).  One of
    ``narrow`` and ``wide`` is True, the other None: the path, chosen by the
    caller, the other pruned at compile time.  ``scale`` multiplies the gradient
    (the "mean" reduction's 1/denominator; the linear cross-entropy's chunks of
    rows pass their whole call's)."""
    T = losses.dtype.type
    keep = T(1.0) - eps
    smooth = eps / T(x.shape[1])
    if narrow is not None:
        _narrow_label_rows(first, last, x, labels, weight, wsum, sw, ignore_index, keep, eps,
                           smooth, zcoef, scale, g, losses)
    if wide is not None:
        _wide_rows(first, last, x, labels, probs, weight, wsum, sw, ignore_index, keep, eps,
                   smooth, zcoef, cap, scale, g, losses)


@jit
def _wide_rows(first, last, x, labels, probs, weight, wsum, sw, ignore_index, keep, eps, smooth,
               zcoef, cap, scale, g, losses):
    """Rows [first, last) one function call per row (``_label_row``, ``_prob_row``)."""
    T = losses.dtype.type
    C = x.shape[1]
    e = np.empty(C, T)  # exp(z - m) of the current row, kept in L1 for the gradient
    capped = np.empty(C if cap is not None else 0, T)  # soft-capped logits of the current row
    slope = np.empty(C if cap is not None else 0, T)  # their derivative
    for i in range(first, last):
        swi = T(1.0) if sw is None else sw[i]
        if labels is not None:
            y = labels[i]
            if ignored_row(y, ignore_index, losses, g, i):
                continue
            if cap is None:
                loss = _label_row(x[i], y, weight, wsum, keep, eps, smooth, zcoef, None,
                                  swi * scale, e, g, i)
            else:
                softcap_row(x[i], capped, slope, T(cap))
                loss = _label_row(capped, y, weight, wsum, keep, eps, smooth, zcoef, slope,
                                  swi * scale, e, g, i)
        if probs is not None:
            if cap is None:
                loss = _prob_row(x[i], probs[i], weight, keep, smooth, zcoef, None, swi * scale,
                                 e, g, i)
            else:
                softcap_row(x[i], capped, slope, T(cap))
                loss = _prob_row(capped, probs[i], weight, keep, smooth, zcoef, slope,
                                 swi * scale, e, g, i)
        losses[i] = swi * loss


@njit(parallel=True, **KERNEL_OPTIONS)
def _rows_parallel(x, labels, probs, weight, wsum, sw, ignore_index, eps, zcoef, cap, narrow, wide,
                   mean, g, losses):
    T = losses.dtype.type
    n, C = x.shape
    denom = mean_denominator(labels, probs, ignore_index, weight, sw)
    scale = T(grad_scale(mean, denom))
    block = max(1, ROW_BLOCK_ELEMENTS // C)
    for b in prange((n + block - 1) // block):
        rows(b * block, min(n, (b + 1) * block), x, labels, probs, weight, T(wsum), sw,
              ignore_index, T(eps), T(zcoef), cap, narrow, wide, scale, g, losses)
    return loss_total(losses), denom


@jit
def _rows_serial(x, labels, probs, weight, wsum, sw, ignore_index, eps, zcoef, cap, narrow, wide,
                 mean, g, losses):
    T = losses.dtype.type
    denom = mean_denominator(labels, probs, ignore_index, weight, sw)
    rows(0, x.shape[0], x, labels, probs, weight, T(wsum), sw, ignore_index, T(eps), T(zcoef),
          cap, narrow, wide, T(grad_scale(mean, denom)), g, losses)
    return loss_total(losses), denom


def softmax_cross_entropy(logits, labels, probs, weight, sw, ignore_index, eps, zcoef, cap,
                          reduction, grad, grad_out):
    """``(loss, grad)`` of checked NumPy inputs: logits ``(..., C)``, integer
    ``labels`` or ``probs`` (the other None), the optional ``weight`` (C,) and
    ``sw``, ``cap`` the soft-cap or None; ``grad`` None unless asked for.
    Runs serially when the input is small."""
    wsum = float(logits.shape[-1] if weight is None else np.sum(weight, dtype=np.float64))
    # narrow rows take their own path, chosen here so that a call compiles only the one it runs
    narrow = labels is not None and cap is None and logits.shape[-1] <= NARROW_ROW
    options = (weight, wsum, sw, ignore_index, eps, zcoef, cap) + path(narrow)  # floats: converted
    return row_loss(_rows_parallel, _rows_serial, logits, labels, probs, options, (weight, sw),
                    reduction, grad, grad_out)
