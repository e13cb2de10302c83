"""``python -m fastloss``: the command line of ``fastloss.tools.cli`` (check, bench, warmup, demo, eval)."""
import sys

from fastloss.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
