"""Per-field and cross-field checks of a `RunConfig`: type coercion, ranges, did-you-mean.

What it does: `coerce_value` converts a value to its field's declared type (1 -> 1.0 for floats,
2e6 -> 2000000 for ints) or says what type was expected; `range_errors` (with its per-stage
helpers `_bld_errors`, `_search_errors`, `_eval_errors` and `_corpus_errors`) lists every
out-of-range value with the fix; `did_you_mean` adds a "did you mean" to an unknown name.
`RunConfig.__post_init__` (`config.py`) calls them and raises one `ConfigError` for all errors.
`parse_ranges` reads `search_constraints` into `Range`s (the one grammar: the check here and
the search's constraint rows, `search/mip.py`, both use it; `RangeError` says how to write it).

Reads: nothing but the machine's memory size (`limits.memory_errors`: sizes that cannot fit
are refused up front, with the estimate) and the config's values (`_corpus_errors` asks whether a
path with an unknown suffix is a folder). Writes: nothing.
Leaves out: raising (the functions return error strings; `config.py` raises), unknown-key and
unknown-stage checks (`config.py`, they need the dataclass), and checks that need a parent or
an artifact (`bld.plan`, `search.py`, `eval_tasks.py`, `data.py`). `RunConfig` is not imported at
all, not even for type hints (`config.py` imports this module): the checks take any object with its
fields, annotated `Config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

from .limits import memory_errors
from .presets import PRESETS

# A `core.config.RunConfig`; named, not imported, so that config -> validation stays one-way.
Config = Any

# A byte-level BPE needs its 256 byte tokens plus the special tokens data.py adds (a handful:
# end-of-text, padding, ...); 8 slots of headroom keeps the check independent of the exact list.
MIN_VOCAB_SIZE = 256 + 8
# run_name becomes a directory under runs/ and reports/: no separators, no leading dot (so no
# "..", no hidden folders), short enough for every filesystem.
RUN_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"


def unwrap_optional(hint: Any) -> tuple[type, bool]:
    """`int | None` -> (int, True); `int` -> (int, False); `bool | str` (a field that also takes
    "auto", see `auto_base`) -> (bool, False)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = typing.get_args(hint)
        rest = [a for a in args if a is not type(None)]
        return rest[0], type(None) in args
    return hint, False


def auto_base(hint: Any) -> type | None:
    """For a field typed `X | str` (X not str), X: such a field takes an X or the string "auto"
    (decided at run time, e.g. `threads`, `parent_autocast_bf16`); None for any other field."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 2 and str in args:
            return next(a for a in args if a is not str)
    return None


def type_word(base: type) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        base, base.__name__)


def coerce_value(name: str, value: Any, hint: Any) -> tuple[Any, str | None]:
    auto = auto_base(hint)
    if auto is not None:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto", None
        got, error = (None, "not a string") if isinstance(value, str) else coerce_value(name, value, auto)
        if error:
            return None, (f"{name} expects {type_word(auto)} or 'auto', got {value!r} "
                          f"({type(value).__name__})")
        return got, None
    base, optional = unwrap_optional(hint)
    if value is None and optional:
        return None, None
    bad = f"{name} expects {type_word(base)}, got {value!r} ({type(value).__name__})"
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
    raise TypeError(f"RunConfig.{name}: unsupported field type {hint!r}; extend coerce_value")


def range_errors(c: Config) -> list[str]:
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
                     f"{did_you_mean(str(value), [str(x) for x in choices])}")  # choices may be ints
    need(re.fullmatch(RUN_NAME_PATTERN, c.run_name) is not None,
         f"run_name {c.run_name!r} is not a safe folder name: use 1-64 of A-Z a-z 0-9 . _ - "
         "starting with a letter or digit (no '/', no spaces), e.g. run_name='smoke-2'")
    need(c.preset in PRESETS, f"preset {c.preset!r} is unknown{did_you_mean(c.preset, PRESETS)}; "
         f"available presets: {', '.join(PRESETS)}")
    need(bool(c.runs_root.strip()), "runs_root must not be empty (default 'runs')")
    need(bool(c.reports_root.strip()), "reports_root must not be empty (default 'reports')")
    need(0 <= c.seed < 2**32, f"seed must be in [0, 2**32) (numpy's limit), got {c.seed}")
    need(c.threads == "auto" or c.threads >= 0,
         f"threads must be 'auto', 0 (torch default) or a count >= 1, got {c.threads}")
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
    if not e:  # the memory estimate assumes every size is in range
        e += memory_errors(c)
    return e


def _eval_errors(c: Config) -> list[str]:
    """06_evaluation's checks (whether the held-out split has enough text is checked by eval_tasks.py)."""
    e = [f"{n} must be >= 1, got {getattr(c, n)}" for n in (
        "eval_next_line_samples", "eval_name_samples", "eval_bpb_chunks", "eval_batch_size",
        "eval_speed_rounds", "eval_calibration_bins") if getattr(c, n) < 1]
    e += [f"{n} must be >= 0, got {getattr(c, n)}" for n in ("eval_hf_limit", "eval_speed_warmup", "eval_bootstrap",
                                                          "eval_fidelity_tokens")
          if getattr(c, n) < 0]
    if 0 < c.eval_fidelity_tokens < c.seq_len:
        e.append(f"eval_fidelity_tokens must be 0 (off) or at least seq_len={c.seq_len} (one window), "
                 f"got {c.eval_fidelity_tokens}")
    if c.eval_bpb_chunk_bytes < 64:
        e.append(f"eval_bpb_chunk_bytes must be >= 64 (a few lines), got {c.eval_bpb_chunk_bytes}")
    if c.eval_context_lines < 2:
        e.append(f"eval_context_lines must be >= 2 (a context needs two non-blank lines), got {c.eval_context_lines}")
    return e


def _search_errors(c: Config) -> list[str]:
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
    if c.search_min_diff_layers < 0:
        e.append("search_min_diff_layers must be >= 0 (0 = use search_min_diff_fraction), "
                 f"got {c.search_min_diff_layers}")
    try:
        parse_ranges(c.search_constraints)
    except RangeError as err:
        e.append(str(err))
    return e


def _bld_errors(c: Config) -> list[str]:
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


def did_you_mean(word: str, options: Any) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---- search_constraints: its grammar (search/mip.py turns each Range into a constraint row) -------
class RangeError(ValueError):
    """``search_constraints`` cannot be read; the message says how to write it."""


@dataclasses.dataclass(frozen=True)
class Range:
    """``lo ≤ Σ stat ≤ hi`` over the child's blocks plus the fixed part; None leaves a side open.
    ``stat``: any cost-table statistic (``Problem.stats``), e.g. params, weight_bytes,
    kv_bytes_per_token, kv_heads, decode_ms (at the batch solved) or decode_ms@b8, memory_bytes."""

    stat: str
    lo: float | None = None
    hi: float | None = None

    def __str__(self) -> str:
        return "".join([f"{self.lo:g} <= " if self.lo is not None else "", self.stat,
                        f" <= {self.hi:g}" if self.hi is not None else ""])


_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_RANGE = re.compile(rf"(?:(?P<lo>{_NUM})<=)?(?P<stat>[A-Za-z_][\w@.]*)(?:(?P<op><=|>=)(?P<v>{_NUM}))?")


def parse_ranges(text: str) -> tuple[Range, ...]:
    """``"params<=4e9, 1e9<=weight_bytes<=2e9, kv_heads>=40"`` -> :class:`Range` s (``,`` or ``;``
    between items; values in the statistic's own unit: parameters, bytes, ms, heads)."""
    out = []
    for item in re.split(r"[;,]", text):
        item = item.replace(" ", "")
        if not item:
            continue
        m = _RANGE.fullmatch(item)
        if not m or (m["lo"] is None and m["op"] is None) or (m["lo"] is not None and m["op"] == ">="):
            raise RangeError(f"search_constraints: cannot read {item!r}; write 'stat<=x', 'stat>=x' or "
                              "'lo<=stat<=hi', e.g. 'params<=4e9, 1e9<=weight_bytes<=2e9'")
        lo = float(m["lo"]) if m["lo"] is not None else (float(m["v"]) if m["op"] == ">=" else None)
        hi = float(m["v"]) if m["op"] == "<=" else None
        if lo is not None and hi is not None and lo > hi:
            raise RangeError(f"search_constraints: {item!r} has its lower bound above its upper bound")
        out.append(Range(m["stat"], lo, hi))
    return tuple(out)
