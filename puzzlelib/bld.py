"""Stage 02 — the block library by blockwise local distillation (BLD), parallel and resumable.

What it does (DESIGN.md §1.2):

1. **Initialise** every library variant from the parent (``blocks.init_variant``: mean-pooled KV
   heads, ``W_o·W_v`` / ``W_down·W_up`` linear maps, FFN channels kept by channel contribution
   measured here on ``bld_calib_tokens`` calibration tokens).
2. **Decoupled BLD.** An attention variant of layer *i* reads the parent's residual stream
   entering layer *i*; an FFN variant reads the parent's residual stream after *the parent's*
   attention half of layer *i*. So attention variants are trained in the context of the parent's
   FFN and vice versa, and the cost is (m + n) jobs per layer, not m·n. Optional **coupled** pairs
   (``bld_coupled_pairs``) train an attention and an FFN variant together on the whole layer.
3. **Loss and metric: normalized MSE of the sub-block's own output**, the tensor the sub-block
   adds to the residual stream (``attn(norm(x))`` / ``mlp(norm(x))``; for a coupled pair the
   layer's total update)::

       nmse = Σ (child_out − parent_out)² / Σ parent_out²

   We deliberately do *not* include the residual: the numerator would be the same, but the
   denominator would be dominated by ‖x‖², which dwarfs a sub-block's contribution and makes every
   variant look nearly perfect (tiny, incomparable numbers). Without it the scale is honest and
   anchored: 0 = the parent's own sub-block, **1 = removing the sub-block** (a no-op outputs 0),
   >1 = worse than removing it.
4. **Shared parent activations, streamed layer by layer.** The parent is run over the training
   batches *once*, one layer at a time: the residual stream entering layer *i* for every batch is
   held (in RAM, or memory-mapped files with ``bld_activations_on_disk``), the parent's attention
   and FFN outputs of layer *i* are computed and stored next to it, every job of layer *i* trains
   on them, then the stream advances to layer *i+1*. Every variant of every layer sees exactly the
   same batches and the same token budget (``bld_tokens_per_variant``), and the parent costs one
   forward pass per token instead of one per job (``benchmarks/bench_bld.py`` measures the ratio).
   Memory: three streams of ``tokens × hidden`` in the parent's dtype.
5. **Parallel and resumable.** Each (layer, variant) job is independent and deterministic: its
   result depends only on the parent, the batches and the settings (it is seeded from
   ``zlib.crc32(seed, layer, variant)`` for anything random; there is no dropout), never on which
   process runs it. Under ``torchrun --nproc_per_node N -m puzzlelib.bld ...`` the jobs are
   sharded over ranks by estimated cost (longest first, gloo on CPU, nccl on GPU); each rank
   streams the parent itself up to the deepest layer it owns. That is the efficiency trade-off:
   no activation traffic between ranks, but every rank pays the parent's forward again (~20 % of
   a one-process ``default`` run, so N CPU ranks approach 0.8/N + 0.2 of its time; on a GPU with
   many jobs per rank it is a small share). Each finished block is written atomically to the library (``library.py``); a killed
   run restarts with the blocks that are missing and ends with the same library, bit for bit on
   CPU with the same thread count.
6. The parent's own sub-blocks are always in the library: copied, not trained, with their
   normalized MSE measured (0). No-op variants have nothing to train; their normalized MSE (1) is
   measured too, so the "before = after" rows are real numbers.

Budget (measured on 2 CPU cores shared with other jobs, torch 2.13, ``threads=1``): ``default``
trains 80 of its 112 blocks on 131,072 tokens each (10.5M block-training tokens) in ~125 s, at
~84k tokens/s, of which the parent's streamed forward is ~24 s; ``smoke`` trains 28 of 44 blocks
on 65,536 tokens each in ~6-8 s. With 2 threads on the same busy machine the default run took
280 s (oversubscribed OpenMP threads): set ``threads=1`` when other work shares the cores.
``benchmarks/bench_bld.py`` measured the shared stream ~11x faster than a parent forward per job.

Writes ``runs/<run>/02_bld/``: ``library/`` (see ``library.py``), ``metrics.json`` (normalized MSE
before/after per variant; deterministic), ``timing.json`` (seconds, tokens/s; machine-dependent).
Leaves out: training blocks on anything but the parent's activations (the paper's BLD), and
multi-node launch details (torchrun's own flags handle them).
"""

from __future__ import annotations

import math
import sys
import time
import zlib
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from . import data
from . import parent as parent_stage
from .blocks import Variant, VariantError, ffn_channel_scores, init_variant, list_library, parse_variant
from .config import RunConfig
from .distributed import Dist, stage_main
from .library import Library, LibraryMismatch, pair_name, parent_fingerprint, split_pair_name
from .model import PuzzleConfig, child_config
from .modeling_decilm import PuzzleDecoderLayer
from .parent import lr_at, make_optimizer
from .rundir import RunDir, atomic_write_json

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
    autocast_bf16: bool
    seed: int

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "BLDSettings":
        if cfg.bld_tokens_per_variant <= 0:
            raise BLDError(f"bld_tokens_per_variant must be > 0, got {cfg.bld_tokens_per_variant}")
        return cls(cfg.bld_tokens_per_variant, cfg.bld_batch_size, cfg.seq_len, cfg.bld_lr,
                   cfg.bld_min_lr_ratio, cfg.bld_warmup_steps, cfg.bld_weight_decay,
                   cfg.bld_grad_clip, cfg.bld_eval_tokens, cfg.bld_eval_every,
                   cfg.bld_calib_tokens, cfg.bld_autocast_bf16, cfg.seed)

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


# ------------------------------------------------------------------------ modules and maths

def job_module(parent: torch.nn.Module, job: Job,
               channel_scores: dict[int, torch.Tensor] | None) -> PuzzleDecoderLayer:
    """A standalone fp32 decoder layer holding only the job's sub-block(s) and pre-norm(s),
    initialised from the parent; the other half of the layer is a no-op."""
    pc: PuzzleConfig = parent.config
    i = job.layer
    bcs = [dict(b) for b in pc.block_configs]
    halves = {"attn": Variant("attn", "noop"), "ffn": Variant("ffn", "noop")}
    for v in job.variants:
        halves[v.kind] = v
    bcs[i] = {"attention": halves["attn"].block_config(pc, i), "ffn": halves["ffn"].block_config(pc, i)}
    layer = PuzzleDecoderLayer(child_config(pc, bcs), i)
    state = {}
    for v in job.variants:
        state.update(init_variant(parent, i, v, channel_scores))
    layer.load_state_dict({k: t.float() for k, t in state.items()}, strict=True)
    return layer.float()


def sub_out(layer: PuzzleDecoderLayer, kind: str, x: torch.Tensor, cos, sin) -> torch.Tensor:
    """What the sub-block adds to the residual stream (attention half, FFN half, or both)."""
    if kind == "attn":
        if layer.self_attn is None:
            return torch.zeros_like(x)
        return layer.self_attn(layer.input_layernorm(x), cos, sin, None, True, None)
    if kind == "ffn":
        if layer.mlp is None:
            return torch.zeros_like(x)
        return layer.mlp(layer.post_attention_layernorm(x))
    a = sub_out(layer, "attn", x, cos, sin)
    return a + sub_out(layer, "ffn", x + a, cos, sin)


def nmse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σ(out − target)² / Σ target² (fp32)."""
    out, target = out.float(), target.float()
    return (out - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)


# ------------------------------------------------------------------ the parent's activations

class Streams:
    """Per-layer parent activations for a fixed list of batches: ``x`` (residual stream entering
    the layer), ``attn`` and ``ffn`` (what the parent's sub-blocks add). Tensors [S, B, T, H] in
    RAM / on the device, or memory-mapped files under ``disk_dir``."""

    def __init__(self, n: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 disk_dir: Path | None = None):
        self.n, self.disk_dir = n, disk_dir
        self.device = device
        full = (n, *shape)
        if disk_dir is None:
            self.x, self.attn, self.ffn = (torch.empty(full, dtype=dtype, device=device)
                                           for _ in range(3))
        else:
            disk_dir.mkdir(parents=True, exist_ok=True)
            numel = math.prod(full)
            nbytes = numel * torch.empty(0, dtype=dtype).element_size()
            tensors = []
            for name in ("x", "attn", "ffn"):
                path = disk_dir / f"{name}.bin"
                with open(path, "wb") as f:
                    f.truncate(nbytes)
                t = torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
                tensors.append(t.view(full))
            self.x, self.attn, self.ffn = tensors

    def get(self, k: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target) of batch k for a job of this kind, on the compute device."""
        x = self.x[k].to(self.device, non_blocking=True)
        a = self.attn[k].to(self.device, non_blocking=True)
        if kind == "attn":
            return x, a
        f = self.ffn[k].to(self.device, non_blocking=True)
        if kind == "ffn":
            return x + a, f  # the same add the parent's attn_residual does
        return x, a + f

    def close(self) -> None:
        if self.disk_dir is not None:
            del self.x, self.attn, self.ffn
            for name in ("x", "attn", "ffn"):
                (self.disk_dir / f"{name}.bin").unlink(missing_ok=True)
            try:
                self.disk_dir.rmdir()
            except OSError:
                pass


class ParentStreamer:
    """Runs the parent one layer at a time over all training and all held-out batches."""

    def __init__(self, parent, train_ids: list[torch.Tensor], eval_ids: list[torch.Tensor],
                 device: torch.device, disk_dir: Path | None = None):
        self.parent = parent
        self.device = device
        p = next(parent.parameters())
        B, T = train_ids[0].shape
        H = parent.config.hidden_size
        self.train = Streams(len(train_ids), (B, T, H), p.dtype, device, disk_dir)
        self.eval = [Streams(1, tuple(e.shape) + (H,), p.dtype, device) for e in eval_ids]
        self.layer = -1  # the streams hold layer self.layer's inputs/outputs
        self.seconds = 0.0
        dummy = torch.zeros(1, T, H, dtype=p.dtype, device=device)
        cos, sin, mask, causal = parent.model.attention_inputs(dummy)
        assert mask is None and causal
        self.cos, self.sin = cos, sin
        t0 = time.perf_counter()
        with torch.no_grad():
            for k, ids in enumerate(train_ids):
                self.train.x[k] = parent.model.embed_tokens(ids.to(device))
            for s, ids in zip(self.eval, eval_ids):
                s.x[0] = parent.model.embed_tokens(ids.to(device))
        self.seconds += time.perf_counter() - t0

    def rope(self, T: int):
        return self.cos[:, :T], self.sin[:, :T]

    @torch.no_grad()
    def _layer_outputs(self, streams: Streams, i: int) -> None:
        pl = self.parent.model.layers[i]
        for k in range(streams.n):
            x = streams.x[k].to(self.device)
            cos, sin = self.rope(x.shape[-2])
            a = sub_out(pl, "attn", x, cos, sin)
            streams.attn[k] = a
            streams.ffn[k] = sub_out(pl, "ffn", x + a, cos, sin)

    @torch.no_grad()
    def _advance(self, streams: Streams) -> None:
        for k in range(streams.n):
            # (x + a) + f: exactly the parent's attn_residual then ffn_residual.
            x = streams.x[k].to(self.device)
            streams.x[k] = (x + streams.attn[k].to(self.device)) + streams.ffn[k].to(self.device)

    def goto(self, layer: int) -> None:
        """Make the streams hold layer ``layer`` (only forward moves)."""
        if layer < self.layer:
            raise ValueError("ParentStreamer only moves forward")
        t0 = time.perf_counter()
        while self.layer < layer:
            if self.layer >= 0:
                for s in [self.train, *self.eval]:
                    self._advance(s)
            self.layer += 1
            for s in [self.train, *self.eval]:
                self._layer_outputs(s, self.layer)
        self.seconds += time.perf_counter() - t0

    def eval_set(self, kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [s.get(0, kind) for s in self.eval]

    def close(self) -> None:
        self.train.close()


# ------------------------------------------------------------------------------- one block

@torch.no_grad()
def evaluate(module, kind: str, eval_set, rope: Callable) -> float:
    """Held-out normalized MSE over the whole eval set (ratio of sums, fp32, no autocast)."""
    was = module.training
    module.eval()
    num = den = 0.0
    for x, t in eval_set:
        cos, sin = rope(x.shape[-2])
        out = sub_out(module, kind, x.float(), cos.float(), sin.float())
        num += (out - t.float()).pow(2).sum().item()
        den += t.float().pow(2).sum().item()
    module.train(was)
    return num / max(den, 1e-30)


def train_block(module, job: Job, batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                eval_set, rope: Callable, s: BLDSettings, device: torch.device) -> dict:
    """Train one block in place (if it is trainable); return its history and before/after nmse.

    ``batch(step)`` gives (input, target) for step ``step``; every job gets the same steps.
    """
    torch.manual_seed(job.seed(s.seed))
    module.to(device)
    t0 = time.perf_counter()
    init = evaluate(module, job.kind, eval_set, rope)
    hist = {"step": [], "train_nmse": [], "lr": [], "eval_step": [0], "eval_nmse": [init]}
    if job.trained:
        opt = make_optimizer(module, s.lr, s.weight_decay)
        module.train()
        amp = (torch.autocast(device.type, dtype=torch.bfloat16) if s.autocast_bf16 else nullcontext())
        for step in range(s.steps):
            lr = lr_at(step, s.steps, s.lr, s.warmup_steps, s.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            x, target = batch(step)
            cos, sin = rope(x.shape[-2])
            with amp:
                out = sub_out(module, job.kind, x.float(), cos.float(), sin.float())
            loss = nmse(out, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if s.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(module.parameters(), s.grad_clip)
            opt.step()
            hist["step"].append(step)
            hist["train_nmse"].append(loss.item())
            hist["lr"].append(lr)
            if s.eval_every and (step + 1) % s.eval_every == 0 and step + 1 < s.steps:
                hist["eval_step"].append(step + 1)
                hist["eval_nmse"].append(evaluate(module, job.kind, eval_set, rope))
        final = evaluate(module, job.kind, eval_set, rope)
        hist["eval_step"].append(s.steps)
        hist["eval_nmse"].append(final)
    else:
        final = init
    module.eval()
    return {"kind": job.kind, "ops": [v.op for v in job.variants], "trained": job.trained,
            "why_not_trained": job.why_not_trained, "init_nmse": init, "final_nmse": final,
            "steps": s.steps if job.trained else 0,
            "tokens": s.steps * s.tokens_per_step if job.trained else 0,
            "params": sum(p.numel() for p in module.parameters()),
            "seconds": round(time.perf_counter() - t0, 4), "seed": job.seed(s.seed),
            "tokens_per_step": s.tokens_per_step, "history": hist}


def block_tensors(module: PuzzleDecoderLayer) -> dict[str, torch.Tensor]:
    """The block's tensors, named relative to "model.layers.{i}." (as init_variant names them)."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def train_blocks(parent, lib: Library, jobs: list[Job], settings: BLDSettings,
                 train_tokens: np.ndarray, held_tokens: np.ndarray, device: torch.device,
                 disk_dir: Path | None = None, stop_after_jobs: int | None = None,
                 progress: bool = True, desc: str = "BLD") -> dict:
    """Train ``jobs`` (any subset of the library's, e.g. one rank's shard) with shared, streamed
    parent activations and write each finished block to ``lib``. Jobs already in the library are
    skipped. Returns timing counters for this call."""
    pending = sorted((j for j in jobs if not lib.has(j.layer, j.name)), key=lambda j: j.layer)
    stats = {"jobs_run": 0, "train_tokens": 0, "parent_seconds": 0.0, "seconds": 0.0}
    if not pending:
        return stats
    t_start = time.perf_counter()
    s = settings
    scores = lib.channel_scores()
    train_ids = [data.batch_at(train_tokens, s.batch_size, s.seq_len, s.data_seed, k)[0]
                 for k in range(s.steps)]
    eval_ids = [x for x, _ in data.heldout_batches(held_tokens, s.batch_size, s.seq_len, s.eval_tokens)]
    streamer = ParentStreamer(parent, train_ids, eval_ids, device, disk_dir)
    done_here = 0
    try:
        bar = tqdm(pending, desc=desc, unit="block", disable=not progress)
        for job in bar:
            streamer.goto(job.layer)
            module = job_module(parent, job, scores)
            rec = train_block(module, job, lambda k, kind=job.kind: streamer.train.get(k, kind),
                              streamer.eval_set(job.kind), streamer.rope, s, device)
            lib.write_block(job.layer, job.name, block_tensors(module), rec)
            bar.set_postfix_str(f"L{job.layer} {job.name}: {rec['init_nmse']:.3g} -> "
                                f"{rec['final_nmse']:.3g}")
            stats["jobs_run"] += 1
            stats["train_tokens"] += rec["tokens"]
            done_here += 1
            if stop_after_jobs is not None and done_here >= stop_after_jobs and job is not pending[-1]:
                raise KeyboardInterrupt(f"stopped after {done_here} blocks (stop_after_jobs)")
    finally:
        streamer.close()
        stats["parent_seconds"] = streamer.seconds
        stats["seconds"] = time.perf_counter() - t_start
    return stats


# ---------------------------------------------------------------------------------- the stage

@dataclass
class BLDResult:
    """What notebook 02 shows and later stages read."""

    dir: Path
    library_dir: Path
    metrics: dict
    timing: dict
    reused: bool
    _lib: Library | None = field(default=None, repr=False)

    @property
    def library(self) -> Library:
        if self._lib is None:
            self._lib = Library.open(self.library_dir)
        return self._lib

    def records(self, with_history: bool = True) -> list[dict]:
        return self.library.records(with_history)

    def table(self) -> list[dict]:
        """One row per block: layer, variant, kind, trained, nmse before/after."""
        return metrics_rows(self.records(with_history=False))

    def load_blocks(self, parent=None, **kw) -> dict:
        from .library import load_blocks

        return load_blocks(self.library_dir, parent, **kw)


def metrics_rows(records: list[dict]) -> list[dict]:
    return [{"layer": r["layer"], "variant": r["variant"], "kind": r["kind"],
             "trained": r["trained"], "init_nmse": r["init_nmse"], "final_nmse": r["final_nmse"]}
            for r in records]


def summarize(records: list[dict], settings: BLDSettings) -> dict:
    """Deterministic metrics: normalized MSE before/after per variant (mean over layers)."""
    by: dict[str, dict] = {}
    for r in records:
        d = by.setdefault(r["variant"], {"kind": r["kind"], "trained": r["trained"],
                                          "init": [], "final": []})
        d["init"].append(r["init_nmse"])
        d["final"].append(r["final_nmse"])
    per_variant = {v: {"kind": d["kind"], "trained": d["trained"], "layers": len(d["init"]),
                       "init_nmse_mean": float(np.mean(d["init"])),
                       "final_nmse_mean": float(np.mean(d["final"])),
                       "final_nmse_max": float(np.max(d["final"]))} for v, d in by.items()}
    trained = [r for r in records if r["trained"]]
    improved = [r for r in trained if r["final_nmse"] < r["init_nmse"]]
    return {"blocks": len(records), "trained_blocks": len(trained),
            "improved_blocks": len(improved),
            "tokens_per_variant": settings.steps * settings.tokens_per_step,
            "steps_per_variant": settings.steps, "tokens_per_step": settings.tokens_per_step,
            "total_train_tokens": sum(r["tokens"] for r in trained),
            "per_variant": per_variant, "rows": metrics_rows(records)}


def _result(rd: RunDir, reused: bool) -> BLDResult:
    import json

    d = rd.stage_dir(STAGE)
    read = lambda n: json.loads((d / n).read_text())  # noqa: E731
    return BLDResult(d, d / "library", read("metrics.json"), read("timing.json"), reused)


def run(cfg: RunConfig, stop_after_jobs: int | None = None, progress: bool = True) -> BLDResult:
    """Run (or reuse) stage 02 for ``cfg``. Under torchrun every rank calls this; rank 0 owns the
    stage manifest, all ranks train their shard. ``stop_after_jobs`` simulates a kill (tests)."""
    settings = BLDSettings.from_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dd = Dist(cfg.device)
    rd = RunDir(cfg, create=dd.main)
    if not dd.decide(rd.should_run(STAGE) if dd.main else False):
        if dd.main:
            rd.note_reused(STAGE)
        return _result(rd, reused=True)
    pres = parent_stage.load(cfg)  # refuses a missing / stale parent, on every rank alike
    model = pres.load_model(dtype=getattr(torch, cfg.dtype)).to(dd.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    variants, jobs = plan(model.config, cfg)
    train_tokens = data.load_tokens(pres.dir / "tokens", "train")
    held_tokens = data.load_tokens(pres.dir / "tokens", "heldout")
    settings_dict = {"bld": asdict(settings), "config": cfg.hashed_values(STAGE)}
    # Collective calls (all_ok / sum / max) happen in the same order on every rank, whichever
    # rank fails: a failure is announced through all_ok instead of leaving the others waiting.
    finished = False
    try:
        with ExitStack() as stack:
            err: BaseException | None = None
            lib = None
            try:
                if dd.main:
                    st = stack.enter_context(rd.stage(STAGE))
                    lib = _open_library(st.dir / "library", model, settings_dict, jobs, variants,
                                        cfg, train_tokens, settings)
            except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the others
                err = e
            if not dd.all_ok(err is None):
                raise err or BLDError("another rank failed while preparing the library; see its log")
            if lib is None:
                lib = Library.open(rd.stage_dir(STAGE) / "library", model)
            mine = assign(jobs, dd.world, model.config, settings.seq_len)[dd.rank]
            disk = (rd.stage_dir(STAGE) / f".activations-rank{dd.rank}"
                    if cfg.bld_activations_on_disk else None)
            stats = {"jobs_run": 0, "train_tokens": 0, "parent_seconds": 0.0, "seconds": 0.0}
            try:
                stats = train_blocks(model, lib, mine, settings, train_tokens, held_tokens,
                                     dd.device, disk, stop_after_jobs, progress and dd.main,
                                     desc="BLD" if dd.world == 1 else f"BLD rank 0/{dd.world}")
            except BaseException as e:  # noqa: BLE001
                err = e
            if not dd.all_ok(err is None):
                raise err or BLDError("another rank failed during BLD; see its log (finished "
                                      "blocks are kept: rerun to resume)")
            timing = {"world_size": dd.world, "jobs_run": int(dd.sum(stats["jobs_run"])),
                      "train_tokens": int(dd.sum(stats["train_tokens"])),
                      "wall_seconds": round(dd.max(stats["seconds"]), 3),
                      "parent_stream_seconds": round(dd.max(stats["parent_seconds"]), 3),
                      "torch_threads": torch.get_num_threads(), "device": str(dd.device)}
            timing["train_tokens_per_second"] = round(
                timing["train_tokens"] / max(timing["wall_seconds"], 1e-9), 1)
            if dd.main:  # an error here fails the stage's manifest on the way out of `with`
                if not lib.is_complete():
                    raise BLDError(f"library incomplete after BLD: missing {lib.missing()[:5]}")
                metrics = summarize(lib.records(with_history=False), settings)
                atomic_write_json(st.dir / "metrics.json", metrics)
                atomic_write_json(st.dir / "timing.json", timing)
                st.metrics.update({k: v for k, v in metrics.items()
                                   if k not in ("rows", "per_variant")})
                st.metrics.update(timing)
        finished = True
    finally:
        # Rank 0 has left the stage (manifest written) before the others read its results.
        all_finished = dd.all_ok(finished)
    if not all_finished:
        raise BLDError("rank 0 failed to finish the stage; see its log")
    return _result(rd, reused=False)


def _open_library(root: Path, model, settings_dict: dict, jobs: list[Job], variants: dict,
                  cfg: RunConfig, train_tokens: np.ndarray, s: BLDSettings) -> Library:
    """Resume this stage's library, or start it (discarding one that is stale, or all of it with
    force), and make sure it holds the channel scores every rank initialises from."""
    phash = parent_fingerprint(model)
    args = (root, phash, settings_dict, [(j.layer, j.name) for j in jobs], variants,
            {"hidden_size": model.config.hidden_size,
             "num_hidden_layers": model.config.num_hidden_layers,
             "source": cfg.parent})
    if cfg.force and (root / "index.json").is_file():
        print(f"{STAGE}: force=True: discarding the existing library in {root}", flush=True)
        Library.delete(root)
    try:
        lib = Library.create(*args)
    except LibraryMismatch as e:
        # This folder belongs to the stage, and its manifest already says it is stale.
        print(f"{STAGE}: {str(e).split(';')[0]}: it is stale for this run; discarding it and "
              "rebuilding", flush=True)
        lib = Library.create(*args, overwrite=True)
    done = len(lib.jobs()) - len(lib.missing())
    if done:
        print(f"{STAGE}: resuming: {done} of {len(lib.jobs())} blocks already in {root}", flush=True)
    if lib.channel_scores() is None:
        n = max(1, math.ceil(s.calib_tokens / s.seq_len))
        batches = data.calibration_batches(train_tokens, n, s.batch_size, s.seq_len,
                                           zlib.crc32(f"{STAGE}:calib:{s.seed}".encode()))
        dev = next(model.parameters()).device
        lib.write_channel_scores(ffn_channel_scores(model, [x.to(dev) for x, _ in batches]))
    return lib


def load(cfg: RunConfig) -> BLDResult:
    """Stage 02's result for later stages; refuses a missing, unfinished or stale library."""
    rd = RunDir(cfg, create=False)
    rd.require(STAGE)
    return _result(rd, reused=True)


# ------------------------------------------------------------------------------------- CLI

def _report(res: BLDResult) -> None:
    m, t = res.metrics, res.timing
    print(f"{STAGE}: {m['blocks']} blocks ({m['trained_blocks']} trained, "
          f"{m['tokens_per_variant']} tokens each) in {res.library_dir}")
    if not res.reused:
        print(f"{STAGE}: {t['jobs_run']} blocks this run, {t['train_tokens_per_second']:.0f} "
              f"block-training tokens/s over {t['world_size']} process(es)")


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, "bld", "Stage 02 (BLD)", "Parallel", run, _report)


if __name__ == "__main__":
    sys.exit(main())
