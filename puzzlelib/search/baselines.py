"""Baselines at the same budget as the MIP — what Puzzle's search has to beat.

What it does: given a :class:`~puzzlelib.search.searcher.Searcher` (problem + budget), builds four children,
each a :class:`~puzzlelib.search.searcher.ChildSpec` like the MIP's, so stages 05/06 train and evaluate
them alike:

* **uniform** (Minitron-style width/KV pruning): the *same* GQA KV-head count and SwiGLU width in
  every layer; of the uniform children that meet the budget, the least aggressive one (most
  parameters kept). It never looks at the scores, as uniform pruning does not;
* **depth** (ShortGPT-style): drop whole layers (attention and FFN become no-ops) in order of
  increasing *block influence* ``BI_i = 1 − mean cos(h_in_i, h_out_i)`` measured on the parent
  over held-out tokens (:func:`block_influence`), until the budget holds;
* **greedy**: from the parent, repeatedly make the single block change with the smallest score
  increase per unit of budget violation removed, until the budget holds (per batch size, best kept);
* **random**: uniform draws from the library (seeded) until one meets the budget; when none of
  ``tries`` does, a random-objective MIP point (a random *feasible* child), and it says so.

Reads: the parent model and held-out tokens (block influence only). Writes nothing; ``search.run``
saves the results in ``baselines.json`` and ``pareto.csv``. Leaves out: retraining after pruning
(Minitron distils after pruning; here every method gets the same stage-05 GKD afterwards).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .mip import Budget, Option, constraint_rows
from .searcher import ChildSpec, Searcher, pareto_row

METHODS = ("uniform", "depth", "greedy", "random")


def _is_width(name: str) -> bool:
    """GQA / SwiGLU variants (what width/KV pruning produces), not linear or no-op replacements."""
    return not name.endswith((":linear", ":noop"))


# ------------------------------------------------------------------------------ uniform

def uniform(s: Searcher, budget: Budget | None = None) -> ChildSpec | None:
    """The least aggressive same-everywhere (KV heads, FFN width) child meeting the budget."""
    P = s.problem
    names = {k: [o.name for o in P.layers[0][k] if _is_width(o.name)
                 and all(o.name in {x.name for x in lay[k]} for lay in P.layers)] for k in ("attn", "ffn")}
    found = []
    for a in names["attn"]:
        for f in names["ffn"]:
            child = [(a, f, False)] * P.num_layers
            b = s.best_batch(child, budget)
            if b is not None:
                ev = P.evaluate(child, b)
                found.append((-ev["params"], ev["score"], a, f, b))
    if not found:
        return None
    _, _, a, f, b = min(found)
    spec = s.spec([(a, f, False)] * P.num_layers, b, "uniform", "uniform", budget)
    spec.notes.append(f"{a} and {f} in every layer: the most parameters of {len(found)} uniform children "
                      "that meet the budget")
    return spec


# ------------------------------------------------------------------------------ depth

@torch.inference_mode()
def block_influence(model, tokens: str | Path | np.ndarray, seq_len: int, max_tokens: int = 16384,
                    batch_size: int = 8, progress: bool = True) -> list[float]:
    """ShortGPT's block influence per layer: 1 − mean cosine(input, output) of the residual stream
    over held-out tokens (``tokens``: an array of ids or a stage-00 ``tokens/`` folder)."""
    from ..core import data

    held = data.load_tokens(tokens, "heldout") if isinstance(tokens, (str, Path)) else tokens
    L = model.config.num_hidden_layers
    total, n = torch.zeros(L, dtype=torch.float64), 0
    for x, _ in tqdm(data.heldout_batches(held, batch_size, seq_len, max_tokens), desc="block influence",
                     disable=not progress, leave=False):
        hs = model(x.to(next(model.parameters()).device), output_hidden_states=True).hidden_states
        for i in range(L):
            total[i] += (1 - F.cosine_similarity(hs[i].double(), hs[i + 1].double(), dim=-1)).sum().cpu()
        n += x.numel()
    return (total / max(n, 1)).tolist()


def depth(s: Searcher, influence: Sequence[float], budget: Budget | None = None) -> ChildSpec | None:
    """Drop the least influential layers, one at a time, until the budget holds."""
    P = s.problem
    noops = (("attn", "attn:noop"), ("ffn", "ffn:noop"))
    if any(n not in {o.name for o in lay[k]} for lay in P.layers for k, n in noops):
        return None  # no-ops excluded from the search space: depth pruning cannot be expressed
    order = sorted(range(P.num_layers), key=lambda i: influence[i])
    child = [(a, f, False) for a, f in P.parent]
    for k in range(P.num_layers + 1):
        b = s.best_batch(child, budget)
        if b is not None:
            spec = s.spec(child, b, "depth", "depth", budget)
            spec.notes.append(f"dropped layers {sorted(order[:k])} (lowest block influence first)")
            return spec
        if k < P.num_layers:
            child[order[k]] = ("attn:noop", "ffn:noop", False)
    return None


# ------------------------------------------------------------------------------ greedy

def _greedy_at(s: Searcher, budget: Budget, batch: int) -> list | None:
    P = s.problem
    rows = constraint_rows(P, budget, batch, s.ref_tps)
    cur: list[list[Option]] = [[P.option(i, a), P.option(i, f)] for i, (a, f) in enumerate(P.parent)]
    if not rows:
        return cur
    lo, hi = np.array([r.lo for r in rows]), np.array([r.hi for r in rows])
    cache: dict[int, np.ndarray] = {}

    def vec(opts: list[Option]) -> np.ndarray:
        for o in opts:
            if id(o) not in cache:
                cache[id(o)] = np.array([P.coef(o.cost, r.what, batch) for r in rows])
        return sum((cache[id(o)] for o in opts), np.zeros(len(rows)))

    def viol(v: np.ndarray) -> float:  # total relative excess over the upper and shortfall under the lower bounds
        with np.errstate(invalid="ignore", divide="ignore"):
            over = np.where(np.isfinite(hi), np.maximum(0.0, (v - hi) / np.abs(hi)), 0.0)
            under = np.where(np.isfinite(lo), np.maximum(0.0, (lo - v) / np.abs(lo)), 0.0)
        return float(np.nan_to_num(over + under, posinf=1e30).sum())

    lhs = np.array([P.coef(P.fixed, r.what, batch) for r in rows]) + sum(vec(c) for c in cur)
    for _ in range(10 * len(P.columns) + 10):
        v0 = viol(lhs)
        if v0 <= 1e-12:
            return cur
        best = None
        for i, lay in enumerate(P.layers):
            old, names = cur[i], {o.name: o for k in ("attn", "ffn") for o in lay[k]}
            a, f = (old[0].halves if len(old) == 1 else (old[0].name, old[1].name))
            moves = [[p] for p in lay["pair"]]
            moves += [[x, names[f]] for x in lay["attn"] if f in names]
            moves += [[names[a], x] for x in lay["ffn"] if a in names]
            base_vec, base_score = vec(old), sum(o.score for o in old)
            for new in moves:
                nl = lhs + vec(new) - base_vec
                dv = v0 - viol(nl)
                if dv > 1e-12:
                    key = ((sum(o.score for o in new) - base_score) / dv, -dv)
                    if best is None or key < best[0]:
                        best = (key, i, new, nl)
        if best is None:
            return None  # no single change reduces the violation: greedy is stuck
        _, i, cur[i], lhs = best
    return None


def greedy(s: Searcher, budget: Budget | None = None) -> ChildSpec | None:
    """Best score-per-cost block changes until the budget holds, at each batch size; best kept."""
    found = []
    for b in s.batches:
        cur = _greedy_at(s, budget or s.budget, b)
        if cur is not None:
            child = [(*o[0].halves, True) if len(o) == 1 else (o[0].name, o[1].name, False) for o in cur]
            spec = s.spec(child, b, "greedy", "greedy", budget)
            if all(c["ok"] for c in spec.checks.values()):
                found.append((spec.predicted["score"], -spec.predicted["tokens_per_s"], b, spec))
    return min(found, key=lambda t: t[:3])[3] if found else None


# ------------------------------------------------------------------------------ random

def random_child(s: Searcher, seed: int = 0, tries: int = 2000, budget: Budget | None = None) -> ChildSpec | None:
    """A child drawn uniformly from the library (seeded) that meets the budget."""
    P, rng = s.problem, random.Random(seed)
    for t in range(tries):
        child = [(rng.choice(lay["attn"]).name, rng.choice(lay["ffn"]).name, False) for lay in P.layers]
        b = s.best_batch(child, budget)
        if b is not None:
            spec = s.spec(child, b, "random", "random", budget)
            spec.notes.append(f"uniform draw {t + 1} (of up to {tries}) from the library, seed {seed}")
            return spec
    gen = np.random.default_rng(seed)
    for b in gen.permutation(s.batches).tolist():
        res = s._solve(b, constraint_rows(P, budget or s.budget, b, s.ref_tps), "random baseline",
                       objective=gen.random(len(P.columns)))
        if res.child is not None:
            spec = s.spec(res.child, b, "random", "random", budget)
            spec.notes.append(f"none of {tries} uniform draws met the budget: a random-objective MIP point "
                              "(a random feasible child) instead")
            return spec
    return None


# ------------------------------------------------------------------------------ all of them

def all_baselines(s: Searcher, influence: Sequence[float], seed: int = 0, tries: int = 2000
                  ) -> tuple[dict[str, ChildSpec | None], list[str]]:
    """``{method: spec or None}`` at the searcher's budget, and notes on the ones that failed."""
    out = {"uniform": uniform(s), "depth": depth(s, influence), "greedy": greedy(s),
           "random": random_child(s, seed, tries)}
    notes = [f"baseline {k}: no child of this kind meets the budget" for k, v in out.items() if v is None]
    return out, notes


def sweep(s: Searcher, influence: Sequence[float], speedups: Sequence[float], keep: list | None = None) -> list[dict]:
    """Pareto rows of the deterministic baselines at each speed-up target (as ``Searcher.pareto``;
    ``keep`` receives ``(target, spec)`` of every child found)."""
    from dataclasses import replace

    rows = []
    for target in speedups:
        b = replace(s.budget, speedup=target)
        for method, spec in (("greedy", greedy(s, b)), ("uniform", uniform(s, b)), ("depth", depth(s, influence, b))):
            rows.append(pareto_row(method, target, spec))
            if spec is not None and keep is not None:
                keep.append((target, spec))
    return rows
