"""Triplet losses: fastloss against NumPy, torch, JAX and a ceiling (see bench/README.md).

Groups, float32, ``reduction="mean"``, at the small, medium and large sizes:

* ``triplet-NxD`` (medium ``triplet-65536x128``): ``triplet_margin_loss(anchor,
  positive, negative)`` (euclidean, margin 1, eps 1e-6), three gradients.  Ceiling
  (role ``copy``): ``np.copyto`` of each of the three inputs into a preallocated
  array, the least a one-pass kernel must move.
* ``batch_hard-NxD`` (medium ``batch_hard-2048x128``, 64 classes of 32):
  ``batch_triplet_loss(embeddings, labels, mining="hard")``.  Ceiling (role ``copy``,
  entry named ``gemm``): one Gram matrix ``E @ E.T`` by BLAS's gemm on a transposed
  copy made before the timing, the least time that product takes (fastloss forms it
  as two row blocks against ``E.T``, also gemm).  The entry ``matmul`` times NumPy's
  literal ``E @ E.T``, which NumPy hands to syrk, about twice slower here.

Entries as in bench_losses.py: ``fastloss``, ``fastloss-grad_out``, ``numpy``,
``torch``, ``torch-compile``, ``jax``, ``fastloss-cuda`` and the ceiling; each checked
against fastloss (fastloss against NumPy) before it is timed.
"""
import pytest
from _suite import ROLES, params, run_entry, suite_cases

CASES = suite_cases(("triplet", "batch_hard"))


@pytest.mark.parametrize("case, role", list(params(CASES, ROLES, extra={"batch_hard": ("matmul",)},
                                                   names={("batch_hard", "copy"): "gemm"})))
def test_triplet(benchmark, request, case, role):
    run_entry(benchmark, request.config, case, role)
