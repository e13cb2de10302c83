r"""Fused focal-loss kernels (CUDA): softmax focal (one block per row) and
sigmoid focal (elementwise, grid-stride).

Softmax focal, as in ``cpu/focal``: per row with ``p = softmax(z)``, per-class
factors ``alpha`` (``ascale`` times the optional ``(C,)`` vector), sample
weight ``sw`` and, for class ``c``,
``F_c = (1-p_c)^g - g p_c (1-p_c)^(g-1) log p_c``::

    integer target y:  L = -sw alpha_y (1-p_y)^g log p_y
                       dL/dz_k = sw alpha_y F_y (p_k - [k == y])
    probabilities t:   L = -sw sum_c t_c alpha_c (1-p_c)^g log p_c
                       dL/dz_k = sw (p_k sum_c t_c alpha_c F_c - t_k alpha_k F_k)

The modulating factor is computed in log space: ``(1-p)^g = exp(g log(1-p))``
and ``g p (1-p)^(g-1) (-log p) = g p exp((g-1) log(1-p) + log(-log p))``; where
``1-p`` or ``log p`` is exactly 0 (or ``g = 0``) that term takes its limit, 0,
so ``0 < g < 1`` and saturated logits give finite gradients.  For an integer
target, pass 1 keeps ``rest = sum_{k != y} exp(z_k - m)`` apart from the
target's own term ``e_y``: ``1 - p_y = rest / s`` and
``-log p_y = log1p(rest / e_y)`` (when ``e_y >= rest``) keep their relative
precision as ``p_y -> 1``.  With probability targets a class without target
mass contributes 0, even at ``p_c = 0``.

Blocks are persistent (``row_grid``), each looping over rows, one row at a
time, as in ``cuda/cross_entropy``: few rows in flight, so that the passes
after the first find the row in L2; each thread issues ``UNROLL`` loads
before it uses them.  Passes over a row: 1. online ``(max, sum exp)``, merged
by one block reduction; for probability targets 2. the per-class terms,
summed by block reductions (the loss and ``q = sum_c t_c alpha_c F_c``);
last, the gradient (for probability targets ``F_c`` is computed again rather
than stored).  Every thread reads the target's logit before the first
barrier, and each element of the gradient is written by the thread that
read that element, after its reads: the gradient may alias the logits
(``grad_out=logits``).  The target's entry is rewritten, after its pass, by
the thread that owns it.

Sigmoid focal (torchvision's RetinaNet loss), per element with ``p = sigmoid(x)``,
``u = 1 - p_t = p (1-t) + (1-p) t``, ``ce = softplus(x) - t x`` and
``alpha_t = alpha t + (1-alpha)(1-t)`` (1 when ``alpha < 0``)::

    L = alpha_t u^g ce
    dL/dx = alpha_t [(p - t) u^g + g (1-2t) ce u^(g-1) p (1-p)]

``p``, ``1-p``, ``softplus(x)`` and ``softplus(-x)`` all come from one
``exp(-|x|)``; where ``u`` underflows to 0, ``ce`` is 0 too and the second
term takes its limit 0.  Each thread of the grid-stride loop sums its losses
in float64; each block writes one partial sum, which ``finish`` adds up.

Inputs that the CPU path converts to the logits' dtype first (probability and
sigmoid targets) are rounded to that dtype here too, then widened to the
compute type, so both paths see the same values.  Absent options are ``None``
arguments (compile-time switches).
"""
import math

from numba import cuda, float64, int64

from fastloss._cache import CACHE
from fastloss._reduction import grad_scale
from fastloss.cuda._arrays import compute_type, flat, rows
from fastloss.cuda._blocks import (MAX_THREADS, UNROLL, block_logsumexp, block_sum, cast_like,
                                   element, ignored_row, online_add, row_grid, set_element,
                                   threads_for)
from fastloss.cuda._reduction import (class_denominator, count_denominator, elementwise_outputs,
                                      finish, per_row_losses)


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
    l1mp = cast_like(-math.inf, zero) if p == one else math.log1p(-p)
    pw = one if gamma == zero else math.exp(gamma * l1mp)
    t2 = zero  # the limit 0 where p is 0 or 1, -log p is 0, or gamma is 0
    if not (p == one or p == zero or nlp == zero or gamma == zero):
        t2 = gamma * p * math.exp((gamma - one) * l1mp + math.log(nlp))
    ta = tc * ac
    f = zero if ta == zero else ta * (pw + t2)
    term = zero if ta == zero else ta * pw * nlp
    return p, f, term


@cuda.jit(cache=CACHE)
def focal_rows(x, labels, probs, alpha, ascale, sw, ignore_index, gamma, stats, g, losses):
    """Rows ``blockIdx.x, blockIdx.x + gridDim.x, ...`` of ``x`` (n, C), one
    block per row.  ``labels`` (n,) or ``probs`` (n, C) (the other None);
    ``alpha`` (C,) (None: ``ascale`` alone), ``sw`` (n,), ``stats`` (the
    "mean" denominator, None otherwise) and ``g`` (None: no gradient) are
    optional.  ``ascale`` and ``gamma`` carry the compute type ``T``."""
    mbuf = cuda.shared.array(MAX_THREADS, float64)
    sbuf = cuda.shared.array(MAX_THREADS, float64)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    n, C = x.shape
    zero = cast_like(0, gamma)
    one = cast_like(1, zero)
    ninf = cast_like(-math.inf, zero)
    scale = one
    if stats is not None:
        scale = cast_like(grad_scale(True, stats[0]), zero)
    last = C - (UNROLL - 1) * nt  # columns c < last start a full group of UNROLL loads

    for row in range(int64(cuda.blockIdx.x), n, int64(cuda.gridDim.x)):
        swi = one if sw is None else cast_like(sw[row], zero)
        gscale = swi * scale
        if labels is not None:
            y = int64(labels[row])
            if y == ignore_index:
                ignored_row(row, losses, g, zero)
                continue
            # pass 1: max over the row, sum of exp over the row but the target
            m = ninf
            rest = zero
            c = t
            while c < last:
                v0 = x[row, c]
                v1 = x[row, c + nt]
                v2 = x[row, c + 2 * nt]
                v3 = x[row, c + 3 * nt]
                m, rest = online_add(m, rest, cast_like(v0, zero), c != y, ninf)
                m, rest = online_add(m, rest, cast_like(v1, zero), c + nt != y, ninf)
                m, rest = online_add(m, rest, cast_like(v2, zero), c + 2 * nt != y, ninf)
                m, rest = online_add(m, rest, cast_like(v3, zero), c + 3 * nt != y, ninf)
                c += UNROLL * nt
            while c < C:
                m, rest = online_add(m, rest, cast_like(x[row, c], zero), c != y, ninf)
                c += nt
            zy = cast_like(x[row, y], zero)  # before the barriers: g may overwrite x
            mrow, rest64 = block_logsumexp(mbuf, sbuf, m, rest)
            m = cast_like(mrow, zero)
            rest = cast_like(rest64, zero)
            ey = math.exp(zy - m)
            s = rest + ey
            if ey >= rest:
                nlp = math.log1p(rest / ey)  # -log p_y, precise as p_y -> 1
            else:
                nlp = math.log(s) - (zy - m)
            l1mp = math.log(rest) - math.log(s) if rest > zero else ninf  # log(1 - p_y)
            pw = one if gamma == zero else math.exp(gamma * l1mp)  # (1 - p_y)^gamma
            ay = ascale if alpha is None else ascale * cast_like(alpha[y], zero)
            if t == 0:
                losses[row] = swi * (ay * pw * nlp)
            if g is not None:
                p = ey / s
                t2 = zero
                if gamma > zero and rest > zero and nlp > zero:
                    t2 = gamma * p * math.exp((gamma - one) * l1mp + math.log(nlp))
                cy = gscale * ay * (pw + t2)
                a = cy / s
                c = t
                while c < last:
                    v0 = x[row, c]
                    v1 = x[row, c + nt]
                    v2 = x[row, c + 2 * nt]
                    v3 = x[row, c + 3 * nt]
                    g[row, c] = math.exp(cast_like(v0, zero) - m) * a
                    g[row, c + nt] = math.exp(cast_like(v1, zero) - m) * a
                    g[row, c + 2 * nt] = math.exp(cast_like(v2, zero) - m) * a
                    g[row, c + 3 * nt] = math.exp(cast_like(v3, zero) - m) * a
                    c += UNROLL * nt
                while c < C:
                    g[row, c] = math.exp(cast_like(x[row, c], zero) - m) * a
                    c += nt
                if t == y % nt:
                    # the owner of column y rewrites it after its own pass:
                    # cy (p_y - 1) as -cy rest / s, without the cancellation
                    g[row, y] = -cy * rest / s

        if probs is not None:
            # pass 1: max and sum of exp over the row
            m = ninf
            s = zero
            c = t
            while c < last:
                v0 = x[row, c]
                v1 = x[row, c + nt]
                v2 = x[row, c + 2 * nt]
                v3 = x[row, c + 3 * nt]
                m, s = online_add(m, s, cast_like(v0, zero), True, ninf)
                m, s = online_add(m, s, cast_like(v1, zero), True, ninf)
                m, s = online_add(m, s, cast_like(v2, zero), True, ninf)
                m, s = online_add(m, s, cast_like(v3, zero), True, ninf)
                c += UNROLL * nt
            while c < C:
                m, s = online_add(m, s, cast_like(x[row, c], zero), True, ninf)
                c += nt
            mrow, s64 = block_logsumexp(mbuf, sbuf, m, s)
            m = cast_like(mrow, zero)
            s = cast_like(s64, zero)
            log_s = math.log(s)
            inv_s = one / s
            # pass 2: the loss and q = sum_c t_c alpha_c F_c
            q = zero
            loss = zero
            c = t
            while c < last:
                v0 = x[row, c]
                v1 = x[row, c + nt]
                v2 = x[row, c + 2 * nt]
                v3 = x[row, c + 3 * nt]
                p0 = probs[row, c]
                p1 = probs[row, c + nt]
                p2 = probs[row, c + 2 * nt]
                p3 = probs[row, c + 3 * nt]
                _, f, term = _terms(v0, p0, c, alpha, ascale, gamma, m, log_s, inv_s, zero, one)
                q += f
                loss += term
                _, f, term = _terms(v1, p1, c + nt, alpha, ascale, gamma, m, log_s, inv_s, zero,
                                    one)
                q += f
                loss += term
                _, f, term = _terms(v2, p2, c + 2 * nt, alpha, ascale, gamma, m, log_s, inv_s,
                                    zero, one)
                q += f
                loss += term
                _, f, term = _terms(v3, p3, c + 3 * nt, alpha, ascale, gamma, m, log_s, inv_s,
                                    zero, one)
                q += f
                loss += term
                c += UNROLL * nt
            while c < C:
                _, f, term = _terms(x[row, c], probs[row, c], c, alpha, ascale, gamma, m, log_s,
                                    inv_s, zero, one)
                q += f
                loss += term
                c += nt
            q = cast_like(block_sum(mbuf, q), zero)
            loss = cast_like(block_sum(mbuf, loss), zero)
            if t == 0:
                losses[row] = swi * loss
            if g is not None:
                # pass 3: g_c = gscale (p_c q - t_c alpha_c F_c), F_c recomputed
                a = gscale * q
                c = t
                while c < last:
                    v0 = x[row, c]
                    v1 = x[row, c + nt]
                    v2 = x[row, c + 2 * nt]
                    v3 = x[row, c + 3 * nt]
                    p0 = probs[row, c]
                    p1 = probs[row, c + nt]
                    p2 = probs[row, c + 2 * nt]
                    p3 = probs[row, c + 3 * nt]
                    p, f, _ = _terms(v0, p0, c, alpha, ascale, gamma, m, log_s, inv_s, zero, one)
                    g[row, c] = p * a - gscale * f
                    p, f, _ = _terms(v1, p1, c + nt, alpha, ascale, gamma, m, log_s, inv_s, zero,
                                     one)
                    g[row, c + nt] = p * a - gscale * f
                    p, f, _ = _terms(v2, p2, c + 2 * nt, alpha, ascale, gamma, m, log_s, inv_s,
                                     zero, one)
                    g[row, c + 2 * nt] = p * a - gscale * f
                    p, f, _ = _terms(v3, p3, c + 3 * nt, alpha, ascale, gamma, m, log_s, inv_s,
                                     zero, one)
                    g[row, c + 3 * nt] = p * a - gscale * f
                    c += UNROLL * nt
                while c < C:
                    p, f, _ = _terms(x[row, c], probs[row, c], c, alpha, ascale, gamma, m, log_s,
                                     inv_s, zero, one)
                    g[row, c] = p * a - gscale * f
                    c += nt
        # the next row reuses the shared buffers: block_* end with a barrier


def focal_loss(dev, x, labels, probs, alpha, ascale, sw, ignore_index, gamma, reduction, grad,
               grad_out, batch_shape, dtype):
    """Launch the fused kernel on checked device views; ``(loss, grad)`` as
    native arrays of the call's kind (``grad`` None when not asked for).
    ``alpha`` is a ``(C,)`` device view or None; ``ascale`` a float."""
    n, C = x.shape
    T = compute_type(dtype)
    stats = (class_denominator(dev, n, labels, None, sw, ignore_index)
             if reduction == "mean" else None)
    losses = per_row_losses(dev, n, reduction, dtype, T)
    g_native = g = None
    if grad:
        g_native, g = ((grad_out, grad_out) if grad_out is not None
                       else dev.empty(tuple(batch_shape) + (C,), dtype))
    if n:
        threads = threads_for(C)
        focal_rows[row_grid(n, threads), threads](
            x, labels, probs, alpha, T(ascale), sw, ignore_index, T(gamma), stats,
            rows(g, C, "grad_out") if grad else None, losses[1])
    return finish(dev, losses, stats, reduction, batch_shape, dtype), g_native


# ---------------------------------------------------------------- sigmoid focal


@cuda.jit(cache=CACHE)
def sigmoid_focal_elements(x, t, n, alpha, gamma, stats, g, losses, partials):
    """Elements ``0 <= i < n`` of ``x`` and ``t`` (1-D, or 2-D strided: see
    ``_blocks.element``).  ``losses`` (n,) gets every element's loss ("none"),
    ``partials`` (blocks,) each block's float64 sum (otherwise); ``stats``
    (the "mean" denominator) and ``g`` are optional."""
    buf = cuda.shared.array(MAX_THREADS, float64)
    zero = cast_like(0, gamma)
    one = cast_like(1, zero)
    use_alpha = alpha >= zero
    scale = one if stats is None else cast_like(grad_scale(True, stats[0]), zero)
    acc = 0.0
    i = int64(cuda.grid(1))
    stride = int64(cuda.gridsize(1))
    while i < n:
        xr = element(x, i)
        xi = cast_like(xr, zero)
        ti = cast_like(cast_like(element(t, i), xr), zero)  # in the logits' dtype, as the CPU
        ea = math.exp(-abs(xi))
        l1pe = math.log1p(ea)
        sp_pos = (xi if xi > zero else zero) + l1pe  # softplus(x)  = -log(1-p)
        sp_neg = (zero if xi > zero else -xi) + l1pe  # softplus(-x) = -log p
        inv = one / (one + ea)
        p = inv if xi >= zero else ea * inv  # sigmoid(x)
        q = ea * inv if xi >= zero else inv  # 1 - sigmoid(x), without cancellation
        ce = (one - ti) * sp_pos + ti * sp_neg
        u = p * (one - ti) + q * ti  # 1 - p_t: a sum of two non-negative terms
        if gamma == zero:
            pw = one
        else:
            pw = zero if u == zero else math.exp(gamma * math.log(u))  # u**gamma, 0**gamma = 0
        at = alpha * ti + (one - alpha) * (one - ti) if use_alpha else one
        loss = at * pw * ce
        if losses is not None:
            losses[i] = loss
        if partials is not None:
            acc += float64(loss)
        if g is not None:
            # u**(gamma-1) = pw / u; u == 0 only where ce == 0 too, and the limit there is 0
            t2 = zero
            if not (ce == zero or u == zero or gamma == zero):
                t2 = gamma * (one - ti - ti) * ce * (pw / u) * p * q
            set_element(g, i, scale * at * ((p - ti) * pw + t2))
        i += stride
    if partials is not None:
        total = block_sum(buf, acc)
        if cuda.threadIdx.x == 0:
            partials[cuda.blockIdx.x] = total


def sigmoid_focal_loss(dev, logits, targets, alpha, gamma, reduction, grad, grad_out, dtype):
    """Launch the elementwise kernel on checked device views of any shape;
    ``(loss, grad)`` as native arrays of the call's kind."""
    shape = tuple(logits.shape)
    n = math.prod(shape)
    T = compute_type(dtype)
    x, t = flat(logits, "logits"), flat(targets, "targets")
    stats = count_denominator(dev, n) if reduction == "mean" else None
    losses, partials, g_native, g, blocks, threads = elementwise_outputs(
        dev, n, shape, reduction, grad, grad_out, dtype)
    if n:
        sigmoid_focal_elements[blocks, threads](x, t, n, T(alpha), T(gamma), stats, g, losses[1],
                                                partials[1])
    return finish(dev, losses if reduction == "none" else partials, stats, reduction, shape,
                  dtype), g_native


def ptx_signatures():
    """Argument types of every kernel here, for the compile check (tests/test_cuda_compile.py)."""
    from numba import types
    i64, f64, N = types.int64, types.float64, types.none
    sigs = []
    for X, T in ((types.float16, types.float32), (types.float32, types.float32),
                 (types.float64, types.float64)):
        W = T[::1]
        # labels, probs, alpha, sw, stats, g, losses
        for case in ((i64[::1], N, N, N, N, N, X[::1]),  # "none", no gradient
                     (i64[::1], N, W, W, f64[::1], X[:, :], W),  # "mean", every option
                     (types.int32[:], N, X[::1], X[:], f64[::1], X[:, ::1], W),
                     (N, X[:, :], N, N, N, N, X[::1]),
                     (N, X[:, :], W, W, f64[::1], X[:, :], W),
                     (N, f64[:, ::1], N, W, N, X[:, ::1], W)):
            labels, probs, alpha, sw, stats, g, losses = case
            sigs.append((focal_rows, (X[:, :], labels, probs, alpha, T, sw, i64, T, stats, g,
                                      losses)))
        # x, t, g, stats, losses, partials
        for case in ((X[::1], X[::1], X[::1], f64[::1], N, f64[::1]),  # "mean"
                     (X[::1], X[::1], X[::1], N, X[::1], N),  # "none"
                     (X[:, :], X[:], X[:, :], N, N, f64[::1]),  # strided, "sum"
                     (X[::1], types.boolean[::1], N, f64[::1], N, f64[::1]),
                     (X[::1], i64[::1], X[::1], N, X[::1], N),
                     (X[::1], f64[::1], X[::1], f64[::1], N, f64[::1])):
            x, t, g, stats, losses, partials = case
            sigs.append((sigmoid_focal_elements, (x, t, i64, T, T, stats, g, losses, partials)))
    return sigs
