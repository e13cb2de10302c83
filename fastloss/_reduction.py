"""Reductions shared by every loss.

Kernels write one loss per sample (or per element), return their float64 sum
(summed serially after the parallel loop, so the bits do not depend on the
number of threads), and scale each gradient by ``grad_scale``; ``reduce``
turns that into the answer.  ``grad_scale`` is also callable from Numba code,
where kernels that compute their own "mean" denominator use it.
"""
import numpy as np
from numba.core.extending import register_jitable


@register_jitable
def grad_scale(mean, denominator):
    """Factor of each sample's gradient: 1/denominator for "mean", else 1.

    A "mean" over zero total weight (empty or fully ignored batch) has an
    all-zero gradient, as in PyTorch, rather than 0 * inf.
    """
    if not mean:
        return 1.0
    return 1.0 / denominator if denominator != 0 else 0.0


def reduce(per_sample, total, reduction, denominator, shape, dtype):
    """The loss as fastloss returns it, in ``dtype``.

    ``"none"``: ``per_sample`` reshaped to ``shape``; ``"sum"``: ``total`` as a
    0-d array; ``"mean"``: ``total / denominator`` (NaN when it is 0, as in
    PyTorch).
    """
    if reduction == "none":
        return per_sample.reshape(shape).astype(dtype, copy=False)
    if reduction == "mean":
        total = total / denominator if denominator != 0 else float("nan")
    return np.asarray(total, dtype=dtype)
