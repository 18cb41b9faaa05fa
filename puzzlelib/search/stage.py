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
  a Pareto sweep over speed-up targets, and baselines at the same budget (``baselines.py``);
* an infeasible budget raises :class:`InfeasibleBudget` naming the tightest value each constraint
  can reach given the others;
* re-checks every child with *measured* end-to-end timings (``profiling.check_additivity``).

Reads ``01_profiling/costs.csv`` and ``03_scoring`` scores (plus the parent and its held-out tokens
for the block-influence baseline). Writes ``runs/<run>/04_search/``: ``solution.json`` (the chosen
child specs with predicted and measured costs, solver, solve times), ``baselines.json``,
``pareto.csv``, ``metrics.json``. Leaves out: interactions between blocks (the additive quality
model is stage 03's to check), serving-engine effects beyond what stage 01 measured.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..core.config import RunConfig
from .mip import (
    DEFAULT_GAP,
    FIELDS,
    Budget,
    InfeasibleBudget,
    Problem,
    SearchError,
    TOL,
    build_problem,
    check,
    constraint_rows,
    min_differing_layers,
    reference,
    solve_checked,
)
from ..core.rundir import RunDir
from ..core.atomic import atomic_write_json, atomic_write_text

STAGE = "04_search"


# ------------------------------------------------------------------------------ child specs

@dataclass
class ChildSpec:
    """A searched (or baseline) child: what stage 05 trains and stage 06 evaluates."""

    name: str
    method: str                        # mip | uniform | depth | greedy | random
    choices: list[tuple[str, str]]     # per layer (attention variant, FFN variant)
    coupled: list[bool]                # per layer: use the coupled (pair-trained) block
    batch: int                         # the batch size it was chosen for
    predicted: dict                    # score, params, memory_bytes, generation_ms, tokens_per_s, speedup
    checks: dict = field(default_factory=dict)    # constraint -> limit, predicted (, measured), ok
    solver: dict = field(default_factory=dict)    # MIP only: solver, status, seconds, gap, fallback
    measured: dict = field(default_factory=dict)  # end-to-end timings of the built child, when run
    notes: list[str] = field(default_factory=list)

    @property
    def child(self) -> list[tuple[str, str, bool]]:
        return [(a, f, c) for (a, f), c in zip(self.choices, self.coupled)]

    def short(self) -> str:
        """One line: ``kv2+0.50 | noop+linear | …`` (a ``*`` marks a coupled block)."""
        return " | ".join(f"{a.split(':')[1]}+{f.split(':')[1]}{'*' if c else ''}" for a, f, c in self.child)

    def to_dict(self) -> dict:
        return {**asdict(self), "choices": [list(c) for c in self.choices]}

    @classmethod
    def from_dict(cls, d: dict) -> ChildSpec:
        return cls(**{**d, "choices": [tuple(c) for c in d["choices"]]})

    def block_configs(self, parent_config) -> list[dict]:
        """DeciLM ``block_configs`` of this child (see DESIGN.md §4)."""
        from ..core.blocks import choices_to_block_configs, parse_variant

        return choices_to_block_configs(parent_config, [(parse_variant(a, parent_config), parse_variant(f, parent_config))
                                                        for a, f in self.choices])

    def build_model(self, parent, library_dir: str | Path | None = None):
        """The child as a ``PuzzleForCausalLM``: blocks from the BLD library when ``library_dir`` is
        given (coupled blocks where ``coupled``), else initialised from the parent (untrained)."""
        from ..core.blocks import build_child

        if library_dir is None:
            return build_child(parent, self.choices)
        from ..bld.library import Library, pair_name, split_pair_tensors

        lib = Library.open(library_dir, parent)
        blocks: dict[tuple[int, str], dict] = {}
        for i, (a, f, c) in enumerate(self.child):
            if c:
                blocks[(i, a)], blocks[(i, f)] = split_pair_tensors(lib.read_block(i, pair_name(a, f)))
            else:
                blocks.update({(i, n): lib.read_block(i, n) for n in (a, f)})
        return build_child(parent, self.choices, channel_scores=lib.channel_scores(), blocks=blocks)

    def build(self, cfg: RunConfig):
        """:meth:`build_model` with the run's parent and BLD library (stages 00 and 02)."""
        import torch

        from ..bld import stage as bld

        from ..parent import stage as parent

        return self.build_model(parent.load(cfg).load_model(dtype=getattr(torch, cfg.dtype)),
                                bld.load(cfg).library_dir)


# ------------------------------------------------------------------------------ the searcher

_UNITS = {"speedup": "×", "throughput": " tokens/s", "latency": " ms", "memory": " MiB", "params": " params"}


class Searcher:
    """Solves a :class:`Problem` under a :class:`Budget` at every batch size and keeps the best."""

    def __init__(self, problem: Problem, budget: Budget, batches: Sequence[int] | None = None,
                 solver: str = "auto", time_limit: float = 60.0, gap: float = DEFAULT_GAP, threads: int = 0,
                 cross_check: bool = True):
        self.problem, self.budget = problem, budget
        self.batches = list(batches or problem.batch_sizes)
        bad = [b for b in self.batches if b not in problem.scenarios]
        if bad:
            raise SearchError(f"batch sizes {bad} were not profiled (profiled: {problem.batch_sizes}): "
                              "fix search_batch_sizes or add them to profile_batch_sizes")
        self.solver, self.time_limit, self.gap, self.threads = solver, time_limit, gap, threads
        self.cross_check = cross_check
        self.ref_batch, self.ref_tps = reference(problem, budget, self.batches)
        for r in budget.ranges:  # an unknown statistic is refused now, naming the known ones
            problem.coef(problem.fixed, constraint_rows(problem, Budget(ranges=(r,)), self.batches[0], 1.0)[0].what,
                         self.batches[0])
        self.log: list[dict] = []
        self._last_batch: int | None = None  # the batch that won the last search: solved first next time
        self.use_cutoff = True  # False: solve every batch size to the end (benchmarks/bench_search.py compares)
        self.diversity = "auto"  # the diversity cuts' formulation: auto | pairs | layers (mip.solve_checked)

    def _solve(self, batch: int, rows, purpose: str, objective=None, cuts=(), min_differ=0, cutoff=None):
        """One checked solve (``mip.solve_checked``), logged."""
        res = solve_checked(self.problem, rows, batch, objective, cuts, min_differ, self.solver, self.time_limit,
                            self.gap, self.threads, cutoff, self.cross_check, self.diversity)
        s = res.solved
        cross = res.check.get("cross_check", {})
        self.log.append({"purpose": purpose, "batch": batch, "solver": s.solver, "status": s.status,
                         "seconds": s.seconds, "objective": res.objective, "gap": s.gap,
                         "variables": res.mip_size[0], "constraints": res.mip_size[1],
                         "fallback_reason": s.fallback_reason, "cross_check_agrees": cross.get("agrees"),
                         "cross_check_seconds": cross.get("seconds", 0.0), "note": res.check.get("note")})
        return res

    def _tie(self, value: float) -> float:
        """How far above the incumbent a batch's cutoff sits: the gap plus the solvers' absolute
        tolerance, so that a child as good as the incumbent (a tie) is still found and compared."""
        return self.gap * abs(value) + 1e-9 * (1.0 + abs(value))

    def spec(self, child: Sequence, batch: int, name: str, method: str, budget: Budget | None = None) -> ChildSpec:
        child = [(c[0], c[1], bool(c[2]) if len(c) > 2 else False) for c in child]
        ev = self.problem.evaluate(child, batch)
        ev["speedup"] = ev["tokens_per_s"] / self.ref_tps
        return ChildSpec(name, method, [(a, f) for a, f, _ in child], [c for *_, c in child], batch, ev,
                         check(self.problem, child, budget or self.budget, batch, self.ref_tps))

    def best_batch(self, child: Sequence, budget: Budget | None = None) -> int | None:
        """The batch size at which ``child`` meets the budget with the highest throughput, or None."""
        ok = [b for b in self.batches
              if all(c["ok"] for c in check(self.problem, child, budget or self.budget, b, self.ref_tps).values())]
        return max(ok, key=lambda b: self.problem.evaluate(child, b)["tokens_per_s"], default=None)

    def best(self, budget: Budget | None = None, cuts=(), min_differ: int = 0, name: str = "puzzle-1",
             purpose: str = "search", explain: bool = True) -> ChildSpec:
        """The best child over all batch sizes; raises :class:`InfeasibleBudget` when none exists."""
        budget = budget or self.budget
        found, per_batch, incumbent = [], [], None
        # The batch that won last time first: its objective is the others' cutoff, so a batch that
        # cannot beat it is closed by its bound instead of being solved to the end.
        for b in sorted(self.batches, key=lambda b: b != self._last_batch):
            cutoff = None if incumbent is None or not self.use_cutoff else incumbent + self._tie(incumbent)
            res = self._solve(b, constraint_rows(self.problem, budget, b, self.ref_tps), purpose, cuts=cuts,
                              min_differ=min_differ, cutoff=cutoff)
            per_batch.append({"batch": b, "status": res.solved.status, "objective": res.objective,
                              "seconds": round(res.solved.seconds, 4), "proven": res.proven, "check": res.check})
            if res.child is not None:
                tps = self.problem.evaluate(res.child, b)["tokens_per_s"]
                found.append((round(res.objective, 9), -tps, b, res.child, res))
                incumbent = res.objective if incumbent is None else min(incumbent, res.objective)
        per_batch.sort(key=lambda p: self.batches.index(p["batch"]))
        if not found and any(p["status"] == "time_limit" for p in per_batch):
            raise SearchError(f"no child found within search_time_limit_s={self.time_limit:g} s at some batch "
                              f"sizes ({per_batch}): raise search_time_limit_s or search_mip_gap")
        if not found:
            tight = self.tightest(budget) if explain else {}
            raise InfeasibleBudget(self.explain(budget, tight) if explain else
                                   "no child meets the budget with these extra (diversity) cuts", tight)
        _, _, b, child, res = min(found, key=lambda t: t[:3])
        self._last_batch = b
        spec = self.spec(child, b, name, "mip", budget)
        proven = all(p["proven"] for p in per_batch)
        spec.solver = {"solver": res.solved.solver, "status": res.solved.status, "gap": res.solved.gap,
                       "seconds": round(sum(p["seconds"] for p in per_batch), 4),
                       "fallback_reason": res.solved.fallback_reason, "proven": proven, "per_batch": per_batch}
        if not proven:
            spec.notes.append(f"not proven optimal to the gap {self.gap:g}: batch sizes "
                              f"{[p['batch'] for p in per_batch if not p['proven']]} stopped at "
                              f"search_time_limit_s={self.time_limit:g} s")
        spec.notes += [p["check"]["note"] for p in per_batch if p["check"].get("note")]
        if not all(c["ok"] for c in spec.checks.values()):  # never hand on a child that breaks the budget
            raise SearchError(f"solver {res.solved.solver} returned a child that fails the re-check: {spec.checks}")
        return spec

    def _value(self, name: str, total: float, batch: int) -> float:
        """A constrained sum in the user's units (speed-up, tokens/s, ms, MiB, parameters)."""
        gen = self.problem.scenarios[batch][1]
        if name.startswith("range "):
            return total
        if name in ("speedup", "throughput"):
            tps = 1e3 * batch * gen / total if total > 0 else math.inf
            return tps / self.ref_tps if name == "speedup" else tps
        return total / 2**20 if name == "memory" else total

    def tightest(self, budget: Budget | None = None) -> dict[str, dict]:
        """For each active constraint, the best value any child reaches *given the other budgets*
        (or, where the others cannot all hold, alone): the number an infeasibility message needs."""
        budget = budget or self.budget
        out = {}
        for row in constraint_rows(self.problem, budget, self.batches[0], self.ref_tps):
            name, what = row.name, row.what
            maximise = name in ("speedup", "throughput")
            # a range: the smallest sum when its upper bound is set, else the largest
            sign = -1.0 if name.startswith("range ") and not math.isfinite(row.hi) else 1.0
            for given_others in (True, False):
                vals = []
                for b in self.batches:
                    rows = [r for r in constraint_rows(self.problem, budget, b, self.ref_tps)
                            if given_others and r.name != name]
                    obj = sign * np.array([self.problem.coef(o.cost, what, b) for _, o in self.problem.columns])
                    res = self._solve(b, rows, f"tightest {name}", objective=obj)
                    if res.child is not None:
                        total = sign * res.objective + self.problem.coef(self.problem.fixed, what, b)
                        vals.append((self._value(name, total, b), b))
                if vals:
                    v, b = (max if maximise or sign < 0 else min)(vals)
                    out[name] = {"value": v, "batch": b, "given_other_budgets": given_others}
                    if name.startswith("range "):
                        out[name]["reaches"] = "largest" if sign < 0 else "smallest"
                    break
        return out

    def explain(self, budget: Budget, tight: dict) -> str:
        asked = {"speedup": budget.min_speedup, "throughput": budget.min_tokens_per_s,
                 "latency": budget.max_latency_ms, "memory": budget.max_memory_bytes / 2**20,
                 "params": budget.max_params}
        parts = []
        for name, t in tight.items():
            if name.startswith("range "):
                ctx = "given the other budgets" if t["given_other_budgets"] else "alone"
                parts.append(f"{name} (search_constraints): the {t['reaches']} value any child reaches {ctx} "
                             f"is {t['value']:.6g} (batch {t['batch']}); widen the range to include it")
                continue
            bound = "at most" if name in ("speedup", "throughput") else "at least"
            ctx = "given the other budgets" if t["given_other_budgets"] else "alone"
            value = t["value"] / (self.problem.total(self.problem.parent, "params", t["batch"]) or 1) \
                if name == "params" else t["value"]
            unit = "× the parent's parameters" if name == "params" else _UNITS[name]
            shown = asked[name] / (self.problem.total(self.problem.parent, "params", t["batch"]) or 1) \
                if name == "params" else asked[name]
            parts.append(f"{name}: {FIELDS[name]}={shown:.4g} asked, but the tightest any child reaches "
                         f"{ctx} is {value:.4g}{unit} (batch {t['batch']}), so set it to {bound} that")
        return (f"No child in the library meets the budget at any batch size searched "
                f"({', '.join(map(str, self.batches))}; speed-ups are relative to the parent's "
                f"{self.ref_tps:.4g} tokens/s at batch {self.ref_batch}).\n  - " + "\n  - ".join(parts))

    def diverse(self, k: int, min_diff_fraction: float = 0.2, progress: bool = True, min_diff_layers: int = 0
                ) -> tuple[list[ChildSpec], list[str]]:
        """Up to ``k`` solutions, each differing from every earlier one in ≥ D layers: ``min_diff_layers``
        when > 0, else ceil(f·L) (``mip.min_differing_layers``: f·L rounded to 9 decimals first)."""
        need = min_differing_layers(self.problem.num_layers, min_diff_fraction, min_diff_layers)
        sols, notes = [self.best(name="puzzle-1", purpose="solution 1")], []
        for n in tqdm(range(2, k + 1), desc="diverse solutions", disable=not progress or k < 2):
            try:
                sols.append(self.best(cuts=[s.child for s in sols], min_differ=need, name=f"puzzle-{n}",
                                      purpose=f"solution {n}", explain=False))
            except InfeasibleBudget:
                notes.append(f"only {len(sols)} solutions differ pairwise in >= {need} layers under this budget")
                break
        return sols, notes

    def pareto(self, speedups: Sequence[float], progress: bool = True) -> list[dict]:
        """The best score at each speed-up target (the other budgets kept)."""
        rows = []
        for s in tqdm(speedups, desc="Pareto sweep", disable=not progress):
            t0 = time.perf_counter()
            try:
                spec = self.best(replace(self.budget, min_speedup=s), name=f"pareto-{s:g}", purpose=f"pareto {s:g}",
                                 explain=False)
                rows.append(pareto_row("mip", s, spec, time.perf_counter() - t0))
            except InfeasibleBudget:
                rows.append(pareto_row("mip", s, None, time.perf_counter() - t0))
        return rows


def pareto_row(method: str, target: float, spec: ChildSpec | None, seconds: float = 0.0) -> dict:
    p = spec.predicted if spec else {}
    return {"method": method, "target_speedup": target, "feasible": spec is not None,
            "score": p.get("score", math.nan), "speedup": p.get("speedup", math.nan),
            "batch": spec.batch if spec else 0, "tokens_per_s": p.get("tokens_per_s", math.nan),
            "params": p.get("params", math.nan), "seconds": round(seconds, 4),
            "spec": spec.short() if spec else ""}


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
            ok = (limit is None or got <= limit * (1 + TOL)) and got >= c.get("lower", -math.inf) - TOL * abs(c.get("lower", 0.0))
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
        pareto = s.pareto(speedups, progress) + baselines.sweep(s, influence, speedups)
        if cfg.search_measure:
            measure(s, solutions + [b for b in base.values() if b], model, costs, cfg, progress)
        info = {"metric": cfg.search_metric, "budget": asdict(s.budget),
                "reference": {"batch": s.ref_batch, "tokens_per_s": s.ref_tps},
                "batch_sizes": s.batches, "parent": [list(p) for p in s.problem.parent],
                "solver": {"requested": cfg.search_solver, "used": sorted({x["solver"] for x in s.log}),
                           "fallback_reasons": sorted({x["fallback_reason"] for x in s.log if x["fallback_reason"]})},
                "problem": {"layers": s.problem.num_layers, "options": len(s.problem.columns),
                            "options_per_layer": [{k: [o.name for o in v] for k, v in lay.items()}
                                                  for lay in s.problem.layers]},
                "block_influence": influence, "notes": s.problem.notes + notes + base_notes}
        atomic_write_json(st.path("solution.json"), {**info, "solutions": [x.to_dict() for x in solutions]})
        atomic_write_json(st.path("baselines.json"), {k: {"spec": v.to_dict() if v else None} for k, v in base.items()})
        atomic_write_text(st.path("pareto.csv"), additivity.rows_to_csv(pareto))
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
        rows.append({"child": c.name, "method": c.method, "batch": c.batch, f"Σ {result.info['metric']}": c.predicted["score"],
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
