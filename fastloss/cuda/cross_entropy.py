r"""Fused softmax cross-entropy kernel (CUDA): one block per row, online softmax.

Per row, with ``z`` the (optionally soft-capped) logits, ``m = max z``,
``s = sum_c exp(z_c - m)``, ``lse = m + log s``, ``p = softmax(z)``, class
weights ``w`` (ones when not given), smoothing ``eps``, ``smooth = eps / C``,
z-loss coefficient ``zc`` and sample weight ``sw`` (as in ``cpu/cross_entropy``):

integer target ``y``::

    L = sw * [(1-eps) w_y (lse - z_y) + smooth * sum_c w_c (lse - z_c) + zc lse^2]
    dL/dz_c = sw * [p_c ((1-eps) w_y + smooth sum_k w_k + 2 zc lse)
                    - (1-eps) w_y [c == y] - smooth w_c]

probability target ``t`` (smoothed ``t' = (1-eps) t + smooth``)::

    L = sw * [sum_c t'_c w_c (lse - z_c) + zc lse^2]
    dL/dz_c = sw * [p_c (sum_k t'_k w_k + 2 zc lse) - t'_c w_c]

Soft-capping ``z = cap tanh(x / cap)`` multiplies the gradient by
``sech(x / cap)^2``; the reduction's scale (1/denominator for "mean", read
from the device) multiplies it too.

Blocks are persistent (``row_grid``): about one 1024-thread block per SM,
each looping over rows, so that few rows are in flight and a row read by
pass 1 is still in L2 when pass 2 reads it again (the memory traffic is then
one read of the logits and one write of the gradient).  Each thread issues
``UNROLL`` independent loads before it uses them, to keep enough bytes in
flight.

Pass 1: each thread walks its strided share of the row keeping an online
``(max, sum exp)`` pair, which one block reduction merges.  For an integer
target the sum leaves out the target's own term, ``rest = s - e_y``, so that
``-log p_y = log1p(rest / e_y)`` keeps its digits as ``p_y -> 1``.  Pass 2
writes the gradient; the target's entry is rewritten afterwards by the thread
that owns it.  Each element of the gradient is written by the thread that
reads the same element of the logits, after its read, and every other read of
the row happens before pass 2's barrier: the gradient may alias the logits.  Row offsets are 64-bit (Numba
indexes with intp), so B*T*V may exceed 2**31.

Absent options are ``None`` arguments: Numba compiles a specialization per
combination, with the unused branches removed (compile-time switches).
"""
import math

from numba import cuda, float64, int64

from fastloss._cache import CACHE
from fastloss._reduction import grad_scale
from fastloss.cuda._arrays import compute_type, rows
from fastloss.cuda._blocks import (MAX_THREADS, UNROLL, block_logsumexp, block_sum, cast_like,
                                   ignored_row, online_add, row_grid, threads_for)
from fastloss.cuda._reduction import class_denominator, finish, per_row_losses


@cuda.jit(device=True)
def _capped(v, cap, one):
    """(z, dz/dx) of the soft-cap ``z = cap tanh(x / cap)``; cap 0 means none."""
    if cap > 0:
        th = math.tanh(v / cap)
        return cap * th, one - th * th
    return v, one


@cuda.jit(device=True)
def _label_visit(v, c, y, m, rest, sz, wsum, weight, eps, cap, zero, one, ninf):
    """Pass 1 of an integer-target row, one element: online max and sum of
    exp over the classes but y, and the smoothing sums."""
    z, _ = _capped(cast_like(v, zero), cap, one)
    if eps > 0:
        wc = one if weight is None else cast_like(weight[c], zero)
        sz += zero if wc == 0 else wc * z
        wsum += wc
    m, rest = online_add(m, rest, z, c != y, ninf)
    return m, rest, sz, wsum


@cuda.jit(device=True)
def _label_grad(v, c, weight, a, b, m, cap, zero, one):
    """Gradient of an integer-target row at a class c != y."""
    z, slope = _capped(cast_like(v, zero), cap, one)
    wc = one if weight is None else cast_like(weight[c], zero)
    return (math.exp(z - m) * a - b * wc) * slope


@cuda.jit(device=True)
def _prob_visit(v, p, c, m, s, tw_sum, twz_sum, weight, keep, smooth, cap, zero, one, ninf):
    """Pass 1 of a probability-target row, one element."""
    z, _ = _capped(cast_like(v, zero), cap, one)
    wc = one if weight is None else cast_like(weight[c], zero)
    tw = (keep * cast_like(p, zero) + smooth) * wc
    tw_sum += tw
    twz_sum += zero if tw == 0 else tw * z  # a class without mass adds 0, even at z = -inf
    m, s = online_add(m, s, z, True, ninf)
    return m, s, tw_sum, twz_sum


@cuda.jit(device=True)
def _prob_grad(v, p, c, weight, a, kg, b, m, cap, zero, one):
    z, slope = _capped(cast_like(v, zero), cap, one)
    wc = one if weight is None else cast_like(weight[c], zero)
    return (math.exp(z - m) * a - (kg * cast_like(p, zero) + b) * wc) * slope


@cuda.jit(cache=CACHE)
def cross_entropy_rows(x, labels, probs, weight, sw, ignore_index, eps, zcoef, cap,
                       stats, g, losses):
    """Rows ``blockIdx.x, blockIdx.x + gridDim.x, ...`` of ``x`` (n, C), one
    block per row.  ``labels`` (n,) or ``probs`` (n, C) (the other None);
    ``weight`` (C,), ``sw`` (n,), ``stats`` (the "mean" denominator, None
    otherwise) and ``g`` (None: no gradient) are optional.  ``eps``,
    ``zcoef`` and ``cap`` carry the compute type ``T``."""
    mbuf = cuda.shared.array(MAX_THREADS, float64)
    sbuf = cuda.shared.array(MAX_THREADS, float64)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    n, C = x.shape
    zero = eps - eps
    one = cast_like(1, zero)
    two = cast_like(2, zero)
    ninf = cast_like(-math.inf, zero)
    smooth = eps / cast_like(C, zero)
    keep = one - eps
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
            sz = zero  # sum_c w_c z_c, for label smoothing
            wsum = zero  # sum_c w_c, likewise (read with the row, not summed on the host)
            c = t
            while c < last:
                v0 = x[row, c]
                v1 = x[row, c + nt]
                v2 = x[row, c + 2 * nt]
                v3 = x[row, c + 3 * nt]
                m, rest, sz, wsum = _label_visit(v0, c, y, m, rest, sz, wsum, weight, eps, cap,
                                                 zero, one, ninf)
                m, rest, sz, wsum = _label_visit(v1, c + nt, y, m, rest, sz, wsum, weight, eps,
                                                 cap, zero, one, ninf)
                m, rest, sz, wsum = _label_visit(v2, c + 2 * nt, y, m, rest, sz, wsum, weight,
                                                 eps, cap, zero, one, ninf)
                m, rest, sz, wsum = _label_visit(v3, c + 3 * nt, y, m, rest, sz, wsum, weight,
                                                 eps, cap, zero, one, ninf)
                c += UNROLL * nt
            while c < C:
                m, rest, sz, wsum = _label_visit(x[row, c], c, y, m, rest, sz, wsum, weight, eps,
                                                 cap, zero, one, ninf)
                c += nt
            # read before the barriers below: the gradient may overwrite the logits
            zy, slope_y = _capped(cast_like(x[row, y], zero), cap, one)
            mrow, rest64 = block_logsumexp(mbuf, sbuf, m, rest)
            if eps > 0:
                sz = cast_like(block_sum(mbuf, sz), zero)
                wsum = cast_like(block_sum(mbuf, wsum), zero)
            m = cast_like(mrow, zero)
            rest = cast_like(rest64, zero)
            ey = math.exp(zy - m)
            s = rest + ey
            lse = m + math.log(s)
            wy = one if weight is None else cast_like(weight[y], zero)
            nll = math.log1p(rest / ey) if ey >= rest else lse - zy
            if t == 0:
                loss = keep * wy * nll
                if eps > 0:
                    loss += smooth * (wsum * lse - sz)
                if zcoef > 0:
                    loss += zcoef * lse * lse
                losses[row] = swi * loss
            if g is not None:
                spread = smooth * wsum + two * zcoef * lse  # p_c's factor beyond the target's
                a = gscale * (keep * wy + spread) / s
                b = gscale * smooth
                c = t
                while c < last:
                    v0 = x[row, c]
                    v1 = x[row, c + nt]
                    v2 = x[row, c + 2 * nt]
                    v3 = x[row, c + 3 * nt]
                    g[row, c] = _label_grad(v0, c, weight, a, b, m, cap, zero, one)
                    g[row, c + nt] = _label_grad(v1, c + nt, weight, a, b, m, cap, zero, one)
                    g[row, c + 2 * nt] = _label_grad(v2, c + 2 * nt, weight, a, b, m, cap, zero, one)
                    g[row, c + 3 * nt] = _label_grad(v3, c + 3 * nt, weight, a, b, m, cap, zero, one)
                    c += UNROLL * nt
                while c < C:
                    g[row, c] = _label_grad(x[row, c], c, weight, a, b, m, cap, zero, one)
                    c += nt
                if t == y % nt:
                    # the owner of column y rewrites it after its own pass: (p_y - 1)
                    # as -rest/s, no cancellation as p_y -> 1
                    v = gscale * ((ey / s) * spread - smooth * wy - keep * wy * (rest / s))
                    g[row, y] = v * slope_y

        if probs is not None:
            m = ninf
            s = zero
            tw_sum = zero   # sum_c t'_c w_c
            twz_sum = zero  # sum_c t'_c w_c z_c
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
                m, s, tw_sum, twz_sum = _prob_visit(v0, p0, c, m, s, tw_sum, twz_sum, weight,
                                                    keep, smooth, cap, zero, one, ninf)
                m, s, tw_sum, twz_sum = _prob_visit(v1, p1, c + nt, m, s, tw_sum, twz_sum, weight,
                                                    keep, smooth, cap, zero, one, ninf)
                m, s, tw_sum, twz_sum = _prob_visit(v2, p2, c + 2 * nt, m, s, tw_sum, twz_sum,
                                                    weight, keep, smooth, cap, zero, one, ninf)
                m, s, tw_sum, twz_sum = _prob_visit(v3, p3, c + 3 * nt, m, s, tw_sum, twz_sum,
                                                    weight, keep, smooth, cap, zero, one, ninf)
                c += UNROLL * nt
            while c < C:
                m, s, tw_sum, twz_sum = _prob_visit(x[row, c], probs[row, c], c, m, s, tw_sum,
                                                    twz_sum, weight, keep, smooth, cap, zero, one,
                                                    ninf)
                c += nt
            mrow, s64 = block_logsumexp(mbuf, sbuf, m, s)
            tw_sum = cast_like(block_sum(mbuf, tw_sum), zero)
            twz_sum = cast_like(block_sum(mbuf, twz_sum), zero)
            m = cast_like(mrow, zero)
            s = cast_like(s64, zero)
            lse = m + math.log(s)
            if t == 0:
                losses[row] = swi * (tw_sum * lse - twz_sum + zcoef * lse * lse)
            if g is not None:
                a = gscale * (tw_sum + two * zcoef * lse) / s
                b = gscale * smooth
                kg = gscale * keep
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
                    g[row, c] = _prob_grad(v0, p0, c, weight, a, kg, b, m, cap, zero, one)
                    g[row, c + nt] = _prob_grad(v1, p1, c + nt, weight, a, kg, b, m, cap, zero, one)
                    g[row, c + 2 * nt] = _prob_grad(v2, p2, c + 2 * nt, weight, a, kg, b, m, cap,
                                                    zero, one)
                    g[row, c + 3 * nt] = _prob_grad(v3, p3, c + 3 * nt, weight, a, kg, b, m, cap,
                                                    zero, one)
                    c += UNROLL * nt
                while c < C:
                    g[row, c] = _prob_grad(x[row, c], probs[row, c], c, weight, a, kg, b, m, cap,
                                           zero, one)
                    c += nt
        # the next row reuses the shared buffers: block_* end with a barrier

def softmax_cross_entropy(dev, x, labels, probs, weight, sw, ignore_index, eps, zcoef, cap,
                          reduction, grad, grad_out, batch_shape, dtype):
    """Launch the fused kernel on checked device views; ``(loss, grad)`` as
    native arrays of the call's kind (``grad`` None when not asked for)."""
    n, C = x.shape
    T = compute_type(dtype)
    stats = (class_denominator(dev, n, labels, None if probs is not None else weight, sw,
                                       ignore_index)
             if reduction == "mean" else None)
    losses = per_row_losses(dev, n, reduction, dtype, T)
    g_native = g = None
    if grad:
        g_native, g = (grad_out, grad_out) if grad_out is not None else dev.empty(
            tuple(batch_shape) + (C,), dtype)
    if n:
        threads = threads_for(C)
        cross_entropy_rows[row_grid(n, threads), threads](
            x, labels, probs, weight, sw, ignore_index, T(eps), T(zcoef), T(cap), stats,
            rows(g, C, "grad") if grad else None, losses[1])
    return finish(dev, losses, stats, reduction, batch_shape, dtype), g_native


def ptx_signatures():
    """Argument types of every kernel here, for the compile check (tests/test_cuda_compile.py):
    per dtype, integer targets with no option and no gradient, integer targets
    with every option and a strided gradient, probabilities with every option."""
    from numba import types
    i64, f64 = types.int64, types.float64
    sigs = []
    for X, T in ((types.float16, types.float32), (types.float32, types.float32),
                 (types.float64, types.float64)):
        none = types.none
        sigs.append((cross_entropy_rows, (X[:, ::1], i64[::1], none, none, none, i64, T, T, T,
                                          none, none, X[::1])))
        sigs.append((cross_entropy_rows, (X[:, :], types.int32[:], none, X[::1], X[:], i64, T, T,
                                          T, f64[::1], X[:, :], T[::1])))
        sigs.append((cross_entropy_rows, (X[:, :], none, X[:, :], T[::1], T[::1], i64, T, T, T,
                                          f64[::1], X[:, ::1], T[::1])))
    return sigs
