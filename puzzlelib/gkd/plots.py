"""Stage 05's figures: GKD's loss curves, held-out KL before and after, and the loss ablation.

Each function takes what the stage wrote (or returns) and gives a matplotlib ``Figure``;
reads and writes nothing itself (core/figures.py holds what the stages' figures share).
"""

from __future__ import annotations

from ..core import figures  # before pyplot: it picks the headless Agg backend

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def gkd_curves(history: dict, title: str = "GKD") -> plt.Figure:
    """GKD loss terms per step (cosine, KL, LM when used) and held-out KL at each evaluation."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    steps = np.asarray(history["step"]) + 1
    for i, term in enumerate(("cosine", "kl", "lm")):
        ys = history.get(term) or []
        if any(ys):
            ax.plot(steps, ys, color=f"C{i}", alpha=0.35, lw=0.8)
            ax.plot(steps, figures.smooth(ys, 8), color=f"C{i}", lw=1.8, label=term)
    ax.set_xlabel("step")
    ax.set_ylabel("loss term (train batch)")
    ax.set_title(f"{title}: loss terms")
    ax.grid(alpha=0.3)
    ax.legend()
    ev = history.get("eval") or []
    if ev:
        ax2.plot(history["eval_step"], [e["kl"] for e in ev], "o-", color="C3")
        ax2.set_xlabel("step")
        ax2.set_ylabel("held-out KL(parent ‖ child)")
        ax2.set_title("held-out KL")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def before_after(metrics: dict[str, dict], key: str = "kl", title: str = "Held-out KL to the parent") -> plt.Figure:
    """Grouped bars: a metric before and after GKD for every child."""
    names = list(metrics)
    before = [metrics[n]["before"][key] for n in names]
    after = [metrics[n]["after"][key] for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(names)), 3.6))
    ax.bar(x - 0.2, before, 0.4, label="before GKD (BLD blocks only)", color="0.7")
    ax.bar(x + 0.2, after, 0.4, label="after GKD", color="C0")
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def gkd_ablation(ablation: dict[str, dict], best: str = "cosine + KL",
                 title: str = "GKD loss ablation (same child, same budget)") -> plt.Figure:
    """Bars per loss combination: held-out KL to the parent (lower is better) and top-1 agreement
    (higher is better); ``best`` (the paper's choice) is outlined so the comparison is at a glance."""
    names = list(ablation)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, key, label in ((axes[0], "kl", "held-out KL(parent ‖ child) ↓"),
                           (axes[1], "top1_agreement", "top-1 agreement with the parent ↑")):
        vals = [ablation[n][key] for n in names]
        bars = ax.bar(range(len(names)), vals, color=["C0" if n == best else "0.7" for n in names])
        for b, n in zip(bars, names):
            if n == best:
                b.set_edgecolor("k")
                b.set_linewidth(1.5)
        lo, hi = min(vals), max(vals)
        pad = (hi - lo) * 0.6 or abs(hi) * 0.05 or 1.0
        ax.set_ylim(max(0.0, lo - pad), hi + pad)  # differences are small: zoom in on them
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{title} — outlined: the paper's best ({best})", fontsize=10)
    fig.tight_layout()
    return fig
