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

**Prefix caching.** The parent's residual stream entering layer *i* is the same for every
candidate of layer *i*. The parent is therefore run *once*, one layer at a time (the stream for
all held-out batches advances layer by layer, as in BLD), and a candidate of layer *i* runs only:
its own one-layer module (the candidate sub-block + the parent's other half of layer *i*; an FFN
candidate even starts after the parent's attention of layer *i*), then the parent's layers
*i+1 … L-1* (``PuzzleModel.forward_layers``), the final norm and the LM head. The parent's logits
are computed once too. No full child model is built per candidate. Scores equal the naive
full-forward scores (``score_naive``: ``blocks.build_child`` + a full forward, what NVIDIA's code
does): the same operations on the same values, so on CPU in fp32 they agree bit for bit (the
tests require 1e-5). Each run re-checks this on a sample (``scoring_naive_check``) and times
both; ``benchmarks/bench_scoring.py`` compares them on the whole library.

**Interaction check** (the EvoPress critique). For a few random multi-block children (1 … L
replaced sub-blocks, seeded), the sum of their blocks' KL scores is compared with their measured
KL: Spearman / Pearson correlation and the measured/predicted ratio say how far the additive
quality model can be trusted.

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

import csv
import io
import json
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import bld as bld_stage
from . import data
from . import parent as parent_stage
from .blocks import Variant, VariantError, build_child, init_variant, parse_variant
from .config import RunConfig
from .library import Library, LibraryMismatch, split_pair_name, split_pair_tensors
from .model import PuzzleConfig, PuzzleForCausalLM, child_config
from .modeling_decilm import PuzzleDecoderLayer
from .rundir import RunDir, atomic_write_json, atomic_write_text, read_csv_rows

STAGE = "03_scoring"
SOURCES = ("bld", "init")
SUB_BLOCKS = ("attn", "ffn", "pair")
# Metrics stored per candidate. ADDITIVE ones are those a sum over blocks can predict: each is
# 0 for the parent's own block, and the search adds them up.
METRICS = ("kl", "kl_sem", "lm_loss", "lm_loss_delta", "top1_agreement", "nmse")
ADDITIVE_METRICS = ("kl", "lm_loss_delta")
COLUMNS = ("layer", "sub_block", "variant", "source", "is_parent", "trained", *METRICS, "tokens")
INTERACTION_COLUMNS = ("child", "n_replaced", "predicted_kl", "measured_kl", "ratio",
                       "predicted_lm_loss_delta", "measured_lm_loss_delta",
                       "measured_top1_agreement", "spec")


class ScoringError(ValueError):
    """Scoring cannot run with these inputs; the message says what to change."""


# ---------------------------------------------------------------------------------- candidates

def parent_choice(pc: PuzzleConfig, layer: int) -> tuple[str, str]:
    """The parent's own (attention, FFN) variant names at ``layer``."""
    kind = pc.attn_kind(layer)
    a = f"attn:kv{pc.kv_heads(layer)}" if kind == "gqa" else f"attn:{kind}"
    f = "ffn:1.00" if pc.ffn_kind(layer) == "swiglu" else f"ffn:{pc.ffn_kind(layer)}"
    return a, f


def parent_choices(pc: PuzzleConfig) -> list[tuple[str, str]]:
    return [parent_choice(pc, i) for i in range(pc.num_hidden_layers)]


def _variants_of(name: str, pc: PuzzleConfig) -> tuple[Variant, ...]:
    pair = split_pair_name(name)
    return tuple(parse_variant(n, pc) for n in (pair if pair else (name,)))


@dataclass(frozen=True, eq=False)
class Candidate:
    """One (layer, variant) to score. ``variant`` is a sub-block name ("attn:kv1", "ffn:0.50")
    or a coupled pair ("attn:kv1+ffn:0.50"); ``load()`` returns its tensors named relative to
    ``model.layers.{layer}.`` (as the library stores them)."""

    layer: int
    variant: str
    source: str = "bld"
    trained: bool = True
    load: Callable[[], dict[str, torch.Tensor]] | None = field(default=None, repr=False)
    nmse: float = float("nan")  # stage 02's local normalized MSE of this block (nan if unknown)

    @property
    def sub_block(self) -> str:
        return "pair" if "+" in self.variant else self.variant.split(":")[0]

    @property
    def key(self) -> tuple[int, str, str]:
        return (self.layer, self.variant, self.source)

    def is_parent(self, pc: PuzzleConfig) -> bool:
        return all(v.is_parent(pc, self.layer) for v in _variants_of(self.variant, pc))

    def choices(self, pc: PuzzleConfig) -> list[tuple[str, str]]:
        """The one-block child as a per-layer spec: the parent everywhere but at ``layer``."""
        out = parent_choices(pc)
        a, f = out[self.layer]
        for v in _variants_of(self.variant, pc):
            a, f = (v.name, f) if v.kind == "attn" else (a, v.name)
        out[self.layer] = (a, f)
        return out

    def blocks(self) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
        """``{(layer, name): tensors}`` for ``blocks.build_child`` (a pair split in halves)."""
        t = self.load()
        pair = split_pair_name(self.variant)
        if pair is None:
            return {(self.layer, self.variant): t}
        ta, tf = split_pair_tensors(t)
        return {(self.layer, pair[0]): ta, (self.layer, pair[1]): tf}


def candidate_layer(parent: PuzzleForCausalLM, cand: Candidate,
                    tensors: dict[str, torch.Tensor] | None = None) -> PuzzleDecoderLayer:
    """A standalone decoder layer holding only the candidate's sub-block(s) (the other half a
    no-op), on the parent's device and dtype. The parent's other half is *reused* at run time,
    not copied, so building a candidate costs only its own tensors."""
    pc = parent.config
    i = cand.layer
    halves = {"attn": Variant("attn", "noop"), "ffn": Variant("ffn", "noop")}
    for v in _variants_of(cand.variant, pc):
        halves[v.kind] = v
    bcs = [dict(b) for b in pc.block_configs]
    bcs[i] = {"attention": halves["attn"].block_config(pc, i), "ffn": halves["ffn"].block_config(pc, i)}
    p = next(parent.parameters())
    tensors = cand.load() if tensors is None else tensors
    # Built on the meta device and filled by assignment: no random init of weights that are
    # overwritten at once (it would dominate for a real 1B-parameter parent's layers).
    with torch.device("meta"):
        layer = PuzzleDecoderLayer(child_config(pc, bcs), i)
    try:
        layer.load_state_dict({k: t.to(p.device, p.dtype) for k, t in tensors.items()},
                              strict=True, assign=True)
    except RuntimeError as e:
        raise ScoringError(f"block ({i}, {cand.variant!r}, {cand.source}) does not fit the parent's "
                           f"layer: {str(e).splitlines()[0]}; rebuild the library (stage 02_bld)"
                           ) from None
    return layer.eval()


def library_candidates(parent: PuzzleForCausalLM, lib: Library, include_init: bool = True,
                       dtype: torch.dtype | None = None) -> list[Candidate]:
    """Every block of ``lib`` as a BLD candidate, plus (``include_init``) the pure-init version of
    every *trained* block. Untrained blocks (the parent's own, no-ops) are the same either way and
    are scored once. Tensors are read lazily, one layer at a time, so memory holds one layer's
    candidates, not the whole library."""
    lib.check_parent(parent)
    if not lib.is_complete():
        miss = lib.missing()
        raise ScoringError(f"the block library in {lib.root} is incomplete: {len(miss)} blocks "
                           f"missing, e.g. {miss[:3]}; finish stage 02_bld (it resumes) first")
    pc = parent.config
    scores = lib.channel_scores() if include_init else None
    out = []
    for i, name in lib.jobs():
        try:
            variants = _variants_of(name, pc)
        except VariantError as e:
            raise ScoringError(f"library block ({i}, {name!r}) is not a variant of this parent: {e}"
                               ) from None
        rec = lib.record(i, name)
        trained = bool(rec.get("trained", not all(v.op == "noop" or v.is_parent(pc, i) for v in variants)))
        out.append(Candidate(i, name, "bld", trained,
                             lambda i=i, name=name: lib.read_block(i, name, dtype),
                             float(rec.get("final_nmse", float("nan")))))
        if include_init and trained:
            def init(i=i, variants=variants):
                t = {}
                for v in variants:
                    t.update(init_variant(parent, i, v, scores))
                return t
            out.append(Candidate(i, name, "init", True, init,
                                 float(rec.get("init_nmse", float("nan")))))
    return out


def blocks_candidates(blocks: dict[tuple[int, str], dict[str, torch.Tensor]], source: str = "bld",
                      trained: bool = True) -> list[Candidate]:
    """Candidates from in-memory blocks ``{(layer, name): tensors}`` (tests, benchmarks)."""
    return [Candidate(i, n, source, trained, lambda t=t: t) for (i, n), t in sorted(blocks.items())]


# ------------------------------------------------------------------------------------- metrics

class _Reference:
    """The parent's next-token distribution on one batch (log-probs, probs, argmax)."""

    def __init__(self, logits: torch.Tensor, targets: torch.Tensor):
        self.logp = F.log_softmax(logits.float(), dim=-1)
        self.p = self.logp.exp()
        self.argmax = logits.argmax(-1)
        self.targets = targets


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed cross-entropy, computed exactly as the candidates' (so the parent's own block has
    lm_loss_delta exactly 0, not a rounding difference between two formulas)."""
    logq = F.log_softmax(logits.float(), dim=-1)
    return -logq.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double().sum().item()


class _Accumulator:
    """Per-candidate sums over batches, in float64 and in batch order (deterministic)."""

    def __init__(self):
        self.kl = self.ce = self.agree = 0.0
        self.tokens = 0
        self.seq_kl: list[float] = []

    def add(self, logits: torch.Tensor, ref: _Reference) -> None:
        logq = F.log_softmax(logits.float(), dim=-1)
        # KL(p || q) = sum_v p (log p - log q): exactly 0 where the logits are the parent's.
        kl_tok = (ref.p * (ref.logp - logq)).sum(-1)
        ce_tok = -logq.gather(-1, ref.targets.unsqueeze(-1)).squeeze(-1)
        self.kl += kl_tok.double().sum().item()
        self.ce += ce_tok.double().sum().item()
        self.agree += (logits.argmax(-1) == ref.argmax).sum().item()
        self.tokens += kl_tok.numel()
        self.seq_kl += kl_tok.double().mean(-1).tolist()

    def result(self) -> dict:
        n = max(self.tokens, 1)
        s = np.asarray(self.seq_kl)
        sem = float(s.std(ddof=1) / math.sqrt(len(s))) if len(s) > 1 else float("nan")
        return {"kl": self.kl / n, "kl_sem": sem, "lm_loss": self.ce / n,
                "top1_agreement": self.agree / n, "tokens": self.tokens}


@dataclass
class Scores:
    """What a scoring pass returns: one row per candidate, the parent's own numbers, timings."""

    rows: list[dict]
    parent: dict
    seconds: float
    candidate_seconds: dict[tuple[int, str, str], float]
    shared_seconds: float  # the parent's passes (reference logits, prefix stream)


@dataclass
class ParentReference:
    """The parent on the scoring batches, computed once: its logits per batch (the distribution
    every candidate is compared with), its LM loss and the token count."""

    ids: list[torch.Tensor]
    targets: list[torch.Tensor]
    logits: list[torch.Tensor]
    lm_loss: float
    tokens: int
    seconds: float

    def batch(self, b: int) -> _Reference:
        return _Reference(self.logits[b], self.targets[b])


@torch.no_grad()
def parent_reference(parent: PuzzleForCausalLM, batches) -> ParentReference:
    """Run the parent once over ``batches`` with the very layer loop the candidates' prefix uses,
    so that the parent's own block reproduces these logits bit for bit (KL exactly 0)."""
    if not batches:
        raise ScoringError("no held-out batch to score on: give at least one batch of "
                           "(input ids, targets)")
    t0 = time.perf_counter()
    parent.eval()
    model = parent.model
    dev = next(parent.parameters()).device
    ids = [x.to(dev) for x, _ in batches]
    tgts = [y.to(dev) for _, y in batches]
    cos, sin, mask, causal = model.attention_inputs(model.embed_tokens(ids[0][:1]))
    logits, ce = [], 0.0
    for x, y in zip(ids, tgts):
        h = model.embed_tokens(x)
        for layer in model.layers:
            h = layer(h, cos, sin, mask, causal, None)
        lg = parent.lm_head(model.norm(h))
        ce += _ce_sum(lg, y)
        logits.append(lg)
    n = sum(y.numel() for y in tgts)
    return ParentReference(ids, tgts, logits, ce / n, n, time.perf_counter() - t0)


def _row(c: Candidate, pc: PuzzleConfig, res: dict, parent_loss: float) -> dict:
    return {"layer": c.layer, "sub_block": c.sub_block, "variant": c.variant, "source": c.source,
            "is_parent": c.is_parent(pc), "trained": c.trained, "kl": res["kl"],
            "kl_sem": res["kl_sem"], "lm_loss": res["lm_loss"],
            "lm_loss_delta": res["lm_loss"] - parent_loss, "top1_agreement": res["top1_agreement"],
            "nmse": c.nmse, "tokens": res["tokens"]}


def _check_inputs(parent: PuzzleForCausalLM, candidates: Sequence[Candidate], batches) -> None:
    if not batches:
        raise ScoringError("no held-out batch to score on: give at least one batch of "
                           "(input ids, targets)")
    L = parent.config.num_hidden_layers
    seen = set()
    for c in candidates:
        if not 0 <= c.layer < L:
            raise ScoringError(f"candidate {c}: layer {c.layer} is out of range (the parent has "
                               f"{L} layers)")
        if c.key in seen:
            raise ScoringError(f"candidate {c.key} is listed twice")
        if c.source not in SOURCES:
            raise ScoringError(f"candidate {c}: source must be one of {SOURCES}")
        seen.add(c.key)


@torch.no_grad()
def score_candidates(parent: PuzzleForCausalLM, candidates: Sequence[Candidate], batches,
                     progress: bool = True, desc: str = STAGE,
                     reference: ParentReference | None = None) -> Scores:
    """Score every candidate with prefix caching (see the module docstring).

    ``batches``: ``[(input_ids, targets)]`` of equal sequence length, e.g.
    ``data.heldout_batches``. Loops: layer (the parent's stream advances once) → batch (the
    parent's log-probs once per layer and batch) → candidates of that layer. ``reference``:
    the parent's pass, when the caller has it already (``parent_reference``).
    """
    _check_inputs(parent, candidates, batches)
    t_start = time.perf_counter()
    parent.eval()
    pc, model = parent.config, parent.model
    # 1. The parent's logits, once.
    ref = reference or parent_reference(parent, batches)
    ids = ref.ids
    # Positions 0..T-1 for every batch: cos/sin, the causal flag (no mask: no padding) are shared.
    cos, sin, mask, causal = model.attention_inputs(model.embed_tokens(ids[0][:1]))
    shared = ref.seconds if reference is None else 0.0

    by_layer: dict[int, list[Candidate]] = {}
    for c in candidates:
        by_layer.setdefault(c.layer, []).append(c)
    acc = {c.key: _Accumulator() for c in candidates}
    secs = {c.key: 0.0 for c in candidates}
    bar = tqdm(total=len(candidates) * len(ids), desc=desc, unit="cand·batch", disable=not progress)
    # 2. The stream: states[b] = the parent's residual stream entering layer i for batch b.
    t0 = time.perf_counter()
    states = [model.embed_tokens(x) for x in ids]
    shared += time.perf_counter() - t0
    last = max(by_layer, default=-1)
    for i in range(last + 1):
        t0 = time.perf_counter()
        pl = model.layers[i]
        mids = [pl.attn_residual(s, cos, sin, mask, causal, None) for s in states]
        shared += time.perf_counter() - t0
        cands = by_layer.get(i, [])
        modules = []
        for c in cands:
            t0 = time.perf_counter()
            modules.append(candidate_layer(parent, c))
            secs[c.key] += time.perf_counter() - t0
        for b in range(len(ids)):
            t0 = time.perf_counter()
            rb = ref.batch(b) if cands else None
            shared += time.perf_counter() - t0
            for c, mod in zip(cands, modules):
                t0 = time.perf_counter()
                if c.sub_block == "ffn":  # starts after the parent's attention of layer i
                    h = mod.ffn_residual(mids[b])
                elif c.sub_block == "attn":  # the candidate attention, then the parent's FFN
                    h = pl.ffn_residual(mod.attn_residual(states[b], cos, sin, mask, causal, None))
                else:  # a coupled pair replaces the whole layer
                    h = mod(states[b], cos, sin, mask, causal, None)
                h, _ = model.forward_layers(h, i + 1)
                acc[c.key].add(parent.lm_head(model.norm(h)), rb)
                secs[c.key] += time.perf_counter() - t0
                bar.update(1)
        if cands:
            bar.set_postfix_str(f"layer {i} done")
        del modules
        if i < last:
            t0 = time.perf_counter()
            states = [pl.ffn_residual(m) for m in mids]
            shared += time.perf_counter() - t0
    bar.close()
    rows = [_row(c, pc, acc[c.key].result(), ref.lm_loss) for c in candidates]
    return Scores(rows, {"lm_loss": ref.lm_loss, "tokens": ref.tokens},
                  time.perf_counter() - t_start, secs, shared)


@torch.no_grad()
def score_naive(parent: PuzzleForCausalLM, candidates: Sequence[Candidate], batches,
                progress: bool = False, desc: str = "naive") -> Scores:
    """The reference: per candidate build the whole one-block child (``blocks.build_child``)
    and run it end to end on every batch. Same metrics; slower; used to check and time
    ``score_candidates``."""
    _check_inputs(parent, candidates, batches)
    t_start = time.perf_counter()
    parent.eval()
    pc = parent.config
    dev = next(parent.parameters()).device
    ids = [x.to(dev) for x, _ in batches]
    tgts = [y.to(dev) for _, y in batches]
    ref_logits = [parent(x).logits for x in ids]
    refs = [_Reference(lg, y) for lg, y in zip(ref_logits, tgts)]  # the parent's log-probs, once
    parent_ce = sum(_ce_sum(lg, y) for lg, y in zip(ref_logits, tgts))
    n_tok = sum(y.numel() for y in tgts)
    parent_loss = parent_ce / n_tok
    shared = time.perf_counter() - t_start
    rows, secs = [], {}
    for c in tqdm(candidates, desc=desc, unit="cand", disable=not progress):
        t0 = time.perf_counter()
        child = build_child(parent, c.choices(pc), blocks=c.blocks()).to(dev)
        acc = _Accumulator()
        for b, x in enumerate(ids):
            acc.add(child(x).logits, refs[b])
        rows.append(_row(c, pc, acc.result(), parent_loss))
        secs[c.key] = time.perf_counter() - t0
        del child
    return Scores(rows, {"lm_loss": parent_loss, "tokens": n_tok}, time.perf_counter() - t_start,
                  secs, shared)


@torch.no_grad()
def score_child(parent: PuzzleForCausalLM, child: PuzzleForCausalLM, batches,
                reference: ParentReference | None = None) -> dict:
    """KL / LM loss / top-1 agreement of a whole child against the parent (a full forward)."""
    ref = reference or parent_reference(parent, batches)
    child.eval()
    acc = _Accumulator()
    for b, x in enumerate(ref.ids):
        acc.add(child(x).logits, ref.batch(b))
    r = acc.result()
    r["lm_loss_delta"] = r["lm_loss"] - ref.lm_loss
    return r


# ------------------------------------------------------------------------------- score table

class ScoreTable:
    """Replace-1-block scores, one row per (layer, variant, source); what stage 04 reads.

    ``source`` is "bld" (the library's trained blocks: what children are built from) or "init"
    (the same variants straight from the parent, before BLD; untrained blocks — the parent's
    own, no-ops — are stored once, as "bld", and answer for both). Metrics: ``kl`` (nats/token),
    ``kl_sem``, ``lm_loss``, ``lm_loss_delta``, ``top1_agreement``, ``nmse``. ``meta`` holds
    ``parent_lm_loss``, ``tokens``, ``seq_len`` and the library's parent fingerprint.
    """

    def __init__(self, rows: list[dict], meta: dict | None = None):
        self.rows = [dict(r) for r in rows]
        self.meta = dict(meta or {})
        self._index = {(r["layer"], r["variant"], r["source"]): r for r in self.rows}
        if len(self._index) != len(self.rows):
            raise ScoringError("score table has duplicate (layer, variant, source) rows; it is "
                               "damaged: rerun stage 03_scoring with force=True")
        self.num_layers = 1 + max((r["layer"] for r in self.rows), default=-1)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def sources(self) -> list[str]:
        return [s for s in SOURCES if any(r["source"] == s for r in self.rows)]

    def variants(self, layer: int, sub_block: str, source: str = "bld") -> list[str]:
        """Variant names scored at ``layer`` for ``sub_block`` (attn | ffn | pair), table order."""
        if sub_block not in SUB_BLOCKS:
            raise ScoringError(f"sub_block must be one of {SUB_BLOCKS}, got {sub_block!r}")
        names: list[str] = []
        for r in self.rows:
            if (r["layer"] == layer and r["sub_block"] == sub_block and r["variant"] not in names
                    and self._lookup(layer, r["variant"], source) is not None):
                names.append(r["variant"])
        return names

    def all_variants(self, sub_block: str, source: str = "bld") -> list[str]:
        """Union over layers of the scored variant names, first-seen order."""
        names: list[str] = []
        for i in range(self.num_layers):
            names += [n for n in self.variants(i, sub_block, source) if n not in names]
        return names

    def _lookup(self, layer: int, name: str, source: str) -> dict | None:
        r = self._index.get((layer, name, source))
        if r is None and source == "init":
            # Untrained blocks (the parent's own, no-ops) are the same before and after BLD and
            # are scored once, as "bld".
            b = self._index.get((layer, name, "bld"))
            r = b if b is not None and not b["trained"] else None
        return r

    def row(self, layer: int, variant: str | Variant, source: str = "bld") -> dict:
        """The candidate's row; a clear error (what to change) if it was not scored."""
        name = variant.name if isinstance(variant, Variant) else str(variant)
        r = self._lookup(layer, name, source)
        if r is not None:
            return r
        if not 0 <= layer < self.num_layers:
            raise ScoringError(f"layer {layer} is out of range: the table has layers "
                               f"0..{self.num_layers - 1}")
        if source not in self.sources:
            raise ScoringError(f"no {source!r} scores in this table (sources: {self.sources}); "
                               "for 'init' set scoring_include_init=True and rerun 03_scoring")
        sub = "pair" if "+" in name else name.split(":")[0]
        have = self.variants(layer, sub, source) if sub in SUB_BLOCKS else []
        raise ScoringError(
            f"variant {name!r} has no {source} score at layer {layer} (scored there: "
            f"{', '.join(have) or 'none'}). The block library (stage 02_bld) does not contain it: "
            "add it to bld_kv_heads / bld_ffn_fractions / bld_include_linear / bld_include_noop and "
            "rerun 02_bld and 03_scoring, or leave it out of the search space.")

    def score(self, layer: int, variant: str | Variant, metric: str = "kl",
              source: str = "bld") -> float:
        """One block's score, e.g. ``table.score(3, "ffn:0.25")`` → KL in nats/token."""
        if metric not in METRICS:
            raise ScoringError(f"unknown metric {metric!r}; metrics: {', '.join(METRICS)}")
        return float(self.row(layer, variant, source)[metric])

    def score_matrix(self, sub_block: str, metric: str = "kl", source: str = "bld"
                     ) -> tuple[list[str], np.ndarray]:
        """(variant names, array [layers, variants]); NaN where a layer lacks a variant."""
        names = self.all_variants(sub_block, source)
        out = np.full((self.num_layers, len(names)), np.nan)
        for i in range(self.num_layers):
            for j, n in enumerate(names):
                r = self._lookup(i, n, source)
                if r is not None:
                    out[i, j] = float(r[metric])
        return names, out

    def parent_choices(self) -> list[tuple[str, str]]:
        """The parent as a child spec, read off the rows marked ``is_parent``."""
        out = []
        for i in range(self.num_layers):
            pick = []
            for k in ("attn", "ffn"):
                names = [r["variant"] for r in self.rows if r["layer"] == i and r["sub_block"] == k
                         and r["is_parent"] and r["source"] == "bld"]
                pick.append(names[0] if names else f"{k}:noop")
            out.append((pick[0], pick[1]))
        return out

    def predict(self, child: Sequence[tuple[str, str]], metric: str = "kl",
                source: str = "bld") -> float:
        """The additive quality model: the sum of the child's blocks' scores (parent blocks: 0)."""
        if metric not in ADDITIVE_METRICS:
            raise ScoringError(f"only {ADDITIVE_METRICS} add up over blocks; got {metric!r}")
        if len(child) != self.num_layers:
            raise ScoringError(f"a child needs one (attention, ffn) pair per layer: got "
                               f"{len(child)}, the table has {self.num_layers} layers")
        return float(sum(self.score(i, str(v), metric, source)
                         for i, pair in enumerate(child) for v in pair))

    def missing(self, wanted: Iterable[tuple[int, str]], source: str = "bld") -> list[tuple[int, str]]:
        """The (layer, variant) pairs of ``wanted`` with no score (e.g. a cost table's rows)."""
        return [(i, str(n)) for i, n in wanted if self._lookup(i, str(n), source) is None]

    def require(self, wanted: Iterable[tuple[int, str]], what: str = "the cost table",
                source: str = "bld") -> None:
        """Raise :class:`ScoringError` naming every (layer, variant) of ``wanted`` not scored."""
        miss = self.missing(wanted, source)
        if miss:
            raise ScoringError(
                f"{len(miss)} (layer, variant) pairs listed in {what} have no score, e.g. "
                f"{miss[:4]}: the block library (stage 02_bld) lacks them. Add them to the BLD "
                "variant lists (bld_kv_heads, bld_ffn_fractions, bld_include_linear, "
                "bld_include_noop) and rerun 02_bld and 03_scoring, or drop them from the search.")

    # ---- serialisation ----
    def to_rows(self) -> list[dict]:
        return [dict(r) for r in self.rows]

    def to_csv(self, path: str | Path | None = None) -> str:
        text = _rows_to_csv(self.rows, COLUMNS)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_csv(cls, path: str | Path, meta: dict | None = None) -> "ScoreTable":
        return cls(read_csv_rows(path), meta)

    @classmethod
    def from_json(cls, path: str | Path) -> "ScoreTable":
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(d["rows"], d.get("meta"))


def _rows_to_csv(rows: list[dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        # repr-exact floats: the CSV reads back to the very numbers in scores.json.
        w.writerow({k: repr(v) if isinstance(v, float) else v for k, v in r.items()})
    return buf.getvalue()




# --------------------------------------------------------------------------- interactions

def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (for Spearman)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(_ranks(np.asarray(x, float)), _ranks(np.asarray(y, float)))


def interaction_children(table: ScoreTable, n: int, seed: int) -> list[list[tuple[str, str]]]:
    """``n`` random multi-block children: child k replaces m_k sub-blocks, m_k spread evenly
    from 1 to L (of the 2L attention/FFN positions), each by a uniformly drawn non-parent variant
    of the library — a range of predicted KLs from mild to severe, as the search would explore."""
    rng = random.Random(seed)
    base = table.parent_choices()
    L = table.num_layers
    positions = [(i, k) for i in range(L) for k in (0, 1)
                 if [v for v in table.variants(i, ("attn", "ffn")[k]) if v != base[i][k]]]
    if not positions:
        raise ScoringError("the library has no non-parent variant to build children from")
    out = []
    for c in range(n):
        m = 1 + round(c * (L - 1) / max(n - 1, 1))
        child = [list(p) for p in base]
        for i, k in rng.sample(positions, min(m, len(positions))):
            child[i][k] = rng.choice([v for v in table.variants(i, ("attn", "ffn")[k])
                                      if v != base[i][k]])
        out.append([tuple(p) for p in child])
    return out


def short_spec(child: Sequence[tuple[str, str]], base: Sequence[tuple[str, str]]) -> str:
    """Only what differs from the parent: "L0 attn:kv1 · L5 ffn:0.25"."""
    parts = [f"L{i} {v}" for i, (pair, ref) in enumerate(zip(child, base))
             for v, r in zip(pair, ref) if v != r]
    return " · ".join(parts) or "parent"


@torch.no_grad()
def check_interactions(parent: PuzzleForCausalLM, table: ScoreTable,
                       children: list[list[tuple[str, str]]],
                       blocks_for: Callable[[list[tuple[str, str]]], dict], batches,
                       progress: bool = True, reference: ParentReference | None = None
                       ) -> list[dict]:
    """Measured KL of each whole child vs the sum of its blocks' scores (full forwards)."""
    ref = reference or parent_reference(parent, batches)
    base = table.parent_choices()
    rows = []
    for k, child in enumerate(tqdm(children, desc="interactions", unit="child", disable=not progress)):
        model = build_child(parent, child, blocks=blocks_for(child)).to(next(parent.parameters()).device)
        r = score_child(parent, model, batches, ref)
        pred = table.predict(child, "kl")
        rows.append({"child": k, "n_replaced": sum(v != b for p, q in zip(child, base) for v, b in zip(p, q)),
                     "predicted_kl": pred, "measured_kl": r["kl"],
                     "ratio": r["kl"] / pred if pred > 0 else float("nan"),
                     "predicted_lm_loss_delta": table.predict(child, "lm_loss_delta"),
                     "measured_lm_loss_delta": r["lm_loss_delta"],
                     "measured_top1_agreement": r["top1_agreement"], "spec": short_spec(child, base)})
    return rows


def summarize_interactions(rows: list[dict]) -> dict:
    pred = [r["predicted_kl"] for r in rows]
    meas = [r["measured_kl"] for r in rows]
    ratios = [r["ratio"] for r in rows if math.isfinite(r["ratio"])]
    return {"children": len(rows),
            "spearman_kl": spearman(pred, meas), "pearson_kl": pearson(pred, meas),
            "pearson_log_kl": pearson(np.log(np.maximum(pred, 1e-12)),
                                      np.log(np.maximum(meas, 1e-12))) if rows else float("nan"),
            "ratio_median": float(np.median(ratios)) if ratios else float("nan"),
            "ratio_min": float(min(ratios)) if ratios else float("nan"),
            "ratio_max": float(max(ratios)) if ratios else float("nan"),
            "spearman_lm_loss_delta": spearman([r["predicted_lm_loss_delta"] for r in rows],
                                               [r["measured_lm_loss_delta"] for r in rows])}


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
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
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
                from .library import child_blocks
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
        atomic_write_text(st.path("interactions.csv"), _rows_to_csv(inter_rows, INTERACTION_COLUMNS))
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
