"""Reduced-cost fixing (``search/fixing.py``, ``mip._reduced``): the Lagrangian bound holds for every
child of small instances whatever the multipliers (brute force over all children as the oracle),
the reduced solve equals brute force with both solvers — through one model and through the second
one that a fixed-but-needed column forces — with cutoffs and infeasible budgets, a first model with
no child is doubled step by step, and a model over gurobipy's pip licence is solved by gurobipy on
its exact reduction."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from test_mip_checks import ATTN, FFN, brute_force, combos, llama70b_like
from test_search import make_problem

from puzzlelib.search import fixing, mip
from puzzlelib.search.mip import Budget, SearchError
from puzzlelib.search.searcher import Searcher

try:
    import gurobipy  # noqa: F401

    SOLVERS = ["highs", "gurobi"]
except ImportError:
    SOLVERS = ["highs"]

SMALL_ATTN = dict(list(ATTN.items())[1:4])
SMALL_FFN = dict(list(FFN.items())[:3] + [("ffn:noop", 0)])


def _instance(seed: int, joint: bool = False):
    """3 layers x (3 attention x 4 FFN), a speed-up budget, and two earlier children as cuts."""
    p = llama70b_like(L=3, seed=seed, joint=joint, attn=SMALL_ATTN, ffn=SMALL_FFN)
    rng = np.random.default_rng(seed)
    s = Searcher(p, Budget(speedup=float(rng.uniform(1.0, 1.4))), solver="highs", gap=0.0, cross_check=False)
    children = [[c for c, _ in picks] for picks in itertools.product(*(combos(p, i) for i in range(3)))]
    cuts = [children[k] for k in rng.choice(len(children), 2, replace=False)]
    return p, s, children, cuts


def _point(p, m: mip.MIP, child, cuts) -> np.ndarray:
    """The MIP's column vector of ``child`` (options one-hot, each "same" column 1 where it matches)."""
    x = np.zeros(len(m.c))
    for j, (i, o) in enumerate(p.columns):
        a, f, coupled = child[i]
        x[j] = (o.name == f"{a}+{f}") if coupled else (o.name in (a, f))
    for (i, a, f), k in mip._same_pairs(cuts, p.num_layers).items():
        x[m.n_choice + k] = (child[i][0], child[i][1]) == (a, f)
    return x


@pytest.mark.parametrize("seed,joint", [(0, False), (1, True), (2, False)])
def test_the_bound_holds_for_every_child_and_any_multipliers(seed, joint):
    p, s, children, cuts = _instance(seed, joint)
    rows = mip.constraint_rows(p, s.budget, s.batches[-1], s.ref_tps)
    m = mip.formulate(p, rows, s.batches[-1], None, cuts, 2)
    rng = np.random.default_rng(seed)
    lp = fixing.lp_duals(m.c, m.A, m.lo, m.hi, m.ub)
    ys = [lp] + [rng.normal(0, 0.5, len(m.lo)) for _ in range(20)]  # the LP's and arbitrary ones
    feasible = 0
    for child in children:
        x = _point(p, m, child, cuts)
        ax = m.A @ x
        if not (np.all(ax >= m.lo - 1e-9) and np.all(ax <= m.hi + 1e-9)):
            continue  # breaks the budget or a cut (the rows say so, as brute force would)
        feasible += 1
        for y in ys:
            bound, d = fixing.lagrangian_bound(m.c, m.A, m.lo, m.hi, m.ub, y)
            value = float(m.c @ x)
            assert value >= bound - 1e-9
            on = x > 0.5
            # each column the child uses: fixing it would have been wrong only if this failed
            assert np.all(value >= bound + np.maximum(d[on], 0) - 1e-9)
            assert fixing.needed(bound, d, value)[on].all()
    assert feasible == sum(1 for c in children if all(mip.differing_layers(c, k) >= 2 for k in cuts)
                           and all(mip._within(p.total(c, r.what, s.batches[-1]), r.lo, r.hi) for r in rows))
    assert feasible > 0


@pytest.mark.parametrize("solver", SOLVERS)
def test_reduced_solves_equal_brute_force_through_one_model_and_two(solver, monkeypatch):
    # one or two option columns per slot first (of 3-4), so a needed column is sometimes fixed and
    # the second model runs, and sometimes not
    models = set()
    for seed in range(8):
        monkeypatch.setattr(mip, "KEEP_PER_SLOT", 1 + seed % 2)
        p, s, _, cuts = _instance(seed, joint=seed % 3 == 1)
        for b in s.batches:
            rows = mip.constraint_rows(p, s.budget, b, s.ref_tps)
            oracle = brute_force(p, {b: rows}, cuts, 2)
            res = mip.solve_checked(p, rows, b, cuts=cuts, min_differ=2, solver=solver, gap=0.0,
                                    cross_check=False, reduce="always")
            if oracle is None:
                assert res.child is None and res.solved.status in ("infeasible", "cutoff"), res.solved
                continue
            assert res.objective == pytest.approx(oracle, rel=1e-12, abs=1e-15), (seed, b)
            assert res.solved.status == "optimal" and res.solved.reduced["models"] >= 1
            assert res.check["reduced"]["kept"] <= res.check["reduced"]["option_columns"]
            models.add(res.solved.reduced["models"])
            # a cutoff at the optimum leaves nothing below it; just above it, the optimum again
            below = mip.solve_checked(p, rows, b, cuts=cuts, min_differ=2, solver=solver, gap=0.0,
                                      cross_check=False, reduce="always", cutoff=oracle - 1e-6)
            assert below.child is None and below.solved.status == "cutoff"
            above = mip.solve_checked(p, rows, b, cuts=cuts, min_differ=2, solver=solver, gap=0.0,
                                      cross_check=False, reduce="always", cutoff=oracle + 1e-6)
            assert above.objective == pytest.approx(oracle, rel=1e-12)
    assert 1 in models and max(models) >= 2  # both paths were taken


def test_an_infeasible_budget_is_proven_by_the_lp_bound():
    p = make_problem(L=3, seed=0)
    rows = [mip.Row("params", "params", -np.inf, 0.5 * p.coef(p.fixed, "params", 1))]  # below the fixed part
    res = mip.solve(mip.formulate(p, rows, 1), "highs", reduce="always")
    assert res.status == "infeasible" and res.x is None and res.reduced["models"] == 0


def test_cross_check_runs_on_the_reduced_model():
    p, s, _, cuts = _instance(4)
    b = s.batches[-1]
    rows = mip.constraint_rows(p, s.budget, b, s.ref_tps)
    res = mip.solve_checked(p, rows, b, cuts=cuts, min_differ=2, solver="highs", gap=0.0, reduce="always")
    if "skipped" in res.check["cross_check"]:
        pytest.skip(res.check["cross_check"]["skipped"])
    assert res.check["cross_check"]["agrees"] is True
    assert res.solved.model[0].n_choice == res.check["reduced"]["kept"] < len(p.columns)


def test_unknown_reduce_is_refused():
    p = make_problem(L=3, seed=0)
    with pytest.raises(SearchError, match="'auto', 'always' or 'never'"):
        mip.solve(mip.formulate(p, [], 1), "highs", reduce="sometimes")


def test_a_model_over_the_pip_licence_is_solved_by_gurobipy_on_its_exact_reduction():
    gp = pytest.importorskip("gurobipy")
    p = make_problem(L=80, n_attn=6, n_ffn=22, pairs=0, seed=1)  # 2240 binaries > 2000
    s = Searcher(p, Budget(speedup=1.5), solver="auto", gap=1e-6, cross_check=False)
    spec = s.best()
    reduced = spec.solver.get("reduced")
    if reduced is None or "why" not in reduced:
        pytest.skip(f"this gurobipy licence ({gp.gurobi.version()}) admits 2240 variables")
    assert spec.solver["solver"].startswith("gurobi") and spec.solver["proven"]
    assert "10010" in reduced["why"] and reduced["kept"] < reduced["option_columns"] == 2240
    s_highs = Searcher(p, Budget(speedup=1.5), solver="highs", gap=1e-6, cross_check=False)
    s_highs.reduce = "never"
    full = s_highs.best()
    assert spec.predicted["score"] == pytest.approx(full.predicted["score"], rel=2e-6)


def test_the_first_model_doubles_while_it_holds_no_child(monkeypatch):
    # a solver that finds nothing until it sees at least 60 % of the option columns: the reduction must
    # double the model (not give up on it) and still return the true optimum
    monkeypatch.setattr(mip, "KEEP_PER_SLOT", 1)
    p, s, _, cuts = _instance(2)
    b = s.batches[-1]
    rows = mip.constraint_rows(p, s.budget, b, s.ref_tps)
    m = mip.formulate(p, rows, b, None, cuts, 2)
    seen = []

    def picky(model, time_limit, cutoff):
        seen.append(model.n_choice)
        if model.n_choice < 0.6 * m.n_choice:
            return mip.Solved("infeasible", None, None, "picky", 0.0)
        return mip._highs(model, time_limit, 0.0, 1, cutoff)

    res = mip._reduced(m, picky, 60.0, None, "picky")
    # doubled step by step (6, 12, 21 of 21 here), not straight to the whole model after one failure
    assert all(a < b for a, b in zip(seen, seen[1:])) and seen[1] < m.n_choice and len(seen) >= 3, seen
    assert res.reduced["models"] == len(seen) >= 2
    assert res.objective == pytest.approx(brute_force(p, {b: rows}, cuts, 2), rel=1e-12)
