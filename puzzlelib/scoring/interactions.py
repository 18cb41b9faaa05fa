"""The interaction check: do replace-1-block scores add up over a whole child?

**Interaction check** (the EvoPress critique). For a few random multi-block children (1 … L
replaced sub-blocks, seeded), the sum of their blocks' KL scores is compared with their measured
KL: Spearman / Pearson correlation and the measured/predicted ratio say how far the additive
quality model can be trusted.

What it does: ``interaction_children`` (the seeded random children), ``check_interactions``
(each child built from the library and scored with a full forward, next to the table's
prediction), ``summarize_interactions`` (the correlations and ratios above), the rank
statistics they use (``pearson``, ``spearman``) and ``spec_diff`` (a child as only what differs
from the parent). ``INTERACTION_COLUMNS`` is the schema of ``interactions.csv``.

Reads: the parent, a :class:`~puzzlelib.scoring.score_table.ScoreTable` and the child's blocks through
the caller's ``blocks_for``, all in memory. Writes: nothing (rows are returned; the stage,
``scoring.run``, writes ``interactions.csv``). Leaves out: scoring single blocks
(``prefix_scoring``) and correcting the additive model (the search still adds block scores
up; this only measures how far that can be trusted).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..core.blocks import build_child
from ..core.modeling_decilm import PuzzleForCausalLM
from .prefix_scoring import ParentReference, parent_reference, score_child
from .score_table import ScoreTable, ScoringError

INTERACTION_COLUMNS = ("child", "n_replaced", "predicted_kl", "measured_kl", "ratio",
                       "predicted_lm_loss_delta", "measured_lm_loss_delta",
                       "measured_top1_agreement", "spec")


# --------------------------------------------------------------------------- interactions

def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (for Spearman)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(_ranks(np.asarray(x, float)), _ranks(np.asarray(y, float)))


def interaction_children(table: ScoreTable, n: int, seed: int) -> list[list[tuple[str, str]]]:
    """``n`` random multi-block children: child k replaces m_k sub-blocks, m_k spread evenly
    from 1 to L (of the 2L attention/FFN positions), each by a uniformly drawn non-parent variant
    of the library — a range of predicted KLs from mild to severe, as the search would explore."""
    rng = random.Random(seed)
    base = table.parent_choices()
    L = table.num_layers
    positions = [(i, k) for i in range(L) for k in (0, 1)
                 if [v for v in table.variants(i, ("attn", "ffn")[k]) if v != base[i][k]]]
    if not positions:
        raise ScoringError("the library has no non-parent variant to build children from")
    out = []
    for c in range(n):
        m = 1 + round(c * (L - 1) / max(n - 1, 1))
        child = [list(p) for p in base]
        for i, k in rng.sample(positions, min(m, len(positions))):
            child[i][k] = rng.choice([v for v in table.variants(i, ("attn", "ffn")[k])
                                      if v != base[i][k]])
        out.append([tuple(p) for p in child])
    return out


def spec_diff(child: Sequence[tuple[str, str]], base: Sequence[tuple[str, str]]) -> str:
    """Only what differs from the parent: "L0 attn:kv1 · L5 ffn:0.25"."""
    parts = [f"L{i} {v}" for i, (pair, ref) in enumerate(zip(child, base))
             for v, r in zip(pair, ref) if v != r]
    return " · ".join(parts) or "parent"


@torch.no_grad()
def check_interactions(parent: PuzzleForCausalLM, table: ScoreTable,
                       children: list[list[tuple[str, str]]],
                       blocks_for: Callable[[list[tuple[str, str]]], dict], batches,
                       progress: bool = True, reference: ParentReference | None = None
                       ) -> list[dict]:
    """Measured KL of each whole child vs the sum of its blocks' scores (full forwards)."""
    ref = reference or parent_reference(parent, batches)
    base = table.parent_choices()
    rows = []
    for k, child in enumerate(tqdm(children, desc="interactions", unit="child", disable=not progress)):
        model = build_child(parent, child, blocks=blocks_for(child)).to(next(parent.parameters()).device)
        r = score_child(parent, model, batches, ref)
        pred = table.predict(child, "kl")
        rows.append({"child": k, "n_replaced": sum(v != b for p, q in zip(child, base) for v, b in zip(p, q)),
                     "predicted_kl": pred, "measured_kl": r["kl"],
                     "ratio": r["kl"] / pred if pred > 0 else float("nan"),
                     "predicted_lm_loss_delta": table.predict(child, "lm_loss_delta"),
                     "measured_lm_loss_delta": r["lm_loss_delta"],
                     "measured_top1_agreement": r["top1_agreement"], "spec": spec_diff(child, base)})
    return rows


def summarize_interactions(rows: list[dict]) -> dict:
    pred = [r["predicted_kl"] for r in rows]
    meas = [r["measured_kl"] for r in rows]
    ratios = [r["ratio"] for r in rows if math.isfinite(r["ratio"])]
    return {"children": len(rows),
            "spearman_kl": spearman(pred, meas), "pearson_kl": pearson(pred, meas),
            "pearson_log_kl": pearson(np.log(np.maximum(pred, 1e-12)),
                                      np.log(np.maximum(meas, 1e-12))) if rows else float("nan"),
            "ratio_median": float(np.median(ratios)) if ratios else float("nan"),
            "ratio_min": float(min(ratios)) if ratios else float("nan"),
            "ratio_max": float(max(ratios)) if ratios else float("nan"),
            "spearman_lm_loss_delta": spearman([r["predicted_lm_loss_delta"] for r in rows],
                                               [r["measured_lm_loss_delta"] for r in rows])}
