r"""The backward pass of batch mining (CPU).

The mining (``batch_mining``, ``hard_mining``) leaves records, anchor ``a`` owning the slots
``off[a]:off[a+1]`` of ``(j, c)`` ("the loss contains ``c * d(a, j)``"), or, for ``"all"``, a
dense symmetric coefficient matrix ``S``.  The backward runs over rows ``r`` (in parallel when the
work is large): row ``r`` gathers the pairs it is an endpoint of (its own records, and the
``incoming`` ones, sorted by endpoint with a stable counting sort; or row ``r`` of ``S``) and
writes only its own gradient row: race-free and deterministic without atomics.  The pair
derivatives are ``fastloss.formulas.triplet``'s.
"""
import functools
import math
from collections import namedtuple

import numpy as np
from numba import njit, prange

from fastloss.cpu._math import store
from fastloss.cpu._jit import KERNEL_OPTIONS, jit, reduction_jit
from fastloss.cpu._rows import ROW_BLOCK_ELEMENTS, paths
from fastloss.cpu._threads import launch
from fastloss.cpu._formulas import triplet
from fastloss.formulas.triplet import COSINE_NORM_EPS

# the records by their other endpoint: row r's are the anchors a[off[r]:off[r+1]], with their
# coefficients c
Incoming = namedtuple("Incoming", "off a c")


def distance_flags(code):
    """``(cosine, euclid)`` for a distance's code: True for the one it is, else None (both None:
    squared), so that a kernel compiles only its distance's branches (see ``_rows.paths``)."""
    euclid, _, cosine = paths(code, 3)  # the codes' order: EUCLIDEAN, SQUARED, COSINE
    return cosine, euclid


def incoming(records):
    """The records by their other endpoint (``Incoming``), sorted stably (anchor order, then
    slot order); its arrays have a slot per record, the first ``off[N]`` used.  Allocated
    here: a kernel that allocates compiles NumPy's allocators with it."""
    off, rec_j, rec_c = records
    N = off.shape[0] - 1
    into = Incoming(np.zeros(N + 1, np.int64), np.empty(rec_j.shape[0], np.int64),
                    np.empty(rec_j.shape[0], rec_c.dtype))
    _counting_sort(off, rec_j, rec_c, np.empty(N, np.int64), *into)
    return into


@jit
def _counting_sort(off, rec_j, rec_c, fill, in_off, in_a, in_c):
    """``incoming``'s stable counting sort; ``in_off`` all zeros on entry."""
    N = off.shape[0] - 1
    for k in range(rec_j.shape[0]):
        j = rec_j[k]
        if j >= 0:
            in_off[j + 1] += 1
    for r in range(N):
        in_off[r + 1] += in_off[r]
        fill[r] = in_off[r]
    for a in range(N):
        for k in range(off[a], off[a + 1]):
            j = rec_j[k]
            if j >= 0:
                in_a[fill[j]] = a
                in_c[fill[j]] = rec_c[k]
                fill[j] += 1


@reduction_jit
def _pair_grad(er, eo, c, cw, cosine, euclid, acc):
    """acc += c * dd(r, o)/de_r for one pair (r, o), except cosine's e_r term, whose
    coefficient (before the factor 1 / n_r^2) is returned.  The distance: ``cosine`` or
    ``euclid`` True, or both None (squared); the others are pruned at compile time.

    euclidean: the exact difference over its exact norm, c (e_r - e_o) / ||e_r - e_o|| (0 for
    identical embeddings); squared: 2 c (e_r - e_o); cosine: -cw e_o, cw = c / (n_r n_o), and
    the e_r term's coefficient cw e_r.e_o (the dot product recomputed from the rows)."""
    zero = acc.dtype.type(0.0)
    if cosine is not None:
        dot = zero
        for k in range(er.shape[0]):
            dot += er[k] * eo[k]
            acc[k] -= cw * eo[k]
        return cw * dot
    d = zero
    if euclid is not None:
        s = zero
        for k in range(er.shape[0]):
            t = er[k] - eo[k]
            s += t * t
        d = math.sqrt(s)
    w = triplet.difference_weight(euclid is not None, c, d, zero)
    for k in range(er.shape[0]):
        acc[k] += w * (er[k] - eo[k])
    return zero


@jit
def _backward_rows(first, last, E, inv, cosine, euclid, S, off, rec_j, rec_c, in_off, in_a, in_c,
                   scale, g):
    """Gradient rows [first, last), from the pairs in ``S`` or in the records ``off, rec_j,
    rec_c`` and their ``incoming`` ``in_off, in_a, in_c``, the others None.  Cosine:
    dd(r, o)/de_r = -(e_o / (n_r n_o) - [|e_r| > 1e-8] cos e_r / n_r^2) with the norms n
    clamped at 1e-8; the e_r terms add up in ``beta``."""
    T = E.dtype.type
    D = E.shape[1]
    acc = np.empty(D, T)
    zero = T(0.0)
    for r in range(first, last):
        acc[:] = 0
        beta = zero
        er = E[r]
        inv_r = inv[r]
        if S is not None:
            Sr = S[r]
            for o in range(S.shape[1]):
                c = Sr[o]
                beta += _pair_grad(er, E[o], c, triplet.cosine_weight(c, inv_r, inv[o]),
                                   cosine, euclid, acc)
        if off is not None:  # (each of S and the records is pruned where None, at compile time)
            for k in range(off[r], off[r + 1]):
                o = rec_j[k]
                if o >= 0:
                    c = rec_c[k]
                    beta += _pair_grad(er, E[o], c, triplet.cosine_weight(c, inv_r, inv[o]),
                                   cosine, euclid, acc)
            for k in range(in_off[r], in_off[r + 1]):
                o = in_a[k]
                c = in_c[k]
                beta += _pair_grad(er, E[o], c, triplet.cosine_weight(c, inv_r, inv[o]),
                                   cosine, euclid, acc)
        # |e_r| > 1e-8, i.e. its norm is not clamped: n_r = 1 / inv_r
        if cosine is not None:
            beta = triplet.cosine_self_weight(beta, inv_r, 1 / COSINE_NORM_EPS, zero)
        gr = g[r]
        for k in range(D):
            store(gr, k, scale * (acc[k] + beta * er[k]))


@njit(parallel=True, **KERNEL_OPTIONS)
def _backward_parallel(E, inv, cosine, euclid, S, off, rec_j, rec_c, in_off, in_a, in_c, scale,
                       g):
    N, D = E.shape
    block = max(1, ROW_BLOCK_ELEMENTS // max(D * (N if S is not None else 4), 1))
    for b in prange((N + block - 1) // block):
        _backward_rows(b * block, min(N, (b + 1) * block), E, inv, cosine, euclid, S, off, rec_j,
                       rec_c, in_off, in_a, in_c, scale, g)


def batch_backward(E, inv, dist, records, S, scale, g, min_work):
    """g[r] = scale * sum over the records touching r of coef * dd(r, other)/de_r (or, with a
    dense symmetric ``S``, over every other row ``o`` with coefficient S[r, o]); in parallel
    from ``min_work`` (see ``batch_mining.BATCH_PARALLEL_MIN_WORK``)."""
    N, D = E.shape
    if S is not None:
        pairs = (None,) * 6
        work = N * N * D
    else:
        pairs = records + incoming(records)
        work = 2 * records.j.shape[0] * D
    # serially, _backward_rows over every row: a serial kernel of its own would be one more
    # function to compile on a first call
    launch(_backward_parallel, functools.partial(_backward_rows, 0, N), work >= min_work and N > 1,
           E, inv, *distance_flags(dist), S, *pairs, E.dtype.type(scale), g)
