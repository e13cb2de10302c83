"""``python -m fastloss check`` (the default command): every loss against an autograd framework.

For every public loss, on small random inputs, in float32 and float64 and with
``reduction="mean"``, ``"sum"`` and ``"none"``, it compares fastloss's value and
gradient (and, for the center loss, the updated centers) with a reference: the loss's
formula of ``fastloss.tools.references``, written once, run in

* ``torch``: PyTorch autograd (``torch.autograd.grad``), through ``torch.nn.functional``
  where PyTorch has the loss (``cross_entropy``, ``huber_loss``, ``triplet_margin_loss``:
  fastloss is then checked against PyTorch's own implementation), else the formula in
  torch ops (focal losses, torchvision's sigmoid focal loss, the triplet distances torch
  lacks, batch mining, center loss, and fastloss's own extensions: z-loss, softcap,
  sample weights);
* ``jax``: the formula in ``jax.numpy``, differentiated by ``jax.vjp`` (64-bit mode on,
  so that float64 stays float64);
* ``numpy``: the formula evaluated by NumPy in float64, the gradient by central finite
  differences (the fallback when neither framework is installed; a looser gradient
  tolerance).

The loss options checked, and their inputs, are each loss's ``options`` in
``fastloss.tools.registry``.  ``--framework auto`` takes torch when it imports, else jax,
else numpy.  The reference runs in the row's dtype (torch, jax) or in float64 (numpy);
fastloss runs on ``--backend cpu`` or ``cuda`` (NumPy inputs copied to the GPU and back).

Each row of the table is one call: the largest absolute error of the value (every
entry for ``"none"``) and of the gradient (all three for the triplet margin loss),
each also relative to the largest magnitude of the reference; the row passes when
both relative errors are within the tolerance.  The exit status is 1 when any row
fails, 2 when the framework asked for is missing or the backend unusable.

torch and jax are imported inside ``run`` only: ``import fastloss.__main__`` loads
neither.  Timing is ``python -m fastloss bench``'s job.
"""
import argparse
import contextlib
import functools
import sys
from dataclasses import dataclass

import numpy as np

from . import competitors, references, registry

FRAMEWORKS = ("auto", "torch", "jax", "numpy")
BACKENDS = ("cpu", "cuda")
REDUCTIONS = references.REDUCTIONS
DTYPES = ("float32", "float64")
# tolerance on the relative errors: dtype -> rtol
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}
NUMPY_GRAD_TOLERANCE = 1e-6   # finite differences (float64, central, h = 1e-5 |x|)
FD_STEP = 1e-5

LOSS_SHORT = {info.short: info.name for info in registry.LOSSES}
LOSS_NAMES = tuple(LOSS_SHORT.values())


@dataclass(frozen=True)
class Case:
    """One option set (``registry.Option``) of one loss (``registry.LossInfo``)."""
    info: registry.LossInfo
    option: registry.Option

    @property
    def loss(self):
        return self.info.name

    @property
    def name(self):
        return self.option.label


CASES = tuple(Case(info, option) for info in registry.LOSSES for option in info.options)


def _summary(function):
    """The first line of a reference's docstring, without its full stop."""
    return function.__doc__.strip().splitlines()[0].rstrip(".")


# ------------------------------------------------------------ the three references


class _Reference:
    """``compute(case, args, kwargs, reduction) -> (value, grads, centers or None)``, NumPy
    arrays: the loss's formula in the namespace ``ns``, its gradient by the framework."""
    name = ""
    title = ""
    grad_tolerance = None   # None: the dtype's tolerance
    ns = None

    def tolerance(self, dtype, what):
        if what == "grad" and self.grad_tolerance is not None:
            return max(TOLERANCE[dtype], self.grad_tolerance)
        return TOLERANCE[dtype]

    def compute(self, case, args, kwargs, reduction):
        info = case.info
        with self.context():
            xs = [self.array(a) for a in args]
            kw = {k: self.array(v) for k, v in kwargs.items()}
            # keywords with a gradient of their own (a bias) join the differentiated leaves
            keys = [k for k in info.grad_keywords if k in kw]
            extra = [kw.pop(k) for k in keys]
            formula = functools.partial(info.reference, self.ns, reduction=reduction, **kw)
            n, k = info.n_grad, len(keys)

            def loss(*leaves):
                return formula(*leaves[:n], *leaves[n + k:], **dict(zip(keys, leaves[n:n + k])))
            value, grads = self.value_and_grads(loss, xs[:n] + extra + xs[n:], n + k)
            centers = None if info.update is None else self.host(info.update(self.ns, *xs, **kw))
            return self.host(value), tuple(self.host(g) for g in grads), centers

    def context(self):
        return contextlib.nullcontext()

    def array(self, a):
        """A NumPy argument as the framework's array (other arguments as they are)."""
        raise NotImplementedError

    def value_and_grads(self, loss, xs, n_grad):
        """``loss(*xs)`` and its gradient (of the sum) with respect to the first ``n_grad`` of ``xs``."""
        raise NotImplementedError

    def host(self, a):
        return np.asarray(a)


class _TorchReference(_Reference):
    name = "torch"

    def __init__(self, torch):
        self.torch = torch
        self.ns = references.torch_namespace(torch)
        self.title = f"PyTorch {torch.__version__} autograd"

    def array(self, a):
        return self.torch.from_numpy(np.array(a, copy=True)) if isinstance(a, np.ndarray) else a

    def value_and_grads(self, loss, xs, n_grad):
        leaves = [x.requires_grad_(True) for x in xs[:n_grad]]
        out = loss(*xs)
        return out, self.torch.autograd.grad(out.sum(), leaves)

    def host(self, a):
        return a.detach().numpy()


class _JaxReference(_Reference):
    name = "jax"

    def __init__(self, jax):
        self.jax = jax
        self.ns = references.jax_namespace(jax)
        self.title = f"JAX {jax.__version__} (jax.vjp, 64-bit mode)"

    def context(self):
        return _jax_x64(self.jax)

    def array(self, a):
        return self.jax.numpy.asarray(a) if isinstance(a, np.ndarray) else a

    def value_and_grads(self, loss, xs, n_grad):
        out, vjp = self.jax.vjp(lambda *leaves: loss(*leaves, *xs[n_grad:]), *xs[:n_grad])
        return out, vjp(self.jax.numpy.ones_like(out))


def _jax_x64(jax):
    """A context manager turning on JAX's 64-bit mode (and off again afterwards)."""
    state = getattr(jax, "enable_x64", None)
    if callable(state):
        try:
            return state(True)
        except TypeError:
            pass
    from jax.experimental import enable_x64
    return enable_x64()


class _NumpyReference(_Reference):
    name = "numpy"
    grad_tolerance = NUMPY_GRAD_TOLERANCE

    def __init__(self, fallback=False):
        self.ns = references.numpy_namespace()
        self.title = ("the NumPy references: the formulas in float64 NumPy, gradients by central "
                      "differences" + (" (neither torch nor jax imports here)" if fallback else ""))

    def array(self, a):
        return a.astype(np.float64) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a

    def value_and_grads(self, loss, xs, n_grad):
        def total(leaves):
            return float(np.sum(loss(*leaves, *xs[n_grad:])))

        with np.errstate(all="ignore"):
            out = np.asarray(loss(*xs))
            leaves = [x.copy() for x in xs[:n_grad]]
            grads = []
            for x in leaves:
                g = np.zeros_like(x)
                for i in np.ndindex(x.shape):
                    v = x[i]
                    h = FD_STEP * max(1.0, abs(v))
                    x[i] = v + h
                    up = total(leaves)
                    x[i] = v - h
                    down = total(leaves)
                    x[i] = v
                    g[i] = (up - down) / (2 * h)
                grads.append(g)
        return out, grads


def make_reference(framework):
    """The reference for ``framework`` (``"auto"`` tries torch, then jax, then numpy);
    raises ImportError when the one asked for does not import."""
    if framework in ("auto", "torch"):
        try:
            return _TorchReference(competitors.torch_module())
        except competitors.Missing:
            if framework == "torch":
                raise
    if framework in ("auto", "jax"):
        try:
            return _JaxReference(competitors.jax_module())
        except competitors.Missing:
            if framework == "jax":
                raise
    if framework in ("auto", "numpy"):
        return _NumpyReference(fallback=framework == "auto")
    raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")


# ------------------------------------------------------------------------ the check


@dataclass
class Row:
    loss: str
    case: str
    dtype: str
    reduction: str
    value_abs: float = float("nan")
    value_rel: float = float("nan")
    grad_abs: float | None = None      # None: no gradient in this row (the centers)
    grad_rel: float | None = None
    tol: float = float("nan")
    grad_tol: float = float("nan")
    ok: bool = False
    error: str = ""


def _errors(got, want):
    """(max abs error, that relative to max|want|); inf on a shape mismatch or NaN."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return float("inf"), float("inf")
    if got.size == 0:
        return 0.0, 0.0
    diff = np.abs(got - want)
    same_nan = np.isnan(got) & np.isnan(want)
    diff = np.where(same_nan, 0.0, diff)
    err = float(np.max(diff))
    if np.isnan(err):
        return float("inf"), float("inf")
    scale = float(np.max(np.abs(np.where(np.isnan(want), 0.0, want))))
    if err == 0.0:
        return 0.0, 0.0
    return err, (err / scale if scale > 0 else float("inf"))


def _flat(arrays):
    return np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays])


def _fastloss_call(info, args, kwargs, reduction, backend):
    args = tuple(np.array(a, copy=True) for a in args)     # centers are updated in place
    res = info.function(*args, reduction=reduction, backend=backend, **kwargs)
    grads = res.grad if isinstance(res.grad, tuple) else (res.grad,)
    differentiated = args[:info.n_grad] + tuple(kwargs[k] for k in info.grad_keywords if k in kwargs)
    for g, a in zip(grads, differentiated):
        if g is None or np.asarray(g).dtype != a.dtype:
            raise TypeError(f"gradient of dtype {getattr(g, 'dtype', None)} for input of dtype {a.dtype}")
    centers = None if info.updates is None else args[info.updates]
    return np.asarray(res.loss), grads, centers


def check_case(ref, case, dtype, reductions, seed, backend):
    """Rows for one case in one dtype: one per reduction (and the centers after the
    center update, once)."""
    rows, after = [], []
    rng = np.random.default_rng([seed, CASES.index(case), DTYPES.index(dtype)])
    args, kwargs = case.info.case(rng, dtype, case.option)
    for reduction in reductions:
        row = Row(case.loss, case.name, dtype, reduction, tol=ref.tolerance(dtype, "value"),
                  grad_tol=ref.tolerance(dtype, "grad"))
        rows.append(row)
        try:
            got_value, got_grads, got_centers = _fastloss_call(case.info, args, kwargs, reduction, backend)
            want_value, want_grads, want_centers = ref.compute(case, args, kwargs, reduction)
        except Exception as exc:  # noqa: BLE001  (reported in the table; the check goes on)
            row.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:90]
            continue
        row.value_abs, row.value_rel = _errors(got_value, want_value)
        row.grad_abs, row.grad_rel = _errors(_flat(got_grads), _flat(want_grads))
        row.ok = row.value_rel <= row.tol and row.grad_rel <= row.grad_tol
        if got_centers is not None and reduction == reductions[0]:
            c = Row(case.loss, case.name + ": centers", dtype, "-", tol=row.tol)
            c.value_abs, c.value_rel = _errors(got_centers, want_centers)
            c.ok = c.value_rel <= c.tol
            after.append(c)
    return rows + after


def _fmt(x):
    return "-" if x is None else f"{x:.1e}"


def _tol_str(row):
    if row.grad_abs is not None and row.grad_tol != row.tol:
        return f"{row.tol:.0e}/{row.grad_tol:.0e}"
    return f"{row.tol:.0e}"


HEADER = (f"{'loss':<21} {'case':<30} {'dtype':<7} {'reduction':<9} {'value abs':>9} {'value rel':>9} "
          f"{'grad abs':>9} {'grad rel':>9} {'tol':>11}  result")


def _row_str(r):
    start = f"{r.loss:<21} {r.case:<30} {r.dtype:<7} {r.reduction:<9} "
    if r.error:
        return start + f"ERROR {r.error}  FAIL"
    return start + (f"{_fmt(r.value_abs):>9} {_fmt(r.value_rel):>9} {_fmt(r.grad_abs):>9} "
                    f"{_fmt(r.grad_rel):>9} {_tol_str(r):>11}  {'PASS' if r.ok else 'FAIL'}")


def _versions():
    import fastloss

    parts = [f"fastloss {fastloss.__version__}", f"numpy {np.__version__}"]
    import numba

    parts.append(f"numba {numba.__version__}")
    return ", ".join(parts)


def run_checks(framework="auto", backend="cpu", seed=0, losses=None, dtypes=DTYPES,
               reductions=REDUCTIONS, out=None):
    """Print the table to ``out``; return the rows (``Row.ok`` each).  Raises
    ImportError when ``framework`` (not ``"auto"``) does not import."""
    out = sys.stdout if out is None else out
    ref = make_reference(framework)
    cases = [c for c in CASES if losses is None or c.loss in losses]
    print(f"fastloss check: value and gradient of every loss against {ref.title}", file=out)
    print(f"fastloss backend {backend}; seed {seed}; {_versions()}", file=out)
    print(HEADER, file=out)
    print("-" * len(HEADER), file=out)
    rows = []
    for case in cases:
        for dtype in dtypes:
            for row in check_case(ref, case, dtype, reductions, seed, backend):
                rows.append(row)
                print(_row_str(row), file=out, flush=True)
    print("-" * len(HEADER), file=out)
    print("abs: largest |fastloss - reference| over the value (every entry for 'none') or the gradient "
          "(all inputs');", file=out)
    print("rel: abs / largest |reference|; a row passes when both rel <= tol (value/gradient); "
          "'centers': the centers after the update.", file=out)
    if ref.name == "torch":
        for info in dict.fromkeys(c.info for c in cases):
            print(f"  {info.name}: {_summary(info.reference).replace('array ops', 'torch ops')}", file=out)
    else:
        lib = "jax.numpy" if ref.name == "jax" else "NumPy"
        print(f"reference: each loss's formula written in {lib} (fastloss/tools/references.py)", file=out)
    failed = [r for r in rows if not r.ok]
    if failed:
        names = ", ".join(dict.fromkeys(r.loss for r in failed))
        print(f"FAIL: {len(failed)} of {len(rows)} checks failed ({names})", file=out)
    else:
        print(f"PASS: all {len(rows)} checks passed against {ref.name}", file=out)
    return rows


HELP = "check every loss's value and gradient against PyTorch, JAX or NumPy (the default command)"
DESCRIPTION = ("Compare fastloss's value and gradient for every loss, several option sets, float32 and "
               "float64, reductions mean/sum/none, with PyTorch autograd (or JAX, or NumPy finite "
               "differences) on small random inputs, and print a pass/fail table.  Exit status 1 when "
               "any check fails.  Timing is 'python -m fastloss bench'.")


def _loss_name(value):
    name = LOSS_SHORT.get(value, value)
    if name not in LOSS_NAMES:
        raise argparse.ArgumentTypeError(
            f"invalid loss {value!r} (choose from {', '.join(LOSS_SHORT)} or the function names)")
    return name


def add_arguments(parser):
    parser.add_argument("--framework", choices=FRAMEWORKS, default="auto",
                        help="reference: torch autograd, jax, or NumPy finite differences; auto takes the "
                             "first installed of torch, jax, numpy (default auto)")
    parser.add_argument("--backend", choices=BACKENDS, default="cpu",
                        help="where fastloss runs; cuda copies the NumPy inputs to the GPU (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--losses", nargs="+", type=_loss_name, metavar="LOSS",
                        help=f"losses to check (default all): {', '.join(LOSS_SHORT)}")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), metavar="DTYPE",
                        help="dtypes to check (default: float32 float64)")


def _cuda_problem():
    """None when fastloss's CUDA backend can run here, else why not."""
    try:
        import fastloss

        fastloss.huber_loss(np.zeros(2, np.float32), np.zeros(2, np.float32), backend="cuda")
    except Exception as exc:  # noqa: BLE001  (any reason is reported)
        return f"{type(exc).__name__}: {exc}"
    return None


def run(args):
    if args.backend == "cuda":
        problem = _cuda_problem()
        if problem:
            print(f"--backend cuda: fastloss's CUDA backend cannot run here ({problem})", file=sys.stderr)
            return 2
    try:
        rows = run_checks(framework=args.framework, backend=args.backend, seed=args.seed,
                          losses=args.losses, dtypes=args.dtypes)
    except ImportError as exc:
        print(f"--framework {args.framework}: {exc}", file=sys.stderr)
        return 2
    return 0 if all(r.ok for r in rows) else 1
