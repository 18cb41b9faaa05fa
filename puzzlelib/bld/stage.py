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
   many jobs per rank it is a small share). Each finished block is written atomically to the
   library (``library.py``); a killed run restarts with the blocks that are missing and ends with
   the same library, bit for bit on CPU with the same thread count.
6. The parent's own sub-blocks are always in the library: copied, not trained, with their
   normalized MSE measured (0). No-op variants have nothing to train; their normalized MSE (1) is
   measured too, so the "before = after" rows are real numbers.

Budget (measured on 2 CPU cores shared with other jobs, torch 2.13, ``threads=1``): ``default``
trains 80 of its 112 blocks on 131,072 tokens each (10.5M block-training tokens) in ~125 s, at
~84k tokens/s, of which the parent's streamed forward is ~24 s; ``smoke`` trains 28 of 44 blocks
on 65,536 tokens each in ~6-8 s. With 2 threads on the same busy machine the default run took
280 s (oversubscribed OpenMP threads): ``threads="auto"`` (the default) picks 1 thread on 2 cores.
``benchmarks/bench_bld.py`` measured the shared stream ~11x faster than a parent forward per job.

Writes ``runs/<run>/02_bld/``: ``library/`` (see ``library.py``), ``metrics.json`` (normalized MSE
before/after per variant; deterministic), ``timing.json`` (seconds, tokens/s; machine-dependent).
Leaves out: training blocks on anything but the parent's activations (the paper's BLD), and
multi-node launch details (torchrun's own flags handle them).

Code layout: the job plan (``BLDSettings``, ``Job``, ``plan``, ``assign``, ``BLDError``) is in
``plan.py``; the parent's streamed activations and the training of one block (``Streams``,
``ParentStreamer``, ``train_block``, ``train_blocks``, ``nmse``) are in ``train.py``. This
module holds the stage's entry points (``run``, ``load``, ``main``) and its metrics; import the
other names from the module that defines them (docs/modules.md).
"""

from __future__ import annotations

import math
import shutil
import sys
import zlib
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..core import data, precision
from ..parent import stage as parent_stage
from .plan import STAGE, BLDError, BLDSettings, Job, assign, plan

from .train import probe_step, train_blocks
from ..core.blocks import ffn_channel_scores
from ..core.config import RunConfig
from ..core.distributed import Dist, stage_main
from .library import Library, LibraryMismatch, parent_fingerprint
from ..core.rundir import RunDir
from ..core.atomic import atomic_write_json

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
    precision.apply_threads(cfg.threads)
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
    # Rank 0 decides the precision (once per run: precision.decide keeps it for a resume) and
    # every rank trains in it; the library's index records the decision with the settings.
    choice = (precision.decide(rd, STAGE, "bld_autocast_bf16", cfg.bld_autocast_bf16, dd.device,
                               lambda rows=None: probe_step(model, settings, dd.device, rows))
              if dd.main else None)
    settings = replace(settings, autocast_bf16=dd.decide(bool(choice and choice.bf16)))
    train_tokens = data.load_tokens(pres.dir / "tokens", "train")
    held_tokens = data.load_tokens(pres.dir / "tokens", "heldout")
    bld_settings = asdict(settings)
    if settings.linear_init == "weights":  # the default, added later: libraries written before it stay valid
        bld_settings.pop("linear_init")
    settings_dict = {"bld": bld_settings, "config": cfg.hashed_values(STAGE)}
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
                    st.metrics["precision"] = choice.to_dict()
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
    elif root.is_dir() and not (root / "index.json").is_file():
        # Its index.json was damaged and removed (RunDir._drop_damaged): without it no block can
        # be tied to this parent and these settings, so the folder (the stage's own) is rebuilt.
        print(f"{STAGE}: {root} has lost its index.json: rebuilding the library", flush=True)
        shutil.rmtree(root)
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
