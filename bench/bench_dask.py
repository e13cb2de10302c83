"""Cross entropy through ``python -m fastloss eval`` on Dask, against one in-memory call.

Logits ``(ROWS, CLASSES)`` float32 in a ``.npy`` file (in the page cache after the first
read), int64 labels beside them; the value of every run is checked against the in-memory
call.  Entries, each in rows per second:

* ``in-memory``: ``softmax_cross_entropy(logits, labels)`` on arrays already in memory
  (``grad=False``, as ``eval`` without ``--grad-out``), with the gradient, and after
  ``np.load`` of both files (what ``eval`` replaces when the files fit in memory);
* ``eval, threads``: ``eval`` in this process on Dask's threaded scheduler;
* ``eval, LocalCluster``: ``eval --scheduler`` on a running ``distributed.LocalCluster``
  of 2 worker processes x 1 thread (cluster start-up apart), without and with
  ``--grad-out`` (the gradient written into a memory-mapped ``.npy``).

Dask's overhead is the difference to the in-memory call on the same rows: graph building,
scheduling, reading the file chunk by chunk, and (on the cluster) the worker processes.

``pytest bench/bench_dask.py`` times the cluster entry with pytest-benchmark;
``python bench/bench_dask.py --out bench/results/dask.md`` writes the table.
"""
import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import pytest

ROWS, CLASSES = 400_000, 100
CHUNK_ROWS = 40_000  # 16 MB of logits per chunk, eval's default size
ROUNDS = 3
FEW_ROWS = 1_000  # one chunk: the fixed cost of an eval on the cluster


def write_inputs(folder, rows=ROWS):
    rng = np.random.default_rng(0)
    logits = (2 * rng.standard_normal((rows, CLASSES), dtype=np.float32))
    labels = rng.integers(0, CLASSES, rows)
    paths = os.path.join(folder, f"logits{rows}.npy"), os.path.join(folder, f"labels{rows}.npy")
    np.save(paths[0], logits)
    np.save(paths[1], labels)
    return logits, labels, paths


def run_eval(paths, *options):
    """``eval`` in this process; returns the printed loss (the progress bar is discarded)."""
    from fastloss.tools.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["eval", "ce", *paths, "--chunk-rows", str(CHUNK_ROWS), *options]) == 0
    return float(out.getvalue().strip().splitlines()[-1].split()[-1])


def median_seconds(fn, rounds=ROUNDS):
    fn()  # warm: kernels loaded, file in the page cache
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def local_cluster():
    from distributed import LocalCluster
    return LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)


def measure(folder):
    """``[(entry, seconds)]`` and the cluster's start-up seconds."""
    import fastloss as fl
    logits, labels, paths = write_inputs(folder)
    want = float(fl.softmax_cross_entropy(logits, labels, grad=False).loss)

    def checked(value):
        assert abs(value - want) <= 1e-5 * abs(want), (value, want)

    rows = [("in-memory, loss only", median_seconds(
                lambda: fl.softmax_cross_entropy(logits, labels, grad=False))),
            ("in-memory, loss and gradient", median_seconds(
                lambda: fl.softmax_cross_entropy(logits, labels))),
            ("np.load of the files, then in-memory, loss only", median_seconds(
                lambda: fl.softmax_cross_entropy(np.load(paths[0]), np.load(paths[1]), grad=False))),
            ("eval, threads, loss only", median_seconds(lambda: checked(run_eval(paths))))]
    start = time.perf_counter()
    with local_cluster() as cluster:
        startup = time.perf_counter() - start
        address = ["--scheduler", cluster.scheduler_address]
        grad_out = ["--grad-out", os.path.join(folder, "grad.npy")]
        rows.append(("eval, LocalCluster 2x1, loss only",
                     median_seconds(lambda: checked(run_eval(paths, *address)))))
        rows.append(("eval, LocalCluster 2x1, --grad-out",
                     median_seconds(lambda: checked(run_eval(paths, *address, *grad_out)))))
        *_, few = write_inputs(folder, FEW_ROWS)
        fixed = median_seconds(lambda: run_eval(few, *address))
    return rows, startup, fixed


def table(rows, startup, fixed):
    base = dict(rows)["in-memory, loss only"]
    lines = ["| entry | median s | rows/s | x in-memory (loss only) |", "|---|---|---|---|"]
    for name, seconds in rows:
        lines.append(f"| {name} | {seconds:.3f} | {ROWS / seconds:,.0f} | {seconds / base:.1f} |")
    lines.append("")
    lines.append(f"Dask's overhead over the in-memory call on these rows: "
                 f"{dict(rows)['eval, threads, loss only'] - base:.2f} s on threads, "
                 f"{dict(rows)['eval, LocalCluster 2x1, loss only'] - base:.2f} s on the cluster, of which "
                 f"{fixed:.2f} s is fixed (an eval of {FEW_ROWS:,} rows, one chunk: the client's "
                 f"connection, the zero-row check, the graph, the scheduler's round trips).")
    lines.append(f"LocalCluster start-up (2 worker processes, not in the rows above): {startup:.1f} s.")
    return "\n".join(lines)


@pytest.mark.parametrize("entry", ["eval, LocalCluster 2x1, loss only"])
def test_ce_through_eval_on_a_local_cluster(benchmark, tmp_path, entry):
    logits, labels, paths = write_inputs(str(tmp_path))
    with local_cluster() as cluster:
        value = benchmark.pedantic(run_eval, args=(paths, "--scheduler", cluster.scheduler_address),
                                   rounds=ROUNDS, iterations=1, warmup_rounds=1)
    import fastloss as fl
    want = float(fl.softmax_cross_entropy(logits, labels, grad=False).loss)
    assert abs(value - want) <= 1e-5 * abs(want)
    benchmark.extra_info["rows"] = ROWS


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the table (Markdown) to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        rows, startup, fixed = measure(folder)
    text = table(rows, startup, fixed)
    print(text)
    if args.out:
        import dask
        import distributed
        with open(args.out, "w") as f:
            f.write(f"# Dask: cross entropy through `eval`\n\n"
                    f"`python bench/bench_dask.py --out bench/results/dask.md`: logits {ROWS:,} x "
                    f"{CLASSES} float32 ({ROWS * CLASSES * 4 / 1e6:.0f} MB), chunks of {CHUNK_ROWS:,} rows, "
                    f"median of {ROUNDS} runs after a warm one, the value checked each time.\n"
                    f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python "
                    f"{platform.python_version()}, dask {dask.__version__}, distributed "
                    f"{distributed.__version__}; load average {os.getloadavg()[0]:.1f} while it ran "
                    f"(other jobs on the machine: expect noise of tens of percent).\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
