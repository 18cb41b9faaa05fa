"""Stage 06's figures: retention against speed-up, predicted against measured speed-up,
uncertainty curves and per-task accuracy.

Each function takes what the stage wrote (or returns) and gives a matplotlib ``Figure``;
reads and writes nothing itself (core/figures.py holds what the stages' figures share).
"""

from __future__ import annotations

from ..core import figures  # noqa: F401  # before pyplot: it picks the headless Agg backend

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


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


def pareto_figure(metrics: dict) -> plt.Figure:
    """The measured Pareto (``metrics["pareto_eval"]``): for each method, its sweep children from the
    BLD library (hollow, joined in target order) as retention with its 95 % interval (left) and KL to
    the parent per token (right) against the *measured* speed-up; the children after GKD filled."""
    pe, rows = metrics["pareto_eval"], {m["name"]: m for m in metrics["models"]}
    has_kl = any("kl_per_token" in r for r in rows.values())
    fig, axes = plt.subplots(1, 2 if has_kl else 1, figsize=(13 if has_kl else 7, 4.8), squeeze=False)
    panels = [("retention", axes[0, 0])] + ([("kl_per_token", axes[0, 1])] if has_kl else [])
    for key, ax in panels:
        for method in pe["methods"]:
            pts = sorted((p for p in pe["points"] if p["method"] == method), key=lambda p: p["target"])
            if not pts:
                continue
            color, marker = _style(method)
            xs = [rows[p["model"]]["measured_speedup"] for p in pts]
            ys = [rows[p["model"]][key] * (100 if key == "retention" else 1) for p in pts]
            ax.plot(xs, ys, color=color, marker=marker, mfc="none", lw=1.2, ms=7, label=f"{method} (before GKD)")
            if key == "retention":
                for p, x, y in zip(pts, xs, ys):
                    lo, hi = (100 * v for v in rows[p["model"]]["retention_ci"])
                    ax.errorbar([x], [y], yerr=[[max(y - lo, 0)], [max(hi - y, 0)]], color=color, lw=0.8,
                                capsize=2, ls="none")
        for r in rows.values():
            if r["gkd"] and r["method"] in pe["methods"] and key in r:
                color, marker = _style(r["method"])
                ax.plot(r["measured_speedup"], r[key] * (100 if key == "retention" else 1), marker=marker,
                        color=color, ms=10, ls="none", label=f"{r['name']} after GKD")
        ax.set_xlabel("measured speed-up (generated tokens/s ÷ parent's, best batch)")
        ax.grid(alpha=0.3)
        if key == "retention":
            ax.axhline(100, color="0.6", lw=0.8)
            ax.set_ylabel("mean accuracy retained (% of parent, 95 % CI)")
            ax.set_title("Accuracy retained vs measured speed-up")
            ax.legend(fontsize=7, loc="lower left")
        else:
            ax.set_yscale("log")
            ax.set_ylabel(f"KL(parent ‖ child), nats/token ({pe['fidelity_tokens']} held-out tokens)")
            ax.set_title("Distance from the parent vs measured speed-up")
    fig.tight_layout()
    return fig
