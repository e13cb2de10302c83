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

Block reductions go through a shared float64 buffer of ``MAX_THREADS``
entries with a tree of barriers (``syncthreads`` reached by every thread of
the block).  They use no warp shuffles, which the simulator lacks; on the GPU
the reductions are a sliver of each row's work, the memory traffic is the rest.
"""
import math
import os

from numba import cuda, int64
from numba.core import config
from numba.cuda.extending import overload

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


def threads_for(width):
    """Threads for a one-block-per-row kernel: about one per ``UNROLL``
    elements of the row (a power of two, at least 1), at most ``ROW_THREADS``."""
    need = max(1, -(-width // UNROLL))
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


def element(a, i):
    """Element ``i`` (C order) of a 1-D array, or of a 2-D one that may be
    strided (``a[i // W, i % W]``): the elementwise kernels read and write
    non-contiguous 2-D inputs this way, without a copy."""
    if a.ndim == 1:
        return a[i]
    w = a.shape[1]
    return a[i // w, i % w]


@overload(element, target="cuda")
def _element(a, i):
    if a.ndim == 1:
        def impl(a, i):
            return a[i]
    else:
        def impl(a, i):
            w = a.shape[1]
            return a[i // w, i % w]
    return impl


def set_element(a, i, value):
    """``element(a, i) = value``."""
    if a.ndim == 1:
        a[i] = value
    else:
        w = a.shape[1]
        a[i // w, i % w] = value


@overload(set_element, target="cuda")
def _set_element(a, i, value):
    if a.ndim == 1:
        def impl(a, i, value):
            a[i] = value
    else:
        def impl(a, i, value):
            w = a.shape[1]
            a[i // w, i % w] = value
    return impl


@cuda.jit(device=True)
def _block_reduce(buf, value, largest):
    """The sum of ``value`` over the block, or its maximum when ``largest`` (a
    constant), returned to every thread: a tree of barriers over ``buf``."""
    t = cuda.threadIdx.x
    buf[t] = value
    cuda.syncthreads()
    half = cuda.blockDim.x // 2
    while half > 0:
        if t < half:
            a = buf[t]
            b = buf[t + half]
            if largest:
                buf[t] = a if (a >= b or a != a) else b
            else:
                buf[t] = a + b
        cuda.syncthreads()
        half //= 2
    total = buf[0]
    cuda.syncthreads()  # buf is reused by the next reduction
    return total


@cuda.jit(device=True)
def block_sum(buf, value):
    """Sum of ``value`` over the block (float64), returned to every thread."""
    return _block_reduce(buf, value, False)


@cuda.jit(device=True)
def block_max(buf, value):
    """Maximum of ``value`` over the block, returned to every thread; a NaN
    anywhere gives NaN (as max(x) in PyTorch)."""
    return _block_reduce(buf, value, True)


@cuda.jit(device=True)
def block_logsumexp(mbuf, sbuf, m, s):
    """Merge every thread's online-softmax pair ``(m, s)``, ``s = sum exp(z - m)``
    over its share of the row, into the row's ``(max, sum exp(z - max))``."""
    t = cuda.threadIdx.x
    mbuf[t] = m
    sbuf[t] = s
    cuda.syncthreads()
    half = cuda.blockDim.x // 2
    while half > 0:
        if t < half:
            m1, s1 = mbuf[t], sbuf[t]
            m2, s2 = mbuf[t + half], sbuf[t + half]
            mbuf[t], sbuf[t] = merge_online(m1, s1, m2, s2)
        cuda.syncthreads()
        half //= 2
    m = mbuf[0]
    s = sbuf[0]
    cuda.syncthreads()
    return m, s


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
