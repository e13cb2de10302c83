"""fastloss.cpu._math: vectorizable exp/log/log1p and float16 load/store, inside Numba.

Accuracy is measured in ulps of the result's type against references one precision up
(float64 for the float32 functions, np.longdouble for the float64 ones).
"""
import re

import numpy as np
import pytest

numba = pytest.importorskip("numba")
from numba import njit  # noqa: E402

from fastloss.cpu import _math  # noqa: E402
from fastloss.cpu._math import load, store, vexp, vexp_nonpos, vlog, vlog1p  # noqa: E402

vtanh = getattr(_math, "vtanh", None)

HAS_LONGDOUBLE = np.finfo(np.longdouble).nmant >= 63

# the options the fastloss kernels compile with (fastloss/cpu/_rows.py): the float division
# by zero inside vlog1p(0) needs error_model="numpy" (the default "python" raises)
KERNEL_OPTIONS = dict(error_model="numpy", fastmath={"contract"})
# cached on disk (tests/__pycache__) so that reruns skip the compilation
kernel = njit(cache=True, **KERNEL_OPTIONS)


@kernel
def _exp_loop(x, out):
    for i in range(x.shape[0]):
        out[i] = vexp(x[i])


@kernel
def _log_loop(x, out):
    for i in range(x.shape[0]):
        out[i] = vlog(x[i])


@kernel
def _log1p_loop(x, out):
    for i in range(x.shape[0]):
        out[i] = vlog1p(x[i])


@kernel
def _exp_nonpos_loop(x, out):
    for i in range(x.shape[0]):
        out[i] = vexp_nonpos(x[i])


LOOPS = {"exp": _exp_loop, "log": _log_loop, "log1p": _log1p_loop, "exp_nonpos": _exp_nonpos_loop}

if vtanh is not None:
    @kernel
    def _tanh_loop(x, out):
        for i in range(x.shape[0]):
            out[i] = vtanh(x[i])

    LOOPS["tanh"] = _tanh_loop

needs_tanh = pytest.mark.skipif(vtanh is None, reason="no vtanh in fastloss.cpu._math")


def apply(name, x):
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    LOOPS[name](x, out)
    return out


def reference(name, x):
    """The exact-ish function value, one precision above x's dtype."""
    hi = np.float64 if x.dtype == np.float32 else np.longdouble
    xh = x.astype(hi)
    with np.errstate(all="ignore"):
        return {"exp": np.exp, "log": np.log, "log1p": np.log1p, "tanh": np.tanh}[name](xh)


def ulp_error(got, ref, dtype):
    """|got - ref| in units in the last place of dtype at ref (ref in higher precision).

    The ulp of r in [2**e, 2**(e+1)) is 2**(e - nmant), and never below the smallest subnormal."""
    fi = np.finfo(dtype)
    hi = ref.dtype
    _, e = np.frexp(np.abs(ref))  # |ref| = m * 2**e, m in [0.5, 1)
    ulp = np.ldexp(np.ones_like(ref), (e - 1 - fi.nmant).astype(np.int32))
    ulp = np.maximum(ulp, np.array(fi.smallest_subnormal, dtype=hi))
    return np.abs(got.astype(hi) - ref) / ulp


def _requires_precision(dtype):
    if dtype == np.float64 and not HAS_LONGDOUBLE:
        pytest.skip("np.longdouble is not wider than float64 here")


FTYPES = [np.float32, np.float64]


# ---------------------------------------------------------------------- exp


@pytest.mark.parametrize("dtype", FTYPES)
def test_exp_accuracy_where_normal(rng, dtype):
    _requires_precision(dtype)
    fi = np.finfo(dtype)
    lo, hi = float(np.log(fi.tiny)), float(np.log(fi.max))
    x = np.concatenate([
        rng.uniform(lo, hi, 200_000),
        rng.uniform(-1, 1, 50_000),
        rng.uniform(-1e-6, 1e-6, 10_000),
        np.linspace(-0.36, 0.36, 10_001),  # the reduced-argument interval
        np.arange(-120, 120) * np.log(2.0),  # multiples of ln 2: boundaries of the reduction
        np.array([0.0, -0.0, 1.0, -1.0, 0.5, hi - 1e-3, lo + 1e-3]),
    ]).astype(dtype)
    x = x[(x > lo) & (x < hi)]
    ref = reference("exp", x)
    normal = (ref >= fi.tiny) & (ref <= fi.max)
    got = apply("exp", x)
    err = ulp_error(got[normal], ref[normal], dtype)
    worst = np.argmax(err)
    assert err[worst] <= 2.0, (x[normal][worst], got[normal][worst], ref[normal][worst], err[worst])


@pytest.mark.parametrize("dtype", FTYPES)
def test_exp_nonpos_matches_exp_on_its_domain(rng, dtype):
    # softmax's exp(z - max z): the same values as vexp for every x <= 0 and NaN
    fi = np.finfo(dtype)
    lo = float(np.log(fi.tiny))
    x = np.concatenate([rng.uniform(lo * 1.3, 0, 200_000), rng.uniform(-1, 0, 50_000),
                        np.arange(-130, 1) * np.log(2.0),
                        np.array([0.0, -0.0, lo, lo - 1e-3, -1e4, -np.inf, np.nan])]).astype(dtype)
    got = apply("exp_nonpos", x)
    np.testing.assert_array_equal(got, apply("exp", x))
    ref = reference("exp", x)
    normal = (ref >= fi.tiny) & np.isfinite(ref)
    assert ulp_error(got[normal], ref[normal], dtype).max() <= 2.0


@pytest.mark.parametrize("dtype", FTYPES)
def test_exp_special_values(dtype):
    fi = np.finfo(dtype)
    big = float(np.log(fi.max))
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, big * 1.01, 1e30, fi.max, -fi.max, -1e30,
                  -big * 1.2, -1e4, 800.0, -800.0], dtype=dtype)
    got = apply("exp", x)
    assert np.isnan(got[0])
    assert got[1] == np.inf
    assert got[2] == 0.0
    assert got[3] == 1.0 and got[4] == 1.0
    assert got[5] == np.inf and got[6] == np.inf and got[7] == np.inf
    assert np.all(got[8:12] == 0.0)  # huge negatives underflow to 0
    assert got[12] == np.inf
    assert got[13] == 0.0


@pytest.mark.parametrize("dtype", FTYPES)
def test_exp_near_underflow_is_zero_or_accurate(rng, dtype):
    # below the smallest normal result the docstring allows a flush to 0
    fi = np.finfo(dtype)
    lo = float(np.log(fi.tiny))
    sub = float(np.log(fi.smallest_subnormal))
    x = rng.uniform(sub - 5, lo, 5000).astype(dtype)
    x = x[x.astype(np.float64) < lo]  # rounding to float32 may have crossed lo
    got = apply("exp", x)
    ref = reference("exp", x)
    assert np.all(np.isfinite(got)) and np.all(got >= 0)
    assert np.all((got == 0) | (np.abs(got.astype(ref.dtype) - ref) <= 2 * fi.smallest_subnormal))
    assert np.all(got <= fi.tiny)


@pytest.mark.parametrize("dtype", FTYPES)
def test_exp_monotone_on_a_fine_grid(dtype):
    x = np.linspace(-5, 5, 200_001).astype(dtype)
    got = apply("exp", x)
    assert np.all(np.diff(got) >= 0)


# ---------------------------------------------------------------------- log


def _positive_sample(rng, dtype, n):
    fi = np.finfo(dtype)
    emin, emax = int(np.log2(fi.tiny)), int(np.log2(fi.max))
    e = rng.uniform(emin, emax, n)
    x = np.concatenate([
        np.exp2(e),  # every binade of the normal range
        rng.uniform(0.5, 2.0, n // 4),  # around 1, where log is small
        1.0 + rng.uniform(-1e-3, 1e-3, n // 8),
        np.array([1.0, 2.0, 0.5, np.sqrt(0.5), np.sqrt(2.0), fi.max, fi.tiny, np.e]),
    ]).astype(dtype)
    return x[np.isfinite(x) & (x > 0)]


@pytest.mark.parametrize("dtype", FTYPES)
def test_log_accuracy(rng, dtype):
    _requires_precision(dtype)
    x = _positive_sample(rng, dtype, 200_000)
    got = apply("log", x)
    ref = reference("log", x)
    err = ulp_error(got, ref, dtype)
    worst = np.argmax(err)
    assert err[worst] <= 2.0, (x[worst], got[worst], ref[worst], err[worst])


@pytest.mark.parametrize("dtype", FTYPES)
def test_log_subnormal_arguments(rng, dtype):
    _requires_precision(dtype)
    fi = np.finfo(dtype)
    x = (rng.uniform(1, 2**20, 20_000) * fi.smallest_subnormal).astype(dtype)
    x = np.concatenate([x, np.array([fi.smallest_subnormal, fi.tiny * 0.5], dtype=dtype)])
    got = apply("log", x)
    ref = reference("log", x)
    err = ulp_error(got, ref, dtype)
    assert err.max() <= 2.0, (x[np.argmax(err)], err.max())


@pytest.mark.parametrize("dtype", FTYPES)
def test_log_special_values(dtype):
    x = np.array([np.nan, np.inf, 0.0, -0.0, -1.0, -np.inf, 1.0, -1e-30], dtype=dtype)
    got = apply("log", x)
    assert np.isnan(got[0])
    assert got[1] == np.inf
    assert got[2] == -np.inf and got[3] == -np.inf
    assert np.isnan(got[4]) and np.isnan(got[5]) and np.isnan(got[7])
    assert got[6] == 0.0


# -------------------------------------------------------------------- log1p


@pytest.mark.parametrize("dtype", FTYPES)
def test_log1p_accuracy(rng, dtype):
    _requires_precision(dtype)
    fi = np.finfo(dtype)
    small = np.exp2(rng.uniform(np.log2(fi.tiny), 0, 100_000)) * rng.choice([-1, 1], 100_000)
    big = _positive_sample(rng, dtype, 100_000).astype(np.float64)
    near_minus_one = -1 + np.exp2(-rng.uniform(1, fi.nmant, 20_000))
    u = np.concatenate([small, big, near_minus_one, rng.uniform(-0.5, 0.5, 50_000),
                        np.array([fi.eps, -fi.eps / 2, 1e-3, -0.29, 0.41, 1.0])]).astype(dtype)
    u = u[np.isfinite(u) & (u > -1)]
    got = apply("log1p", u)
    ref = reference("log1p", u)
    err = ulp_error(got, ref, dtype)
    worst = np.argmax(err)
    assert err[worst] <= 3.0, (u[worst], got[worst], ref[worst], err[worst])


@pytest.mark.parametrize("dtype", FTYPES)
def test_log1p_tiny_arguments_are_exact(rng, dtype):
    fi = np.finfo(dtype)
    u = np.concatenate([np.exp2(rng.uniform(np.log2(fi.smallest_subnormal), np.log2(fi.eps) - 2, 2000)),
                        -np.exp2(rng.uniform(np.log2(fi.smallest_subnormal), np.log2(fi.eps) - 2, 2000)),
                        np.array([0.0, -0.0, fi.smallest_subnormal])]).astype(dtype)
    got = apply("log1p", u)
    # |u| < eps/4: log1p(u) rounds to u
    np.testing.assert_array_equal(got, u)


@pytest.mark.parametrize("dtype", FTYPES)
def test_log1p_special_values(dtype):
    u = np.array([np.nan, np.inf, -1.0, -2.0, -np.inf, 0.0, np.finfo(dtype).max], dtype=dtype)
    got = apply("log1p", u)
    assert np.isnan(got[0])
    assert got[1] == np.inf
    assert got[2] == -np.inf
    assert np.isnan(got[3]) and np.isnan(got[4])
    assert got[5] == 0.0
    assert np.isfinite(got[6]) and abs(got[6] - np.log(np.float64(np.finfo(dtype).max))) < 1e-3


# --------------------------------------------------------------------- tanh


@needs_tanh
@pytest.mark.parametrize("dtype", FTYPES)
def test_tanh_accuracy(rng, dtype):
    _requires_precision(dtype)
    fi = np.finfo(dtype)
    x = np.concatenate([
        rng.uniform(-20, 20, 100_000),
        rng.uniform(-1, 1, 100_000),
        np.linspace(0.6, 0.65, 5001),  # around the switch between the two formulas
        np.exp2(rng.uniform(np.log2(fi.tiny), 0, 50_000)) * rng.choice([-1, 1], 50_000),
    ]).astype(dtype)
    got = apply("tanh", x)
    ref = reference("tanh", x)
    err = ulp_error(got, ref, dtype)
    worst = np.argmax(err)
    assert err[worst] <= 2.0, (x[worst], got[worst], ref[worst], err[worst])


@needs_tanh
@pytest.mark.parametrize("dtype", FTYPES)
def test_tanh_special_values(dtype):
    x = np.array([np.nan, np.inf, -np.inf, 0.0, 1e30, -1e30, 50.0, -50.0], dtype=dtype)
    got = apply("tanh", x)
    assert np.isnan(got[0])
    np.testing.assert_array_equal(got[1:], [1, -1, 0, 1, -1, 1, -1])
    assert np.all(np.abs(apply("tanh", np.linspace(-100, 100, 10001).astype(dtype))) <= 1)


# ----------------------------------------------------------- float16 storage


@kernel
def _load_all(bits, out):
    for i in range(bits.shape[0]):
        out[i] = load(bits, i)


@kernel
def _store_all(values, bits):
    for i in range(values.shape[0]):
        store(bits, i, values[i])


@kernel
def _load_store_f32(src, dst):
    for i in range(src.shape[0]):
        store(dst, i, load(src, i))


def test_float16_load_every_bit_pattern():
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(bits.shape, np.float32)
    _load_all(bits, out)
    want = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(out), nan)
    np.testing.assert_array_equal(out[~nan], want[~nan])
    # signed zeros and infinities keep their sign
    np.testing.assert_array_equal(np.signbit(out[~nan]), np.signbit(want[~nan]))


def test_float16_store_rounds_to_nearest_even(rng):
    values = np.concatenate([
        rng.normal(size=50_000).astype(np.float32) * np.float32(100),
        np.exp2(rng.uniform(-30, 17, 50_000)).astype(np.float32) * rng.choice([-1, 1], 50_000),
        # exact ties halfway between neighbouring halves
        ((np.arange(2**10, dtype=np.float32) + np.float32(0.5)) * np.float32(2.0**-10)) + np.float32(1.0),
        np.array([65504.0, 65519.0, 65520.0, 1e6, -1e6, 6e-8, 3e-8, 2.9e-8, 1e-10, 0.0, -0.0,
                  np.inf, -np.inf], dtype=np.float32),
    ]).astype(np.float32)
    bits = np.empty(values.shape, np.uint16)
    _store_all(values, bits)
    with np.errstate(over="ignore"):
        want = values.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(bits, want)
    nanbits = np.empty(1, np.uint16)
    _store_all(np.array([np.nan], np.float32), nanbits)
    assert np.isnan(nanbits.view(np.float16)[0])


def test_float16_round_trip_is_identity():
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    back = np.zeros_like(bits)
    _load_store_f32(bits, back)
    finite = ~np.isnan(bits.view(np.float16))
    np.testing.assert_array_equal(back[finite], bits[finite])
    assert np.all(np.isnan(back[~finite].view(np.float16)))


@kernel
def _load_plain(x, out):
    for i in range(x.shape[0]):
        out[i] = load(x, i)


@kernel
def _store_plain(x, out):
    for i in range(x.shape[0]):
        store(out, i, x[i])


@pytest.mark.parametrize("dtype", FTYPES)
def test_load_store_other_dtypes_are_plain_access(rng, dtype):
    x = rng.normal(size=100).astype(dtype)
    out = np.empty_like(x)
    _load_plain(x, out)
    np.testing.assert_array_equal(out, x)
    out2 = np.empty_like(x)
    _store_plain(x, out2)
    np.testing.assert_array_equal(out2, x)


# -------------------------------------------------------------- vectorization


def _host_has_avx2():
    try:
        from llvmlite import binding as llvm

        return "+avx2" in llvm.get_host_cpu_features().flatten()
    except Exception:  # pragma: no cover - older llvmlite
        try:
            with open("/proc/cpuinfo") as f:
                return " avx2" in f.read()
        except OSError:
            return False


@pytest.mark.skipif(not _host_has_avx2(), reason="needs a CPU with AVX2")
@pytest.mark.parametrize("name,dtype", [
    ("exp", np.float32), ("log", np.float32), ("log1p", np.float32), ("exp", np.float64),
], ids=lambda v: v if isinstance(v, str) else np.dtype(v).name)
def test_loops_vectorize(name, dtype):
    # a fresh, uncached dispatcher: cached code cannot be inspected
    fresh = njit(**KERNEL_OPTIONS)(LOOPS[name].py_func)
    x = np.ones(64, dtype)
    fresh(x, np.empty_like(x))
    asm = fresh.inspect_asm(fresh.signatures[0])
    assert re.search(r"%[yz]mm\d+", asm), f"no 256/512-bit registers in the {name}/{np.dtype(dtype)} loop"


@pytest.mark.skipif(not _host_has_avx2(), reason="needs a CPU with AVX2")
def test_float16_load_store_loop_vectorizes():
    fresh = njit(**KERNEL_OPTIONS)(_load_store_f32.py_func)
    bits = np.zeros(64, np.uint16)
    fresh(bits, np.zeros_like(bits))
    asm = fresh.inspect_asm(fresh.signatures[0])
    assert re.search(r"%[yz]mm\d+", asm)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_row_max_through_the_bits_equals_numpy_max(dtype, rng):
    """row_max orders float32/float64 rows by their bits as integers (so that it
    vectorizes): every sign, zero, infinity and magnitude must order as floats."""
    from fastloss.cpu._rows import row_max

    compute = np.float32 if dtype == np.float16 else dtype
    specials = [np.inf, -np.inf, -0.0, 0.0, np.finfo(dtype).max, -np.finfo(dtype).max,
                np.finfo(dtype).tiny, -np.finfo(dtype).tiny]
    for trial in range(300):
        n = int(rng.integers(0, 40))
        x = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4)).astype(dtype)
        if n and trial % 3:
            x[rng.integers(0, n)] = specials[trial % len(specials)]
        if n and trial % 11 == 0:
            x[:] = -np.inf
        storage = x.view(np.uint16) if dtype == np.float16 else x
        want = x.astype(compute).max() if n else compute(-np.inf)
        got = row_max(storage, compute(-np.inf))
        assert got == want, (x, got, want)
