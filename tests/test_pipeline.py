"""The whole pipeline, every notebook, headless through papermill on the `smoke` preset — then
again, to check that every stage is reused rather than recomputed."""

from __future__ import annotations

import json
import time

import pytest

from puzzlelib.core.rundir import STAGES

pytestmark = pytest.mark.slow


def test_smoke_pipeline_runs_every_notebook_and_reuses_on_rerun(smoke_run, tmp_path):
    import shutil

    from puzzlelib.runner import run_pipeline

    # A copy of the shared run: the rerun below writes "reuses" into its manifests.
    shutil.copytree(smoke_run.root, tmp_path, dirs_exist_ok=True)
    over = {"runs_root": str(tmp_path / "runs"), "reports_root": str(tmp_path / "reports")}
    first = smoke_run.seconds
    report = tmp_path / "reports" / "smoke"
    for stage in STAGES:
        nb = json.loads((report / f"{stage}.ipynb").read_text())
        outputs = [o for c in nb["cells"] for o in c.get("outputs", [])]
        assert not [o for o in outputs if o.get("output_type") == "error"], stage
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{stage} shows no figure"
        assert (report / f"{stage}.html").stat().st_size > 10_000
        manifest = json.loads((tmp_path / "runs" / "smoke" / stage / "manifest.json").read_text())
        assert manifest["status"] == "done"
    assert (report / "summary.md").exists() and (report / "metrics.json").exists()
    assert (report / "pipeline.png").stat().st_size > 30_000  # the one-page overview figure

    t0 = time.perf_counter()
    again = run_pipeline("smoke", run_name="smoke", overrides=over, echo=lambda *a, **k: None)
    second = time.perf_counter() - t0
    assert again.exit_code == 0
    for stage in STAGES:
        manifest = json.loads((tmp_path / "runs" / "smoke" / stage / "manifest.json").read_text())
        assert len(manifest.get("reuses", [])) == 1, stage   # the manifest says it was reused
    assert second < first
