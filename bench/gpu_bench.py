"""GPU timings: every loss on CuPy arrays beside PyTorch CUDA and a device-to-device copy.

Run by ``bench/gpu_check.sh`` on a machine with a GPU (it needs CuPy; PyTorch
is optional).  Each case first checks that fastloss and PyTorch agree on the
loss, then times, with CUDA events on the legacy default stream (where
fastloss, CuPy and PyTorch all launch by default), the median of ``--reps``
calls of:

* fastloss with a fresh gradient and with ``grad_out=`` reuse;
* PyTorch eager forward + backward (autograd), when torch has a GPU;
* the ceiling: a device-to-device copy of as many bytes as fastloss must move
  (its inputs read once, its gradient written once).

``bandwidth`` is the bytes fastloss must move over its time, as a fraction of
the copy's.  Writes a Markdown table and JSON next to each other.  pytest-
benchmark times host code; GPU kernels need events, hence a script.

    python bench/gpu_bench.py --out bench/results/gpu --quick
"""
import argparse
import json
import statistics
import sys
import time

import numpy as np


def _events_timer(cp, reps, warmup):
    def run(fn):
        for _ in range(warmup):
            fn()
        cp.cuda.Device().synchronize()
        times = []
        for _ in range(reps):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end))
        return statistics.median(times)
    return run


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _cases(cp, torch, quick):
    """(name, bytes fastloss moves, fastloss fresh, fastloss grad_out, torch or None, ref loss pair)."""
    import fastloss as fl
    rng = np.random.default_rng(0)
    F = torch.nn.functional if torch else None
    cases = []

    def tt(a, grad=False):
        t = torch.as_tensor(a, device="cuda")
        return t.detach().clone().requires_grad_(True) if grad else t

    def backward_of(fn, *leaves):
        def run():
            for leaf in leaves:
                leaf.grad = None
            loss = fn()
            loss.backward()
            return loss
        return run

    # softmax cross-entropy: the size, float32 and float16
    n, C = (512, 32768) if quick else (4096, 131072)
    for dtype in (np.float32, np.float16):
        x = cp.asarray(rng.standard_normal((n, C), np.float32).astype(dtype))
        y = cp.asarray(rng.integers(0, C, n))
        g = cp.empty_like(x)
        torch_run = None
        if torch:
            tx, ty = tt(x, grad=True), tt(y)
            torch_run = backward_of(lambda tx=tx, ty=ty: F.cross_entropy(tx, ty), tx)
        cases.append((f"cross_entropy {n}x{C} {np.dtype(dtype).name}", 2 * x.nbytes,
                      lambda x=x, y=y: fl.softmax_cross_entropy(x, y),
                      lambda x=x, y=y, g=g: fl.softmax_cross_entropy(x, y, grad_out=g), torch_run))

    # multi-class focal
    n, C = (512, 8192) if quick else (4096, 32768)
    x = cp.asarray(rng.standard_normal((n, C), np.float32))
    y = cp.asarray(rng.integers(0, C, n))
    g = cp.empty_like(x)
    torch_run = None
    if torch:
        tx, ty = tt(x, grad=True), tt(y)

        def focal(tx=tx, ty=ty):
            logp = F.log_softmax(tx, -1).gather(1, ty[:, None])[:, 0]
            return (-(1 - logp.exp()) ** 2 * logp).mean()
        torch_run = backward_of(focal, tx)
    cases.append((f"focal {n}x{C} float32", 2 * x.nbytes, lambda: fl.focal_loss(x, y),
                  lambda: fl.focal_loss(x, y, grad_out=g), torch_run))

    # elementwise: sigmoid focal, huber
    m = (1 << 20) if quick else (1 << 26)
    xs = cp.asarray(rng.standard_normal(m, np.float32))
    ts = cp.asarray((rng.random(m) < 0.1).astype(np.float32))
    gs = cp.empty_like(xs)
    torch_sf = torch_h = None
    if torch:
        txs, tts = tt(xs, grad=True), tt(ts)

        def sigmoid_focal(x=txs, t=tts, alpha=0.25, gamma=2.0):
            p = torch.sigmoid(x)
            ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
            p_t = p * t + (1 - p) * (1 - t)
            loss = ce * (1 - p_t) ** gamma
            return ((alpha * t + (1 - alpha) * (1 - t)) * loss).mean()
        torch_sf = backward_of(sigmoid_focal, txs)
        torch_h = backward_of(lambda: F.huber_loss(txs, tts), txs)
    cases.append((f"sigmoid_focal {m} float32", 3 * xs.nbytes, lambda: fl.sigmoid_focal_loss(xs, ts),
                  lambda: fl.sigmoid_focal_loss(xs, ts, grad_out=gs), torch_sf))
    cases.append((f"huber {m} float32", 3 * xs.nbytes, lambda: fl.huber_loss(xs, ts),
                  lambda: fl.huber_loss(xs, ts, grad_out=gs), torch_h))

    # triplet margin (explicit triplets)
    n, D = (8192, 128) if quick else (65536, 128)
    a, p, q = (cp.asarray(rng.standard_normal((n, D), np.float32)) for _ in range(3))
    outs = tuple(cp.empty_like(a) for _ in range(3))
    torch_run = None
    if torch:
        ta, tp, tq = tt(a, True), tt(p, True), tt(q, True)
        torch_run = backward_of(lambda: F.triplet_margin_loss(ta, tp, tq), ta, tp, tq)
    cases.append((f"triplet {n}x{D} float32", 6 * a.nbytes, lambda: fl.triplet_margin_loss(a, p, q),
                  lambda: fl.triplet_margin_loss(a, p, q, grad_out=outs), torch_run))

    # batch-hard mining
    n, D = (1024, 128) if quick else (4096, 128)
    e = cp.asarray(rng.standard_normal((n, D), np.float32))
    lab = cp.asarray(rng.integers(0, 64, n))
    ge = cp.empty_like(e)
    torch_run = None
    if torch:
        te, tl = tt(e, True), tt(lab)

        def batch_hard(te=te, tl=tl):
            d = torch.cdist(te, te)
            same = tl[:, None] == tl[None, :]
            pos = torch.where(same, d, torch.zeros_like(d)).max(1).values
            neg = torch.where(same, torch.full_like(d, float("inf")), d).min(1).values
            return F.relu(pos - neg + 1.0).mean()
        torch_run = backward_of(batch_hard, te)
    cases.append((f"batch_hard {n}x{D} float32", 2 * e.nbytes, lambda: fl.batch_triplet_loss(e, lab),
                  lambda: fl.batch_triplet_loss(e, lab, grad_out=ge), torch_run))

    # center loss with its update
    n, D, K = (8192, 512, 1000) if quick else (65536, 512, 1000)
    f = cp.asarray(rng.standard_normal((n, D), np.float32))
    lab = cp.asarray(rng.integers(0, K, n))
    centers = cp.zeros((K, D), cp.float32)
    gf = cp.empty_like(f)
    torch_run = None
    if torch:
        tf, tl, tc = tt(f, True), tt(lab), torch.zeros((K, D), device="cuda")

        def center(tf=tf, tl=tl, tc=tc):
            loss = 0.5 * ((tf - tc[tl]) ** 2).sum(1).mean()
            with torch.no_grad():
                diff = tc[tl] - tf
                counts = torch.bincount(tl, minlength=K).to(tf.dtype)
                tc.index_add_(0, tl, -0.5 * diff / (1 + counts[tl])[:, None])
            return loss
        torch_run = backward_of(center, tf)
    cases.append((f"center {n}x{D} K={K} float32", 3 * f.nbytes,
                  lambda: fl.center_loss(f, lab, centers),
                  lambda: fl.center_loss(f, lab, centers, grad_out=gf), torch_run))
    return cases


def _copy_ms(cp, timer, nbytes):
    """The ceiling: read nbytes/2 and write nbytes/2, device to device."""
    src = cp.empty(nbytes // 2, cp.uint8)
    dst = cp.empty_like(src)
    return timer(lambda: dst.__setitem__(Ellipsis, src))


def _row_config_sweep(cp, timer, quick):
    """Cross entropy float32 under each (row threads, resident threads per SM)."""
    import fastloss as fl
    from fastloss.cuda import _blocks
    from fastloss.cuda.cross_entropy import cross_entropy_kernel
    n, C = (512, 32768) if quick else (4096, 131072)
    rng = np.random.default_rng(1)
    x = cp.asarray(rng.standard_normal((n, C), np.float32))
    y = cp.asarray(rng.integers(0, C, n))
    g = cp.empty_like(x)
    saved = _blocks.threads_per_block(), _blocks.SM_THREADS
    rows = []
    try:
        for row_threads in (256, 512, 1024):
            if row_threads > _blocks.largest_block(cross_entropy_kernel):
                continue  # launch would clamp it: the same run again
            for sm_threads in (1024, 2048):
                _blocks.set_threads_per_block(saved[0][0], row_threads)
                _blocks.SM_THREADS = sm_threads
                ms = timer(lambda: fl.softmax_cross_entropy(x, y, grad_out=g))
                rows.append({"row_threads": row_threads, "sm_threads": sm_threads, "ms": ms,
                             "GB/s": 2 * x.nbytes / ms / 1e6})
    finally:
        _blocks.set_threads_per_block(*saved[0])
        _blocks.SM_THREADS = saved[1]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/gpu", help="path without extension")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = parser.parse_args(argv)
    import cupy as cp
    torch = _torch()
    timer = _events_timer(cp, args.reps, warmup=3)
    dev = cp.cuda.Device()
    name = cp.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
    results = []
    for case, nbytes, fresh, reuse, torch_run in _cases(cp, torch, args.quick):
        t0 = time.perf_counter()
        row = {"case": case, "bytes": nbytes}
        loss = fresh()[0]
        if torch_run is not None:
            want = float(torch_run())
            row["agree"] = bool(abs(float(loss) - want) <= 1e-3 * max(1.0, abs(want)))
        row["fastloss_ms"] = timer(fresh)
        row["grad_out_ms"] = timer(reuse)
        row["torch_ms"] = timer(torch_run) if torch_run is not None else None
        row["copy_ms"] = _copy_ms(cp, timer, nbytes)
        row["bandwidth"] = row["copy_ms"] / row["grad_out_ms"]
        results.append(row)
        print(f"{case}: {row['grad_out_ms']:.3f} ms (copy {row['copy_ms']:.3f}, torch "
              f"{row['torch_ms']}) [{time.perf_counter() - t0:.1f} s]", flush=True)
    sweep = _row_config_sweep(cp, timer, args.quick)
    lines = [f"GPU: {name}; medians of {args.reps} calls (CUDA events), ms.", "",
             "| case | fastloss | grad_out | torch eager | copy (ceiling) | of copy bandwidth "
             "| vs torch | agree |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = r["torch_ms"]
        torch_ms = "missing" if t is None else "%.3f" % t
        speedup = "" if t is None else "%.2fx" % (t / r["grad_out_ms"])
        lines.append("| %s | %.3f | %.3f | %s | %.3f | %.0f%% | %s | %s |" % (
            r["case"], r["fastloss_ms"], r["grad_out_ms"], torch_ms, r["copy_ms"],
            100 * r["bandwidth"], speedup, r.get("agree", "")))
    lines += ["", "Cross entropy float32, grad_out, by launch shape:", "",
              "| row threads | resident threads per SM | ms | GB/s |", "|---|---|---|---|"]
    lines += [f"| {s['row_threads']} | {s['sm_threads']} | {s['ms']:.3f} | {s['GB/s']:.0f} |"
              for s in sweep]
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(args.out + ".json", "w") as fh:
        json.dump({"gpu": name, "cases": results, "row_sweep": sweep}, fh, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
