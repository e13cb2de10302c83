r"""Fused linear + softmax cross-entropy (CPU): chunks of rows, or the vocabulary in blocks.

Two ways to never hold the ``(N, V)`` logits, chosen per call by ``plan``:

chunks of rows (the default where it fits): ``R`` rows with every class, ``X = E[r] W^T``
    (``R x V`` in a reused buffer, at most ``CHUNK_BYTES``), ``fastloss.cpu.cross_entropy``'s
    row kernel in place (each row has its whole vocabulary: its loss and ``G`` at once, the
    "mean" scale known beforehand), then ``dE[r] = G W`` and ``dW += G^T E[r]`` (in blocks
    of classes through a small buffer: NumPy's products do not accumulate).  Three
    products, as the unfused path, at the price of reading and writing ``dW`` once per
    chunk; worth it while chunks are tall (``MIN_CHUNK_ROWS``), i.e. V is not too large.
    (Liger-Kernel's recipe.)  float32/float64 only: float16 needs the whole ``W`` widened.
the vocabulary in blocks, otherwise or when the caller sets ``block_size``, below.

The vocabulary in blocks: for one block of classes ``[c0, c1)`` NumPy's BLAS forms ``X = E W[c0:c1]^T``
into a reused ``(N, c1 - c0)`` buffer, and Numba kernels over its rows do the
rest, in place.  With ``fastloss.formulas.softmax``'s notation:

pass 1, statistics (one GEMM per block): per row an online log-sum-exp. The
    running max ``m``, ``rest = sum_{c != y} exp(z_c - m)``, the target's
    logit ``z_y`` and, with smoothing, ``szm = sum_c w_c (z_c - m)``; when a
    block raises ``m`` to ``m'``, ``rest *= exp(m - m')`` and ``szm += W_seen
    (m - m')`` (``W_seen`` the weights of the classes before the block).  Then
    each row's loss and gradient coefficients: ``softmax.label_loss`` and
    ``softmax.label_gradient``.
pass 2, gradient (three GEMMs per block): the block's logits again, turned in
    place into ``G = dL/dX = (e_c a - b w_c) slope_c`` (``e_c = exp(z_c - m)``,
    the target's entry ``g_y slope_y``, ``slope`` the soft-cap's), then
    ``dE += G W[c0:c1]``, ``dW[c0:c1] = G^T E`` and ``db[c0:c1] = sum_rows G``.

Why two passes and not one with rescaling: ``dW[c0:c1] = G^T E`` needs each
row's final ``lse`` (``G``'s row factor ``a`` divides by the final sum), and
that factor differs per row, so it cannot be applied to ``dW`` after the
fact; one pass would have to keep every block's ``G``: the ``(N, V)`` logits.
``dE`` alone could be rescaled; ``dW`` cannot.  ``grad=False`` is the one
pass of statistics.

Rows run in parallel over tasks of whole rows (each task owns its rows of
the block and of the per-row statistics: no races); the kernels trust their
inputs: ``x`` the block ``(N, B)`` (or chunk ``(R, V)``) in the compute type,
``labels`` int64, ``bias``/``weight`` the block's slices or None.
"""
import numpy as np
from numba import njit, prange

from fastloss._reduction import grad_scale
from fastloss.cpu import _storage
from fastloss.cpu._formulas import softmax
from fastloss.cpu.cross_entropy import rows as softmax_rows
from fastloss.cpu._jit import KERNEL_OPTIONS, jit
from fastloss.cpu._math import vexp_nonpos
from fastloss.cpu._rows import (ROW_BLOCK_ELEMENTS, exp_shifted, loss_total, mean_denominator,
                                row_dot, row_max, softcap_row, softmax_grad_row, use_threads)
from fastloss.cpu._threads import launch

BLOCK_BYTES = 1 << 23  # the block of logits a default block size aims at
MIN_BLOCK, MAX_BLOCK = 128, 8192  # classes per block: BLAS wants width, memory wants it small
CHUNK_BYTES = 16 << 20  # the largest chunk of whole rows of logits
MIN_CHUNK_ROWS = 128  # shorter chunks re-read dW too often: the blocks of classes win
DW_BLOCK_BYTES = 1 << 21  # dW's block summed through a buffer: few products per chunk


def chunk_rows(n, V, dtype, width):
    """Rows per chunk of whole rows (``R``, the rows that fit ``CHUNK_BYTES``, at least
    ``MIN_CHUNK_ROWS`` or all of them), or None when the vocabulary goes in blocks: the
    caller set a block ``width``, float16 inputs, or too wide a vocabulary."""
    if width is not None or dtype == np.float16:
        return None
    rows = CHUNK_BYTES // max(1, V * dtype.itemsize)
    return min(n, rows) if rows >= min(n, MIN_CHUNK_ROWS) and n > 0 else None


def block_size(n, V, itemsize):
    """Classes per block: about ``BLOCK_BYTES`` of logits, a multiple of 64, within
    ``[MIN_BLOCK, MAX_BLOCK]`` and never wider than the vocabulary."""
    width = BLOCK_BYTES // max(1, n * itemsize)
    width = min(MAX_BLOCK, max(MIN_BLOCK, width - width % 64))
    return max(1, min(V, width))


@jit
def _logits_row(xi, bias, cap, capped, slope):
    """The block row's logits: ``xi + bias`` (added in place), then, with a soft-cap,
    the capped logits in ``capped`` and their slope in ``slope``; returns the row that
    holds the logits.  (Scratch rows apart from ``xi``: a loop whose output aliases its
    input fails LLVM's overlap check and runs scalar.)"""
    if bias is not None:
        for c in range(xi.shape[0]):
            xi[c] += bias[c]
    if cap is None:
        return xi
    softcap_row(xi, capped, slope, capped.dtype.type(cap))
    return capped


@jit
def _scratch_rows(x, cap):
    """A task's rows of ``exp(z - m)``, of capped logits and of their slope (the last two
    empty without a cap), one block wide."""
    B = x.shape[1]
    T = x.dtype.type
    width = B if cap is not None else 0
    return np.empty(B, T), np.empty(width, T), np.empty(width, T)


@jit
def _stats_rows(first, last, x, c0, labels, bias, weight, cap, ignore_index, smoothing, w_seen,
                m, rest, zy, szm):
    T = x.dtype.type
    B = x.shape[1]
    e, capped, slope = _scratch_rows(x, cap)
    wblk = None if weight is None else weight[c0:c0 + B]
    for i in range(first, last):
        y = labels[i]
        if y == ignore_index:
            continue
        z = _logits_row(x[i], None if bias is None else bias[c0:c0 + B], cap, capped, slope)
        skip = y - c0
        if skip >= 0 and skip < B:
            zy[i] = z[skip]
        else:
            skip = -1
        old = m[i]
        new = max(old, row_max(z, T(-np.inf)))
        if new == T(-np.inf):
            # every logit so far -inf (masked classes): no exp to add (exp(-inf - -inf) is NaN);
            # with smoothing their -inf logits make the smoothing sum -inf, as in a whole row
            if smoothing is not None:
                szm[i] = szm[i] + row_dot(z, wblk, T(0.0), T(0.0))
            continue
        if smoothing is not None:
            # sum_c w_c (z_c - m) re-based on the new max: W_seen (old - new) where it moved
            # (nothing before the first finite max: no class seen, or szm already NaN)
            moved = w_seen * (old - new) if old != new and old > T(-np.inf) else T(0.0)
            szm[i] = szm[i] + moved + row_dot(z, wblk, new, T(0.0))
        _, r = exp_shifted(z, new, e, skip)
        kept = rest[i] * vexp_nonpos(old - new) if old != new else rest[i]
        rest[i] = kept + r
        m[i] = new


@njit(parallel=True, **KERNEL_OPTIONS)
def _stats_parallel(x, c0, labels, bias, weight, cap, ignore_index, smoothing, w_seen, m, rest,
                    zy, szm):
    n, B = x.shape
    per_task = max(1, ROW_BLOCK_ELEMENTS // B)
    for t in prange((n + per_task - 1) // per_task):
        _stats_rows(t * per_task, min(n, (t + 1) * per_task), x, c0, labels, bias, weight, cap,
                    ignore_index, smoothing, w_seen, m, rest, zy, szm)


@jit
def _stats_serial(x, c0, labels, bias, weight, cap, ignore_index, smoothing, w_seen, m, rest, zy,
                  szm):
    _stats_rows(0, x.shape[0], x, c0, labels, bias, weight, cap, ignore_index, smoothing, w_seen,
                m, rest, zy, szm)


@jit
def _finish_rows(labels, weight, wsum, sw, ignore_index, eps, zcoef, mean, V, m, rest, zy, szm,
                 losses, a, b, gy):
    """Each row's loss (``losses``) and, unless ``a`` is None, its gradient
    coefficients ``a``, ``b``, ``g_y``; returns ``(sum of losses, "mean"
    denominator)``."""
    T = losses.dtype.type
    keep = T(1.0) - T(eps)
    smooth = T(eps) / T(V)
    denom = mean_denominator(labels, None, ignore_index, weight, sw)
    scale = T(grad_scale(mean, denom))
    for i in range(labels.shape[0]):
        y = labels[i]
        if y == ignore_index:
            losses[i] = 0
            continue
        swi = T(1.0) if sw is None else sw[i]
        wy = T(1.0) if weight is None else weight[y]
        ey = vexp_nonpos(zy[i] - m[i])
        s = rest[i] + ey
        loss, lse = softmax.label_loss(zy[i], m[i], s, rest[i], ey, szm[i], wy, T(wsum), keep,
                                       smooth, T(eps), T(zcoef))
        losses[i] = swi * loss
        if a is not None:
            a[i], b[i], gy[i] = softmax.label_gradient(lse, s, rest[i], ey, wy, T(wsum), keep,
                                                       smooth, T(zcoef), swi * scale, T(2.0))
    return loss_total(losses), denom


@jit
def _grad_rows(first, last, x, c0, labels, bias, weight, cap, ignore_index, m, a, b, gy):
    B = x.shape[1]
    e, capped, slope = _scratch_rows(x, cap)
    wblk = None if weight is None else weight[c0:c0 + B]
    for i in range(first, last):
        xi = x[i]
        y = labels[i]
        if y == ignore_index:
            xi[:] = 0
            continue
        z = _logits_row(xi, None if bias is None else bias[c0:c0 + B], cap, capped, slope)
        exp_shifted(z, m[i], e, -1)
        if cap is None:
            softmax_grad_row(e, a[i], b[i], wblk, xi, None)
        else:
            softmax_grad_row(e, a[i], b[i], wblk, xi, slope)
        k = y - c0
        if k >= 0 and k < B:
            xi[k] = gy[i] if cap is None else gy[i] * slope[k]


@njit(parallel=True, **KERNEL_OPTIONS)
def _grad_parallel(x, c0, labels, bias, weight, cap, ignore_index, m, a, b, gy):
    n, B = x.shape
    per_task = max(1, ROW_BLOCK_ELEMENTS // B)
    for t in prange((n + per_task - 1) // per_task):
        _grad_rows(t * per_task, min(n, (t + 1) * per_task), x, c0, labels, bias, weight, cap,
                   ignore_index, m, a, b, gy)


@jit
def _grad_serial(x, c0, labels, bias, weight, cap, ignore_index, m, a, b, gy):
    _grad_rows(0, x.shape[0], x, c0, labels, bias, weight, cap, ignore_index, m, a, b, gy)


@njit(parallel=True, **KERNEL_OPTIONS)
def _chunk_parallel(x, labels, weight, wsum, sw, ignore_index, eps, zcoef, cap, scale, g, losses):
    T = losses.dtype.type
    n, V = x.shape
    per_task = max(1, ROW_BLOCK_ELEMENTS // V)
    for t in prange((n + per_task - 1) // per_task):
        softmax_rows(t * per_task, min(n, (t + 1) * per_task), x, labels, None, weight, T(wsum),
                     sw, ignore_index, T(eps), T(zcoef), cap, None, True, T(scale), g, losses)


@jit
def _chunk_serial(x, labels, weight, wsum, sw, ignore_index, eps, zcoef, cap, scale, g, losses):
    T = losses.dtype.type
    softmax_rows(0, x.shape[0], x, labels, None, weight, T(wsum), sw, ignore_index, T(eps),
                 T(zcoef), cap, None, True, T(scale), g, losses)


def _by_rows(E, W, labels, bias, weight, sw, ignore_index, eps, zcoef, cap, reduction, grad,
             grads_out, R):
    """``linear_cross_entropy`` in chunks of ``R`` whole rows (float32/float64 inputs)."""
    n, H = E.shape
    V = W.shape[0]
    T = E.dtype.type
    wsum = float(V if weight is None else np.sum(weight, dtype=np.float64))
    denom = mean_denominator(labels, None, ignore_index, weight, sw)
    scale = grad_scale(reduction == "mean", denom)
    buffer = np.empty(R * V, T)
    losses = np.empty(n, T)
    threaded = use_threads(buffer.reshape(R, V))
    dE = dW = db = dW_part = None
    if grad:
        direct = grads_out is not None and grads_out[0].flags.c_contiguous
        dE = grads_out[0].reshape(n, H) if direct else np.empty((n, H), T)
        dW = np.empty((V, H), T) if grads_out is None else grads_out[1]
        if bias is not None:
            db = np.empty(V, T) if grads_out is None else grads_out[2]
        span = max(1, min(V, DW_BLOCK_BYTES // max(1, H * E.itemsize)))
        dW_part = np.empty((span, H), T)
    for r0 in range(0, n, R):
        r1 = min(n, r0 + R)
        x = buffer[:(r1 - r0) * V].reshape(r1 - r0, V)
        Ec = E[r0:r1]
        np.matmul(Ec, W.T, out=x)
        if bias is not None:
            x += bias
        launch(_chunk_parallel, _chunk_serial, threaded, x, labels[r0:r1], weight, wsum,
               None if sw is None else sw[r0:r1], ignore_index, eps, zcoef, cap, scale,
               x if grad else None, losses[r0:r1])
        if not grad:
            continue
        np.matmul(x, W, out=dE[r0:r1])
        if bias is not None:
            if r0 == 0:
                np.sum(x, axis=0, out=db)
            else:
                db += x.sum(axis=0)
        if r0 == 0 and dW.flags.c_contiguous:
            np.matmul(x.T, Ec, out=dW)
            continue
        for c0 in range(0, V, dW_part.shape[0]):
            c1 = min(V, c0 + dW_part.shape[0])
            part = dW_part[:c1 - c0]
            np.matmul(x[:, c0:c1].T, Ec, out=part)
            if r0 == 0:
                dW[c0:c1] = part
            else:
                dW[c0:c1] += part
    total = loss_total(losses)
    if not grad:
        return losses, total, denom, None
    if grads_out is not None:
        if not direct:
            grads_out[0][...] = dE.reshape(grads_out[0].shape)
        dE = grads_out[0]
    return losses, total, denom, (dE, dW) if db is None else (dE, dW, db)


class _Blocks:
    """The vocabulary's blocks and their logits: ``logits(w, c0, c1)`` is the block's
    ``E W[c0:c1]^T`` (``w = weights(c0, c1)``) in a buffer reused by every block."""

    def __init__(self, E, W, width, T):
        self.E, self.W, self.T = E, W, T
        self.n, self.V = E.shape[0], W.shape[0]
        self.starts = range(0, self.V, width)
        self._x = np.empty(self.n * width, T)
        # float16 classifier blocks are widened into this buffer before their GEMMs
        self._w = np.empty(width * W.shape[1], T) if W.dtype != T else None

    def weights(self, c0, c1):
        """``W[c0:c1]`` in the compute type."""
        if self._w is None:
            return self.W[c0:c1]
        w = self._w[:(c1 - c0) * self.W.shape[1]].reshape(c1 - c0, self.W.shape[1])
        w[...] = self.W[c0:c1]
        return w

    def logits_buffer(self, width):
        """The reused buffer as ``(N, width)`` logits."""
        return self._x[:self.n * width].reshape(self.n, width)

    def logits(self, w, c0, c1):
        x = self.logits_buffer(c1 - c0)
        np.matmul(self.E, w.T, out=x)
        return x


def linear_cross_entropy(E, W, labels, bias, weight, sw, ignore_index, eps, zcoef, cap, reduction,
                         grad, grads_out, width):
    """``(per-row losses, loss sum, "mean" denominator, grads)`` of checked NumPy
    inputs: ``E (N, H)``, ``W (V, H)``, int64 ``labels (N,)``, the optional
    ``bias (V,)``, ``weight (V,)`` (compute type) and ``sw (N,)``; ``grads_out``
    the caller's ``(dE, dW[, db])`` or None; ``width`` the caller's classes per
    block or None (``chunk_rows`` chooses).  ``grads`` is None unless ``grad``:
    ``(dE, dW[, db])`` in the inputs' dtype."""
    n, H = E.shape
    V = W.shape[0]
    T = _storage.compute_type(E.dtype)
    Ec = np.ascontiguousarray(E, dtype=T)
    R = chunk_rows(n, V, E.dtype, width)
    if R is not None:
        # a classifier in neither order is copied once: NumPy's products would otherwise
        # leave BLAS for a slow loop of other round-off
        W = W if W.flags.c_contiguous or W.flags.f_contiguous else np.ascontiguousarray(W)
        return _by_rows(Ec, W, labels, bias, weight, sw, ignore_index, eps, zcoef, cap, reduction,
                        grad, grads_out, R)
    if width is None:
        width = block_size(n, V, E.itemsize)
    blocks = _Blocks(Ec, W, width, T)
    biasc = None if bias is None else np.ascontiguousarray(bias, dtype=T)
    threaded = use_threads(blocks.logits_buffer(min(width, V)))
    m = np.full(n, -np.inf, T)
    rest, zy, szm = np.zeros(n, T), np.zeros(n, T), np.zeros(n, T)
    smoothing = True if eps > 0 else None
    wsum = float(V if weight is None else np.sum(weight, dtype=np.float64))
    for c0 in blocks.starts:
        c1 = min(V, c0 + width)
        w_seen = T(c0 if weight is None else np.sum(weight[:c0], dtype=np.float64))
        x = blocks.logits(blocks.weights(c0, c1), c0, c1)
        launch(_stats_parallel, _stats_serial, threaded, x, c0, labels, biasc, weight, cap,
               ignore_index, smoothing, w_seen, m, rest, zy, szm)
    losses = np.empty(n, T)
    a = b = gy = None
    if grad:
        a, b, gy = np.zeros(n, T), np.zeros(n, T), np.zeros(n, T)
    total, denom = _finish_rows(labels, weight, wsum, sw, ignore_index, eps, zcoef,
                                reduction == "mean", V, m, rest, zy, szm, losses, a, b, gy)
    if not grad:
        return losses, total, denom, None
    return losses, total, denom, _gradients(blocks, biasc, labels, weight, cap, ignore_index,
                                            m, a, b, gy, bias is not None, grads_out, width,
                                            threaded, E.dtype)


def _gradients(blocks, bias, labels, weight, cap, ignore_index, m, a, b, gy, with_bias,
               grads_out, width, threaded, dtype):
    """Pass 2: ``(dE, dW[, db])`` from the block logits again (see the module's docstring)."""
    E, W, T = blocks.E, blocks.W, blocks.T
    n, H = E.shape
    V = W.shape[0]
    dE = np.zeros((n, H), T)  # summed over blocks in the compute type, cast once at the end
    product = np.empty((n, H), T)
    dW = np.empty((V, H), dtype) if grads_out is None else grads_out[1]
    db = None
    if with_bias:
        db = np.empty(V, dtype) if grads_out is None else grads_out[2]
    wide = np.empty(width * H, T) if dtype != T or not dW.flags.c_contiguous else None
    for c0 in blocks.starts:
        c1 = min(V, c0 + width)
        w = blocks.weights(c0, c1)
        x = blocks.logits(w, c0, c1)
        launch(_grad_parallel, _grad_serial, threaded, x, c0, labels, bias, weight, cap,
               ignore_index, m, a, b, gy)
        np.matmul(x, w, out=product)
        dE += product
        if wide is None:
            np.matmul(x.T, E, out=dW[c0:c1])
        else:
            part = wide[:(c1 - c0) * H].reshape(c1 - c0, H)
            np.matmul(x.T, E, out=part)
            dW[c0:c1] = part
        if db is not None:
            db[c0:c1] = x.sum(axis=0)
    if grads_out is None:
        dE = dE.astype(dtype, copy=False)
    else:
        grads_out[0][...] = dE.reshape(grads_out[0].shape)
        dE = grads_out[0]
    return (dE, dW) if db is None else (dE, dW, db)
