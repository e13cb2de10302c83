"""Data checks that must read device memory: one small kernel, one index back."""
import functools
import threading

import numpy as np
from numba import cuda, int64

from fastloss.cuda._blocks import kernel
from fastloss.cuda._reduction import elementwise_grid

_NONE = np.iinfo(np.int64).max
_PINNED = threading.local()  # per thread: two threads may check labels at once


@kernel()
def _first_bad_label_kernel(labels, upper, skip, first):
    """first[0] = the smallest i with labels[i] outside [0, upper) and != skip."""
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < labels.shape[0]:
        v = int64(labels[i])
        if (v < 0 or v >= upper) and v != skip:
            cuda.atomic.min(first, 0, int64(i))
        i += stride


def _pinned_slots():
    """``(start, found)``: pinned host int64 arrays of one element, ``start``
    holding ``_NONE`` (never written again), ``found`` where the answer lands."""
    if not hasattr(_PINNED, "slots"):
        start = cuda.pinned_array(1, np.int64)
        start[0] = _NONE
        _PINNED.slots = (start, cuda.pinned_array(1, np.int64))
    return _PINNED.slots


def first_bad_label(labels, upper, skip, dev):
    """Index of the first label outside ``[0, upper)`` that is not ``skip``, or -1.

    ``labels`` is a 1-D device array of any integer dtype (uint64 values past
    int64's range read as negative, hence as out of range).  ``dev`` is the
    call's ``Device`` (the wrappers hand ``label_check(dev)`` to the validation).

    Cost: one kernel launch and two 8-byte copies between the device and
    pinned host memory, on the call's stream, then one wait for that stream:
    the only point where a call with integer labels waits for the GPU."""
    n = labels.shape[0]
    if n == 0:
        return -1
    start, found = _pinned_slots()
    first = dev.scratch((1,), np.int64, "first_bad_label")
    with dev.current():
        first.copy_to_device(start, stream=dev.stream)
        blocks, threads = elementwise_grid(n)  # a few waves, several labels per thread
        dev.launch(_first_bad_label_kernel, blocks, threads, labels, upper, skip, first)
        first.copy_to_host(found, stream=dev.stream)
        dev.stream.synchronize()
    bad = int(found[0])
    return -1 if bad == _NONE else bad


def label_check(dev):
    """``first_bad_label`` on the call's ``dev``, as the ``first_bad`` argument of
    ``_validation.labels_in_range`` (the GPU branch of a wrapper passes it)."""
    return functools.partial(first_bad_label, dev=dev)


def _pointer(v):
    iface = getattr(v, "__cuda_array_interface__", None)
    return iface["data"][0] if iface is not None else v._ary.__array_interface__["data"][0]


def _extent(v):
    """``(pointer, [lo, hi))``: where a device view starts and the bytes it spans
    (None for an empty one).  Under the simulator the pointers are those of the
    NumPy arrays that its device arrays wrap."""
    shape, strides = tuple(v.shape), tuple(v.strides)
    if any(s == 0 for s in shape):
        return None
    ptr = _pointer(v)
    lo = hi = ptr
    for s, st in zip(shape, strides):
        if st > 0:
            hi += (s - 1) * st
        else:
            lo += (s - 1) * st
    return ptr, (lo, hi + v.dtype.itemsize)


def shares_memory(a, b):
    """Whether two device views may overlap (None or empty: never): their byte
    ranges intersect (conservative, as ``np.may_share_memory``)."""
    ea = None if a is None else _extent(a)
    eb = None if b is None else _extent(b)
    return ea is not None and eb is not None and ea[1][0] < eb[1][1] and eb[1][0] < ea[1][1]


def same_view(a, b):
    """Whether two device views are the same elements in the same layout."""
    if a is b:
        return True
    if (tuple(a.shape) != tuple(b.shape) or tuple(a.strides) != tuple(b.strides)
            or a.dtype != b.dtype):
        return False
    return _pointer(a) == _pointer(b)


def grad_out_apart(grad_out, first, **inputs):
    """ValueError naming ``grad_out`` when it may share memory with one of ``inputs``
    (device views by name).  The input named ``first`` (the argument the gradient is
    taken against) is allowed when ``grad_out`` is exactly it (the same pointer, shape,
    strides and dtype), which the kernels read element by element before writing.
    The kernels write ``grad_out`` directly, so any other overlap would let one
    thread's gradient land on what another thread has yet to read."""
    if grad_out is None:
        return
    for name, a in inputs.items():
        if a is None or not hasattr(a, "shape") or not shares_memory(grad_out, a):
            continue
        if name == first and same_view(grad_out, a):
            continue
        raise ValueError(f"grad_out shares memory with {name}: on the GPU, grad_out may be the "
                         f"first argument itself (in place) but must not overlap another input")


def ptx_signatures():
    """Argument types of every kernel here, for the compile check."""
    from numba import types
    return [(_first_bad_label_kernel, (L[:], types.int64, types.int64, types.int64[::1]))
            for L in (types.int8, types.uint8, types.int32, types.int64, types.uint64)]
