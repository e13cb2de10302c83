"""Small calls: a fresh gradient against a reused ``grad_out``, paired round by round.

At the tiny and small sizes a call is a few microseconds of Python around the
kernel, and the difference between allocating the gradient and checking the
caller's buffer is a few hundred nanoseconds: less than this shared machine's
drift between two medians taken a second apart.  So each round times a block
of calls of each entry back to back (the order alternating between rounds), and
the table reports, beside each entry's median per call, the median over rounds
of the per-call difference ``grad_out - fresh`` with its interquartile range,
and the share of rounds in which ``grad_out`` was the faster.

    python bench/small_calls.py [--rounds 300] [--block 100] [--out bench/results/small_calls.md]

Entries, inputs and options are those of ``python -m fastloss bench``
(``fastloss.tools.bench``), so a call here is a call there.
"""
import argparse
import datetime
import subprocess
import time

import numpy as np

from fastloss.tools import bench


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def paired(fresh, reuse, rounds, block):
    """Per-call seconds of each entry in every round: two arrays of ``rounds``."""
    per_call = {fresh: np.empty(rounds), reuse: np.empty(rounds)}
    for k in range(rounds):
        for run in (fresh, reuse) if k % 2 == 0 else (reuse, fresh):
            t0 = time.perf_counter()
            for _ in range(block):
                run()
            per_call[run][k] = (time.perf_counter() - t0) / block
    return per_call[fresh], per_call[reuse]


def measure(case, rounds, block):
    args = bench.make_args(case)
    fresh = bench.prepare_entry(case, "fastloss", args).run
    reuse = bench.prepare_entry(case, "fastloss-grad_out", args).run
    paired(fresh, reuse, max(rounds // 10, 3), block)  # warm-up: compiled, caches and branches hot
    f, r = paired(fresh, reuse, rounds, block)
    d = r - f
    q1, q3 = np.percentile(d, [25, 75])
    return dict(fresh=np.median(f), reuse=np.median(r), diff=np.median(d), q1=q1, q3=q3,
                faster=float(np.mean(d < 0)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--losses", nargs="+", default=list(bench.LOSS_CHOICES))
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument("--out", help="write the table (markdown) here too")
    opts = parser.parse_args(argv)
    lines = [
        "| loss | size | shape | fresh µs | grad_out µs | grad_out − fresh µs (IQR) | grad_out faster |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for spec in bench.SPECS:
        if spec.bench.short not in opts.losses:
            continue
        for size in opts.sizes:
            if size not in spec.bench.sizes:
                continue
            case = bench.Case(spec, size)
            m = measure(case, opts.rounds, opts.block)
            lines.append(f"| {case.short} | {size} | {bench.shape_str(case.shape)} | {m['fresh'] * 1e6:.2f} "
                         f"| {m['reuse'] * 1e6:.2f} | {m['diff'] * 1e6:+.2f} ({m['q1'] * 1e6:+.2f} to "
                         f"{m['q3'] * 1e6:+.2f}) | {m['faster']:.0%} |")
            print(lines[-1], flush=True)
    head = (f"# Small calls: fresh gradient against grad_out\n\n`python bench/small_calls.py "
            f"--rounds {opts.rounds} --block {opts.block}`, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {_commit()}, "
            f"{bench._machine()}; float32, default options.  Each round "
            f"times {opts.block} calls of each entry back to back; medians over {opts.rounds} rounds; "
            "the difference is per round, so the machine's drift cancels.\n\n")
    if opts.out:
        with open(opts.out, "w", encoding="utf-8") as f:
            f.write(head + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
