"""Plain NumPy loss + gradient: the competitor a NumPy user would write.

Used by ``python -m fastloss bench`` and by the benchmarks (``bench/``) as the
baseline that fastloss is checked against and timed against (the ``numpy`` entry).
NumPy has no autograd, so unlike the other competitors (``competitors``: autograd of
``references``) these are written by hand, gradient included: what a NumPy user writes.  Every function
is vectorized, idiomatic NumPy (max-subtract, ``exp``, ``sum``, a few ``out=``
arguments to avoid the worst temporaries), with fixed hyper-parameters and
``reduction="mean"``:

* ``softmax_cross_entropy(logits, labels)``: ``torch.nn.functional.cross_entropy``.
* ``focal_loss(logits, labels)``: multi-class softmax focal loss, ``gamma=2``,
  no alpha, per sample ``-(1 - p_y)**2 * log p_y``.
* ``sigmoid_focal_loss(logits, targets)``: ``torchvision.ops.sigmoid_focal_loss``
  with ``alpha=0.25, gamma=2``, mean over all elements.
* ``huber_loss(input, target)``: ``torch.nn.functional.huber_loss``, ``delta=1``.
* ``center_loss(features, labels, centers)``: ``0.5 * ||x_i - c_{y_i}||**2`` per
  sample, then the update of Wen et al. (``alpha=0.5``) with ``np.add.at``,
  **in place** on ``centers``.
* ``triplet_margin_loss(anchor, positive, negative)``:
  ``torch.nn.functional.triplet_margin_loss`` (``p=2``, ``margin=1``, ``eps=1e-6``);
  the gradient is a tuple of three arrays.
* ``batch_triplet_loss(embeddings, labels)``: Hermans et al.'s batch-hard loss
  (``mining="hard"``, euclidean, ``margin=1``) from one Gram matrix.
* ``linear_cross_entropy(embeddings, classifier, labels)``: the unfused path, the
  ``(N, V)`` logits ``E @ W.T`` whole, ``softmax_cross_entropy`` on them, then
  ``(G @ W, G.T @ E)``; the gradient is a tuple of two arrays.

Each takes float32 arrays (integer labels where they apply) and returns
``(loss, grad)``: ``loss`` a Python float, ``grad`` a float32 array of the
first argument's shape (a tuple of three for the triplet margin loss), the
gradient of the mean loss.  Logits may have any leading shape ``(..., C)``;
they are treated as ``reshape(-1, C)``.  The hyper-parameters are keyword
arguments whose defaults are the values above.

This module imports nothing but NumPy.
"""
import numpy as np

__all__ = [
    "LOSSES",
    "batch_triplet_loss",
    "center_loss",
    "focal_loss",
    "huber_loss",
    "linear_cross_entropy",
    "sigmoid_focal_loss",
    "softmax_cross_entropy",
    "triplet_margin_loss",
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


def focal_loss(logits, labels, gamma=2.0):
    """Mean multi-class softmax focal loss (``gamma=2`` by default), no alpha.

    ``L = -(1 - p_y)**gamma * log p_y``; with ``l = log p_y`` and ``q = 1 - p_y``,
    ``dL/dz_j = c * (delta_jy - p_j)`` where ``c = gamma q**(gamma-1) p_y l - q**gamma``.
    ``q`` is ``-expm1(l)`` so that it keeps its digits when ``p_y`` is near 1.
    """
    x, x2, y, rows = _rows(logits, labels)
    n = x2.shape[0]
    p, lse = _softmax_rows(x2)
    logpy = x2[rows, y] - lse
    py = np.exp(logpy)
    q = -np.expm1(logpy)
    if gamma == 2.0:
        qg1, qg = q, q * q
    else:
        qg1 = q ** (gamma - 1) if gamma != 1.0 else np.ones_like(q)
        qg = q ** gamma
    loss = float(np.mean(-qg * logpy, dtype=np.float64))
    c = (gamma * qg1 * py * logpy - qg) * x.dtype.type(1.0 / n)    # (N,)
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


def center_loss(features, labels, centers, alpha=0.5):
    """Mean center loss and its gradient, then the center update of Wen et al., in place.

    ``L = mean_i 0.5 * ||x_i - c_{y_i}||**2``, ``grad = (x - c[y]) / N``; the loss and
    the gradient use the centers as they were; then
    ``c_j += alpha * sum_{i: y_i = j} (x_i - c_j) / (1 + n_j)`` with ``np.add.at``.
    """
    x = np.asarray(features)
    n = x.shape[0]
    diff = x - centers[labels]
    loss = 0.5 * float(np.einsum("ij,ij->", diff, diff, dtype=np.float64)) / n if n else float("nan")
    grad = diff * x.dtype.type(1.0 / max(n, 1))
    counts = np.bincount(labels, minlength=centers.shape[0]).astype(x.dtype)
    step = np.zeros_like(centers)
    np.add.at(step, labels, diff)  # sum_i (x_i - c_j) per class
    centers += (x.dtype.type(alpha) / (1 + counts))[:, None] * step
    return loss, grad


def triplet_margin_loss(anchor, positive, negative, margin=1.0, eps=1e-6):
    """``torch.nn.functional.triplet_margin_loss`` (``p=2``, mean) and its three gradients.

    ``d(a, b) = ||a - b + eps||``, ``L = mean max(0, margin + d(a, p) - d(a, n))``.
    """
    a = np.asarray(anchor)
    f = a.dtype.type
    u = a - positive + f(eps)
    v = a - negative + f(eps)
    d_ap = np.sqrt(np.einsum("ij,ij->i", u, u))
    d_an = np.sqrt(np.einsum("ij,ij->i", v, v))
    z = f(margin) + d_ap - d_an
    loss = float(np.mean(np.maximum(z, 0.0), dtype=np.float64))
    c = (z >= 0).astype(a.dtype) / f(a.shape[0])
    cp = np.divide(c, d_ap, out=np.zeros_like(c), where=d_ap > 0)[:, None]
    cn = np.divide(c, d_an, out=np.zeros_like(c), where=d_an > 0)[:, None]
    u *= cp
    v *= cn
    return loss, (u - v, -u, v)


def batch_triplet_loss(embeddings, labels, margin=1.0):
    """Hermans et al.'s batch-hard triplet loss (euclidean, no eps) and its gradient.

    Distances from one Gram matrix (``E @ E.T`` as a gemm on a transposed copy),
    each anchor's farthest positive and nearest negative; ``"mean"`` over the
    anchors that have both.  The gradient runs over the selected pairs only, from
    the exact differences.
    """
    e = np.asarray(embeddings)
    labels = np.asarray(labels)
    n = e.shape[0]
    g = e @ np.ascontiguousarray(e.T)
    sq = np.diagonal(g).copy()
    d2 = sq[:, None] + sq[None, :] - 2 * g
    np.maximum(d2, 0, out=d2)
    same = labels[:, None] == labels[None, :]
    rows = np.arange(n)
    pos = np.where(same, d2, e.dtype.type(-1.0))
    pos[rows, rows] = -1.0
    p = np.argmax(pos, axis=1)
    neg = np.where(same, e.dtype.type(np.inf), d2)
    q = np.argmin(neg, axis=1)
    valid = (pos[rows, p] >= 0) & np.isfinite(neg[rows, q])
    z = np.sqrt(d2[rows, p]) - np.sqrt(d2[rows, q]) + margin
    terms = np.where(valid, np.maximum(z, 0.0), 0.0)
    count = np.count_nonzero(valid)
    loss = float(terms.sum(dtype=np.float64) / count) if count else float("nan")
    c = np.where(valid & (z > 0), 1.0 / max(count, 1), 0.0).astype(e.dtype)[:, None]
    grad = np.zeros_like(e)
    for other, sign in ((p, 1.0), (q, -1.0)):
        diff = e - e[other]
        norm = np.linalg.norm(diff, axis=1, keepdims=True)
        w = sign * np.divide(c, norm, out=np.zeros_like(norm), where=norm > 0) * diff
        grad += w
        np.add.at(grad, other, -w)
    return loss, grad


def linear_cross_entropy(embeddings, classifier, labels):
    """Mean softmax cross entropy of ``E @ W.T`` and its gradients ``(G @ W, G.T @ E)``."""
    loss, g = softmax_cross_entropy(embeddings @ classifier.T, labels)
    g = g.reshape(-1, g.shape[-1])
    e = embeddings.reshape(-1, embeddings.shape[-1])
    return loss, ((g @ classifier).reshape(embeddings.shape), g.T @ e)


LOSSES = {
    "softmax_cross_entropy": softmax_cross_entropy,
    "focal_loss": focal_loss,
    "sigmoid_focal_loss": sigmoid_focal_loss,
    "huber_loss": huber_loss,
    "center_loss": center_loss,
    "triplet_margin_loss": triplet_margin_loss,
    "batch_triplet_loss": batch_triplet_loss,
    "linear_cross_entropy": linear_cross_entropy,
}
