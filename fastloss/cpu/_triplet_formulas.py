"""The triplet formulas (``fastloss.formulas.triplet``) as the CPU kernels call them:
``CPU.margin_term(...)`` and the others are inlined into the kernel's Numba IR, so that each
compiles under the kernel's fast-math licence and into its vectorized loops, on the
vectorizable ``vexp_nonpos`` and ``vlog1p``; ``CPU.term`` is a call of its own, compiled
with the kernels' options."""
from numba.core.extending import register_jitable

from fastloss.cpu._math import vexp_nonpos, vlog1p
from fastloss.cpu._rows import jit
from fastloss.formulas.triplet import formulas


def _inline(fn):
    # a decorator per formula: register_jitable keeps its options in one dict, which its
    # first use empties (a shared register_jitable(inline="always") inlines one function)
    return register_jitable(inline="always")(fn)


CPU = formulas("CPU", vexp_nonpos, vlog1p, _inline, jit)
