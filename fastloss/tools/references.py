"""Each loss's formula, written once over an array namespace: NumPy, ``jax.numpy`` or torch.

A formula takes the namespace first, then the loss's positional arguments and keywords, as the
public function does (without ``grad``, ``grad_out`` and ``backend``), and returns the loss:
``softmax_cross_entropy(ns, logits, target, label_smoothing=0.1, reduction="sum")``.  It only
computes the value; the gradient is the framework's autograd of it (``torch.autograd``,
``jax.vjp``) or NumPy's central differences (``python -m fastloss check``), and the competitors
that the bench times are the same formulas under ``torch.autograd``, ``torch.compile`` and
``jax.value_and_grad`` (``fastloss.tools.competitors``).

The namespace (``numpy_namespace()``, ``jax_namespace(jax)``, ``torch_namespace(torch)``) exposes
the few operations the formulas need, under NumPy's names: the library's own where it has it
(``log_softmax``, ``softplus``, ``sigmoid``), a NumPy spelling elsewhere.  Where PyTorch has the
loss itself (``F.cross_entropy``, ``F.huber_loss``, ``F.triplet_margin_loss``), the torch
namespace hands the options it covers to it (``ns.functional``), so that ``check --framework
torch`` compares fastloss with PyTorch's own implementation and the bench's torch entry is what
a PyTorch user runs; the formula covers the rest (z-loss, sample weights, other distances).

Each formula skips the options that are absent (no ``weight * ...`` by ones), so that the
competitors do no work fastloss does not.  Only NumPy is imported here.
"""
import numpy as np

REDUCTIONS = ("mean", "sum", "none")


# ------------------------------------------------------------ the namespaces


class Namespace:
    """NumPy's API over ``xp`` (NumPy or ``jax.numpy``), plus the few operations the formulas name."""

    functional = None   # torch: torch.nn.functional (the losses PyTorch has)

    def __init__(self, xp, stop_gradient=None):
        self.xp = xp
        self.stop_gradient = stop_gradient or (lambda a: a)

    def __getattr__(self, name):  # exp, log, expm1, sqrt, tanh, abs, where, maximum, minimum, sum, ...
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.xp, name)

    def promote_half(self, a):
        """float16 as float32 (fastloss's float16 contract: computed in float32); other arrays as they are."""
        return a.astype(self.xp.float32) if a.dtype == self.xp.float16 else a

    def is_floating(self, a):
        return self.xp.issubdtype(a.dtype, self.xp.floating)

    def eye_like(self, a):
        """The boolean identity matrix of the square ``a``'s size."""
        return self.xp.eye(a.shape[0], dtype=bool)

    def take(self, a, index):
        """``a[..., index]`` along the last axis, one index per row."""
        return self.xp.take_along_axis(a, index[..., None], axis=-1)[..., 0]

    def logsumexp(self, z):
        """Over the last axis, shifted by the row maximum (a constant for the gradient)."""
        m = self.stop_gradient(self.xp.max(z, axis=-1, keepdims=True))
        return (self.xp.log(self.xp.sum(self.xp.exp(z - m), axis=-1, keepdims=True)) + m)[..., 0]

    def log_softmax(self, z):
        return z - self.logsumexp(z)[..., None]

    def softplus(self, z):
        return self.xp.logaddexp(0, z)

    def sigmoid(self, z):
        return 1 / (1 + self.xp.exp(-z))

    def squared_distances(self, e):
        """(N, N) squared euclidean distances between the rows of ``e``, from one Gram matrix."""
        sq = self.xp.sum(e * e, axis=1)
        return self.maximum(sq[:, None] + sq[None, :] - 2 * (e @ e.T), 0)

    def distances(self, e):
        """(N, N) euclidean distances, with gradient 0 (not NaN) where a distance is 0."""
        d2 = self.squared_distances(e)
        pos = d2 > 0
        return self.xp.where(pos, self.xp.sqrt(self.xp.where(pos, d2, 1.0)), 0.0)

    def bincount(self, labels, length, dtype):
        return self.xp.bincount(labels, minlength=length).astype(dtype)

    def index_add(self, a, index, values):
        """``a`` plus ``values`` added at the rows ``index`` (repeated indices accumulate)."""
        out = a.copy()
        np.add.at(out, index, values)
        return out


class _JaxNamespace(Namespace):
    def bincount(self, labels, length, dtype):
        return self.xp.bincount(labels, length=length).astype(dtype)

    def index_add(self, a, index, values):
        return a.at[index].add(values)


class _TorchNamespace(Namespace):
    """torch under NumPy's names (torch takes ``axis=`` for ``dim=``)."""

    def __init__(self, torch):
        super().__init__(torch, lambda a: a.detach())
        self.torch = torch
        self.functional = torch.nn.functional

    def is_floating(self, a):
        return a.dtype.is_floating_point

    def promote_half(self, a):
        return a.float() if a.dtype in (self.torch.float16, self.torch.bfloat16) else a

    def eye_like(self, a):
        return self.torch.eye(a.shape[0], dtype=self.torch.bool, device=a.device)

    def max(self, a, axis):
        return self.torch.amax(a, dim=axis)

    def min(self, a, axis):
        return self.torch.amin(a, dim=axis)

    def maximum(self, a, b):
        return self.torch.clamp_min(a, b) if np.isscalar(b) else self.torch.maximum(a, b)

    def take(self, a, index):
        return self.torch.take_along_dim(a, index[..., None], dim=-1)[..., 0]

    def logsumexp(self, z):
        return self.torch.logsumexp(z, dim=-1)

    def log_softmax(self, z):
        return self.functional.log_softmax(z, dim=-1)

    def softplus(self, z):  # F.softplus returns z itself above 20: not float64's digits
        return self.torch.logaddexp(z, self.torch.zeros((), dtype=z.dtype, device=z.device))

    def sigmoid(self, z):
        return self.torch.sigmoid(z)

    def distances(self, e):  # its gradient is 0 at distance 0 too
        return self.torch.cdist(e, e)

    def bincount(self, labels, length, dtype):
        return self.torch.bincount(labels, minlength=length).to(dtype)

    def index_add(self, a, index, values):
        return a.index_add(0, index, values)


def numpy_namespace():
    return Namespace(np)


def jax_namespace(jax):
    return _JaxNamespace(jax.numpy, jax.lax.stop_gradient)


def torch_namespace(torch):
    return _TorchNamespace(torch)


def reduce(ns, per, reduction):
    """``"mean"``, ``"sum"`` or ``"none"`` (the per-sample values)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return ns.mean(per) if reduction == "mean" else ns.sum(per) if reduction == "sum" else per


# ------------------------------------------------------------ softmax losses


def softmax_cross_entropy(ns, x, y, *, weight=None, sample_weight=None, ignore_index=-100,
                          label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean"):
    """F.cross_entropy (z_loss, softcap, sample_weight in array ops)."""
    C = x.shape[-1]
    z = x if softcap is None else softcap * ns.tanh(x / softcap)
    prob = ns.is_floating(y)
    if ns.functional is not None and sample_weight is None and not z_loss:
        out = ns.functional.cross_entropy(z.reshape(-1, C), y.reshape((-1, C) if prob else (-1,)), weight=weight,
                                          ignore_index=ignore_index, label_smoothing=label_smoothing,
                                          reduction=reduction)
        return out.reshape(x.shape[:-1]) if reduction == "none" else out
    eps = label_smoothing
    logp = ns.log_softmax(z)
    if prob:
        t = (1 - eps) * y + eps / C if eps else y
        per = -ns.sum((t if weight is None else weight * t) * logp, axis=-1)
    else:
        keep = y != ignore_index
        y = ns.where(keep, y, 0)
        per = -ns.take(logp, y)
        if weight is not None or eps:
            per = ((1 - eps) * (1.0 if weight is None else weight[y])) * per
        if eps:
            per = per + eps / C * -ns.sum(logp if weight is None else weight * logp, axis=-1)
    if z_loss:
        per = per + z_loss * ns.logsumexp(z) ** 2
    if not prob:
        per = ns.where(keep, per, 0)
    if sample_weight is not None:
        per = per * sample_weight
    if reduction != "mean":
        return reduce(ns, per, reduction)
    # the weights that apply: class weight of the target (not with probability targets) times sample weight
    w = ns.ones_like(per) if prob or weight is None else weight[y]
    if not prob:
        w = ns.where(keep, w, 0)
    return ns.sum(per) / ns.sum(w if sample_weight is None else w * sample_weight)


def focal_loss(ns, x, y, *, gamma=2.0, alpha=None, reduction="mean"):
    """-alpha_y (1 - p_y)**gamma log p_y in array ops."""
    lpy = ns.take(ns.log_softmax(x), y)
    a = 1.0 if alpha is None else alpha[y]
    return reduce(ns, -a * (-ns.expm1(lpy)) ** gamma * lpy, reduction)


def sigmoid_focal_loss(ns, x, t, *, alpha=0.25, gamma=2.0, reduction="mean"):
    """torchvision.ops.sigmoid_focal_loss, its code in array ops."""
    p = ns.sigmoid(x)
    ce = ns.softplus(x) - x * t                  # binary cross entropy with logits
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return reduce(ns, loss, reduction)


# ------------------------------------------------------------ Huber


def huber_loss(ns, x, t, *, delta=1.0, sample_weight=None, reduction="mean"):
    """F.huber_loss (sample_weight in array ops)."""
    if ns.functional is not None and sample_weight is None:
        return ns.functional.huber_loss(x, t, delta=delta, reduction=reduction)
    r = x - t
    a = ns.abs(r)
    per = ns.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))
    if sample_weight is None:
        return reduce(ns, per, reduction)
    per = per * sample_weight
    if reduction == "mean":
        return ns.sum(per) / ns.sum(ns.broadcast_to(sample_weight, per.shape))
    return reduce(ns, per, reduction)


# ------------------------------------------------------------ triplet losses


def _distance(ns, u, v, distance, eps):
    """Row-wise distance; ``"euclidean"`` is torch's ``pairwise_distance`` (``||u - v + eps||``)."""
    if distance == "euclidean":
        w = u - v + eps
        return ns.sqrt(ns.sum(w * w, axis=-1))
    if distance == "squared_euclidean":
        return ns.sum((u - v) ** 2, axis=-1)
    nu = ns.maximum(ns.sqrt(ns.sum(u * u, axis=-1)), eps)
    nv = ns.maximum(ns.sqrt(ns.sum(v * v, axis=-1)), eps)
    return 1 - ns.sum(u * v, axis=-1) / (nu * nv)


def triplet_margin_loss(ns, a, p, n, *, margin=1.0, distance="euclidean", swap=False, eps=1e-6,
                        reduction="mean"):
    """F.triplet_margin_loss (euclidean); squared and cosine in array ops."""
    if ns.functional is not None and distance == "euclidean":
        return ns.functional.triplet_margin_loss(a, p, n, margin=margin, p=2, eps=eps, swap=swap,
                                                 reduction=reduction)
    d_ap = _distance(ns, a, p, distance, eps)
    d_an = _distance(ns, a, n, distance, eps)
    if swap:
        d_an = ns.minimum(d_an, _distance(ns, p, n, distance, eps))
    return reduce(ns, ns.maximum(margin + d_ap - d_an, 0), reduction)


def _pairwise_distances(ns, e, distance):
    """(N, N) distances between the rows of ``e``."""
    if distance == "euclidean":
        return ns.distances(e)
    if distance == "squared_euclidean":
        return ns.squared_distances(e)
    nrm = ns.maximum(ns.sqrt(ns.sum(e * e, axis=1)), 1e-8)
    return 1 - (e @ e.T) / (nrm[:, None] * nrm[None, :])


def _hinge(ns, z, valid, soft):
    """``max(0, z)`` (``softplus(z)`` when soft) where valid, else 0 (and no gradient)."""
    z = ns.where(valid, z, 0.0)
    return ns.where(valid, ns.softplus(z) if soft else ns.maximum(z, 0), 0.0)


def batch_triplet_loss(ns, e, labels, *, mining="hard", margin=1.0, distance="euclidean", soft=False,
                       reduction="mean"):
    """pairwise distances and mining in array ops."""
    N = e.shape[0]
    d = _pairwise_distances(ns, e, distance)
    same = labels[:, None] == labels[None, :]
    pos = same & ~ns.eye_like(same)
    neg = ~same
    inf = float("inf")
    if mining == "hard":
        valid = ns.any(pos, axis=1) & ns.any(neg, axis=1)
        dp = ns.max(ns.where(pos, d, -inf), axis=1)
        dn = ns.min(ns.where(neg, d, inf), axis=1)
        per = _hinge(ns, dp - dn + margin, valid, soft)
        count = ns.sum(valid)
    elif mining == "semihard":
        valid = pos & ns.any(neg, axis=1)[:, None]                   # (a, p)
        d_an = ns.broadcast_to(d[:, None, :], (N, N, N))             # (a, p, n)
        semi = neg[:, None, :] & (d_an > d[:, :, None])
        dn = ns.where(ns.any(semi, axis=-1), ns.min(ns.where(semi, d_an, inf), axis=-1),
                      ns.max(ns.where(neg[:, None, :], d_an, -inf), axis=-1))
        per = ns.sum(_hinge(ns, d - dn + margin, valid, soft), axis=1)
        count = ns.sum(valid)
    else:  # all: "mean" over the triplets with positive loss (every valid one when soft), 0 when none
        valid = pos[:, :, None] & neg[:, None, :]
        z = d[:, :, None] - d[:, None, :] + margin
        per = ns.sum(_hinge(ns, z, valid, soft), axis=(1, 2))
        count = ns.maximum(ns.sum(valid) if soft else ns.sum(valid & (z > 0)), 1)
    if reduction == "mean":
        return ns.sum(per) / count
    return reduce(ns, per, reduction)


# ------------------------------------------------------------ linear + cross entropy


def linear_cross_entropy(ns, e, w, y, *, bias=None, reduction="mean", **options):
    """``softmax_cross_entropy`` of the logits ``e @ w.T + bias``, formed whole."""
    z = e @ w.T if bias is None else e @ w.T + bias
    return softmax_cross_entropy(ns, z, y, reduction=reduction, **options)


# ------------------------------------------------------------ center


def center_loss(ns, x, labels, centers, *, alpha=0.5, reduction="mean"):
    """0.5 ||x - c_y||**2 and Wen et al.'s update in array ops.

    The update is ``center_loss_update``; ``alpha``, its rate, is taken here so that both
    take the public function's keywords.
    """
    diff = x - centers[labels]
    return reduce(ns, 0.5 * ns.sum(diff * diff, axis=1), reduction)


def center_loss_update(ns, x, labels, centers, *, alpha=0.5):
    """The centers after Wen et al.'s update: ``c_j += alpha sum_{y_i = j} (x_i - c_j) / (1 + n_j)``,
    the sum formed as ``sum_{y_i = j} x_i - n_j c_j``."""
    counts = ns.bincount(labels, centers.shape[0], centers.dtype)
    step = ns.index_add(ns.zeros_like(centers), labels, x) - counts[:, None] * centers
    return centers + (alpha / (1 + counts))[:, None] * step
