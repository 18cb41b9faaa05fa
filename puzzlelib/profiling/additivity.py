"""Is a child's cost the sum of its parts? Whole models measured end to end against the table.

What it does:
* ``random_children`` (seeded, every layer's attention and FFN uniform over the library);
* ``measure_models``: whole models timed interleaved with each other (a prefill into a fresh
  cache, a steady-state decode step) plus their measured memory (distinct parameters + what a
  real KV cache holds);
* ``check_additivity`` / ``additivity_rows``: predicted (table) vs measured per (model, batch
  size), absolute and as the speed-up versus the parent; ``summarize_additivity`` (median / max,
  signed bias) and ``restate`` (the same samples under another statistic, no re-measuring);
* ``cache_ablation``: the parent's decode step vs the sum of its own sub-blocks timed hot and
  with the parent's cache reuse;
* row helpers the stages share: ``rows_to_csv``, ``markdown_table``, ``short_spec``.

Reads: models in memory and a :class:`~puzzlelib.profiling.costs.CostTable`. Writes: only what
``rows_to_csv`` is given a path for; the stage (``profiling``) decides the files. Leaves out:
measuring the table (``benches``), the timing loop (``timing``), peak activation memory and
serving engines (only weights + KV cache are modelled, as in the paper).
"""

from __future__ import annotations

import csv
import io
import json
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm  # plain text bars: tqdm.auto needs ipywidgets in Jupyter

from .benches import (
    own_weight_copies,
    fill_timings,
    fixed_static_costs,
    sub_block_static_costs,
    fixed_model,
    kv_bytes_per_token,
    layer_groups,
    library_for,
    model_bench,
    param_count,
    sub_block_bench,
    sub_block_model,
)
from ..core.blocks import Variant, build_child
from .costs import FIXED, PHASES, SUB_BLOCKS, CostTable, Scenario, choice_names
from ..core.configuration_decilm import PuzzleConfig
from ..core.modeling_decilm import PuzzleForCausalLM
from ..core.atomic import atomic_write_text
from .timing import (
    ProfilingError,
    Timing,
    check_statistic,
    last_level_cache_bytes,
    rotating,
    rotation_copies,
    time_interleaved,
    warm_step,
)


@torch.inference_mode()
def cache_ablation(parent: PuzzleForCausalLM, scenarios: Sequence[Scenario], warmup: int = 2,
                   repeats: int = 10, seed: int = 0, clock: str = "wall",
                   progress: bool = True) -> list[dict]:
    """Is emulating the cache state worth it? One interleaved session per batch size times the
    parent's decode step end to end *and* its own sub-blocks and fixed part twice — hot (each
    timed call right after the previous one on the same weights) and with the parent's reuse
    distance (as in the table) — so load drift cannot favour either. Returns one row per batch:
    measured parent decode ms and the two predictions with their relative errors."""
    cfg = parent.config
    device = next(parent.parameters()).device
    dtype = next(parent.parameters()).dtype
    library = library_for(cfg)
    groups = layer_groups(cfg, library)
    cache_bytes = last_level_cache_bytes(device)
    parent_kv = sum(kv_bytes_per_token(cfg, i, dtype) for i in range(cfg.num_hidden_layers))
    gen = torch.Generator().manual_seed(seed)
    fixed = fixed_model(parent).to(device)
    own = {(rep, k): next(v for v in library[k] if v.is_parent(cfg, rep)) for rep in groups
           for k in SUB_BLOCKS}
    models = {key: sub_block_model(parent, key[0], v) for key, v in own.items()}
    pool: dict[Any, list[torch.nn.Module]] = {}
    out = []
    for s in scenarios:
        ws = param_count([parent])[1] + s.batch * s.decode_context * parent_kv
        benches = {"parent": warm_step(model_bench(parent, s, "decode", gen))}
        for mode in ("hot", "rotated"):
            for key, v in own.items():
                m = models[key]
                st = sub_block_static_costs(m, v)
                k = 1 if mode == "hot" else rotation_copies(
                    st["weight_bytes"] + s.batch * s.decode_context * st["kv_bytes_per_token"],
                    ws, cache_bytes)
                b = [sub_block_bench(c, v, s, "decode", gen) for c in own_weight_copies(pool, key, m, k)]
                benches[f"{mode}/{key[0]}/{key[1]}"] = warm_step(b[0]) if mode == "hot" else rotating(b)
            k = 1 if mode == "hot" else rotation_copies(fixed_static_costs(fixed)["weight_bytes"], ws,
                                                        cache_bytes)
            b = [model_bench(f, s, "decode", gen) for f in own_weight_copies(pool, FIXED, fixed, k)]
            benches[f"{mode}/fixed"] = warm_step(b[0]) if mode == "hot" else rotating(b)
        t = time_interleaved(benches, device, warmup, repeats, seed, clock=clock,
                             desc=f"cache ablation b={s.batch}", progress=progress)
        row: dict[str, Any] = {"batch": s.batch, "meas_decode_ms": t["parent"].median}
        for mode in ("hot", "rotated"):
            pred = t[f"{mode}/fixed"].median + sum(
                len(members) * t[f"{mode}/{rep}/{k}"].median
                for rep, members in groups.items() for k in SUB_BLOCKS)
            row[f"pred_{mode}_ms"] = pred
            row[f"{mode}_rel_err"] = _rel(pred, row["meas_decode_ms"])
        out.append(row)
    return out


def random_children(config: PuzzleConfig, n: int, seed: int = 0,
                    library: dict[str, list[Variant]] | None = None) -> list[list[tuple[str, str]]]:
    """``n`` children with every layer's attention and FFN drawn uniformly from the library."""
    library = library or library_for(config)
    rng = random.Random(seed)
    return [[(rng.choice(library["attn"]).name, rng.choice(library["ffn"]).name)
             for _ in range(config.num_hidden_layers)] for _ in range(n)]


def model_memory_bytes(model: PuzzleForCausalLM) -> int:
    """Bytes of the model's distinct parameters (tied embeddings once)."""
    return param_count([model])[1]


@torch.inference_mode()
def measured_kv_bytes(model: PuzzleForCausalLM, batch: int, tokens: int, seed: int = 0) -> int:
    """KV bytes a real cache holds after a prefill of ``batch`` × ``tokens``."""
    gen = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    cache = model.new_cache()
    model(input_ids=torch.randint(0, model.config.vocab_size, (batch, tokens), generator=gen).to(dev),
          past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache.kv_bytes()


def _rel(pred: float, meas: float) -> float:
    return abs(pred - meas) / meas if meas else (0.0 if pred == meas else float("inf"))


def short_spec(child: Sequence[tuple[str, str]]) -> str:
    """'kv2+0.50 | noop+linear | …': a child on one line (prefixes dropped)."""
    return " | ".join(f"{a.split(':')[1]}+{f.split(':')[1]}" for a, f in choice_names(child))


def _child_key(s: Scenario, phase: str, k: int) -> str:
    return f"{s.key}/{phase}/child{k}"


def additivity_rows(table: CostTable, specs: list, samples: dict[str, list[float]],
                    memory: dict[str, int], statistic: str = "median") -> list[dict]:
    """Predicted vs measured rows from raw end-to-end samples (``specs[0]`` is the parent).

    ``memory[f"b{B}/child{k}"]`` holds the measured weights + KV bytes of child k at batch B.
    """
    rows = []
    for s in table.scenarios:
        batch_rows = []
        for k, spec in enumerate(specs):
            r: dict[str, Any] = {"child": k, "is_parent": k == 0, "batch": s.batch,
                                 "spec": short_spec(spec), "choices": json.dumps(spec),
                                 "params": int(table.predict(spec, "params"))}
            for phase in PHASES:
                pred = table.predict(spec, f"{phase}_ms", s.batch)
                got = Timing(samples[_child_key(s, phase, k)]).stat(statistic)
                r[f"pred_{phase}_ms"], r[f"meas_{phase}_ms"] = pred, got
                r[f"{phase}_rel_err"] = _rel(pred, got)
            pm = table.predict_memory_bytes(spec, s.batch)
            mm = memory[f"{s.key}/child{k}"]
            r["pred_memory_bytes"], r["meas_memory_bytes"] = int(pm), int(mm)
            r["memory_rel_err"] = _rel(pm, mm)
            batch_rows.append(r)
        parent_row = batch_rows[0]
        for r in batch_rows:
            for phase in PHASES:
                ps = parent_row[f"pred_{phase}_ms"] / r[f"pred_{phase}_ms"]
                ms = parent_row[f"meas_{phase}_ms"] / r[f"meas_{phase}_ms"]
                r[f"pred_{phase}_speedup"], r[f"meas_{phase}_speedup"] = ps, ms
                r[f"{phase}_speedup_rel_err"] = _rel(ps, ms)
        rows += batch_rows
    return rows


@torch.inference_mode()
def measure_models(models: Sequence[PuzzleForCausalLM], scenarios: Sequence[Scenario],
                   warmup: int = 2, repeats: int = 10, seed: int = 0, progress: bool = True,
                   clock: str = "wall") -> tuple[dict[str, list[float]], dict[str, int]]:
    """Measure whole models end to end, interleaved with each other (so their ratios share the
    machine's load): a prefill of the prompt into a fresh cache, and a decode step against a cache
    of ``decode_context`` tokens right after an untimed one (steady-state generation).

    Returns (samples, memory): ms samples keyed ``"b8/decode/child3"`` (model 3 at batch 8) and
    measured bytes (distinct parameters + what a real cache holds after ``total_len`` tokens)
    keyed ``"b8/child3"``. Stage 04 uses this to re-check its chosen children.
    """
    if not models:
        raise ProfilingError("measure_models needs at least one model")
    device = next(models[0].parameters()).device
    gen = torch.Generator().manual_seed(seed + 1)
    samples: dict[str, list[float]] = {}
    memory: dict[str, int] = {}
    for s in scenarios:
        for m in models:
            s.check(m.config.max_position_embeddings)
        for phase in PHASES:
            benches = {_child_key(s, phase, k): model_bench(m, s, phase, gen) if phase == "prefill"
                       else warm_step(model_bench(m, s, phase, gen)) for k, m in enumerate(models)}
            times = time_interleaved(benches, device, warmup, repeats, seed, clock=clock,
                                     desc=f"children {phase} b={s.batch}", progress=progress)
            samples.update({key: t.samples for key, t in times.items()})
        for k, m in enumerate(models):
            memory[f"{s.key}/child{k}"] = (model_memory_bytes(m)
                                           + measured_kv_bytes(m, s.batch, s.total_len, seed))
    return samples, memory


def check_additivity(parent: PuzzleForCausalLM, table: CostTable, children: list, warmup: int = 2,
                     repeats: int = 10, seed: int = 0, progress: bool = True,
                     samples_out: dict | None = None, statistic: str = "median",
                     clock: str = "wall") -> tuple[list[dict], dict[str, int]]:
    """Predicted (table) vs measured (end to end) cost of the parent and ``children``.

    Returns (rows, memory): one row per (model, batch size) — prefill ms, decode ms and memory
    bytes, predicted and measured, their relative errors, and the speed-up versus the parent
    predicted and measured — and the measured memory per model. Model 0 is the parent.
    """
    check_statistic(statistic)
    specs = [table.parent_choices()] + [choice_names(c) for c in children]
    for spec in specs:
        table._check_child(spec)
    device = next(parent.parameters()).device
    models = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for spec in tqdm(specs, desc="building children", disable=not progress, leave=False):
            models.append(build_child(parent, spec).to(device))
    samples, memory = measure_models(models, table.scenarios, warmup, repeats, seed, progress, clock)
    if samples_out is not None:
        samples_out.update(samples)
    return additivity_rows(table, specs, samples, memory, statistic), memory


def restate(table: CostTable, rows: list[dict], samples: dict, memory: dict[str, int],
            statistic: str) -> tuple[CostTable, list[dict]]:
    """The same measurements summarised with another statistic (no re-measuring): the cost table
    and the additivity rows, e.g. to see how much of the error is the estimator's."""
    check_statistic(statistic)
    new_rows = [dict(r) for r in table.rows]
    # A table imported without its samples (profile_costs_from naming a bare costs.csv) cannot be
    # re-summarised: its rows stay as they are, and only the children's statistic changes.
    if samples.get("sub_blocks"):
        fill_timings(new_rows, table.scenarios, samples["sub_blocks"], statistic)
    new = CostTable(new_rows, table.scenarios, {**table.meta, "statistic": statistic})
    specs = [json.loads(r["choices"]) for r in rows if r["batch"] == table.batch_sizes[0]]
    return new, additivity_rows(new, specs, samples["children"], memory, statistic)


def summarize_additivity(rows: list[dict]) -> dict[str, float]:
    """Median and max relative errors over all rows, and of the speed-up over the children."""
    out: dict[str, float] = {}
    for what in ("prefill", "decode", "memory"):
        e = [r[f"{what}_rel_err"] for r in rows]
        out[f"{what}_median_rel_err"] = float(np.median(e))
        out[f"{what}_max_rel_err"] = float(np.max(e))
    for phase in PHASES:
        # Signed: < 0 when the sum of the parts misses time the whole model spends (a bias, not
        # noise: noise scatters both ways).
        signed = [(r[f"pred_{phase}_ms"] - r[f"meas_{phase}_ms"]) / r[f"meas_{phase}_ms"]
                  for r in rows if r[f"meas_{phase}_ms"] > 0]
        out[f"{phase}_median_signed_err"] = float(np.median(signed)) if signed else float("nan")
    for phase in PHASES:
        e = [r[f"{phase}_speedup_rel_err"] for r in rows if not r["is_parent"]]
        if e:
            out[f"{phase}_speedup_median_rel_err"] = float(np.median(e))
            out[f"{phase}_speedup_max_rel_err"] = float(np.max(e))
    out["n_children"] = len({r["child"] for r in rows if not r["is_parent"]})
    return out


def rows_to_csv(rows: list[dict], path: str | Path | None = None) -> str:
    """Rows of dicts -> CSV text (written atomically to ``path`` when given)."""
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    text = buf.getvalue()
    if path is not None:
        atomic_write_text(path, text)
    return text

def markdown_table(rows: list[dict], columns: list[str] | None = None, digits: int = 3) -> str:
    """A small Markdown table for the notebook (``IPython.display.Markdown``)."""
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)

