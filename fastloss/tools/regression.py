"""Speed as a ratio to a reference timed beside it, and a regression gate on those ratios.

Absolute times drift with a shared machine's load (the neighbours, the clock, the turbo),
so a gate on medians either cries wolf or misses real regressions.  Each entry of a case is
therefore timed in *interleaved rounds* with the case's reference (its memory-copy
ceiling; one gemm for batch mining, ``bench.ceiling``): a round takes one sample of the
entry, then one of the reference, each a few calls lasting about ``MIN_SAMPLE_S``.  A
change in load hits both samples of a round alike, and the round's ratio
``entry / reference`` keeps what the code costs relative to moving its bytes.  The
entry's ratio is the median over rounds; its *spread* is the interquartile range of the
round ratios over that median (0.05: the middle half of the rounds within 5 %).

A gate compares two sets of ratios (``save`` writes one, ``load`` reads one): an entry is
flagged when its ratio grew by more than the threshold *and* by more than the noise, the
95 % margin of the difference of two medians, ``1.96 * sqrt(se_1**2 + se_2**2)`` with each
run's standard error of its median ``se = 0.93 * spread / sqrt(rounds)`` (for a normal
sample, the interquartile range is 1.349 sigma and the median's error 1.2533 sigma / sqrt(n)).
The command times a flagged entry again (``CONFIRM_RUNS`` times) and keeps its lowest ratio: a
shared machine's state can shift for seconds (a neighbour taking the memory bandwidth slows
the copy ceiling and not a compute-bound kernel), which no reference cancels, while a real
regression is slower every time.  Both ``python -m fastloss bench --baseline FILE
--fail-above PCT`` and the pytest-benchmark suite (``bench/conftest.py``:
``--fastloss-baseline FILE --fastloss-fail-above PCT``) use ``compare``.

``SLOWDOWN`` is a test hook of the harness, never of the kernels: ``{entry key: fraction}``
makes every timed call of that entry last ``1 + fraction`` times as long (a busy wait after
the call), so that a test can inject a regression and see the gate flag it; a process reads
it from ``FASTLOSS_BENCH_SLOWDOWN`` (``key=fraction,...``) at import.

``steady_malloc`` pins glibc's malloc thresholds where its own adaptation ends up (large
blocks up to 32 MiB from the heap) and stops it returning freed heap to the system: without
it, whether a fresh gradient of a few tens of MB costs page faults depends on the order of
earlier frees, and a fresh-gradient entry's ratio jumps by up to a third between runs.
"""
import ctypes
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

ROUNDS = 15  # interleaved rounds per entry (fewer, at least MIN_ROUNDS, past BUDGET_S)
MIN_ROUNDS = 5
BUDGET_S = 4.0  # seconds of rounds per entry beyond which slow entries take fewer rounds
MIN_SAMPLE_S = 2e-3  # a sample lasts about this long (short calls repeat within it)
CONFIRM_RUNS = 2  # times a flagged entry is timed again before the gate fails on it
FAIL_ABOVE_PCT = 15.0  # the default threshold
# the options of both front ends (the command's --save, the suite's --fastloss-save, ...)
OPTION_HELP = {
    "save": "write every entry's ratio to its copy ceiling (timed in interleaved rounds) to "
            "FILE, a baseline",
    "baseline": "compare the ratios with FILE (a saved baseline): exit status 1 when an entry's "
                "ratio grew beyond the threshold and beyond the noise",
    "fail_above": f"the regression threshold, in percent (default {FAIL_ABOVE_PCT:g})",
}
FORMAT = "fastloss-ratios/1"

SLOWDOWN = {key: float(fraction) for key, fraction in  # the test hook (see above)
            (item.split("=", 1) for item in os.environ.get("FASTLOSS_BENCH_SLOWDOWN", "").split(",")
             if "=" in item)}


def steady_malloc():
    """Pin glibc's malloc thresholds (see above): mmap only above 32 MiB, no trimming.
    Returns whether it applied (glibc on Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def _slowed(run, fraction):
    """``run`` made ``1 + fraction`` times as slow, by a busy wait after each call."""
    def slow():
        t0 = time.perf_counter()
        result = run()
        until = t0 + (time.perf_counter() - t0) * (1.0 + fraction)
        while time.perf_counter() < until:
            pass
        return result
    return slow


def _calls_per_sample(run):
    """``(calls per sample, estimated seconds per sample)``: enough calls for one sample of
    ``run`` to last about ``MIN_SAMPLE_S`` (one untimed call estimates it)."""
    t0 = time.perf_counter()
    run()
    est = max(time.perf_counter() - t0, 1e-7)
    calls = 1 if est >= MIN_SAMPLE_S else min(10_000, math.ceil(MIN_SAMPLE_S / est))
    return calls, calls * est


def _sample(run, calls):
    t0 = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - t0) / calls


@dataclass
class Ratio:
    """An entry against its reference over interleaved rounds: the median of the round ratios,
    their spread (interquartile range over the median), the seconds per call of each round,
    entry and reference, and the entry's calls per sample."""
    ratio: float
    spread: float
    entry_s: list
    reference_s: list
    calls: int

    def as_dict(self, reference):
        return {"ratio": self.ratio, "spread": self.spread, "rounds": len(self.entry_s),
                "reference": reference}


def spread(values):
    """The interquartile range of ``values`` over their median (0 for fewer than two)."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    med = statistics.median(values)
    return (q3 - q1) / med if med else math.inf


def interleaved(run, reference, key=None, rounds=None):
    """``Ratio`` of ``run`` (warmed up) to ``reference`` over ``rounds`` interleaved rounds
    (default ``ROUNDS``, fewer for slow entries: see ``BUDGET_S``); ``key`` names the entry
    for the ``SLOWDOWN`` hook."""
    if key in SLOWDOWN:
        run = _slowed(run, SLOWDOWN[key])
    (n_run, s_run), (n_ref, s_ref) = _calls_per_sample(run), _calls_per_sample(reference)
    if rounds is None:
        rounds = max(MIN_ROUNDS, min(ROUNDS, int(BUDGET_S / (s_run + s_ref))))
    entry_s, reference_s = [], []
    for _ in range(rounds):
        entry_s.append(_sample(run, n_run))
        reference_s.append(_sample(reference, n_ref))
    ratios = [e / r for e, r in zip(entry_s, reference_s)]
    return Ratio(statistics.median(ratios), spread(ratios), entry_s, reference_s, n_run)


# ---------------------------------------------------------------------- files and the gate


def save(path, ratios, meta=None):
    """Write ``{key: Ratio.as_dict(...)}`` as a baseline file."""
    with open(path, "w") as f:
        json.dump({"format": FORMAT, "meta": meta or {}, "entries": ratios}, f, indent=1)
        f.write("\n")


def load(path):
    """The ``{key: {"ratio", "spread", ...}}`` of a file written by ``save``; ValueError
    naming the file when it is not one."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastloss ratio file (format {FORMAT!r}): "
                         "write one with --save (or --fastloss-save)")
    return data["entries"]


@dataclass
class Row:
    key: str
    base: float | None
    new: float | None
    change: float | None  # new / base - 1
    noise: float | None  # the 95 % margin of the change (see above)
    flagged: bool


def _median_error(r):
    """A run's standard error of its median ratio, relative to it."""
    return 0.93 * r["spread"] / math.sqrt(max(r.get("rounds", 1), 1))


def noise(b, c):
    """The 95 % margin of ``c``'s median ratio over ``b``'s, as a fraction."""
    return 1.96 * math.hypot(_median_error(b), _median_error(c))


def compare(baseline, current, fail_above):
    """One ``Row`` per key of either run (sorted); ``fail_above`` is the threshold as a
    fraction (0.15 for 15 %).  A key in one run only is reported, never flagged."""
    rows = []
    for key in sorted(set(baseline) | set(current)):
        b, c = baseline.get(key), current.get(key)
        if b is None or c is None or not b["ratio"] or c["ratio"] is None:
            rows.append(Row(key, b and b["ratio"], c and c["ratio"], None, None, False))
            continue
        change = c["ratio"] / b["ratio"] - 1.0
        margin = noise(b, c)
        rows.append(Row(key, b["ratio"], c["ratio"], change, margin,
                        change > fail_above and change > margin))
    return rows


def report(rows, fail_above):
    """The gate's table, one line per entry, and a last line with the verdict."""
    def pct(v):
        return "-" if v is None else f"{100 * v:+.1f}%"

    def num(v):
        return "-" if v is None else f"{v:.3f}"

    width = max([len(r.key) for r in rows] + [5])
    lines = [f"{'entry':{width}s}  {'baseline':>8s}  {'new':>8s}  {'change':>8s}  {'noise':>7s}",
             "-" * (width + 41)]
    for r in rows:
        noise = "-" if r.noise is None else f"{100 * r.noise:.1f}%"
        lines.append(f"{r.key:{width}s}  {num(r.base):>8s}  {num(r.new):>8s}  {pct(r.change):>8s}"
                     f"  {noise:>7s}" + ("  SLOWER" if r.flagged else ""))
    flagged = [r.key for r in rows if r.flagged]
    lines.append(f"regression gate at {100 * fail_above:g}%: " +
                 (f"{len(flagged)} slower: {', '.join(flagged)}" if flagged else
                  f"nothing slower beyond the threshold and the noise ({len(rows)} entries)"))
    return "\n".join(lines)
