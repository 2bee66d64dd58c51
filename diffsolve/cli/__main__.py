"""``python -m diffsolve.cli``: the command line, as ``python -m diffsolve``."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
