"""``python -m fastloss eval``: a loss over files, in chunks, on Dask.

Small files against the in-memory call (value, gradient file, per-row and in-memory options),
on Dask's threads and on a local cluster of ``--workers``; then a memory-mapped dump about
three times larger than a worker's memory limit through ``--scheduler``: every worker survives
and the value is right.  CPU side only (no marker): the simulator process of CI skips them.
"""
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

import fastloss as fl  # noqa: E402
import naive  # noqa: E402
from fastloss.tools.cli import main  # noqa: E402

WORKER_MEMORY = 384 * 2 ** 20  # a worker with fastloss's kernels loaded sits near 200 MiB
DUMP_CLASSES = 100
DUMP_ROWS = 3_060_000          # x 100 float32 logits: 1.22 GB, 3.2 times a worker's memory
TILE_ROWS = 60_000             # the dump repeats one tile, whose loss is the dump's


def last_line(text):
    return text.strip().splitlines()[-1]


@pytest.fixture
def small_files(tmp_path):
    rng = np.random.default_rng(0)
    logits = (2 * rng.standard_normal((50, 7))).astype(np.float32)
    labels = rng.integers(0, 7, 50)
    labels[:3] = 2
    weight = rng.uniform(0.5, 2.0, 7).astype(np.float32)
    sample_weight = rng.uniform(0.0, 2.0, 50).astype(np.float32)
    paths = {}
    for name, a in dict(logits=logits, labels=labels, weight=weight, sample_weight=sample_weight).items():
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], a)
    return paths


@pytest.mark.parametrize("where", [[], ["--workers", "1"]], ids=["threads", "local cluster"])
def test_eval_prints_the_in_memory_loss_and_writes_the_gradient(small_files, tmp_path, capsys, where):
    p = small_files
    grad_path = tmp_path / "grad.npy"
    status = main(["eval", "ce", str(p["logits"]), str(p["labels"]), "--chunk-rows", "16",
                   "--option", "label_smoothing=0.1", "--option", f"weight={p['weight']}",
                   "--option", f"sample_weight={p['sample_weight']}", "--option", "ignore_index=2",
                   "--grad-out", str(grad_path), *where])
    assert status == 0
    want = fl.softmax_cross_entropy(np.load(p["logits"]), np.load(p["labels"]), label_smoothing=0.1,
                                    weight=np.load(p["weight"]), ignore_index=2,
                                    sample_weight=np.load(p["sample_weight"]))
    out = capsys.readouterr()
    naive.assert_close(float(last_line(out.out).split()[-1]), want.loss, np.float32, what="loss")
    naive.assert_close(np.load(grad_path), want.grad, np.float32, what="grad file")
    assert "100% Completed" in out.err  # the progress bar, on stderr


def test_eval_of_a_sum_without_gradient(small_files, capsys):
    p = small_files
    assert main(["eval", "focal", str(p["logits"]), str(p["labels"]), "--option", "reduction='sum'",
                 "--option", "gamma=0.5"]) == 0
    want = fl.focal_loss(np.load(p["logits"]), np.load(p["labels"]), gamma=0.5, reduction="sum")
    naive.assert_close(float(last_line(capsys.readouterr().out).split()[-1]), want.loss, np.float32)


def test_eval_of_center_loss_reads_the_centers_and_leaves_their_file_alone(tmp_path, capsys):
    rng = np.random.default_rng(5)
    features = rng.standard_normal((30, 4)).astype(np.float32)
    labels = rng.integers(0, 3, 30)
    centers = rng.standard_normal((3, 4)).astype(np.float32)
    for name, a in dict(features=features, labels=labels, centers=centers).items():
        np.save(tmp_path / f"{name}.npy", a)
    assert main(["eval", "center", str(tmp_path / "features.npy"), str(tmp_path / "labels.npy"),
                 "--chunk-rows", "8", "--option", f"centers={tmp_path / 'centers.npy'}"]) == 0
    want = fl.center_loss(features, labels, centers.copy(), update=False)
    naive.assert_close(float(last_line(capsys.readouterr().out).split()[-1]), want.loss, np.float32)
    np.testing.assert_array_equal(np.load(tmp_path / "centers.npy"), centers)


@pytest.mark.parametrize("argv, message", [
    (["triplet"], "unsupported loss"),
    (["ce", "--option", "reduction=none"], "reduction must be 'mean' or 'sum'"),
    (["ce", "--option", "label_smoothing"], "NAME=VALUE"),
], ids=["three inputs", "reduction none", "option without value"])
def test_eval_refuses_what_it_cannot_print(small_files, argv, message):
    p = small_files
    loss, *options = argv
    with pytest.raises(SystemExit, match=message):
        main(["eval", loss, str(p["logits"]), str(p["labels"]), *options])


def test_eval_names_a_file_whose_rows_do_not_match(small_files, tmp_path):
    short = tmp_path / "short.npy"
    np.save(short, np.load(small_files["labels"])[:49])
    with pytest.raises(SystemExit, match="short.npy: 49 rows, but the predictions have 50"):
        main(["eval", "ce", str(small_files["logits"]), str(short)])


def test_eval_reads_zarr(tmp_path, capsys):
    zarr = pytest.importorskip("zarr")
    rng = np.random.default_rng(3)
    x, t = rng.standard_normal((2, 30, 4)).astype(np.float32)
    for name, a in (("x", x), ("t", t)):
        z = zarr.open(str(tmp_path / f"{name}.zarr"), mode="w", shape=a.shape, dtype=a.dtype)
        z[...] = a
    assert main(["eval", "huber", str(tmp_path / "x.zarr"), str(tmp_path / "t.zarr"),
                 "--chunk-rows", "8"]) == 0
    want = fl.huber_loss(x, t)
    naive.assert_close(float(last_line(capsys.readouterr().out).split()[-1]), want.loss, np.float32)


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  memory_limit=WORKER_MEMORY, dashboard_address=None) as cluster:
        yield cluster


def _write_dump(path, tile, rows):
    """``rows`` rows repeating ``tile`` into a ``.npy`` file, without holding them in memory."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=tile.dtype, shape=(rows,) + tile.shape[1:])
    for start in range(0, rows, len(tile)):
        out[start:start + len(tile)] = tile[:rows - start]
    out.flush()


def test_eval_on_a_scheduler_over_a_dump_larger_than_a_workers_memory(cluster, tmp_path):
    rng = np.random.default_rng(4)
    tile_logits = (2 * rng.standard_normal((TILE_ROWS, DUMP_CLASSES))).astype(np.float32)
    tile_labels = rng.integers(0, DUMP_CLASSES, TILE_ROWS)
    dump = tmp_path / "logits.npy", tmp_path / "labels.npy"
    try:
        _write_dump(dump[0], tile_logits, DUMP_ROWS)
        _write_dump(dump[1], tile_labels, DUMP_ROWS)
        assert dump[0].stat().st_size > 3 * WORKER_MEMORY
        with distributed.Client(cluster) as client:
            workers = set(client.scheduler_info()["workers"])
            result = subprocess.run(
                [sys.executable, "-m", "fastloss", "eval", "ce", *map(str, dump),
                 "--scheduler", cluster.scheduler_address],
                capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stderr
            # a worker killed for memory would have been replaced by one at another address
            assert set(client.scheduler_info()["workers"]) == workers
    finally:  # pytest keeps the last runs' folders: not 1.2 GB each
        for path in dump:
            path.unlink(missing_ok=True)
    want = fl.softmax_cross_entropy(tile_logits, tile_labels, grad=False).loss  # every tile's mean
    naive.assert_close(float(last_line(result.stdout).split()[-1]), want, np.float32, what="loss")
