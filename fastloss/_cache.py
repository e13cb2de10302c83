"""Whether fastloss's kernels are cached on disk: decided once, at import.

Numba caches a compiled kernel in ``NUMBA_CACHE_DIR`` when that is set, else in
``__pycache__`` beside the source, else in the user's cache directory
(``~/.cache/numba``); when none of them is writable it raises at decoration
time, which would make ``import fastloss`` fail on a read-only installation
run by a user without a home directory (a container, a service account).
``CACHE`` is then False: every kernel compiles in each process, with a warning
that says how to get the cache back.

Numba keys a cached kernel on its own source file, so an edit to a helper it
calls (``cpu/_math.py``, a formula) would leave it stale.  Every fastloss
kernel's key is instead its target's fingerprint (``FINGERPRINTS``), a hash of
every source that target's kernels are built from: ``formulas/`` and ``cpu/``
for the CPU, ``formulas/`` and ``cuda/`` for the GPU.  An edit to one of them
rebuilds that target's kernels once (``use_fingerprint``); an edit to a public
wrapper, the validation or the tools rebuilds nothing.
"""
import hashlib
import os
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__))  # this file lies in the package folder


def _cache_locatable(package_file):
    """Whether Numba finds a writable cache directory for a kernel defined in ``package_file``."""
    from numba.core.caching import FunctionCache

    namespace = {}
    exec(compile("def kernel():\n    pass\n", package_file, "exec"), namespace)
    try:
        FunctionCache(namespace["kernel"])
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return False
    return True


def _decide():
    files = [os.path.join(_PACKAGE, sub, "__init__.py") for sub in ("", "cpu", "cuda")]
    if all(_cache_locatable(f) for f in files if os.path.exists(f)):
        return True
    warnings.warn("fastloss: no writable cache directory for Numba (the package folder, "
                  "NUMBA_CACHE_DIR and the user cache directory are all unavailable); kernels "
                  "will compile in every process. Set NUMBA_CACHE_DIR to a writable folder.",
                  RuntimeWarning)
    return False


KERNEL_SOURCES = {"cpu": ("formulas", "cpu"), "cuda": ("formulas", "cuda")}


def _fingerprint(folders):
    """sha256 of every source file under ``folders`` (of the package), in a fixed order."""
    digest = hashlib.sha256()
    walks = (os.walk(os.path.join(_PACKAGE, sub)) for sub in folders)
    for folder, dirs, files in (step for walk in walks for step in walk):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".pyx", ".h")):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, _PACKAGE).encode() + b"\0")
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


def _package_locator(base, fingerprint):
    """``base``, a Numba cache locator, for fastloss's kernels only, keyed on ``fingerprint``."""
    class PackageLocator(base):
        fastloss = True

        @classmethod
        def from_function(cls, py_func, py_file):
            inside = os.path.abspath(py_file).startswith(_PACKAGE + os.sep)
            return super().from_function(py_func, py_file) if inside else None

        def get_source_stamp(self):
            return fingerprint

    PackageLocator.__name__ = PackageLocator.__qualname__ = f"Fastloss{base.__name__}"
    return PackageLocator


def use_fingerprint(cache_impl, target):
    """Put fastloss's locators first in ``cache_impl``'s (Numba's CPU ``CacheImpl``, or
    numba-cuda's): those backed by a source file, keyed on ``FINGERPRINTS[target]``; other
    functions' caching is unchanged.  Once per class."""
    classes = cache_impl._locator_classes
    if any(getattr(c, "fastloss", False) for c in classes):
        return
    mine = [_package_locator(c, FINGERPRINTS[target]) for c in classes
            if any(b.__name__ == "_SourceFileBackedLocatorMixin" for b in c.__mro__)]
    cache_impl._locator_classes = mine + list(classes)


CACHE = _decide()
FINGERPRINTS = {target: _fingerprint(folders) for target, folders in KERNEL_SOURCES.items()}
if CACHE:
    from numba.core.caching import CacheImpl

    use_fingerprint(CacheImpl, "cpu")
