"""Triplet losses: fastloss against NumPy, torch and a ceiling (see bench_losses.py, README.md).

Two benchmark groups, float32, ``reduction="mean"``, timed in the same run:

* ``triplet-65536x128``: ``triplet_margin_loss(anchor, positive, negative)`` (euclidean,
  margin 1, eps 1e-6) on three ``(65536, 128)`` arrays.  Ceiling (role ``copy``): read the
  three inputs and write three gradient-sized arrays, ``np.copyto`` of each into a
  preallocated array, the least a one-pass kernel must move.
* ``batch_hard-2048x128``: ``batch_triplet_loss(embeddings, labels, mining="hard")``,
  2048 embeddings of 128 floats, 64 classes of 32.  Ceiling (role ``copy``, entry named
  ``gemm``): one Gram matrix ``E @ E.T`` by BLAS's gemm on a transposed copy made
  before the timing, the least time that product takes (fastloss forms it as two row
  blocks against ``E.T``, also gemm).  The entry ``matmul`` times NumPy's literal
  ``E @ E.T``, which NumPy hands to syrk, about twice slower here.

Entries per group: ``fastloss``, ``fastloss-grad_out`` (preallocated gradients), ``numpy``
(vectorized NumPy below), ``torch`` (eager forward + ``torch.autograd.grad``),
``torch-compile`` (skipped with ``--bench-no-compile``) and the ceiling.  Before an entry is
timed its loss and gradients are checked against fastloss's (fastloss's against NumPy's),
float32 tolerance; that call is also the warm-up.
"""
import numpy as np
import pytest

import fastloss
from fastloss import _numpy_losses as npl

from bench_losses import _bench, compiled_or_skip, torch_or_skip  # noqa: E402  (same timing policy as the other losses)

RTOL = 1e-4
TRIPLET = ("triplet-65536x128", 65536, 128)
BATCH = ("batch_hard-2048x128", 2048, 128, 64)
ROLES = ("fastloss", "fastloss-grad_out", "numpy", "copy", "matmul", "torch", "torch-compile")
MARGIN = 1.0
EPS = 1e-6

_current = {}


def _data(group):
    if _current.get("group") != group:
        _current.clear()
        rng = np.random.default_rng(0)
        if group == TRIPLET[0]:
            _, n, d = TRIPLET
            a = rng.standard_normal((n, d), dtype=np.float32)
            # positives near the anchors, negatives a little farther: about half of the rows active
            p = a + 0.12 * rng.standard_normal((n, d), dtype=np.float32)
            q = a + 0.21 * rng.standard_normal((n, d), dtype=np.float32)
            _current.update(group=group, inputs=(a, p, q))
        else:
            _, n, d, classes = BATCH
            centers = rng.standard_normal((classes, d), dtype=np.float32)
            labels = np.repeat(np.arange(classes), n // classes)
            rng.shuffle(labels)
            e = 0.12 * centers[labels] + 0.1 * rng.standard_normal((n, d), dtype=np.float32)
            _current.update(group=group, inputs=(e, labels.astype(np.int64)))
    return _current


# ---------------------------------------------------------------- NumPy versions


def numpy_triplet(a, p, n, margin=MARGIN, eps=EPS):
    """torch.nn.functional.triplet_margin_loss (p=2, mean) and its three gradients."""
    u = a - p + np.float32(eps)
    v = a - n + np.float32(eps)
    d_ap = np.sqrt(np.einsum("ij,ij->i", u, u))
    d_an = np.sqrt(np.einsum("ij,ij->i", v, v))
    z = margin + d_ap - d_an
    loss = float(np.mean(np.maximum(z, 0.0), dtype=np.float64))
    c = (z >= 0).astype(np.float32) / np.float32(a.shape[0])
    cp = np.divide(c, d_ap, out=np.zeros_like(c), where=d_ap > 0)[:, None]
    cn = np.divide(c, d_an, out=np.zeros_like(c), where=d_an > 0)[:, None]
    u *= cp
    v *= cn
    return loss, (u - v, -u, v)


def numpy_batch_hard(e, labels, margin=MARGIN):
    """Hermans et al.'s batch-hard loss from one Gram matrix; gradient by the selected pairs."""
    n = e.shape[0]
    g = e @ np.ascontiguousarray(e.T)
    sq = np.diagonal(g).copy()
    d2 = sq[:, None] + sq[None, :] - 2 * g
    np.maximum(d2, 0, out=d2)
    same = labels[:, None] == labels[None, :]
    rows = np.arange(n)
    pos = np.where(same, d2, -1.0)
    pos[rows, rows] = -1.0
    p = np.argmax(pos, axis=1)
    neg = np.where(same, np.inf, d2)
    q = np.argmin(neg, axis=1)
    valid = (pos[rows, p] >= 0) & np.isfinite(neg[rows, q])
    z = np.sqrt(d2[rows, p]) - np.sqrt(d2[rows, q]) + margin
    terms = np.where(valid, np.maximum(z, 0.0), 0.0)
    count = np.count_nonzero(valid)
    loss = float(terms.sum(dtype=np.float64) / count) if count else float("nan")
    c = np.where(valid & (z > 0), 1.0 / max(count, 1), 0.0).astype(np.float32)[:, None]
    grad = np.zeros_like(e)
    for other, sign in ((p, 1.0), (q, -1.0)):
        diff = e - e[other]
        norm = np.linalg.norm(diff, axis=1, keepdims=True)
        w = sign * np.divide(c, norm, out=np.zeros_like(norm), where=norm > 0) * diff
        grad += w
        np.add.at(grad, other, -w)
    return loss, grad


# ---------------------------------------------------------------- torch versions


def _torch_fns():
    import torch

    def triplet(a, p, n):
        return torch.nn.functional.triplet_margin_loss(a, p, n, margin=MARGIN, eps=EPS)

    def batch_hard(x, y):
        d = torch.cdist(x, x)  # the matmul path for N > 25, as fastloss's Gram matrix
        same = y[:, None] == y[None, :]
        eye = torch.eye(x.shape[0], dtype=torch.bool)
        hardest_pos = torch.where(same & ~eye, d, torch.full_like(d, -1.0)).amax(dim=1)
        hardest_neg = torch.where(~same, d, torch.full_like(d, float("inf"))).amin(dim=1)
        return torch.relu(hardest_pos - hardest_neg + MARGIN).mean()

    return triplet, batch_hard


_torch_eager = []


def _torch(config, compiled):
    torch = torch_or_skip(config, compiled)
    if not _torch_eager:
        _torch_eager.extend(_torch_fns())
    if compiled:
        return torch, tuple(compiled_or_skip(torch, f) for f in _torch_eager)
    return torch, tuple(_torch_eager)


# ---------------------------------------------------------------- checks


def _flat(grads):
    """One gradient array, or a tuple of them, as one flat array."""
    if not isinstance(grads, tuple):
        grads = (grads,)
    return np.concatenate([np.asarray(g).ravel() for g in grads])


def _reference(group):
    d = _data(group)
    if "fl_ref" not in d:
        if group == TRIPLET[0]:
            res = fastloss.triplet_margin_loss(*d["inputs"], margin=MARGIN, eps=EPS)
        else:
            res = fastloss.batch_triplet_loss(*d["inputs"], margin=MARGIN)
        d["fl_ref"] = (float(res.loss), _flat(res.grad).copy())
    return d["fl_ref"]


def _numpy_ref(group):
    d = _data(group)
    if "np_ref" not in d:
        fn = numpy_triplet if group == TRIPLET[0] else numpy_batch_hard
        loss, grad = fn(*d["inputs"])
        d["np_ref"] = (loss, _flat(grad))
    return d["np_ref"]


def _check(role, group, loss, grads, against="fastloss"):
    ref_loss, ref_grad = _numpy_ref(group) if against == "numpy" else _reference(group)
    loss_err, grad_err, ok = npl.agreement(loss, _flat(grads), ref_loss, ref_grad, rtol=RTOL)
    assert ok, (f"{group}: {role} disagrees with {against}: |dloss|={loss_err:.3g} "
                f"(loss {float(loss):.7g} vs {ref_loss:.7g}), max|dgrad|={grad_err:.3g}")


# ---------------------------------------------------------------- the suite


def _params():
    for group in (TRIPLET[0], BATCH[0]):
        for role in ROLES:
            if role == "matmul" and group != BATCH[0]:
                continue
            name = "gemm" if (group == BATCH[0] and role == "copy") else role
            yield pytest.param(group, role, id=f"{group}-{name}")


@pytest.mark.parametrize("group, role", list(_params()))
def test_triplet(benchmark, request, group, role):
    d = _data(group)
    inputs = d["inputs"]
    triplet = group == TRIPLET[0]
    floats = inputs if triplet else inputs[:1]
    nbytes = 2 * sum(x.nbytes for x in floats)  # inputs read + gradients written
    benchmark.group = group
    benchmark.extra_info.update(role=role, dtype="float32", bytes_moved=nbytes,
                                shape="x".join(map(str, inputs[0].shape)))

    if role in ("fastloss", "fastloss-grad_out"):
        if triplet:
            outs = tuple(np.empty_like(x) for x in inputs)

            def call(**kw):
                return fastloss.triplet_margin_loss(*inputs, margin=MARGIN, eps=EPS, **kw)
        else:
            outs = np.empty_like(inputs[0])

            def call(**kw):
                return fastloss.batch_triplet_loss(*inputs, margin=MARGIN, **kw)
        if role == "fastloss":
            def run():
                return call()
            res = run()
            _check(role, group, res.loss, res.grad, against="numpy")
        else:
            def run():
                return call(grad_out=outs)
            res = run()
            _check(role, group, res.loss, outs)
        _bench(benchmark, request.config, run)

    elif role == "numpy":
        fn = numpy_triplet if triplet else numpy_batch_hard

        def run():
            return fn(*inputs)
        loss, grads = run()
        _check(role, group, loss, grads)
        _bench(benchmark, request.config, run)

    elif role == "copy":
        if triplet:
            outs = tuple(np.empty_like(x) for x in inputs)

            def run():
                for o, x in zip(outs, inputs):
                    np.copyto(o, x)
        else:
            e = inputs[0]
            benchmark.extra_info["bytes_moved"] = e.nbytes + e.shape[0] ** 2 * 4

            et = np.ascontiguousarray(e.T)

            def run():
                return e @ et
        run()
        _bench(benchmark, request.config, run)

    elif role == "matmul":
        e = inputs[0]

        def run():
            return e @ e.T
        run()
        _bench(benchmark, request.config, run)

    elif role in ("torch", "torch-compile"):
        torch, (t_triplet, t_batch) = _torch(request.config, compiled=role == "torch-compile")
        benchmark.extra_info["torch_threads"] = torch.get_num_threads()
        if triplet:
            ts = [torch.from_numpy(x).requires_grad_(True) for x in inputs]

            def run():
                loss = t_triplet(*ts)
                return loss, torch.autograd.grad(loss, ts)
        else:
            x = torch.from_numpy(inputs[0]).requires_grad_(True)
            y = torch.from_numpy(inputs[1])

            def run():
                loss = t_batch(x, y)
                return loss, torch.autograd.grad(loss, x)
        try:
            loss, grads = run()
        except Exception as exc:
            if role == "torch-compile":
                pytest.skip(f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            raise
        _check(role, group, loss.item(), tuple(g.numpy() for g in grads))
        _bench(benchmark, request.config, run)

    else:  # pragma: no cover
        raise AssertionError(role)
