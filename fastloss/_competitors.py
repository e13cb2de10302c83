"""What a user would otherwise run: loss AND gradient with PyTorch and JAX.

Used by ``python -m fastloss bench`` (``fastloss._bench``) and by the
pytest-benchmark suite in ``bench/``; nothing else in fastloss imports it, and it
imports torch and jax only inside its functions (``import fastloss`` never
imports either).

Competitors (``NAMES``):

* ``"torch"``: torch eager forward, then ``torch.autograd.grad`` w.r.t. the
  first argument (the three of them for the triplet margin loss);
* ``"torch-compile"``: the same with the forward through ``torch.compile``
  (``dynamic=False``: compiled for each shape, the best case for a fixed-shape
  loop); for the center loss the update is compiled too;
* ``"jax"``: ``jax.jit(jax.value_and_grad(loss_fn))`` (``argnums=(0, 1, 2)`` for
  the triplet margin loss); for the center loss the jitted function also returns
  the updated centers (JAX arrays are immutable), which the next call uses.

Every one computes what fastloss computes with the benchmarks' hyper-parameters
(see ``fastloss._numpy_losses``), ``reduction="mean"``.  float16 inputs are cast
to float32 inside the loss function, and the gradient comes back in float16:
fastloss's own float16 contract (compute in float32, return float16 gradients),
as a mixed-precision user writes it.

``prepare(name, loss, args, kwargs, device)`` returns a ``Prepared``: ``run()``
does one call (and waits for the device: timing ``run`` is honest), and
``result(out)`` turns what ``run`` returned into NumPy ``(loss, grads, centers)``
for the agreement check.  It raises ``Missing`` when the library is not
installed and ``Unavailable`` when it cannot run here (no GPU for it, a compile
that fails on first call is the caller's to catch).
"""
import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

NAMES = ("torch", "torch-compile", "jax")
LOSS_NAMES = ("softmax_cross_entropy", "focal_loss", "sigmoid_focal_loss", "huber_loss", "center_loss",
              "triplet_margin_loss", "batch_triplet_loss")


class Missing(ImportError):
    """The competitor's library is not installed."""


class Unavailable(RuntimeError):
    """The library is installed but cannot run this case here (e.g. no GPU for it)."""


@dataclass
class Prepared:
    """One competitor on one case's inputs: ``run()`` once per timed call, ``result(run())``
    for the check: ``(loss: float, grads: tuple of ndarray, centers: ndarray or None)``."""
    run: Callable
    result: Callable
    threads: object = None  # the library's thread count, as far as it is known


# ------------------------------------------------------------------- libraries

_settings = {"threads": None}


def set_threads(n):
    """Thread count for the libraries (``None``: their own default).

    torch: ``torch.set_num_threads(n)`` when torch is (or gets) imported.  JAX (XLA)
    has no setting for ``n > 1``; for ``n == 1``, and only before jax is imported,
    ``XLA_FLAGS`` gets ``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``.
    Returns a note on what was applied to JAX.
    """
    _settings["threads"] = n
    torch = sys.modules.get("torch")
    if n and torch is not None:
        torch.set_num_threads(n)
    if not n:
        return None
    if n == 1:
        if sys.modules.get("jax") is not None:
            return "jax already imported: its thread count is XLA's default (all cores)"
        flags = os.environ.get("XLA_FLAGS", "")
        extra = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        if extra not in flags:
            os.environ["XLA_FLAGS"] = (flags + " " + extra).strip()
        return "jax: 1 thread (XLA_FLAGS)"
    return "jax: XLA's default thread pool (all cores; XLA has no setting for N > 1)"


def torch_module():
    """torch, or ``Missing``; applies ``set_threads``' count."""
    try:
        import torch
    except Exception as exc:
        raise Missing(f"torch is not installed ({type(exc).__name__}: {exc})") from None
    n = _settings["threads"]
    if n and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch


def jax_module():
    """jax, or ``Missing``."""
    try:
        import jax
        import jax.numpy
    except Exception as exc:
        raise Missing(f"jax is not installed ({type(exc).__name__}: {exc})") from None
    return jax


def available(name):
    """``(True, version)`` or ``(False, why)`` for competitor ``name``."""
    try:
        mod = jax_module() if name == "jax" else torch_module()
    except Missing as exc:
        return False, str(exc)
    return True, f"{mod.__name__} {mod.__version__}"


# ------------------------------------------------------------------- torch


def _torch_losses(torch):
    F = torch.nn.functional

    def f32(t):
        return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

    def softmax_cross_entropy(x, y):
        return F.cross_entropy(f32(x).reshape(-1, x.shape[-1]), y.reshape(-1))

    def focal_loss(x, y, gamma=2.0):
        logp = F.log_softmax(f32(x), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        pt = logp.exp()
        return (-((1 - pt) ** gamma) * logp).mean()

    def sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0):
        # torchvision.ops.sigmoid_focal_loss, verbatim (reduction="mean")
        x, t = f32(x), f32(t)
        p = torch.sigmoid(x)
        ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
        p_t = p * t + (1 - p) * (1 - t)
        loss = ce * ((1 - p_t) ** gamma)
        if alpha >= 0:
            alpha_t = alpha * t + (1 - alpha) * (1 - t)
            loss = alpha_t * loss
        return loss.mean()

    def huber_loss(x, t, delta=1.0):
        return F.huber_loss(f32(x), f32(t), delta=delta)

    def center_loss(x, labels, centers, alpha=0.5):
        """The loss, and the differences ``x - c[y]`` for the update (no second pass)."""
        diff = f32(x) - centers[labels]
        return 0.5 * (diff * diff).sum(dim=1).mean(), diff

    def center_update(diff, labels, centers, alpha=0.5):
        counts = torch.bincount(labels, minlength=centers.shape[0]).to(diff.dtype)
        step = torch.zeros_like(centers).index_add_(0, labels, diff)
        centers += (alpha / (1 + counts))[:, None] * step

    def triplet_margin_loss(a, p, n, margin=1.0, eps=1e-6):
        return F.triplet_margin_loss(a, p, n, margin=margin, eps=eps)

    def batch_triplet_loss(e, labels, margin=1.0):
        d = torch.cdist(e, e)  # the matmul path for N > 25, as fastloss's Gram matrix
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
        pos_mask = same & ~eye
        hardest_pos = torch.where(pos_mask, d, torch.full_like(d, -1.0)).amax(dim=1)
        hardest_neg = torch.where(~same, d, torch.full_like(d, float("inf"))).amin(dim=1)
        valid = pos_mask.any(dim=1) & (~same).any(dim=1)
        terms = torch.where(valid, torch.relu(hardest_pos - hardest_neg + margin), torch.zeros_like(d[0]))
        return terms.sum() / valid.sum().clamp(min=1)

    return dict(softmax_cross_entropy=softmax_cross_entropy, focal_loss=focal_loss,
                sigmoid_focal_loss=sigmoid_focal_loss, huber_loss=huber_loss, center_loss=center_loss,
                center_update=center_update, triplet_margin_loss=triplet_margin_loss,
                batch_triplet_loss=batch_triplet_loss)


_torch_cache = {}


def _torch_fns(torch):
    if "eager" not in _torch_cache:
        _torch_cache["eager"] = _torch_losses(torch)
        try:  # one static graph per shape and dtype: more than dynamo's default 8 per function
            cfg = torch._dynamo.config
            for key in ("recompile_limit", "cache_size_limit"):
                if hasattr(cfg, key):
                    setattr(cfg, key, max(getattr(cfg, key), 64))
        except Exception:  # pragma: no cover - depends on the torch version
            pass
    return _torch_cache["eager"]


def _prepare_torch(loss, args, kwargs, device, compiled):
    torch = torch_module()
    if device == "cuda":
        if not torch.cuda.is_available():
            raise Unavailable("torch has no CUDA device")
        dev = "cuda"

        def sync():
            torch.cuda.synchronize()
    else:
        dev = "cpu"
        sync = None
    fns = _torch_fns(torch)
    fn = fns[loss]
    if compiled:
        fn = torch.compile(fn, dynamic=False)
    fn = functools.partial(fn, **kwargs)

    def tensor(a, grad=False):
        t = torch.from_numpy(a) if dev == "cpu" else torch.as_tensor(a, device=dev)
        return t.requires_grad_(True) if grad else t

    def host(t):
        return t.detach().cpu().numpy()

    if loss == "center_loss":
        x, labels, centers = args
        xt, yt = tensor(x, grad=True), tensor(labels)
        ct = tensor(centers)  # on the CPU, shares the caller's array: updated in place
        update = fns["center_update"]
        if compiled:
            update = torch.compile(update, dynamic=False)
        update = functools.partial(update, **kwargs)

        def run():
            value, diff = fn(xt, yt, ct)
            (g,) = torch.autograd.grad(value, xt)
            with torch.no_grad():
                update(diff.detach(), yt, ct)
            if sync:
                sync()
            return value, (g,)

        def result(out):
            return out[0].item(), tuple(host(g) for g in out[1]), host(ct).copy()
    else:
        n_grad = 3 if loss == "triplet_margin_loss" else 1
        ts = [tensor(a, grad=i < n_grad) for i, a in enumerate(args)]
        leaves = ts[:n_grad]

        def run():
            value = fn(*ts)
            grads = torch.autograd.grad(value, leaves)
            if sync:
                sync()
            return value, grads

        def result(out):
            return out[0].item(), tuple(host(g) for g in out[1]), None
    return Prepared(run, result, threads=torch.get_num_threads())


# ------------------------------------------------------------------- jax


def _jax_losses(jax):
    jnp = jax.numpy

    def f32(a):
        return a.astype(jnp.float32) if a.dtype in (jnp.float16, jnp.bfloat16) else a

    def softmax_cross_entropy(x, y):
        x = f32(x)
        lse = jax.nn.logsumexp(x, axis=-1)
        picked = jnp.take_along_axis(x, y[..., None], axis=-1)[..., 0]
        return jnp.mean(lse - picked)

    def focal_loss(x, y, gamma=2.0):
        logp = jnp.take_along_axis(jax.nn.log_softmax(f32(x), axis=-1), y[..., None], axis=-1)[..., 0]
        pt = jnp.exp(logp)
        return jnp.mean(-((1 - pt) ** gamma) * logp)

    def sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0):
        x, t = f32(x), f32(t)
        p = jax.nn.sigmoid(x)
        ce = -t * jax.nn.log_sigmoid(x) - (1 - t) * jax.nn.log_sigmoid(-x)  # BCE with logits, as optax
        p_t = p * t + (1 - p) * (1 - t)
        loss = ce * ((1 - p_t) ** gamma)
        if alpha >= 0:
            loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
        return jnp.mean(loss)

    def huber_loss(x, t, delta=1.0):
        d = jnp.abs(f32(x) - f32(t))
        quad = jnp.minimum(d, delta)
        return jnp.mean(0.5 * quad * quad + delta * (d - quad))

    def center_loss(x, labels, centers):
        diff = f32(x) - centers[labels]
        return 0.5 * jnp.mean(jnp.sum(diff * diff, axis=1))

    def center_update(x, labels, centers, alpha=0.5):
        diff = x - centers[labels]
        counts = jnp.bincount(labels, length=centers.shape[0]).astype(x.dtype)
        step = jnp.zeros_like(centers).at[labels].add(diff)
        return centers + (alpha / (1 + counts))[:, None] * step

    def _dist(u):
        return jnp.sqrt(jnp.sum(u * u, axis=-1))

    def triplet_margin_loss(a, p, n, margin=1.0, eps=1e-6):
        z = margin + _dist(a - p + eps) - _dist(a - n + eps)  # torch's pairwise_distance
        return jnp.mean(jnp.maximum(z, 0.0))

    def batch_triplet_loss(e, labels, margin=1.0):
        g = e @ e.T
        sq = jnp.sum(e * e, axis=1)
        d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2 * g, 0.0)
        pos_d2 = d2 > 0
        d = jnp.where(pos_d2, jnp.sqrt(jnp.where(pos_d2, d2, 1.0)), 0.0)  # gradient 0, not NaN, at 0
        same = labels[:, None] == labels[None, :]
        pos_mask = same & ~jnp.eye(e.shape[0], dtype=bool)
        hardest_pos = jnp.max(jnp.where(pos_mask, d, -1.0), axis=1)
        hardest_neg = jnp.min(jnp.where(same, jnp.inf, d), axis=1)
        valid = pos_mask.any(axis=1) & (~same).any(axis=1)
        terms = jnp.where(valid, jnp.maximum(hardest_pos - hardest_neg + margin, 0.0), 0.0)
        return jnp.sum(terms) / jnp.maximum(jnp.sum(valid), 1)

    return dict(softmax_cross_entropy=softmax_cross_entropy, focal_loss=focal_loss,
                sigmoid_focal_loss=sigmoid_focal_loss, huber_loss=huber_loss, center_loss=center_loss,
                center_update=center_update, triplet_margin_loss=triplet_margin_loss,
                batch_triplet_loss=batch_triplet_loss)


_jax_cache = {}


def _prepare_jax(loss, args, kwargs, device):
    jax = jax_module()
    if "fns" not in _jax_cache:
        _jax_cache["fns"] = _jax_losses(jax)
    fns = _jax_cache["fns"]
    try:
        dev = jax.devices("gpu" if device == "cuda" else "cpu")[0]
    except Exception as exc:
        raise Unavailable(f"jax has no {device} device ({type(exc).__name__})") from None

    def put(a):
        if a.dtype.kind in "iu":
            a = a.astype(np.int32)  # jax's default integer width (x64 off)
        return jax.device_put(a, dev)

    if loss == "center_loss":
        kw = dict(kwargs)
        alpha = kw.pop("alpha", 0.5)
        vg = jax.value_and_grad(functools.partial(fns["center_loss"], **kw))
        update = functools.partial(fns["center_update"], alpha=alpha)

        @jax.jit
        def step(x, labels, centers):
            return vg(x, labels, centers), update(x, labels, centers)

        x, labels, centers = (put(a) for a in args)
        state = {"centers": centers}

        def run():
            (value, g), state["centers"] = step(x, labels, state["centers"])
            jax.block_until_ready((value, g, state["centers"]))
            return value, (g,)

        def result(out):
            return float(out[0]), tuple(np.asarray(g) for g in out[1]), np.array(state["centers"])
    else:
        argnums = (0, 1, 2) if loss == "triplet_margin_loss" else 0
        f = jax.jit(jax.value_and_grad(functools.partial(fns[loss], **kwargs), argnums=argnums))
        xs = [put(a) for a in args]

        def run():
            value, g = f(*xs)
            jax.block_until_ready((value, g))
            return value, (g if isinstance(g, tuple) else (g,))

        def result(out):
            return float(out[0]), tuple(np.asarray(g) for g in out[1]), None
    return Prepared(run, result, threads=None)


# ------------------------------------------------------------------- entry point


def prepare(name, loss, args, kwargs=None, device="cpu"):
    """Competitor ``name`` (one of ``NAMES``) for fastloss function ``loss`` on the NumPy
    arrays ``args`` (fastloss's positional arguments; for the center loss the centers
    array is updated in place on the CPU with torch, kept inside with JAX), with the
    hyper-parameters ``kwargs``, on ``device`` (``"cpu"`` or ``"cuda"``)."""
    if loss not in LOSS_NAMES:
        raise ValueError(f"no competitor for {loss!r}; expected one of {LOSS_NAMES}")
    kwargs = dict(kwargs or {})
    if name in ("torch", "torch-compile"):
        return _prepare_torch(loss, args, kwargs, device, compiled=name == "torch-compile")
    if name == "jax":
        return _prepare_jax(loss, args, kwargs, device)
    raise ValueError(f"unknown competitor {name!r}; expected one of {NAMES}")
