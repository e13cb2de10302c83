"""``python -m fastloss``: check fastloss against plain NumPy and time both.

With no subcommand (or ``check``), for each loss on synthetic float32 data of a
medium size, it

* checks fastloss's ``(loss, grad)`` against the vectorized NumPy
  implementation in ``fastloss._numpy_losses`` (absolute difference of the loss,
  largest absolute difference of the gradient; ``ok`` within float32 tolerance),
* times both: one warm-up call (which compiles the Numba kernel or loads it
  from the on-disk cache), then the median of ``--repeat`` calls,

and prints one table.  The exit status is 1 when any check fails.

``bench`` (``fastloss._bench``) times every loss beside NumPy, PyTorch eager,
``torch.compile`` and JAX (those installed) and a memory-copy ceiling, after
checking that they agree, and writes the table as JSON, Markdown and a chart.

The same entry point is the ``fastloss`` console script (``fastloss.__main__:main``).
Subcommands are registered in ``_build_parser``; ``check`` is the default.
"""
import argparse
import statistics
import sys
import time

import numpy as np

from . import _numpy_losses as _np_losses

# (fastloss function name, shape, keyword arguments passed to fastloss: the
# hyper-parameters the NumPy side hard-codes, spelled out)
CHECK_CASES = (
    ("softmax_cross_entropy", (4096, 1000), {}),
    ("focal_loss", (4096, 1000), {"gamma": 2.0}),
    ("sigmoid_focal_loss", (4096, 1000), {"alpha": 0.25, "gamma": 2.0}),
    ("huber_loss", (4 * 1024 * 1024,), {"delta": 1.0}),
)


def _median_seconds(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _shape_str(shape):
    return "x".join(str(s) for s in shape)


def _versions():
    parts = []
    try:
        from importlib.metadata import version

        parts.append(f"fastloss {version('fastloss')}")
    except Exception:  # not installed, running from a checkout
        parts.append("fastloss (source tree)")
    parts.append(f"numpy {np.__version__}")
    try:
        import numba

        parts.append(f"numba {numba.__version__}, {numba.get_num_threads()} threads")
    except Exception:
        pass
    return ", ".join(parts)


def run_checks(repeat=10, seed=0, rtol=1e-4, out=None):
    """Run the check-and-timing table; print it to ``out``; return True when all checks pass."""
    out = sys.stdout if out is None else out
    import fastloss

    print(f"fastloss check: fused loss+grad vs NumPy, float32, reduction='mean' ({_versions()})", file=out)
    header = (f"{'loss':<22} {'shape':>12} {'|dloss|':>9} {'max|dgrad|':>10} {'check':>5} "
              f"{'1st call s':>10} {'fastloss ms':>11} {'numpy ms':>9} {'speedup':>8}")
    print(header, file=out)
    print("-" * len(header), file=out)
    all_ok = True
    for name, shape, kwargs in CHECK_CASES:
        x, y = _np_losses.make_inputs(name, shape, seed=seed)
        ref = _np_losses.LOSSES[name]
        row = f"{name:<22} {_shape_str(shape):>12} "
        try:
            fl_fn = getattr(fastloss, name)

            def call_fl():
                return fl_fn(x, y, **kwargs)

            t0 = time.perf_counter()
            res = call_fl()                      # warm-up: JIT compile or cache load
            first = time.perf_counter() - t0
            ref_loss, ref_grad = ref(x, y)
            loss_err, grad_err, ok = _np_losses.agreement(res.loss, res.grad, ref_loss, ref_grad, rtol=rtol)
            t_fl = _median_seconds(call_fl, repeat)
            t_np = _median_seconds(lambda: ref(x, y), repeat)
        except Exception as exc:  # report and go on with the other losses
            all_ok = False
            print(row + f"ERROR {type(exc).__name__}: {exc}", file=out)
            continue
        all_ok &= ok
        print(row + f"{loss_err:>9.1e} {grad_err:>10.1e} {'ok' if ok else 'FAIL':>5} "
              f"{first:>10.2f} {t_fl * 1e3:>11.2f} {t_np * 1e3:>9.2f} {t_np / t_fl:>7.1f}x", file=out)
    print(f"times: median of {repeat} calls after one warm-up; fastloss allocates a fresh gradient "
          f"each call; tolerance rtol={rtol:g} (grad relative to its largest entry)", file=out)
    print("all checks ok" if all_ok else "SOME CHECKS FAILED", file=out)
    return all_ok


def _cmd_check(args):
    return 0 if run_checks(repeat=args.repeat, seed=args.seed, rtol=args.rtol) else 1


def _add_check_args(parser, suppress=False):
    # The top-level parser holds the real defaults (no subcommand means "check");
    # the subcommand's copies are SUPPRESSed so that they do not overwrite options
    # given before the subcommand name.
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    parser.add_argument("--repeat", type=int, default=d(10), metavar="N",
                        help="timed calls per entry; the median is reported (default 10)")
    parser.add_argument("--seed", type=int, default=d(0), help="seed of the synthetic data (default 0)")
    parser.add_argument("--rtol", type=float, default=d(1e-4),
                        help="relative tolerance of the check (default 1e-4, float32)")


def _build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m fastloss",
        description="fastloss: fused loss + gradient kernels. With no subcommand, "
                    "check fastloss against plain NumPy and time both.",
    )
    _add_check_args(parser)
    parser.set_defaults(func=_cmd_check)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_check = sub.add_parser("check", help="check against NumPy and time both (the default)",
                             description="Check fastloss against plain NumPy on synthetic float32 "
                                         "data and time both.")
    _add_check_args(p_check, suppress=True)
    p_check.set_defaults(func=_cmd_check)
    p_bench = sub.add_parser(
        "bench", help="time every loss beside NumPy, torch, torch.compile, JAX and a copy ceiling",
        description="Time fastloss's fused loss+gradient beside NumPy, PyTorch eager, torch.compile "
                    "and jax.jit(value_and_grad) (those installed; the others are shown as missing) "
                    "and a memory-copy ceiling, on synthetic data, after checking that every "
                    "competitor's loss and gradient agree with fastloss's. Prints one table of "
                    "medians and ratios and writes results.json, results.md and (with matplotlib) "
                    "results.png to --out. Exit status 1 when something disagrees.")
    from . import _bench
    _bench.add_arguments(p_bench)
    p_bench.set_defaults(func=_cmd_bench)
    return parser


def _cmd_bench(args):
    from . import _bench
    argv = getattr(args, "_argv", None)
    command = "python -m fastloss" + ("" if argv is None else "".join(" " + a for a in argv))
    return _bench.cmd_bench(args, command=command)


def main(argv=None):
    """Entry point of ``python -m fastloss`` and of the ``fastloss`` console script; returns the exit status."""
    args = _build_parser().parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)
    if args.func is _cmd_check and args.repeat < 1:
        print("--repeat must be at least 1", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
