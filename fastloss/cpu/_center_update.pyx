# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
r"""The center update of center loss (Wen et al. 2016), deterministic, no atomics.

For every class ``j`` present in the batch, with ``n_j`` rows ``x_i`` of label ``j``::

    c_j <- c_j - alpha * sum_{i: y_i = j} (c_j - x_i) / (1 + n_j)

1. count the labels and group the row indices by label (a stable counting sort);
2. update each present class from its own rows, in ascending row order,
   accumulating in float64.

Each class is updated by exactly one thread, so no two threads write the same
center and the bits do not depend on the number of threads; a permutation of
the rows only reorders a float64 sum (round-off).  The wrapper
(``fastloss.center``) validates everything first and passes C-contiguous
arrays and int64 labels in ``[0, K)``.
"""
import numpy as np

from cython.parallel cimport prange, threadid
from libc.stdint cimport int64_t
from libc.string cimport memset

cdef extern from "_center_rows.h" nogil:
    void fl_accumulate_ff(double* acc, const float* c, const float* x, const float* next, Py_ssize_t n)
    void fl_accumulate_fd(double* acc, const float* c, const double* x, const double* next, Py_ssize_t n)
    void fl_accumulate_df(double* acc, const double* c, const float* x, const float* next, Py_ssize_t n)
    void fl_accumulate_dd(double* acc, const double* c, const double* x, const double* next, Py_ssize_t n)
    void fl_move_f(float* c, const double* acc, double scale, Py_ssize_t n)
    void fl_move_d(double* c, const double* acc, double scale, Py_ssize_t n)

ctypedef fused center_t:
    float
    double

ctypedef fused feature_t:
    float
    double


cdef void _group_rows(const int64_t[::1] labels, Py_ssize_t[::1] starts,
                      Py_ssize_t[::1] cursor, Py_ssize_t[::1] order) noexcept nogil:
    """starts[j]:starts[j + 1] indexes ``order``, the rows of label j in ascending order."""
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


cdef inline void _update_class(center_t[:, ::1] centers, const feature_t[:, ::1] features,
                               Py_ssize_t j, const Py_ssize_t[::1] starts,
                               const Py_ssize_t[::1] order, double alpha,
                               double* acc) noexcept nogil:
    cdef Py_ssize_t r, D = centers.shape[1]
    cdef center_t* c = &centers[j, 0]
    cdef const feature_t* x
    cdef const feature_t* next_row
    cdef double scale = alpha / (1.0 + (starts[j + 1] - starts[j]))
    memset(acc, 0, D * sizeof(double))
    for r in range(starts[j], starts[j + 1]):
        x = &features[order[r], 0]
        # prefetched: the next row, of this class or of the class that follows
        next_row = &features[order[r + 1], 0] if r + 1 < order.shape[0] else NULL
        if center_t is float and feature_t is float:
            fl_accumulate_ff(acc, c, x, next_row, D)
        elif center_t is float and feature_t is double:
            fl_accumulate_fd(acc, c, x, next_row, D)
        elif center_t is double and feature_t is float:
            fl_accumulate_df(acc, c, x, next_row, D)
        else:
            fl_accumulate_dd(acc, c, x, next_row, D)
    if center_t is float:
        fl_move_f(c, acc, scale, D)
    else:
        fl_move_d(c, acc, scale, D)


def update_centers(center_t[:, ::1] centers, const feature_t[:, ::1] features,
                   const int64_t[::1] labels, double alpha, int num_threads):
    """Apply the update to ``centers`` in place (see the module docstring).

    ``num_threads == 1`` runs without OpenMP at all (safe in a forked child).
    """
    cdef Py_ssize_t K = centers.shape[0], D = centers.shape[1]
    cdef Py_ssize_t p, n_present = 0
    cdef Py_ssize_t[::1] starts = np.empty(K + 1, np.intp)
    cdef Py_ssize_t[::1] cursor = np.empty(max(K, 1), np.intp)
    cdef Py_ssize_t[::1] order = np.empty(labels.shape[0], np.intp)
    cdef Py_ssize_t[::1] present
    cdef double[:, ::1] scratch
    with nogil:
        _group_rows(labels, starts, cursor, order)
    present_classes = np.flatnonzero(np.diff(np.asarray(starts)))
    present = present_classes.astype(np.intp, copy=False)
    n_present = present.shape[0]
    num_threads = max(1, min(num_threads, n_present))
    scratch = np.empty((num_threads, max(D, 1)), np.float64)
    if num_threads == 1:
        with nogil:
            for p in range(n_present):
                _update_class(centers, features, present[p], starts, order, alpha, &scratch[0, 0])
    else:
        with nogil:
            for p in prange(n_present, schedule="dynamic", chunksize=16, num_threads=num_threads):
                _update_class(centers, features, present[p], starts, order, alpha,
                              &scratch[threadid(), 0])
    return n_present
