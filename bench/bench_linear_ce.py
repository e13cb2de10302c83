"""Fused linear + cross-entropy: fastloss against the unfused path, NumPy, torch, JAX and the products.

Groups ``linear_ce-NxH-vV``, float32, ``reduction="mean"``: ``linear_cross_entropy(embeddings,
classifier, labels)`` at the small (64 x 32, V = 1000), medium (2048 x 256, V = 32768: the issue's
size) and large (8192 x 256, V = 32768) sizes, the gradients of the embeddings and the classifier.

* ``unfused``: ``Z = E @ W.T`` whole, fastloss's ``softmax_cross_entropy`` in place on it, then
  ``G @ W`` and ``G.T @ E`` (``fastloss.tools.bench.unfused_linear``): what the fused call must
  stay within 1.3x of, holding ``(N, V)`` logits that it does not;
* ``numpy``: the same unfused path with NumPy's softmax (``numpy_losses.linear_cross_entropy``);
* ``torch``, ``torch-compile``, ``jax``: autograd of ``cross_entropy(E @ W.T)``;
* ceiling (role ``copy``, entry named ``products``): the three matrix products alone,
  ``E @ W.T``, ``Z @ W`` and ``Z.T @ E``, into preallocated arrays (``bench.ceiling``): the
  least any path computes.  fastloss's chunks of whole rows (the default at these sizes) have
  the same three products; its blocks of classes (wider vocabularies) form ``E @ W_blk.T``
  twice (statistics, then gradient), a floor of 4/3 of this.
"""
import pytest
from _suite import ROLES, params, run_entry, suite_cases

CASES = suite_cases(("linear_ce",))


@pytest.mark.parametrize("case, role", list(params(CASES, ROLES, extra={"linear_ce": ("unfused",)},
                                                   names={("linear_ce", "copy"): "products"})))
def test_linear_ce(benchmark, request, case, role):
    run_entry(benchmark, request.config, case, role)
