"""The one-page pipeline figure: facts come from the manifests, nothing is invented."""

from __future__ import annotations

import json

import pytest

from puzzlelib.overview import chosen_child, headline, stage_facts, write_pipeline_figure
from puzzlelib.core.rundir import STAGES


def _manifest(d, stage, status="done", seconds=12.0, **metrics):
    (d / stage).mkdir(parents=True, exist_ok=True)
    (d / stage / "manifest.json").write_text(json.dumps(
        {"stage": stage, "status": status, "seconds": seconds, "metrics": metrics}))


@pytest.fixture
def fake_run(tmp_path):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")  # every run folder holds one; `figure` checks for it
    _manifest(run, "00_parent", params=6_820_096, train_tokens=2_002_944, heldout_loss=4.0737)
    _manifest(run, "01_profiling", n_children=12, prefill_median_rel_err=0.0218, clock="cpu",
              device="cpu")
    _manifest(run, "02_bld", status="running")
    _manifest(run, "04_search", layers=8, options=112, predicted_speedup=2.0005, batch=8,
              solver="gurobi 13.0.3")
    (run / "04_search" / "solution.json").write_text(json.dumps({
        "parent": [["attn:kv4", "ffn:1.00"]] * 2,
        "solutions": [{"choices": [["attn:kv2", "ffn:0.50"], ["attn:noop", "ffn:linear"]]}]}))
    _manifest(run, "06_evaluation", measured_speedup=2.1574, predicted_speedup=2.0005,
              retention=1.00613, model="puzzle-1")
    return run


def test_facts_are_the_recorded_numbers_and_unfinished_stages_show_none(fake_run):
    facts = {f.stage: f for f in stage_facts(fake_run)}
    assert [f for f in facts] == list(STAGES)
    assert facts["00_parent"].lines == ["6.8 M params", "2.0 M train tokens", "held-out 4.07 nats/tok"]
    assert "additivity err 2.2 %" in facts["01_profiling"].lines
    # A running stage and a stage that never started carry no numbers at all.
    assert facts["02_bld"].status == "running" and facts["02_bld"].lines == []
    assert facts["03_scoring"].status == "missing" and facts["03_scoring"].lines == []
    assert facts["04_search"].lines[:3] == ["8 layers, 112 options", "predicted 2.00x", "best at batch 8"]
    assert facts["06_evaluation"].lines == ["measured 2.16x", "retained 100.6 %", "child: puzzle-1"]
    assert facts["06_evaluation"].seconds == 12.0


def test_child_and_headline_read_from_search_and_evaluation(fake_run, tmp_path):
    parent, child = chosen_child(fake_run)
    assert parent == [["attn:kv4", "ffn:1.00"]] * 2
    assert child[1] == ["attn:noop", "ffn:linear"]
    assert headline(fake_run) == {"speedup": 2.1574, "retention": 1.00613, "predicted": 2.0005}
    assert chosen_child(tmp_path) is None and headline(tmp_path) is None


def test_figure_is_written_as_a_png(fake_run, tmp_path):
    out = write_pipeline_figure(fake_run, tmp_path / "out" / "pipeline.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 30_000
    assert not list(out.parent.glob("*.tmp.png"))  # written atomically


def test_missing_run_directory_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the pipeline first"):
        stage_facts(tmp_path / "nope")


@pytest.mark.slow
def test_figure_of_a_real_smoke_run(smoke_run, tmp_path):
    facts = stage_facts(smoke_run.run_dir)
    assert all(f.status == "done" and f.lines and f.seconds for f in facts)
    parent, child = chosen_child(smoke_run.run_dir)
    assert len(parent) == len(child) == 4  # the smoke parent has 4 layers
    assert write_pipeline_figure(smoke_run.run_dir, tmp_path / "p.png").stat().st_size > 30_000


def test_figure_command(fake_run, tmp_path, capsys):
    from puzzlelib.runner import main

    out = tmp_path / "fig.png"
    assert main(["figure", "--run-name", "r", "--runs-root", str(fake_run.parent), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and "wrote" in capsys.readouterr().out
    assert main(["figure", "--run-name", "missing", "--runs-root", str(fake_run.parent)]) == 2
    assert "run the pipeline first" in capsys.readouterr().err
