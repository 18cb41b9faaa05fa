"""The search's optimisation problem: options, budgets, the MIP, its two solvers and their checks.

What it does: holds a solver-independent :class:`Problem` (per layer, one-hot attention and FFN
slots; a coupled or joint pair is one option filling both), turns budgets (:class:`Budget`:
throughput or speed-up, latency, memory, parameters, and :class:`Range` s — lower and/or upper
bounds on any cost-table statistic) into linear rows, formulates the mixed-integer program as
matrices (:func:`formulate`, diversity cuts included) and solves it with gurobipy when installed and
its licence admits the size, otherwise HiGHS, recording why (:func:`solve`).

Numerics (why the answers can be trusted): every constraint row is divided by a power of two that
brings its largest |coefficient| to ~1 (exact in binary floating point; bytes ~1e9 and parameters
~1e9 would otherwise sit next to KL values ~1e-3 and mislead a solver's tolerances), and the
objective likewise. :func:`solve_checked` then re-evaluates the chosen child in float64 straight
from the option tables (objective, every constraint, every diversity cut) and, by default, solves
the same model with the *other* solver when it is available (HiGHS always; gurobipy when its
licence admits the size). A child that breaks a constraint, or an "optimal" answer that the other
solver beats by more than the gap, is replaced by the other solver's verified child and the reason
recorded; when no verified child exists the search stops with :class:`SearchError`.

``search.py`` builds problems from the stage artifacts and runs the stage; this module reads and
writes nothing. Leaves out: anything about where costs and scores come from.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from ..core.config import RunConfig
from ..core.validation import Range, parse_ranges
from . import fixing

# Scores where larger means closer to the parent; everything else (kl, lm_loss, ...) is minimised.
# Only the default of build_problem's ``bigger_is_better`` (config: search_bigger_is_better="auto").
HIGHER_IS_BETTER = ("top1", "top1_agreement", "agreement", "accuracy", "mc_accuracy")
TOL = 1e-7  # relative slack when re-checking a solver's answer (solvers work to ~1e-9 feasibility)
DEFAULT_GAP = 1e-6  # relative MIP gap; RunConfig.search_mip_gap's default too (a test keeps them equal)
ABS_GAP = 1e-9  # absolute gap on the *scaled* objective (its largest |coefficient| is ~1)
# Columns of a cost-table row that are labels, not statistics a constraint could sum.
NOT_STATS = ("layer", "measured_on_layer", "is_parent")


class SearchError(ValueError):
    """The search cannot run as configured; the message says what to change."""


class InfeasibleBudget(SearchError):
    """No child meets the budget. ``tightest`` maps each constraint to the best value reachable."""

    def __init__(self, message: str, tightest: dict):
        super().__init__(message)
        self.tightest = tightest


# ------------------------------------------------------------------------------ the problem

@dataclass(frozen=True)
class Option:
    """One way to fill a slot: a sub-block variant (kind attn|ffn) or a pair (kind pair) that fills
    both slots: coupled BLD, or a joint variant of a library measured as (attention, FFN) pairs."""

    name: str                 # "attn:kv2", "ffn:0.50" or "attn:kv1+ffn:0.50"
    kind: str
    score: float              # degradation vs the parent: 0 for the parent's own sub-block
    cost: Mapping[str, float]  # params, weight_bytes, kv_bytes_per_token, prefill_ms@bB, decode_ms@bB, ...

    @property
    def halves(self) -> tuple[str | None, str | None]:
        if self.kind == "pair":
            a, f = self.name.split("+", 1)
            return a, f
        return (self.name, None) if self.kind == "attn" else (None, self.name)


@dataclass
class Problem:
    """Everything the MIP needs, solver-free. ``layers[i]`` = {"attn": [...], "ffn": [...], "pair": [...]}."""

    layers: list[dict[str, list[Option]]]
    fixed: Mapping[str, float]                 # the fixed part's costs (embeddings, LM head, ...)
    scenarios: dict[int, tuple[int, int]]      # batch -> (prompt_len, gen_len)
    parent: list[tuple[str, str]]              # the parent's own (attn, ffn) per layer
    metric: str = "kl"
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.columns = [(i, o) for i, lay in enumerate(self.layers)
                        for k in ("attn", "ffn", "pair") for o in lay.get(k, [])]
        self._by_name = [{o.name: o for k in ("attn", "ffn", "pair") for o in lay.get(k, [])}
                         for lay in self.layers]
        for i, (a, f) in enumerate(self.parent):
            if a not in self._by_name[i] or f not in self._by_name[i]:
                raise SearchError(f"layer {i}: the parent's own sub-blocks ({a}, {f}) must be options")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def batch_sizes(self) -> list[int]:
        return sorted(self.scenarios)

    def option(self, layer: int, name: str) -> Option:
        try:
            return self._by_name[layer][name]
        except KeyError:
            raise SearchError(f"layer {layer}: {name!r} is not an option of the search (options: "
                              f"{', '.join(self._by_name[layer])})") from None

    def stats(self) -> list[str]:
        """The statistics a :class:`Range` can bound: every cost column of every option (a column
        ``x@bB`` also as plain ``x``, meaning "at the batch size being solved") plus the derived
        ``memory_bytes`` and ``generation_ms``."""
        keys = set(self.fixed).intersection(*(o.cost for _, o in self.columns))
        return sorted(keys | {k.split("@b")[0] for k in keys if "@b" in k} | {"memory_bytes", "generation_ms"})

    def coef(self, cost: Mapping[str, float], what: str, batch: int) -> float:
        """An option's (or the fixed part's) contribution to a constrained sum at ``batch``."""
        if what == "params":
            return float(cost["params"])
        if what in ("memory", "time"):
            prompt, gen = self.scenarios[batch]
            if what == "memory":  # the KV cache must hold prompt + generation for every sequence
                return float(cost["weight_bytes"]) + batch * (prompt + gen) * float(cost["kv_bytes_per_token"])
            return float(cost[f"prefill_ms@b{batch}"]) + gen * float(cost[f"decode_ms@b{batch}"])
        if what in cost:
            return float(cost[what])
        if f"{what}@b{batch}" in cost:
            return float(cost[f"{what}@b{batch}"])
        raise SearchError(f"no statistic {what!r} in the cost table (at batch {batch}); statistics: "
                          f"{', '.join(self.stats())}")

    def picks(self, child: Sequence) -> list[Option]:
        """The options a child uses. ``child``: per layer (attn, ffn) or (attn, ffn, coupled)."""
        if len(child) != self.num_layers:
            raise SearchError(f"a child needs {self.num_layers} layers, got {len(child)}")
        out = []
        for i, c in enumerate(child):
            if len(c) > 2 and c[2]:
                out.append(self.option(i, f"{c[0]}+{c[1]}"))
            else:
                out += [self.option(i, c[0]), self.option(i, c[1])]
        return out

    def total(self, child: Sequence, what: str, batch: int) -> float:
        return self.coef(self.fixed, what, batch) + sum(self.coef(o.cost, what, batch) for o in self.picks(child))

    def evaluate(self, child: Sequence, batch: int) -> dict[str, float]:
        """Predicted score and costs of ``child`` served at ``batch`` (sum of its blocks + fixed)."""
        t = self.total(child, "time", batch)
        _, gen = self.scenarios[batch]
        return {"score": sum(o.score for o in self.picks(child)), "batch": batch,
                "params": self.total(child, "params", batch),
                "memory_bytes": self.total(child, "memory", batch), "generation_ms": t,
                "tokens_per_s": batch * gen / (t / 1e3) if t > 0 else math.inf}


def _stats(row: Mapping) -> dict[str, float]:
    """Every numeric statistic of a cost-table row (labels and flags left out)."""
    return {k: float(v) for k, v in row.items()
            if k not in NOT_STATS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def build_problem(costs, scores: Mapping[tuple[int, str], float], metric: str = "kl",
                  parent_value: float | None = None, exclude_ops: Sequence[str] = (),
                  bigger_is_better: bool | None = None) -> Problem:
    """A :class:`Problem` from a ``profiling.CostTable`` and ``{(layer, variant): score}``.

    Options are the variants with both a cost row and a score (plus the parent's own sub-blocks,
    degradation 0 by definition). Pairs are score keys ``"attn:X+ffn:Y"``: one option filling both
    slots, costed by the table's own row for the pair when it has one (a library measured as joint
    variants) and otherwise as the sum of its halves' rows; a pair needs no scores of its halves. A
    scored pair that can be costed neither way is refused (:class:`SearchError`), never dropped.
    ``bigger_is_better``: the score's direction (None: from the metric's name, see
    ``HIGHER_IS_BETTER``); options are scored as degradation, ``±(score − parent's value)``.
    ``parent_value`` is the metric's value for the parent itself (0 for KL); it defaults to the
    score of the parent's own sub-block at each layer. ``exclude_ops`` drops variants (and pairs
    with such a half) by op, e.g. ("linear",) for a vLLM-servable child.
    """
    if bigger_is_better is None:
        bigger_is_better = metric in HIGHER_IS_BETTER
    sign = -1.0 if bigger_is_better else 1.0
    parent = costs.parent_choices()
    index = {(r["layer"], r["variant"]): r for r in costs.rows}
    layers, skipped, uncosted = [], [], []
    for i in range(costs.num_layers):
        ref = parent_value
        if ref is None:
            ref = next((scores[(i, n)] for n in parent[i] if (i, n) in scores), None if bigger_is_better else 0.0)
        if ref is None:
            raise SearchError(f"metric {metric!r}: no score for the parent's own sub-blocks at layer {i} "
                              "and no parent_value given: cannot express degradation vs the parent")
        lay: dict[str, list[Option]] = {"attn": [], "ffn": [], "pair": []}
        for kind in ("attn", "ffn"):
            for name in costs.variants(i, kind):
                row = costs.row(i, name)
                is_parent = name == parent[i][0 if kind == "attn" else 1]
                if row["op"] in exclude_ops and not is_parent:
                    continue
                if (i, name) not in scores and not is_parent:
                    skipped.append((i, name))
                    continue
                s = 0.0 if is_parent else sign * (float(scores[(i, name)]) - ref)
                lay[kind].append(Option(name, kind, s, _stats(row)))
        profiled = set(costs.variants(i, "attn")) | set(costs.variants(i, "ffn"))
        skipped += [(li, n) for li, n in scores if li == i and "+" not in n and n not in profiled]
        for (li, name), value in scores.items():
            if li != i or "+" not in name:
                continue
            a, f = name.split("+", 1)
            own = index.get((i, name))
            if own is None and not (a in profiled and f in profiled):
                uncosted.append(f"layer {i} {name}")
                continue
            halves = [costs.row(i, h) for h in (a, f) if h in profiled]
            if any(r["op"] in exclude_ops for r in halves):
                continue
            if own is not None:
                cost = _stats(own)
            else:
                ca, cf = _stats(halves[0]), _stats(halves[1])
                cost = {k: ca[k] + cf[k] for k in ca if k in cf}
            lay["pair"].append(Option(name, "pair", sign * (float(value) - ref), cost))
        layers.append(lay)
    if uncosted:
        raise SearchError(f"{len(uncosted)} scored (attention, FFN) pairs have no cost: neither a cost-table row "
                          f"of their own nor rows for both halves ({', '.join(uncosted[:6])}"
                          f"{', ...' if len(uncosted) > 6 else ''}); profile them (stage 01) or drop them from the "
                          "scores — the search will not silently leave them out")
    fixed = _stats(index[(-1, "fixed")])
    notes = []
    if skipped:
        kinds = sorted({n for _, n in skipped})
        notes.append(f"{len(skipped)} (layer, variant) options left out because they lack a score or "
                     f"a cost row (profiled but not in the library, or vice versa): {', '.join(kinds)}")
    if exclude_ops:
        notes.append(f"variants with op {', '.join(exclude_ops)} excluded from the search space")
    return Problem(layers, fixed, {s.batch: (s.prompt_len, s.gen_len) for s in costs.scenarios},
                   parent, metric, notes)


# ------------------------------------------------------------------------------ budgets

@dataclass(frozen=True)
class Budget:
    """Hardware budgets; 0 switches a constraint off. ``ranges`` bound any statistic on both sides.
    Each field is its config field without ``search_`` (``search_speedup`` → ``speedup`` → the row
    named "speedup"); memory and parameters arrive converted to bytes and to a parameter count."""

    speedup: float = 0.0            # search_speedup: × the parent's best predicted throughput (see reference())
    min_tokens_per_s: float = 0.0   # generated tokens per second of the whole batch
    max_latency_ms: float = 0.0     # one scenario's prefill + gen_len decode steps
    max_memory_bytes: float = 0.0   # weights + batch × (prompt + gen) × KV bytes per token
    max_params: float = 0.0
    ranges: tuple[Range, ...] = ()

    @classmethod
    def from_config(cls, cfg: RunConfig, parent_params: float) -> Budget:
        # By keyword, one line per config field (FIELDS below maps each constraint row back).
        return cls(speedup=cfg.search_speedup,
                   min_tokens_per_s=cfg.search_min_tokens_per_s,
                   max_latency_ms=cfg.search_max_latency_ms,
                   max_memory_bytes=cfg.search_max_memory_mib * 2**20,
                   max_params=cfg.search_max_params_ratio * parent_params,
                   ranges=parse_ranges(cfg.search_constraints))


# Config field behind each constraint, for error messages (a Range's name starts "range ").
FIELDS = {"speedup": "search_speedup", "throughput": "search_min_tokens_per_s",
          "latency": "search_max_latency_ms", "memory": "search_max_memory_mib",
          "params": "search_max_params_ratio", "range": "search_constraints"}
_DERIVED = {"memory_bytes": "memory", "generation_ms": "time"}


def reference(problem: Problem, budget: Budget, batches: Sequence[int]) -> tuple[int, float]:
    """(batch, tokens/s) of the parent at its best batch size among those that fit the memory
    budget (all of them when none fits): what a speed-up is measured against, as in the paper."""
    ev = {b: problem.evaluate(problem.parent, b) for b in batches}
    fits = [b for b in batches if not budget.max_memory_bytes or ev[b]["memory_bytes"] <= budget.max_memory_bytes]
    b = max(fits or batches, key=lambda b: ev[b]["tokens_per_s"])
    return b, ev[b]["tokens_per_s"]


class Row(NamedTuple):
    """One constraint: ``lo ≤ Σ what ≤ hi`` (what: params | memory | time | a statistic)."""

    name: str
    what: str
    lo: float
    hi: float


def constraint_rows(problem: Problem, budget: Budget, batch: int, ref_tps: float) -> list[Row]:
    """The active constraints at ``batch``."""
    gen = problem.scenarios[batch][1]
    rows = []
    if budget.speedup:
        rows.append(Row("speedup", "time", -math.inf, 1e3 * batch * gen / (budget.speedup * ref_tps)))
    if budget.min_tokens_per_s:
        rows.append(Row("throughput", "time", -math.inf, 1e3 * batch * gen / budget.min_tokens_per_s))
    if budget.max_latency_ms:
        rows.append(Row("latency", "time", -math.inf, budget.max_latency_ms))
    if budget.max_memory_bytes:
        rows.append(Row("memory", "memory", -math.inf, budget.max_memory_bytes))
    if budget.max_params:
        rows.append(Row("params", "params", -math.inf, budget.max_params))
    for r in budget.ranges:
        rows.append(Row(f"range {r}", _DERIVED.get(r.stat, r.stat), -math.inf if r.lo is None else r.lo,
                        math.inf if r.hi is None else r.hi))
    return rows


def _within(v: float, lo: float, hi: float) -> bool:
    return v <= hi + TOL * abs(hi) and v >= lo - TOL * abs(lo)


def check(problem: Problem, child: Sequence, budget: Budget, batch: int, ref_tps: float) -> dict:
    """{constraint: {"limit", "predicted", "ok"}} for ``child`` at ``batch`` (predicted costs);
    ``limit`` is the upper bound (None when only a lower one), ``lower`` the lower bound if any."""
    out = {}
    for r in constraint_rows(problem, budget, batch, ref_tps):
        v = problem.total(child, r.what, batch)
        out[r.name] = {"what": r.what, "limit": r.hi if math.isfinite(r.hi) else None, "predicted": v,
                       "ok": _within(v, r.lo, r.hi)}
        if math.isfinite(r.lo):
            out[r.name]["lower"] = r.lo
    return out


def min_differing_layers(num_layers: int, fraction: float = 0.0, layers: int = 0) -> int:
    """Layers in which every diverse solution must differ from each earlier one: ``layers`` when
    given (> 0), else ``ceil(fraction × num_layers)`` with the product first rounded to 9 decimals,
    so binary floating point cannot add a layer (0.28 × 25 = 7.000000000000001 requires 7, not 8)."""
    if layers > 0:
        return min(int(layers), num_layers)
    return max(1, math.ceil(round(fraction * num_layers, 9)))


# ------------------------------------------------------------------------------ the MIP

def _pow2(v: float) -> float:
    """The power of two that brings ``v`` to [0.71, 1.41]: scaling by it changes no mantissa."""
    return 2.0 ** -round(math.log2(v)) if v > 0 and math.isfinite(v) else 1.0


@dataclass
class MIP:
    """``min c·x  s.t.  lo ≤ A x ≤ hi,  0 ≤ x ≤ ub,  x[integer] ∈ ℤ`` — both solvers read this.

    Rows and objective are *scaled* by powers of two (``row_scale``, ``obj_scale``); the objective
    in the problem's units is :meth:`value`."""

    c: np.ndarray
    A: sp.csr_matrix
    lo: np.ndarray
    hi: np.ndarray
    ub: np.ndarray
    integer: np.ndarray        # bool per column
    n_choice: int              # the first n_choice columns are the option binaries
    const: float = 0.0
    obj_scale: float = 1.0
    row_scale: np.ndarray | None = None
    n_cuts: int = 0            # diversity cuts in the model (solver settings differ with and without)

    def value(self, x: np.ndarray) -> float:
        return float(self.c @ x) / self.obj_scale + self.const

    def scaled(self, objective_value: float) -> float:
        return (objective_value - self.const) * self.obj_scale


def _same_pairs(cuts: Sequence[Sequence], L: int) -> dict[tuple[int, str, str], int]:
    """Each distinct (layer, attention, FFN) of the earlier children, numbered in first-seen order."""
    out: dict[tuple[int, str, str], int] = {}
    for prev in cuts:
        for i in range(L):
            out.setdefault((i, prev[i][0], prev[i][1]), len(out))
    return out


def formulate(problem: Problem, rows: Sequence[Row], batch: int, objective: np.ndarray | None = None,
              cuts: Sequence[Sequence] = (), min_differ: int = 0, diversity: str = "pairs") -> MIP:
    """The MIP at ``batch``: one-hot slots, ``rows`` (from :func:`constraint_rows`, each scaled by
    a power of two to a largest |coefficient| of ~1, its bounds alike) and one diversity cut per
    earlier child in ``cuts`` (it must differ in ≥ ``min_differ`` layers).

    A layer is "the same" as an earlier child's when both its attention and its FFN are. The cut
    for child y is ``Σ_i same_i(y) ≤ L − min_differ`` with ``same ≥ [attn = y's] + [ffn = y's] − 1``
    (the tightest linear bound for one pair). ``diversity="pairs"`` (the default) keeps ONE
    ``same`` variable per distinct (layer, pair) among the earlier children — children share most
    layers, so this is ~L + D·k columns instead of L·k — and adds, where several earlier pairs
    share a half, ``Σ_{f∈F} same(a, f) ≥ [attn = a] + [ffn ∈ F] − 1`` (and the mirror image): a
    layer can hold at most one pair, which the per-pair bounds alone do not tell the LP.
    ``"layers"``: one ``same`` per (cut, layer), no shared bounds (the earlier formulation; kept
    for ``benchmarks/bench_search.py``). Both have exactly the same integer solutions.

    Every ``same`` column is declared binary, not continuous: its bounds force it to 0 or 1 whenever
    the options are integral, so no child is gained or lost, but a solver may then *branch* on "this
    layer stays as an earlier child's" — the decision the diversity proof turns on. Measured
    (``benchmarks/bench_search.py``, 80 layers × 54, 10 diverse solutions, one thread): gurobipy
    10.0 → 5.8–7.1 s, HiGHS 145 → 83–105 s, the same ten objectives."""
    if diversity not in ("pairs", "layers"):
        raise SearchError(f"unknown diversity formulation {diversity!r}: use 'pairs' or 'layers'")
    cols, L = problem.columns, problem.num_layers
    n = len(cols)
    pairs = _same_pairs(cuts, L) if diversity == "pairs" else {}
    m_cols = n + (len(pairs) if diversity == "pairs" else L * len(cuts))
    layer = np.array([i for i, _ in cols], dtype=np.int64)
    kind = np.array([o.kind for _, o in cols])
    blocks, lo, hi, scale = [], [], [], []
    idx = np.arange(n)
    # One-hot slots: a pair fills both slots of its layer.
    for mask in (kind != "ffn", kind != "attn"):
        blocks.append(sp.csr_matrix((np.ones(mask.sum()), (layer[mask], idx[mask])), shape=(L, m_cols)))
        lo += [1.0] * L
        hi += [1.0] * L
        scale += [1.0] * L
    for r in rows:
        a = np.array([problem.coef(o.cost, r.what, batch) for _, o in cols])
        const = problem.coef(problem.fixed, r.what, batch)
        s = _pow2(float(np.abs(a).max(initial=0.0)))
        blocks.append(sp.csr_matrix(np.r_[a * s, np.zeros(m_cols - n)]))
        lo.append((r.lo - const) * s)
        hi.append((r.hi - const) * s)
        scale.append(s)
    half_a = [o.halves[0] for _, o in cols]
    half_f = [o.halves[1] for _, o in cols]
    if cuts and diversity == "pairs":
        by_layer: list[list[int]] = [[] for _ in range(L)]
        for j, (i, _) in enumerate(cols):
            by_layer[i].append(j)
        groups: list[tuple[int, set, set, list[int]]] = []  # (layer, attns, ffns, same columns)
        per_layer: dict[int, list[tuple[str, str]]] = {}
        for (i, a, f), k in pairs.items():
            groups.append((i, {a}, {f}, [n + k]))
            per_layer.setdefault(i, []).append((a, f))
        for i, held in per_layer.items():
            for a in dict.fromkeys(a for a, _ in held):
                fs = [f for aa, f in held if aa == a]
                if len(fs) > 1:
                    groups.append((i, {a}, set(fs), [n + pairs[(i, a, f)] for f in fs]))
            for f in dict.fromkeys(f for _, f in held):
                as_ = [a for a, ff in held if ff == f]
                if len(as_) > 1:
                    groups.append((i, set(as_), {f}, [n + pairs[(i, a, f)] for a in as_]))
        R, C, V = [], [], []
        for r, (i, As, Fs, same) in enumerate(groups):  # Σ same ≥ [attn ∈ As] + [ffn ∈ Fs] − 1
            for j in by_layer[i]:
                v = (half_a[j] in As) + (half_f[j] in Fs)
                if v:
                    R.append(r), C.append(j), V.append(-float(v))
            for k in same:
                R.append(r), C.append(k), V.append(1.0)
        for ci, prev in enumerate(cuts):  # Σ_i same_i(prev) ≤ L − min_differ
            r = len(groups) + ci
            for i in range(L):
                R.append(r), C.append(n + pairs[(i, prev[i][0], prev[i][1])]), V.append(1.0)
        blocks.append(sp.csr_matrix((V, (R, C)), shape=(len(groups) + len(cuts), m_cols)))
        lo += [-1.0] * len(groups) + [-math.inf] * len(cuts)
        hi += [math.inf] * len(groups) + [float(L - min_differ)] * len(cuts)
        scale += [1.0] * (len(groups) + len(cuts))
    elif cuts:
        half_a = np.array([h or "" for h in half_a], dtype=object)
        half_f = np.array([h or "" for h in half_f], dtype=object)
        for ci, prev in enumerate(cuts):  # same_i >= [attn matches] + [ffn matches] - 1
            ta = np.array([c[0] for c in prev], dtype=object)[layer]
            tf = np.array([c[1] for c in prev], dtype=object)[layer]
            match = (half_a == ta).astype(float) + (half_f == tf).astype(float)
            nz = match > 0
            aux = n + ci * L + np.arange(L)
            m = sp.csr_matrix((np.r_[-match[nz], np.ones(L)], (np.r_[layer[nz], np.arange(L)], np.r_[idx[nz], aux])),
                              shape=(L, m_cols))
            blocks.append(m)
            lo += [-1.0] * L
            hi += [math.inf] * L
            scale += [1.0] * L
            blocks.append(sp.csr_matrix((np.ones(L), (np.zeros(L, dtype=np.int64), aux)), shape=(1, m_cols)))
            lo.append(-math.inf)
            hi.append(float(L - min_differ))
            scale.append(1.0)
    A = sp.vstack(blocks).tocsr()
    c = np.zeros(m_cols)
    c[:n] = objective if objective is not None else [o.score for _, o in cols]
    os_ = _pow2(float(np.abs(c).max(initial=0.0)))
    return MIP(c * os_, A, np.array(lo, float), np.array(hi, float), np.ones(m_cols), np.ones(m_cols, bool), n,
               0.0, os_, np.array(scale), len(cuts))


# ------------------------------------------------------------------------------ the solvers

@dataclass
class Solved:
    status: str                   # optimal | time_limit | infeasible | cutoff | error
    x: np.ndarray | None
    objective: float | None       # the solver's, in the problem's units
    solver: str
    seconds: float
    gap: float | None = None
    fallback_reason: str | None = None
    reduced: dict | None = None   # solved on an exact reduction (_reduced): what was kept and why it is exact
    model: tuple | None = None    # (reduced MIP, its columns in the full model): the cross-check solves it too


_GUROBI_ENV: list = []  # one licence check per process, not one per solve
_GUROBI_REFUSED: list[tuple[int, int, str]] = []  # (variables, constraints, reason) the licence refused


class _Refused(Exception):
    """gurobipy's licence refused a model of this size (cached: no need to ask again)."""


def _gurobi(mip: MIP, time_limit: float, gap: float, threads: int, cutoff: float | None = None) -> Solved:
    import gurobipy as gp

    size = (len(mip.c), len(mip.lo))
    for v, c, reason in _GUROBI_REFUSED:
        if size[0] >= v and size[1] >= c:
            raise _Refused(reason)
    if not _GUROBI_ENV:
        env = gp.Env(empty=True)
        env.setParam("OutputFlag", 0)
        env.start()
        _GUROBI_ENV.append(env)
    t0 = time.perf_counter()
    with gp.Model(env=_GUROBI_ENV[0]) as m:
        m.Params.TimeLimit, m.Params.MIPGap, m.Params.MIPGapAbs = time_limit, gap, ABS_GAP
        if threads:
            m.Params.Threads = threads
        if mip.n_cuts:
            # Aggressive mixed-integer-rounding cuts: with diversity cuts the proof is the work, and
            # these close it ~2x faster (benchmarks/bench_search.py, 80 layers x 54, 10 diverse
            # solutions; Cuts=0 made single solves 15-40x slower, other cut classes gained nothing).
            m.Params.MIRCuts = 2
        if cutoff is not None:
            m.Params.Cutoff = mip.scaled(cutoff)
        x = m.addMVar(len(mip.c), lb=0.0, ub=mip.ub,
                      vtype=np.where(mip.integer, gp.GRB.BINARY, gp.GRB.CONTINUOUS))
        eq = mip.lo == mip.hi
        for mask, sense, rhs in ((eq, "=", mip.hi), (~eq & np.isfinite(mip.hi), "<", mip.hi),
                                 (~eq & np.isfinite(mip.lo), ">", mip.lo)):
            if mask.any():
                m.addMConstr(mip.A[np.flatnonzero(mask)], x, sense, rhs[mask])
        m.setObjective(mip.c @ x, gp.GRB.MINIMIZE)
        try:
            m.optimize()
        except gp.GurobiError as e:
            if e.errno == 10010:  # the pip licence's size limit
                reason = (f"gurobipy refused the model ({size[0]} variables, {size[1]} constraints): "
                          f"GurobiError {e.errno}: {e}")
                _GUROBI_REFUSED.append((*size, reason))
                raise _Refused(reason) from None
            raise
        st = {gp.GRB.OPTIMAL: "optimal", gp.GRB.TIME_LIMIT: "time_limit", gp.GRB.CUTOFF: "cutoff",
              gp.GRB.INFEASIBLE: "infeasible", gp.GRB.INF_OR_UNBD: "infeasible"}.get(m.Status, f"status {m.Status}")
        ok = m.SolCount > 0
        if cutoff is not None and st == "infeasible" and not ok:
            st = "cutoff"  # presolve may call a model infeasible when the cutoff alone makes it so
        xv = np.array(x.X) if ok else None
        return Solved(st, xv, mip.value(xv) if ok else None,
                      f"gurobi {'.'.join(map(str, gp.gurobi.version()))}", time.perf_counter() - t0,
                      m.MIPGap if ok else None)


def _highs(mip: MIP, time_limit: float, gap: float, threads: int, cutoff: float | None = None) -> Solved:
    import highspy

    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(time_limit))
    h.setOptionValue("mip_rel_gap", float(gap))
    h.setOptionValue("mip_abs_gap", ABS_GAP)
    if threads:
        h.setOptionValue("threads", int(threads))
    if cutoff is not None:
        h.setOptionValue("objective_bound", float(mip.scaled(cutoff)))
    lp = fixing.highs_lp(mip.c, mip.A, mip.lo, mip.hi, mip.ub)
    lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                       for i in mip.integer]
    t0 = time.perf_counter()
    h.passModel(lp)
    h.run()
    ms = h.getModelStatus()
    S = highspy.HighsModelStatus
    st = {S.kOptimal: "optimal", S.kTimeLimit: "time_limit", S.kInfeasible: "infeasible",
          S.kObjectiveBound: "cutoff"}.get(ms, h.modelStatusToString(ms))
    info = h.getInfo()
    ok = info.primal_solution_status == 2  # a feasible point exists (also after a time limit)
    x = np.array(h.getSolution().col_value) if ok else None
    if cutoff is not None and ok and mip.value(x) >= cutoff:
        # HiGHS (1.15) can report "optimal" with a point *above* objective_bound when none is below
        # it (even a point worse than the true optimum): when it finished, that means no child below
        # the cutoff; after a time limit, only that none was found.
        st, ok, x = "cutoff" if st == "optimal" else st, False, None
    if cutoff is not None and st == "infeasible" and not ok:
        st = "cutoff"  # infeasible *below the cutoff*: no child better than the incumbent here
    return Solved(st, x, mip.value(x) if ok else None, f"highs {h.version()}",
                  time.perf_counter() - t0, info.mip_gap if ok else None)


KEEP_PER_SLOT = 2  # option columns per one-hot slot in the first reduced model, by smallest reduced cost


def _expand(x: np.ndarray, idx: np.ndarray, n: int) -> np.ndarray:
    """A reduced model's point in the full model's ``n`` columns (the left-out ones at 0)."""
    out = np.zeros(n)
    out[idx] = x
    return out


def _sub(mip: MIP, keep: np.ndarray) -> tuple[MIP, np.ndarray]:
    """The MIP over the columns in ``keep`` (the others fixed at 0), and their indices."""
    idx = np.flatnonzero(keep)
    return MIP(mip.c[idx], mip.A[:, idx].tocsr(), mip.lo, mip.hi, mip.ub[idx], mip.integer[idx],
               int(keep[:mip.n_choice].sum()), mip.const, mip.obj_scale, mip.row_scale, mip.n_cuts), idx


def _reduced(mip: MIP, run, time_limit: float, cutoff: float | None, name: str) -> Solved:
    """Solve ``mip`` exactly on fewer columns (reduced-cost fixing, ``fixing.py``); ``run(model,
    time_limit, cutoff) -> Solved`` is one solver. First the ``KEEP_PER_SLOT`` × slots option columns
    with the smallest reduced costs (doubled while that model has no child at all); then every option
    column whose bound ``LB + d_j`` does not exceed the child found (or the cutoff) must have been in
    that model — if one was not, a larger model with it added, cut off at the child's value, settles
    it. Raises ``_Refused`` when a model is still too big for the solver's licence.

    Measured (``benchmarks/bench_search.py``, 126 layers × 100 variants, 10 diverse solutions, one
    thread): gurobipy on the reduction 26–90 s over three seeds (30–38 s on the bench's), all proven,
    where HiGHS on the whole model took 354 s and proved 5 (60 s per solve; 758 s and all 10 at 300 s,
    the same 10 objectives). HiGHS gains nothing from it (single
    solves 19–185 s), and at 80 × 54, where gurobipy takes the whole model, the reduction was slower
    (one solve 25×), so only a licence refusal (or ``reduce="always"``) takes this path."""
    t0 = time.perf_counter()
    n = mip.n_choice  # ``name``: the solver's, for a status the LP bound alone settles
    info: dict = {"option_columns": n, "kept": n, "models": 0, "bound": None}  # models: how many were solved

    def done(res: Solved | None, status: str, x=None, model=None) -> Solved:
        return Solved(status, x, mip.value(x) if x is not None else None, res.solver if res else f"{name} (LP bound)",
                      time.perf_counter() - t0, res.gap if res is not None and x is not None else None,
                      reduced=info, model=model)

    def full(res: Solved, idx: np.ndarray) -> np.ndarray | None:
        return None if res.x is None else _expand(res.x, idx, len(mip.c))

    y = fixing.lp_duals(mip.c, mip.A, mip.lo, mip.hi, mip.ub)
    if y is None:  # the LP relaxation is infeasible, so is every child
        return done(None, "infeasible")
    bound, d = fixing.lagrangian_bound(mip.c, mip.A, mip.lo, mip.hi, mip.ub, y)
    info["bound"] = bound / mip.obj_scale + mip.const
    cut = mip.scaled(cutoff) if cutoff is not None else math.inf
    if fixing.exceeds(bound, cut):
        return done(None, "cutoff")  # no child can beat the cutoff: the bound says so
    slots = int(((mip.lo == 1.0) & (mip.hi == 1.0)).sum())
    size = min(n, max(1, int(KEEP_PER_SLOT * slots)))
    order = np.sort(d[:n])
    keep = np.ones(len(mip.c), bool)

    def left() -> float:
        return max(1.0, time_limit - (time.perf_counter() - t0))

    def attempt(cut_at: float | None) -> tuple[Solved, MIP, np.ndarray]:
        model, idx = _sub(mip, keep)
        info["kept"], info["models"] = int(keep[:n].sum()), info["models"] + 1
        try:
            return run(model, left(), cut_at), model, idx
        except _Refused as e:
            raise _Refused(f"its exact reduction still has {len(model.c)} variables ({info['kept']} of {n} option "
                           f"columns)") from e

    while True:  # the cheapest columns by reduced cost, doubled until a model holds a child (or says cutoff)
        keep[:n] = d[:n] <= order[size - 1]  # ties at the threshold kept too
        res, model, idx = attempt(cutoff)
        if res.x is not None or res.status != "infeasible" or keep[:n].all():
            break
        size = min(n, 2 * size)
    x1 = full(res, idx)
    if x1 is None and res.status not in ("cutoff", "infeasible"):
        return done(res, res.status, None, (model, idx))  # stopped at the time limit with no child
    v1 = float(mip.c @ x1) if x1 is not None else math.inf
    upper = min(cut, v1)
    missing = ~keep[:n] & (fixing.needed(bound, d[:n], upper) if math.isfinite(upper) else True)
    if not missing.any():  # every column a better child could use was in the model: its answer is exact
        return done(res, res.status, x1, (model, idx))
    keep[:n] |= missing
    res2, model, idx = attempt(upper / mip.obj_scale + mip.const if math.isfinite(upper) else None)
    if res2.x is not None:
        return done(res2, res2.status, full(res2, idx), (model, idx))
    if x1 is not None and not fixing.exceeds(v1, cut):  # the larger model found nothing better than x1
        return done(res2, "optimal" if res2.status in ("cutoff", "infeasible") else res2.status, x1, (model, idx))
    return done(res2, res2.status, None, (model, idx))


def solve(mip: MIP, solver: str = "auto", time_limit: float = 60.0, gap: float = DEFAULT_GAP, threads: int = 0,
          cutoff: float | None = None, reduce: str = "auto") -> Solved:
    """Solve with gurobipy (``auto``: when installed and its licence admits the model) or HiGHS.
    ``cutoff``: only children with an objective below it are of interest (status ``cutoff``: none).
    ``reduce``: ``auto`` — when gurobipy's licence refuses the model for its size, solve an exact
    reduction of it with gurobipy (:func:`_reduced`) before falling back to HiGHS; ``always`` — the
    reduction with whichever solver runs; ``never``."""
    if reduce not in ("auto", "always", "never"):
        raise SearchError(f"unknown reduce={reduce!r}: use 'auto', 'always' or 'never'")
    reason = None
    if solver in ("auto", "gurobi"):
        try:
            import gurobipy as gp
        except ImportError:
            reason = "gurobipy is not installed"
        else:
            def grb(m, tl, co):
                return _gurobi(m, tl, gap, threads, co)

            try:
                return (_reduced(mip, grb, time_limit, cutoff, "gurobi") if reduce == "always"
                        else grb(mip, time_limit, cutoff))
            except _Refused as e:
                reason = str(e)
                if reduce == "auto":
                    try:
                        out = _reduced(mip, grb, time_limit, cutoff, "gurobi")
                        out.reduced["why"] = reason
                        return out
                    except _Refused as e2:
                        reason += f"; an exact reduction (reduced-cost fixing) was refused too: {e2}"
            except gp.GurobiError as e:  # no licence, ...
                reason = (f"gurobipy refused the model ({len(mip.c)} variables, {len(mip.lo)} "
                          f"constraints): GurobiError {e.errno}: {e}")
        if solver == "gurobi":
            raise SearchError(f"search_solver='gurobi' but {reason}; set search_solver='auto' to fall "
                              "back to HiGHS automatically")
    elif solver != "highs":
        raise SearchError(f"unknown solver {solver!r}: use 'auto', 'gurobi' or 'highs'")

    def hgs(m, tl, co):
        return _highs(m, tl, gap, threads, co)

    out = _reduced(mip, hgs, time_limit, cutoff, "highs") if reduce == "always" else hgs(mip, time_limit, cutoff)
    out.fallback_reason = reason
    return out


def decode(problem: Problem, x: np.ndarray) -> list[tuple[str, str, bool]]:
    """Option binaries -> per layer (attn, ffn, coupled); refuses a point that is not one-hot."""
    chosen: list[list[Option]] = [[] for _ in range(problem.num_layers)]
    for j, (i, o) in enumerate(problem.columns):
        if x[j] > 0.5:
            chosen[i].append(o)
    out = []
    for i, opts in enumerate(chosen):
        pair = [o for o in opts if o.kind == "pair"]
        attn = [o for o in opts if o.kind == "attn"]
        ffn = [o for o in opts if o.kind == "ffn"]
        if (len(pair), len(attn), len(ffn)) not in ((1, 0, 0), (0, 1, 1)):
            raise SearchError(f"the solver's point is not one option per slot at layer {i}: "
                              f"{[o.name for o in opts]}")
        out.append((*pair[0].halves, True) if pair else (attn[0].name, ffn[0].name, False))
    return out


def differing_layers(a: Sequence, b: Sequence) -> int:
    """Layers whose (attention, FFN) differ (a coupled block counts as its halves)."""
    return sum((x[0], x[1]) != (y[0], y[1]) for x, y in zip(a, b))


def reevaluate(problem: Problem, child: Sequence, rows: Sequence[Row], batch: int,
               objective: np.ndarray | None = None, cuts: Sequence[Sequence] = (), min_differ: int = 0
               ) -> tuple[float, list[str]]:
    """(objective, violations) of ``child`` in float64 straight from the option tables: every
    constraint row and every diversity cut, independently of any solver's matrices."""
    picks = problem.picks(child)
    if objective is None:
        value = float(sum(o.score for o in picks))
    else:
        col = {(i, o.name): j for j, (i, o) in enumerate(problem.columns)}
        layer_of = [i for i, c in enumerate(child) for _ in range(1 if len(c) > 2 and c[2] else 2)]
        value = float(sum(objective[col[(i, o.name)]] for i, o in zip(layer_of, picks)))
    bad = []
    for r in rows:
        v = problem.total(child, r.what, batch)
        if not _within(v, r.lo, r.hi):
            bad.append(f"{r.name}: {v:.10g} not in [{r.lo:.10g}, {r.hi:.10g}]")
    for k, prev in enumerate(cuts):
        d = differing_layers(child, prev)
        if d < min_differ:
            bad.append(f"differs from earlier solution {k + 1} in {d} layers < {min_differ}")
    return value, bad


@dataclass
class Checked:
    """A solve whose child was re-checked: ``child`` None when there is none (see ``solved.status``)."""

    solved: Solved
    child: list | None
    objective: float | None       # float64, from the option tables
    check: dict                   # what was re-checked and what the other solver said
    mip_size: tuple[int, int] = (0, 0)

    @property
    def proven(self) -> bool:
        """Optimal to the gap, or shown to have no child below the cutoff."""
        return self.solved.status in ("optimal", "cutoff", "infeasible")


def _other_solver(name: str) -> str:
    return "highs" if name.startswith("gurobi") else "gurobi"


def _attempt(problem, mip, rows, batch, objective, cuts, min_differ, solver, time_limit, gap, threads, cutoff,
             reduce="auto", within=None):
    """(Solved, child, float64 objective, violations) for one solver; child None when it found none.
    ``within``: (reduced MIP, its columns) — solve that model instead (``reduce`` ignored); its point
    is put back into ``mip``'s columns."""
    try:
        if within is None:
            res = solve(mip, solver, time_limit, gap, threads, cutoff, reduce)
        else:
            res = solve(within[0], solver, time_limit, gap, threads, cutoff, "never")
            if res.x is not None:
                res.x = _expand(res.x, within[1], len(mip.c))
    except SearchError as e:
        return None, None, None, [str(e)]
    if res.x is None:
        return res, None, None, []
    try:
        child = decode(problem, res.x)
    except SearchError as e:
        return res, None, None, [str(e)]
    value, bad = reevaluate(problem, child, rows, batch, objective, cuts, min_differ)
    return res, child, value, bad


def _available(solver: str, mip: MIP) -> str | None:
    """None when ``solver`` can run ``mip``, else why not (without asking the licence twice)."""
    if solver == "highs":
        return None
    try:
        import gurobipy  # noqa: F401
    except ImportError:
        return "gurobipy is not installed"
    for v, c, reason in _GUROBI_REFUSED:
        if len(mip.c) >= v and len(mip.lo) >= c:
            return reason
    return None


def solve_checked(problem: Problem, rows: Sequence[Row], batch: int, objective: np.ndarray | None = None,
                  cuts: Sequence[Sequence] = (), min_differ: int = 0, solver: str = "auto",
                  time_limit: float = 60.0, gap: float = DEFAULT_GAP, threads: int = 0,
                  cutoff: float | None = None, cross_check: bool = True, diversity: str = "pairs",
                  reduce: str = "auto") -> Checked:
    """Formulate, solve, re-check the child in float64 and (``cross_check``) solve again with the
    other solver; return the verified child. An answer that breaks a constraint or that the other
    solver beats by more than the gap (``gap × |objective|`` + the absolute gap) is replaced by the
    other solver's verified child, with the reason in ``check["note"]``; :class:`SearchError` when
    neither solver yields a verified child but one claimed to. ``diversity``: the cuts'
    formulation (:func:`formulate`); ``pairs`` is the faster for both solvers since its ``same``
    columns are binary (``benchmarks/bench_search.py``, 80 layers × 54, one solve with 7 cuts:
    gurobipy 0.8–1.0 s against 2.0 s, HiGHS 12 s against 44 s); both have the same integer solutions.
    ``reduce``: :func:`solve`'s; when the answer came from an exact reduction, the other solver
    cross-checks that reduced model (the reduction's own proof is float64 arithmetic, ``fixing.py``)."""
    mip = formulate(problem, rows, batch, objective, cuts, min_differ, diversity)
    args = (problem, mip, rows, batch, objective, cuts, min_differ)
    r1, c1, v1, bad1 = _attempt(*args, solver, time_limit, gap, threads, cutoff, reduce)
    if r1 is None:  # the requested solver cannot run at all (search_solver='gurobi' without it)
        raise SearchError(bad1[0])
    check: dict = {"reevaluated": "float64 from the option tables", "objective": v1,
                   "solver_objective": r1.objective, "violations": bad1}
    if r1.reduced:
        check["reduced"] = r1.reduced
    other = _other_solver(r1.solver)
    why_not = _available(other, r1.model[0] if r1.model else mip)
    if (cross_check or bad1) and why_not is None:
        r2, c2, v2, bad2 = _attempt(*args, other, time_limit, gap, threads, cutoff, reduce, r1.model)
        if r2 is None or (r2.fallback_reason and not r2.solver.startswith(other)):
            why_not = bad2[0] if r2 is None else r2.fallback_reason
    if (cross_check or bad1) and why_not is not None:
        check["cross_check"] = {"solver": other, "skipped": why_not}
    out = Checked(r1, c1 if not bad1 else None, v1 if not bad1 else None, check, (len(mip.c), len(mip.lo)))
    if (cross_check or bad1) and why_not is None:
        ok1, ok2 = c1 is not None and not bad1, c2 is not None and not bad2
        tol = gap * max(abs(v1 or 0.0), abs(v2 or 0.0)) + 2 * ABS_GAP / mip.obj_scale
        check["cross_check"] = {"solver": r2.solver, "status": r2.status, "objective": v2, "violations": bad2,
                                "seconds": round(r2.seconds, 4),
                                "agrees": (ok1 == ok2) and (not ok1 or abs(v1 - v2) <= tol)}
        if ok2 and (not ok1 or v2 < v1 - tol):
            why = (f"its child fails the float64 re-check ({'; '.join(bad1)})" if bad1 else
                   f"it reported {r1.status} with no child" if not ok1 else
                   f"it reported {r1.status} at objective {v1:.12g} but {r2.solver} found {v2:.12g} (beyond the gap)")
            check["note"] = f"{r1.solver}'s answer refused: {why}; {r2.solver}'s verified child used instead"
            r2.fallback_reason = r1.fallback_reason
            out = Checked(r2, c2, v2, check, out.mip_size)
    if bad1 and out.child is None:
        raise SearchError(f"solver {r1.solver} returned a child that fails the float64 re-check ({'; '.join(bad1)}) "
                          f"and no other solver gave a verified child ({check.get('cross_check')}); try "
                          "search_solver='highs' or report the cost table")
    check["used"] = out.solved.solver
    return out
