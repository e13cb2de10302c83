"""Argument checks shared by every loss.

Each check runs before any kernel, raises ``TypeError`` (wrong kind or dtype)
or ``ValueError`` (wrong shape or value) whose message names the argument and
what was expected, and returns the argument in the form the kernels trust.

The same checks serve the GPU: there the arrays are Numba device views, whose
shape and dtype are read like NumPy's, whose data stay on the device, and
which are never converted or copied.  Checks that must read device memory
(labels in range: a small kernel that sends back one index) live in
``fastloss.cuda._checks``; the GPU branch of a wrapper passes them in.
"""
import operator

import numpy as np
from numba import njit

from fastloss._cache import CACHE
from fastloss._dispatch import on_device
from fastloss.cpu._storage import ready

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_INT64_DTYPE = np.dtype(np.int64)
_INT64_MIN, _INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)
REDUCTIONS = ("mean", "sum", "none")


def as_array(x, name, what="an array"):
    """``x`` as an ndarray (a device array as it is); TypeError naming ``name`` when
    NumPy cannot make an array of it (ragged lists, objects that refuse conversion)."""
    if isinstance(x, np.ndarray) or on_device(x):
        return x
    try:
        return np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - whatever NumPy raises, the caller gets a TypeError
        raise TypeError(f"{name} must be {what}: {exc}") from None


def float_array(x, name):
    """``x`` as an ndarray (or device array) of dtype float16, float32 or float64."""
    x = as_array(x, name, "an array of floats")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float16, float32 or float64, got {x.dtype}")
    return x


def label_array(t, name):
    """``t`` as an int64 ndarray of class indices (any integer dtype accepted;
    a device array keeps its dtype, the kernels widen on load)."""
    t = as_array(t, name, "an array of integer class indices")
    if type(t) is np.ndarray and t.dtype is _INT64_DTYPE:  # the common case, first
        return t
    if t.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer class indices, got dtype {t.dtype}")
    if on_device(t):
        return t
    if t.dtype == np.uint64 and t.size and t.max() > _INT64_MAX:
        raise ValueError(f"{name} holds a class index too large for int64")
    return t.astype(np.int64, copy=False)


@njit(cache=CACHE, nogil=True)
def _first_bad_label(labels, upper, ignore_index):
    for i in range(labels.shape[0]):
        v = labels[i]
        if (v < 0 or v >= upper) and v != ignore_index:
            return i
    return -1


def labels_in_range(labels, upper, name, ignore_index=None, first_bad=None):
    """ValueError unless every label is in ``[0, upper)`` or equals ``ignore_index``.

    ``first_bad(flat, upper, skip)`` is the search: the index of the first
    label of the 1-D ``flat`` outside ``[0, upper)`` that is not ``skip``, or
    -1; by default the host's, and for device labels the GPU's
    (``fastloss.cuda._checks.first_bad_label``), which the GPU branch passes.
    """
    # without an ignore_index the value skipped is 0: in range anyway, where any other
    # sentinel (int64's minimum, say) is a value that a label can hold
    skip = 0 if ignore_index is None else ignore_index
    everything_bad = upper <= 0 and ignore_index is None  # no valid label at all (0 neither)
    flat = labels.reshape(-1) if labels.ndim != 1 else labels
    search = _first_bad_label if first_bad is None else first_bad
    bad = (0 if flat.shape[0] else -1) if everything_bad else search(flat, upper, skip)
    if bad >= 0:
        bad_value = flat[bad] if first_bad is None else flat[bad:bad + 1].copy_to_host()[0]
        allowed = f"[0, {upper})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
        raise ValueError(f"{name}[{bad}] = {bad_value} is out of range: expected {allowed}")


def shape_equal(a, shape, name, expected):
    if a.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({expected}), got {a.shape}")


def scalar(value, name):
    """``value`` as a Python float; TypeError when it is not a real number."""
    if type(value) is float:  # the common case, first: small calls pay for every check
        return value
    if isinstance(value, (str, bytes)):  # float("0.5") would take it
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        return float(operator.index(value)) if isinstance(value, (int, np.integer)) else float(value)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None


def positive(value, name):
    v = scalar(value, name)
    if not v > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return v


def nonnegative(value, name):
    v = scalar(value, name)
    if not v >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return v


def unit_interval(value, name):
    v = scalar(value, name)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return v


def integer(value, name):
    """``value`` as a Python int in int64's range (the kernels' index type)."""
    if type(value) is int and _INT64_MIN <= value <= _INT64_MAX:  # the common case, first
        return value
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if not _INT64_MIN <= v <= _INT64_MAX:
        raise ValueError(f"{name} must fit in int64, got {v}")
    return v


def reduction(value):
    if not isinstance(value, str) or value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {value!r}")
    return value


def weight_vector(w, length, name, dtype):
    """Optional per-class weights: None, or a float vector of shape ``(length,)``."""
    if w is None:
        return None
    w = float_array(w, name)
    shape_equal(w, (length,), name, "one weight per class")
    return w if on_device(w) else np.ascontiguousarray(w, dtype=dtype)


def sample_weights(w, shape, name, dtype):
    """Optional per-sample weights: None, or a float array of exactly ``shape``."""
    if w is None:
        return None
    w = float_array(w, name)
    shape_equal(w, shape, name, "one weight per sample")
    if on_device(w):  # a device view: its GPU branch flattens it
        return w
    return np.ascontiguousarray(w, dtype=dtype).reshape(-1)


def broadcast_weights(w, shape, name):
    """Weights of any float dtype whose shape broadcasts to ``shape`` (without
    enlarging it); shapes only, so device views pass as they are."""
    w = float_array(w, name)
    try:
        broadcast = np.broadcast_shapes(w.shape, shape)
    except ValueError:
        raise ValueError(f"{name} of shape {w.shape} does not broadcast "
                         f"against input of shape {shape}") from None
    if broadcast != shape:
        raise ValueError(f"{name} of shape {w.shape} would broadcast "
                         f"input of shape {shape} to a larger shape")
    return w


def grad_buffer(grad_out, shape, dtype, device=False, name="grad_out"):
    """Checks a caller's ``grad_out`` (named ``name`` in errors): a writable array of
    the gradient's shape and dtype, on the GPU when ``device`` (the inputs' Numba views
    are), else a NumPy array."""
    if not device and ready(grad_out, shape, dtype):  # the common case, compiled
        return grad_out
    if device and not on_device(grad_out):
        raise TypeError(f"{name} must be a CUDA array (the inputs are), got {type(grad_out).__name__}")
    if not device and not isinstance(grad_out, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array on the CPU, got {type(grad_out).__name__}")
    if grad_out.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {grad_out.shape}")
    if grad_out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {grad_out.dtype}")
    if not device and not grad_out.flags.writeable:
        raise ValueError(f"{name} must be writable")
    return grad_out


def class_target(target, logits_shape, ignore_index, first_bad=None):
    """``(labels, None)`` for integer class indices of shape ``logits_shape[:-1]``,
    checked against ``[0, C)`` (``first_bad``: as in ``labels_in_range``);
    ``(None, probs)`` for float probabilities of ``logits_shape``."""
    logits_shape = tuple(logits_shape)  # the simulator's shapes refuse negative indices
    target = as_array(target, "target", "integer class indices or float probabilities")
    if target.dtype.kind in "iu":
        labels = label_array(target, "target")
        shape_equal(labels, logits_shape[:-1], "target", "integer class indices, one per row of logits")
        labels_in_range(labels, logits_shape[-1], "target", ignore_index, first_bad)
        return labels, None
    if target.dtype.kind == "f":
        shape_equal(target, logits_shape, "target", "probabilities of the logits' shape")
        return None, target
    raise TypeError(f"target must hold integer class indices or float probabilities, got dtype {target.dtype}")


def class_logits(logits):
    """Logits of shape ``(..., C)`` with ``C >= 1``."""
    logits = float_array(logits, "logits")
    if logits.ndim < 1 or tuple(logits.shape)[-1] == 0:
        raise ValueError(f"logits must have shape (..., C) with C >= 1, got {logits.shape}")
    return logits


def class_batch(logits, target, sample_weight, grad_out, grad, ignore_index, T, first_bad=None):
    """The per-row arguments of a softmax loss, checked against ``logits (..., C)``:
    ``(labels, probs, sample_weight)`` (see ``class_target``; sample weights as
    a flat ``T`` vector, a device view as it is, or None); ``grad_out`` is checked
    when it will be written."""
    sw = sample_weights(sample_weight, logits.shape[:-1], "sample_weight", T)
    labels, probs = class_target(target, logits.shape, ignore_index, first_bad)
    if grad and grad_out is not None and not ready(grad_out, logits.shape, logits.dtype):
        grad_buffer(grad_out, logits.shape, logits.dtype,
                    type(logits) is not np.ndarray and on_device(logits))  # hasattr's miss is slow
    return labels, probs, sw


def feature_rows(x, name):
    """A float array of shape ``(N, D)``."""
    x = float_array(x, name)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {x.shape}")
    return x


def row_labels(labels, n, name="labels", upper=None, first_bad=None):
    """Integer labels of shape ``(n,)`` as int64, each in ``[0, upper)`` when
    ``upper`` is given (``first_bad``: as in ``labels_in_range``)."""
    labels = label_array(labels, name)
    shape_equal(labels, (n,), name, "one label per row")
    if upper is not None:
        labels_in_range(labels, upper, name, first_bad=first_bad)
    return labels


def centers_array(centers, width, writable):
    """Class centers: an ndarray ``(K, width)`` of float32 or float64, writable
    when it is going to be updated in place."""
    if not isinstance(centers, np.ndarray):
        raise TypeError(f"centers must be a NumPy array (it is updated in place), "
                        f"got {type(centers).__name__}")
    centers_layout(centers, width)
    if writable and not centers.flags.writeable:
        raise ValueError("centers must be writable: it is updated in place (or pass update=False)")
    return centers


def centers_layout(centers, width):
    """Class centers' dtype and shape: float32 or float64, ``(K, width)`` (shapes
    only: device views pass as they are)."""
    if centers.dtype not in FLOAT_DTYPES[1:]:
        raise TypeError(f"centers must have dtype float32 or float64, got {centers.dtype}")
    if centers.ndim != 2 or centers.shape[1] != width:
        raise ValueError(f"centers must have shape (K, {width}) (one row per class, as wide as "
                         f"the features), got {tuple(centers.shape)}")
