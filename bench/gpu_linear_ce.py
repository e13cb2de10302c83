"""GPU: fused linear cross-entropy against PyTorch's unfused path, time and memory.

Run by ``bench/gpu_check.sh`` on a machine with a GPU, CuPy and PyTorch.  At the issue's
size (N = 8192, H = 4096, V = 128256, float16) by default, ``--quick`` a tenth of it:

* fastloss: ``linear_cross_entropy(E, W, y)`` on CuPy arrays (gradients of both);
* PyTorch: ``cross_entropy(E @ W.T)`` forward and backward (the logits in float16, the
  loss in float32, as PyTorch's autocast would), ``autograd.grad`` of both inputs.

Both are first checked against each other (loss and gradients); then the median of
``--reps`` calls timed with CUDA events, and the peak memory beyond the inputs: PyTorch's
``max_memory_allocated``, CuPy's pool through a memory hook for fastloss.

    python bench/gpu_linear_ce.py --out bench/results/gpu_linear_ce [--quick]
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_bench import _events_timer  # noqa: E402  (the same CUDA-event timer)


def _peak_hook(cp):
    """A CuPy memory hook counting the pool's bytes in use and their peak."""
    class PeakHook(cp.cuda.MemoryHook):
        name = "PeakHook"

        def __init__(self):
            self.in_use = self.peak = 0

        def malloc_postprocess(self, device_id, size, mem_size, mem_ptr, pmem_id):
            self.in_use += mem_size
            self.peak = max(self.peak, self.in_use)

        def free_postprocess(self, device_id, mem_size, mem_ptr, pmem_id):
            self.in_use -= mem_size
    return PeakHook()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/gpu_linear_ce")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    import cupy as cp
    import torch

    import fastloss as fl

    n, H, V = (8192, 4096, 128256) if not args.quick else (1024, 1024, 16384)
    rng = np.random.default_rng(0)
    e = (rng.standard_normal((n, H), dtype=np.float32)).astype(np.float16)
    w = (rng.standard_normal((V, H), dtype=np.float32) * H ** -0.5).astype(np.float16)
    y = rng.integers(0, V, n)
    E, W, Y = cp.asarray(e), cp.asarray(w), cp.asarray(y)
    te, tw, ty = (torch.as_tensor(a, device="cuda") for a in (e, w, y))
    inputs = sum(a.nbytes for a in (e, w, y))

    def fused():
        return fl.linear_cross_entropy(E, W, Y)

    def unfused():
        a, b = te.detach().requires_grad_(), tw.detach().requires_grad_()
        loss = torch.nn.functional.cross_entropy((a @ b.T).float(), ty)
        return loss, torch.autograd.grad(loss, (a, b))

    got, want = fused(), unfused()
    cp.cuda.Device().synchronize()
    agree = {
        "loss": abs(float(got.loss) - float(want[0])),
        "d_embeddings": float(cp.abs(got.grad[0].astype(cp.float32) - cp.asarray(want[1][0].float())).max()),
        "d_classifier": float(cp.abs(got.grad[1].astype(cp.float32) - cp.asarray(want[1][1].float())).max()),
    }
    del got, want

    timed = _events_timer(cp, args.reps, warmup=2)

    with _peak_hook(cp) as hook:
        fused_ms = timed(fused)
    fused_peak = hook.peak
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch_ms = timed(unfused)
    torch_peak = torch.cuda.max_memory_allocated() - base
    rows = {"size": f"N={n} H={H} V={V} float16", "inputs_MiB": inputs / 2**20,
            "fastloss_ms": fused_ms, "torch_unfused_ms": torch_ms, "speedup": torch_ms / fused_ms,
            "fastloss_peak_MiB": fused_peak / 2**20, "torch_peak_MiB": torch_peak / 2**20,
            "memory_ratio": torch_peak / max(fused_peak, 1), "max_abs_difference": agree}
    text = "\n".join([
        f"# linear cross-entropy on the GPU ({rows['size']})", "",
        "| path | median ms | peak memory beyond the inputs |", "|---|---:|---:|",
        f"| fastloss `linear_cross_entropy` (CuPy) | {fused_ms:.1f} | {fused_peak / 2**20:.0f} MiB |",
        f"| PyTorch `cross_entropy(E @ W.T)` + backward | {torch_ms:.1f} | {torch_peak / 2**20:.0f} MiB |",
        "", f"speed-up {rows['speedup']:.2f}x, memory {rows['memory_ratio']:.2f}x less; "
        f"largest differences {agree}", ""])
    print(text)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
