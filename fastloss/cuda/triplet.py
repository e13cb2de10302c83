r"""Triplet losses (CUDA): the kernels for explicit triplets and for online mining in one
batch, and the calls that launch them.

``triplet_rows_kernel``: one block per triplet ``(a, p, n)`` (a row of the three ``(N, D)``
inputs; persistent blocks, each looping over rows, ``row_grid``), by the formulas of
``fastloss.formulas.triplet`` (the CPU's).  Pass 1: each thread sums its strided share of the
row (the three squared differences, or the six dot products for cosine), block reductions
(float64 tree) give the row's sums.  Pass 2: the thread that read element ``j`` of ``a``, ``p``
and ``n`` reads all three again and then writes element ``j`` of the three gradients, so a
gradient may be any one of the inputs itself.

``batch_triplet_loss``, in four kernels (``fastloss.triplet.batch_triplet_loss`` has the
semantics):

1. ``pairwise_kernel``: the ``N x N`` matrix ``M`` over the tiles on or above the diagonal
   only (one block per tile ``(bi, bj)``, bi <= bj; an off-diagonal tile writes ``M[i, j]``
   and ``M[j, i]``): ``M[i, j] = ||e_i - e_j||^2`` from the differences themselves
   (euclidean, squared; exactly 0 on the diagonal and between duplicates, no cancellation)
   or ``e_i . e_j`` (cosine, with ``inv_i = 1 / max(sqrt(M[i, i]), 1e-8)`` by
   ``inverse_norms_kernel``).  Register tiles (on a GPU; the simulator's are smaller): a
   block of 16 x 16 threads owns a 64 x 64 tile, each thread 4 x 4 entries in registers; the
   tile's 64 + 64 rows of E are staged in shared memory 16 columns at a time, transposed,
   and each step loads 4 + 4 values for 16 terms (half a shared load per term, against two
   when each thread computed one entry).  Every entry sums its terms in the same order
   (k = 0, 1, ...) and (e_i - e_j)^2 = (e_j - e_i)^2, so ``M`` is exactly symmetric and
   equal rows give equal entries (exact ties), at any tile size.
2. mining, one block per anchor ``i`` (``mine_hard_kernel``, ``mine_semihard_kernel``,
   ``mine_all_kernel``), threads over the columns ``j``: the per-anchor loss (a float64 block
   sum), the count that enters the "mean" denominator, and the anchor's row of two ``N x N``
   arrays: ``S[i, j]``, the coefficient of ``d(i, j)`` in the loss (``f'(z)`` for a positive,
   ``-sum f'(z)`` for a negative, 0 elsewhere), and ``pick[i, j] >= 0`` where the pair is
   selected (hard, semihard; "all" selects every pair).  Hard: block reductions of (key,
   index), lowest index on ties; the keys order like the CPU's (squared distance, cosine
   distance clamped at 0), and a row holding a NaN compares the distances themselves, the
   first NaN winning.  Semihard: one thread per positive scans the negatives; then, after a
   barrier, one thread per negative gathers the positives that chose it.  "all": one thread
   per positive (its slopes over every negative) or per negative (over every positive).
3. ``batch_total_kernel``: one block sums the per-anchor losses and counts (float64, fixed
   order) into the loss and the "mean" denominator ``stats[0]``.
4. ``backward_kernel``: one block per embedding row ``r``:
   ``g[r] = scale * sum over the selected pairs (r, o) of (S[r, o] + S[o, r]) dd(r, o)/de_r``
   (``r`` as anchor, then as the other end).  Phase 1 walks the candidates ``o`` once per
   row, a thread each, a block of them at a time: the pair is selected when
   ``pick[r, o] >= 0`` or ``pick[o, r] >= 0`` (hard, semihard; "all": every o), and a block
   prefix count (a fixed scan) places its weight (euclidean ``c / d``, 0 at d = 0; squared
   ``2 c``; cosine ``c / (n_r n_o)``) and its ``o`` at the next place of row ``r`` of ``W``
   and ``partners``: a compact list in increasing ``o``, written by this block alone.
   Phase 2, 4 columns per thread, walks that list only (hard mining: the anchor's two
   choices and the anchors that chose ``r``, instead of all N rows), each column summing
   its pairs in increasing ``o`` (the order does not depend on the block size).  No
   atomics: the same bits on every run.

Memory: ``M``, ``S`` (compute type) and ``pick`` (int32), ``O(N^2)``; with the gradient
the backward's lists add ``W`` (compute type) and, except for "all", ``partners`` (int32).
"""
import math
import os

import numpy as np
from numba import cuda, float64, int64, uint64

from fastloss._reduction import grad_scale
from fastloss.cuda import _blocks
from fastloss.cuda._arrays import compute_type
from fastloss.cuda._blocks import (LARGE_KERNEL_BLOCK, MAX_THREADS, block_max, block_sum,
                                   cast_like, fit, grid_for, kernel, row_grid, threads_for)
from fastloss.cuda._checks import same_view, shares_memory
from fastloss.cuda._formulas import triplet
from fastloss.cuda._reduction import count_denominator, finish, gradient_scale, per_row_losses
from fastloss.cuda.center import copy_rows_kernel
from fastloss.formulas.triplet import COSINE, COSINE_NORM_EPS, DISTANCES, EUCLIDEAN


# pairwise distances: blocks of PAIR_SIDE x PAIR_SIDE threads, each thread REG x REG entries
# of a PAIR_TILE x PAIR_TILE tile, E staged PAIR_K columns at a time.  The simulator (one
# Python thread per GPU thread) gets 2 x 2 threads of 2 x 2 entries: tiny test batches
# (N <= 14, D <= 9) then span several tiles, partial ones, and several steps along D.
_SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
REG = 2 if _SIM else 4
PAIR_SIDE = 2 if _SIM else 16
PAIR_K = 4 if _SIM else 16  # a multiple of 4 (the unrolled steps)
PAIR_THREADS = PAIR_SIDE * PAIR_SIDE
PAIR_TILE = PAIR_SIDE * REG
PAIR_TILE_PAD = PAIR_TILE + 1  # spreads the transposed stores (a column of As) over the banks
PAIR_ROWS_PER_LOAD = PAIR_THREADS // PAIR_K  # rows of the tile one load of every thread covers
PAIR_LOADS = PAIR_TILE // PAIR_ROWS_PER_LOAD  # loads per thread per side per step


def pair_tiles(N):
    """Blocks of ``pairwise_kernel`` for N embeddings: the tiles on or above the diagonal."""
    t = -(-N // PAIR_TILE)
    return t * (t + 1) // 2


# ================================================================ copies


@kernel()
def copy_flat_kernel(src, dst):
    """dst[i] = src[i] (1-D views, any strides)."""
    i = int64(cuda.grid(1))
    stride = int64(cuda.gridsize(1))
    while i < src.shape[0]:
        dst[i] = src[i]
        i += stride


def _copy(dev, src, dst):
    n = int(np.prod(tuple(src.shape)))
    if n == 0:
        return
    blocks, threads = grid_for(n)
    dev.launch(copy_rows_kernel if src.ndim == 2 else copy_flat_kernel, blocks, threads, src, dst)


def _matrix(dev, v, D, keep):
    """A 2-D ``(n, D)`` view of ``v`` ((n, D), or (D,) for one triplet); a strided 1-D
    view is copied to a contiguous buffer (its native kept alive in ``keep``)."""
    if v.ndim == 2:
        return v
    if v.size == 0 or v.is_c_contiguous():
        return v.reshape((1, D))
    native, tmp = dev.empty((D,), v.dtype)
    keep.append(native)
    _copy(dev, v, tmp)
    return tmp.reshape((1, D))


# ================================================================ triplet_margin_loss


@cuda.jit(device=True)
def _block_sum3(buf, v1, v2, v3):
    """Three block sums at once (float64, ``buf`` of shape (3, MAX_THREADS))."""
    t = cuda.threadIdx.x
    buf[0, t] = v1
    buf[1, t] = v2
    buf[2, t] = v3
    cuda.syncthreads()
    half = cuda.blockDim.x // 2
    while half > 0:
        if t < half:
            buf[0, t] += buf[0, t + half]
            buf[1, t] += buf[1, t + half]
            buf[2, t] += buf[2, t + half]
        cuda.syncthreads()
        half //= 2
    s1 = buf[0, 0]
    s2 = buf[1, 0]
    s3 = buf[2, 0]
    cuda.syncthreads()  # buf is reused by the next reduction
    return s1, s2, s3


@cuda.jit(device=True)
def _load3(xa, xp, xn, row, j, zero):
    """Element j of the row of a, p and n, in the compute type (that of ``zero``)."""
    return cast_like(xa[row, j], zero), cast_like(xp[row, j], zero), cast_like(xn[row, j], zero)


@cuda.jit(device=True)
def _dot_sums(buf, xa, xp, xn, row, zero):
    """The row's a.a, p.p, n.n, a.p, a.n, p.n (the whole block's)."""
    dots = (zero, zero, zero, zero, zero, zero)
    for j in range(cuda.threadIdx.x, xa.shape[1], cuda.blockDim.x):
        a, p, n = _load3(xa, xp, xn, row, j, zero)
        dots = triplet.add_dots(dots, a, p, n)
    s1, s2, s3 = _block_sum3(buf, dots[0], dots[1], dots[2])
    aa = cast_like(s1, zero)
    pp = cast_like(s2, zero)
    nn = cast_like(s3, zero)
    s1, s2, s3 = _block_sum3(buf, dots[3], dots[4], dots[5])
    return aa, pp, nn, cast_like(s1, zero), cast_like(s2, zero), cast_like(s3, zero)


@cuda.jit(device=True)
def _difference_sums(buf, xa, xp, xn, row, shift, swap, zero):
    """The row's sum (a-p+shift)^2, sum (a-n+shift)^2 and, when swap, sum (p-n+shift)^2."""
    s_ap = zero
    s_an = zero
    s_pn = zero
    for j in range(cuda.threadIdx.x, xa.shape[1], cuda.blockDim.x):
        a, p, n = _load3(xa, xp, xn, row, j, zero)
        u, v, w = triplet.differences(a, p, n, shift)
        s_ap += u * u
        s_an += v * v
        if swap:
            s_pn += w * w
    s1, s2, s3 = _block_sum3(buf, s_ap, s_an, s_pn)
    return cast_like(s1, zero), cast_like(s2, zero), cast_like(s3, zero)


@cuda.jit(device=True)
def _difference_rows(xa, xp, xn, row, shift, cp, cn, cs, ga, gp, gn, zero):
    """The row's gradients from the (shifted) differences; each thread its own columns."""
    for j in range(cuda.threadIdx.x, xa.shape[1], cuda.blockDim.x):
        a, p, n = _load3(xa, xp, xn, row, j, zero)
        ga[row, j], gp[row, j], gn[row, j] = triplet.difference_gradients(a, p, n, shift, cp, cn, cs)


@cuda.jit(device=True)
def _linear_rows(xa, xp, xn, row, m, ga, gp, gn, zero):
    """The row's gradients as linear combinations of a, p, n (the symmetric matrix ``m``)."""
    for j in range(cuda.threadIdx.x, xa.shape[1], cuda.blockDim.x):
        a, p, n = _load3(xa, xp, xn, row, j, zero)
        ga[row, j], gp[row, j], gn[row, j] = triplet.linear_gradients(a, p, n, m)


@kernel(LARGE_KERNEL_BLOCK)
def triplet_rows_kernel(xa, xp, xn, dist, swap, margin, eps, scale, ga, gp, gn, losses):
    """Rows ``blockIdx.x, blockIdx.x + gridDim.x, ...`` of ``xa, xp, xn`` (n, D), one
    block each: ``losses[row]`` and, when the gradients ``ga, gp, gn`` are given (else
    None), their rows times ``scale``.
    ``margin``, ``eps`` and ``scale`` carry the compute type."""
    buf = cuda.shared.array((3, MAX_THREADS), float64)
    zero = eps - eps
    one = cast_like(1, zero)
    euclid = dist == EUCLIDEAN
    shift = eps if euclid else zero
    for row in range(int64(cuda.blockIdx.x), xa.shape[0], int64(cuda.gridDim.x)):
        if dist == COSINE:
            d, geometry = triplet.cosine_distances(_dot_sums(buf, xa, xp, xn, row, zero), eps, one)
        else:
            d = triplet.difference_distances(_difference_sums(buf, xa, xp, xn, row, shift, swap, zero),
                                      euclid)
        loss, c, cn, cs = triplet.margin_term(d[0], d[1], d[2], swap, margin, scale, zero, one)
        if cuda.threadIdx.x == 0:
            losses[row] = loss
        if ga is not None:
            if dist == COSINE:
                m = triplet.cosine_coefficients(geometry, c, cn, cs, zero, one)
                _linear_rows(xa, xp, xn, row, m, ga, gp, gn, zero)
            else:
                cp, cn, cs = triplet.difference_coefficients(euclid, d[0], d[1], d[2], c, cn, cs,
                                                          zero, one)
                _difference_rows(xa, xp, xn, row, shift, cp, cn, cs, ga, gp, gn, zero)


def _gradient_views(dev, originals, grad_out, D, keep):
    """``(natives, views, copies)`` of the three gradients: the caller's device ``grad_out``
    (a tuple of three views, or None) where the kernel can write it directly, else fresh
    arrays, to be copied into it afterwards (``copies``: (fresh view, grad_out) pairs)."""
    shape = tuple(originals[0].shape)
    natives, views, copies = [], [], []
    for k in range(3):
        out = None if grad_out is None else grad_out[k]
        direct = out is not None and (out.ndim == 2 or out.size == 0 or out.is_c_contiguous())
        if direct:
            # an input itself (same layout) is fine: each element is read before it is
            # written, by one thread; any other overlap goes through a temporary
            direct = all(same_view(out, x) or not shares_memory(out, x) for x in originals)
        if direct:
            natives.append(out)
            views.append(_matrix(dev, out, D, keep))
        else:
            native, view = dev.empty(shape, originals[0].dtype)
            natives.append(native if out is None else out)
            views.append(view if view.ndim == 2 else view.reshape((1, D)))
            if out is not None:
                copies.append((view, out))
    return natives, views, copies


def triplet_margin_loss(dev, xa, xp, xn, distance, swap, margin, eps, reduction, grad, grad_out,
                        caller_grad_out):
    """``(loss, grads)`` of ``fastloss.triplet_margin_loss`` on checked device views of shape
    ``(n, D)`` or ``(D,)``, as arrays of the call's kind, ``grads`` a tuple of three (None
    without a gradient).  ``grad_out``: None, or the checked tuple of three (device views, or
    host arrays with NumPy inputs, copied into at the end); ``caller_grad_out``: the
    caller's own, returned when given."""
    shape = tuple(xa.shape)
    D = shape[-1] if shape else 0
    dtype = xa.dtype
    keep = []
    inputs = [_matrix(dev, x, D, keep) for x in (xa, xp, xn)]
    n = inputs[0].shape[0]
    T = compute_type(dtype)
    stats = count_denominator(n) if reduction == "mean" else None
    losses = per_row_losses(dev, n, reduction, dtype, T)
    views = (None, None, None)
    copies = ()
    if grad:
        device_out = grad_out if dev.kind != "numpy" else None  # host ones: copied at the end
        natives, views, copies = _gradient_views(dev, (xa, xp, xn), device_out, D, keep)
    if n:
        threads = fit(triplet_rows_kernel, threads_for(D))
        dev.launch(triplet_rows_kernel, row_grid(n, threads), threads, *inputs,
                   DISTANCES[distance], bool(swap), T(margin), T(eps),
                   T(grad_scale(reduction == "mean", n)), *views, losses[1])
    for tmp, out in copies:
        _copy(dev, tmp, out)
    loss = finish(dev, losses, stats, reduction, shape[:-1], dtype)
    if not grad:
        return loss, None
    return loss, tuple(dev.give_grad(g, h) for g, h in zip(natives, caller_grad_out or (None,) * 3))


# ================================================================ batch_triplet_loss


@cuda.jit(device=True)
def _pair_step(As, Bs, k, tx, ty, dot, a, acc):
    """Step k of the staged columns: REG values of each side, REG^2 terms into ``acc``.
    Unsigned indices: no wrap-around of negative ones to compute."""
    k = uint64(k)
    for u in range(REG):
        a[u] = As[k, ty + uint64(u * PAIR_SIDE)]
    for v in range(REG):
        bv = Bs[k, tx + uint64(v * PAIR_SIDE)]
        for u in range(REG):
            if dot:
                acc[u, v] += a[u] * bv
            else:
                w = a[u] - bv
                acc[u, v] += w * w


@kernel(PAIR_THREADS)
def pairwise_kernel(E, dot, zero, M):
    """M[i, j] = e_i . e_j (``dot``) or ||e_i - e_j||^2, in the type of ``zero``, for the
    block tiles ``(bi, bj)`` with bi <= bj (``blockIdx.x`` counts them column by column),
    each entry written at (i, j) and, off the diagonal tiles, at (j, i).  A block of
    PAIR_SIDE x PAIR_SIDE threads owns a PAIR_TILE x PAIR_TILE tile; thread (tx, ty) the
    REG x REG entries (row0 + ty + PAIR_SIDE u, col0 + tx + PAIR_SIDE v), summed in
    registers.  The tile's rows of E are staged by PAIR_K columns, transposed (a column of
    shared memory per embedding), and each step k loads REG values of each side for REG^2
    terms."""
    As = cuda.shared.array((PAIR_K, PAIR_TILE_PAD), M.dtype)
    Bs = cuda.shared.array((PAIR_K, PAIR_TILE_PAD), M.dtype)
    acc = cuda.local.array((REG, REG), M.dtype)
    a = cuda.local.array(REG, M.dtype)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    t = ty * PAIR_SIDE + tx
    ux = uint64(tx)
    uy = uint64(ty)
    # tile column bj holds bj + 1 tiles: blockIdx.x = bj (bj + 1) / 2 + bi
    b = int64(cuda.blockIdx.x)
    bj = int64((math.sqrt(8.0 * b + 1.0) - 1.0) * 0.5)
    while bj * (bj + 1) // 2 > b:
        bj -= 1
    while (bj + 1) * (bj + 2) // 2 <= b:
        bj += 1
    bi = b - bj * (bj + 1) // 2
    row0 = bi * PAIR_TILE
    col0 = bj * PAIR_TILE
    N = E.shape[0]
    D = E.shape[1]
    for u in range(REG):
        for v in range(REG):
            acc[u, v] = zero
    lc = t % PAIR_K  # the column of the staged step this thread loads
    lr = t // PAIR_K  # its first row (then every PAIR_ROWS_PER_LOAD)
    for k0 in range(0, D, PAIR_K):
        c = k0 + lc
        for s in range(PAIR_LOADS):
            r = lr + s * PAIR_ROWS_PER_LOAD
            ra = row0 + r
            rb = col0 + r
            As[lc, r] = cast_like(E[ra, c], zero) if ra < N and c < D else zero
            Bs[lc, r] = cast_like(E[rb, c], zero) if rb < N and c < D else zero
        cuda.syncthreads()
        if dot:
            for k in range(0, PAIR_K, 4):  # 4 steps per iteration: the loop's own cost shared
                _pair_step(As, Bs, k, ux, uy, True, a, acc)
                _pair_step(As, Bs, k + 1, ux, uy, True, a, acc)
                _pair_step(As, Bs, k + 2, ux, uy, True, a, acc)
                _pair_step(As, Bs, k + 3, ux, uy, True, a, acc)
        else:
            for k in range(0, PAIR_K, 4):
                _pair_step(As, Bs, k, ux, uy, False, a, acc)
                _pair_step(As, Bs, k + 1, ux, uy, False, a, acc)
                _pair_step(As, Bs, k + 2, ux, uy, False, a, acc)
                _pair_step(As, Bs, k + 3, ux, uy, False, a, acc)
        cuda.syncthreads()
    for u in range(REG):
        i = row0 + ty + u * PAIR_SIDE
        for v in range(REG):
            j = col0 + tx + v * PAIR_SIDE
            if i < N and j < N:
                M[i, j] = acc[u, v]
                if bi != bj:  # a strided store: N^2 of them against N^2 D terms
                    M[j, i] = acc[u, v]


@kernel()
def inverse_norms_kernel(M, floor, inv):
    """inv[i] = 1 / max(sqrt(M[i, i]), floor) (NaN passes), from the Gram matrix's diagonal."""
    i = int64(cuda.grid(1))
    stride = int64(cuda.gridsize(1))
    one = cast_like(1, floor)
    while i < inv.shape[0]:
        r = math.sqrt(M[i, i])
        inv[i] = one / (floor if r < floor else r)
        i += stride


@cuda.jit(device=True)
def _distance(M, inv, i, j, euclid):
    """d(i, j) from the pairwise matrix: 1 - g inv_i inv_j (cosine: ``inv`` given), else
    the squared distance, or its square root (``euclid``)."""
    v = M[i, j]
    if inv is not None:
        return triplet.cosine_distance(v, inv[i], inv[j], cast_like(1, v))
    if euclid:
        return math.sqrt(v)
    return v


@cuda.jit(device=True)
def _better(k1, i1, k2, i2, largest):
    """Whether (key k1, index i1) beats (k2, i2): -1 (none) loses, a NaN key wins, then the
    larger (smaller) key, then the lower index."""
    if i1 < 0:
        return False
    if i2 < 0:
        return True
    n1 = k1 != k1
    n2 = k2 != k2
    if n1 or n2:
        if n1 and n2:
            return i1 < i2
        return n1
    if largest:
        if k1 > k2:
            return True
    elif k1 < k2:
        return True
    return k1 == k2 and i1 < i2


@cuda.jit(device=True)
def _argbest(buf, key, idx, largest):
    """The index of the block's best (key, index) (see ``_better``), returned to every thread:
    the best key first (``block_max``, which a NaN wins), then the lowest index holding it."""
    v = float64(key) if largest else -float64(key)
    best = block_max(buf, v if idx >= 0 else -math.inf)
    held = idx >= 0 and (v == best or (v != v and best != best))
    lowest = block_max(buf, -float64(idx) if held else -math.inf)
    return int64(-lowest) if lowest != -math.inf else int64(-1)


@cuda.jit(device=True)
def _hard_candidates(M, inv, labels, i, euclid, raw, zero):
    """This thread's (farthest positive, its key, nearest negative, its key) of anchor i
    among its columns (-1: none).  Keys order like the CPU's: the squared distance
    (euclidean, squared) or the cosine distance clamped at 0; with a NaN in the row (``raw``),
    the distances, the first NaN winning."""
    li = labels[i]
    bp = int64(-1)
    bn = int64(-1)
    kp = zero
    kn = zero
    for j in range(cuda.threadIdx.x, M.shape[0], cuda.blockDim.x):
        d = _distance(M, inv, i, j, euclid)
        k = d
        if not raw:
            if inv is not None:
                k = d if d > zero else zero
            else:
                k = M[i, j]
        if labels[j] == li:
            if j != i and _better(k, j, kp, bp, True):
                bp = j
                kp = k
        elif _better(k, j, kn, bn, False):
            bn = j
            kn = k
    return bp, kp, bn, kn


@kernel()
def mine_hard_kernel(M, inv, labels, euclid, margin, soft, S, pick, losses, counts):
    """Hermans et al.: anchor i (one block) against its farthest positive and nearest negative.
    ``S``, ``pick`` are None without a gradient."""
    buf = cuda.shared.array(MAX_THREADS, float64)
    i = int64(cuda.blockIdx.x)
    zero = margin - margin
    nan = 0.0
    for j in range(cuda.threadIdx.x, M.shape[0], cuda.blockDim.x):
        d = _distance(M, inv, i, j, euclid)
        if d != d:
            nan = 1.0
    raw = block_max(buf, nan) > 0
    bp, kp, bn, kn = _hard_candidates(M, inv, labels, i, euclid, raw, zero)
    bp = _argbest(buf, kp, bp, True)
    bn = _argbest(buf, kn, bn, False)
    term = zero
    slope = zero
    if bp >= 0 and bn >= 0:
        d_ap = _distance(M, inv, i, bp, euclid)
        d_an = _distance(M, inv, i, bn, euclid)
        term, slope = triplet.term(d_ap - d_an + margin, soft, zero, cast_like(1, zero))
    else:
        bp = -1
        bn = -1
    if cuda.threadIdx.x == 0:
        losses[i] = term
        counts[i] = 1 if bp >= 0 else 0
    if S is not None:
        for j in range(cuda.threadIdx.x, M.shape[0], cuda.blockDim.x):
            if j == bp:
                S[i, j] = slope
                pick[i, j] = 1
            elif j == bn:
                S[i, j] = -slope
                pick[i, j] = 1
            else:
                S[i, j] = zero
                pick[i, j] = -1


@cuda.jit(device=True)
def _anchor_totals(buf, i, loss, cnt, losses, counts):
    """losses[i], counts[i] = the block's sums of every thread's ``loss`` and ``cnt``."""
    loss = block_sum(buf, loss)
    total = block_sum(buf, float64(cnt))
    if cuda.threadIdx.x == 0:
        losses[i] = loss
        counts[i] = int64(total)


@cuda.jit(device=True)
def _semihard_choice(M, inv, labels, i, j, euclid, zero):
    """Positive j's negative: the nearest with d(i, n) > d(i, j), else the farthest (lowest
    index on ties, the first NaN winning for the farthest); and d(i, j)."""
    li = labels[i]
    d_ap = _distance(M, inv, i, j, euclid)
    best = int64(-1)
    kb = zero
    far = int64(-1)
    kf = zero
    for n in range(M.shape[0]):
        if labels[n] != li:
            d = _distance(M, inv, i, n, euclid)
            if _better(d, n, kf, far, True):
                far = n
                kf = d
            if d == d and d_ap < d and (best < 0 or d < kb):
                best = n
                kb = d
    return (best if best >= 0 else far), d_ap


@cuda.jit(device=True)
def _gather_negatives(labels, i, S, pick, zero):
    """A thread per negative n of anchor i: S[i, n] = -sum of the slopes of the positives
    that chose it, pick[i, n] = n when any did (-1 else)."""
    li = labels[i]
    for n in range(cuda.threadIdx.x, S.shape[0], cuda.blockDim.x):
        if labels[n] != li:
            acc = zero
            hit = int64(-1)
            for p in range(S.shape[0]):
                if labels[p] == li and p != i and pick[i, p] == n:
                    acc -= S[i, p]
                    hit = n
            S[i, n] = acc
            pick[i, n] = hit


@kernel(LARGE_KERNEL_BLOCK)
def mine_semihard_kernel(M, inv, labels, euclid, margin, soft, S, pick, losses, counts):
    """FaceNet: for each positive p of anchor i (one block, a thread per positive), the
    nearest negative with d(i, n) > d(i, p), else the farthest (``_semihard_choice``).
    pick[i, p] = the chosen negative; then, after a barrier, a thread per negative gathers
    the positives that chose it."""
    sbuf = cuda.shared.array(MAX_THREADS, float64)
    i = int64(cuda.blockIdx.x)
    zero = margin - margin
    one = cast_like(1, zero)
    own = 0  # this thread's negatives
    for j in range(cuda.threadIdx.x, M.shape[0], cuda.blockDim.x):
        if labels[j] != labels[i]:
            own += 1
    nneg = block_sum(sbuf, float64(own))
    loss = 0.0
    cnt = 0
    for j in range(cuda.threadIdx.x, M.shape[0], cuda.blockDim.x):
        chosen = int64(-1)
        slope = zero
        if nneg > 0 and labels[j] == labels[i] and j != i:
            chosen, d_ap = _semihard_choice(M, inv, labels, i, j, euclid, zero)
            d_an = _distance(M, inv, i, chosen, euclid)
            term, slope = triplet.term(d_ap - d_an + margin, soft, zero, one)
            loss += float64(term)
            cnt += 1
        if S is not None:
            S[i, j] = slope
            pick[i, j] = chosen
    _anchor_totals(sbuf, i, loss, cnt, losses, counts)
    if S is not None:
        cuda.syncthreads()  # every positive's choice is written (block_sum's last barrier too)
        _gather_negatives(labels, i, S, pick, zero)


@cuda.jit(device=True)
def _all_column(M, inv, labels, i, j, euclid, margin, soft, npos, nneg, zero):
    """Column j of anchor i: (its terms' sum, their slopes' sum, the count of terms that enter
    the mean) as a positive (over every negative), or (0, -sum of the slopes over every
    positive, 0) as a negative (when ``npos``)."""
    li = labels[i]
    one = cast_like(1, zero)
    s = zero
    part = zero
    cnt = 0
    if labels[j] == li:
        if j != i and nneg > 0:
            d_ap = _distance(M, inv, i, j, euclid)
            for n in range(M.shape[0]):
                if labels[n] != li:
                    z = d_ap - _distance(M, inv, i, n, euclid) + margin
                    term, sl = triplet.term(z, soft, zero, one)
                    part += term
                    s += sl
                    if soft or z > zero:
                        cnt += 1
    elif npos > 0:
        d_an = _distance(M, inv, i, j, euclid)
        for p in range(M.shape[0]):
            if labels[p] == li and p != i:
                _, sl = triplet.term(_distance(M, inv, i, p, euclid) - d_an + margin, soft, zero, one)
                s -= sl
    return part, s, cnt


@kernel(LARGE_KERNEL_BLOCK)
def mine_all_kernel(M, inv, labels, euclid, margin, soft, S, losses, counts):
    """Every valid (i, p, n) of anchor i (one block): a thread per column j; a positive's
    S[i, j] = sum over negatives of f'(z), a negative's -sum over positives.  counts[i]:
    the terms with z > 0 (hinge) or every term (soft)."""
    sbuf = cuda.shared.array(MAX_THREADS, float64)
    i = int64(cuda.blockIdx.x)
    zero = margin - margin
    own_pos = 0  # this thread's positives and negatives
    own_neg = 0
    for j in range(cuda.threadIdx.x, M.shape[0], cuda.blockDim.x):
        if labels[j] != labels[i]:
            own_neg += 1
        elif j != i:
            own_pos += 1
    npos = block_sum(sbuf, float64(own_pos))
    nneg = block_sum(sbuf, float64(own_neg))
    loss = 0.0
    cnt = 0
    for j in range(cuda.threadIdx.x, M.shape[0], cuda.blockDim.x):
        part, s, c = _all_column(M, inv, labels, i, j, euclid, margin, soft,
                                 npos if S is not None else 0.0, nneg, zero)
        loss += float64(part)
        cnt += c
        if S is not None:
            S[i, j] = s
    _anchor_totals(sbuf, i, loss, cnt, losses, counts)


@kernel()
def batch_total_kernel(losses, counts, mean, empty_zero, stats, out):
    """One block: out[0] = the sum of the per-anchor losses (float64, fixed order), divided
    by the sum of the counts for ``mean`` (an empty mean: 0 when ``empty_zero``, else NaN);
    stats[0] = that denominator (when given)."""
    buf = cuda.shared.array(MAX_THREADS, float64)
    acc = 0.0
    cnt = 0.0
    i = cuda.threadIdx.x
    while i < losses.shape[0]:
        acc += float64(losses[i])
        cnt += float64(counts[i])
        i += cuda.blockDim.x
    total = block_sum(buf, acc)
    denom = block_sum(buf, cnt)
    if cuda.threadIdx.x == 0:
        if stats is not None:
            stats[0] = denom
        if mean:
            if denom != 0:
                total = total / denom
            else:
                total = 0.0 if empty_zero else math.nan
        out[0] = total


@cuda.jit(device=True)
def _block_prefix(buf, flag):
    """(the count of threads below this one with ``flag``, the block's count): a
    Hillis-Steele scan through ``buf`` (MAX_THREADS float64), the same at any block size."""
    t = cuda.threadIdx.x
    buf[t] = 1.0 if flag else 0.0
    cuda.syncthreads()
    step = 1
    while step < cuda.blockDim.x:
        v = buf[t - step] if t >= step else 0.0
        cuda.syncthreads()
        buf[t] += v
        cuda.syncthreads()
        step *= 2
    below = uint64(buf[t]) - uint64(1 if flag else 0)
    total = uint64(buf[cuda.blockDim.x - 1])
    cuda.syncthreads()  # buf is reused by the next scan
    return below, total


@kernel(LARGE_KERNEL_BLOCK)
def backward_kernel(E, M, inv, euclid, S, pick, partners, W, stats, big, g):
    """One block per embedding row r: g[r] = scale * sum over the selected pairs (r, o)
    (``pick`` None: every o) of c dd(r, o)/de_r, c = S[r, o] + S[o, r].
    Phase 1, a thread per candidate o (blocks of them in order): whether the pair is
    selected (pick[r, o] or pick[o, r] >= 0), its weight W[r, q] (euclidean: c / d, 0 at
    d = 0; squared: 2 c; cosine: c / (n_r n_o)) and, with ``pick``, partners[r, q] = o, at
    q = its rank among the selected: a compact list in increasing o, written by this block
    alone.  Phase 2, a thread per column k, over the list only:
    euclidean, squared: sum W (e_r - e_o); cosine: -sum W e_o + [n_r unclamped] e_r
    (sum W e_r.e_o) / n_r^2, n_r unclamped where inv_r < ``big`` = 1 / 1e-8.
    ``stats`` (the "mean" denominator) or None (scale 1)."""
    buf = cuda.shared.array(MAX_THREADS, float64)
    r = int64(cuda.blockIdx.x)
    N = E.shape[0]
    zero = big - big
    scale = gradient_scale(stats, zero)
    inv_r = zero
    if inv is not None:
        inv_r = inv[r]
    count = uint64(0)
    for base in range(0, N, cuda.blockDim.x):
        o = base + cuda.threadIdx.x
        selected = o < N
        if selected and pick is not None:
            selected = pick[r, o] >= 0 or pick[o, r] >= 0
        w = zero
        if selected:
            c = S[r, o] + S[o, r]
            if inv is not None:
                w = triplet.cosine_weight(c, inv_r, inv[o])
            else:
                w = triplet.difference_weight(euclid, c, math.sqrt(M[r, o]) if euclid else zero,
                                              zero)
        below, total = _block_prefix(buf, selected)
        if selected:
            W[r, count + below] = w
            if partners is not None:
                partners[r, count + below] = o
        count += total
    cuda.syncthreads()  # the list is written (global memory, this block's own row)
    beta = zero
    if inv is not None:
        q = uint64(0)
        while q < count:
            p = q if partners is None else uint64(partners[r, q])
            beta += W[r, q] * M[r, p]
            q += uint64(1)
        beta = triplet.cosine_self_weight(beta, inv_r, big, zero)
    # 4 columns per thread (k, k + nt, k + 2 nt, k + 3 nt) sharing each pair's index and
    # weight, as column views (a pair's row offset computed once); unsigned indices: no
    # wrap-around of negative ones to compute
    nt = uint64(cuda.blockDim.x)
    D = uint64(E.shape[1])
    ur = uint64(r)
    k0 = uint64(cuda.threadIdx.x)
    while k0 < D:
        k1 = k0 + nt
        k2 = k1 + nt
        k3 = k2 + nt
        c0 = E[:, k0]
        c1 = E[:, k1 if k1 < D else k0]  # past the last column: a valid view, unused
        c2 = E[:, k2 if k2 < D else k0]
        c3 = E[:, k3 if k3 < D else k0]
        e0 = cast_like(c0[ur], zero)
        e1 = cast_like(c1[ur], zero)
        e2 = cast_like(c2[ur], zero)
        e3 = cast_like(c3[ur], zero)
        a0 = zero
        a1 = zero
        a2 = zero
        a3 = zero
        q = uint64(0)
        while q < count:
            p = q if partners is None else uint64(partners[ur, q])
            w = W[ur, q]
            if inv is not None:
                a0 -= w * cast_like(c0[p], zero)
                a1 -= w * cast_like(c1[p], zero)
                a2 -= w * cast_like(c2[p], zero)
                a3 -= w * cast_like(c3[p], zero)
            else:
                a0 += w * (e0 - cast_like(c0[p], zero))
                a1 += w * (e1 - cast_like(c1[p], zero))
                a2 += w * (e2 - cast_like(c2[p], zero))
                a3 += w * (e3 - cast_like(c3[p], zero))
            q += uint64(1)
        g[ur, k0] = scale * (a0 + beta * e0)
        if k1 < D:
            g[ur, k1] = scale * (a1 + beta * e1)
        if k2 < D:
            g[ur, k2] = scale * (a2 + beta * e2)
        if k3 < D:
            g[ur, k3] = scale * (a3 + beta * e3)
        k0 = k3 + nt


def _mine(dev, mining, N, M, inv, labels, euclid, margin, soft, S, pick, losses, counts):
    """Launch the mining kernel of ``mining``, one block per anchor."""
    threads = threads_for(N)
    if mining == "hard":
        dev.launch(mine_hard_kernel, N, threads, M, inv, labels, euclid, margin, soft, S, pick,
                   losses, counts)
    elif mining == "semihard":
        dev.launch(mine_semihard_kernel, N, threads, M, inv, labels, euclid, margin, soft, S, pick,
                   losses, counts)
    else:
        dev.launch(mine_all_kernel, N, threads, M, inv, labels, euclid, margin, soft, S, losses,
                   counts)


def batch_triplet_loss(dev, E, labels, mining, distance, margin, soft, reduction, grad, grad_out):
    """``(loss, grad)`` of ``fastloss.batch_triplet_loss`` on checked device views ``E``
    (N, D) and ``labels`` (N,), as arrays of the call's kind; ``grad_out`` is the caller's
    checked one (None, a device array, or a host array with NumPy inputs), returned when
    given."""
    N, D = (int(s) for s in E.shape)
    dtype = E.dtype
    T = compute_type(dtype)
    code = DISTANCES[distance]
    cosine = code == COSINE
    zero = T(0)
    m_native, M = dev.empty((N, N), T)
    inv = None
    if cosine:
        inv_native, inv = dev.empty((N,), T)
    S = pick = None
    if grad:
        s_native, S = dev.empty((N, N), T)
        if mining != "all":
            p_native, pick = dev.empty((N, N), np.int32)
    l_native, losses = dev.empty((N,), dtype if reduction == "none" else np.float64)
    counts = dev.scratch((N,), np.int64, "batch_counts")
    if N:
        dev.launch(pairwise_kernel, pair_tiles(N), (PAIR_SIDE, PAIR_SIDE), E, cosine, zero, M)
        if cosine:
            blocks, threads = grid_for(N)
            dev.launch(inverse_norms_kernel, blocks, threads, M, T(COSINE_NORM_EPS), inv)
        _mine(dev, mining, N, M, inv, labels, code == EUCLIDEAN, T(margin), bool(soft), S, pick,
              losses, counts)
    stats = None
    if reduction == "none":
        loss = dev.give(l_native, (N,))
    else:
        if reduction == "mean":
            stats = dev.scratch((1,), np.float64, "batch_mean_stats")
        out_native, out = dev.empty((1,), dtype)
        dev.launch(batch_total_kernel, 1, _blocks.THREADS, losses, counts, reduction == "mean",
                   mining == "all", stats, out)
        loss = dev.give(out_native, ())
    if not grad:
        return loss, None
    device_out = dev.view(grad_out, "grad_out") if dev.kind != "numpy" else None
    if device_out is not None and not shares_memory(device_out, E):
        g_native, g = device_out, device_out
    else:  # the backward reads every row of E: an aliased gradient goes through a temporary
        g_native, g = dev.empty((N, D), dtype)
    if N and D:
        W = dev.scratch((N, N), T, "batch_weights")
        partners = None if pick is None else dev.scratch((N, N), np.int32, "batch_partners")
        dev.launch(backward_kernel, N, threads_for(D), E, M, inv, code == EUCLIDEAN, S, pick,
                   partners, W, stats, T(1 / COSINE_NORM_EPS), g)
    if device_out is not None and g is not device_out:
        _copy(dev, g, device_out)
    return loss, dev.give_grad(g_native, grad_out)


def ptx_signatures():
    """Argument types of every kernel here, for the compile check (tests/test_cuda_compile.py):
    per dtype, explicit triplets without and with (strided) gradients; the
    distance kernels; each mining mode with and without the gradient's
    selections; the backward with and without cosine norms and picks (with a pick, the
    pair list's partners)."""
    from numba import types
    i64, f64, b1, i32 = types.int64, types.float64, types.boolean, types.int32
    sigs = []
    for X, T in ((types.float16, types.float32), (types.float32, types.float32),
                 (types.float64, types.float64)):
        sigs.append((copy_flat_kernel, (X[::1], X[:])))
        sigs.append((triplet_rows_kernel, (X[:, :], X[:, :], X[:, ::1], i64, b1, T, T, T,
                                           types.none, types.none, types.none, X[::1])))
        sigs.append((triplet_rows_kernel, (X[:, :], X[:, ::1], X[:, :], i64, b1, T, T, T,
                                           X[:, :], X[:, ::1], X[:, :], T[::1])))
        sigs.append((pairwise_kernel, (X[:, :], b1, T, T[:, ::1])))
        sigs.append((inverse_norms_kernel, (T[:, ::1], T, T[::1])))
        M, S, P, C = T[:, ::1], T[:, ::1], i32[:, ::1], i64[::1]
        for inv, labels, losses, grad in ((types.none, i64[:], f64[::1], True),
                                          (T[::1], types.uint8[:], X[::1], False)):
            s_, p_ = (S, P) if grad else (types.none, types.none)
            for mine in (mine_hard_kernel, mine_semihard_kernel):
                sigs.append((mine, (M, inv, labels, b1, T, b1, s_, p_, losses, C)))
            sigs.append((mine_all_kernel, (M, inv, labels, b1, T, b1, s_, losses, C)))
        for inv, pick, part, stats, g in ((types.none, P, P, f64[::1], X[:, ::1]),
                                          (T[::1], types.none, types.none, types.none, X[:, :]),
                                          (T[::1], P, P, f64[::1], X[:, ::1])):
            sigs.append((backward_kernel, (X[:, :], M, inv, b1, S, pick, part, S, stats, T, g)))
        sigs.append((batch_total_kernel, (f64[::1], C, b1, b1, f64[::1], X[::1])))
        sigs.append((batch_total_kernel, (X[::1], C, b1, b1, types.none, X[::1])))
    return sigs
