"""``python -m fastloss demo`` (``fastloss.tools.demo``): the network's gradients, convergence,
center loss tightening the clusters, the picture with and without matplotlib, the CLI.

Training runs use the built-in synthetic dataset at a small size; each takes
well under a second once the kernels are in Numba's disk cache.  A test that takes
``backend`` trains (tiny) on the CPU and through the CUDA kernels: under Numba's CUDA
simulator the arrays stay NumPy and each call gets ``backend="cuda"`` (copied over and
back); on a GPU with CuPy the network stays on the device.  Every other test is on the
"cpu" side.
"""
import struct
import sys
import types
import zlib
from dataclasses import replace

import numpy as np
import pytest

from fastloss.tools import cli
from fastloss.tools import demo

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMALL = demo.DemoConfig(dataset="synthetic", epochs=12, out=None)  # 1500 training rows
#: 30 training rows, one epoch of two steps, every loss: small enough for the simulator
TINY = demo.DemoConfig(dataset="synthetic", samples=40, epochs=1, batch_size=15, hidden=(8,),
                       center_weight=0.5, triplet_weight=0.5, out=None)
#: per side, ``demo --samples``, ``--batch-size`` of the command-line run
CLI_SIZES = {"cpu": ("300", "64"), "cuda": ("24", "9")}


def read_png(path):
    """``(width, height, rows)`` of an 8-bit RGB PNG with unfiltered rows, checking every CRC."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, tag
        chunks.append((tag, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color, interlace) == (8, 2, 0)
    raw = zlib.decompress(b"".join(body for tag, body in chunks if tag == b"IDAT"))
    assert len(raw) == height * (1 + 3 * width)
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + 3 * width)
    assert not rows[:, 0].any()  # filter type 0 on every row
    return width, height, rows[:, 1:].reshape(height, width, 3)


# ------------------------------------------------------------------ the gradients


@pytest.mark.cpu
@pytest.mark.parametrize("center_weight, triplet_weight", [(0.0, 0.0), (0.7, 0.3)])
def test_backward_matches_finite_differences(rng, center_weight, triplet_weight):
    """The hand-written backward through the layers, fed fastloss's gradients, is the
    gradient of the total loss: central differences on a tiny float64 network."""
    net = demo.MLP((5, 4, 3, 2, 3), rng, dtype=np.float64)
    x = rng.normal(size=(6, 5))
    labels = np.array([0, 0, 1, 1, 2, 2])
    objective = demo.Objective(3, 2, center_weight=center_weight, triplet_weight=triplet_weight,
                               margin=0.5, dtype=np.float64)
    if objective.centers is not None:
        objective.centers[:] = rng.normal(size=(3, 2))
        centers_before = objective.centers.copy()

    def loss():
        return demo.loss_and_gradients(net, objective, x, labels, update_centers=False)[0]

    _, parts, grads = demo.loss_and_gradients(net, objective, x, labels, update_centers=False)
    assert set(parts) == {"softmax"} | ({"center"} if center_weight else set()) | (
        {"triplet"} if triplet_weight else set())
    h = 1e-6
    for (W, b), (dW, db) in zip(net.params, grads):
        for p, dp in ((W, dW), (b, db)):
            numeric = np.empty_like(p)
            for i in np.ndindex(p.shape):
                saved = p[i]
                p[i] = saved + h
                up = loss()
                p[i] = saved - h
                down = loss()
                p[i] = saved
                numeric[i] = (up - down) / (2 * h)
            np.testing.assert_allclose(dp, numeric, rtol=1e-5, atol=1e-8)
    if objective.centers is not None:
        np.testing.assert_array_equal(objective.centers, centers_before)


@pytest.mark.cpu
def test_center_loss_moves_the_centers_in_place(rng):
    objective = demo.Objective(3, 2, center_weight=1.0, alpha=0.5)
    logits = rng.normal(size=(6, 3)).astype(np.float32)
    embedding = rng.normal(size=(6, 2)).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2])
    objective(logits.copy(), embedding, labels)
    expected = np.stack([0.5 * embedding[labels == k].sum(axis=0) / 3 for k in range(3)])
    np.testing.assert_allclose(objective.centers, expected, rtol=1e-6)
    assert objective.fastloss_seconds > 0


# ------------------------------------------------------------------ data and measures


@pytest.mark.cpu
def test_synthetic_data_is_deterministic_balanced_and_standardized():
    a, b = demo.load_dataset("synthetic", 5), demo.load_dataset("synthetic", 5)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, demo.load_dataset("synthetic", 6).x_train)
    assert a.name == "synthetic" and a.num_classes == 10 and a.x_train.dtype == np.float32
    assert a.x_train.shape == (1500, 64) and a.x_test.shape == (500, 64)
    np.testing.assert_allclose(a.x_train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(a.x_train.std(axis=0), 1, rtol=1e-4)
    assert np.bincount(np.concatenate([a.y_train, a.y_test])).tolist() == [200] * 10


@pytest.mark.cpu
def test_within_class_spread_is_scale_free_and_small_for_tight_clusters(rng):
    labels = np.repeat(np.arange(4), 50)
    means = 5 * rng.normal(size=(4, 2))
    loose = means[labels] + rng.normal(size=(200, 2))
    tight = means[labels] + 0.1 * rng.normal(size=(200, 2))
    s = demo.within_class_spread(loose, labels)
    assert demo.within_class_spread(7.0 * loose + 3.0, labels) == pytest.approx(s)
    assert demo.within_class_spread(tight, labels) < 0.05 * s


# ------------------------------------------------------------------ training


@pytest.mark.cpu
@pytest.mark.parametrize("seed", [0, 1])
def test_training_converges_and_center_loss_tightens_the_clusters(seed):
    result = demo.run_demo(replace(SMALL, seed=seed))
    softmax, center = result.models
    assert (softmax.name, center.name) == ("softmax", "softmax + center x0.5")
    for m in result.models:
        assert m.test_accuracy > 0.8  # chance is 0.1
        assert len(m.history) == SMALL.epochs and m.steps == SMALL.epochs * (1500 // 64)
        assert m.history[-1].test_loss < m.history[0].test_loss
        assert np.isfinite(m.embeddings).all() and m.embeddings.shape == (500, 2)
        assert 0 < m.fastloss_seconds < m.step_seconds
    assert center.learned_centers and not softmax.learned_centers
    assert center.spread < 0.6 * softmax.spread


def test_tiny_training_through_every_loss(backend):
    result = demo.run_demo(replace(TINY, backend=backend))
    assert (result.n_train, result.n_test) == (30, 10)
    for model in result.models:
        assert model.steps == 2
        (epoch,) = model.history
        assert np.isfinite([epoch.train_loss, epoch.test_loss, model.test_loss]).all()
        assert np.isfinite(model.embeddings).all() and 0 <= model.test_accuracy <= 1
    if backend == "cuda":  # the CUDA kernels compute what the CPU ones do, up to float32 round-off
        cpu = demo.run_demo(TINY)
        for model, cpu_model in zip(result.models, cpu.models):
            np.testing.assert_allclose(model.test_loss, cpu_model.test_loss, rtol=1e-3)
    assert np.isfinite(result.models[1].centers).all() and result.models[1].learned_centers


@pytest.mark.cpu
def test_the_two_models_start_from_the_same_network():
    """Same seed, same initial weights and batch order: with the center term
    weighted 0 after all (a tiny weight), the two models nearly coincide."""
    result = demo.run_demo(replace(SMALL, epochs=1, center_weight=1e-12))
    softmax, center = result.models
    np.testing.assert_allclose(center.embeddings, softmax.embeddings, rtol=1e-4, atol=1e-4)


@pytest.mark.cpu
def test_triplet_option_runs_and_converges():
    result = demo.run_demo(replace(SMALL, triplet_weight=0.5, margin=1.0))
    softmax, combined = result.models
    assert combined.name == "softmax + center x0.5 + triplet x0.5"
    assert combined.test_accuracy > 0.8
    assert combined.spread < 0.6 * softmax.spread
    assert all(np.isfinite(e.train_loss) for e in combined.history)


@pytest.mark.cpu
def test_triplet_alone():
    result = demo.run_demo(replace(SMALL, center_weight=0.0, triplet_weight=1.0))
    combined = result.models[1]
    assert combined.name == "softmax + triplet x1"
    assert combined.test_accuracy > 0.8 and not combined.learned_centers


@pytest.mark.cpu
def test_blas_threads_are_limited_only_when_threadpoolctl_is_there(monkeypatch):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)
    with demo.single_threaded_blas() as limits:
        assert limits is None  # contextlib.nullcontext: training runs as it is


# ------------------------------------------------------------------ the picture


def _fake_model(rng, name, learned):
    labels = np.repeat(np.arange(10), 20)
    means = 4 * rng.normal(size=(10, 2))
    return demo.ModelResult(name, 0.0, 0.0, embeddings=means[labels] + rng.normal(size=(200, 2)),
                            labels=labels, centers=means, learned_centers=learned,
                            test_accuracy=0.9, spread=0.1)


@pytest.mark.cpu
def test_picture_without_matplotlib_is_a_valid_png(tmp_path, monkeypatch, rng):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    models = (_fake_model(rng, "softmax", False), _fake_model(rng, "softmax + center", True))
    path = tmp_path / "demo.png"
    assert demo.save_picture(str(path), models) == "numpy"
    width, height, pixels = read_png(path)
    assert (width, height) == (2 * 400 + 3 * 16, 400 + 2 * 16)
    colors = {tuple(int(v) for v in p) for p in pixels.reshape(-1, 3)}
    assert {demo._rgb(c) for c in demo.TAB10} <= colors  # every class drawn
    assert (0, 0, 0) in colors  # the centers' outlines
    assert (pixels[:, :16] == 255).all()  # the left margin stays white


@pytest.mark.cpu
def test_picture_with_matplotlib(tmp_path, rng):
    pytest.importorskip("matplotlib")
    path = tmp_path / "demo.png"
    models = (_fake_model(rng, "softmax", False), _fake_model(rng, "softmax + center", True))
    assert demo.save_picture(str(path), models) == "matplotlib"
    assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 10_000


# ------------------------------------------------------------------ the command line


@pytest.mark.cpu
def test_cli_trains_reports_and_writes_the_picture(tmp_path, capsys):
    path = tmp_path / "out.png"
    status = cli.main(["demo", "--dataset", "synthetic", "--samples", "600", "--epochs", "2",
                       "--seed", "3", "--out", str(path)])
    out, err = capsys.readouterr()
    assert status == 0
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    assert "fastloss demo: synthetic (450 training / 150 held-out rows" in out
    assert "softmax + center x0.5" in out and "spread" in out and f"picture: {path}" in out
    assert "epoch 2/2" in err and "held-out loss" in err  # the per-epoch lines


def test_cli_quiet_and_no_plot(backend, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    samples, batch_size = CLI_SIZES[backend]
    status = cli.main(["demo", "--backend", backend, "--dataset", "synthetic", "--samples", samples,
                       "--epochs", "1", "--batch-size", batch_size, "--no-plot", "--quiet"])
    out, err = capsys.readouterr()
    assert status == 0 and err == "" and "picture" not in out
    assert f"backend {backend}" in out and "softmax + center x0.5" in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.cpu
@pytest.mark.parametrize("args", [["--epochs", "0"], ["--alpha", "1.5"], ["--center-weight", "-1"],
                                  ["--center-weight", "0"], ["--batch-size", "1"],
                                  ["--samples", "3"], ["--margin", "-1", "--triplet-weight", "1"]])
def test_bad_option_values_exit_2(capsys, args):
    assert cli.main(["demo", "--dataset", "synthetic", "--no-plot", *args]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("fastloss demo: --") and err.count("\n") == 1 and out == ""


@pytest.mark.cpu
@pytest.mark.parametrize("args", [["--dataset", "mnist"], ["--backend", "tpu"], ["--epochs", "x"]])
def test_unknown_options_exit_2(capsys, args):
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", *args])
    assert info.value.code == 2


@pytest.mark.cpu
def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--center-weight", "--triplet-weight", "--alpha", "--epochs", "--seed",
                   "--backend", "--dataset", "--out", "--no-plot"):
        assert option in out


@pytest.mark.cpu
def test_cuda_backend_without_a_gpu_exits_2(capsys):
    try:
        from numba import cuda
        if cuda.is_available():
            pytest.skip("a GPU is there: the \"cuda\" side runs the demo on it")
    except ImportError:
        pass
    assert cli.main(["demo", "--backend", "cuda", "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastloss demo: ") and "CUDA" in err and err.count("\n") == 1


# ------------------------------------------------------------------ digits


def _fake_sklearn(monkeypatch, calls):
    """A stand-in ``sklearn.datasets.load_digits``: 400 rows of 8x8 'images' in 0..16."""
    def load_digits(return_X_y=False):
        calls.append(return_X_y)
        x, y = demo.synthetic_data(11, n_samples=400)
        return np.clip(np.round(8 + 3 * x), 0, 16), y

    datasets = types.ModuleType("sklearn.datasets")
    datasets.load_digits = load_digits
    package = types.ModuleType("sklearn")
    package.datasets = datasets
    monkeypatch.setitem(sys.modules, "sklearn", package)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", datasets)


@pytest.mark.cpu
def test_auto_picks_digits_when_sklearn_imports(monkeypatch):
    calls = []
    _fake_sklearn(monkeypatch, calls)
    result = demo.run_demo(replace(SMALL, dataset="auto", samples=None, epochs=2))
    assert result.dataset == "digits" and calls == [True]
    assert (result.n_train, result.n_test) == (300, 100)


@pytest.mark.cpu
def test_auto_falls_back_to_synthetic_and_digits_needs_sklearn(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert demo.load_dataset("auto", 0).name == "synthetic"
    assert cli.main(["demo", "--dataset", "digits", "--no-plot"]) == 2
    assert "scikit-learn" in capsys.readouterr().err


@pytest.mark.cpu
def test_real_digits():
    pytest.importorskip("sklearn")
    result = demo.run_demo(replace(SMALL, dataset="digits", samples=None))
    assert result.dataset == "digits" and result.n_train + result.n_test == 1797
    softmax, center = result.models
    assert softmax.test_accuracy > 0.8 and center.test_accuracy > 0.8
    assert center.spread < 0.6 * softmax.spread
