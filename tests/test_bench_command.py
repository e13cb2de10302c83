"""``python -m fastloss bench`` (``fastloss.tools.bench``), run in-process on the hidden ``tiny`` size.

Competitors are made missing by putting ``None`` in ``sys.modules`` (``import torch``
then raises ImportError, whether or not torch is installed), and wrong by replacing
``fastloss.tools.competitors.prepare``; the CUDA backend is made absent.  Each run takes
a second or two once the kernels are in Numba's disk cache.
"""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from fastloss.tools import bench as _bench
from fastloss.tools import cli, registry
from fastloss.tools import competitors as _competitors
from fastloss.tools import numpy_losses as npl


@pytest.fixture
def no_competitors(monkeypatch):
    """torch and jax cannot be imported; no GPU; the thread settings restored afterwards."""
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "jax", None)
    monkeypatch.setattr(_bench, "cuda_status", lambda: (False, "no GPU in this test"))
    monkeypatch.setitem(_competitors._settings, "threads", None)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    import numba
    threads = numba.get_num_threads()
    yield
    numba.set_num_threads(threads)


def _run(tmp_path, *args):
    return cli.main(["bench", "--sizes", "tiny", "--repeat", "2", "--out", str(tmp_path), *args])


def _results(tmp_path):
    return json.loads((tmp_path / "results.json").read_text())


def test_bench_runs_with_nothing_but_fastloss(tmp_path, capsys, no_competitors):
    status = _run(tmp_path, "--losses", "ce", "huber", "--dtypes", "float32", "float16",
                  "--backends", "cpu", "cuda", "--no-plot")
    out, err = capsys.readouterr()
    assert status == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]

    res = _results(tmp_path)
    rows = [(c["short"], c["size"], c["dtype"], c["backend"]) for c in res["cases"]]
    assert rows == [("ce", "tiny", "float32", "cpu"), ("ce", "tiny", "float16", "cpu"),
                    ("huber", "tiny", "float32", "cpu"), ("huber", "tiny", "float16", "cpu")]
    for c in res["cases"]:
        e = c["entries"]
        assert [e[n]["status"] for n in _bench.ENTRIES] == ["ok", "ok", "ok", "ok", "missing", "missing",
                                                            "missing"]
        fl, np_ = e["fastloss"], e["numpy"]
        assert fl["median_s"] > 0 and len(fl["samples_s"]) == 2 and fl["checked_against"] == "numpy"
        assert np_["checked_against"] == "fastloss"
        assert np_["vs_fastloss"] == pytest.approx(np_["median_s"] / fl["median_s"])
        assert fl["vs_copy"] == pytest.approx(fl["median_s"] / e["copy"]["median_s"])
        assert e["torch"]["median_s"] is None
    assert any("cuda backend skipped: no GPU in this test" in n for n in res["notes"])
    assert any(n.startswith("torch: missing") for n in res["notes"])
    assert res["meta"]["command"].startswith("python -m fastloss bench --sizes tiny")

    # the printed table and the Markdown one: one row per case, competitors missing
    for text in (out, (tmp_path / "results.md").read_text()):
        assert "fastloss ms" in text and "torch-compile ms (ratio)" in text
        lines = [ln for ln in text.splitlines() if ln.lstrip("| ").startswith(("ce ", "huber "))]
        assert len(lines) == 4, text
        for ln in lines:
            assert ln.count("missing") == 3
            assert "x)" in ln  # ratios
    assert "note: cuda backend skipped" in err
    assert "results.png not drawn" not in out  # --no-plot
    # the progress bar: plain text on stderr, the last step complete
    assert "[" + "#" * 24 + "]  28/28" in err


def test_bench_reports_a_mismatch_and_does_not_time_it(tmp_path, capsys, no_competitors, monkeypatch):
    def wrong_jax(name, loss, args, kwargs=None, device="cpu"):
        if name != "jax":
            raise _competitors.Missing(f"{name} not in this test")
        calls = []

        def run():
            calls.append(1)
            return npl.LOSSES[loss](*args, **(kwargs or {}))

        def result(out):
            loss_value, grad = out
            return loss_value, (2 * grad,), None  # the right loss, a wrong gradient
        monkeypatch.setattr(sys.modules[__name__], "_jax_calls", calls, raising=False)
        return _competitors.Prepared(run, result)

    monkeypatch.setattr(_competitors, "prepare", wrong_jax)
    status = _run(tmp_path, "--losses", "huber", "--no-plot")
    out, _ = capsys.readouterr()
    assert status == 1
    e = _results(tmp_path)["cases"][0]["entries"]
    assert e["jax"]["status"] == "mismatch" and e["jax"]["median_s"] is None
    assert "disagrees with fastloss" in e["jax"]["note"] and "max|dgrad|" in e["jax"]["note"]
    assert e["numpy"]["status"] == "ok" and e["torch"]["status"] == "missing"
    assert _jax_calls == [1]  # noqa: F821  (the checked call only: not timed)
    row = next(ln for ln in out.splitlines() if ln.startswith("huber "))
    assert row.rstrip().endswith("mismatch")
    assert "SOME ENTRIES DISAGREE" in out
    assert "| mismatch |" in (tmp_path / "results.md").read_text()


def test_every_loss_runs_tiny(tmp_path, capsys, no_competitors):
    """Center (with its update), triplet (three gradients) and batch-hard too."""
    status = _run(tmp_path, "--no-plot", "--skip", "numpy")
    out, _ = capsys.readouterr()
    assert status == 0, out
    res = _results(tmp_path)
    assert [c["short"] for c in res["cases"]] == list(_bench.LOSS_CHOICES)
    for c in res["cases"]:
        e = c["entries"]
        assert e["fastloss"]["status"] == "ok" and e["fastloss-grad_out"]["status"] == "ok", c
        assert e["numpy"]["status"] == "skipped"
    assert "| center | tiny | 8x4 k3 |" in (tmp_path / "results.md").read_text()


def test_chart_is_skipped_without_matplotlib(tmp_path, capsys, no_competitors, monkeypatch):
    # every matplotlib module: one imported earlier in this process (the demo's tests) would
    # otherwise import by its full name, without its package
    for name in ["matplotlib"] + [m for m in sys.modules if m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    status = _run(tmp_path, "--losses", "ce")
    out, _ = capsys.readouterr()
    assert status == 0
    assert "results.png not drawn: matplotlib is not installed" in out
    assert not (tmp_path / "results.png").exists()


def test_chart_is_drawn_with_matplotlib(tmp_path, capsys, no_competitors):
    pytest.importorskip("matplotlib")
    assert _run(tmp_path, "--losses", "ce") == 0
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_threads_option(tmp_path, capsys, no_competitors):
    import numba
    assert _run(tmp_path, "--losses", "huber", "--threads", "1", "--no-plot") == 0
    assert numba.get_num_threads() == 1
    assert "numba 1" in _results(tmp_path)["meta"]["threads"]


@pytest.mark.parametrize("argv", [["--sizes", "huge"], ["--losses", "nope"], ["--dtypes", "float64"],
                                  ["--backends", "tpu"]])
def test_bad_options_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *argv])
    assert exc.value.code == 2


@pytest.mark.parametrize("argv", [["--repeat", "0"], ["--threads", "0"], ["--threads", "100000"]])
def test_bad_counts_exit_2(argv, capsys, tmp_path):
    assert cli.main(["bench", "--out", str(tmp_path), *argv]) == 2
    assert "must be" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_installed_competitors_agree(tmp_path):
    """torch eager and JAX, where installed, compute what fastloss computes (tiny sizes;
    torch.compile is left to the bench suite: it compiles for seconds per loss).  In a
    child process, so that torch's and XLA's thread pools stay out of this one (other
    tests fork)."""
    if not any(importlib.util.find_spec(n) for n in ("torch", "jax")):
        pytest.skip("neither torch nor jax is installed")
    cmd = [sys.executable, "-m", "fastloss", "bench", "--sizes", "tiny", "--repeat", "1", "--no-plot",
           "--skip", "torch-compile", "numpy", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for c in _results(tmp_path)["cases"]:
        for name in ("torch", "jax"):
            st = c["entries"][name]["status"]
            assert st in ("ok", "missing"), (c["short"], c["dtype"], name, c["entries"][name])


def test_import_fastloss_imports_no_framework():
    code = ("import sys, fastloss, fastloss.__main__, fastloss.tools.bench, fastloss.tools.competitors; "
            "print(sorted(m for m in ('torch', 'jax', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_numpy_references_agree_with_fastloss():
    """The NumPy center, triplet and batch-hard implementations added for the command."""
    import fastloss
    for short in ("center", "triplet", "batch_hard"):
        case = _bench.Case(registry.BY_NAME[short], "small")
        args = _bench.make_args(case)
        got = _bench.numpy_reference(case, args)
        ref = _bench.prepare_entry(case, "fastloss", args)
        ok = _bench.agreement(case, got, ref.result(ref.run()))
        assert ok[2], (short, ok)
    # float16: NumPy computes in float32 and returns float16 gradients
    case = _bench.Case(registry.BY_NAME["focal"], "small", "float16")
    args = _bench.make_args(case)
    got = _bench.numpy_reference(case, args)
    assert got.grads[0].dtype == np.float16
    res = fastloss.focal_loss(*args, gamma=2.0)
    assert _bench.agreement(case, got, _bench.Outcome(float(res.loss), (res.grad,)))[2]
