"""The dispatcher: backend_of, backend=, FASTLOSS_BACKEND, and arrays on two devices.

No GPU is needed: a stand-in object exposing ``__cuda_array_interface__`` is
all the dispatcher looks at, and it must never be read.  On a machine with no
GPU, asking for the GPU gives a clear RuntimeError (the GPU path itself is
tested under the simulator, in tests/cuda).
"""
import ast
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import fastloss as fl


def _gpu_present():
    try:
        from numba import cuda
        return bool(cuda.is_available())
    except Exception:
        return False


no_gpu = pytest.mark.skipif(_gpu_present(), reason="checks the error of a machine without a GPU")


class FakeCudaArray:
    """Looks like a CUDA array to the dispatcher; fails loudly if anything reads it."""

    def __init__(self, shape, dtype=np.float32):
        self.shape = shape
        self.dtype = np.dtype(dtype)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (0, False), "version": 3}

    def __array__(self, *args, **kwargs):
        raise AssertionError("the dispatcher must not copy a CUDA array to the host")


class FakeSimulatorArray:
    """Numba's CUDA simulator arrays carry __cuda_ndarray__ instead of the interface."""

    __cuda_ndarray__ = True

    def __array__(self, *args, **kwargs):
        raise AssertionError("the dispatcher must not copy a CUDA array to the host")


def test_backend_of_cpu_values():
    assert fl.backend_of(np.zeros(3), [1.0, 2.0], 3.0, None) == "cpu"
    assert fl.backend_of() == "cpu"


def test_backend_of_cuda_values():
    assert fl.backend_of(FakeCudaArray((2, 3)), None, 1.5) == "cuda"
    assert fl.backend_of(FakeSimulatorArray()) == "cuda"


def test_backend_of_mixed_names_the_argument():
    with pytest.raises(TypeError, match="argument 1"):
        fl.backend_of(FakeCudaArray((2,)), np.zeros(2))


CALLS = {
    "softmax_cross_entropy": lambda x, t, **kw: fl.softmax_cross_entropy(x, t, **kw),
    "focal_loss": lambda x, t, **kw: fl.focal_loss(x, t, **kw),
    "sigmoid_focal_loss": lambda x, t, **kw: fl.sigmoid_focal_loss(x, t, **kw),
    "huber_loss": lambda x, t, **kw: fl.huber_loss(x, t, **kw),
}


def _target(name):
    return np.array([0, 1]) if name in ("softmax_cross_entropy", "focal_loss") else np.zeros((2, 3), np.float32)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_mixed_devices_is_type_error_naming_the_argument(name):
    with pytest.raises(TypeError, match="is on cuda") as info:
        CALLS[name](np.zeros((2, 3), np.float32), _target(name), grad_out=FakeCudaArray((2, 3)))
    assert "grad_out" in str(info.value)


@no_gpu
@pytest.mark.parametrize("name", sorted(CALLS))
def test_cuda_inputs_without_a_gpu_raise_a_clear_error(name):
    with pytest.raises(RuntimeError, match="CUDA"):
        CALLS[name](FakeCudaArray((2, 3)), FakeCudaArray((2, 3)))


@no_gpu
@pytest.mark.parametrize("name", sorted(CALLS))
def test_backend_cuda_without_a_gpu_raises_a_clear_error(name):
    with pytest.raises(RuntimeError, match="CUDA"):
        CALLS[name](np.zeros((2, 3), np.float32), _target(name), backend="cuda")


def test_backend_cpu_with_cuda_array_is_type_error():
    with pytest.raises(TypeError, match="logits"):
        fl.softmax_cross_entropy(FakeCudaArray((2, 3)), np.array([0, 1]), backend="cpu")


@pytest.mark.parametrize("backend", ["tpu", np.array(["cpu"]), None, 0])
def test_unknown_backend_is_value_error(backend):
    with pytest.raises(ValueError, match="backend must be one of"):
        fl.huber_loss(np.zeros(3), np.zeros(3), backend=backend)


def test_environment_variable_is_read_on_every_call(monkeypatch):
    # read through os.environ's own mapping (fast); it must see every change made to os.environ
    x = np.zeros((2, 3), np.float32)
    for value in ["gpu", "tpu"]:
        monkeypatch.setenv("FASTLOSS_BACKEND", value)
        with pytest.raises(ValueError, match=f"FASTLOSS_BACKEND must be one of .*'{value}'"):
            fl.softmax_cross_entropy(x, np.array([0, 1]))
    monkeypatch.delenv("FASTLOSS_BACKEND")
    assert np.isclose(float(fl.softmax_cross_entropy(x, np.array([0, 1])).loss), np.log(3))


def test_environment_variable_sets_the_default(monkeypatch):
    x = np.zeros((2, 3), np.float32)
    monkeypatch.setenv("FASTLOSS_BACKEND", "cuda")
    if not _gpu_present():
        with pytest.raises(RuntimeError, match="CUDA"):
            fl.softmax_cross_entropy(x, np.array([0, 1]))
    # an explicit backend= wins over the environment
    assert np.isfinite(float(fl.softmax_cross_entropy(x, np.array([0, 1]), backend="cpu").loss))
    monkeypatch.setenv("FASTLOSS_BACKEND", "cpu")
    assert np.isclose(float(fl.softmax_cross_entropy(x, np.array([0, 1])).loss), np.log(3))
    monkeypatch.setenv("FASTLOSS_BACKEND", "gpu")
    with pytest.raises(ValueError, match="FASTLOSS_BACKEND"):
        fl.softmax_cross_entropy(x, np.array([0, 1]))


def test_import_loads_no_cuda_machinery():
    # a fresh interpreter: neither numba.cuda nor CuPy nor fastloss.cuda is imported
    code = (
        "import sys, fastloss\n"
        "loaded = [m for m in ('numba.cuda', 'numba_cuda', 'cupy', 'fastloss.cuda') if m in sys.modules]\n"
        "sys.exit(', '.join(loaded) or None)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_import_compiles_nothing():
    # a fresh interpreter: importing fastloss must not compile (or load) any kernel
    code = (
        "import fastloss, sys\n"
        "from numba.core.dispatcher import Dispatcher\n"
        "import gc\n"
        "compiled = [d for d in gc.get_objects() if isinstance(d, Dispatcher) and d.overloads]\n"
        "sys.exit(len(compiled))\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_environment_reader_falls_back_to_os_environ_get(monkeypatch):
    # where os.environ has no CPython-style mapping behind it, the reader asks it directly
    from fastloss import _dispatch
    monkeypatch.setattr(_dispatch.os, "environ", {"FASTLOSS_BACKEND": "cpu"})
    read = _dispatch._environment_reader()
    assert read() == "cpu"
    _dispatch.os.environ["FASTLOSS_BACKEND"] = "cuda"
    assert read() == "cuda"
    del _dispatch.os.environ["FASTLOSS_BACKEND"]
    assert read() is None


LOWER_MODULES = ("_cache.py", "_dispatch.py", "_validation.py", "_reduction.py", "_result.py",
                 "cpu/_storage.py", "formulas/huber.py")


@pytest.mark.parametrize("path", LOWER_MODULES)
def test_lower_modules_import_neither_the_package_root_nor_cuda(path):
    # the layers: what the wrappers and both backends stand on imports none of them at
    # module level (the dispatcher and the checks reach the GPU only through the wrappers)
    tree = ast.parse((pathlib.Path(fl.__file__).parent / path).read_text())
    for node in tree.body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [f"{node.module}.{a.name}" for a in node.names]  # a module or a name in it
        else:
            continue
        assert "fastloss" not in names, f"{path} imports the package root"
        assert not any(n.startswith("fastloss.cuda") for n in names), f"{path} imports {names}"
