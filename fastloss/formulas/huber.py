r"""The Huber loss of one residual ``r``, for the CPU and the CUDA kernels alike::

    huber(r)       = 0.5 r^2              if |r| <= delta
                     delta (|r| - delta/2) otherwise
    huber_slope(r) = clip(r, -delta, delta)     (NaN stays NaN)

``half`` and ``zero`` are 0.5 and 0 in the residual's type: a Python literal
would be float64 in Numba, and promote float32 arithmetic.

Each function is plain Python (what the CUDA simulator runs) with one Numba
implementation per target, itself: on the CPU inlined at Numba's IR level
(``inline="always"``), so that it compiles under the calling kernel's
fastmath licence, into its vectorized loop, as code written in place would;
on CUDA a device function, which NVVM inlines (numba-cuda cannot inline a
function at the IR level).
"""
from numba.core.extending import overload


def huber(r, delta, half):
    a = abs(r)
    return half * r * r if a <= delta else delta * (a - half * delta)


def huber_slope(r, delta, zero):
    return r if abs(r) <= delta else (delta if r > zero else (-delta if r < zero else r))


@overload(huber, target="cpu", inline="always")
@overload(huber, target="cuda")
def _huber(r, delta, half):
    return huber


@overload(huber_slope, target="cpu", inline="always")
@overload(huber_slope, target="cuda")
def _huber_slope(r, delta, zero):
    return huber_slope
