"""``python -m fastloss warmup``: compile the kernels ahead of time, into the on-disk cache.

For deployments: run it once where the service will run (same machine type,
same installation, same ``NUMBA_CACHE_DIR``), for instance as a step of the
image build, and the first call of each loss then loads its kernel from disk
instead of compiling it (see ``bench/startup.py`` for the figures).

Numba compiles one kernel per combination of argument types, and fastloss's
options are compile-time switches (an array, or None for "not given").  So the
warm-up calls every loss on tiny synthetic inputs (each loss's ``warmup_variants``
in ``fastloss.tools.registry``), for each chosen dtype, with its default options
and then each option on its own (weights, probability targets, ``grad=False``,
every distance and mining mode...), once below and
once above the size at which the parallel kernel takes over, so that both the
serial and the parallel kernel compile.  Combinations of several options that
are not in the list compile on their first use, as without a warm-up.
"""
import sys
import time

import numpy as np

from . import registry

HELP = "compile every kernel ahead of time into the on-disk cache (for deployments)"
DESCRIPTION = ("Compile fastloss's kernels for the chosen dtypes (each loss with its default options "
               "and with each option on its own, serial and parallel kernels) and cache them on disk, "
               "so that the first call of a loss in a new process loads instead of compiling.")

LOSSES = tuple(info.name for info in registry.LOSSES)
DTYPES = ("float16", "float32", "float64")
ROWS = {"serial": 4, "parallel": 64}  # 64 rows x 512 values: over every parallel threshold


def warm_up(losses=LOSSES, dtypes=DTYPES, backend="cpu", progress=None):
    """Compile (or load) the kernels of ``losses`` for ``dtypes``; returns ``{loss: seconds}``."""
    from fastloss.cpu import batch_mining

    rng = np.random.default_rng(0)
    seconds = {}
    jobs = [(loss, dtype, size) for loss in losses for dtype in dtypes for size in ROWS]
    saved = batch_mining.BATCH_PARALLEL_MIN_WORK
    try:
        for k, (loss, dtype, size) in enumerate(jobs):
            if progress:
                progress(k, len(jobs), f"{loss} {dtype} {size}")
            # batch mining goes parallel only for thousands of rows: lower its threshold
            batch_mining.BATCH_PARALLEL_MIN_WORK = 0 if size == "parallel" else saved
            info = registry.BY_NAME[loss]
            start = time.perf_counter()
            for args, kwargs in info.warmup_variants(dtype, ROWS[size], rng):
                info.function(*args, backend=backend, **kwargs)
            seconds[loss] = seconds.get(loss, 0.0) + time.perf_counter() - start
    finally:
        batch_mining.BATCH_PARALLEL_MIN_WORK = saved
    if progress:
        progress(len(jobs), len(jobs), "done")
    return seconds


def cache_location():
    """Where Numba writes fastloss's cache, in words."""
    import numba

    from fastloss._cache import CACHE
    if not CACHE:
        return "nowhere: no writable cache directory (set NUMBA_CACHE_DIR)"
    if numba.config.CACHE_DIR:
        return f"NUMBA_CACHE_DIR={numba.config.CACHE_DIR}"
    return "__pycache__ beside fastloss's sources (or the user cache directory when those are read-only)"


def _bar(k, total, label, width=24, out=sys.stderr):
    filled = width * k // max(total, 1)
    print(f"\r[{'#' * filled}{'-' * (width - filled)}] {k:3d}/{total}  {label:<48}", end="", file=out, flush=True)
    if k == total:
        print(file=out)


def add_arguments(p):
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES), metavar="LOSS",
                   help=f"losses to compile (default: all of {', '.join(LOSSES)})")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), metavar="DTYPE",
                   help="input dtypes to compile for (default: float16 float32 float64)")
    p.add_argument("--backend", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (default) or cuda (the GPU's kernels; needs a GPU)")


def run(args):
    start = time.perf_counter()
    try:
        seconds = warm_up(list(dict.fromkeys(args.losses)), list(dict.fromkeys(args.dtypes)), args.backend,
                          progress=_bar)
    except RuntimeError as exc:  # backend="cuda" without a GPU
        print(f"\nfastloss warmup: {exc}", file=sys.stderr)
        return 2
    for loss, s in seconds.items():
        print(f"{loss:<24} {s:7.2f} s")
    print(f"{'total':<24} {time.perf_counter() - start:7.2f} s; cache: {cache_location()}")
    return 0
