"""Stage 06's report: ``reports/<run>/`` and the README's results table, from stage 06's metrics.

What it does: formats the comparison (``results_table``, ``headline_sentence``,
``summary_markdown``); splits the metrics into what the seed, config and cost table determine
(``metrics.json``, identical across reruns) and every wall-clock measurement (``timings.json``) and
merges them back (``split_report`` / ``merge_report`` / ``read_report``); records what produced the
numbers (``report_environment`` -> ``environment.json``); writes the report folder
(``write_report``, ``REPORT_FILES``) and regenerates the README's table between ``MARKERS``
(``update_readme_results``).
Reads: stage 06's metrics (an ``evaluation.EvaluationResult`` or a report folder), the run's
``environment.json``, ``00_parent/corpus.json`` and ``01_profiling/costs.csv``.
Writes: ``reports/<run>/`` (summary.md, metrics.json, timings.json, environment.json,
retention_vs_speedup.png) and the README.
Leaves out: computing any number (``evaluation.summarize`` does) and the figure itself
(``evaluation/plots.py``: ``retention_vs_speedup``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..core import eval_tasks as T
from ..core.config import RunConfig, project_root, resolve_path
from ..core.eval_tasks import EvaluationError
from ..core.atomic import atomic_write_json, atomic_write_text

# A `stage.EvaluationResult`: named, not imported (evaluation.stage imports this module).
EvaluationResult = Any

MARKERS = ("<!-- results:start -->", "<!-- results:end -->")


# --------------------------------------------------------------------------------- the report

def _pct(x: float, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f} %"


def results_table(metrics: dict) -> str:
    """The comparison as a Markdown table: one row per model, ratios to the parent."""
    tasks = [t for t in metrics["tasks"] if t != T.BPB]
    head = (["model", "GKD", "measured speed-up", "predicted (stage 01)"] + [f"{t} acc" for t in tasks]
            + ["mean acc", "retention [95 % CI]", "bits/byte", "ECE", "E-AURC"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in metrics["models"]:
        if is_sweep_model(r["name"]):
            continue  # the measured Pareto's own table shows them
        lo, hi = r["retention_ci"]
        gkd = {None: "–", True: "yes", False: "no"}[r["gkd"]]
        cells = ([f"**{r['name']}**" if r["method"] == "mip" and r["gkd"] else r["name"], gkd,
                  f"{r['measured_speedup']:.2f}×", f"{r['predicted_speedup']:.2f}×"]
                 + [f"{r['accuracy'][t]:.3f}" for t in tasks]
                 + [f"{r['mean_accuracy']:.3f}",
                    _pct(r["retention"]) + ("" if r["name"] == "parent" else f" [{_pct(lo)}, {_pct(hi)}]"),
                    f"{r['bpb']:.3f}", f"{r['ece']:.3f}", f"{r['e_aurc']:.3f}"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline_sentence(metrics: dict) -> str:
    h = metrics["headline"]
    if "model" not in h:
        return h.get("note", "")
    lo, hi = h["retention_ci"]
    best = max(h["baselines"].items(), key=lambda kv: kv[1]["retention"], default=None)
    base = (f" The best baseline, {best[0]}, keeps {_pct(best[1]['retention'])} at "
            f"{best[1]['measured_speedup']:.2f}×." if best else "")
    return (f"The MIP child **{h['model']}** runs **{h['measured_speedup']:.2f}×** as fast as the parent on "
            f"this device (stage 01 predicted {h['predicted_speedup']:.2f}×; target {h['target_speedup']:g}×) and "
            f"keeps **{_pct(h['retention'])}** of its mean accuracy (95 % CI {_pct(lo)}–{_pct(hi)}; "
            f"{_pct(h['above_chance_retention'])} of its accuracy above chance).{base} " + _goal_clause(metrics)
            + "; ahead of every baseline (point estimates after GKD): "
            + f"{'yes' if h['ahead_of_every_baseline'] else 'no'}.")


def _goal_clause(metrics: dict) -> str:
    """The run's goal, met or not: the real-parent goal when the measured Pareto exists (``pareto.py``),
    else the paper-like ≥ 2× at ≥ 97 %."""
    from .pareto import pareto_goal

    g = pareto_goal(metrics)
    if g is None:
        return f"Goal ≥ 2× at ≥ 97 %: {'met' if metrics['headline']['goal_met'] else 'not met'}"
    return (f"Goal (a MIP child at ≥ {g['speedup']}× measured keeping ≥ {_pct(g['retention'], 0)} and ahead of "
            f"uniform and depth pruning with the interval excluding 0): {'met' if g['met'] else 'not met'}")


def _diff(d: list[float] | None, scale: float = 1.0, digits: int = 3) -> str:
    if not d:
        return "–"
    p, lo, hi = (scale * v for v in d)
    return f"{p:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


_PLURAL = {"win": "wins", "tie": "ties", "loss": "losses", "same child": "same children"}


def pareto_markdown(metrics: dict) -> str:
    """The measured Pareto and the matched MIP − baseline comparisons (``metrics["pareto_eval"]``),
    with the real-parent goal checked against the measured speed-ups; "" without them."""
    from .pareto import pareto_goal

    pe = metrics.get("pareto_eval")
    if not pe:
        return ""
    rows = {m["name"]: m for m in metrics["models"]}
    kl = any("kl_per_token" in r for r in rows.values())
    head = ["target", "method", "model", "predicted", "measured", "mean acc", "retention [95 % CI]"]
    head += ["KL nats/token", "bits/byte"] if kl else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in sorted(pe["points"], key=lambda p: (p["target"], pe["methods"].index(p["method"]))):
        r = rows[p["model"]]
        lo, hi = r["retention_ci"]
        ms = r.get("measured_speedup")
        cells = [f"{p['target']:g}×", p["method"], r["name"], f"{r['predicted_speedup']:.2f}×",
                 "–" if ms is None else f"{ms:.2f}×", f"{r['mean_accuracy']:.3f}",
                 f"{_pct(r['retention'])} [{_pct(lo)}, {_pct(hi)}]"]
        cells += [f"{r['kl_per_token']:.4f}", f"{r['fidelity_bpb']:.4f}"] if kl else []
        lines.append("| " + " | ".join(cells) + " |")
    comp = ["| stage | target | MIP | baseline | measured speed-ups | Δ mean acc (points) [95 % CI] | verdict |"
            + (" Δ KL nats/token | Δ bits/byte | verdict (KL) |" if kl else "") + " matched by |",
            "|" + "---|" * (8 + (3 if kl else 0))]

    def speeds(a: str, b: str) -> str:
        xa, xb = rows[a].get("measured_speedup"), rows[b].get("measured_speedup")
        return "–" if xa is None or xb is None else f"{xa:.2f}× / {xb:.2f}×"

    tally: dict[str, dict[str, int]] = {}
    for c in pe["comparisons"]:
        cells = [c["stage"], "–" if c["target"] is None else f"{c['target']:g}×", c["mip_model"], c["baseline_model"],
                 speeds(c["mip_model"], c["baseline_model"]), _diff(c["accuracy_diff"], 100, 1), c["accuracy_verdict"]]
        if kl:
            cells += [_diff(c.get("kl_diff"), 1, 4), _diff(c.get("bpb_diff"), 1, 4), c.get("kl_verdict", "–")]
        cells.append(c["matched_by"])
        comp.append("| " + " | ".join(cells) + " |")
        for k in ("accuracy_verdict", "kl_verdict"):
            if k in c:
                tally.setdefault(k.split("_")[0], {}).setdefault(c[k], 0)
                tally[k.split("_")[0]][c[k]] += 1
    said = "; ".join(f"on {'mean accuracy' if k == 'accuracy' else 'KL to the parent'} the MIP child "
                     + ", ".join(f"{v[w]} {_PLURAL[w] if v[w] != 1 else w}" for w in _PLURAL if w in v)
                     for k, v in tally.items())
    fid = f", and KL to the parent and bits per byte over {pe['fidelity_tokens']} held-out tokens" if kl else ""
    w = pe["accuracy_interval_width"]
    goal = pareto_goal(metrics)
    goal_text = "" if goal is None else (
        f"**Goal** (a MIP child at ≥ {goal['speedup']}× measured keeps ≥ {_pct(goal['retention'], 0)} of the parent's "
        "mean accuracy and is ahead of uniform and depth pruning with the accuracy interval excluding 0): "
        f"**{'met' if goal['met'] else 'not met'}**.\n\n" + "".join(
            f"- {c['stage']}: {c['model']} at {c['measured_speedup'] or 0:.2f}× keeps {_pct(c['retention'])}; "
            + ", ".join(f"{b} {'ahead' if a else 'not ahead'}" for b, a in c["ahead_with_interval"].items())
            + f" → {'met' if c['met'] else 'not met (' + c['why'] + ')'}\n" for c in goal["checks"])
        + ("" if goal["checks"] else f"- no MIP child measured ≥ {goal['speedup']}×\n"))
    return f"""## Measured Pareto: MIP, greedy, uniform and depth pruning at every target

Every child of stage 04's sweep, assembled from the BLD library (before GKD) and evaluated like the
rest: the same task samples{fid}.
A child two methods share is evaluated once (its row names the model that carries the numbers).

{chr(10).join(lines)}

### Matched comparisons: MIP − baseline, paired bootstrap 95 % intervals

Positive Δ accuracy and negative Δ KL / bits per byte favour the MIP. "win" / "loss": the interval
excludes 0; "tie": it does not. Pairs are matched by stage 01's *predicted* speed-up, so a rerun
compares the same pairs; the measured speed-ups of both children stand next to each pair.
Accuracy intervals are {100 * w['median']:.1f} points wide (median; widest {100 * w['max']:.1f}) against a
±2-point (4-point-wide) goal: the token-level KL carries the fine comparisons.

{chr(10).join(comp)}

In {len(pe['comparisons'])} comparisons, {said}.

{goal_text}
"""


def summary_markdown(metrics: dict) -> str:
    """reports/<run>/summary.md: the headline, the table, the tasks, the caveats."""
    sc = ", ".join(f"batch {s['batch']} × {s['prompt_len']} prompt + {s['gen_len']} new tokens"
                   for s in metrics["scenarios"])
    tasks = "\n".join(f"| {t} | {v.get('samples', '–')} | {v.get('chance') if v.get('chance') else '–'} | "
                      f"{v['metric']} | {v.get('description', '')} |" for t, v in metrics["tasks"].items())
    paper = "; ".join(f"{k}: {v['speedup']}× at {_pct(v['retention'])}" for k, v in metrics["paper"].items())
    notes = "".join(f"- {n}\n" for n in metrics.get("notes", []))
    return f"""# Puzzle evaluation — run `{metrics['run_name']}` (preset `{metrics['preset']}`)

{headline_sentence(metrics)}

Parent: `{metrics['parent']}` · device: {metrics['device']} ({metrics['threads']} threads) · throughput
scenarios: {sc} · speed-up = best-batch generated tokens/s of the model ÷ the parent's, measured
interleaved in one process (median of per-round ratios) · retention = mean accuracy ÷ the parent's.

{results_table(metrics)}

{pareto_markdown(metrics)}
## Tasks (lm-evaluation-harness, local, the same samples for every model)

| task | samples | chance | metric | what |
|---|---|---|---|---|
{tasks}

## How to read it

- *Measured vs predicted*: the predicted speed-up sums stage 01's per-block costs; the difference is
  the runtime model's error (non-additive effects, Python overhead, cache behaviour).
- *Retention* near 100 % for a parent close to chance says little: the *above-chance* retention and the
  95 % interval (paired bootstrap over samples) say how much of what the parent knows survived.
- *ECE* (calibration error of the choice probabilities) and *E-AURC* (selective-prediction ranking
  quality beyond what the accuracy alone allows): lower is better; a child whose E-AURC grows has lost
  some of the parent's knowledge of when it is wrong.
- The paper for comparison — {paper}. Those are 70B/8B models on H100s with TensorRT-LLM; this run is
  a small model on this device, so compare the *shape* of the result, not the numbers.

{('## Notes' + chr(10) + chr(10) + notes) if notes else ''}Timing: quality {metrics['timing']['quality_seconds']} s, \
throughput {metrics['timing']['throughput_seconds']} s.
"""


def report_dir(cfg: RunConfig) -> Path:
    return resolve_path(cfg.reports_root) / cfg.run_name


REPORT_FILES = ("summary.md", "metrics.json", "timings.json", "environment.json",
                "retention_vs_speedup.png")
# Per-model fields of the comparison that are wall-clock measurements: they go to timings.json.
_TIMED_ROW_KEYS = ("measured", "measured_speedup", "speedup_error", "eval_seconds")


def split_report(metrics: dict, run_dir: str | Path | None = None) -> tuple[dict, dict]:
    """Split stage 06's metrics into (deterministic, timings).

    The first part depends only on the seed, the config and the cost table: two runs that share
    them write it byte for byte the same (accuracies, retention and its interval, bits per byte,
    uncertainty, predicted speed-ups, task hashes, settings), with model sources relative to
    ``run_dir`` instead of absolute paths. The second holds every wall-clock measurement
    (measured speed-ups and tokens/s, stage 04's measured re-check, solve and evaluation seconds,
    device and threads), which differs on every run. :func:`merge_report` undoes the split.
    """
    det = {k: v for k, v in metrics.items() if k not in ("device", "threads", "timing", "models",
                                                           "headline", "pareto")}
    tim: dict = {"run_name": metrics.get("run_name"), "device": metrics.get("device"),
                 "threads": metrics.get("threads"), "timing": metrics.get("timing"), "models": {}}
    root = Path(run_dir).absolute() if run_dir is not None else None
    rows = []
    for r in metrics.get("models", []):
        row = {k: v for k, v in r.items() if k not in _TIMED_ROW_KEYS}
        if root is not None and Path(str(r.get("source", ""))).is_absolute():
            try:
                row["source"] = Path(r["source"]).relative_to(root).as_posix()
            except ValueError:  # outside the run (e.g. a local HF parent): the folder's name only
                row["source"] = Path(r["source"]).name
        search_rec = dict(r.get("search") or {})
        t = {k: r[k] for k in _TIMED_ROW_KEYS if k in r}
        if "measured" in search_rec:
            t["search_measured"] = search_rec.pop("measured")
            row["search"] = search_rec
        rows.append(row)
        tim["models"][r["name"]] = t
    det["models"] = rows
    if "headline" in metrics:
        h = dict(metrics["headline"])
        tim["headline"] = {"measured_speedup": h.pop("measured_speedup", None),
                           "goal_met": h.pop("goal_met", None),  # it compares a measured speed-up
                           "baselines": {n: {"measured_speedup": b.get("measured_speedup")}
                                         for n, b in h.get("baselines", {}).items()}}
        h["baselines"] = {n: {k: v for k, v in b.items() if k != "measured_speedup"}
                          for n, b in h.get("baselines", {}).items()}
        det["headline"] = h
    if "pareto" in metrics:
        det["pareto"] = [{k: v for k, v in p.items() if k != "seconds"} for p in metrics["pareto"] or []]
        tim["pareto_solve_seconds"] = [p.get("seconds") for p in metrics["pareto"] or []]
    return det, tim


def merge_report(det: dict, tim: dict) -> dict:
    """metrics.json + timings.json -> the full metrics (as stage 06 returns them, sources aside)."""
    out = {**det, "device": tim.get("device"), "threads": tim.get("threads"), "timing": tim.get("timing")}
    rows = []
    for r in det.get("models", []):
        t = dict(tim.get("models", {}).get(r["name"], {}))
        row = {**r, **{k: t[k] for k in _TIMED_ROW_KEYS if k in t}}
        if "search_measured" in t:
            row["search"] = {**r.get("search", {}), "measured": t["search_measured"]}
        rows.append(row)
    out["models"] = rows
    if "headline" in det:
        h, th = dict(det["headline"]), tim.get("headline") or {}
        if "model" in h:
            h.update(measured_speedup=th.get("measured_speedup"), goal_met=th.get("goal_met"))
            h["baselines"] = {n: {**b, **(th.get("baselines") or {}).get(n, {})}
                              for n, b in h.get("baselines", {}).items()}
        out["headline"] = h
    if "pareto" in det:
        secs = tim.get("pareto_solve_seconds") or []
        out["pareto"] = [{**p, **({"seconds": secs[i]} if i < len(secs) else {})}
                         for i, p in enumerate(det["pareto"])]
    return out


def read_report(metrics_path: str | Path) -> dict:
    """The full metrics of a report folder: ``metrics.json`` merged with the ``timings.json`` next
    to it. A report written before the split (measured fields inside metrics.json) is returned as
    it is; a split one whose timings.json is missing raises :class:`EvaluationError`."""
    metrics_path = Path(metrics_path)
    det = json.loads(metrics_path.read_text(encoding="utf-8"))
    timings = metrics_path.with_name("timings.json")
    if "timing" in det:  # the old single-file layout
        return det
    if not timings.is_file():
        raise EvaluationError(f"{metrics_path} holds no measured speed-ups and {timings} is missing: "
                              "rerun notebooks/06_evaluation.ipynb to write both")
    return merge_report(det, json.loads(timings.read_text(encoding="utf-8")))


def report_environment(cfg: RunConfig) -> dict:
    """What produced the report and what would change its numbers: the run's environment record
    (interpreter, packages, device, threads, git commit, what breaks bit-identity), the corpus
    fingerprint stage 00 recorded, and where the cost table came from (measured or imported)."""
    from ..core.rundir import environment_info, file_sha256

    run = resolve_path(cfg.runs_root) / cfg.run_name
    env_path = run / "environment.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else environment_info(cfg)
    corpus = run / "00_parent" / "corpus.json"
    if corpus.is_file():
        c = json.loads(corpus.read_text())
        env["corpus"] = {"spec": cfg.corpus, "fingerprint": c.get("fingerprint"),
                         "python_version": c.get("python_version")}
    costs = run / "01_profiling" / "costs.csv"
    if costs.is_file():
        env["cost_table"] = {"sha256": file_sha256(costs),
                             "imported_from": cfg.profile_costs_from or None,
                             "note": "measured costs differ on every run and can change the children "
                                     "the search picks; profile_costs_from imports one table"}
    return env


def write_report(cfg: RunConfig, result: EvaluationResult) -> dict[str, Path]:
    """Write ``reports/<run>/``: ``summary.md``, ``metrics.json`` (what the seed, config and cost
    table determine: identical across reruns), ``timings.json`` (every wall-clock measurement),
    ``environment.json`` and the headline figure; return the paths."""
    import matplotlib.pyplot as plt

    from . import plots

    out = report_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in REPORT_FILES}
    det, tim = split_report(result.metrics, resolve_path(cfg.runs_root) / cfg.run_name)
    atomic_write_json(paths["metrics.json"], det)
    atomic_write_json(paths["timings.json"], tim)
    atomic_write_json(paths["environment.json"], report_environment(cfg))
    atomic_write_text(paths["summary.md"], summary_markdown(result.metrics))
    # The headline figure shows the models compared after GKD; the sweep's children have their own.
    shown = [m for m in result.models if not is_sweep_model(m["name"])]
    figs = {"retention_vs_speedup.png": plots.retention_vs_speedup(shown, result.metrics.get("pareto"),
                                                                   result.metrics["target_speedup"])}
    if result.metrics.get("pareto_eval"):
        paths["pareto.png"] = out / "pareto.png"
        figs["pareto.png"] = plots.pareto_figure(result.metrics)
    for name, fig in figs.items():
        tmp = paths[name].with_name(f".{name}.tmp.png")
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        plt.close(fig)
        tmp.replace(paths[name])
    return paths


def is_sweep_model(name: str) -> bool:
    """A child evaluated only for the measured Pareto (``pareto.point_name``: "uniform@2x (before GKD)")."""
    return "@" in name


def _shown(path: Path) -> str:
    """``path`` relative to the project folder when it is inside it (the README is read anywhere)."""
    try:
        return path.resolve().relative_to(project_root().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def update_readme_results(readme_path: str | Path = "README.md",
                          metrics_path: str | Path = "reports/smollm2/metrics.json") -> bool:
    """Replace the README's results table (between ``MARKERS``) with the one in ``metrics_path``
    and the ``timings.json`` next to it (see :func:`read_report`; a report from before the split
    is read as it is).

    A no-op that says why when the markers, the metrics file or its timings are missing; returns
    whether the README was rewritten.
    """
    readme, metrics_path = Path(readme_path), Path(metrics_path)
    if not metrics_path.is_file():
        print(f"update_readme_results: {metrics_path} does not exist (run `make reproduce` first); "
              "README left unchanged")
        return False
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(MARKERS[0]), text.find(MARKERS[1])
    if start < 0 or end < start:
        print(f"update_readme_results: {readme} has no {MARKERS[0]} … {MARKERS[1]} markers; README left "
              "unchanged (add both markers where the results table belongs)")
        return False
    try:
        m = read_report(metrics_path)
    except EvaluationError as e:
        print(f"update_readme_results: {e}; README left unchanged")
        return False
    pareto = pareto_markdown(m).replace("\n### ", "\n#### ").replace("## ", "### ", 1)
    block = (f"\n{headline_sentence(m)}\n\n{results_table(m)}\n\n{pareto + chr(10) if pareto else ''}"
             f"<sub>Generated from `{_shown(metrics_path)}` by `puzzlelib.evaluation.report.update_readme_results` "
             f"(run `{m['run_name']}`, {m['device']}, {m['threads']} threads).</sub>\n")
    new = text[: start + len(MARKERS[0])] + block + text[end:]
    if new != text:
        atomic_write_text(readme, new)
    print(f"update_readme_results: results table in {readme} {'updated' if new != text else 'already current'}")
    return True
