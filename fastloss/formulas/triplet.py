r"""The triplet formulas, for the CPU and the CUDA kernels alike.

Explicit triplets (``triplet_margin_loss``), one row ``(a, p, n)``::

    z = margin + d(a, p) - d(a, n)          (swap: d(a, n) <- min(d(a, n), d(p, n)))
    L = max(0, z),  dL/dz = [z >= 0]        (torch's clamp_min passes the gradient at 0)

with ``d`` one of::

    euclidean          ||x - y + eps||_2     dd/dx = (x - y + eps) / d   (0 where d == 0)
    squared_euclidean  ||x - y||_2^2         dd/dx = 2 (x - y)
    cosine             1 - x.y / (X Y)       dd/dx = -(y / (X Y) - [|x| > eps] cos x / X^2)
                       X = max(|x|, eps), Y = max(|y|, eps)

and ``dd/dy`` by symmetry.  Batch mining (``batch_triplet_loss``): the term ``f(z)``,
``max(0, z)`` (gradient where ``z > 0``) or softplus (gradient sigmoid), and the pair
derivatives of the backward pass.

The kernels call each target's copy of these functions (see ``fastloss.formulas``); on the
CPU ``term`` is a call of its own, the others inlined.

Scalars ``zero`` and ``one`` are 0 and 1 in the compute type: a Python literal would be
float64 in Numba, and promote float32 arithmetic.
"""
import math

from fastloss.formulas import exp_nonpos, log1p

EUCLIDEAN, SQUARED, COSINE = 0, 1, 2
DISTANCES = {"euclidean": EUCLIDEAN, "squared_euclidean": SQUARED, "cosine": COSINE}
HARD, SEMIHARD, ALL = 0, 1, 2
MININGS = {"hard": HARD, "semihard": SEMIHARD, "all": ALL}
COSINE_NORM_EPS = 1e-8  # batch cosine: norms clamped as torch.cosine_similarity's default eps
CALLS = ("term",)  # a call of its own on the CPU (see fastloss.formulas)


def differences(a, p, n, shift):
    """a - p + shift, a - n + shift, p - n + shift (one element of each row)."""
    return a - p + shift, a - n + shift, p - n + shift


def add_dots(dots, a, p, n):
    """The sums (aa, pp, nn, ap, an, pn) of the six dot products after one more element of
    each row."""
    aa, pp, nn, ap, an, pn = dots
    return aa + a * a, pp + p * p, nn + n * n, ap + a * p, an + a * n, pn + p * n


def difference_distances(sums, euclid):
    """(d_ap, d_an, d_pn) from the sums of squared differences: their roots (euclidean)
    or themselves (squared)."""
    s_ap, s_an, s_pn = sums
    if euclid:
        return math.sqrt(s_ap), math.sqrt(s_an), math.sqrt(s_pn)
    return s_ap, s_an, s_pn


def cosine_distances(dots, eps, one):
    """(d_ap, d_an, d_pn) from the six dot products (aa, pp, nn, ap, an, pn), and the
    geometry their gradient needs: whether each norm is above ``eps`` (unclamped), the
    clamped norms, the cosines."""
    aa, pp, nn, ap, an, pn = dots
    na = math.sqrt(aa)
    np_ = math.sqrt(pp)
    nn_ = math.sqrt(nn)
    A = na if na > eps else eps
    P = np_ if np_ > eps else eps
    N = nn_ if nn_ > eps else eps
    cos_ap = ap / (A * P)
    cos_an = an / (A * N)
    cos_pn = pn / (P * N)
    return ((one - cos_ap, one - cos_an, one - cos_pn),
            (na > eps, np_ > eps, nn_ > eps, A, P, N, cos_ap, cos_an, cos_pn))


def margin_term(d_ap, d_an, d_pn, swap, margin, scale, zero, one):
    """(loss, c, cn, cs): the row's loss and the factors of dL/d d(a, p), dL/d d(a, n),
    dL/d d(p, n), times ``scale``."""
    # share of dL/d(d_neg) that goes to d(a,n) and to d(p,n): torch.minimum's backward
    # (a tie splits it half/half; NaN on either side gives both the whole)
    f_an = one
    f_pn = zero
    d_neg = d_an
    if swap:
        if d_an == d_pn:
            f_an = one / (one + one)
            f_pn = f_an
        elif d_pn < d_an:
            f_an = zero
            f_pn = one
            d_neg = d_pn
        elif not d_an < d_pn:  # a NaN: it propagates to the loss
            f_pn = one
            d_neg = d_an + d_pn
    z = (margin + d_ap) - d_neg
    c = scale if z >= zero else zero
    return (zero if z < zero else z), c, c * f_an, c * f_pn  # NaN passes


def difference_coefficients(euclid, d_ap, d_an, d_pn, c, cn, cs, zero, one):
    """The factors of u, v, w (``differences``) in the gradient rows of
    c d(a,p) - cn d(a,n) - cs d(p,n)."""
    if euclid:
        # norm's backward: (x - y + eps) / d, 0 where d == 0 (a NaN d spreads over the
        # row, as in torch)
        return (c / d_ap if d_ap != zero else zero, cn / d_an if d_an != zero else zero,
                cs / d_pn if d_pn != zero else zero)
    two = one + one
    return two * c, two * cn, two * cs


def cosine_coefficients(geometry, c, cn, cs, zero, one):
    """The symmetric matrix m (m00, m01, m02, m11, m12, m22) of the gradient rows
    (``linear_gradients``) of c d(a,p) - cn d(a,n) - cs d(p,n), cosine distances."""
    free_a, free_p, free_n, A, P, N, cos_ap, cos_an, cos_pn = geometry
    kA = one / (A * A) if free_a else zero
    kP = one / (P * P) if free_p else zero
    kN = one / (N * N) if free_n else zero
    AP = one / (A * P)
    AN = one / (A * N)
    PN = one / (P * N)
    return (kA * (c * cos_ap - cn * cos_an), -c * AP, cn * AN,
            kP * (c * cos_ap - cs * cos_pn), cs * PN, -kN * (cn * cos_an + cs * cos_pn))


def difference_gradients(a, p, n, shift, cp, cn, cs):
    """One element of the gradient rows: ga = cp u - cn v, gp = -cp u - cs w,
    gn = cn v + cs w."""
    u, v, w = differences(a, p, n, shift)
    return cp * u - cn * v, -(cp * u) - cs * w, cn * v + cs * w


def linear_gradients(a, p, n, m):
    """One element of the gradient rows g_k = m[k,0] a + m[k,1] p + m[k,2] n."""
    m00, m01, m02, m11, m12, m22 = m
    return (m00 * a + m01 * p + m02 * n, m01 * a + m11 * p + m12 * n,
            m02 * a + m12 * p + m22 * n)


def cosine_distance(g, inv_i, inv_j, one):
    """1 - cos from the dot product g and the inverse clamped norms."""
    return one - g * inv_i * inv_j


def hinge(z, zero, one):
    """max(0, z) (NaN passes) and its gradient, passing where z > 0."""
    return (zero if z < zero else z), (one if z > zero else zero)


def softplus(z, zero, one):
    """softplus(z) and sigmoid(z), stable: max(z, 0) + log1p(exp(-|z|))."""
    e = exp_nonpos(-abs(z))
    pos = z if z > zero else zero
    return pos + log1p(e), (one / (one + e) if z >= zero else e / (one + e))


def term(z, soft, zero, one):
    """(f(z), f'(z)) of a mined triplet: softplus when ``soft``, else the hinge.  ``soft`` is
    a bool, or None for the hinge: a compiled caller then never compiles softplus."""
    if soft is not None and soft:
        return softplus(z, zero, one)
    return hinge(z, zero, one)


def difference_weight(euclid, c, d, zero):
    """The factor of e_r - e_o in c dd(r, o)/de_r: c / d for the euclidean distance d
    (0 at d = 0: identical embeddings), 2 c for the squared one."""
    if euclid:
        return c / d if d > zero else zero
    return c + c


def cosine_weight(c, inv_r, inv_o):
    """c / (n_r n_o): the factor of -e_o in c dd(r, o)/de_r (cosine), and of
    e_r.e_o in its e_r term."""
    return c * inv_r * inv_o


def cosine_self_weight(beta, inv_r, big, zero):
    """The factor of e_r in the cosine gradient: the e_r terms' sum ``beta`` over n_r^2
    where |e_r| is not clamped (inv_r < ``big``, 1 / the clamp), else 0."""
    return beta * inv_r * inv_r if inv_r < big else zero
