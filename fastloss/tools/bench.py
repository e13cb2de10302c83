"""``python -m fastloss bench``: fastloss beside what a user would otherwise run.

For each chosen loss, size, dtype and backend (a *case*), on synthetic data
(the ``bench`` inputs of ``fastloss.tools.registry``), it times, in the same run:

* ``fastloss``           the fused call, a fresh gradient array each call;
* ``fastloss-grad_out``  the same call writing into a preallocated ``grad_out=``;
* ``copy``               the memory-copy ceiling: the least a one-pass kernel must
                         move (see ``ceiling`` below);
* ``numpy``              the vectorized NumPy implementation (``fastloss.tools.numpy_losses``;
                         CPU only);
* ``torch``, ``torch-compile``, ``jax``  the competitors of ``fastloss.tools.competitors``
                         (loss AND gradient), when installed.

Every competitor's ``(loss, gradient)`` (and, for the center loss, the updated
centers) is first checked against fastloss's; a disagreement is reported as
``mismatch`` and not timed.  That first call is also the warm-up (Numba JIT or
cache load, ``torch.compile``, ``jax.jit``).  A competitor that is not installed
is reported as ``missing``: the command runs with nothing but fastloss installed.

The table gives each entry's median time and ratios: every competitor's median
over fastloss's (above 1: fastloss is faster by that factor), ``grad_out``'s over
fastloss's, and fastloss's over the copy ceiling (1.0 is the bandwidth floor).
It is printed and written to ``--out`` as ``results.json`` and ``results.md``,
with a bar chart ``results.png`` when matplotlib is installed (``bench_table``).

This module also serves the pytest-benchmark suite in ``bench/`` (the cases,
the entries and the checks live here, once; each loss's sizes and inputs in the registry).
"""
import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import competitors, registry, regression
from . import numpy_losses as npl
from .bench_table import COMPETITORS, LEGEND, collect_notes, draw_chart, format_markdown, format_text, shape_str

# ---------------------------------------------------------------------- the cases

SIZES = ("small", "medium", "large")
HIDDEN_SIZES = ("tiny",)  # for the tests: seconds, not minutes
DTYPES = ("float32", "float16")
BACKENDS = ("cpu", "cuda")
ENTRIES = ("fastloss", "fastloss-grad_out", "copy") + COMPETITORS
RTOL = {"float32": 1e-4, "float16": 2e-3}


SPECS = tuple(sorted(registry.LOSSES, key=lambda info: info.bench.position))  # the table's order
LOSS_CHOICES = tuple(info.bench.short for info in SPECS)


@dataclass(frozen=True)
class Case:
    """One loss (its ``registry.LossInfo``) at one size, dtype and backend."""
    spec: registry.LossInfo
    size: str
    dtype: str = "float32"
    backend: str = "cpu"

    @property
    def shape(self):
        return self.spec.bench.sizes[self.size]

    @property
    def classes(self):
        return self.spec.bench.classes.get(self.size)

    @property
    def short(self):
        return self.spec.bench.short

    @property
    def group(self):
        """The pytest-benchmark group: ``ce-8192x1000``, ``center-8192x512-k1000``, ``...-float16``."""
        g = f"{self.short}-{shape_str(self.shape)}"
        if self.spec.updates is not None:  # the classes size the updated array: part of the case
            g += f"-k{self.classes}"
        if self.dtype != "float32":
            g += f"-{self.dtype}"
        if self.backend != "cpu":
            g += f"-{self.backend}"
        return g

    @property
    def label(self):
        return f"{self.short} {self.size} {shape_str(self.shape)} {self.dtype} {self.backend}"

    @property
    def rtol(self):
        return RTOL.get(self.dtype, 1e-4)


def make_args(case, seed=0):
    """The case's positional inputs (NumPy arrays, on the host): floating ones in the case's dtype."""
    rng = np.random.default_rng(seed)
    args = case.spec.bench.make_inputs(rng, tuple(case.shape), case.classes)
    return tuple(a if a.dtype.kind == "i" else a.astype(np.dtype(case.dtype), copy=False) for a in args)


def bytes_moved(case, args):
    """Bytes a one-pass kernel reads and writes: every input once, every gradient once
    (and an array updated in place, the centers, written back)."""
    grads = sum(a.nbytes for a in args[:case.spec.n_grad])
    extra = 0 if case.spec.updates is None else args[case.spec.updates].nbytes
    return sum(a.nbytes for a in args) + grads + extra


# ---------------------------------------------------------------------- outcomes and checks


@dataclass
class Outcome:
    """What one call computed, on the host: the loss, the gradient(s), the updated centers."""
    loss: float
    grads: tuple
    centers: np.ndarray | None = None

    def flat(self):
        return np.concatenate([np.asarray(g, dtype=np.float64).ravel() for g in self.grads])


def _host(a):
    if a is None or isinstance(a, np.ndarray):
        return a
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    if hasattr(a, "__cuda_array_interface__"):
        from numba import cuda
        return cuda.as_cuda_array(a).copy_to_host()
    if hasattr(a, "get"):  # CuPy
        return a.get()
    return np.asarray(a)


def _grads_tuple(g):
    return tuple(g) if isinstance(g, (tuple, list)) else (g,)


def agree(loss, grad, ref_loss, ref_grad, rtol=1e-4):
    """Compare a ``(loss, grad)`` pair with a reference one.

    Returns ``(loss_err, grad_err, ok)``: ``loss_err = |loss - ref_loss|``,
    ``grad_err = max|grad - ref_grad|`` (both absolute), and ``ok`` when
    ``loss_err <= rtol * max(1, |ref_loss|)`` and
    ``grad_err <= rtol * max|ref_grad|`` (float32 tolerance by default: the
    gradient of a mean loss scales as 1/n, so its error is judged against its
    own largest entry).  NaN anywhere makes ``ok`` false.
    """
    loss = float(loss)
    ref_loss = float(ref_loss)
    grad = np.asarray(grad)
    ref_grad = np.asarray(ref_grad)
    if grad.shape != ref_grad.shape:
        return abs(loss - ref_loss), float("inf"), False
    loss_err = abs(loss - ref_loss)
    diff = np.subtract(grad, ref_grad, dtype=np.float64)
    grad_err = float(np.max(np.abs(diff))) if diff.size else 0.0
    scale = float(np.max(np.abs(ref_grad))) if ref_grad.size else 0.0
    ok = bool(loss_err <= rtol * max(1.0, abs(ref_loss)) and grad_err <= rtol * scale
              or (loss_err == 0.0 and grad_err == 0.0))
    return loss_err, grad_err, ok


def agreement(case, got, ref):
    """``(loss_err, grad_err, ok, what)``: ``got`` against ``ref`` (``Outcome``s) at the
    case's tolerance (``agree``: the loss relative to itself, the gradient relative to its
    largest entry), and the updated centers where there are."""
    ref_flat = ref.flat()
    got_flat = got.flat()
    loss_err, grad_err, ok = agree(got.loss, got_flat, ref.loss, ref_flat, rtol=case.rtol)
    what = ""
    if not ok:
        what = (f"loss {got.loss:.7g} vs {ref.loss:.7g} (|d|={loss_err:.3g}), max|dgrad|={grad_err:.3g} "
                f"(max|grad| {float(np.max(np.abs(ref_flat))) if ref_flat.size else 0.0:.3g}), "
                f"rtol={case.rtol:g}")
    if ok and ref.centers is not None and got.centers is not None:
        c_err = float(np.max(np.abs(np.subtract(got.centers, ref.centers, dtype=np.float64))))
        scale = float(np.max(np.abs(ref.centers)))
        if not c_err <= case.rtol * max(1.0, scale):
            ok = False
            what = f"updated centers differ by {c_err:.3g} (max|c| {scale:.3g})"
    return loss_err, grad_err, ok, what


# ---------------------------------------------------------------------- CUDA


def cuda_status():
    """``(True, "")`` when a real CUDA GPU is usable, else ``(False, why)``."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False, "Numba's CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1): no real GPU to time"
    try:
        from numba import cuda
        if cuda.is_available():
            return True, ""
    except Exception as exc:  # numba-cuda missing or broken
        return False, f"numba.cuda unusable ({type(exc).__name__}: {exc})"
    return False, "no CUDA GPU (numba.cuda.is_available() is False)"


def _cuda():
    from numba import cuda
    return cuda


# ---------------------------------------------------------------------- entries


@dataclass
class Prepared:
    """An entry ready to time: ``run()`` is one call (waiting for the device on CUDA);
    ``result(run())`` gives its ``Outcome`` (``None`` for ceilings, which are not checked)."""
    run: Callable
    result: Callable | None = None
    bytes_moved: int | None = None  # when it differs from the case's
    threads: object = None


def _own(case, args):
    """The entry's own copy of what a call mutates (the centers), the rest shared."""
    k = case.spec.updates
    if k is not None:
        return args[:k] + (args[k].copy(),) + args[k + 1:]
    return args


def _updated(case, args):
    """The argument the call updates in place (the centers), else None."""
    return None if case.spec.updates is None else args[case.spec.updates]


def _fastloss(case, args, grad_out, device):
    spec = case.spec
    fn = spec.function
    kw = {**spec.bench.kwargs, **spec.bench.fl_kwargs}
    args = _own(case, args)
    sync = None
    if device == "cuda":
        cuda = _cuda()
        args = tuple(cuda.to_device(a) for a in args)
        sync = cuda.synchronize
    centers = _updated(case, args)
    if grad_out:
        if device == "cuda":
            outs = tuple(_cuda().device_array_like(a) for a in args[:spec.n_grad])
        else:
            outs = tuple(np.empty_like(a) for a in args[:spec.n_grad])
        kw["grad_out"] = outs if len(outs) > 1 else outs[0]

    def run():
        res = fn(*args, **kw)
        if sync is not None:
            sync()
        return res

    def result(res):  # copies: later calls overwrite grad_out and update the centers
        loss = float(np.asarray(_host(res.loss)))
        return Outcome(loss, tuple(np.array(_host(g)) for g in _grads_tuple(res.grad)),
                       None if centers is None else np.array(_host(centers)))
    return Prepared(run, result)


def _numpy(case, args):
    fn = npl.LOSSES[case.spec.name]
    args = _own(case, args)
    centers = _updated(case, args)
    half = np.dtype(case.dtype) == np.float16
    kw = case.spec.bench.kwargs

    if half:  # compute in float32, return float16 gradients: fastloss's float16 contract
        def run():
            loss, g = fn(*(a.astype(np.float32) if a.dtype == np.float16 else a for a in args), **kw)
            return loss, tuple(x.astype(np.float16) for x in _grads_tuple(g))
    else:
        def run():
            return fn(*args, **kw)

    def result(out):
        return Outcome(float(out[0]), _grads_tuple(out[1]), None if centers is None else centers.copy())
    return Prepared(run, result)


def ceiling(case, args, device="cpu"):
    """The memory-copy ceiling (entry ``copy``): the least a one-pass kernel must move,
    by the loss's ``bench.ceiling``:

    * ``"copy"`` (cross entropy, focal, center, triplet margin): ``np.copyto`` of each input
      that gets a gradient into a preallocated array (read it once, write a gradient of its
      size once);
    * ``"subtract"`` (sigmoid focal, Huber): ``np.subtract(x, t, out=g)`` (read both inputs,
      write the gradient); in float16, a bitwise XOR of their int16 views (NumPy's float16
      arithmetic is emulated, far below bandwidth);
    * ``"gemm"`` (batch-hard): one Gram matrix ``E @ E.T`` as a gemm on a transposed copy
      made beforehand (the product fastloss itself forms), not a copy;
    * ``"products"`` (linear cross-entropy): the three matrix products that any path must
      form, ``Z = E @ W.T``, ``Z @ W`` and ``Z.T @ E``, into preallocated arrays (the
      ``(N, V)`` ``Z`` among them), with no softmax between them.

    On CUDA: a device-to-device copy of every input that gets a gradient.
    """
    n_grad = case.spec.n_grad
    kind = case.spec.bench.ceiling
    if device == "cuda":
        cuda = _cuda()
        srcs = [cuda.to_device(a) for a in args[:n_grad]]
        dsts = [cuda.device_array_like(a) for a in srcs]

        def run():
            for d, s in zip(dsts, srcs):
                d.copy_to_device(s)
            cuda.synchronize()
        return Prepared(run, bytes_moved=2 * sum(a.nbytes for a in args[:n_grad]))
    x = args[0]
    if kind == "products":
        w = args[1]
        z = np.empty((x.shape[0], w.shape[0]), x.dtype)
        de, dw = np.empty_like(x), np.empty_like(w)

        def run():
            np.matmul(x, w.T, out=z)
            np.matmul(z, w, out=de)
            np.matmul(z.T, x, out=dw)
        return Prepared(run, bytes_moved=2 * (x.nbytes + w.nbytes) + 3 * z.nbytes)
    if kind == "gemm":
        et = np.ascontiguousarray(x.T)

        def run():
            return x @ et
        return Prepared(run, bytes_moved=x.nbytes + x.shape[0] ** 2 * x.itemsize)
    if kind == "subtract":
        t = args[1]
        g = np.empty_like(x)
        if x.dtype == np.float16:
            xi, ti, gi = x.view(np.int16), t.view(np.int16), g.view(np.int16)

            def run():
                return np.bitwise_xor(xi, ti, out=gi)
        else:
            def run():
                return np.subtract(x, t, out=g)
        return Prepared(run, bytes_moved=x.nbytes + t.nbytes + g.nbytes)
    srcs = args[:n_grad]
    dsts = [np.empty_like(a) for a in srcs]

    def run():
        for d, s in zip(dsts, srcs):
            np.copyto(d, s)
    return Prepared(run, bytes_moved=2 * sum(a.nbytes for a in srcs))


def numpy_matmul(case, args):
    """NumPy's literal ``E @ E.T`` (handed to syrk): the suite's ``matmul`` entry (batch-hard)."""
    e = args[0]

    def run():
        return e @ e.T
    return Prepared(run)


def unfused_linear(case, args):
    """The linear cross-entropy the unfused way, with fastloss for the softmax: ``Z = E @ W.T``
    whole, ``softmax_cross_entropy(Z, y, grad_out=Z)`` in place, then ``(G @ W, G.T @ E)``: the
    suite's ``unfused`` entry (linear_ce), what ``linear_cross_entropy`` is held against."""
    import fastloss
    e, w, y = args

    def run():
        z = e @ w.T
        loss, g = fastloss.softmax_cross_entropy(z, y, grad_out=z)
        return loss, (g @ w, g.T @ e)

    def result(out):
        return Outcome(float(out[0]), out[1])
    return Prepared(run, result)


def prepare_entry(case, entry, args, device=None):
    """Entry ``entry`` of ``ENTRIES`` for ``case`` on its host inputs ``args``.

    ``device`` defaults to the case's backend.  Raises ``competitors.Missing`` (the
    library is not installed) or ``competitors.Unavailable`` (it cannot run here).
    """
    device = case.backend if device is None else device
    if entry in ("fastloss", "fastloss-grad_out"):
        return _fastloss(case, args, entry == "fastloss-grad_out", device)
    if entry == "copy":
        return ceiling(case, args, device)
    if entry == "numpy":
        if device != "cpu":
            raise competitors.Unavailable("NumPy runs on the CPU")
        return _numpy(case, args)
    if entry == "matmul":
        return numpy_matmul(case, args)
    if entry == "unfused":
        return unfused_linear(case, args)
    if entry in competitors.NAMES:
        p = competitors.prepare(entry, case.spec.name, _own(case, args), case.spec.bench.kwargs, device)

        def result(out, p=p):
            loss, grads, centers = p.result(out)
            return Outcome(loss, grads, centers)
        return Prepared(p.run, result, threads=p.threads)
    raise ValueError(f"unknown entry {entry!r}; expected one of {ENTRIES}")


def numpy_reference(case, args):
    """NumPy's ``Outcome`` on the case (float16 computed in float32), the check of fastloss itself."""
    p = _numpy(case, args)
    return p.result(p.run())


# ---------------------------------------------------------------------- timing


def time_calls(run, repeat=None, min_sample_s=1e-3, budget_s=3.0, fast_budget_s=0.25):
    """``(seconds per call of each sample, calls per sample)``, ``run`` already warmed up.

    One untimed call estimates the duration; a call shorter than ``min_sample_s`` is
    repeated inside each sample so that a sample lasts about that long.  ``repeat``
    samples are taken; ``None`` means 10, more (up to 50) while they fit in
    ``fast_budget_s``, fewer (at least 3) when 10 would take more than ``budget_s``.
    """
    t0 = time.perf_counter()
    run()
    est = max(time.perf_counter() - t0, 1e-7)
    iters = 1 if est >= min_sample_s else min(10_000, math.ceil(min_sample_s / est))
    if repeat is None:
        sample = est * iters
        n = max(3, min(10, int(budget_s / sample))) if sample * 10 > budget_s else \
            max(10, min(50, int(fast_budget_s / sample)))
    else:
        n = repeat
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        for _ in range(iters):
            run()
        samples.append((time.perf_counter() - t0) / iters)
    return samples, iters


# ---------------------------------------------------------------------- progress


class Progress:
    """A plain-text progress bar on ``stream`` (stderr): redrawn in place on a terminal,
    one line per step otherwise."""

    def __init__(self, total, stream=None, width=24):
        self.total = max(total, 1)
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.done = 0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = 0
        self.t0 = time.perf_counter()

    def show(self, label):
        filled = int(self.width * self.done / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        text = f"[{bar}] {self.done:>3}/{self.total} {time.perf_counter() - self.t0:6.1f}s  {label}"
        if self.tty:
            pad = max(0, self._last - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._last = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def step(self, label=""):
        self.done += 1
        self.show(label)

    def close(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------- one case


def _brief(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def run_case(case, entries, repeat=None, progress=None, skip=()):
    """Run every entry of ``case``; returns the case's result dict (see ``run_bench``)."""
    args = make_args(case)
    res = {"loss": case.spec.name, "short": case.short, "size": case.size,
           "shape": list(case.shape), "classes": case.classes, "dtype": case.dtype,
           "backend": case.backend, "group": case.group, "bytes_moved": bytes_moved(case, args),
           "entries": {}}
    out = res["entries"]
    ref = None
    ceiling_run = _ceiling_run(case, args)
    for entry in entries:
        if progress is not None:
            progress.show(f"{case.label}: {entry}")
        out[entry] = _run_entry(case, entry, args, ref, repeat, skip, ceiling_run)
        if entry == "fastloss":
            ref = out[entry].pop("_outcome", None)
        if progress is not None:
            progress.step(f"{case.label}: {entry} {out[entry]['status']}")
    base = out.get("fastloss", {}).get("median_s")
    copy = out.get("copy", {}).get("median_s")
    for name, e in out.items():
        m = e.get("median_s")
        e["vs_fastloss"] = (m / base) if (m and base and name != "copy") else None
        if name in ("fastloss", "fastloss-grad_out"):
            e["vs_copy"] = (m / copy) if (m and copy) else None
    return res


def _ceiling_run(case, args):
    """The case's copy ceiling, warmed up: the reference every other entry is timed beside
    (``regression.interleaved``); None when it cannot run."""
    try:
        run = ceiling(case, args, case.backend).run
        run()
    except Exception:
        return None
    return run


def ratio_key(case, entry):
    """An entry's name in ratio files: its pytest-benchmark id, ``ce-8192x1000-fastloss``."""
    return f"{case.group}-{entry}"


def _run_entry(case, entry, args, ref, repeat, skip, ceiling_run=None):
    e = {"status": None, "median_s": None}
    if entry in skip:
        e.update(status="skipped", note="--skip")
        return e
    if entry != "fastloss" and entry != "copy" and ref is None:
        e.update(status="failed", note="fastloss failed on this case: nothing to check against")
        return e
    try:
        p = prepare_entry(case, entry, args)
    except competitors.Missing as exc:
        e.update(status="missing", note=str(exc))
        return e
    except competitors.Unavailable as exc:
        e.update(status="n/a" if entry == "numpy" else "unavailable", note=str(exc))
        return e
    except Exception as exc:
        e.update(status="failed", note=_brief(exc))
        return e
    try:
        first = p.run()  # warm-up: JIT compile / cache load, torch.compile, jax.jit
        if p.result is not None:
            got = p.result(first)
            if entry == "fastloss":
                check_ref, against = numpy_reference(case, args), "numpy"
            else:
                check_ref, against = ref, "fastloss"
            loss_err, grad_err, ok, what = agreement(case, got, check_ref)
            e.update(loss_err=loss_err, grad_err=grad_err, checked_against=against)
            if entry == "fastloss":
                e["_outcome"] = got
                if not ok:  # fastloss itself disagrees with NumPy: still the reference, but say so
                    e["note"] = f"disagrees with numpy: {what}"
                    e["check"] = "mismatch"
            elif not ok:
                e.update(status="mismatch", note=f"disagrees with fastloss: {what}")
                return e
        del first
        if entry != "copy" and ceiling_run is not None:  # beside the ceiling, in rounds
            r = regression.interleaved(p.run, ceiling_run, ratio_key(case, entry), repeat)
            samples, iters = r.entry_s, r.calls
            e.update(ratio=r.ratio, ratio_spread=r.spread)
        else:
            samples, iters = time_calls(p.run, repeat)
    except Exception as exc:
        e.update(status="failed", note=_brief(exc))
        e.pop("_outcome", None)
        return e
    e.update(status="ok", median_s=statistics.median(samples), samples_s=samples, calls_per_sample=iters,
             bytes_moved=p.bytes_moved)
    if p.threads is not None:
        e["threads"] = p.threads
    return e


# ---------------------------------------------------------------------- the command


def _machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem = f", {pages / 2 ** 30:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs{mem}; {platform.system()} {platform.release()}; " \
           f"Python {platform.python_version()}"


def _versions(backends):
    import numba

    import fastloss
    parts = [f"fastloss {fastloss.__version__}", f"numpy {np.__version__}", f"numba {numba.__version__}"]
    for name in ("torch", "jax"):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "__version__"):
            parts.append(f"{name} {mod.__version__}")
        else:
            parts.append(f"{name} not used")
    if "cuda" in backends:
        try:
            from importlib.metadata import version
            parts.append(f"numba-cuda {version('numba-cuda')}")
        except Exception:
            parts.append("numba-cuda (version unknown)")
    return ", ".join(parts)


def _threads_desc(jax_note):
    import numba
    parts = [f"numba {numba.get_num_threads()}"]
    torch = sys.modules.get("torch")
    if torch is not None:
        parts.append(f"torch {torch.get_num_threads()}")
    if sys.modules.get("jax") is not None:
        parts.append(jax_note or "jax: XLA's default thread pool")
    parts.append("numpy: single-threaded ufuncs (BLAS threads for the gemm)")
    return ", ".join(parts)


def select_cases(losses, sizes, dtypes, backends):
    cases = []
    for backend in backends:
        for spec in losses:
            for size in sizes:
                for dtype in dtypes:
                    if dtype == "float16" and not spec.bench.float16:
                        continue
                    cases.append(Case(spec, size, dtype, backend))
    return cases


def run_bench(losses=None, sizes=("medium",), dtypes=("float32",), backends=("cpu",), repeat=None,
              threads=None, out_dir="fastloss-bench", plot=True, skip=(), command=None,
              stdout=None, stderr=None, save=None, baseline=None, fail_above=0.15):
    """Run the benchmark, print the table, write the files; returns ``(results, exit status)``.

    The exit status is 1 when an entry disagrees with fastloss or fastloss fails
    (a ``mismatch``), or when, against the ratios of ``baseline`` (a file ``save`` wrote),
    an entry's ratio to its ceiling grew by more than ``fail_above`` (a fraction) and more
    than the noise (``regression.compare``); else 0.  Missing competitors do not count.
    """
    base_ratios = None if baseline is None else regression.load(baseline)  # before the runs
    regression.steady_malloc()
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    specs = [registry.BY_NAME[n] for n in (losses or LOSS_CHOICES)]
    notes = []
    jax_note = None
    if threads:
        import numba
        numba.set_num_threads(threads)
        jax_note = competitors.set_threads(threads)
    backends = list(backends)
    if "cuda" in backends:
        ok, why = cuda_status()
        if not ok:
            backends.remove("cuda")
            notes.append(f"cuda backend skipped: {why}")
            print(f"note: cuda backend skipped: {why}", file=stderr)
    skipped_f16 = [s.bench.short for s in specs if not s.bench.float16] if "float16" in dtypes else []
    if skipped_f16:
        notes.append(f"float16 is benchmarked only for losses that take it in the suite: not for "
                     f"{', '.join(skipped_f16)}")
    cases = select_cases(specs, sizes, dtypes, backends)
    entries = ENTRIES
    progress = Progress(len(cases) * len(entries), stderr)
    results = {"meta": {}, "cases": [], "notes": notes}
    for case in cases:
        results["cases"].append(run_case(case, entries, repeat, progress, skip))
        gc.collect()
    progress.close()
    results["notes"] = collect_notes(results)
    results["meta"] = {
        "command": command or "python -m fastloss bench",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "versions": _versions(backends),
        "threads": _threads_desc(jax_note),
        "timing": ("the copy ceiling: " + (f"median of {repeat} samples" if repeat else
                   "median of 10 samples (up to 50 for calls under 5 ms, 3-9 for calls over 0.3 s)") +
                   "; every other entry: median of " + (f"{repeat}" if repeat else
                   f"{regression.ROUNDS} (at least {regression.MIN_ROUNDS} for slow calls)") +
                   " rounds, each a sample of the entry then one of the ceiling (the ratio per "
                   "round); after a checked warm-up call and one untimed call; calls under "
                   f"{regression.MIN_SAMPLE_S * 1e3:g} ms are repeated within a sample; fresh "
                   "gradient per call unless grad_out"),
        "rtol": RTOL,
    }
    mismatch = any(e.get("status") == "mismatch" or e.get("check") == "mismatch"
                   or (name == "fastloss" and e.get("status") == "failed")
                   for c in results["cases"] for name, e in c["entries"].items())

    print(f"fastloss bench: {results['meta']['versions']}; threads: {results['meta']['threads']}", file=stdout)
    print(format_text(results), file=stdout)
    print(LEGEND, file=stdout)
    for n in results["notes"]:
        print(f"note: {n}", file=stdout)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    (out / "results.md").write_text(format_markdown(results))
    written = ["results.json", "results.md"]
    if plot:
        if draw_chart(results, out / "results.png"):
            written.append("results.png")
        else:
            print("note: results.png not drawn: matplotlib is not installed", file=stdout)
    print(f"wrote {', '.join(str(out / w) for w in written)}", file=stdout)
    ratios = collect_ratios(results)
    if save is not None:
        regression.save(save, ratios, results["meta"])
        print(f"wrote {save} ({len(ratios)} ratios)", file=stdout)
    slower = False
    if base_ratios is not None:
        rows = regression.compare(base_ratios, ratios, fail_above)
        for _ in range(regression.CONFIRM_RUNS):  # a flagged entry is timed again
            flagged = {r.key for r in rows if r.flagged}
            if not flagged:
                break
            again = _run_again(cases, flagged, repeat, skip)
            ratios = {k: min(v, again.get(k, v), key=lambda r: r["ratio"]) for k, v in ratios.items()}
            rows = regression.compare(base_ratios, ratios, fail_above)
        print(regression.report(rows, fail_above), file=stdout)
        slower = any(r.flagged for r in rows)
    if mismatch:
        print("SOME ENTRIES DISAGREE WITH FASTLOSS (mismatch): see the notes", file=stdout)
    return results, (1 if mismatch or slower else 0)


def _run_again(cases, keys, repeat, skip):
    """The ratios of the entries ``keys`` timed again (their cases run anew, fastloss first:
    the reference of the checks)."""
    again = {"cases": []}
    for case in cases:
        entries = [e for e in ENTRIES if ratio_key(case, e) in keys]
        if entries:
            again["cases"].append(run_case(case, ["fastloss"] + [e for e in entries if e != "fastloss"],
                                           repeat, None, skip))
            gc.collect()
    return collect_ratios(again)


def collect_ratios(results):
    """``{ratio key: {"ratio", "spread", "rounds", "reference"}}`` of every entry of
    ``results`` timed beside its ceiling."""
    ratios = {}
    for c in results["cases"]:
        for name, e in c["entries"].items():
            if e.get("ratio") is not None:
                ratios[f"{c['group']}-{name}"] = {"ratio": e["ratio"], "spread": e["ratio_spread"],
                                                  "rounds": len(e["samples_s"]), "reference": "copy"}
    return ratios


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


# ---------------------------------------------------------------------- argparse


def _size(value):
    if value not in SIZES + HIDDEN_SIZES:
        raise argparse.ArgumentTypeError(f"invalid size {value!r} (choose from {', '.join(SIZES)})")
    return value


def _loss(value):
    if value not in registry.BY_NAME:
        raise argparse.ArgumentTypeError(f"invalid loss {value!r} (choose from {', '.join(LOSS_CHOICES)})")
    return registry.BY_NAME[value].bench.short


def add_arguments(p):
    ce = registry.BY_NAME["ce"].bench
    sizes = ", ".join(f"{s} (ce {shape_str(ce.sizes[s])})" for s in SIZES)
    p.add_argument("--losses", nargs="+", type=_loss, default=None, metavar="LOSS",
                   help=f"losses to run (default: all): {', '.join(LOSS_CHOICES)} "
                        "(or the function names)")
    p.add_argument("--sizes", nargs="+", type=_size, default=["medium"], metavar="SIZE",
                   help=f"sizes: {sizes}; every loss's shapes are in bench/README.md (default: medium)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["float32"],
                   help="input dtypes (default: float32; float16 for ce, focal, sigmoid_focal, huber)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=["cpu"],
                   help="cpu (NumPy arrays) and/or cuda (device arrays; skipped with a note "
                        "without a GPU) (default: cpu)")
    p.add_argument("--repeat", type=int, default=None, metavar="N",
                   help="timed samples per entry, the median reported (default: 10; up to 50 "
                        "for calls under 5 ms, down to 3 for calls over 0.3 s)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="numba.set_num_threads(N), torch.set_num_threads(N), and 1 thread for "
                        "XLA when N is 1 (default: each library's own)")
    p.add_argument("--skip", nargs="+", default=[], choices=COMPETITORS, metavar="NAME",
                   help=f"competitors not to run: {', '.join(COMPETITORS)} (shown as skipped)")
    p.add_argument("--out", default="fastloss-bench", metavar="DIR",
                   help="folder for results.json, results.md, results.png (default: ./fastloss-bench)")
    p.add_argument("--no-plot", action="store_true", help="do not draw results.png")
    p.add_argument("--save", default=None, metavar="FILE", help=regression.OPTION_HELP["save"])
    p.add_argument("--baseline", default=None, metavar="FILE",
                   help=regression.OPTION_HELP["baseline"])
    p.add_argument("--fail-above", type=float, default=regression.FAIL_ABOVE_PCT, metavar="PCT",
                   help=regression.OPTION_HELP["fail_above"])


HELP = "time every loss beside NumPy, torch, torch.compile, JAX and a copy ceiling"
DESCRIPTION = ("Time fastloss's fused loss+gradient beside NumPy, PyTorch eager, torch.compile "
               "and jax.jit(value_and_grad) (those installed; the others are shown as missing) "
               "and a memory-copy ceiling, on synthetic data, after checking that every "
               "competitor's loss and gradient agree with fastloss's. Prints one table of "
               "medians and ratios and writes results.json, results.md and (with matplotlib) "
               "results.png to --out. Exit status 1 when something disagrees.")


def run(args):
    if args.repeat is not None and args.repeat < 1:
        print("--repeat must be at least 1", file=sys.stderr)
        return 2
    if args.threads is not None:
        import numba
        top = numba.config.NUMBA_NUM_THREADS
        if not 1 <= args.threads <= top:
            print(f"--threads must be between 1 and {top} (NUMBA_NUM_THREADS)", file=sys.stderr)
            return 2
    if not args.fail_above >= 0:
        print("--fail-above must be a percentage >= 0", file=sys.stderr)
        return 2
    if args.baseline is not None:
        try:
            regression.load(args.baseline)
        except (OSError, ValueError) as exc:
            print(f"--baseline: {exc}", file=sys.stderr)
            return 2
    losses = list(dict.fromkeys(args.losses)) if args.losses else None
    _, status = run_bench(losses=losses, sizes=list(dict.fromkeys(args.sizes)),
                          dtypes=list(dict.fromkeys(args.dtypes)), backends=list(dict.fromkeys(args.backends)),
                          repeat=args.repeat, threads=args.threads, out_dir=args.out, plot=not args.no_plot,
                          skip=tuple(args.skip), command=getattr(args, "command_line", None),
                          save=args.save, baseline=args.baseline, fail_above=args.fail_above / 100)
    return status
