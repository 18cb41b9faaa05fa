"""Stage 06: evaluation (`stage`: the stage; `tasks`, `throughput`, `uncertainty`: what is
measured; `report`: the report files; `errors`: the error every part raises).
Nothing is re-exported here: import from the module."""
