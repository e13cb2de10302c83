"""Plain NumPy loss + gradient: the competitor a NumPy user would write.

Used by ``python -m fastloss`` and by the benchmarks (``bench/``) as the
baseline that fastloss is checked against and timed against.  Every function
is vectorized, idiomatic NumPy (max-subtract, ``exp``, ``sum``, a few ``out=``
arguments to avoid the worst temporaries), with fixed hyper-parameters and
``reduction="mean"``:

* ``softmax_cross_entropy(logits, labels)``: ``torch.nn.functional.cross_entropy``.
* ``focal_loss(logits, labels)``: multi-class softmax focal loss, ``gamma=2``,
  no alpha, per sample ``-(1 - p_y)**2 * log p_y``.
* ``sigmoid_focal_loss(logits, targets)``: ``torchvision.ops.sigmoid_focal_loss``
  with ``alpha=0.25, gamma=2``, mean over all elements.
* ``huber_loss(input, target)``: ``torch.nn.functional.huber_loss``, ``delta=1``.

Each takes float32 arrays (integer labels where they apply) and returns
``(loss, grad)``: ``loss`` a Python float, ``grad`` a float32 array of the
first argument's shape, the gradient of the mean loss.  Logits may have any
leading shape ``(..., C)``; they are treated as ``reshape(-1, C)``.

This module imports nothing but NumPy.
"""
import numpy as np

__all__ = [
    "softmax_cross_entropy",
    "focal_loss",
    "sigmoid_focal_loss",
    "huber_loss",
    "make_inputs",
    "agreement",
    "LOSSES",
]


def _softmax_rows(x):
    """Return ``(p, lse)`` for 2-D ``x``: row softmax (new array) and logsumexp (N,)."""
    m = x.max(axis=1, keepdims=True)
    p = np.subtract(x, m)                      # the one (N, C) temporary, reused as p
    np.exp(p, out=p)
    s = p.sum(axis=1, keepdims=True)
    p *= np.reciprocal(s)
    lse = (np.log(s) + m)[:, 0]
    return p, lse


def _rows(x, labels):
    x = np.asarray(x)
    c = x.shape[-1]
    x2 = x.reshape(-1, c)
    y = np.asarray(labels).reshape(-1)
    return x, x2, y, np.arange(x2.shape[0])


def softmax_cross_entropy(logits, labels):
    """Mean softmax cross entropy with integer labels; ``grad = (softmax - onehot) / N``."""
    x, x2, y, rows = _rows(logits, labels)
    n = x2.shape[0]
    p, lse = _softmax_rows(x2)
    loss = float(np.mean(lse - x2[rows, y], dtype=np.float64))
    p[rows, y] -= 1
    p *= x.dtype.type(1.0 / n)
    return loss, p.reshape(x.shape)


def focal_loss(logits, labels):
    """Mean multi-class softmax focal loss, ``gamma=2``, no alpha.

    ``L = -(1 - p_y)**2 * log p_y``; with ``l = log p_y`` and ``q = 1 - p_y``,
    ``dL/dz_j = c * (delta_jy - p_j)`` where ``c = 2 q p_y l - q**2``.
    ``q`` is ``-expm1(l)`` so that it keeps its digits when ``p_y`` is near 1.
    """
    x, x2, y, rows = _rows(logits, labels)
    n = x2.shape[0]
    p, lse = _softmax_rows(x2)
    logpy = x2[rows, y] - lse
    py = np.exp(logpy)
    q = -np.expm1(logpy)
    loss = float(np.mean(-(q * q) * logpy, dtype=np.float64))
    c = (2 * q * py * logpy - q * q) * x.dtype.type(1.0 / n)    # (N,)
    p *= -c[:, None]
    p[rows, y] += c
    return loss, p.reshape(x.shape)


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0):
    """Mean sigmoid focal loss, as ``torchvision.ops.sigmoid_focal_loss`` (alpha=0.25, gamma=2).

    ``ce = BCEWithLogits(x, t)``, ``p_t = p t + (1 - p)(1 - t)``,
    ``L = alpha_t * ce * (1 - p_t)**gamma``.  With ``m = 1 - p_t = p + t - 2 p t``:
    ``dL/dx = alpha_t * ((p - t) m**gamma + ce * gamma m**(gamma-1) p (1 - p)(1 - 2t))``.
    """
    x = np.asarray(logits)
    t = np.asarray(targets, dtype=x.dtype)
    f = x.dtype.type
    inv_n = f(1.0 / x.size)
    # softplus(x) = max(x, 0) + log(1 + exp(-|x|)); log(1 + e) rather than log1p(e):
    # e is in (0, 1], the absolute error is below one ulp of 1, and NumPy's float32
    # log1p is 2-3x slower than log.
    sp = np.abs(x)
    np.negative(sp, out=sp)
    np.exp(sp, out=sp)
    sp += 1
    np.log(sp, out=sp)
    sp += np.maximum(x, 0)
    p = np.subtract(x, sp)
    np.exp(p, out=p)                            # sigmoid(x) = exp(x - softplus(x))
    ce = sp
    ce -= x * t                                 # BCE with logits, stable
    u = t * f(-2)
    u += 1                                      # 1 - 2t
    m = p * u
    m += t                                      # m = 1 - p_t = p (1 - 2t) + t
    if gamma == 2.0:
        mg = m * m
    else:
        mg = m ** f(gamma)
        m **= f(gamma - 1)
    m *= f(gamma)                               # d(m**gamma)/dm
    if alpha >= 0:
        at = t * f(2 * alpha - 1)
        at += f(1 - alpha)                      # alpha t + (1 - alpha)(1 - t)
    else:
        at = np.ones_like(x)
    li = ce * mg
    li *= at
    loss = float(np.mean(li, dtype=np.float64))
    g = np.subtract(p, t, out=li)
    g *= mg                                     # (p - t) m**gamma
    w = np.subtract(1, p, out=mg)
    w *= p
    w *= u
    w *= m
    w *= ce                                     # ce * gamma m**(gamma-1) * p (1 - p) (1 - 2t)
    g += w
    at *= inv_n
    g *= at
    return loss, g


def huber_loss(input, target, delta=1.0):
    """Mean Huber loss (``delta=1``): ``c = clip(d, -delta, delta)``, ``L = c (d - c/2)``, ``grad = c / n``."""
    x = np.asarray(input)
    d = np.subtract(x, target)
    f = x.dtype.type
    c = np.clip(d, f(-delta), f(delta))
    d -= f(0.5) * c
    d *= c
    loss = float(np.mean(d, dtype=np.float64))
    c *= f(1.0 / x.size)
    return loss, c


LOSSES = {
    "softmax_cross_entropy": softmax_cross_entropy,
    "focal_loss": focal_loss,
    "sigmoid_focal_loss": sigmoid_focal_loss,
    "huber_loss": huber_loss,
}


def make_inputs(name, shape, seed=0, dtype=np.float32):
    """Synthetic inputs ``(x, y)`` for loss ``name`` (a key of ``LOSSES``).

    Logits are ``N(0, 2**2)``; class labels uniform int64 in ``[0, C)``;
    sigmoid targets are 0/1 with about 10 % positives (detection-like);
    Huber's input and target are both ``N(0, 1)``, so both branches are hit.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    if name in ("softmax_cross_entropy", "focal_loss"):
        x = rng.standard_normal(shape, dtype=np.float32)
        x *= 2
        y = rng.integers(0, shape[-1], size=shape[:-1], dtype=np.int64)
    elif name == "sigmoid_focal_loss":
        x = rng.standard_normal(shape, dtype=np.float32)
        x *= 2
        y = (rng.random(shape, dtype=np.float32) < 0.1).astype(np.float32)
    elif name == "huber_loss":
        x = rng.standard_normal(shape, dtype=np.float32)
        y = rng.standard_normal(shape, dtype=np.float32)
    else:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}")
    return x.astype(dtype, copy=False), (y if y.dtype.kind == "i" else y.astype(dtype, copy=False))


def agreement(loss, grad, ref_loss, ref_grad, rtol=1e-4):
    """Compare a ``(loss, grad)`` pair with a reference one.

    Returns ``(loss_err, grad_err, ok)``: ``loss_err = |loss - ref_loss|``,
    ``grad_err = max|grad - ref_grad|`` (both absolute), and ``ok`` when
    ``loss_err <= rtol * max(1, |ref_loss|)`` and
    ``grad_err <= rtol * max|ref_grad|`` (float32 tolerance by default: the
    gradient of a mean loss scales as 1/n, so its error is judged against its
    own largest entry).  NaN anywhere makes ``ok`` false.
    """
    loss = float(loss)
    ref_loss = float(ref_loss)
    grad = np.asarray(grad)
    ref_grad = np.asarray(ref_grad)
    if grad.shape != ref_grad.shape:
        return abs(loss - ref_loss), float("inf"), False
    loss_err = abs(loss - ref_loss)
    diff = np.subtract(grad, ref_grad, dtype=np.float64)
    grad_err = float(np.max(np.abs(diff))) if diff.size else 0.0
    scale = float(np.max(np.abs(ref_grad))) if ref_grad.size else 0.0
    ok = bool(loss_err <= rtol * max(1.0, abs(ref_loss)) and grad_err <= rtol * scale
              or (loss_err == 0.0 and grad_err == 0.0))
    return loss_err, grad_err, ok
