# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
r"""The center update of center loss (Wen et al. 2016), deterministic, no atomics.

For every class ``j`` present in the batch, with ``n_j`` rows ``x_i`` of label ``j``::

    c_j <- c_j - alpha * sum_{i: y_i = j} (c_j - x_i) / (1 + n_j)

1. count the labels and group the row indices by label (a counting sort);
2. update each present class from its own rows, accumulating in float64, the
   rows taken in a canonical order that depends on their contents only: the
   lexicographic order of their bytes (``_center_rows.h``, ``fl_sort_rows``;
   a class of one row needs no sorting).

Each class is updated by exactly one thread, so no two threads write the same
center and the bits do not depend on the number of threads; and since each
class's summands come in the same sequence however the rows of the batch are
permuted, the bits do not depend on the row order either (rows with equal
bytes are interchangeable; -0.0 and 0.0, or NaNs with different payloads, are
different bytes and are ordered like any other values).

Cost: a class of two or more rows reads the first 8 bytes of each of its rows
into a compact key array (those cache lines are then summed from cache),
sorts it (insertion sort for up to 16 rows, merges above; rows whose first 8
bytes tie are compared by ``memcmp``), and sums its rows in that order.
Classes are handled in chunks of 16 per task, pipelined: the next class's
rows are requested and sorted while this one is summed, so that its first row
is prefetched like the others.  The canonical order costs more than the
rows' own order, most for one large class (its rows are summed in content
order rather than memory order) and for rows whose leading bytes are equal
(every comparison runs ``memcmp`` further).  The wrapper
(``fastloss.cpu.center``) validates everything first and passes C-contiguous
arrays and int64 labels in ``[0, K)``.
"""
import numpy as np

from cython.parallel cimport prange, threadid
from libc.stdint cimport int64_t, uint16_t, uint64_t
from libc.string cimport memset

cdef extern from "_center_rows.h" nogil:
    ctypedef struct fl_row_key:
        uint64_t key
        int64_t row
    void fl_accumulate_ff(double* acc, const float* c, const float* x, const float* next, Py_ssize_t n)
    void fl_accumulate_fd(double* acc, const float* c, const double* x, const double* next, Py_ssize_t n)
    void fl_accumulate_fh(double* acc, const float* c, const uint16_t* x, const uint16_t* next, Py_ssize_t n)
    void fl_accumulate_df(double* acc, const double* c, const float* x, const float* next, Py_ssize_t n)
    void fl_accumulate_dd(double* acc, const double* c, const double* x, const double* next, Py_ssize_t n)
    void fl_accumulate_dh(double* acc, const double* c, const uint16_t* x, const uint16_t* next, Py_ssize_t n)
    void fl_move_f(float* c, const double* acc, double scale, Py_ssize_t n)
    void fl_move_d(double* c, const double* acc, double scale, Py_ssize_t n)
    void fl_prefetch(const void* p)
    void fl_order_rows(fl_row_key* keys, fl_row_key* tmp, const int64_t* order, Py_ssize_t n,
                       const unsigned char* base, size_t row_bytes)

cdef enum:
    CHUNK = 16  # classes per parallel task (dynamic schedule)

ctypedef fused center_t:
    float
    double

ctypedef fused feature_t:
    float
    double
    uint16_t  # float16 features, as their bits (converted exactly in _center_rows.h)


cdef void _group_rows(const int64_t[::1] labels, Py_ssize_t[::1] starts,
                      Py_ssize_t[::1] cursor, Py_ssize_t[::1] order) noexcept nogil:
    """starts[j]:starts[j + 1] indexes ``order``, the rows of label j (ascending)."""
    cdef Py_ssize_t i, j, n = labels.shape[0], K = starts.shape[0] - 1
    for j in range(K + 1):
        starts[j] = 0
    for i in range(n):
        starts[labels[i] + 1] += 1
    for j in range(K):
        starts[j + 1] += starts[j]
        cursor[j] = starts[j]
    for i in range(n):
        j = labels[i]
        order[cursor[j]] = i
        cursor[j] += 1


cdef inline void _accumulate(double* acc, const center_t* c, const feature_t* x,
                             const feature_t* next_row, Py_ssize_t D) noexcept nogil:
    if center_t is float and feature_t is float:
        fl_accumulate_ff(acc, c, x, next_row, D)
    elif center_t is float and feature_t is double:
        fl_accumulate_fd(acc, c, x, next_row, D)
    elif center_t is float:
        fl_accumulate_fh(acc, c, x, next_row, D)
    elif center_t is double and feature_t is float:
        fl_accumulate_df(acc, c, x, next_row, D)
    elif center_t is double and feature_t is uint16_t:
        fl_accumulate_dh(acc, c, x, next_row, D)
    else:
        fl_accumulate_dd(acc, c, x, next_row, D)


cdef inline bint _sorted(Py_ssize_t n, Py_ssize_t D) noexcept nogil:
    """Whether a class of n rows is summed through its sorted keys (else through ``order``:
    a single row, or rows of no bytes, need no ordering)."""
    return n > 1 and D > 0


cdef inline const feature_t* _row(const feature_t* base, Py_ssize_t D, Py_ssize_t r, bint by_key,
                                  const Py_ssize_t[::1] order, const fl_row_key* keys) noexcept nogil:
    """Row number r of a class's summation order (r indexes ``order`` / ``keys``)."""
    return base + (keys[r].row if by_key else order[r]) * D


cdef inline void _prefetch_class(const feature_t* base, Py_ssize_t D, Py_ssize_t first,
                                 Py_ssize_t last, const Py_ssize_t[::1] order) noexcept nogil:
    """Start loading the first cache line of every row of a class (its sort keys)."""
    cdef Py_ssize_t r
    if _sorted(last - first, D):
        for r in range(first, last):
            fl_prefetch(base + order[r] * D)


cdef void _update_chunk(center_t[:, ::1] centers, const feature_t[:, ::1] features,
                        const Py_ssize_t[::1] present, Py_ssize_t p0, Py_ssize_t p1,
                        const Py_ssize_t[::1] starts, const Py_ssize_t[::1] order,
                        fl_row_key* keys, fl_row_key* tmp, double alpha,
                        double* acc) noexcept nogil:
    """Update the classes present[p0:p1], one after the other, each from its rows in their
    canonical order.  Pipelined: the next class's rows are ordered while this class is
    summed (their first cache lines requested before, sorted before its last row), so
    that its first row can be prefetched like any other."""
    cdef Py_ssize_t D = centers.shape[1]
    cdef size_t row_bytes = D * sizeof(feature_t)
    cdef const feature_t* base = &features[0, 0]
    cdef const feature_t* next_row
    cdef center_t* c
    cdef Py_ssize_t p, r, j, first, last, nj, nfirst = 0, nlast = 0
    cdef bint by_key, next_by_key
    cdef double scale
    j = present[p0]
    first, last = starts[j], starts[j + 1]
    if _sorted(last - first, D):
        fl_order_rows(keys + first, tmp + first, <const int64_t*>&order[first], last - first,
                      <const unsigned char*>base, row_bytes)
    for p in range(p0, p1):
        j = present[p]
        first, last = starts[j], starts[j + 1]
        nj = last - first
        by_key = _sorted(nj, D)
        if p + 1 < p1:
            nfirst, nlast = starts[present[p + 1]], starts[present[p + 1] + 1]
            _prefetch_class(base, D, nfirst, nlast, order)
        c = &centers[j, 0]
        memset(acc, 0, D * sizeof(double))
        for r in range(first, last - 1):
            _accumulate(acc, c, _row(base, D, r, by_key, order, keys),
                        _row(base, D, r + 1, by_key, order, keys), D)
        next_row = NULL
        if p + 1 < p1:
            next_by_key = _sorted(nlast - nfirst, D)
            if next_by_key:
                fl_order_rows(keys + nfirst, tmp + nfirst, <const int64_t*>&order[nfirst],
                              nlast - nfirst,
                              <const unsigned char*>base, row_bytes)
            next_row = _row(base, D, nfirst, next_by_key, order, keys)
        _accumulate(acc, c, _row(base, D, last - 1, by_key, order, keys), next_row, D)
        scale = alpha / (1.0 + nj)
        if center_t is float:
            fl_move_f(c, acc, scale, D)
        else:
            fl_move_d(c, acc, scale, D)


def update_centers(center_t[:, ::1] centers, const feature_t[:, ::1] features,
                   const int64_t[::1] labels, double alpha, int num_threads):
    """Apply the update to ``centers`` in place (see the module docstring).

    ``num_threads == 1`` runs without OpenMP at all (safe in a forked child).
    """
    cdef Py_ssize_t K = centers.shape[0], D = centers.shape[1], N = labels.shape[0]
    cdef Py_ssize_t q, n_chunks, n_present = 0
    cdef Py_ssize_t rows = max(N, 1), width = max(D, 1)
    # Every buffer in one allocation of 8-byte words (a small call pays for each NumPy
    # call): starts (K + 1), cursor (K), order (N), the sort keys and their merge
    # buffer (two fl_row_key of 16 bytes per row), and a float64 row per thread.
    cdef Py_ssize_t[::1] work = np.empty(2 * K + 1 + 5 * rows + max(num_threads, 1) * width, np.intp)
    cdef Py_ssize_t[::1] starts = work[:K + 1]
    cdef Py_ssize_t[::1] cursor = work[K + 1:2 * K + 1]
    cdef Py_ssize_t[::1] order = work[2 * K + 1:2 * K + 1 + N]
    cdef fl_row_key* keys = <fl_row_key*>&work[2 * K + 1 + rows]
    cdef fl_row_key* tmp = keys + rows
    cdef double* scratch = <double*>&work[2 * K + 1 + 5 * rows]
    cdef Py_ssize_t[::1] present
    if N == 0:  # no row: every center stays as it is
        return 0
    assert sizeof(fl_row_key) == 2 * sizeof(Py_ssize_t) and sizeof(double) == sizeof(Py_ssize_t)
    with nogil:
        _group_rows(labels, starts, cursor, order)
        # the classes present, in ascending order, into ``cursor`` (free after the grouping)
        for q in range(K):
            if starts[q + 1] != starts[q]:
                cursor[n_present] = q
                n_present += 1
    present = cursor
    n_chunks = (n_present + CHUNK - 1) // CHUNK
    num_threads = max(1, min(num_threads, n_chunks))
    if num_threads == 1:
        with nogil:
            for q in range(n_chunks):
                _update_chunk(centers, features, present, q * CHUNK,
                              min(n_present, (q + 1) * CHUNK), starts, order, keys, tmp, alpha,
                              scratch)
    else:
        with nogil:
            for q in prange(n_chunks, schedule="dynamic", num_threads=num_threads):
                _update_chunk(centers, features, present, q * CHUNK,
                              min(n_present, (q + 1) * CHUNK), starts, order, keys, tmp, alpha,
                              scratch + threadid() * width)
    return n_present
