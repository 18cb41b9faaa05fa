"""Stage 02: blockwise local distillation (`stage`: the stage and its `python -m puzzlelib.bld`
command line; `plan`: which (layer, variant) jobs; `train`: one job; `library`: the block library
later stages load). Nothing is re-exported here: import from the module."""
