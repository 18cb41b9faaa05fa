"""`python -m puzzlelib.bld` (or `torchrun --nproc_per_node N -m puzzlelib.bld`): stage 02 on its
own, outside the notebooks; the command line is `puzzlelib.bld.stage.main`."""

import sys

from .stage import main

sys.exit(main())
