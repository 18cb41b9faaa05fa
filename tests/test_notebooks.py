"""The notebooks follow the kit's conventions (no execution, seconds): committed without outputs, a
`parameters` cell, a title with "What you will learn" / "What this produces", prose before every
code cell, a `## Summary`, and, last, `## Exercises` with 2-4 tagged exercises, each followed by its
solution cell(s)."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from puzzlelib.core.rundir import NOTEBOOKS
from puzzlelib.student import EXERCISE_TAG, SOLUTION_TAG, tags

REPO = Path(__file__).resolve().parent.parent
PATHS = sorted((REPO / "notebooks").glob("*.ipynb"))


def _heading(c, level: int) -> str | None:
    """The cell's first line if it is a markdown heading of exactly `level`, else None."""
    if c.cell_type != "markdown":
        return None
    first = c.source.lstrip().split("\n", 1)[0]
    return first if re.match(rf"#{{{level}}}\s", first) else None


@pytest.fixture(params=PATHS, ids=[p.stem for p in PATHS])
def notebook(request):
    """(file name, the notebook as nbformat v4)."""
    return request.param.name, nbformat.read(request.param, as_version=4)


def test_every_stage_has_its_notebook():
    assert sorted(Path(p).name for p in NOTEBOOKS.values()) == [p.name for p in PATHS]


def test_committed_without_outputs(notebook):
    name, nb = notebook
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{name}: cells {dirty} have outputs; clear them before committing"


def test_valid_and_has_a_parameters_cell(notebook):
    name, nb = notebook
    nbformat.validate(nb)
    params = [i for i, c in enumerate(nb.cells) if "parameters" in tags(c)]
    assert len(params) == 1, f"{name}: expected one cell tagged `parameters`, found {params}"
    src = nb.cells[params[0]].source
    for name in ("run_name", "preset", "overrides"):
        assert re.search(rf"^{name}\s*=", src, re.MULTILINE), \
            f"{name}: parameters cell lacks {name}"


def test_title_says_what_you_will_learn_and_what_it_produces(notebook):
    name, nb = notebook
    first = nb.cells[0]
    assert _heading(first, 1), f"{name}: the first cell must be markdown with an H1 title"
    assert "What you will learn" in first.source, f"{name}: no 'What you will learn' in cell 0"
    assert "What this produces" in first.source, f"{name}: no 'What this produces' in cell 0"
    assert not [i for i, c in enumerate(nb.cells[1:], 1) if _heading(c, 1)], \
        f"{name}: only the first cell has an H1 title"


def test_every_code_cell_follows_prose(notebook):
    """Each code cell is introduced by a markdown cell — except a solution's later cells, which
    follow the exercise's first solution cell."""
    name, nb = notebook
    bare = [i for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and (i == 0 or nb.cells[i - 1].cell_type != "markdown")
            and not (SOLUTION_TAG in tags(c) and SOLUTION_TAG in tags(nb.cells[i - 1]))]
    assert not bare, f"{name}: code cells {bare} have no markdown cell right before them"


def test_summary_then_exercises_at_the_end(notebook):
    name, nb = notebook
    h2 = [(i, _heading(c, 2)) for i, c in enumerate(nb.cells) if _heading(c, 2)]
    names = [h.strip("# ").strip() for _, h in h2]
    assert "Summary" in names, f"{name}: no `## Summary` section"
    assert names[-1] == "Exercises", f"{name}: the last section must be `## Exercises`, " \
                                     f"found {names[-1]!r}"
    assert names.index("Summary") < len(names) - 1, \
        f"{name}: `## Summary` should come before `## Exercises`; sections: {names}"
    start = h2[-1][0]
    roles = [c for c in nb.cells[:start] if {EXERCISE_TAG, SOLUTION_TAG} & set(tags(c))]
    assert not roles, f"{name}: exercise/solution cells before `## Exercises`"


def test_exercises_are_tagged_numbered_and_each_has_a_solution(notebook):
    name, nb = notebook
    ex = [i for i, c in enumerate(nb.cells) if EXERCISE_TAG in tags(c)]
    assert 2 <= len(ex) <= 4, f"{name}: {len(ex)} cells tagged `exercise`; expected 2-4"
    for n, i in enumerate(ex, 1):
        c = nb.cells[i]
        assert c.cell_type == "markdown", f"{name}: exercise cell {i} must be markdown"
        assert re.match(rf"###\s+Exercise {n}\b", c.source.lstrip()), \
            f"{name}: cell {i} should start with '### Exercise {n} — <title>'"
        assert i + 1 < len(nb.cells) and SOLUTION_TAG in tags(nb.cells[i + 1]), \
            f"{name}: exercise {n} (cell {i}) is not followed by a cell tagged `solution`"
    # Every solution cell belongs to the exercise just above it (student.py relies on this).
    for i, c in enumerate(nb.cells):
        if SOLUTION_TAG in tags(c):
            assert {EXERCISE_TAG, SOLUTION_TAG} & set(tags(nb.cells[i - 1])), \
                f"{name}: solution cell {i} does not follow its exercise"
