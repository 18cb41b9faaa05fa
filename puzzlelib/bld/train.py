"""Stage 02's training of blocks: the parent's streamed activations and BLD's per-block loop.

What it does (DESIGN.md §1.2; ``bld.py``'s docstring gives the method and its budget):
``job_module`` builds a standalone fp32 decoder layer holding only a job's sub-block(s),
initialised from the parent; ``sub_out`` is what a sub-block adds to the residual stream and
``nmse`` the normalized MSE BLD trains and reports. ``Streams`` / ``ParentStreamer`` run the
parent once over the training and held-out batches, one layer at a time, keeping the residual
stream entering the layer and the parent's attention / FFN outputs (in RAM, on the device, or
memory-mapped files). ``train_block`` trains one block on them with the shared loop
(``core/train.py``: AdamW, warm-up + cosine LR) on the nmse, the forward under optional bf16
autocast, and ``evaluate`` measures it on the held-out batches; ``train_blocks``
drives a list of jobs (e.g. one rank's shard) through all of this. ``probe_step`` is one training
step at the stage's shapes, which ``precision.probe`` times in fp32 and bf16 (``bld_autocast_bf16="auto"``).

Reads: the parent model, its train / held-out token arrays and the library's FFN channel scores.
Writes: each finished block, atomically, to the ``Library`` it is given (and, with
``disk_dir``, temporary activation files that it deletes on the way out).
Leaves out: which jobs exist and who runs them (``plan.py``), the stage's manifest,
metrics, resume and torchrun coordination (``bld.py``), and the library's file format
(``library.py``).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ..core import data, precision
from .plan import BLDSettings, Job
from ..core.blocks import Variant, init_variant
from .library import Library
from ..core.configuration_decilm import PuzzleConfig
from ..core.model import child_config
from ..core.modeling_decilm import PuzzleDecoderLayer
from ..core.train import LoopSettings, train_loop

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


@torch.no_grad()
def fit_linear(layer: PuzzleDecoderLayer, kind: str, batches: list[tuple[torch.Tensor, torch.Tensor]],
               ridge: float = 1e-6) -> None:
    """Set a linear replacement (``attn:linear`` / ``ffn:linear``) to the least-squares map from its
    normalized input to the parent sub-block's output over ``batches`` (float64 normal equations,
    a ridge of ``ridge`` × the mean diagonal so a rank-deficient input still solves)."""
    lin = layer.self_attn.linear_attn if kind == "attn" else layer.mlp.linear_mlp
    norm = layer.input_layernorm if kind == "attn" else layer.post_attention_layernorm
    d = lin.in_features
    xtx = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    xty = torch.zeros(d + 1, lin.out_features, dtype=torch.float64)
    for x, target in batches:
        h = norm(x.float()).flatten(0, -2).double().cpu()
        h = torch.cat([h, torch.ones(len(h), 1, dtype=torch.float64)], 1)  # a bias column, used if the layer has one
        if lin.bias is None:
            h[:, -1] = 0
        xtx += h.T @ h
        xty += h.T @ target.flatten(0, -2).double().cpu()
    xtx += torch.eye(d + 1, dtype=torch.float64) * ridge * xtx.diagonal()[:d].mean().clamp_min(1e-30)
    w = torch.linalg.solve(xtx, xty)
    lin.weight.copy_(w[:d].T.to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_(w[d].to(lin.bias.dtype))


def nmse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σ(out − target)² / Σ target² (fp32)."""
    out, target = out.float(), target.float()
    return (out - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)


def probe_step(parent, s: BLDSettings, device: torch.device,
               rows: int | None = None) -> Callable[[bool], None]:
    """One BLD training step's compute at the stage's shapes (forward of an fp32 copy of the
    parent's layer 0, attention and FFN, on a [batch, seq_len, hidden] input, at most ``rows`` of
    the ``bld_batch_size`` sequences when given; normalized-MSE loss; backward; no update): what
    ``precision.probe`` times with and without bf16 autocast."""
    import copy

    layer = copy.deepcopy(parent.model.layers[0]).float().to(device).train()
    for p in layer.parameters():
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(0)  # the global RNG stays untouched
    shape = (min(rows or s.batch_size, s.batch_size), s.seq_len, parent.config.hidden_size)
    x, target = (torch.randn(shape, generator=g).to(device) for _ in range(2))
    cos, sin, _, _ = parent.model.attention_inputs(
        torch.zeros(1, s.seq_len, shape[-1], dtype=next(parent.parameters()).dtype, device=device))

    def step(bf16: bool) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            out = sub_out(layer, "both", x, cos.float(), sin.float())
        nmse(out, target).backward()
        layer.zero_grad(set_to_none=True)

    return step


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
        amp = (torch.autocast(device.type, dtype=torch.bfloat16) if s.autocast_bf16 else nullcontext())

        def grad_step(step: int) -> tuple[dict, float]:
            x, target = batch(step)
            cos, sin = rope(x.shape[-2])
            with amp:
                out = sub_out(module, job.kind, x.float(), cos.float(), sin.float())
            loss = nmse(out, target)
            loss.backward()
            return {"train_nmse": loss.item()}, loss.item()

        def held_out() -> tuple[dict, dict]:
            return {"eval_nmse": evaluate(module, job.kind, eval_set, rope)}, {}

        settings = LoopSettings(steps=s.steps, lr=s.lr, warmup_steps=s.warmup_steps,
                                min_lr_ratio=s.min_lr_ratio, weight_decay=s.weight_decay,
                                grad_clip=s.grad_clip, eval_every=s.eval_every)
        hist = train_loop(module, settings, grad_step, held_out, hist)
        final = hist["eval_nmse"][-1]  # the loop always evaluates after the last step
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
    if not isinstance(settings.autocast_bf16, bool):  # "auto" outside bld.run: decided here, unrecorded
        settings = replace(settings, autocast_bf16=precision.resolve_flag(
            settings.autocast_bf16, "02_bld", "bld_autocast_bf16", device,
            lambda rows=None: probe_step(parent, settings, device, rows)))
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
            if s.linear_init == "lstsq" and job.trained and [v.op for v in job.variants] == ["linear"]:
                fit_linear(module, job.kind, [streamer.train.get(k, job.kind) for k in range(s.steps)])
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
