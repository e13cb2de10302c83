"""``python -m fastloss COMMAND`` and the ``fastloss`` console script.

Each command lives in its own module, which provides ``HELP`` (one line),
``DESCRIPTION``, ``add_arguments(parser)`` and ``run(args) -> exit status``;
heavy imports (torch, jax, matplotlib, dask) stay inside ``run``.  With no command,
or with only options, the command is ``check``.
"""
import argparse
import importlib
import sys

COMMANDS = {
    "check": "fastloss.tools.check",    # value and gradient of every loss against torch, JAX or NumPy
    "bench": "fastloss.tools.bench",    # fastloss beside NumPy, torch, torch.compile, JAX and a copy
    "warmup": "fastloss.tools.warmup",  # compile every kernel ahead of time, into the disk cache
    "demo": "fastloss.tools.demo",      # a NumPy MLP trained with fastloss's gradients (center loss)
    "eval": "fastloss.tools.eval",      # one loss over files larger than memory, in chunks, on Dask
}
DEFAULT_COMMAND = "check"


def _build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m fastloss",
        description=f"fastloss: fused loss + gradient kernels. With no command, run {DEFAULT_COMMAND!r}.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv=None):
    """Entry point of ``python -m fastloss`` and of the ``fastloss`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = [DEFAULT_COMMAND, *argv]
    args = _build_parser().parse_args(argv)
    args.command_line = " ".join(["python -m fastloss", *argv])
    return args.run(args)
