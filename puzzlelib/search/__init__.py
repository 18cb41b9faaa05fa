"""Stage 04: the architecture search (`stage`: the stage; `searcher`: `Searcher` and `ChildSpec`;
`mip`: the MIP and its solvers; `baselines`: the comparison children; `plots`: its figures).
Nothing is re-exported here: import from the module."""
