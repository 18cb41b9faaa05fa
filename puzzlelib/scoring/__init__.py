"""Stage 03: how good each block variant is (`stage`: the stage; `score_table`, `prefix_scoring`,
`interactions`: the scores). Nothing is re-exported here: import from the module."""
