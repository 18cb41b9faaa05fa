"""The search's optimisation problem: options, budgets, the MIP and its two solvers.

What it does: holds a solver-independent :class:`Problem` (per layer, one-hot attention and FFN
slots; a coupled pair is one option filling both), turns budgets (:class:`Budget`: throughput or
speed-up, latency, memory, parameters) into linear rows, formulates the mixed-integer program as
matrices (:func:`formulate`, diversity cuts included) and solves it with gurobipy when installed and
its licence admits the size, otherwise HiGHS, recording why (:func:`solve`). ``search.py`` builds
problems from the stage artifacts and runs the stage; this module reads and writes nothing.
Leaves out: anything about where costs and scores come from.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from .config import RunConfig

# Scores where larger means closer to the parent; everything else (kl, lm_loss, ...) is minimised.
HIGHER_IS_BETTER = ("top1", "top1_agreement", "agreement", "accuracy", "mc_accuracy")
TOL = 1e-7  # relative slack when re-checking a solver's answer (solvers work to ~1e-9 feasibility)

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
    """One way to fill a slot: a sub-block variant (kind attn|ffn) or a coupled pair (kind pair)."""

    name: str                 # "attn:kv2", "ffn:0.50" or "attn:kv1+ffn:0.50"
    kind: str
    score: float              # degradation vs the parent: 0 for the parent's own sub-block
    cost: Mapping[str, float]  # params, weight_bytes, kv_bytes_per_token, prefill_ms@bB, decode_ms@bB

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

    def coef(self, cost: Mapping[str, float], what: str, batch: int) -> float:
        """An option's (or the fixed part's) contribution to a constrained sum at ``batch``."""
        if what == "params":
            return float(cost["params"])
        prompt, gen = self.scenarios[batch]
        if what == "memory":  # the KV cache must hold prompt + generation for every sequence
            return float(cost["weight_bytes"]) + batch * (prompt + gen) * float(cost["kv_bytes_per_token"])
        return float(cost[f"prefill_ms@b{batch}"]) + gen * float(cost[f"decode_ms@b{batch}"])

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


def build_problem(costs, scores: Mapping[tuple[int, str], float], metric: str = "kl",
                  parent_value: float | None = None, exclude_ops: Sequence[str] = ()) -> Problem:
    """A :class:`Problem` from a ``profiling.CostTable`` and ``{(layer, variant): score}``.

    Options are the variants with both a cost row and a score (plus the parent's own sub-blocks,
    degradation 0 by definition); coupled pairs are score keys ``"attn:X+ffn:Y"`` costed as the sum
    of their halves. ``parent_value`` is the metric's value for the parent itself (0 for KL); it
    defaults to the score of the parent's own sub-block at each layer. ``exclude_ops`` drops
    variants by op, e.g. ("linear",) for a vLLM-servable child.
    """
    sign = -1.0 if metric in HIGHER_IS_BETTER else 1.0
    parent = costs.parent_choices()
    cols = ("params", "weight_bytes", "kv_bytes_per_token")
    timed = [f"{m}@b{s.batch}" for s in costs.scenarios for m in ("prefill_ms", "decode_ms")]
    layers, skipped = [], []
    for i in range(costs.num_layers):
        ref = parent_value
        if ref is None:
            ref = next((scores[(i, n)] for n in parent[i] if (i, n) in scores), 0.0 if sign > 0 else None)
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
                lay[kind].append(Option(name, kind, s, {c: float(row[c]) for c in cols + tuple(timed)}))
        names = {o.name for k in ("attn", "ffn") for o in lay[k]}
        profiled = set(costs.variants(i, "attn")) | set(costs.variants(i, "ffn"))
        skipped += [(li, n) for li, n in scores if li == i and "+" not in n and n not in profiled]
        for (li, name), value in scores.items():
            if li != i or "+" not in name:
                continue
            a, f = name.split("+", 1)
            if a not in names or f not in names:
                skipped.append((i, name))
                continue
            ra, rf = costs.row(i, a), costs.row(i, f)
            lay["pair"].append(Option(name, "pair", sign * (float(value) - ref),
                                      {c: float(ra[c]) + float(rf[c]) for c in cols + tuple(timed)}))
        layers.append(lay)
    fixed = {c: costs.fixed(c) for c in cols}
    fixed.update({f"{m}@b{s.batch}": costs.fixed(m, s.batch) for s in costs.scenarios
                  for m in ("prefill_ms", "decode_ms")})
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
    """Hardware budgets; 0 switches a constraint off."""

    min_speedup: float = 0.0        # × the parent's best predicted throughput (see reference())
    min_tokens_per_s: float = 0.0   # generated tokens per second of the whole batch
    max_latency_ms: float = 0.0     # one scenario's prefill + gen_len decode steps
    max_memory_bytes: float = 0.0   # weights + batch × (prompt + gen) × KV bytes per token
    max_params: float = 0.0

    @classmethod
    def from_config(cls, cfg: RunConfig, parent_params: float) -> Budget:
        return cls(cfg.search_speedup, cfg.search_min_tokens_per_s, cfg.search_max_latency_ms,
                   cfg.search_max_memory_mib * 2**20, cfg.search_max_params_ratio * parent_params)


# Config field behind each constraint, for error messages.
FIELDS = {"speedup": "search_speedup", "throughput": "search_min_tokens_per_s",
          "latency": "search_max_latency_ms", "memory": "search_max_memory_mib",
          "params": "search_max_params_ratio"}


def reference(problem: Problem, budget: Budget, batches: Sequence[int]) -> tuple[int, float]:
    """(batch, tokens/s) of the parent at its best batch size among those that fit the memory
    budget (all of them when none fits): what a speed-up is measured against, as in the paper."""
    ev = {b: problem.evaluate(problem.parent, b) for b in batches}
    fits = [b for b in batches if not budget.max_memory_bytes or ev[b]["memory_bytes"] <= budget.max_memory_bytes]
    b = max(fits or batches, key=lambda b: ev[b]["tokens_per_s"])
    return b, ev[b]["tokens_per_s"]


def constraint_rows(problem: Problem, budget: Budget, batch: int, ref_tps: float
                    ) -> list[tuple[str, str, float]]:
    """[(name, what, limit)]: the active constraints at ``batch`` as ``Σ what ≤ limit``."""
    gen = problem.scenarios[batch][1]
    rows = []
    if budget.min_speedup:
        rows.append(("speedup", "time", 1e3 * batch * gen / (budget.min_speedup * ref_tps)))
    if budget.min_tokens_per_s:
        rows.append(("throughput", "time", 1e3 * batch * gen / budget.min_tokens_per_s))
    if budget.max_latency_ms:
        rows.append(("latency", "time", budget.max_latency_ms))
    if budget.max_memory_bytes:
        rows.append(("memory", "memory", budget.max_memory_bytes))
    if budget.max_params:
        rows.append(("params", "params", budget.max_params))
    return rows


def check(problem: Problem, child: Sequence, budget: Budget, batch: int, ref_tps: float) -> dict:
    """{constraint: {"limit", "predicted", "ok"}} for ``child`` at ``batch`` (predicted costs)."""
    out = {}
    for name, what, limit in constraint_rows(problem, budget, batch, ref_tps):
        v = problem.total(child, what, batch)
        out[name] = {"what": what, "limit": limit, "predicted": v, "ok": v <= limit * (1 + TOL)}
    return out


# ------------------------------------------------------------------------------ the MIP

@dataclass
class MIP:
    """``min c·x + const  s.t.  A x (sense) b,  lb ≤ x ≤ ub,  x[integer] ∈ ℤ`` — both solvers read this."""

    c: np.ndarray
    A: sp.csr_matrix
    sense: np.ndarray          # '<', '>' or '=' per row
    b: np.ndarray
    ub: np.ndarray
    integer: np.ndarray        # bool per column
    n_choice: int              # the first n_choice columns are the option binaries
    const: float = 0.0


def formulate(problem: Problem, rows: Sequence[tuple[str, str, float]], batch: int,
              objective: np.ndarray | None = None, cuts: Sequence[Sequence] = (), min_differ: int = 0) -> MIP:
    """The MIP at ``batch``: one-hot slots, ``rows`` (from :func:`constraint_rows`) and one
    diversity cut per earlier child in ``cuts`` (it must differ in ≥ ``min_differ`` layers)."""
    cols, L = problem.columns, problem.num_layers
    n = len(cols)
    entries: list[tuple[int, int, float]] = []
    sense, rhs = [], []

    def row(coefs: list[tuple[int, float]], s: str, b: float) -> None:
        r = len(rhs)
        entries.extend((r, j, v) for j, v in coefs if v)
        sense.append(s)
        rhs.append(b)

    per_layer: list[list[tuple[int, Option]]] = [[] for _ in range(L)]
    for j, (i, o) in enumerate(cols):
        per_layer[i].append((j, o))
    for lay in per_layer:  # a pair fills both slots of its layer
        row([(j, 1.0) for j, o in lay if o.kind != "ffn"], "=", 1.0)
        row([(j, 1.0) for j, o in lay if o.kind != "attn"], "=", 1.0)
    for _, what, limit in rows:
        row([(j, problem.coef(o.cost, what, batch)) for j, (_, o) in enumerate(cols)], "<",
            limit - problem.coef(problem.fixed, what, batch))
    for k, prev in enumerate(cuts):
        for i, c in enumerate(prev):  # same_i >= [attn matches] + [ffn matches] - 1
            match = [(j, -float((o.halves[0] == c[0]) + (o.halves[1] == c[1]))) for j, o in per_layer[i]]
            row([(n + k * L + i, 1.0)] + match, ">", -1.0)
        row([(n + k * L + i, 1.0) for i in range(L)], "<", float(L - min_differ))
    m = n + L * len(cuts)
    r, j, v = zip(*entries) if entries else ((), (), ())
    A = sp.csr_matrix((v, (r, j)), shape=(len(rhs), m))
    c = np.zeros(m)
    c[:n] = objective if objective is not None else [o.score for _, o in cols]
    return MIP(c, A, np.array(sense), np.array(rhs, float), np.ones(m), np.arange(m) < n, n)


@dataclass
class Solved:
    status: str                   # optimal | time_limit | infeasible | error
    x: np.ndarray | None
    objective: float | None
    solver: str
    seconds: float
    gap: float | None = None
    fallback_reason: str | None = None


_GUROBI_ENV: list = []  # one licence check per process, not one per solve


def _gurobi(mip: MIP, time_limit: float, gap: float, threads: int) -> Solved:
    import gurobipy as gp

    if not _GUROBI_ENV:
        env = gp.Env(empty=True)
        env.setParam("OutputFlag", 0)
        env.start()
        _GUROBI_ENV.append(env)
    t0 = time.perf_counter()
    with gp.Model(env=_GUROBI_ENV[0]) as m:
        m.Params.TimeLimit, m.Params.MIPGap = time_limit, gap
        if threads:
            m.Params.Threads = threads
        x = m.addMVar(len(mip.c), lb=0.0, ub=mip.ub,
                      vtype=np.where(mip.integer, gp.GRB.BINARY, gp.GRB.CONTINUOUS))
        m.addMConstr(mip.A, x, mip.sense, mip.b)
        m.setObjective(mip.c @ x, gp.GRB.MINIMIZE)
        m.optimize()
        st = {gp.GRB.OPTIMAL: "optimal", gp.GRB.TIME_LIMIT: "time_limit",
              gp.GRB.INFEASIBLE: "infeasible", gp.GRB.INF_OR_UNBD: "infeasible"}.get(m.Status, f"status {m.Status}")
        ok = m.SolCount > 0
        return Solved(st, np.array(x.X) if ok else None, m.ObjVal + mip.const if ok else None,
                      f"gurobi {'.'.join(map(str, gp.gurobi.version()))}", time.perf_counter() - t0,
                      m.MIPGap if ok else None)


def _highs(mip: MIP, time_limit: float, gap: float, threads: int) -> Solved:
    import highspy

    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(time_limit))
    h.setOptionValue("mip_rel_gap", float(gap))
    if threads:
        h.setOptionValue("threads", int(threads))
    inf = highspy.kHighsInf
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = len(mip.c), len(mip.b)
    lp.col_cost_, lp.col_lower_, lp.col_upper_ = mip.c, np.zeros(len(mip.c)), mip.ub
    lp.row_lower_ = np.where(mip.sense == "<", -inf, mip.b)
    lp.row_upper_ = np.where(mip.sense == ">", inf, mip.b)
    A = mip.A.tocsc()
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = A.indptr, A.indices, A.data
    lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                       for i in mip.integer]
    t0 = time.perf_counter()
    h.passModel(lp)
    h.run()
    ms = h.getModelStatus()
    st = {highspy.HighsModelStatus.kOptimal: "optimal", highspy.HighsModelStatus.kTimeLimit: "time_limit",
          highspy.HighsModelStatus.kInfeasible: "infeasible"}.get(ms, h.modelStatusToString(ms))
    info = h.getInfo()
    ok = info.primal_solution_status == 2  # a feasible point exists (also after a time limit)
    x = np.array(h.getSolution().col_value) if ok else None
    return Solved(st, x, float(mip.c @ x) + mip.const if ok else None, f"highs {h.version()}",
                  time.perf_counter() - t0, info.mip_gap if ok else None)


def solve(mip: MIP, solver: str = "auto", time_limit: float = 60.0, gap: float = 1e-4, threads: int = 0) -> Solved:
    """Solve with gurobipy (``auto``: when installed and its licence admits the model) or HiGHS."""
    reason = None
    if solver in ("auto", "gurobi"):
        try:
            import gurobipy as gp
        except ImportError:
            reason = "gurobipy is not installed"
        else:
            try:
                return _gurobi(mip, time_limit, gap, threads)
            except gp.GurobiError as e:  # the pip licence's size limit (10010), no licence, ...
                reason = (f"gurobipy refused the model ({len(mip.c)} variables, {len(mip.b)} "
                          f"constraints): GurobiError {e.errno}: {e}")
        if solver == "gurobi":
            raise SearchError(f"search_solver='gurobi' but {reason}; set search_solver='auto' to fall "
                              "back to HiGHS automatically")
    elif solver != "highs":
        raise SearchError(f"unknown solver {solver!r}: use 'auto', 'gurobi' or 'highs'")
    out = _highs(mip, time_limit, gap, threads)
    out.fallback_reason = reason
    return out


def decode(problem: Problem, x: np.ndarray) -> list[tuple[str, str, bool]]:
    """Option binaries -> per layer (attn, ffn, coupled)."""
    chosen: list[list[Option]] = [[] for _ in range(problem.num_layers)]
    for j, (i, o) in enumerate(problem.columns):
        if x[j] > 0.5:
            chosen[i].append(o)
    out = []
    for i, opts in enumerate(chosen):
        pair = [o for o in opts if o.kind == "pair"]
        if pair:
            out.append((*pair[0].halves, True))
        else:
            out.append((next(o.name for o in opts if o.kind == "attn"),
                        next(o.name for o in opts if o.kind == "ffn"), False))
    return out
