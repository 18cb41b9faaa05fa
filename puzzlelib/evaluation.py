"""Stage 06 — evaluation: how much of the parent each child keeps, and how much faster it really is.

What it does (DESIGN.md §1.6):
* builds local lm-evaluation-harness tasks from the held-out files (``tasks.py``: "which line comes
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
  results table from ``reports/default/metrics.json`` + ``timings.json``.

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

from . import tasks as T
from .config import RunConfig, project_root, resolve_path
from .model import PuzzleCache, PuzzleForCausalLM  # importing .model registers "nemotron-nas"
from .rundir import UPSTREAM, RunDir, atomic_write_json, atomic_write_text

STAGE = "06_evaluation"
PAPER = {"Nemotron-51B (from Llama-3.1-70B)": {"speedup": 2.17, "retention": 0.984},
         "Llama-3.1-8B child (paper's 8B experiment)": {"speedup": 1.73, "retention": 0.97}}
MARKERS = ("<!-- results:start -->", "<!-- results:end -->")
# Which score ranks a task's choices. next_line: PMI, log P(line | context) - log P(line), the
# Bayes-optimal rule when distractors are drawn from the marginal (lines from other files); raw
# log-likelihood ranks lines by how *common* they are, and a small model scores chance with it.
# name_recall: raw log-likelihood (every distractor already occurs in the context).
SCORING = {T.NEXT_LINE: "pmi", T.NAME_RECALL: "loglik"}
HEADLINE_METRIC = {T.NEXT_LINE: "acc_mutual_info", T.NAME_RECALL: "acc"}


class EvaluationError(ValueError):
    """Stage 06 cannot run with this input; the message says what to change."""


# ------------------------------------------------------------------ uncertainty metrics (pure)

def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax: the choice scores of a sample as probabilities over its choices."""
    s = np.asarray(scores, dtype=float)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    # Bin b holds confidences in (b/bins, (b+1)/bins]; 0 goes to the first bin.
    return np.clip(np.ceil(np.asarray(confidence) * bins).astype(int) - 1, 0, bins - 1)


def reliability(confidence, correct, bins: int = 10) -> list[dict]:
    """Per equal-width confidence bin: count, mean confidence, accuracy (empty bins left out)."""
    conf, ok = np.asarray(confidence, float), np.asarray(correct, float)
    idx = _bin_index(conf, bins)
    return [{"lo": b / bins, "hi": (b + 1) / bins, "count": int((idx == b).sum()),
             "confidence": float(conf[idx == b].mean()), "accuracy": float(ok[idx == b].mean())}
            for b in range(bins) if (idx == b).any()]


def ece(confidence, correct, bins: int = 10) -> float:
    """Expected calibration error: Σ_bins |bin|/n · |accuracy(bin) − mean confidence(bin)|."""
    n = len(confidence)
    return float(sum(r["count"] / n * abs(r["accuracy"] - r["confidence"])
                     for r in reliability(confidence, correct, bins)))


def risk_coverage(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    """The risk–coverage curve of "answer only when confidence ≥ t", at every distinct t.

    Returns (coverage, risk), highest threshold first. Tied confidences enter together: a
    threshold cannot accept half of a tie.
    """
    conf, err = np.asarray(confidence, float), 1.0 - np.asarray(correct, float)
    order = np.argsort(-conf, kind="stable")
    conf, err = conf[order], err[order]
    last = np.r_[np.nonzero(np.diff(conf))[0], len(conf) - 1]  # the end of each tie group
    k = last + 1
    return k / len(conf), np.cumsum(err)[last] / k


def aurc(confidence, correct) -> float:
    """Area under the risk–coverage curve (step integral; lower is better). Without ties it equals
    the mean over k = 1..n of the error rate among the k most confident answers."""
    cov, risk = risk_coverage(confidence, correct)
    return float(np.sum(np.diff(np.r_[0.0, cov]) * risk))


def optimal_aurc(correct) -> float:
    """AURC of a perfect ranking (every right answer more confident than every wrong one): what a
    model with this accuracy could reach. E-AURC = AURC − this isolates the ranking quality."""
    ok = np.asarray(correct, float)
    n = len(ok)
    e = int(round(n - ok.sum()))
    k = np.arange(1, n + 1)
    return float(np.mean(np.maximum(0, k - (n - e)) / k))


def uncertainty_metrics(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> dict:
    """Accuracy, mean confidence, ECE, AURC, optimal AURC, E-AURC, Brier score and NLL of one
    model on one multiple-choice task, from its choice probabilities [n, choices]."""
    probs, labels = np.asarray(probs, float), np.asarray(labels, int)
    pred, conf = probs.argmax(1), probs.max(1)
    ok = (pred == labels).astype(float)
    onehot = np.eye(probs.shape[1])[labels]
    a, a_opt = aurc(conf, ok), optimal_aurc(ok)
    return {"accuracy": float(ok.mean()), "mean_confidence": float(conf.mean()), "ece": ece(conf, ok, bins),
            "aurc": a, "aurc_optimal": a_opt, "e_aurc": a - a_opt,
            "brier": float(((probs - onehot) ** 2).sum(1).mean()),
            "nll": float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())}


def bootstrap_retention(parent: dict[str, np.ndarray], child: dict[str, np.ndarray], iters: int = 1000,
                        seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap 95 % interval of mean-accuracy retention (child mean / parent mean).

    ``parent`` / ``child``: per task, 0/1 correctness per sample, the same samples in the same order.
    Each resample draws the same sample indices for both models, so what the two share (an easy
    sample is easy for both) cancels, as it does in the point estimate.
    """
    if iters <= 0:
        return math.nan, math.nan
    rng = np.random.default_rng([seed, 0xB007])
    mp, mc = np.zeros(iters), np.zeros(iters)
    for t in parent:
        p, c = np.asarray(parent[t], float), np.asarray(child[t], float)
        idx = rng.integers(0, len(p), size=(iters, len(p)))
        mp += p[idx].mean(1) / len(parent)
        mc += c[idx].mean(1) / len(parent)
    ratio = mc / np.where(mp > 0, mp, np.nan)
    lo, hi = np.nanpercentile(ratio, [2.5, 97.5])
    return float(lo), float(hi)


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


# ------------------------------------------------------------------------------- throughput

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = ("wall", "cpu")


def _now() -> tuple[float, float]:
    # Both clocks at once: "wall" (elapsed) is what a dedicated device delivers; "cpu" (this
    # process's CPU time) does not advance while another process holds the core, so on a shared
    # machine it still measures the model (with one intra-op thread it equals runtime).
    return time.perf_counter(), time.process_time()


@torch.inference_mode()
def greedy_generate(model: PuzzleForCausalLM, ids: torch.Tensor, gen_len: int) -> tuple[torch.Tensor, dict]:
    """Prefill ``ids`` into a fresh ``PuzzleCache``, then ``gen_len`` greedy decode steps with the
    cache. Returns (the gen_len + 1 new tokens, {clock: (prefill seconds, decode seconds)}).

    The same accounting as stage 01's scenario (one prefill + gen_len decode steps), and the same
    tokens as ``model.generate(ids, max_new_tokens=gen_len + 1, do_sample=False)``, without
    ``generate``'s per-step Python overhead, which would blur small models' differences.
    """
    dev = ids.device
    cache = PuzzleCache(model.config)
    _sync(dev)
    t0 = _now()
    nxt = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
    _sync(dev)
    t1 = _now()
    out = [nxt]
    for _ in range(gen_len):
        nxt = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
    _sync(dev)
    t2 = _now()
    return torch.cat(out, 1), {c: (t1[k] - t0[k], t2[k] - t1[k]) for k, c in enumerate(CLOCKS)}


def measure_throughput(models: dict[str, PuzzleForCausalLM], scenarios: list[tuple[int, int, int]],
                       rounds: int = 5, warmup: int = 1, seed: int = 0, reference: str = "parent",
                       clock: str = "wall", progress: bool = True) -> dict:
    """Prefill / decode / generation tokens/s of every model for every (batch, prompt, gen) scenario.

    Interleaved: every round runs every model once per scenario, in a freshly shuffled model order;
    ``warmup`` untimed rounds first. Per model and scenario: medians of the timings on ``clock``
    ("wall" or "cpu", see ``_now``; both are recorded); per child, speed-ups to ``reference`` as the
    median over rounds of the within-round ratio.
    """
    if reference not in models:
        raise EvaluationError(f"the reference model {reference!r} is not among {list(models)}")
    if clock not in CLOCKS:
        raise EvaluationError(f"unknown clock {clock!r}: use 'wall' or 'cpu'")
    dev = next(next(iter(models.values())).parameters()).device
    vocab = min(m.config.vocab_size for m in models.values())
    gen = torch.Generator().manual_seed(seed)
    prompts = {s: torch.randint(0, vocab, s[:2], generator=gen).to(dev) for s in scenarios}
    names = list(models)
    rng = np.random.default_rng([seed, 0x7A7])
    raw = {c: {n: {f"b{b}": {"prefill_s": [], "decode_s": []} for b, _, _ in scenarios} for n in names}
           for c in CLOCKS}
    for r in tqdm(range(warmup + rounds), desc="throughput rounds", disable=not progress):
        for i in rng.permutation(len(names)):
            for s in scenarios:
                _, times = greedy_generate(models[names[i]], prompts[s], s[2])
                for c in CLOCKS if r >= warmup else ():
                    raw[c][names[i]][f"b{s[0]}"]["prefill_s"].append(times[c][0])
                    raw[c][names[i]][f"b{s[0]}"]["decode_s"].append(times[c][1])
    out: dict = {"scenarios": [{"batch": b, "prompt_len": p, "gen_len": g} for b, p, g in scenarios],
                 "rounds": rounds, "warmup": warmup, "reference": reference, "device": str(dev), "clock": clock,
                 "threads": torch.get_num_threads(), "models": {}, "other_clock": {}, "samples": raw}
    for c in CLOCKS:
        table = out["models"] if c == clock else out["other_clock"]
        for n in names:
            table[n] = _throughput_summary(raw[c], n, reference, scenarios)
    return out


def _throughput_summary(raw: dict, n: str, reference: str, scenarios) -> dict:
    per: dict = {}
    for b, p, g in scenarios:
        x, ref = raw[n][f"b{b}"], raw[reference][f"b{b}"]
        pre, dec = np.array(x["prefill_s"]), np.array(x["decode_s"])
        rpre, rdec = np.array(ref["prefill_s"]), np.array(ref["decode_s"])
        ratio = (rpre + rdec) / (pre + dec)  # within-round: a slow spell hits both sides
        per[f"b{b}"] = {
            "prefill_ms": float(np.median(pre) * 1e3), "decode_step_ms": float(np.median(dec) / g * 1e3),
            "prefill_tokens_per_s": float(b * p / np.median(pre)),
            "decode_tokens_per_s": float(b * g / np.median(dec)),
            "tokens_per_s": float(b * g / np.median(pre + dec)),
            "speedup": float(np.median(ratio)), "speedup_p10": float(np.percentile(ratio, 10)),
            "speedup_p90": float(np.percentile(ratio, 90)),
            "prefill_speedup": float(np.median(rpre / pre)), "decode_speedup": float(np.median(rdec / dec))}
    # The search's definition: the model at its best batch vs the parent at its best batch.
    ref_best = max(float(b * g / np.median(np.array(raw[reference][f"b{b}"]["prefill_s"])
                                           + np.array(raw[reference][f"b{b}"]["decode_s"])))
                   for b, _, g in scenarios)
    best = max(v["tokens_per_s"] for v in per.values())
    per["best"] = {"tokens_per_s": best, "speedup": best / ref_best}
    return per


def predicted_speedups(costs, choices: list, parent_choices: list) -> dict:
    """Stage 01's cost-table prediction for the same scenarios (``CostTable.predict_scenario``)."""
    per, best, ref_best = {}, 0.0, 0.0
    for b in costs.batch_sizes:
        c, p = costs.predict_scenario(choices, b), costs.predict_scenario(parent_choices, b)
        per[f"b{b}"] = {"tokens_per_s": c["tokens_per_s"], "speedup": c["tokens_per_s"] / p["tokens_per_s"],
                        "prefill_speedup": p["prefill_ms"] / c["prefill_ms"],
                        "decode_speedup": p["decode_ms"] / c["decode_ms"]}
        best, ref_best = max(best, c["tokens_per_s"]), max(ref_best, p["tokens_per_s"])
    per["best"] = {"speedup": best / ref_best}
    return per


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
    from .export import load_checkpoint

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


def _task_settings(cfg: RunConfig) -> dict:
    return dict(next_line=cfg.eval_next_line_samples, name_recall=cfg.eval_name_samples,
                bpb_chunks=cfg.eval_bpb_chunks, bpb_chunk_bytes=cfg.eval_bpb_chunk_bytes,
                context_lines=cfg.eval_context_lines, seed=cfg.seed)


def build_local_tasks(cfg: RunConfig, parent_dir: Path | None = None) -> list[T.BuiltTask]:
    """The run's local tasks, in memory, from the held-out split ``data.load_corpus`` reproduces.

    With ``parent_dir`` (stage 00's folder) the split is checked against the fingerprint stage 00
    recorded, so the tasks never use text the parent trained on (another Python's stdlib would).
    """
    from . import data

    corpus = data.load_corpus(cfg.corpus, cfg.corpus_max_bytes, cfg.heldout_fraction, cfg.seed)
    if parent_dir is not None:
        recorded = json.loads((Path(parent_dir) / "corpus.json").read_text()).get("fingerprint")
        if recorded != corpus.fingerprint:
            raise EvaluationError(
                f"the corpus read now (fingerprint {corpus.fingerprint[:12]}, Python "
                f"{corpus.python_version}) differs from the one stage 00 split (fingerprint "
                f"{str(recorded)[:12]}): held-out files could overlap the parent's training files. "
                "Run the pipeline on the Python that ran stage 00, or rerun notebooks/00_parent.ipynb")
    return T.build_tasks(corpus.heldout_docs, corpus.heldout_names, **_task_settings(cfg))


def lm_eval_max_length(seq_len: int, max_positions: int, built: list[T.BuiltTask], tokenizer) -> int:
    """The window lm-eval scores in: the training length ``seq_len`` (longer contexts are cut from
    the left, as the model saw them in training), widened only when an answer choice alone needs
    more tokens (lm-eval refuses a choice longer than its window)."""
    longest = max((len(tokenizer(c, add_special_tokens=False)["input_ids"]) for t in built
                   if t.kind == "multiple_choice" for r in t.rows for c in r["choices"]), default=0)
    need = max(seq_len, longest + 8)  # + a few tokens of context
    if need > max_positions:
        raise EvaluationError(f"an answer choice is {longest} tokens long but the model has only {max_positions} "
                              "positions: lower eval_context_lines or use a parent with longer positions")
    return min(need, max_positions)


def run(cfg: RunConfig, progress: bool = True) -> EvaluationResult:
    """Run (or reuse) stage 06 for ``cfg``: every model's accuracy, uncertainty and speed."""
    rd = RunDir(cfg)
    if not rd.should_run(STAGE):
        rd.note_reused(STAGE)
        return _load(rd, reused=True)
    for u in UPSTREAM[STAGE]:  # in pipeline order: the first stage missing is the one to run
        rd.require(u)
    from . import bld, gkd, parent as parent_stage, profiling, search

    t_start = time.perf_counter()
    pres = parent_stage.load(cfg)
    built = build_local_tasks(cfg, pres.dir)  # bad sample counts fail here, before any artifact
    prof, sres, gres = profiling.load(cfg), search.load(cfg), gkd.load(cfg)
    device = profiling.resolve_device(cfg.device)
    speed_threads = profiling.stage_threads(cfg)
    profiling.check_clock(cfg.profile_clock, device, speed_threads)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    parent_model = pres.load_model(dtype=getattr(torch, cfg.dtype)).to(device).eval()
    tokenizer = pres.load_tokenizer()
    entries, notes = collect_models(cfg, parent_model, pres.model_dir, sres, gres, prof.costs,
                                    lambda: bld.load(cfg).library_dir)
    scenarios = [(s.batch, s.prompt_len, s.gen_len) for s in prof.costs.scenarios]
    prefix = tokenizer.eos_token_id if cfg.parent == "embedded" else None  # see evaluate_model
    max_length = lm_eval_max_length(cfg.seq_len, parent_model.config.max_position_embeddings, built, tokenizer)
    with rd.stage(STAGE) as st:
        for old in ("tasks", "results"):  # a previous attempt's files (e.g. of a model no longer chosen)
            shutil.rmtree(st.dir / old, ignore_errors=True)
        info = T.write_tasks(built, st.dir / "tasks", _task_settings(cfg))
        loaded = T.task_manager(st.dir / "tasks").load(list(T.LOCAL_TASKS))
        hf_names = [t.strip() for t in cfg.eval_hf_tasks.split(",") if t.strip()]
        hf_loaded = T.task_manager(st.dir / "tasks", include_defaults=True).load(hf_names) if hf_names else None
        models, quality = {}, {}
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
    mc = [t for t in T.MC_TASKS] + [t for t in hf_names if t in quality["parent"]["results"]]
    chance = {t: T.CHANCE.get(t) for t in mc}
    parent_q = quality["parent"]
    correct = {n: {t: (np.argmax(q["samples"][t]["scores"], 1) == np.asarray(q["samples"][t]["labels"])).astype(float)
                   for t in mc if t in q["samples"]} for n, q in quality.items()}
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
            f"{_pct(h['above_chance_retention'])} of its accuracy above chance).{base} Goal ≥ 2× at ≥ 97 %: "
            f"{'met' if h['goal_met'] else 'not met'}; ahead of every baseline: "
            f"{'yes' if h['ahead_of_every_baseline'] else 'no'}.")


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

{('## Notes' + chr(10) + chr(10) + notes) if notes else ''}Timing: quality {metrics['timing']['quality_seconds']} s, throughput {metrics['timing']['throughput_seconds']} s.
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
    from .rundir import environment_info, file_sha256

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
    fig = plots.retention_vs_speedup(result.models, result.metrics.get("pareto"), result.metrics["target_speedup"])
    tmp = paths["retention_vs_speedup.png"].with_name(".retention_vs_speedup.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(paths["retention_vs_speedup.png"])
    return paths


def _shown(path: Path) -> str:
    """``path`` relative to the project folder when it is inside it (the README is read anywhere)."""
    try:
        return path.resolve().relative_to(project_root().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def update_readme_results(readme_path: str | Path = "README.md",
                          metrics_path: str | Path = "reports/default/metrics.json") -> bool:
    """Replace the README's results table (between ``MARKERS``) with the one in ``metrics_path``
    and the ``timings.json`` next to it (see :func:`read_report`; a report from before the split
    is read as it is).

    A no-op that says why when the markers, the metrics file or its timings are missing; returns
    whether the README was rewritten.
    """
    readme, metrics_path = Path(readme_path), Path(metrics_path)
    if not metrics_path.is_file():
        print(f"update_readme_results: {metrics_path} does not exist (run the default pipeline first); "
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
    block = (f"\n{headline_sentence(m)}\n\n{results_table(m)}\n\n"
             f"<sub>Generated from `{_shown(metrics_path)}` by `puzzlelib.evaluation.update_readme_results` "
             f"(run `{m['run_name']}`, {m['device']}, {m['threads']} threads).</sub>\n")
    new = text[: start + len(MARKERS[0])] + block + text[end:]
    if new != text:
        atomic_write_text(readme, new)
    print(f"update_readme_results: results table in {readme} {'updated' if new != text else 'already current'}")
    return True


def lm_eval_command(checkpoint: str | Path, tasks_dir: str | Path, tasks: tuple[str, ...] = T.LOCAL_TASKS,
                    batch_size: int = 8, max_length: int | None = None, limit: int | None = None,
                    device: str = "cpu", prefix_token_id: int | None = None,
                    tokenizer: str | Path | None = None) -> list[str]:
    """The ``lm_eval`` command line that evaluates an exported checkpoint on the local tasks in a
    separate process, as anyone without this kit would (``trust_remote_code`` loads the
    DeciLM code written into the checkpoint). With the stage's ``max_length`` and
    ``prefix_token_id`` (see ``evaluate_model``) it reproduces the stage's numbers. ``tokenizer``:
    a folder holding the tokenizer, when the checkpoint has none of its own."""
    args = f"pretrained={Path(checkpoint).absolute()},trust_remote_code=True"
    if tokenizer is not None:
        args += f",tokenizer={Path(tokenizer).absolute()}"
    if max_length:
        args += f",max_length={max_length}"
    if prefix_token_id is not None:
        args += f",prefix_token_id={prefix_token_id}"
    cmd = ["lm_eval", "--model", "hf", "--model_args", args, "--tasks", ",".join(tasks),
           "--include_path", str(Path(tasks_dir).absolute()), "--batch_size", str(batch_size), "--device", device]
    return cmd + (["--limit", str(limit)] if limit else [])
