"""BLD throughput: shared, streamed parent activations vs a parent forward per variant.

Stage 02 runs the parent once per batch, layer by layer, and trains every variant of a layer on
the stored activations (``bld.train_blocks``). The naive alternative gives each (layer, variant)
job its own parent forward (embeddings -> layer i) for every training and held-out batch. Both
train exactly the same blocks on exactly the same activations, so they must produce identical
weights; this script checks that, then prints block-training tokens/s of both, side by side, and
their ratio. Modes alternate round by round so machine noise hits both alike; the median counts.

    python benchmarks/bench_bld.py [--hidden 256 --layers 8 --heads 8 --kv 4 --ffn 768
                                    --seq 256 --batch 8 --steps 8 --rounds 2 --preset default]

Random weights (timings do not depend on values); the variant menu comes from ``--preset``'s
bld_* fields. Writes only a temporary folder.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from puzzlelib.bld import plan
from puzzlelib.bld import train as bld_train

from puzzlelib.core import data
from puzzlelib.core.blocks import ffn_channel_scores
from puzzlelib.core.config import RunConfig
from puzzlelib.bld.library import Library
from puzzlelib.core.configuration_decilm import PuzzleConfig
from puzzlelib.core.modeling_decilm import PuzzleForCausalLM


def own_forward(parent, jobs, s: plan.BLDSettings, train, held, scores) -> tuple[float, dict]:
    """Each job runs the parent from the embeddings to its layer for every batch it sees."""
    model = parent.model
    ids = [data.batch_at(train, s.batch_size, s.seq_len, s.data_seed, k)[0] for k in range(s.steps)]
    eval_ids = [x for x, _ in data.heldout_batches(held, s.batch_size, s.seq_len, s.eval_tokens)]
    cos, sin, _, _ = model.attention_inputs(torch.zeros(1, s.seq_len, parent.config.hidden_size))
    rope = lambda T: (cos[:, :T], sin[:, :T])  # noqa: E731

    @torch.no_grad()
    def acts(tokens, layer, kind):
        x, _ = model.forward_layers(model.embed_tokens(tokens), 0, layer)
        pl = model.layers[layer]
        a = bld_train.sub_out(pl, "attn", x, cos, sin)
        if kind == "attn":
            return x, a
        f = bld_train.sub_out(pl, "ffn", x + a, cos, sin)
        return (x + a, f) if kind == "ffn" else (x, a + f)

    out, t0 = {}, time.perf_counter()
    for job in jobs:
        module = bld_train.job_module(parent, job, scores)
        eval_set = [acts(e, job.layer, job.kind) for e in eval_ids]
        bld_train.train_block(module, job, lambda k, j=job: acts(ids[k], j.layer, j.kind), eval_set, rope,
                        s, torch.device("cpu"))
        out[(job.layer, job.name)] = bld_train.block_tensors(module)
    return time.perf_counter() - t0, out


def shared(parent, jobs, s, train, held, scores, variants, tmp: Path) -> tuple[float, dict]:
    lib = Library.create(tmp, "bench", {"bench": True}, [(j.layer, j.name) for j in jobs], variants,
                         overwrite=True)
    lib.write_channel_scores(scores)
    t0 = time.perf_counter()
    bld_train.train_blocks(parent, lib, jobs, s, train, held, torch.device("cpu"), progress=False)
    seconds = time.perf_counter() - t0
    return seconds, {(j.layer, j.name): lib.read_block(j.layer, j.name) for j in jobs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="training steps per block")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--preset", default="default", help="variant menu from this preset's bld_* fields")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", message=".*weight norms")
    torch.manual_seed(0)
    pc = PuzzleConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv, max_position_embeddings=max(256, a.seq))
    parent = PuzzleForCausalLM(pc).eval()
    for p in parent.parameters():
        p.requires_grad_(False)
    cfg = RunConfig.from_preset(a.preset, {"seq_len": a.seq, "bld_batch_size": a.batch,
                                           "bld_tokens_per_variant": a.steps * a.batch * a.seq,
                                           "bld_eval_tokens": a.eval_tokens, "bld_eval_every": 0})
    s = plan.BLDSettings.from_config(cfg)
    variants, jobs = plan.plan(pc, cfg)
    rng = np.random.default_rng(0)
    train = rng.integers(0, a.vocab, 200_000).astype(np.uint16)
    held = rng.integers(0, a.vocab, 20_000).astype(np.uint16)
    scores = ffn_channel_scores(parent, [torch.from_numpy(train[:4 * a.seq].astype(np.int64)).view(4, a.seq)])
    trained_tokens = sum(s.steps * s.tokens_per_step for j in jobs if j.trained)
    print(f"parent: hidden {a.hidden}, {a.layers} layers, ffn {a.ffn}; {len(jobs)} blocks "
          f"({sum(j.trained for j in jobs)} trained) x {s.steps} steps x {s.tokens_per_step} tokens; "
          f"{torch.get_num_threads()} threads")
    times = {"shared": [], "own": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            t_sh, blocks_sh = shared(parent, jobs, s, train, held, scores, variants, Path(tmp) / "lib")
            t_own, blocks_own = own_forward(parent, jobs, s, train, held, scores)
            times["shared"].append(t_sh)
            times["own"].append(t_own)
            print(f"round {r + 1}: shared {t_sh:.2f} s, own forward {t_own:.2f} s")
    same = all(torch.equal(blocks_sh[k][n], blocks_own[k][n]) for k in blocks_sh for n in blocks_sh[k])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{'mode':<34}{'seconds':>10}{'block-training tok/s':>24}")
    for k, label in (("shared", "shared streamed parent activations"), ("own", "own parent forward per variant")):
        print(f"{label:<34}{med[k]:>10.2f}{trained_tokens / med[k]:>24,.0f}")
    print(f"\nspeed-up of sharing: {med['own'] / med['shared']:.2f}x   "
          f"(identical blocks: {'yes' if same else 'NO'})")


if __name__ == "__main__":
    main()
