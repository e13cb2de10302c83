"""Where the work runs: the one dispatcher of fastloss.

NumPy arrays, Python scalars and lists live on the CPU; anything exposing
``__cuda_array_interface__`` (CuPy, Numba device arrays, PyTorch CUDA tensors),
or Numba's simulator device arrays (``__cuda_ndarray__``), lives on the GPU.
"""
import os

import numpy as np

BACKENDS = ("auto", "cpu", "cuda")
ENV_VARIABLE = "FASTLOSS_BACKEND"


def _environment_reader():
    """A function returning ``os.environ.get(ENV_VARIABLE)``, read on every call.

    ``os.environ.get`` of an unset variable raises and catches a KeyError
    inside ``os.environ``, which costs as much as a small call's kernel; the
    mapping behind ``os.environ`` (CPython's ``_data``, which every assignment
    to ``os.environ`` updates) answers the same question with a dict lookup.
    """
    data = getattr(os.environ, "_data", None)
    encode = getattr(os.environ, "encodekey", None)
    decode = getattr(os.environ, "decodevalue", None)
    if not isinstance(data, dict) or encode is None or decode is None:
        return lambda: os.environ.get(ENV_VARIABLE)
    key = encode(ENV_VARIABLE)

    def read():
        raw = data.get(key)
        return None if raw is None else decode(raw)
    return read


environment_backend = _environment_reader()


def on_device(a):
    """Whether ``a`` is a CUDA array (checked without importing any CUDA machinery)."""
    return hasattr(a, "__cuda_array_interface__") or getattr(a, "__cuda_ndarray__", False)


def _device_of(a):
    """'cuda', 'cpu', or None for a value that lives nowhere (None, scalars)."""
    if type(a) is np.ndarray:
        return "cpu"
    if a is None or isinstance(a, (bool, int, float)):
        return None
    return "cuda" if on_device(a) else "cpu"


def _devices(named):
    """The device every array of ``named`` lives on; TypeError when they differ."""
    found = None  # (device, name)
    for name, a in named:
        dev = _device_of(a)
        if dev is None:
            continue
        if found is None:
            found = (dev, name)
        elif dev != found[0]:
            raise TypeError(
                f"{name} is on {dev} but {found[1]} is on {found[0]}: "
                "all array arguments must live on the same device"
            )
    return "cpu" if found is None else found[0]


def backend_of(*arrays):
    """The backend, ``"cpu"`` or ``"cuda"``, that the arrays live on.

    NumPy arrays, lists and scalars are ``"cpu"``; arrays exposing
    ``__cuda_array_interface__`` (CuPy, Numba device arrays, PyTorch CUDA
    tensors) are ``"cuda"``.  Mixing the two raises ``TypeError`` naming the
    offending argument (by position).  ``None`` arguments are skipped; no
    arrays at all means ``"cpu"``.  This is the rule every loss applies to its
    array arguments under ``backend="auto"`` (where ``FASTLOSS_BACKEND``, when
    set, overrides it); ``backend_of`` itself ignores the variable and imports
    no CUDA machinery.

    Args:
      *arrays: any number of arrays, lists, scalars or ``None``, of any shape.

    Returns:
      ``"cpu"`` or ``"cuda"``.

    Example:
      >>> import numpy as np, fastloss as fl
      >>> fl.backend_of(np.zeros(3), [1, 2])
      'cpu'
      >>> fl.backend_of()
      'cpu'
      >>> class OnGpu:  # anything exposing __cuda_array_interface__ is a CUDA array
      ...     __cuda_array_interface__ = {}
      >>> fl.backend_of(None, OnGpu())
      'cuda'
      >>> fl.backend_of(np.zeros(3), OnGpu())
      Traceback (most recent call last):
      ...
      TypeError: argument 1 is on cuda but argument 0 is on cpu: all array arguments must live on the same device
    """
    return _devices((f"argument {i}", a) for i, a in enumerate(arrays))


def is_dask(a):
    """Whether ``a`` is a Dask collection, read from its type's module: Dask is never imported."""
    return type(a).__module__.startswith("dask")


def select_backend(backend, **arrays):
    """Resolve ``backend=`` ("auto" reads ``FASTLOSS_BACKEND``) against the arrays.

    Returns ``"cpu"`` or ``"cuda"``, or ``"dask"`` when any array is a Dask array
    (whatever ``backend`` says: the wrapper then hands the call to
    ``fastloss._dask``, whose chunks run with that ``backend``).  Dask is looked for
    only past the all-NumPy fast path, so a NumPy call pays nothing for it.
    Whether a GPU is really there is checked later, by
    ``fastloss.cuda._arrays.cuda_module``, so that this module never imports CUDA
    machinery.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = environment_backend() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VARIABLE} must be one of {BACKENDS}, got {backend!r}")
    if backend != "cuda":
        for a in arrays.values():
            if a is not None and type(a) is not np.ndarray:
                break
        else:
            return "cpu"  # the common case, decided without naming anything
    if any(is_dask(a) for a in arrays.values()):
        return "dask"
    where = _devices(arrays.items())
    if backend == "cpu" and where == "cuda":
        name = next(n for n, a in arrays.items() if _device_of(a) == "cuda")
        raise TypeError(f"backend='cpu' but {name} is a CUDA array; copy it to the host first")
    return "cuda" if backend == "cuda" or where == "cuda" else "cpu"
