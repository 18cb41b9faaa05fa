"""puzzlelib: a literate, runnable reimplementation of NVIDIA's Puzzle NAS (arXiv 2411.19146).

The package backs the ordered notebooks in `notebooks/` (00_parent ... 06_evaluation); papermill
executes them headlessly with `python -m puzzlelib run --preset NAME` to regenerate `reports/`.

Modules (one concern each): `config` (RunConfig + presets), `rundir` (run directory, stage
manifests, atomic writes), `runner` (the papermill pipeline), and one module per stage.

Nothing is imported here on purpose: `import puzzlelib` must stay instant and must not pull in
torch, so the CLI can validate a config and fail fast before any heavy import.
"""

__version__ = "0.1.0"
