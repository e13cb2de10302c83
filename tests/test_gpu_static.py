"""``bench/gpu_static.py``: its occupancy arithmetic against hand-worked cases, its
loop finding on a hand-written SASS listing, and the whole chain (PTX, ``ptxas``,
``nvdisasm``, loops, instructions per element) on one small kernel, which is
skipped without the toolkit wheels (the ``cuda`` extra), as in test_cuda_compile.py."""
import importlib.util
import os
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "bench" / "gpu_static.py"
_spec = importlib.util.spec_from_file_location("gpu_static", _PATH)
gpu_static = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_static)


@pytest.mark.parametrize("registers, threads, shared, blocks, limit", [
    (64, 1024, 0, 1, None),  # 64 x 32 = 2,048 per warp x 32 warps = 65,536: one block
    (70, 512, 16384, 1, "registers"),  # 2,240 -> 2,304 per warp x 16 = 36,864: one block
    (65, 512, 0, 1, "registers"),  # 2,080 -> 2,304 per warp: as 72 registers
    (64, 512, 0, 2, None),  # 32,768 per block: two, and 32 warps each: two
    (255, 64, 0, 4, "registers"),  # 8,160 -> 8,192 per warp x 2 = 16,384: four
    (16, 32, 0, 32, "blocks"),  # 128 by registers, 64 by warps, 32 blocks at most
    (24, 256, 0, 8, "warps"),  # 768 per warp x 8 = 6,144: 10 by registers, 8 by warps
    (32, 128, 100 * 1024, 2, "shared"),  # 233,472 // 102,400 = 2 by shared memory
    (32, 128, 100 * 1024 + 1, 2, "shared"),  # rounded up to 128 bytes: still 2
    (32, 128, 114 * 1024, 2, "shared"),  # 233,472 // 116,736 = 2
    (32, 128, 114 * 1024 + 1, 1, "shared"),
])
def test_occupancy_by_hand(registers, threads, shared, blocks, limit):
    got, why = gpu_static.occupancy(registers, threads, shared)
    assert got == blocks
    if limit is not None:  # ties (registers and warps both at 1) name either
        assert why == limit


# A grid-stride loop as nvdisasm prints it: two loads, one use, one store, a back branch,
# and an out-of-line block that branches back into the loop (still part of it).
_SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   ISETP.GE.AND P0, PT, R0, UR4, PT ;
        /*0020*/               @P0 EXIT ;
.L_x_0:
        /*0030*/                   LDG.E R4, desc[UR6][R2.64] ;
        /*0040*/                   LDG.E.64 R6, desc[UR6][R8.64] ;
        /*0050*/                   FADD R5, R4, 1 ;
        /*0060*/               @P1 BRA `(.L_x_1) ;
.L_x_2:
        /*0070*/                   STG.E desc[UR6][R10.64], R5 ;
        /*0080*/                   IADD3 R0, R0, UR5, RZ ;
        /*0090*/                   ISETP.GE.AND P0, PT, R0, UR4, PT ;
        /*00a0*/              @!P0 BRA `(.L_x_0) ;
        /*00b0*/                   EXIT ;
.L_x_1:
        /*00c0*/                   FMUL R5, R5, R7 ;
        /*00d0*/                   BRA `(.L_x_2) ;
.L_x_3:
        /*00e0*/                   BRA `(.L_x_3) ;
"""


def test_loops_of_a_listing():
    instrs, labels = gpu_static.parse_sass(_SASS)
    assert len(instrs) == 15 and labels[".L_x_0"] == 0x30
    found, reachable, _ = gpu_static.loops(instrs, labels)
    assert reachable == 14  # the trailing self-loop is not reachable
    (loop,) = found
    assert loop.first == 0x30 and len(loop.instrs) == 10  # 0x30-0xa0 and 0xc0-0xd0
    assert loop.count("LDG") == 2 and loop.bytes_of("LDG") == 12
    assert loop.count("STG") == 1 and loop.count("BRA") == 3
    assert gpu_static.loads_before_use(loop) == 2  # the FADD reads R4 after both loads


def test_evict_first_stores_are_told_apart():
    instrs, labels = gpu_static.parse_sass(_SASS)
    found, _, _ = gpu_static.loops(instrs, labels)
    assert not gpu_static.evict_first(found)  # a plain STG.E
    streamed = _SASS.replace("STG.E ", "STG.E.EF ")
    assert streamed != _SASS
    instrs, labels = gpu_static.parse_sass(streamed)
    found, _, _ = gpu_static.loops(instrs, labels)
    assert gpu_static.evict_first(found)
    assert not gpu_static.evict_first([])  # no store: nothing streamed


def _nvvm_missing(cuda, cc):
    def nothing():
        pass
    try:
        cuda.compile_ptx(nothing, (), cc=cc)
    except Exception as exc:  # pragma: no cover - depends on the installed toolkit
        return str(exc)
    return None


def test_sass_count_of_one_kernel():
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("the SASS count needs the real compiler, not the simulator")
    cuda = pytest.importorskip("numba.cuda")
    pytest.importorskip("numba_cuda")
    from numba import types
    from fastloss.cuda import _ptxas
    from fastloss.cuda.triplet import copy_flat_kernel
    if _ptxas.find_ptxas() is None or _ptxas.find_nvdisasm() is None:
        pytest.skip("ptxas or nvdisasm is not installed (pip install 'fastloss[cuda]')")
    missing = _nvvm_missing(cuda, _ptxas.CC)
    if missing:
        pytest.skip(f"NVVM is not available: {missing}")
    sig = (types.float32[::1], types.float32[::1])
    usage, cubin = _ptxas.assemble(_ptxas.compile_ptx(copy_flat_kernel, sig),
                                   copy_flat_kernel.targetoptions.get("max_registers"))
    a = gpu_static.analyse(copy_flat_kernel, sig, usage, _ptxas.sass(cubin))
    assert usage.registers > 0 and a.reachable > 0
    assert a.chosen, "no element loop found in a grid-stride copy"
    for loop in a.chosen:
        assert loop.count("LDG") >= 1 and loop.count("STG") >= 1
        assert a.elements[id(loop)] >= 1 and a.elements[id(loop)] == int(a.elements[id(loop)])
        assert gpu_static.loads_before_use(loop) >= 1
    assert 0 < gpu_static.per_element(a) < a.reachable
