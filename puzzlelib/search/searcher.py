"""The search's driver: ``Searcher`` asks the MIP for the best child (or several diverse ones, or a
Pareto sweep) under a budget and explains an infeasible one; ``ChildSpec`` is a searched or
baseline child as stage 05 trains it and stage 06 evaluates it; ``pareto_row`` one row of the sweep.

Reads and writes nothing itself (``stage.py`` runs it on the run's cost and score tables and
writes the files; ``baselines.py`` builds the comparison children with the same ``Searcher``).
Leaves out: the MIP and its solvers (``mip.py``).
"""

from __future__ import annotations

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
    check,
    constraint_rows,
    min_differing_layers,
    reference,
    solve_checked,
)


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

        choices = [(parse_variant(a, parent_config), parse_variant(f, parent_config)) for a, f in self.choices]
        return choices_to_block_configs(parent_config, choices)

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
        self.diversity = "pairs"  # the diversity cuts' formulation: pairs | layers (mip.formulate)
        self.reduce = "auto"  # exact reduction when gurobipy's licence refuses a model: auto | always | never

    def _solve(self, batch: int, rows, purpose: str, objective=None, cuts=(), min_differ=0, cutoff=None):
        """One checked solve (``mip.solve_checked``), logged."""
        res = solve_checked(self.problem, rows, batch, objective, cuts, min_differ, self.solver, self.time_limit,
                            self.gap, self.threads, cutoff, self.cross_check, self.diversity, self.reduce)
        s = res.solved
        cross = res.check.get("cross_check", {})
        self.log.append({"purpose": purpose, "batch": batch, "solver": s.solver, "status": s.status,
                         "seconds": s.seconds, "objective": res.objective, "gap": s.gap,
                         "variables": res.mip_size[0], "constraints": res.mip_size[1],
                         "fallback_reason": s.fallback_reason, "cross_check_agrees": cross.get("agrees"),
                         "reduced": s.reduced,
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
                       "fallback_reason": res.solved.fallback_reason, "reduced": res.solved.reduced,
                       "proven": proven, "per_batch": per_batch}
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
        asked = {"speedup": budget.speedup, "throughput": budget.min_tokens_per_s,
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

    def pareto(self, speedups: Sequence[float], progress: bool = True, keep: list | None = None) -> list[dict]:
        """The best score at each speed-up target (the other budgets kept). ``keep``, when given,
        receives ``(target, spec)`` of every feasible child (stage 06 can evaluate them)."""
        rows = []
        for s in tqdm(speedups, desc="Pareto sweep", disable=not progress):
            t0 = time.perf_counter()
            try:
                spec = self.best(replace(self.budget, speedup=s), name=f"pareto-{s:g}", purpose=f"pareto {s:g}",
                                 explain=False)
                rows.append(pareto_row("mip", s, spec, time.perf_counter() - t0))
                if keep is not None:
                    keep.append((s, spec))
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
