"""Vectorizable elementwise math for the CPU kernels.

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
like libm.  Every function is generic over float32/float64 through
``@overload``: the kernels are written once and the argument type picks the
implementation at compile time.

``load``/``store`` read and write array elements in the compute type.
float16 arrays reach the kernels as ``uint16`` views (Numba's CPU target has no
float16) and are converted with LLVM's ``half`` type, which the F16C
instructions (vcvtph2ps/vcvtps2ph) vectorize.
"""
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.core.extending import intrinsic, overload, register_jitable

# ---------------------------------------------------------------- bit casts


@intrinsic
def _f32_as_i32(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _i32_as_f32(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _f64_as_i64(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


@intrinsic
def _i64_as_f64(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


@intrinsic
def _half_bits_to_f32(typingctx, h):
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _f32_to_half_bits(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


# ---------------------------------------------------------------- exp


@register_jitable(inline="always")
def _exp_reduce_f32(xc):
    """exp(xc) = p * 2**n for a clamped xc; returns (p, n)."""
    # n = round(x / ln2) via the 1.5 * 2**23 shifter: no float->int conversion,
    # so NaN cannot become poison.
    shifter = np.float32(12582912.0)
    t = xc * np.float32(1.44269504088896341) + shifter
    n = t - shifter
    r = xc - n * np.float32(0.693359375)
    r = r - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * (r * r) + r + np.float32(1.0)
    # the shifter leaves n in the low mantissa bits of t
    return p, _f32_as_i32(t) - _f32_as_i32(shifter)


@register_jitable(inline="always")
def _exp_f32(x):
    big = np.float32(88.72283)  # log(FLT_MAX)
    small = np.float32(-87.33654)  # log(FLT_MIN): below it, flush to 0
    xc = big if x > big else x
    xc = small if xc < small else xc  # NaN fails both tests and passes through
    p, ni = _exp_reduce_f32(xc)
    # n reaches 128 near log(FLT_MAX): build 2**n as two in-range factors
    n1 = ni >> np.int32(1)
    y = p * _i32_as_f32((n1 + np.int32(127)) << np.int32(23))
    y = y * _i32_as_f32((ni - n1 + np.int32(127)) << np.int32(23))
    y = np.float32(np.inf) if x > big else y
    return np.float32(0.0) if x < small else y


@register_jitable(inline="always")
def _exp_reduce_f64(xc):
    """exp(xc) = p * 2**n for a clamped xc; returns (p, n)."""
    shifter = 6755399441055744.0  # 1.5 * 2**52
    t = xc * 1.4426950408889634 + shifter
    n = t - shifter
    r = xc - n * 6.93147180369123816490e-01
    r = r - n * 1.90821492927058770002e-10
    # Taylor to degree 13: |r| <= 0.347, remainder < 4e-18
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
    p = p * (r * r) + r + 1.0
    return p, _f64_as_i64(t) - _f64_as_i64(shifter)


@register_jitable(inline="always")
def _exp_f64(x):
    big = 709.782712893384  # log(DBL_MAX)
    small = -708.3964185322641  # log(DBL_MIN)
    xc = big if x > big else x
    xc = small if xc < small else xc
    p, ni = _exp_reduce_f64(xc)
    n1 = ni >> np.int64(1)
    y = p * _i64_as_f64((n1 + np.int64(1023)) << np.int64(52))
    y = y * _i64_as_f64((ni - n1 + np.int64(1023)) << np.int64(52))
    y = np.inf if x > big else y
    return 0.0 if x < small else y


def vexp(x):
    """exp(x), vectorizable (see module docstring)."""
    raise NotImplementedError("vexp is only callable from Numba-compiled code")


@overload(vexp, inline="always")
def _vexp_overload(x):
    if x == types.float32:
        return lambda x: _exp_f32(x)
    if x == types.float64:
        return lambda x: _exp_f64(x)


@register_jitable(inline="always")
def _exp_nonpos_f32(x):
    # _exp_f32 for x <= 0 (and NaN): no overflow, so 2**n is one factor
    small = np.float32(-87.33654)
    xc = small if x < small else x
    p, ni = _exp_reduce_f32(xc)
    y = p * _i32_as_f32((ni + np.int32(127)) << np.int32(23))
    return np.float32(0.0) if x < small else y


@register_jitable(inline="always")
def _exp_nonpos_f64(x):
    small = -708.3964185322641
    xc = small if x < small else x
    p, ni = _exp_reduce_f64(xc)
    y = p * _i64_as_f64((ni + np.int64(1023)) << np.int64(52))
    return 0.0 if x < small else y


def vexp_nonpos(x):
    """exp(x) for x <= 0 or NaN (softmax's exp(z - max z)): vexp without the
    overflow handling, a fifth fewer instructions.  Wrong for x > 0."""
    raise NotImplementedError("vexp_nonpos is only callable from Numba-compiled code")


@overload(vexp_nonpos, inline="always")
def _vexp_nonpos_overload(x):
    if x == types.float32:
        return lambda x: _exp_nonpos_f32(x)
    if x == types.float64:
        return lambda x: _exp_nonpos_f64(x)


# ---------------------------------------------------------------- log


@register_jitable(inline="always")
def _log_f32(x):
    # subnormals: scale into the normal range first
    tiny = x < np.float32(1.17549435e-38)
    xs = x * np.float32(8388608.0) if tiny else x
    bits = _f32_as_i32(xs)
    e = ((bits >> np.int32(23)) & np.int32(0xFF)) - np.int32(126)
    m = _i32_as_f32((bits & np.int32(0x007FFFFF)) | np.int32(0x3F000000))  # [0.5, 1)
    low = m < np.float32(0.707106781186547524)
    e = e - np.int32(1) if low else e
    f = (m + m if low else m) - np.float32(1.0)
    ef = np.float32(e) - (np.float32(23.0) if tiny else np.float32(0.0))
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
    y = f + y + ef * np.float32(0.693359375)
    y = np.float32(np.inf) if x == np.float32(np.inf) else y
    y = np.float32(-np.inf) if x == np.float32(0.0) else y
    y = x if x != x else y  # NaN
    return np.float32(np.nan) if x < np.float32(0.0) else y


@register_jitable(inline="always")
def _log_f64(x):
    tiny = x < 2.2250738585072014e-308
    xs = x * 18014398509481984.0 if tiny else x  # 2**54
    bits = _f64_as_i64(xs)
    e = ((bits >> np.int64(52)) & np.int64(0x7FF)) - np.int64(1022)
    m = _i64_as_f64((bits & np.int64(0x000FFFFFFFFFFFFF)) | np.int64(0x3FE0000000000000))
    low = m < 0.7071067811865476
    e = e - np.int64(1) if low else e
    f = (m + m if low else m) - 1.0
    k = np.float64(e) - (54.0 if tiny else 0.0)
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (3.999999999940941908e-01 + w * (2.222219843214978396e-01 + w * 1.531383769920937332e-01))
    t2 = z * (6.666666666666735130e-01 + w * (2.857142874366239149e-01
                                             + w * (1.818357216161805012e-01 + w * 1.479819860511658591e-01)))
    hfsq = 0.5 * f * f
    y = k * 6.93147180369123816490e-01 - ((hfsq - (s * (hfsq + t2 + t1) + k * 1.90821492927058770002e-10)) - f)
    y = np.inf if x == np.inf else y
    y = -np.inf if x == 0.0 else y
    y = x if x != x else y  # NaN
    return np.nan if x < 0.0 else y


def vlog(x):
    """log(x), vectorizable (see module docstring)."""
    raise NotImplementedError("vlog is only callable from Numba-compiled code")


@overload(vlog, inline="always")
def _vlog_overload(x):
    if x == types.float32:
        return lambda x: _log_f32(x)
    if x == types.float64:
        return lambda x: _log_f64(x)


@register_jitable(inline="always")
def _log1p_f32(u):
    # log(1+u) * u / ((1+u) - 1) cancels the rounding of 1+u (Goldberg 1991)
    v = u + np.float32(1.0)
    d = v - np.float32(1.0)
    y = _log_f32(v) * (u / d)
    y = u if d == np.float32(0.0) else y
    return u if u == np.float32(np.inf) else y


@register_jitable(inline="always")
def _log1p_f64(u):
    v = u + 1.0
    d = v - 1.0
    y = _log_f64(v) * (u / d)
    y = u if d == 0.0 else y
    return u if u == np.inf else y


def vlog1p(u):
    """log(1 + u), accurate for small u, vectorizable."""
    raise NotImplementedError("vlog1p is only callable from Numba-compiled code")


@overload(vlog1p, inline="always")
def _vlog1p_overload(u):
    if u == types.float32:
        return lambda u: _log1p_f32(u)
    if u == types.float64:
        return lambda u: _log1p_f64(u)


# ---------------------------------------------------------------- loads and stores


def load(row, i):
    """row[i] in the compute type (float16 storage reads as float32)."""
    raise NotImplementedError


@overload(load, inline="always")
def _load_overload(row, i):
    if row.dtype == types.uint16:
        return lambda row, i: _half_bits_to_f32(row[i])
    return lambda row, i: row[i]


def store(row, i, value):
    """row[i] = value, rounding float32 to float16 for float16 storage."""
    raise NotImplementedError


@overload(store, inline="always")
def _store_overload(row, i, value):
    if row.dtype == types.uint16:
        def impl(row, i, value):
            row[i] = _f32_to_half_bits(np.float32(value))
        return impl
    def impl(row, i, value):
        row[i] = value
    return impl


# ---------------------------------------------------------------- tanh


@register_jitable(inline="always")
def _tanh_f32(x):
    # |x| < 0.625: Cephes tanhf polynomial; else 1 - 2 / (exp(2|x|) + 1)
    a = abs(x)
    z = x * x
    p = np.float32(-5.70498872745e-3)
    p = p * z + np.float32(2.06390887954e-2)
    p = p * z - np.float32(5.37397155531e-2)
    p = p * z + np.float32(1.33314422036e-1)
    p = p * z - np.float32(3.33332819422e-1)
    small = p * z * x + x
    big = np.float32(1.0) - np.float32(2.0) / (_exp_f32(a + a) + np.float32(1.0))
    big = -big if x < np.float32(0.0) else big
    return small if a < np.float32(0.625) else big


@register_jitable(inline="always")
def _tanh_f64(x):
    # |x| < 0.625: Cephes tanh rational approximation; else via exp
    a = abs(x)
    z = x * x
    p = (-9.64399179425052238628e-1 * z - 9.92877231001918586564e1) * z - 1.61468768441708447952e3
    q = ((z + 1.12811678491632931402e2) * z + 2.23548839060100448583e3) * z + 4.84406305325125486048e3
    small = x + x * z * p / q
    big = 1.0 - 2.0 / (_exp_f64(a + a) + 1.0)
    big = -big if x < 0.0 else big
    return small if a < 0.625 else big


def vtanh(x):
    """tanh(x), vectorizable."""
    raise NotImplementedError("vtanh is only callable from Numba-compiled code")


@overload(vtanh, inline="always")
def _vtanh_overload(x):
    if x == types.float32:
        return lambda x: _tanh_f32(x)
    if x == types.float64:
        return lambda x: _tanh_f64(x)
