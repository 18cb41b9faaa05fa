"""Stage 02's job plan: which blocks BLD builds, with which settings, on which rank.

What it does: turns ``RunConfig``'s ``bld_*`` fields into ``BLDSettings`` (everything that
determines a trained block: token budget, optimizer schedule, seed) and, given the parent's
``PuzzleConfig``, into the library's variant lists and its (layer, variant) ``Job``s, in order:
per layer, attention variants, FFN variants, then coupled pairs (``plan``). The parent's own
sub-blocks and no-ops are jobs too, marked untrained with the reason. ``assign`` shards the jobs
over torchrun ranks by estimated cost, as a pure function of (jobs, world size), so every rank
computes the same shards without talking to the others. Malformed or empty variant lists raise
``BLDError`` naming the setting to change.

Reads: a ``RunConfig`` and the parent's ``PuzzleConfig`` only. Writes: nothing.
Leaves out: building or training anything (``train.py``), the stage's run / load / CLI and
the library's files (``bld.py``, ``library.py``), and the variant names and their parsing
(``blocks.py``).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

from ..core.blocks import Variant, VariantError, list_library, parse_variant
from ..core.config import RunConfig
from .library import pair_name, split_pair_name
from ..core.configuration_decilm import PuzzleConfig

STAGE = "02_bld"


class BLDError(ValueError):
    """BLD cannot run with these settings; the message says what to change."""


# ----------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class BLDSettings:
    """Everything that determines the trained blocks (recorded in the library's index)."""

    tokens_per_variant: int
    batch_size: int
    seq_len: int
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    eval_tokens: int
    eval_every: int
    calib_tokens: int
    autocast_bf16: bool | str  # "auto" until bld.run decides it (precision.py); then a bool
    seed: int
    # "weights" (products of the parent's matrices) | "lstsq" (least squares on the BLD batches)
    linear_init: str = "weights"

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "BLDSettings":
        if cfg.bld_tokens_per_variant <= 0:
            raise BLDError(f"bld_tokens_per_variant must be > 0, got {cfg.bld_tokens_per_variant}")
        return cls(cfg.bld_tokens_per_variant, cfg.bld_batch_size, cfg.seq_len, cfg.bld_lr,
                   cfg.bld_min_lr_ratio, cfg.bld_warmup_steps, cfg.bld_weight_decay,
                   cfg.bld_grad_clip, cfg.bld_eval_tokens, cfg.bld_eval_every,
                   cfg.bld_calib_tokens, cfg.bld_autocast_bf16, cfg.seed, cfg.bld_linear_init)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def steps(self) -> int:
        """Optimizer steps per trained block: the budget rounded up to whole batches."""
        return max(1, math.ceil(self.tokens_per_variant / self.tokens_per_step))

    @property
    def data_seed(self) -> int:
        """Seed of BLD's batch stream: its own, so BLD does not replay the parent's batches."""
        return zlib.crc32(f"{STAGE}:batches:{self.seed}".encode())


# --------------------------------------------------------------------------------------- plan

@dataclass(frozen=True)
class Job:
    """One (layer, variant) block to build. ``kind``: attn | ffn | pair (coupled)."""

    layer: int
    name: str
    kind: str
    variants: tuple[Variant, ...]
    trained: bool
    why_not_trained: str | None = None

    def seed(self, base: int) -> int:
        """Stable per-job seed (zlib.crc32, not hash(): that changes per process)."""
        return zlib.crc32(f"{base}:{self.layer}:{self.name}".encode())

    def cost(self, pc: PuzzleConfig, seq_len: int) -> float:
        """Rough training FLOPs per token (for load balancing only)."""
        h, hd, H = pc.hidden_size, pc.head_dim, pc.num_attention_heads
        total = 0.0
        for v in self.variants:
            if v.op == "gqa":
                total += 2 * h * H * hd + 2 * h * v.kv_heads * hd + 2 * H * hd * seq_len / 2
            elif v.op == "swiglu":
                total += 3 * h * v.width(pc, self.layer)
            elif v.op == "linear":
                total += h * h
        return (3 * total if self.trained else total) + h  # + evaluation / bookkeeping


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def plan(pc: PuzzleConfig, cfg: RunConfig) -> tuple[dict[str, list[str]], list[Job]]:
    """The library's variants ``{"attn": [...], "ffn": [...], "pairs": [...]}`` and its jobs, in
    order (layer, then attention, FFN, coupled). The parent's own sub-blocks are always included."""
    pkv = pc.kv_heads(0)
    try:
        kv = None if cfg.bld_kv_heads.strip() == "auto" else [int(x) for x in _split(cfg.bld_kv_heads)]
        fr = [float(x) for x in _split(cfg.bld_ffn_fractions)]
    except ValueError:
        raise BLDError(f"bld_kv_heads={cfg.bld_kv_heads!r} / bld_ffn_fractions="
                       f"{cfg.bld_ffn_fractions!r}: write comma-separated numbers, e.g. '2,1' and "
                       "'1.0,0.5,0.25'") from None
    if kv is not None:
        kv = sorted(set(kv) | {pkv}, reverse=True)
    try:
        lib = list_library(pc, kv, tuple(sorted(set(fr) | {1.0}, reverse=True)),
                           cfg.bld_include_linear, cfg.bld_include_noop)
    except VariantError as e:  # name the setting to change, not only the variant
        raise BLDError(f"bld_kv_heads={cfg.bld_kv_heads!r} / bld_ffn_fractions="
                       f"{cfg.bld_ffn_fractions!r}: {e}") from None
    try:
        pairs = []
        for p in _split(cfg.bld_coupled_pairs):
            names = split_pair_name(p)
            if names is None:
                raise VariantError(f"coupled pair {p!r}: write it as 'attn:<variant>+ffn:<variant>'")
            a, f = parse_variant(names[0], pc), parse_variant(names[1], pc)
            if a.kind != "attn" or f.kind != "ffn":
                raise VariantError(f"coupled pair {p!r}: the attention variant comes first, "
                                   "e.g. 'attn:kv1+ffn:0.50'")
            pairs.append((a, f))
    except VariantError as e:
        raise BLDError(f"bld_coupled_pairs={cfg.bld_coupled_pairs!r}: {e}") from None
    variants = {"attn": [v.name for v in lib["attn"]], "ffn": [v.name for v in lib["ffn"]],
                "pairs": [pair_name(a.name, f.name) for a, f in pairs]}
    jobs = []
    for i in range(pc.num_hidden_layers):
        for v in lib["attn"] + lib["ffn"]:
            why = ("the parent's own sub-block" if v.is_parent(pc, i)
                   else "a no-op has no weights" if v.op == "noop" else None)
            jobs.append(Job(i, v.name, v.kind, (v,), why is None, why))
        for a, f in pairs:
            trained = not (a.op == f.op == "noop") and not (a.is_parent(pc, i) and f.is_parent(pc, i))
            jobs.append(Job(i, pair_name(a.name, f.name), "pair", (a, f), trained,
                            None if trained else "nothing to train in this pair"))
    if not any(j.trained for j in jobs) and not any(v.op == "noop" for v in lib["attn"] + lib["ffn"]):
        raise BLDError(
            "the variant list is empty: the library would hold only the parent's own sub-blocks. "
            "Set bld_kv_heads (e.g. 'auto' or '2,1'), bld_ffn_fractions (e.g. '1.0,0.5,0.25'), "
            "bld_include_linear or bld_include_noop.")
    return variants, jobs


def assign(jobs: list[Job], world: int, pc: PuzzleConfig, seq_len: int) -> list[list[Job]]:
    """Shard jobs over ranks: longest-processing-time first, ties broken by job order, so the
    assignment is a pure function of (jobs, world). Each shard is returned in job order."""
    order = sorted(range(len(jobs)), key=lambda k: (-jobs[k].cost(pc, seq_len), k))
    load = [0.0] * world
    shards: list[list[int]] = [[] for _ in range(world)]
    for k in order:
        r = min(range(world), key=lambda q: (load[q], q))
        shards[r].append(k)
        load[r] += jobs[k].cost(pc, seq_len)
    return [[jobs[k] for k in sorted(s)] for s in shards]
