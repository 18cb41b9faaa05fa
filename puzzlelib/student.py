"""Student copies of the notebooks: the same notebooks with the worked solutions taken out.

    python -m puzzlelib student [--src notebooks] [--out student]   # (re)write the copies
    python -m puzzlelib student --check                              # exit 1 if out of sync

What it does: every notebook in the kit ends with `## Exercises`: a markdown cell tagged `exercise`
(the task), then one or more cells tagged `solution` (the worked answer). A student copy is the
notebook with every `solution` cell replaced by ONE stub cell of the same type, tagged
`exercise-stub` — a comment-only code cell "# Exercise N: your code here" or a markdown cell
"*Exercise N: your answer here.*" — and every code cell's outputs and execution count cleared.
Everything else (text, code, cell ids, metadata, the `parameters` tag) is the source's cell as it
is, so a student copy still runs headless through papermill: a comment-only cell executes fine.

Reads: `<src>/*.ipynb` (cell tags in `cell.metadata.tags`, the JupyterLab/papermill place).
Writes: `<out>/<same name>.ipynb` and `<out>/README.md`; deletes `<out>/*.ipynb` whose source
notebook is gone. The output is deterministic — the same sources give the same bytes (stub ids are
derived from the solution cell's id) — which is what lets CI check that the committed copies are in
sync (`--check`, tests/test_student.py).
Leaves out: executing anything, and grading. Notebooks are checked for the exercise structure only
as far as the copy needs it (a solution must follow its exercise); tests/test_notebooks.py checks
the rest of the notebook conventions.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import re
import sys
from pathlib import Path

import nbformat

from .core.config import default_repo_root
from .core.atomic import atomic_write_text

EXERCISE_TAG = "exercise"
SOLUTION_TAG = "solution"
STUB_TAG = "exercise-stub"
README_NAME = "README.md"
_EXERCISE_NUMBER = re.compile(r"^\s*#+\s*Exercise\s+([0-9A-Za-z.]+)", re.MULTILINE)
_CELL_ID_MAX = 64  # nbformat 4.5: ids are 1-64 chars of [a-zA-Z0-9-_]


class StudentCopyError(ValueError):
    """A source notebook whose exercise/solution cells do not follow the convention."""


def tags(cell) -> list[str]:
    """The cell's tags (an empty list when it has none)."""
    return list(cell.get("metadata", {}).get("tags", []))


def _describe(i: int, cell) -> str:
    first = cell.get("source", "").strip().splitlines()
    head = (first[0][:60] + ("…" if len(first[0]) > 60 else "")) if first else "(empty)"
    cid = f" (id {cell['id']})" if cell.get("id") else ""
    return f"cell {i}{cid}, {cell.cell_type} {head!r}"


def _stub_id(solution_id: str) -> str:
    """A stable id for the stub that replaces the solution cell `solution_id`."""
    sid = f"{solution_id}-stub"
    if len(sid) <= _CELL_ID_MAX:
        return sid
    return "stub-" + hashlib.sha256(solution_id.encode()).hexdigest()[:16]


def _stub(solution, number: str):
    """The cell a student sees instead of `solution`: same type, empty of the answer."""
    if solution.cell_type == "code":
        cell = nbformat.v4.new_code_cell(f"# Exercise {number}: your code here")
    elif solution.cell_type == "markdown":
        cell = nbformat.v4.new_markdown_cell(f"*Exercise {number}: your answer here.*")
    else:
        raise StudentCopyError(f"a `{SOLUTION_TAG}` cell must be code or markdown, "
                               f"not {solution.cell_type}")
    cell.metadata = nbformat.NotebookNode({"tags": [STUB_TAG]})
    if solution.get("id"):
        cell["id"] = _stub_id(solution["id"])
    else:  # nbformat < 4.5 notebooks have no cell ids at all
        cell.pop("id", None)
    return cell


def student_copy(nb, *, name: str = "notebook"):
    """Return the student copy of `nb` (an nbformat v4 NotebookNode); `nb` is not modified.

    `name` only labels error messages. Raises StudentCopyError for a `solution` cell that does not
    directly follow its `exercise` cell (or another solution cell of the same exercise), an
    `exercise` cell with no solution after it, a cell tagged both, or a notebook with no exercise.
    A student copy is a fixed point: its stubs count as the exercise's answer cells, so
    `student_copy(student_copy(nb)) == student_copy(nb)`.
    """
    out = copy.deepcopy(nb)
    cells = []
    number = None      # the exercise the current run of solution cells belongs to
    n_exercises = 0
    prev_role = None   # "exercise" | "answer" (solution or stub) | None (any other cell)
    for i, cell in enumerate(out.cells):
        t = tags(cell)
        if EXERCISE_TAG in t and SOLUTION_TAG in t:
            raise StudentCopyError(f"{name}: {_describe(i, cell)} is tagged both "
                                   f"`{EXERCISE_TAG}` and `{SOLUTION_TAG}`; keep one")
        if prev_role == "exercise" and SOLUTION_TAG not in t and STUB_TAG not in t:
            ex = out.cells[i - 1]
            raise StudentCopyError(
                f"{name}: {_describe(i - 1, ex)} is tagged `{EXERCISE_TAG}` but the cell after it "
                f"is not tagged `{SOLUTION_TAG}` ({_describe(i, cell)}); put the worked answer "
                f"right after the exercise and tag it `{SOLUTION_TAG}`")
        if EXERCISE_TAG in t:
            n_exercises += 1
            m = _EXERCISE_NUMBER.search(cell.get("source", ""))
            number = m.group(1).rstrip(".") if m else str(n_exercises)
            prev_role = "exercise"
        elif SOLUTION_TAG in t:
            if prev_role is None:
                before = _describe(i - 1, out.cells[i - 1]) if i else "nothing (first cell)"
                raise StudentCopyError(
                    f"{name}: {_describe(i, cell)} is tagged `{SOLUTION_TAG}` but does not follow "
                    f"an `{EXERCISE_TAG}` cell or another solution of the same exercise (before "
                    f"it: {before}); move it under its exercise or tag the exercise text "
                    f"`{EXERCISE_TAG}`")
            cells.append(_stub(cell, number))
            prev_role = "answer"
            continue
        elif STUB_TAG in t:
            prev_role = "answer" if prev_role else None
        else:
            prev_role = None
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cells.append(cell)
    if prev_role == "exercise":
        raise StudentCopyError(f"{name}: {_describe(len(out.cells) - 1, out.cells[-1])} is tagged "
                               f"`{EXERCISE_TAG}` but has no `{SOLUTION_TAG}` cell after it")
    if n_exercises == 0:
        raise StudentCopyError(f"{name}: no cell is tagged `{EXERCISE_TAG}`; every notebook ends "
                               f"with `## Exercises`, each exercise a markdown cell tagged "
                               f"`{EXERCISE_TAG}` followed by its `{SOLUTION_TAG}` cell(s)")
    out.cells = cells
    return out


def count_exercises(nb) -> int:
    """How many cells of `nb` are tagged `exercise`."""
    return sum(EXERCISE_TAG in tags(c) for c in nb.cells)


def _render(nb) -> str:
    # nbformat.writes is what nbformat.write serialises with (sorted keys, indent 1); the
    # trailing newline is the one nbformat.write adds. One function for both writing and --check.
    s = nbformat.writes(nb, version=4)
    return s if s.endswith("\n") else s + "\n"


def _readme(entries: list[tuple[str, int]], src_label: str, dst_label: str) -> str:
    rows = "\n".join(f"| `{name}` | {n} |" for name, n in entries)
    return f"""# Student copies of the notebooks

**Generated — do not edit.** These files are written by `make student`
(`python -m puzzlelib student`) from `{src_label}/`; edit the source notebooks there and run
`make student` again. CI fails when the copies here are out of sync with `{src_label}/`.

Each copy is its source notebook with every worked solution taken out: a solution cell becomes an
empty stub of the same kind — a code cell `# Exercise N: your code here` or a markdown cell
*Exercise N: your answer here.* — tagged `exercise-stub`, and every output is cleared. The text, the
code and the parameters cell are unchanged, so a copy runs exactly like the original.

| notebook | exercises |
|---|---|
{rows}

## How to use them

1. Make a run first — the notebooks read the artifacts of earlier stages, and each one reuses its
   own stage when it is already fresh:
   `python -m puzzlelib run --preset smoke --run-name smoke` (minutes) or `make reproduce`.
2. Run the copies headless with the same run name; the stages are reused, so this is quick:
   `python -m puzzlelib run --preset smoke --run-name smoke --notebooks-dir {dst_label}`.
3. Open a copy in JupyterLab (`make lab`, or `.venv/bin/jupyter lab` from the repository root),
   set `run_name` and `preset` in the parameters cell to the run you made, go to `## Exercises` at
   the end and replace each stub with your answer. Relative run folders resolve against the
   repository root even though Jupyter starts the kernel in `{dst_label}/`. Work in memory or under
   a scratch folder: the stage folders in `runs/<run_name>/` belong to the pipeline.

The worked solutions are in the cells tagged `solution` of `{src_label}/`.
"""


def render_student_copies(src: str | Path = "notebooks", dst: str | Path = "student"
                          ) -> dict[str, str]:
    """File name -> text of every file `write_student_copies` would put in `dst` (README.md
    included). Raises StudentCopyError (naming the notebook and cell) before anything is written,
    and FileNotFoundError when `src` holds no notebook."""
    src = Path(src)
    paths = sorted(src.glob("*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no notebooks (*.ipynb) in {src.absolute()}; pass --src")
    files: dict[str, str] = {}
    entries = []
    for p in paths:
        nb = nbformat.read(p, as_version=4)
        files[p.name] = _render(student_copy(nb, name=str(p)))
        entries.append((p.name, count_exercises(nb)))
    # Folder names, not paths: the README must not depend on where it was generated.
    files[README_NAME] = _readme(entries, src.absolute().name, Path(dst).absolute().name)
    return files


def stale_copies(dst: str | Path, expected: dict[str, str]) -> list[Path]:
    """Notebooks in `dst` whose source notebook no longer exists."""
    return sorted(p for p in Path(dst).glob("*.ipynb") if p.name not in expected)


def write_student_copies(src: str | Path = "notebooks", dst: str | Path = "student") -> list[Path]:
    """Write the student copy of every `src/*.ipynb` and README.md into `dst` (created if needed),
    delete `dst/*.ipynb` without a source, and return the written paths (README last). Every
    notebook is converted before anything is written, so a bad notebook leaves `dst` untouched."""
    dst = Path(dst)
    files = render_student_copies(src, dst)
    dst.mkdir(parents=True, exist_ok=True)
    for p in stale_copies(dst, files):
        p.unlink()
    written = []
    for fname, text in files.items():
        target = dst / fname
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            atomic_write_text(target, text)
        written.append(target)
    return written


def out_of_sync(src: str | Path = "notebooks", dst: str | Path = "student") -> list[str]:
    """One line per file of `dst` that differs from what `write_student_copies` would write:
    missing, different, or stale. Empty when in sync."""
    dst = Path(dst)
    files = render_student_copies(src, dst)
    problems = []
    for fname, text in files.items():
        target = dst / fname
        if not target.is_file():
            problems.append(f"{target}: missing")
        elif target.read_text(encoding="utf-8") != text:
            problems.append(f"{target}: differs from its source in {Path(src) / fname}"
                            if fname != README_NAME else f"{target}: differs")
    problems += [f"{p}: stale (no {Path(src) / p.name})" for p in stale_copies(dst, files)]
    return problems


def main(argv: list[str] | None = None) -> int:
    """`python -m puzzlelib student`. Exit codes: 0 ok / in sync, 1 out of sync (--check),
    2 a source notebook breaks the exercise convention or there is none."""
    root = default_repo_root()
    ap = argparse.ArgumentParser(prog="python -m puzzlelib student",
                                 description="write student copies of the notebooks "
                                             "(solutions removed, outputs cleared)")
    ap.add_argument("--src", default=str(root / "notebooks"), help="default: <repo>/notebooks")
    ap.add_argument("--out", default=str(root / "student"), help="default: <repo>/student")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 listing the copies that are out of sync")
    args = ap.parse_args(argv)
    try:
        if args.check:
            problems = out_of_sync(args.src, args.out)
            if problems:
                print("puzzlelib: student copies out of sync — run `make student`:",
                      *(f"  {p}" for p in problems), sep="\n", file=sys.stderr)
                return 1
            print(f"puzzlelib: student copies in {args.out} are in sync with {args.src}")
            return 0
        written = write_student_copies(args.src, args.out)
    except (StudentCopyError, FileNotFoundError) as e:
        print(f"puzzlelib: error: {e}", file=sys.stderr)
        return 2
    print(f"puzzlelib: wrote {len(written) - 1} student notebook(s) + {README_NAME} to {args.out}")
    return 0
