"""Stage 05 — global knowledge distillation (GKD): teach each assembled child to work as a whole.

BLD trained every block alone, on the parent's own activations; in a child, each block instead
receives what the *child's* earlier (already approximate) blocks produce, and the errors compound.
GKD trains the whole child against the frozen parent, as the paper does:

    loss = w_cos · Σ_layers mean_tokens (1 − cos(h_child_l, h_parent_l))
         + w_kl  · mean_tokens KL(p_parent ‖ p_child)
         + w_lm  · cross-entropy on the data          (off by default: the paper found it hurts)

``h_l`` is the residual stream after layer ``l`` (the same L positions exist in parent and child:
Puzzle keeps the layer count and hidden size).

What it does:
* assembles every child chosen by stage 04 — the MIP's solution(s) *and* the baselines, so the
  comparison is fair: every child gets the same token budget, batches and schedule — from the BLD
  library (``library.build_child_from_library``);
* trains it with the shared loop (``core/train.py``: AdamW, linear warm-up + cosine decay,
  gradient clipping, tqdm, periodic held-out evaluation, atomic checkpoints); what is GKD's own is
  passed to it: the forwards under bf16 autocast where the device runs it natively and a probe
  measures it faster (``gkd_autocast_bf16="auto"``, ``precision.py``), gradient accumulation, the
  all-reduce across ranks, and the held-out metrics (KL, LM loss, top-1 agreement with the
  parent); a killed run resumes from its last checkpoint and ends
  with the same weights as an uninterrupted run (batch k depends only on (seed, k));
* runs data-parallel under ``torchrun --nproc_per_node N -m puzzlelib.gkd …`` (gloo on CPU, nccl on
  GPU): every rank draws the *same* global batch and takes its share of the rows, gradients are
  averaged, so N processes compute what one process computes (up to float summation order);
* exports each distilled child as a self-contained DeciLM checkpoint, and runs an optional loss
  ablation (KL only / cosine only / cosine + KL / + LM loss) on the MIP child.

Reads: stage 00 (parent, tokens), stage 02 (library), stage 04 (child specs). Writes
``runs/<run>/05_gkd/``: ``children/<name>/`` (checkpoint + ``history.json``), ``metrics.json``
(held-out metrics before/after per child), ``ablation.json``; ``train_state/<name>/`` only while a
child is unfinished. Leaves out: LoRA / partial fine-tuning, sequence packing across documents.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core import data, precision
from ..core.config import RunConfig
from ..core.distributed import Dist, stage_main
from ..core.export import save_checkpoint
from ..core.modeling_decilm import PuzzleForCausalLM
from ..core.train import Checkpoint, LoopSettings, train_loop
from ..core.rundir import RunDir
from ..core.atomic import atomic_write_json

STAGE = "05_gkd"


class GKDError(ValueError):
    """GKD cannot run with this input; the message says what to change."""


@dataclass(frozen=True)
class GKDSettings:
    """The knobs of one GKD run (from RunConfig's gkd_* fields)."""

    tokens: int              # training tokens per child (same budget for every child)
    batch_size: int          # sequences per optimizer step (global, across ranks)
    grad_accum: int          # micro-batches per step (batch_size must divide by it × world size)
    seq_len: int
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    cos_weight: float
    kl_weight: float
    lm_weight: float
    autocast_bf16: bool | str  # "auto" until gkd.run decides it (precision.py); then a bool
    eval_every: int
    eval_tokens: int
    checkpoint_every: int
    seed: int

    @classmethod
    def from_config(cls, cfg: RunConfig, **override) -> "GKDSettings":
        s = cls(tokens=cfg.gkd_tokens, batch_size=cfg.gkd_batch_size, grad_accum=cfg.gkd_grad_accum,
                seq_len=cfg.seq_len, lr=cfg.gkd_lr, min_lr_ratio=cfg.gkd_min_lr_ratio,
                warmup_steps=cfg.gkd_warmup_steps, weight_decay=cfg.gkd_weight_decay,
                grad_clip=cfg.gkd_grad_clip, cos_weight=cfg.gkd_cos_weight, kl_weight=cfg.gkd_kl_weight,
                lm_weight=cfg.gkd_lm_weight, autocast_bf16=cfg.gkd_autocast_bf16,
                eval_every=cfg.gkd_eval_every, eval_tokens=cfg.gkd_eval_tokens,
                checkpoint_every=cfg.gkd_checkpoint_every, seed=cfg.seed)
        s = cls(**{**asdict(s), **override})
        s.check()
        return s

    def check(self, world: int = 1) -> None:
        if self.tokens <= 0:
            raise GKDError(f"gkd_tokens={self.tokens}: the GKD token budget must be positive "
                           "(set gkd_tokens, e.g. 200000).")
        if self.batch_size % (self.grad_accum * world):
            raise GKDError(f"gkd_batch_size={self.batch_size} must be divisible by gkd_grad_accum × processes "
                           f"= {self.grad_accum} × {world}.")
        if self.cos_weight == self.kl_weight == self.lm_weight == 0:
            raise GKDError("All GKD loss weights are 0: set gkd_cos_weight / gkd_kl_weight / gkd_lm_weight.")

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.tokens / (self.batch_size * self.seq_len)))


# ---------------------------------------------------------------------------------- the loss

def gkd_loss(child_out, parent_out, labels: torch.Tensor | None, s: GKDSettings) -> tuple[torch.Tensor, dict]:
    """The weighted GKD loss and its terms (floats) for one batch.

    Both outputs must carry ``hidden_states`` (embeddings + every layer); the embedding entry is
    skipped (identical by construction). KL and cosine are computed in fp32.
    """
    terms: dict[str, torch.Tensor] = {}
    if s.cos_weight:
        cos = [1 - F.cosine_similarity(hc.float(), hp.float(), dim=-1).mean()
               for hc, hp in zip(child_out.hidden_states[1:], parent_out.hidden_states[1:])]
        terms["cosine"] = torch.stack(cos).sum()
    logp_child = F.log_softmax(child_out.logits.float(), -1)
    if s.kl_weight:
        logp_parent = F.log_softmax(parent_out.logits.float(), -1)
        terms["kl"] = F.kl_div(logp_child.flatten(0, 1), logp_parent.flatten(0, 1), log_target=True,
                               reduction="batchmean")
    if s.lm_weight:
        terms["lm"] = F.nll_loss(logp_child.flatten(0, 1), labels.flatten())
    weights = {"cosine": s.cos_weight, "kl": s.kl_weight, "lm": s.lm_weight}
    total = sum(weights[k] * v for k, v in terms.items())
    return total, {k: v.item() for k, v in terms.items()}


@torch.no_grad()
def evaluate(child: PuzzleForCausalLM, parent: PuzzleForCausalLM, held: np.ndarray, seq_len: int,
             batch_size: int, max_tokens: int | None, device: torch.device) -> dict:
    """Held-out KL(parent ‖ child), child LM loss, top-1 agreement with the parent (per token)."""
    was = child.training
    child.eval()
    kl = lm = agree = n = 0.0
    for x, y in data.heldout_batches(held, batch_size, seq_len, max_tokens):
        x, y = x.to(device), y.to(device)
        lc = F.log_softmax(child(x).logits.float(), -1)
        lp = F.log_softmax(parent(x).logits.float(), -1)
        kl += (lp.exp() * (lp - lc)).sum(-1).sum().item()
        lm += F.nll_loss(lc.flatten(0, 1), y.flatten(), reduction="sum").item()
        agree += (lc.argmax(-1) == lp.argmax(-1)).sum().item()
        n += y.numel()
    child.train(was)
    return {"kl": kl / n, "lm_loss": lm / n, "top1_agreement": agree / n, "tokens": int(n)}


def probe_step(parent: PuzzleForCausalLM, s: GKDSettings, dd: Dist, rows: int | None = None):
    """One GKD micro-step's compute at the stage's shapes (at most ``rows`` sequences of the
    micro-batch when given): the frozen parent's forward and a trainable copy's (the largest child
    a search can pick is the parent itself), the GKD loss and its backward, no update.
    ``precision.probe`` times it with and without bf16 autocast."""
    import copy

    child = copy.deepcopy(parent).float().train()
    for p in child.parameters():
        p.requires_grad_(True)
    micro = max(1, s.batch_size // (s.grad_accum * dd.world))
    micro = min(rows or micro, micro)
    g = torch.Generator().manual_seed(0)  # the global RNG stays untouched
    x, y = (torch.randint(0, parent.config.vocab_size, (micro, s.seq_len), generator=g).to(dd.device)
            for _ in range(2))

    def step(bf16: bool) -> None:
        with torch.autocast(dd.device.type, dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                pout = parent(x, output_hidden_states=True)
            cout = child(x, output_hidden_states=True)
        gkd_loss(cout, pout, y, s)[0].backward()
        child.zero_grad(set_to_none=True)

    return step


# ---------------------------------------------------------------------------------- training

def distill(child: PuzzleForCausalLM, parent: PuzzleForCausalLM, train: np.ndarray, held: np.ndarray,
            s: GKDSettings, state_dir: Path | None = None, key: str = "", dd: Dist | None = None,
            stop_after: int | None = None, desc: str = "GKD") -> dict:
    """Train ``child`` in place against the frozen ``parent``; returns the history.

    Every rank draws the same global batch for step k (``data.batch_at(seed, k)``) and processes
    rows ``rank::world`` of each micro-batch; with gradients averaged over ranks, N processes take
    the same optimizer steps as one. ``stop_after`` interrupts after that many steps of this call
    (tests simulate a kill with it); ``state_dir`` holds the checkpoint a rerun resumes from.
    """
    dd = dd or Dist()
    s.check(dd.world)
    parent.eval()
    for p in parent.parameters():
        p.requires_grad_(False)
    if not isinstance(s.autocast_bf16, bool):  # "auto" outside run(): decided here, unrecorded
        s = replace(s, autocast_bf16=precision.resolve_flag(
            s.autocast_bf16, STAGE, "gkd_autocast_bf16", dd.device, lambda rows=None: probe_step(parent, s, dd, rows)))
    history = {"step": [], "loss": [], "cosine": [], "kl": [], "lm": [], "lr": [], "eval_step": [],
               "eval": [], "tokens_per_step": s.batch_size * s.seq_len, "total_steps": s.steps, "seconds": 0.0}
    micro = s.batch_size // s.grad_accum

    def grad_step(step: int) -> tuple[dict, float]:
        x_all, y_all = data.batch_at(train, s.batch_size, s.seq_len, s.seed, step)
        sums = {"loss": 0.0, "cosine": 0.0, "kl": 0.0, "lm": 0.0}
        for a in range(s.grad_accum):
            rows = slice(a * micro + dd.rank, (a + 1) * micro, dd.world)
            x, y = x_all[rows].to(dd.device), y_all[rows].to(dd.device)
            with torch.autocast(dd.device.type, dtype=torch.bfloat16, enabled=s.autocast_bf16):
                with torch.no_grad():
                    pout = parent(x, output_hidden_states=True)
                cout = child(x, output_hidden_states=True)
            loss, terms = gkd_loss(cout, pout, y, s)
            (loss / s.grad_accum).backward()
            sums["loss"] += loss.item() / s.grad_accum
            for k, v in terms.items():
                sums[k] += v / s.grad_accum
        dd.average_grads(child)
        # The history holds the global batch's means; the bar shows this rank's loss.
        return {k: round(dd.mean(v), 6) for k, v in sums.items()}, sums["loss"]

    def held_out() -> tuple[dict, dict]:
        ev = evaluate(child, parent, held, s.seq_len, micro, s.eval_tokens, dd.device)
        return {"eval": ev}, {"heldout_kl": f"{ev['kl']:.3f}"}

    settings = LoopSettings(steps=s.steps, lr=s.lr, warmup_steps=s.warmup_steps,
                            min_lr_ratio=s.min_lr_ratio, weight_decay=s.weight_decay,
                            grad_clip=s.grad_clip, eval_every=s.eval_every,
                            checkpoint_every=s.checkpoint_every)
    checkpoint = Checkpoint(state_dir, key, write=dd.main) if state_dir is not None else None
    return train_loop(child, settings, grad_step, held_out, history, checkpoint,
                      clock="seconds", progress=desc if dd.main else None,
                      stop_after=stop_after, end_step=dd.barrier)


# --------------------------------------------------------------------------------- the stage

ABLATIONS = {  # the paper's Table: which loss terms GKD uses (cos, kl, lm weights)
    "KL only": (0.0, 1.0, 0.0),
    "cosine only": (1.0, 0.0, 0.0),
    "cosine + KL": (1.0, 1.0, 0.0),
    "cosine + KL + LM": (1.0, 1.0, 1.0),
}


@dataclass
class GKDResult:
    """What notebook 05 shows and stage 06 reads."""

    dir: Path
    metrics: dict
    ablation: dict
    reused: bool

    def child_dir(self, name: str) -> Path:
        return self.dir / "children" / safe_name(name)

    def history(self, name: str) -> dict:
        return json.loads((self.child_dir(name) / "history.json").read_text())

    @property
    def children(self) -> list[str]:
        return list(self.metrics["children"])


def safe_name(name: str) -> str:
    """A child's name as a folder name (specs may use spaces or slashes)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._") or "child"


def _as_child(item) -> tuple[str, list, object]:
    """(name, choices, spec-or-None) from a stage-04 ``ChildSpec`` or a ``(name, choices)`` pair."""
    if hasattr(item, "build_model"):
        return item.name, [tuple(c) for c in item.choices], item
    name, choices = item
    return name, [tuple(c) for c in choices], None


def distill_children(parent: PuzzleForCausalLM, children: list, library_root: Path, train: np.ndarray,
                     held: np.ndarray, s: GKDSettings, out: Path, key: str, dd: Dist,
                     stop_after: int | None = None, tokenizer=None, lm_eval: dict | None = None) -> dict:
    """Distil every child from the library; export each; return the metrics.

    ``lm_eval``: stage 06's HFLM settings (``eval_tasks.hflm_settings``); each exported child's
    README.md then holds the ``lm_eval`` command that reproduces stage 06's numbers.

    ``children`` holds stage 04's ``ChildSpec``s (built with ``spec.build_model``, which follows the
    spec's coupled-block flags, so the child trained is the child that was scored and searched) or
    plain ``(name, choices)`` pairs (decoupled blocks). Children already exported under
    ``out/children`` by an interrupted earlier run with the same key are kept, not retrained: the
    stage resumes child by child, and within a child from its last checkpoint.
    """
    from ..bld.library import LibraryError, build_child_from_library

    if not children:
        raise GKDError("No child to distil: stage 04 chose none, or gkd_children matched none.")
    results = {}
    for item in children:
        name, choices, spec = _as_child(item)
        cdir = out / "children" / safe_name(name)
        done_marker = cdir / "gkd.json"
        if done_marker.exists() and json.loads(done_marker.read_text()).get("key") == key:
            results[name] = json.loads(done_marker.read_text())["metrics"]
            continue
        try:
            child = (spec.build_model(parent, library_root) if spec is not None
                     else build_child_from_library(parent, choices, library_root, prefer_coupled=False))
            child = child.to(dd.device)
        except (LibraryError, ValueError) as e:
            raise GKDError(f"Child {name!r} does not match the block library: {e}") from e
        before = evaluate(child, parent, held, s.seq_len, s.batch_size, s.eval_tokens, dd.device)
        history = distill(child, parent, train, held, s, out / "train_state" / safe_name(name), key,
                          dd, stop_after, desc=f"GKD {name}")
        after = history["eval"][-1]
        m = {"choices": [list(c) for c in choices], "before": before, "after": after,
             "steps": len(history["step"]), "tokens": len(history["step"]) * history["tokens_per_step"],
             "seconds": round(history["seconds"], 1)}
        if dd.main:
            extra = {"history.json": json.dumps(history), "gkd.json": json.dumps({"key": key, "metrics": m})}
            save_checkpoint(child, cdir, tokenizer=tokenizer, lm_eval=lm_eval, extra_files=extra)
            shutil.rmtree(out / "train_state" / safe_name(name), ignore_errors=True)
        dd.barrier()
        results[name] = m
    return results


class _Renamed:
    """A child spec under another name (the ablation trains the same child several times)."""

    def __init__(self, item, name: str):
        self._name, self._choices, self._spec = _as_child(item)
        self.name, self.choices = name, self._choices

    def build_model(self, parent, library_root):
        if self._spec is not None:
            return self._spec.build_model(parent, library_root)
        from ..bld.library import build_child_from_library

        return build_child_from_library(parent, self._choices, library_root, prefer_coupled=False)


def _children_from_search(cfg: RunConfig) -> list:
    from ..search import stage as search

    res = search.load(cfg)
    specs = res.children  # the MIP solution(s) first, then the baselines
    want = None if cfg.gkd_children.strip() in ("", "all") else {n.strip() for n in cfg.gkd_children.split(",")}
    if want is not None:
        unknown = want - {c.name for c in specs}
        if unknown:
            raise GKDError(f"gkd_children names {sorted(unknown)} are not children of stage 04; "
                           f"they are: {[c.name for c in specs]}")
    return [c for c in specs if want is None or c.name in want]


def _hflm_settings(cfg: RunConfig, pres, tokenizer, parent) -> dict | None:
    """Stage 06's lm-eval settings for the children's README (None, with a note, when stage 06
    could not build its tasks: it will say why itself)."""
    from ..core.eval_tasks import EvaluationError, build_local_tasks, hflm_settings

    try:
        built = build_local_tasks(cfg, pres.dir)
        return hflm_settings(cfg, built, tokenizer, parent.config.max_position_embeddings)
    except EvaluationError as e:
        print(f"{STAGE}: the exported children carry no lm_eval command ({e})", flush=True)
        return None


def run(cfg: RunConfig, stop_after: int | None = None) -> GKDResult:
    """Run (or reuse) stage 05 for ``cfg``. Under torchrun every rank calls this."""
    from ..bld import stage as bld
    from ..parent import stage as parent_stage

    precision.apply_threads(cfg.threads)  # more threads than free cores slows everything 2-10x
    dd = Dist(cfg.device)
    rd = RunDir(cfg, create=dd.main)
    fresh = rd.is_fresh(STAGE) and not cfg.force
    if fresh:
        if dd.main:
            rd.note_reused(STAGE)
        return load(cfg)
    s = GKDSettings.from_config(cfg)
    s.check(dd.world)
    pres = parent_stage.load(cfg)
    parent = pres.load_model(dtype=getattr(torch, cfg.dtype)).to(dd.device).eval()
    library_root = bld.load(cfg).library_dir
    tokenizer = pres.load_tokenizer()  # exported children carry it: self-contained checkpoints
    children = _children_from_search(cfg)
    train = data.load_tokens(pres.dir / "tokens", "train")
    held = data.load_tokens(pres.dir / "tokens", "heldout")
    # Rank 0 decides the precision once per run (precision.decide keeps it for a resume); every
    # rank, and the ablation, trains in it; metrics.json's settings record it.
    for p in parent.parameters():
        p.requires_grad_(False)
    choice = (precision.decide(rd, STAGE, "gkd_autocast_bf16", cfg.gkd_autocast_bf16, dd.device,
                               lambda rows=None: probe_step(parent, s, dd, rows)) if dd.main else None)
    bf16 = dd.decide(bool(choice and choice.bf16))
    s = GKDSettings.from_config(cfg, autocast_bf16=bf16)

    def body(out: Path, key: str) -> tuple[dict, dict]:
        if cfg.force:
            # Finished children are kept across reruns with the same key (resume after a kill);
            # force means recompute, so the main rank drops them and their checkpoints first,
            # under the stage lock (as BLD drops its library).
            if dd.main:
                for sub in ("children", "train_state", "ablation"):
                    if (out / sub).exists():
                        print(f"{STAGE}: force=True: discarding {out / sub}", flush=True)
                        shutil.rmtree(out / sub)
            dd.barrier()
        metrics = distill_children(parent, children, library_root, train, held, s, out, key, dd, stop_after,
                                   tokenizer=tokenizer, lm_eval=_hflm_settings(cfg, pres, tokenizer, parent))
        ablation = {}
        if cfg.gkd_ablation:
            first = children[0]
            for label, (wc, wk, wl) in ABLATIONS.items():
                sa = GKDSettings.from_config(cfg, tokens=cfg.gkd_ablation_tokens, cos_weight=wc, kl_weight=wk,
                                             lm_weight=wl, autocast_bf16=bf16)
                item = _Renamed(first, f"ablation-{label}")
                r = distill_children(parent, [item], library_root, train, held, sa, out / "ablation", key, dd,
                                     tokenizer=tokenizer)
                ablation[label] = r[f"ablation-{label}"]["after"]
        return metrics, ablation

    if dd.main:
        with rd.stage(STAGE) as st:
            st.metrics["precision"] = choice.to_dict()
            metrics, ablation = body(st.dir, st.key)
            summary = {"children": metrics, "settings": asdict(s), "world_size": dd.world}
            atomic_write_json(st.dir / "metrics.json", summary)
            atomic_write_json(st.dir / "ablation.json", ablation)
            st.metrics.update({f"{n}.kl_after": m["after"]["kl"] for n, m in metrics.items()})
        dd.barrier()
    else:
        body(rd.stage_dir(STAGE), rd.config_key(STAGE))
        dd.barrier()
    return GKDResult(rd.stage_dir(STAGE), json.loads((rd.stage_dir(STAGE) / "metrics.json").read_text()),
                     json.loads((rd.stage_dir(STAGE) / "ablation.json").read_text()), reused=False)


def load(cfg: RunConfig) -> GKDResult:
    """Stage 05's result for later stages; refuses a missing, unfinished or stale stage."""
    rd = RunDir(cfg, create=False)
    rd.require(STAGE)
    d = rd.stage_dir(STAGE)
    return GKDResult(d, json.loads((d / "metrics.json").read_text()), json.loads((d / "ablation.json").read_text()),
                     reused=True)


def _report(res: GKDResult) -> None:
    for n, m in res.metrics["children"].items():
        print(f"{STAGE}: {n}: held-out KL {m['before']['kl']:.4f} -> {m['after']['kl']:.4f}")


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, "gkd", "Stage 05 (GKD)", "Data-parallel", run, _report)


if __name__ == "__main__":
    sys.exit(main())
