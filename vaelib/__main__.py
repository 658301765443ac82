"""``python -m vaelib``: the command line of :mod:`vaelib.cli`."""

import sys

from vaelib.cli import main

if __name__ == "__main__":
    sys.exit(main())
