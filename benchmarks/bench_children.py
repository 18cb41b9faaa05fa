"""Child/parent forward-time ratios: does removing a sub-block make *this* implementation faster?

Later stages trust that a child with fewer KV heads, narrower FFNs or no-op blocks runs faster
than the parent here. This benchmark measures it, side by side in one process, interleaving
the models round by round so machine noise hits them alike, and prints ratios (median over
rounds) for prefill (batch × prompt) and for one decode step with a KV cache.

    python benchmarks/bench_children.py [--hidden 256 --layers 8 --batch 8 --prompt 256 --rounds 7]

Reads/writes nothing; random weights are fine, timings do not depend on values.
"""

from __future__ import annotations

import argparse
import warnings
import statistics
import time

import torch

from puzzlelib.core.blocks import build_child
from puzzlelib.core.configuration_decilm import PuzzleConfig
from puzzlelib.core.modeling_decilm import PuzzleForCausalLM
from puzzlelib.core.model import count_params


def children(layers: int, kv: int) -> dict[str, list[tuple[str, str]]]:
    half = layers // 2
    rest = [(f"attn:kv{kv}", "ffn:1.00")] * (layers - half)  # the parent's blocks in the other half
    return {
        "parent": [(f"attn:kv{kv}", "ffn:1.00")] * layers,
        "kv1 everywhere": [("attn:kv1", "ffn:1.00")] * layers,
        "ffn 50% everywhere": [(f"attn:kv{kv}", "ffn:0.50")] * layers,
        "no attention in half the layers": [("attn:noop", "ffn:1.00")] * half + rest,
        "linear attention in half the layers": [("attn:linear", "ffn:1.00")] * half + rest,
        "no FFN in half the layers": [(f"attn:kv{kv}", "ffn:noop")] * half + rest,
        "half the layers removed": [("attn:noop", "ffn:noop")] * half + rest,
    }


@torch.no_grad()
def time_prefill(model, ids) -> float:
    t = time.perf_counter()
    model(ids, use_cache=False)
    return time.perf_counter() - t


@torch.no_grad()
def time_decode(model, ids) -> float:
    cache = model.new_cache()
    out = model(ids, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    t = time.perf_counter()
    model(nxt, past_key_values=cache, use_cache=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    # Random weights: which channels the pruning keeps does not change the timing.
    warnings.filterwarnings("ignore", message=".*weight norms")
    cfg = PuzzleConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
                       num_attention_heads=a.heads, num_key_value_heads=a.kv, max_position_embeddings=4 * a.prompt)
    parent = PuzzleForCausalLM(cfg).eval()
    models = {name: build_child(parent, ch) for name, ch in children(a.layers, a.kv).items()}
    ids = torch.randint(0, a.vocab, (a.batch, a.prompt))
    for m in models.values():  # warm-up
        time_prefill(m, ids), time_decode(m, ids)
    pre = {n: [] for n in models}
    dec = {n: [] for n in models}
    for _ in range(a.rounds):
        for n, m in models.items():
            pre[n].append(time_prefill(m, ids))
            dec[n].append(time_decode(m, ids))
    print(f"device=cpu threads={torch.get_num_threads()} hidden={a.hidden} layers={a.layers} "
          f"batch={a.batch} prompt={a.prompt} rounds={a.rounds} (medians; ratio = child/parent time)")
    p_pre, p_dec = statistics.median(pre["parent"]), statistics.median(dec["parent"])
    print(f"{'model':38s} {'params':>9s} {'prefill ms':>11s} {'ratio':>6s} {'decode ms':>10s} {'ratio':>6s}")
    for n, m in models.items():
        mp, md = statistics.median(pre[n]), statistics.median(dec[n])
        print(f"{n:38s} {count_params(m):9d} {1e3 * mp:11.2f} {mp / p_pre:6.2f} {1e3 * md:10.3f} {md / p_dec:6.2f}")


if __name__ == "__main__":
    main()
