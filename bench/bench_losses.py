"""fastloss benchmarks: fused loss + gradient against NumPy, torch and a memory-copy ceiling.

Run with ``pytest bench/`` (see bench/README.md).  Every case is one benchmark
group (``ce-8192x1000``, ...) holding, measured in the same run:

* ``fastloss``           the fused call, a fresh gradient array each call;
* ``fastloss-grad_out``  the same call writing into a preallocated ``grad_out=``;
* ``numpy``              the vectorized NumPy version (``fastloss._numpy_losses``);
* ``copy``               the bandwidth ceiling: ``np.copyto`` of the input into a
                         preallocated array (read N, write N: what a one-pass fused
                         kernel must move at least); for Huber, ``np.subtract(a, b, out=g)``
                         (read both inputs, write the gradient once);
* ``torch``              torch eager forward + ``torch.autograd.grad`` (when importable);
* ``torch-compile``      the same with ``torch.compile`` (skipped when compiling fails).

Before an entry is timed, its result is checked against fastloss's (float32
tolerance, ``fastloss._numpy_losses.agreement``); fastloss itself is checked
against NumPy.  That first call is also the warm-up (Numba JIT / disk-cache load,
torch.compile).  All inputs are float32, labels int64, ``reduction="mean"``.
"""
import math
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

import fastloss
from fastloss import _numpy_losses as npl

RTOL = 1e-4  # float32


@dataclass(frozen=True)
class Case:
    id: str            # the benchmark group
    loss: str          # name of the fastloss function and key of npl.LOSSES
    shape: tuple
    kwargs: dict = field(default_factory=dict)  # hyper-parameters NumPy hard-codes, spelled out for fastloss


CASES = (
    Case("ce-8192x1000", "softmax_cross_entropy", (8192, 1000)),
    Case("ce-2048x32000", "softmax_cross_entropy", (2048, 32000)),
    Case("ce-64x10", "softmax_cross_entropy", (64, 10)),
    Case("focal-8192x1000", "focal_loss", (8192, 1000), {"gamma": 2.0}),
    Case("sigmoid_focal-8192x1000", "sigmoid_focal_loss", (8192, 1000), {"alpha": 0.25, "gamma": 2.0}),
    Case("huber-16777216", "huber_loss", (2 ** 24,), {"delta": 1.0}),
)

ROLES = ("fastloss", "fastloss-grad_out", "numpy", "copy", "torch", "torch-compile")

# Cases run one after the other (all roles of a case, then the next case), so a
# one-slot cache keeps only the current case's arrays alive (~1 GB at 2048x32000).
_current = {}


def _case_data(case):
    if _current.get("case") != case:
        _current.clear()
        x, y = npl.make_inputs(case.loss, case.shape, seed=0)
        _current.update(case=case, x=x, y=y)
    return _current


def _numpy_ref(case):
    d = _case_data(case)
    if "numpy_ref" not in d:
        d["numpy_ref"] = npl.LOSSES[case.loss](d["x"], d["y"])
    return d["numpy_ref"]


def _fastloss_fn(case):
    return getattr(fastloss, case.loss)


def _reference(case):
    """fastloss's (loss, grad): what every competitor must agree with."""
    d = _case_data(case)
    if "fl_ref" not in d:
        try:
            fn = _fastloss_fn(case)
        except AttributeError:  # fastloss not built yet: check competitors against NumPy
            d["fl_ref"] = (*_numpy_ref(case), "numpy (fastloss unavailable)")
        else:
            res = fn(d["x"], d["y"], **case.kwargs)
            d["fl_ref"] = (float(res.loss), np.array(res.grad, copy=True), "fastloss")
    return d["fl_ref"]


def _check(role, case, loss, grad, against="fastloss"):
    if against == "numpy":
        ref_loss, ref_grad = _numpy_ref(case)
        ref_name = "numpy"
    else:
        ref_loss, ref_grad, ref_name = _reference(case)
    grad = np.asarray(grad)
    x = _case_data(case)["x"]
    assert grad.shape == x.shape and grad.dtype == x.dtype, (
        f"{role}: gradient {grad.shape} {grad.dtype}, expected {x.shape} {x.dtype}")
    loss_err, grad_err, ok = npl.agreement(loss, grad, ref_loss, ref_grad, rtol=RTOL)
    assert ok, (f"{case.id}: {role} disagrees with {ref_name}: |dloss|={loss_err:.3g} "
                f"(loss {float(loss):.7g} vs {float(ref_loss):.7g}), max|dgrad|={grad_err:.3g} "
                f"(max|grad| {float(np.max(np.abs(ref_grad))):.3g}), rtol={RTOL:g}")


# ----------------------------------------------------------------- torch side

def _torch_losses():
    import torch
    import torch.nn.functional as F

    def softmax_cross_entropy(x, y):
        return F.cross_entropy(x, y)

    def focal_loss(x, y, gamma=2.0):
        logp = F.log_softmax(x, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        pt = logp.exp()
        return (-((1 - pt) ** gamma) * logp).mean()

    def sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0):
        # torchvision.ops.sigmoid_focal_loss, verbatim (reduction="mean")
        p = torch.sigmoid(x)
        ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
        p_t = p * t + (1 - p) * (1 - t)
        loss = ce * ((1 - p_t) ** gamma)
        if alpha >= 0:
            alpha_t = alpha * t + (1 - alpha) * (1 - t)
            loss = alpha_t * loss
        return loss.mean()

    def huber_loss(x, y):
        return F.huber_loss(x, y, delta=1.0)

    return {f.__name__: f for f in (softmax_cross_entropy, focal_loss, sigmoid_focal_loss, huber_loss)}


_compiled = {}  # (id of an eager function) -> its torch.compile


def torch_or_skip(config, compiled=False):
    """torch, set up once for the bench (``--bench-torch-threads``); skips the entry when
    torch is missing or its kind is switched off (``--bench-no-torch``, ``--bench-no-compile``).
    Shared by every bench file."""
    if config.getoption("--bench-no-torch"):
        pytest.skip("--bench-no-torch")
    if compiled and config.getoption("--bench-no-compile"):
        pytest.skip("--bench-no-compile")
    torch = pytest.importorskip("torch", reason="torch is not installed")
    threads = config.getoption("--bench-torch-threads")
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch


def compiled_or_skip(torch, fn):
    """``torch.compile(fn)``, made once per function; skips the entry when compiling fails."""
    if id(fn) not in _compiled:
        try:
            _compiled[id(fn)] = (fn, torch.compile(fn))  # fn kept alive: its id stays its own
        except Exception as exc:  # pragma: no cover - depends on the torch install
            pytest.skip(f"torch.compile unavailable: {type(exc).__name__}: {exc}")
    return _compiled[id(fn)][1]


_torch_eager = {}


def _torch_fn(config, case, compiled):
    torch = torch_or_skip(config, compiled)
    if not _torch_eager:
        _torch_eager.update(_torch_losses())
    fn = _torch_eager[case.loss]
    return torch, (compiled_or_skip(torch, fn) if compiled else fn)


# --------------------------------------------------------------------- the suite

def _bench(benchmark, config, run):
    """Time ``run`` (already warmed up and checked) with an explicit round count.

    Untimed calls (one for a slow call, up to 50 ms' worth for a fast one) estimate
    its duration by their median; then ``benchmark.pedantic`` with rounds filling
    ``--bench-time`` seconds (at least ``--bench-min-rounds``) and, for calls
    under 20 us, several iterations per round.
    """
    target = config.getoption("--bench-time")
    min_rounds = config.getoption("--bench-min-rounds")
    times = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        run()
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if t1 - start >= 0.05 or len(times) >= 1000:
            break
    t = max(statistics.median(times), 1e-7)
    iterations = max(1, math.ceil(2e-5 / t))
    rounds = min(100_000, max(min_rounds, math.ceil(target / (t * iterations))))
    benchmark.extra_info["estimate_s"] = t
    return benchmark.pedantic(run, rounds=rounds, iterations=iterations, warmup_rounds=0)


def _params():
    for case in CASES:
        for role in ROLES:
            yield pytest.param(case, role, id=f"{case.id}-{role}")


@pytest.mark.parametrize("case, role", list(_params()))
def test_loss(benchmark, request, case, role):
    d = _case_data(case)
    x, y = d["x"], d["y"]
    in_bytes = x.nbytes + y.nbytes
    benchmark.group = case.id
    benchmark.extra_info.update(role=role, loss=case.loss, shape="x".join(map(str, case.shape)),
                                dtype=str(x.dtype), bytes_moved=in_bytes + x.nbytes)

    if role in ("fastloss", "fastloss-grad_out"):
        fn = _fastloss_fn(case)
        kw = case.kwargs
        if role == "fastloss":
            def run():
                return fn(x, y, **kw)
            res = run()                                 # warm-up (JIT) + check
            _check(role, case, res.loss, res.grad, against="numpy")
        else:
            g = np.empty_like(x)

            def run():
                return fn(x, y, grad_out=g, **kw)
            res = run()
            _check(role, case, res.loss, g)              # the gradient is in grad_out
        _bench(benchmark, request.config, run)

    elif role == "numpy":
        ref = npl.LOSSES[case.loss]

        def run():
            return ref(x, y)
        loss, grad = _numpy_ref(case)                  # no JIT: the reference call is the warm-up
        _check(role, case, loss, grad)
        _bench(benchmark, request.config, run)

    elif role == "copy":
        if case.loss == "huber_loss":
            g = np.empty_like(x)

            def run():
                return np.subtract(x, y, out=g)
            benchmark.extra_info["bytes_moved"] = x.nbytes + y.nbytes + g.nbytes
        else:
            dst = np.empty_like(x)

            def run():
                return np.copyto(dst, x)
            benchmark.extra_info["bytes_moved"] = 2 * x.nbytes
        run()
        _bench(benchmark, request.config, run)

    elif role in ("torch", "torch-compile"):
        torch, fn = _torch_fn(request.config, case, compiled=role == "torch-compile")
        benchmark.extra_info["torch_threads"] = torch.get_num_threads()
        xt = torch.from_numpy(x).requires_grad_(True)
        yt = torch.from_numpy(y)

        def run():
            loss = fn(xt, yt)
            (grad,) = torch.autograd.grad(loss, xt)
            return loss, grad
        try:
            loss, grad = run()                          # warm-up: compiles for torch-compile
        except Exception as exc:
            if role == "torch-compile":
                pytest.skip(f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            raise
        _check(role, case, loss.item(), grad.numpy())
        _bench(benchmark, request.config, run)

    else:  # pragma: no cover
        raise AssertionError(role)
