"""Stage 04: the architecture search (`stage`: the stage; `mip`: the MIP and its solvers;
`baselines`: the comparison children). Nothing is re-exported here: import from the module."""
