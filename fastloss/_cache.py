"""Whether fastloss's kernels are cached on disk: decided once, at import.

Numba caches a compiled kernel in ``NUMBA_CACHE_DIR`` when that is set, else in
``__pycache__`` beside the source, else in the user's cache directory
(``~/.cache/numba``); when none of them is writable it raises at decoration
time, which would make ``import fastloss`` fail on a read-only installation
run by a user without a home directory (a container, a service account).
``CACHE`` is then False: every kernel compiles in each process, with a warning
that says how to get the cache back.
"""
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


CACHE = _decide()
