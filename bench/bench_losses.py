"""fastloss benchmarks: softmax cross entropy, focal, sigmoid focal and Huber.

Run with ``pytest bench/`` (see bench/README.md).  Every case is one benchmark
group (``ce-8192x1000``, ``ce-8192x1000-float16``, ...): a loss at the small,
medium and large sizes in float32, and at the medium size in float16.  Each
group holds, measured in the same run:

* ``fastloss``           the fused call, a fresh gradient array each call;
* ``fastloss-grad_out``  the same call writing into a preallocated ``grad_out=``;
* ``numpy``              the vectorized NumPy version (``fastloss.tools.numpy_losses``);
* ``copy``               the bandwidth ceiling (``fastloss.tools.bench.ceiling``):
                         ``np.copyto`` of the logits into a preallocated array; for
                         sigmoid focal and Huber ``np.subtract(x, t, out=g)`` (read
                         both inputs, write the gradient);
* ``torch``, ``torch-compile``, ``jax``  torch eager + ``torch.autograd.grad``, the
                         same through ``torch.compile``, ``jax.jit(jax.value_and_grad)``
                         (``fastloss.tools.competitors``; skipped when not installed);
* ``fastloss-cuda``      fastloss on device arrays, with a device synchronize
                         (skipped without a CUDA GPU).

Before an entry is timed, its result is checked against fastloss's (fastloss's
against NumPy's); that first call is also the warm-up.  The sizes, inputs and
entries come from ``fastloss.tools.bench``, which ``python -m fastloss bench`` runs too.
"""
import pytest
from _suite import ROLES, params, run_entry, suite_cases

CASES = suite_cases(("ce", "focal", "sigmoid_focal", "huber"))


@pytest.mark.parametrize("case, role", list(params(CASES, ROLES)))
def test_loss(benchmark, request, case, role):
    run_entry(benchmark, request.config, case, role)
