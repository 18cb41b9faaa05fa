"""Stage 01: what each block variant costs (`stage`: the stage; `timing`, `benches`, `costs`:
measurement and the cost table; `additivity`: whether per-block costs add up).
Nothing is re-exported here: import from the module."""
