"""Measured speed of stage 06's models on this device, next to stage 01's predicted speed.

What it does: ``greedy_generate`` times one scenario (a prefill into a fresh ``PuzzleCache``, then
greedy decode steps with the cache) on two clocks at once (``CLOCK_NAMES``: wall and process CPU time);
``measure_throughput`` runs every model on every (batch, prompt, gen) scenario, round-robin in a
shuffled order each round, and summarises medians and within-round speed-ups to a reference model;
``predicted_speedups`` gives stage 01's cost-table prediction for the same scenarios.
Reads: models in memory and a ``CostTable``. Writes: nothing (the stage writes
``throughput.json`` from the returned dict).
Leaves out: serving engines (vLLM/TensorRT-LLM would give other speeds), the statistical
significance of small speed differences, and which clock / thread count to use (``evaluation.run``
takes stage 01's).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from ..core.eval_tasks import EvaluationError
from ..core.modeling_decilm import PuzzleCache, PuzzleForCausalLM

# ------------------------------------------------------------------------------- throughput

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCK_NAMES = ("wall", "cpu")


def _now() -> tuple[float, float]:
    # Both clocks at once: "wall" (elapsed) is what a dedicated device delivers; "cpu" (this
    # process's CPU time) does not advance while another process holds the core, so on a shared
    # machine it still measures the model (with one intra-op thread it equals runtime).
    return time.perf_counter(), time.process_time()


@torch.inference_mode()
def greedy_generate(model: PuzzleForCausalLM, ids: torch.Tensor, gen_len: int) -> tuple[torch.Tensor, dict]:
    """Prefill ``ids`` into a fresh ``PuzzleCache``, then ``gen_len`` greedy decode steps with the
    cache. Returns (the gen_len + 1 new tokens, {clock: (prefill seconds, decode seconds)}).

    The same accounting as stage 01's scenario (one prefill + gen_len decode steps), and the same
    tokens as ``model.generate(ids, max_new_tokens=gen_len + 1, do_sample=False)``, without
    ``generate``'s per-step Python overhead, which would blur small models' differences.
    """
    dev = ids.device
    cache = PuzzleCache(model.config)
    _sync(dev)
    t0 = _now()
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    _sync(dev)
    t1 = _now()
    out = [nxt]
    for _ in range(gen_len):
        logits = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
    _sync(dev)
    t2 = _now()
    return torch.cat(out, 1), {c: (t1[k] - t0[k], t2[k] - t1[k]) for k, c in enumerate(CLOCK_NAMES)}


def measure_throughput(models: dict[str, PuzzleForCausalLM], scenarios: list[tuple[int, int, int]],
                       rounds: int = 5, warmup: int = 1, seed: int = 0, reference: str = "parent",
                       clock: str = "wall", progress: bool = True) -> dict:
    """Prefill / decode / generation tokens/s of every model for every (batch, prompt, gen) scenario.

    Interleaved: every round runs every model once per scenario, in a freshly shuffled model order;
    ``warmup`` untimed rounds first. Per model and scenario: medians of the timings on ``clock``
    ("wall" or "cpu", see ``_now``; both are recorded); per child, speed-ups to ``reference`` as the
    median over rounds of the within-round ratio.
    """
    if reference not in models:
        raise EvaluationError(f"the reference model {reference!r} is not among {list(models)}")
    if clock not in CLOCK_NAMES:
        raise EvaluationError(f"unknown clock {clock!r}: use 'wall' or 'cpu'")
    dev = next(next(iter(models.values())).parameters()).device
    vocab = min(m.config.vocab_size for m in models.values())
    gen = torch.Generator().manual_seed(seed)
    prompts = {s: torch.randint(0, vocab, s[:2], generator=gen).to(dev) for s in scenarios}
    names = list(models)
    rng = np.random.default_rng([seed, 0x7A7])
    raw = {c: {n: {f"b{b}": {"prefill_s": [], "decode_s": []} for b, _, _ in scenarios} for n in names}
           for c in CLOCK_NAMES}
    for r in tqdm(range(warmup + rounds), desc="throughput rounds", disable=not progress):
        for i in rng.permutation(len(names)):
            for s in scenarios:
                _, times = greedy_generate(models[names[i]], prompts[s], s[2])
                for c in CLOCK_NAMES if r >= warmup else ():
                    raw[c][names[i]][f"b{s[0]}"]["prefill_s"].append(times[c][0])
                    raw[c][names[i]][f"b{s[0]}"]["decode_s"].append(times[c][1])
    out: dict = {"scenarios": [{"batch": b, "prompt_len": p, "gen_len": g} for b, p, g in scenarios],
                 "rounds": rounds, "warmup": warmup, "reference": reference, "device": str(dev), "clock": clock,
                 "threads": torch.get_num_threads(), "models": {}, "other_clock": {}, "samples": raw}
    for c in CLOCK_NAMES:
        table = out["models"] if c == clock else out["other_clock"]
        for n in names:
            table[n] = _throughput_summary(raw[c], n, reference, scenarios)
    return out


def _throughput_summary(raw: dict, n: str, reference: str, scenarios) -> dict:
    per: dict = {}
    for b, p, g in scenarios:
        x, ref = raw[n][f"b{b}"], raw[reference][f"b{b}"]
        pre, dec = np.array(x["prefill_s"]), np.array(x["decode_s"])
        rpre, rdec = np.array(ref["prefill_s"]), np.array(ref["decode_s"])
        ratio = (rpre + rdec) / (pre + dec)  # within-round: a slow spell hits both sides
        per[f"b{b}"] = {
            "prefill_ms": float(np.median(pre) * 1e3), "decode_step_ms": float(np.median(dec) / g * 1e3),
            "prefill_tokens_per_s": float(b * p / np.median(pre)),
            "decode_tokens_per_s": float(b * g / np.median(dec)),
            "tokens_per_s": float(b * g / np.median(pre + dec)),
            "speedup": float(np.median(ratio)), "speedup_p10": float(np.percentile(ratio, 10)),
            "speedup_p90": float(np.percentile(ratio, 90)),
            "prefill_speedup": float(np.median(rpre / pre)), "decode_speedup": float(np.median(rdec / dec))}
    # The search's definition: the model at its best batch vs the parent at its best batch.
    ref_best = max(float(b * g / np.median(np.array(raw[reference][f"b{b}"]["prefill_s"])
                                           + np.array(raw[reference][f"b{b}"]["decode_s"])))
                   for b, _, g in scenarios)
    best = max(v["tokens_per_s"] for v in per.values())
    per["best"] = {"tokens_per_s": best, "speedup": best / ref_best}
    return per


def predicted_speedups(costs, choices: list, parent_choices: list) -> dict:
    """Stage 01's cost-table prediction for the same scenarios (``CostTable.predict_scenario``)."""
    per, best, ref_best = {}, 0.0, 0.0
    for b in costs.batch_sizes:
        c, p = costs.predict_scenario(choices, b), costs.predict_scenario(parent_choices, b)
        per[f"b{b}"] = {"tokens_per_s": c["tokens_per_s"], "speedup": c["tokens_per_s"] / p["tokens_per_s"],
                        "prefill_speedup": p["prefill_ms"] / c["prefill_ms"],
                        "decode_speedup": p["decode_ms"] / c["decode_ms"]}
        best, ref_best = max(best, c["tokens_per_s"]), max(ref_best, p["tokens_per_s"])
    per["best"] = {"speedup": best / ref_best}
    return per
