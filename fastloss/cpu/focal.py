r"""Fused focal-loss kernels (CPU): softmax focal (rows) and sigmoid focal (elementwise).

The formulas are ``fastloss.formulas.softmax``'s (softmax focal) and
``fastloss.formulas.sigmoid_focal``'s.  The per-class factors are
``ascale`` times the optional ``(C,)`` vector ``alpha``, as on CUDA.

Softmax focal: for an integer target the row's terms are computed in
float64 (``_label_terms``); for probability targets per class, in the
compute type, with the vectorizable exp and log of ``cpu/_math``.  Rows of at
most ``NARROW_ROW`` classes with integer targets run inline, as in
``fastloss.cpu.cross_entropy`` (``_narrow_label_rows``).

Sigmoid focal: chunks of ``ELEMENT_CHUNK`` elements, one parallel task each;
``gamma == 2``, the default, has a loop of its own without a log and an exp
per element.

Absent options are None (``alpha``, ``sw``, the gradient ``g``, the loss
buffers): Numba compiles a specialization per combination and prunes the
branches that test them.
"""
import math

import numpy as np
from numba import njit, prange
from numba.core.extending import register_jitable

from fastloss._reduction import grad_scale, reduce
from fastloss.cpu import _storage
from fastloss.cpu._formulas import sigmoid_focal, softmax
from fastloss.cpu._math import compute_type, load, store
from fastloss.cpu._jit import KERNEL_OPTIONS, jit
from fastloss.cpu._rows import (NARROW_ROW, ROW_BLOCK_ELEMENTS, exp_shifted, ignored_row, path,
                                loss_total, mean_denominator, narrow_softmax, row_loss, row_max,
                                row_sum, softmax_grad_row, use_threads)
from fastloss.cpu._threads import launch


@register_jitable(inline="always")
def _label_terms(zy, m, s, rest, ey, ay, gamma, gscale):
    """The loss ``-ay (1-p_y)^gamma log p_y`` of a row with integer target y
    and its gradient as g_c = e_c a for c != y, g_y at y: ``(loss, a, g_y)``,
    in float64."""
    s, rest, ey = float(s), float(rest), float(ey)
    nlp, l1mp, pw = softmax.focal_label_factors(float(zy), float(m), s, rest, ey, gamma, 0.0, 1.0,
                                        -math.inf)
    a, gy = softmax.focal_label_gradient(nlp, l1mp, pw, s, rest, ey, ay, gamma, gscale, 0.0, 1.0)
    return ay * pw * nlp, a, gy


@jit
def _label_row(src, y, alpha, ascale, gamma, gscale, e, g, i):
    """Loss of one row with integer target y, before its sample weight; writes
    its gradient into ``g[i]`` unless ``g`` is None."""
    T = e.dtype.type
    m = row_max(src, T(-np.inf))
    s, rest = exp_shifted(src, m, e, y)
    ay = ascale if alpha is None else ascale * alpha[y]
    loss, a, gy = _label_terms(load(src, y), m, s, rest, e[y], float(ay), gamma, gscale)
    if g is not None:
        softmax_grad_row(e, T(a), T(0.0), None, g[i], None)
        store(g, (i, y), T(gy))
    return loss


@jit
def _narrow_label_rows(first, last, x, labels, alpha, ascale, sw, ignore_index, gamma, scale, g,
                       losses):
    """Rows [first, last) with integer labels, at most NARROW_ROW classes:
    ``_label_row`` with every step inline (see ``narrow_softmax``)."""
    T = losses.dtype.type
    C = x.shape[1]
    e = np.empty(C, T)
    for i in range(first, last):
        y = labels[i]
        if ignored_row(y, ignore_index, losses, g, i):
            continue
        m, s, rest = narrow_softmax(x, i, y, e, T(-np.inf))
        swi = 1.0 if sw is None else float(sw[i])
        ay = ascale if alpha is None else ascale * alpha[y]
        loss, a, gy = _label_terms(load(x, (i, y)), m, s, rest, e[y], float(ay), gamma,
                                   swi * scale)
        losses[i] = swi * loss
        if g is not None:
            a = T(a)
            for c in range(C):
                store(g, (i, c), e[c] * a)
            store(g, (i, y), T(gy))


@jit
def _focal_terms(src, t, alpha, ascale, gamma, m, log_s, inv_s, e, f, terms):
    """Per class: e_c <- p_c, f_c <- t_c alpha_c F_c, terms_c <- t_c alpha_c (1-p_c)^g (-log p_c)
    (``focal_class_terms``)."""
    one = e.dtype.type(1.0)
    zero = e.dtype.type(0.0)
    for c in range(src.shape[0]):
        p = e[c] * inv_s
        nlp = log_s - (load(src, c) - m)
        l1mp, pw = softmax.focal_class_power(p, gamma, zero, one)
        t2 = softmax.focal_class_second(p, l1mp, nlp, gamma, one)  # branch-free: the loop vectorizes
        t2 = zero if softmax.focal_class_at_limit(p, nlp, gamma, zero, one) else t2
        ac = ascale if alpha is None else ascale * alpha[c]
        fc, term = softmax.focal_class_terms(load(t, c) * ac, pw, t2, nlp, zero)
        e[c] = p
        f[c] = fc
        terms[c] = term


@jit
def _prob_row(src, t, alpha, ascale, gamma, gscale, e, f, terms, g, i):
    """Loss of one row with probability target t, before its sample weight;
    writes its gradient into ``g[i]`` unless ``g`` is None."""
    T = e.dtype.type
    m = row_max(src, T(-np.inf))
    s, _ = exp_shifted(src, m, e, -1)
    _focal_terms(src, t, alpha, ascale, gamma, m, T(math.log(s)), T(1.0) / s, e, f, terms)
    loss = row_sum(terms, T(0.0))
    if g is not None:
        # g_c = gscale (p_c q - t_c alpha_c F_c), q = sum_c t_c alpha_c F_c
        a = T(gscale) * row_sum(f, T(0.0))
        b = T(gscale)
        gi = g[i]
        for c in range(src.shape[0]):
            store(gi, c, softmax.class_gradient(e[c], a, b, f[c]))
    return loss


@jit
def _rows(first, last, x, labels, probs, alpha, ascale, sw, ignore_index, gamma, narrow, wide,
          scale, g, losses):
    """Rows [first, last): integer ``labels`` or ``probs`` (the other is None).  One of
    ``narrow`` and ``wide`` is True, the other None: the path (``_rows.path``)."""
    if narrow is not None:
        _narrow_label_rows(first, last, x, labels, alpha, ascale, sw, ignore_index, gamma, scale,
                           g, losses)
    if wide is not None:
        _wide_rows(first, last, x, labels, probs, alpha, ascale, sw, ignore_index, gamma, scale,
                   g, losses)


@jit
def _wide_rows(first, last, x, labels, probs, alpha, ascale, sw, ignore_index, gamma, scale, g,
               losses):
    """Rows [first, last) one function call per row (``_label_row``, ``_prob_row``)."""
    T = losses.dtype.type
    C = x.shape[1]
    e = np.empty(C, T)
    f = np.empty(0 if probs is None else C, T)
    terms = np.empty(0 if probs is None else C, T)
    for i in range(first, last):
        swi = 1.0 if sw is None else float(sw[i])
        if labels is not None:
            y = labels[i]
            if ignored_row(y, ignore_index, losses, g, i):
                continue
            loss = _label_row(x[i], y, alpha, ascale, gamma, swi * scale, e, g, i)
        if probs is not None:
            loss = _prob_row(x[i], probs[i], alpha, ascale, T(gamma), swi * scale, e, f, terms,
                             g, i)
        losses[i] = swi * loss


@njit(parallel=True, **KERNEL_OPTIONS)
def _focal_parallel(x, labels, probs, alpha, ascale, sw, ignore_index, gamma, narrow, wide, mean,
                    g, losses):
    n, C = x.shape
    denom = mean_denominator(labels, probs, ignore_index, None, sw)
    scale = grad_scale(mean, denom)
    block = max(1, ROW_BLOCK_ELEMENTS // C)
    for b in prange((n + block - 1) // block):
        _rows(b * block, min(n, (b + 1) * block), x, labels, probs, alpha,
              losses.dtype.type(ascale), sw, ignore_index, gamma, narrow, wide, scale, g, losses)
    return loss_total(losses), denom


@jit
def _focal_serial(x, labels, probs, alpha, ascale, sw, ignore_index, gamma, narrow, wide, mean, g,
                  losses):
    denom = mean_denominator(labels, probs, ignore_index, None, sw)
    _rows(0, x.shape[0], x, labels, probs, alpha, losses.dtype.type(ascale), sw, ignore_index,
          gamma, narrow, wide, grad_scale(mean, denom), g, losses)
    return loss_total(losses), denom


def focal_loss(logits, labels, probs, alpha, ascale, sw, ignore_index, gamma, reduction, grad,
               grad_out):
    """``(loss, grad)`` of checked NumPy inputs: logits ``(..., C)``, integer
    ``labels`` or ``probs`` (the other None), the per-class factors ``ascale``
    (a float) times ``alpha`` ((C,) or None), the optional ``sw``; ``grad``
    None unless asked for.  Runs serially when the input is small."""
    narrow = labels is not None and logits.shape[-1] <= NARROW_ROW
    options = (alpha, ascale, sw, ignore_index, gamma) + path(narrow)  # floats: kernels convert
    return row_loss(_focal_parallel, _focal_serial, logits, labels, probs, options, (alpha, sw),
                    reduction, grad, grad_out)


# ---------------------------------------------------------------- sigmoid focal


def _sigmoid_focal_loop(squared):
    """The loop over one chunk, written once and compiled twice: for gamma == 2,
    the default (``squared``: u**gamma is u * u and u**(gamma-1) is u, without a
    log and an exp per element), and for any gamma."""
    @jit
    def loop(x, t, alpha, gamma, scale, g, out):
        """out_i = loss of element i; g_i = scale * dloss/dx_i unless ``g`` is None."""
        T = out.dtype.type
        one = T(1.0)
        zero = T(0.0)
        if squared:
            gamma = T(2.0)
        use_alpha = alpha >= 0
        for i in range(x.shape[0]):
            ti = load(t, i)
            p, q, ce, u = sigmoid_focal.sigmoid_terms(load(x, i), ti, zero, one)
            if squared:
                pw, num, den = u * u, u, one
            else:
                pw = sigmoid_focal.modulating_power(u, gamma, zero, one)
                num, den = pw, u
            at = sigmoid_focal.alpha_weight(ti, alpha, use_alpha, one)
            loss, d = sigmoid_focal.sigmoid_focal_value(p, q, ce, u, ti, at, pw, num, den, gamma,
                                                        zero, one)
            out[i] = loss
            if g is not None:
                store(g, i, scale * (at * d))
    return loop


_sigmoid_focal_squared = _sigmoid_focal_loop(True)
_sigmoid_focal_any = _sigmoid_focal_loop(False)


@jit
def _sigmoid_focal_chunk(x, t, alpha, gamma, squared, general, scale, g, out):
    """One chunk by the loop of ``squared`` (gamma is 2) or ``general`` (one of them True, the
    other None: ``_rows.path``)."""
    if squared is not None:
        _sigmoid_focal_squared(x, t, alpha, gamma, scale, g, out)
    if general is not None:
        _sigmoid_focal_any(x, t, alpha, gamma, scale, g, out)


@jit
def _sigmoid_focal_chunks(first, last, x, t, alpha, gamma, squared, general, scale, g, losses,
                          losses_half, chunk_sums):
    """Chunks [first, last) of ELEMENT_CHUNK elements; chunk_sums[b] = float64 sum of
    chunk b's losses, which are also kept in ``losses`` (compute type) or rounded
    into ``losses_half`` (float16 bits) when either is given.  ``alpha``,
    ``gamma`` and ``scale`` are float64, computed in the compute type; one of
    ``squared`` (gamma is 2) and ``general`` is True, the other None (``_rows.path``)."""
    T = compute_type(x)
    n = x.shape[0]
    scratch = np.empty(ELEMENT_CHUNK if losses is None else 0, T)
    for b in range(first, last):
        lo = b * ELEMENT_CHUNK
        hi = min(n, lo + ELEMENT_CHUNK)
        out = scratch[:hi - lo] if losses is None else losses[lo:hi]
        if g is None:
            _sigmoid_focal_chunk(x[lo:hi], t[lo:hi], T(alpha), T(gamma), squared, general,
                                 T(scale), None, out)
        else:
            _sigmoid_focal_chunk(x[lo:hi], t[lo:hi], T(alpha), T(gamma), squared, general,
                                 T(scale), g[lo:hi], out)
        chunk_sums[b] = row_sum(out, 0.0)
        if losses_half is not None:
            for i in range(hi - lo):
                store(losses_half, lo + i, out[i])


@njit(parallel=True, **KERNEL_OPTIONS)
def _sigmoid_focal_parallel(x, t, alpha, gamma, squared, general, scale, g, losses, losses_half,
                            chunk_sums):
    for b in prange(chunk_sums.shape[0]):
        _sigmoid_focal_chunks(b, b + 1, x, t, alpha, gamma, squared, general, scale, g, losses,
                              losses_half, chunk_sums)
    return loss_total(chunk_sums)


@jit
def _sigmoid_focal_serial(x, t, alpha, gamma, squared, general, scale, g, losses, losses_half,
                          chunk_sums):
    _sigmoid_focal_chunks(0, chunk_sums.shape[0], x, t, alpha, gamma, squared, general, scale, g,
                          losses, losses_half, chunk_sums)
    return loss_total(chunk_sums)


ELEMENT_CHUNK = 4096  # elements per parallel task; its scratch stays in L1


def sigmoid_focal_loss(logits, targets, alpha, gamma, reduction, grad, grad_out):
    """``(loss, grad)`` of checked NumPy inputs of any shape; ``grad`` None
    unless asked for.  For float16 input, ``"none"`` losses are rounded into
    float16 bits as they are made, so no float32 array of the input's length
    is made."""
    n = logits.size
    T = _storage.compute_type(logits.dtype)
    x = _storage.kernel_view(logits, (n,))
    t = _storage.kernel_view(targets.astype(logits.dtype, copy=False), (n,))
    g = written = result = None
    if grad:
        g, written, result = _storage.gradient_arrays(grad, grad_out, logits, (n,), (targets,))
    losses, losses_half = _storage.element_loss_buffers(n, reduction, logits.dtype, T)
    chunk_sums = np.empty(-(-n // ELEMENT_CHUNK), np.float64)
    total = launch(_sigmoid_focal_parallel, _sigmoid_focal_serial, use_threads(x), x, t, alpha,
                   gamma, *path(gamma == 2), grad_scale(reduction == "mean", n), g, losses,
                   losses_half, chunk_sums)
    loss = reduce(_storage.element_losses_result(losses, losses_half), total, reduction, n,
                  logits.shape, logits.dtype)
    return loss, _storage.finish_gradient(written, result) if grad else None
