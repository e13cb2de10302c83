"""How steady the regression gate's ratios are on this machine, beside absolute medians.

Runs ``python -m fastloss bench`` (in process) ``--runs`` times back to back on the chosen
sizes, fastloss's entries and the copy ceiling only, and tabulates per entry, over the
runs, the spread of the absolute median and that of the interleaved ratio to the ceiling
(``fastloss.tools.regression``): (largest - smallest) / median of the runs' values, the
change a gate would see between the two most different runs of the same code.

    python bench/regression_runs.py --runs 5 --threads 1 --out bench/results/regression.md
"""
import argparse
import datetime
import io
import statistics
import subprocess

from fastloss.tools import bench


def _range(values):
    med = statistics.median(values)
    return (max(values) - min(values)) / med if med else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--sizes", nargs="+", default=["medium"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the table (Markdown) here")
    args = p.parse_args()
    runs = []
    for k in range(args.runs):
        res, _ = bench.run_bench(sizes=args.sizes, threads=args.threads, plot=False,
                                 skip=bench.COMPETITORS, out_dir="/tmp/fastloss-regression-runs",
                                 stdout=io.StringIO(), stderr=io.StringIO())
        runs.append(res)
        print(f"run {k + 1}/{args.runs} done", flush=True)
    rows = []
    for i, case in enumerate(runs[0]["cases"]):
        for entry in ("fastloss", "fastloss-grad_out"):
            es = [r["cases"][i]["entries"][entry] for r in runs]
            if any(e.get("status") != "ok" for e in es):
                continue
            medians = [e["median_s"] for e in es]
            ratios = [e["ratio"] for e in es]
            rows.append((f"{case['group']}-{entry}", statistics.median(medians) * 1e3,
                         _range(medians), statistics.median(ratios), _range(ratios),
                         statistics.median(e["ratio_spread"] for e in es)))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "?"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# The regression gate's ratios over back-to-back runs", "",
             f"`python bench/regression_runs.py --runs {args.runs} --threads {args.threads} "
             f"--sizes {' '.join(args.sizes)}`, {date}, fastloss at commit {commit}; "
             f"{runs[0]['meta']['machine']}.", "",
             f"{args.runs} runs of `python -m fastloss bench` back to back (fastloss's entries and "
             "the copy ceiling). Per entry, over the runs: the median of the absolute medians "
             "and their range, (largest - smallest) / median; the median of the interleaved "
             "ratios to the ceiling and their range; and the median within-run spread of the "
             "ratio (interquartile range of the rounds over the median), which the gate counts "
             "as noise.", "",
             "| entry | median ms | range of the median | ratio to ceiling | range of the ratio "
             "| within-run spread |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, med, med_range, ratio, ratio_range, spread in rows:
        lines.append(f"| {key} | {med:.3f} | {100 * med_range:.1f}% | {ratio:.3f} | "
                     f"{100 * ratio_range:.1f}% | {100 * spread:.1f}% |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
