"""Stage 03 — replace-1-block scoring: how much each library block alone changes the parent.

Puzzle's search (stage 04) models a child's quality as the **sum of its blocks' scores**; this
stage measures those scores (DESIGN.md §1.3). For every (layer, variant) of the block library —
the BLD-trained blocks of stage 02 and, optionally, the same variants straight from their
initialisation (``blocks.init_variant``), to show what BLD buys — exactly one sub-block of the
parent is replaced and the whole model is run on held-out tokens. Per candidate it records:

* ``kl``  — KL(parent ‖ candidate) of the next-token distributions, nats per token (mean over
  every scored position; the metric that gave the paper its best architectures), with
  ``kl_sem``, the standard error of that mean over sequences;
* ``lm_loss`` / ``lm_loss_delta`` — cross-entropy on the true next tokens, and its change from
  the parent's;
* ``top1_agreement`` — share of positions where candidate and parent pick the same next token;
* ``nmse`` — the block's local normalized MSE as stage 02 measured it (a local proxy; the notebook
  compares it with the global KL).

Every metric is stored per candidate, so stage 04 can switch objective without rescoring.

Scores come from ``prefix_scoring``: the parent's prefix is computed once per layer, so a
candidate runs only its own layer and the layers after it, and the scores equal the naive
full-forward ones (checked on a sample each run, ``scoring_naive_check``). ``interactions``
checks whether the scores add up over whole multi-block children (the EvoPress critique);
``score_table`` holds the table stage 04 reads. This module is the stage: it wires them
together and writes the files; import the other names from the module that defines them.

Reads: ``00_parent`` (parent, held-out tokens) via ``parent.load``; ``02_bld/library`` via
``bld.load`` (the library must come from this very parent: ``library.LibraryMismatch``).
Writes ``runs/<run>/03_scoring/``: ``scores.csv`` and ``scores.json`` (one row per candidate;
deterministic), ``interactions.csv`` (one row per child), ``metrics.json`` (deterministic
summary: best blocks, BLD vs init, correlations, naive-check difference), ``timing.json``
(seconds, candidates/s, measured speed-up of prefix caching; machine-dependent).
Leaves out: task accuracy (multiple-choice) per candidate — stage 06 measures accuracy on the
children the search picks; scoring every block on a task costs more than this whole stage and
is noisier than KL on a small model — and distributed scoring (candidates are independent:
split them by layer across processes if you need to).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..bld import stage as bld_stage
from ..core import data
from ..parent import stage as parent_stage
from ..core import precision
from ..core.config import RunConfig
from .interactions import (
    INTERACTION_COLUMNS,
    check_interactions,
    interaction_children,
    spearman,
    summarize_interactions,
)
from ..bld.library import Library, LibraryMismatch
from ..core.configuration_decilm import PuzzleConfig
from ..core.modeling_decilm import PuzzleForCausalLM
from .prefix_scoring import (
    Candidate,
    library_candidates,
    parent_reference,
    score_candidates,
    score_naive,
)
from ..core.rundir import RunDir, read_csv_rows
from ..core.atomic import atomic_write_json, atomic_write_text
from .score_table import (
    STAGE,
    ScoreTable,
    ScoringError,
    score_rows_to_csv,
)

# --------------------------------------------------------------------------------- the stage

@dataclass
class ScoringResult:
    """What notebook 03 shows and stage 04 reads."""

    dir: Path
    table: ScoreTable
    interactions: list[dict]
    metrics: dict
    timing: dict
    reused: bool


def heldout_batches(held: np.ndarray, cfg: RunConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The scoring batches: the first ``scoring_tokens`` held-out tokens in windows of seq_len."""
    need = cfg.seq_len + 1
    if len(held) < need:
        raise ScoringError(
            f"the held-out set has {len(held)} tokens, fewer than one sequence (seq_len + 1 = "
            f"{need}): nothing to score on. Raise heldout_fraction or corpus_max_bytes (stage 00 "
            "then rebuilds the data), or lower seq_len.")
    if cfg.scoring_tokens < cfg.seq_len:
        raise ScoringError(f"scoring_tokens ({cfg.scoring_tokens}) is less than one sequence of "
                           f"seq_len = {cfg.seq_len} tokens; set scoring_tokens >= {cfg.seq_len}")
    return data.heldout_batches(held, cfg.scoring_batch_size, cfg.seq_len, cfg.scoring_tokens)


def _device(cfg: RunConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ScoringError("device='cuda' but no CUDA device is available; set device=cpu or auto")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if cuda else "cpu")


def open_library(root: str | Path, parent: PuzzleForCausalLM) -> Library:
    """The run's block library, checked against ``parent`` (a clear error if it is another's)."""
    try:
        return Library.open(root, parent)
    except LibraryMismatch as e:
        raise LibraryMismatch(f"stage {STAGE} cannot score this library: {e}") from None


def naive_sample(candidates: Sequence[Candidate], n: int, pc: PuzzleConfig | None = None
                 ) -> list[Candidate]:
    """``n`` BLD candidates spread evenly over the layers (the cached path's cost depends on the
    layer, the naive path's does not, so a fair timing sample covers them all) and cycling over
    each layer's variants; the parent's own blocks are skipped when ``pc`` is given."""
    pool = [c for c in candidates if c.source == "bld" and c.sub_block != "pair"
            and (pc is None or not c.is_parent(pc))]
    layers = sorted({c.layer for c in pool})
    if n <= 0 or not pool:
        return []
    out: list[Candidate] = []
    for k in range(min(n, len(pool))):
        layer = layers[k % len(layers)] if n >= len(layers) else layers[(2 * k + 1) * len(layers) // (2 * n)]
        here = [c for c in pool if c.layer == layer and c not in out]
        if here:
            out.append(here[(7 * k) % len(here)])  # stride 7: mixes attention and FFN variants
    return out


def bld_gains(table: ScoreTable, metric: str = "kl") -> dict[str, dict]:
    """Per trained variant, the mean over layers of ``metric`` from pure init and after BLD, the
    absolute reduction and the factor: is BLD worth most for aggressive variants (absolute) or
    for mild ones (relative)?"""
    out: dict[str, dict] = {}
    if "init" not in table.sources:
        return out
    for r in table.rows:
        if r["source"] == "init":
            d = out.setdefault(r["variant"], {"init": [], "bld": []})
            d["init"].append(r[metric])
            d["bld"].append(table.score(r["layer"], r["variant"], metric, "bld"))
    return {v: {"init_mean": float(np.mean(d["init"])), "bld_mean": float(np.mean(d["bld"])),
                "reduction": float(np.mean(d["init"]) - np.mean(d["bld"])),
                "factor": float(np.mean(d["init"]) / np.mean(d["bld"])) if np.mean(d["bld"]) > 0
                else float("inf")} for v, d in out.items()}


def summarize(table: ScoreTable, parent: dict, interactions: dict, naive: dict) -> dict:
    """Deterministic headline numbers for metrics.json and the notebook."""
    bld_rows = [r for r in table.rows if r["source"] == "bld"]
    par = [r["kl"] for r in bld_rows if r["is_parent"]]
    best = {}
    for sub in ("attn", "ffn"):
        rows = [r for r in bld_rows if r["sub_block"] == sub and not r["is_parent"]]
        if rows:
            r = min(rows, key=lambda r: r["kl"])
            best[sub] = {"layer": r["layer"], "variant": r["variant"], "kl": r["kl"]}
    gains = []
    for r in bld_rows:
        if r["trained"] and ("init" in table.sources):
            ri = table.row(r["layer"], r["variant"], "init")
            if r["kl"] > 0:
                gains.append(ri["kl"] / r["kl"])
    per_variant = {}
    for r in bld_rows:
        d = per_variant.setdefault(r["variant"], {"sub_block": r["sub_block"], "kl": [], "layers": []})
        d["kl"].append(r["kl"])
        d["layers"].append(r["layer"])
    per_variant = {v: {"sub_block": d["sub_block"], "kl_mean": float(np.mean(d["kl"])),
                       "kl_min": float(np.min(d["kl"])), "kl_max": float(np.max(d["kl"])),
                       "layer_min": d["layers"][int(np.argmin(d["kl"]))]}
                   for v, d in per_variant.items()}
    nm = [(r["nmse"], r["kl"]) for r in bld_rows if not r["is_parent"] and math.isfinite(r["nmse"])]
    return {
        "candidates": len(table), "bld_candidates": len(bld_rows),
        "init_candidates": len(table) - len(bld_rows),
        "tokens_scored": parent["tokens"], "parent_lm_loss": parent["lm_loss"],
        "parent_blocks_max_kl": max(par) if par else None,
        "best_non_parent": best,
        "bld_gain_kl_ratio_median": float(np.median(gains)) if gains else None,
        "bld_improved_share": float(np.mean([g > 1 for g in gains])) if gains else None,
        "spearman_nmse_vs_kl": spearman(*zip(*nm)) if len(nm) > 2 else None,
        "per_variant": per_variant, "bld_gains": bld_gains(table),
        "interactions": interactions, "naive_check": naive,
    }


def _load_result(rd: RunDir, reused: bool) -> ScoringResult:
    d = rd.stage_dir(STAGE)
    read = lambda n: json.loads((d / n).read_text(encoding="utf-8"))  # noqa: E731
    return ScoringResult(d, ScoreTable.from_json(d / "scores.json"),
                         read_csv_rows(d / "interactions.csv"),
                         read("metrics.json"), read("timing.json"), reused)


def run(cfg: RunConfig, progress: bool = True) -> ScoringResult:
    """Run (or reuse) stage 03 for ``cfg``: score the library, check additivity, write artifacts."""
    rd = RunDir(cfg)
    if not rd.should_run(STAGE):
        rd.note_reused(STAGE)
        return _load_result(rd, reused=True)
    device = _device(cfg)
    pres = parent_stage.load(cfg)  # StageNotReady naming notebooks/00_parent.ipynb if missing
    held = data.load_tokens(pres.dir / "tokens", "heldout")
    batches = heldout_batches(held, cfg)  # bad held-out input fails here, before any artifact
    bres = bld_stage.load(cfg)     # StageNotReady naming notebooks/02_bld.ipynb if missing
    precision.apply_threads(cfg.threads)
    model = pres.load_model(dtype=getattr(torch, cfg.dtype)).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    lib = open_library(bres.library_dir, model)
    torch.manual_seed(cfg.seed)
    with rd.stage(STAGE) as st:
        with warnings.catch_warnings():
            # A library without channel scores: init_variant warns once per pruned FFN; the
            # init rows then use weight-norm pruning, which the notebook states.
            warnings.simplefilter("ignore", UserWarning)
            cands = library_candidates(model, lib, cfg.scoring_include_init)
            ref = parent_reference(model, batches)
            sc = score_candidates(model, cands, batches, progress, reference=ref)
            sc.shared_seconds += ref.seconds
            sc.seconds += ref.seconds
        meta = {"tokens": sc.parent["tokens"], "seq_len": cfg.seq_len,
                "batch_size": cfg.scoring_batch_size, "parent_lm_loss": sc.parent["lm_loss"],
                "library": "02_bld/library", "library_parent_hash": lib.parent_hash,
                "dtype": cfg.dtype, "include_init": cfg.scoring_include_init}
        table = ScoreTable(sc.rows, meta)

        # The naive full-forward path on a sample: the same numbers (checked), and its time.
        sample = naive_sample(cands, cfg.scoring_naive_check, model.config)
        naive, timing_naive = {"candidates": len(sample)}, {}
        if sample:
            nv = score_naive(model, sample, batches, progress=False)
            diffs = [abs(r["kl"] - table.score(r["layer"], r["variant"])) for r in nv.rows]
            naive.update(max_abs_diff_kl=max(diffs), max_abs_diff_lm_loss=max(
                abs(r["lm_loss"] - table.score(r["layer"], r["variant"], "lm_loss")) for r in nv.rows))
            if naive["max_abs_diff_kl"] > 1e-4:
                # Same operations on the same values: in fp32 any difference is a bug. In bf16 on a
                # GPU, kernels may round differently; say so rather than fail.
                msg = (f"prefix-cached scores differ from full forwards by "
                       f"{naive['max_abs_diff_kl']:.2e} nats/token")
                if cfg.dtype == "float32":
                    raise ScoringError(msg + ": a bug, please report it")
                warnings.warn(msg + f" ({cfg.dtype} rounding)", stacklevel=2)
            # The cached path's share of the parent's passes is charged pro rata to the sample.
            cached_s = (sum(sc.candidate_seconds[c.key] for c in sample)
                        + sc.shared_seconds * len(sample) / len(cands))
            naive_per = sum(nv.candidate_seconds.values()) / len(sample)
            naive_s = naive_per * len(sample) + nv.shared_seconds
            timing_naive = {"naive_sample_seconds": round(naive_s, 3),
                            "cached_sample_seconds": round(cached_s, 3),
                            "speedup_prefix_caching": round(naive_s / max(cached_s, 1e-9), 2),
                            "naive_seconds_estimate_all": round(naive_per * len(cands)
                                                                + nv.shared_seconds, 1)}

        inter_rows: list[dict] = []
        if cfg.scoring_interaction_children:
            children = interaction_children(table, cfg.scoring_interaction_children,
                                            cfg.scoring_interaction_seed)

            def blocks_for(child):
                from ..bld.library import child_blocks
                return child_blocks(lib.root, lib.parent_hash, child, prefer_coupled=False)

            t0 = time.perf_counter()
            inter_rows = check_interactions(model, table, children, blocks_for, batches, progress, ref)
            timing_naive["interaction_seconds"] = round(time.perf_counter() - t0, 3)
        inter = summarize_interactions(inter_rows) if inter_rows else {"children": 0}

        metrics = summarize(table, sc.parent, inter, naive)
        timing = {"scoring_seconds": round(sc.seconds, 3), "candidates": len(cands),
                  "candidates_per_second": round(len(cands) / max(sc.seconds, 1e-9), 3),
                  "tokens_per_candidate": sc.parent["tokens"],
                  "parent_pass_seconds": round(sc.shared_seconds, 3), **timing_naive,
                  "device": str(device), "torch_threads": torch.get_num_threads()}
        atomic_write_json(st.path("scores.json"), {"meta": meta, "rows": table.rows})
        table.to_csv(st.path("scores.csv"))
        atomic_write_text(st.path("interactions.csv"), score_rows_to_csv(inter_rows, INTERACTION_COLUMNS))
        atomic_write_json(st.path("metrics.json"), metrics)
        atomic_write_json(st.path("timing.json"), timing)
        st.metrics.update({k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None})
        st.metrics.update({f"interaction_{k}": v for k, v in inter.items()})
        st.metrics.update({k: v for k, v in timing.items() if isinstance(v, (int, float))})
    return _load_result(rd, reused=False)


def load(cfg: RunConfig) -> ScoringResult:
    """Stage 03's result for later stages; refuses missing, unfinished or stale scores."""
    rd = RunDir(cfg, create=False)
    rd.require(STAGE)
    return _load_result(rd, reused=True)


def load_scores(cfg: RunConfig) -> ScoreTable:
    """The score table of a finished, fresh stage 03 (what stage 04 calls)."""
    return load(cfg).table
