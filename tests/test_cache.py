"""The on-disk kernel cache: read-only installations, NUMBA_CACHE_DIR, and the warm-up command.

Each test runs a fresh interpreter.  "Read-only" is simulated: the tests run as
root here, which writes anywhere, so the child refuses Numba's write test
(``tempfile.TemporaryFile(dir=...)``, how Numba decides that a folder is
writable) for the folders that should be read-only.
"""
import os
import shutil
import subprocess
import sys
import textwrap

import fastloss

PACKAGE = os.path.dirname(fastloss.__file__)

READ_ONLY = textwrap.dedent("""
    import tempfile
    _temporary_file = tempfile.TemporaryFile
    def _refuse(*args, dir=None, **kwargs):
        if dir is not None and any(str(dir).startswith(p) for p in READ_ONLY_DIRS):
            raise PermissionError(13, "Permission denied (read-only, simulated)", dir)
        return _temporary_file(*args, dir=dir, **kwargs)
    tempfile.TemporaryFile = _refuse
""")

CALL_HUBER = textwrap.dedent("""
    import numpy as np, fastloss as fl
    from fastloss.cpu import huber
    loss, grad = fl.huber_loss(np.array([0.0, 3.0], np.float32), np.zeros(2, np.float32))
    assert abs(float(loss) - 1.25) < 1e-6, loss       # (0 + (3 - 0.5)) / 2
    print("hits", sum(huber._huber_serial.stats.cache_hits.values()),
          "misses", sum(huber._huber_serial.stats.cache_misses.values()))
""")


def _python(code, env_extra, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-W", "always::RuntimeWarning", "-c", code], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)


def _index_files(folder):
    return [f for _, _, files in os.walk(folder) for f in files if f.endswith(".nbi")]


def test_import_and_calls_work_when_no_cache_folder_is_writable(tmp_path):
    """Package folder, user cache and NUMBA_CACHE_DIR all refused: a warning, no exception."""
    code = f"READ_ONLY_DIRS = ['/']\n{READ_ONLY}\n{CALL_HUBER}"
    run = _python(code, {"XDG_CACHE_HOME": str(tmp_path / "user-cache")}, tmp_path)
    assert run.returncode == 0, run.stderr
    assert "no writable cache directory" in run.stderr
    assert "NUMBA_CACHE_DIR" in run.stderr
    assert "hits 0 " in run.stdout  # compiled in the process
    assert not _index_files(tmp_path)


def test_a_read_only_package_folder_falls_back_to_the_user_cache(tmp_path):
    code = f"READ_ONLY_DIRS = [{PACKAGE!r}]\n{READ_ONLY}\n{CALL_HUBER}"
    user_cache = tmp_path / "user-cache"
    run = _python(code, {"XDG_CACHE_HOME": str(user_cache)}, tmp_path)
    assert run.returncode == 0, run.stderr
    assert "no writable cache directory" not in run.stderr
    assert _index_files(user_cache / "numba"), "kernels should be cached in the user cache"


def test_numba_cache_dir_is_honoured_and_warmup_fills_it(tmp_path):
    cache = tmp_path / "numba-cache"
    env = {"NUMBA_CACHE_DIR": str(cache)}
    warm = subprocess.run([sys.executable, "-m", "fastloss", "warmup", "--losses", "huber_loss",
                           "--dtypes", "float32"], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert warm.returncode == 0, warm.stderr
    assert f"NUMBA_CACHE_DIR={cache}" in warm.stdout
    assert _index_files(cache)
    run = _python(CALL_HUBER, env, tmp_path)  # a new process: loads, compiles nothing
    assert run.returncode == 0, run.stderr
    hits, misses = (int(v) for v in run.stdout.split()[1::2])
    assert hits >= 1 and misses == 0, run.stdout


def _copy_of_the_package(tmp_path):
    """A copy of fastloss (its built extension too), importable from ``tmp_path / "src"``."""
    src = tmp_path / "src"
    shutil.copytree(PACKAGE, src / "fastloss", ignore=shutil.ignore_patterns("__pycache__"))
    return src


def test_an_edit_to_a_helper_rebuilds_the_kernels_that_use_it(tmp_path):
    """The kernels' cache key covers every kernel source, not only the kernel's own file:
    after an edit to ``cpu/_math.py`` (which the Huber kernel loads through), the next process
    compiles again; without an edit, and after one to the tools, a public wrapper or the CUDA
    kernels, it loads."""
    src = _copy_of_the_package(tmp_path)
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "numba-cache"), "PYTHONPATH": str(src)}

    def hits_and_misses():
        run = _python(CALL_HUBER, env, tmp_path)
        assert run.returncode == 0, run.stderr
        return tuple(int(v) for v in run.stdout.split()[1::2])

    assert hits_and_misses() == (0, 1)  # compiled, then written to the cache
    assert hits_and_misses() == (1, 0)
    for outside in (("tools", "cli.py"), ("huber.py",), ("cuda", "huber.py")):
        with open(src.joinpath("fastloss", *outside), "a") as f:
            f.write("\n# an edit outside the CPU kernels' sources\n")
        assert hits_and_misses() == (1, 0), outside
    with open(src / "fastloss" / "cpu" / "_math.py", "a") as f:
        f.write("\n# an edit to a helper\n")
    assert hits_and_misses() == (0, 1)
