"""fastloss's tools: the command line (``python -m fastloss``) and what it runs.

* ``cli``: the command table and ``main``;
* ``check``, ``bench`` (its table and chart in ``bench_table``), ``warmup``, ``demo``: one command each;
* ``registry``: one description per loss, read by the commands and the tests;
* ``references``: each loss's formula, once, over NumPy, ``jax.numpy`` or torch;
* ``competitors``: torch, ``torch.compile`` and JAX timed beside fastloss (autograd of the references);
* ``numpy_losses``: the vectorized NumPy loss + gradient that the bench times as ``numpy``.

None of them is imported by ``import fastloss``.
"""
