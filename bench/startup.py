"""Cold and warm start: ``import fastloss`` and the first call of each loss.

    python bench/startup.py [--repeat N] [--out bench/results/startup.md]

Each measurement is a fresh interpreter with its own ``NUMBA_CACHE_DIR``:

* **cold**: an empty cache folder, so the first call of a loss compiles its
  kernels (what a new installation or a new container pays once);
* **warm**: the same folder again, so the first call loads the kernels from
  disk (every later process; ``python -m fastloss warmup`` gets a deployment
  here before its first request);
* **steady**: the median of later calls in the same process, for scale;
* **alone**: each loss in a fresh process of its own with an empty cache (the
  first call a new user meets when that loss is the only one called), and
  **+float64**: the first float64 call after it in that process.

Every loss is called with its default options on a small float32 input (the
serial kernels).  The child process times itself, so interpreter start-up is
excluded; ``import numpy`` is measured before ``import fastloss`` and reported
apart.  Medians of ``--repeat`` runs (default 3), one cold and one warm per run.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, time
t0 = time.perf_counter(); import numpy as np; t1 = time.perf_counter()
import fastloss as fl; t2 = time.perf_counter()
rng = np.random.default_rng(0)
def loss_calls(dtype):
    x = rng.standard_normal((64, 100)).astype(dtype); y = rng.integers(0, 100, 64)
    e = rng.standard_normal((64, 16)).astype(dtype); k = np.arange(64) % 8
    return {
        "softmax_cross_entropy": lambda: fl.softmax_cross_entropy(x, y),
        "focal_loss": lambda: fl.focal_loss(x, y),
        "sigmoid_focal_loss": lambda: fl.sigmoid_focal_loss(x, (x > 1).astype(dtype)),
        "huber_loss": lambda: fl.huber_loss(x, 0.5 * x),
        "triplet_margin_loss": lambda: fl.triplet_margin_loss(e, e[::-1].copy(), e + 1),
        "batch_triplet_loss": lambda: fl.batch_triplet_loss(e, k),
        "center_loss": lambda: fl.center_loss(e, k, np.zeros((8, 16), dtype)),
    }
calls = loss_calls(np.float32)
only = os.environ.get("STARTUP_ONLY")
if only:
    calls = {only: calls[only]}
out = {"import numpy": t1 - t0, "import fastloss": t2 - t1, "first": {}, "steady": {}}
if only:
    s = time.perf_counter(); calls[only](); out["first"][only] = time.perf_counter() - s
    call = loss_calls(np.float64)[only]
    s = time.perf_counter(); call(); out["float64"] = time.perf_counter() - s
    calls = {}
for name, call in calls.items():
    s = time.perf_counter(); call(); out["first"][name] = time.perf_counter() - s
    times = []
    for _ in range(20):
        s = time.perf_counter(); call(); times.append(time.perf_counter() - s)
    times.sort(); out["steady"][name] = times[len(times) // 2]
print(json.dumps(out))
"""


def measure_once(cache_dir, only=None):
    """One child process with ``NUMBA_CACHE_DIR=cache_dir`` (calling the loss ``only``
    alone, when given); its timings (seconds)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, **({"STARTUP_ONLY": only} if only else {}))
    run = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                         check=True, timeout=1200)
    return json.loads(run.stdout.strip().splitlines()[-1])


def measure(repeat=3):
    """{"cold": [runs], "warm": [runs], "alone": [runs]}: each run a fresh cache folder, cold
    then warm, and one fresh folder per loss called alone."""
    runs = {"cold": [], "warm": [], "alone": []}
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="fastloss-startup-") as cache_dir:
            runs["cold"].append(measure_once(cache_dir))
            runs["warm"].append(measure_once(cache_dir))
        alone = {}
        for name in runs["cold"][-1]["first"]:
            with tempfile.TemporaryDirectory(prefix="fastloss-startup-") as cache_dir:
                one = measure_once(cache_dir, only=name)
            alone[name] = {"first": one["first"][name], "float64": one["float64"]}
        runs["alone"].append(alone)
    return runs


def table(runs):
    def med(kind, *keys):
        values = []
        for r in runs[kind]:
            v = r
            for key in keys:
                v = v[key]
            values.append(v)
        return statistics.median(values)

    lines = [f"Medians of {len(runs['cold'])} runs; each run a fresh NUMBA_CACHE_DIR, first cold "
             "(compiles), then warm (loads from disk).", "",
             "| step | cold s | alone s | +float64 s | warm s | steady ms |",
             "|---|---:|---:|---:|---:|---:|",
             f"| import numpy | {med('cold', 'import numpy'):.3f} | - | - | "
             f"{med('warm', 'import numpy'):.3f} | - |",
             f"| import fastloss | {med('cold', 'import fastloss'):.3f} | - | - | "
             f"{med('warm', 'import fastloss'):.3f} | - |"]
    for name in runs["cold"][0]["first"]:
        lines.append(f"| first call: {name} | {med('cold', 'first', name):.2f} | "
                     f"{med('alone', name, 'first'):.2f} | {med('alone', name, 'float64'):.2f} | "
                     f"{med('warm', 'first', name):.3f} | {1e3 * med('warm', 'steady', name):.3f} |")
    alone = sum(med("alone", name, "first") for name in runs["cold"][0]["first"])
    lines += ["", f"All seven first calls, each alone: {alone:.1f} s."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default=None, help="also write the table (Markdown) here")
    args = p.parse_args(argv)
    text = table(measure(args.repeat))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
