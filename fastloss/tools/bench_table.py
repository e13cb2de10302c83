"""The bench's table: the text, Markdown and chart of ``python -m fastloss bench``'s results.

``results`` is the dict ``bench.run_bench`` builds (and writes as ``results.json``): one entry
per case with every entry's status, median and ratios.
"""
from . import registry
from .competitors import NAMES

COMPETITORS = ("numpy",) + NAMES  # the timed entries beside fastloss and the copy ceiling, in column order


def shape_str(shape):
    return "x".join(str(s) for s in shape)


def _ms(seconds):
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _cell(e, ratio_key="vs_fastloss"):
    if e is None:
        return "-"
    st = e.get("status")
    if st == "ok":
        r = e.get(ratio_key)
        return _ms(e["median_s"]) + (f" ({r:.2f}x)" if r is not None else "")
    return "-" if st == "n/a" else st


COLUMNS = ("loss", "size", "shape", "dtype", "backend", "fastloss ms", "grad_out ms (ratio)", "copy ms",
           "fastloss/copy (spread)", "grad_out/copy (spread)", "numpy ms (ratio)", "torch ms (ratio)",
           "torch-compile ms (ratio)", "jax ms (ratio)")


def _vs_copy(e):
    """The entry's ratio to the copy ceiling: interleaved, with its spread, where measured so
    (``regression``), else the ratio of the two medians."""
    if e is None or e.get("status") != "ok":
        return "-"
    if e.get("ratio") is not None:
        return f"{e['ratio']:.2f}x ({100 * e['ratio_spread']:.0f}%)"
    return f"{e['vs_copy']:.2f}x" if e.get("vs_copy") is not None else "-"


def table_rows(results):
    rows = []
    for c in results["cases"]:
        en = c["entries"]
        fl = en.get("fastloss", {})
        updates = registry.BY_NAME[c["loss"]].updates is not None
        shape = shape_str(c["shape"]) + (f" k{c['classes']}" if updates else "")
        fl_cell = _ms(fl["median_s"]) if fl.get("status") == "ok" else (fl.get("status") or "-")
        if fl.get("check") == "mismatch":
            fl_cell += " (mismatch vs numpy)"
        rows.append([c["short"], c["size"], shape, c["dtype"], c["backend"], fl_cell,
                     _cell(en.get("fastloss-grad_out")), _cell(en.get("copy"), None),
                     _vs_copy(fl), _vs_copy(en.get("fastloss-grad_out")),
                     *(_cell(en.get(name)) for name in COMPETITORS)])
    return rows


def format_text(results):
    rows = table_rows(results)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(COLUMNS)]
    right = set(range(5, len(COLUMNS)))

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(COLUMNS), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def format_markdown(results):
    meta = results["meta"]
    lines = ["# fastloss benchmark", "",
             f"`{meta['command']}`, {meta['date']}", "",
             f"* machine: {meta['machine']}",
             f"* versions: {meta['versions']}",
             f"* threads: {meta['threads']}",
             f"* timing: {meta['timing']}", ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join("---" if i < 5 else "---:" for i in range(len(COLUMNS))) + "|")
    for r in table_rows(results):
        lines.append("| " + " | ".join(r) + " |")
    lines += ["", LEGEND]
    if results["notes"]:
        lines += ["", "Notes:", ""] + [f"* {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


LEGEND = ("Medians in milliseconds. `(ratio)` = the entry's median / fastloss's median: above 1, "
          "fastloss is faster by that factor (for grad_out, below 1: reusing the gradient buffer "
          "pays). `fastloss/copy` (and `grad_out/copy`) = its time over the memory-copy ceiling's "
          "(1.0 is the bandwidth floor of a one-pass kernel; for batch_hard the ceiling is one "
          "gemm), the median over rounds that time the entry and the ceiling one after the other, "
          "so that a change in the machine's load hits both; in brackets its spread, the "
          "interquartile range of the rounds' ratios over their median. "
          "`missing`: not installed; `mismatch`: its loss or gradient disagrees with fastloss "
          "(not timed); `unavailable`/`failed`/`skipped`: see the notes; `-`: does not apply.")


def collect_notes(results):
    notes = list(results.get("notes", []))
    seen = set()
    for c in results["cases"]:
        for name, e in c["entries"].items():
            st = e.get("status")
            note = e.get("note")
            if not note or st == "n/a":
                continue
            if st == "missing":
                key = (name, note)
                if key in seen:
                    continue
                seen.add(key)
                notes.append(f"{name}: missing ({note})")
            elif st in ("mismatch", "failed", "unavailable") or e.get("check") == "mismatch":
                notes.append(f"{c['short']} {c['size']} {c['dtype']} {c['backend']}, {name}: {st}: {note}")
    return notes


# ---------------------------------------------------------------------- the chart


def draw_chart(results, path):
    """A horizontal bar chart of the ratios (log scale); ``False`` when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    series = [(name, f"{name} / fastloss") for name in COMPETITORS] + [("copy", "fastloss / copy")]
    cases = results["cases"]
    labels, values = [], {name: [] for name, _ in series}
    for c in cases:
        labels.append(f"{c['short']} {c['size']} {c['dtype']} {c['backend']}")
        for name, _ in series:
            if name == "copy":
                v = c["entries"].get("fastloss", {}).get("vs_copy")
            else:
                e = c["entries"].get(name, {})
                v = e.get("vs_fastloss") if e.get("status") == "ok" else None
            values[name].append(v)
    n = len(labels)
    fig = Figure(figsize=(9, 1.0 + 0.55 * n * max(1, len(series)) / 3))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    h = 0.8 / len(series)
    for k, (name, label) in enumerate(series):
        ys = [i + (k - (len(series) - 1) / 2) * h for i in range(n)]
        xs = [v if v else 0 for v in values[name]]
        ax.barh(ys, xs, height=h, label=label)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(n))
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xlabel("ratio of medians (competitor / fastloss: >1 means fastloss is faster)")
    ax.set_title("fastloss vs competitors (same run)")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True
