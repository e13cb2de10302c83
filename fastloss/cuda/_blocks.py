"""Launch shapes and block-level building blocks shared by the CUDA kernels.

Row kernels run one block per row, persistent: a grid sized to the GPU
(``row_grid``) whose blocks loop over the rows, each thread loading
``UNROLL`` elements (``load_group``) before using them.  Elementwise kernels
run a grid-stride loop (``grid_stride``).  Threads per block: 256 for
elementwise kernels, up to 1024 for rows, in both cases at most the kernel's
``largest_block``; ``FASTLOSS_CUDA_THREADS`` (a power of two) or
``set_threads_per_block`` sets both, which the simulator tests use to run
with 8 to 32 (it runs each thread of a block as a Python thread).

Every kernel is declared with ``kernel(largest_block)``: its registers are
bounded (``max_registers``, applied by the driver's ptxas) so that a block of
``largest_block`` threads fits one SM's 65,536 registers, and ``launch``, the
one launch point, never starts it with more threads.  Kernels whose code needs
more than 64 registers without spilling (``tests/test_cuda_compile.py`` runs
ptxas on each) take ``LARGE_KERNEL_BLOCK``; the others a block of up to
``MAX_THREADS``.

Block reductions (float64) shuffle down within each warp, pass the warps'
results through a shared buffer of ``MAX_THREADS`` entries, shuffle again,
and hand thread 0's result to every thread through the buffer: a fixed tree,
the same bits on every run.  The simulator has no shuffles: there each one is
emulated through the same buffer with barriers, so the simulator runs the
reductions' own code.

The fast row loops' exp is ``exp_for``: for float32 data, ``ex2.approx`` after
an FMA range reduction (``exp32``, within 2 ulp); for float16 data, whose
results keep 11 bits, ``ex2.approx`` of one product (``exp_short``, two
instructions); ``math.exp`` for float64.  tests/test_cuda_fast_exp.py
measures both against float64.
"""
import math
import os

import numpy as np
from llvmlite import ir
from numba import cuda, float64, int64, types, uint64
from numba.core import config
from numba.core.extending import register_jitable
from numba.cuda import libdevice
from numba.cuda.extending import intrinsic, overload

from fastloss._cache import CACHE

MAX_THREADS = 1024  # size of every shared reduction buffer (a compile-time constant)
DEFAULT_THREADS = 256  # elementwise (grid-stride) kernels
DEFAULT_ROW_THREADS = 1024  # row kernels: one block per wide row, one block per SM
UNROLL = 4  # row kernels load this many elements per thread before using them: load_group's count
MAX_BLOCKS = 65535 * 16  # grid-stride kernels: enough blocks to fill any GPU
REGISTERS_PER_SM = 65536  # 32-bit registers of one SM, sm_50 to sm_90
REGISTERS_PER_THREAD = 255  # the most one thread can address, sm_50 to sm_90
LARGE_KERNEL_BLOCK = 512  # largest block of the kernels that need up to 128 registers


def kernel(largest_block=MAX_THREADS):
    """The decorator of every fastloss kernel: ``@cuda.jit(cache=CACHE)`` with at
    most ``REGISTERS_PER_SM // largest_block`` registers per thread (and at most
    ``REGISTERS_PER_THREAD``), so that ``launch`` can start it with up to
    ``largest_block`` threads.  A register bound, not launch bounds: with
    ``.maxntid`` ptxas also trades registers for occupancy, and spills.  The
    simulator takes no bound."""
    registers = min(REGISTERS_PER_THREAD, REGISTERS_PER_SM // largest_block)
    options = {} if config.ENABLE_CUDASIM else {"max_registers": registers}

    def decorate(fn):
        dispatcher = cuda.jit(cache=CACHE, **options)(fn)
        dispatcher.largest_block = largest_block
        return dispatcher
    return decorate


def largest_block(kernel):
    """The most threads per block that ``launch`` starts ``kernel`` with."""
    return kernel.largest_block


def fit(kernel, threads):
    """``threads`` per block, at most ``largest_block(kernel)`` (powers of two stay
    powers of two: every bound is one)."""
    return min(threads, kernel.largest_block)


def launch(kernel, blocks, threads, stream, *args):
    """Run ``kernel(*args)`` on ``stream`` with ``blocks`` blocks of ``threads``
    threads (an int, clamped by ``fit``; or a tuple, which must fit as given).
    The one launch point of fastloss's kernels: the caller's stream reaches
    every launch through it (``_arrays.Device.launch``)."""
    if isinstance(threads, tuple):
        if math.prod(threads) > kernel.largest_block:
            raise ValueError(f"a block of {threads} threads exceeds {kernel.largest_block}")
    else:
        threads = fit(kernel, threads)
    kernel[blocks, threads, stream](*args)


def _check_threads(n, what):
    if not isinstance(n, int) or n < 1 or n > MAX_THREADS or n & (n - 1):
        raise ValueError(f"{what} must be a power of two in [1, {MAX_THREADS}], got {n!r}")
    return n


_ENV_THREADS = os.environ.get("FASTLOSS_CUDA_THREADS")
if _ENV_THREADS:
    THREADS = ROW_THREADS = _check_threads(int(_ENV_THREADS), "FASTLOSS_CUDA_THREADS")
else:
    THREADS, ROW_THREADS = DEFAULT_THREADS, DEFAULT_ROW_THREADS


def threads_per_block():
    """``(elementwise, row)`` threads per block now in use."""
    return THREADS, ROW_THREADS


def set_threads_per_block(n, rows=None):
    """Threads per block for every kernel launched from now on (powers of two);
    ``rows`` for the row kernels, ``n`` when not given."""
    global THREADS, ROW_THREADS
    THREADS = _check_threads(n, "threads per block")
    ROW_THREADS = _check_threads(n if rows is None else rows, "threads per block")


def threads_for(width, per_thread=UNROLL):
    """Threads for a one-block-per-row kernel: about one per ``per_thread``
    elements of the row (a power of two, at least 1), at most ``ROW_THREADS``."""
    need = max(1, -(-width // per_thread))
    if need >= ROW_THREADS:
        return ROW_THREADS
    return 1 << math.ceil(math.log2(need))


def _positive_env(name, default):
    raw = os.environ.get(name)
    if not raw:
        return default
    n = int(raw)
    if n < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw}")
    return n


# Row kernels keep about this many threads resident per SM: few enough rows in
# flight that a row read by pass 1 is still in L2 when pass 2 reads it again.
SM_THREADS = _positive_env("FASTLOSS_CUDA_SM_THREADS", 1024)
_SM_COUNT = []


def sm_count():
    """Streaming multiprocessors of the current GPU (2 under the simulator,
    so that its blocks loop over several rows as real ones do)."""
    if not _SM_COUNT:
        _SM_COUNT.append(getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", None) or 2)
    return _SM_COUNT[0]


def row_grid(n, threads):
    """Blocks for a persistent one-block-per-row kernel over ``n`` rows: each
    block loops over rows ``blockIdx.x, blockIdx.x + gridDim.x, ...``."""
    per_sm = max(1, min(32, SM_THREADS // threads))
    return max(1, min(n, per_sm * sm_count()))


@cuda.jit(device=True)
def grid_stride():
    """``(first element, stride)`` of this thread in a grid-stride loop, 64-bit."""
    return int64(cuda.grid(1)), int64(cuda.gridsize(1))


def grid_for(n):
    """``(blocks, threads)`` for a grid-stride loop over ``n`` elements."""
    return max(1, min(MAX_BLOCKS, -(-n // THREADS))), THREADS


def cast_like(value, like):
    """``value`` in the type of the scalar ``like``.  Kernels compute in the type
    of a scalar argument (float32 for float16/32 data, float64 for float64),
    while Numba types Python literals and int/float32 mixes as float64: every
    constant and every value from a float64 buffer passes through here."""
    return type(like)(value)


@overload(cast_like, target="cuda")
def _cast_like(value, like):
    T = like

    def impl(value, like):
        return T(value)
    return impl


FULL_MASK = 0xFFFFFFFF  # every lane of a warp
WARP = 32

if config.ENABLE_CUDASIM:
    # The simulator has no warp shuffles: each is emulated through the block's
    # shared buffer (every thread of the block calls it, as every thread calls a
    # block reduction), so that the simulator runs the shuffle reductions below.
    @cuda.jit(device=True)
    def _shfl_down(buf, value, delta, width):
        t = cuda.threadIdx.x
        cuda.syncthreads()  # earlier reads of buf are done
        buf[t] = value
        cuda.syncthreads()
        lane = t % WARP
        other = buf[t + delta] if lane + delta < width else value
        cuda.syncthreads()
        return other
else:
    @cuda.jit(device=True)
    def _shfl_down(buf, value, delta, width):
        # every lane that calls a shuffle must be in its mask: whole warps shuffle with
        # all lanes (those past ``width`` compute values nobody reads); only a block
        # smaller than a warp has fewer lanes
        nt = cuda.blockDim.x
        mask = FULL_MASK if nt >= WARP else (1 << nt) - 1
        return cuda.shfl_down_sync(mask, value, delta)


@cuda.jit(device=True)
def _combine(a, b, largest):
    """a + b, or the larger (a NaN wins) when ``largest`` (a constant)."""
    if largest:
        return a if (a >= b or a != a) else b
    return a + b


@cuda.jit(device=True)
def _block_reduce(buf, value, largest):
    """The sum of ``value`` (float64) over the block, or its maximum when
    ``largest`` (a constant), returned to every thread: a fixed tree of shuffles
    down within each warp, the warps' results through ``buf``, the same shuffles
    over them in each warp, and thread 0's result through ``buf`` (every thread
    gets the same bits).  One loop nest, so that the combining code is inlined
    once.  Block sizes are powers of two."""
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    width = min(nt, WARP)
    stage = 0
    while stage < 2:
        delta = width // 2
        while delta > 0:
            value = _combine(value, _shfl_down(buf, value, delta, width), largest)
            delta //= 2
        stage += 1
        if stage == 1 and nt > WARP:
            if t % WARP == 0:
                buf[t // WARP] = value
            cuda.syncthreads()
            width = nt // WARP
            value = buf[t % width]
            cuda.syncthreads()  # buf is written next
        else:
            stage = 2
    if t == 0:
        buf[0] = value
    cuda.syncthreads()
    total = buf[0]
    cuda.syncthreads()  # buf is reused by the next reduction
    return total


@cuda.jit(device=True)
def block_sum(buf, value):
    """Sum of ``value`` over the block (float64), returned to every thread."""
    return _block_reduce(buf, float64(value), False)


@cuda.jit(device=True)
def block_max(buf, value):
    """Maximum of ``value`` over the block, returned to every thread; a NaN
    anywhere gives NaN (as max(x) in PyTorch)."""
    return _block_reduce(buf, float64(value), True)


@cuda.jit(device=True)
def block_logsumexp(mbuf, sbuf, m, s):
    """Merge every thread's online-softmax pair ``(m, s)``, ``s = sum exp(z - m)``
    over its share of the row, into the row's ``(max, sum exp(z - max))``, in
    float64, returned to every thread (``_block_reduce``'s scheme)."""
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    m = float64(m)
    s = float64(s)
    width = min(nt, WARP)
    stage = 0
    while stage < 2:
        delta = width // 2
        while delta > 0:
            m2 = _shfl_down(mbuf, m, delta, width)
            s2 = _shfl_down(sbuf, s, delta, width)
            m, s = merge_online(m, s, m2, s2)
            delta //= 2
        stage += 1
        if stage == 1 and nt > WARP:
            if t % WARP == 0:
                mbuf[t // WARP] = m
                sbuf[t // WARP] = s
            cuda.syncthreads()
            width = nt // WARP
            m = mbuf[t % width]
            s = sbuf[t % width]
            cuda.syncthreads()
        else:
            stage = 2
    if t == 0:
        mbuf[0] = m
        sbuf[0] = s
    cuda.syncthreads()
    m = mbuf[0]
    s = sbuf[0]
    cuda.syncthreads()
    return m, s


def fmax(a, b):
    """The larger of two floats, a NaN ignored (IEEE maxNum, the GPU's FMNMX)."""
    if a != a:
        return b
    return a if (a >= b or b != b) else b


@overload(fmax, target="cuda")
def _fmax(a, b):
    if a == types.float32:
        return lambda a, b: libdevice.fmaxf(a, b)
    return lambda a, b: libdevice.fmax(a, b)


# ---------------------------------------------------------------- fast exp
#
# exp(x) = 2**n * 2**f with n = rint(x log2 e) and f = x log2 e - n, |f| <= 1/2:
# n from one FMA against a shift constant (its low bits are then n + 127, the
# exponent field of 2**n), f from two FMAs against log2 e split in two floats
# (exact but for the last rounding), 2**f from the hardware's ex2.approx, and
# the product.  n is clamped at -126 (2**n stays normal): below, f carries the
# rest, so results down to the denormals come out right, and -inf gives 0.
# Valid for x <= 88.37 (n <= 127) and NaN: the softmax's exp(z - max z) <= 1.

LOG2E_HI = np.float32(1.4426950216293334961)  # float32(log2 e)
LOG2E_LO = np.float32(1.925963033500011079e-08)  # log2 e - LOG2E_HI
EXP_SHIFT = np.float32(1.5 * 2 ** 23 + 127)  # j = x log2 e + EXP_SHIFT holds n + 127 in its low bits
EXP_LOWEST = np.float32(1.5 * 2 ** 23 + 1)  # j at n = -126


def fma32(a, b, c):
    """``a * b + c`` rounded once to float32 (the GPU's FFMA).  Python: the product
    of two float32 is exact in float64, the sum's float64 rounding error is found
    (two-sum) and breaks the tie where the float64 sum lands on a float32 midpoint."""
    p, c = float(a) * float(b), float(c)
    s = p + c
    r = np.float32(s) if abs(s) <= 3.4028235677973366e38 else np.float32(math.copysign(math.inf, s))
    if math.isfinite(s) and float(r) != s:
        bb = s - p
        err = (p - (s - bb)) + (c - bb)
        toward = np.nextafter(r, np.float32(math.copysign(math.inf, s - float(r))))
        if err != 0 and s == (float(r) + float(toward)) / 2 and (err > 0) == (float(toward) > float(r)):
            r = toward
    return np.float32(r)


@overload(fma32, target="cuda")
def _fma32(a, b, c):
    return lambda a, b, c: cuda.fma(a, b, c)


def ex2_approx(f):
    """2**f by the GPU's ``ex2.approx.ftz.f32`` (denormal inputs and results
    flushed to 0).  Python: 2**f correctly rounded to float32, then flushed, as a
    Python float: its product with ``pow2_from_shifted`` is then exact, and
    ``fast_exp`` rounds it to float32 once, as the GPU's multiply does (without
    NumPy's warnings about NaN)."""
    f = np.float32(f)
    if f != 0 and abs(f) < np.float32(2.0 ** -126):
        f = np.float32(0)
    with np.errstate(over="ignore"):
        r = np.float32(np.exp2(np.float64(f)))
    return 0.0 if r < np.float32(2.0 ** -126) else float(r)


@intrinsic
def _ex2_approx_ftz(typingctx, f):
    if f != types.float32:
        return None

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType()])
        return builder.call(ir.InlineAsm(fnty, "ex2.approx.ftz.f32 $0, $1;", "=f,f"), args)
    return types.float32(types.float32), codegen


@overload(ex2_approx, target="cuda")
def _ex2_approx(f):
    return lambda f: _ex2_approx_ftz(f)


def pow2_from_shifted(j):
    """2**n from ``j = n + EXP_SHIFT`` (a float32 holding an integer, -126 <= n <=
    127): the low 9 bits of its bit pattern, n + 127, moved into the exponent field.
    Python: as a Python float (see ``ex2_approx``)."""
    bits = np.array([j], np.float32).view(np.uint32)[0]
    return float(np.array([(int(bits) << 23) & 0xFFFFFFFF], np.uint32).view(np.float32)[0])


@intrinsic
def _pow2_from_shifted(typingctx, j):
    if j != types.float32:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        bits = builder.shl(builder.bitcast(args[0], i32), ir.Constant(i32, 23))
        return builder.bitcast(bits, ir.FloatType())
    return types.float32(types.float32), codegen


@overload(pow2_from_shifted, target="cuda")
def _pow2_from_shifted_cuda(j):
    return lambda j: _pow2_from_shifted(j)


def store_streaming(a, i, v):
    """``a[i] = v`` (1-D ``a``, unsigned ``i``, ``v`` converted to ``a``'s dtype) with
    an evict-first store (PTX ``st.global.cs``): a gradient written once is not
    read again by the kernel, so its lines go first from L2 and the rows that a
    later pass re-reads stay.  Python (the simulator): a plain store."""
    a[i] = v


_ST_CS = {16: ("b16", "h"), 32: ("f32", "f"), 64: ("f64", "d")}


@intrinsic
def _store_cs(typingctx, a, i, v):
    if not (isinstance(a, types.Array) and a.ndim == 1 and isinstance(i, types.Integer)
            and isinstance(a.dtype, types.Float)):
        return None

    def codegen(context, builder, sig, args):
        aty, ity, vty = sig.args
        arr = context.make_array(aty)(context, builder, value=args[0])
        i64 = ir.IntType(64)
        index = context.cast(builder, args[1], ity, types.uint64)
        if aty.layout in "CF":  # contiguous: the element's pointer, as a[i] computes it
            address = builder.ptrtoint(builder.gep(arr.data, [index]), i64)
        else:
            stride = builder.extract_value(arr.strides, 0)
            address = builder.add(builder.ptrtoint(arr.data, i64), builder.mul(index, stride))
        value = context.cast(builder, args[2], vty, aty.dtype)
        kind, constraint = _ST_CS[aty.dtype.bitwidth]
        if kind == "b16":
            value = builder.bitcast(value, ir.IntType(16))
        fnty = ir.FunctionType(ir.VoidType(), [i64, value.type])
        asm = ir.InlineAsm(fnty, f"st.global.cs.{kind} [$0], $1;",
                           f"l,{constraint},~{{memory}}", side_effect=True)
        builder.call(asm, [address, value])
        return context.get_dummy_value()
    return types.void(a, i, v), codegen


@overload(store_streaming, target="cuda")
def _store_streaming(a, i, v):
    return lambda a, i, v: _store_cs(a, i, v)


@register_jitable
def exp32(x):
    """exp(x) of a float32 ``x <= 88.37`` (or NaN, or -inf): the range reduction
    above, then ``ex2.approx``; within 2 ulp plus ex2.approx's own error
    (tests/test_cuda_fast_exp.py measures it, ex2 modelled as correctly rounded)."""
    j = fma32(x, LOG2E_HI, EXP_SHIFT)
    j = j if j > EXP_LOWEST else EXP_LOWEST  # n >= -126; a NaN x takes n = -126 (f is NaN)
    n = j - EXP_SHIFT
    f = fma32(x, LOG2E_HI, -n)
    f = fma32(x, LOG2E_LO, f)
    return ex2_approx(f) * pow2_from_shifted(j)


def fast_exp(x):
    """exp(x) for ``x <= 88.37``: ``exp32`` for float32, ``math.exp`` for float64."""
    return np.float32(exp32(x)) if isinstance(x, np.float32) else math.exp(x)


@overload(fast_exp, target="cuda")
def _fast_exp(x):
    if x == types.float32:
        return lambda x: exp32(x)
    return lambda x: math.exp(x)


@register_jitable
def exp_short(x):
    """exp(x) of a float32 ``x <= 0`` (or NaN, or -inf) in two instructions,
    ``ex2.approx(x log2 e)``: the product's rounding makes the relative error up
    to |x| 2**-24 (2**-17.5 at x = -87.3), plus ex2.approx's own 2 ulp; results
    below 2**-126 (x < -87.3) are 0.  Enough for float16 data, whose ulp is
    2**-10 and whose smallest value is 2**-24 (``exp_for``)."""
    return ex2_approx(x * LOG2E_HI)


def exp_for(x, stored):
    """exp(x) for ``x <= 0`` (an exponent of the softmax, in the compute type) as
    precise as data stored like ``stored`` (a value loaded from it, which sets the
    formula at compile time) can hold: ``exp_short`` for float16 data, ``fast_exp``
    otherwise (float32 within 2 ulp, float64 ``math.exp``)."""
    if isinstance(stored, np.float16):
        return np.float32(exp_short(np.float32(x)))
    return fast_exp(x)


@overload(exp_for, target="cuda")
def _exp_for(x, stored):
    if stored == types.float16 and x == types.float32:
        return lambda x, stored: exp_short(x)
    return lambda x, stored: fast_exp(x)


@cuda.jit(device=True)
def online_add(m, s, z, counted, ninf):
    """The online-softmax pair (max, sum exp(. - max)) after element z, which
    adds to the sum only when ``counted``; a -inf adds 0 (no exp(-inf - -inf)
    = NaN), a NaN makes the sum NaN."""
    if z > m:
        s *= math.exp(m - z)
        m = z
    if counted and z != ninf:
        s += math.exp(z - m)
    return m, s


@cuda.jit(device=True)
def load_group(a, row, c):
    """``a[row, c + k * blockDim.x]`` for ``k < UNROLL``: a thread's ``UNROLL``
    independent loads, issued before any of them is used, so that enough bytes
    are in flight.  Written out (a loop over a local array compiles to other
    code where the use of the values branches); the kernels unpack exactly
    ``UNROLL`` values, and tests/test_cross_entropy.py checks the count."""
    nt = cuda.blockDim.x
    return a[row, c], a[row, c + nt], a[row, c + 2 * nt], a[row, c + 3 * nt]


GROUP = 8  # fast row loops: a step is two groups of loads per thread


def per_thread(a):
    """Elements of ``a`` that a thread of a fast row loop loads per step: ``2 GROUP``,
    64 bytes (float32) or 32 bytes (float16) in flight per thread: at 512 resident
    threads per SM (the registers allow one block of 512), float32 covers HBM's
    latency (about 25 KiB per SM)."""
    return 2 * GROUP


@overload(per_thread, target="cuda")
def _per_thread(a):
    k = uint64(2 * GROUP)
    return lambda a: k


def fast_rows(a):
    """Whether the row kernels take the fast row loops for ``a``'s dtype: float16 and
    float32 (float64 keeps the loops of ``load_group`` and ``math.exp``, whose
    eight-wide steps would spill registers)."""
    return a.dtype.itemsize != 8


@overload(fast_rows, target="cuda")
def _fast_rows(a):
    fast = a.dtype.bitwidth != 64
    return lambda a: fast


@cuda.jit(device=True)
def load8(a, c, nt):
    """``a[c + k nt]``, ``k < 8``, of a 1-D ``a`` with unsigned ``c`` and ``nt``
    (no negative-index wrap-around): eight independent loads."""
    c1 = c + nt
    c2 = c1 + nt
    c3 = c2 + nt
    c4 = c3 + nt
    c5 = c4 + nt
    c6 = c5 + nt
    c7 = c6 + nt
    return a[c], a[c1], a[c2], a[c3], a[c4], a[c5], a[c6], a[c7]


def load_step(a, c, nt):
    """One step of a fast row loop: ``(lo, hi)``, the 8-tuples ``a[c + k nt]`` for
    ``k < 8`` and ``8 <= k < 16``."""
    return load8(a, c, nt), load8(a, c + GROUP * nt, nt)


@overload(load_step, target="cuda")
def _load_step(a, c, nt):
    shift = uint64(GROUP)
    return lambda a, c, nt: (load8(a, c, nt), load8(a, c + shift * nt, nt))


@cuda.jit(device=True)
def group_end(C):
    """Columns ``c < group_end(C)`` start a full group of ``UNROLL`` loads
    (``load_group``) in a row of ``C``."""
    return C - (UNROLL - 1) * cuda.blockDim.x


@cuda.jit(device=True)
def ignored_row(row, losses, g, zero):
    """A row that ``ignore_index`` skips: loss 0 and, when ``g`` is given, a
    zero gradient row (the block's threads share the columns)."""
    if cuda.threadIdx.x == 0:
        losses[row] = zero
    if g is not None:
        for c in range(cuda.threadIdx.x, g.shape[1], cuda.blockDim.x):
            g[row, c] = zero


@cuda.jit(device=True)
def merge_online(m1, s1, m2, s2):
    """(max, rescaled sum) of two online-softmax pairs; -inf maxima carry sum 0
    (no exp(-inf - -inf) = NaN), a NaN maximum stays NaN."""
    if m1 != m1 or m2 != m2:
        return m1 + m2, s1 + s2
    if m2 > m1:
        m1, s1, m2, s2 = m2, s2, m1, s1
    if s2 == 0.0:
        return m1, s1
    return m1, s1 + s2 * math.exp(m2 - m1)


@kernel()
def fill_kernel(out, value):
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < out.shape[0]:
        out[i] = value
        i += stride


def ptx_dtypes():
    """``(storage, compute)`` Numba types of each input dtype, for the kernels'
    ``ptx_signatures``: float16 data computes in float32."""
    from numba import types
    return ((types.float16, types.float32), (types.float32, types.float32),
            (types.float64, types.float64))


def ptx_signatures():
    """Argument types of every kernel here, for the compile check."""
    from numba import types
    return ([(fill_kernel, (T[::1], types.float64))
             for T in (types.float16, types.float32, types.float64, types.int64)]
            + [(fill_kernel, (types.int64[::1], types.int64))])
