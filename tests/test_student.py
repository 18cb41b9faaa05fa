"""Student copies (`make student`): solutions out, stubs in, outputs cleared, everything else
untouched; the committed `student/` in sync with `notebooks/`; and the copies still run headless."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from puzzlelib.student import (
    STUB_TAG,
    StudentCopyError,
    main,
    out_of_sync,
    student_copy,
    write_student_copies,
)

REPO = Path(__file__).resolve().parent.parent


def cell(kind, source, *tags, cid=None, **kw):
    c = (new_code_cell if kind == "code" else new_markdown_cell)(source, **kw)
    if tags:
        c.metadata["tags"] = list(tags)
    if cid:
        c["id"] = cid
    return c


def toy(*extra):
    """A parameters cell with an output, then two exercises: one with a code + a markdown
    solution, one with a code solution that has outputs."""
    out = new_output("stream", name="stdout", text="42\n")
    cells = [
        cell("markdown", "# 99 · Toy\n\n**What you will learn**", cid="title"),
        cell("code", 'run_name = "default"', "parameters", cid="params", execution_count=3,
             outputs=[out]),
        cell("markdown", "## Exercises", cid="exh"),
        cell("markdown", "### Exercise 1 — add\n\nAdd two numbers.", "exercise", cid="ex1"),
        cell("code", "print(1 + 1)", "solution", cid="sol1a", execution_count=4, outputs=[out]),
        cell("markdown", "Because addition.", "solution", cid="sol1b"),
        cell("markdown", "### Exercise 2 — explain\n\nWhy?", "exercise", cid="ex2"),
        cell("code", "x = 2", "solution", cid="sol2", execution_count=5, outputs=[out]),
        *extra,
    ]
    return new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3",
                                                              "display_name": "Python 3"}})


def test_solutions_become_stubs_of_the_same_type_and_outputs_are_cleared():
    nb = toy(cell("markdown", "## After", cid="after"))
    before = json.dumps(nb, sort_keys=True)
    st = student_copy(nb)
    assert json.dumps(nb, sort_keys=True) == before  # the input is not modified
    assert [c["id"] for c in st.cells] == ["title", "params", "exh", "ex1", "sol1a-stub",
                                           "sol1b-stub", "ex2", "sol2-stub", "after"]
    stubs = [c for c in st.cells if STUB_TAG in c.metadata.get("tags", [])]
    assert [(c.cell_type, c.source) for c in stubs] == [
        ("code", "# Exercise 1: your code here"),
        ("markdown", "*Exercise 1: your answer here.*"),
        ("code", "# Exercise 2: your code here")]
    assert all(c.metadata == {"tags": [STUB_TAG]} for c in stubs)
    for c in st.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, c["id"]
    params = st.cells[1]
    assert params.metadata == {"tags": ["parameters"]} and params.source == 'run_name = "default"'
    # Every non-solution cell is the source's cell except for the cleared outputs.
    for a, b in zip([c for c in nb.cells if "solution" not in c.metadata.get("tags", [])],
                    [c for c in st.cells if STUB_TAG not in c.metadata.get("tags", [])]):
        assert {k: v for k, v in a.items() if k not in ("outputs", "execution_count")} == \
               {k: v for k, v in b.items() if k not in ("outputs", "execution_count")}
    assert st.metadata == nb.metadata
    nbformat.validate(st)  # still a valid nbformat 4.5 notebook (ids well-formed)


def test_student_copy_is_deterministic_and_idempotent():
    nb = toy()
    once = student_copy(nb)
    assert nbformat.writes(once) == nbformat.writes(student_copy(toy()))
    assert nbformat.writes(student_copy(once)) == nbformat.writes(once)


def test_long_solution_ids_give_valid_stable_stub_ids():
    long_id = "a" * 64
    nb = toy()
    nb.cells[7]["id"] = long_id
    ids = [student_copy(nb).cells[7]["id"] for _ in range(2)]
    assert ids[0] == ids[1] and len(ids[0]) <= 64 and ids[0] != long_id
    nbformat.validate(student_copy(nb))


@pytest.mark.parametrize("mutate, match", [
    # a solution after an ordinary cell
    (lambda cs: cs.insert(3, cell("code", "y = 1", "solution", cid="stray")),
     r"cell 3 \(id stray\).*does not follow an `exercise` cell.*before it: cell 2 \(id exh\)"),
    # an exercise whose next cell is not its solution
    (lambda cs: cs.insert(4, cell("markdown", "hint", cid="hint")),
     r"cell 3 \(id ex1\).*'### Exercise 1 — add'.*not tagged `solution`.*id hint"),
    # the last exercise has no solution
    (lambda cs: cs.append(cell("markdown", "### Exercise 3 — more", "exercise", cid="ex3")),
     r"id ex3.*has no `solution` cell after it"),
    # both tags on one cell
    (lambda cs: cs.__setitem__(5, cell("markdown", "x", "exercise", "solution", cid="both")),
     r"id both.*tagged both"),
    # no exercises at all
    (lambda cs: cs.__delitem__(slice(2, None)), r"toy\.ipynb: no cell is tagged `exercise`"),
])
def test_bad_exercise_structure_is_refused_with_the_cell_named(mutate, match):
    nb = toy()
    mutate(nb.cells)
    with pytest.raises(StudentCopyError, match=match):
        student_copy(nb, name="toy.ipynb")


def test_write_removes_stale_copies_checks_sync_and_leaves_dst_alone_on_error(tmp_path, capsys):
    src, dst = tmp_path / "notebooks", tmp_path / "student"
    src.mkdir()
    nbformat.write(toy(), src / "a.ipynb")
    nbformat.write(toy(), src / "b.ipynb")
    written = write_student_copies(src, dst)
    assert [p.name for p in written] == ["a.ipynb", "b.ipynb", "README.md"]
    assert out_of_sync(src, dst) == []
    assert main(["--src", str(src), "--out", str(dst), "--check"]) == 0
    readme = (dst / "README.md").read_text()
    assert "do not edit" in readme and "| `a.ipynb` | 2 |" in readme

    (src / "b.ipynb").unlink()
    nb = toy()
    nb.cells[4].source = "print(2 + 2)"  # a changed solution leaves the copy unchanged ...
    nb.cells[2].source = "## Exercises (changed)"  # ... a changed text does not
    nbformat.write(nb, src / "a.ipynb")
    problems = out_of_sync(src, dst)
    assert problems == [f"{dst / 'a.ipynb'}: differs from its source in {src / 'a.ipynb'}",
                        f"{dst / 'README.md'}: differs",
                        f"{dst / 'b.ipynb'}: stale (no {src / 'b.ipynb'})"]
    assert main(["--src", str(src), "--out", str(dst), "--check"]) == 1
    assert "run `make student`" in capsys.readouterr().err
    write_student_copies(src, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["README.md", "a.ipynb"]
    assert out_of_sync(src, dst) == []

    bad = toy()
    bad.cells[3].metadata["tags"] = []  # exercise 1's solution now follows nothing
    nbformat.write(bad, src / "c.ipynb")
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    with pytest.raises(StudentCopyError, match=r"c\.ipynb: cell 4"):
        write_student_copies(src, dst)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert main(["--src", str(src), "--out", str(dst)]) == 2


def test_committed_student_copies_are_in_sync(tmp_path):
    """`make student`'s output is checked in: the copies in student/ must be what the current
    notebooks give, byte for byte."""
    fresh = write_student_copies(REPO / "notebooks", tmp_path / "student")
    committed = REPO / "student"
    assert committed.is_dir(), "no student/ folder: run `make student` and commit it"
    names = sorted(p.name for p in fresh)
    assert sorted(p.name for p in committed.iterdir() if p.is_file()) == names, \
        "student/ is out of sync with notebooks/: run `make student`"
    stale = [n for n in names if (committed / n).read_bytes() != (tmp_path / "student" / n).read_bytes()]
    assert not stale, f"student/{', student/'.join(stale)} out of sync with notebooks/: run `make student`"


@pytest.mark.slow
def test_student_copies_rerun_headless_reusing_every_stage(smoke_run, tmp_path):
    """The copies run through papermill on a copy of the shared smoke run: every stage is fresh
    there, so each notebook reuses its stage and only the cells around it run. This is also the
    suite's check that rerunning a finished pipeline reuses every stage rather than recomputing it
    (the stage functions decide, the same calls as in notebooks/), in less time than the first run."""
    from puzzlelib.core.rundir import STAGES
    from puzzlelib.runner import run_pipeline

    shutil.copytree(smoke_run.root, tmp_path / "run")
    student = write_student_copies(REPO / "notebooks", tmp_path / "student")[0].parent
    over = {"runs_root": str(tmp_path / "run" / "runs"),
            "reports_root": str(tmp_path / "run" / "student-reports")}
    t0 = time.perf_counter()
    res = run_pipeline("smoke", run_name=smoke_run.name, overrides=over, notebooks_dir=student,
                       echo=lambda *a, **k: None)
    seconds = time.perf_counter() - t0
    failed = [(s.stage, s.status, (s.error or {}).get("evalue")) for s in res.stages
              if s.status != "ok"]
    assert res.exit_code == 0 and not failed, failed
    assert [s.stage for s in res.stages] == list(STAGES)
    for stage in STAGES:
        nb = json.loads((res.report_dir / f"{stage}.ipynb").read_text())
        outputs = [o for c in nb["cells"] for o in c.get("outputs", [])]
        assert not [o for o in outputs if o.get("output_type") == "error"], stage
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{stage} shows no figure"
        stubs = [c for c in nb["cells"] if STUB_TAG in c["metadata"].get("tags", [])]
        assert stubs and not [c for c in nb["cells"] if "solution" in c["metadata"].get("tags", [])]
        manifest = json.loads((tmp_path / "run" / "runs" / smoke_run.name / stage /
                               "manifest.json").read_text())
        assert len(manifest.get("reuses", [])) == 1, f"{stage} was recomputed, not reused"
    assert seconds < smoke_run.seconds, (seconds, smoke_run.seconds)
