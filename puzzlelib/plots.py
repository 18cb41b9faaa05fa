"""Every figure the notebooks show, as functions of stage artifacts (no computation here).

What it does: takes the dicts/arrays a stage wrote (history.json, metrics.json, …) and returns a
matplotlib ``Figure``; the notebook displays it and papermill keeps it in the report. Reads and
writes nothing itself. Leaves out: interactive plots (reports must render as static HTML).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg") if matplotlib.get_backend().lower() in ("", "agg") else None
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _smooth(y: list[float], window: int) -> np.ndarray:
    y = np.asarray(y, dtype=float)
    if len(y) < window or window <= 1:
        return y
    kernel = np.ones(window) / window
    head = np.array([y[: i + 1].mean() for i in range(window - 1)])
    return np.concatenate([head, np.convolve(y, kernel, mode="valid")])


def loss_curves(history: dict, title: str = "Parent training") -> plt.Figure:
    """Training loss (raw + moving average) and held-out loss against tokens seen."""
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 1]})
    tps = history.get("tokens_per_step", 1)
    steps = np.asarray(history["step"])
    if len(steps):
        ax.plot((steps + 1) * tps, history["train_loss"], color="0.8", lw=0.8, label="train (per step)")
        ax.plot((steps + 1) * tps, _smooth(history["train_loss"], 20), color="C0", lw=1.8, label="train (moving avg)")
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


def gkd_curves(history: dict, title: str = "GKD") -> plt.Figure:
    """GKD loss terms per step (cosine, KL, LM when used) and held-out KL at each evaluation."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    steps = np.asarray(history["step"]) + 1
    for i, term in enumerate(("cosine", "kl", "lm")):
        ys = history.get(term) or []
        if any(ys):
            ax.plot(steps, ys, color=f"C{i}", alpha=0.35, lw=0.8)
            ax.plot(steps, _smooth(ys, 8), color=f"C{i}", lw=1.8, label=term)
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


def _block_colour(name: str, parent_name: str):
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
                colour, label = _block_colour(name, pname)
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
                       Patch(color="#fdae61", label="linear"), Patch(facecolor="#f0f0f0", edgecolor="0.6", label="removed"),
                       Patch(facecolor="white", edgecolor="C3", label="coupled block")],
              fontsize=7, ncol=5 if L > 12 else 3, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.4 / max(len(specs), 1)), frameon=False)
    fig.tight_layout()
    return fig


def _blue(v: float):
    from matplotlib import colormaps

    return colormaps["Blues"](v)


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
            ax.plot(steps, _smooth(list(curve), 4), color=f"C{c % 10}", lw=1.5, label=n)
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


# ---- 06_evaluation -------------------------------------------------------------------------------
_METHOD_STYLE = {"parent": ("k", "*"), "mip": ("C3", "o"), "uniform": ("C0", "s"), "depth": ("C1", "D"),
                 "greedy": ("C2", "^"), "random": ("C7", "v")}


def _style(method: str) -> tuple[str, str]:
    return _METHOD_STYLE.get(method, ("C4", "P"))


def retention_vs_speedup(models: list[dict], pareto: list[dict] | None = None, target: float | None = None,
                         paper: dict | None = None) -> plt.Figure:
    """Headline: mean-accuracy retention (with its 95 % interval) vs measured speed-up, one point
    per model (hollow = before GKD, an arrow to the same child after GKD); next to it, stage 04's
    Pareto front (predicted speed-up vs summed block score) with the evaluated children on it."""
    fig, axes = plt.subplots(1, 2 if pareto else 1, figsize=(13 if pareto else 7, 4.8), squeeze=False)
    ax = axes[0, 0]
    by_name = {m["name"]: m for m in models}
    for m in models:
        color, marker = _style(m["method"])
        x, y = m["measured_speedup"], 100 * m["retention"]
        lo, hi = (100 * v for v in m["retention_ci"])
        ax.errorbar([x], [y], yerr=[[max(y - lo, 0)], [max(hi - y, 0)]], color=color, marker=marker, ms=9,
                    mfc="none" if m["gkd"] is False else color, capsize=3, lw=1, ls="none",
                    label=f"{m['name']}")
        base = m["name"].replace(" (before GKD)", "")
        if m["gkd"] is False and base in by_name:
            a = by_name[base]
            ax.annotate("", (a["measured_speedup"], 100 * a["retention"]), (x, y),
                        arrowprops=dict(arrowstyle="->", color=color, alpha=0.6))
    for label, p in (paper or {}).items():
        ax.plot(p["speedup"], 100 * p["retention"], "x", color="0.5", ms=8)
        ax.annotate(label.split(" (")[0], (p["speedup"], 100 * p["retention"]), fontsize=7, color="0.4",
                    xytext=(4, 4), textcoords="offset points")
    ax.axhline(97, color="0.6", ls="--", lw=0.8)
    ax.text(ax.get_xlim()[0], 97, " 97 % goal", va="bottom", fontsize=8, color="0.4")
    if target:
        ax.axvline(target, color="0.6", ls=":", lw=0.8)
        ax.text(target, ax.get_ylim()[0], f" target {target:g}×", fontsize=8, color="0.4", rotation=90, va="bottom")
    ax.set_xlabel("measured speed-up (generated tokens/s ÷ parent's, best batch)")
    ax.set_ylabel("mean accuracy retained (% of parent)")
    ax.set_title("Accuracy retained vs speed gained")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    if pareto:
        ax2 = axes[0, 1]
        for method in dict.fromkeys(r["method"] for r in pareto):
            pts = sorted((float(r["speedup"]), float(r["score"])) for r in pareto
                         if r["method"] == method and r.get("feasible") in (True, "True", 1))
            if pts:
                color, marker = _style(method)
                ax2.plot(*zip(*pts), marker=marker, color=color, ms=5, lw=1.2 if method == "mip" else 0.8,
                         label=f"{method} sweep")
        for m in models:
            pred = (m.get("search") or {}).get("predicted") or {}
            if m["gkd"] and "speedup" in pred and "score" in pred:
                color, marker = _style(m["method"])
                ax2.plot(pred["speedup"], pred["score"], marker=marker, color=color, ms=11, mfc="none", mew=2)
                ax2.annotate(m["name"], (pred["speedup"], pred["score"]), fontsize=7, xytext=(5, -10),
                             textcoords="offset points")
        ax2.set_xlabel("predicted speed-up (stage 01 cost table)")
        ax2.set_ylabel("summed block score (stage 03; lower = closer to parent)")
        ax2.set_title("Stage 04's Pareto front, evaluated children circled")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


def speedup_prediction(models: list[dict]) -> plt.Figure:
    """Measured vs predicted speed-up per model (big: best batch; small: each scenario)."""
    fig, ax = plt.subplots(figsize=(6, 5))
    top = 1.0
    for m in models:
        if m["method"] == "parent":
            continue
        color, marker = _style(m["method"])
        for key, v in m["measured"].items():
            if key != "best" and key in m["predicted"]:
                ax.plot(m["predicted"][key]["speedup"], v["speedup"], marker=marker, color=color, ms=4, alpha=0.5)
                top = max(top, m["predicted"][key]["speedup"], v["speedup"])
        ax.plot(m["predicted_speedup"], m["measured_speedup"], marker=marker, color=color, ms=9,
                mfc="none" if m["gkd"] is False else color, ls="none", label=m["name"])
        top = max(top, m["predicted_speedup"], m["measured_speedup"])
    ax.plot([0.8, top * 1.1], [0.8, top * 1.1], color="0.5", ls="--", lw=1, label="prediction = measurement")
    ax.set_xlabel("predicted speed-up (sum of stage 01's block costs)")
    ax.set_ylabel("measured speed-up (whole model, this run)")
    ax.set_title("How good is the additive runtime model?")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def uncertainty_curves(curves: dict[str, dict], task: str) -> plt.Figure:
    """Risk–coverage curves and reliability diagrams of several models on one task. ``curves``:
    name -> {"coverage", "risk", "reliability" (bins), "aurc", "ece", "method", "gkd"}."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, c in curves.items():
        color, _ = _style(c.get("method", ""))
        ls = "--" if c.get("gkd") is False else "-"
        ax.plot(c["coverage"], c["risk"], color=color, ls=ls, label=f"{name} (AURC {c['aurc']:.3f})")
        rel = c["reliability"]
        ax2.plot([b["confidence"] for b in rel], [b["accuracy"] for b in rel], marker="o", color=color, ls=ls,
                 label=f"{name} (ECE {c['ece']:.3f})")
    ax.set_xlabel("coverage (share of questions answered, most confident first)")
    ax.set_ylabel("risk (error rate among those answered)")
    ax.set_title(f"Selective prediction on {task}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax2.plot([0, 1], [0, 1], color="0.5", ls="--", lw=1)
    ax2.set_xlabel("confidence (max choice probability), binned")
    ax2.set_ylabel("accuracy in the bin")
    ax2.set_title(f"Reliability on {task}")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


def task_accuracies(models: list[dict], chance: dict[str, float | None]) -> plt.Figure:
    """Accuracy per task per model (bars), with each task's chance level."""
    tasks = list(chance)
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(models) * len(tasks) / 2 + 3), 4))
    w = 0.8 / len(models)
    for k, m in enumerate(models):
        color, _ = _style(m["method"])
        xs = np.arange(len(tasks)) + k * w
        ax.bar(xs, [m["accuracy"][t] for t in tasks], w, color=color, alpha=0.45 if m["gkd"] is False else 0.9,
               edgecolor="k", lw=0.4, label=m["name"])
    for j, t in enumerate(tasks):
        if chance[t]:
            ax.hlines(chance[t], j - w / 2, j + 0.8 - w / 2, color="k", ls=":", lw=1)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - w / 2, tasks)
    ax.set_ylabel("accuracy (dotted: chance)")
    ax.set_title("Accuracy per task")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


# ---- 01_profiling ---------------------------------------------------------------------------------
def _variant_label(name: str) -> str:
    return name.split(":", 1)[1]


def variant_costs(rows: list[dict], batch: int, layer: int = 0,
                  title: str = "Cost of each sub-block variant") -> plt.Figure:
    """Prefill and decode ms of every variant at one layer and batch size (median, p10–p90
    whiskers), attention and FFN side by side, the parent's own sub-block hatched."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.9), sharey=False)
    for ax, phase in zip(axes, ("prefill", "decode")):
        x, labels = 0, []
        for c, kind in enumerate(("attn", "ffn")):
            rs = [r for r in rows if r["layer"] == layer and r["sub_block"] == kind]
            for r in rs:
                mid = r[f"{phase}_ms@b{batch}"]
                lo, hi = r[f"{phase}_ms_p10@b{batch}"], r[f"{phase}_ms_p90@b{batch}"]
                ax.bar(x, mid, color=f"C{c}", hatch="//" if r["is_parent"] else None,
                       edgecolor="black" if r["is_parent"] else None,
                       yerr=[[max(mid - lo, 0)], [max(hi - mid, 0)]], capsize=2,
                       label=None if x else kind)
                labels.append((x, _variant_label(r["variant"])))
                x += 1
            x += 0.6
        ax.set_xticks([p for p, _ in labels], [t for _, t in labels], rotation=60, fontsize=8)
        ax.set_ylabel("ms per call")
        ax.set_title(f"{phase} · batch {batch}")
        ax.grid(axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color="C0"), plt.Rectangle((0, 0), 1, 1, color="C1"),
               plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black", hatch="//")]
    fig.legend(handles, ["attention", "FFN", "parent's own"], loc="upper right", ncol=3, frameon=False)
    fig.suptitle(f"{title} (layer {layer}; whiskers p10–p90)", x=0.02, ha="left")
    fig.tight_layout()
    return fig


def cost_heatmap(rows: list[dict], batch_sizes: list[int], layer: int = 0,
                 title: str = "Cost relative to the parent's sub-block") -> plt.Figure:
    """Variants × metrics, each cell the variant's cost divided by the parent sub-block's (1.0 =
    as expensive as the parent; 0 = free). Shows where a variant saves: memory, prefill or decode."""
    metrics = ["params", "kv_bytes_per_token"] + [f"{p}_ms@b{b}" for b in batch_sizes
                                                  for p in ("prefill", "decode")]
    rs = [r for r in rows if r["layer"] == layer and r["sub_block"] in ("attn", "ffn")]
    parent = {k: next(r for r in rs if r["sub_block"] == k and r["is_parent"]) for k in ("attn", "ffn")}
    mat = np.full((len(rs), len(metrics)), np.nan)
    for i, r in enumerate(rs):
        for j, m in enumerate(metrics):
            ref = parent[r["sub_block"]][m]
            if ref:
                mat[i, j] = r[m] / ref
    fig, ax = plt.subplots(figsize=(1.1 * len(metrics) + 3, 0.32 * len(rs) + 1.4))
    im = ax.imshow(mat, cmap="viridis", vmin=0, vmax=max(1.2, float(np.nanmax(mat)) if np.isfinite(mat).any() else 1.2),
                   aspect="auto")
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            if np.isfinite(mat[i, j]):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if mat[i, j] < 0.6 else "black")
    ax.set_xticks(range(len(metrics)), [m.replace("_ms@", " ms @") for m in metrics], rotation=30,
                  ha="right", fontsize=8)
    ax.set_yticks(range(len(rs)), [r["variant"] for r in rs], fontsize=8)
    ax.set_title(f"{title} (layer {layer}; blank: the parent has none, e.g. KV for a no-KV layer)")
    fig.colorbar(im, ax=ax, fraction=0.03, label="× parent sub-block")
    fig.tight_layout()
    return fig


def additivity_scatter(rows: list[dict], title: str = "Predicted (sum of sub-blocks) vs measured"
                       ) -> plt.Figure:
    """Predicted vs measured prefill ms, decode ms and decode speed-up over the parent, one marker
    per (child, batch size), with the y = x line and a ±10 % band."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.3))
    batches = sorted({r["batch"] for r in rows})
    panels = [("prefill", "_ms", "prefill ms"), ("decode", "_ms", "decode step ms"),
              ("decode", "_speedup", "decode speed-up vs parent")]
    for ax, (phase, suffix, label) in zip(axes, panels):
        for c, b in enumerate(batches):
            rs = [r for r in rows if r["batch"] == b]
            pred = np.array([r[f"pred_{phase}{suffix}"] for r in rs])
            meas = np.array([r[f"meas_{phase}{suffix}"] for r in rs])
            par = np.array([r["is_parent"] for r in rs], dtype=bool)
            ax.scatter(meas[~par], pred[~par], color=f"C{c}", s=22, label=f"batch {b}")
            ax.scatter(meas[par], pred[par], color=f"C{c}", marker="*", s=140, edgecolor="black",
                       label="parent" if c == 0 else None)
        vals = [r[f"{k}_{phase}{suffix}"] for r in rows for k in ("pred", "meas")]
        lo, hi = min(vals) * 0.85, max(vals) * 1.15
        line = np.linspace(lo, hi, 50)
        ax.plot(line, line, "k-", lw=1, label="y = x")
        ax.fill_between(line, line * 0.9, line * 1.1, color="0.85", zorder=0, label="±10 %")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, x=0.02, ha="left")
    fig.tight_layout()
    return fig


def error_by_statistic(summaries: dict[str, dict], keys: tuple[str, ...] = (
        "prefill_median_rel_err", "decode_median_rel_err", "decode_speedup_median_rel_err"),
        title: str = "Median additivity error by how samples are summarised") -> plt.Figure:
    """Grouped bars: for each variant of the measurement (e.g. median / p10 / min, or hot vs
    rotated caches), the median relative errors, with the 10 % target line."""
    fig, ax = plt.subplots(figsize=(9, 3.4))
    names = list(summaries)
    w = 0.8 / len(keys)
    for j, k in enumerate(keys):
        ax.bar(np.arange(len(names)) + j * w, [100 * summaries[n].get(k, np.nan) for n in names],
               width=w, label=k.replace("_median_rel_err", "").replace("_", " "))
    ax.axhline(10, color="C3", ls="--", lw=1, label="10 % target")
    ax.set_xticks(np.arange(len(names)) + w * (len(keys) - 1) / 2, names)
    ax.set_ylabel("median |pred − meas| / meas (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


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


def memory_vs_batch(batches: list[int], curves: dict[str, list[float]],
                    title: str = "Memory of a child: weights + KV cache, against the batch size"
                    ) -> plt.Figure:
    """One line per named child: predicted memory in MiB (bytes in ``curves``) at each batch size.
    Where a line starts is its weights; its slope is the KV cache one more sequence adds, which
    is what fewer KV heads shrink."""
    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    for c, (name, values) in enumerate(curves.items()):
        ax.plot(batches, np.asarray(values, float) / 2**20, "o-", color=f"C{c % 10}", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size (sequences served at once)")
    ax.set_ylabel("weights + KV cache (MiB)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
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
