"""What this machine can do: fp32 vs bf16 autocast and 1 vs N threads, alone and beside a busy
neighbour, for the four steps the pipeline spends its time in, and the choice ``auto`` makes.

The steps, at a preset's real shapes (``default`` unless ``--preset``), random weights:
  parent   one parent training step: forward + loss + backward (``parent.probe_step``)
  bld      one BLD step: a decoder layer's attention + FFN, normalized MSE, backward (``bld_train.probe_step``)
  scoring  one scoring forward: the parent over scoring_batch_size x seq_len tokens, no grad
  gkd      one GKD micro-step: parent forward + child forward + GKD loss + backward (``gkd.probe_step``)

Table 1 times each step in fp32 and under bf16 autocast with 1 and N threads (N = the CPUs this
process may use), interleaved after a warm-up, all in this one process, and prints the ratios
bf16/fp32 and N-threads/1-thread; below it, the one-thread cells again in this process's CPU time,
which other processes' load does not stretch (what ``precision.probe`` measures with one thread),
with the fp32 tokens/s it implies. Table 2 times the parent step with 1 and N threads, alone and
with a CPU-bound neighbour process (``python -c "while True: pass"``, started and stopped between
rounds, so both conditions see the same machine): the case the ``threads="auto"`` rule is for.
Last, the choice ``auto`` makes on this machine for each stage (``precision.choose`` fed the
measured timings at the thread count ``auto`` picks), and the thread count it picks.

    python benchmarks/bench_cpu.py                          # default preset, ~2-4 min on 2 cores
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_cpu.py  # as a CPU without native bf16
    python benchmarks/bench_cpu.py --preset smoke --steps parent,gkd --repeats 5

``ONEDNN_MAX_CPU_ISA=AVX2`` makes oneDNN use AVX2 kernels only, like a laptop CPU without
AVX512-BF16/AMX: bf16 autocast then runs emulated (``bf16_native`` reports it too). An emulated
bf16 step can take tens of seconds at the default shapes; ``--budget`` caps the timed repeats.
Reads/writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time

import torch

from puzzlelib.gkd import stage as gkd

from puzzlelib.parent import stage as parent

from puzzlelib.core import precision
from puzzlelib.bld.plan import BLDSettings
from puzzlelib.bld.train import probe_step as bld_probe_step
from puzzlelib.core.config import RunConfig
from puzzlelib.core.distributed import Dist
from puzzlelib.core.configuration_decilm import PuzzleConfig
from puzzlelib.core.modeling_decilm import PuzzleForCausalLM

STEPS = ("parent", "bld", "scoring", "gkd")
FIELD = {"parent": "parent_autocast_bf16", "bld": "bld_autocast_bf16", "gkd": "gkd_autocast_bf16"}
TOKENS = {  # tokens one step processes
    "parent": lambda c: c.parent_batch_size * c.seq_len,
    "bld": lambda c: c.bld_batch_size * c.seq_len,
    "scoring": lambda c: c.scoring_batch_size * c.seq_len,
    "gkd": lambda c: c.gkd_batch_size // c.gkd_grad_accum * c.seq_len,
}


def parent_model(cfg: RunConfig) -> PuzzleForCausalLM:
    pc = PuzzleConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.parent_hidden_size,
                      intermediate_size=cfg.parent_intermediate_size,
                      num_hidden_layers=cfg.parent_num_layers, num_attention_heads=cfg.parent_num_heads,
                      num_key_value_heads=cfg.parent_num_kv_heads,
                      max_position_embeddings=parent.max_positions(cfg),
                      tie_word_embeddings=cfg.parent_tie_embeddings)
    torch.manual_seed(0)
    return PuzzleForCausalLM(pc)


def make_steps(cfg: RunConfig, model: PuzzleForCausalLM) -> dict:
    """name -> step(bf16) at the preset's shapes."""
    cpu = torch.device("cpu")
    frozen = parent_model(cfg).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (cfg.scoring_batch_size, cfg.seq_len), generator=g)

    @torch.no_grad()
    def scoring(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            frozen(ids).logits.float().log_softmax(-1)

    s_gkd = gkd.GKDSettings.from_config(cfg, autocast_bf16=False)
    return {"parent": parent.probe_step(model, cfg),
            "bld": bld_probe_step(frozen, BLDSettings.from_config(cfg), cpu),
            "scoring": scoring,
            "gkd": gkd.probe_step(frozen, s_gkd, Dist("cpu"))}


def timed(step, bf16: bool, cpu: list | None = None) -> float:
    """Wall seconds of one call; its process CPU seconds are appended to ``cpu`` when given."""
    c, t = time.process_time(), time.perf_counter()
    step(bf16)
    wall = time.perf_counter() - t
    if cpu is not None:
        cpu.append(time.process_time() - c)
    return wall


@contextlib.contextmanager
def neighbour(on: bool):
    """A CPU-bound process beside this one while the block runs (nothing when ``on`` is false)."""
    if not on:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)  # let it start spinning
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def table1(steps: dict, threads: list[int], repeats: int, budget: float) -> tuple[dict, dict]:
    """({(step, threads, bf16): median wall seconds}, {(step, bf16): median CPU seconds with one
    thread}), each step's four cells interleaved. One thread's CPU time does not grow when other
    processes take the cores, so it compares fp32 and bf16 fairly on a busy machine."""
    out, cpu_out = {}, {}
    for name, step in steps.items():
        cells = [(n, bf16) for n in threads for bf16 in (False, True)]
        for n, bf16 in cells:  # warm-up: oneDNN builds its kernels on the first call per shape
            torch.set_num_threads(n)
            step(bf16)
        samples: dict = {c: [] for c in cells}
        cpu: dict = {False: [], True: []}
        t0 = time.perf_counter()
        for r in range(repeats):
            for n, bf16 in (cells if r % 2 == 0 else cells[::-1]):
                torch.set_num_threads(n)
                samples[(n, bf16)].append(timed(step, bf16, cpu[bf16] if n == 1 else None))
            if time.perf_counter() - t0 > budget:
                break
        for c, v in samples.items():
            out[(name, *c)] = statistics.median(v)
        for bf16, v in cpu.items():
            cpu_out[(name, bf16)] = statistics.median(v)
        print(f"  measured {name} ({len(samples[cells[0]])} rounds, "
              f"{time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return out, cpu_out


def table2(step, threads: list[int], bf16: bool, repeats: int) -> dict:
    """{(threads, busy): median seconds} of the parent step, alone and beside a busy process."""
    cells = [(n, busy) for busy in (False, True) for n in threads]
    samples: dict = {c: [] for c in cells}
    for r in range(repeats):
        for busy in ((False, True) if r % 2 == 0 else (True, False)):
            with neighbour(busy):
                for n in threads:
                    torch.set_num_threads(n)
                    step(bf16)  # re-warm after the thread change
                    samples[(n, busy)].append(timed(step, bf16))
    return {c: statistics.median(v) for c, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {STEPS}")
    ap.add_argument("--threads", type=int, default=0,
                    help="N, the many-threads count (default: the CPUs this process may use)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per cell")
    ap.add_argument("--budget", type=float, default=60.0,
                    help="seconds after which a step's rounds stop (one round at least)")
    ap.add_argument("--no-neighbour", action="store_true", help="skip table 2")
    a = ap.parse_args()
    cfg = RunConfig.from_preset(a.preset)
    n_cpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    many = a.threads or n_cpu or 1
    threads = sorted({1, many})
    native, how = precision.bf16_native("cpu")
    auto_n = precision.auto_threads()
    print(f"# {precision_machine()} · {n_cpu} CPU(s) usable, {precision.physical_cores()} physical "
          f"core(s) · torch {torch.__version__} · native bf16: {native} ({how})"
          + (f" · ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']}"
             if os.environ.get("ONEDNN_MAX_CPU_ISA") else ""))
    print(f"# preset {a.preset}: parent {cfg.parent_num_layers}x{cfg.parent_hidden_size} "
          f"(ffn {cfg.parent_intermediate_size}, vocab {cfg.vocab_size}), seq_len {cfg.seq_len}; "
          f"batches: parent {cfg.parent_batch_size}, bld {cfg.bld_batch_size}, scoring "
          f"{cfg.scoring_batch_size}, gkd {cfg.gkd_batch_size // cfg.gkd_grad_accum}")
    names = [s.strip() for s in a.steps.split(",") if s.strip()]
    bad = [s for s in names if s not in STEPS]
    if bad:
        ap.error(f"unknown step(s) {bad}; choose from {STEPS}")
    steps = {k: v for k, v in make_steps(cfg, parent_model(cfg)).items() if k in names}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t1, cpu1 = table1(steps, threads, a.repeats, a.budget)

    def seconds(name: str, n: int, bf16: bool) -> float:
        """What the probe would see: one thread's CPU time (load-proof) for 1 thread, else wall."""
        return cpu1[(name, bf16)] if n == 1 else t1[(name, n, bf16)]
    print(f"# 1-minute load average: {load:.1f} before, {os.getloadavg()[0]:.1f} after table 1 "
          f"(more than {n_cpu} = other processes competed for the cores)")

    print("\n## Table 1: ms per step (median wall time), fp32 vs bf16 autocast, 1 vs N threads "
          "(no neighbour of ours; see the load average)\n")
    hdr = "| step | " + " | ".join(f"fp32 {n}t | bf16 {n}t" for n in threads) + \
          " | bf16/fp32 " + " | bf16/fp32 ".join(f"{n}t" for n in threads) + \
          (f" | fp32 {many}t/1t | bf16 {many}t/1t |" if many > 1 else " |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for name in steps:
        ms = {(n, b): t1[(name, n, b)] * 1e3 for n in threads for b in (False, True)}
        cells = [f"{ms[(n, b)]:.0f}" for n in threads for b in (False, True)]
        cells += [f"{ms[(n, True)] / ms[(n, False)]:.2f}" for n in threads]
        if many > 1:
            cells += [f"{ms[(many, b)] / ms[(1, b)]:.2f}" for b in (False, True)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n1 thread, CPU time of this process (unaffected by other processes' load):\n")
    print("| step | fp32 ms | bf16 ms | bf16/fp32 | fp32 tokens/s |")
    print("|---|---|---|---|---|")
    for name in steps:
        f, b = cpu1[(name, False)], cpu1[(name, True)]
        print(f"| {name} | {f * 1e3:.0f} | {b * 1e3:.0f} | {b / f:.2f} | {TOKENS[name](cfg) / f:,.0f} |")

    if not a.no_neighbour and "parent" in steps:
        fast = {b: seconds("parent", auto_n, b) for b in (False, True)} if auto_n in threads else None
        bf16 = bool(fast and fast[True] <= precision.BF16_MARGIN * fast[False] and native)
        t2 = table2(steps["parent"], threads, bf16, a.repeats)
        prec = "bf16 autocast" if bf16 else "fp32"
        print(f"\n## Table 2: parent step ({prec}), ms (median), alone vs beside a busy process\n")
        print("| threads | alone | busy neighbour | busy/alone |")
        print("|---|---|---|---|")
        for n in threads:
            al, bu = t2[(n, False)] * 1e3, t2[(n, True)] * 1e3
            print(f"| {n} | {al:.0f} | {bu:.0f} | {bu / al:.2f} |")
        if len(threads) > 1:
            best_alone = min(t2[(n, False)] for n in threads)
            print(f"\nbusy with {many} threads / best alone: {t2[(many, True)] / best_alone:.2f}; "
                  f"busy with 1 thread / best alone: {t2[(1, True)] / best_alone:.2f}")

    print(f"\n## What auto chooses here\n\nthreads=auto -> {auto_n} "
          f"(rule: one per two physical cores, 1..{precision.MAX_AUTO_THREADS})")
    for name, field in FIELD.items():
        if name not in steps:
            continue
        n = auto_n if auto_n in threads else threads[0]
        probe = None
        if native:
            f, b = seconds(name, n, False), seconds(name, n, True)
            probe = {"fp32_ms": round(f * 1e3, 2), "bf16_ms": round(b * 1e3, 2),
                     "bf16_over_fp32": round(b / f, 3), "threads": n, "repeats": a.repeats}
        c = precision.choose(name, field, "auto", "cpu", None, probe_result=probe)
        print(f"{field}=auto -> {c.precision}: {c.reason}")


def precision_machine() -> str:
    from puzzlelib.core.rundir import cpu_model  # the string environment.json records

    return cpu_model()


if __name__ == "__main__":
    main()
