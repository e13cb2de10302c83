"""Center loss + center update (N=8192, D=512, K=1000, float32) against NumPy, torch and a copy.

One benchmark group, ``center-8192x512-k1000``, measured in the same run:

* ``fastloss``           ``center_loss`` (loss, gradient, in-place update), fresh gradient;
* ``fastloss-grad_out``  the same writing into a preallocated ``grad_out=``;
* ``numpy``              what a NumPy user writes: ``x - c[y]`` and ``np.add.at``;
* ``torch``              eager forward, ``autograd.grad``, ``index_add_`` update;
* ``copy``               the ceiling: ``np.copyto`` of the features (read them once,
                         write the gradient once).

Each entry updates its own copy of the centers on every call, as a training
loop would; before timing, one call from the same starting centers is checked
against fastloss (loss, gradient and updated centers).
"""
import numpy as np
import pytest

from bench_losses import _bench, torch_or_skip

N, D, K = 8192, 512, 1000
ALPHA = 0.5
GROUP = f"center-{N}x{D}-k{K}"
ROLES = ("fastloss", "fastloss-grad_out", "numpy", "torch", "copy")
RTOL = 1e-4


def numpy_center_loss(x, labels, centers, alpha=ALPHA):
    """Mean center loss, its gradient, and the update of Wen et al. with np.add.at."""
    n = x.shape[0]
    diff = x - centers[labels]
    loss = 0.5 * float(np.einsum("ij,ij->", diff, diff)) / n
    grad = diff / n
    counts = np.bincount(labels, minlength=centers.shape[0]).astype(x.dtype)
    step = np.zeros_like(centers)
    np.add.at(step, labels, diff)  # sum_i (x_i - c_j) per class
    centers += (alpha / (1 + counts))[:, None] * step
    return loss, grad


def torch_center_loss(torch):
    def run(x, labels, centers, alpha=ALPHA):
        x = x.detach().requires_grad_(True)
        diff = x - centers[labels]
        loss = 0.5 * (diff * diff).sum(dim=1).mean()
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            d = diff.detach()
            counts = torch.bincount(labels, minlength=centers.shape[0]).to(x.dtype)
            step = torch.zeros_like(centers).index_add_(0, labels, d)
            centers += (alpha / (1 + counts))[:, None] * step
        return loss, grad
    return run


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    labels = rng.integers(0, K, size=N)
    centers = rng.normal(size=(K, D)).astype(np.float32)
    import fastloss
    want_c = centers.copy()
    loss, grad = fastloss.center_loss(x, labels, want_c)
    return dict(x=x, labels=labels, centers=centers, loss=float(loss), grad=grad, updated=want_c)


def _agree(role, d, loss, grad, centers):
    np.testing.assert_allclose(loss, d["loss"], rtol=RTOL, err_msg=f"{role}: loss")
    np.testing.assert_allclose(grad, d["grad"], rtol=RTOL, atol=RTOL * np.abs(d["grad"]).max(),
                               err_msg=f"{role}: gradient")
    np.testing.assert_allclose(centers, d["updated"], rtol=RTOL, atol=1e-5, err_msg=f"{role}: centers")


@pytest.mark.parametrize("role", ROLES)
def test_center(benchmark, request, data, role):
    import fastloss
    x, labels = data["x"], data["labels"]
    centers = data["centers"].copy()
    benchmark.group = GROUP
    benchmark.extra_info.update(role=role, loss="center_loss", shape=f"{N}x{D}", dtype="float32",
                                bytes_moved=2 * x.nbytes)
    if role in ("fastloss", "fastloss-grad_out"):
        g = np.empty_like(x) if role == "fastloss-grad_out" else None

        def run():
            return fastloss.center_loss(x, labels, centers, alpha=ALPHA, grad_out=g)
        loss, grad = run()
        _agree(role, data, float(loss), grad, centers)
    elif role == "numpy":
        def run():
            return numpy_center_loss(x, labels, centers)
        _agree(role, data, *run(), centers)
    elif role == "torch":
        torch = torch_or_skip(request.config)
        fn = torch_center_loss(torch)
        xt, yt, ct = torch.from_numpy(x), torch.from_numpy(labels), torch.from_numpy(centers)

        def run():
            return fn(xt, yt, ct)
        loss, grad = run()
        _agree(role, data, float(loss), grad.numpy(), centers)  # ct shares centers' memory
    else:
        dst = np.empty_like(x)

        def run():
            return np.copyto(dst, x)
        run()
    _bench(benchmark, request.config, run)
