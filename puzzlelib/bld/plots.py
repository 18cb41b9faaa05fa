"""Stage 02's figures: BLD's error before and after training, its loss curves, the per-layer
heatmap and the FFN channels' contribution.

Each function takes what the stage wrote (or returns) and gives a matplotlib ``Figure``;
reads and writes nothing itself (core/figures.py holds what the stages' figures share).
"""

from __future__ import annotations

from ..core import figures  # before pyplot: it picks the headless Agg backend

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


# ---- 02_bld: the block library -----------------------------------------------------------------
def _bld_groups(rows: list[dict]) -> dict[str, list[str]]:
    """Variant names per kind, in library order (the parent's own first)."""
    groups: dict[str, list[str]] = {}
    for r in rows:
        names = groups.setdefault(r["kind"], [])
        if r["variant"] not in names:
            names.append(r["variant"])
    return groups


_BLD_TITLES = {"attn": "attention variants", "ffn": "FFN variants", "pair": "coupled pairs"}


def bld_before_after(rows: list[dict], title: str = "Normalized MSE before (pure init) and after BLD") -> plt.Figure:
    """Per variant: mean over layers of held-out normalized MSE at initialisation and after BLD
    (bars), each layer as a dot. 1 = as bad as removing the sub-block; the parent's own blocks
    (exactly 0) are left out of the log axis and named in the panel title."""
    groups = _bld_groups(rows)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups) + 1, 4), squeeze=False,
                             gridspec_kw={"width_ratios": [max(2, len(v)) for v in groups.values()]})
    for ax, (kind, names) in zip(axes[0], groups.items()):
        parent = [n for n in names if all(r["final_nmse"] == 0 and not r["trained"]
                                          for r in rows if r["variant"] == n)]
        names = [n for n in names if n not in parent]
        x = np.arange(len(names))
        for off, key, colour, label in ((-0.2, "init_nmse", "0.7", "pure init"),
                                        (0.2, "final_nmse", "C0", "after BLD")):
            vals = [[r[key] for r in rows if r["variant"] == n] for n in names]
            ax.bar(x + off, [np.mean(v) for v in vals], 0.4, color=colour, label=label)
            for xi, v in zip(x, vals):
                ax.plot(np.full(len(v), xi + off), v, "k.", ms=3, alpha=0.6)
        ax.axhline(1.0, color="C3", lw=1, ls="--", label="= removing it (no-op)")
        ax.set_yscale("log")
        ax.set_xticks(x, [n.split(":", 1)[1] if kind != "pair" else n for n in names],
                      rotation=30 if kind == "pair" else 0, ha="right" if kind == "pair" else "center")
        sub = f" (parent's own {', '.join(parent)}: 0)" if parent else ""
        ax.set_title(_BLD_TITLES.get(kind, kind) + sub, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("held-out normalized MSE (log)")
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def bld_loss_curves(records: list[dict], title: str = "BLD loss curves (mean over layers)") -> plt.Figure:
    """Training normalized MSE per step (mean over layers) and held-out evaluations (markers),
    against tokens seen, one line per trained variant; one panel per kind."""
    trained = [r for r in records if r["trained"]]
    groups = _bld_groups(trained)
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5.2 * max(1, len(groups)), 3.8), squeeze=False)
    for ax, (kind, names) in zip(axes[0], groups.items()):
        for c, n in enumerate(names):
            rs = [r for r in trained if r["variant"] == n]
            tps = rs[0]["tokens_per_step"]
            curve = np.mean([r["history"]["train_nmse"] for r in rs], axis=0)
            steps = np.arange(1, len(curve) + 1) * tps
            ax.plot(steps, figures.smooth(list(curve), 4), color=f"C{c % 10}", lw=1.5, label=n)
            ev = np.mean([r["history"]["eval_nmse"] for r in rs], axis=0)
            ax.plot(np.asarray(rs[0]["history"]["eval_step"]) * tps, ev, "o", color=f"C{c % 10}", ms=4)
        ax.set_yscale("log")
        ax.set_xlabel("tokens seen by each block")
        ax.set_title(_BLD_TITLES.get(kind, kind) + " (lines: train, dots: held-out)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[0][0].set_ylabel("normalized MSE (log)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def bld_layer_heatmap(rows: list[dict], key: str = "final_nmse",
                      title: str = "Which layers are hardest to replace (normalized MSE after BLD)") -> plt.Figure:
    """Layers x variants heatmap of normalized MSE (log colour), each cell annotated. The parent's
    own sub-blocks (0 by construction) are left out."""
    from matplotlib.colors import LogNorm

    names = [n for n in dict.fromkeys(r["variant"] for r in rows)
             if not all(r[key] == 0 and not r["trained"] for r in rows if r["variant"] == n)]
    layers = sorted({r["layer"] for r in rows})
    grid = np.full((len(layers), len(names)), np.nan)
    for r in rows:
        if r["variant"] in names:
            grid[layers.index(r["layer"]), names.index(r["variant"])] = r[key]
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(names), 1.2 + 0.42 * len(layers)))
    pos = grid[np.isfinite(grid) & (grid > 0)]
    norm = LogNorm(vmin=max(pos.min(), 1e-4), vmax=max(pos.max(), 1.0)) if pos.size else None
    im = ax.imshow(np.where(grid > 0, grid, np.nan), cmap="magma_r", norm=norm, aspect="auto")
    for i in range(len(layers)):
        for j in range(len(names)):
            v = grid[i, j]
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7,
                        color="white" if norm is not None and v > 0 and norm(v) > 0.6 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers], fontsize=8)
    fig.colorbar(im, ax=ax, label="normalized MSE (1 = removing it)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def channel_contribution(scores: dict, fractions: list[float] = (),
                         title: str = "How much of the FFN's contribution the widest channels carry"
                         ) -> plt.Figure:
    """Per layer: the share of the summed channel contribution kept by the top-k channels (sorted
    largest first) against k / width. The diagonal is "every channel matters equally"; a curve far
    above it means pruning to that width keeps most of what the FFN adds. Dotted lines mark the
    library's widths (``fractions``)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for c, (layer, s) in enumerate(sorted(scores.items())):
        s = np.sort(np.asarray(s, dtype=float))[::-1]
        kept = np.concatenate([[0.0], np.cumsum(s) / max(s.sum(), 1e-30)])
        ax.plot(np.linspace(0, 1, len(kept)), kept, color=plt.cm.viridis(c / max(1, len(scores) - 1)),
                label=f"layer {layer}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="all channels equal")
    for f in fractions:
        if 0 < f < 1:
            ax.axvline(f, color="0.6", lw=0.7, ls=":")
    ax.set_xlabel("share of channels kept (largest contribution first)")
    ax.set_ylabel("share of the total contribution kept")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
