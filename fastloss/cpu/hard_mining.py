r"""Hard mining by blocks of the Gram matrix's upper triangle (CPU).

``batch_triplet_loss(mining="hard")`` without the full Gram matrix.  The columns are cut into
``HARD_GEMM_BLOCKS`` gemm blocks ``[J0, J1)``, each computed as ``G[:J1, J0:J1]`` (one gemm: the
block's columns against the rows before ``J1``): together the upper triangle and the diagonal
blocks, 5/8 of the product for 4 blocks.  Every pair ``i != j`` lies in exactly one gemm block,
as ``G[i, j]`` with ``i < J0`` or inside the diagonal block (there in both orders).  Each gemm
block is mined in column slices of ``HARD_BLOCK`` columns, each slice while it is in cache, from
both sides, its distance keys computed once:

* as columns: anchor ``j`` of the slice against every row ``i < J1``, ``i != j``, rows in
  increasing order: the running (key, index) of its farthest positive and of its nearest
  negative, replaced on a strictly better key, so that ties keep the lowest index (elementwise
  over the slice's columns: vectorized, two rows at a time);
* as rows: anchor ``i < J0`` against the slice's columns, all above its candidates so far: the
  row's extremes (vectorized integer max / min), and when one strictly beats the anchor's
  running one, its first column in the row.

An anchor's candidates thus arrive in increasing index order (every row below ``J1`` in its own
gemm block, then the columns of each later slice), and strict comparisons keep the lowest
index on ties, as the full-Gram path (``batch_mining``) does.  Keys are the bits of the distance
clamped at 0 (``distance_key``), integers that order like the distances.  Distances come from
``d = (u_i + u_j) - g (w_i w_j)``: ``u = |e|^2``, ``w_i w_j = 2`` (the squared distance, exactly
``sq_i + sq_j - 2 g``), or ``u = 1/2``, ``w`` = the inverse clamped norm (the cosine distance), by
the same operations for ``(i, j)`` and ``(j, i)``.  The squared norms are the gemm's diagonal,
read from the block that holds it (a block needs those of the rows below ``J1`` only).  A NaN
distance anywhere sends the call back to the full-Gram path (``batch_mining`` does it), whose
NaN rule (the first NaN wins) needs every NaN's position.

Few gemm calls: OpenBLAS's threads meet at the end of each, and on a loaded machine each meeting
can wait for a scheduler slice, so a few wide gemm blocks beat many narrow ones.  A slice's
column state stays in L1; slices much narrower than their gemm block would read short runs of
far-apart rows, which the prefetcher follows badly.
"""
import math
from collections import namedtuple

import numpy as np
from llvmlite import ir
from numba.core import types
from numba.core.extending import intrinsic, register_jitable

from fastloss.cpu._jit import jit
from fastloss.cpu._rows import loss_total
from fastloss.cpu.mining_backward import distance_flags
from fastloss.cpu._formulas import triplet
from fastloss.formulas.triplet import COSINE_NORM_EPS

HARD_BLOCK = 256  # columns per mining slice, at most HARD_BLOCK_MAX
HARD_GEMM_BLOCKS = 4  # gemm blocks per batch, of equal widths (multiples of 16 columns)
HARD_BLOCK_MAX = 520  # a slice's state: its parts 520 apart in one buffer (not a multiple of
# 1024 elements: no 4K aliasing between them)

# per row: the squared norm, the inverse clamped norm, and the factors of the distance
# (u, and w on the row side ``wr`` and on the column side ``wc``)
Norms = namedtuple("Norms", "sq inv u wr wc")
# per anchor, its farthest positive and nearest negative so far: key, index, Gram entry
Extremes = namedtuple("Extremes", "pos_key pos pos_gram neg_key neg neg_gram")
# A slice's state, in one integer buffer: its column anchors (as Extremes, without the Gram
# entries) and the keys of the two rows at hand, at these constant offsets.  One buffer and
# constant offsets, not a tuple of six arrays: the compiler then sees the parts apart (no
# run-time alias checks between them), which keeps the mining loop fast.
_PK, _PI, _NK, _NI, _K0, _K1 = (k * HARD_BLOCK_MAX for k in range(6))


@intrinsic
def float_bits(typingctx, x):
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
def magnitude_bits(typingctx, x):
    """float_bits(abs(x)): the bit pattern with the sign bit cleared (NaN of either sign above
    +inf)."""
    if x == types.float32:
        sig, int_type, mask = types.int32(types.float32), ir.IntType(32), 0x7FFFFFFF
    elif x == types.float64:
        sig, int_type, mask = types.int64(types.float64), ir.IntType(64), 0x7FFFFFFFFFFFFFFF
    else:
        return None

    def codegen(context, builder, sig, args):
        return builder.and_(builder.bitcast(args[0], int_type), ir.Constant(int_type, mask))

    return sig, codegen


@jit
def distance_key(d, zero):
    """The key of a distance: the bits of d clamped at 0 (NaN passes, above every other)."""
    return magnitude_bits(zero if d < zero else d)


@jit
def _gram_distance(g, u_i, u_j, w_i, w_j):
    """(u_i + u_j) - g (w_i w_j): the squared or cosine distance from the Gram entry g (see
    above), by the same operations for (i, j) and (j, i)."""
    return (u_i + u_j) - g * (w_i * w_j)


@jit
def _hard_rows(blk, i0, i1, c0, c1, r0, r1, U, Wr, cls, ub, wb, cb, st):
    """Rows i0 <= i1 (i1 == i0 for one row) of the slice blk[:, c0:c1]: updates the column
    anchors' running extremes in ``st`` with the candidates i0 then i1, skipping the diagonal
    entries t == r0 and t == r1; the rows' keys go to st[_K0:], st[_K1:].  Returns (largest
    key of a positive of i0, of i1, smallest key of a negative of i0, of i1, largest key),
    the sentinels where there are none.  (The per-call arguments are plain arrays: this runs
    once per pair of rows, and a tuple of arrays passes every field of each.)"""
    T = blk.dtype.type
    zero = T(0.0)
    lowest = float_bits(-zero)
    highest = float_bits(T(np.nan))
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
        k0 = distance_key(_gram_distance(x0[t], u0, uj, w0, wj), zero)
        k1 = distance_key(_gram_distance(x1[t], u1, uj, w1, wj), zero)
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


@register_jitable(inline="always")
def _tables(F, K):
    """The per-row tables, named: Norms and Extremes as views of the rows of F (7, N), in the
    compute type, and K (4, N), integer keys and indices (built here, in compiled code: a
    call from Python with tuples of arrays pays for each array twice, views and dispatch)."""
    return Norms(F[0], F[1], F[2], F[3], F[4]), Extremes(K[0], K[1], F[5], K[2], K[3], F[6])


@jit
def _block_norms(blk, J0, cosine, norms):
    """The norms of rows J0:J1 from the diagonal of gemm block ``blk`` = G[:J1, J0:J1]
    (``cosine`` True, or None for the other distances)."""
    T = blk.dtype.type
    one = T(1.0)
    eps = T(COSINE_NORM_EPS)
    sq, inv, u, wr, wc = norms
    for t in range(blk.shape[1]):
        j = J0 + t
        s = blk[j, t]
        n = T(math.sqrt(s))
        v = one / (eps if n < eps else n)  # np.maximum's clamp: NaN passes
        sq[j] = s
        inv[j] = v
        if cosine is not None:
            u[j] = T(0.5)
            wr[j] = v
            wc[j] = v
        else:
            u[j] = s
            wr[j] = one
            wc[j] = T(2.0)


@jit
def _slice_anchors(blk, S0, c0, c1, st, ext):
    """The slice's anchors as columns, complete: their extremes, with their Gram entries
    while at hand."""
    zero = blk.dtype.type(0.0)
    for t in range(c1 - c0):
        j = S0 + t
        p = st[_PI + t]
        n = st[_NI + t]
        ext.pos_key[j] = st[_PK + t]
        ext.pos[j] = p
        ext.neg_key[j] = st[_NK + t]
        ext.neg[j] = n
        ext.pos_gram[j] = blk[p, c0 + t] if p >= 0 else zero
        ext.neg_gram[j] = blk[n, c0 + t] if n >= 0 else zero


@jit
def _hard_block(blk, J0, B, cosine, cls, st, F, K):
    """Mine gemm block ``blk`` = G[:J1, J0:J1] in slices of B columns (see above): fills the
    norms of rows J0:J1 from its diagonal, the running extremes of the anchors J0:J1 (as
    columns: complete below J1) and of the anchors below J0 (as rows), into the tables F, K
    (``_tables``).  Returns the largest key (above +inf's when a distance is NaN)."""
    norms, ext = _tables(F, K)
    T = blk.dtype.type
    zero = T(0.0)
    lowest = float_bits(-zero)
    highest = float_bits(T(np.nan))
    J1, width = blk.shape
    _block_norms(blk, J0, cosine, norms)
    U = norms.u
    Wr = norms.wr
    bp, bi, pg, bn, bni, ng = ext  # out of the tuples once: no references taken in the loops
    top = lowest
    for c0 in range(0, width, B):
        c1 = min(width, c0 + B)
        b = c1 - c0
        S0 = J0 + c0  # the slice's first column
        ub = U[S0:S0 + b]
        wb = norms.wc[S0:S0 + b]
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
        _slice_anchors(blk, S0, c0, c1, st, ext)
    return top


@jit
def _hard_distance(g, u_i, u_j, w_i, w_j, cosine, euclid, zero):
    """d(i, j) from the Gram entry, as the blocks' keys order it: the clamped squared distance
    (its root for euclidean) or the (unclamped) cosine distance (``mining_backward.distance_flags``)."""
    d = _gram_distance(g, u_i, u_j, w_i, w_j)
    if cosine is not None:
        return d
    d = zero if d < zero else d
    if euclid is not None:
        return math.sqrt(d)
    return d


@jit
def _hard_finish(cosine, euclid, margin, soft, U, Wr, Wc, pos, neg, pos_gram, neg_gram, rec_j,
                 rec_c, losses):
    """Per anchor, from its farthest positive and nearest negative (the tables' rows, see
    ``_tables``): the loss term and the two records (as the full-Gram path).  Returns the
    float64 sum of the losses.  (The rows are plain arguments: a kernel that builds the
    named tables costs a first call more than passing them.)"""
    T = U.dtype.type
    zero = T(0.0)
    one = T(1.0)
    for a in range(U.shape[0]):
        p = pos[a]
        n = neg[a]
        rec_j[2 * a] = -1
        rec_j[2 * a + 1] = -1
        losses[a] = 0.0
        if p < 0 or n < 0:
            continue
        d_ap = _hard_distance(pos_gram[a], U[a], U[p], Wr[a], Wc[p], cosine, euclid, zero)
        d_an = _hard_distance(neg_gram[a], U[a], U[n], Wr[a], Wc[n], cosine, euclid, zero)
        loss, slope = triplet.term(d_ap - d_an + margin, soft, zero, one)
        losses[a] = loss
        rec_j[2 * a] = p
        rec_c[2 * a] = slope
        rec_j[2 * a + 1] = n
        rec_c[2 * a + 1] = -slope
    return loss_total(losses)


def batch_hard_blocked(E, cls, rule, records, losses):
    """Hard mining of the rows ``E`` (N, D) (compute type, C-contiguous), class ids ``cls``
    (int32), by blocks of the Gram matrix's upper triangle (see above): per anchor its loss
    (float64) into ``losses``, two records into ``records`` (as ``batch_mining``'s).
    Returns ``(total, sq, inv)``: the float64 sum of the losses, the squared norms and the
    inverse clamped norms; or None when a distance is NaN (then nothing usable has been
    written: take the full-Gram path)."""
    N = E.shape[0]
    I = np.int32 if E.dtype == np.float32 else np.int64
    B = max(1, min(int(HARD_BLOCK), N))
    if B > HARD_BLOCK_MAX:
        raise ValueError(f"HARD_BLOCK must be at most {HARD_BLOCK_MAX}, got {HARD_BLOCK}")
    width = -(-N // max(1, int(HARD_GEMM_BLOCKS)))
    width = min(N, -(-width // 16) * 16)  # columns per gemm block
    F = np.empty((7, N), E.dtype)
    K = np.empty((4, N), I)
    st = np.empty(6 * HARD_BLOCK_MAX, I)
    buf = np.empty(N * min(width, N), E.dtype)
    inf_key = int(np.array(np.inf, E.dtype).view(I))
    cosine, euclid = distance_flags(rule.distance)
    for J0 in range(0, N, width):
        J1 = min(N, J0 + width)
        blk = buf[:J1 * (J1 - J0)].reshape(J1, J1 - J0)
        np.dot(E[:J1], E[J0:J1].T, out=blk)
        slice_width = -(-(J1 - J0) // -(-(J1 - J0) // B))  # equal slices of at most B columns
        if _hard_block(blk, J0, slice_width, cosine, cls, st, F, K) > inf_key:
            return None
    norms, ext = _tables(F, K)
    total = _hard_finish(cosine, euclid, rule.margin, rule.soft, norms.u, norms.wr, norms.wc,
                         ext.pos, ext.neg, ext.pos_gram, ext.neg_gram, records.j, records.c, losses)
    return total, F[0], F[1]
