"""Stage 00: the parent model every child is cut from (`stage`: train or load it; `source`:
where a named or GGUF parent comes from). Nothing is re-exported here: import from the module."""
