"""The compile options of the CPU kernels."""
from numba import njit

from fastloss._cache import CACHE

# NumPy's error model (no ZeroDivisionError branches in loops) and FMA
# contraction; no licence that would stop NaN/inf propagating as in PyTorch.
HELPER_OPTIONS = dict(error_model="numpy", fastmath={"contract"})
KERNEL_OPTIONS = dict(cache=CACHE, nogil=True, **HELPER_OPTIONS)
jit = njit(**KERNEL_OPTIONS)
# reductions: reassoc lets LLVM vectorize a float sum (see fastloss.cpu._rows)
reduction_jit = njit(**dict(KERNEL_OPTIONS, fastmath={"contract", "reassoc", "nsz"}))
