"""What a user would otherwise run: loss AND gradient with PyTorch and JAX.

Used by ``python -m fastloss bench`` (``fastloss.tools.bench``) and by the pytest-benchmark
suite in ``bench/``; it imports torch and jax only inside its functions (``import fastloss``
never imports either).

Each competitor is the loss's formula of ``fastloss.tools.references`` (through torch's own
``F.cross_entropy``, ``F.huber_loss``, ``F.triplet_margin_loss`` where PyTorch has the loss)
under the library's autograd (``NAMES``):

* ``"torch"``: torch eager forward, then ``torch.autograd.grad`` w.r.t. the first argument
  (the three of them for the triplet margin loss);
* ``"torch-compile"``: the same with the forward through ``torch.compile`` (``dynamic=False``:
  compiled for each shape, the best case for a fixed-shape loop); for the center loss the
  update is compiled too;
* ``"jax"``: ``jax.jit(jax.value_and_grad(loss_fn))`` (``argnums=(0, 1, 2)`` for the triplet
  margin loss); for the center loss the jitted function also returns the updated centers (JAX
  arrays are immutable), which the next call uses.

Every one computes what fastloss computes with the benchmarks' hyper-parameters,
``reduction="mean"``.  float16 inputs are cast to float32 inside the loss function, and the
gradient comes back in float16: fastloss's own float16 contract, as a mixed-precision user
writes it.

``prepare(name, loss, args, kwargs, device)`` returns a ``Prepared``: ``run()`` does one call
(and waits for the device: timing ``run`` is honest), and ``result(out)`` turns what ``run``
returned into NumPy ``(loss, grads, centers)`` for the agreement check.  It raises ``Missing``
when the library is not installed and ``Unavailable`` when it cannot run here (no GPU for it;
a compile that fails on first call is the caller's to catch).
"""
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import references, registry

NAMES = registry.COMPETITORS


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


def _formulas(ns, info, kwargs):
    """The loss (mean) and, where the loss updates an argument, the update, on float16
    inputs computed in float32."""
    def loss(*arrays):
        return info.reference(ns, *(ns.promote_half(a) for a in arrays), reduction="mean", **kwargs)

    def update(*arrays):
        return info.update(ns, *(ns.promote_half(a) for a in arrays), **kwargs)
    return loss, update


# ------------------------------------------------------------------- torch

_torch_state = {}


def _torch_namespace(torch):
    if "ns" not in _torch_state:
        _torch_state["ns"] = references.torch_namespace(torch)
        try:  # one static graph per shape and dtype: more than dynamo's default 8 per function
            cfg = torch._dynamo.config
            for key in ("recompile_limit", "cache_size_limit"):
                if hasattr(cfg, key):
                    setattr(cfg, key, max(getattr(cfg, key), 64))
        except Exception:  # pragma: no cover - depends on the torch version
            pass
    return _torch_state["ns"]


def _prepare_torch(info, args, kwargs, device, compiled):
    torch = torch_module()
    if device == "cuda" and not torch.cuda.is_available():
        raise Unavailable("torch has no CUDA device")
    sync = torch.cuda.synchronize if device == "cuda" else None
    loss, update = _formulas(_torch_namespace(torch), info, kwargs)
    if compiled:
        loss = torch.compile(loss, dynamic=False)
        update = torch.compile(update, dynamic=False)

    def tensor(a, grad=False):  # on the CPU, shares the caller's array (the centers: updated in place)
        t = torch.from_numpy(a) if device == "cpu" else torch.as_tensor(a, device=device)
        return t.requires_grad_(True) if grad else t

    ts = [tensor(a, grad=i < info.n_grad) for i, a in enumerate(args)]
    leaves = ts[:info.n_grad]
    updated = None if info.updates is None else ts[info.updates]

    def run():
        value = loss(*ts)
        grads = torch.autograd.grad(value, leaves)
        if updated is not None:
            with torch.no_grad():
                updated.copy_(update(*(t.detach() for t in ts)))
        if sync:
            sync()
        return value, grads

    def host(t):
        return t.detach().cpu().numpy()

    def result(out):
        return out[0].item(), tuple(host(g) for g in out[1]), None if updated is None else host(updated).copy()
    return Prepared(run, result, threads=torch.get_num_threads())


# ------------------------------------------------------------------- jax


def _prepare_jax(info, args, kwargs, device):
    jax = jax_module()
    try:
        dev = jax.devices("gpu" if device == "cuda" else "cpu")[0]
    except Exception as exc:
        raise Unavailable(f"jax has no {device} device ({type(exc).__name__})") from None
    loss, update = _formulas(references.jax_namespace(jax), info, kwargs)
    argnums = tuple(range(info.n_grad)) if info.n_grad > 1 else 0
    value_and_grad = jax.value_and_grad(loss, argnums=argnums)
    k = info.updates

    @jax.jit
    def step(*xs):  # the loss, its gradient(s) and, where there is one, the updated argument
        return value_and_grad(*xs), (None if k is None else update(*xs))

    def put(a):
        if a.dtype.kind in "iu":
            a = a.astype(np.int32)  # jax's default integer width (x64 off)
        return jax.device_put(a, dev)

    xs = [put(a) for a in args]

    def run():
        (value, g), new = step(*xs)
        if k is not None:
            xs[k] = new
        jax.block_until_ready((value, g, new))
        return value, (g if isinstance(g, tuple) else (g,))

    def result(out):
        return float(out[0]), tuple(np.asarray(g) for g in out[1]), None if k is None else np.array(xs[k])
    return Prepared(run, result, threads=None)


# ------------------------------------------------------------------- entry point


def prepare(name, loss, args, kwargs=None, device="cpu"):
    """Competitor ``name`` (one of ``NAMES``) for fastloss function ``loss`` on the NumPy
    arrays ``args`` (fastloss's positional arguments; an argument the loss updates, the
    centers, is updated in place on the CPU with torch, kept inside with JAX), with the
    hyper-parameters ``kwargs``, on ``device`` (``"cpu"`` or ``"cuda"``)."""
    info = registry.BY_NAME.get(loss)
    if info is None or info.name != loss or name not in info.competitors:
        raise ValueError(f"no competitor {name!r} for {loss!r}; expected one of {NAMES} and one of "
                         f"{tuple(i.name for i in registry.LOSSES)}")
    kwargs = dict(kwargs or {})
    if name in ("torch", "torch-compile"):
        return _prepare_torch(info, args, kwargs, device, compiled=name == "torch-compile")
    return _prepare_jax(info, args, kwargs, device)
