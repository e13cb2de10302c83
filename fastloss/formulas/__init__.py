"""The losses' formulas, each written once and shared by the CPU and CUDA kernels.

A module here holds plain Python functions (``formulas/softmax.py``...).  A kernel does not
call them: it calls their copy for its target, built once by ``for_target``
(``fastloss.cpu._formulas``, ``fastloss.cuda._formulas``)::

    from fastloss.cpu._formulas import softmax
    ...
    loss, lse = softmax.label_loss(zy, m, s, ...)

Each target has function objects of its own, whose globals name that target's copies of the
other formulas and that target's primitives: on the CPU each copy is inlined into the
kernel's Numba IR (``inline="always"``), so it compiles under the kernel's fast-math licence
and into its vectorized loops as code written in place would; on CUDA a device function,
which NVVM inlines (numba-cuda cannot inline at the IR level), and the CUDA simulator runs it
as Python.  One function object with an overload for both targets does not work: once the
CPU has inlined it, numba-cuda's typing of the same object picks up the CPU's inlined IR and
fails (``omitted(default=Undefined)``).

A function a module names in ``CALLS`` is, on the CPU, a call of its own instead.

The primitives below (``exp``, ``exp_nonpos``, ``log``, ``log1p``, ``tanh``) are the
names a formula calls for per-element math: on the CPU the vectorizable ones of
``fastloss.cpu._math``; on CUDA libdevice's, with these Python bodies in the simulator.
``math.log`` and the like stay libm's (per-row scalars) on both targets.

In CPU kernels, name a conditional expression before passing it to a formula (or to
``load``/``store``): Numba 0.68 drops an inlined call whose argument is one when another
inlined call comes before it.
"""
import importlib
import math
import types

PRIMITIVES = ("exp", "exp_nonpos", "log", "log1p", "tanh")


def exp(x):
    """exp(x)."""
    return math.exp(x)


def exp_nonpos(x):
    """exp(x) for x <= 0 or NaN (softmax's exp(z - max z)); targets may be wrong for x > 0."""
    return math.exp(x)


def log(x):
    """log(x), with log(0) = -inf where Python raises."""
    return -math.inf if x == 0 else math.log(x)


def log1p(u):
    """log(1 + u), accurate for small u, with log1p(-1) = -inf where Python raises."""
    return -math.inf if u == -1 else math.log1p(u)


def tanh(x):
    """tanh(x)."""
    return math.tanh(x)


def formulas_module(name):
    """``fastloss.formulas.<name>``; AttributeError when there is none (what a module's
    ``__getattr__`` raises for a name it does not have)."""
    if name.startswith("_"):
        raise AttributeError(name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"no formulas module {name!r}") from None


def for_target(module, name, primitives, *, inline, call):
    """The formulas of ``module`` for one target, as the attributes of a module object
    (compiled code resolves a module's attributes): a copy of each public function defined
    in ``module``, made callable from that target's kernels by ``inline`` (by ``call`` for
    those ``module.CALLS`` names), whose globals map ``module``'s names, the formulas to
    their copies and ``PRIMITIVES`` to ``primitives``'s; ``module``'s other public names
    (constants) as they are."""
    calls = getattr(module, "CALLS", ())
    namespace = dict(vars(module))
    namespace.update((p, primitives[p]) for p in PRIMITIVES)
    target = types.ModuleType(f"{module.__name__}[{name}]", f"{module.__name__} for {name}.")
    for fname, obj in vars(module).items():
        if fname.startswith("_") or fname in PRIMITIVES or isinstance(obj, types.ModuleType):
            continue
        if isinstance(obj, types.FunctionType) and obj.__module__ == module.__name__:
            copy = types.FunctionType(obj.__code__, namespace, fname, obj.__defaults__,
                                      obj.__closure__)
            copy.__doc__, copy.__qualname__ = obj.__doc__, obj.__qualname__
            namespace[fname] = copy
            obj = (call if fname in calls else inline)(copy)
        setattr(target, fname, obj)
    return target
