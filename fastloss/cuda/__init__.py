"""CUDA kernels (Numba, through the ``numba-cuda`` package) and their array plumbing.

Nothing here is imported by ``import fastloss``: the public wrappers import
these modules only when a call is dispatched to the GPU, so a machine without
CUDA (or without ``numba-cuda``) pays nothing until it asks for the GPU.
"""
from fastloss._cache import CACHE, use_fingerprint

if CACHE:  # the CUDA kernels' cache keys are the fingerprint of cuda/ and formulas/
    from numba.cuda.core.caching import CacheImpl

    use_fingerprint(CacheImpl, "cuda")
