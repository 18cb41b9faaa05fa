"""Stage 04 (search): MIP optimum == brute force (both solvers), diverse solutions, infeasible
budgets, the batch-size trick, coupled pairs, baselines at the same budget, and the whole stage on
a tiny run (stages 00–03 real, in seconds)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from puzzlelib.search import baselines, mip, stage as search
from puzzlelib.core.config import ConfigError, RunConfig
from puzzlelib.profiling.costs import CostTable, Scenario
from puzzlelib.search.mip import Budget, InfeasibleBudget, Option, Problem
from puzzlelib.search.searcher import ChildSpec, Searcher

try:
    import gurobipy  # noqa: F401

    SOLVERS = ["highs", "auto"]  # auto = gurobipy when its licence admits the model
except ImportError:
    SOLVERS = ["highs"]
BATCHES = (1, 8)
SCEN = {1: (32, 16), 8: (32, 16)}


# ------------------------------------------------------------------------------ synthetic problems

def _cost(rng, scale: float, kv: float, batches=BATCHES) -> dict:
    """Costs of one option: time grows with scale (and with batch, sub-linearly), KV with kv."""
    c = {"params": 1000 * scale, "weight_bytes": 4000 * scale, "kv_bytes_per_token": 64 * kv}
    for b in batches:
        c[f"prefill_ms@b{b}"] = scale * (1 + 0.3 * b) * rng.uniform(0.8, 1.2)
        c[f"decode_ms@b{b}"] = (0.1 * scale + 0.02 * kv * b) * rng.uniform(0.8, 1.2)
    return c


def make_problem(L: int = 3, n_attn: int = 3, n_ffn: int = 3, pairs: int = 1, seed: int = 0,
                 batches=BATCHES) -> Problem:
    """Random but realistic: option 0 of each slot is the parent (score 0, most expensive); the
    last option is a no-op (free, worst score); pairs are cheap and good (coupled BLD)."""
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(L):
        attn = [Option("attn:kv4" if j == 0 else "attn:noop" if j == n_attn - 1 else f"attn:kv{4 >> j}",
                       "attn", 0.0 if j == 0 else float(rng.uniform(0.05, 1.0) * j),
                       _cost(rng, 1.0 - j / n_attn, 4 >> j if j < n_attn - 1 else 0, batches))
                for j in range(n_attn)]
        ffn = [Option("ffn:1.00" if j == 0 else "ffn:noop" if j == n_ffn - 1 else f"ffn:0.{9 - 2 * j}0",
                      "ffn", 0.0 if j == 0 else float(rng.uniform(0.05, 1.0) * j),
                      _cost(rng, 2.0 * (1.0 - j / n_ffn), 0, batches)) for j in range(n_ffn)]
        pr = []
        for p in range(min(pairs, n_attn - 1, n_ffn - 1)):
            a, f = attn[1 + p], ffn[1 + p]
            pr.append(Option(f"{a.name}+{f.name}", "pair", 0.6 * (a.score + f.score),
                             {k: a.cost[k] + f.cost[k] for k in a.cost}))
        layers.append({"attn": attn, "ffn": ffn, "pair": pr})
    fixed = _cost(rng, 0.3, 0, batches)
    return Problem(layers, fixed, {b: SCEN.get(b, (32, 16)) for b in batches},
                   [("attn:kv4", "ffn:1.00")] * L, "kl")


def all_children(p: Problem):
    per_layer = []
    for lay in p.layers:
        opts = [(a.name, f.name, False) for a in lay["attn"] for f in lay["ffn"]]
        opts += [(*o.halves, True) for o in lay["pair"]]
        per_layer.append(opts)
    return itertools.product(*per_layer)


def brute_force(s: Searcher, budget: Budget | None = None, exclude=()):
    """The exhaustive oracle: (best score, child) over every child and batch size, or None."""
    best = None
    for child in all_children(s.problem):
        if any(search_differs(child, e) < e_need for e, e_need in exclude):
            continue
        if s.best_batch(child, budget) is not None:
            sc = s.problem.evaluate(child, s.batches[0])["score"]
            if best is None or sc < best[0] - 1e-12:
                best = (sc, child)
    return best


def search_differs(a, b) -> int:
    return sum((x[0], x[1]) != (y[0], y[1]) for x, y in zip(a, b))


def parent_time(p: Problem, b: int) -> float:
    return p.total(p.parent, "time", b)


# ------------------------------------------------------------------------------ MIP vs brute force

@pytest.mark.parametrize("solver", SOLVERS)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), speedup=st.floats(0.0, 5.0), mem=st.floats(0.0, 1.3),
       params=st.sampled_from([0.0, 0.6, 0.8]), pairs=st.integers(0, 2),
       latency=st.sampled_from([0.0, 0.5, 1.2]), tps=st.sampled_from([0.0, 1.5]))
def test_mip_optimum_equals_brute_force(solver, seed, speedup, mem, params, pairs, latency, tps):
    p = make_problem(L=3, n_attn=3, n_ffn=3, pairs=pairs, seed=seed)
    parent_mem = p.total(p.parent, "memory", 8)
    parent_params = p.total(p.parent, "params", 1)
    budget = Budget(speedup=speedup, max_memory_bytes=mem * parent_mem, max_params=params * parent_params,
                    max_latency_ms=latency * p.total(p.parent, "time", 1),
                    min_tokens_per_s=tps * p.evaluate(p.parent, 1)["tokens_per_s"])
    s = Searcher(p, budget, solver=solver, gap=0.0)
    oracle = brute_force(s)
    if oracle is None:
        with pytest.raises(InfeasibleBudget):
            s.best()
        return
    spec = s.best()
    assert spec.predicted["score"] == pytest.approx(oracle[0], abs=1e-9)
    assert all(c["ok"] for c in spec.checks.values())
    assert s.best_batch(spec.child) is not None


def test_both_solvers_same_optimum_on_default_size_problem():
    # The default preset's size: 8 layers, 5 attention x 9 FFN variants, one coupled pair.
    p = make_problem(L=8, n_attn=5, n_ffn=9, pairs=1, seed=3)
    out = {}
    for solver in ("highs", "gurobi"):
        if solver == "gurobi" and "auto" not in SOLVERS:
            continue
        s = Searcher(p, Budget(speedup=1.8, max_memory_bytes=0.9 * p.total(p.parent, "memory", 8)),
                     solver=solver, gap=0.0)
        spec = s.best()
        out[solver] = spec.predicted["score"]
        assert spec.solver["solver"].startswith(solver) and spec.solver["status"] == "optimal"
    assert len({round(v, 9) for v in out.values()}) == 1, out


def test_gurobi_licence_limit_falls_back_to_highs_with_the_reason():
    # without the exact reduction (tests/test_fixing.py has the default path, which keeps gurobipy)
    gp = pytest.importorskip("gurobipy")
    p = make_problem(L=80, n_attn=6, n_ffn=22, pairs=0, seed=1)  # 2240 binaries > 2000
    s = Searcher(p, Budget(speedup=1.5), solver="auto", gap=1e-6)
    s.reduce = "never"
    spec = s.best()
    if spec.solver["solver"].startswith("gurobi"):
        pytest.skip(f"this gurobipy licence ({gp.gurobi.version()}) admits 2240 variables")
    assert spec.solver["solver"].startswith("highs")
    assert "10010" in spec.solver["fallback_reason"] and "2240 variables" in spec.solver["fallback_reason"]
    forced = Searcher(p, Budget(speedup=1.5), solver="gurobi")
    forced.reduce = "never"
    with pytest.raises(mip.SearchError, match="search_solver='auto'"):
        forced.best()


def test_time_limit_without_a_solution_is_not_called_infeasible(monkeypatch):
    p = make_problem(L=3, seed=0)
    from puzzlelib.search import mip

    monkeypatch.setattr(mip, "solve", lambda *a, **k: mip.Solved("time_limit", None, None, "fake", 1.0))
    with pytest.raises(mip.SearchError, match="search_time_limit_s") as e:
        Searcher(p, Budget(speedup=1.2)).best()
    assert not isinstance(e.value, InfeasibleBudget)


# ------------------------------------------------------------------------------ diversity

@pytest.mark.parametrize("seed", [7, 11, 12])
@pytest.mark.parametrize("solver", SOLVERS)
def test_diverse_solutions_differ_and_each_is_optimal_given_the_earlier(solver, seed):
    # several random instances: each solver's settings for models with diversity cuts (gurobipy's
    # MIR cuts) must leave every solution of the sequence optimal given the earlier ones
    p = make_problem(L=4, n_attn=3, n_ffn=3, pairs=1, seed=seed)
    s = Searcher(p, Budget(speedup=1.4), solver=solver, gap=0.0)
    sols, _ = s.diverse(4, 0.5, progress=False)   # each differs in >= 2 of 4 layers
    assert len(sols) >= 2
    for k, a in enumerate(sols):
        for b in sols[:k]:
            assert search_differs(a.child, b.child) >= 2
        assert all(c["ok"] for c in a.checks.values())
        # optimal among children that differ enough from every earlier solution
        oracle = brute_force(s, exclude=[(b.child, 2) for b in sols[:k]])
        assert a.predicted["score"] == pytest.approx(oracle[0], abs=1e-9)
    assert [x.name for x in sols] == [f"puzzle-{k + 1}" for k in range(len(sols))]
    assert sols[0].predicted["score"] <= sols[-1].predicted["score"]


def test_diversity_exhausted_is_a_note_not_an_error():
    p = make_problem(L=2, n_attn=2, n_ffn=2, pairs=0, seed=1)  # 4 children in all
    s = Searcher(p, Budget(), solver="highs", gap=0.0)
    sols, notes = s.diverse(10, 1.0, progress=False)  # every pair must differ in both layers
    assert 1 <= len(sols) < 10 and "only" in notes[0]


# ------------------------------------------------------------------------------ infeasible budgets

def test_infeasible_speedup_names_the_tightest_value():
    p = make_problem(L=3, seed=2)
    s = Searcher(p, Budget(speedup=50.0), solver="highs", gap=0.0)
    with pytest.raises(InfeasibleBudget) as e:
        s.best()
    # The tightest speed-up is the cheapest child's: every layer at its fastest option.
    fastest = max(s.problem.evaluate(c, b)["tokens_per_s"] for c in all_children(p) for b in BATCHES) / s.ref_tps
    assert e.value.tightest["speedup"]["value"] == pytest.approx(fastest, rel=1e-6)
    assert "search_speedup=50" in str(e.value) and f"{fastest:.4g}×" in str(e.value)


def _opt(name, kind, score, t, wbytes, kv=0.0):
    return Option(name, kind, score, {"params": wbytes / 4, "weight_bytes": wbytes, "kv_bytes_per_token": kv,
                                      "prefill_ms@b1": t, "decode_ms@b1": 0.0})


def test_infeasible_combination_is_explained_given_the_other_budgets():
    # Attention X is fast but large, Y small but slow: speed-up >= 3 needs X in both layers,
    # memory <= 700 B needs Y in at least one: each budget alone is feasible, both together not.
    lay = {"attn": [_opt("attn:kv4", "attn", 0.0, 10.0, 400.0), _opt("attn:kv1", "attn", 1.0, 2.0, 400.0),
                    _opt("attn:kv2", "attn", 1.0, 10.0, 100.0)],
           "ffn": [_opt("ffn:1.00", "ffn", 0.0, 0.0, 0.0)], "pair": []}
    p = Problem([lay, lay], _opt("fixed", "fixed", 0.0, 1.0, 0.0).cost, {1: (8, 1)}, [("attn:kv4", "ffn:1.00")] * 2)
    s = Searcher(p, Budget(speedup=3.0, max_memory_bytes=700.0), solver="highs", gap=0.0)
    assert brute_force(s) is None
    assert brute_force(s, Budget(speedup=3.0)) and brute_force(s, Budget(max_memory_bytes=700.0))
    with pytest.raises(InfeasibleBudget) as e:
        s.best()
    t = e.value.tightest
    # given memory <= 700: one layer X, one layer Y -> time 1 + 2 + 10 = 13 vs the parent's 21
    assert t["speedup"] == {"value": pytest.approx(21 / 13), "batch": 1, "given_other_budgets": True}
    # given speed-up >= 3 (time <= 7): X in both layers -> 800 B
    assert t["memory"]["value"] == pytest.approx(800 / 2**20) and t["memory"]["given_other_budgets"]
    msg = str(e.value)
    assert "search_speedup=3 asked" in msg and "1.615×" in msg and "search_max_memory_mib" in msg


# ------------------------------------------------------------------------------ batch sizes, pairs

def test_memory_budget_lets_a_small_kv_child_use_a_bigger_batch():
    p = make_problem(L=3, n_attn=3, n_ffn=3, pairs=0, seed=5)
    # The parent fits only at batch 1; a child with fewer KV heads fits at batch 8.
    mem = (p.total(p.parent, "memory", 1) + p.total(p.parent, "memory", 8)) / 2
    s = Searcher(p, Budget(speedup=1.0, max_memory_bytes=mem), solver="highs", gap=0.0)
    assert s.ref_batch == 1  # speed-ups are against the parent at its best batch that fits
    sp8 = Searcher(p, Budget(speedup=s.problem.evaluate(p.parent, 8)["tokens_per_s"] / s.ref_tps * 0.99,
                             max_memory_bytes=mem), solver="highs", gap=0.0).best()
    assert sp8.batch == 8 and sp8.predicted["memory_bytes"] <= mem
    assert any(a != "attn:kv4" for a, _ in sp8.choices)  # it had to shrink the KV cache


def test_coupled_pair_fills_both_slots_and_round_trips(tiny_parent):
    p = make_problem(L=3, n_attn=3, n_ffn=3, pairs=1, seed=0)
    s = Searcher(p, Budget(speedup=1.3), solver="highs", gap=0.0)
    spec = s.best()
    ev = p.evaluate(spec.child, spec.batch)
    assert ev["score"] == pytest.approx(spec.predicted["score"])
    again = ChildSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    # A pair is costed as the sum of its halves and scored once.
    pair = p.layers[0]["pair"][0]
    a, f = pair.halves
    assert (p.evaluate([(a, f, True)] + [(x, y, False) for x, y in p.parent[1:]], 1)["score"]
            == pytest.approx(pair.score))
    assert p.total([(a, f, True)] * 3, "time", 8) == pytest.approx(p.total([(a, f, False)] * 3, "time", 8))


# ------------------------------------------------------------------------------ baselines

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_baselines_meet_the_same_budget(seed):
    p = make_problem(L=6, n_attn=4, n_ffn=5, pairs=1, seed=seed)
    s = Searcher(p, Budget(speedup=1.5, max_params=0.8 * p.total(p.parent, "params", 1)),
                 solver="highs", gap=0.0)
    mip_spec = s.best()
    influence = list(np.random.default_rng(seed).random(6))
    base, _ = baselines.all_baselines(s, influence, seed=seed, tries=500)
    for name, spec in base.items():
        if spec is None:
            continue
        assert spec.method == name and all(c["ok"] for c in spec.checks.values()), (name, spec.checks)
        assert spec.predicted["score"] >= mip_spec.predicted["score"] - 1e-9  # the MIP is optimal
    u = base["uniform"]
    if u is not None:
        assert len(set(u.choices)) == 1 and not any(n.endswith((":noop", ":linear")) for n in u.choices[0])
    d = base["depth"]
    dropped = [i for i, c in enumerate(d.choices) if c == ("attn:noop", "ffn:noop")]
    order = sorted(range(6), key=lambda i: influence[i])
    assert sorted(dropped) == sorted(order[:len(dropped)])
    assert base["greedy"] is not None and base["random"] is not None
    # seeded: the same random child again
    assert baselines.random_child(s, seed=seed, tries=500).choices == base["random"].choices


def test_random_baseline_falls_back_to_a_random_feasible_point():
    p = make_problem(L=6, n_attn=4, n_ffn=5, pairs=0, seed=3)
    s = Searcher(p, Budget(speedup=2.2), solver="highs", gap=0.0)
    spec = baselines.random_child(s, seed=0, tries=0)
    assert spec is not None and "random-objective MIP" in spec.notes[0]
    assert all(c["ok"] for c in spec.checks.values())


def test_sweep_and_pareto_rows():
    p = make_problem(L=4, n_attn=3, n_ffn=4, pairs=1, seed=2)
    s = Searcher(p, Budget(speedup=1.2), solver="highs", gap=0.0)
    rows = s.pareto([1.2, 1.8, 100.0], progress=False) + baselines.sweep(s, [0.1, 0.2, 0.3, 0.4], [1.2, 1.8])
    mip_rows = [r for r in rows if r["method"] == "mip"]
    assert [r["feasible"] for r in mip_rows] == [True, True, False]
    assert mip_rows[0]["score"] <= mip_rows[1]["score"]  # a harder target never scores better
    for r in rows:
        if r["feasible"]:
            assert r["speedup"] >= r["target_speedup"] * (1 - 1e-6)
            best = next(m for m in mip_rows if m["target_speedup"] == r["target_speedup"])
            assert r["score"] >= best["score"] - 1e-9


# ------------------------------------------------------------------------------ block influence

def test_block_influence_is_one_minus_cosine(tiny_parent):
    from puzzlelib.core.blocks import build_child

    tokens = np.random.default_rng(0).integers(3, 300, size=2000)
    bi = baselines.block_influence(tiny_parent, tokens, seq_len=16, max_tokens=256, progress=False)
    assert len(bi) == 2 and all(0 < x < 2 for x in bi)
    # A layer that is entirely no-op maps its input to itself: influence exactly 0.
    child = build_child(tiny_parent, [("attn:noop", "ffn:noop"), ("attn:kv2", "ffn:1.00")])
    bi2 = baselines.block_influence(child, tokens, seq_len=16, max_tokens=256, progress=False)
    assert bi2[0] == pytest.approx(0.0, abs=1e-12) and bi2[1] > 0


# ------------------------------------------------------------------------------ from stage tables

def synthetic_cost_table(L=2, batches=(1, 4)) -> CostTable:
    rng = np.random.default_rng(0)
    rows = [{"layer": -1, "sub_block": "fixed", "variant": "fixed", "op": "fixed", "kv_heads": 0, "ffn_width": 0,
             "measured_on_layer": -1, "is_parent": True, **_cost(rng, 0.3, 0, batches)}]
    for i in range(L):
        for name, op, kv, scale in (("attn:kv2", "gqa", 2, 1.0), ("attn:kv1", "gqa", 1, 0.8),
                                    ("attn:linear", "linear", 0, 0.3), ("attn:noop", "noop", 0, 0.0)):
            rows.append({"layer": i, "sub_block": "attn", "variant": name, "op": op, "kv_heads": kv,
                         "ffn_width": 0, "measured_on_layer": 0, "is_parent": name == "attn:kv2",
                         **_cost(rng, scale, kv, batches)})
        for name, op, w, scale in (("ffn:1.00", "swiglu", 96, 2.0), ("ffn:0.875", "swiglu", 84, 1.8),
                                   ("ffn:0.50", "swiglu", 48, 1.0), ("ffn:linear", "linear", 0, 0.5),
                                   ("ffn:noop", "noop", 0, 0.0)):
            rows.append({"layer": i, "sub_block": "ffn", "variant": name, "op": op, "kv_heads": 0,
                         "ffn_width": w, "measured_on_layer": 0, "is_parent": name == "ffn:1.00",
                         **_cost(rng, scale, 0, batches)})
    for r in rows:  # integer static columns, as the CSV holds them
        for k in ("params", "weight_bytes", "kv_bytes_per_token"):
            r[k] = int(r[k])
    return CostTable(rows, [Scenario(b, 32, 16) for b in batches])


def test_build_problem_from_cost_and_score_tables():
    costs = synthetic_cost_table()
    scores = {(i, n): v for i in range(2) for n, v in (("attn:kv2", 3.0), ("attn:kv1", 3.2), ("attn:linear", 3.9),
                                                        ("attn:noop", 4.5), ("ffn:1.00", 3.0), ("ffn:0.50", 3.3),
                                                        ("ffn:linear", 4.0), ("ffn:noop", 5.0),
                                                        ("attn:kv1+ffn:0.50", 3.25))}
    p = mip.build_problem(costs, scores, "lm_loss", parent_value=3.0, exclude_ops=("linear",))
    lay = p.layers[0]
    assert [o.name for o in lay["attn"]] == ["attn:kv2", "attn:kv1", "attn:noop"]
    assert [o.name for o in lay["ffn"]] == ["ffn:1.00", "ffn:0.50", "ffn:noop"]  # 0.875: profiled, not scored
    assert "ffn:0.875" in p.notes[0]
    pair = lay["pair"][0]
    assert pair.score == pytest.approx(0.25) and lay["attn"][1].score == pytest.approx(0.2)
    assert pair.cost["prefill_ms@b4"] == pytest.approx(costs.cost(0, "attn:kv1", "prefill_ms", 4)
                                                       + costs.cost(0, "ffn:0.50", "prefill_ms", 4))
    # The problem's totals are the cost table's predictions.
    child = [("attn:kv1", "ffn:0.50"), ("attn:noop", "ffn:1.00")]
    pred = costs.predict_scenario(child, 4)
    ev = p.evaluate(child, 4)
    assert ev["tokens_per_s"] == pytest.approx(pred["tokens_per_s"])
    assert ev["memory_bytes"] == pytest.approx(pred["memory_bytes"]) and ev["params"] == pred["params"]
    # higher-is-better metrics are negated: agreement 0.9 -> degradation 0.1
    agree = {k: 1.0 - (v - 3.0) / 10 for k, v in scores.items()}
    q = mip.build_problem(costs, agree, "top1_agreement", parent_value=1.0)
    assert q.option(0, "attn:kv1").score == pytest.approx(0.02)


def test_config_refuses_bad_search_fields():
    for bad in ({"search_speedup": -1.0}, {"search_min_diff_fraction": 0.0}, {"search_batch_sizes": "1,x"},
                {"search_solver": "cplex"}, {"search_metric": "kl_sem"}, {"search_mip_gap": 1.0}):
        with pytest.raises(ConfigError):
            RunConfig.from_preset("smoke", bad)


# ------------------------------------------------------------------------------ the whole stage

PIPE = {"seq_len": 32, "bld_ffn_fractions": "1.0,0.5,0.25", "bld_coupled_pairs": "attn:kv1+ffn:0.50",
        "bld_tokens_per_variant": 2048, "bld_batch_size": 8, "bld_calib_tokens": 1024, "bld_eval_tokens": 1024,
        "bld_eval_every": 4, "threads": 1, "profile_repeats": 3, "profile_num_random_children": 2,
        "scoring_tokens": 512, "scoring_interaction_children": 0, "scoring_naive_check": 0,
        "search_influence_tokens": 512, "search_speedup": 1.2, "search_pareto_speedups": "1.1,1.3,50"}


def pipeline_cfg(root, **kw) -> RunConfig:
    return RunConfig.from_preset("smoke", {**PIPE, "runs_root": str(root), **kw}, run_name="t")


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Stages 00–03 for real on a tiny parent (2 layers, hidden 64): a few seconds."""
    from conftest import tiny_config

    from puzzlelib.bld import stage as bld

    from puzzlelib.profiling import stage as profiling

    from puzzlelib.scoring import stage as scoring
    from puzzlelib.core.export import save_checkpoint
    from puzzlelib.core.modeling_decilm import PuzzleForCausalLM
    from puzzlelib.core.rundir import RunDir
    from puzzlelib.core.atomic import atomic_write_json

    cfg = pipeline_cfg(tmp_path_factory.mktemp("pipe"))
    torch.manual_seed(0)
    model = PuzzleForCausalLM(tiny_config()).eval()
    rng = np.random.default_rng(0)
    with RunDir(cfg).stage("00_parent") as st:
        save_checkpoint(model, st.dir / "model")
        tok = st.dir / "tokens"
        tok.mkdir()
        words = rng.integers(3, 300, size=(60, 5))  # short repeated "words": structured activations
        stream = words[rng.integers(0, 60, size=8000)].ravel().astype(np.uint16)
        stream[:30000].tofile(tok / "train.bin")
        stream[30000:36000].tofile(tok / "heldout.bin")
        atomic_write_json(tok / "tokens.json", {"dtype": "uint16", "n_train_tokens": 30000, "n_heldout_tokens": 6000})
        for name in ("metrics.json", "history.json"):
            atomic_write_json(st.dir / name, {})
        atomic_write_json(st.dir / "samples.json", [])
    for mod in (profiling, bld, scoring):
        mod.run(cfg, progress=False)
    return cfg


def test_stage_writes_specs_reuses_and_builds_children(stages, capsys):
    cfg = stages
    res = search.run(cfg, progress=False)
    assert not res.reused
    assert {p.name for p in res.dir.iterdir()} == {"solution.json", "baselines.json", "pareto.csv",
                                                  "pareto_children.json", "metrics.json", "manifest.json"}
    # pareto_children.json: the child behind every feasible row of the sweep, the same spec.
    from puzzlelib.core.rundir import read_csv_rows
    from puzzlelib.search.searcher import ChildSpec

    kids = json.loads((res.dir / "pareto_children.json").read_text())
    rows = [r for r in read_csv_rows(res.dir / "pareto.csv") if r["feasible"] in (True, "True")]
    assert sorted((k["method"], float(k["target_speedup"]), ChildSpec.from_dict(k["spec"]).short()) for k in kids) == \
        sorted((r["method"], float(r["target_speedup"]), r["spec"]) for r in rows)
    best = res.best
    assert best.name == "puzzle-1" and best.method == "mip" and len(best.choices) == 2
    assert best.predicted["speedup"] >= 1.2 * (1 - 1e-9) and all(c["ok"] for c in best.checks.values())
    assert best.solver["solver"].split()[0] in ("gurobi", "highs") and best.solver["status"] == "optimal"
    # measured re-check: real end-to-end timings of the built child, against the measured parent
    assert best.measured["tokens_per_s"] > 0 and "measured_ok" in best.checks["speedup"]
    assert best.measured["memory_bytes"] == pytest.approx(best.predicted["memory_bytes"], rel=0.05)
    sol = json.loads((res.dir / "solution.json").read_text())
    assert sol["reference"]["batch"] in (1, 4) and sol["solver"]["used"]
    assert len(sol["block_influence"]) == 2
    # the problem holds the library's variants (the profiled 0.875, 0.75, ... are not in it) and the pair
    assert "attn:kv1+ffn:0.50" in sol["problem"]["options_per_layer"][0]["pair"]
    assert "ffn:0.75" not in sol["problem"]["options_per_layer"][0]["ffn"]
    # baselines: every one that exists meets the same budget, and none beats the MIP
    for name, spec in res.baselines.items():
        if spec is not None:
            assert all(c["ok"] for c in spec.checks.values()), name
            assert spec.predicted["score"] >= best.predicted["score"] - 1e-12
    rows = res.pareto
    assert {r["method"] for r in rows} == {"mip", "greedy", "uniform", "depth"}
    assert [r["feasible"] for r in rows if r["method"] == "mip"] == [True, True, False]
    # what stage 05 reads
    assert [c.name for c in res.children][: len(res.solutions)] == [s.name for s in res.solutions]
    loaded = search.load(cfg)
    assert loaded.best == best and json.dumps(loaded.pareto) == json.dumps(rows)  # (NaN != NaN)
    again = search.run(cfg, progress=False)
    assert again.reused and again.best == best and "reusing" in capsys.readouterr().out
    child = best.build(cfg)
    from puzzlelib.core.model import count_params

    assert count_params(child) == best.predicted["params"]
    bc = child.config.block_configs
    # against the *parent's* config: a fraction is of the parent's width at that layer (the child's
    # own config already holds the reduced widths, so reading fractions off it shrinks them twice
    # whenever the MIP picks a narrower FFN for layer 0, which depends on the measured costs)
    from puzzlelib.parent import stage as parent_stage

    parent_config = parent_stage.load(cfg).load_model().config
    assert len(bc) == 2 and bc == best.block_configs(parent_config)


def test_highs_gives_the_same_child_score_as_auto(stages):
    cfg = stages
    from puzzlelib.profiling import stage as profiling
    from puzzlelib.scoring import stage as scoring

    costs, table = profiling.load_costs(cfg), scoring.load_scores(cfg)
    a = search.searcher_from_config(cfg.replace(search_solver="highs", search_mip_gap=0.0), costs, table).best()
    b = search.searcher_from_config(cfg.replace(search_mip_gap=0.0), costs, table).best()
    assert a.predicted["score"] == pytest.approx(b.predicted["score"], abs=1e-12)


def test_infeasible_budget_from_config_leaves_no_artifact(stages):
    cfg = stages.replace(run_name="infeasible", runs_root=stages.runs_root)
    # a new run name: copy nothing, the stage refuses before writing (01/03 missing there) ...
    from puzzlelib.core.rundir import StageNotReady

    with pytest.raises(StageNotReady, match="01_profiling"):
        search.run(cfg, progress=False)
    # ... and on the real run, an impossible speed-up is refused with the reachable value
    bad = stages.replace(search_speedup=80.0)
    with pytest.raises(InfeasibleBudget, match=r"search_speedup=80 asked, but the tightest"):
        search.run(bad, progress=False)
    from puzzlelib.core.rundir import RunDir

    m = RunDir(bad, create=False).manifest("04_search")
    assert m is None or m["key"] != RunDir(bad, create=False).config_key("04_search")


@pytest.mark.slow
def test_notebook_04_runs_headless(stages, tmp_path):
    from puzzlelib.runner import run_pipeline

    res = run_pipeline("smoke", run_name="t", stages="04", overrides={
        **PIPE, "runs_root": stages.runs_root, "reports_root": str(tmp_path / "reports")}, echo=lambda *a, **k: None)
    assert res.exit_code == 0
    nb = json.loads((tmp_path / "reports" / "t" / "04_search.ipynb").read_text())
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = [o for c in nb["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 5  # architecture, Pareto front; exercises: 1.5x architecture, metric + diversity comparisons
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "fallback reason" in text and "No child in the library meets the budget" in text
