"""Stage 06's measured Pareto: paired intervals against naive oracles, the matching rule, and the
stage on the tiny pipeline of test_evaluation (every sweep child evaluated, KL to the parent)."""

import math
from pathlib import Path

import numpy as np
import pytest

from puzzlelib.core.eval_tasks import EvaluationError
from puzzlelib.evaluation import pareto as PE


def test_bootstrap_difference_equals_a_naive_resampling_loop():
    rng = np.random.default_rng(1)
    a = {"t1": rng.integers(0, 2, 40).astype(float), "t2": rng.integers(0, 2, 25).astype(float)}
    b = {"t1": rng.integers(0, 2, 40).astype(float), "t2": rng.integers(0, 2, 25).astype(float)}
    point, lo, hi = PE.bootstrap_difference(a, b, iters=300, seed=7)
    assert point == pytest.approx(np.mean([a[t].mean() - b[t].mean() for t in a]))
    # Oracle: the same draws, one resample at a time.
    g = np.random.default_rng([7, 0xD1FF])
    draws = {t: g.integers(0, len(a[t]), size=(300, len(a[t]))) for t in a}
    naive = [np.mean([a[t][draws[t][i]].mean() - b[t][draws[t][i]].mean() for t in a]) for i in range(300)]
    assert [lo, hi] == pytest.approx(list(np.percentile(naive, [2.5, 97.5])))
    assert lo <= point <= hi
    same = PE.bootstrap_difference(a, a, iters=100)
    assert same == [0.0, 0.0, 0.0]
    ones, zeros = {"t": np.ones(10)}, {"t": np.zeros(10)}
    assert PE.bootstrap_difference(ones, zeros, 100) == [1.0, 1.0, 1.0]
    assert all(math.isnan(v) for v in PE.bootstrap_difference(a, b, iters=0)[1:])


def test_ratio_difference_and_verdicts():
    kl_a, kl_b, tok = [1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 5.0, 5.0], [10, 10, 10, 10]
    p, lo, hi = PE.bootstrap_ratio_difference(kl_a, kl_b, tok, iters=500)
    assert p == pytest.approx((10 - 14) / 40) and lo <= p <= hi and hi <= 0  # a never worse than b here
    assert PE.bootstrap_ratio_difference(kl_a, kl_b, tok, iters=0, scale=2.0)[0] == pytest.approx(-0.2)
    assert PE.verdict([0.1, 0.02, 0.2], True) == "win" and PE.verdict([0.1, 0.02, 0.2], False) == "loss"
    assert PE.verdict([0.0, -0.1, 0.1], True) == "tie" and PE.verdict([-1, -2, -0.5], False) == "win"
    assert PE.verdict([0.0, math.nan, math.nan], True) == "no interval"


def test_an_overshooting_baseline_is_matched_to_the_nearest_mip_child():
    points = [{"method": "mip", "target": 1.5, "model": "m15"}, {"method": "mip", "target": 2.0, "model": "m2"},
              {"method": "uniform", "target": 1.5, "model": "u15"}, {"method": "depth", "target": 1.5, "model": "d"}]
    predicted = {"m15": 1.52, "m2": 2.01, "u15": 1.55, "d": 1.95}
    correct = {n: {"t": np.array([1.0, 0, 1, 1])} for n in predicted}
    rows = PE.comparisons(points, predicted, correct, {}, 50, 0, after_gkd=[("m15", "u15")])
    by = {(r["stage"], r["baseline"]): r for r in rows}
    assert (by[("before GKD", "uniform")]["mip_model"] == "m15"
            and by[("before GKD", "uniform")]["matched_by"] == "same target")
    assert (by[("before GKD", "depth")]["mip_model"] == "m2"
            and "cannot be tuned" in by[("before GKD", "depth")]["matched_by"])
    assert by[("after GKD", "u15")]["accuracy_diff"] == [0.0, 0.0, 0.0]
    same = PE.comparisons([points[0], {"method": "greedy", "target": 1.5, "model": "m15"}], predicted, correct, {},
                          50, 0)
    assert same[0]["accuracy_verdict"] == "same child" and same[0]["accuracy_diff"] == [0.0, 0.0, 0.0]


def test_plan_points_evaluates_each_choice_set_once():
    from puzzlelib.search.searcher import ChildSpec

    def spec(method, choices):
        return ChildSpec(name=method, method=method, choices=choices, coupled=[False] * 2, batch=1,
                         predicted={}).to_dict()

    a = [["attn:kv1", "ffn:0.5"], ["attn:kv2", "ffn:1.0"]]
    b = [["attn:noop", "ffn:noop"], ["attn:kv2", "ffn:1.0"]]
    kids = [{"method": "mip", "target_speedup": 1.5, "spec": spec("mip", a)},
            {"method": "greedy", "target_speedup": 1.5, "spec": spec("greedy", a)},
            {"method": "depth", "target_speedup": 1.5, "spec": spec("depth", b)},
            {"method": "mip", "target_speedup": 2.0, "spec": spec("mip", b)}]
    points, new = PE.plan_points(kids, {tuple(map(tuple, b)): "puzzle-1 (before GKD)"})
    assert [p["model"] for p in points] == ["mip@1.5x (before GKD)"] * 2 + ["puzzle-1 (before GKD)"] * 2
    assert [n["name"] for n in new] == ["mip@1.5x (before GKD)"]
    with pytest.raises(EvaluationError, match="Rerun notebooks/04_search"):
        PE.read_children(Path("/nonexistent"))
