"""Stage 04 — the search: one attention and one FFN variant per layer, best summed score under budgets.

What it does (DESIGN.md §1.4):
* builds a solver-independent :class:`Problem` from stage 01's cost table and stage 03's scores.
  Per layer there are two one-hot *slots*, attention and FFN; every variant is an option of its
  slot, and a *coupled* pair (stage 02 trained attention+FFN together) is one option that fills
  **both** slots at once, so ``Σ attn + Σ pairs = 1`` and ``Σ ffn + Σ pairs = 1``. An option's
  objective coefficient is its score's *degradation versus the parent* (score − parent's value; the
  parent's own sub-block is 0), so a pair (one score) and two decoupled blocks (two scores) add up
  on the same scale;
* constraints, any combination (:class:`Budget`): generated tokens/s ≥ T or speed-up ≥ S against
  the parent's best throughput, latency ≤ target, memory (weights + batch × context × KV) ≤ target,
  parameters ≤ target. Throughput is linearised: ``batch·gen / Σ time ≥ T ⇔ Σ time ≤ batch·gen / T``
  with ``Σ time = prefill + gen_len × decode step``, exactly as ``CostTable.predict_scenario``.
  Every profiled batch size is solved and the best kept: a smaller KV cache lets a bigger batch fit
  in memory, which is how Puzzle's children gain throughput beyond their per-token cost;
  Any cost-table statistic can also be bounded on both sides (``search_constraints``, e.g.
  ``"1e9<=params<=4e9, kv_heads>=40"``), and the score's direction is explicit when it is not the
  metric's usual one (``search_bigger_is_better``);
* solves the MIP with gurobipy when installed and its licence admits the size, else HiGHS, the
  reason recorded (:func:`solve`); both read the same matrices (:func:`formulate`), every row scaled
  by a power of two to a largest |coefficient| of ~1. Every answer is re-checked in float64 from the
  tables and, by default, against the other solver (``mip.solve_checked``); the check is recorded in
  each child's ``solver["per_batch"]``. The batch size that won last is solved first and its
  objective is the others' cutoff, so a batch that cannot beat it stops at its bound;
* k diverse solutions (each differs from every earlier one in ≥ D layers: ``search_min_diff_layers``,
  or ``ceil(f·L)`` of ``search_min_diff_fraction`` with f·L rounded to 9 decimals first, so 0.28 of
  25 layers is 7; by the cut ``Σ_i same_i ≤ L − D`` with ``same_i ≥ match_attn + match_ffn − 1``,
  one ``same`` per distinct earlier (layer, pair) shared by all cuts: ``mip.formulate``),
  a Pareto sweep over speed-up targets (``searcher.py``: ``Searcher``, ``ChildSpec``), and baselines
  at the same budget (``baselines.py``);
* an infeasible budget raises :class:`InfeasibleBudget` naming the tightest value each constraint
  can reach given the others;
* re-checks every child with *measured* end-to-end timings (``profiling.check_additivity``).

Reads ``01_profiling/costs.csv`` and ``03_scoring`` scores (plus the parent and its held-out tokens
for the block-influence baseline). Writes ``runs/<run>/04_search/``: ``solution.json`` (the chosen
child specs with predicted and measured costs, solver, solve times), ``baselines.json``,
``pareto.csv`` and ``pareto_children.json`` (every child of the sweep: method, target, spec),
``metrics.json``. Leaves out: interactions between blocks (the additive quality
model is stage 03's to check), serving-engine effects beyond what stage 01 measured.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..core.config import RunConfig
from .mip import (
    Budget,
    SearchError,
    TOL,
    build_problem,
)
from ..core.rundir import RunDir
from ..core.atomic import atomic_write_json, atomic_write_text
from .searcher import ChildSpec, Searcher

STAGE = "04_search"


# ------------------------------------------------------------------------------ the stage

def scores_from_table(table, metric: str) -> tuple[dict[tuple[int, str], float], float]:
    """``({(layer, variant): score}, parent's value)`` from stage 03's ``ScoreTable`` (BLD rows)."""
    scores = {(r["layer"], r["variant"]): float(r[metric]) for r in table.rows
              if r["source"] == "bld" and not math.isnan(float(r[metric]))}
    parent_value = {"lm_loss": table.meta.get("parent_lm_loss"), "top1_agreement": 1.0}.get(metric, 0.0)
    if parent_value is None:
        raise SearchError("the score table does not record the parent's lm_loss: rerun 03_scoring")
    return scores, float(parent_value)


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise SearchError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _mip_threads(setting) -> int:
    from ..core.precision import resolve_threads  # imports torch; this module does not need it otherwise

    return resolve_threads(setting)


def searcher_from_config(cfg: RunConfig, costs, table) -> Searcher:
    """The configured :class:`Searcher` for a cost table (stage 01) and a score table (stage 03)."""
    scores, pv = scores_from_table(table, cfg.search_metric)
    direction = {"auto": None, "true": True, "false": False}[cfg.search_bigger_is_better]
    problem = build_problem(costs, scores, cfg.search_metric, pv, ("linear",) if cfg.search_exclude_linear else (),
                            direction)
    batches = [int(b) for b in _floats(cfg.search_batch_sizes, "search_batch_sizes")] or None
    parent_params = problem.total(problem.parent, "params", problem.batch_sizes[0])
    return Searcher(problem, Budget.from_config(cfg, parent_params), batches, cfg.search_solver,
                    cfg.search_time_limit_s, cfg.search_mip_gap, _mip_threads(cfg.threads), cfg.search_cross_check)


def measure(s: Searcher, specs: Sequence[ChildSpec], model, costs, cfg: RunConfig, progress: bool = True) -> None:
    """Re-check ``specs`` with *measured* end-to-end timings and memory (stage 01's method,
    interleaved with the parent), filling ``spec.measured`` and the checks' ``measured`` fields."""
    import torch

    from ..profiling.additivity import check_additivity

    # Stage 01's clock: "cpu" times one thread's CPU time (immune to other processes' load).
    threads = torch.get_num_threads()
    if cfg.profile_clock == "cpu":
        torch.set_num_threads(1)
    try:
        rows, _ = check_additivity(model, costs, [sp_.choices for sp_ in specs], cfg.profile_warmup,
                                   cfg.profile_repeats, cfg.seed, progress, clock=cfg.profile_clock)
    finally:
        torch.set_num_threads(threads)
    at = {(r["child"], r["batch"]): r for r in rows}

    def gen_ms(r: dict) -> float:
        return r["meas_prefill_ms"] + s.problem.scenarios[r["batch"]][1] * r["meas_decode_ms"]

    ref = at[(0, s.ref_batch)]
    ref_tps = s.ref_batch * s.problem.scenarios[s.ref_batch][1] / (gen_ms(ref) / 1e3)
    for k, spec in enumerate(specs, start=1):
        r, b = at[(k, spec.batch)], spec.batch
        t = gen_ms(r)
        tps = b * s.problem.scenarios[b][1] / (t / 1e3)
        spec.measured = {"generation_ms": t, "tokens_per_s": tps, "speedup": tps / ref_tps,
                         "memory_bytes": r["meas_memory_bytes"], "parent_tokens_per_s": ref_tps}
        for name, c in spec.checks.items():
            # Time budgets compare measured time with the limit re-derived from the *measured* parent.
            limit = c["limit"] * (s.ref_tps / ref_tps if name == "speedup" else 1.0) if c["limit"] is not None else None
            got = {"time": t, "memory": r["meas_memory_bytes"]}.get(c["what"], c["predicted"])
            ok = ((limit is None or got <= limit * (1 + TOL))
                  and got >= c.get("lower", -math.inf) - TOL * abs(c.get("lower", 0.0)))
            c.update(measured=got, measured_limit=limit, measured_ok=ok)


@dataclass
class SearchResult:
    """What notebook 04 shows and stages 05/06 read."""

    dir: Path
    solutions: list[ChildSpec]
    baselines: dict[str, ChildSpec | None]
    pareto: list[dict]
    info: dict            # solution.json without the solutions: budget, reference, solver, notes
    metrics: dict
    reused: bool

    @property
    def best(self) -> ChildSpec:
        return self.solutions[0]

    @property
    def children(self) -> list[ChildSpec]:
        """The MIP solutions first, then every baseline that met the budget."""
        return self.solutions + [b for b in self.baselines.values() if b is not None]


def _load(rd: RunDir, reused: bool) -> SearchResult:
    from ..core.rundir import read_csv_rows

    d = rd.stage_dir(STAGE)
    sol = json.loads((d / "solution.json").read_text())
    base = json.loads((d / "baselines.json").read_text())
    return SearchResult(d, [ChildSpec.from_dict(x) for x in sol.pop("solutions")],
                        {k: ChildSpec.from_dict(v["spec"]) if v["spec"] else None for k, v in base.items()},
                        read_csv_rows(d / "pareto.csv"), sol, json.loads((d / "metrics.json").read_text()), reused)


def run(cfg: RunConfig, progress: bool = True) -> SearchResult:
    """Run (or reuse) stage 04: solve, diversify, sweep, baselines, measured re-check, write."""
    rd = RunDir(cfg)
    if not rd.should_run(STAGE):
        rd.note_reused(STAGE)
        return _load(rd, reused=True)
    import torch

    from . import baselines

    from ..profiling import stage as profiling
    from ..profiling import additivity
    from ..profiling import timing

    from ..scoring import stage as scoring
    from ..parent import stage as parent_stage
    from ..core.precision import apply_threads

    costs = profiling.load_costs(cfg)   # StageNotReady naming notebook 01 if missing or stale
    table = scoring.load_scores(cfg)    # ... and notebook 03
    s = searcher_from_config(cfg, costs, table)
    speedups = _floats(cfg.search_pareto_speedups, "search_pareto_speedups")
    t0 = time.perf_counter()
    # Solved before the stage opens: an infeasible budget raises here and leaves no artifact.
    solutions, notes = s.diverse(cfg.search_num_solutions, cfg.search_min_diff_fraction, progress,
                                 cfg.search_min_diff_layers)
    search_seconds = time.perf_counter() - t0
    apply_threads(cfg.threads)
    with rd.stage(STAGE) as st:
        pres = parent_stage.load(cfg)
        model = pres.load_model(dtype=getattr(torch, cfg.dtype)).to(timing.resolve_device(cfg.device)).eval()
        influence = baselines.block_influence(model, pres.dir / "tokens", cfg.seq_len, cfg.search_influence_tokens,
                                                progress=progress)
        base, base_notes = baselines.all_baselines(s, influence, cfg.seed, cfg.search_random_tries)
        kept: list[tuple[float, ChildSpec]] = []
        pareto = s.pareto(speedups, progress, kept) + baselines.sweep(s, influence, speedups, kept)
        if cfg.search_measure:
            measure(s, solutions + [b for b in base.values() if b], model, costs, cfg, progress)
        info = {"metric": cfg.search_metric, "budget": asdict(s.budget),
                "reference": {"batch": s.ref_batch, "tokens_per_s": s.ref_tps},
                "batch_sizes": s.batches, "parent": [list(p) for p in s.problem.parent],
                "solver": {"requested": cfg.search_solver, "used": sorted({x["solver"] for x in s.log}),
                           "fallback_reasons": sorted({x["fallback_reason"] for x in s.log if x["fallback_reason"]}),
                           # solves of a model over gurobipy's licence on its exact reduction (mip._reduced)
                           "reduced_solves": sum(1 for x in s.log if x["reduced"] and x["reduced"].get("why"))},
                "problem": {"layers": s.problem.num_layers, "options": len(s.problem.columns),
                            "options_per_layer": [{k: [o.name for o in v] for k, v in lay.items()}
                                                  for lay in s.problem.layers]},
                "block_influence": influence, "notes": s.problem.notes + notes + base_notes}
        atomic_write_json(st.path("solution.json"), {**info, "solutions": [x.to_dict() for x in solutions]})
        atomic_write_json(st.path("baselines.json"), {k: {"spec": v.to_dict() if v else None} for k, v in base.items()})
        atomic_write_text(st.path("pareto.csv"), additivity.rows_to_csv(pareto))
        # Every child of the sweep, for stage 06's measured Pareto (eval_pareto).
        atomic_write_json(st.path("pareto_children.json"),
                          [{"method": sp_.method, "target_speedup": t, "spec": sp_.to_dict()} for t, sp_ in kept])
        metrics = summarize(s, solutions, base, search_seconds)
        atomic_write_json(st.path("metrics.json"), metrics)
        st.metrics.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
    return _load(rd, reused=False)


def summarize(s: Searcher, solutions: list[ChildSpec], base: dict, search_seconds: float) -> dict:
    best = solutions[0]
    solves = [x for x in s.log if x["purpose"].startswith("solution")]
    out = {"metric": s.problem.metric, "layers": s.problem.num_layers, "options": len(s.problem.columns),
           "solutions": len(solutions), "batch": best.batch, "score": best.predicted["score"],
           "predicted_speedup": best.predicted["speedup"], "measured_speedup": best.measured.get("speedup"),
           "solver": best.solver["solver"], "fallback_reason": best.solver["fallback_reason"] or "",
           "search_seconds": round(search_seconds, 3), "solves": len(s.log),
           "mean_solve_seconds": round(float(np.mean([x["seconds"] for x in solves])), 5)}
    for k, b in base.items():
        out[f"{k}_score"] = b.predicted["score"] if b else None
        out[f"{k}_predicted_speedup"] = b.predicted["speedup"] if b else None
        out[f"{k}_measured_speedup"] = b.measured.get("speedup") if b else None
    return out


def children_table(result: SearchResult) -> list[dict]:
    """One row per child for the notebook: predicted vs measured speed-up and memory, budget checks."""
    rows = []
    for c in result.children:
        m = c.measured
        rows.append({"child": c.name, "method": c.method, "batch": c.batch,
                     f"Σ {result.info['metric']}": c.predicted["score"],
                     "speed-up pred": c.predicted["speedup"], "speed-up meas": m.get("speedup", math.nan),
                     "MiB pred": c.predicted["memory_bytes"] / 2**20,
                     "MiB meas": m.get("memory_bytes", math.nan) / 2**20,
                     "budget (pred / meas)": " ".join(f"{k}:{'ok' if v['ok'] else 'NO'}/"
                                                      f"{'ok' if v.get('measured_ok', True) else 'NO'}"
                                                      for k, v in c.checks.items()),
                     "layers": c.short().replace(" | ", " · ")})  # "|" would split a Markdown cell
    return rows


def load(cfg: RunConfig) -> SearchResult:
    """Stage 04's result for later stages; refuses a missing, unfinished or stale search."""
    rd = RunDir(cfg, create=False)
    rd.require(STAGE)
    return _load(rd, reused=True)
