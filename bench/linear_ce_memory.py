"""Memory of one linear cross-entropy step, fused against unfused: the README's figures.

A softmax layer of V classes over N embeddings of width H, float32, the gradients written into
preallocated buffers (what a training loop does); the peak that ``tracemalloc`` traces during
one call, above what was allocated before it (NumPy and Numba report their allocations to it):

* ``fused``: ``fastloss.linear_cross_entropy(E, W, y, bias=b, grad_out=...)``;
* ``unfused``: ``Z = E @ W.T + b`` whole, ``softmax_cross_entropy(Z, y, grad_out=Z)`` in place,
  then ``G @ W``, ``G.T @ E`` and ``G.sum(0)`` into the same buffers.

    python bench/linear_ce_memory.py [--rows 1024] [--width 128] [--classes 50000]

prints a Markdown table (stored in bench/results/linear_ce.md).
"""
import argparse
import time
import tracemalloc

import numpy as np

import fastloss as fl


def traced_peak(call):
    call()  # compiled, caches warm
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        start = time.perf_counter()
        call()
        seconds = time.perf_counter() - start
        return tracemalloc.get_traced_memory()[1] - base, seconds
    finally:
        tracemalloc.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--classes", type=int, default=50_000)
    args = parser.parse_args(argv)
    n, H, V = args.rows, args.width, args.classes
    rng = np.random.default_rng(0)
    e = rng.standard_normal((n, H), dtype=np.float32)
    w = rng.standard_normal((V, H), dtype=np.float32) * np.float32(H ** -0.5)
    b = np.zeros(V, np.float32)
    y = rng.integers(0, V, n)
    outs = (np.empty_like(e), np.empty_like(w), np.empty_like(b))

    def fused():
        return fl.linear_cross_entropy(e, w, y, bias=b, grad_out=outs)

    def unfused():
        z = e @ w.T
        z += b
        loss, g = fl.softmax_cross_entropy(z, y, grad_out=z)
        np.matmul(g, w, out=outs[0])
        np.matmul(g.T, e, out=outs[1])
        np.sum(g, axis=0, out=outs[2])
        return loss

    MiB = 2 ** 20
    print(f"N = {n}, H = {H}, V = {V}, float32; the (N, V) logits: {n * V * 4 / MiB:.1f} MiB; "
          f"inputs {(e.nbytes + w.nbytes + b.nbytes) / MiB:.1f} MiB, gradients (preallocated) "
          f"{sum(o.nbytes for o in outs) / MiB:.1f} MiB\n")
    print("| path | traced peak of one step, beyond inputs and gradients | share of the logits | one step |")
    print("|---|---:|---:|---:|")
    for name, call in (("fused (`linear_cross_entropy`)", fused), ("unfused (`E @ W.T`, CE in place, `G @ W`, `G.T @ E`)", unfused)):
        peak, seconds = traced_peak(call)
        print(f"| {name} | {peak / MiB:.1f} MiB | {100 * peak / (n * V * 4):.1f} % | {seconds * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
