"""What the three training loops share (parent 00, BLD 02, GKD 05): optimiser, LR schedule, resume.

What it does: ``make_optimizer`` (AdamW, weight decay on matrices only), ``lr_at`` (linear warm-up,
then cosine decay to a floor), ``save_train_state`` / ``load_train_state`` (an atomic checkpoint of
weights, optimiser state, step and history, reused only under the same config key). Reads and
writes only the state folder it is given. Leaves out: the loops themselves (each stage's loss and
data differ: ``parent/stage.py``, ``bld/train.py``, ``gkd/stage.py``).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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
