r"""Softmax cross entropy and softmax focal loss of one row, for the CPU and the CUDA kernels alike.

Notation: ``z`` the row's (optionally soft-capped) logits, ``m = max z``,
``e_c = exp(z_c - m)``, ``s = sum_c e_c``, ``lse = m + log s``, ``p = e / s``,
``C`` classes, sample weight ``sw``; for an integer target ``y``,
``rest = s - e_y`` (summed apart, so that ``1 - p_y = rest / s`` and
``-log p_y = log1p(rest / e_y)`` keep their digits as ``p_y -> 1``).  Every
``lse - z_c`` below is formed as ``log s - (z_c - m)``: at large ``|m|`` the
rounding of ``m + log s`` would take the digits of ``log s``.

Cross entropy, with class weights ``w`` (ones when not given), smoothing ``eps``,
``smooth = eps / C``, ``keep = 1 - eps``, z-loss coefficient ``zc``::

    integer target y:  L = sw [keep w_y (lse - z_y) + smooth sum_c w_c (lse - z_c) + zc lse^2]
                       dL/dz_c = sw [p_c (keep w_y + smooth sum_k w_k + 2 zc lse)
                                     - keep w_y [c == y] - smooth w_c]
    probabilities t:   with t'_c = keep t_c + smooth,
                       L = sw [sum_c t'_c w_c (lse - z_c) + zc lse^2]
                       dL/dz_c = sw [p_c (sum_k t'_k w_k + 2 zc lse) - t'_c w_c]

Soft-capping ``z = cap tanh(x / cap)`` multiplies the gradient by its slope
``sech(x / cap)^2``; the kernels compute it (each in its own way).

Focal loss, with per-class factors ``alpha`` and, for class ``c``,
``F_c = (1-p_c)^g - g p_c (1-p_c)^(g-1) log p_c``::

    integer target y:  L = -sw alpha_y (1-p_y)^g log p_y
                       dL/dz_k = sw alpha_y F_y (p_k - [k == y])
    probabilities t:   L = -sw sum_c t_c alpha_c (1-p_c)^g log p_c
                       dL/dz_k = sw (p_k sum_c t_c alpha_c F_c - t_k alpha_k F_k)

in log space: ``(1-p)^g = exp(g log(1-p))`` and
``g p (1-p)^(g-1) (-log p) = g p exp((g-1) log(1-p) + log(-log p))``; where
``1-p`` or ``log p`` is exactly 0 (or ``g = 0``) that term takes its limit, 0,
so ``0 < g < 1`` and saturated logits give finite gradients.  With
probability targets a class without target mass contributes 0, even at
``p_c = 0`` or ``z_c = -inf``.

Every gradient is then multiplied by ``gscale``: the sample weight times the
reduction's scale (1/denominator for "mean").

The kernels pass values in their compute type (float32 for float16 and
float32 data, float64 for float64) and ``zero``/``one``/``two``/``ninf`` in
it, since a Python literal would be float64 in Numba; the CPU's integer-target
focal row runs in float64.  ``exp``, ``log`` and ``log1p`` are the target's
per-element primitives, ``math``'s functions per-row scalars; the kernels call
each target's copy of these functions (see ``fastloss.formulas``).
"""
import math

from fastloss.formulas import exp, log, log1p


# ---------------------------------------------------------------- cross entropy


def label_loss(zy, m, s, rest, ey, szm, wy, wsum, keep, smooth, eps, zcoef):
    """``(L / sw, lse)`` of a row with integer target y; ``szm = sum_c w_c (z_c - m)``
    (read only with smoothing), ``wsum = sum_c w_c``."""
    log_s = math.log(s)
    # -log p_y as log s - (z_y - m): lse - z_y would lose the digits of log s to the
    # rounding of m + log s at large |m|; log1p(rest / e_y) keeps them as p_y -> 1
    nll = math.log1p(rest / ey) if ey >= rest else log_s - (zy - m)
    loss = keep * wy * nll
    if eps > 0:
        loss += smooth * (wsum * log_s - szm)  # sum_c w_c (log s - (z_c - m))
    lse = m + log_s
    if zcoef > 0:
        loss += zcoef * lse * lse
    return loss, lse


def label_gradient(lse, s, rest, ey, wy, wsum, keep, smooth, zcoef, gscale, two):
    """``(a, b, g_y)`` of a row with integer target y: its gradient is
    ``class_gradient(e_c, a, b, w_c)`` for c != y, and ``g_y`` at y (each
    before the soft-cap's slope)."""
    spread = smooth * wsum + two * zcoef * lse  # p_c's factor beyond the target's
    a = gscale * (keep * wy + spread) / s
    # the target's entry, with (p_y - 1) as -rest/s: no cancellation as p_y -> 1
    gy = gscale * ((ey / s) * spread - smooth * wy - keep * wy * (rest / s))
    return a, gscale * smooth, gy


def class_gradient(e, a, b, w):
    """``e a - b w``: the gradient at class c of an integer-target row, from
    ``e = e_c`` and ``w = w_c``."""
    return e * a - b * w


def target_weight(t, w, keep, smooth):
    """``t'_c w_c`` of class c of a probability-target row.  The kernels add
    ``t'_c w_c (z_c - m)`` to their sum only where it is not 0, so that a class
    without mass adds 0 even at ``z_c = -inf`` (and the CPU reads ``z_c`` only
    there)."""
    return (keep * t + smooth) * w


def prob_loss(tw_sum, twzm_sum, m, s, zcoef):
    """``(L / sw, lse)`` of a probability-target row from ``sum_c t'_c w_c`` and
    ``sum_c t'_c w_c (z_c - m)``: ``sum_c t'_c w_c (log s - (z_c - m))``, whose
    digits do not go to the rounding of ``m + log s`` at large ``|m|``."""
    log_s = math.log(s)
    lse = m + log_s
    return tw_sum * log_s - twzm_sum + zcoef * lse * lse, lse


def prob_gradient(tw_sum, lse, s, zcoef, two, gscale):
    """``a`` of a probability-target row: its gradient is
    ``prob_class_gradient(e_c, a, gscale keep, t_c, gscale smooth, w_c)``."""
    return gscale * (tw_sum + two * zcoef * lse) / s


def prob_class_gradient(e, a, kg, t, b, w):
    """``e a - (kg t + b) w`` (before the soft-cap's slope)."""
    return e * a - (kg * t + b) * w


# ---------------------------------------------------------------- focal


def focal_label_factors(zy, m, s, rest, ey, gamma, zero, one, ninf):
    """``(-log p_y, log(1 - p_y), (1 - p_y)^gamma)`` of a row with integer target y."""
    if ey >= rest:
        nlp = math.log1p(rest / ey)  # -log p_y, precise as p_y -> 1
    else:
        nlp = math.log(s) - (zy - m)
    l1mp = math.log(rest) - math.log(s) if rest > zero else ninf
    pw = one if gamma == zero else math.exp(gamma * l1mp)
    return nlp, l1mp, pw


def focal_label_gradient(nlp, l1mp, pw, s, rest, ey, ay, gamma, gscale, zero, one):
    """``(a, g_y)`` of a row with integer target y (loss ``ay pw nlp``): its
    gradient is ``e_c a`` for c != y and ``g_y`` at y."""
    t2 = zero
    if gamma > zero and rest > zero and nlp > zero:
        t2 = gamma * (ey / s) * math.exp((gamma - one) * l1mp + math.log(nlp))
    c = gscale * ay * (pw + t2)
    return c / s, -c * rest / s  # g_y = c (p_y - 1) without the cancellation


def focal_class_power(p, gamma, zero, one):
    """``(log(1 - p_c), (1 - p_c)^gamma)`` of class c of a probability-target row."""
    l1mp = log1p(-p)
    pw = one if gamma == zero else exp(gamma * l1mp)
    return l1mp, pw


def focal_class_second(p, l1mp, nlp, gamma, one):
    """``gamma p_c (1-p_c)^(gamma-1) (-log p_c)``, F_c's second term, from ``l1mp =
    log(1 - p_c)`` and ``nlp = -log p_c``; the kernels take 0, its limit, instead
    where ``focal_class_at_limit`` (the CPU computes it anyway and selects, the
    GPU and the simulator branch)."""
    return gamma * p * exp((gamma - one) * l1mp + log(nlp))


def focal_class_at_limit(p, nlp, gamma, zero, one):
    """Whether ``focal_class_second`` is 0, its limit: p is 0 or 1, -log p is 0, or
    gamma is 0."""
    return p == one or p == zero or nlp == zero or gamma == zero


def focal_class_terms(ta, pw, t2, nlp, zero):
    """``(t_c alpha_c F_c, t_c alpha_c (1-p_c)^gamma (-log p_c))`` of class c of a
    probability-target row, from ``ta = t_c alpha_c``, ``pw = (1-p_c)^gamma``, F_c's
    second term ``t2`` and ``nlp = -log p_c``; 0 for a class without target mass."""
    f = zero if ta == zero else ta * (pw + t2)
    term = zero if ta == zero else ta * pw * nlp
    return f, term
