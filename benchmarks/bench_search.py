"""Stage 04's MIP at Nemotron-51B scale: 80 layers, 6 attention x 9 FFN variants, synthetic costs.

Times each solver on the same matrices (gurobipy where its licence admits the size, HiGHS), to
optimality (gap 0), and the time for 10 diverse solutions (each differing from all earlier ones
in >= 20 % of layers). Also the default preset's size (8 layers, 5 x 9). Synthetic costs follow a
Llama-70B layer: attention time ~ Q/O + K/V projections + KV reads, FFN time ~ width; scores grow
with how much a variant removes, more in the first and last layers.

    python benchmarks/bench_search.py [--layers 80 --repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from puzzlelib.search import Budget, Option, Problem, Searcher

ATTN = {"attn:kv8": 8, "attn:kv4": 4, "attn:kv2": 2, "attn:kv1": 1, "attn:linear": -1, "attn:noop": 0}
FFN = {"ffn:1.00": 1.0, "ffn:0.875": 0.875, "ffn:0.75": 0.75, "ffn:0.50": 0.5, "ffn:0.25": 0.25,
       "ffn:0.20": 0.2, "ffn:0.10": 0.1, "ffn:linear": -1, "ffn:noop": 0}
BATCHES = {1: (1024, 1024), 16: (1024, 1024), 64: (1024, 1024)}


def synthetic(layers: int, attn: dict = ATTN, ffn: dict = FFN, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    h, hd, inter = 8192, 128, 28672  # Llama-70B: hidden, head dim, SwiGLU width
    sens = 0.3 + np.abs(np.linspace(-1, 1, layers)) ** 2 + 0.2 * rng.random(layers)  # ends are sensitive
    out = []
    for i in range(layers):
        lay = {"attn": [], "ffn": [], "pair": []}
        for name, kv in attn.items():
            p = 0 if kv == 0 else h * h if kv < 0 else 2 * h * h + 2 * h * kv * hd
            kvb = 2 * max(kv, 0) * hd * 2
            cost = {"params": p, "weight_bytes": 2 * p, "kv_bytes_per_token": kvb}
            for b, (prompt, gen) in BATCHES.items():
                cost[f"prefill_ms@b{b}"] = 2 * p * b * prompt / 4e14 * 1e3 + (kvb * b * prompt * prompt / 2 / 2e12 * 1e3 if kv > 0 else 0)
                cost[f"decode_ms@b{b}"] = (2 * p + kvb * b * (prompt + gen / 2)) / 2e12 * 1e3 + (0.02 if kv else 0)
            loss = 0.0 if kv == 8 else sens[i] * (0.02 * (8 / kv - 1) if kv > 0 else 0.9 if kv < 0 else 1.2)
            lay["attn"].append(Option(name, "attn", float(loss * rng.uniform(0.7, 1.3)), cost))
        for name, f in ffn.items():
            p = 0 if f == 0 else h * h if f < 0 else 3 * h * int(inter * f)
            cost = {"params": p, "weight_bytes": 2 * p, "kv_bytes_per_token": 0}
            for b, (prompt, gen) in BATCHES.items():
                cost[f"prefill_ms@b{b}"] = 2 * p * b * prompt / 4e14 * 1e3
                cost[f"decode_ms@b{b}"] = 2 * p / 2e12 * 1e3 + (0.02 if f else 0)
            loss = 0.0 if f == 1.0 else sens[i] * ((1 - f) ** 1.5 * 1.5 if f > 0 else 1.4 if f < 0 else 2.0)
            lay["ffn"].append(Option(name, "ffn", float(loss * rng.uniform(0.7, 1.3)), cost))
        out.append(lay)
    fixed = {"params": 2 * h * 128256, "weight_bytes": 4 * h * 128256, "kv_bytes_per_token": 0}
    for b, (prompt, gen) in BATCHES.items():
        fixed[f"prefill_ms@b{b}"] = 2 * h * 128256 * b / 4e14 * 1e3
        fixed[f"decode_ms@b{b}"] = 2 * h * 128256 * 2 / 2e12 * 1e3
    return Problem(out, fixed, BATCHES, [(next(iter(attn)), next(iter(ffn)))] * layers)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--speedup", type=float, default=2.17)
    ap.add_argument("--memory-gib", type=float, default=80.0)
    ap.add_argument("--time-limit", type=float, default=300.0)
    args = ap.parse_args()
    small = {k: v for k, v in ATTN.items() if k != "attn:kv8"}  # the default parent has 4 KV heads
    for label, layers, attn in ((f"Nemotron-51B scale ({args.layers} layers, 6 x 9)", args.layers, ATTN),
                                ("default preset size (8 layers, 5 x 9)", 8, small)):
        p = synthetic(layers, attn)
        budget = Budget(min_speedup=args.speedup, max_memory_bytes=args.memory_gib * 2**30)
        print(f"\n== {label}: {len(p.columns)} option binaries, batches {p.batch_sizes}, "
              f"speed-up >= {args.speedup}x, memory <= {args.memory_gib} GiB")
        for solver in ("gurobi", "highs"):
            try:
                times, score = [], None
                for _ in range(args.repeats):
                    s = Searcher(p, budget, solver=solver, gap=0.0, time_limit=args.time_limit)
                    t = time.perf_counter()
                    spec = s.best()
                    times.append(time.perf_counter() - t)
                    score = spec.predicted["score"]
                per = [x["seconds"] for x in s.log]
                print(f"{solver:7s} best over {len(s.batches)} batch sizes: median {statistics.median(times):.3f} s "
                      f"(per solve {min(per):.3f}-{max(per):.3f} s) score {score:.6f} batch {spec.batch} "
                      f"speed-up {spec.predicted['speedup']:.3f} status {spec.solver['status']}")
                s = Searcher(p, budget, solver=solver, gap=0.0, time_limit=args.time_limit)
                t = time.perf_counter()
                sols, _ = s.diverse(10, 0.2, progress=False)
                dt = time.perf_counter() - t
                print(f"{solver:7s} 10 diverse solutions: {dt:.2f} s ({len(sols)} found; scores "
                      f"{sols[0].predicted['score']:.4f} .. {sols[-1].predicted['score']:.4f}); solvers used "
                      f"{sorted({x['solver'] for x in s.log})}; largest model {max(x['variables'] for x in s.log)} "
                      f"variables {max(x['constraints'] for x in s.log)} constraints")
                fb = {x["fallback_reason"] for x in s.log if x["fallback_reason"]}
                if fb:
                    print(f"        fallbacks: {fb}")
            except Exception as e:  # noqa: BLE001 — report and go on with the other solver
                print(f"{solver:7s} failed: {e}")


if __name__ == "__main__":
    main()
