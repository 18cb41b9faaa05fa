"""Local lm-evaluation-harness tasks built from held-out files: deterministic, offline, hashed;
and the lm-eval settings and command that reproduce stage 06's numbers (stage 05 writes them into
every exported child's README, stage 06 runs them), with ``EvaluationError``.

What it does: turns the held-out documents of the run's corpus (files the parent never trained on,
split by ``data.load_corpus``) into three lm-eval tasks, every model of stage 06 answering the very
same samples:

* ``puzzle_next_line`` — 4-way multiple choice, "which line comes next". Context: up to
  ``context_lines`` lines of a held-out file; choices: the true next line and 3 distractor lines
  taken from *other* held-out files (another place in the same file only when there is a single
  held-out file), of similar length and re-indented to the true line's indentation, so a choice
  cannot be told apart by its length or indentation alone. Chance: 0.25.
* ``puzzle_name_recall`` — 4-way multiple choice, "which name comes next". The context is cut just
  before an identifier that already occurred in it; the choices are that identifier and 3 *other*
  identifiers from the same context, each followed by the character that really follows (``(``,
  ``.``, a space …), so a short name is not favoured merely for being short. Every choice was seen
  in the context, so the answer has to be recalled from it (an attention job), although priors
  (which names follow ``self.``) keep a context-blind model above chance. Chance: 0.25.
* ``puzzle_bpb`` — bits per byte (``loglikelihood_rolling``) on held-out chunks of about
  ``chunk_bytes`` bytes, cut at line ends. Lower is better; no chance level.

Multiple-choice tasks use ``target_delimiter: ""`` (lm-eval's default " " would put a space into
Python indentation) and report lm-eval's ``acc`` and ``acc_norm``; next-line also
``acc_mutual_info`` (PMI: each line also scored without its context), its headline metric.

Every sample is drawn by a numpy generator seeded with (seed, task), so the same corpus and config
give byte-identical JSONL files; :func:`write_tasks` records their sha256.

``build_local_tasks`` builds the run's tasks from its held-out split (checked against the
fingerprint stage 00 recorded); ``hflm_settings`` gives what lm-eval's ``HFLM`` needs besides the
model and where stage 06 writes the task files; ``lm_eval_command`` the command line for an
exported checkpoint.

Reads: nothing but the corpus (``build_local_tasks``) and stage 00's ``corpus.json``. Writes
(``write_tasks``): ``<dir>/<task>.jsonl``, ``<dir>/<task>.yaml`` and ``<dir>/tasks.json``; the
YAMLs point at the JSONL files by absolute path, so ``lm_eval --include_path <dir>`` works from
any working directory as long as the run directory stays where it is. Leaves out: generative
tasks (exact-match on code is near zero for a model this small), few-shot prompts, and chat
templates.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import keyword
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import RunConfig
from .rundir import RunDir

NEXT_LINE, NAME_RECALL, BPB = "puzzle_next_line", "puzzle_name_recall", "puzzle_bpb"
MC_TASKS = (NEXT_LINE, NAME_RECALL)
LOCAL_TASKS = (NEXT_LINE, NAME_RECALL, BPB)
NUM_CHOICES = 4
CHANCE = {NEXT_LINE: 1 / NUM_CHOICES, NAME_RECALL: 1 / NUM_CHOICES}
# A line is a next-line target (or distractor) when its stripped text has this many characters:
# shorter lines ("else:", ")") are guessable from syntax alone, longer ones dominate the score.
MIN_LINE_CHARS, MAX_LINE_CHARS = 12, 100
MIN_NAME_CHARS = 3
# Names too frequent to test recall: keywords, literals, the receiver names.
_SKIP_NAMES = set(keyword.kwlist) | set(getattr(keyword, "softkwlist", [])) | {"self", "cls"}
_NAME = re.compile(r"(?<![A-Za-z0-9_])[A-Za-z_][A-Za-z0-9_]*")
_TASK_SEEDS = {NEXT_LINE: 0x4E4C, NAME_RECALL: 0x4E52, BPB: 0xB9B}

# The stage whose run folder holds the task files (``hflm_settings``' ``tasks_dir``).
TASKS_STAGE = "06_evaluation"


class EvaluationError(ValueError):
    """Stage 06 (or the evaluation protocol here) cannot go on with this input; the message says
    what to change. Every part of stage 06 raises it, and stage 05 catches it when it cannot write
    the lm-eval command into an exported child."""


class TaskBuildError(ValueError):
    """The held-out split cannot supply the requested samples; the message says what to change."""


@dataclass
class BuiltTask:
    """One task's rows (the JSONL content) and what the report needs to know about it."""

    name: str
    kind: str                      # "multiple_choice" | "loglikelihood_rolling"
    rows: list[dict]
    chance: float | None
    description: str
    info: dict = field(default_factory=dict)
    metrics: tuple[str, ...] = ("acc", "acc_norm")  # lm-eval metrics of a multiple-choice task


# ------------------------------------------------------------------------------------- helpers

def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _rng(seed: int, task: str) -> np.random.Generator:
    return np.random.default_rng([seed, _TASK_SEEDS[task]])


def _context(lines: list[str], i: int, context_lines: int) -> str | None:
    """The ``context_lines`` lines before line i, newline-terminated; None if nearly empty."""
    ctx = lines[max(0, i - context_lines): i]
    if sum(1 for ln in ctx if ln.strip()) < 2:
        return None
    return "\n".join(ctx) + "\n"


def _eligible_line(text: str) -> bool:
    s = text.strip()
    return MIN_LINE_CHARS <= len(s) <= MAX_LINE_CHARS


def _shortfall(task: str, got: int, wanted: int, field_name: str, why: str) -> TaskBuildError:
    return TaskBuildError(
        f"{task}: the held-out split yields only {got} usable samples ({why}) but {field_name}="
        f"{wanted} were requested: lower {field_name}, or give the held-out split more text "
        "(raise heldout_fraction or corpus_max_bytes)")


# ------------------------------------------------------------------------------- next line

def build_next_line(docs: list[str], names: list[str], n: int, context_lines: int, seed: int) -> BuiltTask:
    """``n`` "which line comes next" samples (see the module docstring)."""
    lines = [d.split("\n") for d in docs]
    # Distractor pool sorted by stripped length, so "similar length" is a bisect.
    pool = sorted((len(ln.strip()), d, i) for d, ls in enumerate(lines) for i, ln in enumerate(ls)
                  if _eligible_line(ln))
    pool_len = [p[0] for p in pool]
    candidates = [(d, i) for d, ls in enumerate(lines) for i in range(1, len(ls)) if _eligible_line(ls[i])]
    rng = _rng(seed, NEXT_LINE)
    single_file = len(docs) < 2
    rows: list[dict] = []
    for k in rng.permutation(len(candidates)):
        if len(rows) == n:
            break
        d, i = candidates[k]
        ctx = _context(lines[d], i, context_lines)
        if ctx is None:
            continue
        true = lines[d][i]
        want = len(true.strip())
        picked: list[str] = []
        seen = {true.strip()}
        # Widen the length window until 3 distinct distractors are found.
        for tol in (0.15, 0.35, 1.0, None):
            lo, hi = (0, len(pool)) if tol is None else (
                bisect.bisect_left(pool_len, want * (1 - tol)), bisect.bisect_right(pool_len, want * (1 + tol)))
            order = rng.permutation(np.arange(lo, hi)) if hi > lo else []
            for j in order:
                _, dd, ii = pool[j]
                if dd == d and (not single_file or abs(ii - i) <= context_lines + 1):
                    continue  # another file (or, with one file, far from this place)
                text = lines[dd][ii].strip()
                if text in seen:
                    continue
                seen.add(text)
                picked.append(text)
                if len(picked) == NUM_CHOICES - 1:
                    break
            if len(picked) == NUM_CHOICES - 1:
                break
        if len(picked) < NUM_CHOICES - 1:
            continue
        indent = _indent(true)
        label = int(rng.integers(NUM_CHOICES))
        choices = [indent + t + "\n" for t in picked]
        choices.insert(label, true + "\n")
        rows.append({"id": f"{NEXT_LINE}-{len(rows):05d}", "source": f"{names[d]}:{i + 1}",
                     "context": ctx, "choices": choices, "label": label})
    if len(rows) < n:
        raise _shortfall(NEXT_LINE, len(rows), n, "eval_next_line_samples",
                         f"{len(docs)} held-out files, {len(candidates)} lines of "
                         f"{MIN_LINE_CHARS}-{MAX_LINE_CHARS} characters")
    # acc_mutual_info: lm-eval also scores every choice without its context, so a choice can be
    # ranked by PMI = log P(line | context) - log P(line) (see evaluation.SCORING for why).
    return BuiltTask(NEXT_LINE, "multiple_choice", rows, CHANCE[NEXT_LINE],
                     "which line comes next: the true next line vs 3 lines of similar length from other "
                     "held-out files, re-indented alike; ranked by PMI",
                     {"candidates": len(candidates), "context_lines": context_lines},
                     ("acc", "acc_norm", "acc_mutual_info"))


# ------------------------------------------------------------------------------ name recall

def _names_in(text: str) -> list[str]:
    return [m.group(0) for m in _NAME.finditer(text)
            if len(m.group(0)) >= MIN_NAME_CHARS and m.group(0) not in _SKIP_NAMES]


def build_name_recall(docs: list[str], names: list[str], n: int, context_lines: int, seed: int) -> BuiltTask:
    """``n`` "which name comes next" samples (see the module docstring)."""
    lines = [d.split("\n") for d in docs]
    candidates = [(d, i, m.start(), m.end()) for d, ls in enumerate(lines) for i in range(1, len(ls))
                  for m in _NAME.finditer(ls[i])
                  if len(m.group(0)) >= MIN_NAME_CHARS and m.group(0) not in _SKIP_NAMES]
    rng = _rng(seed, NAME_RECALL)
    rows: list[dict] = []
    used: set[tuple[int, int]] = set()  # at most one sample per line: samples stay diverse
    for k in rng.permutation(len(candidates)):
        if len(rows) == n:
            break
        d, i, start, end = candidates[k]
        if (d, i) in used:
            continue
        prior = _context(lines[d], i, context_lines)
        if prior is None:
            continue
        line = lines[d][i]
        ctx = prior + line[:start]
        name = line[start:end]
        seen = list(dict.fromkeys(_names_in(ctx)))  # first-occurrence order: deterministic
        if name not in seen:
            continue  # not a recall: the name is new here
        others = [s for s in seen if s != name]
        if len(others) < NUM_CHOICES - 1:
            continue
        picked = [others[j] for j in rng.choice(len(others), NUM_CHOICES - 1, replace=False)]
        after = line[end] if end < len(line) else "\n"
        label = int(rng.integers(NUM_CHOICES))
        choices = [p + after for p in picked]
        choices.insert(label, name + after)
        used.add((d, i))
        rows.append({"id": f"{NAME_RECALL}-{len(rows):05d}", "source": f"{names[d]}:{i + 1}",
                     "context": ctx, "choices": choices, "label": label})
    if len(rows) < n:
        raise _shortfall(NAME_RECALL, len(rows), n, "eval_name_samples",
                         f"{len(candidates)} identifier positions in {len(docs)} held-out files, of which "
                         "few repeat a name seen in the preceding lines")
    return BuiltTask(NAME_RECALL, "multiple_choice", rows, CHANCE[NAME_RECALL],
                     "which name comes next: an identifier already seen in the context vs 3 other "
                     "identifiers from the same context (in-context recall)",
                     {"candidates": len(candidates), "context_lines": context_lines})


# --------------------------------------------------------------------------- bits per byte

def chunk_doc(doc: str, chunk_bytes: int) -> list[str]:
    """Cut a document at line ends into pieces of at most ``chunk_bytes`` bytes (a longer single
    line is its own piece); pieces under a quarter of ``chunk_bytes`` or blank are dropped."""
    out, cur, size = [], [], 0
    for line in doc.splitlines(keepends=True):
        b = len(line.encode("utf-8"))
        if cur and size + b > chunk_bytes:
            out.append("".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += b
    if cur:
        out.append("".join(cur))
    return [c for c in out if c.strip() and len(c.encode("utf-8")) >= chunk_bytes // 4]


def build_bpb(docs: list[str], names: list[str], n: int, chunk_bytes: int, seed: int) -> BuiltTask:
    """``n`` held-out chunks for bits per byte, drawn without replacement."""
    chunks = [(d, k, c) for d, doc in enumerate(docs) for k, c in enumerate(chunk_doc(doc, chunk_bytes))]
    if len(chunks) < n:
        raise _shortfall(BPB, len(chunks), n, "eval_bpb_chunks",
                         f"{len(docs)} held-out files cut into pieces of <= eval_bpb_chunk_bytes={chunk_bytes}")
    pick = _rng(seed, BPB).choice(len(chunks), n, replace=False)
    rows = [{"id": f"{BPB}-{j:05d}", "source": f"{names[chunks[p][0]]}#{chunks[p][1]}", "text": chunks[p][2]}
            for j, p in enumerate(pick)]
    return BuiltTask(BPB, "loglikelihood_rolling", rows, None,
                     "bits per byte of held-out chunks (lower is better)",
                     {"chunks_available": len(chunks), "chunk_bytes": chunk_bytes,
                      "bytes": sum(len(r["text"].encode("utf-8")) for r in rows)})


def build_tasks(docs: list[str], names: list[str], *, next_line: int, name_recall: int, bpb_chunks: int,
                bpb_chunk_bytes: int, context_lines: int, seed: int) -> list[BuiltTask]:
    """Every local task, in memory (nothing written): bad sizes fail here, before any artifact."""
    if not docs:
        raise TaskBuildError("the held-out split is empty: raise heldout_fraction (e.g. 0.05)")
    return [build_next_line(docs, names, next_line, context_lines, seed),
            build_name_recall(docs, names, name_recall, context_lines, seed),
            build_bpb(docs, names, bpb_chunks, bpb_chunk_bytes, seed)]


# ------------------------------------------------------------------------------- lm-eval files

def task_yaml(t: BuiltTask, data_file: Path, cache_dir: Path | None = None) -> str:
    """The lm-eval task config of ``t`` (YAML text), reading ``data_file`` (absolute path).

    Plain feature names (``doc_to_text: context``) rather than Jinja templates: lm-eval then passes
    the text through untouched (no template rendering of code that contains ``{{``).
    """
    import yaml

    kwargs: dict = {"data_files": {"test": str(Path(data_file).absolute())}}
    if cache_dir is not None:  # keep the datasets cache out of ~/.cache
        kwargs["cache_dir"] = str(Path(cache_dir).absolute())
    cfg: dict = {"task": t.name, "dataset_path": "json", "dataset_kwargs": kwargs, "test_split": "test",
                 "output_type": t.kind}
    if t.kind == "multiple_choice":
        cfg.update(doc_to_text="context", doc_to_choice="choices", doc_to_target="label",
                   target_delimiter="", metric_list=[
                       {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in t.metrics])
    else:
        cfg.update(doc_to_text="", doc_to_target="text", metric_list=[
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
            {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False}])
    cfg["metadata"] = {"version": 1.0, "description": t.description}
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_tasks(built: list[BuiltTask], out_dir: str | Path, settings: dict | None = None) -> dict:
    """Write each task's JSONL + YAML into ``out_dir`` and ``tasks.json`` (counts, chance, sha256).

    Returns the ``tasks.json`` content. Files are written atomically (``rundir.atomic_*``).
    """
    from .atomic import atomic_write_json, atomic_write_text

    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    index: dict = {"settings": dict(settings or {}), "tasks": {}}
    for t in built:
        data_file = out_dir / f"{t.name}.jsonl"
        atomic_write_text(data_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in t.rows))
        atomic_write_text(out_dir / f"{t.name}.yaml", task_yaml(t, data_file, out_dir / ".datasets_cache"))
        index["tasks"][t.name] = {"kind": t.kind, "samples": len(t.rows), "chance": t.chance,
                                  "description": t.description, **t.info,
                                  "jsonl_sha256": _sha256(data_file),
                                  "yaml_sha256": _sha256(out_dir / f"{t.name}.yaml")}
    atomic_write_json(out_dir / "tasks.json", index)
    return index


def read_rows(tasks_dir: str | Path, task: str) -> list[dict]:
    """The rows of a written task, in sample order (what lm-eval's ``doc_id`` indexes)."""
    path = Path(tasks_dir) / f"{task}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def task_manager(tasks_dir: str | Path, include_defaults: bool = False):
    """An lm-eval ``TaskManager`` that sees the local tasks. ``include_defaults=False`` skips
    indexing lm-eval's ~10k bundled task configs (about 9 s); standard tasks need it True."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(Path(tasks_dir).absolute()), include_defaults=include_defaults)


# ---- the run's tasks and the lm-eval settings stage 05 and stage 06 share -----------------------
def task_settings(cfg: RunConfig) -> dict:
    return dict(next_line=cfg.eval_next_line_samples, name_recall=cfg.eval_name_samples,
                bpb_chunks=cfg.eval_bpb_chunks, bpb_chunk_bytes=cfg.eval_bpb_chunk_bytes,
                context_lines=cfg.eval_context_lines, seed=cfg.seed)


def build_local_tasks(cfg: RunConfig, parent_dir: Path | None = None) -> list[BuiltTask]:
    """The run's local tasks, in memory, from the held-out split ``data.load_corpus`` reproduces.

    With ``parent_dir`` (stage 00's folder) the split is checked against the fingerprint stage 00
    recorded, so the tasks never use text the parent trained on (another Python's stdlib would).
    """
    from . import data

    corpus = data.load_corpus(cfg.corpus, cfg.corpus_max_bytes, cfg.heldout_fraction, cfg.seed)
    if parent_dir is not None:
        recorded = json.loads((Path(parent_dir) / "corpus.json").read_text()).get("fingerprint")
        if recorded != corpus.fingerprint:
            raise EvaluationError(
                f"the corpus read now (fingerprint {corpus.fingerprint[:12]}, Python "
                f"{corpus.python_version}) differs from the one stage 00 split (fingerprint "
                f"{str(recorded)[:12]}): held-out files could overlap the parent's training files. "
                "Run the pipeline on the Python that ran stage 00, or rerun notebooks/00_parent.ipynb")
    return build_tasks(corpus.heldout_docs, corpus.heldout_names, **task_settings(cfg))


def lm_eval_max_length(seq_len: int, max_positions: int, built: list[BuiltTask], tokenizer) -> int:
    """The window lm-eval scores in: the training length ``seq_len`` (longer contexts are cut from
    the left, as the model saw them in training), widened only when an answer choice alone needs
    more tokens (lm-eval refuses a choice longer than its window)."""
    longest = max((len(tokenizer(c, add_special_tokens=False)["input_ids"]) for t in built
                   if t.kind == "multiple_choice" for r in t.rows for c in r["choices"]), default=0)
    need = max(seq_len, longest + 8)  # + a few tokens of context
    if need > max_positions:
        raise EvaluationError(f"an answer choice is {longest} tokens long but the model has only {max_positions} "
                              "positions: lower eval_context_lines or use a parent with longer positions")
    return min(need, max_positions)


def hflm_settings(cfg: RunConfig, built: list[BuiltTask], tokenizer, max_positions: int) -> dict:
    """What stage 06 hands lm-eval's ``HFLM`` besides the model, and where it writes the tasks.

    Stage 05 writes it into every exported child (``export.save_checkpoint(lm_eval=...)``): lm-eval
    reads ``max_length`` and ``prefix_token_id`` only from ``--model_args`` (a model folder's
    config gives it ``max_position_embeddings`` and the tokenizer's BOS instead), so the folder's
    README spells out the command that reproduces this stage's numbers.
    """
    return {"max_length": lm_eval_max_length(cfg.seq_len, max_positions, built, tokenizer),
            "prefix_token_id": tokenizer.eos_token_id if cfg.parent == "embedded" else None,  # see evaluate_model
            "batch_size": cfg.eval_batch_size, "tasks": list(LOCAL_TASKS),
            "tasks_dir": str(RunDir(cfg, create=False).stage_dir(TASKS_STAGE) / "tasks")}


def lm_eval_command(checkpoint: str | Path, tasks_dir: str | Path, tasks: tuple[str, ...] = LOCAL_TASKS,
                    batch_size: int = 8, max_length: int | None = None, limit: int | None = None,
                    device: str = "cpu", prefix_token_id: int | None = None,
                    tokenizer: str | Path | None = None) -> list[str]:
    """The ``lm_eval`` command line that evaluates an exported checkpoint on the local tasks in a
    separate process, as anyone without this kit would (``trust_remote_code`` loads the
    DeciLM code written into the checkpoint). With the stage's ``max_length`` and
    ``prefix_token_id`` (see ``evaluate_model``) it reproduces the stage's numbers. ``tokenizer``:
    a folder holding the tokenizer, when the checkpoint has none of its own."""
    args = f"pretrained={Path(checkpoint).absolute()},trust_remote_code=True"
    if tokenizer is not None:
        args += f",tokenizer={Path(tokenizer).absolute()}"
    if max_length:
        args += f",max_length={max_length}"
    if prefix_token_id is not None:
        args += f",prefix_token_id={prefix_token_id}"
    cmd = ["lm_eval", "--model", "hf", "--model_args", args, "--tasks", ",".join(tasks),
           "--include_path", str(Path(tasks_dir).absolute()), "--batch_size", str(batch_size), "--device", device]
    return cmd + (["--limit", str(limit)] if limit else [])
