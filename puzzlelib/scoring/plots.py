"""Stage 03's figures: the score table as a heatmap, BLD vs pure-init scores, the score range
of each variant and whether scores add up over whole children.

Each function takes what the stage wrote (or returns) and gives a matplotlib ``Figure``;
reads and writes nothing itself (core/figures.py holds what the stages' figures share).
"""

from __future__ import annotations

from ..core import figures  # noqa: F401  # before pyplot: it picks the headless Agg backend

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


# ---- 03_scoring -----------------------------------------------------------------------------------
def _log_norm(values: np.ndarray, floor: float = 1e-5):
    from matplotlib.colors import LogNorm

    pos = values[np.isfinite(values) & (values > 0)]
    return LogNorm(vmin=max(pos.min(), floor), vmax=pos.max()) if pos.size else None


def score_heatmap(rows: list[dict], metric: str = "kl", source: str = "bld",
                  title: str = "Which layers can be cut: KL(parent ‖ parent with one block replaced)"
                  ) -> plt.Figure:
    """Layers x variants of a replace-1-block score, attention and FFN side by side, one shared
    log colour scale, every cell annotated; the parent's own sub-block (0 by construction) is
    shown as "parent"."""
    rows = [r for r in rows if r["source"] == source and r["sub_block"] in ("attn", "ffn")]
    layers = sorted({r["layer"] for r in rows})
    panels = {k: list(dict.fromkeys(r["variant"] for r in rows if r["sub_block"] == k)) for k in ("attn", "ffn")}
    grids = {}
    for k, names in panels.items():
        g = np.full((len(layers), len(names)), np.nan)
        for r in rows:
            if r["sub_block"] == k:
                g[layers.index(r["layer"]), names.index(r["variant"])] = r[metric]
        grids[k] = g
    norm = _log_norm(np.concatenate([g.ravel() for g in grids.values()]))
    widths = [max(len(n), 1) for n in panels.values()]
    fig, axes = plt.subplots(1, 2, figsize=(2.2 + 0.8 * sum(widths), 1.9 + 0.42 * len(layers)),
                             gridspec_kw={"width_ratios": widths}, layout="constrained")
    parent = {(r["layer"], r["variant"]) for r in rows if r["is_parent"]}
    for ax, (k, names) in zip(axes, panels.items()):
        g = grids[k]
        im = ax.imshow(np.where(g > 0, g, np.nan), cmap="magma_r", norm=norm, aspect="auto")
        for i, layer in enumerate(layers):
            for j, n in enumerate(names):
                v = g[i, j]
                if (layer, n) in parent:
                    ax.text(j, i, "parent", ha="center", va="center", fontsize=6, color="0.4")
                elif np.isfinite(v):
                    dark = norm is not None and v > 0 and norm(v) > 0.6
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
        ax.set_xticks(range(len(names)), [n.split(":", 1)[1] for n in names], rotation=45,
                      ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers], fontsize=8)
        ax.set_title({"attn": "attention variants", "ffn": "FFN variants"}[k], fontsize=9)
    fig.colorbar(im, ax=axes, label=f"{metric} (log scale)", fraction=0.025)
    fig.suptitle(title, fontsize=10)
    return fig


def bld_vs_init(rows: list[dict], metric: str = "kl",
                title: str = "What BLD buys: replace-1-block KL from pure init vs after BLD") -> plt.Figure:
    """Left: every trained (layer, variant) as a point, init score (x) vs BLD score (y), log-log;
    below the diagonal BLD helped. Right: mean over layers per variant, init vs BLD bars."""
    bld = {(r["layer"], r["variant"]): r[metric] for r in rows if r["source"] == "bld"}
    init = {(r["layer"], r["variant"]): r[metric] for r in rows if r["source"] == "init"}
    keys = [k for k in init if k in bld and bld[k] > 0 and init[k] > 0]
    names = list(dict.fromkeys(k[1] for k in keys))
    fig, (ax, axb) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1, 1.4]})
    for c, n in enumerate(names):
        pts = [(init[k], bld[k]) for k in keys if k[1] == n]
        ax.scatter(*zip(*pts), s=22, color=f"C{c % 10}", marker="o" if n.startswith("attn") else "s",
                   label=n, alpha=0.85)
    if keys:
        lo = min(min(init[k], bld[k]) for k in keys) / 1.5
        hi = max(max(init[k], bld[k]) for k in keys) * 1.5
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="no change")
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(f"{metric}, block straight from the parent (pure init)")
    ax.set_ylabel(f"{metric}, block after BLD")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    x = np.arange(len(names))
    mi = [np.mean([init[k] for k in keys if k[1] == n]) for n in names]
    mb = [np.mean([bld[k] for k in keys if k[1] == n]) for n in names]
    axb.bar(x - 0.2, mi, 0.4, color="0.7", label="pure init")
    axb.bar(x + 0.2, mb, 0.4, color="C3", label="after BLD")
    for j in range(len(names)):
        axb.text(j, max(mi[j], mb[j]) * 1.15, f"{mi[j] / mb[j]:.1f}×", ha="center", fontsize=7)
    axb.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    axb.set_yscale("log")
    if names:
        axb.set_ylim(top=max(mi + mb) * 3)  # room for the ratio labels
    axb.set_ylabel(f"mean {metric} over layers (log)")
    axb.grid(alpha=0.3, axis="y")
    axb.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def interaction_scatter(rows: list[dict], stats: dict | None = None,
                        title: str = "Do block scores add up? Sum of one-block KLs vs the child's KL"
                        ) -> plt.Figure:
    """One point per multi-block child: predicted (sum of its blocks' KL) vs measured KL, log-log,
    labelled with the number of replaced sub-blocks; the diagonal is perfect additivity."""
    fig, ax = plt.subplots(figsize=(6.2, 5.0))
    pred = np.array([r["predicted_kl"] for r in rows], float)
    meas = np.array([r["measured_kl"] for r in rows], float)
    sc = ax.scatter(pred, meas, c=[r["n_replaced"] for r in rows], cmap="viridis", s=40, zorder=3)
    for p, m, r in zip(pred, meas, rows):
        ax.annotate(str(r["n_replaced"]), (p, m), textcoords="offset points", xytext=(4, 3), fontsize=7)
    if len(rows):
        lo = min(pred.min(), meas.min()) / 1.5
        hi = max(pred.max(), meas.max()) * 1.5
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="additive (measured = sum)")
        ax.set_xscale("log")
        ax.set_yscale("log")
    fig.colorbar(sc, ax=ax, label="replaced sub-blocks")
    ax.set_xlabel("predicted: sum of the blocks' one-block KL (nats/token)")
    ax.set_ylabel("measured KL of the whole child (nats/token)")
    if stats:
        ax.text(0.03, 0.97, f"Spearman {stats.get('spearman_kl', float('nan')):.3f}\n"
                f"Pearson {stats.get('pearson_kl', float('nan')):.3f}\n"
                f"measured/predicted: median {stats.get('ratio_median', float('nan')):.2f} "
                f"[{stats.get('ratio_min', float('nan')):.2f}, {stats.get('ratio_max', float('nan')):.2f}]",
                transform=ax.transAxes, va="top", fontsize=8,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.8"})
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def variant_score_ranges(per_variant: dict[str, dict], floor: float = 1e-6,
                         title: str = "One-block KL per variant: mean over layers, best to worst layer"
                         ) -> plt.Figure:
    """One horizontal bar per variant (``kl_mean``) with a whisker from its best layer
    (``kl_min``) to its worst (``kl_max``), log scale. The parent's own variants (KL 0) are left
    out; a long whisker is a variant whose cost depends on where it goes."""
    names = [n for n, d in per_variant.items() if d["kl_max"] > 0]
    fig, ax = plt.subplots(figsize=(7.0, 0.9 + 0.32 * len(names)))
    y = np.arange(len(names))
    mean = np.array([max(per_variant[n]["kl_mean"], floor) for n in names])
    lo = np.array([max(per_variant[n]["kl_min"], floor) for n in names])
    hi = np.array([max(per_variant[n]["kl_max"], floor) for n in names])
    colours = ["C0" if n.startswith("attn") else "C1" for n in names]
    base = lo.min() / 2 if len(names) else floor  # log axis: bars start just left of the best layer
    ax.barh(y, mean - base, left=base, color=colours, alpha=0.75)
    ax.errorbar(mean, y, xerr=[mean - lo, hi - mean], fmt="none", ecolor="k", elinewidth=0.9, capsize=3)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("KL(parent ‖ one-block child), nats/token (log)")
    ax.grid(alpha=0.3, axis="x", which="both")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
