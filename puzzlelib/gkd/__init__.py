"""Stage 05: global knowledge distillation of the chosen children (`stage`: the stage and its
`python -m puzzlelib.gkd` command line). Nothing is re-exported here: import from the module."""
