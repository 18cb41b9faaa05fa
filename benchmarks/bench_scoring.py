"""Replace-1-block scoring, naive vs prefix-cached, on the same library and the same tokens.

Naive (what NVIDIA's reference code does): for every candidate build the whole one-block child
(``blocks.build_child``) and run it end to end. Prefix-cached (``scoring.score_candidates``): run
the parent once, layer by layer, and per candidate of layer *i* only its own sub-block and the
parent's layers *i+1 … L-1*, final norm and LM head. Both score the *whole* library here, in one
process, one after the other (cached first, then naive, then cached again: the two cached times
bracket the naive one, so a slow spell of a shared machine shows as a spread), and the script
prints both times, the ratio and the largest score difference between the two.

    python benchmarks/bench_scoring.py                       # the `default` preset's shape
    python benchmarks/bench_scoring.py --preset smoke --threads 1

Random weights: timings do not depend on values (the scores do, so they are printed only as a
check that both paths agree). Reads/writes nothing.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from puzzlelib.scoring import prefix_scoring
from puzzlelib.core.blocks import init_variant, list_library
from puzzlelib.core.config import RunConfig
from puzzlelib.core.configuration_decilm import PuzzleConfig
from puzzlelib.core.modeling_decilm import PuzzleForCausalLM


def parent_for(cfg: RunConfig) -> PuzzleForCausalLM:
    pc = PuzzleConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.parent_hidden_size,
                      intermediate_size=cfg.parent_intermediate_size,
                      num_hidden_layers=cfg.parent_num_layers, num_attention_heads=cfg.parent_num_heads,
                      num_key_value_heads=cfg.parent_num_kv_heads, max_position_embeddings=cfg.seq_len,
                      tie_word_embeddings=cfg.parent_tie_embeddings)
    torch.manual_seed(0)
    return PuzzleForCausalLM(pc).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="default", help="the preset whose parent shape, library "
                    "menu and scoring budget are benchmarked")
    ap.add_argument("--tokens", type=int, default=None, help="held-out tokens per candidate "
                    "(default: the preset's scoring_tokens)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--no-init", action="store_true", help="score BLD blocks only (no init copies)")
    args = ap.parse_args()
    cfg = RunConfig.from_preset(args.preset)
    if args.threads:
        torch.set_num_threads(args.threads)
    parent = parent_for(cfg)
    fr = tuple(float(f) for f in cfg.bld_ffn_fractions.split(","))
    lib = list_library(parent.config, ffn_fractions=fr, include_linear=cfg.bld_include_linear,
                       include_noop=cfg.bld_include_noop)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # weight-norm pruning: fine for timing
        blocks = {(i, v.name): init_variant(parent, i, v)
                  for i in range(parent.config.num_hidden_layers) for v in lib["attn"] + lib["ffn"]}
    cands = prefix_scoring.blocks_candidates(blocks)
    if not args.no_init and cfg.scoring_include_init:
        # The stage also scores each trained variant from its initialisation: same work again.
        pc = parent.config
        trained = {k: t for k, t in blocks.items()
                   if not (k[1].endswith("noop") or prefix_scoring.Candidate(*k).is_parent(pc))}
        cands += prefix_scoring.blocks_candidates(trained, source="init")
    tokens = args.tokens or cfg.scoring_tokens
    x = torch.randint(0, cfg.vocab_size, (max(1, tokens // cfg.seq_len), cfg.seq_len + 1),
                      generator=torch.Generator().manual_seed(0))
    bs = cfg.scoring_batch_size
    batches = [(x[i:i + bs, :-1], x[i:i + bs, 1:]) for i in range(0, len(x), bs)]
    print(f"preset {args.preset}: {parent.config.num_hidden_layers} layers, hidden "
          f"{parent.config.hidden_size}, vocab {parent.config.vocab_size}; {len(cands)} candidates "
          f"x {x.shape[0] * cfg.seq_len} tokens; {torch.get_num_threads()} torch threads")

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    t_c1, cached = timed(lambda: prefix_scoring.score_candidates(parent, cands, batches, progress=False))
    t_n, naive = timed(lambda: prefix_scoring.score_naive(parent, cands, batches, progress=True))
    t_c2, _ = timed(lambda: prefix_scoring.score_candidates(parent, cands, batches, progress=False))
    diff = max(abs(a[m] - b[m]) for a, b in zip(cached.rows, naive.rows)
               for m in ("kl", "lm_loss", "top1_agreement"))
    t_c = min(t_c1, t_c2)
    print(f"{'path':<16}{'seconds':>10}{'candidates/s':>15}")
    print(f"{'prefix-cached':<16}{t_c:>10.2f}{len(cands) / t_c:>15.2f}   (runs: {t_c1:.2f}, {t_c2:.2f})")
    print(f"{'naive':<16}{t_n:>10.2f}{len(cands) / t_n:>15.2f}")
    print(f"speed-up of prefix caching: {t_n / t_c:.2f}x (bracketing runs: {t_n / max(t_c1, t_c2):.2f}x"
          f" .. {t_n / t_c:.2f}x); max |score difference| {diff:.1e}")


if __name__ == "__main__":
    main()
