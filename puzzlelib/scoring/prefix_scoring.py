"""Replace-1-block scoring primitives: the candidates, and scoring them with prefix caching.

What it does: builds the candidates of stage 03 — ``Candidate`` (one (layer, variant, source)
and a lazy loader of its tensors), ``library_candidates`` (every block of the library, plus its
pure-init twin), ``blocks_candidates`` (in-memory blocks), ``candidate_layer`` (the one-layer
module a candidate runs) — and scores them against the parent on held-out batches:
``parent_reference`` (the parent's pass, once), ``score_candidates`` (prefix-cached),
``score_naive`` (a full forward per one-block child, the reference) and ``score_child`` (one
whole child). Metrics per candidate: KL(parent ‖ candidate) in nats/token with its standard
error over sequences, LM loss and its change from the parent's, top-1 agreement.

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

Reads: the parent model, a :class:`~puzzlelib.bld.library.Library` (or in-memory blocks) and token
batches, all in memory. Writes: nothing (rows and timings are returned). Leaves out: the score
table (``score_table``), the interaction check (``interactions``) and the stage's files and
reuse logic (``scoring``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..core.blocks import Variant, VariantError, build_child, init_variant, parse_variant
from ..bld.library import Library, split_pair_name, split_pair_tensors
from ..core.configuration_decilm import PuzzleConfig
from ..core.modeling_decilm import PuzzleForCausalLM
from ..core.model import child_config
from ..core.modeling_decilm import PuzzleDecoderLayer
from .score_table import SOURCES, STAGE, ScoringError


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
