"""Serving scenarios and the cost table: what stage 01 produces and the search (stage 04) reads.

What it does:
* ``Scenario`` (batch sequences x prompt tokens x new tokens) and its parsing from the config
  (``parse_batch_sizes``, ``scenarios_from_config``, checked against the model's positions);
* ``CostTable``: one row per (layer, variant) plus the fixed row (layer -1); lookups (``cost``,
  ``fixed``, ``cost_matrix`` for the MIP), a child's cost predicted as the sum of its sub-blocks
  plus the fixed part (``predict``, ``predict_memory_bytes``, ``predict_scenario``), the parent as
  a child spec, and the table's CSV form (``to_csv`` / ``from_csv``);
* the table's schema constants: ``SUB_BLOCKS``, ``STATIC_METRICS``, ``TIMED_METRICS``, ``PHASES``,
  ``FIXED``.

Reads: a ``costs.csv`` (``CostTable.from_csv``). Writes: a ``costs.csv``, atomically
(``CostTable.to_csv``). Leaves out: measuring the table (``benches.profile_model``), checking it
end to end (``additivity``), importing an earlier run's table with its checks
(``profiling.import_costs``), and any cost model other than a sum of parts plus a fixed part.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.blocks import Variant
from ..core.config import RunConfig
from ..core.configuration_decilm import PuzzleConfig
from ..core.atomic import atomic_write_text
from .timing import ProfilingError

SUB_BLOCKS = ("attn", "ffn")
# Metrics that do not depend on the scenario, and those measured per batch size.
STATIC_METRICS = ("params", "weight_bytes", "kv_bytes_per_token")
TIMED_METRICS = ("prefill_ms", "decode_ms")
PHASES = ("prefill", "decode")
FIXED = "fixed"


# ------------------------------------------------------------------------------ scenarios

@dataclass(frozen=True)
class Scenario:
    """One serving scenario: ``batch`` sequences, ``prompt_len`` prompt tokens, ``gen_len`` new
    tokens each."""

    batch: int
    prompt_len: int
    gen_len: int

    @property
    def key(self) -> str:
        """Column suffix in the cost table: ``b8`` -> ``prefill_ms@b8``."""
        return f"b{self.batch}"

    @property
    def decode_context(self) -> int:
        """Tokens in the KV cache for the measured decode step (the average step's context)."""
        return self.prompt_len + self.gen_len // 2

    @property
    def total_len(self) -> int:
        """Tokens per sequence at the end of generation: what the KV cache must hold."""
        return self.prompt_len + self.gen_len

    def check(self, max_positions: int | None = None) -> None:
        if self.batch <= 0:
            raise ProfilingError(f"batch size must be >= 1, got {self.batch}: fix profile_batch_sizes")
        if self.prompt_len <= 0:
            raise ProfilingError(f"prompt length must be >= 1, got {self.prompt_len}: "
                                 "fix profile_prompt_len")
        if self.gen_len <= 0:
            raise ProfilingError(f"generation length must be >= 1 (decode needs a new token), got "
                                 f"{self.gen_len}: fix profile_gen_len")
        if max_positions is not None and self.total_len > max_positions:
            raise ProfilingError(
                f"scenario prompt_len + gen_len = {self.prompt_len} + {self.gen_len} = "
                f"{self.total_len} tokens exceeds the model's max_position_embeddings="
                f"{max_positions}: lower profile_prompt_len / profile_gen_len so they sum to at "
                f"most {max_positions}")


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,8"`` -> ``[1, 8]`` (sorted, unique); refuses anything but positive integers."""
    try:
        sizes = [int(t) for t in str(text).replace(" ", "").split(",") if t]
    except ValueError:
        raise ProfilingError(f"profile_batch_sizes must be comma-separated integers like '1,8', "
                             f"got {text!r}") from None
    if not sizes or min(sizes) <= 0:
        raise ProfilingError(f"profile_batch_sizes must list batch sizes >= 1 like '1,8', got {text!r}")
    return sorted(set(sizes))


def scenarios_from_config(cfg: RunConfig, max_positions: int | None = None) -> list[Scenario]:
    """One scenario per batch size in ``cfg.profile_batch_sizes``, checked against the model."""
    out = [Scenario(b, cfg.profile_prompt_len, cfg.profile_gen_len)
           for b in parse_batch_sizes(cfg.profile_batch_sizes)]
    for s in out:
        s.check(max_positions)
    return out

# ------------------------------------------------------------------------------ the cost table

def cost_column(metric: str, s: Scenario | int | str) -> str:
    key = s.key if isinstance(s, Scenario) else f"b{s}" if isinstance(s, int) else s
    return f"{metric}@{key}"


def choice_names(child) -> list[tuple[str, str]]:
    out = []
    for pair in child:
        a, f = pair
        out.append((a.name if isinstance(a, Variant) else str(a),
                    f.name if isinstance(f, Variant) else str(f)))
    return out


class CostTable:
    """Per-(layer, variant) costs plus the fixed part; what the search (stage 04) reads.

    Rows are dicts with the CSV columns: ``layer`` (-1 for the fixed row), ``sub_block``
    (attn | ffn | fixed), ``variant`` (e.g. ``attn:kv2``, ``ffn:0.50``, ``fixed``), ``op``,
    ``kv_heads``, ``ffn_width``, ``measured_on_layer``, ``is_parent``, ``params``, ``weight_bytes``,
    ``kv_bytes_per_token`` and, for every scenario key ``b{B}``, ``prefill_ms@bB`` / ``decode_ms@bB``
    (medians) with ``..._p10@bB`` / ``..._p90@bB`` (spread).

    A child is a list, one ``(attention variant, FFN variant)`` pair per layer, as names or
    :class:`~puzzlelib.core.blocks.Variant` objects.
    """

    def __init__(self, rows: list[dict], scenarios: list[Scenario], meta: dict | None = None):
        self.rows = rows
        self.scenarios = list(scenarios)
        self.meta = dict(meta or {})
        self._index = {(r["layer"], r["variant"]): r for r in rows}
        if (-1, FIXED) not in self._index:
            raise ProfilingError("cost table has no fixed row (layer -1): it is damaged; rerun "
                                 "stage 01_profiling with force=True")
        self.num_layers = 1 + max((r["layer"] for r in rows), default=-1)

    # ---- lookup ----
    @property
    def batch_sizes(self) -> list[int]:
        return [s.batch for s in self.scenarios]

    def scenario(self, batch: int) -> Scenario:
        for s in self.scenarios:
            if s.batch == batch:
                return s
        raise ProfilingError(f"batch size {batch} was not profiled (profiled: {self.batch_sizes}); "
                             "add it to profile_batch_sizes and rerun stage 01_profiling")

    def variants(self, layer: int, sub_block: str) -> list[str]:
        """Variant names profiled at ``layer`` for ``sub_block`` ('attn' or 'ffn'), table order."""
        return [r["variant"] for r in self.rows if r["layer"] == layer and r["sub_block"] == sub_block]

    def row(self, layer: int, variant: str | Variant) -> dict:
        name = variant.name if isinstance(variant, Variant) else variant
        try:
            return self._index[(layer, name)]
        except KeyError:
            if not 0 <= layer < self.num_layers:
                raise ProfilingError(f"layer {layer} is out of range: the table has layers "
                                     f"0..{self.num_layers - 1}") from None
            kind = name.split(":")[0]
            raise ProfilingError(f"variant {name!r} was not profiled at layer {layer}; profiled: "
                                 f"{', '.join(self.variants(layer, kind)) or 'none'}") from None

    def _value(self, row: dict, metric: str, batch: int | None) -> float:
        if metric in STATIC_METRICS:
            return float(row[metric])
        if metric not in TIMED_METRICS:
            raise ProfilingError(f"unknown metric {metric!r}; metrics: "
                                 f"{', '.join(STATIC_METRICS + TIMED_METRICS)}")
        if batch is None:
            raise ProfilingError(f"{metric} depends on the batch size: pass batch= one of "
                                 f"{self.batch_sizes}")
        return float(row[cost_column(metric, self.scenario(batch))])

    def cost(self, layer: int, variant: str | Variant, metric: str, batch: int | None = None) -> float:
        """One sub-block's cost: ``metric`` in params | weight_bytes | kv_bytes_per_token |
        prefill_ms | decode_ms (the last two per batch size)."""
        return self._value(self.row(layer, variant), metric, batch)

    def fixed(self, metric: str, batch: int | None = None) -> float:
        """The fixed part's cost (embeddings, final norm, LM head, layer skeleton)."""
        return self._value(self._index[(-1, FIXED)], metric, batch)

    def cost_matrix(self, sub_block: str, metric: str, batch: int | None = None
                    ) -> tuple[list[str], np.ndarray]:
        """(variant names, array [layers, variants]) for a MIP; NaN where a layer lacks a variant."""
        names: list[str] = []
        for i in range(self.num_layers):
            names += [n for n in self.variants(i, sub_block) if n not in names]
        out = np.full((self.num_layers, len(names)), np.nan)
        for i in range(self.num_layers):
            for j, n in enumerate(names):
                if (i, n) in self._index:
                    out[i, j] = self.cost(i, n, metric, batch)
        return names, out

    # ---- children ----
    def parent_choices(self) -> list[tuple[str, str]]:
        """The parent as a child spec (its own sub-block at every layer)."""
        out = []
        for i in range(self.num_layers):
            pick = {k: next((r["variant"] for r in self.rows if r["layer"] == i
                             and r["sub_block"] == k and r["is_parent"]), f"{k}:noop")
                    for k in SUB_BLOCKS}
            out.append((pick["attn"], pick["ffn"]))
        return out

    def choices_from_config(self, config: PuzzleConfig) -> list[tuple[str, str]]:
        """A child's per-layer variant names, read off its ``block_configs`` (e.g. an export)."""
        out = []
        for i in range(config.num_hidden_layers):
            pair = []
            for k in SUB_BLOCKS:
                op = config.attn_kind(i) if k == "attn" else config.ffn_kind(i)
                match = [r for r in self.rows if r["layer"] == i and r["sub_block"] == k
                         and r["op"] == op and r["kv_heads"] == config.kv_heads(i) * (k == "attn")
                         and r["ffn_width"] == config.ffn_width(i) * (k == "ffn")]
                if not match:
                    raise ProfilingError(f"layer {i}: the child's {k} ({op}) matches no profiled "
                                         "variant; profile it or choose from the library")
                pair.append(match[0]["variant"])
            out.append(tuple(pair))
        return out

    def _check_child(self, child) -> list[tuple[str, str]]:
        names = choice_names(child)
        if len(names) != self.num_layers:
            raise ProfilingError(f"a child needs one (attention, ffn) pair per layer: got "
                                 f"{len(names)}, the table has {self.num_layers} layers")
        return names

    def predict(self, child, metric: str, batch: int | None = None) -> float:
        """Predicted cost of ``child``: fixed part + the sum of its sub-blocks' costs."""
        total = self.fixed(metric, batch)
        for i, (a, f) in enumerate(self._check_child(child)):
            total += self.cost(i, a, metric, batch) + self.cost(i, f, metric, batch)
        return total

    def predict_memory_bytes(self, child, batch: int, context: int | None = None) -> float:
        """Weights + KV cache of ``batch`` sequences of ``context`` tokens (default: the scenario's
        prompt + generation length)."""
        ctx = self.scenario(batch).total_len if context is None else context
        return (self.predict(child, "weight_bytes")
                + batch * ctx * self.predict(child, "kv_bytes_per_token"))

    def predict_scenario(self, child, batch: int) -> dict[str, float]:
        """Everything the search constrains, for one scenario.

        generation_s = prefill + gen_len × (mid-context decode step); tokens_per_s counts generated
        tokens of the whole batch over that time.
        """
        s = self.scenario(batch)
        pre, dec = self.predict(child, "prefill_ms", batch), self.predict(child, "decode_ms", batch)
        gen_s = (pre + s.gen_len * dec) / 1e3
        return {"params": self.predict(child, "params"),
                "weight_bytes": self.predict(child, "weight_bytes"),
                "memory_bytes": self.predict_memory_bytes(child, batch),
                "prefill_ms": pre, "decode_ms": dec, "generation_s": gen_s,
                "tokens_per_s": s.batch * s.gen_len / gen_s if gen_s > 0 else float("inf"),
                "prefill_tokens_per_s": (s.batch * s.prompt_len / (pre / 1e3) if pre > 0
                                         else float("inf"))}

    # ---- files ----
    @property
    def columns(self) -> list[str]:
        cols = ["layer", "sub_block", "variant", "op", "kv_heads", "ffn_width", "measured_on_layer",
                "is_parent", *STATIC_METRICS]
        for s in self.scenarios:
            for m in TIMED_METRICS:
                base = m[:-3]
                cols += [cost_column(m, s), cost_column(f"{base}_ms_p10", s), cost_column(f"{base}_ms_p90", s)]
        return cols

    def to_csv(self, path: str | Path | None = None) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({c: (f"{r[c]:.6g}" if isinstance(r[c], float) else r[c]) for c in self.columns})
        text = buf.getvalue()
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_csv(cls, path: str | Path, scenarios: list[Scenario],
                 meta: dict | None = None) -> "CostTable":
        """Read a table written by :meth:`to_csv`. Every cost cell must be a finite number >= 0
        (a no-op sub-block costs 0): a ``nan`` would make every budget infeasible and a negative
        time would make a block look faster than free, so either is refused with its row and
        column (:class:`ProfilingError`), never searched over."""
        rows = []
        with open(path, newline="", encoding="utf-8") as f:
            for line, r in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
                row: dict[str, Any] = {}
                for k, v in r.items():
                    if k is None or v is None:
                        raise ProfilingError(f"{path}, line {line}: the row has "
                                             f"{'more' if k is None else 'fewer'} cells than the "
                                             f"header; {_FIX_TABLE}")
                    if k in ("sub_block", "variant", "op"):
                        row[k] = v
                    elif k == "is_parent":
                        row[k] = v == "True"
                    else:
                        row[k] = _cell(path, line, r, k, v)
                rows.append(row)
        return cls(rows, scenarios, meta)


_FIX_TABLE = ("rerun stage 01_profiling with force=True (or, for an imported table, fix that run's "
              "costs.csv or set profile_costs_from='' to measure here)")
_INT_COLUMNS = ("layer", "kv_heads", "ffn_width", "measured_on_layer", *STATIC_METRICS)


def _cell(path: str | Path, line: int, r: dict, k: str, v: str) -> float | int:
    """One numeric cell of a cost table, checked: finite, and >= 0 unless it is a layer index."""
    where = (f"{path}, line {line} (layer {r.get('layer')}, {r.get('variant')}), column {k}")
    try:
        x: float | int = int(v) if k in _INT_COLUMNS else float(v)
    except ValueError:
        raise ProfilingError(f"{where}: {v!r} is not a number; {_FIX_TABLE}") from None
    if not math.isfinite(x):
        raise ProfilingError(f"{where} is {v!r}, not a finite number; {_FIX_TABLE}")
    if x < 0 and not (k in ("layer", "measured_on_layer") and x == -1):  # -1: the fixed row
        raise ProfilingError(f"{where} is {v}: a cost cannot be negative; {_FIX_TABLE}")
    return x
