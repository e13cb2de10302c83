r"""Sigmoid focal loss (torchvision's RetinaNet loss) of one element, for the CPU and CUDA kernels.

Per element with ``p = sigmoid(x)``, ``u = 1 - p_t = p (1-t) + (1-p) t``,
``ce = softplus(x) - t x`` and ``alpha_t = alpha t + (1-alpha)(1-t)`` (1 when
``alpha < 0``)::

    L = alpha_t u^g ce
    dL/dx = alpha_t [(p - t) u^g + g (1-2t) ce u^(g-1) p (1-p)]

where ``p``, ``1-p``, ``softplus(x)`` and ``softplus(-x)`` all come from one
``exp(-|x|)`` without cancellation, ``u`` is a sum of two non-negative terms
(no cancellation either) and ``u^g = exp(g log u)``; where ``u`` underflows to
0 the loss and ``ce`` are 0 too, and the second term takes its limit, 0, so
nothing is NaN at saturated logits.

Values are in the compute type, with ``zero``/``one`` in it; the kernels call
each target's copy of these functions (see ``fastloss.formulas``).
"""
from fastloss.formulas import exp, exp_nonpos, log, log1p


def sigmoid_terms(x, t, zero, one):
    """``(p, 1 - p, ce, u = 1 - p_t)`` of one element with logit x and target t."""
    ea = exp_nonpos(-abs(x))
    l1pe = log1p(ea)
    sp_pos = (x if x > zero else zero) + l1pe  # softplus(x)  = -log(1-p)
    sp_neg = (zero if x > zero else -x) + l1pe  # softplus(-x) = -log p
    inv = one / (one + ea)
    p = inv if x >= zero else ea * inv  # sigmoid(x)
    q = ea * inv if x >= zero else inv  # 1 - sigmoid(x), without cancellation
    ce = (one - t) * sp_pos + t * sp_neg
    u = p * (one - t) + q * t  # 1 - p_t: a sum of two non-negative terms
    return p, q, ce, u


def modulating_power(u, gamma, zero, one):
    """``u**gamma`` as ``exp(gamma log u)``: 1 at gamma = 0, and 0 at u = 0 otherwise."""
    return one if gamma == zero else exp(gamma * log(u))


def alpha_weight(t, alpha, use_alpha, one):
    """``alpha_t`` of target t (1 unless ``use_alpha``)."""
    return alpha * t + (one - alpha) * (one - t) if use_alpha else one


def sigmoid_focal_value(p, q, ce, u, t, at, pw, num, den, gamma, zero, one):
    """``(L, dL/dx / alpha_t)`` of one element from ``sigmoid_terms``, ``at =
    alpha_t`` and ``pw = u**gamma``; ``u**(gamma-1) = num / den`` (``pw / u``,
    or ``u / 1`` where gamma is 2)."""
    # d(1 - p_t)/dx = p q (1 - 2t).  u == 0 only where ce == 0 too (saturated and
    # right), and the second term's limit there is 0.
    t2 = zero
    if not (ce == zero or u == zero or gamma == zero):
        t2 = gamma * (one - t - t) * ce * (num / den) * p * q
    return at * pw * ce, (p - t) * pw + t2
