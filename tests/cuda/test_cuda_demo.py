"""``python -m fastloss demo --backend cuda``: every fastloss call of the demo on the GPU path.

Under Numba's CUDA simulator the arrays stay NumPy and each call gets
``backend="cuda"`` (copied over and back); the shapes are tiny because the
simulator runs every block as Python threads.  On a GPU with CuPy the same
test keeps the network on the device.
"""
from dataclasses import replace

import numpy as np

from fastloss.tools import cli
from fastloss.tools import demo

TINY = demo.DemoConfig(dataset="synthetic", samples=40, epochs=1, batch_size=15, hidden=(8,),
                       center_weight=0.5, triplet_weight=0.5, backend="cuda", out=None)


def test_demo_trains_through_the_cuda_kernels():
    result = demo.run_demo(TINY)
    assert (result.n_train, result.n_test) == (30, 10)
    cpu = demo.run_demo(replace(TINY, backend="cpu"))
    for gpu_model, cpu_model in zip(result.models, cpu.models):
        assert gpu_model.steps == 2
        (epoch,) = gpu_model.history
        assert np.isfinite([epoch.train_loss, epoch.test_loss, gpu_model.test_loss]).all()
        assert np.isfinite(gpu_model.embeddings).all() and 0 <= gpu_model.test_accuracy <= 1
        # the CUDA kernels compute what the CPU ones do, up to float32 round-off
        np.testing.assert_allclose(gpu_model.test_loss, cpu_model.test_loss, rtol=1e-3)
    assert np.isfinite(result.models[1].centers).all() and result.models[1].learned_centers


def test_demo_command_with_backend_cuda(capsys):
    status = cli.main(["demo", "--backend", "cuda", "--dataset", "synthetic", "--samples", "24",
                       "--epochs", "1", "--batch-size", "9", "--no-plot", "--quiet"])
    out, _ = capsys.readouterr()
    assert status == 0 and "backend cuda" in out and "softmax + center x0.5" in out
