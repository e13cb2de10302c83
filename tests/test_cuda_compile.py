"""Every CUDA kernel compiles for a real GPU (sm_90, the H100/H200), without one,
and launches there.

The simulator runs kernels as Python and lets through what a GPU rejects
(runtime-sized shared arrays, warp shuffles it does not have, float64 where
float32 was meant, blocks with more registers than an SM holds...);
``numba.cuda.compile_ptx`` runs the real compiler (NVVM), and ``ptxas -v``
(the ``nvidia-cuda-nvcc`` wheel) the assembler, which reports each kernel's
registers and spills.  This runs in the main pytest process, which must not
have the simulator enabled, and needs numba-cuda with its CUDA toolkit wheels
(the ``cuda`` extra); without them it is skipped, and without ``ptxas`` the
register check is.  Each signature is compiled once (``_ptx``), for both checks.
"""
import functools
import importlib
import os
import pkgutil
import re

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("the PTX compile check needs the real compiler, not the simulator",
                allow_module_level=True)
cuda = pytest.importorskip("numba.cuda")
pytest.importorskip("numba_cuda")

import fastloss.cuda  # noqa: E402
from fastloss.cuda import _blocks, _ptxas  # noqa: E402


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


def _nothing():
    pass


@functools.cache
def _nvvm_missing():
    """Why NVVM cannot compile (None when it can)."""
    try:
        cuda.compile_ptx(_nothing, (), cc=_ptxas.CC)
    except Exception as exc:  # pragma: no cover - depends on the installed toolkit
        return str(exc)
    return None


@functools.cache
def _ptx(kernel, sig):
    """The sm_90 PTX of one signature, compiled once for every test here."""
    missing = _nvvm_missing()
    if missing:
        pytest.skip(f"NVVM is not available: {missing}")
    return _ptxas.compile_ptx(kernel, sig)


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
    ptx = _ptx(kernel, sig)
    assert ".target sm_90" in ptx
    assert re.search(r"\.entry\s", ptx), "no kernel entry point in the PTX"


@pytest.mark.parametrize("kernel, sig", _cases())
def test_kernel_launches_with_its_largest_block(kernel, sig):
    # A GPU refuses a launch whose block needs more registers than an SM holds
    # (CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES); the simulator does not.  The driver's
    # ptxas bounds the kernel by its max_registers, as here; spills go to memory.
    ptxas = _ptxas.find_ptxas()
    if ptxas is None:
        pytest.skip("ptxas is not installed (pip install 'fastloss[cuda]')")
    threads = _blocks.largest_block(kernel)
    usage = _ptxas.ptxas_usage(_ptx(kernel, sig), kernel.targetoptions.get("max_registers"),
                               ptxas)
    assert usage.registers * threads <= _ptxas.REGISTERS_PER_SM, (
        f"{usage.registers} registers x {threads} threads per block do not fit one SM")
    assert usage.spill_stores == usage.spill_loads == 0, f"spills: {usage}"


def test_launch_never_exceeds_the_largest_block(monkeypatch):
    launched = []

    class Recorder:
        largest_block = _blocks.LARGE_KERNEL_BLOCK

        def __getitem__(self, config):
            launched.append(config)
            return lambda *args: None

    _blocks.launch(Recorder(), 3, _blocks.MAX_THREADS, 0)
    _blocks.launch(Recorder(), 3, 64, 0)
    assert launched == [(3, _blocks.LARGE_KERNEL_BLOCK, 0), (3, 64, 0)]
    with pytest.raises(ValueError):
        _blocks.launch(Recorder(), 3, (32, 32), 0)


def test_float32_cross_entropy_loop_has_no_float64_math():
    # Python literals are float64 in Numba: a slip makes a float32 kernel run
    # in float64.  The only float64 arithmetic allowed is the block reductions'.
    from numba import types
    from fastloss.cuda.cross_entropy import cross_entropy_kernel
    T = types.float32
    sig = (T[:, :], types.int64[::1], types.none, types.none, types.none, types.int64, T,
           types.boolean, T, T, types.none, T[:, :], T[::1], types.none)
    ptx = _ptx(cross_entropy_kernel, sig)
    assert "ex2.approx.f32" in ptx or "ex2.approx.ftz.f32" in ptx  # expf on the row
    # exp in float64 would call a long software sequence with many fma.rn.f64;
    # the tree reductions use a handful (merge_online's exp, one per level).
    assert len(re.findall(r"fma\.rn\.f64", ptx)) <= 20


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_fast_row_gradients_are_stored_evict_first(dtype):
    # pass 2 stores the gradient with st.global.cs, so that it leaves L2 before the
    # columns that pass 2 still re-reads (bench/results/gpu-static.md models it)
    from numba import types
    from fastloss.cuda import cross_entropy
    def with_gradient(kernel, sig):
        args = dict(zip(kernel.py_func.__code__.co_varnames, sig))
        return (kernel is cross_entropy.cross_entropy_kernel and str(args["x"].dtype) == dtype
                and args["g"] != types.none)
    kernel, sig = next(case for case in cross_entropy.ptx_signatures() if with_gradient(*case))
    ptx = _ptx(kernel, sig)
    width = "b16" if dtype == "float16" else "f32"
    assert len(re.findall(rf"st\.global\.cs\.{width}", ptx)) >= 16  # a step's 16 stores


@pytest.mark.parametrize("layout", ["C", "A"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_store_streaming_compiles_for_each_layout(dtype, layout):
    from numba import cuda, types, uint64
    T = getattr(types, dtype)

    @cuda.jit(device=True)
    def one(a, i, v):
        _blocks.store_streaming(a, i, v)

    def kernel(a, v):
        one(a, uint64(3), v)
    ptx = _ptx(cuda.jit(kernel), (types.Array(T, 1, layout), types.float32))
    width = {"float16": "b16", "float32": "f32", "float64": "f64"}[dtype]
    assert re.search(rf"st\.global\.cs\.{width}", ptx)
