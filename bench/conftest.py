"""pytest-benchmark plumbing for ``bench/``: options and the ratio table.

After pytest-benchmark's own table, ``pytest_terminal_summary`` prints, for each
benchmark group (one loss at one size), every entry's median and its ratio to
the memory-copy ceiling and to fastloss, all measured in this one run: these
ratios, not absolute times from different runs, are what we quote.  The same
table goes into a saved benchmark JSON (``--benchmark-autosave`` /
``--benchmark-json``) under the key ``"fastloss_ratios"``.

The regression gate (``fastloss.tools.regression``): every entry is also timed in
interleaved rounds beside its case's copy ceiling (``_suite.RATIOS``);
``--fastloss-save FILE`` writes those ratios, and ``--fastloss-baseline FILE``
compares with a saved file and fails the run (exit status 1) when an entry's ratio
grew by more than ``--fastloss-fail-above`` percent and more than the noise.
"""
import pytest
from _suite import RATIOS

from fastloss.tools import regression

# Row order of the ratio table; bench/_suite.py stores the role in extra_info.
ROLE_ORDER = ("fastloss", "fastloss-grad_out", "fastloss-cuda", "numpy", "torch", "torch-compile", "jax",
              "matmul", "unfused", "copy")
BASE_ROLE = "fastloss"
CEILING_ROLE = "copy"


def pytest_addoption(parser):
    group = parser.getgroup("fastloss-bench", "fastloss benchmarks (bench/)")
    group.addoption("--bench-no-torch", action="store_true", default=False,
                    help="skip the torch entries even when torch is importable")
    group.addoption("--bench-no-compile", action="store_true", default=False,
                    help="skip the torch.compile entries (their first compile takes ~5-30 s)")
    group.addoption("--bench-no-jax", action="store_true", default=False,
                    help="skip the jax entries even when jax is importable")
    group.addoption("--bench-torch-threads", type=int, default=None, metavar="N",
                    help="torch.set_num_threads(N) for the torch entries (default: torch's own, "
                         "one per core)")
    group.addoption("--bench-time", type=float, default=0.5, metavar="SECONDS",
                    help="timed seconds per entry (rounds = SECONDS / one call, at least "
                         "--bench-min-rounds; default 0.5)")
    group.addoption("--bench-min-rounds", type=int, default=5, metavar="N",
                    help="fewest timed rounds per entry, however slow the call (default 5)")
    group.addoption("--fastloss-save", default=None, metavar="FILE",
                    help=regression.OPTION_HELP["save"])
    group.addoption("--fastloss-baseline", default=None, metavar="FILE",
                    help=regression.OPTION_HELP["baseline"])
    group.addoption("--fastloss-fail-above", type=float, default=regression.FAIL_ABOVE_PCT,
                    metavar="PCT", help=regression.OPTION_HELP["fail_above"])


def pytest_configure(config):
    # importing torch emits these; they say nothing about the benchmark
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
    regression.steady_malloc()
    baseline = config.getoption("--fastloss-baseline")
    # read before the run: a bad baseline fails at once, not after minutes of timing
    config._fastloss_baseline = None if baseline is None else regression.load(baseline)


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if config.getoption("--fastloss-save"):
        regression.save(config.getoption("--fastloss-save"), dict(RATIOS))
    if config._fastloss_baseline is not None:
        threshold = config.getoption("--fastloss-fail-above") / 100
        rows = regression.compare(config._fastloss_baseline, RATIOS, threshold)
        config._fastloss_gate = regression.report(rows, threshold)
        if any(r.flagged for r in rows) and session.exitstatus == 0:
            session.exitstatus = 1


def _current_benchmarks(config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None:
        return []
    return [b for b in bs.benchmarks if b and b.group]


def ratio_table(benchmarks):
    """``{group: [row, ...]}`` with ``row = dict(role, name, median_s, rounds, gbps, vs_copy, vs_fastloss)``.

    ``vs_copy = median / median(copy)``: how many memory copies of the input the
    entry costs (1.0 is the bandwidth floor of a one-pass fused kernel).
    ``vs_fastloss = median / median(fastloss)``: above 1, fastloss is faster by that factor.
    """
    groups = {}
    for b in benchmarks:
        groups.setdefault(b.group, []).append(b)
    table = {}
    for group, entries in groups.items():
        med = {}
        rows = []
        for b in entries:
            role = b.extra_info.get("role", b.name)
            med[role] = b.stats.median
        for b in entries:
            role = b.extra_info.get("role", b.name)
            m = b.stats.median
            nbytes = b.extra_info.get("bytes_moved")
            rows.append({
                "role": role,
                "name": b.name,
                "median_s": m,
                "rounds": b.stats.rounds,
                "gbps": (nbytes / m / 1e9) if nbytes and m else None,
                "vs_copy": (m / med[CEILING_ROLE]) if med.get(CEILING_ROLE) else None,
                "vs_fastloss": (m / med[BASE_ROLE]) if med.get(BASE_ROLE) else None,
                "ratio": b.extra_info.get("ratio"),
                "spread": b.extra_info.get("ratio_spread"),
            })
        rows.sort(key=lambda r: (ROLE_ORDER.index(r["role"]) if r["role"] in ROLE_ORDER else len(ROLE_ORDER), r["name"]))
        table[group] = rows
    return table  # groups in the order they ran


def _fmt(v, spec, missing="-"):
    return missing if v is None else format(v, spec)


def format_ratio_table(table, header_note=""):
    lines = []
    lines.append("fastloss ratio table (medians of this one run; x copy = median / median of the copy "
                 "ceiling; x fastloss = median / median of fastloss, >1 means fastloss is faster; "
                 "interleaved = the median ratio to the ceiling over rounds that time both, the "
                 "regression gate's, with its spread)")
    if header_note:
        lines.append(header_note)
    head = (f"  {'entry':<18} {'median ms':>10} {'rounds':>7} {'GB/s':>7} {'x copy':>7} {'x fastloss':>10}"
            f" {'interleaved':>11} {'spread':>7}")
    for group, rows in table.items():
        lines.append(f"{group}")
        lines.append(head)
        for r in rows:
            spread = "-" if r.get("spread") is None else f"{100 * r['spread']:.1f}%"
            lines.append(f"  {r['role']:<18} {r['median_s'] * 1e3:>10.3f} {r['rounds']:>7d} "
                         f"{_fmt(r['gbps'], '7.1f'):>7} {_fmt(r['vs_copy'], '7.2f'):>7} "
                         f"{_fmt(r['vs_fastloss'], '10.2f'):>10} {_fmt(r.get('ratio'), '11.2f'):>11}"
                         f" {spread:>7}")
    return lines


def _threads_note():
    parts = []
    try:
        import numba

        parts.append(f"numba threads {numba.get_num_threads()}")
    except Exception:
        pass
    try:
        import sys

        if "torch" in sys.modules:
            parts.append(f"torch threads {sys.modules['torch'].get_num_threads()}")
        if "jax" in sys.modules:
            parts.append("jax: XLA's default thread pool")
    except Exception:
        pass
    parts.append("numpy single-threaded ufuncs")
    return "(" + ", ".join(parts) + "; GB/s = (bytes read + gradient bytes written) / median)"


@pytest.hookimpl(hookwrapper=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # Wrap pytest-benchmark's summary so that our table comes after its table,
    # and is printed even when it raises (e.g. --benchmark-compare-fail).
    yield
    gate = getattr(config, "_fastloss_gate", None)
    if gate is not None:
        terminalreporter.ensure_newline()
        terminalreporter.section("fastloss regression gate", sep="-", bold=True)
        for line in gate.splitlines():
            terminalreporter.write_line(line)
    benchmarks = _current_benchmarks(config)
    if not benchmarks:
        return
    table = ratio_table(benchmarks)
    terminalreporter.ensure_newline()
    terminalreporter.section("fastloss ratios", sep="-", bold=True)
    for line in format_ratio_table(table, _threads_note()):
        terminalreporter.write_line(line)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    current = _current_benchmarks(config)
    if current:
        output_json["fastloss_ratios"] = ratio_table(current)
