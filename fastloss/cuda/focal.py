r"""Fused focal-loss kernels (CUDA): softmax focal (one block per row) and
sigmoid focal (elementwise, grid-stride).

The formulas are ``fastloss.formulas.softmax``'s (softmax focal; the per-class
factors are ``ascale`` times the optional ``(C,)`` vector ``alpha``) and
``fastloss.formulas.sigmoid_focal``'s.

Softmax focal: for an integer target, pass 1 keeps ``rest = sum_{k != y}
exp(z_k - m)`` apart from the target's own term ``e_y``.  Blocks are
persistent (``row_grid``), each looping over rows, one row at a time, as in
``cuda/cross_entropy``: few rows in flight, so that the passes after the first
find the row in L2.  Integer targets in float16 and float32 take the fast row
loops of ``cuda/_rows`` (``label_sums``, ``exp_grads``: 16 loads in flight
per thread, one rescale per step, pass 2 in reverse with evict-first stores,
``_blocks.exp_for``); float64 rows and probability targets issue ``UNROLL``
loads per thread (``load_group``) before using them.  Passes over a row:
1. online ``(max, sum exp)``, merged by one block reduction; for probability targets 2. the per-class terms,
summed by block reductions (the loss and ``q = sum_c t_c alpha_c F_c``);
last, the gradient (for probability targets ``F_c`` is computed again rather
than stored).  Every thread reads the target's logit before the first
barrier, and each element of the gradient is written by the thread that
read that element, after its reads: the gradient may alias the logits
(``grad_out=logits``).  The target's entry is rewritten, after its pass, by
the thread that owns it.

Sigmoid focal: elementwise on ``_reduction.elementwise_grid(n)`` (a grid that
depends on ``n`` only: a few waves, ``ELEMENTWISE_STEP`` elements loaded per
thread before any is used, unsigned indices); each thread sums its losses in
float64, each block writes one partial sum, and ``finish`` adds the at most
``ELEMENTWISE_BLOCKS`` partials in one block: the same bits on every GPU.
gamma == 2, the default, compiles a path of its own (``u * u`` for ``u**gamma``,
no log and exp per element), chosen in Python as the CPU does.

"mean" with a denominator from ``class_denominator`` (softmax focal) makes its
total in the row kernel's last block (``_reduction.last_block_total``).

Inputs that the CPU path converts to the logits' dtype first (probability and
sigmoid targets) are rounded to that dtype here too, then widened to the
compute type, so both paths see the same values.  Absent options are ``None``
arguments (compile-time switches).
"""
import math

from numba import cuda, float64, int64, uint64

from fastloss.cuda._arrays import compute_type, flat
from fastloss.cuda._blocks import (LARGE_KERNEL_BLOCK, MAX_THREADS, UNROLL, block_logsumexp,
                                   block_sum, cast_like, fast_rows, group_end, ignored_row, kernel,
                                   load_group, online_add, ptx_dtypes)
from fastloss.cuda._checks import grad_out_apart
from fastloss.cuda._formulas import sigmoid_focal, softmax
from fastloss.cuda._reduction import (ELEMENTWISE_STEP, class_denominator, count_denominator,
                                      element_at, elementwise_loss, gradient_scale,
                                      last_block_total, set_element_at, step_at,
                                      unsigned_grid_stride)
from fastloss.cuda._rows import class_rows, exp_grads, label_sums, row_loss


@cuda.jit(device=True)
def _online_sums(x, row, skip, zero, ninf):
    """Pass 1 over this thread's columns of the row (float64 rows, and probability
    targets): the online ``(max, sum of exp)``, column ``skip`` left out of the sum
    (None: none)."""
    nt = cuda.blockDim.x
    C = x.shape[1]
    m, s = ninf, zero
    c = cuda.threadIdx.x
    while c < group_end(C):
        v0, v1, v2, v3 = load_group(x, row, c)
        m, s = online_add(m, s, cast_like(v0, zero), True if skip is None else c != skip, ninf)
        m, s = online_add(m, s, cast_like(v1, zero), True if skip is None else c + nt != skip,
                          ninf)
        m, s = online_add(m, s, cast_like(v2, zero), True if skip is None else c + 2 * nt != skip,
                          ninf)
        m, s = online_add(m, s, cast_like(v3, zero), True if skip is None else c + 3 * nt != skip,
                          ninf)
        c += UNROLL * nt
    while c < C:
        m, s = online_add(m, s, cast_like(x[row, c], zero), True if skip is None else c != skip,
                          ninf)
        c += nt
    return m, s


@cuda.jit(device=True)
def _exp_grads(x, row, g, a, m, zero):
    """g_c = exp(z_c - m) a at this thread's columns (a float64 integer-target row)."""
    nt = cuda.blockDim.x
    C = x.shape[1]
    c = cuda.threadIdx.x
    while c < group_end(C):
        v0, v1, v2, v3 = load_group(x, row, c)
        g[row, c] = math.exp(cast_like(v0, zero) - m) * a
        g[row, c + nt] = math.exp(cast_like(v1, zero) - m) * a
        g[row, c + 2 * nt] = math.exp(cast_like(v2, zero) - m) * a
        g[row, c + 3 * nt] = math.exp(cast_like(v3, zero) - m) * a
        c += UNROLL * nt
    while c < C:
        g[row, c] = math.exp(cast_like(x[row, c], zero) - m) * a
        c += nt


@cuda.jit(device=True)
def _label_row(x, labels, row, ignore_index, alpha, ascale, gamma, swi, gscale, mbuf, sbuf, g,
               losses):
    """Loss (and gradient unless ``g`` is None) of row ``row``, integer targets."""
    zero = cast_like(0, gamma)
    y = int64(labels[row])
    if y == ignore_index:
        ignored_row(row, losses, g, zero)
        return
    one = cast_like(1, zero)
    ninf = cast_like(-math.inf, zero)
    # pass 1: max over the row, sum of exp over the row but the target (z_y read
    # before the barriers: g may overwrite x)
    xr = x[row]
    zy = cast_like(xr[uint64(y)], zero)
    if fast_rows(x):
        m, rest, _, _ = label_sums(xr, y, zy, None, zero)
    else:
        m, rest = _online_sums(x, row, y, zero, ninf)
    mrow, rest64 = block_logsumexp(mbuf, sbuf, m, rest)
    m = cast_like(mrow, zero)
    rest = cast_like(rest64, zero)
    ey = math.exp(zy - m)
    s = rest + ey
    nlp, l1mp, pw = softmax.focal_label_factors(zy, m, s, rest, ey, gamma, zero, one, ninf)
    ay = ascale if alpha is None else ascale * cast_like(alpha[y], zero)
    if cuda.threadIdx.x == 0:
        losses[row] = swi * (ay * pw * nlp)
    if g is not None:
        a, gy = softmax.focal_label_gradient(nlp, l1mp, pw, s, rest, ey, ay, gamma, gscale, zero, one)
        if fast_rows(x):
            exp_grads(xr, g[row], m, a, zero, zero)
        else:
            _exp_grads(x, row, g, a, m, zero)
        if cuda.threadIdx.x == y % cuda.blockDim.x:
            g[row, y] = gy  # the owner of column y rewrites it after its own pass


@cuda.jit(device=True)
def _terms(v, pv, c, alpha, ascale, gamma, m, log_s, inv_s, zero, one):
    """``(p_c, t_c alpha_c F_c, t_c alpha_c (1-p_c)^g (-log p_c))`` of class c,
    from its logit ``v`` and target mass ``pv`` as stored.  The mass is
    rounded to the logits' dtype first, as the CPU path converts it."""
    z = cast_like(v, zero)
    tc = cast_like(cast_like(pv, v), zero)
    ac = ascale if alpha is None else ascale * cast_like(alpha[c], zero)
    p = math.exp(z - m) * inv_s
    nlp = log_s - (z - m)
    l1mp, pw = softmax.focal_class_power(p, gamma, zero, one)
    t2 = zero
    if not softmax.focal_class_at_limit(p, nlp, gamma, zero, one):
        t2 = softmax.focal_class_second(p, l1mp, nlp, gamma, one)
    f, term = softmax.focal_class_terms(tc * ac, pw, t2, nlp, zero)
    return p, f, term


@cuda.jit(device=True)
def _terms_pass(x, probs, row, alpha, ascale, gamma, m, log_s, inv_s, a, b, g, zero, one):
    """A pass over this thread's columns of a probability-target row: with ``g``
    None, ``(sum of t_c alpha_c F_c, sum of the loss terms)``; else it writes the
    gradient ``g_c = softmax.class_gradient(p_c, a, b, t_c alpha_c F_c)``."""
    nt = cuda.blockDim.x
    C = x.shape[1]
    q = zero
    loss = zero
    c = cuda.threadIdx.x
    while c < group_end(C):
        v0, v1, v2, v3 = load_group(x, row, c)
        p0, p1, p2, p3 = load_group(probs, row, c)
        q, loss = _terms_step(v0, p0, c, row, alpha, ascale, gamma, m, log_s, inv_s, a, b, g, q,
                              loss, zero, one)
        q, loss = _terms_step(v1, p1, c + nt, row, alpha, ascale, gamma, m, log_s, inv_s, a, b, g,
                              q, loss, zero, one)
        q, loss = _terms_step(v2, p2, c + 2 * nt, row, alpha, ascale, gamma, m, log_s, inv_s, a, b,
                              g, q, loss, zero, one)
        q, loss = _terms_step(v3, p3, c + 3 * nt, row, alpha, ascale, gamma, m, log_s, inv_s, a, b,
                              g, q, loss, zero, one)
        c += UNROLL * nt
    while c < C:
        q, loss = _terms_step(x[row, c], probs[row, c], c, row, alpha, ascale, gamma, m, log_s,
                              inv_s, a, b, g, q, loss, zero, one)
        c += nt
    return q, loss


@cuda.jit(device=True)
def _terms_step(v, pv, c, row, alpha, ascale, gamma, m, log_s, inv_s, a, b, g, q, loss, zero,
                one):
    """One class of ``_terms_pass``."""
    p, f, term = _terms(v, pv, c, alpha, ascale, gamma, m, log_s, inv_s, zero, one)
    if g is None:
        return q + f, loss + term
    g[row, c] = softmax.class_gradient(p, a, b, f)
    return q, loss


@cuda.jit(device=True)
def _prob_row(x, probs, row, alpha, ascale, gamma, swi, gscale, mbuf, sbuf, g, losses):
    """Loss (and gradient unless ``g`` is None) of row ``row``, probability targets."""
    zero = cast_like(0, gamma)
    one = cast_like(1, zero)
    m, s = _online_sums(x, row, None, zero, cast_like(-math.inf, zero))
    mrow, s64 = block_logsumexp(mbuf, sbuf, m, s)
    m = cast_like(mrow, zero)
    s = cast_like(s64, zero)
    log_s = math.log(s)
    inv_s = one / s
    # pass 2: the loss and q = sum_c t_c alpha_c F_c
    q, loss = _terms_pass(x, probs, row, alpha, ascale, gamma, m, log_s, inv_s, zero, zero, None,
                          zero, one)
    q = cast_like(block_sum(mbuf, q), zero)
    loss = cast_like(block_sum(mbuf, loss), zero)
    if cuda.threadIdx.x == 0:
        losses[row] = swi * loss
    if g is not None:  # pass 3: g_c = gscale (p_c q - t_c alpha_c F_c), F_c computed again
        _terms_pass(x, probs, row, alpha, ascale, gamma, m, log_s, inv_s, gscale * q, gscale, g,
                    zero, one)


@kernel(LARGE_KERNEL_BLOCK)
def focal_kernel(x, labels, probs, alpha, ascale, sw, ignore_index, gamma, stats, g, losses,
                 total):
    """Rows ``blockIdx.x, blockIdx.x + gridDim.x, ...`` of ``x`` (n, C), one
    block per row.  ``labels`` (n,) or ``probs`` (n, C) (the other None);
    ``alpha`` (C,) (None: ``ascale`` alone), ``sw`` (n,), ``stats`` (the
    "mean" denominator, None otherwise) and ``g`` (None: no gradient) are
    optional; with ``total`` (one element, "mean" only) the last block to finish
    writes the loss there (``last_block_total``).  ``ascale`` and ``gamma`` carry
    the compute type ``T``."""
    mbuf = cuda.shared.array(MAX_THREADS, float64)
    sbuf = cuda.shared.array(MAX_THREADS, float64)
    zero = cast_like(0, gamma)
    scale = gradient_scale(stats, zero)
    for row in range(int64(cuda.blockIdx.x), x.shape[0], int64(cuda.gridDim.x)):
        swi = cast_like(1, zero) if sw is None else cast_like(sw[row], zero)
        if labels is not None:
            _label_row(x, labels, row, ignore_index, alpha, ascale, gamma, swi, swi * scale, mbuf,
                       sbuf, g, losses)
        if probs is not None:
            _prob_row(x, probs, row, alpha, ascale, gamma, swi, swi * scale, mbuf, sbuf, g, losses)
        # the next row reuses the shared buffers: block_* end with a barrier
    if total is not None:
        last_block_total(mbuf, losses, stats, total)


def focal_loss(dev, logits, labels, probs, alpha, ascale, sw, ignore_index, gamma, reduction, grad,
               grad_out, caller_grad_out):
    """``(loss, grad)`` of ``fastloss.focal_loss`` on checked device views, as
    native arrays of the call's kind (``grad`` the caller's ``grad_out`` when
    given, None when not asked for).  ``alpha`` is a ``(C,)`` device view or
    None; ``ascale`` a float."""
    x, labels, probs, sw = class_rows(logits, labels, probs, alpha, sw, grad, grad_out)
    T = compute_type(logits.dtype)
    stats = (class_denominator(dev, x.shape[0], labels, None, sw, ignore_index)
             if reduction == "mean" else None)
    args = (x, labels, probs, alpha, T(ascale), sw, ignore_index, T(gamma))
    return row_loss(dev, focal_kernel, args, stats, logits, reduction, grad, grad_out,
                    caller_grad_out)


# ---------------------------------------------------------------- sigmoid focal


@cuda.jit(device=True)
def _sigmoid_element(xv, tv, i, alpha, use_alpha, gamma, squared, zero, one, scale, g, losses,
                     acc):
    """One element's loss (into ``losses[i]`` with "none") and gradient (into ``g``),
    from its stored logit and target; ``acc`` plus the loss.  ``squared`` (True, or
    None: a compile-time switch) takes gamma = 2: ``u**gamma`` as ``u * u``, no log
    and exp."""
    ti = cast_like(cast_like(tv, xv), zero)  # in the logits' dtype, as the CPU
    p, q, ce, u = sigmoid_focal.sigmoid_terms(cast_like(xv, zero), ti, zero, one)
    if squared is not None:
        pw, num, den = u * u, u, one
    else:
        pw = sigmoid_focal.modulating_power(u, gamma, zero, one)
        num, den = pw, u
    at = sigmoid_focal.alpha_weight(ti, alpha, use_alpha, one)
    loss, d = sigmoid_focal.sigmoid_focal_value(p, q, ce, u, ti, at, pw, num, den, gamma, zero, one)
    if losses is not None:
        losses[i] = loss
    if g is not None:
        set_element_at(g, i, scale * (at * d))
    return acc + float64(loss)


@kernel()
def sigmoid_focal_kernel(x, t, n, alpha, gamma, squared, stats, g, losses, partials):
    """Elements ``0 <= i < n`` of ``x`` and ``t`` (1-D, or 2-D strided: see
    ``_reduction.element_at``), on ``elementwise_grid(n)``: ``ELEMENTWISE_STEP``
    elements a step per thread, all loaded before any is used (``g`` may be
    ``x``: each element is read and written by one thread, read first).
    ``squared`` (True or None) is gamma == 2's path.  ``losses`` (n,) gets every
    element's loss ("none"), ``partials`` (blocks,) each block's float64 sum
    (otherwise); ``stats`` (the "mean" denominator) and ``g`` are optional."""
    buf = cuda.shared.array(MAX_THREADS, float64)
    zero = cast_like(0, gamma)
    one = cast_like(1, zero)
    if squared is not None:
        gamma = cast_like(2, zero)
    use_alpha = alpha >= zero
    scale = gradient_scale(stats, zero)
    acc = 0.0
    i, stride = unsigned_grid_stride()
    end = uint64(n)
    ahead = stride * uint64(ELEMENTWISE_STEP - 1)
    while i + ahead < end:  # unchecked since i + ahead < n <= 2**63
        (i1, i2, i3), (x0, x1, x2, x3) = step_at(x, i, stride)
        _, (t0, t1, t2, t3) = step_at(t, i, stride)
        acc = _sigmoid_element(x0, t0, i, alpha, use_alpha, gamma, squared, zero, one, scale, g,
                               losses, acc)
        acc = _sigmoid_element(x1, t1, i1, alpha, use_alpha, gamma, squared, zero, one, scale, g,
                               losses, acc)
        acc = _sigmoid_element(x2, t2, i2, alpha, use_alpha, gamma, squared, zero, one, scale, g,
                               losses, acc)
        acc = _sigmoid_element(x3, t3, i3, alpha, use_alpha, gamma, squared, zero, one, scale, g,
                               losses, acc)
        i = i3 + stride
    while i < end:
        acc = _sigmoid_element(element_at(x, i), element_at(t, i), i, alpha, use_alpha, gamma,
                               squared, zero, one, scale, g, losses, acc)
        i += stride
    if partials is not None:
        total = block_sum(buf, acc)
        if cuda.threadIdx.x == 0:
            partials[cuda.blockIdx.x] = total


def sigmoid_focal_loss(dev, logits, targets, alpha, gamma, reduction, grad, grad_out,
                       caller_grad_out):
    """``(loss, grad)`` of ``fastloss.sigmoid_focal_loss`` on checked device views
    of any shape, as native arrays of the call's kind (``grad`` the caller's
    ``grad_out`` when given)."""
    if grad:  # written directly: grad_out may be the logits, and overlap nothing else
        grad_out_apart(grad_out, "logits", logits=logits, targets=targets)
    shape = tuple(logits.shape)
    n = math.prod(shape)
    T = compute_type(logits.dtype)
    stats = count_denominator(n) if reduction == "mean" else None
    squared = True if gamma == 2 else None  # compile-time switch (as the CPU's ``paths``)
    args = (flat(logits, "logits"), flat(targets, "targets"), n, T(alpha), T(gamma), squared)
    loss, g = elementwise_loss(dev, sigmoid_focal_kernel, args, n, shape, stats, reduction, grad,
                               grad_out, logits.dtype)
    return loss, dev.give_grad(g, caller_grad_out)


def ptx_signatures():
    """Argument types of every kernel here, for the compile check (tests/test_cuda_compile.py)."""
    from numba import types
    i64, f64, N = types.int64, types.float64, types.none
    sigs = []
    for X, T in ptx_dtypes():
        W = T[::1]
        # labels, probs, alpha, sw, stats, g, losses
        for case in ((i64[::1], N, N, N, N, N, X[::1]),  # "none", no gradient
                     (i64[::1], N, W, W, f64[::1], X[:, :], W),  # "mean", every option
                     (types.int32[:], N, X[::1], X[:], f64[::1], X[:, ::1], W),
                     (N, X[:, :], N, N, N, N, X[::1]),
                     (N, X[:, :], W, W, f64[::1], X[:, :], W),
                     (N, f64[:, ::1], N, W, N, X[:, ::1], W)):
            labels, probs, alpha, sw, stats, g, losses = case
            total = X[::1] if stats is not N else N  # "mean": the last block's total
            sigs.append((focal_kernel, (X[:, :], labels, probs, alpha, T, sw, i64, T, stats, g,
                                        losses, total)))
        # x, t, squared, g, stats, losses, partials
        S = types.boolean
        for case in ((X[::1], X[::1], S, X[::1], f64, N, f64[::1]),  # "mean", a count, gamma 2
                     (X[::1], X[::1], N, X[::1], f64, N, f64[::1]),  # any gamma
                     (X[::1], X[::1], S, X[::1], N, X[::1], N),  # "none"
                     (X[:, :], X[:], N, X[:, :], N, N, f64[::1]),  # strided, "sum"
                     (X[::1], types.boolean[::1], S, N, f64[::1], N, f64[::1]),
                     (X[::1], i64[::1], N, X[::1], N, X[::1], N),
                     (X[::1], f64[::1], S, X[::1], f64, N, f64[::1])):
            x, t, squared, g, stats, losses, partials = case
            sigs.append((sigmoid_focal_kernel, (x, t, i64, T, T, squared, stats, g, losses,
                                                partials)))
    return sigs
