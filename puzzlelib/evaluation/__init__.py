"""Stage 06: evaluation (`stage`: the stage; `throughput`, `uncertainty`: what is measured;
`report`: the report files; the tasks and `EvaluationError` are in `core/eval_tasks.py`).
Nothing is re-exported here: import from the module."""
