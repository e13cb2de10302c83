"""The CUDA row kernels' fast exp (``fastloss.cuda._blocks.fast_exp``) against float64,
and the fast row loops that use it (``fastloss.cuda._rows``) against the reference.

What the exp test shows: the range reduction as written (the FMAs, modelled with one
rounding each; the clamp of n; 2**n from the bit pattern; the final product) adds at
most 1 ulp to 2**f over -104..88, the denormal results, -inf, NaN and large negatives.
``ex2.approx`` itself is modelled as correctly rounded: its own error on the hardware
(documented at 2 ulp for exp2f, which is that instruction) cannot be measured without
a GPU.  The short exp of float16 data (``exp_short``: one rounded product, then
ex2.approx) is measured in relative error against float64, far below a float16
ulp.  ``tests/test_cuda_compile.py`` checks that the GPU code compiles.
"""
import math

import numpy as np
import pytest

import fastloss as fl
import naive

pytestmark = pytest.mark.cuda

from fastloss.cuda import _blocks  # noqa: E402


def _ulp_error(x):
    """|fast_exp(x) - exp(x)| in float32 ulps of the exact result (denormal ulps below 2**-126)."""
    got = _blocks.fast_exp(np.float32(x))
    assert isinstance(got, np.float32)
    want = math.exp(float(np.float32(x)))
    ulp = max(float(np.spacing(np.float32(want))), 2.0 ** -149)
    return abs(float(got) - want) / ulp


def test_fma32_rounds_once():
    # (1 + 2**-12)**2 = 1 + 2**-11 + 2**-24: a float32 midpoint, which rounds to even
    # (1 + 2**-11); 2**-80 more (lost in a float64 sum) and the one rounding goes up
    a = np.float32(1 + 2 ** -12)
    low, high = np.float32(1 + 2 ** -11), np.float32(1 + 2 ** -11 + 2 ** -23)
    assert _blocks.fma32(a, a, np.float32(0)) == low
    assert _blocks.fma32(a, a, np.float32(2.0 ** -80)) == high
    assert _blocks.fma32(a, a, np.float32(-(2.0 ** -80))) == low


def test_fast_exp_within_an_ulp_of_float64_over_its_range():
    rng = np.random.default_rng(0)
    xs = np.concatenate([
        rng.uniform(-88, 88, 20000),
        rng.uniform(-104, -87, 5000),  # results near and below 2**-126: denormal
        rng.uniform(-1, 1, 3000) * 10.0 ** rng.integers(-30, 0, 3000),  # near 0
        np.arange(-88, 89),  # the integers (f = 0 after the reduction)
        [-87.33654, -87.33655, -103.27893, -103.9721],  # around 2**-126 and 2**-149
    ]).astype(np.float32)
    errors = np.array([_ulp_error(x) for x in xs])
    worst = xs[np.argmax(errors)]
    assert errors.max() <= 1.0, f"{errors.max()} ulp at x = {worst!r}"


@pytest.mark.parametrize("x, want", [(-np.inf, 0.0), (-1e30, 0.0), (-3.4e38, 0.0), (-110.0, 0.0),
                                     (0.0, 1.0), (-0.0, 1.0), (-1e-40, 1.0)])
def test_fast_exp_at_the_edges(x, want):
    assert _blocks.fast_exp(np.float32(x)) == np.float32(want)


def test_fast_exp_of_nan_is_nan():
    assert np.isnan(_blocks.fast_exp(np.float32(np.nan)))


def test_fast_exp_of_float64_is_math_exp():
    assert _blocks.fast_exp(-1.5) == math.exp(-1.5)


def test_pow2_from_shifted_covers_the_normal_exponents():
    for n in range(-126, 128):
        assert _blocks.pow2_from_shifted(np.float32(n) + _blocks.EXP_SHIFT) == 2.0 ** n


def test_exp_short_is_far_within_a_float16_ulp():
    # float16 data: exp(x) then rounds to 11 bits (2**-11 relative); the short exp's
    # one rounded product adds |x| 2**-24 at most, 2**-17.5 at x = -87 (below, results are 0)
    rng = np.random.default_rng(2)
    xs = np.concatenate([rng.uniform(-87, 0, 20000), -np.logspace(-30, 1.9, 2000),
                         np.arange(-87, 1)]).astype(np.float32)
    got = np.array([float(_blocks.exp_short(x)) for x in xs])
    want = np.exp(xs.astype(np.float64))
    rel = np.abs(got - want) / want
    assert rel.max() <= np.abs(xs.astype(np.float64)).max() * 2.0 ** -24 + 2.0 ** -24
    assert rel.max() <= 2.0 ** -16


@pytest.mark.parametrize("x, want", [(-np.inf, 0.0), (-1e30, 0.0), (-88.0, 0.0), (-150.0, 0.0),
                                     (0.0, 1.0), (-0.0, 1.0)])
def test_exp_short_at_the_edges(x, want):
    # below 2**-126 the flushed ex2.approx gives 0: under float16's smallest value, 2**-24
    assert _blocks.exp_short(np.float32(x)) == want
    assert np.isnan(_blocks.exp_short(np.float32(np.nan)))


def test_exp_for_follows_the_stored_dtype():
    x = np.float32(-3.7)
    assert _blocks.exp_for(x, np.float16(1)) == np.float32(_blocks.exp_short(x))
    assert _blocks.exp_for(x, np.float32(1)) == _blocks.fast_exp(x)
    assert _blocks.exp_for(-3.7, 1.0) == math.exp(-3.7)
    assert isinstance(_blocks.exp_for(x, np.float16(1)), np.float32)


# ------------------------------------------------- the fast row loops (no weights, no soft-cap)


def _rows_with_steps(rng, dtype, threads):
    """Logits whose rows hold two full steps of ``per_thread`` loads per thread and a
    tail, targets in the first step, the last step, the tail, on the last column, and
    one ignored row; a -inf logit in a step and a row whose target dominates."""
    per = _blocks.per_thread(np.empty(0, dtype))
    C = 2 * per * threads + 5
    x = (rng.normal(size=(6, C)) * 3).astype(dtype)
    x[1, 7] = -np.inf
    x[4, :] = -20
    x[4, C - 1] = 15  # p_y -> 1: -log p_y from log1p(rest / e_y)
    t = np.array([3, per * threads + 2, C - 2, -100, C - 1, threads + 1])
    return x, t


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, z_loss=1e-3)],
                         ids=["plain", "smoothing"])
@pytest.mark.parametrize("loss", ["cross_entropy", "focal"])
def test_fast_rows_match_the_reference(dtype, opts, loss):
    from numba import cuda
    rng = np.random.default_rng(1)
    threads = _blocks.threads_per_block()[1]
    x, t = _rows_with_steps(rng, dtype, threads)
    if loss == "focal":
        if opts:
            pytest.skip("focal loss takes no smoothing")
        got = fl.focal_loss(cuda.to_device(x), cuda.to_device(t), gamma=2.0, reduction="none")
        want = naive.focal_loss(x.astype(np.float64), t, gamma=2.0, reduction="none")
    else:
        got = fl.softmax_cross_entropy(cuda.to_device(x), cuda.to_device(t), reduction="none",
                                       **opts)
        want = naive.softmax_cross_entropy(x.astype(np.float64), t, reduction="none", **opts)
    loss_got, grad_got = got.loss.copy_to_host(), got.grad.copy_to_host()
    want_loss, want_grad = want
    rtol = 1e-5 if dtype == np.float32 else 2e-3
    np.testing.assert_allclose(loss_got.astype(np.float64), want_loss, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(grad_got.astype(np.float64), want_grad, rtol=rtol,
                               atol=rtol / x.shape[1])
    if not opts:
        assert grad_got[1, 7] == 0  # p = 0 at a -inf logit (smoothing gives it -eps/C)
