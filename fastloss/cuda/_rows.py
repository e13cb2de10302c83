"""One-block-per-row kernels (cross entropy, focal loss): their fast row loops, and
their launch on checked device views.

The fast loops (``label_sums``, ``exp_grads``) walk a row as a 1-D view with
unsigned column indices (no negative-index wrap-around per element) in steps
of ``per_thread`` (16) loads per thread, two groups of 8, each step's loads
issued before any is used.  Pass 1 takes the step's maximum first, then
rescales the running sum once (not once per element); pass 2 walks the steps
in reverse, so that it first reads the columns that pass 1 read last, which
are still in L2, and stores the gradient evict-first (``store_streaming``), so that
it does not push those columns out.  The exponentials are ``_blocks.exp_for``: as
precise as the row's dtype can hold.
"""
import math

from numba import cuda, uint64

from fastloss.cuda._arrays import compute_type, rows
from fastloss.cuda._blocks import (GROUP, UNROLL, cast_like, exp_for, fast_rows, fit, fmax,
                                   load_step, online_add, per_thread, row_grid,
                                   store_streaming, threads_for)
from fastloss.cuda._checks import grad_out_apart
from fastloss.cuda._reduction import finish, per_row_losses

_FLOAT32_LOWEST = -3.4028234663852886e38


@cuda.jit(device=True)
def _widen(v, zero):
    """An 8-tuple of stored values in the compute type (that of ``zero``)."""
    v0, v1, v2, v3, v4, v5, v6, v7 = v
    return (cast_like(v0, zero), cast_like(v1, zero), cast_like(v2, zero), cast_like(v3, zero),
            cast_like(v4, zero), cast_like(v5, zero), cast_like(v6, zero), cast_like(v7, zero))


@cuda.jit(device=True)
def _max8(v):
    v0, v1, v2, v3, v4, v5, v6, v7 = v
    return fmax(fmax(fmax(v0, v1), fmax(v2, v3)), fmax(fmax(v4, v5), fmax(v6, v7)))


@cuda.jit(device=True)
def _exp_term(v, m, k, skip, zero, stored):
    """exp(v - m), or 0 for the column ``skip`` (None: none) of the step."""
    if skip is None:
        return exp_for(v - m, stored)
    return zero if k == skip else exp_for(v - m, stored)


@cuda.jit(device=True)
def _sumexp8(v, m, first, skip, zero, stored):
    """sum_k exp(v_k - m) over an 8-tuple (its columns numbered from ``first``
    within the step), leaving out the column ``skip`` (None: none); ``stored``
    is a value as the row stores it (``exp_for``)."""
    v0, v1, v2, v3, v4, v5, v6, v7 = v
    return ((_exp_term(v0, m, first, skip, zero, stored)
             + _exp_term(v1, m, first + 1, skip, zero, stored))
            + (_exp_term(v2, m, first + 2, skip, zero, stored)
               + _exp_term(v3, m, first + 3, skip, zero, stored))
            + ((_exp_term(v4, m, first + 4, skip, zero, stored)
                + _exp_term(v5, m, first + 5, skip, zero, stored))
               + (_exp_term(v6, m, first + 6, skip, zero, stored)
                  + _exp_term(v7, m, first + 7, skip, zero, stored))))


@cuda.jit(device=True)
def _shifted8(v, m, zero):
    """sum_k (v_k - m) over an 8-tuple, a term 0 where v_k == m (no inf - inf)."""
    v0, v1, v2, v3, v4, v5, v6, v7 = v
    return (((zero if v0 == m else v0 - m) + (zero if v1 == m else v1 - m))
            + ((zero if v2 == m else v2 - m) + (zero if v3 == m else v3 - m))
            + (((zero if v4 == m else v4 - m) + (zero if v5 == m else v5 - m))
               + ((zero if v6 == m else v6 - m) + (zero if v7 == m else v7 - m))))


@cuda.jit(device=True)
def _sum_step(lo, hi, m, s, szm, cnt, skip, smooth, zero, one):
    """The online state ``(max, sum of exp, sum of (z - max), count)`` after one
    step's 16 values (two 8-tuples), the column ``skip`` of the step left
    out of the sum of exp (None: none), the last two only when ``smooth``."""
    stored = lo[0]
    a = _widen(lo, zero)
    b = _widen(hi, zero)
    gm = fmax(_max8(a), _max8(b))
    m_new = fmax(m, gm)
    lowest = cast_like(_FLOAT32_LOWEST, zero)
    ms = fmax(m_new, lowest)  # a row of -inf so far: every term exp(-inf - lowest) = 0
    # one rescale per step, exactly 1 when the maximum stays
    rescale = exp_for(fmax(m, lowest) - ms, stored) if m_new > m else one
    terms = _sumexp8(a, ms, 0, skip, zero, stored) + _sumexp8(b, ms, GROUP, skip, zero, stored)
    s = s * rescale + terms
    if smooth is not None:
        if m_new != m and cnt != zero:
            szm -= cnt * (m_new - m)
        szm += _shifted8(a, m_new, zero) + _shifted8(b, m_new, zero)
        cnt += cast_like(2 * GROUP, zero)
    return m_new, s, szm, cnt


@cuda.jit(device=True)
def _sum_steps(xr, first, last, m, s, szm, cnt, smooth, zero, one):
    """``_sum_step`` over the steps ``first <= i < last`` of this thread."""
    nt = uint64(cuda.blockDim.x)
    width = per_thread(xr) * nt
    c = first * width + uint64(cuda.threadIdx.x)
    end = last * width
    while c < end:
        lo, hi = load_step(xr, c, nt)
        m, s, szm, cnt = _sum_step(lo, hi, m, s, szm, cnt, None, smooth, zero, one)
        c += width
    return m, s, szm, cnt


@cuda.jit(device=True)
def label_sums(xr, y, zy, smooth, zero):
    """Pass 1 of an integer-target row ``xr`` (1-D) over this thread's columns:
    ``(max, sum of exp(z - max) over the columns but y, sum of (z - max), count of
    columns)``, the last two over every column (y too), only when ``smooth`` (else
    0).  Every thread starts
    from ``(zy, 0)``, which holds z_y in the maximum and out of the sum; the step
    holding column y (``y // width``) leaves it out, the others run unchecked."""
    one = cast_like(1, zero)
    nt = uint64(cuda.blockDim.x)
    t = uint64(cuda.threadIdx.x)
    C = uint64(xr.shape[0])
    y = uint64(y)
    width = per_thread(xr) * nt
    steps = C // width
    ystep = y // width
    m, s, szm, cnt = zy, zero, zero, zero
    m, s, szm, cnt = _sum_steps(xr, uint64(0), min(ystep, steps), m, s, szm, cnt, smooth, zero,
                                one)
    if ystep < steps:
        c = ystep * width + t
        lo, hi = load_step(xr, c, nt)
        # this thread's k-th value is column c + k nt: y is the k-th when it is its own
        skip = (y - c) // nt if (y >= c and (y - c) % nt == 0) else per_thread(xr)
        m, s, szm, cnt = _sum_step(lo, hi, m, s, szm, cnt, skip, smooth, zero, one)
        m, s, szm, cnt = _sum_steps(xr, ystep + uint64(1), steps, m, s, szm, cnt, smooth, zero, one)
    c = steps * width + t
    while c < C:
        v = cast_like(xr[c], zero)
        m_new, s = online_add(m, s, v, c != y, cast_like(-math.inf, zero))
        if smooth is not None:
            if m_new != m and cnt != zero:
                szm -= cnt * (m_new - m)
            szm += zero if v == m_new else v - m_new
            cnt += one
        m = m_new
        c += nt
    return m, s, szm, cnt


@cuda.jit(device=True)
def _grad1(v, m, a, b, zero):
    """exp(v - m) a - b of a stored value ``v``."""
    return exp_for(cast_like(v, zero) - m, v) * a - b


@cuda.jit(device=True)
def _grad8(v, m, a, b, zero):
    v0, v1, v2, v3, v4, v5, v6, v7 = v
    return (_grad1(v0, m, a, b, zero), _grad1(v1, m, a, b, zero), _grad1(v2, m, a, b, zero),
            _grad1(v3, m, a, b, zero), _grad1(v4, m, a, b, zero), _grad1(v5, m, a, b, zero),
            _grad1(v6, m, a, b, zero), _grad1(v7, m, a, b, zero))


@cuda.jit(device=True)
def _store8(g, c, nt, v):
    """``g[c + k nt] = v_k``, ``k < 8`` (unsigned indices, converted to g's dtype),
    evict-first (``store_streaming``)."""
    v0, v1, v2, v3, v4, v5, v6, v7 = v
    store_streaming(g, c, v0)
    c += nt
    store_streaming(g, c, v1)
    c += nt
    store_streaming(g, c, v2)
    c += nt
    store_streaming(g, c, v3)
    c += nt
    store_streaming(g, c, v4)
    c += nt
    store_streaming(g, c, v5)
    c += nt
    store_streaming(g, c, v6)
    c += nt
    store_streaming(g, c, v7)


@cuda.jit(device=True)
def _grad_step(gr, c, nt, lo, hi, m, a, b, zero):
    """One step of ``exp_grads`` from its 16 loaded values (two 8-tuples)."""
    _store8(gr, c, nt, _grad8(lo, m, a, b, zero))
    _store8(gr, c + uint64(GROUP) * nt, nt, _grad8(hi, m, a, b, zero))


@cuda.jit(device=True)
def exp_grads(xr, gr, m, a, b, zero):
    """Pass 2 of a row: ``gr[c] = exp(xr[c] - m) a - b`` at this thread's columns
    (1-D rows), the last columns first: the tail, then the steps in reverse.  Each
    element is written after its own read by the same thread (``gr`` may be ``xr``)."""
    nt = uint64(cuda.blockDim.x)
    t = uint64(cuda.threadIdx.x)
    C = uint64(xr.shape[0])
    width = per_thread(xr) * nt
    steps = C // width
    c = steps * width + t
    while c < C:
        store_streaming(gr, c, _grad1(xr[c], m, a, b, zero))
        c += nt
    i = steps
    while i > 0:
        i -= uint64(1)
        c = i * width + t
        lo, hi = load_step(xr, c, nt)
        _grad_step(gr, c, nt, lo, hi, m, a, b, zero)


def class_rows(logits, labels, probs, weight, sw, grad, grad_out):
    """``(x, labels, probs, sw)``: the logits ``(..., C)`` as rows ``(n, C)``, integer
    ``labels`` as ``(n,)`` or ``probs`` as ``(n, C)`` (the other None), sample
    weights ``sw`` (or None) as ``(n,)``.  First, a
    ValueError when ``grad_out``, which the kernels write directly, overlaps an
    input other than the logits themselves (in place)."""
    if grad:
        grad_out_apart(grad_out, "logits", logits=logits,
                       target=labels if labels is not None else probs, weight=weight,
                       sample_weight=sw)
    C = tuple(logits.shape)[-1]  # the simulator's shapes refuse negative indices
    return (rows(logits, C, "logits"), None if labels is None else rows(labels, None, "target"),
            None if probs is None else rows(probs, C, "target"),
            None if sw is None else rows(sw, None, "sample_weight"))


def row_loss(dev, kernel, args, stats, logits, reduction, grad, grad_out, caller_grad_out):
    """``(loss, grad)`` from ``kernel(*args, stats, g, losses, total)``, a kernel over
    the rows of ``args[0]`` (n, C) made of ``logits`` (..., C), launched when there
    is any row: the per-row losses (``per_row_losses``), the gradient ``g``
    (``grad_out`` or a new array; None unless ``grad``) and the loss as returned.
    For "mean" (``stats`` from ``class_denominator``) the kernel's last block
    writes the loss into ``total`` (``last_block_total``: no launch of its own);
    otherwise ``total`` is None and ``finish`` makes it.  Native arrays of the
    call's kind; ``grad`` is the caller's ``grad_out`` when given."""
    n, C = args[0].shape
    batch_shape, dtype = tuple(logits.shape)[:-1], logits.dtype
    losses = per_row_losses(dev, n, reduction, dtype, compute_type(dtype))
    g_native = g = None
    if grad:
        g_native, g = ((grad_out, grad_out) if grad_out is not None
                       else dev.empty(batch_shape + (C,), dtype))
    total = None
    if n:
        x = args[0]
        threads = fit(kernel, threads_for(C, per_thread(x) if fast_rows(x) else UNROLL))
        g = None if g is None else rows(g, C, "grad_out")
        if reduction == "mean":
            total = dev.empty((1,), dtype)
        dev.launch(kernel, row_grid(n, threads), threads, *args, stats, g, losses[1],
                   None if total is None else total[1])
    loss = (dev.give(total[0], ()) if total is not None
            else finish(dev, losses, stats, reduction, batch_shape, dtype))
    return loss, dev.give_grad(g_native, caller_grad_out)
