r"""The Huber loss of one residual ``r``, for the CPU and the CUDA kernels alike::

    huber(r)       = 0.5 r^2              if |r| <= delta
                     delta (|r| - delta/2) otherwise
    huber_slope(r) = clip(r, -delta, delta)     (NaN stays NaN)

``half`` and ``zero`` are 0.5 and 0 in the residual's type: a Python literal
would be float64 in Numba, and promote float32 arithmetic.

The kernels call each target's copy of these functions (see ``fastloss.formulas``).
"""


def huber(r, delta, half):
    """The loss of residual ``r``."""
    a = abs(r)
    return half * r * r if a <= delta else delta * (a - half * delta)


def huber_slope(r, delta, zero):
    """Its derivative in ``r``."""
    return r if abs(r) <= delta else (delta if r > zero else (-delta if r < zero else r))
