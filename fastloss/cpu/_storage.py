"""How arrays are handed to the CPU kernels.

Kernels trust their inputs: C-contiguous, float32/float64, or float16 passed
as its uint16 bit pattern (Numba's CPU target has no float16; ``_math.load``
and ``_math.store`` convert).  The gradient buffer is the caller's
``grad_out`` when the kernel can write it directly, else a fresh array that is
copied into ``grad_out`` afterwards.  An optional array is the array or None.
"""
import math

import numpy as np

try:  # compiled: a reused grad_out must cost no more than np.empty (``_buffer_checks``)
    from fastloss.cpu._buffer_checks import apart, ready, ready_apart, writes_directly
except ImportError:  # a source tree that was never built: the full checks, a temporary always
    def apart(a, b):
        return a is None or b is None or not np.may_share_memory(a, b)

    def ready(g, shape, dtype):
        return False

    def ready_apart(buffers, likes, inputs=()):
        return False

    def writes_directly(g, inplace_ok, reads):
        return False

_F16 = np.dtype(np.float16)
_F64 = np.dtype(np.float64)


def compute_type(dtype):
    """float64 math for float64 arrays, float32 math for float32 and float16."""
    return np.float64 if dtype is _F64 or dtype == _F64 else np.float32  # `is`: the common case


def kernel_view(a, shape=None):
    """``a`` as the kernels read it: C-contiguous, float16 seen as uint16, of
    ``shape`` when given (a view; reshaped only when it differs: a small call
    pays for every NumPy call)."""
    a = np.ascontiguousarray(a)
    if a.dtype == _F16:
        a = a.view(np.uint16)
    return a if shape is None or a.shape == shape else a.reshape(shape)


def class_rows(logits, labels, probs):
    """Logits ``(..., C)`` as kernel rows ``(N, C)``, with integer ``labels``
    as ``(N,)`` int64 or probabilities ``probs`` as ``(N, C)`` rows of the
    logits' dtype (one of the two is None)."""
    C = logits.shape[-1]
    n = logits.size // C
    x = kernel_view(logits, (n, C))
    if labels is not None:
        labels = kernel_view(labels, (n,))
    else:
        probs = kernel_view(probs.astype(logits.dtype, copy=False), (n, C))
    return x, labels, probs


def element_loss_buffers(n, reduction, dtype, T):
    """``(losses, losses_half)`` of an elementwise kernel, None where absent.

    ``"none"`` keeps one loss per element: in ``T`` (``losses``), or, for
    float16 input, as float16 bits (``losses_half``), so that no float32 array
    of the input's length is made.  Other reductions keep none (both None).
    """
    if reduction != "none":
        return None, None
    if dtype == _F16:
        return None, np.empty(n, np.uint16)
    return np.empty(n, T), None


def element_losses_result(losses, losses_half):
    """The per-element losses that the buffers of ``element_loss_buffers`` hold."""
    return losses_half.view(np.float16) if losses_half is not None else losses


def compact_weights(sw, shape, T):
    """Sample weights broadcast against ``shape``, as ``(weights, inner, period)``:
    element i (C order) has weight ``weights[(i // inner) % period]``
    (``(None, 1, 1)`` when ``shape`` has no element).

    Weights that vary only along leading axes become one weight per run of
    ``inner`` elements; weights that vary only along trailing axes cycle with
    ``inner = 1``; anything else is broadcast in full (the only case that
    allocates an array of the input's size).  The CUDA backend compacts here,
    on a host copy, the weights it cannot read through a view.
    """
    if math.prod(shape) == 0:
        return None, 1, 1
    b = np.broadcast_to(sw, shape)
    nd = len(shape)
    lead = 0  # leading axes along which the weights are constant
    while lead < nd and b.strides[lead] == 0:
        lead += 1
    trail = nd  # axes [trail:] along which the weights are constant
    while trail > 0 and b.strides[trail - 1] == 0:
        trail -= 1
    if trail < nd or lead == 0:
        varying = np.ascontiguousarray(b[(slice(None),) * trail + (0,) * (nd - trail)], T)
        return varying.reshape(-1), math.prod(shape[trail:]), max(varying.size, 1)
    varying = np.ascontiguousarray(b[(0,) * lead], T)
    return varying.reshape(-1), 1, max(varying.size, 1)


def gradient_buffer(grad_out, shape, dtype, inplace_ok, reads):
    """(array the kernel writes, array returned to the caller).

    The kernel writes ``grad_out`` itself when it is C-contiguous, overlaps no
    array of ``reads`` (a tuple), and either is the very view ``inplace_ok``
    (the input that the kernel reads element by element before writing that
    element) or overlaps it nowhere.  Otherwise it writes a fresh array, and
    ``finish_gradient`` copies it over.
    """
    if grad_out is not None and writes_directly(grad_out, inplace_ok, reads):
        return grad_out, grad_out
    g = np.empty(shape, dtype)
    return g, (g if grad_out is None else grad_out)


def gradient_arrays(grad, grad_out, like, kernel_shape, reads=()):
    """(gradient buffer in kernel form, array written, array to return).

    With ``grad=False`` the kernel gets a one-row dummy it never writes and
    the other two are None.  ``like`` (the input the gradient is taken
    against) may be ``grad_out`` itself: kernels read each element before
    writing it.
    """
    if not grad:
        storage = np.uint16 if like.dtype == _F16 else like.dtype
        return np.empty((1,) + tuple(kernel_shape[1:]), storage), None, None
    written, result = gradient_buffer(grad_out, like.shape, like.dtype, like, reads)
    return kernel_view(written, tuple(kernel_shape)), written, result


def finish_gradient(written, result):
    if written is not result:
        np.copyto(result, written)
    return result
