"""Data checks that must read device memory: one small kernel, one index back."""
import numpy as np
from numba import cuda, int64

from fastloss.cuda._arrays import fill
from fastloss.cuda._blocks import grid_for

_NONE = np.iinfo(np.int64).max


@cuda.jit(cache=True)
def _first_bad_label_kernel(labels, upper, skip, first):
    """first[0] = the smallest i with labels[i] outside [0, upper) and != skip."""
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < labels.shape[0]:
        v = int64(labels[i])
        if (v < 0 or v >= upper) and v != skip:
            cuda.atomic.min(first, 0, int64(i))
        i += stride


def first_bad_label(labels, upper, skip):
    """Index of the first label outside ``[0, upper)`` that is not ``skip``, or -1.

    ``labels`` is a 1-D device array of any integer dtype (uint64 values past
    int64's range read as negative, hence as out of range)."""
    n = labels.shape[0]
    if n == 0:
        return -1
    first = cuda.device_array(1, np.int64)
    fill(first, _NONE)
    blocks, threads = grid_for(n)
    _first_bad_label_kernel[blocks, threads](labels, upper, skip, first)
    bad = int(first.copy_to_host()[0])
    return -1 if bad == _NONE else bad


def ptx_signatures():
    """Argument types of every kernel here, for the compile check."""
    from numba import types
    return [(_first_bad_label_kernel, (L[:], types.int64, types.int64, types.int64[::1]))
            for L in (types.int8, types.uint8, types.int32, types.int64, types.uint64)]
