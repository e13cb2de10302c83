"""``python -m fastloss check`` (the default command): every loss against an autograd framework.

For every public loss, on small random inputs, in float32 and float64 and with
``reduction="mean"``, ``"sum"`` and ``"none"``, it compares fastloss's value and
gradient (and, for the center loss, the updated centers) with a reference:

* ``torch``: PyTorch autograd (``torch.autograd.grad``) through
  ``torch.nn.functional`` where PyTorch has the loss (``cross_entropy``,
  ``huber_loss``, ``triplet_margin_loss``), else the formula written in torch ops
  (focal losses, torchvision's sigmoid focal loss, the triplet distances torch lacks,
  batch mining, center loss, and fastloss's own extensions: z-loss, softcap,
  sample weights);
* ``jax``: the same formulas in ``jax.numpy``, differentiated by ``jax.vjp``
  (64-bit mode on, so that float64 stays float64);
* ``numpy``: the same formulas evaluated by NumPy in float64, the gradient by
  central finite differences (the fallback when neither framework is installed;
  a looser gradient tolerance).

``--framework auto`` takes torch when it imports, else jax, else numpy.  The
reference runs in the row's dtype (torch, jax) or in float64 (numpy); fastloss runs
on ``--backend cpu`` or ``cuda`` (NumPy inputs copied to the GPU and back).

Each row of the table is one call: the largest absolute error of the value (every
entry for ``"none"``) and of the gradient (all three for the triplet margin loss),
each also relative to the largest magnitude of the reference; the row passes when
both relative errors are within the tolerance.  The exit status is 1 when any row
fails, 2 when the framework asked for is missing or the backend unusable.

torch and jax are imported inside ``run`` only: ``import fastloss.__main__`` loads
neither.  Timing is ``python -m fastloss bench``'s job.
"""
import argparse
import sys
from dataclasses import dataclass

import numpy as np

FRAMEWORKS = ("auto", "torch", "jax", "numpy")
BACKENDS = ("cpu", "cuda")
REDUCTIONS = ("mean", "sum", "none")
DTYPES = ("float32", "float64")
# tolerance on the relative errors: (reference framework, dtype) -> rtol
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}
NUMPY_GRAD_TOLERANCE = 1e-6   # finite differences (float64, central, h = 1e-5 |x|)
FD_STEP = 1e-5

LOSS_SHORT = {
    "ce": "softmax_cross_entropy",
    "focal": "focal_loss",
    "sigmoid_focal": "sigmoid_focal_loss",
    "huber": "huber_loss",
    "triplet": "triplet_margin_loss",
    "batch_triplet": "batch_triplet_loss",
    "center": "center_loss",
}
LOSS_NAMES = tuple(LOSS_SHORT.values())


# ------------------------------------------------------------------------ the cases


@dataclass(frozen=True)
class Case:
    """One option set of one loss: ``make(rng, dtype) -> (args, kwargs)``, NumPy arrays;
    the first ``n_grad`` arguments are differentiated (3 for the triplet margin loss)."""
    loss: str
    name: str
    make: object
    n_grad: int = 1


def _logits(rng, dtype, batch=(6,), C=5):
    return (2.0 * rng.standard_normal(batch + (C,))).astype(dtype)


def _ce(**extra):
    def make(rng, dtype, batch=(6,), C=5):
        x = _logits(rng, dtype, batch, C)
        kw = dict(extra)
        if kw.pop("prob", False):
            y = rng.dirichlet(np.ones(C), size=batch).astype(dtype)
        else:
            y = rng.integers(0, C, size=batch)
            if "ignore_index" in kw:
                y[:2] = kw["ignore_index"]
        if kw.pop("weight", False):
            kw["weight"] = rng.uniform(0.2, 2.0, size=C).astype(dtype)
        if kw.pop("sample_weight", False):
            kw["sample_weight"] = rng.uniform(0.0, 2.0, size=batch).astype(dtype)
        return (x, y), kw
    return make


def _ce_nd(rng, dtype):
    return _ce()(rng, dtype, batch=(3, 4))


def _focal(gamma, alpha=False):
    def make(rng, dtype):
        x = _logits(rng, dtype)
        y = rng.integers(0, x.shape[-1], size=x.shape[:-1])
        kw = {"gamma": gamma}
        if alpha:
            kw["alpha"] = rng.uniform(0.2, 1.0, size=x.shape[-1]).astype(dtype)
        return (x, y), kw
    return make


def _sigmoid_focal(alpha, gamma):
    def make(rng, dtype):
        x = (2.0 * rng.standard_normal((6, 5))).astype(dtype)
        t = (rng.random((6, 5)) < 0.3).astype(dtype)
        return (x, t), {"alpha": alpha, "gamma": gamma}
    return make


def _huber(delta, weighted=False):
    def make(rng, dtype):
        x = (1.5 * rng.standard_normal((6, 4))).astype(dtype)
        t = (1.5 * rng.standard_normal((6, 4))).astype(dtype)
        kw = {"delta": delta}
        if weighted:
            kw["sample_weight"] = rng.uniform(0.0, 2.0, size=(6, 1)).astype(dtype)
        return (x, t), kw
    return make


def _triplet(**kw):
    def make(rng, dtype):
        a, p, n = (rng.standard_normal((6, 4)).astype(dtype) for _ in range(3))
        return (a, p, n), dict(kw)
    return make


def _batch(**kw):
    def make(rng, dtype):
        labels = np.repeat(np.arange(4), 3)
        rng.shuffle(labels)
        centers = rng.standard_normal((4, 3))
        e = (0.6 * centers[labels] + 0.5 * rng.standard_normal((12, 3))).astype(dtype)
        return (e, labels), dict(kw)
    return make


def _center(rng, dtype):
    x = rng.standard_normal((8, 3)).astype(dtype)
    labels = rng.choice([0, 1, 3], size=8)          # class 2 absent: its center must not move
    labels[:3] = [0, 1, 3]
    centers = rng.standard_normal((4, 3)).astype(dtype)
    return (x, labels, centers), {"alpha": 0.5}


CASES = (
    Case("softmax_cross_entropy", "plain, logits (3, 4, 5)", _ce_nd),
    Case("softmax_cross_entropy", "label_smoothing=0.1", _ce(label_smoothing=0.1)),
    Case("softmax_cross_entropy", "weight, ignore_index=1", _ce(weight=True, ignore_index=1)),
    Case("softmax_cross_entropy", "prob. targets, smoothing 0.1", _ce(prob=True, label_smoothing=0.1)),
    Case("softmax_cross_entropy", "z_loss=0.01", _ce(z_loss=0.01, ignore_index=-100)),
    Case("softmax_cross_entropy", "softcap=3, sample_weight", _ce(softcap=3.0, sample_weight=True, weight=True)),
    Case("focal_loss", "gamma=0", _focal(0.0)),
    Case("focal_loss", "gamma=0.5", _focal(0.5)),
    Case("focal_loss", "gamma=2", _focal(2.0)),
    Case("focal_loss", "gamma=2, alpha (C,)", _focal(2.0, alpha=True)),
    Case("sigmoid_focal_loss", "alpha=0.25, gamma=2", _sigmoid_focal(0.25, 2.0)),
    Case("sigmoid_focal_loss", "alpha=-1, gamma=0.5", _sigmoid_focal(-1.0, 0.5)),
    Case("huber_loss", "delta=1", _huber(1.0)),
    Case("huber_loss", "delta=0.5, sample_weight", _huber(0.5, weighted=True)),
    Case("triplet_margin_loss", "euclidean, swap", _triplet(margin=0.5, swap=True), n_grad=3),
    Case("triplet_margin_loss", "squared_euclidean", _triplet(margin=0.5, distance="squared_euclidean"),
         n_grad=3),
    Case("triplet_margin_loss", "cosine", _triplet(margin=0.2, distance="cosine"), n_grad=3),
    Case("batch_triplet_loss", "hard", _batch(mining="hard", margin=0.5)),
    Case("batch_triplet_loss", "semihard", _batch(mining="semihard", margin=0.5)),
    Case("batch_triplet_loss", "all", _batch(mining="all", margin=0.5)),
    Case("batch_triplet_loss", "hard, soft", _batch(mining="hard", margin=0.0, soft=True)),
    Case("center_loss", "alpha=0.5", _center),
)

# what each loss is checked against, per framework (printed under the table)
REFERENCES = {
    "torch": {
        "softmax_cross_entropy": "F.cross_entropy (z_loss, softcap, sample_weight in torch ops)",
        "focal_loss": "-alpha_y (1 - p_y)**gamma log p_y in torch ops",
        "sigmoid_focal_loss": "torchvision.ops.sigmoid_focal_loss, its code in torch ops",
        "huber_loss": "F.huber_loss (sample_weight in torch ops)",
        "triplet_margin_loss": "F.triplet_margin_loss (euclidean); squared and cosine in torch ops",
        "batch_triplet_loss": "pairwise distances and mining in torch ops",
        "center_loss": "0.5 ||x - c_y||**2 and Wen et al.'s update in torch ops",
    },
}


# ------------------------------------------------------------ torch references


def _torch_refs(torch):
    F = torch.nn.functional

    def softmax_cross_entropy(x, y, *, weight=None, sample_weight=None, ignore_index=-100,
                              label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean"):
        C = x.shape[-1]
        batch = x.shape[:-1]
        z = x.reshape(-1, C)
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        prob = y.dtype.is_floating_point
        y = y.reshape(-1, C) if prob else y.reshape(-1)
        if sample_weight is None and not z_loss:
            out = F.cross_entropy(z, y, weight=weight, ignore_index=ignore_index,
                                  label_smoothing=label_smoothing, reduction=reduction)
            return out.reshape(batch) if reduction == "none" else out
        per = F.cross_entropy(z, y, weight=weight, ignore_index=ignore_index,
                              label_smoothing=label_smoothing, reduction="none")
        n = z.shape[0]
        sw = torch.ones(n, dtype=z.dtype) if sample_weight is None else sample_weight.reshape(-1)
        keep = torch.ones(n, dtype=torch.bool) if prob else y != ignore_index
        if z_loss:
            per = per + z_loss * torch.logsumexp(z, dim=-1) ** 2 * keep
        per = per * sw
        if reduction == "none":
            return per.reshape(batch)
        if reduction == "sum" or prob:
            return per.sum() if reduction == "sum" else per.sum() / sw.sum()
        wy = torch.ones(n, dtype=z.dtype) if weight is None else weight[y.clamp(0, C - 1)]
        return per.sum() / (wy * sw * keep).sum()

    def focal_loss(x, y, *, gamma=2.0, alpha=None, reduction="mean"):
        lpy = F.log_softmax(x, dim=-1).gather(-1, y[..., None])[..., 0]
        a = 1.0 if alpha is None else alpha[y]
        per = -a * (-torch.expm1(lpy)) ** gamma * lpy
        return _torch_reduce(per, reduction)

    def sigmoid_focal_loss(x, t, *, alpha=0.25, gamma=2.0, reduction="mean"):
        # torchvision.ops.sigmoid_focal_loss, line for line
        p = torch.sigmoid(x)
        ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
        p_t = p * t + (1 - p) * (1 - t)
        loss = ce * ((1 - p_t) ** gamma)
        if alpha >= 0:
            loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
        return _torch_reduce(loss, reduction)

    def huber_loss(x, t, *, delta=1.0, sample_weight=None, reduction="mean"):
        if sample_weight is None:
            return F.huber_loss(x, t, delta=delta, reduction=reduction)
        per = F.huber_loss(x, t, delta=delta, reduction="none") * sample_weight
        if reduction == "mean":
            return per.sum() / sample_weight.expand_as(per).sum()
        return _torch_reduce(per, reduction)

    def _distance(u, v, distance, eps):
        if distance == "euclidean":
            return F.pairwise_distance(u, v, p=2, eps=eps)
        if distance == "squared_euclidean":
            return ((u - v) ** 2).sum(-1)
        nu = u.norm(dim=-1).clamp_min(eps)
        nv = v.norm(dim=-1).clamp_min(eps)
        return 1 - (u * v).sum(-1) / (nu * nv)

    def triplet_margin_loss(a, p, n, *, margin=1.0, distance="euclidean", swap=False, eps=1e-6,
                            reduction="mean"):
        if distance == "euclidean":
            return F.triplet_margin_loss(a, p, n, margin=margin, p=2, eps=eps, swap=swap,
                                         reduction=reduction)
        d_ap = _distance(a, p, distance, eps)
        d_an = _distance(a, n, distance, eps)
        if swap:
            d_an = torch.minimum(d_an, _distance(p, n, distance, eps))
        return _torch_reduce(torch.clamp_min(margin + d_ap - d_an, 0), reduction)

    def batch_triplet_loss(e, labels, *, mining="hard", margin=1.0, distance="euclidean", soft=False,
                           reduction="mean"):
        diff = e[:, None, :] - e[None, :, :]
        if distance == "cosine":
            nrm = e.norm(dim=1).clamp_min(1e-8)
            d = 1 - (e @ e.T) / (nrm[:, None] * nrm[None, :])
        else:
            d2 = (diff * diff).sum(-1)
            if distance == "squared_euclidean":
                d = d2
            else:  # sqrt with gradient 0, not NaN, at 0 (the diagonal)
                pos_d2 = d2 > 0
                d = torch.where(pos_d2, torch.sqrt(torch.where(pos_d2, d2, torch.ones_like(d2))),
                                torch.zeros_like(d2))
        same = labels[:, None] == labels[None, :]
        pos = same & ~torch.eye(e.shape[0], dtype=torch.bool)
        neg = ~same
        inf = torch.tensor(float("inf"), dtype=e.dtype)

        def f(z, valid):
            z = torch.where(valid, z, torch.zeros_like(z))
            out = F.softplus(z) if soft else torch.relu(z)
            return torch.where(valid, out, torch.zeros_like(z))

        if mining == "hard":
            valid = pos.any(1) & neg.any(1)
            dp = torch.where(pos, d, -inf).amax(1)
            dn = torch.where(neg, d, inf).amin(1)
            per = f(dp - dn + margin, valid)
            count = valid.sum()
        elif mining == "semihard":
            valid = pos & neg.any(1)[:, None]                        # (a, p)
            d_an = d[:, None, :].expand(-1, d.shape[0], -1)          # (a, p, n)
            semi = neg[:, None, :] & (d_an > d[:, :, None])
            dn = torch.where(semi.any(-1), torch.where(semi, d_an, inf).amin(-1),
                             torch.where(neg[:, None, :], d_an, -inf).amax(-1))
            per = f(d - dn + margin, valid).sum(1)
            count = valid.sum()
        else:  # all
            valid = pos[:, :, None] & neg[:, None, :]
            z = d[:, :, None] - d[:, None, :] + margin
            terms = f(z, valid)
            per = terms.sum((1, 2))
            count = valid.sum() if soft else (valid & (z > 0)).sum()
            if reduction == "mean" and count == 0:
                return per.sum() * 0
        if reduction == "mean":
            return per.sum() / count
        return _torch_reduce(per, reduction)

    def center_loss(x, labels, centers, *, alpha=0.5, reduction="mean"):
        diff = x - centers[labels]
        return _torch_reduce(0.5 * (diff * diff).sum(1), reduction)

    def center_update(x, labels, centers, *, alpha=0.5):
        counts = torch.bincount(labels, minlength=centers.shape[0]).to(centers.dtype)
        step = torch.zeros_like(centers).index_add_(0, labels, x - centers[labels])
        return centers + (alpha / (1 + counts))[:, None] * step

    return {"softmax_cross_entropy": softmax_cross_entropy, "focal_loss": focal_loss,
            "sigmoid_focal_loss": sigmoid_focal_loss, "huber_loss": huber_loss,
            "triplet_margin_loss": triplet_margin_loss, "batch_triplet_loss": batch_triplet_loss,
            "center_loss": center_loss, "center_update": center_update}


def _torch_reduce(per, reduction):
    return per.mean() if reduction == "mean" else per.sum() if reduction == "sum" else per


# ------------------------------------------- jax.numpy / NumPy references (one code)


class _Ops:
    """The array namespace the generic references are written in: ``jax.numpy`` or NumPy."""

    def __init__(self, xp, stop_gradient=lambda a: a):
        self.xp = xp
        self.stop_gradient = stop_gradient


def _xp_reduce(xp, per, reduction):
    return xp.mean(per) if reduction == "mean" else xp.sum(per) if reduction == "sum" else per


def _xp_refs(ops):
    xp = ops.xp

    def log_softmax(z):
        m = ops.stop_gradient(xp.max(z, axis=-1, keepdims=True))
        lse = xp.log(xp.sum(xp.exp(z - m), axis=-1, keepdims=True)) + m
        return z - lse, lse[..., 0]

    def take(a, idx):
        return xp.take_along_axis(a, idx[..., None], axis=-1)[..., 0]

    def softmax_cross_entropy(x, y, *, weight=None, sample_weight=None, ignore_index=-100,
                              label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean"):
        C = x.shape[-1]
        z = x if softcap is None else softcap * xp.tanh(x / softcap)
        logp, lse = log_softmax(z)
        w = xp.ones(C, dtype=x.dtype) if weight is None else weight
        eps = label_smoothing
        if xp.issubdtype(y.dtype, xp.floating):     # probability targets
            t = (1 - eps) * y + eps / C
            per = -xp.sum(w * t * logp, axis=-1)
            keep = xp.ones(per.shape, dtype=bool)
            denom_w = xp.ones(per.shape, dtype=x.dtype)
        else:
            keep = y != ignore_index
            ys = xp.where(keep, y, 0)
            per = (1 - eps) * w[ys] * -take(logp, ys) + eps / C * -xp.sum(w * logp, axis=-1)
            denom_w = w[ys]
        per = per + z_loss * lse ** 2
        sw = xp.ones(per.shape, dtype=x.dtype) if sample_weight is None else sample_weight
        per = xp.where(keep, per, 0) * sw
        if reduction == "mean":
            return xp.sum(per) / xp.sum(xp.where(keep, denom_w, 0) * sw)
        return _xp_reduce(xp, per, reduction)

    def focal_loss(x, y, *, gamma=2.0, alpha=None, reduction="mean"):
        logp, _ = log_softmax(x)
        lpy = take(logp, y)
        a = 1.0 if alpha is None else alpha[y]
        per = -a * (-xp.expm1(lpy)) ** gamma * lpy
        return _xp_reduce(xp, per, reduction)

    def sigmoid_focal_loss(x, t, *, alpha=0.25, gamma=2.0, reduction="mean"):
        p = 1 / (1 + xp.exp(-x))
        ce = xp.logaddexp(0, x) - x * t                  # BCE with logits
        p_t = p * t + (1 - p) * (1 - t)
        loss = ce * (1 - p_t) ** gamma
        if alpha >= 0:
            loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
        return _xp_reduce(xp, loss, reduction)

    def huber_loss(x, t, *, delta=1.0, sample_weight=None, reduction="mean"):
        r = x - t
        a = xp.abs(r)
        per = xp.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))
        if sample_weight is None:
            return _xp_reduce(xp, per, reduction)
        per = per * sample_weight
        if reduction == "mean":
            return xp.sum(per) / xp.sum(xp.broadcast_to(sample_weight, per.shape))
        return _xp_reduce(xp, per, reduction)

    def _distance(u, v, distance, eps):
        if distance == "euclidean":                        # torch.pairwise_distance
            w = u - v + eps
            return xp.sqrt(xp.sum(w * w, axis=-1))
        if distance == "squared_euclidean":
            return xp.sum((u - v) ** 2, axis=-1)
        nu = xp.maximum(xp.sqrt(xp.sum(u * u, axis=-1)), eps)
        nv = xp.maximum(xp.sqrt(xp.sum(v * v, axis=-1)), eps)
        return 1 - xp.sum(u * v, axis=-1) / (nu * nv)

    def triplet_margin_loss(a, p, n, *, margin=1.0, distance="euclidean", swap=False, eps=1e-6,
                            reduction="mean"):
        d_ap = _distance(a, p, distance, eps)
        d_an = _distance(a, n, distance, eps)
        if swap:
            d_an = xp.minimum(d_an, _distance(p, n, distance, eps))
        return _xp_reduce(xp, xp.maximum(margin + d_ap - d_an, 0), reduction)

    def batch_triplet_loss(e, labels, *, mining="hard", margin=1.0, distance="euclidean", soft=False,
                           reduction="mean"):
        N = e.shape[0]
        diff = e[:, None, :] - e[None, :, :]
        if distance == "cosine":
            nrm = xp.maximum(xp.sqrt(xp.sum(e * e, axis=1)), 1e-8)
            d = 1 - (e @ e.T) / (nrm[:, None] * nrm[None, :])
        else:
            d2 = xp.sum(diff * diff, axis=-1)
            if distance == "squared_euclidean":
                d = d2
            else:  # sqrt with gradient 0, not NaN, at 0 (the diagonal)
                d = xp.where(d2 > 0, xp.sqrt(xp.where(d2 > 0, d2, 1.0)), 0.0)
        same = labels[:, None] == labels[None, :]
        pos = same & ~xp.eye(N, dtype=bool)
        neg = ~same
        inf = xp.inf

        def f(z, valid):
            z = xp.where(valid, z, 0.0)
            out = xp.logaddexp(0, z) if soft else xp.maximum(z, 0)
            return xp.where(valid, out, 0.0)

        if mining == "hard":
            valid = xp.any(pos, axis=1) & xp.any(neg, axis=1)
            dp = xp.max(xp.where(pos, d, -inf), axis=1)
            dn = xp.min(xp.where(neg, d, inf), axis=1)
            per = f(dp - dn + margin, valid)
            count = xp.sum(valid)
        elif mining == "semihard":
            valid = pos & xp.any(neg, axis=1)[:, None]                  # (a, p)
            d_an = xp.broadcast_to(d[:, None, :], (N, N, N))             # (a, p, n)
            semi = neg[:, None, :] & (d_an > d[:, :, None])
            dn = xp.where(xp.any(semi, axis=-1), xp.min(xp.where(semi, d_an, inf), axis=-1),
                          xp.max(xp.where(neg[:, None, :], d_an, -inf), axis=-1))
            per = xp.sum(f(d - dn + margin, valid), axis=1)
            count = xp.sum(valid)
        else:  # all
            valid = pos[:, :, None] & neg[:, None, :]
            z = d[:, :, None] - d[:, None, :] + margin
            per = xp.sum(f(z, valid), axis=(1, 2))
            count = xp.sum(valid) if soft else xp.sum(valid & (z > 0))
            if reduction == "mean":
                return xp.sum(per) / xp.maximum(count, 1)
        if reduction == "mean":
            return xp.sum(per) / count
        return _xp_reduce(xp, per, reduction)

    def center_loss(x, labels, centers, *, alpha=0.5, reduction="mean"):
        diff = x - centers[labels]
        return _xp_reduce(xp, 0.5 * xp.sum(diff * diff, axis=1), reduction)

    return {"softmax_cross_entropy": softmax_cross_entropy, "focal_loss": focal_loss,
            "sigmoid_focal_loss": sigmoid_focal_loss, "huber_loss": huber_loss,
            "triplet_margin_loss": triplet_margin_loss, "batch_triplet_loss": batch_triplet_loss,
            "center_loss": center_loss}


def _numpy_center_update(x, labels, centers, alpha=0.5):
    counts = np.bincount(labels, minlength=centers.shape[0]).astype(centers.dtype)
    step = np.zeros_like(centers)
    np.add.at(step, labels, x - centers[labels])
    return centers + (alpha / (1 + counts))[:, None] * step


# ------------------------------------------------------------ the three references


class _Reference:
    """``compute(case, args, kwargs, reduction) -> (value, grads, centers or None)``,
    NumPy float64 arrays."""
    name = ""
    title = ""
    grad_tolerance = None   # None: the dtype's tolerance

    def tolerance(self, dtype, what):
        if what == "grad" and self.grad_tolerance is not None:
            return max(TOLERANCE[dtype], self.grad_tolerance)
        return TOLERANCE[dtype]


class _TorchReference(_Reference):
    name = "torch"

    def __init__(self, torch):
        self.torch = torch
        self.refs = _torch_refs(torch)
        self.title = f"PyTorch {torch.__version__} autograd"

    def compute(self, case, args, kwargs, reduction):
        torch = self.torch
        dtype = getattr(torch, str(args[0].dtype))

        def tensor(a, leaf=False):
            if not isinstance(a, np.ndarray):
                return a
            t = torch.from_numpy(np.array(a, copy=True))
            if t.is_floating_point():
                t = t.to(dtype)
            return t.requires_grad_(True) if leaf else t

        ts = [tensor(a, i < case.n_grad) for i, a in enumerate(args)]
        kw = {k: tensor(v) for k, v in kwargs.items()}
        if case.loss == "center_loss":
            kw.pop("alpha")
        out = self.refs[case.loss](*ts, reduction=reduction, **kw)
        grads = torch.autograd.grad(out.sum(), ts[:case.n_grad])
        centers = None
        if case.loss == "center_loss":
            with torch.no_grad():
                centers = self.refs["center_update"](ts[0], ts[1], ts[2], alpha=kwargs["alpha"])
            centers = centers.numpy()
        return out.detach().numpy(), tuple(g.numpy() for g in grads), centers


class _JaxReference(_Reference):
    name = "jax"

    def __init__(self, jax):
        self.jax = jax
        self.jnp = jax.numpy
        self.refs = _xp_refs(_Ops(jax.numpy, jax.lax.stop_gradient))
        self.title = f"JAX {jax.__version__} (jax.vjp, 64-bit mode)"

    def compute(self, case, args, kwargs, reduction):
        jax, jnp = self.jax, self.jnp
        with _jax_x64(jax):
            def arr(a):
                return jnp.asarray(a) if isinstance(a, np.ndarray) else a

            xs = [arr(a) for a in args]
            kw = {k: arr(v) for k, v in kwargs.items()}
            if case.loss == "center_loss":
                kw.pop("alpha")
            fn = self.refs[case.loss]

            def f(*leaves):
                return fn(*leaves, *xs[case.n_grad:], reduction=reduction, **kw)

            out, vjp = jax.vjp(f, *xs[:case.n_grad])
            grads = vjp(jnp.ones_like(out))
            centers = None
            if case.loss == "center_loss":
                x, labels, c = xs
                counts = jnp.bincount(labels, length=c.shape[0]).astype(c.dtype)
                step = jnp.zeros_like(c).at[labels].add(x - c[labels])
                centers = np.asarray(c + (kwargs["alpha"] / (1 + counts))[:, None] * step)
            return np.asarray(out), tuple(np.asarray(g) for g in grads), centers


def _jax_x64(jax):
    """A context manager turning on JAX's 64-bit mode (and off again afterwards)."""
    state = getattr(jax, "enable_x64", None)
    if callable(state):
        try:
            return state(True)
        except TypeError:
            pass
    from jax.experimental import enable_x64
    return enable_x64()


class _NumpyReference(_Reference):
    name = "numpy"
    grad_tolerance = NUMPY_GRAD_TOLERANCE

    def __init__(self, fallback=False):
        self.refs = _xp_refs(_Ops(np))
        self.title = ("the NumPy references: the formulas in float64 NumPy, gradients by central "
                      "differences" + (" (neither torch nor jax imports here)" if fallback else ""))

    def compute(self, case, args, kwargs, reduction):
        def f64(a):
            return a.astype(np.float64) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a

        xs = [f64(a) for a in args]
        kw = {k: f64(v) for k, v in kwargs.items()}
        if case.loss == "center_loss":
            kw.pop("alpha")
        fn = self.refs[case.loss]

        def total(leaves):
            with np.errstate(all="ignore"):
                return float(np.sum(fn(*leaves, *xs[case.n_grad:], reduction=reduction, **kw)))

        with np.errstate(all="ignore"):
            out = np.asarray(fn(*xs, reduction=reduction, **kw))
        leaves = [x.copy() for x in xs[:case.n_grad]]
        grads = []
        for x in leaves:
            g = np.zeros_like(x)
            for i in np.ndindex(x.shape):
                v = x[i]
                h = FD_STEP * max(1.0, abs(v))
                x[i] = v + h
                up = total(leaves)
                x[i] = v - h
                down = total(leaves)
                x[i] = v
                g[i] = (up - down) / (2 * h)
            grads.append(g)
        centers = None
        if case.loss == "center_loss":
            centers = _numpy_center_update(xs[0], xs[1], xs[2], kwargs["alpha"])
        return out, tuple(grads), centers


def make_reference(framework):
    """The reference for ``framework`` (``"auto"`` tries torch, then jax, then numpy);
    raises ImportError when the one asked for does not import."""
    from fastloss import _competitors

    if framework in ("auto", "torch"):
        try:
            return _TorchReference(_competitors.torch_module())
        except _competitors.Missing:
            if framework == "torch":
                raise
    if framework in ("auto", "jax"):
        try:
            return _JaxReference(_competitors.jax_module())
        except _competitors.Missing:
            if framework == "jax":
                raise
    if framework in ("auto", "numpy"):
        return _NumpyReference(fallback=framework == "auto")
    raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")


# ------------------------------------------------------------------------ the check


@dataclass
class Row:
    loss: str
    case: str
    dtype: str
    reduction: str
    value_abs: float = float("nan")
    value_rel: float = float("nan")
    grad_abs: float | None = None      # None: no gradient in this row (the centers)
    grad_rel: float | None = None
    tol: float = float("nan")
    grad_tol: float = float("nan")
    ok: bool = False
    error: str = ""


def _errors(got, want):
    """(max abs error, that relative to max|want|); inf on a shape mismatch or NaN."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return float("inf"), float("inf")
    if got.size == 0:
        return 0.0, 0.0
    diff = np.abs(got - want)
    same_nan = np.isnan(got) & np.isnan(want)
    diff = np.where(same_nan, 0.0, diff)
    err = float(np.max(diff))
    if np.isnan(err):
        return float("inf"), float("inf")
    scale = float(np.max(np.abs(np.where(np.isnan(want), 0.0, want))))
    if err == 0.0:
        return 0.0, 0.0
    return err, (err / scale if scale > 0 else float("inf"))


def _flat(arrays):
    return np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays])


def _fastloss_call(fn, case, args, kwargs, reduction, backend):
    args = tuple(np.array(a, copy=True) for a in args)     # centers are updated in place
    res = fn(*args, reduction=reduction, backend=backend, **kwargs)
    grads = res.grad if isinstance(res.grad, tuple) else (res.grad,)
    for g, a in zip(grads, args):
        if g is None or np.asarray(g).dtype != a.dtype:
            raise TypeError(f"gradient of dtype {getattr(g, 'dtype', None)} for input of dtype {a.dtype}")
    centers = args[2] if case.loss == "center_loss" else None
    return np.asarray(res.loss), grads, centers


def check_case(ref, case, dtype, reductions, seed, backend):
    """Rows for one case in one dtype: one per reduction (and the centers after the
    center update, once)."""
    import fastloss

    rows, after = [], []
    rng = np.random.default_rng([seed, CASES.index(case), DTYPES.index(dtype)])
    args, kwargs = case.make(rng, np.dtype(dtype))
    for reduction in reductions:
        row = Row(case.loss, case.name, dtype, reduction, tol=ref.tolerance(dtype, "value"),
                  grad_tol=ref.tolerance(dtype, "grad"))
        rows.append(row)
        try:
            fn = getattr(fastloss, case.loss)
            got_value, got_grads, got_centers = _fastloss_call(fn, case, args, kwargs, reduction, backend)
            want_value, want_grads, want_centers = ref.compute(case, args, kwargs, reduction)
        except Exception as exc:  # noqa: BLE001  (reported in the table; the check goes on)
            row.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:90]
            continue
        row.value_abs, row.value_rel = _errors(got_value, want_value)
        row.grad_abs, row.grad_rel = _errors(_flat(got_grads), _flat(want_grads))
        row.ok = row.value_rel <= row.tol and row.grad_rel <= row.grad_tol
        if got_centers is not None and reduction == reductions[0]:
            c = Row(case.loss, case.name + ": centers", dtype, "-", tol=row.tol)
            c.value_abs, c.value_rel = _errors(got_centers, want_centers)
            c.ok = c.value_rel <= c.tol
            after.append(c)
    return rows + after


def _fmt(x):
    return "-" if x is None else f"{x:.1e}"


def _tol_str(row):
    if row.grad_abs is not None and row.grad_tol != row.tol:
        return f"{row.tol:.0e}/{row.grad_tol:.0e}"
    return f"{row.tol:.0e}"


HEADER = (f"{'loss':<21} {'case':<30} {'dtype':<7} {'reduction':<9} {'value abs':>9} {'value rel':>9} "
          f"{'grad abs':>9} {'grad rel':>9} {'tol':>11}  result")


def _row_str(r):
    start = f"{r.loss:<21} {r.case:<30} {r.dtype:<7} {r.reduction:<9} "
    if r.error:
        return start + f"ERROR {r.error}  FAIL"
    return start + (f"{_fmt(r.value_abs):>9} {_fmt(r.value_rel):>9} {_fmt(r.grad_abs):>9} "
                    f"{_fmt(r.grad_rel):>9} {_tol_str(r):>11}  {'PASS' if r.ok else 'FAIL'}")


def _versions():
    import fastloss

    parts = [f"fastloss {fastloss.__version__}", f"numpy {np.__version__}"]
    import numba

    parts.append(f"numba {numba.__version__}")
    return ", ".join(parts)


def run_checks(framework="auto", backend="cpu", seed=0, losses=None, dtypes=DTYPES,
               reductions=REDUCTIONS, out=None):
    """Print the table to ``out``; return the rows (``Row.ok`` each).  Raises
    ImportError when ``framework`` (not ``"auto"``) does not import."""
    out = sys.stdout if out is None else out
    ref = make_reference(framework)
    cases = [c for c in CASES if losses is None or c.loss in losses]
    print(f"fastloss check: value and gradient of every loss against {ref.title}", file=out)
    print(f"fastloss backend {backend}; seed {seed}; {_versions()}", file=out)
    print(HEADER, file=out)
    print("-" * len(HEADER), file=out)
    rows = []
    for case in cases:
        for dtype in dtypes:
            for row in check_case(ref, case, dtype, reductions, seed, backend):
                rows.append(row)
                print(_row_str(row), file=out, flush=True)
    print("-" * len(HEADER), file=out)
    print("abs: largest |fastloss - reference| over the value (every entry for 'none') or the gradient "
          "(all inputs');", file=out)
    print("rel: abs / largest |reference|; a row passes when both rel <= tol (value/gradient); "
          "'centers': the centers after the update.", file=out)
    if ref.name == "torch":
        for name in sorted({c.loss for c in cases}, key=LOSS_NAMES.index):
            print(f"  {name}: {REFERENCES['torch'][name]}", file=out)
    else:
        lib = "jax.numpy" if ref.name == "jax" else "NumPy"
        print(f"reference: each loss's formula written in {lib} (fastloss/_check.py, _xp_refs)", file=out)
    failed = [r for r in rows if not r.ok]
    if failed:
        names = ", ".join(dict.fromkeys(r.loss for r in failed))
        print(f"FAIL: {len(failed)} of {len(rows)} checks failed ({names})", file=out)
    else:
        print(f"PASS: all {len(rows)} checks passed against {ref.name}", file=out)
    return rows


HELP = "check every loss's value and gradient against PyTorch, JAX or NumPy (the default command)"
DESCRIPTION = ("Compare fastloss's value and gradient for every loss, several option sets, float32 and "
               "float64, reductions mean/sum/none, with PyTorch autograd (or JAX, or NumPy finite "
               "differences) on small random inputs, and print a pass/fail table.  Exit status 1 when "
               "any check fails.  Timing is 'python -m fastloss bench'.")


def _loss_name(value):
    name = LOSS_SHORT.get(value, value)
    if name not in LOSS_NAMES:
        raise argparse.ArgumentTypeError(
            f"invalid loss {value!r} (choose from {', '.join(LOSS_SHORT)} or the function names)")
    return name


def add_arguments(parser):
    parser.add_argument("--framework", choices=FRAMEWORKS, default="auto",
                        help="reference: torch autograd, jax, or NumPy finite differences; auto takes the "
                             "first installed of torch, jax, numpy (default auto)")
    parser.add_argument("--backend", choices=BACKENDS, default="cpu",
                        help="where fastloss runs; cuda copies the NumPy inputs to the GPU (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--losses", nargs="+", type=_loss_name, metavar="LOSS",
                        help=f"losses to check (default all): {', '.join(LOSS_SHORT)}")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), metavar="DTYPE",
                        help="dtypes to check (default: float32 float64)")


def _cuda_problem():
    """None when fastloss's CUDA backend can run here, else why not."""
    try:
        import fastloss

        fastloss.huber_loss(np.zeros(2, np.float32), np.zeros(2, np.float32), backend="cuda")
    except Exception as exc:  # noqa: BLE001  (any reason is reported)
        return f"{type(exc).__name__}: {exc}"
    return None


def run(args):
    if args.backend == "cuda":
        problem = _cuda_problem()
        if problem:
            print(f"--backend cuda: fastloss's CUDA backend cannot run here ({problem})", file=sys.stderr)
            return 2
    try:
        rows = run_checks(framework=args.framework, backend=args.backend, seed=args.seed,
                          losses=args.losses, dtypes=args.dtypes)
    except ImportError as exc:
        print(f"--framework {args.framework}: {exc}", file=sys.stderr)
        return 2
    return 0 if all(r.ok for r in rows) else 1
