"""Helpers of the tests that run on both sides (the ``backend`` fixture, tests/conftest.py).

``import sides`` as ``import naive``: pytest puts this folder on ``sys.path``.
"""
import numpy as np
import pytest

import fastloss as fl
import naive

SIDES = ("cpu", "cuda")


def per_side(rows):
    """The rows ``rows(side)`` of both sides, each led by its side and marked with it (a test
    whose matrix differs per side)."""
    return [pytest.param(side, *row, marks=getattr(pytest.mark, side)) for side in SIDES
            for row in rows(side)]


def bad_input_cases(everywhere, on_the_host):
    """Parameters ``(backend, case)`` of a bad-input test: the cases ``everywhere`` on both
    sides, and the ``on_the_host`` ones (a host array among device ones) on "cuda"."""
    return [pytest.param(side, case, id=f"{side}-{name}", marks=getattr(pytest.mark, side))
            for side in SIDES
            for name, case in {**everywhere, **(on_the_host if side == "cuda" else {})}.items()]


def grad_out_cases(shape):
    """The bad ``grad_out`` of a loss whose gradient has ``shape`` (float32), as
    ``bad_input_cases`` takes them: ``(everywhere, on_the_host)``."""
    shape = tuple(shape)
    wrong = shape[:-1] + (shape[-1] + 1,)
    everywhere = {
        "grad_out of the wrong shape": (lambda put: {"grad_out": put(np.zeros(wrong, np.float32))},
                                        ValueError, "grad_out must have shape"),
        "flat grad_out": (lambda put: {"grad_out": put(np.zeros(int(np.prod(shape)), np.float32))},
                          ValueError, "grad_out must have shape"),
        "grad_out of another dtype": (lambda put: {"grad_out": put(np.zeros(shape))},
                                      TypeError, "grad_out must have dtype"),
    }
    if len(shape) == 2 and shape[0] != shape[1]:
        everywhere["transposed grad_out"] = (
            lambda put: {"grad_out": put(np.zeros(shape[::-1], np.float32))},
            ValueError, "grad_out must have shape")
    on_the_host = {"grad_out on the host": (lambda put: {"grad_out": np.zeros(shape, np.float32)},
                                            TypeError, "grad_out is on cpu")}
    return everywhere, on_the_host


def put(backend, dev, a):
    """``dev.put``, a 0-d array staying 0-d (a device copy of one is 1-d)."""
    if backend == "cuda" and a is not None and np.ndim(a) == 0:
        from numba import cuda
        return cuda.to_device(np.asarray(a))
    return dev.put(a)


def on_side(dev, kw):
    """Keyword arguments with their arrays moved to the test's side."""
    return {k: dev.put(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}


def on_host(res, dev):
    """A ``LossGrad`` with its arrays on the host."""
    return fl.LossGrad(dev.get(res.loss), dev.get(res.grad))


def assert_same_as_cpu(backend, got, fn, x, *args, loss_scale=None, **kw):
    """On the "cuda" side, the GPU's answer ``got`` (on the host) against the CPU path's,
    ``fn(x, *args, **kw)``."""
    if backend == "cuda":
        cpu = fn(x, *args, **kw)
        naive.assert_close(got.loss, cpu.loss, x.dtype, scale=loss_scale, what="loss, GPU vs CPU")
        if cpu.grad is not None:
            naive.assert_close(got.grad, cpu.grad, x.dtype, what="grad, GPU vs CPU")


def assert_rejected_unchanged(dev, fn, names, second, x, case, fill=123.0):
    """A bad-input case ``(bad, error, match)``: ``fn(first, second, grad_out=..., **kw)``
    with the case's keyword arguments ``bad(dev.put)`` (which may replace the arguments
    ``names``) raises ``error`` matching ``match``, in place and into a buffer (or into
    the case's own grad_out), and writes neither ``x`` nor the buffer."""
    bad, error, match = case
    first_name, second_name = names
    d_x = dev.put(x)
    kw = bad(dev.put)
    if "grad_out" in kw:
        outs = [kw.pop("grad_out")]  # the case's own
    elif first_name in kw:
        outs = [None]  # no buffer of the bad input's dtype
    else:
        outs = [d_x, dev.put(np.full_like(x, fill))]  # in place, and into a buffer
    args = [kw.pop(first_name, d_x), kw.pop(second_name, dev.put(second))]
    befores = [None if o is None else np.array(dev.get(o), copy=True) for o in outs]
    for out in outs:
        with pytest.raises(error, match=match):
            fn(*args, grad_out=out, **kw)
    np.testing.assert_array_equal(dev.get(d_x), x)
    for out, before in zip(outs, befores):
        if out is not None:
            np.testing.assert_array_equal(dev.get(out), before)
