"""The core layer: what every stage shares and no stage owns.

`config` (RunConfig, stage tags, hashing) with `presets` and `validation`; `rundir` (run directory,
stage manifests, atomic writes, environment capture); `progress`, `limits`, `precision`,
`distributed` (machine knobs); `data` (corpus, tokenizer, packed batches); `model`, `blocks`,
`configuration_decilm`, `modeling_decilm`, `export` (the model and its checkpoint format).
Nothing here imports a stage package. Nothing is re-exported here: import from the module.
"""
