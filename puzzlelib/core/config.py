"""Run configuration: one `RunConfig` dataclass, its stage tags, load / save / hash.

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
Leaves out: the named presets (`presets.py`), the per-field type coercion and range checks
(`validation.py`), what the fields *mean* to the algorithms (each stage module reads its own
fields), and whether a local corpus path exists (that depends on the working directory the
notebooks run in; `data.py` checks it, and the runner checks it before starting any notebook).

Adding a field is one line in `RunConfig`, e.g.
    bld_lr: float = _f(3e-4, "02_bld")  # AdamW peak learning rate for each (layer, variant) job
plus, if it has a valid range, one line in `range_errors` (`validation.py`).

Strings from the command line (`--set key=value`) are converted by `parse_set_args` to the field's
type. Booleans there accept true/false, yes/no, on/off, 1/0 (any case). Values given in Python or
JSON (presets, `overrides` dicts, config.json) must already have the right type: a string "no"
for a bool field is refused, because in Python it would silently be truthy.
"""

import dataclasses
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json
from .presets import PRESETS
from .validation import coerce_value, range_errors, did_you_mean, type_word, auto_base, unwrap_optional

# The pipeline stages in execution order (rundir.STAGES is this as a list).
PIPELINE_STAGES = (
    "00_parent", "01_profiling", "02_bld", "03_scoring", "04_search", "05_gkd", "06_evaluation",
)
STAGE_TAGS = ("run", "data", *PIPELINE_STAGES)
DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("float32", "bfloat16", "float16")
_TRUE = {"true", "yes", "on", "1", "y", "t"}
_FALSE = {"false", "no", "off", "0", "n", "f"}


class ConfigError(ValueError):
    """A config value, key, preset or file is invalid; the message says what to change."""


def _f(default: Any, stage: str, choices: tuple | None = None, hash_default: bool = True) -> Any:
    """A dataclass field tagged with the stage it affects (and optionally its allowed values).
    ``hash_default=False`` for a field added after runs existed, whose default reproduces the old
    behaviour: it enters the stage hash only when set to something else, so existing runs stay fresh."""
    assert stage in STAGE_TAGS, f"unknown stage tag {stage!r}"
    meta: dict[str, Any] = {"stage": stage}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if not hash_default:
        meta["hash_default"] = False
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunConfig:
    # ---- run: names, paths, machine knobs; never part of a cache key ------------------------
    run_name: str = _f("default", "run")  # folder under runs_root/ and reports_root/ (safe name)
    preset: str = _f("default", "run")  # preset the values started from (recorded, not re-applied)
    runs_root: str = _f("runs", "run")  # where run dirs live; relative = to the project folder (the one holding notebooks/)
    reports_root: str = _f("reports", "run")  # where the runner writes executed notebooks + html
    # threads is tagged "01_profiling": wall-clock timings depend on it. "auto" = one thread per
    # two physical cores (1 on a 2-core laptop: two threads beside any other busy process made a
    # step several times slower; precision.py has the rule, benchmarks/bench_cpu.py the numbers).
    threads: int | str = _f("auto", "01_profiling")  # torch intra-op threads: "auto", 0 = torch default, or a count
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
    # The *_autocast_bf16 fields take true, false or "auto": bf16 autocast only where the device
    # runs bf16 natively AND a few-second probe of the stage's own training step measures it
    # faster (precision.py); without native bf16 (most laptop CPUs) an autocast step was 5-25x
    # slower than fp32 (more at larger widths). The choice and the probe's timings go to the
    # stage's manifest and to environment.json; the hash holds the setting, not the choice.
    parent_autocast_bf16: bool | str = _f("auto", "00_parent")  # bf16 autocast for training matmuls: true, false or "auto"
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
    # Tagged 01 (the first stage that sees variant widths); hash_default=False: at 8 every existing run
    # stays fresh. 256 keeps each narrower FFN on the grid NVIDIA's DeciLM code and vLLM read
    # (export.vllm_compatible says which children they can serve).
    ffn_width_multiple: int = _f(8, "01_profiling", (8, 256), hash_default=False)  # grid narrower SwiGLU widths are rounded to: 8, or 256 for vLLM / NVIDIA DeciLM

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
    bld_autocast_bf16: bool | str = _f("auto", "02_bld")  # bf16 autocast for block training: true, false or "auto" (targets and evaluation stay fp32)
    # How a linear replacement starts: "weights" = the product of the parent's own matrices (W_o·W_v,
    # W_down·W_up; on SmolLM2 these were 5-10x *worse* than dropping the sub-block, normalized MSE
    # 5.3 and 9.6 against 1.0); "lstsq" = the least-squares fit of the sub-block's output on its
    # normalized input over the block's own BLD batches (the best linear map on that data), then
    # trained like every block. hash_default=False: existing runs stay fresh.
    bld_linear_init: str = _f("weights", "02_bld", ("weights", "lstsq"), hash_default=False)  # start of attn/ffn:linear: "weights" (parent's matrix products) or "lstsq" (least squares on the BLD batches)
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
    # Added later (hash_default=False: at their defaults the stage hash, and so every existing run, is unchanged).
    search_min_diff_layers: int = _f(0, "04_search", hash_default=False)  # each solution differs from every earlier one in >= this many layers; 0 = use search_min_diff_fraction
    search_constraints: str = _f("", "04_search", hash_default=False)  # ranges on any cost-table statistic, e.g. "1e9<=params<=4e9, kv_heads>=40, decode_ms<=12" (own units; sums over blocks + fixed part)
    search_bigger_is_better: str = _f("auto", "04_search", ("auto", "true", "false"), hash_default=False)  # score direction; auto = from search_metric (top1_agreement: bigger; kl, losses: smaller)
    search_cross_check: bool = _f(True, "04_search", hash_default=False)  # re-solve each MIP with the other solver when available and keep the better verified child (mip.solve_checked)

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
    gkd_autocast_bf16: bool | str = _f("auto", "05_gkd")  # bf16 autocast for the forward passes: true, false or "auto"
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
    # Added later (hash_default=False: at their defaults every existing run stays fresh).
    eval_pareto: bool = _f(False, "06_evaluation", hash_default=False)  # also evaluate every child of stage 04's Pareto sweep (MIP, greedy, uniform, depth at each target) from the BLD library, with matched MIP - baseline intervals
    eval_fidelity_tokens: int = _f(0, "06_evaluation", hash_default=False)  # held-out tokens on which every model's KL to the parent and bits per byte are measured (paired per window); 0 = off

    # ------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        # Coerce first (1 -> 1.0 for floats, 2e6 -> 2000000 for ints) so the canonical JSON, and
        # therefore the hash, does not depend on how a number was spelled.
        errors = []
        hints = _field_types()
        for f in dataclasses.fields(self):
            value, error = coerce_value(f.name, getattr(self, f.name), hints[f.name])
            if error:
                errors.append(error)
            else:
                object.__setattr__(self, f.name, value)
        if not errors:
            errors = range_errors(self)
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
            raise ConfigError(f"unknown preset {preset!r}{did_you_mean(preset, PRESETS)}. "
                              f"Available presets: {', '.join(PRESETS)}.")
        overrides = parse_overrides(overrides)
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
        fields = {f.name: f for f in dataclasses.fields(self)}
        return {name: getattr(self, name) for name in names
                if fields[name].metadata.get("hash_default", True) or getattr(self, name) != fields[name].default}

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


def default_repo_root() -> Path:
    """The project folder (:func:`project_root`: the one holding notebooks/, also from inside
    notebooks/ or student/), else the checkout this package lives in."""
    root = project_root()
    return root if (root / "notebooks").is_dir() else Path(__file__).resolve().parents[2]


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
        base, optional = unwrap_optional(types_[key])
        if optional and text.strip().lower() in ("none", "null"):
            out[key] = None
            continue
        auto = auto_base(types_[key]) is not None
        if auto and text.strip().lower() == "auto":
            out[key] = "auto"
            continue
        try:
            out[key] = _parse_text(text.strip(), base)
        except ValueError:
            raise ConfigError(f"--set {arg}: {key} expects {type_word(base)}"
                              f"{' or auto' if auto else ''}, got {text!r}") from None
    return out


def parse_overrides(value: Any) -> dict[str, Any]:
    """`overrides` as a notebook or the API may get it: a dict; None; or a string, as papermill's
    `-p overrides '{"seq_len": 64}'` passes it: a JSON object, or `key=value[,key=value]` (typed
    like --set; a comma starts a new pair only before `name=`, so `bld_kv_heads=2,1` stays one).
    Anything else is refused saying which types are accepted."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return {}
        if text.startswith("{"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"overrides {value!r} is not a valid JSON object ({e.msg} at "
                                  f"character {e.pos}); write it like "
                                  '\'{"seq_len": 64, "search_speedup": 2.0}\'') from None
            return parse_overrides(parsed)
        pairs = re.split(r",(?=\s*[A-Za-z_][A-Za-z0-9_]*\s*=)", text)
        if not all("=" in p for p in pairs):
            raise ConfigError(f"overrides {value!r}: a string must be a JSON object "
                              '(\'{"seq_len": 64}\') or key=value pairs separated by commas '
                              "('seq_len=64,search_speedup=2')")
        return parse_set_args([p.strip() for p in pairs])
    raise ConfigError(f"overrides must be a dict (e.g. {{'seq_len': 64}}), a JSON object string "
                      "or a 'key=value[,key=value]' string; got "
                      f"{type(value).__name__} {value!r}")


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


# ---- field types and key / stage checks ---------------------------------------------------------
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(RunConfig)


def _check_keys(keys: Any, where: str) -> None:
    valid = [f.name for f in dataclasses.fields(RunConfig)]
    unknown = [k for k in keys if k not in valid]
    if unknown:
        parts = [f"{k!r}{did_you_mean(str(k), valid)}" for k in unknown]
        raise ConfigError(f"unknown config key(s) in {where}: {', '.join(parts)}. "
                          f"Valid keys: {', '.join(valid)}")


def _check_stage(stage: str) -> None:
    if stage not in STAGE_TAGS:
        raise ConfigError(f"unknown stage {stage!r}{did_you_mean(str(stage), STAGE_TAGS)}; "
                          f"stages: {', '.join(STAGE_TAGS)}")
