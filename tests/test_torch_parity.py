"""Value and gradient parity with PyTorch (autograd) for the losses that mirror torch.

The reference side is the tools' reference in torch (``fastloss.tools.references``, the
one that ``python -m fastloss check --framework torch`` runs): ``torch.nn.functional``
where PyTorch has the loss, and, for the rest (sample_weight and z-loss, which torch has
not; the focal losses; torchvision's sigmoid focal loss, not installed here), the
formula in torch ops as SPEC.md defines it.  The naive references are also checked
against torch here, so a disagreement can be pinned on the right side.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastloss as fl  # noqa: E402
import naive  # noqa: E402
from fastloss.tools import references  # noqa: E402

NS = references.torch_namespace(torch)
DTYPES = {np.float32: torch.float32, np.float64: torch.float64}
TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-10, atol=1e-12)}


def _close(got, want, dtype, what):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = max(1e-30, float(np.max(np.abs(want), initial=0.0)))
    t = TOL[dtype]
    if what.endswith("loss"):
        scale = max(scale, 1.0)
    np.testing.assert_allclose(got, want, rtol=t["rtol"], atol=t["atol"] * scale, err_msg=what)


def _reference(formula, args, reduction="mean", **kwargs):
    """``(loss, gradient w.r.t. the first argument)`` of the torch reference ``formula``;
    NumPy arguments become tensors, floating ones in the first argument's dtype."""
    dtype = DTYPES[args[0].dtype.type]

    def tensor(a):
        if not isinstance(a, np.ndarray):
            return a
        t = torch.tensor(a)
        return t.to(dtype) if t.is_floating_point() else t

    xt = tensor(args[0]).requires_grad_(True)
    loss = formula(NS, xt, *map(tensor, args[1:]), reduction=reduction,
                   **{k: tensor(v) for k, v in kwargs.items()})
    loss.sum().backward()
    return loss.detach().numpy(), xt.grad.numpy()


# ------------------------------------------------------------------ CE parity

CE_CASES = {
    "plain": dict(),
    "weight": dict(weight=True),
    "ignore": dict(ignore=True),
    "smoothing": dict(label_smoothing=0.1),
    "smoothing_weight_ignore": dict(weight=True, ignore=True, label_smoothing=0.2),
    "smoothing_weight_ignore_custom": dict(weight=True, ignore=True, ignore_index=1, label_smoothing=0.2),
    "sample_weight_z_loss": dict(weight=True, ignore=True, sample_weight=True, z_loss=0.01),
    "softcap_everything": dict(weight=True, ignore=True, sample_weight=True, label_smoothing=0.1, z_loss=0.01,
                               softcap=3.0),
    "prob": dict(prob=True),
    "prob_weight_smoothing": dict(prob=True, weight=True, label_smoothing=0.15),
    "prob_everything": dict(prob=True, weight=True, sample_weight=True, label_smoothing=0.1, z_loss=0.02,
                            softcap=5.0),
}


def _ce_inputs(rng, case, dtype, batch=(12,), C=6):
    o = dict(CE_CASES[case])
    prob = o.pop("prob", False)
    ignore = o.pop("ignore", False)
    x = (rng.normal(size=batch + (C,)) * 3).astype(dtype)
    if prob:
        y = rng.dirichlet(np.ones(C), size=batch).astype(dtype)
    else:
        y = rng.integers(0, C, size=batch)
        if ignore:
            y[rng.random(batch) < 0.3] = o.get("ignore_index", -100)
    if o.pop("weight", False):
        o["weight"] = rng.uniform(0.2, 2, size=C).astype(dtype)
    if o.pop("sample_weight", False):
        o["sample_weight"] = rng.uniform(0, 2, size=batch).astype(dtype)
    return x, y, o


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(CE_CASES))
def test_cross_entropy_parity(rng, case, reduction, dtype):
    x, y, o = _ce_inputs(rng, case, dtype)
    want_loss, want_grad = _reference(references.softmax_cross_entropy, (x, y), reduction, **o)
    res = fl.softmax_cross_entropy(x, y, reduction=reduction, **o)
    _close(res.loss, want_loss, dtype, "loss")
    assert res.grad.dtype == np.dtype(dtype)
    _close(res.grad, want_grad, dtype, "grad")


@pytest.mark.parametrize("case", ["smoothing_weight_ignore", "softcap_everything", "prob_everything"])
def test_cross_entropy_three_dimensional_batch_parity(rng, case):
    x, y, o = _ce_inputs(rng, case, np.float64, batch=(2, 3))
    want_loss, want_grad = _reference(references.softmax_cross_entropy, (x, y), "mean", **o)
    res = fl.softmax_cross_entropy(x, y, **o)
    _close(res.loss, want_loss, np.float64, "loss")
    _close(res.grad, want_grad, np.float64, "grad")


@pytest.mark.parametrize("case", list(CE_CASES))
def test_naive_cross_entropy_agrees_with_torch(rng, case):
    # guards the reference itself
    x, y, o = _ce_inputs(rng, case, np.float64)
    for reduction in ["mean", "none"]:
        want_loss, want_grad = _reference(references.softmax_cross_entropy, (x, y), reduction, **o)
        loss, grad = naive.softmax_cross_entropy(x, y, reduction=reduction, **o)
        _close(loss, want_loss, np.float64, "loss")
        _close(grad, want_grad, np.float64, "grad")


# ------------------------------------------------------------------ Huber


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("delta", [1.0, 0.4, 3.0])
def test_huber_parity(rng, delta, reduction, dtype):
    x = (rng.normal(size=(10, 7)) * 2).astype(dtype)
    t = (rng.normal(size=(10, 7)) * 2).astype(dtype)
    want_loss, want_grad = _reference(references.huber_loss, (x, t), reduction, delta=delta)
    res = fl.huber_loss(x, t, delta=delta, reduction=reduction)
    _close(res.loss, want_loss, dtype, "loss")
    _close(res.grad, want_grad, dtype, "grad")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_huber_sample_weight_parity(rng, dtype):
    x = (rng.normal(size=(10, 7)) * 2).astype(dtype)
    t = (rng.normal(size=(10, 7)) * 2).astype(dtype)
    sw = rng.uniform(size=(10, 1)).astype(dtype)
    want_loss, want_grad = _reference(references.huber_loss, (x, t), "mean", delta=0.7, sample_weight=sw)
    res = fl.huber_loss(x, t, delta=0.7, sample_weight=sw)
    _close(res.loss, want_loss, dtype, "loss")
    _close(res.grad, want_grad, dtype, "grad")


# ------------------------------------------------------------ sigmoid focal


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.25, 0.0), (0.6, 0.5), (0.25, 3.0)])
def test_sigmoid_focal_parity(rng, alpha, gamma, reduction, dtype):
    x = (rng.normal(size=(8, 9)) * 3).astype(dtype)
    t = (rng.random((8, 9)) < 0.3).astype(dtype)
    want_loss, want_grad = _reference(references.sigmoid_focal_loss, (x, t), reduction, alpha=alpha, gamma=gamma)
    res = fl.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction=reduction)
    _close(res.loss, want_loss, dtype, "loss")
    _close(res.grad, want_grad, dtype, "grad")
    loss, grad = naive.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction=reduction)
    _close(loss, want_loss, dtype, "naive loss")
    _close(grad, want_grad, dtype, "naive grad")


def test_sigmoid_focal_finite_at_saturation():
    # torchvision's form gives NaN gradients here for gamma < 1; the loss and gradient are ~0
    x = np.array([1e4, -1e4, 200.0, -200.0])
    t = np.array([1.0, 0.0, 1.0, 0.0])
    res = fl.sigmoid_focal_loss(x, t, gamma=0.5, reduction="sum")
    assert np.all(np.isfinite(res.grad))
    assert abs(float(res.loss)) <= 1e-40
    np.testing.assert_allclose(res.grad, 0.0, atol=1e-40)


# ---------------------------------------------------------------- softmax focal


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("alpha", [None, "array"])
def test_focal_parity(rng, gamma, alpha, dtype):
    x = (rng.normal(size=(11, 5)) * 2).astype(dtype)
    y = rng.integers(0, 5, size=11)
    a = None if alpha is None else rng.uniform(0.2, 1.0, size=5).astype(dtype)
    for reduction in ["mean", "none"]:
        want_loss, want_grad = _reference(references.focal_loss, (x, y), reduction, gamma=gamma, alpha=a)
        res = fl.focal_loss(x, y, gamma=gamma, alpha=a, reduction=reduction)
        _close(res.loss, want_loss, dtype, "loss")
        _close(res.grad, want_grad, dtype, "grad")
