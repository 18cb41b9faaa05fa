"""`python -m puzzlelib.gkd` (or `torchrun --nproc_per_node N -m puzzlelib.gkd`): stage 05 on its
own, outside the notebooks; the command line is `puzzlelib.gkd.stage.main`."""

import sys

from .stage import main

sys.exit(main())
