"""What ``ptxas`` says of each kernel for sm_90 (H100/H200), without a GPU.

The simulator runs any block size; a real GPU refuses a launch whose threads
times registers per thread exceed the SM's register file
(``CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES``).  This compiles a kernel signature
with numba-cuda's ``compile_ptx`` (NVVM) and assembles the PTX with ``ptxas
-v`` from the ``nvidia-cuda-nvcc`` wheel (the ``cuda`` extra), which prints
registers, spills and shared memory per entry point.  ``sass`` disassembles
the assembled cubin with ``nvdisasm`` (the ``nvidia-cuda-nvdisasm`` wheel) for
``bench/gpu_static.py``, which counts the machine instructions of the loops.
Used by ``tests/test_cuda_compile.py``, ``tests/test_gpu_static.py``,
``bench/ptx_report.py`` and ``bench/gpu_static.py``; nothing here runs when
fastloss computes a loss.
"""
import os
import re
import shutil
import subprocess
import tempfile
import types as pytypes
from contextlib import contextmanager
from typing import NamedTuple

ARCH = "sm_90"
CC = (9, 0)
#: 32-bit registers of one SM (every architecture from sm_50 to sm_90)
REGISTERS_PER_SM = 65536


def find_ptxas():
    """The path of ``ptxas``: from the ``nvidia`` wheels (``nvidia/*/bin``), else
    on ``PATH``; None when there is none."""
    return _find_tool("ptxas")


def find_nvdisasm():
    """The path of ``nvdisasm``, found as ``ptxas`` is; None when there is none."""
    return _find_tool("nvdisasm")


def _find_tool(name):
    try:
        import nvidia
    except ImportError:
        roots = []
    else:
        roots = list(getattr(nvidia, "__path__", []))
    for root in roots:
        for sub in sorted(os.listdir(root)):
            path = os.path.join(root, sub, "bin", name)
            if os.access(path, os.X_OK):
                return path
    return shutil.which(name)


class Usage(NamedTuple):
    """``ptxas -v``'s figures for one entry point."""
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack: int  # bytes of stack frame per thread
    shared: int  # bytes of static shared memory per block


@contextmanager
def sm90_without_a_gpu():
    """Device functions are compiled for "the current device", which needs a
    driver: within this, the compiler gets the H200's compute capability instead."""
    import numba.cuda.dispatcher as dispatcher
    saved = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=CC)
    try:
        yield
    finally:
        dispatcher.get_current_device = saved


def compile_ptx(kernel, sig):
    """The sm_90 PTX of ``kernel`` (a ``@cuda.jit`` dispatcher) for argument types
    ``sig``.  Its register bound is not in the PTX: the driver's linker applies
    it, as ``ptxas_usage`` does."""
    from numba import cuda
    with sm90_without_a_gpu():
        ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=CC)
    return ptx


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")
_SHARED = re.compile(r"(\d+) bytes smem")


def ptxas_usage(ptx, max_registers=None, ptxas=None):
    """``Usage`` of the one entry point of ``ptx``, from ``ptxas -v -arch=sm_90``,
    with ``-maxrregcount`` when ``max_registers`` is given (as the driver's
    linker applies a kernel's ``max_registers``)."""
    return assemble(ptx, max_registers, ptxas)[0]


def assemble(ptx, max_registers=None, ptxas=None):
    """``(Usage, cubin)``: ``ptxas_usage``'s figures and the sm_90 cubin (bytes)
    that the same ``ptxas`` run wrote."""
    ptxas = ptxas or find_ptxas()
    bound = [] if max_registers is None else [f"-maxrregcount={max_registers}"]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([ptxas, "-v", f"-arch={ARCH}", *bound, src, "-o", cubin],
                              capture_output=True, text=True, check=False)
        report = done.stdout + done.stderr
        if done.returncode != 0:
            raise RuntimeError(f"ptxas failed:\n{report}")
        with open(cubin, "rb") as f:
            code = f.read()
    entries = _ENTRY.findall(report)
    if len(entries) != 1:
        raise RuntimeError(f"expected one entry point, ptxas reported {entries}:\n{report}")
    spills = _SPILLS.search(report)
    registers = _REGISTERS.search(report)
    shared = _SHARED.search(report)
    usage = Usage(int(registers.group(1)), int(spills.group(2)), int(spills.group(3)),
                  int(spills.group(1)), int(shared.group(1)) if shared else 0)
    return usage, code


def sass(cubin, nvdisasm=None):
    """The SASS of ``cubin`` (bytes, from ``assemble``) as ``nvdisasm -c`` prints it:
    one ``/*address*/ instruction ;`` per line, with the branch targets' labels."""
    nvdisasm = nvdisasm or find_nvdisasm()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        done = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True,
                              check=False)
    if done.returncode != 0:
        raise RuntimeError(f"nvdisasm failed:\n{done.stdout}{done.stderr}")
    return done.stdout
