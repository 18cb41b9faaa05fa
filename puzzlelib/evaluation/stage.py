"""Stage 06 — evaluation: how much of the parent each child keeps, and how much faster it really is.

What it does (DESIGN.md §1.6):
* builds local lm-evaluation-harness tasks from the held-out files (``core/eval_tasks.py``: "which line comes
  next", "which name comes next", bits per byte), the same samples for every model, and — for a
  Hugging Face parent on a machine with network — adds the standard tasks named in
  ``eval_hf_tasks`` (e.g. ``mmlu,hellaswag,arc_easy``);
* evaluates, through lm-eval's ``HFLM``: the parent; the MIP child(ren) *before* GKD (assembled from
  the BLD library exactly as stage 05 assembles them) and *after* GKD; every baseline of stage 04
  after the same GKD. Accuracy per task, the mean, and **retention = child / parent**, with a paired
  bootstrap 95 % interval (same samples for both models) and the retention of accuracy *above
  chance* (a parent near chance makes the plain ratio look better than it is);
* measures throughput of every model on this device in the same process: for each scenario of
  stage 01 (batch, prompt, new tokens), a prefill into a fresh ``PuzzleCache`` and greedy decoding
  with the cache, round-robin over the models in a shuffled order each round, medians over rounds,
  ratios to the parent taken within a round (a slow spell of a shared machine hits both sides);
  next to it the speed-up *predicted* by stage 01's cost table, so the runtime model's error shows;
* beyond Puzzle — uncertainty retention: for the multiple-choice tasks, the choice probabilities
  (softmax over the choices' scores) give calibration (ECE) and selective prediction (AURC and the
  excess over a perfect ranking, E-AURC) of parent vs children: does compression keep the model's
  knowledge of when it is wrong?
* writes the report: ``reports/<run>/summary.md``, ``metrics.json`` (only what the seed, config
  and cost table determine, so a rerun writes the same bytes), ``timings.json`` (every wall-clock
  measurement), ``environment.json`` and the headline figure, and can regenerate the README's
  results table from ``reports/smollm2/metrics.json`` + ``timings.json`` (the real-parent headline).

Where the parts live: this module is the stage itself (lm-eval on the models compared, the
comparison table and headline, ``run`` / ``load``); ``uncertainty.py`` holds the calibration and
selective-prediction metrics and the bootstrap interval, ``throughput.py`` the speed measurement,
``report.py`` the report folder and the README table; ``core/eval_tasks.py`` the tasks, the
lm-eval settings and command (stage 05 writes them into each exported child) and
``EvaluationError``; import each name from the module that defines it (docs/modules.md).

Reads stages 00 (parent, tokenizer, corpus fingerprint), 01 (cost table, scenarios), 02 (library,
for the children before GKD), 04 (child specs, Pareto front) and 05 (distilled checkpoints).
Writes ``runs/<run>/06_evaluation/``: ``tasks/`` (JSONL + YAML + ``tasks.json`` with sha256),
``results/<model>.json`` (lm-eval results + per-sample scores), ``throughput.json`` (every timing
sample), ``metrics.json``. Leaves out: serving engines (vLLM/TensorRT-LLM would give other speeds),
generative tasks, and the statistical significance of speed differences under 5 %.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ..core import eval_tasks as T
from ..core.config import RunConfig
from ..core.eval_tasks import EvaluationError
from ..core import model as _auto_classes  # noqa: F401  (importing it registers "nemotron-nas" with the Auto classes)
from ..core.modeling_decilm import PuzzleForCausalLM
from ..core.rundir import UPSTREAM, RunDir
from ..core.atomic import atomic_write_json
from . import pareto as PE
from .throughput import measure_throughput, predicted_speedups
from .uncertainty import (
    aurc,
    bootstrap_retention,
    ece,
    reliability,
    risk_coverage,
    softmax,
    uncertainty_metrics,
)

STAGE = "06_evaluation"
PAPER = {"Nemotron-51B (from Llama-3.1-70B)": {"speedup": 2.17, "retention": 0.984},
         "Llama-3.1-8B child (paper's 8B experiment)": {"speedup": 1.73, "retention": 0.97}}
# Which score ranks a task's choices. next_line: PMI, log P(line | context) - log P(line), the
# Bayes-optimal rule when distractors are drawn from the marginal (lines from other files); raw
# log-likelihood ranks lines by how *common* they are, and a small model scores chance with it.
# name_recall: raw log-likelihood (every distractor already occurs in the context).
SCORING = {T.NEXT_LINE: "pmi", T.NAME_RECALL: "loglik"}
HEADLINE_METRIC = {T.NEXT_LINE: "acc_mutual_info", T.NAME_RECALL: "acc"}


# ----------------------------------------------------------------------------- quality (lm-eval)

def _quiet_lm_eval() -> Callable[[], None]:
    """Silence lm-eval's per-request warnings (left-truncation notices) while it runs."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    return lambda: [lg.setLevel(o) for lg, o in zip(loggers, old)]


def mc_choice_scores(sample: dict, scoring: str) -> np.ndarray:
    """The per-choice scores of one local multiple-choice sample (log-likelihood or PMI)."""
    n = len(sample["doc"]["choices"])
    lls = np.array([r[0] if isinstance(r, (list, tuple)) else r for r in sample["filtered_resps"]], float)
    if scoring == "pmi":
        if len(lls) != 2 * n:
            raise EvaluationError("PMI scoring needs lm-eval's unconditional log-likelihoods: the task "
                                  "YAML must list the acc_mutual_info metric")
        return lls[:n] - lls[n:]
    return lls[:n]


def evaluate_model(model, tokenizer, loaded_tasks: dict, *, batch_size: int, max_length: int,
                   device: str = "cpu", limit: int | None = None, prefix_token_id: int | None = None) -> dict:
    """Run lm-eval's ``HFLM`` on ``model`` for every task in ``loaded_tasks`` (``TaskManager.load``).

    ``prefix_token_id``: the token lm-eval puts before a text scored without context (PMI's
    context-free scores, the first bits-per-byte window); lm-eval's default is BOS. The embedded
    parent never saw BOS — its documents follow the previous one's EOS — so the stage passes EOS.

    Returns ``{"results": {task: {metric: value}}, "samples": {task: per-sample data}}``; for a
    multiple-choice task the per-sample data are ``labels``, choice ``scores`` (see ``SCORING``)
    and ``probs``; for bits per byte, each chunk's log-likelihood and byte count.
    """
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    restore = _quiet_lm_eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                  device=device, prefix_token_id=prefix_token_id)
        res = evaluate(lm, loaded_tasks, limit=limit, bootstrap_iters=0, log_samples=True, verbosity="ERROR")
    finally:
        restore()
    out: dict = {"results": {}, "samples": {}}
    for name, r in res["results"].items():
        out["results"][name] = {k.split(",")[0]: v for k, v in r.items()
                                if "," in k and "stderr" not in k and isinstance(v, (int, float))}
    for name, samples in res.get("samples", {}).items():
        samples = sorted(samples, key=lambda s: s["doc_id"])
        if name == T.BPB:
            out["samples"][name] = {"loglik": [float(s["filtered_resps"][0]) for s in samples],
                                    "bytes": [len(s["doc"]["text"].encode("utf-8")) for s in samples]}
            continue
        if name in SCORING:
            scores = [mc_choice_scores(s, SCORING[name]) for s in samples]
            labels = [int(s["doc"]["label"]) for s in samples]
        else:  # a standard task (hellaswag, an mmlu subject, ...): its choices' log-likelihoods
            if not all(isinstance(s["target"], int) or str(s["target"]).isdigit() for s in samples):
                continue  # not a choice index: no per-sample calibration for this task
            scores = [np.array([r[0] for r in s["filtered_resps"]], float) for s in samples]
            labels = [int(s["target"]) for s in samples]
        if len({len(s) for s in scores}) != 1:
            continue  # choice counts vary (some standard tasks): no [n, choices] array to calibrate
        scores_arr = np.stack(scores)
        out["samples"][name] = {"labels": labels, "scores": scores_arr.round(5).tolist(),
                                "probs": softmax(scores_arr).round(6).tolist()}
    return out


# ------------------------------------------------------------------------------- the models

@dataclass
class ModelEntry:
    """One model stage 06 evaluates, and how to get it."""

    name: str                      # "parent", "puzzle-1", "puzzle-1 (before GKD)", "uniform", ...
    method: str                    # parent | mip | uniform | depth | greedy | random
    gkd: bool | None               # None for the parent
    choices: list[tuple[str, str]]
    source: str                    # where the weights come from (a checkpoint folder, or the library)
    build: Callable[[], PuzzleForCausalLM] = field(repr=False)
    spec: dict = field(default_factory=dict)  # stage 04's record (predicted costs, batch, score)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def collect_models(cfg: RunConfig, parent_model: PuzzleForCausalLM, parent_dir: Path, search_res, gkd_res,
                   costs, library_dir: Callable[[], Path]) -> tuple[list[ModelEntry], list[str]]:
    """Parent; MIP children before/after GKD; baselines after GKD (see ``eval_before_gkd``)."""
    from ..core.export import load_checkpoint

    dtype = getattr(torch, cfg.dtype)
    entries = [ModelEntry("parent", "parent", None, costs.parent_choices(), str(parent_dir), lambda: parent_model)]
    notes: list[str] = []
    specs = search_res.children  # MIP solution(s) first, then the baselines that met the budget
    mip = [s for s in specs if s.method == "mip"]
    before = {"none": [], "best": mip[:1], "mip": mip, "all": specs}[cfg.eval_before_gkd]
    distilled = gkd_res.metrics["children"]
    for s in specs:
        choices = [tuple(c) for c in s.choices]
        if s.name in distilled and [tuple(c) for c in distilled[s.name]["choices"]] != choices:
            raise EvaluationError(f"child {s.name!r}: stage 05 distilled other choices than stage 04 chose; "
                                  "rerun notebooks/05_gkd.ipynb")
        rec = s.to_dict()
        if s in before:
            # Assembled from the BLD library exactly as stage 05 starts from it (the spec's own
            # coupled-block flags included): the difference to the row after GKD is what GKD adds.
            entries.append(ModelEntry(f"{s.name} (before GKD)", s.method, False, choices, "BLD library",
                                      lambda spec=s: spec.build_model(parent_model, library_dir()), rec))
        if s.name in distilled:
            ckpt = gkd_res.child_dir(s.name)
            entries.append(ModelEntry(s.name, s.method, True, choices, str(ckpt),
                                      lambda p=ckpt: load_checkpoint(p, dtype=dtype), rec))
        else:
            notes.append(f"{s.name} ({s.method}) was not distilled by stage 05 (gkd_children="
                         f"{cfg.gkd_children!r}); it is left out of the comparison")
    missing = [m for m in ("uniform", "depth", "greedy", "random") if search_res.baselines.get(m) is None
               and m in search_res.baselines]
    notes += [f"baseline {m} found no child within the budget in stage 04" for m in missing]
    return entries, notes


# ------------------------------------------------------------------------------- the stage

@dataclass
class EvaluationResult:
    """What notebook 06 shows and the report is written from."""

    dir: Path
    metrics: dict
    throughput: dict
    tasks: dict
    reused: bool

    @property
    def models(self) -> list[dict]:
        return self.metrics["models"]

    def row(self, name: str) -> dict:
        return next(m for m in self.models if m["name"] == name)

    def samples(self, name: str) -> dict:
        """Per-sample data of one model (labels, choice scores and probabilities per task)."""
        return json.loads((self.dir / "results" / f"{_safe(name)}.json").read_text())["samples"]


def _load(rd: RunDir, reused: bool) -> EvaluationResult:
    d = rd.stage_dir(STAGE)
    read = lambda p: json.loads((d / p).read_text())  # noqa: E731
    return EvaluationResult(d, read("metrics.json"), read("throughput.json"), read("tasks/tasks.json"), reused)


def run(cfg: RunConfig, progress: bool = True) -> EvaluationResult:
    """Run (or reuse) stage 06 for ``cfg``: every model's accuracy, uncertainty and speed."""
    rd = RunDir(cfg)
    if not rd.should_run(STAGE):
        rd.note_reused(STAGE)
        return _load(rd, reused=True)
    for u in UPSTREAM[STAGE]:  # in pipeline order: the first stage missing is the one to run
        rd.require(u)
    from ..bld import stage as bld
    from ..gkd import stage as gkd
    from ..parent import stage as parent_stage
    from ..profiling import stage as profiling
    from ..profiling import timing as profiling_timing
    from ..search import stage as search
    from ..core.precision import apply_threads

    t_start = time.perf_counter()
    pres = parent_stage.load(cfg)
    built = T.build_local_tasks(cfg, pres.dir)  # bad sample counts fail here, before any artifact
    prof, sres, gres = profiling.load(cfg), search.load(cfg), gkd.load(cfg)
    device = profiling_timing.resolve_device(cfg.device)
    speed_threads = profiling.stage_threads(cfg)
    profiling_timing.check_clock(cfg.profile_clock, device, speed_threads)
    apply_threads(cfg.threads)
    parent_model = pres.load_model(dtype=getattr(torch, cfg.dtype)).to(device).eval()
    tokenizer = pres.load_tokenizer()
    entries, notes = collect_models(cfg, parent_model, pres.model_dir, sres, gres, prof.costs,
                                    lambda: bld.load(cfg).library_dir)
    points = []
    if cfg.eval_pareto:  # every child of stage 04's sweep, from the BLD library, each choice set once
        known = {tuple(tuple(c) for c in e.choices): e.name for e in entries if not e.gkd}
        points, new = PE.plan_points(PE.read_children(sres.dir), known)
        entries += [ModelEntry(n["name"], n["spec"].method, False, [tuple(c) for c in n["spec"].choices],
                               "BLD library",
                               lambda spec=n["spec"]: spec.build_model(parent_model, bld.load(cfg).library_dir),
                               n["spec"].to_dict()) for n in new]
    windows = None
    if cfg.eval_fidelity_tokens:
        from ..core import data

        windows, window_bytes = PE.fidelity_windows(data.load_tokens(pres.dir / "tokens", "heldout"), cfg.seq_len,
                                                    cfg.eval_fidelity_tokens, tokenizer)
    scenarios = [(s.batch, s.prompt_len, s.gen_len) for s in prof.costs.scenarios]
    hflm = T.hflm_settings(cfg, built, tokenizer, parent_model.config.max_position_embeddings)
    prefix, max_length = hflm["prefix_token_id"], hflm["max_length"]
    with rd.stage(STAGE) as st:
        for old in ("tasks", "results"):  # a previous attempt's files (e.g. of a model no longer chosen)
            shutil.rmtree(st.dir / old, ignore_errors=True)
        info = T.write_tasks(built, st.dir / "tasks", T.task_settings(cfg))
        loaded = T.task_manager(st.dir / "tasks").load(list(T.LOCAL_TASKS))
        hf_names = [t.strip() for t in cfg.eval_hf_tasks.split(",") if t.strip()]
        hf_loaded = T.task_manager(st.dir / "tasks", include_defaults=True).load(hf_names) if hf_names else None
        models, quality, parent_logprobs = {}, {}, None
        for e in tqdm(entries, desc="lm-eval", disable=not progress):
            t0 = time.perf_counter()
            m = models[e.name] = e.build().to(device).eval()
            q = evaluate_model(m, tokenizer, loaded, batch_size=cfg.eval_batch_size, max_length=max_length,
                               device=str(device), prefix_token_id=prefix)
            if hf_loaded is not None:
                h = evaluate_model(m, tokenizer, hf_loaded, batch_size=cfg.eval_batch_size, max_length=max_length,
                                   device=str(device), limit=cfg.eval_hf_limit or None, prefix_token_id=prefix)
                q["results"].update(h["results"])
                q["samples"].update(h["samples"])
            if windows is not None:  # the parent comes first: its log-probabilities are every KL's reference
                fid, keep = PE.fidelity(m, windows, parent_logprobs, cfg.eval_batch_size)
                parent_logprobs = parent_logprobs or keep
                q["fidelity"] = {**fid, "bytes": window_bytes}
            q["seconds"] = round(time.perf_counter() - t0, 2)
            atomic_write_json(st.dir / "results" / f"{_safe(e.name)}.json",
                              {"model": e.name, "method": e.method, "gkd": e.gkd, "source": e.source, **q})
            quality[e.name] = q
        t_speed = time.perf_counter()
        # Stage 01's clock and thread count, so measured and predicted speed-ups are comparable.
        clock, old_threads = cfg.profile_clock, torch.get_num_threads()
        torch.set_num_threads(speed_threads)
        try:
            thr = measure_throughput(models, scenarios, cfg.eval_speed_rounds, cfg.eval_speed_warmup, cfg.seed,
                                     "parent", clock, progress)
        finally:
            torch.set_num_threads(old_threads)
        atomic_write_json(st.dir / "throughput.json", thr)
        timing = {"quality_seconds": round(t_speed - t_start, 1),
                  "throughput_seconds": round(time.perf_counter() - t_speed, 1)}
        metrics = summarize(cfg, entries, quality, thr, prof.costs, info, hf_names, notes, timing)
        metrics["pareto"] = sres.pareto
        if points or windows is not None:
            metrics["pareto_eval"] = pareto_eval(cfg, points, metrics["models"], quality)
        metrics["settings"].update(max_length=max_length, prefix_token_id=prefix)  # to reproduce with lm_eval
        atomic_write_json(st.dir / "metrics.json", metrics)
        h = metrics["headline"]
        st.metrics.update({k: h[k] for k in ("model", "measured_speedup", "predicted_speedup", "retention")
                           if k in h})
        st.metrics.update(timing)
    return _load(rd, reused=False)


def load(cfg: RunConfig) -> EvaluationResult:
    """Stage 06's result; refuses a missing, unfinished or stale stage."""
    rd = RunDir(cfg, create=False)
    rd.require(STAGE)
    return _load(rd, reused=True)


# ------------------------------------------------------------------------------- the numbers

def _task_accuracy(name: str, results: dict) -> float:
    r = results[name]
    key = HEADLINE_METRIC.get(name) or ("acc_norm" if "acc_norm" in r else "acc")
    return float(r[key])


def summarize(cfg: RunConfig, entries: list[ModelEntry], quality: dict, thr: dict, costs, task_info: dict,
              hf_names: list[str], notes: list[str], timing: dict) -> dict:
    """The comparison table (one row per model) and the headline, as metrics.json holds them."""
    mc = mc_tasks(cfg, quality)
    chance = {t: T.CHANCE.get(t) for t in mc}
    parent_q = quality["parent"]
    correct = correctness(quality, mc)
    parent_choices = entries[0].choices
    rows = []
    for e in entries:
        q = quality[e.name]
        acc = {t: _task_accuracy(t, q["results"]) for t in mc}
        mean = float(np.mean(list(acc.values())))
        p_acc = {t: _task_accuracy(t, parent_q["results"]) for t in mc}
        p_mean = float(np.mean(list(p_acc.values())))
        local = [t for t in mc if chance.get(t)]
        above = (np.mean([acc[t] - chance[t] for t in local]) / np.mean([p_acc[t] - chance[t] for t in local])
                 if local and np.mean([p_acc[t] - chance[t] for t in local]) > 0 else math.nan)
        unc = {t: uncertainty_metrics(q["samples"][t]["probs"], q["samples"][t]["labels"], cfg.eval_calibration_bins)
               for t in mc if t in q["samples"]}
        meas = thr["models"][e.name]
        pred = predicted_speedups(costs, e.choices, parent_choices)
        bpb, p_bpb = q["results"][T.BPB]["bits_per_byte"], parent_q["results"][T.BPB]["bits_per_byte"]
        rows.append({
            "name": e.name, "method": e.method, "gkd": e.gkd, "source": e.source,
            "spec": " | ".join(f"{a.split(':')[1]}+{f.split(':')[1]}" for a, f in e.choices),
            "choices": [list(c) for c in e.choices],
            "accuracy": acc, "mean_accuracy": mean, "retention": mean / p_mean if p_mean else math.nan,
            "retention_ci": list(bootstrap_retention(correct["parent"], correct[e.name], cfg.eval_bootstrap, cfg.seed))
            if e.name != "parent" else [1.0, 1.0],
            "task_retention": {t: acc[t] / p_acc[t] if p_acc[t] else math.nan for t in mc},
            "above_chance_retention": float(above),
            "lm_eval_consistency": max((abs(acc[t] - float(correct[e.name][t].mean())) for t in correct[e.name]),
                                       default=0.0),
            "bpb": bpb, "bpb_ratio": bpb / p_bpb,
            **({"kl_per_token": sum(q["fidelity"]["kl"]) / sum(q["fidelity"]["tokens"]),
                "fidelity_bpb": sum(q["fidelity"]["nll"]) / math.log(2) / sum(q["fidelity"]["bytes"]),
                "fidelity_tokens": sum(q["fidelity"]["tokens"])} if "fidelity" in q else {}),
            "measured": meas, "measured_speedup": meas["best"]["speedup"],
            "predicted": pred, "predicted_speedup": pred["best"]["speedup"],
            "speedup_error": meas["best"]["speedup"] / pred["best"]["speedup"] - 1,
            "search": {k: e.spec.get(k) for k in ("batch", "predicted", "measured")} if e.spec else {},
            "uncertainty": unc,
            "ece": float(np.mean([u["ece"] for u in unc.values()])) if unc else math.nan,
            "aurc": float(np.mean([u["aurc"] for u in unc.values()])) if unc else math.nan,
            "e_aurc": float(np.mean([u["e_aurc"] for u in unc.values()])) if unc else math.nan,
            "eval_seconds": q["seconds"]})
    return {"run_name": cfg.run_name, "preset": cfg.preset, "parent": cfg.parent, "device": thr["device"],
            "threads": thr["threads"], "scenarios": thr["scenarios"], "target_speedup": cfg.search_speedup,
            "tasks": {t: {**{k: v for k, v in task_info["tasks"].get(t, {}).items() if k in
                             ("kind", "samples", "chance", "description", "jsonl_sha256")},
                          "metric": "bits_per_byte" if t == T.BPB else HEADLINE_METRIC.get(t, "acc_norm|acc"),
                          "scoring": SCORING.get(t, "loglik")}
                      for t in [*mc, T.BPB]},
            "models": rows, "headline": headline(rows, cfg.search_speedup), "notes": notes,
            "settings": {**task_info["settings"], "batch_size": cfg.eval_batch_size,
                         "speed_rounds": cfg.eval_speed_rounds, "speed_warmup": cfg.eval_speed_warmup,
                         "calibration_bins": cfg.eval_calibration_bins, "bootstrap": cfg.eval_bootstrap},
            "timing": timing, "paper": PAPER}


def mc_tasks(cfg: RunConfig, quality: dict) -> list[str]:
    """The multiple-choice tasks every mean accuracy averages: the local ones, then the standard ones."""
    hf = [t.strip() for t in cfg.eval_hf_tasks.split(",") if t.strip()]
    return list(T.MC_TASKS) + [t for t in hf if t in quality["parent"]["results"]]


def correctness(quality: dict, mc: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """Per model and task, 0/1 correctness of every sample (argmax of the choice scores)."""
    return {n: {t: (np.argmax(q["samples"][t]["scores"], 1) == np.asarray(q["samples"][t]["labels"])).astype(float)
                for t in mc if t in q["samples"]} for n, q in quality.items()}


def pareto_eval(cfg: RunConfig, points: list[dict], rows: list[dict], quality: dict) -> dict:
    """metrics["pareto_eval"]: the sweep's points (method, target, the model carrying its numbers)
    and the matched MIP − baseline comparisons with paired bootstrap intervals (``pareto.py``)."""
    mc = mc_tasks(cfg, quality)
    correct = correctness(quality, mc)
    fid = {n: q["fidelity"] for n, q in quality.items() if "fidelity" in q}
    predicted = {r["name"]: r["predicted_speedup"] for r in rows}
    mip_after = next((r["name"] for r in rows if r["method"] == "mip" and r["gkd"]), None)
    after = [(mip_after, r["name"]) for r in rows if mip_after and r["gkd"] and r["method"] in PE.METHODS[1:]]
    comps = PE.comparisons(points, predicted, correct, fid, cfg.eval_bootstrap, cfg.seed, after)
    # How wide the intervals came out: the accuracy ones against the ±2-point goal of issue #15.
    widths = [c["accuracy_diff"][2] - c["accuracy_diff"][1] for c in comps if not math.isnan(c["accuracy_diff"][1])]
    return {"points": points, "comparisons": comps, "methods": list(PE.METHODS),
            "targets": sorted({p["target"] for p in points}), "fidelity_tokens": cfg.eval_fidelity_tokens,
            "accuracy_interval_width": {"median": float(np.median(widths)) if widths else math.nan,
                                        "max": float(max(widths)) if widths else math.nan}}


def headline(rows: list[dict], target: float) -> dict:
    """The MIP child after GKD against the goal (≥ 2× at ≥ 97 %) and against every baseline."""
    mip = next((r for r in rows if r["method"] == "mip" and r["gkd"]), None)
    if mip is None:
        return {"note": "no MIP child was distilled: nothing to headline"}
    base = {r["name"]: r for r in rows if r["method"] not in ("parent", "mip") and r["gkd"]}
    return {"model": mip["name"], "target_speedup": target, "measured_speedup": mip["measured_speedup"],
            "predicted_speedup": mip["predicted_speedup"], "retention": mip["retention"],
            "retention_ci": mip["retention_ci"], "above_chance_retention": mip["above_chance_retention"],
            "goal": {"speedup": 2.0, "retention": 0.97},
            "goal_met": bool(mip["measured_speedup"] >= 2.0 and mip["retention"] >= 0.97),
            "baselines": {n: {"retention": r["retention"], "measured_speedup": r["measured_speedup"]}
                          for n, r in base.items()},
            "ahead_of_every_baseline": bool(base) and all(mip["retention"] > r["retention"] for r in base.values())}


def curve_data(result: EvaluationResult, task: str, names: list[str] | None = None, bins: int = 10) -> dict:
    """Risk–coverage and reliability data of ``names`` (default: every model) on ``task``, for
    ``plots.uncertainty_curves``."""
    out = {}
    for name in names or [m["name"] for m in result.models]:
        smp = result.samples(name)[task]
        probs, labels = np.asarray(smp["probs"]), np.asarray(smp["labels"])
        conf, ok = probs.max(1), (probs.argmax(1) == labels).astype(float)
        cov, risk = risk_coverage(conf, ok)
        row = result.row(name)
        out[name] = {"coverage": cov, "risk": risk, "reliability": reliability(conf, ok, bins), "aurc": aurc(conf, ok),
                     "ece": ece(conf, ok, bins), "method": row["method"], "gkd": row["gkd"]}
    return out
