r"""Batch triplet loss (CPU): online mining in one batch, and the call that runs it.

``batch_triplet_loss`` (the semantics: ``fastloss.triplet.batch_triplet_loss``) mines each
anchor's triplets from the pairwise distances, then takes the gradient of the selected ones
(``mining_backward``).  Hard mining goes through ``hard_mining``'s blocks of the Gram matrix's
upper triangle; semihard, "all", and hard when a distance is NaN, through this module's
full-Gram path: the Gram matrix ``G = E E^T`` by BLAS, then mining over anchors (in parallel
when the work is large, see ``BATCH_PARALLEL_MIN_WORK``), each thread owning its anchors'
outputs.  Mining emits *records*: anchor ``a`` owns the slots ``off[a]:off[a+1]`` of ``(j, c)``,
each meaning "the loss contains ``c * d(a, j)``" (before the reduction's scale); ``"all"``
instead accumulates a dense coefficient matrix ``S`` (one row per anchor) and counts, per
anchor, the triplets that enter the "mean" denominator.
"""
import math
from collections import namedtuple

import numpy as np
from numba import njit, prange
from numba.core import types
from numba.core.extending import overload

from fastloss._reduction import grad_scale, reduce
from fastloss.cpu import _storage
from fastloss.cpu._jit import KERNEL_OPTIONS, jit, reduction_jit
from fastloss.cpu._rows import ROW_BLOCK_ELEMENTS, loss_total, paths
from fastloss.cpu._threads import launch
from fastloss.cpu._formulas import triplet
from fastloss.cpu.hard_mining import batch_hard_blocked, float_bits, magnitude_bits
from fastloss.cpu.mining_backward import batch_backward
from fastloss.formulas.triplet import COSINE, COSINE_NORM_EPS, DISTANCES, EUCLIDEAN, MININGS

# batch_triplet_loss: its kernels take the parallel path from this much estimated work (about
# one unit per simple operation).  Their input comes from OpenBLAS's gemm, whose worker threads
# keep spinning for a while after it, as libgomp's workers do after a parallel region (slowing
# the next gemm): on 2 cores a parallel pass costs more than it saves until the work is large.
# Work estimates: N^2 (hard), 8 N^2 (semihard), N^3 / 8 ("all"); records x D for the backward.
BATCH_PARALLEL_MIN_WORK = 1 << 25
HARD_CHUNK = 128  # hard mining: extremes per chunk (vectorized), then a search in the winning chunk
SEMIHARD_LINEAR_MAX = 128  # positives per anchor up to which counting beats a binary search

# the batch as mining reads it: the Gram matrix (N, N), the squared norms, the inverse clamped
# norms, the class ids (int32)
Batch = namedtuple("Batch", "G sq inv cls")
# what mining applies: the distance's code, the margin (compute type), soft: True, or None for the
# hinge (None prunes softplus at compile time: the default call never compiles it)
MiningRule = namedtuple("MiningRule", "distance margin soft")
# the records: anchor a's are the slots off[a]:off[a+1] of (j, c), j = -1 for an empty one
Records = namedtuple("Records", "off j c")
# The kernels take these tuples; the functions they call once per anchor take the arrays and
# scalars themselves, and return a float where they can: passed in a call, a tuple of arrays
# costs a reference count (an atomic) per array each way, which Numba prunes for plain array
# arguments, and a tuple of scalars, passed or returned, cost semihard mining a tenth of its
# time (measured).


# ================================================================ distances


@jit
def _matrix_distance(g, sq_i, sq_j, inv_i, inv_j, dist, one):
    """d(i, j) from the Gram entry g = e_i.e_j, the squared norms and the inverse clamped norms
    (``one``: 1 in the compute type)."""
    if dist == COSINE:
        return triplet.cosine_distance(g, inv_i, inv_j, one)
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
            out[j] = triplet.cosine_distance(Gi[j], inv_i, inv[j], one)
    else:
        for j in range(Gi.shape[0]):
            d2 = sq_i + sq[j] - (Gi[j] + Gi[j])
            out[j] = zero if d2 < zero else d2  # clamp at 0 (NaN passes)
        if dist == EUCLIDEAN:
            for j in range(out.shape[0]):
                out[j] = math.sqrt(out[j])


def _int_view(a):
    """``a`` (float32 / float64) viewed as int32 / int64 (Numba only)."""
    raise NotImplementedError


@overload(_int_view)
def _int_view_overload(a):
    if a.dtype == types.float32:
        return lambda a: a.view(np.int32)
    if a.dtype == types.float64:
        return lambda a: a.view(np.int64)


# ================================================================ hard


@jit
def _hard_keys(Gi, sq, inv, i, dist, cls, ik, hi, lo):
    """Keys of anchor i's row, ordered like d(i, j): the clamped squared distance (euclidean,
    squared) or the clamped cosine distance, as integer bit patterns in ``ik``.  Per
    chunk c of HARD_CHUNK columns: hi[c] = largest key of the anchor's class (the anchor
    included: its key 0 is the least), lo[c] = smallest key of the other classes (sentinels
    when none).  Returns whether a distance is NaN (the caller then takes the NaN-aware path):
    a NaN's key is above +inf's, found by one more integer max (cheaper than counting d != d)."""
    zero = Gi.dtype.type(0.0)
    one = Gi.dtype.type(1.0)
    lowest = float_bits(-zero)
    highest = float_bits(Gi.dtype.type(np.nan))
    inf_key = float_bits(Gi.dtype.type(np.inf))
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
                d = triplet.cosine_distance(g[t], inv_i, w[t], one)
                b = magnitude_bits(zero if d < zero else d)  # clamp at 0 (NaN passes)
                kk[t] = b
                same = cc[t] == ci
                h = max(h, b if same else lowest)
                m = min(m, highest if same else b)
                top = max(top, b)
        else:
            for t in range(g.shape[0]):
                d = sq_i + s[t] - (g[t] + g[t])
                b = magnitude_bits(zero if d < zero else d)
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
    zero = Gi.dtype.type(0.0)
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
    loss, slope = triplet.term(d_ap - d_an + margin, soft, zero, one)
    rec_j[2 * i] = bp
    rec_c[2 * i] = slope
    rec_j[2 * i + 1] = bn
    rec_c[2 * i + 1] = -slope
    return loss


# ================================================================ semihard


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
    the nearest negative of each b, and a suffix minimum over b gives every positive its answer:
    O(N log P) per anchor instead of O(N P)."""
    N = Gi.shape[0]
    zero = Gi.dtype.type(0.0)
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
        term, slope = triplet.term(drow[j] - drow[n] + margin, soft, zero, one)
        loss += term
        rec_j[k] = j
        rec_c[k] = slope
        rec_j[k + 1] = n
        rec_c[k + 1] = -slope
        k += 2
    return loss


# ================================================================ all


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
        term, s = triplet.hinge(z, zero, one)
        loss += term
        slope += s
        count += 1 if z > zero else 0
        negc[m] -= s
    return loss, slope, count


@jit
def _all_soft_terms(d_ap, negd, margin, terms, slopes):
    """softplus(z) and sigmoid(z) of every z = d_ap - negd[m] + margin."""
    zero = negd.dtype.type(0.0)
    one = negd.dtype.type(1.0)
    for m in range(negd.shape[0]):
        terms[m], slopes[m] = triplet.softplus(d_ap - negd[m] + margin, zero, one)


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
def _all_anchor(i, Gi, sq, inv, cls, dist, margin, soft, drow, negd, negi, negc, terms, slopes,
                S):
    """Every valid (i, p, n): returns (sum of the terms, count of terms > 0, or of every term
    when soft); adds each term's f'(z) to S[i, p] and -f'(z) to S[i, n] (S None: no
    gradient)."""
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
            if soft is not None:
                _all_soft_terms(drow[j], nd, margin, terms, slopes)
                lsum, ssum = _all_soft_sums(terms[:nneg], slopes[:nneg], nc)
                cnt = nneg
            else:
                lsum, ssum, cnt = _all_hinge(drow[j], nd, margin, nc)
            loss += lsum
            count += cnt
            if S is not None:
                S[i, j] += ssum
    if S is not None:
        for m in range(nneg):
            S[i, negi[m]] += nc[m]
    return loss, count


# ================================================================ the mining kernels


@jit
def _mine_rows(first, last, batch, rule, hard, semihard, every, records, S, losses, counts):
    """Anchors [first, last): their losses, and their records (hard, semihard) or rows of S
    and counts ("all"), with the scratch arrays of the mode: one of ``hard``, ``semihard``
    and ``every`` is True, the others None (``_rows.paths``)."""
    G, sq, inv, cls = batch
    off, rec_j, rec_c = records
    dist, margin, soft = rule
    T = G.dtype.type
    N = G.shape[0]
    if hard is not None:
        nchunks = -(-N // HARD_CHUNK)
        ik = _int_view(np.empty(N, T))  # the row's distance keys, and per chunk their extremes
        hi = _int_view(np.empty(nchunks, T))
        lo = _int_view(np.empty(nchunks, T))
        for i in range(first, last):
            losses[i] = _hard_anchor(i, G[i], sq, inv, cls, dist, margin, soft, ik, hi, lo, rec_j,
                                     rec_c)
    if semihard is not None:
        drow = np.empty(N, T)
        posd = np.empty(N, T)
        posi = np.empty(N, np.int64)
        rank = np.empty(N, np.int64)
        best = np.empty(N + 1, np.int64)
        for i in range(first, last):
            losses[i] = _semihard_anchor(i, G[i], sq, inv, cls, dist, margin, soft, drow, posd,
                                         posi, rank, best, off[i], rec_j, rec_c)
    if every is not None:
        drow = np.empty(N, T)
        negd = np.empty(N, T)
        negi = np.empty(N, np.int64)
        negc = np.empty(N, T)
        terms = np.empty(N if soft is not None else 0, T)  # softplus terms and slopes: soft only
        slopes = np.empty(N if soft is not None else 0, T)
        for i in range(first, last):
            loss, count = _all_anchor(i, G[i], sq, inv, cls, dist, margin, soft, drow, negd, negi,
                                      negc, terms, slopes, S)
            losses[i] = loss
            if counts is not None:  # given with "all" (None with the others: pruned then)
                counts[i] = count


@njit(parallel=True, **KERNEL_OPTIONS)
def _mine_parallel(batch, rule, hard, semihard, every, records, S, losses, counts):
    N = batch.G.shape[0]
    block = max(1, ROW_BLOCK_ELEMENTS // max(N, 1))
    for b in prange((N + block - 1) // block):
        _mine_rows(b * block, min(N, (b + 1) * block), batch, rule, hard, semihard, every, records,
                   S, losses, counts)
    return loss_total(losses)


@jit
def _mine_serial(batch, rule, hard, semihard, every, records, S, losses, counts):
    _mine_rows(0, batch.G.shape[0], batch, rule, hard, semihard, every, records, S, losses,
               counts)
    return loss_total(losses)


def _gram(E):
    """E @ E.T as two row blocks: NumPy hands E @ E.T itself to BLAS's syrk, which OpenBLAS
    runs about half as fast as gemm; a row block against E.T is a gemm with a transposed
    operand (no transposed copy either)."""
    N = E.shape[0]
    G = np.empty((N, N), E.dtype)
    half = N // 2
    if half == 0:
        return np.dot(E, E.T)
    np.dot(E[:half], E.T, out=G[:half])
    np.dot(E[half:], E.T, out=G[half:])
    return G


def batch_mine(E, cls, mining, rule, records, S, losses, counts):
    """Mine every anchor of the rows ``E`` (N, D) from their full Gram matrix: per-anchor losses
    (float64) into ``losses``, records into ``records`` (hard, semihard) or coefficients into
    the rows of ``S`` ("all"; None without a gradient) and the per-anchor count of triplets
    with z > 0 into ``counts`` ("all"; None otherwise).
    Returns ``(total, sq, inv)``: the float64 sum of the losses, the squared norms and the
    inverse clamped norms."""
    T = E.dtype.type
    N = E.shape[0]
    G = _gram(E)
    sq = np.ascontiguousarray(np.diagonal(G))
    inv = (1.0 / np.maximum(np.sqrt(sq), T(COSINE_NORM_EPS))).astype(T, copy=False)
    work = N * N * {"hard": 1, "semihard": 8, "all": max(1, N // 8)}[mining]
    total = launch(_mine_parallel, _mine_serial, work >= BATCH_PARALLEL_MIN_WORK and N > 1,
                   Batch(G, sq, inv, cls), rule, *paths(MININGS[mining], 3), records, S, losses,
                   counts)
    return total, sq, inv


def _denominator(mining, soft, N, size, counts):
    """The "mean" denominator: the anchors with a positive and a negative (hard), the
    anchor-positive pairs whose anchor has a negative (semihard), the triplets with z > 0
    ("all"; every valid triplet when soft)."""
    has_neg = size < N
    if mining == "hard":
        return float(np.count_nonzero((size > 1) & has_neg))
    if mining == "semihard":
        return float(np.where(has_neg, size - 1, 0).sum())
    return float(np.sum((size - 1) * (N - size))) if soft else float(counts.sum())


def _records(mining, N, size, T):
    """Empty records for the mining mode: two slots per anchor (hard), two per anchor-positive
    pair whose anchor has a negative (semihard), none ("all")."""
    if mining == "hard":
        slots = np.full(N, 2, np.int64)
    elif mining == "semihard":
        slots = 2 * np.where(size < N, size - 1, 0)
    else:
        slots = np.zeros(N, np.int64)
    off = np.zeros(N + 1, np.int64)
    np.cumsum(slots, out=off[1:])
    return Records(off, np.empty(off[-1], np.int64), np.empty(off[-1], T))


def batch_triplet_loss(embeddings, labels, mining, distance, margin, soft, reduction, grad,
                       grad_out):
    """``(loss, grad)`` of ``fastloss.batch_triplet_loss`` on checked NumPy inputs
    (``labels`` int64 of shape (N,), ``grad_out`` None or a checked array)."""
    N = embeddings.shape[0]
    T = _storage.compute_type(embeddings.dtype)
    E = np.ascontiguousarray(embeddings, dtype=T)
    _, cls, class_sizes = np.unique(labels, return_inverse=True, return_counts=True)
    cls = np.ascontiguousarray(cls.reshape(N), dtype=np.int32)
    size = class_sizes[cls]  # size of each anchor's class
    records = _records(mining, N, size, T)
    rule = MiningRule(DISTANCES[distance], T(margin), True if soft else None)
    S = np.zeros((N, N), T) if mining == "all" and grad else None
    losses = np.zeros(N, np.float64)
    counts = np.zeros(N, np.int64) if mining == "all" else None
    # hard: the upper triangle of the Gram matrix by blocks, each mined while in cache (None
    # when a distance is NaN: the full-Gram path then applies its NaN rule)
    mined = (batch_hard_blocked(E, cls, rule, records, losses)
             if mining == "hard" and N else None)  # N = 0: no blocks (the Gram path copes)
    if mined is None:
        mined = batch_mine(E, cls, mining, rule, records, S, losses, counts)
    total, sq, inv = mined
    denom = _denominator(mining, soft, N, size, counts)
    if reduction == "mean" and mining == "all" and denom == 0:
        loss = np.asarray(0.0, dtype=embeddings.dtype)
    else:
        loss = reduce(losses, total, reduction, denom, (N,), embeddings.dtype)
    if not grad:
        return loss, None
    written, result = _storage.gradient_buffer(grad_out, embeddings.shape, embeddings.dtype, None,
                                               (embeddings, E))
    if S is not None:
        S += S.T  # row r: every coefficient of a pair touching r (NumPy buffers the overlap)
    batch_backward(E, inv, rule.distance, records, S, grad_scale(reduction == "mean", denom),
                   _storage.kernel_view(written), BATCH_PARALLEL_MIN_WORK)
    return loss, _storage.finish_gradient(written, result)
