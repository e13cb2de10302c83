"""The shared formulas as the CUDA kernels call them: ``from fastloss.cuda._formulas import
softmax`` is ``fastloss/formulas/softmax.py`` for CUDA (``fastloss.formulas.for_target``),
built on first import; a new formulas module needs nothing here.  Each formula is a device
function (NVVM inlines it) on libdevice's ``exp``, ``log``, ``log1p`` and ``tanh``; the
simulator runs them, and the primitives' bodies, as Python."""
import functools
import math

from numba.core.extending import overload, register_jitable

from fastloss import formulas


def _primitive(python, device):
    """``python`` (``fastloss.formulas``'s) under a CUDA-only name whose device code is
    ``device``."""
    def fn(x):
        return python(x)

    fn.__name__ = fn.__qualname__ = python.__name__
    overload(fn, target="cuda")(lambda x: lambda x: device(x))
    return fn


PRIMITIVES = dict(exp=_primitive(formulas.exp, math.exp),
                  exp_nonpos=_primitive(formulas.exp_nonpos, math.exp),
                  log=_primitive(formulas.log, math.log),
                  log1p=_primitive(formulas.log1p, math.log1p),
                  tanh=_primitive(formulas.tanh, math.tanh))


@functools.cache
def __getattr__(name):
    return formulas.for_target(formulas.formulas_module(name), "cuda", PRIMITIVES,
                               inline=register_jitable, call=register_jitable)
