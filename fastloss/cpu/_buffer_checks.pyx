# cython: language_level=3, boundscheck=False, wraparound=False
"""The checks of a caller's NumPy ``grad_out`` on a call's fast path, compiled.

A reused gradient buffer must cost no more than a new one (``np.empty``), and
in Python the attribute reads of these checks alone cost more than that.  Each
function answers only the common case, True; False means "not shown here", and
the caller then runs the full checks of ``fastloss._validation`` and
``fastloss.cpu._storage``, which raise the errors and choose a temporary.  A
source tree that was never built answers False to all but ``apart``
(``fastloss.cpu._storage``'s fallback), so it takes those full checks every
time; tests/test_buffer_checks.py holds each function to its definition and
the two paths to the same outcomes.

Overlap is decided as ``np.may_share_memory`` decides it by default: the byte
ranges that the two arrays' elements span intersect (an empty array spans
none).
"""
cimport numpy as cnp
from libc.stdint cimport intptr_t

cnp.import_array()


cdef inline bint _span(cnp.ndarray a, intptr_t* lo, intptr_t* hi) noexcept:
    """[lo, hi): the addresses of the bytes ``a``'s elements span (as integers: pointers
    into two allocations do not compare in C); False when ``a`` is empty."""
    cdef int k
    cdef cnp.npy_intp n, s
    cdef intptr_t low = <intptr_t>cnp.PyArray_DATA(a)
    cdef intptr_t high = low
    for k in range(cnp.PyArray_NDIM(a)):
        n = cnp.PyArray_DIM(a, k)
        if n == 0:
            return False
        s = cnp.PyArray_STRIDE(a, k)
        if s > 0:
            high += s * (n - 1)
        else:
            low += s * (n - 1)
    lo[0] = low
    hi[0] = high + cnp.PyArray_ITEMSIZE(a)
    return True


cdef inline bint _apart(intptr_t lo, intptr_t hi, object b) noexcept:
    """Whether ``b`` (an array or None) spans no byte of ``[lo, hi)``; anything but
    an ndarray is not shown apart."""
    cdef intptr_t blo, bhi
    if b is None:
        return True
    if not isinstance(b, cnp.ndarray):
        return False
    if not _span(<cnp.ndarray>b, &blo, &bhi):
        return True
    return hi <= blo or bhi <= lo


cdef inline bint _same_view(cnp.ndarray a, cnp.ndarray b) noexcept:
    """The same elements in the same layout: data, shape, strides and dtype."""
    cdef int k
    if (cnp.PyArray_DATA(a) != cnp.PyArray_DATA(b) or cnp.PyArray_NDIM(a) != cnp.PyArray_NDIM(b)
            or not cnp.PyArray_EquivTypes(<cnp.dtype>cnp.PyArray_DESCR(a),
                                       <cnp.dtype>cnp.PyArray_DESCR(b))):
        return False
    for k in range(cnp.PyArray_NDIM(a)):
        if (cnp.PyArray_DIM(a, k) != cnp.PyArray_DIM(b, k)
                or cnp.PyArray_STRIDE(a, k) != cnp.PyArray_STRIDE(b, k)):
            return False
    return True


cdef inline bint _writable(object g) noexcept:
    return type(g) is cnp.ndarray and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>g)


def ready(g, shape, dtype):
    """Whether ``g`` is a writable NumPy array (not a subclass) of ``shape`` (a tuple)
    and of exactly the dtype object ``dtype``."""
    cdef int k
    cdef cnp.npy_intp v
    cdef cnp.ndarray a
    cdef tuple dims
    if not _writable(g) or type(shape) is not tuple:
        return False
    a = <cnp.ndarray>g
    dims = <tuple>shape
    if <object>cnp.PyArray_DESCR(a) is not dtype or cnp.PyArray_NDIM(a) != len(dims):
        return False
    for k in range(cnp.PyArray_NDIM(a)):
        d = dims[k]
        if type(d) is not int:
            return False
        try:
            v = d
        except OverflowError:  # no array has that many elements along an axis
            return False
        if v != cnp.PyArray_DIM(a, k):
            return False
    return True


def ready_apart(tuple buffers, tuple likes, tuple inputs=()):
    """Whether each ``buffers[k]`` is a writable NumPy array (not a subclass) of the shape
    and the very dtype object of the array ``likes[k]`` (as many), no two buffers
    overlap, and none overlaps an array of ``inputs`` (None among them)."""
    cdef Py_ssize_t i, j, k, n = len(buffers)
    cdef cnp.ndarray a, like
    cdef intptr_t lo, hi
    if len(likes) != n:
        return False
    for i in range(n):
        if not _writable(buffers[i]) or type(likes[i]) is not cnp.ndarray:
            return False
        a, like = <cnp.ndarray>buffers[i], <cnp.ndarray>likes[i]
        if (cnp.PyArray_DESCR(a) is not cnp.PyArray_DESCR(like)
                or cnp.PyArray_NDIM(a) != cnp.PyArray_NDIM(like)):
            return False
        for k in range(cnp.PyArray_NDIM(a)):
            if cnp.PyArray_DIM(a, k) != cnp.PyArray_DIM(like, k):
                return False
    for i in range(n):
        if _span(<cnp.ndarray>buffers[i], &lo, &hi):
            for j in range(i + 1, n):
                if not _apart(lo, hi, buffers[j]):
                    return False
            for b in inputs:
                if not _apart(lo, hi, b):
                    return False
    return True


def apart(a, b):
    """Whether two arrays (either may be None) surely share no memory: the negation of
    ``np.may_share_memory``; anything else but None and ndarrays is not shown apart."""
    cdef intptr_t lo, hi
    if a is None or b is None:
        return True
    if not isinstance(a, cnp.ndarray):
        return False
    if not _span(<cnp.ndarray>a, &lo, &hi):
        return True
    return _apart(lo, hi, b)


def writes_directly(g, inplace_ok, tuple reads):
    """Whether a kernel may write its gradient straight into ``g``: a C-contiguous
    array that is ``inplace_ok`` itself (the same view: the input the kernel reads
    element by element before writing that element) or apart from it, and apart
    from every array of ``reads`` (None among them)."""
    cdef intptr_t lo, hi
    cdef cnp.ndarray a
    if type(g) is not cnp.ndarray or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>g):
        return False
    a = <cnp.ndarray>g
    if not _span(a, &lo, &hi):
        return True
    if inplace_ok is not None and inplace_ok is not g and not (
            isinstance(inplace_ok, cnp.ndarray) and _same_view(a, <cnp.ndarray>inplace_ok)):
        if not _apart(lo, hi, inplace_ok):
            return False
    for b in reads:
        if not _apart(lo, hi, b):
            return False
    return True
