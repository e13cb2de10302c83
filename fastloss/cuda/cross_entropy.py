r"""Fused softmax cross-entropy kernel (CUDA): one block per row, online softmax.

The loss and gradient of a row are ``fastloss.formulas.softmax``'s; the
soft-cap's slope is ``1 - tanh(x / cap)^2`` here; the reduction's scale
(1/denominator for "mean") is read from the device.

Blocks are persistent (``row_grid``): about 1024 threads per SM, in blocks of
at most 512 (``LARGE_KERNEL_BLOCK``: with every option the kernel needs up to
128 registers per thread without spilling), each looping over rows, so that
few rows are in flight and a row read by pass 1 is still in L2 when pass 2
reads it again (the memory traffic is then one read of the logits and one
write of the gradient).

Integer targets without class weights or soft-cap, float16 and float32, take
the fast row loops of ``cuda/_rows`` (``label_sums``, ``exp_grads``): a 1-D
view of the row with unsigned column indices, 16 loads in
flight per thread, one rescale of the running sum per step of loads, pass 2
walking the row in reverse (the columns pass 1 read last, still in L2, first)
and storing the gradient evict-first, and ``_blocks.exp_for`` (float16 data
takes a two-instruction exp, float32 the range-reduced one).  Other rows
(class weights, soft-cap, probability targets, float64) take the loops here,
``UNROLL`` loads per thread (``load_group``) and libdevice's exp.

Pass 1: each thread walks its strided share of the row keeping an online
``(max, sum exp)`` pair, which one block reduction merges.  For an integer
target the sum leaves out the target's own term, ``rest = s - e_y``, so that
``-log p_y = log1p(rest / e_y)`` keeps its digits as ``p_y -> 1``.  Pass 2
writes the gradient; the target's entry is rewritten afterwards by the thread
that owns it.  Each element of the gradient is written by the thread that
reads the same element of the logits, after its read, and every other read of
the row happens before pass 2's barrier: the gradient may alias the logits.
Row offsets are 64-bit (a row's base is computed once), so B*T*V may exceed 2**31.

"mean" launches three kernels: the label check, the denominator
(``class_denominator``, which also zeroes the count of finished blocks) and this
kernel, whose last block to finish sums the per-row losses in a fixed order and
divides (``_reduction.last_block_total``).  "sum" has ``finish`` sum them (a
third launch), "none" returns them.

Absent options are ``None`` arguments: Numba compiles a specialization per
combination, with the unused branches removed (compile-time switches).
"""
import math

from numba import cuda, float64, int64, uint64

from fastloss.cuda._arrays import compute_type
from fastloss.cuda._blocks import (LARGE_KERNEL_BLOCK, MAX_THREADS, UNROLL, block_logsumexp,
                                   block_sum, cast_like, fast_rows, group_end, ignored_row, kernel,
                                   load_group, online_add, ptx_dtypes)
from fastloss.cuda._formulas import softmax
from fastloss.cuda._reduction import class_denominator, gradient_scale, last_block_total
from fastloss.cuda._rows import class_rows, exp_grads, label_sums, row_loss


@cuda.jit(device=True)
def _capped(v, cap, one):
    """(z, dz/dx) of the soft-cap ``z = cap tanh(x / cap)`` (``cap`` None: none)."""
    if cap is None:
        return v, one
    th = math.tanh(v / cap)
    return cap * th, one - th * th


@cuda.jit(device=True)
def _weight(weight, c, zero):
    """w_c in the compute type (1 when ``weight`` is None)."""
    return cast_like(1, zero) if weight is None else cast_like(weight[c], zero)


@cuda.jit(device=True)
def _shift(acc, wsum, m_old, m, zero):
    """``sum_c w_c (z_c - m_old)`` as ``sum_c w_c (z_c - m)``, ``wsum = sum_c w_c``."""
    return acc - wsum * (m - m_old) if m != m_old and wsum != zero else acc


@cuda.jit(device=True)
def _add_shifted(acc, wsum, m_old, m, w, z, zero):
    """``(sum_c w_c (z_c - m), sum_c w_c)`` after one more class (weight ``w``, logit ``z``)
    as a thread's running max moves from ``m_old`` to ``m``.  Summed against the max, not
    as ``sum_c w_c z_c - wsum m``, which cancels at large ``|m|``; a zero weight adds 0,
    even at ``z = -inf``."""
    acc = _shift(acc, wsum, m_old, m, zero)
    if w != zero:
        acc += w * (zero if z == m else z - m)
    return acc, wsum + w


@cuda.jit(device=True)
def _label_visit(v, c, y, m, rest, szm, wsum, weight, eps, cap, zero, one, ninf):
    """Pass 1 of an integer-target row, one element: online max and sum of
    exp over the classes but y, and the smoothing sums."""
    z, _ = _capped(cast_like(v, zero), cap, one)
    m_new, rest = online_add(m, rest, z, c != y, ninf)
    if eps > 0:
        szm, wsum = _add_shifted(szm, wsum, m, m_new, _weight(weight, c, zero), z, zero)
    return m_new, rest, szm, wsum


@cuda.jit(device=True)
def _label_sums(x, row, y, weight, eps, cap, zero, one, ninf):
    """Pass 1 of an integer-target row over this thread's columns: ``(max, sum
    of exp over the classes but y, sum_c w_c (z_c - max), sum_c w_c)``, the last
    two with label smoothing only."""
    nt = cuda.blockDim.x
    C = x.shape[1]
    m, rest, szm, wsum = ninf, zero, zero, zero
    c = cuda.threadIdx.x
    while c < group_end(C):
        v0, v1, v2, v3 = load_group(x, row, c)
        m, rest, szm, wsum = _label_visit(v0, c, y, m, rest, szm, wsum, weight, eps, cap, zero, one,
                                          ninf)
        m, rest, szm, wsum = _label_visit(v1, c + nt, y, m, rest, szm, wsum, weight, eps, cap, zero,
                                          one, ninf)
        m, rest, szm, wsum = _label_visit(v2, c + 2 * nt, y, m, rest, szm, wsum, weight, eps, cap,
                                          zero, one, ninf)
        m, rest, szm, wsum = _label_visit(v3, c + 3 * nt, y, m, rest, szm, wsum, weight, eps, cap,
                                          zero, one, ninf)
        c += UNROLL * nt
    while c < C:
        m, rest, szm, wsum = _label_visit(x[row, c], c, y, m, rest, szm, wsum, weight, eps, cap,
                                          zero, one, ninf)
        c += nt
    return m, rest, szm, wsum


@cuda.jit(device=True)
def _label_grad(v, c, weight, a, b, m, cap, zero, one):
    """Gradient of an integer-target row at a class c != y."""
    z, slope = _capped(cast_like(v, zero), cap, one)
    return softmax.class_gradient(math.exp(z - m), a, b, _weight(weight, c, zero)) * slope


@cuda.jit(device=True)
def _label_grads(x, row, g, weight, a, b, m, cap, zero, one):
    """The gradient of an integer-target row at this thread's columns (the
    target's entry as at any other class)."""
    nt = cuda.blockDim.x
    C = x.shape[1]
    c = cuda.threadIdx.x
    while c < group_end(C):
        v0, v1, v2, v3 = load_group(x, row, c)
        g[row, c] = _label_grad(v0, c, weight, a, b, m, cap, zero, one)
        g[row, c + nt] = _label_grad(v1, c + nt, weight, a, b, m, cap, zero, one)
        g[row, c + 2 * nt] = _label_grad(v2, c + 2 * nt, weight, a, b, m, cap, zero, one)
        g[row, c + 3 * nt] = _label_grad(v3, c + 3 * nt, weight, a, b, m, cap, zero, one)
        c += UNROLL * nt
    while c < C:
        g[row, c] = _label_grad(x[row, c], c, weight, a, b, m, cap, zero, one)
        c += nt


@cuda.jit(device=True)
def _smoothing(eps, C):
    """``(0, 1, 1 - eps, eps / C)`` in the compute type, that of ``eps``."""
    zero = eps - eps
    one = cast_like(1, zero)
    return zero, one, one - eps, eps / cast_like(C, zero)


@cuda.jit(device=True)
def _label_row(x, labels, row, ignore_index, weight, swi, gscale, eps, smooth_sums, zcoef, cap,
               mbuf, sbuf, g, losses):
    """Loss (and gradient unless ``g`` is None) of row ``row``, integer targets;
    ``smooth_sums`` (True with label smoothing, else None: pruned) asks for the
    smoothing sums."""
    zero, one, keep, smooth = _smoothing(eps, x.shape[1])
    y = int64(labels[row])
    if y == ignore_index:
        ignored_row(row, losses, g, zero)
        return
    # the main path (no class weights, no soft-cap) takes the fast row loops
    fast = weight is None and cap is None and fast_rows(x)
    xr = x[row]
    # z_y is read before the barriers below: the gradient may overwrite the logits
    if fast:
        zy, slope_y = cast_like(xr[uint64(y)], zero), one
        m, rest, szm, wsum = label_sums(xr, y, zy, smooth_sums, zero)
    else:
        m, rest, szm, wsum = _label_sums(x, row, y, weight, eps, cap, zero, one,
                                        cast_like(-math.inf, zero))
        zy, slope_y = _capped(cast_like(x[row, y], zero), cap, one)
    mrow, rest64 = block_logsumexp(mbuf, sbuf, m, rest)
    if smooth_sums is not None:
        szm = cast_like(block_sum(mbuf, _shift(szm, wsum, m, cast_like(mrow, zero), zero)), zero)
        wsum = cast_like(block_sum(mbuf, wsum), zero)
    m = cast_like(mrow, zero)
    rest = cast_like(rest64, zero)
    ey = math.exp(zy - m)
    s = rest + ey
    wy = _weight(weight, y, zero)
    loss, lse = softmax.label_loss(zy, m, s, rest, ey, szm, wy, wsum, keep, smooth, eps, zcoef)
    if cuda.threadIdx.x == 0:
        losses[row] = swi * loss
    if g is not None:
        a, b, gy = softmax.label_gradient(lse, s, rest, ey, wy, wsum, keep, smooth, zcoef, gscale,
                                          cast_like(2, zero))
        if fast:
            exp_grads(xr, g[row], m, a, b, zero)
        else:
            _label_grads(x, row, g, weight, a, b, m, cap, zero, one)
        if cuda.threadIdx.x == y % cuda.blockDim.x:
            # the owner of column y rewrites it after its own pass: (p_y - 1)
            # as -rest/s, no cancellation as p_y -> 1
            g[row, y] = gy * slope_y


@cuda.jit(device=True)
def _prob_visit(v, p, c, m, s, tw_sum, twzm_sum, weight, keep, smooth, cap, zero, one, ninf):
    """Pass 1 of a probability-target row, one element."""
    z, _ = _capped(cast_like(v, zero), cap, one)
    tw = softmax.target_weight(cast_like(p, zero), _weight(weight, c, zero), keep, smooth)
    m_new, s = online_add(m, s, z, True, ninf)
    twzm_sum, tw_sum = _add_shifted(twzm_sum, tw_sum, m, m_new, tw, z, zero)
    return m_new, s, tw_sum, twzm_sum


@cuda.jit(device=True)
def _prob_sums(x, probs, row, weight, keep, smooth, cap, zero, one, ninf):
    """Pass 1 of a probability-target row over this thread's columns: ``(max,
    sum of exp, sum_c t'_c w_c, sum_c t'_c w_c (z_c - max))``."""
    nt = cuda.blockDim.x
    C = x.shape[1]
    c = cuda.threadIdx.x
    m, s, tw_sum, twzm_sum = ninf, zero, zero, zero
    while c < group_end(C):
        v0, v1, v2, v3 = load_group(x, row, c)
        p0, p1, p2, p3 = load_group(probs, row, c)
        m, s, tw_sum, twzm_sum = _prob_visit(v0, p0, c, m, s, tw_sum, twzm_sum, weight, keep,
                                             smooth, cap, zero, one, ninf)
        m, s, tw_sum, twzm_sum = _prob_visit(v1, p1, c + nt, m, s, tw_sum, twzm_sum, weight, keep,
                                             smooth, cap, zero, one, ninf)
        m, s, tw_sum, twzm_sum = _prob_visit(v2, p2, c + 2 * nt, m, s, tw_sum, twzm_sum, weight,
                                             keep, smooth, cap, zero, one, ninf)
        m, s, tw_sum, twzm_sum = _prob_visit(v3, p3, c + 3 * nt, m, s, tw_sum, twzm_sum, weight,
                                             keep, smooth, cap, zero, one, ninf)
        c += UNROLL * nt
    while c < C:
        m, s, tw_sum, twzm_sum = _prob_visit(x[row, c], probs[row, c], c, m, s, tw_sum, twzm_sum,
                                             weight, keep, smooth, cap, zero, one, ninf)
        c += nt
    return m, s, tw_sum, twzm_sum


@cuda.jit(device=True)
def _prob_grad(v, p, c, weight, a, kg, b, m, cap, zero, one):
    z, slope = _capped(cast_like(v, zero), cap, one)
    return softmax.prob_class_gradient(math.exp(z - m), a, kg, cast_like(p, zero), b,
                               _weight(weight, c, zero)) * slope


@cuda.jit(device=True)
def _prob_grads(x, probs, row, g, weight, a, kg, b, m, cap, zero, one):
    """The gradient of a probability-target row at this thread's columns."""
    nt = cuda.blockDim.x
    C = x.shape[1]
    c = cuda.threadIdx.x
    while c < group_end(C):
        v0, v1, v2, v3 = load_group(x, row, c)
        p0, p1, p2, p3 = load_group(probs, row, c)
        g[row, c] = _prob_grad(v0, p0, c, weight, a, kg, b, m, cap, zero, one)
        g[row, c + nt] = _prob_grad(v1, p1, c + nt, weight, a, kg, b, m, cap, zero, one)
        g[row, c + 2 * nt] = _prob_grad(v2, p2, c + 2 * nt, weight, a, kg, b, m, cap, zero, one)
        g[row, c + 3 * nt] = _prob_grad(v3, p3, c + 3 * nt, weight, a, kg, b, m, cap, zero, one)
        c += UNROLL * nt
    while c < C:
        g[row, c] = _prob_grad(x[row, c], probs[row, c], c, weight, a, kg, b, m, cap, zero, one)
        c += nt


@cuda.jit(device=True)
def _prob_row(x, probs, row, weight, swi, gscale, eps, zcoef, cap, mbuf, sbuf, g, losses):
    """Loss (and gradient unless ``g`` is None) of row ``row``, probability targets."""
    zero, one, keep, smooth = _smoothing(eps, x.shape[1])
    m, s, tw_sum, twzm_sum = _prob_sums(x, probs, row, weight, keep, smooth, cap, zero, one,
                                       cast_like(-math.inf, zero))
    mrow, s64 = block_logsumexp(mbuf, sbuf, m, s)
    twzm_sum = cast_like(block_sum(mbuf, _shift(twzm_sum, tw_sum, m, cast_like(mrow, zero), zero)),
                         zero)
    tw_sum = cast_like(block_sum(mbuf, tw_sum), zero)
    m = cast_like(mrow, zero)
    s = cast_like(s64, zero)
    loss, lse = softmax.prob_loss(tw_sum, twzm_sum, m, s, zcoef)
    if cuda.threadIdx.x == 0:
        losses[row] = swi * loss
    if g is not None:
        a = softmax.prob_gradient(tw_sum, lse, s, zcoef, cast_like(2, zero), gscale)
        _prob_grads(x, probs, row, g, weight, a, gscale * keep, gscale * smooth, m, cap, zero, one)


@kernel(LARGE_KERNEL_BLOCK)
def cross_entropy_kernel(x, labels, probs, weight, sw, ignore_index, eps, smooth_sums, zcoef, cap,
                         stats, g, losses, total):
    """Rows ``blockIdx.x, blockIdx.x + gridDim.x, ...`` of ``x`` (n, C), one
    block per row.  ``labels`` (n,) or ``probs`` (n, C) (the other None);
    ``weight`` (C,), ``sw`` (n,), ``cap`` (the soft-cap), ``stats`` (the
    "mean" denominator, None otherwise) and ``g`` (None: no gradient) are
    optional; with ``total`` (one element, "mean" only) the last block to finish
    writes the loss there (``last_block_total``).  ``eps``, ``zcoef`` and ``cap``
    carry the compute type ``T``; ``smooth_sums`` is True when ``eps > 0``, else None
    (a default call compiles no smoothing sums)."""
    mbuf = cuda.shared.array(MAX_THREADS, float64)
    sbuf = cuda.shared.array(MAX_THREADS, float64)
    zero = eps - eps
    scale = gradient_scale(stats, zero)
    for row in range(int64(cuda.blockIdx.x), x.shape[0], int64(cuda.gridDim.x)):
        swi = cast_like(1, zero) if sw is None else cast_like(sw[row], zero)
        if labels is not None:
            _label_row(x, labels, row, ignore_index, weight, swi, swi * scale, eps, smooth_sums,
                       zcoef, cap, mbuf, sbuf, g, losses)
        if probs is not None:
            _prob_row(x, probs, row, weight, swi, swi * scale, eps, zcoef, cap, mbuf, sbuf, g,
                      losses)
        # the next row reuses the shared buffers: block_* end with a barrier
    if total is not None:
        last_block_total(mbuf, losses, stats, total)


def softmax_cross_entropy(dev, logits, labels, probs, weight, sw, ignore_index, eps, zcoef, cap,
                          reduction, grad, grad_out, caller_grad_out):
    """``(loss, grad)`` of ``fastloss.softmax_cross_entropy`` on checked device
    views, as native arrays of the call's kind (``grad`` the caller's
    ``grad_out`` when given, None when not asked for)."""
    x, labels, probs, sw = class_rows(logits, labels, probs, weight, sw, grad, grad_out)
    T = compute_type(logits.dtype)
    stats = (class_denominator(dev, x.shape[0], labels, None if probs is not None else weight, sw,
                               ignore_index)
             if reduction == "mean" else None)
    args = (x, labels, probs, weight, sw, ignore_index, T(eps), True if eps > 0 else None,
            T(zcoef), None if cap is None else T(cap))
    return row_loss(dev, cross_entropy_kernel, args, stats, logits, reduction, grad, grad_out,
                    caller_grad_out)


def ptx_signatures():
    """Argument types of every kernel here, for the compile check (tests/test_cuda_compile.py):
    per dtype, integer targets with no option and no gradient, integer targets
    with every option and a strided gradient, probabilities with every option."""
    from numba import types
    i64, f64, N = types.int64, types.float64, types.none
    sigs = []
    for X, T in ptx_dtypes():
        # x, labels, probs, weight, sw, cap, stats, g, losses, total
        for case in ((X[:, ::1], i64[::1], N, N, N, N, N, N, X[::1], N),
                     (X[:, ::1], i64[::1], N, N, N, N, f64[::1], X[:, ::1], T[::1], X[::1]),
                     (X[:, :], types.int32[:], N, X[::1], X[:], T, f64[::1], X[:, :], T[::1],
                      X[::1]),
                     (X[:, :], N, X[:, :], T[::1], T[::1], T, f64[::1], X[:, ::1], T[::1],
                      X[::1])):
            x, labels, probs, weight, sw, cap, stats, g, losses, total = case
            smooth = N if weight is N else types.boolean  # every option: smoothing too
            sigs.append((cross_entropy_kernel, (x, labels, probs, weight, sw, i64, T, smooth, T,
                                                cap, stats, g, losses, total)))
    return sigs
