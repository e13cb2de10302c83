"""Center loss with the in-place center update: fastloss against NumPy, torch, JAX and a copy.

Groups ``center-64x32-k10``, ``center-8192x512-k1000`` (the medium size) and
``center-65536x512-k10000``, float32: ``center_loss(features, labels, centers,
alpha=0.5)`` computes the loss, the gradient and updates the centers in place.

* ``numpy``: ``x - c[y]`` and ``np.add.at`` (``fastloss.tools.numpy_losses.center_loss``);
* ``torch``: eager forward, ``autograd.grad``, ``index_add_`` update; ``torch-compile``
  compiles the forward and the update;
* ``jax``: one ``jax.jit`` of ``value_and_grad`` and the update, returning the new
  centers (which the next call uses);
* ``copy``: ``np.copyto`` of the features (read them once, write the gradient once).

Each entry updates its own copy of the centers on every call, as a training loop
would; before timing, one call from the same starting centers is checked against
fastloss (loss, gradient and updated centers).
"""
import pytest
from _suite import ROLES, params, run_entry, suite_cases

CASES = suite_cases(("center",))


@pytest.mark.parametrize("case, role", list(params(CASES, ROLES)))
def test_center(benchmark, request, case, role):
    run_entry(benchmark, request.config, case, role)
