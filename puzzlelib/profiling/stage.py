"""Stage 01 — profiling: what every sub-block variant costs on the device that will serve the child.

Puzzle is hardware-aware: the search (stage 04) picks one attention and one FFN variant per layer
under budgets of memory, latency and throughput, so it needs each variant's *measured* cost on the
target device. This module measures it and checks the assumption the search rests on: that a
child's cost is the sum of its sub-blocks' costs plus a fixed part.

What it does:
* lists the block library for the parent (``blocks.list_library`` with its defaults: every GQA
  KV-head count up to the parent's, the paper's FFN widths, linear and no-op replacements) and
  groups layers whose variants have identical shapes (every layer of a Llama parent): only one
  representative layer per group is timed, and its row is copied to the others
  (``measured_on_layer`` says which layer was timed);
* for every (layer, variant): parameters, weight bytes at the run's dtype, KV-cache bytes per
  token, and the time of the sub-block *in isolation* — ``layer.attn_residual`` /
  ``layer.ffn_residual`` (sub-block + pre-norm + residual add, the code the full model runs) of a
  one-layer model holding just that variant (weights initialised from the parent), on random
  hidden states — for **prefill** (batch × prompt tokens, causal, writing a fresh KV cache) and
  for one **decode** step (batch × 1 token against a KV cache already holding
  ``prompt_len + gen_len // 2`` tokens: attention cost grows linearly with the context, so the
  mid-generation step is the average step of the whole generation);
* the **fixed part** (embeddings, rotary tables, final norm, LM head and the per-layer Python
  skeleton) is measured as a whole model: the child whose every sub-block is a no-op. Its time,
  minus the (tiny) isolated no-op times, is the fixed row, so the decomposition is exact for that
  child by construction;
* timing: ``torch.inference_mode``, warm-up calls, then ``repeats`` rounds in which every bench of
  a (batch, phase) runs once in a freshly shuffled order (*interleaved*: a slow spell of a noisy
  machine hits every variant alike instead of whichever happened to run then), ``cuda.synchronize``
  around each sample on GPU; the median and the p10 / p90 of the samples are recorded. The clock
  is ``profile_clock``: "wall" (elapsed time) or "cpu" (one thread's CPU time, which other
  processes on a shared machine cannot inflate);
* decode is memory-bound, so its time depends on whether the weights are still in the CPU/GPU
  cache. Inside a model the other layers evict them between two uses; alone, a sub-block would
  find them hot. So each timed decode call is preceded by untimed calls of copies of the same
  sub-block on other weights, touching as many bytes as one decode step of the parent (capped at
  twice the last-level cache): the weights are reused at the distance they have in the parent,
  while the code path stays as hot as in a forward pass (which a cache flush would not give);
* **additivity check**: random children drawn from the library (seeded) plus the parent, built
  with ``blocks.build_child``, run end to end (prefill; decode step with a real KV cache; a real
  cache filled to prompt + generation length for memory) interleaved with each other; predicted
  (sum of the table) vs measured, as absolute error and as the error of the speed-up versus the
  parent (the quantity the search's throughput constraint actually uses).

* **importing a table** (``profile_costs_from``): instead of measuring, take the cost table of
  an earlier run (checked against this parent, library, scenarios, dtype and statistic, against
  that run's manifest when it has one, and cell by cell for finite, non-negative costs; its path
  and sha256 are recorded). Timings differ between two runs, so two measured tables can make the
  search pick different children; runs sharing one table (a rerun, every laptop of a workshop,
  runs profiled once on the target GPU) find the same children. The additivity check still
  measures here.

Reads: ``runs/<run>/00_parent/model`` via ``parent.load(cfg)``. Writes ``runs/<run>/01_profiling/``:
``costs.csv`` (the cost table the search reads, one row per (layer, variant) plus the fixed row,
layer -1), ``additivity.csv`` (one row per (child, batch size)), ``samples.json`` (every raw timing
sample), ``scenarios.json`` (scenarios, device, threads, dtype, clock, timing method, machine load)
and ``metrics.json`` (the headline errors). Stage 04 reads the table through :func:`load_costs` and
re-measures its chosen children with :func:`measure_models`. Leaves out: serving engines
(vLLM/TensorRT-LLM kernels would give other numbers: profile on the engine you deploy with),
``torch.compile`` / CUDA graphs, peak activation memory (only weights + KV cache are modelled, as
in the paper), energy, and variants outside ``blocks.list_library``'s defaults
(``profile_model(..., library=...)`` measures others).

Where the code lives (each module's docstring says more): ``timing`` (``Bench`` / ``Timing``,
clocks, the interleaved timing loop, cache rotation), ``costs`` (scenarios and the ``CostTable``),
``benches`` (one-layer sub-block models, their benches, ``profile_model``), ``additivity``
(end-to-end checks of the table, ``cache_ablation``). This module keeps the stage: importing a
table (``profile_costs_from``), ``run`` / ``load`` and the notes of ``diagnose``; import
the other names from the module that defines them (docs/modules.md).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..parent import stage as parent_stage
from .additivity import check_additivity, random_children, rows_to_csv, summarize_additivity
from .benches import (
    fixed_static_costs,
    sub_block_static_costs,
    fixed_model,
    layer_groups,
    library_for,
    profile_model,
    sub_block_model,
)
from ..core.blocks import Variant
from ..core.config import RunConfig, resolve_path
from .costs import (
    FIXED,
    PHASES,
    STATIC_METRICS,
    SUB_BLOCKS,
    CostTable,
    Scenario,
    cost_column,
    scenarios_from_config,
)
from ..core.modeling_decilm import PuzzleForCausalLM
from ..core.precision import resolve_threads
from ..core.rundir import RunDir, cached_sha256, file_sha256, read_csv_rows
from ..core.atomic import atomic_write_json
from .timing import CUDA_MIN_SAMPLE_MS, ProfilingError, check_clock, resolve_device

STAGE = "01_profiling"


# ------------------------------------------------------------------------------ importing a table

def costs_source(spec: str | Path) -> Path:
    """The ``costs.csv`` that ``profile_costs_from`` names: the file itself, a stage-01 folder
    holding it, or a run folder holding ``01_profiling/costs.csv``. Relative paths are resolved
    against the project folder (config.project_root)."""
    p = resolve_path(spec)
    for cand in (p, p / "costs.csv", p / STAGE / "costs.csv"):
        if cand.is_file():
            if not (cand.parent / "scenarios.json").is_file():
                raise ProfilingError(
                    f"profile_costs_from={str(spec)!r}: {cand} has no scenarios.json next to it (the "
                    "scenarios, dtype and statistic the table was measured with); point it at a "
                    "complete 01_profiling/ folder of an earlier run")
            return cand.absolute()
    raise ProfilingError(f"profile_costs_from={str(spec)!r}: no costs.csv at {p.absolute()}, in it, or in "
                         f"its {STAGE}/ folder; give an earlier run's costs.csv, its 01_profiling/ folder "
                         "or its run folder (or '' to measure here)")


def _check_source_manifest(path: Path, where: str) -> None:
    """When the imported table sits in an earlier run's 01_profiling/ folder, its manifest
    recorded the sha256 of costs.csv and scenarios.json: refuse a file changed since. (A bare
    costs.csv + scenarios.json pair has no manifest; its cells are still checked by from_csv.)"""
    mpath = path.parent / "manifest.json"
    if not mpath.is_file():
        return
    try:
        recorded = {a["path"]: a.get("sha256") for a in json.loads(mpath.read_text()).get(
            "artifacts", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ProfilingError(f"{where}: {mpath} is not a readable stage manifest; point "
                             "profile_costs_from at a complete 01_profiling/ folder, or set it "
                             "to '' to measure here") from None
    for name in (path.name, "scenarios.json"):
        if recorded.get(name) and cached_sha256(path.parent / name) != recorded[name]:
            raise ProfilingError(
                f"{where}: {path.parent / name} changed after that run's stage {STAGE} wrote it "
                f"(its sha256 differs from {mpath}); rerun stage {STAGE} of that run, import "
                "another table, or set profile_costs_from='' to measure here")


def import_costs(model: PuzzleForCausalLM, scenarios: Sequence[Scenario], spec: str | Path,
                 statistic: str, library: dict[str, list[Variant]] | None = None
                 ) -> tuple[CostTable, dict, dict[str, list[float]], dict]:
    """Read the cost table an earlier run measured, after checking it describes *this* parent,
    library and scenarios (a table for another model would give the search wrong costs silently).

    Returns (table, that run's scenarios.json, its raw sub-block samples or {} when it has no
    samples.json, provenance ``{"path", "sha256"}``). Raises :class:`ProfilingError` naming the
    first thing that differs. Timings are taken as they are (only checked to be finite and >= 0,
    and, when the table sits in a run's 01_profiling/ folder, to match that stage's manifest): the
    point of importing is that every run using one table finds the same children.
    """
    path = costs_source(spec)
    where = f"profile_costs_from={str(spec)!r} ({path})"
    _check_source_manifest(path, where)
    sc = json.loads((path.parent / "scenarios.json").read_text())
    theirs = [Scenario(**x) for x in sc.get("scenarios", [])]
    if [(s.batch, s.prompt_len, s.gen_len) for s in theirs] != [
            (s.batch, s.prompt_len, s.gen_len) for s in scenarios]:
        raise ProfilingError(
            f"{where} was measured for scenarios {[vars(s) for s in theirs]}, this run asks for "
            f"{[vars(s) for s in scenarios]}: set profile_batch_sizes / profile_prompt_len / "
            "profile_gen_len to that run's values, or profile_costs_from='' to measure")
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    for name, ours, field_name in (("dtype", dtype, "dtype"), ("statistic", statistic, "profile_statistic")):
        if sc.get(name) != ours:
            raise ProfilingError(f"{where} has {name}={sc.get(name)!r}, this run {ours!r}: set "
                                 f"{field_name}={sc.get(name)!r}, or profile_costs_from='' to measure")
    table = CostTable.from_csv(path, theirs, sc)
    cfg = model.config
    library = library or library_for(cfg)
    expected = {(-1, FIXED)} | {(i, v.name) for i in range(cfg.num_hidden_layers)
                                for kind in SUB_BLOCKS for v in library[kind]}
    have = {(r["layer"], r["variant"]) for r in table.rows}
    if have != expected:
        missing, extra = sorted(expected - have), sorted(have - expected)
        raise ProfilingError(f"{where} covers other blocks than this parent's library: missing "
                             f"{missing[:5]}{'...' if len(missing) > 5 else ''}, extra "
                             f"{extra[:5]}{'...' if len(extra) > 5 else ''}; it was measured for "
                             "another parent or library: profile_costs_from='' to measure")
    # Shapes decide parameters and bytes: equal static costs on every representative layer mean
    # the same block shapes (a parent with another width or head count differs here).
    for rep in layer_groups(cfg, library):
        for kind in SUB_BLOCKS:
            for v in library[kind]:
                got = sub_block_static_costs(sub_block_model(model, rep, v), v)
                row = table.row(rep, v.name)
                bad = {k: (row[k], got[k]) for k in STATIC_METRICS if row[k] != got[k]}
                if bad:
                    diffs = ", ".join(f"{k}={a} (this parent: {b})" for k, (a, b) in bad.items())
                    raise ProfilingError(
                        f"{where}: layer {rep} {v.name} has {diffs}: "
                        "the table was measured for another parent; profile_costs_from='' to measure")
    fixed = fixed_static_costs(fixed_model(model))
    bad = {k: (table.row(-1, FIXED)[k], fixed[k]) for k in fixed if table.row(-1, FIXED)[k] != fixed[k]}
    if bad:
        raise ProfilingError(f"{where}: the fixed part (embeddings, head) differs: {bad} (table, this "
                             "parent): another parent or vocabulary; profile_costs_from='' to measure")
    samples_path = path.parent / "samples.json"
    subs = json.loads(samples_path.read_text()).get("sub_blocks", {}) if samples_path.is_file() else {}
    return table, sc, subs, {"path": str(path), "sha256": file_sha256(path)}


# ------------------------------------------------------------------------------ the stage

@dataclass
class ProfilingResult:
    """What notebook 01 shows and stage 04 reads."""

    dir: Path
    costs: CostTable
    additivity: list[dict]
    metrics: dict
    scenarios: dict
    reused: bool
    samples: dict = field(default_factory=dict, repr=False)

    def child_specs(self) -> list[list[tuple[str, str]]]:
        """The additivity check's models as child specs (index 0 is the parent)."""
        b = self.costs.batch_sizes[0]
        return [[tuple(p) for p in json.loads(r["choices"])] for r in self.additivity
                if r["batch"] == b]

    def summary(self, rows: list[dict] | None = None) -> dict[str, float]:
        return summarize_additivity(self.additivity if rows is None else rows)


def _load_result(rd: RunDir, reused: bool) -> ProfilingResult:
    d = rd.stage_dir(STAGE)
    sc = json.loads((d / "scenarios.json").read_text())
    scenarios = [Scenario(**x) for x in sc["scenarios"]]
    table = CostTable.from_csv(d / "costs.csv", scenarios, sc)
    return ProfilingResult(d, table, read_csv_rows(d / "additivity.csv"),
                           json.loads((d / "metrics.json").read_text()), sc, reused,
                           json.loads((d / "samples.json").read_text()))


def stage_threads(cfg: RunConfig) -> int:
    """Intra-op threads for the measurement: the config's, or 1 for the CPU clock."""
    if cfg.profile_clock == "cpu":
        if cfg.threads not in (0, 1, "auto"):
            raise ProfilingError(
                f"profile_clock='cpu' measures one thread's CPU time but threads={cfg.threads}: "
                "set threads=1 (or 0 or auto), or profile_clock='wall' to time all threads")
        return 1
    return resolve_threads(cfg.threads) or torch.get_num_threads()


def run(cfg: RunConfig, progress: bool = True) -> ProfilingResult:
    """Run (or reuse) stage 01 for ``cfg``: the cost table and its additivity check."""
    rd = RunDir(cfg)
    if not rd.should_run(STAGE):
        rd.note_reused(STAGE)
        return _load_result(rd, reused=True)
    # Every refusal comes before the stage folder is touched: bad input leaves no partial artifact.
    device = resolve_device(cfg.device)
    threads = stage_threads(cfg)
    check_clock(cfg.profile_clock, device, threads)
    parent_res = parent_stage.load(cfg)  # refuses a missing or stale parent, naming notebook 00
    statistic, clock = cfg.profile_statistic, cfg.profile_clock
    model = parent_res.load_model(dtype=getattr(torch, cfg.dtype)).to(device).eval()
    scenarios = scenarios_from_config(cfg, model.config.max_position_embeddings)
    # An imported table is checked here too, before the stage folder exists.
    imported = (import_costs(model, scenarios, cfg.profile_costs_from, statistic)
                if cfg.profile_costs_from else None)
    with measurement_threads(cfg):
        return _run_stage(cfg, rd, model, scenarios, device, statistic, clock, progress, imported)


@contextmanager
def measurement_threads(cfg: RunConfig) -> Iterator[int]:
    """Set the intra-op threads stage 01 measures with (1 for the CPU clock), and restore the
    previous count afterwards, so later notebook cells keep theirs. Use it to re-measure (e.g.
    an ablation) under the same conditions as the stage."""
    threads = stage_threads(cfg)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(old)


def _run_stage(cfg: RunConfig, rd: RunDir, model: PuzzleForCausalLM, scenarios: list[Scenario],
               device: torch.device, statistic: str, clock: str, progress: bool,
               imported: tuple | None = None) -> ProfilingResult:
    torch.manual_seed(cfg.seed)
    with rd.stage(STAGE) as st:
        load_before = _load_average()
        t0 = time.perf_counter()
        sub_samples: dict[str, list[float]] = {}
        source: dict | None = None
        if imported is None:
            table = profile_model(model, scenarios, cfg.profile_warmup, cfg.profile_repeats,
                                  cfg.seed, progress, sub_samples, statistic, clock)
        else:  # the earlier run's table and samples; only the additivity check is measured here
            table, _, subs, source = imported
            sub_samples.update(subs)
        t_table = time.perf_counter() - t0
        children = random_children(model.config, cfg.profile_num_random_children, cfg.seed)
        child_samples: dict[str, list[float]] = {}
        rows, memory = check_additivity(model, table, children, cfg.profile_warmup,
                                        cfg.profile_repeats, cfg.seed, progress, child_samples,
                                        statistic, clock)
        summary = summarize_additivity(rows)
        dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
        load_after = _load_average()
        sc = {**table.meta, "device_name": dev_name,
              "scenarios": [{"batch": s.batch, "prompt_len": s.prompt_len, "gen_len": s.gen_len}
                            for s in scenarios],
              "decode_context": {s.key: s.decode_context for s in scenarios},
              "timing": (f"{statistic} of {cfg.profile_repeats} interleaved samples after "
                         f"{cfg.profile_warmup} warm-up calls, {clock} clock; one call per sample "
                         "on CPU, a loop "
                         f"of >= {CUDA_MIN_SAMPLE_MS} ms per sample on CUDA, synchronised; spread "
                         "= p10/p90; torch.inference_mode; decode sub-blocks rotate through "
                         "copies so their weights are reused at the parent's distance"),
              "fixed_part": "all-no-op child minus the isolated no-op sub-block times",
              "load_average_before": load_before, "load_average_after": load_after,
              "cpu_count": _cpu_count()}
        if source is not None:
            # The table's own record (device, threads, load while measuring) is the earlier run's;
            # what was measured here is the additivity check only.
            sc = {**imported[1], "imported_from": source,
                  "additivity_measured_on": {k: sc[k] for k in (
                      "device_name", "load_average_before", "load_average_after", "cpu_count")}}
        table.to_csv(st.path("costs.csv"))
        rows_to_csv(rows, st.path("additivity.csv"))
        atomic_write_json(st.path("scenarios.json"), sc)
        atomic_write_json(st.path("samples.json"), {"sub_blocks": sub_samples,
                                                    "children": child_samples, "memory": memory})
        parent_rows = [r for r in rows if r["is_parent"]]
        per_b = lambda key: {f"b{r['batch']}": round(r[key], 4) for r in parent_rows}  # noqa: E731
        metrics = {
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()},
            "statistic": statistic, "clock": clock, "device": str(device),
            "device_name": dev_name,
            "dtype": cfg.dtype, "torch_threads": torch.get_num_threads(),
            "load_average_before": load_before, "load_average_after": load_after,
            "n_variants_per_layer": {k: len(table.variants(0, k)) for k in SUB_BLOCKS},
            "n_layers_timed": len(table.meta["representative_layers"]),
            "parent_pred_prefill_ms": per_b("pred_prefill_ms"),
            "parent_meas_prefill_ms": per_b("meas_prefill_ms"),
            "parent_pred_decode_ms": per_b("pred_decode_ms"),
            "parent_meas_decode_ms": per_b("meas_decode_ms"),
            "parent_tokens_per_s": {s.key: round(table.predict_scenario(
                table.parent_choices(), s.batch)["tokens_per_s"], 1) for s in scenarios},
            "table_seconds": round(t_table, 1),
            "additivity_seconds": round(time.perf_counter() - t0 - t_table, 1),
            "costs_imported_from": source["path"] if source else None,
            "costs_sha256": source["sha256"] if source else None,
        }
        atomic_write_json(st.path("metrics.json"), metrics)
        st.metrics.update({k: v for k, v in metrics.items() if not isinstance(v, dict)})
    return _load_result(rd, reused=False)


def diagnose(result: ProfilingResult, target: float = 0.10) -> list[str]:
    """Plain-language notes on what limits the additivity check of ``result`` (for the notebook):
    machine load, the clock, timing spread, and whether the errors are noise or a bias."""
    m, sc = result.metrics, result.scenarios
    notes = []
    cores, load = sc.get("cpu_count"), max(filter(None, (sc.get("load_average_before"),
                                                          sc.get("load_average_after"))), default=None)
    if load is not None and cores:
        busy = load > cores
        notes.append(f"load average {load:.1f} on {cores} cores: "
                     + ("the machine was oversubscribed while measuring; "
                        + ("the CPU clock keeps other processes' time out of the samples"
                           if m.get("clock") == "cpu" else
                           "wall-clock samples include time other processes held the cores "
                           "(try profile_clock='cpu' with threads=1)")
                        if busy else "the machine was not oversubscribed"))
    spreads = [r[cost_column(f"{ph}_ms_p90", s)] / r[cost_column(f"{ph}_ms", s)] for r in result.costs.rows
               for s in result.costs.scenarios for ph in PHASES
               if r["op"] != "noop" and r[cost_column(f"{ph}_ms", s)] > 0]
    if spreads:
        notes.append(f"timing spread: the p90 of a sub-block is typically {np.median(spreads):.2f}x "
                     "its median (1.0 = perfectly repeatable)")
    for ph in PHASES:
        med, signed = m.get(f"{ph}_median_rel_err"), m.get(f"{ph}_median_signed_err")
        if med is None or signed is None:
            continue
        verdict = "within" if med <= target else "above"
        kind = ("a bias: the sum of the parts misses time the whole model spends (per-call "
                "overhead or cache effects between layers)" if signed < -med / 2 else
                "a bias: the parts cost more alone than inside the model" if signed > med / 2
                else "scatter around zero: noise rather than a missing cost")
        notes.append(f"{ph}: median error {100 * med:.1f} % ({verdict} the {100 * target:.0f} % "
                     f"target), median signed error {100 * signed:+.1f} %: {kind}")
    return notes


def _load_average() -> float | None:
    """1-minute load average: more runnable threads than cores means timings are contended."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _cpu_count() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _cpu_name() -> str:
    from ..core.rundir import cpu_model  # the same string environment.json records

    return cpu_model()


def load(cfg: RunConfig) -> ProfilingResult:
    """Stage 01's result for later stages; refuses a missing, unfinished or stale profile."""
    rd = RunDir(cfg, create=False)
    rd.require(STAGE)
    return _load_result(rd, reused=True)


def load_costs(cfg: RunConfig) -> CostTable:
    """The cost table of a finished, fresh stage 01 (what stage 04 calls)."""
    return load(cfg).costs
