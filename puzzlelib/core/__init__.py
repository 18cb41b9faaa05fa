"""The core layer: what every stage shares and no stage owns (docs/modules.md has the map).

`config` (RunConfig, stage tags, hashing) with `presets`, `validation` and `limits`; `rundir` (run
directory, stage manifests, freshness, environment capture) and `atomic` (atomic writes);
`precision` and `distributed` (machine knobs, torchrun ranks); `data` (corpus, tokenizer, packed
batches); `model`, `blocks`, `configuration_decilm`, `modeling_decilm`, `export` (the model and
its checkpoint format); `eval_tasks` (the local lm-eval tasks and settings stages 05 and 06
share); `train` (optimiser, LR schedule, resume); `figures` (what the stages' figures share).
Nothing here imports a stage package. Nothing is re-exported here: import from the module.
"""
