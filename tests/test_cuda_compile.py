"""Every CUDA kernel compiles for a real GPU (sm_90, the H100/H200), without one.

The simulator runs kernels as Python and lets through what a GPU rejects
(runtime-sized shared arrays, warp shuffles it does not have, float64 where
float32 was meant...); ``numba.cuda.compile_ptx`` runs the real compiler
(NVVM).  This runs in the main pytest process, which must not have the
simulator enabled, and needs numba-cuda with its CUDA toolkit wheels (the
``cuda`` extra); without them it is skipped.
"""
import importlib
import os
import pkgutil
import re
import types as pytypes

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("the PTX compile check needs the real compiler, not the simulator",
                allow_module_level=True)
cuda = pytest.importorskip("numba.cuda")
pytest.importorskip("numba_cuda")

import fastloss.cuda  # noqa: E402


def _kernel_modules():
    names = [m.name for m in pkgutil.iter_modules(fastloss.cuda.__path__)]
    return [importlib.import_module(f"fastloss.cuda.{n}") for n in sorted(names)]


def _cases():
    cases = []
    for module in _kernel_modules():
        if hasattr(module, "ptx_signatures"):
            for i, (kernel, sig) in enumerate(module.ptx_signatures()):
                cases.append(pytest.param(kernel, sig, id=f"{module.__name__.rsplit('.', 1)[1]}-"
                                                         f"{kernel.py_func.__name__}-{i}"))
    return cases


@pytest.fixture(autouse=True)
def _sm90_without_a_gpu(monkeypatch):
    # Device functions are compiled for "the current device", which needs a
    # driver; give the compiler the H200's compute capability instead.
    import numba.cuda.dispatcher as dispatcher
    monkeypatch.setattr(dispatcher, "get_current_device",
                        lambda: pytypes.SimpleNamespace(compute_capability=(9, 0)))


def _nothing():
    pass


def _nvvm_available():
    try:
        cuda.compile_ptx(_nothing, (), cc=(9, 0))
    except Exception as exc:  # pragma: no cover - depends on the installed toolkit
        return str(exc)
    return None


def test_every_kernel_module_declares_its_signatures():
    kernels = set()
    for module in _kernel_modules():
        declared = {k.py_func.__name__ for k, _ in getattr(module, "ptx_signatures", lambda: [])()}
        jitted = {name for name, obj in vars(module).items()
                  if type(obj).__name__ == "CUDADispatcher" and not obj.targetoptions.get("device")
                  and obj.py_func.__module__ == module.__name__}
        assert jitted <= declared, f"{module.__name__}: kernels without ptx_signatures: {jitted - declared}"
        kernels |= declared
    assert "cross_entropy_kernel" in kernels


@pytest.mark.parametrize("kernel, sig", _cases())
def test_kernel_compiles_to_ptx(kernel, sig):
    missing = _nvvm_available()
    if missing:
        pytest.skip(f"NVVM is not available: {missing}")
    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
    assert ".target sm_90" in ptx
    assert re.search(r"\.entry\s", ptx), "no kernel entry point in the PTX"


def test_float32_cross_entropy_loop_has_no_float64_math():
    # Python literals are float64 in Numba: a slip makes a float32 kernel run
    # in float64.  The only float64 arithmetic allowed is the block reductions'.
    from numba import types
    from fastloss.cuda.cross_entropy import cross_entropy_kernel
    T = types.float32
    sig = (T[:, :], types.int64[::1], types.none, types.none, types.none, types.int64, T, T, T,
           types.none, T[:, :], T[::1])
    ptx, _ = cuda.compile_ptx(cross_entropy_kernel.py_func, sig, cc=(9, 0))
    assert "ex2.approx.f32" in ptx or "ex2.approx.ftz.f32" in ptx  # expf on the row
    # exp in float64 would call a long software sequence with many fma.rn.f64;
    # the tree reductions use a handful (merge_online's exp, one per level).
    assert len(re.findall(r"fma\.rn\.f64", ptx)) <= 20
