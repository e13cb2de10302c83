"""CUDA arrays in and out of the kernels, without copies, on the caller's stream.

Inputs exposing ``__cuda_array_interface__`` (CuPy, Numba device arrays,
PyTorch CUDA tensors) become zero-copy Numba views; Numba device arrays (and
the simulator's, which carry ``__cuda_ndarray__`` instead) are used as they
are.  Outputs are allocated by the library of the call's main input, so that
CuPy's and PyTorch's memory pools serve them and the caller gets back the kind
of array it passed in: CuPy in, CuPy out; Numba device array in, device array
out; PyTorch in, PyTorch out.  With ``backend="cuda"`` and NumPy inputs, the
inputs are copied to the GPU and the results copied back as NumPy arrays.

Streams (SPEC, "Where the work runs"): a call runs on the caller's current
stream: CuPy's current stream for CuPy inputs, PyTorch's for tensors, else the
stream that the main input's ``__cuda_array_interface__`` (version 3) names,
else the legacy default stream.  ``Device`` wraps it once
(``cuda.external_stream``) and every launch (``Device.launch``), copy and
allocation of the call goes to it, so the call is ordered with the caller's
work as one of that library's own operations would be, and its outputs, taken
from the caller's pool on that stream, are not handed out again while it
writes them.  An input whose interface names another stream is waited for on
the device (an event recorded there, waited on by the call's stream), not by
the host: that is version 3's synchronisation, without blocking.  Nothing
synchronises the host unless a check must read data back (labels out of
range) or the caller asked for NumPy.  The inputs' device (CuPy's and
PyTorch's own record of it) is made current around each launch, copy and
allocation when it is not already.

A call's own small buffers (``Device.scratch``) come from the caller's pool
too; Numba and NumPy calls, which have none, reuse buffers kept per host
thread, device and stream instead of allocating (and later freeing) new ones.
"""
import contextlib
import math
import os
import threading

import numpy as np

_SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

INSTALL_HINT = "install the CUDA extra: pip install 'fastloss[cuda]'"


def cuda_module():
    """``numba.cuda``, or a RuntimeError saying why the GPU cannot be used."""
    try:
        from numba import cuda
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(f"fastloss: the CUDA backend needs numba-cuda ({INSTALL_HINT})") from exc
    if not cuda.is_available():
        raise RuntimeError("fastloss: the CUDA backend was asked for, but no CUDA GPU (or driver) "
                           "is available on this machine; pass NumPy arrays or backend='cpu'")
    return cuda


def array_kind(a):
    """'numpy', 'cupy', 'torch' or 'numba' (any other CUDA array)."""
    if isinstance(a, np.ndarray):
        return "numpy"
    top = type(a).__module__.split(".", 1)[0]
    return top if top in ("cupy", "torch") else ("numpy" if not _on_device(a) else "numba")


def _on_device(a):
    return hasattr(a, "__cuda_array_interface__") or getattr(a, "__cuda_ndarray__", False)


def _with_float(view):
    """A 0-d Numba device array that also answers ``float()`` (SPEC: ``float(loss)``
    works), by one copy of the scalar to the host."""
    base = type(view)
    cls = _SCALAR_CLASSES.get(base)
    if cls is None:
        cls = _SCALAR_CLASSES[base] = type(
            "Scalar" + base.__name__, (base,),
            {"__float__": lambda self: float(self.copy_to_host()),
             "__doc__": "A 0-d device array that float() copies to the host."})
    view.__class__ = cls
    return view


_SCALAR_CLASSES = {}


# CUDA Array Interface stream values that are not pointers (version 3)
_LEGACY_DEFAULT_STREAM = 1
_PER_THREAD_DEFAULT_STREAM = 2


def interface_stream(a):
    """The stream handle that ``a``'s ``__cuda_array_interface__`` names, or None
    (no interface, version 2, or no synchronisation asked for)."""
    iface = getattr(a, "__cuda_array_interface__", None)
    return None if iface is None else iface.get("stream")


def caller_stream(main, kind):
    """``(stream handle, device index)`` of a call whose main input is ``main``
    (None for each that the input does not say: the legacy default stream, the
    current device)."""
    if kind == "cupy":
        import cupy
        with cupy.cuda.Device(main.device.id):
            return cupy.cuda.get_current_stream().ptr, main.device.id
    if kind == "torch":
        import torch
        return torch.cuda.current_stream(main.device).cuda_stream, main.device.index
    if kind == "numba":
        return interface_stream(main), None
    return None, None


def _stream_key(handle):
    """``handle`` with the legacy default stream's three spellings (None, 0 and
    CAI's 1) made one, so that streams compare by what they are."""
    return _LEGACY_DEFAULT_STREAM if handle in (None, 0) else handle


def external_stream(cuda, handle):
    """A Numba stream for the handle ``handle`` (a pointer, 0 or None: the legacy
    default stream, or CAI's 1 and 2)."""
    if _stream_key(handle) == _LEGACY_DEFAULT_STREAM:
        return cuda.legacy_default_stream()
    if handle == _PER_THREAD_DEFAULT_STREAM:
        return cuda.per_thread_default_stream()
    return cuda.external_stream(handle)


# events only to order streams: no timestamps (the simulator's take no arguments)
_NO_TIMING = {} if _SIMULATOR else {"timing": False}

SCRATCH_CACHE_BYTES = 64 * 1024  # the largest scratch buffer kept from call to call
# per thread: {(device id, stream, slot, dtype): (context, 1-D device array)}
_SCRATCH = threading.local()


class Device:
    """One call's GPU: its device and stream (the caller's), views of its inputs,
    outputs of the main input's kind, and the launches, copies and allocations
    of the call, all on that stream."""

    def __init__(self, main):
        self.cuda = cuda_module()
        self.kind = array_kind(main)
        self.like = main
        handle, index = caller_stream(main, self.kind)
        self._gpu = None
        if index is not None and index != self.cuda.get_current_device().id:
            self._gpu = self.cuda.gpus[index]
        # a Numba array bound to a stream (the views of a Device are bound to its
        # call's) names no other: that stream is the caller's
        bound = getattr(main, "stream", 0) if self.kind == "numba" else 0
        if handle is None and bound != 0:
            self.stream = bound
            handle = int(bound) if hasattr(bound, "__int__") else None
            # a stream without a handle (the simulator's) is its own key: held by the key,
            # it stays alive and its id is not reused
            self._scratch_stream = bound if handle is None else _stream_key(handle)
        else:
            with self.current():
                self.stream = external_stream(self.cuda, handle)
            self._scratch_stream = _stream_key(handle)
        self.handle = handle
        self._device_context = None

    def current(self):
        """A context in which the inputs' device is current (nothing to do when it is)."""
        return contextlib.nullcontext() if self._gpu is None else self._gpu

    def launch(self, kernel, blocks, threads, *args):
        """``kernel(*args)`` on the call's stream and device (``_blocks.launch``)."""
        from fastloss.cuda._blocks import launch
        with self.current():
            launch(kernel, blocks, threads, self.stream, *args)

    def _after(self, a):
        """Order the call's stream after the stream that ``a``'s interface names,
        when that is another one (CAI version 3), by an event: the host does not wait."""
        handle = interface_stream(a)
        if handle is None or _stream_key(handle) == _stream_key(self.handle):
            return
        event = self.cuda.event(**_NO_TIMING)
        event.record(stream=external_stream(self.cuda, handle))
        event.wait(stream=self.stream)

    def view(self, a, name):
        """A Numba device view of ``a`` (None stays None) bound to the call's stream;
        host values are copied over on it."""
        if a is None:
            return None
        if getattr(a, "__cuda_ndarray__", False):
            with self.current():
                self._after(a)
            return a.bind(self.stream)
        if hasattr(a, "__cuda_array_interface__"):
            with self.current():
                self._after(a)
                # sync=False: the event above orders the call after a's stream
                return self.cuda.as_cuda_array(a, sync=False).bind(self.stream)
        if name.startswith("grad_out") and isinstance(a, np.ndarray) and not a.flags.writeable:
            # the gradient is copied back into it at the end: refused now, before anything runs
            raise ValueError(f"{name} must be writable")
        try:
            host = np.ascontiguousarray(np.asarray(a))
        except Exception as exc:
            raise TypeError(f"{name} must be an array: {exc}") from None
        if host.dtype == object:
            raise TypeError(f"{name} must be an array of numbers, got dtype object")
        with self.current():
            return self.cuda.to_device(host, stream=self.stream)

    def views(self, **named):
        """``view`` of each keyword argument, in order."""
        return tuple(self.view(a, name) for name, a in named.items())

    def empty(self, shape, dtype):
        """``(native, view)``: a new array of the main input's kind, from its
        library's memory pool on the call's stream, and its Numba view."""
        shape, dtype = tuple(shape), np.dtype(dtype)
        if self.kind == "cupy":
            import cupy
            with cupy.cuda.Device(self.like.device.id):
                native = cupy.empty(shape, dtype)  # on CuPy's current stream: the call's
        elif self.kind == "torch":
            import torch
            tdtype = torch.from_numpy(np.empty(0, dtype)).dtype
            native = torch.empty(shape, dtype=tdtype, device=self.like.device)
        else:
            with self.current():
                native = self.cuda.device_array(shape, dtype, stream=self.stream)
            return native, native
        with self.current():
            return native, self.cuda.as_cuda_array(native, sync=False).bind(self.stream)

    def scratch(self, shape, dtype, slot=None):
        """A Numba view, bound to the call's stream, of an array for the call's own
        use (counters, denominators, partial sums), its content undefined.

        CuPy and PyTorch calls take a new array from their library's pool (the
        view holds it until dropped).  Numba and NumPy calls have no pool: a
        buffer of at most ``SCRATCH_CACHE_BYTES`` named by ``slot`` (its role,
        unique among the buffers one call holds at once) is a view of the first
        elements of one 1-D buffer kept per host thread, device, stream, slot and
        dtype, replaced by a larger one when a call needs more; larger buffers,
        and any without a ``slot``, are allocated per call.  Reusing it is sound
        as the pools' caching is: work on one stream runs in order, so a later
        call's kernels start after the earlier call's are done with it; no two
        host threads share one; and streams are told apart by their handle, as
        CuPy's and PyTorch's allocators tell them."""
        shape, dtype = tuple(shape), np.dtype(dtype)
        count = math.prod(shape)
        if (slot is None or self.kind in ("cupy", "torch") or count == 0
                or count * dtype.itemsize > SCRATCH_CACHE_BYTES):
            return self.empty(shape, dtype)[1]
        cache = getattr(_SCRATCH, "buffers", None)
        if cache is None:
            cache = _SCRATCH.buffers = {}
        device, context = self._scratch_context()
        key = (device, self._scratch_stream, slot, dtype)
        held = cache.get(key)
        if held is None or held[0] is not context or held[1].shape[0] < count:
            # kept unbound: the cache does not keep the caller's stream object alive
            held = cache[key] = (context, self.empty((count,), dtype)[1].bind(0))
        buffer = held[1]
        view = buffer if buffer.shape[0] == count else buffer[:count]
        return (view if shape == (count,) else view.reshape(shape)).bind(self.stream)

    def _scratch_context(self):
        """``(device id, context)``: the inputs' device and Numba's context on it, which
        a cached buffer must have been allocated in (``cuda.close()`` makes a new one,
        and the old one's memory is gone).  The simulator has one device and no
        lasting context object: ``(0, None)``."""
        if self._device_context is None:
            if _SIMULATOR:
                self._device_context = (0, None)
            else:
                with self.current():
                    context = self.cuda.current_context()
                self._device_context = (context.device.id, context)
        return self._device_context

    def zeros(self, shape, dtype):
        native, view = self.empty(shape, dtype)
        fill(self, view.reshape(-1) if view.ndim != 1 else view, 0.0)
        return native, view

    def to_host(self, view):
        """A NumPy copy of ``view``, once the call's stream has reached it."""
        with self.current():
            host = view.copy_to_host(stream=self.stream)
            self.stream.synchronize()
        return host

    def give(self, native, shape=None):
        """``native`` (from ``empty``) as returned to the caller, reshaped to ``shape``."""
        if shape is not None and tuple(native.shape) != tuple(shape):
            native = native.reshape(shape)
        if self.kind == "numpy":
            return self.to_host(native)
        if self.kind == "numba":  # Numba's reshape forgets the stream: the caller's copies use it
            native = native.bind(self.stream)
            return _with_float(native) if native.ndim == 0 else native
        return native

    def give_grad(self, native, caller_grad_out):
        """The gradient as returned: the caller's own ``grad_out`` when one was
        given (written through its view; with NumPy inputs, ``backend="cuda"``,
        copied back into it), else ``native`` (copied to NumPy with NumPy inputs)."""
        if native is None:
            return None
        if self.kind != "numpy":
            return native if caller_grad_out is None else caller_grad_out
        host = self.to_host(native)
        if caller_grad_out is None:
            return host
        np.copyto(caller_grad_out, host)
        return caller_grad_out


def compute_type(dtype):
    """The kernels' arithmetic: float64 for float64 arrays, else float32."""
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def rows(view, width, name):
    """A 2-D ``(n, width)`` view of an array of shape ``(..., width)`` (1-D
    ``(n,)`` when ``width`` is None), without a copy.  Leading dimensions that
    cannot be merged without a copy (a transposed 3-D batch, say) are refused."""
    shape = tuple(view.shape)
    target = (-1,) if width is None else (-1, width)
    if len(shape) == len(target):
        return view
    if view.size == 0 or view.is_c_contiguous():
        n = int(np.prod(shape[:len(shape) - len(target) + 1]))
        return view.reshape((n,) if width is None else (n, width))
    raise ValueError(f"{name} of shape {shape} is not contiguous: on the GPU, arrays with more "
                     f"than {len(target)} dimension(s) must be C-contiguous (pass a contiguous copy)")


def flat(view, name):
    """All elements of ``view`` in C order, for the elementwise kernels, without
    a copy: a 1-D view (1-D arrays, strided or not, and contiguous arrays of any
    shape), else the 2-D strided array itself (read by ``_reduction.element_at``).
    Strided arrays of more than two dimensions are refused."""
    shape = tuple(view.shape)
    if len(shape) == 1:
        return view
    if view.size == 0 or view.is_c_contiguous():
        return view.reshape((view.size,))
    if len(shape) == 2:
        return view
    raise ValueError(f"{name} of shape {shape} is not contiguous: on the GPU, arrays with more "
                     f"than 2 dimensions must be C-contiguous (pass a contiguous copy)")


def fill(dev, view, value):
    """Set every element of a 1-D device array, on the call's stream."""
    from fastloss.cuda._blocks import fill_kernel, grid_for
    blocks, threads = grid_for(view.shape[0])
    dev.launch(fill_kernel, blocks, threads, view, value)
