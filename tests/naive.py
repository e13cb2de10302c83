"""Slow, obviously-correct float64 NumPy references for the fastloss tests.

Every function returns ``(loss, grad)`` where ``grad`` is the gradient of the
*reduced* loss with respect to the first argument (for ``reduction="none"``,
the gradient of the sum of the per-sample losses), in float64.  The gradients
are derived by hand; each formula is written next to its code.  Nothing here
uses autograd or fastloss.

The bottom of the file holds the small comparison helpers the tests share.
"""
import math

import numpy as np

# ----------------------------------------------------------------- helpers


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def logsumexp(z):
    """log(sum(exp(z))) of a 1-D float64 array, shifted by the max."""
    m = np.max(z) if z.size else -np.inf
    if np.isnan(m):
        return m
    if not np.isfinite(m):
        return m if m > 0 else -np.inf
    return m + math.log(np.sum(np.exp(z - m)))


def softplus(x):
    """log(1 + exp(x)) elementwise, without overflow."""
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def _reduce(per_sample, grad_sum, denom, reduction, batch_shape):
    """Apply a reduction to per-sample losses whose gradient-of-the-sum is grad_sum."""
    if reduction == "none":
        return per_sample.reshape(batch_shape), grad_sum
    if reduction == "sum":
        return np.float64(per_sample.sum()), grad_sum
    if reduction == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            loss = np.float64(per_sample.sum()) / np.float64(denom)
        # denominator 0 (empty batch, every row ignored): loss is nan as in
        # PyTorch, and there is no contribution to any gradient entry.
        grad = grad_sum / denom if denom != 0 else np.zeros_like(grad_sum)
        return loss, grad
    raise ValueError(reduction)


# ----------------------------------------------------------- cross entropy


def softmax_cross_entropy(logits, target, *, weight=None, sample_weight=None, ignore_index=-100,
                          label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean"):
    """torch.nn.functional.cross_entropy(logits.reshape(-1, C), ...) plus z_loss/softcap/sample_weight.

    Per sample i, with z = capped logits, lse = logsumexp(z), logp = z - lse, p = softmax(z),
    class weights w (ones when None), eps = label_smoothing:

    integer target y (rows with y == ignore_index contribute nothing):
        l_i = (1-eps) * w_y * (-logp_y) + eps/C * sum_c w_c * (-logp_c)
        dl_i/dz_j = (1-eps) * w_y * (p_j - [j==y]) + eps/C * (W * p_j - w_j),   W = sum_c w_c
        "mean" denominator: sum_i w_{y_i} * sw_i over rows not ignored
    probability target t (same shape as logits): t' = (1-eps) t + eps/C,
        l_i = -sum_c w_c t'_c logp_c                      (0 * log 0 taken as 0)
        dl_i/dz_j = -w_j t'_j + (sum_c w_c t'_c) * p_j
        "mean" denominator: sum_i sw_i (the number of rows without sample_weight)
    z-loss (not class-weighted, zero on ignored rows):
        l_i += z_loss * lse**2,   dl_i/dz_j += 2 * z_loss * lse * p_j
    then everything times the sample weight sw_i, and through the softcap:
        z = s * tanh(x / s),      dz/dx = 1 - tanh(x / s)**2
    """
    x = _f64(logits)
    C = x.shape[-1]
    batch_shape = x.shape[:-1]
    X = x.reshape(-1, C)
    N = X.shape[0]
    target = np.asarray(target)
    prob = target.dtype.kind == "f"
    T = target.astype(np.float64).reshape(N, C) if prob else target.reshape(N).astype(np.int64)
    w = np.ones(C) if weight is None else _f64(weight)
    sw = np.ones(N) if sample_weight is None else np.broadcast_to(_f64(sample_weight), batch_shape).reshape(N)
    eps = float(label_smoothing)

    if softcap is not None:
        th = np.tanh(X / softcap)
        Z = softcap * th
        dZdX = 1.0 / np.cosh(X / softcap) ** 2  # sech^2; 1 - th**2 would cancel in saturation
    else:
        Z = X
        dZdX = np.ones_like(X)

    per = np.zeros(N)
    G = np.zeros((N, C))
    denom = 0.0
    for i in range(N):
        z = Z[i]
        lse = logsumexp(z)
        logp = z - lse
        p = np.exp(logp)
        if prob:
            t = (1.0 - eps) * T[i] + eps / C
            wt = w * t
            with np.errstate(invalid="ignore"):
                l = -np.sum(np.where(wt == 0.0, 0.0, wt * logp))
            g = -wt + wt.sum() * p
            denom += sw[i]
        else:
            y = int(T[i])
            if y == ignore_index:
                continue
            l = (1.0 - eps) * w[y] * (-logp[y])
            g = (1.0 - eps) * w[y] * p
            g[y] -= (1.0 - eps) * w[y]
            if eps > 0.0:
                l += eps / C * np.sum(w * -logp)
                g += eps / C * (w.sum() * p - w)
            denom += w[y] * sw[i]
        if z_loss:
            l += z_loss * lse * lse
            g = g + 2.0 * z_loss * lse * p
        per[i] = sw[i] * l
        G[i] = sw[i] * g * dZdX[i]
    loss, grad = _reduce(per, G, denom, reduction, batch_shape)
    return loss, grad.reshape(x.shape)


# ---------------------------------------------------- linear + cross entropy


def linear_cross_entropy(embeddings, classifier, target, *, bias=None, weight=None,
                         sample_weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                         softcap=None, reduction="mean"):
    """softmax_cross_entropy of the whole logits Z = E W^T + b, by the chain rule:

        dL/dE = G W,   dL/dW = G^T E,   dL/db = sum_rows G,   G = dL/dZ (the reference above)

    Returns (loss, (dE, dW)) or, with a bias, (loss, (dE, dW, db))."""
    E = _f64(embeddings)
    H = E.shape[-1]
    W = _f64(classifier)
    Z = E @ W.T if bias is None else E @ W.T + _f64(bias)
    loss, G = softmax_cross_entropy(Z, target, weight=weight, sample_weight=sample_weight,
                                    ignore_index=ignore_index, label_smoothing=label_smoothing,
                                    z_loss=z_loss, softcap=softcap, reduction=reduction)
    G2 = G.reshape(-1, W.shape[0])
    grads = ((G2 @ W).reshape(E.shape), G2.T @ E.reshape(G2.shape[0], H))
    return loss, grads if bias is None else grads + (G2.sum(axis=0),)


# ------------------------------------------------------------------ focal


def _alpha_vec(alpha, C):
    if alpha is None:
        return np.ones(C)
    a = _f64(alpha)
    return np.full(C, float(a)) if a.ndim == 0 else a


def focal_loss(logits, target, *, gamma=2.0, alpha=None, sample_weight=None, ignore_index=-100,
               reduction="mean"):
    """Multi-class softmax focal loss.

    With p = softmax(z), q_c = 1 - p_c (for the largest logit as the sum of the others, so
    without cancellation),
    f_c = -q_c**gamma * log p_c, and by the chain rule through p_c,
        g_c := p_c * df_c/dp_c = gamma * q_c**(gamma-1) * p_c * log p_c - q_c**gamma
             = gamma * q_c**gamma * (p_c log p_c) / q_c - q_c**gamma
    (the first term -> 0 as q_c -> 0 since log p_c ~ -q_c; and p log p -> 0 as p -> 0).
    dp_c/dz_j = p_c ([c==j] - p_j), so
    integer target y:   l = a_y f_y,               dl/dz_j = a_y g_y ([j==y] - p_j)
    probability target: l = sum_c t_c a_c f_c,     dl/dz_j = t_j a_j g_j - p_j sum_c t_c a_c g_c
    times the sample weight; "mean" divides by the number of rows not ignored (or the sum of
    their sample weights); alpha is not in the denominator.
    """
    x = _f64(logits)
    C = x.shape[-1]
    batch_shape = x.shape[:-1]
    X = x.reshape(-1, C)
    N = X.shape[0]
    target = np.asarray(target)
    prob = target.dtype.kind == "f"
    T = target.astype(np.float64).reshape(N, C) if prob else target.reshape(N).astype(np.int64)
    a = _alpha_vec(alpha, C)
    sw = np.ones(N) if sample_weight is None else np.broadcast_to(_f64(sample_weight), batch_shape).reshape(N)
    gamma = float(gamma)

    per = np.zeros(N)
    G = np.zeros((N, C))
    denom = 0.0
    for i in range(N):
        z = X[i]
        if not prob and int(T[i]) == ignore_index:
            continue
        # softmax relative to the largest logit k, so that log p_k and q_k = 1 - p_k keep
        # their relative precision as p_k -> 1 (z - logsumexp(z) would not):
        #   r_c = exp(z_c - z_k),  rest = sum_{c != k} r_c,  p_c = r_c / (1 + rest),
        #   log p_c = (z_c - z_k) - log1p(rest),  q_k = rest / (1 + rest),  q_c = 1 - p_c (p_c <= 1/2)
        k = int(np.argmax(z))
        r = np.exp(z - z[k])
        rest = np.sum(np.delete(r, k))
        logp = (z - z[k]) - math.log1p(rest)
        p = r / (1.0 + rest)
        q = 1.0 - p
        q[k] = rest / (1.0 + rest)
        qg = q ** gamma  # 0**0 == 1
        with np.errstate(invalid="ignore", divide="ignore"):
            xlogx = np.where(p == 0.0, 0.0, p * logp)
            term = np.where(q > 0.0, gamma * qg * xlogx / np.where(q > 0.0, q, 1.0), 0.0)
            f = np.where(qg == 0.0, 0.0, -qg * logp)
        g = term - qg
        if prob:
            ta = T[i] * a
            with np.errstate(invalid="ignore"):
                l = np.sum(np.where(ta == 0.0, 0.0, ta * f))
            grad = ta * g - p * np.sum(ta * g)
        else:
            y = int(T[i])
            l = a[y] * f[y]
            onehot_minus_p = -p
            onehot_minus_p[y] = q[y]  # 1 - p_y without cancellation
            grad = a[y] * g[y] * onehot_minus_p
        per[i] = sw[i] * l
        G[i] = sw[i] * grad
        denom += sw[i]
    loss, grad = _reduce(per, G, denom, reduction, batch_shape)
    return loss, grad.reshape(x.shape)


# ---------------------------------------------------------- sigmoid focal


def sigmoid_focal_loss(logits, targets, *, alpha=0.25, gamma=2.0, reduction="mean"):
    """torchvision.ops.sigmoid_focal_loss, elementwise.

    p = sigmoid(x), ce = -t log p - (1-t) log(1-p)  (dce/dx = p - t),
    m = 1 - p_t = p (1-t) + (1-p) t                 (dm/dx = p (1-p) (1-2t)),
    loss = alpha_t * ce * m**gamma, alpha_t = alpha t + (1-alpha)(1-t) (1 when alpha < 0),
    dloss/dx = alpha_t * [ (p - t) m**gamma + gamma * ce * m**(gamma-1) * p (1-p) (1-2t) ]
             = alpha_t * m**gamma * [ (p - t) + gamma * ce * r * (1-2t) ],   r = p (1-p) / m,
    where r = p exactly when t == 1 (m = 1-p) and r = 1-p when t == 0 (m = p), so nothing
    divides by zero at saturated logits.  "mean" divides by the number of elements.
    """
    x = _f64(logits)
    t = np.broadcast_to(_f64(targets), x.shape)
    gamma = float(gamma)
    log_p = -softplus(-x)
    log_1mp = -softplus(x)
    p = np.exp(log_p)
    omp = np.exp(log_1mp)
    ce = t * softplus(-x) + (1.0 - t) * softplus(x)
    m = p * (1.0 - t) + omp * t
    mg = m ** gamma
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(t == 1.0, p, np.where(t == 0.0, omp, p * omp / np.where(m == 0.0, 1.0, m)))
    at = alpha * t + (1.0 - alpha) * (1.0 - t) if alpha >= 0 else np.ones_like(x)
    per = at * ce * mg
    grad = at * mg * ((p - t) + gamma * ce * r * (1.0 - 2.0 * t))
    loss, grad = _reduce(per.ravel(), grad, per.size, reduction, x.shape)
    return loss, grad


# ------------------------------------------------------------------ huber


def huber_loss(input, target, *, delta=1.0, sample_weight=None, reduction="mean"):
    """torch.nn.functional.huber_loss with an optional broadcast sample_weight.

    d = input - target;  l = 0.5 d**2 if |d| < delta else delta (|d| - delta/2)
    dl/dinput = d if |d| <= delta else delta * sign(d)   (continuous at |d| == delta)
    times the broadcast weight; "mean" divides by the sum of the broadcast weights
    (the number of elements without sample_weight).
    """
    x = _f64(input)
    d = x - np.broadcast_to(_f64(target), x.shape)
    ad = np.abs(d)
    l = np.where(ad < delta, 0.5 * d * d, delta * (ad - 0.5 * delta))
    g = np.where(ad <= delta, d, delta * np.sign(d))
    wb = np.ones_like(x) if sample_weight is None else np.broadcast_to(_f64(sample_weight), x.shape)
    per = wb * l
    grad = wb * g
    loss, grad = _reduce(per.ravel(), grad, wb.sum(), reduction, x.shape)
    return loss, grad


# ------------------------------------------------------------- center loss


def center_loss(features, labels, centers, *, reduction="mean"):
    """Wen et al. 2016: per sample 0.5 * ||x_i - c_{y_i}||**2, centers as given.

    d loss_i / d x_i = x_i - c_{y_i};  "mean" divides by N.
    """
    x = _f64(features)
    c = _f64(centers)
    diff = x - c[np.asarray(labels)]
    per = 0.5 * np.sum(diff * diff, axis=1)
    return _reduce(per, diff, x.shape[0], reduction, (x.shape[0],))


def center_update(centers, features, labels, *, alpha=0.5):
    """The seed's (and Wen et al.'s) rule, one class at a time, in float64:
    c_j <- c_j - alpha * sum_{i: y_i = j} (c_j - x_i) / (1 + n_j); absent classes unchanged."""
    c = _f64(centers).copy()
    x = _f64(features)
    labels = np.asarray(labels)
    for j in np.unique(labels):
        rows = x[labels == j]
        c[j] = c[j] - alpha * np.sum(c[j] - rows, axis=0) / (1 + rows.shape[0])
    return c


# ------------------------------------------------------------- triplet


def _triplet_distance(x, y, distance, eps):
    """d(x, y) of two float64 vectors and its gradients (dd/dx, dd/dy).

    euclidean: u = x - y + eps (torch.pairwise_distance's shift), d = ||u||,
               dd/dx = u / d = -dd/dy (0 where d == 0, as torch's norm backward)
    squared_euclidean: u = x - y, d = u.u, dd/dx = 2u = -dd/dy
    cosine: X = max(|x|, eps), Y = max(|y|, eps), c = x.y / (X Y), d = 1 - c,
            dd/dx = -(y / (X Y) - [|x| > eps] c x / X**2)   (d|x|/dx = x / |x|; the clamp
            passes nothing below eps), dd/dy likewise with x and y exchanged
    """
    if distance == "euclidean":
        u = x - y + eps
        d = math.sqrt(float(u @ u))
        g = u / d if d > 0 else np.zeros_like(u)
        return d, g, -g
    if distance == "squared_euclidean":
        u = x - y
        return float(u @ u), 2 * u, -2 * u
    if distance == "cosine":
        nx = math.sqrt(float(x @ x))
        ny = math.sqrt(float(y @ y))
        X = max(nx, eps)
        Y = max(ny, eps)
        c = float(x @ y) / (X * Y)
        gx = -(y / (X * Y) - (c * x / X**2 if nx > eps else 0.0))
        gy = -(x / (X * Y) - (c * y / Y**2 if ny > eps else 0.0))
        return 1.0 - c, gx, gy
    raise ValueError(distance)


def triplet_margin_loss(anchor, positive, negative, *, margin=1.0, distance="euclidean", swap=False,
                        eps=1e-6, reduction="mean"):
    """torch.nn.functional.triplet_margin_loss (p=2) and fastloss's other two distances.

    Per row: d_neg = d(a, n), or with swap min(d(a, n), d(p, n)) (a tie splits the gradient
    half/half, as torch.minimum's backward);  z = margin + d(a, p) - d_neg;  l = max(0, z),
    dl/dz = [z >= 0] (torch's clamp_min passes the gradient at 0);  then the chain rule
    through the distances above.  Returns (loss, (g_anchor, g_positive, g_negative)).
    """
    a = _f64(anchor)
    p = _f64(positive)
    n = _f64(negative)
    batch = a.shape[:-1]
    A, P, Nn = (v.reshape(-1, a.shape[-1]) for v in (a, p, n))
    rows = A.shape[0]
    per = np.zeros(rows)
    ga, gp, gn = np.zeros_like(A), np.zeros_like(A), np.zeros_like(A)
    for i in range(rows):
        d_ap, dap_a, dap_p = _triplet_distance(A[i], P[i], distance, eps)
        d_an, dan_a, dan_n = _triplet_distance(A[i], Nn[i], distance, eps)
        w_an, w_pn, d_neg = 1.0, 0.0, d_an
        if swap:
            d_pn, dpn_p, dpn_n = _triplet_distance(P[i], Nn[i], distance, eps)
            if d_pn == d_an:
                w_an = w_pn = 0.5
            elif d_pn < d_an:
                w_an, w_pn, d_neg = 0.0, 1.0, d_pn
        z = margin + d_ap - d_neg
        per[i] = max(z, 0.0)
        if z >= 0:
            # dl = d(d_ap) - w_an d(d_an) - w_pn d(d_pn)
            ga[i] += dap_a - w_an * dan_a
            gp[i] += dap_p
            gn[i] -= w_an * dan_n
            if swap and w_pn:
                gp[i] -= w_pn * dpn_p
                gn[i] -= w_pn * dpn_n
    loss, _ = _reduce(per, ga, rows, reduction, batch)
    s = 1.0 if reduction != "mean" else (1.0 / rows if rows else 0.0)
    return loss, tuple((s * g).reshape(a.shape) for g in (ga, gp, gn))


def _batch_distance(x, y, distance):
    """batch_triplet_loss's distances from the vectors themselves (not from a Gram matrix):
    euclidean ||x - y|| (no eps; gradient 0 at 0), squared ||x - y||**2, cosine 1 - cos with
    norms clamped at 1e-8.  Returns (d, dd/dx); dd/dy is the same with x and y exchanged.
        euclidean  dd/dx = (x - y) / d;   squared  dd/dx = 2 (x - y)
        cosine     dd/dx = -(y / (X Y) - [|x| > 1e-8] c x / X**2)
    """
    if distance == "cosine":
        d, gx, _ = _triplet_distance(x, y, "cosine", 1e-8)
        return d, gx
    d, gx, _ = _triplet_distance(x, y, distance, 0.0)
    return d, gx


def _first_arg(values, best):
    """Index (into values) of the first occurrence of best(values): lowest index on ties."""
    target = best(values)
    return next(k for k, v in enumerate(values) if v == target)


def batch_triplet_loss(embeddings, labels, *, mining="hard", margin=1.0, distance="euclidean",
                       soft=False, reduction="mean"):
    """Online triplet mining by brute force over every (a, p, n), in float64.

    Valid triplets: a != p, y_a == y_p, y_n != y_a.  Term f(z), z = d(a,p) - d(a,n) + margin,
    f = max(0, z) with f' = [z > 0], or softplus with f' = sigmoid.
        hard:     per anchor, the farthest positive and the nearest negative (first index on ties)
        semihard: per (a, p), the nearest negative with d(a,n) > d(a,p), else the farthest one
        all:      every valid triplet
    d term / d e_a = f'(z) (dd(a,p)/de_a - dd(a,n)/de_a),  d/d e_p = f'(z) dd(p,a)/de_p,
    d/d e_n = -f'(z) dd(n,a)/de_n.
    "mean" divides by: anchors with a positive and a negative (hard), (a, p) pairs whose anchor
    has a negative (semihard), terms > 0 (all; every valid triplet when soft).  An empty mean:
    nan for hard/semihard, 0 for all; zero gradient either way.  "none": per anchor sums.
    """
    E = _f64(embeddings)
    y = np.asarray(labels).reshape(-1)
    N = E.shape[0]
    dist = [[_batch_distance(E[i], E[j], distance)[0] for j in range(N)] for i in range(N)]

    def f(z):
        if soft:
            return float(softplus(np.float64(z))), 1.0 / (1.0 + math.exp(-z))
        return max(z, 0.0), 1.0 if z > 0 else 0.0

    triplets = []
    for a in range(N):
        pos = [j for j in range(N) if j != a and y[j] == y[a]]
        neg = [j for j in range(N) if y[j] != y[a]]
        if not pos or not neg:
            continue
        if mining == "hard":
            p = pos[_first_arg([dist[a][j] for j in pos], max)]
            n = neg[_first_arg([dist[a][j] for j in neg], min)]
            triplets.append((a, p, n))
        elif mining == "semihard":
            for p in pos:
                farther = [j for j in neg if dist[a][j] > dist[a][p]]
                if farther:
                    n = farther[_first_arg([dist[a][j] for j in farther], min)]
                else:
                    n = neg[_first_arg([dist[a][j] for j in neg], max)]
                triplets.append((a, p, n))
        else:
            triplets.extend((a, p, n) for p in pos for n in neg)

    per = np.zeros(N)
    G = np.zeros_like(E)
    positive_terms = 0
    for a, p, n in triplets:
        z = dist[a][p] - dist[a][n] + margin
        l, s = f(z)
        per[a] += l
        positive_terms += l > 0
        if s:
            G[a] += s * (_batch_distance(E[a], E[p], distance)[1] - _batch_distance(E[a], E[n], distance)[1])
            G[p] += s * _batch_distance(E[p], E[a], distance)[1]
            G[n] -= s * _batch_distance(E[n], E[a], distance)[1]
    if mining == "hard":
        denom = len(triplets)
    elif mining == "semihard":
        denom = len(triplets)
    else:
        denom = len(triplets) if soft else positive_terms
    if mining == "all" and reduction == "mean" and denom == 0:
        return np.float64(0.0), np.zeros_like(E)
    return _reduce(per, G, denom, reduction, (N,))


# ------------------------------------------------------------- test helpers

#: (rtol, atol relative to the largest reference magnitude) per input dtype
TOLERANCES = {
    np.dtype(np.float64): (1e-10, 1e-12),
    np.dtype(np.float32): (2e-5, 2e-6),
    np.dtype(np.float16): (1e-2, 1e-2),
}


def tol(dtype):
    return TOLERANCES[np.dtype(dtype)]


def assert_close(got, want, dtype, *, scale=None, what="", rtol=None, atol=None):
    """Compare an output of fastloss to a float64 reference within dtype-appropriate round-off.

    ``atol`` is relative to ``scale`` (default: the largest finite magnitude in ``want``,
    at least 1 for losses), and never under the dtype's smallest subnormal: a value
    below it is 0 in that dtype, and no closer answer exists."""
    r, a = tol(dtype)
    r = r if rtol is None else rtol
    a = a if atol is None else atol
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if scale is None:
        finite = np.abs(want[np.isfinite(want)])
        scale = finite.max() if finite.size else 1.0
        if scale == 0.0:  # an all-zero reference: round-off of O(1) intermediates is allowed
            scale = 1.0
    floor = float(np.finfo(dtype).smallest_subnormal) if np.dtype(dtype).kind == "f" else 0.0
    np.testing.assert_allclose(got, want, rtol=r, atol=max(a * scale, floor), err_msg=what)


def check_result(res, want_loss, want_grad, dtype, *, loss_scale=None, grad_scale=None,
                 rtol=None, atol=None):
    """fastloss LossGrad vs (loss, grad) from this module."""
    loss, grad = res
    loss = np.asarray(loss)
    assert loss.shape == np.shape(want_loss), (loss.shape, np.shape(want_loss))
    assert np.issubdtype(loss.dtype, np.floating)
    if loss_scale is None:
        wl = np.abs(np.asarray(want_loss, dtype=np.float64))
        finite = wl[np.isfinite(wl)]
        loss_scale = max(1.0, float(finite.max())) if finite.size else 1.0
    assert_close(loss, want_loss, dtype, scale=loss_scale, what="loss", rtol=rtol, atol=atol)
    if want_grad is None:
        assert grad is None
        return
    assert isinstance(grad, np.ndarray), type(grad)
    assert grad.shape == want_grad.shape, (grad.shape, want_grad.shape)
    assert grad.dtype == np.dtype(dtype), (grad.dtype, dtype)
    assert_close(grad, want_grad, dtype, scale=grad_scale, what="grad", rtol=rtol, atol=atol)


def finite_difference(f, x, index, h=1e-6):
    """Central difference of the scalar f at x along one entry (float64)."""
    xp = x.copy()
    xm = x.copy()
    xp[index] += h
    xm[index] -= h
    return (float(f(xp)) - float(f(xm))) / (2 * h)
