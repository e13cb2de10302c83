r"""Fused Huber loss kernel (CPU), elementwise.

With ``r = input - target``, threshold ``delta`` and weight ``w``::

    L = w * (0.5 r^2              if |r| <= delta
             delta (|r| - delta/2) otherwise)
    dL/dinput = w * clip(r, -delta, delta)

Sample weights reach the kernel compactly, never broadcast to the input's
size: element ``i`` has weight ``sw[(i // inner) % period]`` (``inner`` > 1:
one weight per run of ``inner`` elements; ``inner == 1``: weights cycling
along the trailing axes).  The kernel walks that index incrementally.
"""
import numpy as np
from numba import njit, prange

from fastloss.cpu._math import load, store
from fastloss.cpu._rows import KERNEL_OPTIONS, loss_total

# No transcendental functions here, so reassociation is safe and lets LLVM
# vectorize the loss sum.
_OPTIONS = dict(KERNEL_OPTIONS, fastmath={"contract", "reassoc", "nsz"})
ELEMENT_CHUNK = 16384  # elements per parallel task
PARALLEL_MIN_ELEMENTS = 1 << 16  # below this, starting threads costs more than it saves


@njit(**_OPTIONS)
def _chunk(lo, hi, x, t, sw, inner, period, delta, scale, g, grad, losses):
    """Elements [lo, hi); returns the float64 sum of their losses."""
    T = losses.dtype.type
    half = T(0.5)
    per_element = losses.shape[0] > 0
    total = 0.0
    if sw.shape[0] == 0:
        for i in range(lo, hi):
            r = load(x, i) - load(t, i)
            a = abs(r)
            quad = a <= delta
            loss = half * r * r if quad else delta * (a - half * delta)
            total += loss
            if per_element:
                losses[i] = loss
            if grad:
                c = r if quad else (delta if r > 0 else -delta)
                store(g, i, scale * c)
    else:
        k = lo // inner
        left = inner - (lo - k * inner)  # elements before the weight index moves on
        k = k % period
        for i in range(lo, hi):
            w = sw[k]
            r = load(x, i) - load(t, i)
            a = abs(r)
            quad = a <= delta
            loss = w * (half * r * r if quad else delta * (a - half * delta))
            total += loss
            if per_element:
                losses[i] = loss
            if grad:
                c = r if quad else (delta if r > 0 else -delta)
                store(g, i, scale * w * c)
            left -= 1
            if left == 0:
                left = inner
                k += 1
                if k == period:
                    k = 0
    return total


@njit(parallel=True, **_OPTIONS)
def _huber_parallel(x, t, sw, inner, period, delta, scale, g, grad, losses, chunk_sums):
    n = x.shape[0]
    for b in prange(chunk_sums.shape[0]):
        lo = b * ELEMENT_CHUNK
        chunk_sums[b] = _chunk(lo, min(n, lo + ELEMENT_CHUNK), x, t, sw, inner, period,
                               delta, scale, g, grad, losses)
    return loss_total(chunk_sums)


@njit(**_OPTIONS)
def _huber_serial(x, t, sw, inner, period, delta, scale, g, grad, losses, chunk_sums):
    n = x.shape[0]
    for b in range(chunk_sums.shape[0]):
        lo = b * ELEMENT_CHUNK
        chunk_sums[b] = _chunk(lo, min(n, lo + ELEMENT_CHUNK), x, t, sw, inner, period,
                               delta, scale, g, grad, losses)
    return loss_total(chunk_sums)


def huber_elements(x, t, sw, inner, period, delta, scale, g, grad, losses, T):
    """Loss (and gradient) of every element of the flat arrays ``x``, ``t``.

    ``losses`` has one slot per element ("none") or none; returns the float64
    sum of the losses (summed per chunk, then in order: thread-count independent).
    """
    n = x.shape[0]
    chunk_sums = np.empty(-(-n // ELEMENT_CHUNK), np.float64)
    run = _huber_parallel if n >= PARALLEL_MIN_ELEMENTS else _huber_serial
    return run(x, t, sw, inner, period, T(delta), T(scale), g, grad, losses, chunk_sums)
