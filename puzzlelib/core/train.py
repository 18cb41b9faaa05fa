"""The one training loop that stage 00 (parent), 02 (BLD) and 05 (GKD) run, and what it uses.

What it does: ``train_loop`` owns a training run's step mechanics — the LR of each step
(``lr_at``: linear warm-up, then cosine decay to a floor), zeroing the gradients, optional
gradient clipping, the optimizer step (``make_optimizer``: AdamW, weight decay on matrices only),
the history of every step, held-out evaluation every ``eval_every`` steps and after the last,
resumable checkpoints every ``checkpoint_every`` steps (``save_train_state`` /
``load_train_state``: weights, optimiser state, step and history, reused only under the same
config key), a progress bar, and the ``stop_after`` interruption tests use to simulate a kill.
Each stage passes what differs as callbacks: how one step's gradients are computed (data,
forward under its own autocast, loss, backward; GKD's gradient accumulation and all-reduce) and
how the model is evaluated (``parent/stage.py``, ``bld/train.py``, ``gkd/stage.py``).
Reads and writes only the checkpoint folder it is given. Leaves out: losses, data, evaluation
metrics and mixed precision (the callbacks'), learning-rate schedules other than warm-up + cosine.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .atomic import atomic_dir
from .export import tensors_to_save


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to ``peak``, then cosine decay to ``min_ratio * peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Decay matrices only: decaying norm gains pulls them towards 0, which is not regularisation.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), eps=1e-8)


def save_train_state(state_dir: Path, model, opt, step: int, history: dict, key: str) -> None:
    """Atomically checkpoint a training run (weights, optimizer, step, history) for resuming."""
    with atomic_dir(state_dir) as tmp:
        save_file(tensors_to_save(model), str(tmp / "model.safetensors"))
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "key": key, "history": history}))


def load_train_state(state_dir: Path, model, opt, key: str):
    """(step, history) from a checkpoint made with the same config key, else None."""
    meta = state_dir / "state.json"
    if not meta.exists():
        return None
    state = json.loads(meta.read_text())
    if state.get("key") != key:
        shutil.rmtree(state_dir, ignore_errors=True)  # made under another config: useless
        return None
    model.load_state_dict(load_file(str(state_dir / "model.safetensors")), strict=False)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    # weights_only: the optimizer state is tensors and numbers; never unpickle arbitrary objects.
    opt.load_state_dict(torch.load(state_dir / "optimizer.pt", weights_only=True))
    return state["step"], state["history"]


@dataclass(frozen=True)
class LoopSettings:
    """The knobs ``train_loop`` reads: length, LR schedule, AdamW, clipping, and when it evaluates
    and checkpoints (each stage fills it from its own config fields)."""

    steps: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float
    weight_decay: float
    grad_clip: float             # max gradient norm; 0 = no clipping
    eval_every: int              # evaluate every this many steps and after the last; 0 = last only
    checkpoint_every: int = 0    # checkpoint every this many steps, never after the last; 0 = never


@dataclass(frozen=True)
class Checkpoint:
    """Where a loop checkpoints and resumes from, under which config key; ``write`` is False on
    the ranks that only resume from it (the main rank writes)."""

    dir: Path
    key: str
    write: bool = True


def train_loop(model: torch.nn.Module, s: LoopSettings,
               grad_step: Callable[[int], tuple[dict, float]],
               evaluate: Callable[[], tuple[dict, dict]], history: dict,
               checkpoint: Checkpoint | None = None, clock: str | None = None,
               progress: str | None = None, stop_after: int | None = None,
               end_step: Callable[[], None] | None = None) -> dict:
    """Train ``model`` in place for ``s.steps`` steps; returns the history (resumed, if it was).

    ``grad_step(k)`` computes step k's gradients (after they were zeroed) and returns (values to
    append to the history, the loss the progress bar shows). ``evaluate()`` evaluates the model
    as it is and returns (values to append to the history, extra progress-bar fields). ``history``
    must hold a list for ``step``, ``lr``, ``eval_step`` and every key the callbacks return; it is
    replaced by the checkpoint's when ``checkpoint`` holds one for its key. ``clock``: the history
    key that accumulates training seconds across resumes (None: none). ``progress``: the bar's
    label (None: no bar). ``stop_after`` interrupts after that many steps of this call (tests
    simulate a kill with it). ``end_step`` runs after every step (GKD: a barrier across ranks).
    """
    opt = make_optimizer(model, s.lr, s.weight_decay)
    start = 0
    if checkpoint is not None:
        resumed = load_train_state(checkpoint.dir, model, opt, checkpoint.key)
        if resumed is not None:
            start, history = resumed
    model.train()
    t0 = time.perf_counter() - (history[clock] if clock else 0.0)
    steps = range(start, s.steps)
    bar = (tqdm(steps, desc=progress, initial=start, total=s.steps, unit="step")
           if progress else None)
    for done_here, step in enumerate(bar if bar is not None else steps, 1):
        lr = lr_at(step, s.steps, s.lr, s.warmup_steps, s.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)  # before the step, so it may accumulate micro-batches
        values, loss = grad_step(step)
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        history["step"].append(step)
        history["lr"].append(lr)
        _append(history, values)
        last = step == s.steps - 1
        if (s.eval_every and (step + 1) % s.eval_every == 0) or last:
            values, shown = evaluate()
            history["eval_step"].append(step + 1)
            _append(history, values)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", **shown)
        if clock:
            history[clock] = time.perf_counter() - t0
        if (checkpoint is not None and checkpoint.write and s.checkpoint_every
                and (step + 1) % s.checkpoint_every == 0 and not last):
            save_train_state(checkpoint.dir, model, opt, step + 1, history, checkpoint.key)
        if end_step is not None:
            end_step()
        if stop_after is not None and done_here >= stop_after and not last:
            raise KeyboardInterrupt(f"stopped after {done_here} steps (stop_after)")
    model.eval()
    return history


def _append(history: dict, values: dict) -> None:
    """Append each value to the history's list of that name."""
    for k, v in values.items():
        history[k].append(v)
