"""Property tests: random shapes, values and options (hypothesis).

``test_sum_equals_none_summed`` runs for every loss of the registry
(``fastloss.tools.registry.LOSSES``); ``SUM_NONE_CALLS`` holds the calls it makes where
they are built here (drawn shapes and scales, ignored rows, sample weights) rather than
from the registry's inputs and check options.
"""
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastloss as fl  # noqa: E402
import naive  # noqa: E402
from fastloss.tools.registry import LOSSES  # noqa: E402
from naive import check_result  # noqa: E402

SETTINGS = settings(max_examples=30, deadline=None)

batch_shapes = st.one_of(
    st.tuples(st.integers(0, 12)),
    st.tuples(st.integers(1, 4), st.integers(1, 4)),
)
classes = st.integers(1, 9)
seeds = st.integers(0, 2**32 - 1)
scales = st.sampled_from([0.1, 1.0, 5.0, 30.0])


def _classification(seed, batch, C, scale, *, prob, ignore, sample_weight, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=batch + (C,)) * scale).astype(dtype)
    if prob:
        t = rng.dirichlet(np.ones(C), size=batch).astype(dtype)
    else:
        t = rng.integers(0, C, size=batch)
        if ignore:
            t[rng.random(batch) < 0.3] = -100
    kw = {}
    if sample_weight:
        kw["sample_weight"] = rng.uniform(0.1, 2.0, size=batch).astype(dtype)
    return rng, x, t, kw


@SETTINGS
@given(seed=seeds, batch=batch_shapes, C=classes, scale=scales, prob=st.booleans(), ignore=st.booleans(),
       sample_weight=st.booleans(), reduction=st.sampled_from(["mean", "sum", "none"]))
def test_focal_gamma_zero_is_cross_entropy(seed, batch, C, scale, prob, ignore, sample_weight, reduction):
    _, x, t, kw = _classification(seed, batch, C, scale, prob=prob, ignore=ignore, sample_weight=sample_weight)
    a = fl.focal_loss(x, t, gamma=0.0, alpha=None, reduction=reduction, **kw)
    b = fl.softmax_cross_entropy(x, t, reduction=reduction, **kw)
    np.testing.assert_allclose(np.asarray(a.loss), np.asarray(b.loss), rtol=1e-10, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(a.grad, b.grad, rtol=1e-9, atol=1e-13)


def _sum_none_sigmoid_focal(rng, x, t, kw, scale):
    tt = (rng.random(x.shape) < 0.5).astype(x.dtype)
    return lambda r: fl.sigmoid_focal_loss(x, tt, reduction=r)


def _sum_none_huber(rng, x, t, kw, scale):
    tt = rng.normal(size=x.shape) * scale
    return lambda r: fl.huber_loss(x, tt, reduction=r, sample_weight=kw["sample_weight"][..., None])


#: per loss, the call of ``test_sum_equals_none_summed`` on drawn logits ``x`` (of size
#: ``scale``), labels ``t`` (some ignored) and sample weights; a loss not listed runs its
#: registry inputs with one of its check options
SUM_NONE_CALLS = {
    "softmax_cross_entropy": lambda rng, x, t, kw, scale: lambda r: fl.softmax_cross_entropy(
        x, t, reduction=r, label_smoothing=0.1, **kw),
    "focal_loss": lambda rng, x, t, kw, scale: lambda r: fl.focal_loss(x, t, reduction=r, gamma=1.5,
                                                                       **kw),
    "sigmoid_focal_loss": _sum_none_sigmoid_focal,
    "huber_loss": _sum_none_huber,
}


def _registry_call(info, seed, which):
    """``info``'s registry inputs with its check option number ``which`` (modulo their
    count); an argument updated in place gets a fresh copy per call."""
    rng = np.random.default_rng(seed)
    args, kw = info.case(rng, np.float64, info.options[which % len(info.options)])

    def call(reduction):
        a = list(args)
        if info.updates is not None:
            a[info.updates] = a[info.updates].copy()
        return info.function(*a, reduction=reduction, **kw)
    return call


def _grads(g):
    return g if isinstance(g, tuple) else (g,)


@pytest.mark.parametrize("info", LOSSES, ids=lambda info: info.short)
@SETTINGS
@given(seed=seeds, batch=batch_shapes, C=classes, scale=scales, prob=st.booleans(),
       which=st.integers(0, 63))
def test_sum_equals_none_summed(info, seed, batch, C, scale, prob, which):
    if info.name in SUM_NONE_CALLS:
        rng, x, t, kw = _classification(seed, batch, C, scale, prob=prob, ignore=True,
                                        sample_weight=True)
        f = SUM_NONE_CALLS[info.name](rng, x, t, kw, scale)
    else:
        f = _registry_call(info, seed, which)
    s = f("sum")
    n = f("none")
    assert np.shape(s.loss) == ()
    np.testing.assert_allclose(float(s.loss), float(np.sum(n.loss)), rtol=1e-10, atol=1e-12)
    for gs, gn in zip(_grads(s.grad), _grads(n.grad)):
        np.testing.assert_allclose(gs, gn, rtol=1e-12, atol=1e-15)


@SETTINGS
@given(seed=seeds, batch=batch_shapes, C=classes, scale=scales, prob=st.booleans(), ignore=st.booleans(),
       sample_weight=st.booleans(), weight=st.booleans(),
       label_smoothing=st.sampled_from([0.0, 0.05, 0.5, 1.0]), z_loss=st.sampled_from([0.0, 1e-3, 0.2]),
       softcap=st.sampled_from([None, 1.0, 15.0]), reduction=st.sampled_from(["mean", "sum", "none"]),
       dtype=st.sampled_from([np.float64, np.float32]))
def test_cross_entropy_matches_naive(seed, batch, C, scale, prob, ignore, sample_weight, weight, label_smoothing,
                                     z_loss, softcap, reduction, dtype):
    if dtype == np.float32 and softcap is not None:
        # float32 cannot resolve 1 - tanh(x/softcap)**2 deep in saturation (relative error
        # eps / (1 - tanh**2), the same in torch): keep the logits where the cap is not flat
        scale = min(scale, softcap)
    rng, x, t, kw = _classification(seed, batch, C, scale, prob=prob, ignore=ignore, sample_weight=sample_weight,
                                    dtype=dtype)
    if weight:
        kw["weight"] = rng.uniform(0.1, 3.0, size=C).astype(dtype)
    opts = dict(label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, reduction=reduction)
    res = fl.softmax_cross_entropy(x, t, **kw, **opts)
    want = naive.softmax_cross_entropy(x, t, **kw, **opts)
    if dtype == np.float64:
        check_result(res, *want, dtype)
        return
    # float32: round-off is relative to the O(1) terms of each row (p_j and the target mass,
    # times the row's weight), which cancel where p is near the target (always when C == 1),
    # and grows with the size of the logits
    n = int(np.prod(batch))
    sw = kw.get("sample_weight", np.ones(batch)).reshape(n).astype(np.float64)
    w = kw.get("weight", np.ones(C)).astype(np.float64)
    if prob:
        row = sw * w.max()
        denom = sw.sum()
    else:
        keep = t.reshape(n) != -100
        y = np.where(keep, t.reshape(n), 0)
        row = sw * w.max() * keep
        denom = np.sum(sw * w[y] * keep)
    lse_max = scale * 5 + np.log(C)
    grad_scale = float(row.max(initial=0.0)) * (1 + 2 * z_loss * lse_max)
    if reduction == "mean" and denom > 0:
        grad_scale /= denom
    grad_scale = max(grad_scale, float(np.abs(want[1]).max(initial=0.0)), 1e-30)
    check_result(res, *want, dtype, loss_scale=max(1.0, scale) * (1 + 10 * z_loss * scale), grad_scale=grad_scale)


@SETTINGS
@given(seed=seeds, batch=batch_shapes, C=classes, scale=scales, prob=st.booleans(), ignore=st.booleans(),
       sample_weight=st.booleans(), gamma=st.sampled_from([0.0, 0.3, 1.0, 2.0, 4.5]),
       alpha=st.sampled_from(["none", "scalar", "array"]), reduction=st.sampled_from(["mean", "sum", "none"]))
def test_focal_matches_naive(seed, batch, C, scale, prob, ignore, sample_weight, gamma, alpha, reduction):
    rng, x, t, kw = _classification(seed, batch, C, scale, prob=prob, ignore=ignore, sample_weight=sample_weight)
    a = None if alpha == "none" else 0.4 if alpha == "scalar" else rng.uniform(0.1, 1.0, size=C)
    res = fl.focal_loss(x, t, gamma=gamma, alpha=a, reduction=reduction, **kw)
    want = naive.focal_loss(x, t, gamma=gamma, alpha=a, reduction=reduction, **kw)
    check_result(res, *want, np.float64)


@SETTINGS
@given(seed=seeds, shape=st.lists(st.integers(0, 6), min_size=1, max_size=3).map(tuple), scale=scales,
       gamma=st.sampled_from([0.0, 0.5, 2.0]), alpha=st.sampled_from([-1.0, 0.25, 0.75]),
       soft=st.booleans(), reduction=st.sampled_from(["mean", "sum", "none"]))
def test_sigmoid_focal_matches_naive(seed, shape, scale, gamma, alpha, soft, reduction):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * scale
    t = rng.uniform(size=shape) if soft else (rng.random(shape) < 0.5).astype(np.float64)
    res = fl.sigmoid_focal_loss(x, t, gamma=gamma, alpha=alpha, reduction=reduction)
    want = naive.sigmoid_focal_loss(x, t, gamma=gamma, alpha=alpha, reduction=reduction)
    check_result(res, *want, np.float64)


@SETTINGS
@given(seed=seeds, shape=st.lists(st.integers(0, 6), min_size=1, max_size=3).map(tuple), scale=scales,
       delta=st.sampled_from([0.01, 1.0, 7.0]), weighted=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]))
def test_huber_matches_naive(seed, shape, scale, delta, weighted, reduction):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * scale
    t = rng.normal(size=shape) * scale
    kw = {"sample_weight": rng.uniform(size=shape[-1:])} if weighted else {}
    res = fl.huber_loss(x, t, delta=delta, reduction=reduction, **kw)
    want = naive.huber_loss(x, t, delta=delta, reduction=reduction, **kw)
    check_result(res, *want, np.float64)
