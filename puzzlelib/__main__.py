"""`python -m puzzlelib ...`: the command line (run / show-config / status); see runner.py."""

import sys

from .runner import main

if __name__ == "__main__":
    sys.exit(main())
