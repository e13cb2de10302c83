r"""Fused linear + softmax cross-entropy (CUDA): the vocabulary in blocks, as on the CPU.

The passes, the notation and the reason for two of them are those of
``fastloss.cpu.linear_cross_entropy``.  For each block of classes ``[c0, c1)``
the block's logits ``X = E W[c0:c1]^T`` come from the caller's library on the
call's stream (CuPy's or PyTorch's cuBLAS products, ``_LibraryProducts``); for
Numba device arrays, and so under the simulator, from ``_matmul_kernel``, a plain
one-thread-per-output product used only there (``_PlainProducts``).  Then:

* ``_stats_kernel``, one block per row: the block's online ``(max, sum of exp over
  the classes but y)`` (and the smoothing sum), merged by a block reduction, then
  merged by thread 0 into the row's running ``m``, ``rest``, ``szm`` (rescaled when
  ``m`` grows); the thread that meets the target stores ``z_y``;
* ``_finish_kernel``, one thread per row: the loss and the gradient coefficients
  (``softmax.label_loss``, ``softmax.label_gradient``), the "mean" scale read on
  the device;
* ``_grad_kernel``, one block per row: ``X`` turned in place into ``G``, each
  element by the thread that read it; then ``dE += G W[c0:c1]``,
  ``dW[c0:c1] = G^T E`` and ``db[c0:c1] = sum_rows G``.

Class weights enter ``szm``'s re-basing through their prefix sums per block
(``_weight_prefix_kernel``, one thread, on the device: nothing is read back).
"""
import contextlib
import importlib.util
import math

import numpy as np
from numba import config, cuda, float64, int64

from fastloss.cuda._arrays import compute_type, fill, rows
from fastloss.cuda._blocks import (LARGE_KERNEL_BLOCK, MAX_THREADS, block_logsumexp, block_sum,
                                   cast_like, grid_for, grid_stride, kernel, online_add,
                                   ptx_dtypes, row_grid, threads_for)
from fastloss.cuda._formulas import softmax
from fastloss.cuda._reduction import class_denominator, finish, gradient_scale, per_row_losses
from fastloss.cuda.cross_entropy import _add_shifted, _capped, _shift, _weight

PLAIN_TILE = 8  # threads per side of _matmul_kernel's blocks (the simulator runs them as threads)
BLOCK_BYTES = 1 << 28  # the block of logits a default block size aims at
MIN_BLOCK = 1024


@cuda.jit(device=True)
def _logit(x, row, c, c0, bias, cap, zero, one):
    """``(z, dz/dx)`` of class ``c0 + c``: the block's product plus the bias, soft-capped."""
    v = cast_like(x[row, c], zero)
    if bias is not None:
        v += cast_like(bias[c0 + c], zero)
    return _capped(v, cap, one)


@kernel(LARGE_KERNEL_BLOCK)
def _stats_kernel(x, c0, k, labels, bias, weight, wcum, cap, ignore_index, eps, m, rest, zy, szm):
    """Pass 1 over block ``k`` (classes ``c0 + [0, B)``) of every row (one block of threads
    per row, rows grid-strided); ``wcum[k]`` the weights of the classes before the block
    (None: no weights, ``c0`` of them)."""
    mbuf = cuda.shared.array(MAX_THREADS, float64)
    sbuf = cuda.shared.array(MAX_THREADS, float64)
    zero = eps - eps
    one = cast_like(1, zero)
    ninf = cast_like(-math.inf, zero)
    B = x.shape[1]
    for row in range(int64(cuda.blockIdx.x), x.shape[0], int64(cuda.gridDim.x)):
        y = int64(labels[row])
        if y == ignore_index:
            continue  # the whole block skips the row: no barrier is left waiting
        t = y - c0  # the target's column in the block, when it is there
        bm, bs, bsz, bw = ninf, zero, zero, zero
        for c in range(cuda.threadIdx.x, B, cuda.blockDim.x):
            z, _ = _logit(x, row, c, c0, bias, cap, zero, one)
            if c == t:
                zy[row] = z
            new, bs = online_add(bm, bs, z, c != t, ninf)
            if eps > 0:
                bsz, bw = _add_shifted(bsz, bw, bm, new, _weight(weight, c0 + c, zero), z, zero)
            bm = new
        mblk, sblk = block_logsumexp(mbuf, sbuf, bm, bs)
        mb = cast_like(mblk, zero)
        if eps > 0:
            # sum_c w_c (z_c - m) and sum_c w_c over the block, against the block's max
            bsz = cast_like(block_sum(mbuf, _shift(bsz, bw, bm, mb, zero)), zero)
            bw = cast_like(block_sum(mbuf, bw), zero)
        if cuda.threadIdx.x == 0:
            old = m[row]
            new = old if old >= mb else mb
            kept = rest[row] if old == new else rest[row] * math.exp(old - new)
            fresh = cast_like(sblk, zero)
            rest[row] = kept + (fresh if mb == new else fresh * math.exp(mb - new))
            if eps > 0:
                seen = cast_like(c0, zero) if wcum is None else cast_like(wcum[k], zero)
                before = szm[row] + (seen * (old - new) if old != new and old > ninf else zero)
                szm[row] = before + _shift(bsz, bw, mb, new, zero)
            m[row] = new


@kernel()
def _weight_prefix_kernel(weight, width, wcum):
    """``wcum[k] = sum(weight[:k * width])`` for every block k, and the total last
    (one thread: V additions, in order)."""
    if cuda.grid(1) == 0:
        total = 0.0
        k = 0
        for c in range(weight.shape[0]):
            if c % width == 0:
                wcum[k] = total
                k += 1
            total += float64(weight[c])
        wcum[wcum.shape[0] - 1] = total


@kernel()
def _finish_kernel(labels, weight, wcum, V, sw, ignore_index, eps, zcoef, stats, m, rest, zy, szm,
                   losses, a, b, gy):
    """Each row's loss (``losses``) and, unless ``a`` is None, its gradient coefficients."""
    zero = eps - eps
    one = cast_like(1, zero)
    keep = one - eps
    smooth = eps / cast_like(V, zero)
    wsum = cast_like(V, zero) if wcum is None else cast_like(wcum[wcum.shape[0] - 1], zero)
    scale = gradient_scale(stats, zero)
    first, stride = grid_stride()
    for row in range(first, labels.shape[0], stride):
        y = int64(labels[row])
        if y == ignore_index:
            losses[row] = zero
            continue
        swi = one if sw is None else cast_like(sw[row], zero)
        wy = _weight(weight, y, zero)
        ey = math.exp(zy[row] - m[row])
        s = rest[row] + ey
        loss, lse = softmax.label_loss(zy[row], m[row], s, rest[row], ey, szm[row], wy, wsum, keep,
                                       smooth, eps, zcoef)
        losses[row] = swi * loss
        if a is not None:
            ar, br, gyr = softmax.label_gradient(lse, s, rest[row], ey, wy, wsum, keep, smooth,
                                                 zcoef, swi * scale, cast_like(2, zero))
            a[row] = ar
            b[row] = br
            gy[row] = gyr


@kernel(LARGE_KERNEL_BLOCK)
def _grad_kernel(x, c0, labels, bias, weight, cap, ignore_index, m, a, b, gy):
    """Pass 2 over a block: ``x`` (the block's products) becomes ``G = dL/dX`` in place."""
    zero = cast_like(0, m[0])
    one = cast_like(1, zero)
    B = x.shape[1]
    for row in range(int64(cuda.blockIdx.x), x.shape[0], int64(cuda.gridDim.x)):
        y = int64(labels[row])
        for c in range(cuda.threadIdx.x, B, cuda.blockDim.x):
            if y == ignore_index:
                x[row, c] = zero
                continue
            z, slope = _logit(x, row, c, c0, bias, cap, zero, one)
            if c0 + c == y:
                x[row, c] = gy[row] * slope
            else:
                x[row, c] = softmax.class_gradient(math.exp(z - m[row]), a[row], b[row],
                                                   _weight(weight, c0 + c, zero)) * slope


@kernel(PLAIN_TILE * PLAIN_TILE)
def _matmul_kernel(p, q, out, p_t, q_t, accumulate, zero):
    """``out (+)= P Q`` with ``P = p.T`` when ``p_t`` (else ``p``), likewise ``Q``; one
    thread per output, sums in the type of ``zero``.  For Numba device arrays only (the
    simulator among them): CuPy and PyTorch inputs take their library's products."""
    i, j = cuda.grid(2)
    if i >= out.shape[0] or j >= out.shape[1]:
        return
    inner = p.shape[0] if p_t else p.shape[1]
    acc = zero
    for k in range(inner):
        pv = p[k, i] if p_t else p[i, k]
        qv = q[j, k] if q_t else q[k, j]
        acc += cast_like(pv, zero) * cast_like(qv, zero)
    if accumulate:
        acc += cast_like(out[i, j], zero)
    out[i, j] = acc


@kernel()
def _column_sums_kernel(x, out):
    """``out[c] = sum_rows x[:, c]``, in float64, one thread per column."""
    first, stride = grid_stride()
    for c in range(first, x.shape[1], stride):
        total = 0.0
        for r in range(x.shape[0]):
            total += float64(x[r, c])
        out[c] = total


@kernel()
def _copy_kernel(src, dst):
    """``dst = src`` (2-D, same shape), converting the dtype."""
    first, stride = grid_stride()
    width = src.shape[1]
    for i in range(first, src.shape[0] * width, stride):
        dst[i // width, i % width] = src[i // width, i % width]


class _PlainProducts:
    """The block products by ``_matmul_kernel`` on Numba views (inputs of any float dtype)."""

    def __init__(self, dev, T):
        self.dev, self.zero = dev, T(0)

    def _run(self, p, q, out, p_t, q_t, accumulate):
        grid = (-(-out.shape[0] // PLAIN_TILE), -(-out.shape[1] // PLAIN_TILE))
        if out.shape[0] and out.shape[1]:
            self.dev.launch(_matmul_kernel, grid, (PLAIN_TILE, PLAIN_TILE), p, q, out, p_t, q_t,
                            accumulate, self.zero)

    def embeddings(self, e):
        """``e`` as the products read it (the plain kernel widens on load)."""
        return e

    def logits(self, e, w, x):
        self._run(e, w, x, False, True, False)      # X = E W_blk^T

    def add_to_embeddings(self, g, w, de):
        self._run(g, w, de, False, False, True)     # dE += G W_blk

    def classifier(self, g, e, dw):
        self._run(g, e, dw, True, False, False)     # dW_blk = G^T E

    def bias(self, g, db):
        blocks, threads = grid_for(g.shape[1])
        self.dev.launch(_column_sums_kernel, blocks, threads, g, db)


class _LibraryProducts(_PlainProducts):
    """The block products by CuPy (cuBLAS) on the call's stream and device, the Numba views
    wrapped without a copy; float16 blocks are widened to float32 first.  A view is wrapped
    unbound (``bind(0)``): its interface then names no stream, so CuPy does not synchronise
    with it on every import (the call's own stream orders everything anyway)."""

    def __init__(self, dev, T):
        super().__init__(dev, T)
        import cupy
        self.cupy, self.T = cupy, T
        with dev.current():
            self.device = dev.cuda.get_current_device().id
        handle = dev.handle
        with cupy.cuda.Device(self.device):
            self.stream = (cupy.cuda.Stream.null if handle in (None, 0, 1)
                           else cupy.cuda.Stream.ptds if handle == 2
                           else cupy.cuda.ExternalStream(int(handle), self.device))

    def _on_call(self):
        """The call's device and stream, current for CuPy."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.cupy.cuda.Device(self.device))
        stack.enter_context(self.stream)
        return stack

    def _cp(self, v):
        return v if isinstance(v, self.cupy.ndarray) else self.cupy.asarray(v.bind(0))

    def _wide(self, v):
        a = self._cp(v)
        return a if a.dtype == self.T else a.astype(self.T)

    def embeddings(self, e):
        """``e`` widened once per call (float16), as a CuPy array."""
        with self._on_call():
            return self._wide(e)

    def logits(self, e, w, x):
        with self._on_call():
            self.cupy.matmul(self._wide(e), self._wide(w).T, out=self._cp(x))

    def add_to_embeddings(self, g, w, de):
        with self._on_call():
            out = self._cp(de)
            out += self.cupy.matmul(self._cp(g), self._wide(w))

    def classifier(self, g, e, dw):
        with self._on_call():
            out = self._cp(dw)
            out[...] = self.cupy.matmul(self._cp(g).T, self._wide(e))

    def bias(self, g, db):
        with self._on_call():
            out = self._cp(db)
            out[...] = self._cp(g).sum(axis=0)


def _products(dev, T):
    """CuPy's products where CuPy is there (never under the simulator), else the plain kernel."""
    if config.ENABLE_CUDASIM:
        return _PlainProducts(dev, T)
    if importlib.util.find_spec("cupy") is None:
        return _PlainProducts(dev, T)
    return _LibraryProducts(dev, T)


def block_size(n, V, itemsize):
    """Classes per block on the GPU: about ``BLOCK_BYTES`` of logits (cuBLAS wants wide
    blocks, and the GPU's memory holds them), at least ``MIN_BLOCK``, at most V."""
    width = BLOCK_BYTES // max(1, n * itemsize)
    return max(1, min(V, max(MIN_BLOCK, width - width % 64)))


def linear_cross_entropy(dev, E, W, labels, bias, weight, sw, ignore_index, eps, zcoef, cap,
                         reduction, grad, grad_out, caller_grad_out, width):
    """``(loss, grads)`` on checked device views ``E (..., H)``, ``W (V, H)``, labels, and
    the optional ``bias``, ``weight``, ``sw``; ``grad_out`` the views of the caller's
    buffers (``caller_grad_out`` the caller's own), or None; ``width`` classes per block."""
    H = tuple(E.shape)[-1]
    V = W.shape[0]
    batch_shape, dtype = tuple(E.shape)[:-1], E.dtype
    T = compute_type(dtype)
    e = rows(E, H, "embeddings")
    y = rows(labels, None, "target")
    sw = None if sw is None else rows(sw, None, "sample_weight")
    n = e.shape[0]
    products = _products(dev, T)
    e = products.embeddings(e)
    stats = class_denominator(dev, n, y, weight, sw, ignore_index) if reduction == "mean" else None
    starts = range(0, V, width)
    wcum = None  # only smoothing reads the weights' sums
    if weight is not None and eps > 0:
        wcum = dev.scratch((len(starts) + 1,), np.float64, "class_weight_sums")
        dev.launch(_weight_prefix_kernel, 1, 1, weight, width, wcum)
    m = _filled(dev, n, T, -np.inf, "row_max")
    rest, zy, szm = (_filled(dev, n, T, 0.0, slot) for slot in ("row_rest", "row_label_logit",
                                                                  "row_logit_sum"))
    x = dev.scratch((n * width,), T, "logit_block")
    threads = threads_for(width)
    grid = row_grid(max(n, 1), threads)
    Tc = None if cap is None else T(cap)

    def block(c0):
        c1 = min(V, c0 + width)
        xb = x[:n * (c1 - c0)].reshape((n, c1 - c0))
        if n:
            products.logits(e, W[c0:c1], xb)
        return c1, xb

    for k, c0 in enumerate(starts):
        _, xb = block(c0)
        if n:
            dev.launch(_stats_kernel, grid, threads, xb, c0, k, y, bias, weight, wcum, Tc,
                       ignore_index, T(eps), m, rest, zy, szm)
    losses = per_row_losses(dev, n, reduction, dtype, T)
    a = b = gy = None
    if grad:
        a, b, gy = (dev.scratch((n,), T, slot) for slot in ("grad_a", "grad_b", "grad_label"))
    if n:
        blocks, fthreads = grid_for(n)
        dev.launch(_finish_kernel, blocks, fthreads, y, weight, wcum, V, sw, ignore_index, T(eps),
                   T(zcoef), stats, m, rest, zy, szm, losses[1], a, b, gy)
    loss = finish(dev, losses, stats, reduction, batch_shape, dtype)
    if not grad:
        return loss, None
    outs = _gradient_outputs(dev, E, W, bias, grad_out)
    de_acc = dev.zeros((n, H), T)[1]
    for c0 in starts:
        c1, xb = block(c0)
        if n:
            dev.launch(_grad_kernel, grid, threads, xb, c0, y, bias, weight, Tc, ignore_index,
                       m, a, b, gy)
            products.add_to_embeddings(xb, W[c0:c1], de_acc)
        _classifier_block(dev, products, xb, e, outs[1][1][c0:c1], T)
        if bias is not None:
            products.bias(xb, outs[2][1][c0:c1])
    if n * H:
        blocks, cthreads = grid_for(n * H)
        dev.launch(_copy_kernel, blocks, cthreads, de_acc, rows(outs[0][1], H, "grad_out[0]"))
    grads = tuple(dev.give_grad(native, None if caller_grad_out is None else caller_grad_out[i])
                  for i, (native, _) in enumerate(outs))
    return loss, grads


def _filled(dev, n, T, value, slot):
    view = dev.scratch((n,), T, slot)
    if n:
        fill(dev, view, value)
    return view


def _gradient_outputs(dev, E, W, bias, grad_out):
    """``[(native, view)]`` of d_embeddings, d_classifier (and d_bias): the caller's
    buffers, or new arrays of the inputs' kind."""
    likes = [E, W] + ([bias] if bias is not None else [])
    if grad_out is not None:
        return [(g, g) for g in grad_out]
    return [dev.empty(tuple(a.shape), a.dtype) for a in likes]


def _classifier_block(dev, products, g, e, dw, T):
    """``dW[c0:c1] = G^T E`` (zeros without rows), through a compute-type block when the
    output is float16."""
    if dw.dtype == T:
        products.classifier(g, e, dw)
        return
    wide = dev.scratch(tuple(dw.shape), T, "classifier_block")
    products.classifier(g, e, wide)
    blocks, threads = grid_for(max(1, dw.size))
    if dw.size:
        dev.launch(_copy_kernel, blocks, threads, wide, dw)


def ptx_signatures():
    """Argument types of every kernel here, for the compile check: per dtype, no option
    and every option."""
    from numba import types
    i64, f64, N = types.int64, types.float64, types.none
    sigs = []
    for X, T in ptx_dtypes():
        for bias, weight, wcum, cap, sw, stats in ((N, N, N, N, N, N),
                                                   (X[::1], X[::1], f64[::1], T, X[::1], f64[::1])):
            sigs.append((_stats_kernel, (T[:, ::1], i64, i64, i64[::1], bias, weight, wcum, cap,
                                         i64, T, T[::1], T[::1], T[::1], T[::1])))
            sigs.append((_finish_kernel, (i64[::1], weight, wcum, i64, sw, i64, T, T, stats,
                                          T[::1], T[::1], T[::1], T[::1], T[::1], T[::1], T[::1],
                                          T[::1])))
            sigs.append((_finish_kernel, (i64[::1], weight, wcum, i64, sw, i64, T, T, stats,
                                          T[::1], T[::1], T[::1], T[::1], X[::1], N, N, N)))
            sigs.append((_grad_kernel, (T[:, ::1], i64, i64[::1], bias, weight, cap, i64, T[::1],
                                        T[::1], T[::1], T[::1])))
        sigs.append((_weight_prefix_kernel, (X[::1], i64, f64[::1])))
        # the products: X = E W^T, dE += G W, dW = G^T E (p_t, q_t, accumulate: run-time flags)
        for p, q, out in ((X[:, :], X[:, :], T[:, ::1]), (T[:, ::1], X[:, :], T[:, ::1]),
                          (T[:, ::1], X[:, :], X[:, :])):
            sigs.append((_matmul_kernel, (p, q, out, types.boolean, types.boolean, types.boolean,
                                          T)))
        sigs.append((_column_sums_kernel, (T[:, ::1], X[:])))
        sigs.append((_copy_kernel, (T[:, ::1], X[:, :])))
    return sigs
