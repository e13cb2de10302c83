"""``python -m fastloss check``: every loss's value and gradient against torch, jax or NumPy.

torch and jax run in child processes (their thread pools stay out of this process,
in which other tests fork); the NumPy fallback and the broken-fastloss cases run
in-process, with torch and jax made unimportable by putting ``None`` in
``sys.modules``.
"""
import importlib.util
import os
import subprocess
import sys

import pytest

import fastloss
from fastloss.tools import check as _check
from fastloss.tools import cli

ALL_LOSSES = _check.LOSS_NAMES


@pytest.fixture
def no_frameworks(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "jax", None)


def _table_rows(out):
    """The table's rows: lines that start with a loss name."""
    return [ln for ln in out.splitlines() if ln.split(" ", 1)[0] in ALL_LOSSES]


def _child(*args, env=None, timeout=600):
    cmd = [sys.executable, "-m", "fastloss", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                          env=None if env is None else {**os.environ, **env})


def _assert_every_loss_passed(out, n_rows=None, losses=ALL_LOSSES):
    rows = _table_rows(out)
    assert {r.split(" ", 1)[0] for r in rows} == set(losses), out
    assert all(r.rstrip().endswith("PASS") for r in rows), out
    for dtype in ("float32", "float64"):
        for reduction in ("mean", "sum", "none"):
            assert any(f" {dtype} " in r and f" {reduction} " in r for r in rows)
    assert any("centers" in r for r in rows)
    if n_rows is not None:
        assert len(rows) == n_rows
    assert "FAIL" not in out


N_ROWS = len(_check.CASES) * 2 * 3 + 2  # cases x dtypes x reductions, + the centers per dtype


def test_numpy_fallback_passes(capsys, no_frameworks):
    status = cli.main(["--seed", "1"])  # no command: check, with "auto"
    out, err = capsys.readouterr()
    assert status == 0, out + err
    head = out.splitlines()[0]
    assert "NumPy references" in head and "neither torch nor jax" in head
    _assert_every_loss_passed(out, N_ROWS)
    assert f"PASS: all {N_ROWS} checks passed against numpy" in out


def test_torch_passes(capsys):
    """In this process: tests/test_torch_parity.py imports torch here anyway."""
    pytest.importorskip("torch")
    status = cli.main([])  # the default command and framework: torch when it imports
    out, err = capsys.readouterr()
    assert status == 0, out + err
    assert "against PyTorch" in out.splitlines()[0]
    _assert_every_loss_passed(out, N_ROWS)
    assert "F.cross_entropy" in out  # the legend of references


def test_jax_passes():
    """Two losses only (JAX's op-by-op dispatch compiles each new op, seconds on a small
    machine); they cover three gradients, the centers and float64 (x64 mode).  The
    formulas are the ones the NumPy fallback runs in full."""
    pytest.importorskip("jax")
    losses = ("triplet_margin_loss", "center_loss")
    proc = _child("check", "--framework", "jax", "--seed", "3", "--losses", "triplet", "center")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "against JAX" in proc.stdout.splitlines()[0]
    n_cases = sum(c.loss in losses for c in _check.CASES)
    _assert_every_loss_passed(proc.stdout, n_cases * 6 + 2, losses)


def _broken(monkeypatch, name, fix):
    real = getattr(fastloss, name)

    def broken(*args, **kwargs):
        return fix(real(*args, **kwargs))
    monkeypatch.setattr(fastloss, name, broken)


def test_a_wrong_gradient_fails(capsys, no_frameworks, monkeypatch):
    _broken(monkeypatch, "huber_loss", lambda r: fastloss.LossGrad(r.loss, r.grad * 1.001))
    status = cli.main(["check", "--framework", "numpy", "--losses", "huber", "focal"])
    out, _ = capsys.readouterr()
    assert status == 1
    rows = _table_rows(out)
    huber = [r for r in rows if r.startswith("huber_loss ")]
    assert huber and all(r.rstrip().endswith("FAIL") for r in huber), out
    focal = [r for r in rows if r.startswith("focal_loss ")]
    assert focal and all(r.rstrip().endswith("PASS") for r in focal), out
    assert f"FAIL: {len(huber)} of {len(rows)} checks failed (huber_loss)" in out


def test_a_wrong_value_or_a_crash_fails(capsys, no_frameworks, monkeypatch):
    def shifted(r):
        return fastloss.LossGrad(r.loss * 1.01, r.grad)

    def crash(r):
        raise RuntimeError("kernel exploded")
    _broken(monkeypatch, "triplet_margin_loss", shifted)
    _broken(monkeypatch, "center_loss", crash)
    status = cli.main(["check", "--framework", "numpy", "--losses", "triplet", "center"])
    out, _ = capsys.readouterr()
    assert status == 1
    rows = _table_rows(out)
    assert all(r.rstrip().endswith("FAIL") for r in rows if r.startswith("triplet_margin_loss ")), out
    crashed = [r for r in rows if r.startswith("center_loss ")]
    assert crashed and all("ERROR RuntimeError: kernel exploded" in r for r in crashed), out
    assert "(triplet_margin_loss, center_loss)" in out


def test_a_missing_framework_exits_2(capsys, no_frameworks):
    assert cli.main(["check", "--framework", "torch"]) == 2
    assert "torch is not installed" in capsys.readouterr().err
    assert cli.main(["check", "--framework", "jax"]) == 2
    assert "jax is not installed" in capsys.readouterr().err


def test_an_unusable_cuda_backend_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(_check, "_cuda_problem", lambda: "RuntimeError: no GPU in this test")
    assert cli.main(["check", "--backend", "cuda"]) == 2
    assert "no GPU in this test" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--losses", "nope"], ["--framework", "tensorflow"],
                                  ["--backend", "tpu"]])
def test_bad_options_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["check", *argv])
    assert exc.value.code == 2


def test_cuda_backend_under_the_simulator():
    """--backend cuda: NumPy inputs through fastloss's CUDA kernels (Numba's simulator here)."""
    if importlib.util.find_spec("numba.cuda") is None:
        pytest.skip("numba-cuda is not installed")
    proc = _child("check", "--backend", "cuda", "--framework", "numpy", "--losses", "huber",
                  "--dtypes", "float32", env={"NUMBA_ENABLE_CUDASIM": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fastloss backend cuda" in proc.stdout
    rows = _table_rows(proc.stdout)
    assert len(rows) == 6 and all(r.rstrip().endswith("PASS") for r in rows), proc.stdout


def test_imports_stay_lazy():
    code = ("import sys, fastloss, fastloss.__main__, fastloss.tools.check; "
            "print(sorted(m for m in ('torch', 'jax', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
