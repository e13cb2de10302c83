r"""Fused focal-loss kernels (CPU): softmax focal (rows) and sigmoid focal (elementwise).

Softmax focal, per row with ``p = softmax(z)``, ``alpha`` per class, sample
weight ``sw`` and, for class ``c``,
``F_c = (1-p_c)^g - g p_c (1-p_c)^(g-1) log p_c``::

    integer target y:  L = -sw alpha_y (1-p_y)^g log p_y
                       dL/dz_k = sw alpha_y F_y (p_k - [k == y])
    probabilities t:   L = -sw sum_c t_c alpha_c (1-p_c)^g log p_c
                       dL/dz_k = sw (p_k sum_c t_c alpha_c F_c - t_k alpha_k F_k)

Everything runs in log space: ``(1-p)^g = exp(g log(1-p))`` and
``p (1-p)^(g-1) (-log p) = p exp((g-1) log(1-p) + log(-log p))``, which tends
to 0 as p -> 1 for every ``g > 0``; where ``1-p`` or ``log p`` is exactly 0 the
term is 0 (its limit), so ``0 < g < 1`` and saturated logits give finite
gradients.  For an integer target ``1-p_y`` is computed as
``sum_{k != y} e_k / s`` (``e = exp(z - max z)``) and ``log p_y`` as ``-log1p(sum_{k != y} e_k / e_y)``
when ``p_y >= 1/2``: both keep their relative precision as ``p_y -> 1``.
Rows of at most ``NARROW_ROW`` classes with integer targets run inline, as in
``fastloss.cpu.cross_entropy`` (``_narrow_label_rows``, sharing ``_label_terms``).

Sigmoid focal (torchvision's RetinaNet loss), per element with ``p = sigmoid(x)``,
``u = 1 - p_t = p (1-t) + (1-p) t``, ``ce = softplus(x) - t x`` and
``alpha_t = alpha t + (1-alpha)(1-t)`` (1 when ``alpha < 0``)::

    L = alpha_t u^g ce
    dL/dx = alpha_t [(p - t) u^g + g (1-2t) ce u^(g-1) p (1-p)]

where ``p``, ``1-p``, ``softplus(x)`` and ``softplus(-x)`` all come from one
``exp(-|x|)`` without cancellation, ``u`` is a sum of two non-negative terms
(no cancellation either), ``u^g = exp(g log u)`` and ``u^(g-1) = u^g / u``;
where ``u`` underflows to 0 the loss and ``ce`` are 0 too, and the second
term takes its limit, 0, so nothing is NaN at saturated logits.
"""
import math

import numpy as np
from numba import njit, prange
from numba.core.extending import register_jitable

from fastloss._reduction import grad_scale
from fastloss.cpu._math import load, store, vexp, vexp_nonpos, vlog, vlog1p
from fastloss.cpu._rows import (KERNEL_OPTIONS, NARROW_ROW, ROW_BLOCK_ELEMENTS, exp_shifted,
                                ignored_row, jit, loss_total, mean_denominator, narrow_softmax,
                                row_max, row_sum, softmax_grad_row, use_threads)
from fastloss.cpu._threads import launch


@register_jitable(inline="always")
def _label_terms(zy, m, s, rest, ey, alpha_y, gamma, gscale):
    """-alpha_y (1-p_y)^gamma log p_y of a row with integer target y (float64),
    and its gradient as g_c = e_c a for c != y, g_y = gy; ``s`` = sum of
    e = exp(z - m), ``rest`` = that sum without e_y."""
    s, rest, ey = float(s), float(rest), float(ey)
    if ey >= rest:
        nlp = math.log1p(rest / ey)  # -log p_y, precise as p_y -> 1
    else:
        nlp = math.log(s) - (float(zy) - float(m))
    l1mp = math.log(rest) - math.log(s) if rest > 0 else -math.inf  # log(1 - p_y)
    pw = 1.0 if gamma == 0 else math.exp(gamma * l1mp)  # (1 - p_y)^gamma
    loss = float(alpha_y) * pw * nlp
    t2 = 0.0
    if gamma > 0 and rest > 0 and nlp > 0:
        t2 = gamma * (ey / s) * math.exp((gamma - 1.0) * l1mp + math.log(nlp))
    c = gscale * float(alpha_y) * (pw + t2)
    return loss, c / s, -c * rest / s  # g_y = c (p_y - 1) without the cancellation


@jit
def _label_row(src, y, alpha, gamma, gscale, e, g, grad, T):
    """-alpha_y (1-p_y)^gamma log p_y for one row; writes the gradient when grad."""
    m = row_max(src, T(-np.inf))
    s, rest = exp_shifted(src, m, e, y)
    loss, a, gy = _label_terms(load(src, y), m, s, rest, e[y], alpha[y], gamma, gscale)
    if grad:
        softmax_grad_row(e, T(a), T(0.0), alpha, g, alpha[:0])
        store(g, y, T(gy))
    return loss


@jit
def _narrow_label_rows(first, last, x, labels, alpha, sw, ignore_index, gamma, scale, g, grad,
                       losses):
    """Rows [first, last) with integer labels, at most NARROW_ROW classes:
    ``_label_row`` with every step inline (see ``narrow_softmax``)."""
    T = losses.dtype.type
    C = x.shape[1]
    e = np.empty(C, T)
    for i in range(first, last):
        y = labels[i]
        if y == ignore_index:
            ignored_row(y, ignore_index, losses, i, g[i if grad else 0], grad)
            continue
        m, s, rest = narrow_softmax(x, i, y, e, T(-np.inf))
        swi = float(sw[i]) if sw.shape[0] > 0 else 1.0
        loss, a, gy = _label_terms(load(x, (i, y)), m, s, rest, e[y], alpha[y], gamma,
                                   swi * scale)
        losses[i] = swi * loss
        if grad:
            a = T(a)
            for c in range(C):
                store(g, (i, c), e[c] * a)
            store(g, (i, y), T(gy))


@jit
def _focal_terms(src, t, alpha, gamma, m, log_s, inv_s, e, f, terms):
    """Per class: e_c <- p_c, f_c <- t_c alpha_c F_c, terms_c <- t_c alpha_c (1-p_c)^g (-log p_c).

    A class without target mass contributes 0 (even at p_c = 0).  The second
    term of F_c, g p_c (1-p_c)^(g-1) (-log p_c), takes its limit 0 where p_c
    is exactly 0 or 1 (or g = 0) instead of 0 * inf."""
    one = e.dtype.type(1.0)
    zero = e.dtype.type(0.0)
    for c in range(src.shape[0]):
        p = e[c] * inv_s
        nlp = log_s - (load(src, c) - m)
        l1mp = vlog1p(-p)
        pw = one if gamma == 0 else vexp(gamma * l1mp)
        t2 = gamma * p * vexp((gamma - one) * l1mp + vlog(nlp))
        t2 = zero if (p == one or p == zero or nlp == zero or gamma == zero) else t2
        ta = load(t, c) * alpha[c]
        e[c] = p
        f[c] = zero if ta == zero else ta * (pw + t2)
        terms[c] = zero if ta == zero else ta * pw * nlp


@jit
def _prob_row(src, t, alpha, gamma, gscale, e, f, terms, g, grad, T):
    m = row_max(src, T(-np.inf))
    s, _ = exp_shifted(src, m, e, -1)
    _focal_terms(src, t, alpha, T(gamma), m, T(math.log(s)), T(1.0) / s, e, f, terms)
    loss = row_sum(terms, T(0.0))
    if grad:
        q = row_sum(f, T(0.0))
        a = T(gscale) * q
        b = T(gscale)
        for c in range(src.shape[0]):
            store(g, c, e[c] * a - b * f[c])
    return loss


@jit
def _rows(first, last, x, labels, probs, alpha, sw, ignore_index, gamma, scale, g, grad, losses):
    T = losses.dtype.type
    C = x.shape[1]
    if labels is not None and C <= NARROW_ROW:
        _narrow_label_rows(first, last, x, labels, alpha, sw, ignore_index, gamma, scale, g, grad,
                           losses)
        return
    e = np.empty(C, T)
    f = np.empty(0 if probs is None else C, T)
    terms = np.empty(0 if probs is None else C, T)
    for i in range(first, last):
        gi = g[i if grad else 0]
        swi = float(sw[i]) if sw.shape[0] > 0 else 1.0
        if labels is not None:
            y = labels[i]
            if ignored_row(y, ignore_index, losses, i, gi, grad):
                continue
            losses[i] = swi * _label_row(x[i], y, alpha, gamma, swi * scale, e, gi, grad, T)
        if probs is not None:
            losses[i] = swi * _prob_row(x[i], probs[i], alpha, gamma, swi * scale, e, f, terms,
                                        gi, grad, T)


@njit(parallel=True, **KERNEL_OPTIONS)
def _focal_parallel(x, labels, probs, alpha, sw, ignore_index, gamma, mean, g, grad, losses):
    n, C = x.shape
    denom = mean_denominator(labels, probs, ignore_index, alpha[:0], sw)
    scale = grad_scale(mean, denom)
    block = max(1, ROW_BLOCK_ELEMENTS // C)
    for b in prange((n + block - 1) // block):
        _rows(b * block, min(n, (b + 1) * block), x, labels, probs, alpha, sw, ignore_index,
              gamma, scale, g, grad, losses)
    return loss_total(losses), denom


@jit
def _focal_serial(x, labels, probs, alpha, sw, ignore_index, gamma, mean, g, grad, losses):
    denom = mean_denominator(labels, probs, ignore_index, alpha[:0], sw)
    _rows(0, x.shape[0], x, labels, probs, alpha, sw, ignore_index, gamma,
          grad_scale(mean, denom), g, grad, losses)
    return loss_total(losses), denom


def focal_rows(x, labels, probs, alpha, sw, ignore_index, gamma, mean, g, grad, losses):
    """Fill ``losses`` (and ``g``) for all rows of ``x`` (N, C); returns
    ``(sum of losses, "mean" denominator)``.  ``alpha`` is a (C,) vector."""
    return launch(_focal_parallel, _focal_serial, use_threads(x),
                  x, labels, probs, alpha, sw, ignore_index, gamma, mean, g, grad, losses)


# ---------------------------------------------------------------- sigmoid focal


@register_jitable(inline="always")
def _sigmoid_terms(xi, ti, one, zero):
    """(p, 1 - p, ce, u = 1 - p_t) of one element (see module docstring)."""
    ea = vexp_nonpos(-abs(xi))
    l1pe = vlog1p(ea)
    sp_pos = (xi if xi > zero else zero) + l1pe  # softplus(x)  = -log(1-p)
    sp_neg = (zero if xi > zero else -xi) + l1pe  # softplus(-x) = -log p
    inv = one / (one + ea)
    p = inv if xi >= zero else ea * inv  # sigmoid(x)
    q = ea * inv if xi >= zero else inv  # 1 - sigmoid(x), without cancellation
    ce = (one - ti) * sp_pos + ti * sp_neg
    u = p * (one - ti) + q * ti  # 1 - p_t: a sum of two non-negative terms
    return p, q, ce, u


@register_jitable(inline="always")
def _sigmoid_focal_value(p, q, ce, u, ti, pw, u_gm1, alpha, gamma, use_alpha, one, zero):
    """(loss, dloss/dx) of one element from its terms, pw = u**gamma, u_gm1 = u**(gamma-1)."""
    at = alpha * ti + (one - alpha) * (one - ti) if use_alpha else one
    # d(1 - p_t)/dx = p q (1 - 2t).  u == 0 only where ce == 0 too (saturated and
    # right), and the second term's limit there is 0.
    t2 = gamma * (one - ti - ti) * ce * u_gm1 * p * q
    t2 = zero if (ce == zero or u == zero or gamma == zero) else t2
    return at * pw * ce, at * ((p - ti) * pw + t2)


@jit
def _sigmoid_focal_squared(x, t, alpha, scale, g, out):
    """``_sigmoid_focal_chunk`` at gamma == 2: u**gamma is u * u and u**(gamma-1) is u."""
    T = out.dtype.type
    one = T(1.0)
    zero = T(0.0)
    use_alpha = alpha >= 0
    for i in range(x.shape[0]):
        ti = load(t, i)
        p, q, ce, u = _sigmoid_terms(load(x, i), ti, one, zero)
        loss, d = _sigmoid_focal_value(p, q, ce, u, ti, u * u, u, alpha, T(2.0), use_alpha,
                                       one, zero)
        out[i] = loss
        store(g, i, scale * d)


@jit
def _sigmoid_focal_chunk(x, t, alpha, gamma, scale, g, out):
    """out_i = loss of element i; g_i = scale * dloss/dx_i (see module docstring).
    gamma == 2, the default, runs without a log and an exp per element (2x faster)."""
    if gamma == 2:
        _sigmoid_focal_squared(x, t, alpha, scale, g, out)
        return
    T = out.dtype.type
    one = T(1.0)
    zero = T(0.0)
    use_alpha = alpha >= 0
    for i in range(x.shape[0]):
        ti = load(t, i)
        p, q, ce, u = _sigmoid_terms(load(x, i), ti, one, zero)
        pw = one if gamma == zero else vexp(gamma * vlog(u))  # u**gamma, 0**gamma = 0
        loss, d = _sigmoid_focal_value(p, q, ce, u, ti, pw, pw / u, alpha, gamma, use_alpha,
                                       one, zero)
        out[i] = loss
        store(g, i, scale * d)


@jit
def _sigmoid_focal_chunks(first, last, x, t, params, g, grad, losses, losses_half, chunk_sums):
    """Chunks [first, last) of ELEMENT_CHUNK elements; chunk_sums[b] = float64 sum of
    chunk b's losses, which are also kept in ``losses`` when it has one per element, or
    rounded into ``losses_half`` (float16 bits) when that has."""
    T = losses.dtype.type
    alpha, gamma, scale = T(params[0]), T(params[1]), T(params[2])
    n = x.shape[0]
    per_element = losses.shape[0] == n
    scratch = np.empty(0 if per_element else ELEMENT_CHUNK, losses.dtype)
    g_scratch = np.empty(0 if grad else ELEMENT_CHUNK, g.dtype)  # the branch-free loop writes a gradient
    for b in range(first, last):
        lo = b * ELEMENT_CHUNK
        hi = min(n, lo + ELEMENT_CHUNK)
        out = losses[lo:hi] if per_element else scratch[:hi - lo]
        _sigmoid_focal_chunk(x[lo:hi], t[lo:hi], alpha, gamma, scale,
                             g[lo:hi] if grad else g_scratch[:hi - lo], out)
        chunk_sums[b] = row_sum(out, 0.0)
        if losses_half.shape[0] == n:
            for i in range(hi - lo):
                store(losses_half, lo + i, out[i])


@njit(parallel=True, **KERNEL_OPTIONS)
def _sigmoid_focal_parallel(x, t, params, g, grad, losses, losses_half, chunk_sums):
    for b in prange(chunk_sums.shape[0]):
        _sigmoid_focal_chunks(b, b + 1, x, t, params, g, grad, losses, losses_half, chunk_sums)
    return loss_total(chunk_sums)


@jit
def _sigmoid_focal_serial(x, t, params, g, grad, losses, losses_half, chunk_sums):
    _sigmoid_focal_chunks(0, chunk_sums.shape[0], x, t, params, g, grad, losses, losses_half,
                          chunk_sums)
    return loss_total(chunk_sums)


ELEMENT_CHUNK = 4096  # elements per parallel task; its scratch stays in L1


def sigmoid_focal_elements(x, t, alpha, gamma, scale, g, grad, losses, losses_half):
    """Loss (and gradient) of every element of the flat arrays ``x``, ``t``.

    ``losses`` (compute type) has one slot per element ("none") or none at all;
    for float16 input, ``"none"`` losses go to ``losses_half`` (uint16 bits, one
    slot per element, else none) instead, so no float32 array of the input's
    length is made.  Returns the float64 sum of the losses.
    """
    n = x.shape[0]
    chunk_sums = np.empty(-(-n // ELEMENT_CHUNK), np.float64)
    return launch(_sigmoid_focal_parallel, _sigmoid_focal_serial, use_threads(x),
                  x, t, np.array([alpha, gamma, scale]), g, grad, losses, losses_half, chunk_sums)
