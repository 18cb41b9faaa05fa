"""Stage 00 — the parent: the embedded default (trained here) or a Hugging Face Llama.

What it does:
* prepares the data every later stage shares: the corpus (``data.load_corpus``), a byte-level BPE
  tokenizer (trained for the embedded parent; a Hugging Face parent brings its own) and packed
  train / held-out token arrays;
* for ``parent="embedded"``: builds a small Llama as an all-parent ``PuzzleForCausalLM`` and trains
  it with the shared loop (``core/train.py``: AdamW, linear warm-up + cosine decay, gradient
  clipping, periodic held-out evaluation, tqdm) on next-token cross-entropy, the forward under
  bf16 autocast where the CPU runs it natively and a probe measures it faster (``precision.py``;
  else fp32) — checkpointing every ``parent_checkpoint_every`` steps so a killed
  run resumes where it stopped and ends with the same weights as an uninterrupted one (batch k
  depends only on (seed, k); no dropout; optimizer state is checkpointed);
* for any other parent (a .gguf file, the named real parent ``smollm2-135m``, a local Hugging Face
  folder or a hub id; ``parent_source.resolve`` says which weights and records it): converts it and
  only evaluates it;
* measures what the notebook reports: parameters, the fixed part's share of compute (embeddings +
  LM head; about 1.5 % for Llama-70B — a large share would cap every speed-up the search can find),
  held-out loss / perplexity / bits per byte, sample generations.

Writes ``runs/<run>/00_parent/``: ``model/`` (self-contained DeciLM checkpoint + tokenizer),
``tokenizer/``, ``tokens/`` (train.bin, heldout.bin, tokens.json), ``history.json`` (loss
curves), ``metrics.json``, ``samples.json``, ``corpus.json``, and — only while training is
unfinished — ``train_state/``. Leaves out: distributed training and mixed-precision weights
(a parent of this size trains in minutes on two cores).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core import data, precision

from . import source as parent_source
from ..core.config import RunConfig
from ..core.export import load_checkpoint, save_checkpoint
from ..core.configuration_decilm import PuzzleConfig
from ..core.modeling_decilm import PuzzleForCausalLM
from ..core.model import count_params
from ..core.rundir import RunDir
from ..core.train import Checkpoint, LoopSettings, train_loop
from ..core.atomic import atomic_write_json

STAGE = "00_parent"


class ParentStageError(ValueError):
    """The parent stage cannot run with this config; the message says what to change."""


@dataclass
class ParentResult:
    """What notebook 00 shows and later stages read."""

    dir: Path
    model_dir: Path
    metrics: dict
    history: dict
    samples: list
    reused: bool
    ffn_width_multiple: int = 8  # RunConfig.ffn_width_multiple: the grid the stages cut FFN widths on

    def load_model(self, dtype: torch.dtype = torch.float32) -> PuzzleForCausalLM:
        model = load_checkpoint(self.model_dir, dtype=dtype)
        model.config.ffn_width_multiple = self.ffn_width_multiple  # read by blocks.Variant.width
        return model

    def load_tokenizer(self):
        return data.load_tokenizer(self.model_dir)


# ----------------------------------------------------------------------------------- data

def prepare_data(cfg: RunConfig, out: Path, tokenizer=None):
    """Corpus → tokenizer (trained unless given) → packed token arrays under ``out``."""
    corpus = data.load_corpus(cfg.corpus, cfg.corpus_max_bytes, cfg.heldout_fraction, cfg.seed)
    if tokenizer is None:
        tokenizer = data.train_tokenizer(corpus.train_docs, cfg.vocab_size, out / "tokenizer",
                                         seq_len=max_positions(cfg), max_train_bytes=cfg.tokenizer_train_bytes)
    info = data.build_token_cache(corpus, tokenizer, out / "tokens")
    atomic_write_json(out / "corpus.json", corpus.summary())
    train = data.load_tokens(out / "tokens", "train")
    held = data.load_tokens(out / "tokens", "heldout")
    if len(held) < cfg.seq_len + 1:
        raise ParentStageError(
            f"The held-out split has only {len(held)} tokens, fewer than seq_len+1={cfg.seq_len + 1}: "
            "raise heldout_fraction or corpus_max_bytes, or lower seq_len."
        )
    return tokenizer, train, held, corpus, info


# ------------------------------------------------------------------------------- the model

def max_positions(cfg: RunConfig) -> int:
    """Positions the embedded parent supports: room beyond seq_len for prompts + generation."""
    return max(4 * cfg.seq_len, 256)


def embedded_config(cfg: RunConfig, tokenizer) -> PuzzleConfig:
    """The embedded default parent's architecture from the run config."""
    return PuzzleConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.parent_hidden_size,
        intermediate_size=cfg.parent_intermediate_size, num_hidden_layers=cfg.parent_num_layers,
        num_attention_heads=cfg.parent_num_heads, num_key_value_heads=cfg.parent_num_kv_heads,
        max_position_embeddings=max_positions(cfg), tie_word_embeddings=cfg.parent_tie_embeddings,
        rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def flops_per_token(config: PuzzleConfig, context: int) -> dict[str, float]:
    """Forward FLOPs per token (2 per multiply-add) split into the fixed part and the layers.

    ``context`` is the average number of keys a query sees (≈ seq_len / 2 for causal prefill).
    The embedding lookup costs no FLOPs; the LM head is the fixed part's compute.
    """
    h, hd, H = config.hidden_size, config.head_dim, config.num_attention_heads
    layers = 0.0
    for i in range(config.num_hidden_layers):
        kind = config.attn_kind(i)
        if kind == "gqa":
            layers += 2 * (2 * h * H * hd + 2 * h * config.kv_heads(i) * hd) + 2 * 2 * H * hd * context
        elif kind == "linear":
            layers += 2 * h * h
        fk = config.ffn_kind(i)
        layers += 2 * 3 * h * config.ffn_width(i) if fk == "swiglu" else 2 * h * h if fk == "linear" else 0
    head = 2 * h * config.vocab_size
    return {"layers": layers, "fixed": head, "fixed_share": head / (head + layers)}


@torch.no_grad()
def measured_fixed_share(model: PuzzleForCausalLM, batch: int, seq_len: int, repeats: int = 5) -> float:
    """Share of a prefill forward's wall time spent in the LM head (median over repeats)."""
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    hidden = model.model.norm(model.model.embed_tokens(ids))
    model(ids)  # warm-up
    full, head = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        model(ids)
        full.append(time.perf_counter() - t)
        t = time.perf_counter()
        model.lm_head(hidden)
        head.append(time.perf_counter() - t)
    return float(np.median(head) / np.median(full))


# ------------------------------------------------------------------------------- training

@torch.no_grad()
def evaluate(model: PuzzleForCausalLM, held: np.ndarray, cfg: RunConfig, max_tokens: int | None = None,
             autocast: bool = False) -> float:
    """Mean next-token cross-entropy (nats) over fixed, non-overlapping held-out windows."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for x, y in data.heldout_batches(held, cfg.parent_batch_size, cfg.seq_len, max_tokens):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(x).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        n += y.numel()
    model.train(was)
    return total / max(n, 1)


def probe_step(model: PuzzleForCausalLM, cfg: RunConfig, rows: int | None = None):
    """One parent training step's compute (forward + loss + backward, no optimizer update) on a
    copy of ``model`` at the stage's batch shape (at most ``rows`` of its ``parent_batch_size``
    sequences when given): what ``precision.probe`` times both ways."""
    import copy

    m = copy.deepcopy(model).train()
    g = torch.Generator().manual_seed(0)  # the global RNG stays untouched: training is unchanged
    shape = (min(rows or cfg.parent_batch_size, cfg.parent_batch_size), cfg.seq_len)
    x = torch.randint(0, m.config.vocab_size, shape, generator=g)
    y = torch.randint(0, m.config.vocab_size, shape, generator=g)

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = m(x).logits
        F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
        m.zero_grad(set_to_none=True)

    return step


def train_parent(model: PuzzleForCausalLM, cfg: RunConfig, train: np.ndarray, held: np.ndarray,
                 state_dir: Path, key: str, stop_after: int | None = None,
                 bf16: bool | None = None) -> dict:
    """Train ``model`` in place on ``train``; returns the history (train/eval loss curves).

    ``stop_after`` ends the loop early after that many steps *of this call* (used by tests to
    simulate an interruption). Resumes from ``state_dir`` when it holds a checkpoint for ``key``.
    ``bf16``: train under bf16 autocast; None = ``cfg.parent_autocast_bf16`` ("auto" decided here,
    unrecorded: ``run`` decides it once per run and passes it).
    """
    if bf16 is None:
        bf16 = precision.resolve_flag(cfg.parent_autocast_bf16, STAGE, "parent_autocast_bf16",
                                      "cpu", lambda rows=None: probe_step(model, cfg, rows))
    tokens_per_step = cfg.parent_batch_size * cfg.seq_len
    total = max(1, math.ceil(cfg.parent_train_tokens / tokens_per_step))
    settings = LoopSettings(steps=total, lr=cfg.parent_lr, warmup_steps=cfg.parent_warmup_steps,
                            min_lr_ratio=cfg.parent_min_lr_ratio,
                            weight_decay=cfg.parent_weight_decay,
                            grad_clip=cfg.parent_grad_clip, eval_every=cfg.parent_eval_every,
                            checkpoint_every=cfg.parent_checkpoint_every)
    history = {"step": [], "train_loss": [], "lr": [], "eval_step": [], "eval_loss": [],
               "tokens_per_step": tokens_per_step, "total_steps": total, "train_seconds": 0.0}

    def grad_step(step: int) -> tuple[dict, float]:
        x, y = data.batch_at(train, cfg.parent_batch_size, cfg.seq_len, cfg.seed, step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        return {"train_loss": round(loss.item(), 5)}, loss.item()

    def held_out() -> tuple[dict, dict]:
        ev = evaluate(model, held, cfg, cfg.parent_eval_tokens, bf16)
        return {"eval_loss": round(ev, 5)}, {"heldout": f"{ev:.3f}"}

    return train_loop(model, settings, grad_step, held_out, history, Checkpoint(state_dir, key),
                      clock="train_seconds", progress="parent training", stop_after=stop_after)


# --------------------------------------------------------------------------------- samples

@torch.no_grad()
def sample_generations(model, tokenizer, prompts: list[str], max_new_tokens: int = 48) -> list[dict]:
    """Greedy continuations of ``prompts`` (greedy: reproducible, and shows what the model knows)."""
    out = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt")["input_ids"]
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out.append({"prompt": p, "completion": tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)})
    return out


def heldout_prompts(corpus, n: int = 3, lines: int = 3) -> list[str]:
    """The first ``lines`` non-blank lines of the first ``n`` held-out documents' function bodies."""
    prompts = []
    for doc in corpus.heldout_docs:
        rows = doc.splitlines()
        starts = [i for i, r in enumerate(rows) if r.lstrip().startswith("def ")]
        if starts:
            prompts.append("\n".join(rows[starts[0]: starts[0] + lines]) + "\n")
        if len(prompts) == n:
            break
    return prompts or [corpus.heldout_docs[0][:200]]


# ---------------------------------------------------------------------------- the stage

def _load_result(rd: RunDir, reused: bool) -> ParentResult:
    d = rd.stage_dir(STAGE)
    read = lambda name: json.loads((d / name).read_text())  # noqa: E731
    return ParentResult(d, d / "model", read("metrics.json"), read("history.json"), read("samples.json"), reused)


def run(cfg: RunConfig, stop_after: int | None = None) -> ParentResult:
    """Run (or reuse) stage 00 for ``cfg``: the parent checkpoint every later stage reads."""
    rd = RunDir(cfg)
    if not rd.should_run(STAGE):
        rd.note_reused(STAGE)
        return _load_result(rd, reused=True)
    torch.manual_seed(cfg.seed)
    threads = precision.apply_threads(cfg.threads)
    with rd.stage(STAGE) as st:
        out = st.dir
        hf_tok = source = None
        # A .gguf file, a named real parent (smollm2-135m: hub or pinned wheel), a local folder
        # (relative to the project folder, also from a kernel in notebooks/) or a hub id.
        if cfg.parent != "embedded":
            source = parent_source.resolve(cfg.parent, seq_len=cfg.seq_len)
            st.metrics["parent_source"] = source.record()
            rd.note_environment(parent_source=source.record())
            hf_tok = source.load_tokenizer(trust_remote_code=cfg.trust_remote_code)
        tokenizer, train, held, corpus, tok_info = prepare_data(cfg, out, hf_tok)
        t0 = time.perf_counter()
        if cfg.parent == "embedded":
            model = PuzzleForCausalLM(embedded_config(cfg, tokenizer))
            choice = precision.decide(rd, STAGE, "parent_autocast_bf16", cfg.parent_autocast_bf16,
                                      "cpu", lambda rows=None: probe_step(model, cfg, rows))
            st.metrics["precision"] = choice.to_dict()
            history = train_parent(model, cfg, train, held, out / "train_state", st.key, stop_after,
                                   bf16=choice.bf16)
        else:
            model = source.load_model(dtype=getattr(torch, cfg.dtype), trust_remote_code=cfg.trust_remote_code)
            history = {"step": [], "train_loss": [], "eval_step": [], "eval_loss": [], "train_seconds": 0.0}
        check_compatible(model.config, tokenizer, cfg.seq_len)
        # fp32. The embedded parent over the whole held-out split; a real parent (~250 tokens/s
        # forward on one CPU core) over the first parent_eval_tokens of it.
        cap = None if cfg.parent == "embedded" else cfg.parent_eval_tokens
        held_loss = evaluate(model, held, cfg, cap)
        n_held = (len(held) - 1) // cfg.seq_len * cfg.seq_len
        n_held = n_held if cap is None else min(n_held, cap // cfg.seq_len * cfg.seq_len)
        bytes_per_token = corpus.heldout_bytes / max(1, int(tok_info["n_heldout_tokens"]))
        flops = flops_per_token(model.config, cfg.seq_len // 2)
        metrics = {
            "parent": cfg.parent,
            "parent_source": source.record() if source else {"kind": "embedded", "origin": "trained here"},
            "params": count_params(model),
            "non_embedding_params": count_params(model) - model.config.vocab_size * model.config.hidden_size
            * (1 if model.config.tie_word_embeddings else 2),
            "vocab_size": model.config.vocab_size,
            "fixed_flops_share": round(flops["fixed_share"], 4),
            "fixed_time_share": round(measured_fixed_share(model, min(4, cfg.parent_batch_size), cfg.seq_len), 4),
            "heldout_loss": round(held_loss, 5),
            "heldout_perplexity": round(math.exp(held_loss), 3),
            "heldout_bits_per_byte": round(held_loss / math.log(2) / bytes_per_token, 4),
            "heldout_tokens_evaluated": n_held,
            "train_tokens": len(history["step"]) * history.get("tokens_per_step", 0),
            "train_seconds": round(history["train_seconds"], 1),
            "train_tokens_per_second": round(len(history["step"]) * history.get("tokens_per_step", 0)
                                             / max(history["train_seconds"], 1e-9), 1),
            "torch_threads": threads,
            "setup_seconds": round(time.perf_counter() - t0 - history["train_seconds"], 1),
        }
        samples = sample_generations(model, tokenizer, heldout_prompts(corpus))
        save_checkpoint(model, out / "model", tokenizer=tokenizer)
        atomic_write_json(out / "history.json", history)
        atomic_write_json(out / "metrics.json", metrics)
        atomic_write_json(out / "samples.json", samples)
        shutil.rmtree(out / "train_state", ignore_errors=True)  # finished: nothing left to resume
        st.metrics.update(metrics)
    return _load_result(rd, reused=False)


def check_compatible(config: PuzzleConfig, tokenizer, seq_len: int) -> None:
    """Refuse a tokenizer/model vocabulary mismatch or a sequence longer than the positions."""
    if len(tokenizer) > config.vocab_size:
        raise ParentStageError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {config.vocab_size}: "
            "use the tokenizer that came with the parent."
        )
    if seq_len > config.max_position_embeddings:
        raise ParentStageError(
            f"seq_len={seq_len} exceeds the parent's max_position_embeddings={config.max_position_embeddings}: "
            "lower seq_len."
        )


def load(cfg: RunConfig) -> ParentResult:
    """Stage 00's result for later stages; refuses a missing, unfinished or stale parent."""
    rd = RunDir(cfg, create=False)
    rd.require(STAGE)
    res = _load_result(rd, reused=True)
    res.ffn_width_multiple = cfg.ffn_width_multiple
    return res
