r"""Triplet margin loss (CPU): the fused kernel and the call that runs it.

One row per triplet ``(a, p, n)``, by the formulas of ``fastloss.formulas.triplet``.  A row is
read once for its sums (the three squared differences, or the six dot products for cosine),
then once more, from L1, by the pass that writes its three gradient rows; each element is read
before the same element of a gradient row is written, so a gradient may alias its input.
"""
import math
from collections import namedtuple

import numpy as np
from numba import njit, prange

from fastloss._reduction import grad_scale, reduce
from fastloss.cpu import _storage
from fastloss.cpu._math import load, store
from fastloss.cpu._jit import KERNEL_OPTIONS, jit, reduction_jit
from fastloss.cpu._rows import ROW_BLOCK_ELEMENTS, loss_total, path, use_threads
from fastloss.cpu._threads import launch
from fastloss.cpu._formulas import triplet
from fastloss.formulas.triplet import DISTANCES, EUCLIDEAN

# three row arrays (N, D) in kernel form: the inputs, or their gradients
Triplets = namedtuple("Triplets", "anchor positive negative")
# the options of a call: the distance's code, swap, and margin, eps and the gradient's scale
# (float64, cast to the compute type by the kernel)
MarginOptions = namedtuple("MarginOptions", "distance swap margin eps scale")


@reduction_jit
def _difference_sums(a, p, n, shift, swap, zero):
    """sum (a-p+shift)^2, sum (a-n+shift)^2 and, when swap, sum (p-n+shift)^2."""
    s_ap = zero
    s_an = zero
    s_pn = zero
    if swap:
        for j in range(a.shape[0]):
            u, v, w = triplet.differences(load(a, j), load(p, j), load(n, j), shift)
            s_ap += u * u
            s_an += v * v
            s_pn += w * w
    else:
        for j in range(a.shape[0]):
            u, v, _ = triplet.differences(load(a, j), load(p, j), load(n, j), shift)
            s_ap += u * u
            s_an += v * v
    return s_ap, s_an, s_pn


@reduction_jit
def _dot_sums(a, p, n, zero):
    """a.a, p.p, n.n, a.p, a.n, p.n."""
    dots = (zero, zero, zero, zero, zero, zero)
    for j in range(a.shape[0]):
        dots = triplet.add_dots(dots, load(a, j), load(p, j), load(n, j))
    return dots


@jit
def _difference_rows(a, p, n, shift, cp, cn, cs, ga, gp, gn):
    """Gradient rows of cp d(a,p) - cn d(a,n) - cs d(p,n), from the (shifted) differences."""
    for j in range(a.shape[0]):
        da, dp, dn = triplet.difference_gradients(load(a, j), load(p, j), load(n, j), shift, cp, cn, cs)
        store(ga, j, da)
        store(gp, j, dp)
        store(gn, j, dn)


@jit
def _linear_rows(a, p, n, m, ga, gp, gn):
    """Gradient rows that are linear combinations of a, p, n (the symmetric matrix ``m``)."""
    for j in range(a.shape[0]):
        da, dp, dn = triplet.linear_gradients(load(a, j), load(p, j), load(n, j), m)
        store(ga, j, da)
        store(gp, j, dp)
        store(gn, j, dn)


@jit
def _triplet_rows(first, last, x, opt, cosine, differences, g, losses):
    """Rows [first, last) of the triplets ``x``: their losses and, unless ``g`` is None, their
    gradient rows.  One of ``cosine`` and ``differences`` (the other distances) is True, the
    other None (``_rows.path``)."""
    T = losses.dtype.type
    zero = T(0.0)
    one = T(1.0)
    dist, swap, margin, eps, scale = opt  # out of the tuple once, not in the loop
    margin, eps, scale = T(margin), T(eps), T(scale)
    euclid = dist == EUCLIDEAN
    shift = eps if euclid else zero
    xa, xp, xn = x
    if g is not None:
        ga, gp, gn = g
    for i in range(first, last):
        a = xa[i]
        p = xp[i]
        n = xn[i]
        if cosine is not None:
            d, geometry = triplet.cosine_distances(_dot_sums(a, p, n, zero), eps, one)
            losses[i], c, cn, cs = triplet.margin_term(d[0], d[1], d[2], swap, margin, scale,
                                                       zero, one)
            if g is not None:
                m = triplet.cosine_coefficients(geometry, c, cn, cs, zero, one)
                _linear_rows(a, p, n, m, ga[i], gp[i], gn[i])
        if differences is not None:
            d = triplet.difference_distances(_difference_sums(a, p, n, shift, swap, zero), euclid)
            losses[i], c, cn, cs = triplet.margin_term(d[0], d[1], d[2], swap, margin, scale,
                                                       zero, one)
            if g is not None:
                cp, cn, cs = triplet.difference_coefficients(euclid, d[0], d[1], d[2], c, cn, cs,
                                                             zero, one)
                _difference_rows(a, p, n, shift, cp, cn, cs, ga[i], gp[i], gn[i])


@njit(parallel=True, **KERNEL_OPTIONS)
def _triplet_parallel(x, opt, cosine, differences, g, losses):
    rows, D = x.anchor.shape
    block = max(1, ROW_BLOCK_ELEMENTS // max(D, 1))
    for b in prange((rows + block - 1) // block):
        _triplet_rows(b * block, min(rows, (b + 1) * block), x, opt, cosine, differences, g,
                      losses)
    return loss_total(losses)


@jit
def _triplet_serial(x, opt, cosine, differences, g, losses):
    _triplet_rows(0, x.anchor.shape[0], x, opt, cosine, differences, g, losses)
    return loss_total(losses)


def triplet_margin_loss(anchor, positive, negative, distance, swap, margin, eps, reduction, grad,
                        grad_out):
    """``(loss, grads)`` of ``fastloss.triplet_margin_loss`` on checked NumPy inputs of shape
    ``(..., D)``; ``grad_out`` None or a checked tuple of three arrays apart, ``grads`` a
    tuple of three (None without a gradient)."""
    batch_shape = anchor.shape[:-1]
    D = anchor.shape[-1]
    n = math.prod(batch_shape)
    inputs = (anchor, positive, negative)
    x = Triplets(*(_storage.kernel_view(v, (n, D)) for v in inputs))
    g = None
    if grad:
        # the three grad_out are apart: each is checked against the inputs
        outs = (None, None, None) if grad_out is None else grad_out
        buffers = [_storage.gradient_buffer(outs[0], anchor.shape, anchor.dtype, anchor,
                                            (positive, negative)),
                   _storage.gradient_buffer(outs[1], anchor.shape, anchor.dtype, positive,
                                            (anchor, negative)),
                   _storage.gradient_buffer(outs[2], anchor.shape, anchor.dtype, negative,
                                            (anchor, positive))]
        g = Triplets(*(_storage.kernel_view(w, (n, D)) for w, _ in buffers))
    losses = np.empty(n, _storage.compute_type(anchor.dtype))
    opt = MarginOptions(DISTANCES[distance], bool(swap), float(margin), float(eps),
                        grad_scale(reduction == "mean", n))
    total = launch(_triplet_parallel, _triplet_serial, use_threads(x.anchor), x, opt,
                   *path(distance == "cosine"), g, losses)
    loss = reduce(losses, total, reduction, n, batch_shape, anchor.dtype)
    if not grad:
        return loss, None
    return loss, tuple(_storage.finish_gradient(w, r) for w, r in buffers)
