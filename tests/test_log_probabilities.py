"""Log-probabilities that keep their digits (SPEC.md, "Numerics"), on both sides.

``-log p_c = lse - z_c`` formed as written loses the digits of ``log s`` to the rounding of
``lse = m + log s`` when ``|m|`` is large: a float32 row of 7 logits at -1e4 would give a
cross entropy of 1.946289 for log 7 = 1.945910.  fastloss forms it as ``log s - (z_c - m)``,
in the cross entropy (its target term, its smoothing terms, probability targets) and in the
focal loss.  Each row here is checked against ``naive.py``'s float64 reference of the same
(rounded) inputs less their row's max (exact in float64, and the losses are shift-invariant:
the reference itself would lose digits at 1e4), to a few units in the last place of the dtype.

Probability targets put half their mass on one class here: with all of it on a class whose
``p_c -> 1``, ``-log p_c = log s`` keeps only the absolute precision of ``s`` (a float32 row
with a logit 12 above 6 others has ``-log p = 3.7e-5`` to about 1e-7), where integer targets
take ``log1p(rest / e_y)``.
"""
import numpy as np
import pytest

import fastloss as fl
import naive

DTYPES = [np.float16, np.float32, np.float64]
LEVELS = [1e4, -1e4, 88.0, -88.0, 0.0]
C = 7
#: relative error allowed on a loss: float16 losses are rounded to float16 on the way out
LOSS_RTOL = {np.float16: 2e-3, np.float32: 4e-6, np.float64: 1e-11}
#: and absolute: half a float16 subnormal step (a loss of 1e-6 is subnormal there)
LOSS_ATOL = {np.float16: 3e-8, np.float32: 0.0, np.float64: 0.0}


def shifted(x):
    """``x`` less each row's max, in float64: exact for these rows."""
    x = np.asarray(x, np.float64)
    return x - x.max(axis=-1, keepdims=True)


def half_on(y, dtype):
    """Probability targets with half the mass on class ``y`` of each row."""
    t = np.full((len(y), C), 0.5 / (C - 1))
    t[np.arange(len(y)), y] = 0.5
    return t.astype(dtype)


def rows(level, dtype):
    """Rows at ``level``: all logits equal, and one logit 12 above the others (the target
    on it, and the target on another class), as ``(logits, labels)``."""
    equal = np.full(C, level)
    dominant = np.full(C, level)
    dominant[2] += 12.0
    x = np.stack([equal, equal, dominant, dominant]).astype(dtype)
    return x, np.array([0, 4, 2, 5])


def call(dev, fn, x, target, **kw):
    res = fn(dev.put(x), dev.put(target), reduction="none", **kw)
    return dev.get(res.loss).astype(np.float64), dev.get(res.grad).astype(np.float64)


def check(got, want, dtype, what):
    loss, grad = got
    want_loss, want_grad = want
    np.testing.assert_allclose(loss, want_loss, rtol=LOSS_RTOL[dtype], atol=LOSS_ATOL[dtype],
                               err_msg=what)
    naive.assert_close(grad, want_grad, dtype, scale=1.0, what=f"grad, {what}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1},
                                     {"label_smoothing": 0.2, "weight": "w"}])
def test_cross_entropy_integer_targets(backend, dev, level, dtype, options):
    x, y = rows(level, dtype)
    kw = dict(options)
    if "weight" in kw:
        kw["weight"] = np.linspace(0.5, 2.0, C).astype(dtype)
    got = call(dev, fl.softmax_cross_entropy, x, y,
               **{k: dev.put(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()})
    want = naive.softmax_cross_entropy(shifted(x), y, reduction="none", **kw)
    check(got, want, dtype, f"level {level}, {options}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_probability_targets(backend, dev, level, dtype, label_smoothing):
    x, y = rows(level, dtype)
    t = half_on(y, dtype)
    got = call(dev, fl.softmax_cross_entropy, x, t, label_smoothing=label_smoothing)
    want = naive.softmax_cross_entropy(shifted(x), t, reduction="none",
                                       label_smoothing=label_smoothing)
    check(got, want, dtype, f"level {level}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("prob", [False, True], ids=["labels", "probabilities"])
def test_focal_loss(backend, dev, level, dtype, prob):
    x, y = rows(level, dtype)
    target = half_on(y, dtype) if prob else y
    got = call(dev, fl.focal_loss, x, target, gamma=0.5)
    want = naive.focal_loss(shifted(x), target, gamma=0.5, reduction="none")
    check(got, want, dtype, f"level {level}")


def test_the_row_of_the_issue_is_log_7(backend, dev):
    """7 float32 logits at -1e4: log 7 to float32's precision (PyTorch's float32 answer)."""
    loss, _ = call(dev, fl.softmax_cross_entropy, np.full((1, 7), -1e4, np.float32),
                   np.array([3]))
    assert abs(loss[0] - np.log(7.0)) <= 2 * np.spacing(np.float32(np.log(7.0)))
