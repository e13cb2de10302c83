"""Vectorizable elementwise math for the CPU kernels; the shared formulas' math primitives.

The PyPI llvmlite has no SVML, so ``math.exp``/``math.log`` inside a Numba loop
are scalar libm calls and stop LLVM from vectorizing the loop.  The functions
here are branch-free (selects only), built from +, *, FMA and integer bit
operations, so a loop that calls them vectorizes to AVX2/AVX-512.

* ``vexp``:  Cody-Waite range reduction ``x = n*ln2 + r``, ``|r| <= ln2/2``,
  then a polynomial for ``exp(r)`` and ``2**n`` built in the exponent bits.
  float32: Cephes ``expf`` polynomial (<= 2 ulp); float64: degree-13 Taylor
  (<= 2 ulp).  Results below the smallest normal flush to 0 (no subnormals).
* ``vlog``:  ``x = 2**e * m``, ``m`` in ``[sqrt(1/2), sqrt(2))``, then Cephes
  ``logf`` (float32) or fdlibm's ``__ieee754_log`` (float64) polynomial.
* ``vlog1p``: ``log(1+u)`` accurate for small ``u`` (Goldberg's correction).

All three propagate NaN, map +inf to +inf and handle 0 / negative arguments
like libm.  Each has one body for float32 and float64: an ``@overload`` whose
implementation closes over the constants of the argument's precision
(``_F32``, ``_F64``), so the kernels are written once and the argument type
picks the constants at compile time.  Only the polynomials differ.

Each is compiled once per type as a function of its own (``HELPER_OPTIONS``),
not inlined into every caller's Numba IR, which multiplied the compile time of
the kernels; LLVM inlines it when it optimizes the linked kernel, so the loops
that call it still vectorize (``tests/test_math.py`` reads the machine code).

They are the CPU's primitives of the shared formulas (``PRIMITIVES``, read by
``fastloss.cpu._formulas``).

``load``/``store`` read and write array elements in the compute type.
float16 arrays reach the kernels as ``uint16`` views (Numba's CPU target has no
float16) and are converted with LLVM's ``half`` type, which the F16C
instructions (vcvtph2ps/vcvtps2ph) vectorize.
"""
from types import SimpleNamespace

import numpy as np
from llvmlite import ir
from numba.core import types
from numba.core.extending import intrinsic, overload, register_jitable

from fastloss import formulas
from fastloss.cpu._jit import HELPER_OPTIONS

# ---------------------------------------------------------------- bit casts


def _intrinsic(name, signature, build):
    """An intrinsic of one argument whose LLVM code is ``build(builder, value)``."""
    def typer(typingctx, x):
        return signature, lambda context, builder, sig, args: build(builder, args[0])

    typer.__name__ = name
    return intrinsic(typer)


_f32_as_i32 = _intrinsic("_f32_as_i32", types.int32(types.float32),
                         lambda b, v: b.bitcast(v, ir.IntType(32)))
_i32_as_f32 = _intrinsic("_i32_as_f32", types.float32(types.int32),
                         lambda b, v: b.bitcast(v, ir.FloatType()))
_f64_as_i64 = _intrinsic("_f64_as_i64", types.int64(types.float64),
                         lambda b, v: b.bitcast(v, ir.IntType(64)))
_i64_as_f64 = _intrinsic("_i64_as_f64", types.float64(types.int64),
                         lambda b, v: b.bitcast(v, ir.DoubleType()))
_half_bits_to_f32 = _intrinsic("_half_bits_to_f32", types.float32(types.uint16),
                               lambda b, v: b.fpext(b.bitcast(v, ir.HalfType()), ir.FloatType()))
_f32_to_half_bits = _intrinsic("_f32_to_half_bits", types.uint16(types.float32),
                               lambda b, v: b.bitcast(b.fptrunc(v, ir.HalfType()), ir.IntType(16)))

# ---------------------------------------------------------------- polynomials (by precision)


@register_jitable(**HELPER_OPTIONS)
def _exp_poly_f32(r):
    """exp(r) for |r| <= ln2/2: Cephes ``expf``."""
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    return p * (r * r) + r + np.float32(1.0)


@register_jitable(**HELPER_OPTIONS)
def _exp_poly_f64(r):
    """exp(r) for |r| <= ln2/2: Taylor to degree 13 (remainder < 4e-18)."""
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    return p * (r * r) + r + 1.0


@register_jitable(**HELPER_OPTIONS)
def _log_poly_f32(f, ef):
    """log(2**ef * (1 + f)) for f in [sqrt(1/2) - 1, sqrt(2) - 1): Cephes ``logf``."""
    z = f * f
    p = np.float32(7.0376836292e-2)
    p = p * f - np.float32(1.1514610310e-1)
    p = p * f + np.float32(1.1676998740e-1)
    p = p * f - np.float32(1.2420140846e-1)
    p = p * f + np.float32(1.4249322787e-1)
    p = p * f - np.float32(1.6668057665e-1)
    p = p * f + np.float32(2.0000714765e-1)
    p = p * f - np.float32(2.4999993993e-1)
    p = p * f + np.float32(3.3333331174e-1)
    y = p * f * z
    y = y + ef * np.float32(-2.12194440e-4)
    y = y - np.float32(0.5) * z
    return f + y + ef * np.float32(0.693359375)


@register_jitable(**HELPER_OPTIONS)
def _log_poly_f64(f, k):
    """log(2**k * (1 + f)): fdlibm's ``__ieee754_log``."""
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (3.999999999940941908e-01 + w * (2.222219843214978396e-01 + w * 1.531383769920937332e-01))
    t2 = z * (6.666666666666735130e-01 + w * (2.857142874366239149e-01
                                             + w * (1.818357216161805012e-01 + w * 1.479819860511658591e-01)))
    hfsq = 0.5 * f * f
    return k * 6.93147180369123816490e-01 - ((hfsq - (s * (hfsq + t2 + t1) + k * 1.90821492927058770002e-10)) - f)


@register_jitable(**HELPER_OPTIONS)
def _tanh_f32(x, exp2a):
    """tanh(x) from exp(2|x|): Cephes' tanhf polynomial for |x| < 0.625, else
    1 - 2 / (exp(2|x|) + 1)."""
    a = abs(x)
    z = x * x
    p = np.float32(-5.70498872745e-3)
    p = p * z + np.float32(2.06390887954e-2)
    p = p * z - np.float32(5.37397155531e-2)
    p = p * z + np.float32(1.33314422036e-1)
    p = p * z - np.float32(3.33332819422e-1)
    small = p * z * x + x
    big = np.float32(1.0) - np.float32(2.0) / (exp2a + np.float32(1.0))
    big = -big if x < np.float32(0.0) else big
    return small if a < np.float32(0.625) else big


@register_jitable(**HELPER_OPTIONS)
def _tanh_f64(x, exp2a):
    """tanh(x) from exp(2|x|): Cephes' rational approximation for |x| < 0.625, else via exp."""
    z = x * x
    p = (-9.64399179425052238628e-1 * z - 9.92877231001918586564e1) * z - 1.61468768441708447952e3
    q = ((z + 1.12811678491632931402e2) * z + 2.23548839060100448583e3) * z + 4.84406305325125486048e3
    small = x + x * z * p / q
    big = 1.0 - 2.0 / (exp2a + 1.0)
    big = -big if x < 0.0 else big
    return small if abs(x) < 0.625 else big


# What the float32 and float64 versions of each function differ by.
_F32 = SimpleNamespace(
    float=np.float32, int=np.int32, as_int=_f32_as_i32, as_float=_i32_as_f32,
    mant_bits=np.int32(23), bias=np.int32(127), log_bias=np.int32(126),
    exp_mask=np.int32(0xFF), mant_mask=np.int32(0x007FFFFF),
    half=np.int32(0x3F000000),  # m's exponent bits: m in [0.5, 1)
    shifter=np.float32(12582912.0),  # 1.5 * 2**23
    log2e=np.float32(1.44269504088896341), ln2_hi=np.float32(0.693359375),
    ln2_lo=np.float32(-2.12194440e-4),
    exp_max=np.float32(88.72283),  # log(FLT_MAX)
    exp_min=np.float32(-87.33654),  # log(FLT_MIN): below it, flush to 0
    min_normal=np.float32(1.17549435e-38), subnormal_scale=np.float32(8388608.0),
    subnormal_bits=np.float32(23.0), sqrt_half=np.float32(0.707106781186547524),
    exp_poly=_exp_poly_f32, log_poly=_log_poly_f32, tanh=_tanh_f32)
_F64 = SimpleNamespace(
    float=np.float64, int=np.int64, as_int=_f64_as_i64, as_float=_i64_as_f64,
    mant_bits=np.int64(52), bias=np.int64(1023), log_bias=np.int64(1022),
    exp_mask=np.int64(0x7FF), mant_mask=np.int64(0x000FFFFFFFFFFFFF),
    half=np.int64(0x3FE0000000000000),  # likewise
    shifter=6755399441055744.0,  # 1.5 * 2**52
    log2e=1.4426950408889634, ln2_hi=6.93147180369123816490e-01, ln2_lo=1.90821492927058770002e-10,
    exp_max=709.782712893384,  # log(DBL_MAX)
    exp_min=-708.3964185322641,  # log(DBL_MIN)
    min_normal=2.2250738585072014e-308, subnormal_scale=18014398509481984.0,  # 2**54
    subnormal_bits=54.0, sqrt_half=0.7071067811865476,
    exp_poly=_exp_poly_f64, log_poly=_log_poly_f64, tanh=_tanh_f64)


def _precision(x):
    """The constants of float type ``x`` (None for another type: no implementation)."""
    return {types.float32: _F32, types.float64: _F64}.get(x)


# ---------------------------------------------------------------- the names


def _primitive(name, python, doc):
    """A function of one float, ``python`` as plain Python (``fastloss.formulas``'s), under a
    name of its own for the CPU: its implementation is an ``@overload(..., target="cpu")``
    below, and no other target's overload may share the object (see ``fastloss.formulas``)."""
    def fn(x):
        return python(x)

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    return fn


vexp = _primitive("vexp", formulas.exp, "exp(x), vectorizable (see module docstring).")
vexp_nonpos = _primitive(
    "vexp_nonpos", formulas.exp_nonpos,
    """exp(x) for x <= 0 or NaN (softmax's exp(z - max z)): vexp without the
    overflow handling, a fifth fewer instructions.  Wrong for x > 0.""")
vlog = _primitive("vlog", formulas.log, "log(x), vectorizable (see module docstring).")
vlog1p = _primitive("vlog1p", formulas.log1p, "log(1 + u), accurate for small u, vectorizable.")
vtanh = _primitive("vtanh", formulas.tanh, "tanh(x), vectorizable.")
PRIMITIVES = dict(exp=vexp, exp_nonpos=vexp_nonpos, log=vlog, log1p=vlog1p, tanh=vtanh)

# ---------------------------------------------------------------- exp


def _exp_reduce(xc):
    """exp(xc) = p * 2**n for a clamped xc; returns (p, n)."""
    raise NotImplementedError


@overload(_exp_reduce, target="cpu", jit_options=HELPER_OPTIONS)
def _exp_reduce_cpu(xc):
    k = _precision(xc)
    shifter, log2e, ln2_hi, ln2_lo, poly, as_int = (k.shifter, k.log2e, k.ln2_hi, k.ln2_lo,
                                                     k.exp_poly, k.as_int)

    def impl(xc):
        # n = round(x / ln2) via the shifter: no float->int conversion, so NaN
        # cannot become poison
        t = xc * log2e + shifter
        n = t - shifter
        r = xc - n * ln2_hi
        r = r - n * ln2_lo
        # the shifter leaves n in the low mantissa bits of t
        return poly(r), as_int(t) - as_int(shifter)
    return impl


@overload(vexp, target="cpu", jit_options=HELPER_OPTIONS)
def _vexp_cpu(x):
    k = _precision(x)
    big, small, as_float, bias, mant_bits = k.exp_max, k.exp_min, k.as_float, k.bias, k.mant_bits
    one, inf, zero = k.int(1), k.float(np.inf), k.float(0.0)

    def impl(x):
        xc = big if x > big else x
        xc = small if xc < small else xc  # NaN fails both tests and passes through
        p, ni = _exp_reduce(xc)
        # n reaches the top exponent near log(max): build 2**n as two in-range factors
        n1 = ni >> one
        y = p * as_float((n1 + bias) << mant_bits)
        y = y * as_float((ni - n1 + bias) << mant_bits)
        y = inf if x > big else y
        return zero if x < small else y
    return impl


@overload(vexp_nonpos, target="cpu", jit_options=HELPER_OPTIONS)
def _vexp_nonpos_cpu(x):
    k = _precision(x)
    small, as_float, bias, mant_bits = k.exp_min, k.as_float, k.bias, k.mant_bits
    zero = k.float(0.0)

    def impl(x):
        # vexp for x <= 0 (and NaN): no overflow, so 2**n is one factor
        xc = small if x < small else x
        p, ni = _exp_reduce(xc)
        y = p * as_float((ni + bias) << mant_bits)
        return zero if x < small else y
    return impl


# ---------------------------------------------------------------- log


@overload(vlog, target="cpu", jit_options=HELPER_OPTIONS)
def _vlog_cpu(x):
    k = _precision(x)
    min_normal, scale, scale_bits, as_int, as_float = (k.min_normal, k.subnormal_scale,
                                                       k.subnormal_bits, k.as_int, k.as_float)
    mant_bits, exp_mask, log_bias, mant_mask, half = (k.mant_bits, k.exp_mask, k.log_bias,
                                                      k.mant_mask, k.half)
    sqrt_half, to_float, poly, one_i = k.sqrt_half, k.float, k.log_poly, k.int(1)
    one, zero, inf, nan = k.float(1.0), k.float(0.0), k.float(np.inf), k.float(np.nan)

    def impl(x):
        # subnormals: scale into the normal range first
        tiny = x < min_normal
        xs = x * scale if tiny else x
        bits = as_int(xs)
        e = ((bits >> mant_bits) & exp_mask) - log_bias
        m = as_float((bits & mant_mask) | half)  # [0.5, 1)
        low = m < sqrt_half
        e = e - one_i if low else e
        f = (m + m if low else m) - one
        y = poly(f, to_float(e) - (scale_bits if tiny else zero))
        y = inf if x == inf else y
        y = -inf if x == zero else y
        y = x if x != x else y  # NaN
        return nan if x < zero else y
    return impl


@overload(vlog1p, target="cpu", jit_options=HELPER_OPTIONS)
def _vlog1p_cpu(u):
    k = _precision(u)
    one, zero, inf = k.float(1.0), k.float(0.0), k.float(np.inf)

    def impl(u):
        # log(1+u) * u / ((1+u) - 1) cancels the rounding of 1+u (Goldberg 1991)
        v = u + one
        d = v - one
        y = vlog(v) * (u / d)
        y = u if d == zero else y
        return u if u == inf else y
    return impl


# ---------------------------------------------------------------- tanh


@overload(vtanh, target="cpu", jit_options=HELPER_OPTIONS)
def _vtanh_cpu(x):
    tanh = _precision(x).tanh

    def impl(x):
        a = abs(x)
        return tanh(x, vexp(a + a))
    return impl


# ---------------------------------------------------------------- loads and stores


def compute_type(row):
    """The type the kernels compute ``row``'s values in (a NumPy scalar type):
    float32 for float16 storage (uint16) and float32, float64 for float64."""
    raise NotImplementedError


@overload(compute_type, jit_options=HELPER_OPTIONS)
def _compute_type_overload(row):
    T = np.float64 if row.dtype == types.float64 else np.float32
    return lambda row: T


def load(row, i):
    """row[i] in the compute type (float16 storage reads as float32)."""
    raise NotImplementedError


@overload(load, jit_options=HELPER_OPTIONS)
def _load_overload(row, i):
    if row.dtype == types.uint16:
        return lambda row, i: _half_bits_to_f32(row[i])
    return lambda row, i: row[i]


def store(row, i, value):
    """row[i] = value, rounding float32 to float16 for float16 storage."""
    raise NotImplementedError


@overload(store, jit_options=HELPER_OPTIONS)
def _store_overload(row, i, value):
    if row.dtype == types.uint16:
        def impl(row, i, value):
            row[i] = _f32_to_half_bits(np.float32(value))
        return impl

    def impl(row, i, value):
        row[i] = value
    return impl
