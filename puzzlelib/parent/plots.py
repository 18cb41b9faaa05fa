"""Stage 00's figures: the parent's training loss and where a token's compute goes.

Each function takes what the stage wrote (or returns) and gives a matplotlib ``Figure``;
reads and writes nothing itself (core/figures.py holds what the stages' figures share).
"""

from __future__ import annotations

from ..core import figures  # before pyplot: it picks the headless Agg backend

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def loss_curves(history: dict, title: str = "Parent training") -> plt.Figure:
    """Training loss (raw + moving average) and held-out loss against tokens seen."""
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 1]})
    tps = history.get("tokens_per_step", 1)
    steps = np.asarray(history["step"])
    if len(steps):
        ax.plot((steps + 1) * tps, history["train_loss"], color="0.8", lw=0.8, label="train (per step)")
        ax.plot((steps + 1) * tps, figures.smooth(history["train_loss"], 20), color="C0", lw=1.8,
                label="train (moving avg)")
    if history.get("eval_step"):
        ax.plot(np.asarray(history["eval_step"]) * tps, history["eval_loss"], "o-", color="C3", label="held-out")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if history.get("lr"):
        ax_lr.plot(steps, history["lr"], color="C2")
        ax_lr.set_xlabel("step")
        ax_lr.set_title("learning rate")
        ax_lr.grid(alpha=0.3)
    else:
        ax_lr.axis("off")
    fig.tight_layout()
    return fig


def compute_split(parts: dict[str, float], title: str = "Where a token's compute goes") -> plt.Figure:
    """Horizontal stacked bar of named compute shares (e.g. attention / FFN / LM head)."""
    fig, ax = plt.subplots(figsize=(9, 1.8))
    total = sum(parts.values())
    left = 0.0
    for i, (name, v) in enumerate(parts.items()):
        share = v / total
        ax.barh([0], [share], left=left, color=f"C{i}", label=f"{name} ({100 * share:.1f} %)")
        left += share
    ax.set_xlim(0, 1)
    ax.set_yticks([])
    ax.set_xlabel("share of forward FLOPs per token")
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=len(parts), frameon=False)
    fig.tight_layout()
    return fig
