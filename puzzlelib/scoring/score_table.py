"""The replace-1-block score table: its schema, its errors, and reading / writing it.

What it does: :class:`ScoreTable` holds one row per scored (layer, variant, source) and answers
what stage 04 asks of it — one block's score, a [layer, variant] score matrix, the parent as a
child spec, the additive quality model (``predict``: the sum of a child's blocks' scores) and
clear errors naming the (layer, variant) pairs that were never scored and the fields to change.
Also here: the schema constants every scoring module shares (``SOURCES``, ``CANDIDATE_KINDS``,
``METRICS``, ``ADDITIVE_METRICS``, ``COLUMNS``), the stage name ``STAGE`` and
:class:`ScoringError`, so the other scoring modules import them from one place without a cycle.

Reads: rows in memory, or ``scores.json`` / ``scores.csv`` of a finished stage 03 when asked
(``from_json`` / ``from_csv``). Writes: ``scores.csv`` only when ``to_csv`` is given a path
(the stage, ``scoring.run``, decides the files). Leaves out: computing the scores
(``prefix_scoring``), the interaction check (``interactions``) and the stage itself (``scoring``).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..core.blocks import Variant
from ..core.atomic import atomic_write_text
from ..core.rundir import read_csv_rows

STAGE = "03_scoring"
SOURCES = ("bld", "init")
CANDIDATE_KINDS = ("attn", "ffn", "pair")
# Metrics stored per candidate. ADDITIVE ones are those a sum over blocks can predict: each is
# 0 for the parent's own block, and the search adds them up.
METRICS = ("kl", "kl_sem", "lm_loss", "lm_loss_delta", "top1_agreement", "nmse")
ADDITIVE_METRICS = ("kl", "lm_loss_delta")
COLUMNS = ("layer", "sub_block", "variant", "source", "is_parent", "trained", *METRICS, "tokens")


class ScoringError(ValueError):
    """Scoring cannot run with these inputs; the message says what to change."""


# ------------------------------------------------------------------------------- score table

class ScoreTable:
    """Replace-1-block scores, one row per (layer, variant, source); what stage 04 reads.

    ``source`` is "bld" (the library's trained blocks: what children are built from) or "init"
    (the same variants straight from the parent, before BLD; untrained blocks — the parent's
    own, no-ops — are stored once, as "bld", and answer for both). Metrics: ``kl`` (nats/token),
    ``kl_sem``, ``lm_loss``, ``lm_loss_delta``, ``top1_agreement``, ``nmse``. ``meta`` holds
    ``parent_lm_loss``, ``tokens``, ``seq_len`` and the library's parent fingerprint.
    """

    def __init__(self, rows: list[dict], meta: dict | None = None):
        self.rows = [dict(r) for r in rows]
        self.meta = dict(meta or {})
        self._index = {(r["layer"], r["variant"], r["source"]): r for r in self.rows}
        if len(self._index) != len(self.rows):
            raise ScoringError("score table has duplicate (layer, variant, source) rows; it is "
                               "damaged: rerun stage 03_scoring with force=True")
        self.num_layers = 1 + max((r["layer"] for r in self.rows), default=-1)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def sources(self) -> list[str]:
        return [s for s in SOURCES if any(r["source"] == s for r in self.rows)]

    def variants(self, layer: int, sub_block: str, source: str = "bld") -> list[str]:
        """Variant names scored at ``layer`` for ``sub_block`` (attn | ffn | pair), table order."""
        if sub_block not in CANDIDATE_KINDS:
            raise ScoringError(f"sub_block must be one of {CANDIDATE_KINDS}, got {sub_block!r}")
        names: list[str] = []
        for r in self.rows:
            if (r["layer"] == layer and r["sub_block"] == sub_block and r["variant"] not in names
                    and self._lookup(layer, r["variant"], source) is not None):
                names.append(r["variant"])
        return names

    def all_variants(self, sub_block: str, source: str = "bld") -> list[str]:
        """Union over layers of the scored variant names, first-seen order."""
        names: list[str] = []
        for i in range(self.num_layers):
            names += [n for n in self.variants(i, sub_block, source) if n not in names]
        return names

    def _lookup(self, layer: int, name: str, source: str) -> dict | None:
        r = self._index.get((layer, name, source))
        if r is None and source == "init":
            # Untrained blocks (the parent's own, no-ops) are the same before and after BLD and
            # are scored once, as "bld".
            b = self._index.get((layer, name, "bld"))
            r = b if b is not None and not b["trained"] else None
        return r

    def row(self, layer: int, variant: str | Variant, source: str = "bld") -> dict:
        """The candidate's row; a clear error (what to change) if it was not scored."""
        name = variant.name if isinstance(variant, Variant) else str(variant)
        r = self._lookup(layer, name, source)
        if r is not None:
            return r
        if not 0 <= layer < self.num_layers:
            raise ScoringError(f"layer {layer} is out of range: the table has layers "
                               f"0..{self.num_layers - 1}")
        if source not in self.sources:
            raise ScoringError(f"no {source!r} scores in this table (sources: {self.sources}); "
                               "for 'init' set scoring_include_init=True and rerun 03_scoring")
        sub = "pair" if "+" in name else name.split(":")[0]
        have = self.variants(layer, sub, source) if sub in CANDIDATE_KINDS else []
        raise ScoringError(
            f"variant {name!r} has no {source} score at layer {layer} (scored there: "
            f"{', '.join(have) or 'none'}). The block library (stage 02_bld) does not contain it: "
            "add it to bld_kv_heads / bld_ffn_fractions / bld_include_linear / bld_include_noop and "
            "rerun 02_bld and 03_scoring, or leave it out of the search space.")

    def score(self, layer: int, variant: str | Variant, metric: str = "kl",
              source: str = "bld") -> float:
        """One block's score, e.g. ``table.score(3, "ffn:0.25")`` → KL in nats/token."""
        if metric not in METRICS:
            raise ScoringError(f"unknown metric {metric!r}; metrics: {', '.join(METRICS)}")
        return float(self.row(layer, variant, source)[metric])

    def score_matrix(self, sub_block: str, metric: str = "kl", source: str = "bld"
                     ) -> tuple[list[str], np.ndarray]:
        """(variant names, array [layers, variants]); NaN where a layer lacks a variant."""
        names = self.all_variants(sub_block, source)
        out = np.full((self.num_layers, len(names)), np.nan)
        for i in range(self.num_layers):
            for j, n in enumerate(names):
                r = self._lookup(i, n, source)
                if r is not None:
                    out[i, j] = float(r[metric])
        return names, out

    def parent_choices(self) -> list[tuple[str, str]]:
        """The parent as a child spec, read off the rows marked ``is_parent``."""
        out = []
        for i in range(self.num_layers):
            pick = []
            for k in ("attn", "ffn"):
                names = [r["variant"] for r in self.rows if r["layer"] == i and r["sub_block"] == k
                         and r["is_parent"] and r["source"] == "bld"]
                pick.append(names[0] if names else f"{k}:noop")
            out.append((pick[0], pick[1]))
        return out

    def predict(self, child: Sequence[tuple[str, str]], metric: str = "kl",
                source: str = "bld") -> float:
        """The additive quality model: the sum of the child's blocks' scores (parent blocks: 0)."""
        if metric not in ADDITIVE_METRICS:
            raise ScoringError(f"only {ADDITIVE_METRICS} add up over blocks; got {metric!r}")
        if len(child) != self.num_layers:
            raise ScoringError(f"a child needs one (attention, ffn) pair per layer: got "
                               f"{len(child)}, the table has {self.num_layers} layers")
        return float(sum(self.score(i, str(v), metric, source)
                         for i, pair in enumerate(child) for v in pair))

    def missing(self, wanted: Iterable[tuple[int, str]], source: str = "bld") -> list[tuple[int, str]]:
        """The (layer, variant) pairs of ``wanted`` with no score (e.g. a cost table's rows)."""
        return [(i, str(n)) for i, n in wanted if self._lookup(i, str(n), source) is None]

    def require(self, wanted: Iterable[tuple[int, str]], what: str = "the cost table",
                source: str = "bld") -> None:
        """Raise :class:`ScoringError` naming every (layer, variant) of ``wanted`` not scored."""
        miss = self.missing(wanted, source)
        if miss:
            raise ScoringError(
                f"{len(miss)} (layer, variant) pairs listed in {what} have no score, e.g. "
                f"{miss[:4]}: the block library (stage 02_bld) lacks them. Add them to the BLD "
                "variant lists (bld_kv_heads, bld_ffn_fractions, bld_include_linear, "
                "bld_include_noop) and rerun 02_bld and 03_scoring, or drop them from the search.")

    # ---- serialisation ----
    def to_rows(self) -> list[dict]:
        return [dict(r) for r in self.rows]

    def to_csv(self, path: str | Path | None = None) -> str:
        text = score_rows_to_csv(self.rows, COLUMNS)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_csv(cls, path: str | Path, meta: dict | None = None) -> "ScoreTable":
        return cls(read_csv_rows(path), meta)

    @classmethod
    def from_json(cls, path: str | Path) -> "ScoreTable":
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(d["rows"], d.get("meta"))


def score_rows_to_csv(rows: list[dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        # repr-exact floats: the CSV reads back to the very numbers in scores.json.
        w.writerow({k: repr(v) if isinstance(v, float) else v for k, v in r.items()})
    return buf.getvalue()
