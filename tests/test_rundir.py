"""Run directory: manifests, freshness, require() refusals, cross-process locks, atomic writes."""

import json
import subprocess
import sys
import textwrap
import time

import pytest

from puzzlelib.core.config import RunConfig
from puzzlelib.core.rundir import NOTEBOOKS, STAGES, UPSTREAM, RunDir, StageLocked, StageNotReady
from puzzlelib.core.atomic import (
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)


@pytest.fixture
def cfg(tmp_path):
    return RunConfig.from_preset("smoke", {"runs_root": str(tmp_path / "runs")})


def build(rd, stage, payload=b"weights"):
    with rd.stage(stage) as st:
        atomic_write_bytes(st.path("model.bin"), payload)
        st.metrics["loss"] = 1.5
    return rd.manifest(stage)


def test_constants_are_consistent():
    assert list(UPSTREAM) == STAGES == [p.split("/")[1][:-6] for p in NOTEBOOKS.values()]
    for s, ups in UPSTREAM.items():
        assert all(STAGES.index(u) < STAGES.index(s) for u in ups)


def test_open_writes_config_and_environment(cfg):
    rd = RunDir(cfg)
    assert RunConfig.load(rd.root / "config.json") == cfg
    env = json.loads((rd.root / "environment.json").read_text())
    assert env["python"] and env["packages"]["torch"] and env["cpu_count"]
    assert "deterministic" in env["determinism"] and env["device"] == "cpu"
    assert "git_commit" in env


def test_manifest_lifecycle(cfg):
    rd = RunDir(cfg)
    assert rd.state("00_parent") == ("missing", "")
    assert rd.should_run("00_parent")
    m = build(rd, "00_parent")
    assert m["status"] == "done" and m["key"] == rd.config_key("00_parent")
    assert m["config_hash"] == cfg.hash("00_parent") and m["upstream"] == {}
    assert m["metrics"] == {"loss": 1.5} and m["seconds"] >= 0 and m["started"] <= m["finished"]
    [art] = m["artifacts"]
    assert art["path"] == "model.bin" and art["bytes"] == 7 and len(art["sha256"]) == 64
    assert rd.is_fresh("00_parent") and not rd.should_run("00_parent")
    assert rd.note_reused("00_parent")["build_id"] == m["build_id"]
    assert rd.should_run("00_parent", force=True)
    assert RunDir(cfg.replace(force=True)).should_run("00_parent")
    assert rd.require("00_parent")["build_id"] == m["build_id"]
    m2 = build(rd, "02_bld")
    assert m2["upstream"]["00_parent"]["build_id"] == m["build_id"]


def test_require_missing_names_the_notebook_and_command(cfg):
    rd = RunDir(cfg)
    with pytest.raises(StageNotReady) as e:
        rd.require("02_bld")
    msg = str(e.value)
    assert "Stage 02_bld has not finished for run 'smoke' (status: missing)" in msg
    assert "notebooks/02_bld.ipynb" in msg and "--preset smoke --stages 02" in msg


def test_failed_stage_is_recorded_and_reraised(cfg):
    rd = RunDir(cfg)
    with pytest.raises(RuntimeError, match="boom"):
        with rd.stage("00_parent") as st:
            st.path("half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    m = rd.manifest("00_parent")
    assert m["status"] == "failed" and m["error"]["type"] == "RuntimeError"
    with pytest.raises(StageNotReady, match=r"status: failed: RuntimeError: boom"):
        rd.require("00_parent")


def test_unserialisable_metrics_fail_the_stage(cfg):
    rd = RunDir(cfg)
    with pytest.raises(TypeError, match="not JSON serializable"):
        with rd.stage("00_parent") as st:
            st.metrics["model"] = object()
    m = rd.manifest("00_parent")
    assert m["status"] == "failed" and "unserializable" in m["metrics"]


def test_stage_refuses_when_upstream_not_ready(cfg):
    rd = RunDir(cfg)
    with pytest.raises(StageNotReady, match="Stage 00_parent has not finished"):
        with rd.stage("02_bld"):
            pytest.fail("must not start")
    assert rd.manifest("02_bld") is None  # nothing written


def test_stale_when_a_config_field_changes(cfg):
    build(RunDir(cfg), "00_parent")
    build(RunDir(cfg), "02_bld")
    assert RunDir(cfg.replace(threads=1, force=True)).is_fresh("02_bld")  # run fields: no effect
    rd = RunDir(cfg.replace(parent_lr=0.01))
    with pytest.raises(StageNotReady) as e:
        rd.require("00_parent")
    assert "status: stale: config field parent_lr changed (0.003 -> 0.01)" in str(e.value)
    # downstream of the changed stage is stale too, and names the same field
    state, reason = rd.state("02_bld")
    assert state == "stale" and "parent_lr changed" in reason
    assert RunDir(cfg).is_fresh("02_bld")  # back to the old config: fresh again


def test_stale_when_upstream_is_rebuilt(cfg):
    rd = RunDir(cfg)
    build(rd, "00_parent")
    build(rd, "02_bld")
    build(rd, "00_parent", b"other weights")  # e.g. --force
    assert rd.is_fresh("00_parent")
    with pytest.raises(StageNotReady, match="upstream 00_parent was rebuilt"):
        rd.require("02_bld")


def test_running_then_interrupted(cfg):
    rd = RunDir(cfg)
    with rd.stage("00_parent"):
        with pytest.raises(StageNotReady, match=r"status: running: started .* by pid"):
            rd.require("00_parent")
    m = rd.manifest("00_parent")
    m["status"] = "running"  # what a kill -9 leaves behind
    atomic_write_json(rd.stage_dir("00_parent") / "manifest.json", m)
    with pytest.raises(StageNotReady, match="status: interrupted"):
        rd.require("00_parent")


def test_truncated_or_deleted_artifact_is_refused(cfg):
    rd = RunDir(cfg)
    build(rd, "00_parent")
    path = rd.stage_dir("00_parent") / "model.bin"
    path.write_bytes(b"wei")
    with pytest.raises(StageNotReady, match="has 3 bytes, expected 7"):
        rd.require("00_parent")
    path.unlink()
    with pytest.raises(StageNotReady, match="model.bin is missing"):
        rd.require("00_parent")


def test_same_size_corruption_is_not_fresh_even_with_its_mtime_put_back(cfg):
    import os

    rd = RunDir(cfg)
    build(rd, "00_parent")
    assert rd.verify("00_parent") == [] and rd.is_fresh("00_parent")  # hashed and cached here
    path = rd.stage_dir("00_parent") / "model.bin"
    before = path.stat()
    path.write_bytes(b"WEIGHTS")  # same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # what `touch -r` does
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    state, reason = rd.state("00_parent")
    assert state == "broken" and str(path) in reason and "sha256 differs" in reason
    assert "sha256 differs" in rd.verify("00_parent")[0]
    with pytest.raises(StageNotReady, match=r"model.bin changed after stage 00_parent.*--stages 00"):
        rd.require("00_parent")


def test_rerunning_a_stage_drops_only_its_damaged_artifacts(cfg, capsys):
    rd = RunDir(cfg)
    with rd.stage("00_parent") as st:
        atomic_write_bytes(st.path("a.bin"), b"aaaa")
        atomic_write_bytes(st.path("b.bin"), b"bbbb")
    rd.stage_dir("00_parent").joinpath("a.bin").write_bytes(b"AAAA")
    seen = {}
    with rd.stage("00_parent") as st:  # a resuming stage sees only the intact file
        seen = {p.name for p in st.dir.glob("*.bin")}
        atomic_write_bytes(st.path("a.bin"), b"aaaa")
    assert seen == {"b.bin"} and rd.is_fresh("00_parent")
    assert "removed 1 damaged artifact(s) so that they are rebuilt: a.bin" in capsys.readouterr().out


def test_artifact_list_skips_temp_files(cfg):
    rd = RunDir(cfg)
    with rd.stage("00_parent") as st:
        st.path("sub").mkdir()
        st.path("sub", "a.txt").write_text("a")
        st.path(".model.bin.tmp-1-abc").write_text("leftover")
    assert [a["path"] for a in rd.manifest("00_parent")["artifacts"]] == ["sub/a.txt"]


def test_existing_and_describe(cfg, tmp_path):
    build(RunDir(cfg), "00_parent")
    rd = RunDir.existing("smoke", tmp_path / "runs")
    assert rd.cfg.seq_len == 64
    states = dict((s, st) for s, st, _ in rd.describe())
    assert states["00_parent"] == "fresh" and states["02_bld"] == "missing"
    with pytest.raises(FileNotFoundError, match=r"no run named 'nope'.*runs there: smoke"):
        RunDir.existing("nope", tmp_path / "runs")


def test_second_process_is_refused_the_lock(cfg, tmp_path):
    locked, release = tmp_path / "locked", tmp_path / "release"
    child = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from puzzlelib.core.config import RunConfig
        from puzzlelib.core.rundir import RunDir
        cfg = RunConfig.from_preset("smoke", {{"runs_root": {str(cfg.runs_root)!r}}})
        with RunDir(cfg, create=False).stage("00_parent") as st:
            st.path("w.bin").write_bytes(b"1")
            Path({str(locked)!r}).write_text("x")
            deadline = time.time() + 60
            while not Path({str(release)!r}).exists() and time.time() < deadline:
                time.sleep(0.05)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child])
    try:
        deadline = time.time() + 60
        while not locked.exists():
            assert proc.poll() is None, "child died"
            assert time.time() < deadline, "child never took the lock"
            time.sleep(0.05)
        rd = RunDir(cfg)
        with pytest.raises(StageLocked, match=r"another process is running stage 00_parent of "
                                              r"run 'smoke' \(lock file .*00_parent.lock\)"):
            with rd.stage("00_parent"):
                pytest.fail("must not start")
        with pytest.raises(StageNotReady, match="status: running"):
            rd.require("00_parent")
    finally:
        release.write_text("go")
        assert proc.wait(timeout=60) == 0
    assert rd.is_fresh("00_parent")


# ---- atomic helpers -----------------------------------------------------------------------------
def test_atomic_writes(tmp_path):
    atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "t.txt", "héllo")
    atomic_write_json(tmp_path / "j.json", {"p": tmp_path, "s": {2, 1}})
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "j.json").read_text()) == {"p": str(tmp_path), "s": [1, 2]}


def test_interrupted_atomic_write_leaves_nothing(tmp_path):
    target = tmp_path / "model.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of the")
            raise KeyboardInterrupt  # e.g. Ctrl-C mid-write
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(TypeError, match="not JSON serializable"):
        atomic_write_json(target, {"x": object()})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new but broken")
            raise RuntimeError
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_atomic_dir(tmp_path):
    out = tmp_path / "block"
    with atomic_dir(out) as d:
        (d / "w.bin").write_bytes(b"1")
        assert not out.exists()  # invisible until complete
    assert (out / "w.bin").read_bytes() == b"1"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as d:
            (d / "w.bin").write_bytes(b"2 partial")
            raise RuntimeError
    assert (out / "w.bin").read_bytes() == b"1"
    assert [p.name for p in tmp_path.iterdir()] == ["block"]
    with atomic_dir(out) as d:  # replacing an existing directory
        (d / "v.bin").write_bytes(b"3")
    assert [p.name for p in out.iterdir()] == ["v.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["block"]
