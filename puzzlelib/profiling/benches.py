"""What stage 01 times, and the measurement of the cost table from it.

What it does:
* the block library profiled for a parent (``library_for``) and the groups of layers whose
  variants have identical shapes (``layer_groups``: one representative layer is timed per group);
* a one-layer model holding a single variant with weights from the parent (``sub_block_model``)
  and the all-no-op child that carries the fixed part (``fixed_model``); their static costs
  (``param_count``, ``kv_bytes_per_token``);
* benches: a sub-block (``sub_block_bench``) or a whole model (``model_bench``) in prefill
  (fresh KV cache) or one decode step (a cache filled once, restored before every call);
* ``profile_model``: every bench timed interleaved (decode rotating through copies of the
  weights) and summarised into a :class:`~puzzlelib.profiling.costs.CostTable`.

Reads: the parent model in memory only. Writes nothing: the stage (``profiling``) writes the table
and the samples. Leaves out: the timing loop and clocks (``timing``), the table's format and
predictions (``costs``), the end-to-end check and the cache ablation (``additivity``); variants
outside ``blocks.list_library``'s defaults unless passed as ``library=``.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from tqdm import tqdm  # plain text bars: tqdm.auto needs ipywidgets in Jupyter

from ..core.blocks import Variant, VariantError, build_child, init_variant, list_library, parse_variant
from .costs import FIXED, PHASES, SUB_BLOCKS, CostTable, Scenario, cost_column
from ..core.modeling_decilm import PuzzleCache, PuzzleForCausalLM
from ..core.configuration_decilm import PuzzleConfig
from ..core.modeling_decilm import PuzzleModel
from .timing import (
    Bench,
    Timing,
    check_statistic,
    last_level_cache_bytes,
    rotating,
    rotation_copies,
    time_interleaved,
)

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


def own_weight_copies(pool: dict, key: Any, m: torch.nn.Module, k: int) -> list[torch.nn.Module]:
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


def sub_block_static_costs(m: PuzzleModel, v: Variant) -> dict[str, int]:
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


def fixed_static_costs(model: PuzzleForCausalLM) -> dict[str, int]:
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


# ------------------------------------------------------------------------------ measuring

def _variant_row(layer: int, v: Variant, parent_cfg: PuzzleConfig, rep: int, static: dict) -> dict:
    return {"layer": layer, "sub_block": v.kind, "variant": v.name, "op": v.op,
            "kv_heads": v.kv_heads if v.op == "gqa" else 0,
            "ffn_width": v.width(parent_cfg, layer) if v.op == "swiglu" else 0,
            "measured_on_layer": rep, "is_parent": v.is_parent(parent_cfg, layer), **static}


def _put_timing(row: dict, phase: str, s: Scenario, t: Timing, statistic: str,
                minus: float = 0.0) -> None:
    row[cost_column(f"{phase}_ms", s)] = max(t.stat(statistic) - minus, 0.0)
    row[cost_column(f"{phase}_ms_p10", s)] = max(t.p10 - minus, 0.0)
    row[cost_column(f"{phase}_ms_p90", s)] = max(t.p90 - minus, 0.0)


def _sub_key(s: Scenario, phase: str, rep: int, variant: str) -> str:
    return f"{s.key}/{phase}/L{rep}/{variant}"


def _fixed_key(s: Scenario, phase: str) -> str:
    return f"{s.key}/{phase}/{FIXED}"


def fill_timings(rows: list[dict], scenarios: Sequence[Scenario], samples: dict[str, list[float]],
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
            noop = sum(r[cost_column(f"{phase}_ms", s)] for r in layers if r["op"] == "noop")
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
    check_statistic(statistic)
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
                rows_by_rep[(rep, v.name)] = _variant_row(rep, v, cfg, rep, sub_block_static_costs(m, v))
    fixed = fixed_model(parent).to(device)
    fixed_row = {"layer": -1, "sub_block": FIXED, "variant": FIXED, "op": FIXED, "kv_heads": 0,
                 "ffn_width": 0, "measured_on_layer": -1, "is_parent": True, **fixed_static_costs(fixed)}
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
                                         for c in own_weight_copies(pool, (rep, name), m, k)])
                copies_used[key] = k
            k = 1 if phase == "prefill" or not rotate else rotation_copies(
                fixed_row["weight_bytes"], working_set, cache_bytes)
            benches[_fixed_key(s, phase)] = rotating([model_bench(f, s, phase, gen)
                                                      for f in own_weight_copies(pool, FIXED, fixed, k)])
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
    fill_timings(rows, scenarios, samples, statistic)
    meta = {"device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "warmup": warmup, "repeats": repeats,
            "statistic": statistic, "clock": clock, "rotate": rotate,
            "representative_layers": {str(k): v for k, v in groups.items()},
            "last_level_cache_bytes": cache_bytes, "rotation_copies": copies_used}
    return CostTable(rows, list(scenarios), meta)
