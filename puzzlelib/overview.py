""""How Puzzle works in one page": the pipeline figure, drawn from a real run's artifacts.

What it does: reads the seven stage manifests of a run (``runs/<run>/<stage>/manifest.json``: the
metrics each stage recorded and how long it took) plus the search's ``solution.json`` and the
evaluation's ``metrics.json``, and draws one figure: the seven stages as boxes with the numbers this
run measured, what each stage hands to the next, the child the search chose (attention / FFN per
layer, against the parent), and where that child landed against the paper's headline.
Reads: a run directory. Writes: only the PNG you ask for (``write_pipeline_figure``); the runner
saves it as ``reports/<run>/pipeline.png`` after a full pipeline, and ``docs/how_puzzle_works.md``
shows the reference run's copy.
Leaves out: anything a stage did not record — a stage that has not finished is drawn greyed out
with "not run yet" instead of numbers, so the figure never shows a number the run did not produce.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from .search.plots import block_colour  # importing plots also picks the headless Agg backend
from .core.rundir import STAGES

# The paper's headline (DESIGN.md §1): Llama-3.1-70B -> Nemotron-51B on one H100.
PAPER_SPEEDUP, PAPER_RETENTION = 2.17, 0.984

# What each stage hands to the next one (the artifact the arrow carries).
HANDOFF = {
    "00_parent": "model/ + tokens/",
    "01_profiling": "costs.csv",
    "02_bld": "library/ of blocks",
    "03_scoring": "scores.csv",
    "04_search": "solution.json",
    "05_gkd": "children/",
    "06_evaluation": "metrics.json",
}
TITLES = {
    "00_parent": "00 parent", "01_profiling": "01 profiling", "02_bld": "02 BLD",
    "03_scoring": "03 scoring", "04_search": "04 MIP search", "05_gkd": "05 GKD",
    "06_evaluation": "06 evaluation",
}


@dataclass
class StageFacts:
    """What one stage of a run recorded: status, wall time and a few plain-language lines."""

    stage: str
    status: str  # "done", "running", "failed", or "missing"
    seconds: float | None = None
    lines: list[str] = field(default_factory=list)


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _lines(stage: str, m: dict[str, Any]) -> list[str]:
    """A few lines of a stage's recorded metrics, in words; keys a stage did not record are skipped."""
    out: list[str] = []

    def add(fmt: str, *keys: str) -> None:
        if all(m.get(k) is not None for k in keys):
            out.append(fmt.format(*(m[k] for k in keys)))

    if stage == "00_parent":
        if m.get("params") is not None:
            out.append(f"{m['params'] / 1e6:.1f} M params")
        if m.get("train_tokens") is not None:
            out.append(f"{m['train_tokens'] / 1e6:.1f} M train tokens")
        add("held-out {:.2f} nats/tok", "heldout_loss")
    elif stage == "01_profiling":
        add("{} children timed", "n_children")
        if m.get("prefill_median_rel_err") is not None:
            out.append(f"additivity err {_pct(m['prefill_median_rel_err'])}")
        add("{} clock, {}", "clock", "device")
    elif stage == "02_bld":
        add("{} blocks", "blocks")
        add("{}/{} improved", "improved_blocks", "trained_blocks")
        if m.get("tokens_per_variant") is not None:
            out.append(f"{m['tokens_per_variant'] / 1e3:.0f} k tokens/block")
    elif stage == "03_scoring":
        add("{} candidates", "candidates")
        add("scored by KL to parent", "candidates")
        add("BLD: KL / {:.1f}", "bld_gain_kl_ratio_median")
    elif stage == "04_search":
        add("{} layers, {} options", "layers", "options")
        add("predicted {:.2f}x", "predicted_speedup")
        add("best at batch {}", "batch")
        if m.get("solver"):
            out.append(str(m["solver"]).split()[0])
    elif stage == "05_gkd":
        kls = {k.split(".")[0]: v for k, v in m.items() if k.endswith(".kl_after")}
        if "puzzle-1" in kls:
            out.append(f"puzzle-1 KL {kls['puzzle-1']:.3f}")
        if kls:
            out.append(f"{len(kls)} children")
    elif stage == "06_evaluation":
        add("measured {:.2f}x", "measured_speedup")
        if m.get("retention") is not None:
            out.append(f"retained {_pct(m['retention'])}")
        add("child: {}", "model")
    return out


def stage_facts(run_dir: str | Path) -> list[StageFacts]:
    """The facts of every stage of the run at ``run_dir`` (``runs/<run_name>``), in pipeline order."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory at {run_dir}: run the pipeline first "
                                "(python -m puzzlelib run --preset smoke)")
    facts = []
    for stage in STAGES:
        path = run_dir / stage / "manifest.json"
        if not path.is_file():
            facts.append(StageFacts(stage, "missing"))
            continue
        man = json.loads(path.read_text(encoding="utf-8"))
        status = man.get("status", "unknown")
        if status != "done":  # a stage that did not finish has no numbers worth showing
            facts.append(StageFacts(stage, status))
            continue
        facts.append(StageFacts(stage, status, man.get("seconds"), _lines(stage, man.get("metrics", {}))))
    return facts


def chosen_child(run_dir: str | Path) -> tuple[list[list[str]], list[list[str]]] | None:
    """(parent choices, first MIP solution's choices) from 04_search/solution.json, or None."""
    path = Path(run_dir) / "04_search" / "solution.json"
    if not path.is_file():
        return None
    sol = json.loads(path.read_text(encoding="utf-8"))
    if not sol.get("solutions"):
        return None
    return sol["parent"], sol["solutions"][0]["choices"]


def headline(run_dir: str | Path) -> dict[str, float] | None:
    """Measured speed-up and retention of the evaluated Puzzle child (06's manifest), or None."""
    path = Path(run_dir) / "06_evaluation" / "manifest.json"
    if not path.is_file():
        return None
    man = json.loads(path.read_text(encoding="utf-8"))
    m = man.get("metrics", {})
    if man.get("status") != "done" or m.get("measured_speedup") is None or m.get("retention") is None:
        return None
    return {"speedup": float(m["measured_speedup"]), "retention": float(m["retention"]),
            "predicted": float(m.get("predicted_speedup") or float("nan"))}


def _draw_stages(ax, facts: list[StageFacts]) -> None:
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    n, w, gap = len(facts), 1.0, 0.22
    for i, f in enumerate(facts):
        x = i * (w + gap)
        done = f.status == "done"
        ax.add_patch(FancyBboxPatch((x, 0), w, 1.0, boxstyle="round,pad=0.02,rounding_size=0.06",
                                    facecolor="#deebf7" if done else "#f0f0f0",
                                    edgecolor="#3182bd" if done else "0.6", lw=1.2))
        ax.text(x + w / 2, 0.9, TITLES[f.stage], ha="center", va="center", fontsize=9.5,
                weight="bold")
        sub = (f"{f.seconds / 60:.1f} min" if f.seconds and f.seconds >= 60
               else f"{f.seconds:.0f} s" if f.seconds else "")
        ax.text(x + w / 2, 0.78, sub if done else f"not run yet ({f.status})", ha="center",
                va="center", fontsize=7.5, color="0.35", style="italic")
        for k, line in enumerate(f.lines[:4]):
            ax.text(x + w / 2, 0.6 - 0.15 * k, line, ha="center", va="center", fontsize=7.5)
        ax.text(x + w / 2, -0.1, HANDOFF[f.stage], ha="center", va="top", fontsize=7, color="0.3",
                family="monospace")
        if i < n - 1:
            ax.add_patch(FancyArrowPatch((x + w + 0.02, 0.5), (x + w + gap - 0.02, 0.5),
                                         arrowstyle="-|>", mutation_scale=11, color="0.3"))
    ax.set_xlim(-0.1, n * (w + gap) - gap + 0.1)
    ax.set_ylim(-0.3, 1.08)
    ax.axis("off")


def _draw_child(ax, parent: list[list[str]], child: list[list[str]]) -> None:
    from matplotlib.patches import Rectangle

    L = len(parent)
    for r, (name, rows) in enumerate((("parent", parent), ("Puzzle child", child))):
        for i, choice in enumerate(rows):
            for k, block in enumerate(choice[:2]):
                y = -(2 * r + k) * 0.5 - 0.35 * r
                colour, label = block_colour(block, parent[i][k])
                ax.add_patch(Rectangle((i, y), 0.95, 0.45, facecolor=colour, edgecolor="0.6", lw=0.5))
                if L <= 24:
                    dark = not isinstance(colour, str) and colour[2] > 0.5 and colour[0] < 0.4
                    ax.text(i + 0.475, y + 0.22, label, ha="center", va="center", fontsize=6.5,
                            color="white" if dark else "black")
    ax.set_xlim(-0.1, L)
    ax.set_ylim(-2.0, 0.55)
    ax.set_yticks([0.22, -0.28, -1.13, -1.63])
    ax.set_yticklabels(["parent attn", "parent FFN", "child attn", "child FFN"], fontsize=7.5)
    ax.set_xticks([i + 0.475 for i in range(L)])
    ax.set_xticklabels([str(i) for i in range(L)], fontsize=7)
    ax.set_xlabel("layer", fontsize=8)
    ax.set_title("What the search chose (grey = removed, orange = linear, lighter = smaller)",
                 fontsize=9)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)


def _draw_headline(ax, head: dict[str, float] | None) -> None:
    ax.scatter([1.0], [100.0], marker="*", s=140, color="k", zorder=3, label="parent")
    ax.scatter([PAPER_SPEEDUP], [100 * PAPER_RETENTION], marker="^", s=70, color="0.55", zorder=3,
               label=f"paper: Nemotron-51B\n({PAPER_SPEEDUP}x, {100 * PAPER_RETENTION:.1f} %, H100)")
    if head:
        ax.scatter([head["speedup"]], [100 * head["retention"]], marker="o", s=70, color="C3",
                   zorder=4, label=f"this run's child\n({head['speedup']:.2f}x, "
                                   f"{100 * head['retention']:.1f} %)")
    ax.axhline(100, color="0.8", lw=0.8)
    ax.set_xlabel("throughput speed-up (measured)", fontsize=8)
    ax.set_ylabel("accuracy retained (%)", fontsize=8)
    ax.set_title("Where the child landed", fontsize=9)
    ax.tick_params(labelsize=7)
    xs = [1.0, PAPER_SPEEDUP] + ([head["speedup"]] if head else [])
    ys = [100.0, 100 * PAPER_RETENTION] + ([100 * head["retention"]] if head else [])
    ax.set_xlim(0.8, max(xs) + 0.5)
    ax.set_ylim(min(ys) - 6, max(ys) + 4)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="lower left", frameon=False)


def pipeline_figure(run_dir: str | Path, title: str | None = None) -> plt.Figure:
    """The one-page figure of the run at ``run_dir``: stages with this run's numbers, the chosen
    child, and where it landed next to the paper's headline."""
    run_dir = Path(run_dir)
    facts = stage_facts(run_dir)
    fig = plt.figure(figsize=(13.5, 5.6))
    grid = fig.add_gridspec(2, 3, height_ratios=[0.9, 1.0], width_ratios=[1.0, 1.0, 0.85],
                            hspace=0.18, wspace=0.25)
    _draw_stages(fig.add_subplot(grid[0, :]), facts)
    child = chosen_child(run_dir)
    ax_child = fig.add_subplot(grid[1, :2])
    if child:
        _draw_child(ax_child, *child)
    else:
        ax_child.text(0.5, 0.5, "no search result yet (run 04_search)", ha="center", va="center")
        ax_child.axis("off")
    _draw_headline(fig.add_subplot(grid[1, 2]), headline(run_dir))
    fig.suptitle(title or f"Puzzle, one page: run '{run_dir.name}'", fontsize=12, y=0.99)
    return fig


def write_pipeline_figure(run_dir: str | Path, out: str | Path, title: str | None = None) -> Path:
    """Draw :func:`pipeline_figure` for ``run_dir`` and save it as a PNG at ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = pipeline_figure(run_dir, title)
    tmp = out.with_name(out.name + ".tmp.png")  # atomic: a reader never sees half a PNG
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out)
    return out
