"""The shared formulas as the CPU kernels call them: ``from fastloss.cpu._formulas import
softmax`` is ``fastloss/formulas/softmax.py`` for the CPU (``fastloss.formulas.for_target``),
built on first import; a new formulas module needs nothing here.  Each formula is inlined
into the calling kernel's Numba IR, on the vectorizable primitives of ``fastloss.cpu._math``;
those a module names in ``CALLS`` are calls of their own, compiled with the kernels'
options."""
import functools

from numba.core.extending import register_jitable

from fastloss.cpu._jit import jit
from fastloss.cpu._math import PRIMITIVES
from fastloss.formulas import for_target, formulas_module


def _inline(fn):
    # a decorator per formula: register_jitable keeps its options in one dict, which its
    # first use empties (a shared register_jitable(inline="always") inlines one function)
    return register_jitable(inline="always")(fn)


@functools.cache
def __getattr__(name):
    return for_target(formulas_module(name), "cpu", PRIMITIVES, inline=_inline, call=jit)
