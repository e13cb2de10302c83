"""Start-up: ``import fastloss`` and the first call of each loss in a new process, warm cache.

Each round is a fresh interpreter (``bench/startup.py``'s child) with a
``NUMBA_CACHE_DIR`` that a warm-up process filled, so the first call loads its
kernels from disk; the benchmark's time is the whole child (interpreter start-up
included) and ``extra_info`` holds the child's own split: import numpy, import
fastloss, first call per loss.  The cold start (compiling every kernel, about a
minute on 2 cores) is one-off, so it is not in this suite: ``python
bench/startup.py`` measures cold and warm side by side.
"""
import startup


def test_new_process_with_a_warm_cache(benchmark, tmp_path):
    cache = str(tmp_path / "numba-cache")
    startup.measure_once(cache)  # fills the cache (compiles)
    result = benchmark.pedantic(startup.measure_once, args=(cache,), rounds=3, iterations=1)
    benchmark.extra_info.update({"import numpy s": result["import numpy"],
                                 "import fastloss s": result["import fastloss"],
                                 **{f"first call {k} s": v for k, v in result["first"].items()}})
