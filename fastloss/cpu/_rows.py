"""Row primitives shared by the softmax-based CPU kernels.

Two kinds of functions, compiled with different fast-math licences:

* reductions (``row_max``, ``row_sum``, ``row_dot``) allow ``reassoc``, which
  LLVM needs to vectorize a float reduction;
* elementwise passes (``exp_shifted``, ``softcap_row``) do not: ``reassoc``
  would let LLVM fold away the range reduction inside ``vexp``.

Numba compiles each function separately, and the licence is a flag on each
instruction: where LLVM inlines one function into another, the licence of one
still never leaks into the other.  Rows may be
float16 storage (uint16), float32 or float64; values are read with ``load``
and computed in the type of the scalar arguments.
"""
import numpy as np
from numba import njit, types
from numba.core.extending import overload, register_jitable

from fastloss._cache import CACHE
from fastloss._reduction import reduce
from fastloss.cpu import _storage
from fastloss.cpu._formulas import softmax
from fastloss.cpu._jit import jit, reduction_jit
from fastloss.cpu._math import _F32, _F64, load, store, vexp_nonpos, vtanh
from fastloss.cpu._threads import launch

NARROW_ROW = 64  # classes up to which a kernel takes its whole row inline (narrow_softmax)
ROW_BLOCK_ELEMENTS = 16384  # rows per parallel task: about this many values, at least one row
PARALLEL_MIN_ELEMENTS = 1 << 15  # below this, starting threads costs more than it saves


def paths(chosen, count):
    """The ``count`` options that choose one of a kernel's paths: True for path ``chosen``,
    None for the others.  Numba prunes a branch on ``x is not None`` where ``x`` is None, so
    a call compiles only the path it runs (a branch on a value it would compile every way)."""
    return _PATHS[count][chosen]


_PATHS = {count: tuple(tuple(True if k == chosen else None for k in range(count))
                       for chosen in range(count)) for count in (2, 3)}


def path(first):
    """``paths`` of two: ``(True, None)`` for the first (as ``(narrow, wide)`` rows),
    ``(None, True)`` for the second."""
    return _PATHS[2][0 if first else 1]


_PARALLEL_FROM = max(PARALLEL_MIN_ELEMENTS, 2 * ROW_BLOCK_ELEMENTS)


def use_threads(x):
    """Whether a kernel over ``x`` should take the parallel path (else the serial one)."""
    return x.size >= _PARALLEL_FROM


def _float_max(src, ninf):
    """max(src) (pure-Python stub; see the overload)."""
    raise NotImplementedError


@overload(_float_max, inline="always")
def _float_max_overload(src, ninf):
    # The max of the floats' bits as integers, sign-magnitude turned two's-complement
    # (k = i ^ ((i >> (bits - 1)) & low)), which orders finite and infinite values as
    # floats; an integer max reduction vectorizes without fast-math licences, where
    # LLVM leaves a float max (fcmp + select) scalar.  A NaN of positive sign orders
    # above +inf, one of negative sign below -inf: either way it still reaches the
    # loss through the sum of exp.
    if src.dtype == types.float32:
        k, shift, low = _F32, 31, 0x7FFFFFFF
    elif src.dtype == types.float64:
        k, shift, low = _F64, 63, 0x7FFFFFFFFFFFFFFF
    else:  # float16 storage (uint16): as floats
        def half_impl(src, ninf):
            m = ninf
            for c in range(src.shape[0]):
                v = load(src, c)
                m = v if v > m else m
            return m
        return half_impl
    as_int, as_float = k.as_int, k.as_float
    int_type = types.int32 if src.dtype == types.float32 else types.int64

    def impl(src, ninf):
        i = np.int64(as_int(ninf))
        m = i ^ ((i >> shift) & low)
        for c in range(src.shape[0]):
            i = np.int64(as_int(src[c]))
            k = i ^ ((i >> shift) & low)
            m = k if k > m else m
        return as_float(int_type(m ^ ((m >> shift) & low)))
    return impl


@njit(cache=CACHE, nogil=True, error_model="numpy", fastmath={"contract", "nsz", "nnan"})
def row_max(src, ninf):
    """max(src), ``ninf`` for an empty row (see ``_float_max``)."""
    return _float_max(src, ninf)


@reduction_jit
def row_sum(src, zero):
    s = zero
    for c in range(src.shape[0]):
        s += load(src, c)
    return s


@reduction_jit
def row_dot(src, w, shift, zero):
    """sum(w * (src - shift)) (``w`` None: ones), where a zero weight contributes 0
    even against an infinite value (xlogy's convention: no mass on a class, no
    penalty for it)."""
    s = zero
    for c in range(src.shape[0]):
        if w is None:
            s += load(src, c) - shift
        else:
            wc = w[c]
            s += zero if wc == 0 else wc * (load(src, c) - shift)
    return s


@register_jitable(inline="always")
def _sums(e, skip):
    """(sum(e), sum of e over the classes other than ``skip``), inlined: vectorized
    under ``reduction_jit``'s licence, in order inside ``narrow_softmax``."""
    zero = e.dtype.type(0.0)
    s = zero
    rest = zero
    for c in range(e.shape[0]):
        v = e[c]
        s += v
        rest += zero if c == skip else v
    return s, rest


@reduction_jit
def _sum_and_rest(e, skip):
    return _sums(e, skip)


@jit
def exp_shifted(src, m, e, skip):
    """e = exp(src - m); returns (sum(e), sum of e over the classes other than ``skip``).

    The second sum keeps its relative precision when e[skip] dominates, so
    ``1 - p_skip = rest / s`` does too (no cancellation in ``1 - p``).
    """
    for c in range(src.shape[0]):
        e[c] = vexp_nonpos(load(src, c) - m)  # src <= m
    return _sum_and_rest(e, skip)


@register_jitable(inline="always")
def narrow_softmax(x, i, skip, e, ninf):
    """``exp_shifted`` for a narrow row, inlined into the caller's row loop:
    e = exp(src - m) with m = max(src); returns (m, sum(e), sum of e over the
    classes other than ``skip``).

    Up to a few dozen classes, calling ``row_max`` and ``exp_shifted`` and
    setting up their vector loops costs more than the arithmetic (the two
    break even between 64 and 96 classes, hence NARROW_ROW; figures in
    bench/results/).  The exp loop still vectorizes; the max and the sums run
    in order.  A NaN is skipped by the max but reaches the
    sums through its exp, as in ``row_max``.
    """
    m = ninf
    for c in range(x.shape[1]):
        v = load(x, (i, c))
        m = v if v > m else m
    for c in range(x.shape[1]):
        e[c] = vexp_nonpos(load(x, (i, c)) - m)
    s, rest = _sums(e, skip)
    return m, s, rest


@jit
def softcap_row(x, z, slope, cap):
    """z = cap * tanh(x / cap) (Gemma 2's logit soft-capping) and its slope
    dz/dx = sech(x / cap)^2, which far from 0 is 4 e / (1 + e)^2 with
    e = exp(-2|x / cap|) rather than 1 - tanh^2 (which cancels)."""
    one = z.dtype.type(1.0)
    inv_cap = one / cap
    for c in range(x.shape[0]):
        u = load(x, c) * inv_cap
        t = vtanh(u)
        ea = vexp_nonpos(-(abs(u) + abs(u)))
        far = (ea + ea + ea + ea) / ((one + ea) * (one + ea))
        z[c] = cap * t
        slope[c] = one - t * t if abs(u) < z.dtype.type(0.625) else far


@jit
def softmax_grad_row(e, a, b, weight, g, slope):
    """g_c = class_gradient(e_c, a, b, w_c) * slope_c, with e_c = exp(z_c - m), the
    class weights ``weight`` (None: ones) and slope_c = dz_c/dx_c of the soft-cap
    (None: no soft-cap)."""
    # conditional expressions are named before they are passed (see formulas.softmax.formula)
    one = e.dtype.type(1.0)
    for c in range(e.shape[0]):
        wc = one if weight is None else weight[c]
        v = softmax.class_gradient(e[c], a, b, wc)
        gc = v if slope is None else v * slope[c]
        store(g, c, gc)


@jit
def mean_denominator(labels, probs, ignore_index, weight, sw):
    """"mean" denominator: sum of w[y] * sw over rows not ignored (integer targets),
    sum of sw or the row count (probability targets, as in PyTorch).  ``weight``
    and ``sw`` are None when not given (ones)."""
    # One of labels/probs is None: Numba prunes the branch that tests it.
    total = 0.0
    if labels is not None:
        for i in range(labels.shape[0]):
            y = labels[i]
            if y != ignore_index:
                total += (1.0 if weight is None else weight[y]) * (1.0 if sw is None else sw[i])
    if probs is not None:
        for i in range(probs.shape[0]):
            total += 1.0 if sw is None else sw[i]
    return total


@jit
def loss_total(losses):
    """float64 sum of the per-sample losses, serial: the same bits for any thread count."""
    total = 0.0
    for i in range(losses.shape[0]):
        total += losses[i]
    return total


@jit
def ignored_row(y, ignore_index, losses, g, i):
    """Whether row i's label y is ignore_index; if so its loss is 0, and so is
    its gradient row ``g[i]`` (``g`` None: no gradient)."""
    if y != ignore_index:
        return False
    losses[i] = 0
    if g is not None:
        zero = losses.dtype.type(0.0)
        for c in range(g.shape[1]):
            store(g, (i, c), zero)
    return True


def row_loss(parallel, serial, logits, labels, probs, options, reads, reduction, grad, grad_out):
    """``(loss, grad)`` of a row kernel on checked NumPy inputs: ``parallel`` or
    ``serial`` (by size) called as ``(x, labels, probs, *options, mean, g,
    losses)`` on the logits ``(..., C)`` as rows ``(N, C)``, integer ``labels``
    or ``probs`` (the other None), returning ``(sum of losses, "mean"
    denominator)``.  The gradient (None unless ``grad``) is ``grad_out`` or a
    new array; written through a temporary where ``grad_out`` overlaps what
    the kernel reads (``reads`` beside the targets)."""
    C = logits.shape[-1]
    x, labels, probs = _storage.class_rows(logits, labels, probs)
    n = x.shape[0]
    g = written = result = None
    if grad:
        g, written, result = _storage.gradient_arrays(grad, grad_out, logits, (n, C),
                                                      (probs, labels) + reads)
    losses = np.empty(n, _storage.compute_type(logits.dtype))
    args = (x, labels, probs, *options, reduction == "mean", g, losses)
    # a small input goes straight to the serial kernel (``launch`` decides for the large ones)
    total, denom = launch(parallel, serial, True, *args) if use_threads(x) else serial(*args)
    loss = reduce(losses, total, reduction, denom, logits.shape[:-1], logits.dtype)
    return loss, _storage.finish_gradient(written, result) if grad else None
