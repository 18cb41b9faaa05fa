"""Run configuration: one `RunConfig` dataclass, named `PRESETS`, load / save / hash.

What it does: holds every knob of a run. Each field is defaulted, commented, and tagged with the
*stage whose cached artifacts it affects* (`metadata={"stage": ...}`), so that
`cfg.hash("02_bld")` changes exactly when something 02_bld depends on changes, and the run
directory (`rundir.py`) can tell a fresh artifact from a stale one and name the field that moved.

Stage tags:
  "run"                  affects nothing cached (names, paths, thread count, --force)
  "data"                 corpus, tokenizer, split: every stage depends on these
  "00_parent" .. "06_evaluation"   that stage (and, through the run directory's upstream keys,
                         every stage downstream of it)

Reads: nothing, except a JSON file in `RunConfig.load`. Writes: a JSON file in `cfg.save`.
Leaves out: what the fields *mean* to the algorithms (each stage module reads its own fields),
and whether a local corpus path exists (that depends on the working directory the notebooks run
in; `data.py` checks it, and the runner checks it before starting any notebook).

Adding a field is one line in `RunConfig`, e.g.
    bld_lr: float = _f(3e-4, "02_bld")  # AdamW peak learning rate for each (layer, variant) job
plus, if it has a valid range, one line in `_range_errors`.

Strings from the command line (`--set key=value`) are converted by `parse_set_args` to the field's
type. Booleans there accept true/false, yes/no, on/off, 1/0 (any case). Values given in Python or
JSON (presets, `overrides` dicts, config.json) must already have the right type: a string "no"
for a bool field is refused, because in Python it would silently be truthy.
"""

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The pipeline stages in execution order; rundir.py re-exports this as STAGES.
PIPELINE_STAGES = (
    "00_parent", "01_profiling", "02_bld", "03_scoring", "04_search", "05_gkd", "06_evaluation",
)
STAGE_TAGS = ("run", "data", *PIPELINE_STAGES)
DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("float32", "bfloat16", "float16")
# A byte-level BPE needs its 256 byte tokens plus the special tokens data.py adds (a handful:
# end-of-text, padding, ...); 8 slots of headroom keeps the check independent of the exact list.
MIN_VOCAB_SIZE = 256 + 8
# run_name becomes a directory under runs/ and reports/: no separators, no leading dot (so no
# "..", no hidden folders), short enough for every filesystem.
RUN_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_TRUE = {"true", "yes", "on", "1", "y", "t"}
_FALSE = {"false", "no", "off", "0", "n", "f"}


class ConfigError(ValueError):
    """A config value, key, preset or file is invalid; the message says what to change."""


def _f(default: Any, stage: str, choices: tuple | None = None) -> Any:
    """A dataclass field tagged with the stage it affects (and optionally its allowed values)."""
    assert stage in STAGE_TAGS, f"unknown stage tag {stage!r}"
    meta: dict[str, Any] = {"stage": stage}
    if choices is not None:
        meta["choices"] = tuple(choices)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunConfig:
    # ---- run: names, paths, machine knobs; never part of a cache key ------------------------
    run_name: str = _f("default", "run")  # folder under runs_root/ and reports_root/ (safe name)
    preset: str = _f("default", "run")  # preset the values started from (recorded, not re-applied)
    runs_root: str = _f("runs", "run")  # where run dirs live; relative = to the project folder (the one holding notebooks/)
    reports_root: str = _f("reports", "run")  # where the runner writes executed notebooks + html
    threads: int = _f(0, "01_profiling")  # torch intra-op threads; 0 = torch default. Tagged 01: wall-clock timings depend on it
    force: bool = _f(False, "run")  # recompute stages even when their cached artifacts are fresh
    # seed is tagged "data" (not "run") because it changes the split, the tokenizer and every
    # trained weight: a new seed must never silently reuse artifacts made with the old one.
    seed: int = _f(0, "data")  # seeds python/numpy/torch RNGs in every stage
    # device is tagged "01_profiling": it changes measured runtimes, hence the search and all
    # that follows, but a parent or block library trained elsewhere is still valid to reuse.
    device: str = _f("cpu", "01_profiling", DEVICES)  # "auto" = cuda if available else cpu

    # ---- data: corpus, tokenizer, packing ------------------------------------------------------
    corpus: str = _f("stdlib", "data")  # "stdlib" | .txt/.jsonl file or folder | "hf:<ds>[:<cfg>]"
    corpus_max_bytes: int = _f(12_000_000, "data")  # cap on raw text read from the corpus
    heldout_fraction: float = _f(0.05, "data")  # share of FILES held out (split by file, not token)
    vocab_size: int = _f(2048, "data")  # BPE vocab (embedded parent; HF parents bring their own)
    seq_len: int = _f(256, "data")  # tokens per packed training / evaluation sequence
    tokenizer_train_bytes: int = _f(4_000_000, "data")  # bytes of training text used to fit the BPE

    # ---- 00_parent: the model every child is cut from ------------------------------------------
    parent: str = _f("embedded", "00_parent")  # "embedded" (trained here) | local HF dir | hub id
    trust_remote_code: bool = _f(False, "00_parent")  # passed to from_pretrained for HF parents
    # The parent_* shape and training fields apply to the embedded parent only; an HF parent's
    # shape comes from its own config.json.
    parent_hidden_size: int = _f(256, "00_parent")  # model width
    parent_num_layers: int = _f(8, "00_parent")  # decoder layers (= search positions)
    parent_num_heads: int = _f(8, "00_parent")  # query heads
    parent_num_kv_heads: int = _f(4, "00_parent")  # key/value heads of the parent's GQA
    parent_intermediate_size: int = _f(768, "00_parent")  # SwiGLU width (3x hidden)
    parent_tie_embeddings: bool = _f(True, "00_parent")  # share input embedding and LM head
    parent_train_tokens: int = _f(2_000_000, "00_parent")  # training budget in tokens
    parent_batch_size: int = _f(16, "00_parent")  # sequences per optimizer step
    parent_lr: float = _f(1e-3, "00_parent")  # AdamW peak learning rate
    parent_min_lr_ratio: float = _f(0.1, "00_parent")  # cosine decay floor, as a fraction of peak
    parent_warmup_steps: int = _f(50, "00_parent")  # linear warm-up steps
    parent_weight_decay: float = _f(0.1, "00_parent")  # AdamW decoupled weight decay
    parent_grad_clip: float = _f(1.0, "00_parent")  # max global grad norm; 0 disables clipping
    parent_autocast_bf16: bool = _f(True, "00_parent")  # bf16 autocast for training matmuls
    parent_eval_every: int = _f(100, "00_parent")  # steps between held-out loss evaluations
    parent_eval_tokens: int = _f(65_536, "00_parent")  # held-out tokens per evaluation
    parent_checkpoint_every: int = _f(100, "00_parent")  # steps between resumable saves; 0 = never
    dtype: str = _f("float32", "00_parent", DTYPES)  # weights dtype the later stages load

    # ---- 01_profiling: measured cost of every sub-block variant on the target device ----------
    profile_batch_sizes: str = _f("1,8", "01_profiling")  # comma-separated; one scenario per size
    profile_prompt_len: int = _f(128, "01_profiling")  # prompt tokens per sequence (prefill)
    profile_gen_len: int = _f(64, "01_profiling")  # new tokens; decode timed at prompt+gen//2 context
    profile_warmup: int = _f(2, "01_profiling")  # untimed calls per bench before sampling
    profile_repeats: int = _f(15, "01_profiling")  # interleaved timing rounds (median, p10/p90)
    profile_num_random_children: int = _f(12, "01_profiling")  # children in the additivity check
    profile_clock: str = _f("wall", "01_profiling", ("wall", "cpu"))  # wall = elapsed; cpu = 1-thread CPU time, immune to other processes
    profile_statistic: str = _f("median", "01_profiling", ("median", "p10", "min"))  # how samples become the table's ms (noise only adds time)
    # Timings differ between two runs, and a different cost table can make the search pick another
    # child: importing one table makes runs on many machines (or a rerun) find the same children.
    profile_costs_from: str = _f("", "01_profiling")  # "" = measure here; else an earlier run's costs.csv, its 01_profiling/ folder or its run folder: imported, not measured

    # ---- 02_bld: the block library, by blockwise local distillation ----------------------------
    # Variant lists are comma-separated strings (RunConfig fields are scalars). The parent's own
    # sub-blocks are always in the library (copied and measured, not trained).
    bld_kv_heads: str = _f("auto", "02_bld")  # GQA KV-head counts, e.g. "2,1"; "auto" = every divisor of the query heads <= the parent's; "" = none
    bld_ffn_fractions: str = _f("1.0,0.875,0.75,0.5,0.25,0.2,0.1", "02_bld")  # SwiGLU widths as fractions of the parent's (the paper's menu); "" = none
    bld_include_linear: bool = _f(True, "02_bld")  # add attn:linear and ffn:linear (vLLM cannot serve them)
    bld_include_noop: bool = _f(True, "02_bld")  # add attn:noop and ffn:noop (nothing to train; measured)
    bld_coupled_pairs: str = _f("", "02_bld")  # optional coupled BLD, every layer: "attn:kv1+ffn:0.50,attn:noop+ffn:0.25"
    # Default budget: 131k tokens (64 steps of 8x256) for each of the 80 trained blocks, about
    # 3 min on 2 busy CPU cores with bf16 autocast (bld.py's docstring has the measurements).
    bld_tokens_per_variant: int = _f(131_072, "02_bld")  # training tokens of EVERY trained (layer, variant) block
    bld_batch_size: int = _f(8, "02_bld")  # sequences of seq_len tokens per BLD step
    bld_lr: float = _f(5e-4, "02_bld")  # AdamW peak learning rate of each block (1e-3 made ffn:0.875 worse)
    bld_min_lr_ratio: float = _f(0.1, "02_bld")  # cosine decay floor, as a fraction of peak
    bld_warmup_steps: int = _f(4, "02_bld")  # linear warm-up steps of each block
    bld_weight_decay: float = _f(0.0, "02_bld")  # AdamW decay (0: blocks start at the parent's weights)
    bld_grad_clip: float = _f(1.0, "02_bld")  # max grad norm per block; 0 disables clipping
    bld_calib_tokens: int = _f(16_384, "02_bld")  # train tokens measuring FFN channel contributions (pruning order)
    bld_eval_tokens: int = _f(8_192, "02_bld")  # held-out tokens for normalized MSE before/during/after
    bld_eval_every: int = _f(32, "02_bld")  # steps between held-out evaluations of a block; 0 = before/after only
    bld_autocast_bf16: bool = _f(True, "02_bld")  # bf16 autocast for block training (targets and evaluation stay fp32)
    bld_activations_on_disk: bool = _f(False, "run")  # parent activations in memory-mapped files instead of RAM (same numbers)

    # ---- 03_scoring: replace-1-block scores of every library block -----------------------------
    scoring_tokens: int = _f(4_096, "03_scoring")  # held-out tokens every candidate is scored on (capped by the held-out set)
    scoring_batch_size: int = _f(8, "03_scoring")  # sequences of seq_len per forward (memory vs speed)
    scoring_include_init: bool = _f(True, "03_scoring")  # also score each trained variant straight from init: what BLD buys
    scoring_interaction_children: int = _f(8, "03_scoring")  # random multi-block children in the additivity (EvoPress) check; 0 = skip
    scoring_interaction_seed: int = _f(0, "03_scoring")  # which children that check draws
    scoring_naive_check: int = _f(8, "03_scoring")  # candidates re-scored by full forwards (equality + speed-up); 0 = skip

    # ---- 04_search: the MIP over (layer, attention, FFN) under device budgets --------------------
    search_metric: str = _f("kl", "04_search", ("kl", "lm_loss", "lm_loss_delta", "top1_agreement", "nmse"))  # stage-03 score column the search sums over blocks (degradation vs the parent)
    search_speedup: float = _f(2.0, "04_search")  # min throughput as a multiple of the parent's best-batch throughput; 0 = off
    search_min_tokens_per_s: float = _f(0.0, "04_search")  # min generated tokens/s at the chosen batch size; 0 = off
    search_max_latency_ms: float = _f(0.0, "04_search")  # max ms for one scenario (prefill + gen_len decode steps); 0 = off
    search_max_memory_mib: float = _f(0.0, "04_search")  # max weights + batch x (prompt+gen) x KV cache, MiB; 0 = off
    search_max_params_ratio: float = _f(0.0, "04_search")  # max parameters as a fraction of the parent's; 0 = off
    search_batch_sizes: str = _f("", "04_search")  # batch sizes solved (best kept), e.g. "1,8"; "" = every profiled one
    search_num_solutions: int = _f(3, "04_search")  # diverse MIP solutions, each a child spec for 05_gkd
    search_min_diff_fraction: float = _f(0.2, "04_search")  # each solution differs from every earlier one in >= this share of layers
    search_pareto_speedups: str = _f("1.25,1.5,2,2.5,3", "04_search")  # speed-up targets of the Pareto sweep
    search_solver: str = _f("auto", "04_search", ("auto", "gurobi", "highs"))  # auto: gurobipy if installed and its licence admits the model, else HiGHS
    search_time_limit_s: float = _f(60.0, "04_search")  # wall-clock limit of each MIP solve
    search_mip_gap: float = _f(1e-6, "04_search")  # relative optimality gap at which a solve stops
    search_exclude_linear: bool = _f(False, "04_search")  # leave attn/ffn:linear out (vLLM cannot serve them)
    search_influence_tokens: int = _f(16_384, "04_search")  # held-out tokens measuring block influence (depth baseline)
    search_random_tries: int = _f(2000, "04_search")  # uniform library draws the random baseline tries before a random MIP point
    search_measure: bool = _f(True, "04_search")  # re-check every child with measured end-to-end timings (stage 01's method)

    # 05_gkd: global knowledge distillation of the chosen children against the frozen parent.
    gkd_children: str = _f("all", "05_gkd")  # children of stage 04 to distil: "all" or comma-separated names
    gkd_tokens: int = _f(131_072, "05_gkd")  # training tokens per child (the same for every child: fair)
    gkd_batch_size: int = _f(16, "05_gkd")  # sequences per optimizer step (global, across processes)
    gkd_grad_accum: int = _f(1, "05_gkd")  # micro-batches per step (memory, not maths: same result)
    gkd_lr: float = _f(3e-4, "05_gkd")  # AdamW peak learning rate
    gkd_min_lr_ratio: float = _f(0.1, "05_gkd")  # cosine decay floor, as a fraction of peak
    gkd_warmup_steps: int = _f(4, "05_gkd")  # linear warm-up steps
    gkd_weight_decay: float = _f(0.0, "05_gkd")  # AdamW decay (0: the child starts from trained blocks)
    gkd_grad_clip: float = _f(1.0, "05_gkd")  # max global grad norm; 0 disables clipping
    gkd_cos_weight: float = _f(1.0, "05_gkd")  # weight of sum over layers of (1 - cos(child, parent hidden))
    gkd_kl_weight: float = _f(1.0, "05_gkd")  # weight of KL(parent || child) on next-token distributions
    gkd_lm_weight: float = _f(0.0, "05_gkd")  # weight of the LM loss on the data (paper: hurts; off)
    gkd_autocast_bf16: bool = _f(True, "05_gkd")  # bf16 autocast for the forward passes
    gkd_eval_every: int = _f(16, "05_gkd")  # steps between held-out evaluations; 0 = only at the end
    gkd_eval_tokens: int = _f(16_384, "05_gkd")  # held-out tokens per evaluation
    gkd_checkpoint_every: int = _f(16, "05_gkd")  # steps between resumable checkpoints; 0 = never
    gkd_ablation: bool = _f(True, "05_gkd")  # also distil the first child with each loss alone (paper's table)
    gkd_ablation_tokens: int = _f(32_768, "05_gkd")  # tokens per ablation run

    # ---- 06_evaluation: accuracy retained (lm-eval, local held-out tasks) and measured speed -----
    # Sample counts set the stage's time: every model answers every sample (4 choices, plus 4
    # context-free scores for next-line), so they are sized for ~3-4 min on 2 cores by default.
    eval_next_line_samples: int = _f(150, "06_evaluation")  # "which line comes next" 4-way samples (chance 0.25)
    eval_name_samples: int = _f(150, "06_evaluation")  # "which name comes next" 4-way samples (chance 0.25)
    eval_bpb_chunks: int = _f(24, "06_evaluation")  # held-out chunks scored for bits per byte
    eval_bpb_chunk_bytes: int = _f(1024, "06_evaluation")  # max bytes per bits-per-byte chunk (cut at line ends)
    eval_context_lines: int = _f(4, "06_evaluation")  # preceding lines shown as context in the choice tasks
    eval_batch_size: int = _f(16, "06_evaluation")  # lm-eval batch size (memory vs speed; same numbers)
    eval_before_gkd: str = _f("best", "06_evaluation", ("none", "best", "mip", "all"))  # children also evaluated straight from the BLD library: best MIP, every MIP, all, or none
    eval_hf_tasks: str = _f("", "06_evaluation")  # standard lm-eval tasks too, e.g. "mmlu,hellaswag,arc_easy" (needs network or a filled HF cache)
    eval_hf_limit: int = _f(0, "06_evaluation")  # samples per standard task; 0 = all
    eval_speed_rounds: int = _f(4, "06_evaluation")  # interleaved throughput rounds over all models (median)
    eval_speed_warmup: int = _f(1, "06_evaluation")  # untimed rounds before them
    eval_calibration_bins: int = _f(10, "06_evaluation")  # equal-width confidence bins of the ECE
    eval_bootstrap: int = _f(1000, "06_evaluation")  # paired bootstrap resamples for retention intervals; 0 = none

    # ------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        # Coerce first (1 -> 1.0 for floats, 2e6 -> 2000000 for ints) so the canonical JSON, and
        # therefore the hash, does not depend on how a number was spelled.
        errors = []
        hints = _field_types()
        for f in dataclasses.fields(self):
            value, error = _coerce(f.name, getattr(self, f.name), hints[f.name])
            if error:
                errors.append(error)
            else:
                object.__setattr__(self, f.name, value)
        if not errors:
            errors = _range_errors(self)
        if errors:
            raise ConfigError("invalid run config:\n  - " + "\n  - ".join(errors))

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_preset(
        cls, preset: str = "default", overrides: dict | None = None, run_name: str | None = None
    ) -> "RunConfig":
        """Defaults <- PRESETS[preset] <- overrides <- run_name. run_name defaults to the preset
        name, so `--preset smoke` and `--preset default` never share a run directory."""
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}{_suggest(preset, PRESETS)}. "
                              f"Available presets: {', '.join(PRESETS)}.")
        overrides = dict(overrides or {})
        _check_keys(overrides, "overrides")
        if "preset" in overrides:
            raise ConfigError("'preset' cannot be overridden: pass it as the preset argument "
                              "(--preset NAME on the command line).")
        values = {**PRESETS[preset], **overrides, "preset": preset}
        if run_name is not None:
            values["run_name"] = run_name
        values.setdefault("run_name", preset)
        return cls(**values)

    def replace(self, **changes: Any) -> "RunConfig":
        """A validated copy with some fields changed."""
        _check_keys(changes, "replace()")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """Strict: unknown keys and wrong types are refused. Missing keys take their defaults,
        so a config.json written before a field existed still loads."""
        if not isinstance(d, dict):
            raise ConfigError(f"a run config must be a JSON object / dict, got {type(d).__name__}")
        _check_keys(d, "config")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        # Imported here: rundir imports this module, and the atomic helpers live there.
        from .rundir import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON ({e}); fix or delete it"
                              ) from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    # ---- stages and hashing --------------------------------------------------------------------
    @classmethod
    def fields_for(cls, stage: str) -> list[str]:
        """Names of the fields tagged with exactly this stage tag."""
        _check_stage(stage)
        return [f.name for f in dataclasses.fields(cls) if f.metadata["stage"] == stage]

    def hashed_values(self, stage: str | None = None) -> dict[str, Any]:
        """The field values `hash(stage)` covers: the stage's own fields plus the "data" fields
        (every stage reads the data); for None, every field not tagged "run"."""
        if stage is None:
            names = [f.name for f in dataclasses.fields(self) if f.metadata["stage"] != "run"]
        else:
            _check_stage(stage)
            if stage == "run":
                raise ConfigError("'run' fields affect nothing cached and have no hash")
            names = self.fields_for("data") + ([] if stage == "data" else self.fields_for(stage))
        return {name: getattr(self, name) for name in names}

    def hash(self, stage: str | None = None) -> str:
        """16 hex chars of sha256 over the canonical JSON of `hashed_values(stage)`."""
        blob = json.dumps(self.hashed_values(stage), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def summary(self) -> str:
        """Human-readable listing grouped by stage tag, with each group's hash."""
        lines = []
        for tag in STAGE_TAGS:
            names = self.fields_for(tag)
            if not names:
                continue
            extra = "" if tag == "run" else f"   (hash {self.hash(tag)})"
            lines.append(f"[{tag}]{extra}")
            width = max(map(len, names))
            lines += [f"  {n:<{width}} = {getattr(self, n)!r}" for n in names]
        return "\n".join(lines)


# ---- presets: overrides on the defaults above ---------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    # CI and tests: the whole pipeline in a few minutes on 2 CPU cores. The ~0.23M-parameter
    # parent trains at ~57k tok/s in fp32 on 2 cores (bf16 autocast is *slower* at this size),
    # so 2M tokens (~980 steps) is ~35 s here and under a minute on a slower machine.
    "smoke": dict(
        # One thread: this model's matrices are too small to gain from two, and a second thread
        # spinning against any other busy process makes every step several times slower.
        threads=1,
        corpus_max_bytes=1_500_000, tokenizer_train_bytes=500_000, vocab_size=512, seq_len=64,
        parent_hidden_size=64, parent_num_layers=4, parent_num_heads=4, parent_num_kv_heads=2,
        parent_intermediate_size=192, parent_train_tokens=2_000_000, parent_batch_size=32,
        parent_lr=3e-3, parent_warmup_steps=30, parent_autocast_bf16=False,
        parent_eval_every=100, parent_eval_tokens=16_384, parent_checkpoint_every=200,
        # 01_profiling in seconds: small scenarios, few repeats, a handful of children.
        profile_batch_sizes="1,4", profile_prompt_len=32, profile_gen_len=16, profile_warmup=1,
        profile_repeats=5, profile_num_random_children=4, profile_clock="cpu",
        # 02_bld: a smaller FFN menu, 64k tokens per block (64 steps of 16x64): 44 blocks in
        # ~8 s on one core. 5e-3 beat 2e-3 and 1e-3 on every variant at this budget.
        bld_ffn_fractions="1.0,0.75,0.5,0.25,0.1", bld_tokens_per_variant=65_536,
        bld_batch_size=16, bld_lr=5e-3, bld_calib_tokens=16_384, bld_eval_tokens=8_192,
        bld_eval_every=8, bld_autocast_bf16=False,
        # 05_gkd: a few steps per child, fp32 (bf16 autocast is slower at this size).
        gkd_tokens=32_768, gkd_batch_size=16, gkd_lr=1e-3, gkd_autocast_bf16=False,
        gkd_eval_every=8, gkd_eval_tokens=4_096, gkd_checkpoint_every=8, gkd_ablation_tokens=16_384,
        # 03_scoring: 72 candidates x 4096 tokens in ~5 s on one core.
        scoring_interaction_children=6, scoring_naive_check=4,
        # 06_evaluation in seconds: few samples, short contexts (seq_len 64), two speed rounds.
        eval_next_line_samples=48, eval_name_samples=48, eval_bpb_chunks=8, eval_bpb_chunk_bytes=512,
        eval_context_lines=4, eval_speed_rounds=2, eval_bootstrap=200,
    ),
    # The workshop run on a laptop CPU: the defaults (a 6.8M-parameter parent, 2M tokens: ~6 min
    # of training at the 5.7k tok/s measured with bf16 autocast on 2 cores, ~10 min at 3.5k).
    # profile_clock="cpu": one thread's CPU time, so the cost table does not depend on what else
    # the laptop or the shared workshop server runs meanwhile (see notebook 01).
    "default": dict(profile_clock="cpu"),
    # A real Llama parent on one GPU. Needs network access (or a populated HF cache) for the
    # parent and the dataset; the parent_* shape/training fields do not apply.
    "gpu-llama-3.2-1b": dict(
        parent="meta-llama/Llama-3.2-1B", device="cuda", dtype="bfloat16", seq_len=2048,
        corpus="hf:HuggingFaceFW/fineweb-edu:sample-10BT", corpus_max_bytes=1_000_000_000,
        # 16 sequences of 2048; batches of 2 keep the fp32 log-softmax over 128k tokens small.
        scoring_tokens=32_768, scoring_batch_size=2,
        profile_batch_sizes="1,16", profile_prompt_len=512, profile_gen_len=256,
        profile_repeats=20,
        eval_next_line_samples=1000, eval_name_samples=1000, eval_bpb_chunks=200, eval_bpb_chunk_bytes=4096,
        eval_context_lines=12, eval_batch_size=32, eval_before_gkd="mip",
        eval_hf_tasks="mmlu,hellaswag,arc_easy",
        # 02_bld: 2M tokens per block (128 steps of 8x2048); the three activation streams take
        # 3 x 2M x 2048 x 2 B = 24 GB of GPU memory (set bld_activations_on_disk=true if short).
        bld_tokens_per_variant=2_097_152, bld_batch_size=8, bld_lr=2e-4, bld_eval_every=32,
        bld_calib_tokens=1_048_576, bld_eval_tokens=131_072,
    ),
}


# ---- command-line values ------------------------------------------------------------------------
def project_root(cwd: Path | None = None) -> Path:
    """The folder that relative paths in a config (``runs_root``, ``reports_root``, a local corpus or
    parent, ``profile_costs_from``) are relative to: the project folder holding ``notebooks/``.
    JupyterLab starts a notebook's kernel in the notebook's own folder, so from ``notebooks/`` or
    ``student/`` that is the folder above; anywhere else it is the current directory."""
    cwd = Path.cwd() if cwd is None else Path(cwd)
    if (cwd / "notebooks").is_dir():
        return cwd
    if cwd.name in ("notebooks", "student") and (cwd.parent / "notebooks").is_dir():
        return cwd.parent
    return cwd


def resolve_path(path: str | Path) -> Path:
    """``path`` made absolute against :func:`project_root` (``~`` expanded)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_root() / p


def parse_set_args(args: list[str] | None) -> dict[str, Any]:
    """["seq_len=128", "force=yes"] -> {"seq_len": 128, "force": True}, typed per field."""
    out: dict[str, Any] = {}
    types_ = _field_types()
    for arg in args or []:
        key, sep, text = arg.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {arg!r} (e.g. --set seq_len=128)")
        _check_keys({key}, "--set")
        base, optional = _unwrap(types_[key])
        if optional and text.strip().lower() in ("none", "null"):
            out[key] = None
            continue
        try:
            out[key] = _parse_text(text.strip(), base)
        except ValueError:
            raise ConfigError(f"--set {arg}: {key} expects {_type_word(base)}, got {text!r}"
                              ) from None
    return out


def _parse_text(text: str, base: type) -> Any:
    if base is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(text)
    if base is int:
        try:
            return int(text)  # accepts 2_000_000
        except ValueError:
            f = float(text)  # accepts 2e6, refuses 2.5 below
            if not f.is_integer():
                raise
            return int(f)
    if base is float:
        return float(text)
    return text


# ---- validation helpers -------------------------------------------------------------------------
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(RunConfig)


def _unwrap(hint: Any) -> tuple[type, bool]:
    """`int | None` -> (int, True); `int` -> (int, False)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _type_word(base: type) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        base, base.__name__)


def _coerce(name: str, value: Any, hint: Any) -> tuple[Any, str | None]:
    base, optional = _unwrap(hint)
    if value is None and optional:
        return None, None
    bad = f"{name} expects {_type_word(base)}, got {value!r} ({type(value).__name__})"
    if base is bool:
        return (value, None) if isinstance(value, bool) else (None, bad)
    if isinstance(value, bool):  # bool is an int subclass; True is not a seq_len
        return None, bad
    if base is int:
        if isinstance(value, int):
            return value, None
        if isinstance(value, float) and value.is_integer():
            return int(value), None
        return None, bad
    if base is float:
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value), None
        return None, bad
    if base is str:
        return (value, None) if isinstance(value, str) else (None, bad)
    raise TypeError(f"RunConfig.{name}: unsupported field type {hint!r}; extend _coerce")


def _range_errors(c: RunConfig) -> list[str]:
    """Every out-of-range value, each with the fix. Checked after types are known good."""
    e: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            e.append(msg)

    for f in dataclasses.fields(c):
        choices = f.metadata.get("choices")
        value = getattr(c, f.name)
        if choices and value not in choices:
            e.append(f"{f.name} must be one of {', '.join(map(repr, choices))}, got {value!r}"
                     f"{_suggest(str(value), choices)}")
    need(re.fullmatch(RUN_NAME_PATTERN, c.run_name) is not None,
         f"run_name {c.run_name!r} is not a safe folder name: use 1-64 of A-Z a-z 0-9 . _ - "
         "starting with a letter or digit (no '/', no spaces), e.g. run_name='smoke-2'")
    need(c.preset in PRESETS, f"preset {c.preset!r} is unknown{_suggest(c.preset, PRESETS)}; "
         f"available presets: {', '.join(PRESETS)}")
    need(bool(c.runs_root.strip()), "runs_root must not be empty (default 'runs')")
    need(bool(c.reports_root.strip()), "reports_root must not be empty (default 'reports')")
    need(0 <= c.seed < 2**32, f"seed must be in [0, 2**32) (numpy's limit), got {c.seed}")
    need(c.threads >= 0, f"threads must be >= 0 (0 = torch default), got {c.threads}")
    e += _corpus_errors(c.corpus)
    need(c.corpus_max_bytes > 0, f"corpus_max_bytes must be > 0, got {c.corpus_max_bytes}")
    need(c.tokenizer_train_bytes > 0,
         f"tokenizer_train_bytes must be > 0, got {c.tokenizer_train_bytes}")
    need(0 < c.heldout_fraction < 1,
         f"heldout_fraction must be strictly between 0 and 1, got {c.heldout_fraction} (e.g. 0.05)")
    need(c.vocab_size >= MIN_VOCAB_SIZE, f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 byte tokens "
         f"+ special tokens), got {c.vocab_size}")
    need(c.seq_len >= 2,
         f"seq_len must be >= 2 (an input and a next-token target), got {c.seq_len}")
    need(bool(c.parent.strip()), "parent must be 'embedded', a local HF directory or a hub id")
    for name in ("gkd_tokens", "gkd_batch_size", "gkd_grad_accum", "gkd_ablation_tokens", "gkd_eval_tokens"):
        need(getattr(c, name) > 0, f"{name} must be > 0, got {getattr(c, name)} (the GKD budget is in "
             "tokens per child, e.g. gkd_tokens=262144)")
    need(c.gkd_lr > 0, f"gkd_lr must be > 0, got {c.gkd_lr}")
    need(min(c.gkd_cos_weight, c.gkd_kl_weight, c.gkd_lm_weight) >= 0
         and c.gkd_cos_weight + c.gkd_kl_weight + c.gkd_lm_weight > 0,
         "gkd_cos_weight, gkd_kl_weight and gkd_lm_weight must be >= 0 and not all 0")
    need(c.gkd_batch_size % max(c.gkd_grad_accum, 1) == 0,
         f"gkd_batch_size ({c.gkd_batch_size}) must be divisible by gkd_grad_accum ({c.gkd_grad_accum})")
    for name in ("parent_hidden_size", "parent_num_layers", "parent_num_heads",
                 "parent_num_kv_heads", "parent_intermediate_size", "parent_batch_size",
                 "parent_eval_every", "parent_eval_tokens"):
        need(getattr(c, name) > 0, f"{name} must be > 0, got {getattr(c, name)}")
    if c.parent_num_heads > 0 and c.parent_num_kv_heads > 0:
        need(c.parent_num_heads % c.parent_num_kv_heads == 0,
             f"parent_num_heads ({c.parent_num_heads}) must be a multiple of parent_num_kv_heads "
             f"({c.parent_num_kv_heads}): GQA shares each KV head by a whole group of query heads")
    if c.parent_num_heads > 0 and c.parent_hidden_size > 0:
        head_dim, rem = divmod(c.parent_hidden_size, c.parent_num_heads)
        need(rem == 0, f"parent_hidden_size ({c.parent_hidden_size}) must be divisible by "
             f"parent_num_heads ({c.parent_num_heads})")
        need(rem != 0 or head_dim % 2 == 0, f"head dim parent_hidden_size/parent_num_heads = "
             f"{head_dim} must be even (rotary embeddings rotate pairs of channels)")
    if c.parent == "embedded":
        step_tokens = c.parent_batch_size * c.seq_len
        need(c.parent_train_tokens >= step_tokens,
             f"parent_train_tokens ({c.parent_train_tokens}) must cover at least one step of "
             f"parent_batch_size*seq_len = {step_tokens} tokens")
    need(c.parent_lr > 0, f"parent_lr must be > 0, got {c.parent_lr}")
    need(0 <= c.parent_min_lr_ratio <= 1,
         f"parent_min_lr_ratio must be in [0, 1], got {c.parent_min_lr_ratio}")
    for name in ("parent_warmup_steps", "parent_weight_decay", "parent_grad_clip"):
        need(getattr(c, name) >= 0, f"{name} must be >= 0, got {getattr(c, name)}")
    need(c.parent_checkpoint_every >= 0,
         f"parent_checkpoint_every must be >= 0 (0 = never), got {c.parent_checkpoint_every}")
    need(re.fullmatch(r"\s*[1-9]\d*\s*(,\s*[1-9]\d*\s*)*", c.profile_batch_sizes) is not None,
         f"profile_batch_sizes must be comma-separated batch sizes >= 1, e.g. '1,8', got "
         f"{c.profile_batch_sizes!r}")
    for name in ("profile_prompt_len", "profile_gen_len", "profile_repeats",
                 "profile_num_random_children"):
        need(getattr(c, name) >= 1, f"{name} must be >= 1, got {getattr(c, name)}")
    need(c.profile_warmup >= 0, f"profile_warmup must be >= 0, got {c.profile_warmup}")
    e += _bld_errors(c)
    need(c.scoring_tokens >= c.seq_len, f"scoring_tokens must cover at least one sequence of "
         f"seq_len = {c.seq_len} tokens, got {c.scoring_tokens} (e.g. {max(4096, c.seq_len)})")
    need(c.scoring_batch_size >= 1, f"scoring_batch_size must be >= 1, got {c.scoring_batch_size}")
    need(c.scoring_interaction_children == 0 or c.scoring_interaction_children >= 3,
         f"scoring_interaction_children must be 0 (skip) or >= 3 (a correlation needs 3 points), "
         f"got {c.scoring_interaction_children}")
    need(0 <= c.scoring_interaction_seed < 2**32,
         f"scoring_interaction_seed must be in [0, 2**32), got {c.scoring_interaction_seed}")
    need(c.scoring_naive_check >= 0, f"scoring_naive_check must be >= 0, got {c.scoring_naive_check}")
    e += _search_errors(c)
    e += _eval_errors(c)
    return e


def _eval_errors(c: RunConfig) -> list[str]:
    """06_evaluation's checks (whether the held-out split has enough text is checked by tasks.py)."""
    e = [f"{n} must be >= 1, got {getattr(c, n)}" for n in (
        "eval_next_line_samples", "eval_name_samples", "eval_bpb_chunks", "eval_batch_size",
        "eval_speed_rounds", "eval_calibration_bins") if getattr(c, n) < 1]
    e += [f"{n} must be >= 0, got {getattr(c, n)}" for n in ("eval_hf_limit", "eval_speed_warmup", "eval_bootstrap")
          if getattr(c, n) < 0]
    if c.eval_bpb_chunk_bytes < 64:
        e.append(f"eval_bpb_chunk_bytes must be >= 64 (a few lines), got {c.eval_bpb_chunk_bytes}")
    if c.eval_context_lines < 2:
        e.append(f"eval_context_lines must be >= 2 (a context needs two non-blank lines), got {c.eval_context_lines}")
    return e


def _search_errors(c: RunConfig) -> list[str]:
    """04_search's checks (budgets against the cost table are checked by search.py)."""
    e = []
    for name in ("search_speedup", "search_min_tokens_per_s", "search_max_latency_ms",
                 "search_max_memory_mib", "search_max_params_ratio"):
        if getattr(c, name) < 0:
            e.append(f"{name} must be >= 0 (0 switches that budget off), got {getattr(c, name)}")
    for name, text, kind in (("search_batch_sizes", c.search_batch_sizes, int),
                             ("search_pareto_speedups", c.search_pareto_speedups, float)):
        try:
            vals = [kind(t) for t in text.replace(" ", "").split(",") if t]
            if any(v <= 0 for v in vals):
                raise ValueError
        except ValueError:
            e.append(f"{name} must be comma-separated positive numbers like '1,8', got {text!r}")
    if c.search_num_solutions < 1:
        e.append(f"search_num_solutions must be >= 1, got {c.search_num_solutions}")
    if not 0 < c.search_min_diff_fraction <= 1:
        e.append(f"search_min_diff_fraction must be in (0, 1], got {c.search_min_diff_fraction} (e.g. 0.2)")
    if c.search_time_limit_s <= 0:
        e.append(f"search_time_limit_s must be > 0, got {c.search_time_limit_s}")
    if not 0 <= c.search_mip_gap < 1:
        e.append(f"search_mip_gap must be in [0, 1), got {c.search_mip_gap} (e.g. 1e-6)")
    if c.search_influence_tokens < c.seq_len:
        e.append(f"search_influence_tokens must cover one sequence of seq_len = {c.seq_len} tokens, "
                 f"got {c.search_influence_tokens}")
    if c.search_random_tries < 0:
        e.append(f"search_random_tries must be >= 0, got {c.search_random_tries}")
    return e


def _bld_errors(c: RunConfig) -> list[str]:
    """02_bld's checks that need no parent (bld.plan checks the rest against the parent)."""
    e = []
    for name in ("bld_tokens_per_variant", "bld_batch_size", "bld_calib_tokens", "bld_eval_tokens"):
        if getattr(c, name) <= 0:
            e.append(f"{name} must be > 0, got {getattr(c, name)}"
                     + (" (every trained block needs a token budget, e.g. 262144)"
                        if name == "bld_tokens_per_variant" else ""))
    for name in ("bld_warmup_steps", "bld_weight_decay", "bld_grad_clip", "bld_eval_every"):
        if getattr(c, name) < 0:
            e.append(f"{name} must be >= 0, got {getattr(c, name)}")
    if not c.bld_lr > 0:
        e.append(f"bld_lr must be > 0, got {c.bld_lr}")
    if not 0 <= c.bld_min_lr_ratio <= 1:
        e.append(f"bld_min_lr_ratio must be in [0, 1], got {c.bld_min_lr_ratio}")
    items = lambda s: [t.strip() for t in s.split(",") if t.strip()]  # noqa: E731
    kv = [] if c.bld_kv_heads.strip() == "auto" else items(c.bld_kv_heads)
    if not all(t.isdigit() and int(t) > 0 for t in kv):
        e.append(f"bld_kv_heads must be 'auto' or comma-separated KV-head counts >= 1, e.g. "
                 f"'2,1', got {c.bld_kv_heads!r}")
    elif c.parent == "embedded" and c.parent_num_heads > 0:
        # The embedded parent's head count is known here; an HF parent's is checked by bld.plan.
        h = c.parent_num_heads
        bad = [t for t in kv if h % int(t)]
        if bad:
            e.append(f"bld_kv_heads={c.bld_kv_heads!r}: {', '.join(bad)} does not divide "
                     f"parent_num_heads={h} (GQA shares each KV head by a whole group of query "
                     f"heads); use divisors of {h}: {[d for d in range(1, h + 1) if h % d == 0]}")
    try:
        fr = [float(t) for t in items(c.bld_ffn_fractions)]
        if not all(0 < f <= 1 for f in fr):
            raise ValueError
    except ValueError:
        fr = []
        e.append(f"bld_ffn_fractions must be comma-separated fractions in (0, 1], e.g. "
                 f"'1.0,0.5,0.25', got {c.bld_ffn_fractions!r}")
    pairs = items(c.bld_coupled_pairs)
    if not all(re.fullmatch(r"attn:[a-z0-9.]+\+ffn:[a-z0-9.]+", p) for p in pairs):
        e.append(f"bld_coupled_pairs must be comma-separated 'attn:<variant>+ffn:<variant>' "
                 f"pairs, e.g. 'attn:kv1+ffn:0.50', got {c.bld_coupled_pairs!r}")
    if (c.bld_kv_heads.strip() != "auto" and not kv and not [f for f in fr if f < 1]
            and not c.bld_include_linear and not c.bld_include_noop and not pairs):
        e.append("the BLD variant list is empty (bld_kv_heads, bld_ffn_fractions, "
                 "bld_include_linear, bld_include_noop, bld_coupled_pairs select nothing but the "
                 "parent's own sub-blocks): select at least one variant, e.g. bld_kv_heads='auto'")
    return e


def _corpus_errors(corpus: str) -> list[str]:
    if corpus == "stdlib":
        return []
    if corpus.startswith("hf:"):
        parts = corpus[3:].split(":")
        if not parts[0] or len(parts) > 2 or (len(parts) == 2 and not parts[1]):
            return [f"corpus {corpus!r}: write a Hugging Face dataset as 'hf:<dataset>' or "
                    "'hf:<dataset>:<config>', e.g. 'hf:wikitext:wikitext-103-raw-v1'"]
        return []
    if not corpus.strip():
        return ["corpus must not be empty: use 'stdlib', a .txt/.jsonl file or folder, "
                "or 'hf:<dataset>'"]
    suffix = Path(corpus).suffix.lower()
    # No suffix: a folder (data.py reports a missing one). A suffix other than .txt/.jsonl on
    # something that is not an existing folder is almost surely an unsupported file type.
    if suffix and suffix not in (".txt", ".jsonl") and not Path(corpus).is_dir():
        return [f"corpus {corpus!r}: local corpora must be a .txt or .jsonl file (jsonl: one "
                "{\"text\": ...} per line) or a folder of them"]
    return []


def _suggest(word: str, options: Any) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(keys: Any, where: str) -> None:
    valid = [f.name for f in dataclasses.fields(RunConfig)]
    unknown = [k for k in keys if k not in valid]
    if unknown:
        parts = [f"{k!r}{_suggest(str(k), valid)}" for k in unknown]
        raise ConfigError(f"unknown config key(s) in {where}: {', '.join(parts)}. "
                          f"Valid keys: {', '.join(valid)}")


def _check_stage(stage: str) -> None:
    if stage not in STAGE_TAGS:
        raise ConfigError(f"unknown stage {stage!r}{_suggest(str(stage), STAGE_TAGS)}; "
                          f"stages: {', '.join(STAGE_TAGS)}")
