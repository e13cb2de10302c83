r"""Fused Huber loss kernel (CPU), elementwise.

With ``r = input - target``, threshold ``delta`` and weight ``w``::

    L = w * (0.5 r^2              if |r| <= delta
             delta (|r| - delta/2) otherwise)
    dL/dinput = w * clip(r, -delta, delta)   (NaN stays NaN)

Sample weights reach the kernel compactly, never broadcast to the input's
size: element ``i`` has weight ``sw[(i // inner) % period]`` (``inner`` > 1:
one weight per run of ``inner`` elements; ``inner == 1``: weights cycling
along the trailing axes).  A chunk is cut into spans along which the weight
is either one scalar or a contiguous slice of ``sw``, so every inner loop is
branch-free and vectorizes.
"""
import numpy as np
from numba import njit, prange

from fastloss.cpu._math import load, store
from fastloss.cpu._rows import KERNEL_OPTIONS, loss_total, row_sum, use_threads
from fastloss.cpu._threads import launch

# No transcendental functions here, so reassociation is safe.
_OPTIONS = dict(KERNEL_OPTIONS, fastmath={"contract", "reassoc", "nsz"})
ELEMENT_CHUNK = 4096  # elements per parallel task; its scratch stays in L1


@njit(**_OPTIONS)
def _span(x, t, w, delta, gscale, out, gout):
    """All elements of x, t with one weight ``w``.

    Callers pass slices, so every index here is a plain ``range`` index that
    Numba knows to be non-negative (no wrap-around test to stop vectorization).
    """
    half = out.dtype.type(0.5)
    for i in range(x.shape[0]):
        r = load(x, i) - load(t, i)
        a = abs(r)
        quad = a <= delta
        out[i] = w * (half * r * r if quad else delta * (a - half * delta))
        store(gout, i, gscale * w * (r if quad else (delta if r > 0 else (-delta if r < 0 else r))))


@njit(**_OPTIONS)
def _span_weights(x, t, sw, delta, gscale, out, gout):
    """All elements of x, t with weights sw[0], sw[1], ..."""
    half = out.dtype.type(0.5)
    for i in range(x.shape[0]):
        w = sw[i]
        r = load(x, i) - load(t, i)
        a = abs(r)
        quad = a <= delta
        out[i] = w * (half * r * r if quad else delta * (a - half * delta))
        store(gout, i, gscale * w * (r if quad else (delta if r > 0 else (-delta if r < 0 else r))))


@njit(**_OPTIONS)
def _chunks(first, last, x, t, sw, inner, period, delta, scale, g, grad, losses, losses_half,
            chunk_sums):
    """Chunks [first, last); chunk_sums[b] = float64 sum of chunk b's losses, which are
    also kept in ``losses`` when it has one per element, or rounded into
    ``losses_half`` (float16 bits) when that has."""
    n = x.shape[0]
    per_element = losses.shape[0] == n
    scratch = np.empty(0 if per_element else ELEMENT_CHUNK, losses.dtype)
    g_scratch = np.empty(0 if grad else ELEMENT_CHUNK, g.dtype)
    one = losses.dtype.type(1.0)
    for b in range(first, last):
        lo = b * ELEMENT_CHUNK
        hi = min(n, lo + ELEMENT_CHUNK)
        out, o = (losses, lo) if per_element else (scratch, 0)
        gout, go = (g, lo) if grad else (g_scratch, 0)
        if sw.shape[0] == 0:
            _span(x[lo:hi], t[lo:hi], one, delta, scale, out[o:], gout[go:])
        else:
            i = lo
            while i < hi:
                if inner > 1:  # one weight per run of `inner` elements
                    end = min(hi, (i // inner + 1) * inner)
                    _span(x[i:end], t[i:end], sw[(i // inner) % period], delta, scale,
                          out[o + i - lo:], gout[go + i - lo:])
                else:  # weights cycle with `period`
                    k = i % period
                    end = min(hi, i + period - k)
                    _span_weights(x[i:end], t[i:end], sw[k:], delta, scale,
                                  out[o + i - lo:], gout[go + i - lo:])
                i = end
        chunk_sums[b] = row_sum(out[o:o + hi - lo], 0.0)
        if losses_half.shape[0] == n:
            for i in range(hi - lo):
                store(losses_half, lo + i, out[i])


@njit(parallel=True, **_OPTIONS)
def _huber_parallel(x, t, sw, inner, period, delta, scale, g, grad, losses, losses_half, chunk_sums):
    for b in prange(chunk_sums.shape[0]):
        _chunks(b, b + 1, x, t, sw, inner, period, delta, scale, g, grad, losses, losses_half,
                chunk_sums)
    return loss_total(chunk_sums)


@njit(**_OPTIONS)
def _huber_serial(x, t, sw, inner, period, delta, scale, g, grad, losses, losses_half, chunk_sums):
    _chunks(0, chunk_sums.shape[0], x, t, sw, inner, period, delta, scale, g, grad, losses,
            losses_half, chunk_sums)
    return loss_total(chunk_sums)


def huber_elements(x, t, sw, inner, period, delta, scale, g, grad, losses, losses_half, T):
    """Loss (and gradient) of every element of the flat arrays ``x``, ``t``.

    ``losses`` (``T``) has one slot per element ("none") or none; for float16
    input, ``"none"`` losses go to ``losses_half`` (uint16 bits) instead, so no
    float32 array of the input's length is made.  Returns the float64 sum of the
    losses (summed per chunk, then in order: thread-count independent).
    """
    n = x.shape[0]
    chunk_sums = np.empty(-(-n // ELEMENT_CHUNK), np.float64)
    return launch(_huber_parallel, _huber_serial, use_threads(x),
                  x, t, sw, inner, period, T(delta), T(scale), g, grad, losses, losses_half, chunk_sums)
