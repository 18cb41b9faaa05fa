"""Stage 04's MIP at Nemotron-51B scale: 80 layers, 6 attention x 9 FFN variants, synthetic costs.

For each instance and each solver (gurobipy where its pip licence admits the size, HiGHS), side by
side in one run: one best child over all batch sizes and k diverse solutions (each differing from
all earlier ones in >= 20 % of layers), at the stage's gap (1e-6), with the diversity cuts in the
stage's formulation of ``mip.formulate`` (``pairs``: one binary "same" variable per distinct earlier
(layer, pair), shared by the cuts, plus the bounds that a layer holds one pair) or, to compare,
``--diversity layers,pairs`` (``layers``: one per cut and layer, the first formulation) and,
optionally, the batch-size cutoff off (``--cutoff on,off``). ``--reduce auto`` (the stage's): a model
over gurobipy's pip licence (126 x 100) is solved by gurobipy on an exact reduction (reduced-cost
fixing, ``search/fixing.py``); ``always`` reduces every model, ``never`` falls back to HiGHS.
Prints each solution's objective for every run and whether they agree, how many solves were proven
to the gap, and the timings. ``--instances large`` is 126 layers x (10 x 10) variants. Costs are
in real units (bytes ~1e9, parameters ~1e9): every row reaches the solvers scaled (mip.formulate).
Synthetic costs follow a Llama-70B layer: attention time ~ Q/O + K/V projections + KV reads, FFN
time ~ width; scores grow with how much a variant removes, more in the first and last layers.

    python benchmarks/bench_search.py [--layers 80 --solutions 10 --instances default,mid,nemotron,large]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from puzzlelib.core.precision import resolve_threads
from puzzlelib.search.mip import Budget, Option, Problem
from puzzlelib.search.searcher import Searcher

ATTN = {"attn:kv8": 8, "attn:kv4": 4, "attn:kv2": 2, "attn:kv1": 1, "attn:linear": -1, "attn:noop": 0}
FFN = {"ffn:1.00": 1.0, "ffn:0.875": 0.875, "ffn:0.75": 0.75, "ffn:0.50": 0.5, "ffn:0.25": 0.25,
       "ffn:0.20": 0.2, "ffn:0.10": 0.1, "ffn:linear": -1, "ffn:noop": 0}
BATCHES = {1: (1024, 1024), 16: (1024, 1024), 64: (1024, 1024)}
# 126 layers x 100 variants (the large case): 10 attention x 10 FFN variants per layer.
ATTN10 = {"attn:kv8": 8, "attn:kv7": 7, "attn:kv6": 6, "attn:kv5": 5, "attn:kv4": 4, "attn:kv3": 3, "attn:kv2": 2,
          "attn:kv1": 1, "attn:linear": -1, "attn:noop": 0}
FFN10 = {"ffn:1.00": 1.0, "ffn:0.875": 0.875, "ffn:0.75": 0.75, "ffn:0.625": 0.625, "ffn:0.50": 0.5,
         "ffn:0.375": 0.375, "ffn:0.25": 0.25, "ffn:0.10": 0.1, "ffn:linear": -1, "ffn:noop": 0}


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
                cost[f"prefill_ms@b{b}"] = (2 * p * b * prompt / 4e14 * 1e3
                                            + (kvb * b * prompt * prompt / 2 / 2e12 * 1e3 if kv > 0 else 0))
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


def run(p, budget, solver: str, k: int, cutoff: bool, diversity: str, time_limit: float, gap: float,
        threads: int, reduce: str = "auto") -> dict:
    """One best child and k diverse solutions with one solver; timings and objectives."""
    s = Searcher(p, budget, solver=solver, gap=gap, time_limit=time_limit, threads=threads, cross_check=False)
    s.use_cutoff, s.diversity, s.reduce = cutoff, diversity, reduce
    t = time.perf_counter()
    best = s.best()
    t_best = time.perf_counter() - t
    s = Searcher(p, budget, solver=solver, gap=gap, time_limit=time_limit, threads=threads, cross_check=False)
    s.use_cutoff, s.diversity, s.reduce = cutoff, diversity, reduce
    t = time.perf_counter()
    sols, _ = s.diverse(k, 0.2, progress=False)
    return {"best": t_best, "best_score": best.predicted["score"], "diverse": time.perf_counter() - t,
            "scores": [x.predicted["score"] for x in sols], "proven": sum(x.solver["proven"] for x in sols),
            "slowest": max(sum(e["seconds"] for e in s.log if e["purpose"] == f"solution {n}")
                           for n in range(1, len(sols) + 1)),
            "solvers": sorted({x["solver"].split()[0] for x in s.log}),
            "reduced": [x["reduced"] for x in s.log if x["reduced"] and x["reduced"]["models"]],
            "largest": (max(x["variables"] for x in s.log), max(x["constraints"] for x in s.log))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--solutions", type=int, default=10)
    ap.add_argument("--instances", default="default,mid,nemotron")
    ap.add_argument("--speedup", type=float, default=2.17)
    ap.add_argument("--memory-gib", type=float, default=80.0)
    ap.add_argument("--gap", type=float, default=1e-6)
    ap.add_argument("--time-limit", type=float, default=300.0)
    ap.add_argument("--solvers", default="gurobi,highs")
    ap.add_argument("--diversity", default="pairs", help="formulations of the diversity cuts to compare: pairs, layers")
    ap.add_argument("--cutoff", default="on", help="on, off or on,off: the batch-size cutoff")
    ap.add_argument("--reduce", default="auto", help="exact reduction by reduced-cost fixing: auto (when gurobipy's "
                    "licence refuses the model), always, never; several: auto,never")
    ap.add_argument("--threads", default="auto",
                    help="solver threads: 'auto' resolves as stage 04 does from the config's threads='auto' "
                         "(1 on a 2-core machine), 0 = the solver's own default, or a count")
    args = ap.parse_args()
    threads = resolve_threads(args.threads if args.threads == "auto" else int(args.threads))
    small = {k: v for k, v in ATTN.items() if k != "attn:kv8"}  # the default parent has 4 KV heads
    instances = {"default": ("default preset size (8 layers, 5 x 9)", 8, small),
                 "mid": ("40 layers, 6 x 9 (inside gurobipy's pip licence)", 40, ATTN),
                 "nemotron": (f"Nemotron-51B scale ({args.layers} layers, 6 x 9)", args.layers, ATTN),
                 "large": ("126 layers, 10 x 10", 126, ATTN10)}
    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the start; gap "
          f"{args.gap:g}; {args.solutions} diverse solutions, each differing in >= 20 % of layers; cross-check off "
          f"(timings are one solver's); per-solve time limit {args.time_limit:g} s; "
          f"solver threads {threads or 'default'}")
    for key in args.instances.split(","):
        label, layers, attn = instances[key]
        p = synthetic(layers, attn, FFN10 if key == "large" else FFN)
        budget = Budget(speedup=args.speedup, max_memory_bytes=args.memory_gib * 2**30)
        print(f"\n== {label}: {len(p.columns)} option binaries, batches {p.batch_sizes}, "
              f"speed-up >= {args.speedup}x, memory <= {args.memory_gib} GiB")
        out = {}
        for solver in args.solvers.split(","):
            for cutoff in [c == "on" for c in args.cutoff.split(",")]:
                for div, red in ((d, r) for d in args.diversity.split(",") for r in args.reduce.split(",")):
                    tag = f"{solver}/{div}/cutoff {'on' if cutoff else 'off'}/reduce {red}"
                    try:
                        r = out[tag] = run(p, budget, solver, args.solutions, cutoff, div, args.time_limit,
                                           args.gap, threads, red)
                    except Exception as e:  # noqa: BLE001 — report (licence refusal) and go on
                        print(f"{tag:38s}: failed: {str(e)[:160]}")
                        continue
                    kept = (f"; {len(r['reduced'])} solves on a reduction, option columns kept "
                            f"{min(x['kept'] for x in r['reduced'])}-{max(x['kept'] for x in r['reduced'])} of "
                            f"{r['reduced'][0]['option_columns']}" if r["reduced"] else "")
                    print(f"{tag:38s}: best {r['best']:6.2f} s; {len(r['scores'])} diverse {r['diverse']:7.2f} s "
                          f"(slowest solution {r['slowest']:.2f} s), {r['proven']} proven to the gap; used "
                          f"{r['solvers']}; largest model {r['largest'][0]} variables x {r['largest'][1]} constraints"
                          f"{kept}", flush=True)
        runs = list(out.items())
        for i, (ta, ra) in enumerate(runs):
            for tb, rb in runs[i + 1:]:
                agree = [abs(x - y) <= args.gap * max(abs(x), abs(y)) + 1e-9
                         for x, y in zip(ra["scores"], rb["scores"])]
                agree += [False] * abs(len(ra["scores"]) - len(rb["scores"]))
                first = agree.index(False) if not all(agree) else None
                print(f"  {ta} vs {tb}: best {ra['best_score']:.9f} vs {rb['best_score']:.9f}; diverse objectives "
                      f"agree to the gap on {sum(agree)} of {len(agree)}" + ("" if first is None else
                      f" (first differing: solution {first + 1}: {ra['scores'][first:first + 1]} vs "
                      f"{rb['scores'][first:first + 1]})"))


if __name__ == "__main__":
    main()
