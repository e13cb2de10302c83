"""``python -m fastloss eval``: one loss over prediction and target files too large for memory.

The files are read in chunks of rows, never whole: a ``.npy`` file through a memory map that
each task opens for its own rows (``NpyRows``: a file name travels to the workers, not the
data), a Zarr array through ``dask.array.from_zarr`` when ``zarr`` is installed.  The loss is
the Dask path of the public function (``fastloss._dask``), so the value is the one an
in-memory call on the whole arrays gives, to round-off.  The graph runs

* in this process on Dask's threads (the default),
* on a local cluster of ``--workers N`` processes of one thread each, or
* on the ``dask.distributed`` scheduler at ``--scheduler ADDRESS`` (the workers must see the
  files, and the ``--grad-out`` file, at the same paths: a shared file system).

A progress bar goes to standard error; the last line of standard output ends with the loss.
``--grad-out PATH`` writes the gradient into a ``.npy`` file of the predictions' shape and
dtype, created first, into which each task writes its own rows through a memory map (no
gradient is computed without it).
"""
import ast
import contextlib
import os
import sys

import numpy as np

HELP = "a loss over .npy (memory-mapped) or Zarr files larger than memory, in chunks, on Dask"
DESCRIPTION = (
    "Evaluate LOSS (a name or short name: ce, focal, sigmoid_focal, huber, batch_triplet, center) "
    "over PREDICTIONS and TARGETS, read in chunks of rows from .npy files (memory-mapped) or Zarr "
    "arrays, on Dask: in this process (default), on a local cluster (--workers N) or on a "
    "dask.distributed scheduler (--scheduler ADDRESS, whose workers see the same files). Prints a "
    "progress bar on stderr and the loss as the last line's last word. center needs "
    "--option centers=FILE.npy (and evaluates with update=False unless asked).")
CHUNK_BYTES = 16 * 2 ** 20  # default chunk: rows of predictions making about this many bytes


class NpyRows:
    """A ``.npy`` file as Dask reads it: shape and dtype from its header; each slice opens a
    memory map of the file and copies out its rows.  Pickles as its path."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        header = np.load(self.path, mmap_mode="r")
        self.shape, self.dtype, self.ndim = header.shape, header.dtype, header.ndim

    def __getitem__(self, index):
        # a view of the map, not a copy: the kernel reads the file's pages, which the
        # operating system may drop again, and the worker allocates nothing for it
        return np.load(self.path, mmap_mode="r")[index]

    def __dask_tokenize__(self):
        stat = os.stat(self.path)
        return self.path, stat.st_size, stat.st_mtime_ns


class NpyRowsTarget:
    """A ``.npy`` file, created by the caller, that ``dask.array.store`` writes into: each
    assignment opens a memory map of it, writes, flushes.  Pickles as its path."""

    def __init__(self, path):
        self.path = os.path.abspath(path)

    def __setitem__(self, index, value):
        out = np.load(self.path, mmap_mode="r+")
        out[index] = value
        out.flush()


def open_rows(path, chunk_rows=None, rows_like=None):
    """The array at ``path`` (``.npy``, or a Zarr array: a directory or a ``.zarr`` path) as a
    Dask array chunked along its first axis only: ``chunk_rows`` rows per chunk, or the chunks
    of ``rows_like``'s first axis, or about ``CHUNK_BYTES`` per chunk."""
    import dask.array as da
    zarr_path = os.path.isdir(path) or str(path).endswith(".zarr")
    if zarr_path:
        try:
            import zarr
        except ImportError:
            raise SystemExit(f"{path}: reading Zarr needs the zarr package (pip install zarr)") from None
        source = zarr.open(str(path), mode="r")
    else:
        source = NpyRows(path)
    if len(source.shape) == 0:
        raise SystemExit(f"{path}: expected an array of rows, got a 0-d array")
    if rows_like is not None:
        if source.shape[0] != rows_like.shape[0]:
            raise SystemExit(f"{path}: {source.shape[0]} rows, but the predictions have "
                             f"{rows_like.shape[0]}")
        rows = rows_like.chunks[0]
    else:
        row_bytes = max(int(np.prod(source.shape[1:])) * source.dtype.itemsize, 1)
        rows = chunk_rows or max(1, CHUNK_BYTES // row_bytes)
    chunks = (rows,) + tuple(source.shape[1:])
    if zarr_path:
        return da.from_zarr(str(path), chunks=chunks)
    return da.from_array(source, chunks=chunks, asarray=False,
                         meta=np.empty((0,) * len(source.shape), source.dtype))


def parse_option(text):
    """``NAME=VALUE`` -> ``(name, value)``: a Python literal (``2.0``, ``'sum'``, ``True``,
    ``None``), a ``.npy`` path (kept as a path), or else the text itself."""
    name, sep, raw = text.partition("=")
    if not sep or not name.isidentifier():
        raise SystemExit(f"--option takes NAME=VALUE, got {text!r}")
    if raw.endswith(".npy"):
        return name, raw
    try:
        return name, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return name, raw


def add_arguments(parser):
    parser.add_argument("loss", metavar="LOSS", help="the loss: ce, focal, sigmoid_focal, huber, "
                                                     "batch_triplet, center (or the function's name)")
    parser.add_argument("predictions", metavar="PREDICTIONS", help=".npy file or Zarr array: the first argument")
    parser.add_argument("targets", metavar="TARGETS", help=".npy file or Zarr array: the second argument")
    parser.add_argument("--chunk-rows", type=int, default=None, metavar="N",
                        help=f"rows per chunk (default: about {CHUNK_BYTES // 2 ** 20} MiB of predictions)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS", help="a dask.distributed scheduler address")
    where.add_argument("--workers", type=int, metavar="N",
                       help="start a local cluster of N worker processes of one thread each")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="a keyword argument of the loss (repeatable): a Python literal, or a .npy "
                             "file (per-row ones, e.g. sample_weight, read in chunks; others in memory)")
    parser.add_argument("--grad-out", metavar="PATH", help="write the gradient into this .npy file")


def _arguments(args, name, entry):
    """The loss's keyword arguments: the files and the options, each in its place."""
    predictions = open_rows(args.predictions, args.chunk_rows)
    targets = open_rows(args.targets, rows_like=predictions)
    kwargs = {entry.rows[0]: predictions, entry.rows[1]: targets}
    if name == "center_loss":
        kwargs["update"] = False
    for option in args.option:
        key, value = parse_option(option)
        if isinstance(value, str) and value.endswith(".npy"):
            value = (open_rows(value, rows_like=predictions) if key in entry.rows
                     else np.load(value))
        kwargs[key] = value
    kwargs.setdefault("reduction", "mean")
    if kwargs["reduction"] not in ("mean", "sum"):
        raise SystemExit(f"eval prints one value: reduction must be 'mean' or 'sum', got {kwargs['reduction']!r}")
    kwargs["grad"] = args.grad_out is not None
    return kwargs


@contextlib.contextmanager
def _scheduler(args):
    """A ``distributed.Client`` for ``--scheduler`` / ``--workers`` (closed after), else None."""
    if args.scheduler is None and args.workers is None:
        yield None
        return
    from distributed import Client, LocalCluster
    if args.scheduler is not None:
        with Client(args.scheduler) as client:
            yield client
        return
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def _compute(client, *collections):
    """``dask.compute`` of the collections, with a progress bar on stderr."""
    if client is None:
        import dask
        from dask.diagnostics import ProgressBar
        with ProgressBar(out=sys.stderr):
            return dask.compute(*collections)
    from distributed import progress
    futures = client.compute(list(collections))
    with contextlib.redirect_stdout(sys.stderr):  # distributed's text bar writes to stdout
        progress(futures)
    print(file=sys.stderr)
    return client.gather(futures)


def run(args):
    from fastloss import _dask
    from fastloss.tools.registry import BY_NAME
    info = BY_NAME.get(args.loss)
    entry = _dask.ENTRIES.get(info.name) if info is not None else None
    if entry is None or entry.n_grad != 1:
        names = sorted(k for k, i in BY_NAME.items() if i.name in _dask.ENTRIES
                       and _dask.ENTRIES[i.name].n_grad == 1)
        raise SystemExit(f"eval: unknown or unsupported loss {args.loss!r}; one of {', '.join(names)}")
    with _scheduler(args) as client:  # first: whatever the call computes at once runs there
        kwargs = _arguments(args, info.name, entry)
        result = info.function(**kwargs)
        collections = [result.loss]
        if args.grad_out is not None:
            import dask.array as da
            predictions = kwargs[entry.rows[0]]
            np.lib.format.open_memmap(args.grad_out, mode="w+", dtype=predictions.dtype,
                                      shape=predictions.shape).flush()
            # the gradient of the predictions (linear_cross_entropy's first of its tuple)
            grad = result.grad[0] if isinstance(result.grad, tuple) else result.grad
            collections.append(da.store(grad, NpyRowsTarget(args.grad_out), lock=False, compute=False))
        loss = _compute(client, *collections)[0]
    rows = kwargs[entry.rows[0]].shape[0]
    print(f"{info.name} ({kwargs['reduction']}) over {rows} rows: {float(loss)!r}")
    return 0
