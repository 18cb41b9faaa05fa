"""The whole pipeline, every notebook, headless through papermill on the `smoke` preset (the shared
``smoke_run``). Running it again reuses every stage rather than recomputing it: that rerun is
``tests/test_student.py::test_student_copies_rerun_headless_reusing_every_stage``, which reruns the same
stages through the student copies of these notebooks (a second rerun here cost the suite ~2 min)."""

from __future__ import annotations

import json

import pytest

from puzzlelib.core.rundir import STAGES

pytestmark = pytest.mark.slow


def test_smoke_pipeline_runs_every_notebook(smoke_run):
    report = smoke_run.report_dir
    for stage in STAGES:
        nb = json.loads((report / f"{stage}.ipynb").read_text())
        outputs = [o for c in nb["cells"] for o in c.get("outputs", [])]
        assert not [o for o in outputs if o.get("output_type") == "error"], stage
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{stage} shows no figure"
        assert (report / f"{stage}.html").stat().st_size > 10_000
        manifest = json.loads((smoke_run.run_dir / stage / "manifest.json").read_text())
        assert manifest["status"] == "done"
    assert (report / "summary.md").exists() and (report / "metrics.json").exists()
    assert (report / "pipeline.png").stat().st_size > 30_000  # the one-page overview figure

