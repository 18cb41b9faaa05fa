"""Stage 01 — profiling: what every sub-block variant costs on the device that will serve the child.

Puzzle is hardware-aware: the search (stage 04) picks one attention and one FFN variant per layer
under budgets of memory, latency and throughput, so it needs each variant's *measured* cost on the
target device. This module measures it and checks the assumption the search rests on: that a
child's cost is the sum of its sub-blocks' costs plus a fixed part.

What it does:
* lists the block library for the parent (``blocks.list_library`` with its defaults: every GQA
  KV-head count up to the parent's, the paper's FFN widths, linear and no-op replacements) and
  groups layers whose variants have identical shapes (every layer of a Llama parent): only one
  representative layer per group is timed, and its row is copied to the others
  (``measured_on_layer`` says which layer was timed);
* for every (layer, variant): parameters, weight bytes at the run's dtype, KV-cache bytes per
  token, and the time of the sub-block *in isolation* — ``layer.attn_residual`` /
  ``layer.ffn_residual`` (sub-block + pre-norm + residual add, the code the full model runs) of a
  one-layer model holding just that variant (weights initialised from the parent), on random
  hidden states — for **prefill** (batch × prompt tokens, causal, writing a fresh KV cache) and
  for one **decode** step (batch × 1 token against a KV cache already holding
  ``prompt_len + gen_len // 2`` tokens: attention cost grows linearly with the context, so the
  mid-generation step is the average step of the whole generation);
* the **fixed part** (embeddings, rotary tables, final norm, LM head and the per-layer Python
  skeleton) is measured as a whole model: the child whose every sub-block is a no-op. Its time,
  minus the (tiny) isolated no-op times, is the fixed row, so the decomposition is exact for that
  child by construction;
* timing: ``torch.inference_mode``, warm-up calls, then ``repeats`` rounds in which every bench of
  a (batch, phase) runs once in a freshly shuffled order (*interleaved*: a slow spell of a noisy
  machine hits every variant alike instead of whichever happened to run then), ``cuda.synchronize``
  around each sample on GPU; the median and the p10 / p90 of the samples are recorded. The clock
  is ``profile_clock``: "wall" (elapsed time) or "cpu" (one thread's CPU time, which other
  processes on a shared machine cannot inflate);
* decode is memory-bound, so its time depends on whether the weights are still in the CPU/GPU
  cache. Inside a model the other layers evict them between two uses; alone, a sub-block would
  find them hot. So each timed decode call is preceded by untimed calls of copies of the same
  sub-block on other weights, touching as many bytes as one decode step of the parent (capped at
  twice the last-level cache): the weights are reused at the distance they have in the parent,
  while the code path stays as hot as in a forward pass (which a cache flush would not give);
* **additivity check**: random children drawn from the library (seeded) plus the parent, built
  with ``blocks.build_child``, run end to end (prefill; decode step with a real KV cache; a real
  cache filled to prompt + generation length for memory) interleaved with each other; predicted
  (sum of the table) vs measured, as absolute error and as the error of the speed-up versus the
  parent (the quantity the search's throughput constraint actually uses).

* **importing a table** (``profile_costs_from``): instead of measuring, take the cost table of
  an earlier run (checked against this parent, library, scenarios, dtype and statistic; its path
  and sha256 are recorded). Timings differ between two runs, so two measured tables can make the
  search pick different children; runs sharing one table (a rerun, every laptop of a workshop,
  runs profiled once on the target GPU) find the same children. The additivity check still
  measures here.

Reads: ``runs/<run>/00_parent/model`` via ``parent.load(cfg)``. Writes ``runs/<run>/01_profiling/``:
``costs.csv`` (the cost table the search reads, one row per (layer, variant) plus the fixed row,
layer -1), ``additivity.csv`` (one row per (child, batch size)), ``samples.json`` (every raw timing
sample), ``scenarios.json`` (scenarios, device, threads, dtype, clock, timing method, machine load)
and ``metrics.json`` (the headline errors). Stage 04 reads the table through :func:`load_costs` and
re-measures its chosen children with :func:`measure_models`. Leaves out: serving engines
(vLLM/TensorRT-LLM kernels would give other numbers: profile on the engine you deploy with),
``torch.compile`` / CUDA graphs, peak activation memory (only weights + KV cache are modelled, as
in the paper), energy, and variants outside ``blocks.list_library``'s defaults
(``profile_model(..., library=...)`` measures others).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import random
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm  # plain text bars: tqdm.auto needs ipywidgets in Jupyter

from . import parent as parent_stage
from .blocks import Variant, VariantError, build_child, init_variant, list_library, parse_variant
from .config import RunConfig, resolve_path
from .model import PuzzleCache, PuzzleConfig, PuzzleForCausalLM
from .modeling_decilm import PuzzleModel
from .rundir import RunDir, atomic_write_json, atomic_write_text, file_sha256, read_csv_rows

STAGE = "01_profiling"
SUB_BLOCKS = ("attn", "ffn")
# Metrics that do not depend on the scenario, and those measured per batch size.
STATIC_METRICS = ("params", "weight_bytes", "kv_bytes_per_token")
TIMED_METRICS = ("prefill_ms", "decode_ms")
PHASES = ("prefill", "decode")
# How a bench's samples become one number. Noise from other processes only ever adds time, and
# it hits a long call more often than a short one: see the notebook for what each choice does.
STATISTICS = ("median", "p10", "min")
FIXED = "fixed"
# On CUDA one sample is a loop of calls lasting at least this long, so that a kernel launch queue
# and the synchronisation around the sample do not dominate a sub-millisecond sub-block. On CPU a
# sample is one call: perf_counter resolves well below the ~10 µs of the smallest real sub-block,
# and a single call sees the caches as the full model does (see the notebook's discussion).
CUDA_MIN_SAMPLE_MS = 1.0
MAX_INNER = 1000
# Decode benches cycle through at most this many copies of a sub-block (see `rotating`), and
# assume this last-level cache when the device does not report one.
MAX_COPIES = 256
ROTATION_CYCLES = 2
DEFAULT_CACHE_BYTES = 32 * 1024 ** 2


class ProfilingError(ValueError):
    """A profiling request that cannot be measured; the message says what to change."""


# ------------------------------------------------------------------------------ scenarios

@dataclass(frozen=True)
class Scenario:
    """One serving scenario: ``batch`` sequences, ``prompt_len`` prompt tokens, ``gen_len`` new
    tokens each."""

    batch: int
    prompt_len: int
    gen_len: int

    @property
    def key(self) -> str:
        """Column suffix in the cost table: ``b8`` -> ``prefill_ms@b8``."""
        return f"b{self.batch}"

    @property
    def decode_context(self) -> int:
        """Tokens in the KV cache for the measured decode step (the average step's context)."""
        return self.prompt_len + self.gen_len // 2

    @property
    def total_len(self) -> int:
        """Tokens per sequence at the end of generation: what the KV cache must hold."""
        return self.prompt_len + self.gen_len

    def check(self, max_positions: int | None = None) -> None:
        if self.batch <= 0:
            raise ProfilingError(f"batch size must be >= 1, got {self.batch}: fix profile_batch_sizes")
        if self.prompt_len <= 0:
            raise ProfilingError(f"prompt length must be >= 1, got {self.prompt_len}: "
                                 "fix profile_prompt_len")
        if self.gen_len <= 0:
            raise ProfilingError(f"generation length must be >= 1 (decode needs a new token), got "
                                 f"{self.gen_len}: fix profile_gen_len")
        if max_positions is not None and self.total_len > max_positions:
            raise ProfilingError(
                f"scenario prompt_len + gen_len = {self.prompt_len} + {self.gen_len} = "
                f"{self.total_len} tokens exceeds the model's max_position_embeddings="
                f"{max_positions}: lower profile_prompt_len / profile_gen_len so they sum to at "
                f"most {max_positions}")


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,8"`` -> ``[1, 8]`` (sorted, unique); refuses anything but positive integers."""
    try:
        sizes = [int(t) for t in str(text).replace(" ", "").split(",") if t]
    except ValueError:
        raise ProfilingError(f"profile_batch_sizes must be comma-separated integers like '1,8', "
                             f"got {text!r}") from None
    if not sizes or min(sizes) <= 0:
        raise ProfilingError(f"profile_batch_sizes must list batch sizes >= 1 like '1,8', got {text!r}")
    return sorted(set(sizes))


def scenarios_from_config(cfg: RunConfig, max_positions: int | None = None) -> list[Scenario]:
    """One scenario per batch size in ``cfg.profile_batch_sizes``, checked against the model."""
    out = [Scenario(b, cfg.profile_prompt_len, cfg.profile_gen_len)
           for b in parse_batch_sizes(cfg.profile_batch_sizes)]
    for s in out:
        s.check(max_positions)
    return out


def resolve_device(name: str) -> torch.device:
    """'cpu' | 'cuda' | 'auto' (cuda when available) -> a torch.device; clear errors otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (isinstance(name, str) and name.startswith("cuda:")):
        if not torch.cuda.is_available():
            raise ProfilingError(
                f"device={name!r} but torch sees no CUDA device (torch {torch.__version__}, built "
                f"with CUDA {torch.version.cuda}): set device='cpu' or 'auto', or run on a GPU "
                "machine with a CUDA build of torch")
        return torch.device(name)
    raise ProfilingError(f"unknown device {name!r}: use 'cpu', 'cuda' or 'auto'")


# ------------------------------------------------------------------------------ timing

@dataclass
class Timing:
    """Samples (ms per call) of one bench and their summary."""

    samples: list[float]
    inner: int = 1

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    @property
    def p10(self) -> float:
        return float(np.percentile(self.samples, 10))

    @property
    def p90(self) -> float:
        return float(np.percentile(self.samples, 90))

    def stat(self, statistic: str) -> float:
        """``median`` | ``p10`` | ``min`` of the samples."""
        _check_statistic(statistic)
        return {"median": np.median, "p10": lambda x: np.percentile(x, 10), "min": np.min
                }[statistic](self.samples).item()


def _check_statistic(statistic: str) -> None:
    if statistic not in STATISTICS:
        raise ProfilingError(f"unknown statistic {statistic!r}: use one of {', '.join(STATISTICS)}")


@dataclass
class Bench:
    """A callable to time. ``prepare()`` runs outside the timed region and returns the argument
    of ``fn`` (e.g. a fresh or restored KV cache), so set-up never counts as runtime."""

    fn: Callable[[Any], Any]
    prepare: Callable[[], Any] = lambda: None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# "wall": elapsed time, what a dedicated device delivers. "cpu": CPU time of this process, which
# does not run while another process holds the core, so a shared machine's load leaves it alone;
# it equals elapsed time only for single-threaded CPU work (checked in `check_clock`).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def check_clock(clock: str, device: torch.device, threads: int | None = None) -> None:
    """Refuse a clock that would not measure runtime on this device / thread count."""
    if clock not in CLOCKS:
        raise ProfilingError(f"unknown profile_clock {clock!r}: use 'wall' or 'cpu'")
    if clock == "cpu" and device.type != "cpu":
        raise ProfilingError("profile_clock='cpu' times CPU work only; on a GPU set "
                             "profile_clock='wall' (the kernels run asynchronously on the device)")
    threads = torch.get_num_threads() if threads is None else threads
    if clock == "cpu" and threads != 1:
        raise ProfilingError(
            f"profile_clock='cpu' needs one intra-op thread (CPU time of {threads} threads is not "
            "runtime, and idle OpenMP threads spin): set threads=1, or profile_clock='wall'")


def _sample(b: Bench, inner: int, device: torch.device, clock: str = "wall") -> float:
    args = [b.prepare() for _ in range(inner)]
    now = CLOCKS[clock]
    _sync(device)
    t0 = now()
    for a in args:
        b.fn(a)
    _sync(device)
    return (now() - t0) * 1e3 / inner


def rotating(benches: list[Bench]) -> Bench:
    """Time ``benches[0]`` with the cache state it has inside a forward pass.

    Before each timed call, ``benches[0]`` runs once untimed and then every other bench (copies
    of the same sub-block on their own weights) runs untimed: when the timed call starts, its
    weights were last touched that many bytes ago — as inside a real forward, where the rest of
    the model runs between two uses of one layer. The code path (Python, dispatcher, kernels)
    stays hot, exactly as it does in a forward pass, which a cache flush would not give.
    """
    if len(benches) == 1:
        return benches[0]
    first = benches[0]

    def prepare():
        for _ in range(ROTATION_CYCLES):
            for b in benches:
                b.fn(b.prepare())
        return first.prepare()

    return Bench(first.fn, prepare)


def warm_step(b: Bench) -> Bench:
    """``b`` timed right after one untimed call of itself: a whole model in steady-state decoding,
    where the previous step has just run (rather than whatever the interleaved benches left)."""
    def prepare():
        b.fn(b.prepare())
        return b.prepare()

    return Bench(b.fn, prepare)


def last_level_cache_bytes(device: torch.device) -> int | None:
    """Size of the device's last-level cache (CPU L3 from sysfs, GPU L2), or None if unknown."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or None
    best = None
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (d / "size").read_text().strip().upper()
            level = int((d / "level").read_text())
        except (OSError, ValueError):
            continue
        mult = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1:], 1)
        size = int(text.rstrip("KMG")) * mult
        if best is None or level > best[0]:
            best = (level, size)
    return best[1] if best else None


def rotation_copies(bytes_per_call: int, working_set: int, cache_bytes: int | None) -> int:
    """How many copies of a sub-block to cycle through so that its weights are reused at the
    distance they have in the parent (``working_set`` bytes touched per decode step), capped at
    twice the last-level cache: beyond that everything is evicted anyway."""
    if bytes_per_call <= 0:
        return 1
    reach = min(working_set, 2 * (cache_bytes or DEFAULT_CACHE_BYTES))
    return int(max(1, min(MAX_COPIES, round(reach / bytes_per_call))))


@torch.inference_mode()
def time_interleaved(benches: dict[str, Bench], device: torch.device, warmup: int, repeats: int,
                     seed: int = 0, desc: str | None = None, progress: bool = True,
                     min_sample_ms: float | None = None, clock: str = "wall") -> dict[str, Timing]:
    """Time every bench ``repeats`` times, interleaved: each round runs every bench once in a new
    random order. Returns ms per call for each bench.

    Interleaving is what makes the numbers comparable on a shared machine: a burst of load from
    another process lands on a few samples of *every* bench instead of on all samples of one.
    """
    if repeats <= 0:
        raise ProfilingError(f"repeats must be >= 1, got {repeats}: fix profile_repeats")
    check_clock(clock, device)
    if min_sample_ms is None:
        min_sample_ms = CUDA_MIN_SAMPLE_MS if device.type == "cuda" else 0.0
    inner: dict[str, int] = {}
    for name, b in benches.items():
        for _ in range(max(warmup, 0)):
            _sample(b, 1, device)
        single = _sample(b, 1, device) if min_sample_ms > 0 else min_sample_ms
        inner[name] = 1 if min_sample_ms <= 0 else int(
            min(MAX_INNER, max(1, math.ceil(min_sample_ms / max(single, 1e-6)))))
    rng = random.Random(seed)
    out = {name: Timing([], inner[name]) for name in benches}
    names = list(benches)
    for _ in tqdm(range(repeats), desc=desc or "timing", unit="round", disable=not progress,
                  leave=False):
        rng.shuffle(names)
        for name in names:
            out[name].samples.append(_sample(benches[name], inner[name], device, clock))
    return out


# ------------------------------------------------------------------------------ KV caches

def _snapshot(cache: PuzzleCache) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    return [(layer.keys, layer.values) if isinstance(getattr(layer, "keys", None), torch.Tensor)
            else None for layer in cache.layers]


def _restored_cache(config: PuzzleConfig, snap, seen: int) -> PuzzleCache:
    """A new cache holding ``snap``'s keys/values (shared, not copied: ``DynamicLayer.update``
    concatenates into a new tensor and never writes into the old one)."""
    cache = PuzzleCache(config)
    for layer, kv in zip(cache.layers, snap):
        if kv is not None:
            layer.keys, layer.values = kv
            layer.dtype, layer.device = kv[0].dtype, kv[0].device
            layer.is_initialized = True
    cache.seen_tokens = seen
    return cache


# ------------------------------------------------------------------------------ the library

def library_for(config: PuzzleConfig) -> dict[str, list[Variant]]:
    """The variants profiled for ``config``: ``list_library`` with its defaults (a superset of any
    library stage 02 trains from the same parent with fewer options)."""
    return list_library(config)


def layer_groups(config: PuzzleConfig, library: dict[str, list[Variant]]) -> dict[int, list[int]]:
    """{representative layer: [layers with identically shaped variants]}.

    A variant's runtime depends only on its shape (heads, widths, hidden size), never on which
    layer it sits in, so layers whose library has the same shapes are timed once.
    """
    groups: dict[str, list[int]] = {}
    for i in range(config.num_hidden_layers):
        sig = json.dumps([v.block_config(config, i) for kind in SUB_BLOCKS for v in library[kind]],
                         sort_keys=True)
        groups.setdefault(sig, []).append(i)
    return {members[0]: members for members in groups.values()}


def _one_layer_config(config: PuzzleConfig, attn_bc: dict, ffn_bc: dict) -> PuzzleConfig:
    """A one-layer, one-token-vocabulary model config holding exactly one block."""
    d = config.to_dict()
    for k in ("model_type", "transformers_version", "architectures", "auto_map"):
        d.pop(k, None)
    d.update(num_hidden_layers=1, vocab_size=1, pad_token_id=None, bos_token_id=None,
             eos_token_id=None, tie_word_embeddings=False,
             block_configs=[{"attention": attn_bc, "ffn": ffn_bc}])
    return PuzzleConfig(**d)


_NOOP_BC = {"attention": {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False},
            "ffn": {"ffn_mult": None, "intermediate_size": None, "no_op": True,
                    "replace_with_linear": False}}


def sub_block_model(parent: PuzzleForCausalLM, layer: int, v: Variant) -> PuzzleModel:
    """A one-layer ``PuzzleModel`` whose only sub-block is ``v`` (the other half a no-op),
    with ``v``'s weights initialised from the parent's ``layer`` when the parent has them there."""
    cfg = parent.config
    bc = dict(_NOOP_BC)
    bc["attention" if v.kind == "attn" else "ffn"] = v.block_config(cfg, layer)
    one = _one_layer_config(cfg, bc["attention"], bc["ffn"])
    torch.manual_seed(0)
    m = PuzzleModel(one)
    p = next(parent.parameters())
    m.to(dtype=p.dtype, device=p.device)
    try:
        with warnings.catch_warnings():
            # Which channels are kept does not change the runtime; weight-norm pruning is fine here.
            warnings.simplefilter("ignore", UserWarning)
            weights = init_variant(parent, layer, v)
        m.layers[0].load_state_dict(weights, strict=True)
    except VariantError:
        pass  # the parent has no such sub-block at this layer to copy from: timing is shape-only
    return m.eval()


def _copies(pool: dict, key: Any, m: torch.nn.Module, k: int) -> list[torch.nn.Module]:
    """``m`` and ``k - 1`` copies of it with their own weights (the config object is shared:
    deep-copying a transformers config costs more than the weights of a small block)."""
    have = pool.setdefault(key, [m])
    while len(have) < k:
        have.append(copy.deepcopy(m, memo={id(m.config): m.config}))
    return have[:k]


def param_count(modules: Iterable[torch.nn.Module | None]) -> tuple[int, int]:
    """(parameters, bytes) of distinct parameters across ``modules`` (None skipped)."""
    seen, n, nbytes = set(), 0, 0
    for mod in modules:
        if mod is None:
            continue
        for p in mod.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
                nbytes += p.numel() * p.element_size()
    return n, nbytes


def kv_bytes_per_token(config: PuzzleConfig, layer: int, dtype: torch.dtype) -> int:
    """Bytes the KV cache grows by per token of one sequence for this layer's attention."""
    if config.attn_kind(layer) != "gqa":
        return 0
    return 2 * config.kv_heads(layer) * config.head_dim * torch.empty((), dtype=dtype).element_size()


def _static_costs(m: PuzzleModel, v: Variant) -> dict[str, int]:
    layer = m.layers[0]
    mods = (layer.self_attn, layer.input_layernorm) if v.kind == "attn" else (
        layer.mlp, layer.post_attention_layernorm)
    n, nbytes = param_count(mods)
    dtype = next(m.parameters()).dtype
    return {"params": n, "weight_bytes": nbytes,
            "kv_bytes_per_token": kv_bytes_per_token(m.config, 0, dtype) if v.kind == "attn" else 0}


def fixed_model(parent: PuzzleForCausalLM) -> PuzzleForCausalLM:
    """The child whose every sub-block is a no-op: embeddings, rotary tables, final norm, LM head
    and the layer loop — everything a child runs besides its sub-blocks."""
    L = parent.config.num_hidden_layers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return build_child(parent, [("attn:noop", "ffn:noop")] * L)


def _fixed_static(model: PuzzleForCausalLM) -> dict[str, int]:
    m = model.model
    n, nbytes = param_count([m.embed_tokens, m.norm, model.lm_head])
    return {"params": n, "weight_bytes": nbytes, "kv_bytes_per_token": 0}


# ------------------------------------------------------------------------------ benches

def _randn(shape, like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype=like.dtype, device=like.device)


@torch.inference_mode()
def sub_block_bench(m: PuzzleModel, v: Variant, s: Scenario, phase: str,
                      gen: torch.Generator) -> Bench:
    """The call that times ``v`` (the only sub-block of ``m``) in ``phase`` of scenario ``s``."""
    layer, cfg = m.layers[0], m.config
    p = next(m.parameters(), None)
    like = p if p is not None else torch.empty(0)
    h = cfg.hidden_size
    if v.kind == "ffn":
        x = _randn((s.batch, s.prompt_len if phase == "prefill" else 1, h), like, gen)
        return Bench(lambda _: layer.ffn_residual(x))
    if phase == "prefill":
        x = _randn((s.batch, s.prompt_len, h), like, gen)
        cos, sin, mask, causal = m.attention_inputs(x, past_len=0)
        return Bench(lambda c: layer.attn_residual(x, cos, sin, mask, causal, c),
                     lambda: PuzzleCache(cfg))
    ctx = s.decode_context
    filled = PuzzleCache(cfg)
    xc = _randn((s.batch, ctx, h), like, gen)
    cos, sin, mask, causal = m.attention_inputs(xc, past_len=0)
    layer.attn_residual(xc, cos, sin, mask, causal, filled)
    snap = _snapshot(filled)
    x = _randn((s.batch, 1, h), like, gen)
    cos, sin, mask, causal = m.attention_inputs(x, past_len=ctx)
    return Bench(lambda c: layer.attn_residual(x, cos, sin, mask, causal, c),
                 lambda: _restored_cache(cfg, snap, ctx))


@torch.inference_mode()
def model_bench(model: PuzzleForCausalLM, s: Scenario, phase: str, gen: torch.Generator) -> Bench:
    """One end-to-end step of ``model``: a prefill of the prompt into a fresh cache, or one decode
    token against a cache holding ``s.decode_context`` tokens. Logits for the last position only,
    as ``generate()`` does."""
    cfg = model.config
    dev = next(model.parameters()).device
    if phase == "prefill":
        ids = torch.randint(0, cfg.vocab_size, (s.batch, s.prompt_len), generator=gen).to(dev)
        return Bench(lambda c: model(input_ids=ids, past_key_values=c, use_cache=True,
                                     logits_to_keep=1), lambda: PuzzleCache(cfg))
    ctx = s.decode_context
    filled = PuzzleCache(cfg)
    model(input_ids=torch.randint(0, cfg.vocab_size, (s.batch, ctx), generator=gen).to(dev),
          past_key_values=filled, use_cache=True, logits_to_keep=1)
    snap = _snapshot(filled)
    ids = torch.randint(0, cfg.vocab_size, (s.batch, 1), generator=gen).to(dev)
    return Bench(lambda c: model(input_ids=ids, past_key_values=c, use_cache=True, logits_to_keep=1),
                 lambda: _restored_cache(cfg, snap, ctx))


# ------------------------------------------------------------------------------ the cost table

def _col(metric: str, s: Scenario | int | str) -> str:
    key = s.key if isinstance(s, Scenario) else f"b{s}" if isinstance(s, int) else s
    return f"{metric}@{key}"


def _choice_names(child) -> list[tuple[str, str]]:
    out = []
    for pair in child:
        a, f = pair
        out.append((a.name if isinstance(a, Variant) else str(a),
                    f.name if isinstance(f, Variant) else str(f)))
    return out


class CostTable:
    """Per-(layer, variant) costs plus the fixed part; what the search (stage 04) reads.

    Rows are dicts with the CSV columns: ``layer`` (-1 for the fixed row), ``sub_block``
    (attn | ffn | fixed), ``variant`` (e.g. ``attn:kv2``, ``ffn:0.50``, ``fixed``), ``op``,
    ``kv_heads``, ``ffn_width``, ``measured_on_layer``, ``is_parent``, ``params``, ``weight_bytes``,
    ``kv_bytes_per_token`` and, for every scenario key ``b{B}``, ``prefill_ms@bB`` / ``decode_ms@bB``
    (medians) with ``..._p10@bB`` / ``..._p90@bB`` (spread).

    A child is a list, one ``(attention variant, FFN variant)`` pair per layer, as names or
    :class:`~puzzlelib.blocks.Variant` objects.
    """

    def __init__(self, rows: list[dict], scenarios: list[Scenario], meta: dict | None = None):
        self.rows = rows
        self.scenarios = list(scenarios)
        self.meta = dict(meta or {})
        self._index = {(r["layer"], r["variant"]): r for r in rows}
        if (-1, FIXED) not in self._index:
            raise ProfilingError("cost table has no fixed row (layer -1): it is damaged; rerun "
                                 "stage 01_profiling with force=True")
        self.num_layers = 1 + max((r["layer"] for r in rows), default=-1)

    # ---- lookup ----
    @property
    def batch_sizes(self) -> list[int]:
        return [s.batch for s in self.scenarios]

    def scenario(self, batch: int) -> Scenario:
        for s in self.scenarios:
            if s.batch == batch:
                return s
        raise ProfilingError(f"batch size {batch} was not profiled (profiled: {self.batch_sizes}); "
                             "add it to profile_batch_sizes and rerun stage 01_profiling")

    def variants(self, layer: int, sub_block: str) -> list[str]:
        """Variant names profiled at ``layer`` for ``sub_block`` ('attn' or 'ffn'), table order."""
        return [r["variant"] for r in self.rows if r["layer"] == layer and r["sub_block"] == sub_block]

    def row(self, layer: int, variant: str | Variant) -> dict:
        name = variant.name if isinstance(variant, Variant) else variant
        try:
            return self._index[(layer, name)]
        except KeyError:
            if not 0 <= layer < self.num_layers:
                raise ProfilingError(f"layer {layer} is out of range: the table has layers "
                                     f"0..{self.num_layers - 1}") from None
            kind = name.split(":")[0]
            raise ProfilingError(f"variant {name!r} was not profiled at layer {layer}; profiled: "
                                 f"{', '.join(self.variants(layer, kind)) or 'none'}") from None

    def _value(self, row: dict, metric: str, batch: int | None) -> float:
        if metric in STATIC_METRICS:
            return float(row[metric])
        if metric not in TIMED_METRICS:
            raise ProfilingError(f"unknown metric {metric!r}; metrics: "
                                 f"{', '.join(STATIC_METRICS + TIMED_METRICS)}")
        if batch is None:
            raise ProfilingError(f"{metric} depends on the batch size: pass batch= one of "
                                 f"{self.batch_sizes}")
        return float(row[_col(metric, self.scenario(batch))])

    def cost(self, layer: int, variant: str | Variant, metric: str, batch: int | None = None) -> float:
        """One sub-block's cost: ``metric`` in params | weight_bytes | kv_bytes_per_token |
        prefill_ms | decode_ms (the last two per batch size)."""
        return self._value(self.row(layer, variant), metric, batch)

    def fixed(self, metric: str, batch: int | None = None) -> float:
        """The fixed part's cost (embeddings, final norm, LM head, layer skeleton)."""
        return self._value(self._index[(-1, FIXED)], metric, batch)

    def cost_matrix(self, sub_block: str, metric: str, batch: int | None = None
                    ) -> tuple[list[str], np.ndarray]:
        """(variant names, array [layers, variants]) for a MIP; NaN where a layer lacks a variant."""
        names: list[str] = []
        for i in range(self.num_layers):
            names += [n for n in self.variants(i, sub_block) if n not in names]
        out = np.full((self.num_layers, len(names)), np.nan)
        for i in range(self.num_layers):
            for j, n in enumerate(names):
                if (i, n) in self._index:
                    out[i, j] = self.cost(i, n, metric, batch)
        return names, out

    # ---- children ----
    def parent_choices(self) -> list[tuple[str, str]]:
        """The parent as a child spec (its own sub-block at every layer)."""
        out = []
        for i in range(self.num_layers):
            pick = {k: next((r["variant"] for r in self.rows if r["layer"] == i
                             and r["sub_block"] == k and r["is_parent"]), f"{k}:noop")
                    for k in SUB_BLOCKS}
            out.append((pick["attn"], pick["ffn"]))
        return out

    def choices_from_config(self, config: PuzzleConfig) -> list[tuple[str, str]]:
        """A child's per-layer variant names, read off its ``block_configs`` (e.g. an export)."""
        out = []
        for i in range(config.num_hidden_layers):
            pair = []
            for k in SUB_BLOCKS:
                op = config.attn_kind(i) if k == "attn" else config.ffn_kind(i)
                match = [r for r in self.rows if r["layer"] == i and r["sub_block"] == k
                         and r["op"] == op and r["kv_heads"] == config.kv_heads(i) * (k == "attn")
                         and r["ffn_width"] == config.ffn_width(i) * (k == "ffn")]
                if not match:
                    raise ProfilingError(f"layer {i}: the child's {k} ({op}) matches no profiled "
                                         "variant; profile it or choose from the library")
                pair.append(match[0]["variant"])
            out.append(tuple(pair))
        return out

    def _check_child(self, child) -> list[tuple[str, str]]:
        names = _choice_names(child)
        if len(names) != self.num_layers:
            raise ProfilingError(f"a child needs one (attention, ffn) pair per layer: got "
                                 f"{len(names)}, the table has {self.num_layers} layers")
        return names

    def predict(self, child, metric: str, batch: int | None = None) -> float:
        """Predicted cost of ``child``: fixed part + the sum of its sub-blocks' costs."""
        total = self.fixed(metric, batch)
        for i, (a, f) in enumerate(self._check_child(child)):
            total += self.cost(i, a, metric, batch) + self.cost(i, f, metric, batch)
        return total

    def predict_memory_bytes(self, child, batch: int, context: int | None = None) -> float:
        """Weights + KV cache of ``batch`` sequences of ``context`` tokens (default: the scenario's
        prompt + generation length)."""
        ctx = self.scenario(batch).total_len if context is None else context
        return (self.predict(child, "weight_bytes")
                + batch * ctx * self.predict(child, "kv_bytes_per_token"))

    def predict_scenario(self, child, batch: int) -> dict[str, float]:
        """Everything the search constrains, for one scenario.

        generation_s = prefill + gen_len × (mid-context decode step); tokens_per_s counts generated
        tokens of the whole batch over that time.
        """
        s = self.scenario(batch)
        pre, dec = self.predict(child, "prefill_ms", batch), self.predict(child, "decode_ms", batch)
        gen_s = (pre + s.gen_len * dec) / 1e3
        return {"params": self.predict(child, "params"),
                "weight_bytes": self.predict(child, "weight_bytes"),
                "memory_bytes": self.predict_memory_bytes(child, batch),
                "prefill_ms": pre, "decode_ms": dec, "generation_s": gen_s,
                "tokens_per_s": s.batch * s.gen_len / gen_s if gen_s > 0 else float("inf"),
                "prefill_tokens_per_s": (s.batch * s.prompt_len / (pre / 1e3) if pre > 0
                                         else float("inf"))}

    # ---- files ----
    @property
    def columns(self) -> list[str]:
        cols = ["layer", "sub_block", "variant", "op", "kv_heads", "ffn_width", "measured_on_layer",
                "is_parent", *STATIC_METRICS]
        for s in self.scenarios:
            for m in TIMED_METRICS:
                base = m[:-3]
                cols += [_col(m, s), _col(f"{base}_ms_p10", s), _col(f"{base}_ms_p90", s)]
        return cols

    def to_csv(self, path: str | Path | None = None) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({c: (f"{r[c]:.6g}" if isinstance(r[c], float) else r[c]) for c in self.columns})
        text = buf.getvalue()
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_csv(cls, path: str | Path, scenarios: list[Scenario],
                 meta: dict | None = None) -> "CostTable":
        rows = []
        with open(path, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                row: dict[str, Any] = {}
                for k, v in r.items():
                    if k in ("sub_block", "variant", "op"):
                        row[k] = v
                    elif k == "is_parent":
                        row[k] = v == "True"
                    elif k in ("layer", "kv_heads", "ffn_width", "measured_on_layer", *STATIC_METRICS):
                        row[k] = int(v)
                    else:
                        row[k] = float(v)
                rows.append(row)
        return cls(rows, scenarios, meta)


# ------------------------------------------------------------------------------ measuring

def _variant_row(layer: int, v: Variant, parent_cfg: PuzzleConfig, rep: int, static: dict) -> dict:
    return {"layer": layer, "sub_block": v.kind, "variant": v.name, "op": v.op,
            "kv_heads": v.kv_heads if v.op == "gqa" else 0,
            "ffn_width": v.width(parent_cfg, layer) if v.op == "swiglu" else 0,
            "measured_on_layer": rep, "is_parent": v.is_parent(parent_cfg, layer), **static}


def _put_timing(row: dict, phase: str, s: Scenario, t: Timing, statistic: str,
                minus: float = 0.0) -> None:
    row[_col(f"{phase}_ms", s)] = max(t.stat(statistic) - minus, 0.0)
    row[_col(f"{phase}_ms_p10", s)] = max(t.p10 - minus, 0.0)
    row[_col(f"{phase}_ms_p90", s)] = max(t.p90 - minus, 0.0)


def _sub_key(s: Scenario, phase: str, rep: int, variant: str) -> str:
    return f"{s.key}/{phase}/L{rep}/{variant}"


def _fixed_key(s: Scenario, phase: str) -> str:
    return f"{s.key}/{phase}/{FIXED}"


def _fill_timings(rows: list[dict], scenarios: Sequence[Scenario], samples: dict[str, list[float]],
                  statistic: str) -> None:
    """Write the timed columns of ``rows`` from raw samples (every row reads the samples of the
    layer it was measured on). The fixed row is the all-no-op model minus its no-op sub-blocks."""
    layers = [r for r in rows if r["layer"] >= 0]
    for s in scenarios:
        for phase in PHASES:
            for r in layers:
                _put_timing(r, phase, s, Timing(samples[_sub_key(s, phase, r["measured_on_layer"],
                                                                  r["variant"])]), statistic)
            # The all-no-op model ran every no-op sub-block once per layer; those calls are in the
            # no-op rows already, so they come out of the fixed row (a few µs at most).
            noop = sum(r[_col(f"{phase}_ms", s)] for r in layers if r["op"] == "noop")
            fixed_row = next(r for r in rows if r["layer"] == -1)
            _put_timing(fixed_row, phase, s, Timing(samples[_fixed_key(s, phase)]), statistic,
                        minus=noop)


@torch.inference_mode()
def profile_model(parent: PuzzleForCausalLM, scenarios: Sequence[Scenario], warmup: int = 2,
                  repeats: int = 10, seed: int = 0, progress: bool = True,
                  samples_out: dict | None = None, statistic: str = "median",
                  clock: str = "wall", rotate: bool = True,
                  library: dict[str, list[Variant]] | None = None) -> CostTable:
    """Measure the cost table of ``parent``'s block library on the device its weights live on.

    ``statistic`` (median | p10 | min) summarises each bench's samples into the table's main
    columns; ``clock`` is "wall" or "cpu" (see ``CLOCKS``); ``rotate=False`` times decode
    sub-blocks on hot caches instead of emulating the parent's weight reuse (for the ablation
    in the notebook: it underestimates memory-bound decode); ``library`` defaults to
    :func:`library_for` (``{"attn": [...], "ffn": [...]}`` of ``blocks.Variant``).
    ``samples_out``, when given, receives every raw sample in ms, keyed
    ``"b8/decode/L0/attn:kv2"`` (and ``"b8/decode/fixed"``).
    """
    _check_statistic(statistic)
    cfg = parent.config
    device = next(parent.parameters()).device
    dtype = next(parent.parameters()).dtype
    for s in scenarios:
        s.check(cfg.max_position_embeddings)
    library = library or library_for(cfg)
    groups = layer_groups(cfg, library)
    gen = torch.Generator().manual_seed(seed)
    models: dict[tuple[int, str], PuzzleModel] = {}
    rows_by_rep: dict[tuple[int, str], dict] = {}
    for rep in tqdm(groups, desc="building sub-blocks", disable=not progress, leave=False):
        for kind in SUB_BLOCKS:
            for v in library[kind]:
                m = sub_block_model(parent, rep, v)
                models[(rep, v.name)] = m
                rows_by_rep[(rep, v.name)] = _variant_row(rep, v, cfg, rep, _static_costs(m, v))
    fixed = fixed_model(parent).to(device)
    fixed_row = {"layer": -1, "sub_block": FIXED, "variant": FIXED, "op": FIXED, "kv_heads": 0,
                 "ffn_width": 0, "measured_on_layer": -1, "is_parent": True, **_fixed_static(fixed)}
    cache_bytes = last_level_cache_bytes(device)
    parent_bytes = param_count([parent])[1]
    parent_kv = sum(kv_bytes_per_token(cfg, i, dtype) for i in range(cfg.num_hidden_layers))
    copies_used: dict[str, int] = {}
    pool: dict[Any, list[torch.nn.Module]] = {}  # copies, made once and reused across scenarios
    samples: dict[str, list[float]] = {}
    for s in scenarios:
        # Bytes one parent decode step touches: every weight once, every cached key and value.
        working_set = parent_bytes + s.batch * s.decode_context * parent_kv
        for phase in PHASES:
            benches = {}
            for (rep, name), m in models.items():
                v, row = parse_variant(name), rows_by_rep[(rep, name)]
                # Prefill is compute-bound (each weight serves batch x prompt tokens), so where
                # the weights come from hardly matters and one copy is timed. Decode reads every
                # weight for a handful of tokens: memory-bound, so the cache state is the cost.
                k = 1 if phase == "prefill" or not rotate else rotation_copies(
                    row["weight_bytes"] + s.batch * s.decode_context * row["kv_bytes_per_token"],
                    working_set, cache_bytes)
                key = _sub_key(s, phase, rep, name)
                benches[key] = rotating([sub_block_bench(c, v, s, phase, gen)
                                         for c in _copies(pool, (rep, name), m, k)])
                copies_used[key] = k
            k = 1 if phase == "prefill" or not rotate else rotation_copies(
                fixed_row["weight_bytes"], working_set, cache_bytes)
            benches[_fixed_key(s, phase)] = rotating([model_bench(f, s, phase, gen)
                                                      for f in _copies(pool, FIXED, fixed, k)])
            copies_used[_fixed_key(s, phase)] = k
            times = time_interleaved(benches, device, warmup, repeats, seed, clock=clock,
                                     desc=f"sub-blocks {phase} b={s.batch}", progress=progress)
            samples.update({key: t.samples for key, t in times.items()})
            del benches
    del pool  # the copies: up to twice the last-level cache per sub-block
    if samples_out is not None:
        samples_out.update(samples)
    rows = [fixed_row]
    for rep, members in groups.items():
        for i in members:
            for kind in SUB_BLOCKS:
                for v in library[kind]:
                    r = dict(rows_by_rep[(rep, v.name)])
                    # Copied rows carry their own layer's static facts (parent flag, width).
                    r.update(layer=i, is_parent=v.is_parent(cfg, i),
                             ffn_width=v.width(cfg, i) if v.op == "swiglu" else 0)
                    rows.append(r)
    rows.sort(key=lambda r: (r["layer"], SUB_BLOCKS.index(r["sub_block"]) if r["layer"] >= 0 else 0))
    _fill_timings(rows, scenarios, samples, statistic)
    meta = {"device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "warmup": warmup, "repeats": repeats,
            "statistic": statistic, "clock": clock, "rotate": rotate,
            "representative_layers": {str(k): v for k, v in groups.items()},
            "last_level_cache_bytes": cache_bytes, "rotation_copies": copies_used}
    return CostTable(rows, list(scenarios), meta)


@torch.inference_mode()
def cache_ablation(parent: PuzzleForCausalLM, scenarios: Sequence[Scenario], warmup: int = 2,
                   repeats: int = 10, seed: int = 0, clock: str = "wall",
                   progress: bool = True) -> list[dict]:
    """Is emulating the cache state worth it? One interleaved session per batch size times the
    parent's decode step end to end *and* its own sub-blocks and fixed part twice — hot (each
    timed call right after the previous one on the same weights) and with the parent's reuse
    distance (as in the table) — so load drift cannot favour either. Returns one row per batch:
    measured parent decode ms and the two predictions with their relative errors."""
    cfg = parent.config
    device = next(parent.parameters()).device
    dtype = next(parent.parameters()).dtype
    library = library_for(cfg)
    groups = layer_groups(cfg, library)
    cache_bytes = last_level_cache_bytes(device)
    parent_kv = sum(kv_bytes_per_token(cfg, i, dtype) for i in range(cfg.num_hidden_layers))
    gen = torch.Generator().manual_seed(seed)
    fixed = fixed_model(parent).to(device)
    own = {(rep, k): next(v for v in library[k] if v.is_parent(cfg, rep)) for rep in groups
           for k in SUB_BLOCKS}
    models = {key: sub_block_model(parent, key[0], v) for key, v in own.items()}
    pool: dict[Any, list[torch.nn.Module]] = {}
    out = []
    for s in scenarios:
        ws = param_count([parent])[1] + s.batch * s.decode_context * parent_kv
        benches = {"parent": warm_step(model_bench(parent, s, "decode", gen))}
        for mode in ("hot", "rotated"):
            for key, v in own.items():
                m = models[key]
                st = _static_costs(m, v)
                k = 1 if mode == "hot" else rotation_copies(
                    st["weight_bytes"] + s.batch * s.decode_context * st["kv_bytes_per_token"],
                    ws, cache_bytes)
                b = [sub_block_bench(c, v, s, "decode", gen) for c in _copies(pool, key, m, k)]
                benches[f"{mode}/{key[0]}/{key[1]}"] = warm_step(b[0]) if mode == "hot" else rotating(b)
            k = 1 if mode == "hot" else rotation_copies(_fixed_static(fixed)["weight_bytes"], ws,
                                                        cache_bytes)
            b = [model_bench(f, s, "decode", gen) for f in _copies(pool, FIXED, fixed, k)]
            benches[f"{mode}/fixed"] = warm_step(b[0]) if mode == "hot" else rotating(b)
        t = time_interleaved(benches, device, warmup, repeats, seed, clock=clock,
                             desc=f"cache ablation b={s.batch}", progress=progress)
        row: dict[str, Any] = {"batch": s.batch, "meas_decode_ms": t["parent"].median}
        for mode in ("hot", "rotated"):
            pred = t[f"{mode}/fixed"].median + sum(
                len(members) * t[f"{mode}/{rep}/{k}"].median
                for rep, members in groups.items() for k in SUB_BLOCKS)
            row[f"pred_{mode}_ms"] = pred
            row[f"{mode}_rel_err"] = _rel(pred, row["meas_decode_ms"])
        out.append(row)
    return out


def random_children(config: PuzzleConfig, n: int, seed: int = 0,
                    library: dict[str, list[Variant]] | None = None) -> list[list[tuple[str, str]]]:
    """``n`` children with every layer's attention and FFN drawn uniformly from the library."""
    library = library or library_for(config)
    rng = random.Random(seed)
    return [[(rng.choice(library["attn"]).name, rng.choice(library["ffn"]).name)
             for _ in range(config.num_hidden_layers)] for _ in range(n)]


def model_memory_bytes(model: PuzzleForCausalLM) -> int:
    """Bytes of the model's distinct parameters (tied embeddings once)."""
    return param_count([model])[1]


@torch.inference_mode()
def measured_kv_bytes(model: PuzzleForCausalLM, batch: int, tokens: int, seed: int = 0) -> int:
    """KV bytes a real cache holds after a prefill of ``batch`` × ``tokens``."""
    gen = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    cache = model.new_cache()
    model(input_ids=torch.randint(0, model.config.vocab_size, (batch, tokens), generator=gen).to(dev),
          past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache.kv_bytes()


def _rel(pred: float, meas: float) -> float:
    return abs(pred - meas) / meas if meas else (0.0 if pred == meas else float("inf"))


def short_spec(child: Sequence[tuple[str, str]]) -> str:
    """'kv2+0.50 | noop+linear | …': a child on one line (prefixes dropped)."""
    return " | ".join(f"{a.split(':')[1]}+{f.split(':')[1]}" for a, f in _choice_names(child))


def _child_key(s: Scenario, phase: str, k: int) -> str:
    return f"{s.key}/{phase}/child{k}"


def additivity_rows(table: CostTable, specs: list, samples: dict[str, list[float]],
                    memory: dict[str, int], statistic: str = "median") -> list[dict]:
    """Predicted vs measured rows from raw end-to-end samples (``specs[0]`` is the parent).

    ``memory[f"b{B}/child{k}"]`` holds the measured weights + KV bytes of child k at batch B.
    """
    rows = []
    for s in table.scenarios:
        batch_rows = []
        for k, spec in enumerate(specs):
            r: dict[str, Any] = {"child": k, "is_parent": k == 0, "batch": s.batch,
                                 "spec": short_spec(spec), "choices": json.dumps(spec),
                                 "params": int(table.predict(spec, "params"))}
            for phase in PHASES:
                pred = table.predict(spec, f"{phase}_ms", s.batch)
                got = Timing(samples[_child_key(s, phase, k)]).stat(statistic)
                r[f"pred_{phase}_ms"], r[f"meas_{phase}_ms"] = pred, got
                r[f"{phase}_rel_err"] = _rel(pred, got)
            pm = table.predict_memory_bytes(spec, s.batch)
            mm = memory[f"{s.key}/child{k}"]
            r["pred_memory_bytes"], r["meas_memory_bytes"] = int(pm), int(mm)
            r["memory_rel_err"] = _rel(pm, mm)
            batch_rows.append(r)
        parent_row = batch_rows[0]
        for r in batch_rows:
            for phase in PHASES:
                ps = parent_row[f"pred_{phase}_ms"] / r[f"pred_{phase}_ms"]
                ms = parent_row[f"meas_{phase}_ms"] / r[f"meas_{phase}_ms"]
                r[f"pred_{phase}_speedup"], r[f"meas_{phase}_speedup"] = ps, ms
                r[f"{phase}_speedup_rel_err"] = _rel(ps, ms)
        rows += batch_rows
    return rows


@torch.inference_mode()
def measure_models(models: Sequence[PuzzleForCausalLM], scenarios: Sequence[Scenario],
                   warmup: int = 2, repeats: int = 10, seed: int = 0, progress: bool = True,
                   clock: str = "wall") -> tuple[dict[str, list[float]], dict[str, int]]:
    """Measure whole models end to end, interleaved with each other (so their ratios share the
    machine's load): a prefill of the prompt into a fresh cache, and a decode step against a cache
    of ``decode_context`` tokens right after an untimed one (steady-state generation).

    Returns (samples, memory): ms samples keyed ``"b8/decode/child3"`` (model 3 at batch 8) and
    measured bytes (distinct parameters + what a real cache holds after ``total_len`` tokens)
    keyed ``"b8/child3"``. Stage 04 uses this to re-check its chosen children.
    """
    if not models:
        raise ProfilingError("measure_models needs at least one model")
    device = next(models[0].parameters()).device
    gen = torch.Generator().manual_seed(seed + 1)
    samples: dict[str, list[float]] = {}
    memory: dict[str, int] = {}
    for s in scenarios:
        for m in models:
            s.check(m.config.max_position_embeddings)
        for phase in PHASES:
            benches = {_child_key(s, phase, k): model_bench(m, s, phase, gen) if phase == "prefill"
                       else warm_step(model_bench(m, s, phase, gen)) for k, m in enumerate(models)}
            times = time_interleaved(benches, device, warmup, repeats, seed, clock=clock,
                                     desc=f"children {phase} b={s.batch}", progress=progress)
            samples.update({key: t.samples for key, t in times.items()})
        for k, m in enumerate(models):
            memory[f"{s.key}/child{k}"] = (model_memory_bytes(m)
                                           + measured_kv_bytes(m, s.batch, s.total_len, seed))
    return samples, memory


def check_additivity(parent: PuzzleForCausalLM, table: CostTable, children: list, warmup: int = 2,
                     repeats: int = 10, seed: int = 0, progress: bool = True,
                     samples_out: dict | None = None, statistic: str = "median",
                     clock: str = "wall") -> tuple[list[dict], dict[str, int]]:
    """Predicted (table) vs measured (end to end) cost of the parent and ``children``.

    Returns (rows, memory): one row per (model, batch size) — prefill ms, decode ms and memory
    bytes, predicted and measured, their relative errors, and the speed-up versus the parent
    predicted and measured — and the measured memory per model. Model 0 is the parent.
    """
    _check_statistic(statistic)
    specs = [table.parent_choices()] + [_choice_names(c) for c in children]
    for spec in specs:
        table._check_child(spec)
    device = next(parent.parameters()).device
    models = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for spec in tqdm(specs, desc="building children", disable=not progress, leave=False):
            models.append(build_child(parent, spec).to(device))
    samples, memory = measure_models(models, table.scenarios, warmup, repeats, seed, progress, clock)
    if samples_out is not None:
        samples_out.update(samples)
    return additivity_rows(table, specs, samples, memory, statistic), memory


def restate(table: CostTable, rows: list[dict], samples: dict, memory: dict[str, int],
            statistic: str) -> tuple[CostTable, list[dict]]:
    """The same measurements summarised with another statistic (no re-measuring): the cost table
    and the additivity rows, e.g. to see how much of the error is the estimator's."""
    _check_statistic(statistic)
    new_rows = [dict(r) for r in table.rows]
    # A table imported without its samples (profile_costs_from naming a bare costs.csv) cannot be
    # re-summarised: its rows stay as they are, and only the children's statistic changes.
    if samples.get("sub_blocks"):
        _fill_timings(new_rows, table.scenarios, samples["sub_blocks"], statistic)
    new = CostTable(new_rows, table.scenarios, {**table.meta, "statistic": statistic})
    specs = [json.loads(r["choices"]) for r in rows if r["batch"] == table.batch_sizes[0]]
    return new, additivity_rows(new, specs, samples["children"], memory, statistic)


def summarize_additivity(rows: list[dict]) -> dict[str, float]:
    """Median and max relative errors over all rows, and of the speed-up over the children."""
    out: dict[str, float] = {}
    for what in ("prefill", "decode", "memory"):
        e = [r[f"{what}_rel_err"] for r in rows]
        out[f"{what}_median_rel_err"] = float(np.median(e))
        out[f"{what}_max_rel_err"] = float(np.max(e))
    for phase in PHASES:
        # Signed: < 0 when the sum of the parts misses time the whole model spends (a bias, not
        # noise: noise scatters both ways).
        signed = [(r[f"pred_{phase}_ms"] - r[f"meas_{phase}_ms"]) / r[f"meas_{phase}_ms"]
                  for r in rows if r[f"meas_{phase}_ms"] > 0]
        out[f"{phase}_median_signed_err"] = float(np.median(signed)) if signed else float("nan")
    for phase in PHASES:
        e = [r[f"{phase}_speedup_rel_err"] for r in rows if not r["is_parent"]]
        if e:
            out[f"{phase}_speedup_median_rel_err"] = float(np.median(e))
            out[f"{phase}_speedup_max_rel_err"] = float(np.max(e))
    out["n_children"] = len({r["child"] for r in rows if not r["is_parent"]})
    return out


def rows_to_csv(rows: list[dict], path: str | Path | None = None) -> str:
    """Rows of dicts -> CSV text (written atomically to ``path`` when given)."""
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    text = buf.getvalue()
    if path is not None:
        atomic_write_text(path, text)
    return text




def markdown_table(rows: list[dict], columns: list[str] | None = None, digits: int = 3) -> str:
    """A small Markdown table for the notebook (``IPython.display.Markdown``)."""
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ importing a table

def costs_source(spec: str | Path) -> Path:
    """The ``costs.csv`` that ``profile_costs_from`` names: the file itself, a stage-01 folder
    holding it, or a run folder holding ``01_profiling/costs.csv``. Relative paths are resolved
    against the project folder (config.project_root)."""
    p = resolve_path(spec)
    for cand in (p, p / "costs.csv", p / STAGE / "costs.csv"):
        if cand.is_file():
            if not (cand.parent / "scenarios.json").is_file():
                raise ProfilingError(
                    f"profile_costs_from={str(spec)!r}: {cand} has no scenarios.json next to it (the "
                    "scenarios, dtype and statistic the table was measured with); point it at a "
                    "complete 01_profiling/ folder of an earlier run")
            return cand.absolute()
    raise ProfilingError(f"profile_costs_from={str(spec)!r}: no costs.csv at {p.absolute()}, in it, or in "
                         f"its {STAGE}/ folder; give an earlier run's costs.csv, its 01_profiling/ folder "
                         "or its run folder (or '' to measure here)")


def import_costs(model: PuzzleForCausalLM, scenarios: Sequence[Scenario], spec: str | Path,
                 statistic: str, library: dict[str, list[Variant]] | None = None
                 ) -> tuple[CostTable, dict, dict[str, list[float]], dict]:
    """Read the cost table an earlier run measured, after checking it describes *this* parent,
    library and scenarios (a table for another model would give the search wrong costs silently).

    Returns (table, that run's scenarios.json, its raw sub-block samples or {} when it has no
    samples.json, provenance ``{"path", "sha256"}``). Raises :class:`ProfilingError` naming the
    first thing that differs. Timings are taken as they are: the point of importing is that every
    run using one table finds the same children.
    """
    path = costs_source(spec)
    sc = json.loads((path.parent / "scenarios.json").read_text())
    theirs = [Scenario(**x) for x in sc.get("scenarios", [])]
    where = f"profile_costs_from={str(spec)!r} ({path})"
    if [(s.batch, s.prompt_len, s.gen_len) for s in theirs] != [
            (s.batch, s.prompt_len, s.gen_len) for s in scenarios]:
        raise ProfilingError(
            f"{where} was measured for scenarios {[vars(s) for s in theirs]}, this run asks for "
            f"{[vars(s) for s in scenarios]}: set profile_batch_sizes / profile_prompt_len / "
            "profile_gen_len to that run's values, or profile_costs_from='' to measure")
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    for name, ours, field_name in (("dtype", dtype, "dtype"), ("statistic", statistic, "profile_statistic")):
        if sc.get(name) != ours:
            raise ProfilingError(f"{where} has {name}={sc.get(name)!r}, this run {ours!r}: set "
                                 f"{field_name}={sc.get(name)!r}, or profile_costs_from='' to measure")
    table = CostTable.from_csv(path, theirs, sc)
    cfg = model.config
    library = library or library_for(cfg)
    expected = {(-1, FIXED)} | {(i, v.name) for i in range(cfg.num_hidden_layers)
                                for kind in SUB_BLOCKS for v in library[kind]}
    have = {(r["layer"], r["variant"]) for r in table.rows}
    if have != expected:
        missing, extra = sorted(expected - have), sorted(have - expected)
        raise ProfilingError(f"{where} covers other blocks than this parent's library: missing "
                             f"{missing[:5]}{'...' if len(missing) > 5 else ''}, extra "
                             f"{extra[:5]}{'...' if len(extra) > 5 else ''}; it was measured for "
                             "another parent or library: profile_costs_from='' to measure")
    # Shapes decide parameters and bytes: equal static costs on every representative layer mean
    # the same block shapes (a parent with another width or head count differs here).
    for rep in layer_groups(cfg, library):
        for kind in SUB_BLOCKS:
            for v in library[kind]:
                got = _static_costs(sub_block_model(model, rep, v), v)
                row = table.row(rep, v.name)
                bad = {k: (row[k], got[k]) for k in STATIC_METRICS if row[k] != got[k]}
                if bad:
                    raise ProfilingError(
                        f"{where}: layer {rep} {v.name} has {', '.join(f'{k}={a} (this parent: {b})' for k, (a, b) in bad.items())}: "
                        "the table was measured for another parent; profile_costs_from='' to measure")
    fixed = _fixed_static(fixed_model(model))
    bad = {k: (table.row(-1, FIXED)[k], fixed[k]) for k in fixed if table.row(-1, FIXED)[k] != fixed[k]}
    if bad:
        raise ProfilingError(f"{where}: the fixed part (embeddings, head) differs: {bad} (table, this "
                             "parent): another parent or vocabulary; profile_costs_from='' to measure")
    samples_path = path.parent / "samples.json"
    subs = json.loads(samples_path.read_text()).get("sub_blocks", {}) if samples_path.is_file() else {}
    return table, sc, subs, {"path": str(path), "sha256": file_sha256(path)}


# ------------------------------------------------------------------------------ the stage

@dataclass
class ProfilingResult:
    """What notebook 01 shows and stage 04 reads."""

    dir: Path
    costs: CostTable
    additivity: list[dict]
    metrics: dict
    scenarios: dict
    reused: bool
    samples: dict = field(default_factory=dict, repr=False)

    def child_specs(self) -> list[list[tuple[str, str]]]:
        """The additivity check's models as child specs (index 0 is the parent)."""
        b = self.costs.batch_sizes[0]
        return [[tuple(p) for p in json.loads(r["choices"])] for r in self.additivity
                if r["batch"] == b]

    def summary(self, rows: list[dict] | None = None) -> dict[str, float]:
        return summarize_additivity(self.additivity if rows is None else rows)


def _load_result(rd: RunDir, reused: bool) -> ProfilingResult:
    d = rd.stage_dir(STAGE)
    sc = json.loads((d / "scenarios.json").read_text())
    scenarios = [Scenario(**x) for x in sc["scenarios"]]
    table = CostTable.from_csv(d / "costs.csv", scenarios, sc)
    return ProfilingResult(d, table, read_csv_rows(d / "additivity.csv"),
                           json.loads((d / "metrics.json").read_text()), sc, reused,
                           json.loads((d / "samples.json").read_text()))


def stage_threads(cfg: RunConfig) -> int:
    """Intra-op threads for the measurement: the config's, or 1 for the CPU clock."""
    if cfg.profile_clock == "cpu":
        if cfg.threads not in (0, 1):
            raise ProfilingError(
                f"profile_clock='cpu' measures one thread's CPU time but threads={cfg.threads}: "
                "set threads=1 (or 0), or profile_clock='wall' to time all threads")
        return 1
    return cfg.threads or torch.get_num_threads()


def run(cfg: RunConfig, progress: bool = True) -> ProfilingResult:
    """Run (or reuse) stage 01 for ``cfg``: the cost table and its additivity check."""
    rd = RunDir(cfg)
    if not rd.should_run(STAGE):
        rd.note_reused(STAGE)
        return _load_result(rd, reused=True)
    # Every refusal comes before the stage folder is touched: bad input leaves no partial artifact.
    device = resolve_device(cfg.device)
    threads = stage_threads(cfg)
    check_clock(cfg.profile_clock, device, threads)
    parent_res = parent_stage.load(cfg)  # refuses a missing or stale parent, naming notebook 00
    statistic, clock = cfg.profile_statistic, cfg.profile_clock
    model = parent_res.load_model(dtype=getattr(torch, cfg.dtype)).to(device).eval()
    scenarios = scenarios_from_config(cfg, model.config.max_position_embeddings)
    # An imported table is checked here too, before the stage folder exists.
    imported = (import_costs(model, scenarios, cfg.profile_costs_from, statistic)
                if cfg.profile_costs_from else None)
    with measurement_threads(cfg):
        return _run_stage(cfg, rd, model, scenarios, device, statistic, clock, progress, imported)


@contextmanager
def measurement_threads(cfg: RunConfig) -> Iterator[int]:
    """Set the intra-op threads stage 01 measures with (1 for the CPU clock), and restore the
    previous count afterwards, so later notebook cells keep theirs. Use it to re-measure (e.g.
    an ablation) under the same conditions as the stage."""
    threads = stage_threads(cfg)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(old)


def _run_stage(cfg: RunConfig, rd: RunDir, model: PuzzleForCausalLM, scenarios: list[Scenario],
               device: torch.device, statistic: str, clock: str, progress: bool,
               imported: tuple | None = None) -> ProfilingResult:
    torch.manual_seed(cfg.seed)
    with rd.stage(STAGE) as st:
        load_before = _load_average()
        t0 = time.perf_counter()
        sub_samples: dict[str, list[float]] = {}
        source: dict | None = None
        if imported is None:
            table = profile_model(model, scenarios, cfg.profile_warmup, cfg.profile_repeats,
                                  cfg.seed, progress, sub_samples, statistic, clock)
        else:  # the earlier run's table and samples; only the additivity check is measured here
            table, _, subs, source = imported
            sub_samples.update(subs)
        t_table = time.perf_counter() - t0
        children = random_children(model.config, cfg.profile_num_random_children, cfg.seed)
        child_samples: dict[str, list[float]] = {}
        rows, memory = check_additivity(model, table, children, cfg.profile_warmup,
                                        cfg.profile_repeats, cfg.seed, progress, child_samples,
                                        statistic, clock)
        summary = summarize_additivity(rows)
        dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
        load_after = _load_average()
        sc = {**table.meta, "device_name": dev_name,
              "scenarios": [{"batch": s.batch, "prompt_len": s.prompt_len, "gen_len": s.gen_len}
                            for s in scenarios],
              "decode_context": {s.key: s.decode_context for s in scenarios},
              "timing": (f"{statistic} of {cfg.profile_repeats} interleaved samples after "
                         f"{cfg.profile_warmup} warm-up calls, {clock} clock; one call per sample "
                         "on CPU, a loop "
                         f"of >= {CUDA_MIN_SAMPLE_MS} ms per sample on CUDA, synchronised; spread "
                         "= p10/p90; torch.inference_mode; decode sub-blocks rotate through "
                         "copies so their weights are reused at the parent's distance"),
              "fixed_part": "all-no-op child minus the isolated no-op sub-block times",
              "load_average_before": load_before, "load_average_after": load_after,
              "cpu_count": _cpu_count()}
        if source is not None:
            # The table's own record (device, threads, load while measuring) is the earlier run's;
            # what was measured here is the additivity check only.
            sc = {**imported[1], "imported_from": source,
                  "additivity_measured_on": {k: sc[k] for k in (
                      "device_name", "load_average_before", "load_average_after", "cpu_count")}}
        table.to_csv(st.path("costs.csv"))
        rows_to_csv(rows, st.path("additivity.csv"))
        atomic_write_json(st.path("scenarios.json"), sc)
        atomic_write_json(st.path("samples.json"), {"sub_blocks": sub_samples,
                                                    "children": child_samples, "memory": memory})
        parent_rows = [r for r in rows if r["is_parent"]]
        per_b = lambda key: {f"b{r['batch']}": round(r[key], 4) for r in parent_rows}  # noqa: E731
        metrics = {
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()},
            "statistic": statistic, "clock": clock, "device": str(device),
            "device_name": dev_name,
            "dtype": cfg.dtype, "torch_threads": torch.get_num_threads(),
            "load_average_before": load_before, "load_average_after": load_after,
            "n_variants_per_layer": {k: len(table.variants(0, k)) for k in SUB_BLOCKS},
            "n_layers_timed": len(table.meta["representative_layers"]),
            "parent_pred_prefill_ms": per_b("pred_prefill_ms"),
            "parent_meas_prefill_ms": per_b("meas_prefill_ms"),
            "parent_pred_decode_ms": per_b("pred_decode_ms"),
            "parent_meas_decode_ms": per_b("meas_decode_ms"),
            "parent_tokens_per_s": {s.key: round(table.predict_scenario(
                table.parent_choices(), s.batch)["tokens_per_s"], 1) for s in scenarios},
            "table_seconds": round(t_table, 1),
            "additivity_seconds": round(time.perf_counter() - t0 - t_table, 1),
            "costs_imported_from": source["path"] if source else None,
            "costs_sha256": source["sha256"] if source else None,
        }
        atomic_write_json(st.path("metrics.json"), metrics)
        st.metrics.update({k: v for k, v in metrics.items() if not isinstance(v, dict)})
    return _load_result(rd, reused=False)


def diagnose(result: ProfilingResult, target: float = 0.10) -> list[str]:
    """Plain-language notes on what limits the additivity check of ``result`` (for the notebook):
    machine load, the clock, timing spread, and whether the errors are noise or a bias."""
    m, sc = result.metrics, result.scenarios
    notes = []
    cores, load = sc.get("cpu_count"), max(filter(None, (sc.get("load_average_before"),
                                                          sc.get("load_average_after"))), default=None)
    if load is not None and cores:
        busy = load > cores
        notes.append(f"load average {load:.1f} on {cores} cores: "
                     + ("the machine was oversubscribed while measuring; "
                        + ("the CPU clock keeps other processes' time out of the samples"
                           if m.get("clock") == "cpu" else
                           "wall-clock samples include time other processes held the cores "
                           "(try profile_clock='cpu' with threads=1)")
                        if busy else "the machine was not oversubscribed"))
    spreads = [r[_col(f"{ph}_ms_p90", s)] / r[_col(f"{ph}_ms", s)] for r in result.costs.rows
               for s in result.costs.scenarios for ph in PHASES
               if r["op"] != "noop" and r[_col(f"{ph}_ms", s)] > 0]
    if spreads:
        notes.append(f"timing spread: the p90 of a sub-block is typically {np.median(spreads):.2f}x "
                     "its median (1.0 = perfectly repeatable)")
    for ph in PHASES:
        med, signed = m.get(f"{ph}_median_rel_err"), m.get(f"{ph}_median_signed_err")
        if med is None or signed is None:
            continue
        verdict = "within" if med <= target else "above"
        kind = ("a bias: the sum of the parts misses time the whole model spends (per-call "
                "overhead or cache effects between layers)" if signed < -med / 2 else
                "a bias: the parts cost more alone than inside the model" if signed > med / 2
                else "scatter around zero: noise rather than a missing cost")
        notes.append(f"{ph}: median error {100 * med:.1f} % ({verdict} the {100 * target:.0f} % "
                     f"target), median signed error {100 * signed:+.1f} %: {kind}")
    return notes


def _load_average() -> float | None:
    """1-minute load average: more runnable threads than cores means timings are contended."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _cpu_count() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _cpu_name() -> str:
    from .rundir import _cpu_model  # the same string environment.json records

    return _cpu_model()


def load(cfg: RunConfig) -> ProfilingResult:
    """Stage 01's result for later stages; refuses a missing, unfinished or stale profile."""
    rd = RunDir(cfg, create=False)
    rd.require(STAGE)
    return _load_result(rd, reused=True)


def load_costs(cfg: RunConfig) -> CostTable:
    """The cost table of a finished, fresh stage 01 (what stage 04 calls)."""
    return load(cfg).costs
