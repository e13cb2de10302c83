r"""Fused Huber loss (CPU), elementwise: the kernel and its host-side preparation.

With ``r = input - target``, threshold ``delta`` and weight ``w``
(``fastloss.formulas.huber``)::

    L = w * (0.5 r^2              if |r| <= delta
             delta (|r| - delta/2) otherwise)
    dL/dinput = w * clip(r, -delta, delta)   (NaN stays NaN)

Sample weights reach the kernel compactly, never broadcast to the input's
size (``_storage.compact_weights``): element ``i`` has weight
``sw[(i // inner) % period]`` (``inner`` > 1: one weight per run of ``inner``
elements; ``inner == 1``: weights cycling along the trailing axes).  A chunk
is cut into spans along which the weight is either one scalar or a contiguous
slice of ``sw``, so every inner loop is branch-free and vectorizes.
"""
import numpy as np
from numba import njit, prange

from fastloss._reduction import grad_scale, reduce
from fastloss.cpu import _storage
from fastloss.cpu._formulas import huber
from fastloss.cpu._math import load, store
from fastloss.cpu._jit import KERNEL_OPTIONS
from fastloss.cpu._rows import loss_total, row_sum, use_threads
from fastloss.cpu._threads import launch

# No transcendental functions here, so reassociation is safe.
_OPTIONS = dict(KERNEL_OPTIONS, fastmath={"contract", "reassoc", "nsz"})
ELEMENT_CHUNK = 4096  # elements per parallel task; its scratch stays in L1


@njit(**_OPTIONS)
def _span(x, t, w, sw, delta, gscale, out, gout):
    """All elements of x, t with the weight ``w`` (``sw`` None) or the weights
    ``sw[0], sw[1], ...``.

    ``sw`` is None or an array in a given call, so Numba compiles one of the
    two branches into each specialization: two branch-free loops that
    vectorize.  Callers pass slices, so every index here is a plain ``range``
    index that Numba knows to be non-negative (no wrap-around test to stop
    vectorization).
    """
    half = out.dtype.type(0.5)
    zero = out.dtype.type(0.0)
    for i in range(x.shape[0]):
        wi = w if sw is None else sw[i]
        r = load(x, i) - load(t, i)
        out[i] = wi * huber.huber(r, delta, half)
        store(gout, i, gscale * wi * huber.huber_slope(r, delta, zero))


@njit(**_OPTIONS)
def _chunks(first, last, x, t, sw, inner, period, delta, scale, g, losses, losses_half,
            chunk_sums):
    """Chunks [first, last); chunk_sums[b] = float64 sum of chunk b's losses, which are
    also kept in ``losses`` (one per element) or rounded into ``losses_half``
    (float16 bits) when one of them is given.  ``sw`` and ``g``: None when absent."""
    n = x.shape[0]
    scratch = np.empty(0 if losses is not None else ELEMENT_CHUNK, type(delta))
    g_scratch = np.empty(0 if g is not None else ELEMENT_CHUNK, x.dtype)
    one = type(delta)(1.0)
    for b in range(first, last):
        lo = b * ELEMENT_CHUNK
        hi = min(n, lo + ELEMENT_CHUNK)
        out, o = (losses, lo) if losses is not None else (scratch, 0)
        gout, go = (g, lo) if g is not None else (g_scratch, 0)
        if sw is None:
            _span(x[lo:hi], t[lo:hi], one, None, delta, scale, out[o:], gout[go:])
        else:
            i = lo
            while i < hi:
                if inner > 1:  # one weight per run of `inner` elements
                    end = min(hi, (i // inner + 1) * inner)
                    _span(x[i:end], t[i:end], sw[(i // inner) % period], None, delta, scale,
                          out[o + i - lo:], gout[go + i - lo:])
                else:  # weights cycle with `period`
                    k = i % period
                    end = min(hi, i + period - k)
                    _span(x[i:end], t[i:end], one, sw[k:], delta, scale,
                          out[o + i - lo:], gout[go + i - lo:])
                i = end
        chunk_sums[b] = row_sum(out[o:o + hi - lo], 0.0)
        if losses_half is not None:
            for i in range(hi - lo):
                store(losses_half, lo + i, out[i])


@njit(parallel=True, **_OPTIONS)
def _huber_parallel(x, t, sw, inner, period, delta, scale, g, losses, losses_half, chunk_sums):
    for b in prange(chunk_sums.shape[0]):
        _chunks(b, b + 1, x, t, sw, inner, period, delta, scale, g, losses, losses_half,
                chunk_sums)
    return loss_total(chunk_sums)


@njit(**_OPTIONS)
def _huber_serial(x, t, sw, inner, period, delta, scale, g, losses, losses_half, chunk_sums):
    _chunks(0, chunk_sums.shape[0], x, t, sw, inner, period, delta, scale, g, losses,
            losses_half, chunk_sums)
    return loss_total(chunk_sums)


def huber_loss(input, target, sample_weight, delta, reduction, grad, grad_out):
    """``(loss, grad)`` of ``fastloss.huber_loss`` on checked NumPy arguments
    (``sample_weight`` None or broadcasting against ``input``).

    The loss total is the float64 sum of the losses, summed per chunk, then in
    order: thread-count independent.
    """
    T = _storage.compute_type(input.dtype)
    n = input.size
    sw, inner, period, denom = None, 1, 1, float(n)
    if sample_weight is not None:
        sw, inner, period = _storage.compact_weights(sample_weight, input.shape, T)
        denom = float(np.sum(sample_weight, dtype=np.float64)) * (n / max(sample_weight.size, 1))
    x = _storage.kernel_view(input, (n,))
    t = _storage.kernel_view(target.astype(input.dtype, copy=False), (n,))
    g = written = result = None
    if grad:
        g, written, result = _storage.gradient_arrays(True, grad_out, input, (n,),
                                                      (target, sample_weight))
    losses, losses_half = _storage.element_loss_buffers(n, reduction, input.dtype, T)
    chunk_sums = np.empty(-(-n // ELEMENT_CHUNK), np.float64)
    total = launch(_huber_parallel, _huber_serial, use_threads(x), x, t, sw, inner, period,
                   T(delta), T(grad_scale(reduction == "mean", denom)), g, losses, losses_half,
                   chunk_sums)
    loss = reduce(_storage.element_losses_result(losses, losses_half), total, reduction, denom,
                  input.shape, input.dtype)
    return loss, (_storage.finish_gradient(written, result) if grad else None)
