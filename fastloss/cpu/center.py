r"""Center loss (CPU): the fused loss-and-gradient kernel, and the launch of the Cython update.

Per row ``i`` with label ``y_i`` and the centers as they are before any update::

    L_i = 0.5 * ||x_i - c_{y_i}||^2
    dL/dx_i = scale * (x_i - c_{y_i})      (scale = 1/N for "mean", else 1)

Each row reads its features and its center once and writes its gradient row
once; the gradient may not alias the centers (the wrapper sees to it).  The
center update is separate: the Cython extension ``_center_update``.
"""

import numba
import numpy as np
from numba import njit, prange
from numba.core.extending import register_jitable

from fastloss._reduction import grad_scale, reduce
from fastloss.cpu._math import load, store
from fastloss.cpu._jit import KERNEL_OPTIONS
from fastloss.cpu._rows import ROW_BLOCK_ELEMENTS, loss_total, use_threads
from fastloss.cpu._storage import apart, compute_type, finish_gradient, gradient_buffer, kernel_view
from fastloss.cpu._threads import launch, note_gnu_openmp, threads_allowed

try:  # imported once: an import statement in each call would cost small calls
    from fastloss.cpu import _center_update
    _center_update_error = None
except ImportError as exc:  # raised, with this cause, by the first update
    _center_update, _center_update_error = None, exc

# No transcendental functions here, so reassociation is safe (and vectorizes the sum).
_OPTIONS = dict(KERNEL_OPTIONS, fastmath={"contract", "reassoc", "nsz"})


# The row functions are inlined into _rows (compiled under its options): a call per
# row, with its vector loop's set-up, cost more than the arithmetic of a narrow row.
@register_jitable(inline="always")
def _row_loss(x, c, zero):
    s = zero
    for d in range(x.shape[0]):
        diff = load(x, d) - c[d]
        s += diff * diff
    return s


@register_jitable(inline="always")
def _row_grad(x, c, scale, g):
    """g = scale * (x - c), in a loop of its own after the loss: were the store in the
    loss's loop, a g that may be x itself (in place) would make LLVM fall back to a
    scalar sum, rounded differently from the vectorized one."""
    for d in range(x.shape[0]):
        store(g, d, scale * (load(x, d) - c[d]))


@njit(**_OPTIONS)
def _rows(first, last, x, labels, centers, scale, g, losses):
    """Rows [first, last): their losses, and their gradient rows unless ``g`` is None."""
    half = losses.dtype.type(0.5)
    zero = losses.dtype.type(0.0)
    for i in range(first, last):
        c = centers[labels[i]]
        losses[i] = half * _row_loss(x[i], c, zero)
        if g is not None:
            _row_grad(x[i], c, scale, g[i])


@njit(parallel=True, **_OPTIONS)
def _center_parallel(x, labels, centers, scale, g, losses):
    n = x.shape[0]
    rows = max(1, ROW_BLOCK_ELEMENTS // max(1, x.shape[1]))
    for b in prange(-(-n // rows)):
        _rows(b * rows, min(n, (b + 1) * rows), x, labels, centers, scale, g, losses)
    return loss_total(losses)


@njit(**_OPTIONS)
def _center_serial(x, labels, centers, scale, g, losses):
    _rows(0, x.shape[0], x, labels, centers, scale, g, losses)
    return loss_total(losses)


def center_loss(features, labels, centers, alpha, update, reduction, grad, grad_out):
    """``(loss, grad)`` of ``fastloss.center_loss`` on checked arguments (int64
    ``labels``; ``grad_out`` apart from ``centers``), with the centers as given;
    then, when ``update``, the update of ``centers`` in place."""
    n = features.shape[0]
    T = compute_type(features.dtype)
    x = kernel_view(features)
    c = np.ascontiguousarray(centers, dtype=T)
    g = written = result = None
    if grad:  # the update reads the features after the gradient is written: never in place then
        reads = (features, centers, labels) if update else (centers, labels)
        written, result = gradient_buffer(grad_out, features.shape, features.dtype,
                                          None if update else features, reads)
        g = kernel_view(written)
    losses = np.empty(n, T)
    total = launch(_center_parallel, _center_serial, use_threads(x), x, labels, c,
                   T(grad_scale(reduction == "mean", n)), g, losses)
    if update:
        center_update(centers, features, labels, alpha)
    loss = reduce(losses, total, reduction, n, (n,), features.dtype)
    return loss, (finish_gradient(written, result) if grad else None)


def center_update(centers, features, labels, alpha):
    """The Cython update on validated arrays: ``centers`` (K, D) float32/float64
    is updated in place; ``features`` (N, D) any float dtype; int64 ``labels``
    in [0, K).  Threads: Numba's count (``numba.set_num_threads`` and
    ``NUMBA_NUM_THREADS`` apply), one for small batches."""
    if _center_update is None:  # a source tree that was never built
        raise ImportError("fastloss's Cython extension fastloss.cpu._center_update is not built: "
                          "install the package (pip install -e .)") from _center_update_error
    if not apart(features, centers):
        features = features.copy()
    x = np.ascontiguousarray(features)
    if x.dtype == np.float16:  # the extension reads float16 as its bits, converted exactly
        x = x.view(np.uint16)
    c = centers if centers.flags.c_contiguous else np.ascontiguousarray(centers)
    # The extension's OpenMP is libgomp: none in a child forked after libgomp ran.
    threads = numba.get_num_threads() if use_threads(x) and threads_allowed() else 1
    if threads > 1:
        note_gnu_openmp()
    _center_update.update_centers(c, x, np.ascontiguousarray(labels), float(alpha), threads)
    if c is not centers:
        np.copyto(centers, c)
    return centers
