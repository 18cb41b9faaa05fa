"""Stage 06's measured Pareto and matched comparisons: does the MIP beat simple pruning, and by how much?

What it does:
* ``pareto_entries`` turns stage 04's sweep (``pareto_children.json``: the MIP, greedy, uniform and
  depth child at every speed-up target) into models stage 06 evaluates straight from the BLD library
  (before GKD). A child whose choices equal one already evaluated is not evaluated twice: its point
  names the model that carries its numbers.
* ``fidelity`` scores a model on the first ``eval_fidelity_tokens`` held-out tokens against the
  parent, per window of ``seq_len`` tokens: the summed KL(parent ‖ model) of the next-token
  distributions and the summed negative log-likelihood of the true tokens (bits per byte with the
  window's UTF-8 bytes). Token-level metrics see every position, so they separate children whose
  accuracies are within noise of each other.
* ``bootstrap_difference`` gives the paired bootstrap 95 % interval of a difference of two models on
  the same samples (mean task accuracy, or a ratio of sums such as KL per token); ``comparisons``
  pairs the MIP child with each baseline at every target. A baseline whose predicted speed-up
  (stage 01's cost table) is more than 5 % above the MIP's at that target cannot be tuned down to it
  (depth pruning drops whole layers): it is compared with the MIP child of the nearest predicted
  speed-up instead, and the row says so. Predicted, not measured, speed-ups do the matching so
  that which pairs are compared does not change from one rerun to the next.
* ``pareto_goal`` checks the goal of the real-parent preset against the measured speed-ups.

Reads: stage 04's ``pareto_children.json`` and the per-sample results stage 06 wrote. Writes:
nothing (stage 06 stores what these return). Leaves out: the lm-eval tasks (``evaluation.stage``),
the speed measurement (``throughput.py``), the figure (``plots.pareto_figure``) and the text
(``report.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.eval_tasks import EvaluationError

METHODS = ("mip", "greedy", "uniform", "depth")
MATCH_TOLERANCE = 0.05  # a baseline more than 5 % faster (predicted) than the MIP at a target is re-matched
GOAL = {"speedup": 1.5, "retention": 0.95}  # issue #15's goal for the real parent


def point_name(method: str, target: float) -> str:
    return f"{method}@{target:g}x (before GKD)"


def read_children(search_dir: Path) -> list[dict]:
    """Stage 04's sweep children; a clear error for a search written before they were saved."""
    path = Path(search_dir) / "pareto_children.json"
    if not path.is_file():
        raise EvaluationError(f"{path} is missing: this search predates the saved Pareto children. Rerun "
                              "notebooks/04_search.ipynb with force=True (or set eval_pareto=false)")
    return json.loads(path.read_text())


def plan_points(children: list[dict], known: dict[tuple, str]) -> tuple[list[dict], list[dict]]:
    """``(points, new)``: one point per (method, target) child of the sweep; ``new`` are the children
    whose choices no model in ``known`` ({choices tuple: model name}) already has, each once."""
    from ..search.searcher import ChildSpec

    points, new, seen = [], [], dict(known)
    for c in children:
        if c["method"] not in METHODS:
            continue
        spec = ChildSpec.from_dict(c["spec"])
        key = tuple(tuple(x) for x in spec.choices)
        name = seen.get(key)
        if name is None:
            name = seen[key] = point_name(c["method"], c["target_speedup"])
            new.append({"name": name, "spec": spec})
        points.append({"method": c["method"], "target": float(c["target_speedup"]), "model": name})
    return points, new


# ----------------------------------------------------------------------------- token fidelity

def fidelity_windows(held: np.ndarray, seq_len: int, max_tokens: int, tokenizer) -> tuple[torch.Tensor, list[int]]:
    """The first ``max_tokens // seq_len`` held-out windows ``[n, seq_len + 1]`` and each window's
    target bytes (UTF-8 of its decoded targets: the denominator of bits per byte)."""
    n = min((len(held) - 1) // seq_len, max(1, max_tokens // seq_len))
    if n < 1:
        raise EvaluationError(f"the held-out split ({len(held)} tokens) is shorter than one window of "
                              f"seq_len={seq_len}")
    w = torch.as_tensor(np.stack([held[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)]).astype(np.int64))
    nbytes = [max(1, len(tokenizer.decode(w[i, 1:].tolist()).encode("utf-8"))) for i in range(n)]
    return w, nbytes


@torch.inference_mode()
def fidelity(model, windows: torch.Tensor, parent_logprobs: list[torch.Tensor] | None, batch_size: int = 4
             ) -> tuple[dict, list[torch.Tensor] | None]:
    """Per window: ``kl`` (Σ over tokens of KL(parent ‖ model), nats), ``nll`` (Σ −log p(true token),
    nats), ``tokens``. With ``parent_logprobs=None`` the model *is* the parent: its log-probabilities
    (fp16, for the KL of every later model) are returned too and its KL is 0."""
    dev = next(model.parameters()).device
    out = {"kl": [], "nll": [], "tokens": []}
    keep = [] if parent_logprobs is None else None
    for k, i in enumerate(range(0, len(windows), batch_size)):
        w = windows[i:i + batch_size].to(dev)
        logp = F.log_softmax(model(w[:, :-1]).logits.float(), dim=-1)
        nll = -logp.gather(-1, w[:, 1:, None]).squeeze(-1).sum(1)
        if parent_logprobs is None:
            keep.append(logp.to(torch.float16).cpu())
            kl = torch.zeros(len(w))
        else:
            p_logp = parent_logprobs[k].to(dev).float()
            kl = (p_logp.exp() * (p_logp - logp)).sum(-1).sum(1)
        out["kl"] += kl.double().cpu().tolist()
        out["nll"] += nll.double().cpu().tolist()
        out["tokens"] += [w.shape[1] - 1] * len(w)
    return out, keep


# ----------------------------------------------------------------------------- paired intervals

def bootstrap_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray], iters: int = 1000, seed: int = 0
                         ) -> list[float]:
    """``[a − b, lo, hi]``: the difference of mean task accuracy (the mean over tasks of each task's
    mean 0/1 correctness) with its paired bootstrap 95 % interval. Each resample draws the same
    sample indices for both models, so what the samples share cancels."""
    point = float(np.mean([np.mean(a[t]) - np.mean(b[t]) for t in a]))
    if iters <= 0:
        return [point, math.nan, math.nan]
    rng = np.random.default_rng([seed, 0xD1FF])
    d = np.zeros(iters)
    for t in a:
        x, y = np.asarray(a[t], float), np.asarray(b[t], float)
        idx = rng.integers(0, len(x), size=(iters, len(x)))
        d += (x[idx].mean(1) - y[idx].mean(1)) / len(a)
    lo, hi = np.percentile(d, [2.5, 97.5])
    return [point, float(lo), float(hi)]


def bootstrap_ratio_difference(num_a, num_b, den, iters: int = 1000, seed: int = 0, scale: float = 1.0
                               ) -> list[float]:
    """``[A − B, lo, hi]`` for A = scale·Σnum_a/Σden and B = scale·Σnum_b/Σden over the same units
    (windows, chunks), resampled together: e.g. KL per token or bits per byte of two models."""
    na, nb, dd = (np.asarray(v, float) for v in (num_a, num_b, den))
    point = scale * (na.sum() - nb.sum()) / dd.sum()
    if iters <= 0:
        return [float(point), math.nan, math.nan]
    rng = np.random.default_rng([seed, 0xF1D])
    idx = rng.integers(0, len(dd), size=(iters, len(dd)))
    d = scale * (na[idx].sum(1) - nb[idx].sum(1)) / dd[idx].sum(1)
    lo, hi = np.percentile(d, [2.5, 97.5])
    return [float(point), float(lo), float(hi)]


def verdict(diff: list[float], bigger_is_better: bool) -> str:
    """"win" / "loss" when the interval excludes 0 (from the MIP's side), else "tie"."""
    _, lo, hi = diff
    if math.isnan(lo):
        return "no interval"
    if lo > 0:
        return "win" if bigger_is_better else "loss"
    if hi < 0:
        return "loss" if bigger_is_better else "win"
    return "tie"


def compare(mip: str, base: str, correct: dict, fid: dict, iters: int, seed: int) -> dict:
    """MIP − baseline on accuracy (bigger is better), KL per token and bits per byte (smaller).
    When both methods found the very same child the verdicts say "same child", not "tie"."""
    out = {"accuracy_diff": bootstrap_difference(correct[mip], correct[base], iters, seed)}
    out["accuracy_verdict"] = verdict(out["accuracy_diff"], True)
    if mip in fid and base in fid:
        fa, fb = fid[mip], fid[base]
        out["kl_diff"] = bootstrap_ratio_difference(fa["kl"], fb["kl"], fa["tokens"], iters, seed)
        out["bpb_diff"] = bootstrap_ratio_difference(fa["nll"], fb["nll"], fa["bytes"], iters, seed, 1 / math.log(2))
        out["kl_verdict"] = verdict(out["kl_diff"], False)
        out["bpb_verdict"] = verdict(out["bpb_diff"], False)
    if mip == base:
        out.update({k: "same child" for k in out if k.endswith("_verdict")})
    return out


def comparisons(points: list[dict], predicted: dict[str, float], correct: dict, fid: dict, iters: int, seed: int,
                after_gkd: list[tuple[str, str]] = ()) -> list[dict]:
    """At every target, the MIP child against each baseline child (see the module docstring for how
    a baseline that overshoots the target is matched); then the ``after_gkd`` (mip, baseline) pairs."""
    mips = {p["target"]: p["model"] for p in points if p["method"] == "mip"}
    rows = []
    for p in points:
        if p["method"] == "mip":
            continue
        t, base = p["target"], p["model"]
        mip, how = mips.get(t), "same target"
        if mip is None or predicted[base] > predicted[mip] * (1 + MATCH_TOLERANCE):
            if not mips:
                continue
            mip = min(mips.values(), key=lambda m: abs(math.log(predicted[m] / predicted[base])))
            how = (f"nearest predicted speed-up ({predicted[base]:.2f}x {p['method']} vs {predicted[mip]:.2f}x "
                   f"MIP): {p['method']} cannot be tuned to {t:g}x")
        rows.append({"stage": "before GKD", "target": t, "baseline": p["method"], "mip_model": mip,
                     "baseline_model": base, "matched_by": how,
                     **compare(mip, base, correct, fid, iters, seed)})
    for mip, base in after_gkd:
        rows.append({"stage": "after GKD", "target": None, "baseline": base, "mip_model": mip,
                     "baseline_model": base, "matched_by": "the run's main target, the same GKD budget",
                     **compare(mip, base, correct, fid, iters, seed)})
    return rows


def pareto_goal(metrics: dict) -> dict | None:
    """The real-parent goal, checked against the *measured* speed-ups: a MIP child at ≥ 1.5× keeps
    ≥ 95 % of the parent's mean accuracy and is ahead of uniform and depth pruning at its target with
    the accuracy interval excluding 0. Checked twice: on the distilled children (the MIP child after
    GKD against the baselines after the same GKD) and on the sweep's children before GKD (the
    fastest-target MIP child that keeps the retention, else the best-retaining one at ≥ 1.5×).
    ``{"speedup", "retention", "checks": [...], "met"}`` (met: either check met); ``None`` without a
    measured Pareto."""
    pe = metrics.get("pareto_eval")
    if not pe:
        return None
    rows = {m["name"]: m for m in metrics["models"]}

    def check(stage: str, model: str, comps: list[dict]) -> dict:
        r = rows[model]
        ahead = {c["baseline"]: c["accuracy_diff"][1] > 0 for c in comps}
        fast = (r.get("measured_speedup") or 0) >= GOAL["speedup"]
        keeps = r["retention"] >= GOAL["retention"]
        both = set(ahead) >= {"uniform", "depth"} and all(ahead[b] for b in ("uniform", "depth"))
        why = [w for w, bad in ((f"measured {r.get('measured_speedup') or 0:.2f}x < {GOAL['speedup']}x", not fast),
                                ("retention below the goal", not keeps),
                                ("a baseline was not compared" if not set(ahead) >= {"uniform", "depth"} else
                                 "not ahead of uniform and depth with the interval excluding 0", not both)) if bad]
        return {"stage": stage, "model": model, "measured_speedup": r.get("measured_speedup"),
                "retention": r["retention"], "ahead_with_interval": ahead, "met": not why, "why": "; ".join(why)}

    checks = []
    after = [c for c in pe["comparisons"] if c["stage"] == "after GKD"]
    if after:
        checks.append(check("after GKD", after[0]["mip_model"], after))
    cands = [p for p in pe["points"] if p["method"] == "mip"
             and (rows[p["model"]].get("measured_speedup") or 0) >= GOAL["speedup"]]
    if cands:
        ok = [p for p in cands if rows[p["model"]]["retention"] >= GOAL["retention"]]
        p = max(ok, key=lambda q: q["target"]) if ok else max(cands, key=lambda q: rows[q["model"]]["retention"])
        checks.append(check("before GKD", p["model"], [c for c in pe["comparisons"] if c["stage"] == "before GKD"
                                                       and c["mip_model"] == p["model"]]))
    return {**GOAL, "checks": checks, "met": any(c["met"] for c in checks)}
