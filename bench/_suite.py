"""What every bench file shares: the cases, one entry's check and its timing.

The cases (loss, sizes, inputs, hyper-parameters), the entries (fastloss, the
copy ceiling, NumPy, and the competitors of ``fastloss.tools.competitors``:
torch eager, ``torch.compile``, JAX) and the agreement check live in
``fastloss.tools.bench`` (each loss's sizes and inputs in ``fastloss.tools.registry``),
which ``python -m fastloss bench`` runs too: one copy of each.  This module adds pytest-benchmark around them.

``run_entry(benchmark, config, case, role)``:

1. prepares the entry on the case's inputs (skipped when its library is missing,
   switched off by an option, or without a GPU for ``fastloss-cuda``);
2. calls it once (the warm-up: Numba JIT or cache load, ``torch.compile``,
   ``jax.jit``) and checks its loss and gradient (and updated centers) against
   fastloss's, and fastloss's own against NumPy: a disagreement fails the entry;
3. times it with ``benchmark.pedantic`` (``timed``);
4. times it again in interleaved rounds beside the case's copy ceiling
   (``fastloss.tools.regression``): the ratio and its spread go to the benchmark's
   ``extra_info`` and to ``RATIOS``, which ``--fastloss-save`` writes and
   ``--fastloss-baseline`` gates (``bench/conftest.py``).
"""
import gc
import math
import statistics
import time

import pytest

from fastloss.tools import bench as B
from fastloss.tools import competitors as _competitors
from fastloss.tools import registry, regression

# Each suite case runs at these sizes in float32, and at the medium size in float16
# where the loss takes float16.
SIZES = B.SIZES

SLOW_S = 0.25  # calls slower than this get the large size's fewer rounds

ROLES = ("fastloss", "fastloss-grad_out", "numpy", "copy", "torch", "torch-compile", "jax", "fastloss-cuda")


def suite_cases(shorts):
    cases = []
    for short in shorts:
        spec = registry.BY_NAME[short]
        for size in SIZES:
            cases.append(B.Case(spec, size))
        if spec.bench.float16:
            cases.append(B.Case(spec, "medium", "float16"))
    return cases


def params(cases, roles=ROLES, extra=None, names=None):
    """``pytest.param(case, role, id=f"{group}-{name}")`` for every case and role;
    ``extra`` maps a loss's short name to roles only it has (``matmul``), ``names``
    renames a role in the id (batch-hard's ``copy`` is a ``gemm``)."""
    for case in cases:
        for role in roles + tuple((extra or {}).get(case.short, ())):
            name = (names or {}).get((case.short, role), role)
            yield pytest.param(case, role, id=f"{case.group}-{name}")


RATIOS = {}  # benchmark id -> its ratio to the case's ceiling (regression.Ratio.as_dict)

# Cases run one after the other (every role of a case, then the next case), so a
# one-slot cache keeps only the current case's arrays alive (~1 GB at the large sizes).
_current = {}


def case_data(case):
    if _current.get("case") != case:
        _current.clear()
        gc.collect()
        _current.update(case=case, args=B.make_args(case))
    return _current


def reference(case):
    """fastloss's ``Outcome`` on the case: what every other entry must agree with."""
    d = case_data(case)
    if "fastloss" not in d:
        p = B.prepare_entry(case, "fastloss", d["args"], device="cpu")
        d["fastloss"] = p.result(p.run())
    return d["fastloss"]


def numpy_reference(case):
    d = case_data(case)
    if "numpy" not in d:
        d["numpy"] = B.numpy_reference(case, d["args"])
    return d["numpy"]


def _check(case, role, got):
    if role == "fastloss":
        ref, against = numpy_reference(case), "numpy"
    else:
        ref, against = reference(case), "fastloss"
    _, _, ok, what = B.agreement(case, got, ref)
    assert ok, f"{case.group}: {role} disagrees with {against}: {what}"


def _skip_by_option(config, role):
    if role in ("torch", "torch-compile"):
        if config.getoption("--bench-no-torch"):
            pytest.skip("--bench-no-torch")
        if role == "torch-compile" and config.getoption("--bench-no-compile"):
            pytest.skip("--bench-no-compile")
    if role == "jax" and config.getoption("--bench-no-jax"):
        pytest.skip("--bench-no-jax")


def _set_up(config, role):
    """Library set-up for the role: torch's thread count (``--bench-torch-threads``)."""
    if role in ("torch", "torch-compile"):
        threads = config.getoption("--bench-torch-threads")
        try:
            torch = _competitors.torch_module()
        except _competitors.Missing as exc:
            pytest.skip(str(exc))
        if threads and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def run_entry(benchmark, config, case, role):
    d = case_data(case)
    args = d["args"]
    benchmark.group = case.group
    benchmark.extra_info.update(role=role, loss=case.spec.name, size=case.size,
                                shape=B.shape_str(case.shape), dtype=case.dtype,
                                bytes_moved=B.bytes_moved(case, args))
    entry, device = role, "cpu"
    if role == "fastloss-cuda":
        ok, why = B.cuda_status()
        if not ok:
            pytest.skip(why)
        entry, device = "fastloss", "cuda"
    _skip_by_option(config, role)
    _set_up(config, role)
    try:
        p = B.prepare_entry(case, entry, args, device=device)
    except (_competitors.Missing, _competitors.Unavailable) as exc:
        pytest.skip(str(exc))
    try:
        first = p.run()                     # warm-up (JIT, torch.compile, jax.jit) and check
    except Exception as exc:
        if role == "torch-compile":
            pytest.skip(f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        raise
    if p.result is not None:
        _check(case, role, p.result(first))
    del first
    if p.bytes_moved:
        benchmark.extra_info["bytes_moved"] = p.bytes_moved
    if p.threads is not None:
        benchmark.extra_info["threads"] = p.threads
    timed(benchmark, config, p.run, large=case.size == "large")
    if role != "copy":
        r = regression.interleaved(p.run, ceiling_run(case, device), benchmark.param)
        benchmark.extra_info.update(ratio=r.ratio, ratio_spread=r.spread,
                                    ratio_rounds=len(r.entry_s))
        RATIOS[benchmark.param] = r.as_dict("copy")


def ceiling_run(case, device):
    """The case's copy ceiling on ``device``, prepared once per case and warmed up."""
    d = case_data(case)
    if ("ceiling", device) not in d:
        run = B.ceiling(case, d["args"], device).run
        run()
        d["ceiling", device] = run
    return d["ceiling", device]


def timed(benchmark, config, run, large=False):
    """Time ``run`` (already warmed up and checked) with an explicit round count.

    Untimed calls (one for a slow call, up to 50 ms' worth for a fast one) estimate
    its duration by their median; then ``benchmark.pedantic`` with rounds filling
    ``--bench-time`` seconds (at least ``--bench-min-rounds``, 2 fewer at the large
    size and for calls over ``SLOW_S``) and, for calls under 20 us, several
    iterations per round.
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
    if large or t > SLOW_S:
        min_rounds = max(1, min_rounds - 2)
    iterations = max(1, math.ceil(2e-5 / t))
    rounds = min(100_000, max(min_rounds, math.ceil(target / (t * iterations))))
    benchmark.extra_info["estimate_s"] = t
    return benchmark.pedantic(run, rounds=rounds, iterations=iterations, warmup_rounds=0)
