"""CUDA arrays in and out of the kernels, without copies.

Inputs exposing ``__cuda_array_interface__`` (CuPy, Numba device arrays,
PyTorch CUDA tensors) become zero-copy Numba views; Numba device arrays (and
the simulator's, which carry ``__cuda_ndarray__`` instead) are used as they
are.  Outputs are allocated by the library of the call's main input, so that
CuPy's and PyTorch's memory pools serve them and the caller gets back the kind
of array it passed in: CuPy in, CuPy out; Numba device array in, device array
out; PyTorch in, PyTorch out.  With ``backend="cuda"`` and NumPy inputs, the
inputs are copied to the GPU and the results copied back as NumPy arrays.

Kernels run on the legacy default stream, so they are ordered after work that
CuPy or PyTorch queued on their default streams; no call synchronises unless a
check must read data back (labels out of range) or the caller asked for NumPy.
"""
import numpy as np

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


class Device:
    """One call's GPU: views of its inputs, and outputs of the main input's kind."""

    def __init__(self, main):
        self.cuda = cuda_module()
        self.kind = array_kind(main)
        self.like = main

    def view(self, a, name):
        """A Numba device view of ``a`` (None stays None); host values are copied over."""
        if a is None:
            return None
        if getattr(a, "__cuda_ndarray__", False):
            return a
        if hasattr(a, "__cuda_array_interface__"):
            return self.cuda.as_cuda_array(a, sync=False)
        try:
            host = np.ascontiguousarray(np.asarray(a))
        except Exception as exc:
            raise TypeError(f"{name} must be an array: {exc}") from None
        if host.dtype == object:
            raise TypeError(f"{name} must be an array of numbers, got dtype object")
        return self.cuda.to_device(host)

    def views(self, **named):
        """``view`` of each keyword argument, in order."""
        return tuple(self.view(a, name) for name, a in named.items())

    def empty(self, shape, dtype):
        """``(native, view)``: a new array of the main input's kind and its Numba view."""
        shape, dtype = tuple(shape), np.dtype(dtype)
        if self.kind == "cupy":
            import cupy
            native = cupy.empty(shape, dtype)
            return native, self.cuda.as_cuda_array(native, sync=False)
        if self.kind == "torch":
            import torch
            tdtype = torch.from_numpy(np.empty(0, dtype)).dtype
            native = torch.empty(shape, dtype=tdtype, device=self.like.device)
            return native, self.cuda.as_cuda_array(native, sync=False)
        native = self.cuda.device_array(shape, dtype)
        return native, native

    def zeros(self, shape, dtype):
        native, view = self.empty(shape, dtype)
        fill(view.reshape(-1) if view.ndim != 1 else view, 0.0)
        return native, view

    def give(self, native, shape=None):
        """``native`` (from ``empty``) as returned to the caller, reshaped to ``shape``."""
        if shape is not None and tuple(native.shape) != tuple(shape):
            native = native.reshape(shape)
        if self.kind == "numpy":
            return native.copy_to_host()
        if self.kind == "numba" and native.ndim == 0:
            return _with_float(native)
        return native


    def give_grad(self, native, caller_grad_out):
        """The gradient as returned: the caller's own ``grad_out`` when one was
        given (written through its view; with NumPy inputs, ``backend="cuda"``,
        copied back into it), else ``native`` (copied to NumPy with NumPy inputs)."""
        if native is None:
            return None
        if self.kind != "numpy":
            return native if caller_grad_out is None else caller_grad_out
        host = native.copy_to_host()
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
    shape), else the 2-D strided array itself (read by ``_blocks.element``).
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


def fill(view, value):
    """Set every element of a 1-D device array (launch on the default stream)."""
    from fastloss.cuda._blocks import fill_kernel, grid_for
    blocks, threads = grid_for(view.shape[0])
    fill_kernel[blocks, threads](view, value)
