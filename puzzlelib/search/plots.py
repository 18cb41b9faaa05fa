"""Stage 04's figures: the Pareto front with the baselines, and the chosen architecture per
layer (its colours, ``block_colour``, are also the pipeline overview's).

Each function takes what the stage wrote (or returns) and gives a matplotlib ``Figure``;
reads and writes nothing itself (core/figures.py holds what the stages' figures share).
"""

from __future__ import annotations

from ..core import figures  # noqa: F401  # before pyplot: it picks the headless Agg backend

import matplotlib.pyplot as plt  # noqa: E402


# ---- 04_search ------------------------------------------------------------------------------------
_SEARCH_STYLE = {"mip": ("C3", "o", "Puzzle MIP"), "greedy": ("C0", "s", "greedy"),
                 "uniform": ("C2", "^", "uniform width/KV"), "depth": ("C4", "v", "depth (block influence)"),
                 "random": ("C7", "x", "random from library")}


def pareto_front(rows: list[dict], baselines: dict | None = None, target: float | None = None,
                 metric: str = "kl", title: str = "Best predicted score at each speed-up target") -> plt.Figure:
    """Summed score (lower = closer to the parent) against the predicted speed-up each method
    reached, one line per method of the sweep; ``baselines`` ({name: ChildSpec or None}) are the
    children at the main budget, drawn as large markers; ``target`` the main speed-up target."""
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    for method, (color, marker, label) in _SEARCH_STYLE.items():
        pts = sorted((float(r["speedup"]), float(r["score"])) for r in rows
                     if r["method"] == method and str(r["feasible"]) == "True")
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, marker=marker, color=color, lw=2.2 if method == "mip" else 1.2,
                    ms=6, label=f"{label} (sweep)", alpha=1.0 if method == "mip" else 0.8)
    for name, spec in (baselines or {}).items():
        if spec is None:
            continue
        color, marker, label = _SEARCH_STYLE.get(spec.method, ("k", "*", name))
        ax.scatter([spec.predicted["speedup"]], [spec.predicted["score"]], s=160, marker=marker, linewidths=2,
                   zorder=5, **({"color": color} if marker == "x" else {"facecolors": "none", "edgecolors": color}))
        ax.annotate(name, (spec.predicted["speedup"], spec.predicted["score"]), xytext=(6, 6),
                    textcoords="offset points", fontsize=8, color=color)
    if target:
        ax.axvline(target, color="0.4", ls="--", lw=1)
        ax.text(target, ax.get_ylim()[0], f" target {target:g}×", va="bottom", fontsize=8, color="0.3")
    missed = sorted({float(r["target_speedup"]) for r in rows if r["method"] == "mip" and str(r["feasible"]) != "True"})
    if missed:
        ax.text(0.99, 0.02, "no child reaches " + ", ".join(f"{m:g}×" for m in missed), transform=ax.transAxes,
                ha="right", fontsize=8, color="C3")
    ax.set_xlabel("predicted speed-up vs the parent (throughput, best batch size)")
    ax.set_ylabel(f"summed {metric} degradation (additive model)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def block_colour(name: str, parent_name: str):
    from matplotlib import colormaps

    op = name.split(":")[1]
    if op == "noop":
        return "#f0f0f0", "–"
    if op == "linear":
        return "#fdae61", "lin"
    if name.startswith("attn:"):
        frac = int(op[2:]) / max(int(parent_name.split(":kv")[1]) if ":kv" in parent_name else 1, 1)
        label = op
    else:
        frac, label = float(op), op
    return colormaps["Blues"](0.25 + 0.65 * min(frac, 1.0)), label


def architecture(specs: list, parent: list, title: str = "Chosen architecture per layer") -> plt.Figure:
    """One band per child (attention row above FFN row), one column per layer: dark blue = the
    parent's block, lighter = fewer KV heads / narrower FFN, orange = linear, grey = removed.
    A coupled (pair-trained) block is outlined in red."""
    from matplotlib.patches import Patch, Rectangle

    L = len(parent)
    fig, ax = plt.subplots(figsize=(min(max(7.0, 2.2 + 0.55 * L), 18), 1.2 + 0.62 * len(specs)))
    text = L <= 24
    for r, spec in enumerate(specs):
        for i, ((a, f), c) in enumerate(zip(spec.choices, spec.coupled)):
            for k, (name, pname) in enumerate(((a, parent[i][0]), (f, parent[i][1]))):
                y = -(2 * r + k) * 0.5 - 0.3 * r
                colour, label = block_colour(name, pname)
                ax.add_patch(Rectangle((i, y), 0.95, 0.45, facecolor=colour,
                                       edgecolor="C3" if c else "0.6", lw=1.6 if c else 0.5))
                if text:
                    dark = not isinstance(colour, str) and colour[2] > 0.5 and colour[0] < 0.4
                    ax.text(i + 0.475, y + 0.22, label, ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
    ax.set_xlim(-0.1, L)
    ax.set_ylim(-(len(specs) * 1.3) + 0.2, 0.55)
    ax.set_yticks([-(2 * r) * 0.5 - 0.3 * r + 0.0 for r in range(len(specs))])
    ax.set_yticklabels([f"{s.name}  (attn / ffn)" for s in specs], fontsize=8)
    ax.set_xticks([i + 0.475 for i in range(L)])
    ax.set_xticklabels([str(i) for i in range(L)], fontsize=8)
    ax.set_xlabel("layer")
    ax.set_title(title)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.legend(handles=[Patch(color=_blue(0.9), label="parent's block"),
                       Patch(color=_blue(0.5), label="fewer KV heads / narrower FFN"),
                       Patch(color="#fdae61", label="linear"),
                       Patch(facecolor="#f0f0f0", edgecolor="0.6", label="removed"),
                       Patch(facecolor="white", edgecolor="C3", label="coupled block")],
              fontsize=7, ncol=5 if L > 12 else 3, loc="upper center",
              bbox_to_anchor=(0.5, -0.12 - 0.4 / max(len(specs), 1)), frameon=False)
    fig.tight_layout()
    return fig


def _blue(v: float):
    from matplotlib import colormaps

    return colormaps["Blues"](v)
