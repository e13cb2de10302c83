r"""Fused triplet loss kernels (CPU).

``triplet_margin_rows``: one row per triplet ``(a, p, n)``::

    z = margin + d(a, p) - d(a, n)          (swap: d(a, n) <- min(d(a, n), d(p, n)))
    L = max(0, z),  dL/dz = [z >= 0]        (torch's clamp_min passes the gradient at 0)

with ``d`` one of::

    euclidean          ||x - y + eps||_2     dd/dx = (x - y + eps) / d   (0 where d == 0)
    squared_euclidean  ||x - y||_2^2         dd/dx = 2 (x - y)
    cosine             1 - x.y / (X Y)       dd/dx = -(y / (X Y) - [|x| > eps] cos x / X^2)
                       X = max(|x|, eps), Y = max(|y|, eps)

and ``dd/dy`` by symmetry.  A row is read once for its sums (the three squared
differences, or the six dot products for cosine), then once more, from L1, by the
pass that writes its three gradient rows; each element is read before the same
element of a gradient row is written, so a gradient may alias its input.

``batch_mine`` / ``batch_backward``: online mining in one batch (see
``fastloss.triplet.batch_triplet_loss``).  The pairwise distances come from a
Gram matrix ``G = E E^T`` computed by BLAS; mining runs over anchors (in parallel
when the work is large, see ``BATCH_PARALLEL_MIN_WORK``), each thread owning its
anchors' outputs.  It emits *records*: anchor ``a``
owns the slots ``rec_off[a]:rec_off[a+1]`` of ``(rec_j, rec_c)``, each meaning
"the loss contains ``rec_c * d(a, rec_j)``" (before the reduction's scale);
``"all"`` instead accumulates a dense coefficient matrix ``S`` (one row per
anchor).  The backward runs over rows ``r`` (in parallel likewise): row ``r`` gathers the
records it is an endpoint of (its own, and the ``incoming`` ones, sorted by
endpoint with a stable counting sort) and writes only its own gradient row:
race-free and deterministic without atomics.

``batch_hard_blocked``: hard mining (the records of ``batch_mine``) from the upper
triangle of the Gram matrix, by column blocks mined while in cache; see its section.
"""
import math

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.core.extending import intrinsic, overload

from fastloss.cpu._math import load, store, vexp_nonpos, vlog1p
from fastloss.cpu._rows import (KERNEL_OPTIONS, ROW_BLOCK_ELEMENTS, jit, loss_total, reduction_jit,
                                use_threads)
from fastloss.cpu._threads import launch

EUCLIDEAN, SQUARED, COSINE = 0, 1, 2
DISTANCES = {"euclidean": EUCLIDEAN, "squared_euclidean": SQUARED, "cosine": COSINE}
HARD, SEMIHARD, ALL = 0, 1, 2
MININGS = {"hard": HARD, "semihard": SEMIHARD, "all": ALL}
COSINE_NORM_EPS = 1e-8  # batch cosine: norms clamped as torch.cosine_similarity's default eps

# batch_triplet_loss: its kernels take the parallel path from this much estimated work (about
# one unit per simple operation).  Their input comes from OpenBLAS's gemm, whose worker threads
# keep spinning for a while after it, as libgomp's workers do after a parallel region (slowing
# the next gemm): on 2 cores a parallel pass costs more than it saves until the work is large.
# Measured, whole calls, D=128: hard at N=2048 21-23 ms with parallel mining vs 15-16 ms serial
# (still 234 vs 216 ms at N=8192); semihard at N=2048 99 vs 122 ms; "all" at N=512 50 vs 41 ms.
# Work estimates: N^2 (hard), 8 N^2 (semihard), N^3 / 8 ("all"); records x D for the backward.
BATCH_PARALLEL_MIN_WORK = 1 << 25

# ================================================================ triplet_margin_loss


@reduction_jit
def _diff_sums(a, p, n, eps, swap, zero):
    """sum (a-p+eps)^2, sum (a-n+eps)^2 and, when swap, sum (p-n+eps)^2."""
    s_ap = zero
    s_an = zero
    s_pn = zero
    if swap:
        for j in range(a.shape[0]):
            aj = load(a, j)
            pj = load(p, j)
            nj = load(n, j)
            u = aj - pj + eps
            v = aj - nj + eps
            w = pj - nj + eps
            s_ap += u * u
            s_an += v * v
            s_pn += w * w
    else:
        for j in range(a.shape[0]):
            aj = load(a, j)
            u = aj - load(p, j) + eps
            v = aj - load(n, j) + eps
            s_ap += u * u
            s_an += v * v
    return s_ap, s_an, s_pn


@reduction_jit
def _dot_sums(a, p, n, zero):
    """a.a, p.p, n.n, a.p, a.n, p.n."""
    aa = zero
    pp = zero
    nn = zero
    ap = zero
    an = zero
    pn = zero
    for j in range(a.shape[0]):
        aj = load(a, j)
        pj = load(p, j)
        nj = load(n, j)
        aa += aj * aj
        pp += pj * pj
        nn += nj * nj
        ap += aj * pj
        an += aj * nj
        pn += pj * nj
    return aa, pp, nn, ap, an, pn


@jit
def _grad_diff(a, p, n, eps, cp, cn, cs, ga, gp, gn):
    """Gradient rows of cp*d(a,p) - cn*d(a,n) - cs*d(p,n) for (shifted) differences:
    u = a-p+eps, v = a-n+eps, w = p-n+eps; ga = cp u - cn v, gp = -cp u - cs w, gn = cn v + cs w."""
    for j in range(a.shape[0]):
        aj = load(a, j)
        pj = load(p, j)
        nj = load(n, j)
        u = aj - pj + eps
        v = aj - nj + eps
        w = pj - nj + eps
        store(ga, j, cp * u - cn * v)
        store(gp, j, -(cp * u) - cs * w)
        store(gn, j, cn * v + cs * w)


@jit
def _grad_lin(a, p, n, m, ga, gp, gn):
    """Gradient rows that are linear combinations of a, p, n: g_k = m[k,0] a + m[k,1] p + m[k,2] n."""
    for j in range(a.shape[0]):
        aj = load(a, j)
        pj = load(p, j)
        nj = load(n, j)
        store(ga, j, m[0, 0] * aj + m[0, 1] * pj + m[0, 2] * nj)
        store(gp, j, m[1, 0] * aj + m[1, 1] * pj + m[1, 2] * nj)
        store(gn, j, m[2, 0] * aj + m[2, 1] * pj + m[2, 2] * nj)


@jit
def _triplet_rows(first, last, xa, xp, xn, dist, swap, margin, eps, scale, ga, gp, gn, grad, losses):
    T = losses.dtype.type
    zero = T(0.0)
    one = T(1.0)
    half = T(0.5)
    two = T(2.0)
    m = np.zeros((3, 3), T)
    for i in range(first, last):
        a = xa[i]
        p = xp[i]
        n = xn[i]
        if dist == COSINE:
            aa, pp, nn, ap, an, pn = _dot_sums(a, p, n, zero)
            na = T(math.sqrt(aa))
            np_ = T(math.sqrt(pp))
            nn_ = T(math.sqrt(nn))
            A = na if na > eps else eps
            P = np_ if np_ > eps else eps
            N = nn_ if nn_ > eps else eps
            cos_ap = ap / (A * P)
            cos_an = an / (A * N)
            cos_pn = pn / (P * N)
            d_ap = one - cos_ap
            d_an = one - cos_an
            d_pn = one - cos_pn
        else:
            shift = eps if dist == EUCLIDEAN else zero
            s_ap, s_an, s_pn = _diff_sums(a, p, n, shift, swap, zero)
            if dist == EUCLIDEAN:
                d_ap = T(math.sqrt(s_ap))
                d_an = T(math.sqrt(s_an))
                d_pn = T(math.sqrt(s_pn))
            else:
                d_ap, d_an, d_pn = s_ap, s_an, s_pn
        # share of dL/d(d_neg) that goes to d(a,n) and to d(p,n): torch.minimum's backward
        # (a tie splits it half/half; NaN on either side gives both the whole)
        f_an = one
        f_pn = zero
        d_neg = d_an
        if swap:
            if d_an == d_pn:
                f_an = half
                f_pn = half
            elif d_pn < d_an:
                f_an = zero
                f_pn = one
                d_neg = d_pn
            elif not d_an < d_pn:  # a NaN: it propagates to the loss
                f_pn = one
                d_neg = d_an + d_pn
        z = (margin + d_ap) - d_neg
        losses[i] = zero if z < zero else z  # NaN passes
        if grad:
            c = scale if z >= zero else zero
            cn = c * f_an
            cs = c * f_pn
            if dist == EUCLIDEAN:
                # norm's backward: (x - y + eps) / d, 0 where d == 0 (a NaN d spreads over
                # the row, as in torch)
                _grad_diff(a, p, n, eps,
                           c / d_ap if d_ap != zero else zero,
                           cn / d_an if d_an != zero else zero,
                           cs / d_pn if d_pn != zero else zero,
                           ga[i], gp[i], gn[i])
            elif dist == SQUARED:
                _grad_diff(a, p, n, zero, two * c, two * cn, two * cs, ga[i], gp[i], gn[i])
            else:
                kA = one / (A * A) if na > eps else zero
                kP = one / (P * P) if np_ > eps else zero
                kN = one / (N * N) if nn_ > eps else zero
                AP = one / (A * P)
                AN = one / (A * N)
                PN = one / (P * N)
                m[0, 0] = kA * (c * cos_ap - cn * cos_an)
                m[0, 1] = -c * AP
                m[0, 2] = cn * AN
                m[1, 0] = -c * AP
                m[1, 1] = kP * (c * cos_ap - cs * cos_pn)
                m[1, 2] = cs * PN
                m[2, 0] = cn * AN
                m[2, 1] = cs * PN
                m[2, 2] = -kN * (cn * cos_an + cs * cos_pn)
                _grad_lin(a, p, n, m, ga[i], gp[i], gn[i])


@njit(parallel=True, **KERNEL_OPTIONS)
def _triplet_parallel(xa, xp, xn, dist, swap, params, ga, gp, gn, grad, losses):
    T = losses.dtype.type
    margin, eps, scale = T(params[0]), T(params[1]), T(params[2])
    rows, D = xa.shape
    block = max(1, ROW_BLOCK_ELEMENTS // max(D, 1))
    for b in prange((rows + block - 1) // block):
        _triplet_rows(b * block, min(rows, (b + 1) * block), xa, xp, xn, dist, swap, margin, eps,
                      scale, ga, gp, gn, grad, losses)
    return loss_total(losses)


@jit
def _triplet_serial(xa, xp, xn, dist, swap, params, ga, gp, gn, grad, losses):
    T = losses.dtype.type
    margin, eps, scale = T(params[0]), T(params[1]), T(params[2])
    _triplet_rows(0, xa.shape[0], xa, xp, xn, dist, swap, margin, eps, scale, ga, gp, gn, grad,
                  losses)
    return loss_total(losses)


def triplet_margin_rows(xa, xp, xn, distance, swap, margin, eps, scale, ga, gp, gn, grad, losses):
    """Fill ``losses`` (N,) and, when ``grad``, the gradient rows ``ga, gp, gn`` of the
    kernel-form rows ``xa, xp, xn`` (N, D); returns the float64 sum of the losses."""
    params = np.array([margin, eps, scale], np.float64)
    return launch(_triplet_parallel, _triplet_serial, use_threads(xa),
                  xa, xp, xn, DISTANCES[distance], bool(swap), params, ga, gp, gn, grad, losses)


# ================================================================ batch_triplet_loss


@jit
def _matrix_distance(g, sq_i, sq_j, inv_i, inv_j, dist, one):
    """d(i, j) from the Gram entry g = e_i.e_j, the squared norms and the inverse clamped norms
    (``one``: 1 in the compute type)."""
    if dist == COSINE:
        return one - g * inv_i * inv_j
    d2 = sq_i + sq_j - (g + g)
    d2 = (one - one) if d2 < 0 else d2  # clamp at 0 (NaN passes)
    if dist == EUCLIDEAN:
        return math.sqrt(d2)
    return d2


@jit
def _distance_row(Gi, sq, inv, i, dist, out):
    """out[j] = d(i, j) for every j, from row i of the Gram matrix."""
    zero = out.dtype.type(0.0)
    one = out.dtype.type(1.0)
    sq_i = sq[i]
    inv_i = inv[i]
    if dist == COSINE:
        for j in range(Gi.shape[0]):
            out[j] = one - Gi[j] * inv_i * inv[j]
    else:
        for j in range(Gi.shape[0]):
            d2 = sq_i + sq[j] - (Gi[j] + Gi[j])
            out[j] = zero if d2 < zero else d2  # clamp at 0 (NaN passes)
        if dist == EUCLIDEAN:
            for j in range(out.shape[0]):
                out[j] = math.sqrt(out[j])


@jit
def _term(z, soft, one):
    """(f(z), f'(z)): max(0, z) with the gradient passing where z > 0, or softplus and sigmoid
    (stable: max(z, 0) + log1p(exp(-|z|)))."""
    zero = one - one
    if soft:
        e = vexp_nonpos(-abs(z))
        pos = z if z > zero else zero
        return pos + vlog1p(e), (one / (one + e) if z >= zero else e / (one + e))
    return (zero if z < zero else z), (one if z > zero else zero)


@intrinsic
def _bits(typingctx, x):
    """The bit pattern of a float32 (float64) as int32 (int64).  For floats >= +0 it orders
    like the floats, and NumPy-style integer max/min reductions vectorize where float ones
    do not (Numba's selects carry no fast-math flags)."""
    if x == types.float32:
        sig, int_type = types.int32(types.float32), ir.IntType(32)
    elif x == types.float64:
        sig, int_type = types.int64(types.float64), ir.IntType(64)
    else:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], int_type)

    return sig, codegen


@intrinsic
def _magnitude_bits(typingctx, x):
    """_bits(abs(x)): the bit pattern with the sign bit cleared (NaN of either sign above +inf)."""
    if x == types.float32:
        sig, int_type, mask = types.int32(types.float32), ir.IntType(32), 0x7FFFFFFF
    elif x == types.float64:
        sig, int_type, mask = types.int64(types.float64), ir.IntType(64), 0x7FFFFFFFFFFFFFFF
    else:
        return None

    def codegen(context, builder, sig, args):
        return builder.and_(builder.bitcast(args[0], int_type), ir.Constant(int_type, mask))

    return sig, codegen


def _int_view(a):
    """``a`` (float32 / float64) viewed as int32 / int64 (Numba only)."""
    raise NotImplementedError


@overload(_int_view)
def _int_view_overload(a):
    if a.dtype == types.float32:
        return lambda a: a.view(np.int32)
    if a.dtype == types.float64:
        return lambda a: a.view(np.int64)


HARD_CHUNK = 128  # hard mining: extremes per chunk (vectorized), then a search in the winning chunk


@jit
def _hard_keys(Gi, sq, inv, i, dist, cls, ik, hi, lo):
    """Keys of anchor i's row, ordered like d(i, j): the clamped squared distance (euclidean,
    squared) or the clamped cosine distance, as integer bit patterns in ``ik``.  Per chunk c of
    HARD_CHUNK columns: hi[c] = largest key of the anchor's class (the anchor included: its key
    0 is the least), lo[c] = smallest key of the other classes (sentinels when none).
    Returns whether a distance is NaN (the caller then takes the NaN-aware path): a NaN's key
    is above +inf's, found by one more integer max (cheaper than counting d != d)."""
    zero = Gi.dtype.type(0.0)
    one = Gi.dtype.type(1.0)
    lowest = _bits(-zero)
    highest = _bits(Gi.dtype.type(np.nan))
    inf_key = _bits(Gi.dtype.type(np.inf))
    ci = cls[i]
    sq_i = sq[i]
    inv_i = inv[i]
    top = lowest
    for c in range(hi.shape[0]):
        start = c * HARD_CHUNK
        g = Gi[start:start + HARD_CHUNK]
        s = sq[start:start + HARD_CHUNK]
        w = inv[start:start + HARD_CHUNK]
        cc = cls[start:start + HARD_CHUNK]
        kk = ik[start:start + HARD_CHUNK]
        h = lowest
        m = highest
        if dist == COSINE:
            for t in range(g.shape[0]):
                d = one - g[t] * inv_i * w[t]
                b = _magnitude_bits(zero if d < zero else d)  # clamp at 0 (NaN passes)
                kk[t] = b
                same = cc[t] == ci
                h = max(h, b if same else lowest)
                m = min(m, highest if same else b)
                top = max(top, b)
        else:
            for t in range(g.shape[0]):
                d = sq_i + s[t] - (g[t] + g[t])
                b = _magnitude_bits(zero if d < zero else d)
                kk[t] = b
                same = cc[t] == ci
                h = max(h, b if same else lowest)
                m = min(m, highest if same else b)
                top = max(top, b)
        hi[c] = h
        lo[c] = m
    return top > inf_key


@jit
def _hard_pick(i, cls, ik, hi, lo):
    """(farthest positive, nearest negative) of anchor i from its keys, -1 when none; lowest
    index on ties: the first chunk holding the extreme, then the first column in it."""
    ci = cls[i]
    ch = 0
    cl = 0
    for c in range(1, hi.shape[0]):
        if hi[c] > hi[ch]:
            ch = c
        if lo[c] < lo[cl]:
            cl = c
    bp = -1
    bn = -1
    N = ik.shape[0]
    for j in range(ch * HARD_CHUNK, min(N, (ch + 1) * HARD_CHUNK)):
        if cls[j] == ci and ik[j] == hi[ch]:
            if j != i:
                bp = j
                break
    if bp < 0:  # the extreme was the anchor itself (every positive at distance 0), or none
        for j in range(N):
            if cls[j] == ci and j != i and (bp < 0 or ik[j] > ik[bp]):
                bp = j
    for j in range(cl * HARD_CHUNK, min(N, (cl + 1) * HARD_CHUNK)):
        if cls[j] != ci and ik[j] == lo[cl]:
            bn = j
            break
    return bp, bn


@jit
def _hard_pick_nan(i, Gi, sq, inv, cls, dist):
    """_hard_pick for a row with NaN distances: the first NaN wins (it propagates to the loss)."""
    one = Gi.dtype.type(1.0)
    ci = cls[i]
    bp = -1
    bn = -1
    kp = one
    kn = one
    for j in range(Gi.shape[0]):
        k = _matrix_distance(Gi[j], sq[i], sq[j], inv[i], inv[j], dist, one)
        if cls[j] == ci:
            if j != i and (bp < 0 or k > kp or (k != k and kp == kp)):
                bp = j
                kp = k
        elif bn < 0 or k < kn or (k != k and kn == kn):
            bn = j
            kn = k
    return bp, bn


@jit
def _hard_anchor(i, Gi, sq, inv, cls, dist, margin, soft, ik, hi, lo, rec_j, rec_c):
    """Hermans et al.: the farthest positive and the nearest negative of anchor i (lowest index
    on ties, NaN wins), found on keys that order like the distance; two records at 2i, 2i+1."""
    one = Gi.dtype.type(1.0)
    if not _hard_keys(Gi, sq, inv, i, dist, cls, ik, hi, lo):
        bp, bn = _hard_pick(i, cls, ik, hi, lo)
    else:
        bp, bn = _hard_pick_nan(i, Gi, sq, inv, cls, dist)
    rec_j[2 * i] = -1
    rec_j[2 * i + 1] = -1
    if bp < 0 or bn < 0:
        return 0.0
    d_ap = _matrix_distance(Gi[bp], sq[i], sq[bp], inv[i], inv[bp], dist, one)
    d_an = _matrix_distance(Gi[bn], sq[i], sq[bn], inv[i], inv[bn], dist, one)
    loss, slope = _term(d_ap - d_an + margin, soft, one)
    rec_j[2 * i] = bp
    rec_c[2 * i] = slope
    rec_j[2 * i + 1] = bn
    rec_c[2 * i + 1] = -slope
    return loss


# ---------------------------------------------------------------- hard mining, blocked
#
# batch_triplet_loss(mining="hard") without the full Gram matrix.  The columns are cut into
# HARD_GEMM_BLOCKS gemm blocks [J0, J1), each computed as G[:J1, J0:J1] (one gemm: the block's
# columns against the rows before J1): together the upper triangle and the diagonal blocks,
# 5/8 of the product for 4 blocks.  Every pair i != j lies in exactly one gemm block, as G[i, j] with
# i < J0 or inside the diagonal block (there in both orders).  Each gemm block is mined in
# column slices of HARD_BLOCK columns, each slice while it is in cache, from both sides, its
# distance keys computed once:
#
# * as columns: anchor j of the slice against every row i < J1, i != j, rows in increasing
#   order: the running (key, index) of its farthest positive and of its nearest negative,
#   replaced on a strictly better key, so that ties keep the lowest index (elementwise over
#   the slice's columns: vectorized, two rows at a time);
# * as rows: anchor i < J0 against the slice's columns, all above its candidates so far: the
#   row's extremes (vectorized integer max / min), and when one strictly beats the anchor's
#   running one, its first column in the row.
#
# An anchor's candidates thus arrive in increasing index order (every row below J1 in its own
# gemm block, then the columns of each later slice), and strict comparisons keep the lowest
# index on ties, as _hard_pick does.  Keys are the bits of the distance clamped at 0, as in
# _hard_keys.  Distances come from d = (u_i + u_j) - g (w_i w_j): u = |e|^2, w_i w_j = 2 (the
# squared distance, exactly sq_i + sq_j - 2 g), or u = 1/2, w = the inverse clamped norm (the
# cosine distance), by the same operations for (i, j) and (j, i).  The squared norms are the
# gemm's diagonal, read from the block that holds it (a block needs those of the rows below
# J1 only).  A NaN distance anywhere sends the call back to the full-Gram path (the wrapper
# does it), whose NaN rule (the first NaN wins) needs every NaN's position.
#
# Few gemm calls: OpenBLAS's threads meet at the end of each, and on a loaded machine each
# meeting can wait for a scheduler slice.  Measured at 2048 x 128 on 2 cores, whole calls:
# idle, 16 gemm blocks ~7.7 ms, 4 ~8.6-9 ms, the full-Gram path ~14.5 ms (one gemm ~8.5 ms);
# with both cores also busy with other work, 16 blocks 64-125 ms, 8 ~21-64 ms, 4 ~16-32 ms,
# the full-Gram path ~30-35 ms.  A slice's column state stays in L1; slices much narrower than
# their gemm block read short runs of far-apart rows, which the prefetcher follows badly
# (128-column slices of 1024-column blocks: ~14 ms at 2048 x 128).

HARD_BLOCK = 256  # columns per mining slice, at most HARD_BLOCK_MAX
HARD_GEMM_BLOCKS = 4  # gemm blocks per batch, of equal widths (multiples of 16 columns)
# A slice's column state lives in one integer buffer at these constant offsets, so that the
# compiler sees its parts apart (no run-time alias checks between them); the stride is not a
# multiple of 1024 elements (no 4K aliasing between the parts).
HARD_BLOCK_MAX = 520
_PK, _PI, _NK, _NI, _K0, _K1 = (k * HARD_BLOCK_MAX for k in range(6))
# rows of the per-row float table F and of the integer table K of batch_hard_blocked
_SQ, _INV, _U, _WR, _WC, _PG, _NG = range(7)
_BP, _BI, _BN, _BNI = range(4)


@jit
def _gram_distance(g, u_i, u_j, w_i, w_j):
    """(u_i + u_j) - g (w_i w_j): the squared or cosine distance from the Gram entry g (see
    above), by the same operations for (i, j) and (j, i)."""
    return (u_i + u_j) - g * (w_i * w_j)


@jit
def _distance_key(d, zero):
    return _magnitude_bits(zero if d < zero else d)  # clamp at 0 (NaN passes)


@jit
def _hard_rows(blk, i0, i1, c0, c1, r0, r1, U, Wr, cls, ub, wb, cb, st):
    """Rows i0 <= i1 (i1 == i0 for one row) of the slice blk[:, c0:c1]: updates the column
    anchors' running extremes in ``st`` with the candidates i0 then i1, skipping the diagonal
    entries t == r0 and t == r1; the rows' keys go to st[_K0:], st[_K1:].  Returns (largest
    key of a positive of i0, of i1, smallest key of a negative of i0, of i1, largest key),
    the sentinels where there are none."""
    T = blk.dtype.type
    zero = T(0.0)
    lowest = _bits(-zero)
    highest = _bits(T(np.nan))
    I = st.dtype.type
    a0 = I(i0)
    a1 = I(i1)
    x0 = blk[i0, c0:c1]
    x1 = blk[i1, c0:c1]
    u0 = U[i0]
    u1 = U[i1]
    w0 = Wr[i0]
    w1 = Wr[i1]
    c_0 = cls[i0]
    c_1 = cls[i1]
    h0 = lowest
    h1 = lowest
    m0 = highest
    m1 = highest
    top = lowest
    for t in range(ub.shape[0]):
        uj = ub[t]
        wj = wb[t]
        cj = cb[t]
        k0 = _distance_key(_gram_distance(x0[t], u0, uj, w0, wj), zero)
        k1 = _distance_key(_gram_distance(x1[t], u1, uj, w1, wj), zero)
        st[_K0 + t] = k0
        st[_K1 + t] = k1
        s0 = cj == c_0
        s1 = cj == c_1
        p0 = k0 if s0 & (t != r0) else lowest
        p1 = k1 if s1 & (t != r1) else lowest
        n0 = highest if s0 else k0
        n1 = highest if s1 else k1
        h0 = max(h0, p0)
        h1 = max(h1, p1)
        m0 = min(m0, n0)
        m1 = min(m1, n1)
        top = max(top, max(k0, k1))
        # the column anchors: candidate i0, then i1, each taken on a strictly better key only
        pk = st[_PK + t]
        pi = st[_PI + t]
        pi = a0 if p0 > pk else pi
        pk = max(pk, p0)
        pi = a1 if p1 > pk else pi
        pk = max(pk, p1)
        st[_PK + t] = pk
        st[_PI + t] = pi
        nk = st[_NK + t]
        ni = st[_NI + t]
        ni = a0 if n0 < nk else ni
        nk = min(nk, n0)
        ni = a1 if n1 < nk else ni
        nk = min(nk, n1)
        st[_NK + t] = nk
        st[_NI + t] = ni
    return h0, h1, m0, m1, top


@jit
def _hard_block(blk, J0, B, dist, cls, st, K, F):
    """Mine gemm block ``blk`` = G[:J1, J0:J1] in slices of B columns (see above): fills the
    norms of rows J0:J1 from its diagonal (F[_SQ], F[_INV], F[_U], F[_WR], F[_WC]), the
    running extremes (keys K[_BP], K[_BN], indices K[_BI], K[_BNI], Gram entries F[_PG],
    F[_NG]) of the anchors J0:J1 (as columns: complete below J1) and of the anchors below J0
    (as rows).  Returns the largest key (above +inf's when a distance is NaN)."""
    T = blk.dtype.type
    zero = T(0.0)
    one = T(1.0)
    lowest = _bits(-zero)
    highest = _bits(T(np.nan))
    eps = T(COSINE_NORM_EPS)
    J1, width = blk.shape
    for t in range(width):
        j = J0 + t
        s = blk[j, t]
        n = T(math.sqrt(s))
        v = one / (eps if n < eps else n)  # np.maximum's clamp: NaN passes
        F[_SQ, j] = s
        F[_INV, j] = v
        if dist == COSINE:
            F[_U, j] = T(0.5)
            F[_WR, j] = v
            F[_WC, j] = v
        else:
            F[_U, j] = s
            F[_WR, j] = one
            F[_WC, j] = T(2.0)
    U = F[_U]
    Wr = F[_WR]
    bp = K[_BP]
    bi = K[_BI]
    bn = K[_BN]
    bni = K[_BNI]
    pg = F[_PG]
    ng = F[_NG]
    top = lowest
    for c0 in range(0, width, B):
        c1 = min(width, c0 + B)
        b = c1 - c0
        S0 = J0 + c0  # the slice's first column
        ub = U[S0:S0 + b]
        wb = F[_WC, S0:S0 + b]
        cb = cls[S0:S0 + b]
        for t in range(b):
            st[_PK + t] = lowest
            st[_PI + t] = -1
            st[_NK + t] = highest
            st[_NI + t] = -1
        for i in range(0, J1, 2):
            i1 = i + 1 if i + 1 < J1 else i
            h0, h1, m0, m1, tp = _hard_rows(blk, i, i1, c0, c1, i - S0, i1 - S0, U, Wr, cls, ub,
                                            wb, cb, st)
            top = max(top, tp)
            # anchors below J0 as rows: the slice's columns, all above their candidates so far
            for q in range(2 if i1 > i else 1):
                r = i + q
                if r >= J0:
                    break
                h = h0 if q == 0 else h1
                m = m0 if q == 0 else m1
                keys = _K0 if q == 0 else _K1
                cr = cls[r]
                if h > bp[r]:
                    for t in range(b):
                        if cb[t] == cr and st[keys + t] == h:
                            bp[r] = h
                            bi[r] = S0 + t
                            pg[r] = blk[r, c0 + t]
                            break
                if m < bn[r]:
                    for t in range(b):
                        if cb[t] != cr and st[keys + t] == m:
                            bn[r] = m
                            bni[r] = S0 + t
                            ng[r] = blk[r, c0 + t]
                            break
        for t in range(b):  # the slice's anchors, with their Gram entries while at hand
            j = S0 + t
            p = st[_PI + t]
            n = st[_NI + t]
            bp[j] = st[_PK + t]
            bi[j] = p
            bn[j] = st[_NK + t]
            bni[j] = n
            pg[j] = blk[p, c0 + t] if p >= 0 else zero
            ng[j] = blk[n, c0 + t] if n >= 0 else zero
    return top


@jit
def _hard_distance(g, u_i, u_j, w_i, w_j, dist, zero):
    """d(i, j) from the Gram entry, as the blocks' keys order it: the clamped squared distance
    (its root for euclidean) or the (unclamped) cosine distance."""
    d = _gram_distance(g, u_i, u_j, w_i, w_j)
    if dist == COSINE:
        return d
    d = zero if d < zero else d
    if dist == EUCLIDEAN:
        return math.sqrt(d)
    return d


@jit
def _hard_finish(dist, margin, soft, K, F, rec_j, rec_c, losses):
    """Per anchor, from its farthest positive and nearest negative: the loss term and the two
    records (as _hard_anchor).  Returns the float64 sum of the losses."""
    T = F.dtype.type
    zero = T(0.0)
    one = T(1.0)
    margin = T(margin)
    U = F[_U]
    Wr = F[_WR]
    Wc = F[_WC]
    for a in range(F.shape[1]):
        p = K[_BI, a]
        n = K[_BNI, a]
        rec_j[2 * a] = -1
        rec_j[2 * a + 1] = -1
        losses[a] = 0.0
        if p < 0 or n < 0:
            continue
        d_ap = _hard_distance(F[_PG, a], U[a], U[p], Wr[a], Wc[p], dist, zero)
        d_an = _hard_distance(F[_NG, a], U[a], U[n], Wr[a], Wc[n], dist, zero)
        loss, slope = _term(d_ap - d_an + margin, soft, one)
        losses[a] = loss
        rec_j[2 * a] = p
        rec_c[2 * a] = slope
        rec_j[2 * a + 1] = n
        rec_c[2 * a + 1] = -slope
    return loss_total(losses)


def batch_hard_blocked(E, cls, distance, margin, soft, rec_j, rec_c, losses):
    """Hard mining of the rows ``E`` (N, D) (compute type, C-contiguous), class ids ``cls``
    (int32), by blocks of the Gram matrix's upper triangle (see above): the per-anchor losses
    (float64) into ``losses``, two records per anchor into ``rec_j, rec_c`` (as batch_mine).
    Returns ``(total, sq, inv)``: the float64 sum of the losses, the squared norms and the
    inverse clamped norms; or None when a distance is NaN (then nothing usable has been
    written: take batch_mine's path)."""
    N = E.shape[0]
    I = np.int32 if E.dtype == np.float32 else np.int64
    B = max(1, min(int(HARD_BLOCK), N))
    if B > HARD_BLOCK_MAX:
        raise ValueError(f"HARD_BLOCK must be at most {HARD_BLOCK_MAX}, got {HARD_BLOCK}")
    width = -(-N // max(1, int(HARD_GEMM_BLOCKS)))
    width = min(N, -(-width // 16) * 16)  # columns per gemm block
    dist = DISTANCES[distance]
    F = np.empty((7, N), E.dtype)
    K = np.empty((4, N), I)
    st = np.empty(6 * HARD_BLOCK_MAX, I)
    buf = np.empty(N * min(width, N), E.dtype)
    inf_key = int(np.array(np.inf, E.dtype).view(I))
    for J0 in range(0, N, width):
        J1 = min(N, J0 + width)
        blk = buf[:J1 * (J1 - J0)].reshape(J1, J1 - J0)
        np.dot(E[:J1], E[J0:J1].T, out=blk)
        slice_width = -(-(J1 - J0) // -(-(J1 - J0) // B))  # equal slices of at most B columns
        if _hard_block(blk, J0, slice_width, dist, cls, st, K, F) > inf_key:
            return None
    total = _hard_finish(dist, float(margin), bool(soft), K, F, rec_j, rec_c, losses)
    return total, F[_SQ], F[_INV]


SEMIHARD_LINEAR_MAX = 128  # positives per anchor up to which counting beats a binary search


@jit
def _lex_less(a, b, d):
    """Whether column a comes before column b by (d[a], a); -1 (none) comes last."""
    if a < 0:
        return False
    if b < 0:
        return True
    return d[a] < d[b] or (d[a] == d[b] and a < b)


@jit
def _semihard_anchor(i, Gi, sq, inv, cls, dist, margin, soft, drow, posd, posi, rank, best, start,
                     rec_j, rec_c):
    """FaceNet: for each positive p of anchor i, the nearest negative with d(i,n) > d(i,p), else
    the farthest negative (lowest index on ties); records from ``start`` on, two per positive
    in column order.

    With the positive distances sorted, x_0 <= x_1 <= ..., a negative at distance d is strictly
    farther than exactly the positives k < b, b = #{x_k < d} (a binary search); best[b] keeps
    the nearest negative of each b, and a suffix minimum over b gives every positive its
    answer: O(N log P) per anchor instead of O(N P)."""
    N = Gi.shape[0]
    one = Gi.dtype.type(1.0)
    ci = cls[i]
    _distance_row(Gi, sq, inv, i, dist, drow)
    npos = 0
    for j in range(N):
        if cls[j] == ci and j != i:
            posd[npos] = drow[j]
            posi[npos] = j
            npos += 1
    if npos == 0:
        return 0.0
    order = np.argsort(posd[:npos], kind="mergesort")  # NaN last
    xs = posd[:npos][order]
    for k in range(npos):
        rank[order[k]] = k
    best[:npos + 1] = -1
    far = -1
    for j in range(N):
        if cls[j] != ci:
            d = drow[j]
            if far < 0 or d > drow[far] or (d != d and drow[far] == drow[far]):
                far = j  # the first NaN wins, so that it reaches the loss
            if d == d:
                # lo = #{x_k < d}: counted (vectorized) for small classes, else a lower bound
                lo = 0
                if npos <= SEMIHARD_LINEAR_MAX:
                    for t in range(npos):
                        lo += xs[t] < d
                else:
                    n = npos
                    while n > 1:
                        half = n >> 1
                        lo = lo + half if xs[lo + half] < d else lo
                        n -= half
                    lo = lo + 1 if xs[lo] < d else lo
                if lo > 0 and (best[lo] < 0 or d < drow[best[lo]]):
                    best[lo] = j
    if far < 0:
        return 0.0
    for b in range(npos - 1, 0, -1):  # best[b] <- the nearest negative among best[b:]
        if _lex_less(best[b + 1], best[b], drow):
            best[b] = best[b + 1]
    loss = 0.0
    k = start
    for q in range(npos):
        j = posi[q]
        r = rank[q] + 1
        n = best[r] if r <= npos and best[r] >= 0 else far
        d_ap = drow[j]
        term, slope = _term(d_ap - drow[n] + margin, soft, one)
        loss += term
        rec_j[k] = j
        rec_c[k] = slope
        rec_j[k + 1] = n
        rec_c[k + 1] = -slope
        k += 2
    return loss


@reduction_jit
def _all_hinge(d_ap, negd, margin, negc):
    """sum over negatives of max(0, z), z = d_ap - d_an + margin, the count and sum of [z > 0];
    negc -= [z > 0]."""
    zero = negd.dtype.type(0.0)
    one = negd.dtype.type(1.0)
    loss = zero
    slope = zero
    count = 0
    for m in range(negd.shape[0]):
        z = d_ap - negd[m] + margin
        active = z > zero
        loss += zero if z < zero else z
        s = one if active else zero
        slope += s
        count += 1 if active else 0
        negc[m] -= s
    return loss, slope, count


@jit
def _all_soft_terms(d_ap, negd, margin, terms, slopes):
    """softplus(z) and sigmoid(z) of every z = d_ap - negd[m] + margin (as ``_term``)."""
    zero = negd.dtype.type(0.0)
    one = negd.dtype.type(1.0)
    for m in range(negd.shape[0]):
        z = d_ap - negd[m] + margin
        e = vexp_nonpos(-abs(z))
        terms[m] = (z if z > zero else zero) + vlog1p(e)
        slopes[m] = one / (one + e) if z >= zero else e / (one + e)


@reduction_jit
def _all_soft_sums(terms, slopes, negc):
    zero = negc.dtype.type(0.0)
    loss = zero
    slope = zero
    for m in range(terms.shape[0]):
        loss += terms[m]
        slope += slopes[m]
        negc[m] -= slopes[m]
    return loss, slope


@jit
def _all_anchor(i, Gi, sq, inv, cls, dist, margin, soft, drow, negd, negi, negc, terms, slopes, S, grad):
    """Every valid (i, p, n): returns (sum of the terms, count of terms > 0); adds each term's
    f'(z) to S[i, p] and -f'(z) to S[i, n] (when grad)."""
    N = Gi.shape[0]
    ci = cls[i]
    _distance_row(Gi, sq, inv, i, dist, drow)
    nneg = 0
    for j in range(N):
        if cls[j] != ci:
            negd[nneg] = drow[j]
            negi[nneg] = j
            nneg += 1
    if nneg == 0:
        return 0.0, 0
    nd = negd[:nneg]
    nc = negc[:nneg]
    nc[:] = 0
    loss = 0.0
    count = 0
    for j in range(N):
        if cls[j] == ci and j != i:
            if soft:
                _all_soft_terms(drow[j], nd, margin, terms, slopes)
                lsum, ssum = _all_soft_sums(terms[:nneg], slopes[:nneg], nc)
                cnt = nneg
            else:
                lsum, ssum, cnt = _all_hinge(drow[j], nd, margin, nc)
            loss += lsum
            count += cnt
            if grad:
                S[i, j] += ssum
    if grad:
        for m in range(nneg):
            S[i, negi[m]] += nc[m]
    return loss, count


@jit
def _mine_rows(first, last, G, sq, inv, cls, mode, dist, margin, soft, rec_off, rec_j, rec_c,
               S, grad, losses, counts):
    T = G.dtype.type
    N = G.shape[0]
    scratch = N if mode != HARD else 0
    nchunks = -(-N // HARD_CHUNK) if mode == HARD else 0
    ik = _int_view(np.empty(N if mode == HARD else 0, T))
    hi = _int_view(np.empty(nchunks, T))
    lo = _int_view(np.empty(nchunks, T))
    drow = np.empty(scratch, T)
    negd = np.empty(scratch, T)
    negi = np.empty(scratch, np.int64)
    rank = np.empty(N if mode == SEMIHARD else 0, np.int64)
    best = np.empty(N + 1 if mode == SEMIHARD else 0, np.int64)
    negc = np.empty(scratch if mode == ALL else 0, T)
    terms = np.empty(scratch if mode == ALL and soft else 0, T)
    slopes = np.empty(scratch if mode == ALL and soft else 0, T)
    for i in range(first, last):
        if mode == HARD:
            losses[i] = _hard_anchor(i, G[i], sq, inv, cls, dist, margin, soft, ik, hi, lo,
                                     rec_j, rec_c)
        elif mode == SEMIHARD:
            losses[i] = _semihard_anchor(i, G[i], sq, inv, cls, dist, margin, soft, drow, negd,
                                         negi, rank, best, rec_off[i], rec_j, rec_c)
        else:
            losses[i], counts[i] = _all_anchor(i, G[i], sq, inv, cls, dist, margin, soft, drow,
                                               negd, negi, negc, terms, slopes, S, grad)


@njit(parallel=True, **KERNEL_OPTIONS)
def _mine_parallel(G, sq, inv, cls, mode, dist, margin, soft, rec_off, rec_j, rec_c, S, grad,
                   losses, counts):
    margin = G.dtype.type(margin)
    N = G.shape[0]
    block = max(1, ROW_BLOCK_ELEMENTS // max(N, 1))
    for b in prange((N + block - 1) // block):
        _mine_rows(b * block, min(N, (b + 1) * block), G, sq, inv, cls, mode, dist, margin, soft,
                   rec_off, rec_j, rec_c, S, grad, losses, counts)
    return loss_total(losses)


@jit
def _mine_serial(G, sq, inv, cls, mode, dist, margin, soft, rec_off, rec_j, rec_c, S, grad,
                 losses, counts):
    margin = G.dtype.type(margin)
    _mine_rows(0, G.shape[0], G, sq, inv, cls, mode, dist, margin, soft, rec_off, rec_j, rec_c,
               S, grad, losses, counts)
    return loss_total(losses)


def batch_mine(G, sq, inv, cls, mining, distance, margin, soft, rec_off, rec_j, rec_c, S, grad,
               losses, counts):
    """Mine every anchor of the Gram matrix ``G`` (N, N): per-anchor losses (float64) into
    ``losses``, records into ``rec_j, rec_c`` (hard, semihard) or coefficients into the rows of
    ``S`` ("all", also the per-anchor count of triplets with z > 0 into ``counts``).
    Returns the float64 sum of the losses."""
    N = G.shape[0]
    work = N * N * {"hard": 1, "semihard": 8, "all": max(1, N // 8)}[mining]
    return launch(_mine_parallel, _mine_serial, work >= BATCH_PARALLEL_MIN_WORK and N > 1,
                  G, sq, inv, cls, MININGS[mining], DISTANCES[distance], float(margin), bool(soft),
                  rec_off, rec_j, rec_c, S, grad, losses, counts)


@jit
def incoming(rec_off, rec_j, rec_c):
    """The records by their other endpoint: row r's are ``in_a[in_off[r]:in_off[r+1]]`` (the
    anchors) with coefficients ``in_c``; a stable counting sort (anchor order, then slot order)."""
    N = rec_off.shape[0] - 1
    in_off = np.zeros(N + 1, np.int64)
    for k in range(rec_j.shape[0]):
        j = rec_j[k]
        if j >= 0:
            in_off[j + 1] += 1
    for r in range(N):
        in_off[r + 1] += in_off[r]
    fill = in_off[:N].copy()
    in_a = np.empty(in_off[N], np.int64)
    in_c = np.empty(in_off[N], rec_c.dtype)
    for a in range(N):
        for k in range(rec_off[a], rec_off[a + 1]):
            j = rec_j[k]
            if j >= 0:
                in_a[fill[j]] = a
                in_c[fill[j]] = rec_c[k]
                fill[j] += 1
    return in_off, in_a, in_c


@reduction_jit
def _pair_grad(er, eo, c, cw, dist, acc):
    """acc += c * dd(r, o)/de_r for one pair (r, o), except cosine's e_r term, whose
    coefficient (before the factor 1 / n_r^2) is returned.

    euclidean: the exact difference over its exact norm, c (e_r - e_o) / ||e_r - e_o|| (0 for
    identical embeddings); squared: 2 c (e_r - e_o); cosine: -cw e_o, cw = c / (n_r n_o), and
    the e_r term's coefficient cw e_r.e_o (the dot product recomputed from the rows)."""
    zero = acc.dtype.type(0.0)
    if dist == EUCLIDEAN:
        s = zero
        for k in range(er.shape[0]):
            t = er[k] - eo[k]
            s += t * t
        d = math.sqrt(s)
        w = c / d if d > zero else zero
        for k in range(er.shape[0]):
            acc[k] += w * (er[k] - eo[k])
        return zero
    if dist == SQUARED:
        w = c + c
        for k in range(er.shape[0]):
            acc[k] += w * (er[k] - eo[k])
        return zero
    dot = zero
    for k in range(er.shape[0]):
        dot += er[k] * eo[k]
        acc[k] -= cw * eo[k]
    return cw * dot


@jit
def _backward_rows(first, last, E, inv, dist, rec_off, rec_j, rec_c, in_off, in_a, in_c, S, scale,
                   g):
    """Gradient rows [first, last).  Cosine: dd(r, o)/de_r = -(e_o / (n_r n_o) - [|e_r| > 1e-8]
    cos e_r / n_r^2) with the norms n clamped at 1e-8; the e_r terms add up in ``beta``."""
    T = E.dtype.type
    D = E.shape[1]
    acc = np.empty(D, T)
    zero = T(0.0)
    for r in range(first, last):
        acc[:] = 0
        beta = zero
        er = E[r]
        inv_r = inv[r]
        if S.shape[0] > 0:
            Sr = S[r]
            for o in range(S.shape[1]):
                c = Sr[o]
                beta += _pair_grad(er, E[o], c, c * inv_r * inv[o], dist, acc)
        else:
            for k in range(rec_off[r], rec_off[r + 1]):
                o = rec_j[k]
                if o >= 0:
                    c = rec_c[k]
                    beta += _pair_grad(er, E[o], c, c * inv_r * inv[o], dist, acc)
            for k in range(in_off[r], in_off[r + 1]):
                o = in_a[k]
                c = in_c[k]
                beta += _pair_grad(er, E[o], c, c * inv_r * inv[o], dist, acc)
        # |e_r| > 1e-8, i.e. its norm is not clamped: n_r = 1 / inv_r
        beta = beta * inv_r * inv_r if dist == COSINE and inv_r < 1 / COSINE_NORM_EPS else zero
        gr = g[r]
        for k in range(D):
            store(gr, k, scale * (acc[k] + beta * er[k]))


@njit(parallel=True, **KERNEL_OPTIONS)
def _backward_parallel(E, inv, dist, rec_off, rec_j, rec_c, in_off, in_a, in_c, S, scale, g):
    scale = E.dtype.type(scale)
    N, D = E.shape
    block = max(1, ROW_BLOCK_ELEMENTS // max(D * (N if S.shape[0] > 0 else 4), 1))
    for b in prange((N + block - 1) // block):
        _backward_rows(b * block, min(N, (b + 1) * block), E, inv, dist, rec_off, rec_j, rec_c,
                       in_off, in_a, in_c, S, scale, g)


@jit
def _backward_serial(E, inv, dist, rec_off, rec_j, rec_c, in_off, in_a, in_c, S, scale, g):
    _backward_rows(0, E.shape[0], E, inv, dist, rec_off, rec_j, rec_c, in_off, in_a, in_c, S,
                   E.dtype.type(scale), g)


def batch_backward(E, inv, distance, rec_off, rec_j, rec_c, S, scale, g):
    """g[r] = scale * sum over the records touching r of coef * dd(r, other)/de_r
    (or, with a dense symmetric ``S``, over every other row ``o`` with coefficient S[r, o])."""
    N, D = E.shape
    if S.shape[0] > 0:
        in_off = np.zeros(N + 1, np.int64)
        in_a = np.empty(0, np.int64)
        in_c = np.empty(0, E.dtype)
        work = N * N * D
    else:
        in_off, in_a, in_c = incoming(rec_off, rec_j, rec_c)
        work = 2 * rec_j.shape[0] * D
    launch(_backward_parallel, _backward_serial, work >= BATCH_PARALLEL_MIN_WORK and N > 1,
           E, inv, DISTANCES[distance], rec_off, rec_j, rec_c, in_off, in_a, in_c, S, float(scale), g)
