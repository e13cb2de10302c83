r"""Triplet loss kernels (CUDA): explicit triplets, and online mining in one batch.

``triplet_rows``: one block per triplet ``(a, p, n)`` (a row of the three
``(N, D)`` inputs; persistent blocks, each looping over rows, ``row_grid``), as
``cpu/triplet``::

    z = margin + d(a, p) - d(a, n)          (swap: d(a, n) <- min(d(a, n), d(p, n)))
    L = max(0, z),  dL/dz = [z >= 0]        (torch's clamp_min passes the gradient at 0)

    euclidean          ||x - y + eps||_2     dd/dx = (x - y + eps) / d   (0 where d == 0)
    squared_euclidean  ||x - y||_2^2         dd/dx = 2 (x - y)
    cosine             1 - x.y / (X Y)       dd/dx = -(y / (X Y) - [|x| > eps] cos x / X^2)
                       X = max(|x|, eps), Y = max(|y|, eps)

With ``swap`` a tie ``d(a, n) == d(p, n)`` splits dL/d(d_neg) half/half
(``torch.minimum``'s backward); a NaN on either side gives both the whole.
Pass 1: each thread sums its strided share of the row (the three squared
differences, or the six dot products for cosine), block reductions (float64
tree) give the row's sums.  Pass 2: the thread that read element ``j`` of
``a``, ``p`` and ``n`` reads all three again and then writes element ``j`` of
the three gradients, so a gradient may be any one of the inputs itself.

``batch_triplet_loss``, in four kernels (``fastloss.triplet.batch_triplet_loss``
has the semantics):

1. ``pairwise``: the ``N x N`` matrix ``M`` by ``TILE x TILE`` blocks of
   threads, ``TILE x TILE`` shared tiles of the embeddings walking D:
   ``M[i, j] = ||e_i - e_j||^2`` from the differences themselves (euclidean,
   squared; exactly 0 on the diagonal, no cancellation) or ``e_i . e_j``
   (cosine, with ``inv_i = 1 / max(sqrt(M[i, i]), 1e-8)`` by
   ``inverse_norms``).  Every entry sums its terms in the same order, so
   ``M`` is exactly symmetric and equal rows give equal entries (exact ties).
2. mining, one block per anchor ``i`` (``mine_hard``, ``mine_semihard``,
   ``mine_all``), threads over the columns ``j``: the per-anchor loss (a
   float64 block sum), the count that enters the "mean" denominator, and the
   anchor's row of two ``N x N`` arrays: ``S[i, j]``, the coefficient of
   ``d(i, j)`` in the loss (``f'(z)`` for a positive, ``-sum f'(z)`` for a
   negative, 0 elsewhere), and ``pick[i, j] >= 0`` where the pair is selected
   (hard, semihard; "all" selects every pair).  Hard: argmax / argmin block
   reductions of (key, index), lowest index on ties; the keys order like the
   CPU's (squared distance, cosine distance clamped at 0), and a row holding a
   NaN compares the distances themselves, the first NaN winning.  Semihard:
   one thread per positive scans the negatives; then, after a barrier, one
   thread per negative gathers the positives that chose it.  "all": one
   thread per positive (its slopes over every negative) or per negative (over
   every positive).
3. ``batch_total``: one block sums the per-anchor losses and counts (float64,
   fixed order) into the loss and the "mean" denominator ``stats[0]``.
4. ``backward``: one block per embedding row ``r``, one thread per column:
   ``g[r] = scale * sum over the selected pairs (r, o) of
   (S[r, o] + S[o, r]) dd(r, o)/de_r`` (``r`` as anchor, then as the other
   end), reading only its own gradient row's inputs and writing it: no
   atomics, the same bits on every run.  Euclidean uses ``sqrt(M[r, o])``,
   exact differences, and 0 at distance 0.

Memory: ``M``, ``S`` (compute type) and ``pick`` (int32), ``O(N^2)``.
"""
import math
import os

import numpy as np
from numba import cuda, float64, int64

from fastloss._cache import CACHE
from fastloss._reduction import grad_scale
from fastloss.cuda import _blocks
from fastloss.cuda._arrays import compute_type
from fastloss.cuda._blocks import (MAX_THREADS, block_max, block_sum, cast_like, grid_for, row_grid,
                                   threads_for)
from fastloss.cuda._reduction import class_denominator, finish, per_row_losses

EUCLIDEAN, SQUARED, COSINE = 0, 1, 2  # as fastloss.cpu.triplet.DISTANCES
DISTANCES = {"euclidean": EUCLIDEAN, "squared_euclidean": SQUARED, "cosine": COSINE}
COSINE_NORM_EPS = 1e-8  # as fastloss.cpu.triplet.COSINE_NORM_EPS
# pairwise distances: TILE x TILE threads per block, shared tiles of TILE x TILE.  The simulator
# (one Python thread per GPU thread) gets 4 x 4: cheaper, and tiny test batches (N <= 12,
# D <= 8) then span several tiles and several steps along D.
TILE = 4 if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" else 16
TILE_PAD = TILE + 1  # a tile's row length in shared memory (no bank conflicts down a column)


# ================================================================ copies


@cuda.jit(cache=CACHE)
def copy_rows(src, dst):
    """dst[r, c] = src[r, c] (2-D views of one shape, any strides)."""
    i = int64(cuda.grid(1))
    stride = int64(cuda.gridsize(1))
    D = src.shape[1]
    total = src.shape[0] * D
    while i < total:
        r = i // D
        c = i - r * D
        dst[r, c] = src[r, c]
        i += stride


@cuda.jit(cache=CACHE)
def copy_flat(src, dst):
    """dst[i] = src[i] (1-D views, any strides)."""
    i = int64(cuda.grid(1))
    stride = int64(cuda.gridsize(1))
    while i < src.shape[0]:
        dst[i] = src[i]
        i += stride


def _copy(src, dst):
    n = int(np.prod(tuple(src.shape)))
    if n == 0:
        return
    blocks, threads = grid_for(n)
    (copy_rows if src.ndim == 2 else copy_flat)[blocks, threads](src, dst)


def _pointer(v):
    iface = getattr(v, "__cuda_array_interface__", None)
    if iface is not None:
        return iface["data"][0]
    return v._ary.__array_interface__["data"][0]  # the simulator's arrays wrap NumPy's


def _extent(v):
    """The byte range ``[lo, hi)`` a device view spans, None when empty."""
    shape, strides = tuple(v.shape), tuple(v.strides)
    if any(s == 0 for s in shape):
        return None
    lo = hi = _pointer(v)
    for s, st in zip(shape, strides):
        if st > 0:
            hi += (s - 1) * st
        else:
            lo += (s - 1) * st
    return lo, hi + v.dtype.itemsize


def overlap(a, b):
    """Whether two device views may share memory (their byte ranges intersect)."""
    ea, eb = _extent(a), _extent(b)
    return ea is not None and eb is not None and ea[0] < eb[1] and eb[0] < ea[1]


def _same_layout(a, b):
    return (tuple(a.shape) == tuple(b.shape) and tuple(a.strides) == tuple(b.strides)
            and a.dtype == b.dtype and _pointer(a) == _pointer(b))


def _matrix(dev, v, D, keep):
    """A 2-D ``(n, D)`` view of ``v`` ((n, D), or (D,) for one triplet); a strided 1-D
    view is copied to a contiguous buffer (its native kept alive in ``keep``)."""
    if v.ndim == 2:
        return v
    if v.size == 0 or v.is_c_contiguous():
        return v.reshape((1, D))
    native, tmp = dev.empty((D,), v.dtype)
    keep.append(native)
    _copy(v, tmp)
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


@cuda.jit(cache=CACHE)
def triplet_rows(xa, xp, xn, dist, swap, margin, eps, scale, ga, gp, gn, losses):
    """Rows ``blockIdx.x, blockIdx.x + gridDim.x, ...`` of ``xa, xp, xn`` (n, D), one
    block each: ``losses[row]`` and, when the gradients ``ga, gp, gn`` are given (else
    None), their rows times ``scale``.
    ``margin``, ``eps`` and ``scale`` carry the compute type."""
    buf = cuda.shared.array((3, MAX_THREADS), float64)
    nrows = xa.shape[0]
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    D = xa.shape[1]
    zero = eps - eps
    one = cast_like(1, zero)
    half = cast_like(0.5, zero)
    two = cast_like(2, zero)
    shift = eps if dist == EUCLIDEAN else zero
    for row in range(int64(cuda.blockIdx.x), nrows, int64(cuda.gridDim.x)):
        d_ap = zero
        d_an = zero
        d_pn = zero
        na = zero
        np_ = zero
        nn_ = zero
        A = one
        P = one
        N = one
        cos_ap = zero
        cos_an = zero
        cos_pn = zero
        if dist == COSINE:
            aa = zero
            pp = zero
            nn = zero
            ap = zero
            an = zero
            pn = zero
            for j in range(t, D, nt):
                a = cast_like(xa[row, j], zero)
                p = cast_like(xp[row, j], zero)
                n = cast_like(xn[row, j], zero)
                aa += a * a
                pp += p * p
                nn += n * n
                ap += a * p
                an += a * n
                pn += p * n
            s1, s2, s3 = _block_sum3(buf, aa, pp, nn)
            aa = cast_like(s1, zero)
            pp = cast_like(s2, zero)
            nn = cast_like(s3, zero)
            s1, s2, s3 = _block_sum3(buf, ap, an, pn)
            ap = cast_like(s1, zero)
            an = cast_like(s2, zero)
            pn = cast_like(s3, zero)
            na = math.sqrt(aa)
            np_ = math.sqrt(pp)
            nn_ = math.sqrt(nn)
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
            s_ap = zero
            s_an = zero
            s_pn = zero
            for j in range(t, D, nt):
                a = cast_like(xa[row, j], zero)
                p = cast_like(xp[row, j], zero)
                n = cast_like(xn[row, j], zero)
                u = a - p + shift
                v = a - n + shift
                s_ap += u * u
                s_an += v * v
                if swap:
                    w = p - n + shift
                    s_pn += w * w
            s1, s2, s3 = _block_sum3(buf, s_ap, s_an, s_pn)
            s_ap = cast_like(s1, zero)
            s_an = cast_like(s2, zero)
            s_pn = cast_like(s3, zero)
            if dist == EUCLIDEAN:
                d_ap = math.sqrt(s_ap)
                d_an = math.sqrt(s_an)
                d_pn = math.sqrt(s_pn)
            else:
                d_ap = s_ap
                d_an = s_an
                d_pn = s_pn
        # share of dL/d(d_neg) that goes to d(a,n) and to d(p,n): torch.minimum's backward
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
        if t == 0:
            losses[row] = zero if z < zero else z  # NaN passes
        if ga is not None:
            c = scale if z >= zero else zero
            cn = c * f_an
            cs = c * f_pn
            if dist == COSINE:
                kA = one / (A * A) if na > eps else zero
                kP = one / (P * P) if np_ > eps else zero
                kN = one / (N * N) if nn_ > eps else zero
                AP = one / (A * P)
                AN = one / (A * N)
                PN = one / (P * N)
                m00 = kA * (c * cos_ap - cn * cos_an)
                m01 = -c * AP
                m02 = cn * AN
                m11 = kP * (c * cos_ap - cs * cos_pn)
                m12 = cs * PN
                m22 = -kN * (cn * cos_an + cs * cos_pn)
                for j in range(t, D, nt):
                    a = cast_like(xa[row, j], zero)
                    p = cast_like(xp[row, j], zero)
                    n = cast_like(xn[row, j], zero)
                    ga[row, j] = m00 * a + m01 * p + m02 * n
                    gp[row, j] = m01 * a + m11 * p + m12 * n
                    gn[row, j] = m02 * a + m12 * p + m22 * n
            else:
                if dist == EUCLIDEAN:
                    # norm's backward: (x - y + eps) / d, 0 where d == 0 (a NaN d spreads over the row)
                    cp = c / d_ap if d_ap != zero else zero
                    cn = cn / d_an if d_an != zero else zero
                    cs = cs / d_pn if d_pn != zero else zero
                else:
                    cp = two * c
                    cn = two * cn
                    cs = two * cs
                for j in range(t, D, nt):
                    a = cast_like(xa[row, j], zero)
                    p = cast_like(xp[row, j], zero)
                    n = cast_like(xn[row, j], zero)
                    u = a - p + shift
                    v = a - n + shift
                    w = p - n + shift
                    ga[row, j] = cp * u - cn * v
                    gp[row, j] = -(cp * u) - cs * w
                    gn[row, j] = cn * v + cs * w


def triplet_margin_loss(dev, xa, xp, xn, distance, swap, margin, eps, reduction, grad, grad_out,
                        batch_shape, dtype):
    """Launch ``triplet_rows`` on checked device views of shape ``(n, D)`` or ``(D,)``;
    ``grad_out`` is None or a tuple of three checked device views of the inputs' shape.
    Returns ``(loss, grads)``: native arrays of the call's kind, ``grads`` a tuple of
    three (None when not asked for)."""
    shape = tuple(xa.shape)
    D = shape[-1] if shape else 0
    keep = []
    inputs = [_matrix(dev, x, D, keep) for x in (xa, xp, xn)]
    n = inputs[0].shape[0]
    T = compute_type(dtype)
    stats = class_denominator(dev, n, None, None, None, 0) if reduction == "mean" else None
    losses = per_row_losses(dev, n, reduction, dtype, T)
    natives = [None, None, None]
    views = [None, None, None]
    copies = []
    if grad:
        originals = (xa, xp, xn)
        for k in range(3):
            out = None if grad_out is None else grad_out[k]
            direct = out is not None and (out.ndim == 2 or out.size == 0 or out.is_c_contiguous())
            if direct:
                # an input itself (same layout) is fine: each element is read before it is
                # written, by one thread; any other overlap goes through a temporary
                direct = all(_same_layout(out, x) or not overlap(out, x) for x in originals)
            if direct:
                natives[k] = out
                views[k] = _matrix(dev, out, D, keep)
            else:
                native, view = dev.empty(shape, dtype)
                natives[k] = native
                views[k] = view if view.ndim == 2 else view.reshape((1, D))
                if out is not None:
                    copies.append((view, out))
                    natives[k] = out
    if n:
        threads = threads_for(D)
        triplet_rows[row_grid(n, threads), threads](
            *inputs, DISTANCES[distance], bool(swap), T(margin), T(eps),
            T(grad_scale(reduction == "mean", n)), *views, losses[1])
    for tmp, out in copies:
        _copy(tmp, out)
    loss = finish(dev, losses, stats, reduction, batch_shape, dtype)
    return loss, (tuple(natives) if grad else None)


# ================================================================ batch_triplet_loss


@cuda.jit(cache=CACHE)
def pairwise(E, dot, zero, M):
    """M[i, j] = e_i . e_j (``dot``) or ||e_i - e_j||^2, in the type of ``zero``;
    blocks of TILE x TILE threads, one entry each, ``E`` read in TILE x TILE tiles."""
    As = cuda.shared.array((TILE, TILE_PAD), M.dtype)
    Bs = cuda.shared.array((TILE, TILE_PAD), M.dtype)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    row0 = int64(cuda.blockIdx.y) * TILE
    col0 = int64(cuda.blockIdx.x) * TILE
    N = E.shape[0]
    D = E.shape[1]
    ra = row0 + ty  # the row of E this thread loads into As (and its entry's row)
    rb = col0 + ty  # the row of E it loads into Bs
    acc = zero
    for k0 in range(0, D, TILE):
        c = k0 + tx
        if ra < N and c < D:
            As[ty, tx] = E[ra, c]
        else:
            As[ty, tx] = zero
        if rb < N and c < D:
            Bs[ty, tx] = E[rb, c]
        else:
            Bs[ty, tx] = zero
        cuda.syncthreads()
        if dot:
            for k in range(TILE):
                acc += As[ty, k] * Bs[tx, k]
        else:
            for k in range(TILE):
                u = As[ty, k] - Bs[tx, k]
                acc += u * u
        cuda.syncthreads()
    j = col0 + tx
    if ra < N and j < N:
        M[ra, j] = acc


@cuda.jit(cache=CACHE)
def inverse_norms(M, floor, inv):
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
        return cast_like(1, v) - v * inv[i] * inv[j]
    if euclid:
        return math.sqrt(v)
    return v


@cuda.jit(device=True)
def _term(z, soft, zero):
    """(f(z), f'(z)): max(0, z) with the gradient passing where z > 0, or softplus and
    sigmoid (stable: max(z, 0) + log1p(exp(-|z|)))."""
    one = cast_like(1, zero)
    if soft:
        e = math.exp(-abs(z))
        pos = z if z > zero else zero
        return pos + math.log1p(e), (one / (one + e) if z >= zero else e / (one + e))
    return (zero if z < zero else z), (one if z > zero else zero)


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
def _argbest(kbuf, ibuf, key, idx, largest):
    """The index of the block's best (key, index) (see ``_better``), returned to every thread."""
    t = cuda.threadIdx.x
    kbuf[t] = key
    ibuf[t] = idx
    cuda.syncthreads()
    half = cuda.blockDim.x // 2
    while half > 0:
        if t < half:
            if _better(kbuf[t + half], ibuf[t + half], kbuf[t], ibuf[t], largest):
                kbuf[t] = kbuf[t + half]
                ibuf[t] = ibuf[t + half]
        cuda.syncthreads()
        half //= 2
    best = ibuf[0]
    cuda.syncthreads()
    return best


@cuda.jit(cache=CACHE)
def mine_hard(M, inv, labels, euclid, margin, soft, S, pick, losses, counts):
    """Hermans et al.: anchor i (one block) against its farthest positive and nearest negative.
    ``S``, ``pick`` are None without a gradient."""
    kbuf = cuda.shared.array(MAX_THREADS, float64)
    ibuf = cuda.shared.array(MAX_THREADS, int64)
    i = int64(cuda.blockIdx.x)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    N = M.shape[0]
    zero = margin - margin
    li = labels[i]
    nan = 0.0
    for j in range(t, N, nt):
        d = _distance(M, inv, i, j, euclid)
        if d != d:
            nan = 1.0
    # keys ordered like the CPU's: the squared distance (euclidean, squared) or the cosine
    # distance clamped at 0; with a NaN in the row, the distances, the first NaN winning
    raw = block_max(kbuf, nan) > 0
    bp = int64(-1)
    bn = int64(-1)
    kp = zero
    kn = zero
    for j in range(t, N, nt):
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
    bp = _argbest(kbuf, ibuf, kp, bp, True)
    bn = _argbest(kbuf, ibuf, kn, bn, False)
    term = zero
    slope = zero
    if bp >= 0 and bn >= 0:
        d_ap = _distance(M, inv, i, bp, euclid)
        d_an = _distance(M, inv, i, bn, euclid)
        term, slope = _term(d_ap - d_an + margin, soft, zero)
    else:
        bp = -1
        bn = -1
    if t == 0:
        losses[i] = term
        counts[i] = 1 if bp >= 0 else 0
    if S is not None:
        for j in range(t, N, nt):
            if j == bp:
                S[i, j] = slope
                pick[i, j] = 1
            elif j == bn:
                S[i, j] = -slope
                pick[i, j] = 1
            else:
                S[i, j] = zero
                pick[i, j] = -1


@cuda.jit(cache=CACHE)
def mine_semihard(M, inv, labels, euclid, margin, soft, S, pick, losses, counts):
    """FaceNet: for each positive p of anchor i (one block, a thread per positive), the
    nearest negative with d(i, n) > d(i, p), else the farthest (lowest index on ties, the
    first NaN winning for the farthest).  pick[i, p] = the chosen negative; then, after a
    barrier, a thread per negative n gathers S[i, n] = -sum of the slopes of the positives
    that chose it (pick[i, n] = n when any did)."""
    sbuf = cuda.shared.array(MAX_THREADS, float64)
    i = int64(cuda.blockIdx.x)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    N = M.shape[0]
    zero = margin - margin
    li = labels[i]
    own = 0  # this thread's negatives
    for j in range(t, N, nt):
        if labels[j] != li:
            own += 1
    nneg = block_sum(sbuf, float64(own))
    loss = 0.0
    cnt = 0
    for j in range(t, N, nt):
        chosen = int64(-1)
        slope = zero
        if nneg > 0 and labels[j] == li and j != i:
            d_ap = _distance(M, inv, i, j, euclid)
            best = int64(-1)
            kb = zero
            far = int64(-1)
            kf = zero
            for n in range(N):
                if labels[n] != li:
                    d = _distance(M, inv, i, n, euclid)
                    if _better(d, n, kf, far, True):
                        far = n
                        kf = d
                    if d == d and d_ap < d and (best < 0 or d < kb):
                        best = n
                        kb = d
            chosen = best if best >= 0 else far
            term, slope = _term(d_ap - _distance(M, inv, i, chosen, euclid) + margin, soft, zero)
            loss += float64(term)
            cnt += 1
        if S is not None:
            S[i, j] = slope
            pick[i, j] = chosen
    loss = block_sum(sbuf, loss)
    total = block_sum(sbuf, float64(cnt))
    if t == 0:
        losses[i] = loss
        counts[i] = int64(total)
    if S is not None:
        cuda.syncthreads()  # every positive's choice is written (block_sum's last barrier too)
        for n in range(t, N, nt):
            if labels[n] != li:
                acc = zero
                hit = int64(-1)
                for p in range(N):
                    if labels[p] == li and p != i and pick[i, p] == n:
                        acc -= S[i, p]
                        hit = n
                S[i, n] = acc
                pick[i, n] = hit


@cuda.jit(cache=CACHE)
def mine_all(M, inv, labels, euclid, margin, soft, S, losses, counts):
    """Every valid (i, p, n) of anchor i (one block): a thread per column j; a positive's
    S[i, j] = sum over negatives of f'(z), a negative's -sum over positives.  counts[i]:
    the terms with z > 0 (hinge) or every term (soft)."""
    sbuf = cuda.shared.array(MAX_THREADS, float64)
    i = int64(cuda.blockIdx.x)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    N = M.shape[0]
    zero = margin - margin
    li = labels[i]
    own_pos = 0  # this thread's positives and negatives
    own_neg = 0
    for j in range(t, N, nt):
        if labels[j] != li:
            own_neg += 1
        elif j != i:
            own_pos += 1
    npos = block_sum(sbuf, float64(own_pos))
    nneg = block_sum(sbuf, float64(own_neg))
    loss = 0.0
    cnt = 0
    for j in range(t, N, nt):
        s = zero
        if labels[j] == li:
            if j != i and nneg > 0:
                d_ap = _distance(M, inv, i, j, euclid)
                part = zero
                for n in range(N):
                    if labels[n] != li:
                        z = d_ap - _distance(M, inv, i, n, euclid) + margin
                        term, sl = _term(z, soft, zero)
                        part += term
                        s += sl
                        if soft or z > zero:
                            cnt += 1
                loss += float64(part)
        elif npos > 0 and S is not None:
            d_an = _distance(M, inv, i, j, euclid)
            for p in range(N):
                if labels[p] == li and p != i:
                    _, sl = _term(_distance(M, inv, i, p, euclid) - d_an + margin, soft, zero)
                    s -= sl
        if S is not None:
            S[i, j] = s
    loss = block_sum(sbuf, loss)
    total = block_sum(sbuf, float64(cnt))
    if t == 0:
        losses[i] = loss
        counts[i] = int64(total)


@cuda.jit(cache=CACHE)
def batch_total(losses, counts, mean, empty_zero, stats, out):
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


@cuda.jit(cache=CACHE)
def backward(E, M, inv, euclid, S, pick, stats, big, g):
    """One block per embedding row r, a thread per column k: g[r, k] = scale * sum over the
    selected pairs (r, o) (``pick`` None: every o) of c dd(r, o)/de_r[k], c = S[r, o] + S[o, r].
    euclidean: c (e_r - e_o) / d (0 at d = 0); squared: 2 c (e_r - e_o); cosine:
    -c (e_o / (n_r n_o) - [n_r unclamped] cos e_r / n_r^2), n_r unclamped where
    inv_r < ``big`` = 1 / 1e-8.  ``stats`` (the "mean" denominator) or None (scale 1)."""
    r = int64(cuda.blockIdx.x)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    N = E.shape[0]
    D = E.shape[1]
    zero = big - big
    scale = cast_like(1, zero)
    if stats is not None:
        scale = cast_like(grad_scale(True, stats[0]), zero)
    inv_r = zero
    if inv is not None:
        inv_r = inv[r]
    for k in range(t, D, nt):
        er = cast_like(E[r, k], zero)
        acc = zero
        beta = zero
        for o in range(N):
            selected = True
            if pick is not None:
                selected = pick[r, o] >= 0 or pick[o, r] >= 0
            if selected:
                c = S[r, o] + S[o, r]
                eo = cast_like(E[o, k], zero)
                if inv is not None:
                    cw = c * inv_r * inv[o]
                    acc -= cw * eo
                    beta += cw * M[r, o]
                elif euclid:
                    d = math.sqrt(M[r, o])
                    w = c / d if d > zero else zero
                    acc += w * (er - eo)
                else:
                    acc += (c + c) * (er - eo)
        if inv is not None:
            beta = beta * inv_r * inv_r if inv_r < big else zero
        g[r, k] = scale * (acc + beta * er)


def batch_triplet_loss(dev, E, labels, mining, distance, margin, soft, reduction, grad, grad_out,
                       dtype):
    """Launch the four kernels on checked device views ``E`` (N, D), ``labels`` (N,) and
    ``grad_out`` (None or (N, D)); ``(loss, grad)`` as native arrays of the call's kind."""
    N, D = (int(s) for s in E.shape)
    T = compute_type(dtype)
    code = DISTANCES[distance]
    cosine = code == COSINE
    euclid = code == EUCLIDEAN
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
    counts = dev.cuda.device_array(N, np.int64)
    if N:
        tiles = -(-N // TILE)
        pairwise[(tiles, tiles), (TILE, TILE)](E, cosine, zero, M)
        if cosine:
            blocks, threads = grid_for(N)
            inverse_norms[blocks, threads](M, T(COSINE_NORM_EPS), inv)
        threads = threads_for(N)
        if mining == "hard":
            mine_hard[N, threads](M, inv, labels, euclid, T(margin), bool(soft), S, pick, losses,
                                  counts)
        elif mining == "semihard":
            mine_semihard[N, threads](M, inv, labels, euclid, T(margin), bool(soft), S, pick,
                                      losses, counts)
        else:
            mine_all[N, threads](M, inv, labels, euclid, T(margin), bool(soft), S, losses, counts)
    stats = None
    if reduction == "none":
        loss = dev.give(l_native, (N,))
    else:
        if reduction == "mean":
            stats = dev.cuda.device_array(1, np.float64)
        out_native, out = dev.empty((1,), dtype)
        batch_total[1, _blocks.THREADS](losses, counts, reduction == "mean", mining == "all", stats,
                                        out)
        loss = dev.give(out_native, ())
    if not grad:
        return loss, None
    if grad_out is not None and not overlap(grad_out, E):
        g_native, g = grad_out, grad_out
    else:  # the backward reads every row of E: an aliased gradient goes through a temporary
        g_native, g = dev.empty((N, D), dtype)
    if N and D:
        backward[N, threads_for(D)](E, M, inv, euclid, S, pick, stats, T(1 / COSINE_NORM_EPS), g)
    if grad_out is not None and g is not grad_out:
        _copy(g, grad_out)
        g_native = grad_out
    return loss, g_native


def ptx_signatures():
    """Argument types of every kernel here, for the compile check (tests/test_cuda_compile.py):
    per dtype, explicit triplets without and with (strided) gradients; the
    distance kernels; each mining mode with and without the gradient's
    selections; the backward with and without cosine norms and picks."""
    from numba import types
    i64, f64, b1, i32 = types.int64, types.float64, types.boolean, types.int32
    sigs = []
    for X, T in ((types.float16, types.float32), (types.float32, types.float32),
                 (types.float64, types.float64)):
        sigs.append((copy_rows, (T[:, ::1], X[:, :])))
        sigs.append((copy_flat, (X[::1], X[:])))
        sigs.append((triplet_rows, (X[:, :], X[:, :], X[:, ::1], i64, b1, T, T, T,
                                    types.none, types.none, types.none, X[::1])))
        sigs.append((triplet_rows, (X[:, :], X[:, ::1], X[:, :], i64, b1, T, T, T,
                                    X[:, :], X[:, ::1], X[:, :], T[::1])))
        sigs.append((pairwise, (X[:, :], b1, T, T[:, ::1])))
        sigs.append((inverse_norms, (T[:, ::1], T, T[::1])))
        M, S, P, C = T[:, ::1], T[:, ::1], i32[:, ::1], i64[::1]
        for inv, labels, losses, grad in ((types.none, i64[:], f64[::1], True),
                                          (T[::1], types.uint8[:], X[::1], False)):
            s_, p_ = (S, P) if grad else (types.none, types.none)
            for kernel in (mine_hard, mine_semihard):
                sigs.append((kernel, (M, inv, labels, b1, T, b1, s_, p_, losses, C)))
            sigs.append((mine_all, (M, inv, labels, b1, T, b1, s_, losses, C)))
        for inv, pick, stats, g in ((types.none, P, f64[::1], X[:, ::1]),
                                    (T[::1], types.none, types.none, X[:, :])):
            sigs.append((backward, (X[:, :], M, inv, b1, S, pick, stats, T, g)))
        sigs.append((batch_total, (f64[::1], C, b1, b1, f64[::1], X[::1])))
        sigs.append((batch_total, (X[::1], C, b1, b1, types.none, X[::1])))
    return sigs
