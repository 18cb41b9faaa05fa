"""precision.py: the ``auto`` precision (capability forced both ways, probe injected or run), the
warning for bf16 without native support, the decision kept per run, the ``threads="auto"`` rule,
and the records in the stage manifest and environment.json."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
import torch

from puzzlelib.parent import stage as parent

from puzzlelib.core import precision

from puzzlelib.profiling import stage as profiling
from puzzlelib.profiling import timing
from puzzlelib.core.config import ConfigError, RunConfig, parse_set_args
from puzzlelib.core.rundir import RunDir

FIELD = "parent_autocast_bf16"
# test_parent.py's tiny parent: a stage 00 run in a few seconds.
TINY = {"corpus_max_bytes": 200_000, "tokenizer_train_bytes": 200_000, "vocab_size": 300, "seq_len": 32,
        "parent_hidden_size": 32, "parent_num_layers": 2, "parent_num_heads": 4, "parent_num_kv_heads": 2,
        "parent_intermediate_size": 64, "parent_train_tokens": 16 * 32 * 12, "parent_batch_size": 16,
        "parent_warmup_steps": 3, "parent_eval_every": 4, "parent_eval_tokens": 2048,
        "parent_checkpoint_every": 4}


def _never(rows=None):
    raise AssertionError("the probe must not run here")


def _probe(ratio: float) -> dict:
    return {"fp32_ms": 100.0, "bf16_ms": 100.0 * ratio, "bf16_over_fp32": ratio, "repeats": 3,
            "threads": 1}


@pytest.fixture
def forced(monkeypatch):
    """forced(True/False): pretend the CPU has (or lacks) native bf16."""
    def set_(native: bool) -> None:
        monkeypatch.setenv(precision.ENV_FORCE_NATIVE, "1" if native else "0")
    return set_


# ---- capability --------------------------------------------------------------------------------
def test_capability_override_and_bad_value(forced, monkeypatch):
    forced(False)
    assert precision.bf16_native("cpu") == (False, f"{precision.ENV_FORCE_NATIVE}=0")
    forced(True)
    assert precision.bf16_native("cpu")[0] is True
    monkeypatch.setenv(precision.ENV_FORCE_NATIVE, "yes")
    with pytest.raises(ValueError, match="use 1 .* 0"):
        precision.bf16_native("cpu")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN ISA names are x86")
def test_onednn_avx2_cap_reads_as_no_native_bf16():
    """ONEDNN_MAX_CPU_ISA=AVX2 (how the benchmark emulates a laptop CPU) must read as no native
    bf16 on every x86 CPU, whatever its flags say."""
    code = "from puzzlelib.core.precision import bf16_native; print(bf16_native('cpu')[0])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"ONEDNN_MAX_CPU_ISA": "AVX2", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.stdout.strip() == "False"


# ---- the decision ------------------------------------------------------------------------------
def test_auto_without_native_bf16_is_fp32_without_a_probe(forced):
    forced(False)
    c = precision.choose("00_parent", FIELD, "auto", "cpu", _never)
    assert (c.bf16, c.native_bf16, c.probe) == (False, False, None)
    assert c.precision == "fp32" and c.reason.startswith("auto: ") and "no probe" in c.reason
    assert c.line().startswith("00_parent: training in fp32: auto:")


@pytest.mark.parametrize("ratio, bf16", [(0.5, True), (precision.BF16_MARGIN, True),
                                         (0.9, False), (2.4, False)])
def test_auto_with_native_bf16_follows_the_probe(forced, ratio, bf16):
    forced(True)
    c = precision.choose("02_bld", "bld_autocast_bf16", "auto", "cpu", _never,
                         probe_result=_probe(ratio))
    assert c.bf16 is bf16 and c.native_bf16 and c.probe["bf16_over_fp32"] == ratio
    assert f"{ratio:.2f}x" in c.reason and c.precision == ("bf16 autocast" if bf16 else "fp32")


def test_explicit_settings(forced):
    forced(True)
    assert precision.choose("05_gkd", "gkd_autocast_bf16", True, "cpu", _never).bf16 is True
    forced(False)
    off = precision.choose("05_gkd", "gkd_autocast_bf16", False, "cpu", _never)
    assert off.bf16 is False and off.reason == "gkd_autocast_bf16=false"
    with pytest.raises(ValueError, match="true, false or 'auto'"):
        precision.choose("05_gkd", "gkd_autocast_bf16", "fast", "cpu", _never)


def test_explicit_true_without_native_bf16_warns_with_the_measured_slowdown(forced):
    forced(False)
    with pytest.warns(RuntimeWarning, match=r"gkd_autocast_bf16=true .* 22\.0x .*2200 vs 100 ms"):
        c = precision.choose("05_gkd", "gkd_autocast_bf16", True, "cpu", _never,
                             probe_result=_probe(22.0))
    assert c.bf16 is True and c.probe["bf16_over_fp32"] == 22.0


def test_explicit_true_without_native_bf16_probes_one_sequence(forced):
    """The warning's own probe (no injected result) runs the stage's step on one sequence."""
    forced(False)
    rows_seen, calls = [], []

    def make_step(rows=None):
        rows_seen.append(rows)
        return lambda bf16: calls.append(bf16)

    with pytest.warns(RuntimeWarning, match="parent_autocast_bf16=true"):
        c = precision.choose("00_parent", FIELD, True, "cpu", make_step)
    assert rows_seen == [1] and sorted(calls) == [False, True] and c.probe["rows"] == 1


def test_auto_with_native_bf16_probes_a_few_sequences_of_the_stage(forced):
    forced(True)
    rows_seen = []

    def make_step(rows=None):
        rows_seen.append(rows)
        return lambda bf16: None

    c = precision.choose("00_parent", FIELD, "auto", "cpu", make_step)
    assert rows_seen == [precision.PROBE_ROWS] and c.probe["rows"] == precision.PROBE_ROWS
    assert c.probe["repeats"] >= 1 and "probe:" in c.reason


def test_probe_times_both_ways_interleaved_after_warmup():
    calls = []
    x = torch.randn(384, 384, requires_grad=True)  # ~ms per call: well above the clocks' resolution

    def step(bf16):
        calls.append(bf16)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            (x @ x).float().sum().backward()

    old = torch.get_num_threads()
    try:
        for n, clock in ((1, "cpu"), (2, "wall")):  # one thread: CPU time, immune to others' load
            torch.set_num_threads(n)
            calls.clear()
            p = precision.probe(step, "cpu", warmup=1, repeats=4, budget_s=60)
            assert calls == [False, True] + [False, True, True, False] * 2
            assert p["repeats"] == 4 and p["fp32_ms"] > 0 and p["bf16_ms"] > 0
            assert p["bf16_over_fp32"] == pytest.approx(p["bf16_ms"] / p["fp32_ms"], rel=0.02)
            assert (p["threads"], p["clock"]) == (n, clock)
    finally:
        torch.set_num_threads(old)


def test_probe_stops_at_its_budget():
    calls = []
    p = precision.probe(lambda bf16: calls.append(bf16), "cpu", warmup=0, repeats=50, budget_s=0)
    assert p["repeats"] == 1 and len(calls) == 2


# ---- kept per run ------------------------------------------------------------------------------
def _cfg(tmp_path, **kw):
    return RunConfig.from_preset("smoke", {"runs_root": str(tmp_path / "runs"), **kw}, run_name="p")


def test_decide_is_stable_per_run_and_recorded(tmp_path, forced):
    forced(True)
    cfg = _cfg(tmp_path, parent_autocast_bf16="auto")
    rd = RunDir(cfg)
    first = precision.decide(rd, "00_parent", FIELD, "auto", "cpu", _never, probe_result=_probe(0.5))
    assert first.bf16 and not first.reused
    # A second decision for the same stage key, device and capability reuses the first, even when
    # a new probe would say otherwise (a resume must train in the same precision).
    again = precision.decide(RunDir(cfg), "00_parent", FIELD, "auto", "cpu", _never,
                             probe_result=_probe(2.0))
    assert again.bf16 and again.reused and again.probe == first.probe
    env = json.loads((rd.root / "environment.json").read_text())
    assert env["precision"]["00_parent"]["bf16"] is True
    assert env["precision"]["00_parent"]["precision"] == "bf16 autocast"
    # A new process opening the run rewrites environment.json and keeps the record.
    RunDir(cfg)
    env = json.loads((rd.root / "environment.json").read_text())
    assert env["precision"]["00_parent"]["probe"]["bf16_over_fp32"] == 0.5
    assert env["threads"] == {**env["threads"], "setting": 1, "count": 1, "rule": "set explicitly"}
    # Another key for the stage (a field of it changed): decided afresh.
    other = precision.decide(RunDir(cfg.replace(parent_lr=2e-3)), "00_parent", FIELD, "auto", "cpu",
                             _never, probe_result=_probe(2.0))
    assert not other.bf16 and not other.reused
    # Another capability (e.g. the run moved to a CPU without native bf16): decided afresh.
    forced(False)
    moved = precision.decide(rd, "00_parent", FIELD, "auto", "cpu", _never)
    # The record says how the capability was found, not merely that it was passed along.
    assert not moved.bf16 and moved.capability == f"{precision.ENV_FORCE_NATIVE}=0"
    assert moved.reason.startswith(f"auto: {precision.ENV_FORCE_NATIVE}=0")
    assert "00_parent: training in fp32" in precision.summary_line(rd.root, "00_parent")
    assert "no precision decision" in precision.summary_line(rd.root, "05_gkd")


def test_parent_stage_records_precision_and_stays_fresh(tmp_path, forced):
    """The stage's manifest and environment.json carry the choice; a rerun under another
    capability reuses the finished stage (the hash holds 'auto', not the outcome)."""
    forced(False)
    cfg = _cfg(tmp_path, **TINY, parent_autocast_bf16="auto", threads="auto")
    res = parent.run(cfg)
    rd = RunDir(cfg)
    m = rd.manifest("00_parent")
    assert m["metrics"]["precision"]["bf16"] is False and m["metrics"]["precision"]["setting"] == "auto"
    assert m["config"]["parent_autocast_bf16"] == "auto"
    assert m["environment"]["precision"]["00_parent"]["bf16"] is False
    assert m["environment"]["threads"]["count"] == precision.auto_threads()
    assert res.metrics["torch_threads"] == precision.auto_threads()
    env = json.loads((rd.root / "environment.json").read_text())
    assert env["precision"]["00_parent"]["reason"].startswith("auto:")
    forced(True)
    assert parent.run(cfg).reused


def test_parent_stage_with_a_probe_trains_in_its_choice(tmp_path, forced, monkeypatch):
    """Capability forced on: the real probe runs on the tiny parent, and the training uses its
    decision (bf16 forced by an injected fast probe shows in the loss: not bit-equal to fp32)."""
    forced(True)
    real = precision.choose

    def fast_bf16(*a, **k):
        return real(*a, **{**k, "probe_result": _probe(0.5)})

    monkeypatch.setattr(precision, "choose", fast_bf16)
    bf = parent.run(_cfg(tmp_path / "a", **TINY, parent_autocast_bf16="auto"))
    fp = parent.run(_cfg(tmp_path / "b", **TINY, parent_autocast_bf16=False))
    mb = RunDir(_cfg(tmp_path / "a", **TINY, parent_autocast_bf16="auto")).manifest("00_parent")
    assert mb["metrics"]["precision"]["bf16"] is True
    assert bf.history["train_loss"] != fp.history["train_loss"]
    # The same run with the same capability rerun with force: the recorded decision, same numbers.
    monkeypatch.setattr(precision, "choose", real)
    again = parent.run(_cfg(tmp_path / "a", **TINY, parent_autocast_bf16="auto", force=True))
    assert again.history["train_loss"] == bf.history["train_loss"]


# ---- threads -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cores, n", [(1, 1), (2, 1), (3, 1), (4, 2), (8, 4), (16, 8), (64, 8)])
def test_auto_threads_rule(cores, n):
    assert precision.auto_threads(cores) == n
    assert precision.resolve_threads("auto", cores) == n


def test_threads_settings():
    assert precision.resolve_threads(0) == 0 and precision.resolve_threads(3) == 3
    for bad in (-1, True, "4", 2.0):
        with pytest.raises(ValueError, match="threads must be 'auto', 0"):
            precision.resolve_threads(bad)
    old = torch.get_num_threads()
    try:
        assert precision.apply_threads("auto", cores=4) == 2 == torch.get_num_threads()
        assert precision.apply_threads(0) == 2  # 0 leaves the current count alone
        assert precision.apply_threads(1) == 1
    finally:
        torch.set_num_threads(old)
    assert precision.physical_cores() >= 1


def test_stage01_cpu_clock_keeps_one_thread_under_auto(tmp_path):
    assert profiling.stage_threads(_cfg(tmp_path, threads="auto", profile_clock="cpu")) == 1
    wall = _cfg(tmp_path, threads="auto", profile_clock="wall")
    assert profiling.stage_threads(wall) == precision.auto_threads()
    with pytest.raises(timing.ProfilingError, match="threads=1 \\(or 0 or auto\\)"):
        profiling.stage_threads(_cfg(tmp_path, threads=2, profile_clock="cpu"))


# ---- the config fields -------------------------------------------------------------------------
def test_config_fields_take_auto():
    d = RunConfig.from_preset("default")
    assert (d.threads, d.parent_autocast_bf16, d.bld_autocast_bf16, d.gkd_autocast_bf16) == ("auto",) * 4
    assert parse_set_args(["threads=AUTO", "bld_autocast_bf16=auto", "gkd_autocast_bf16=off",
                           "threads=2"]) == {"threads": 2, "bld_autocast_bf16": "auto",
                                             "gkd_autocast_bf16": False}
    assert RunConfig.from_preset("smoke", {"threads": "Auto"}).threads == "auto"
    for bad, msg in (({"threads": "many"}, "threads expects an integer or 'auto'"),
                     ({"threads": -2}, "threads must be 'auto', 0"),
                     ({"parent_autocast_bf16": "yes"}, "expects true/false or 'auto'"),
                     ({"gkd_autocast_bf16": 1}, "expects true/false or 'auto'")):
        with pytest.raises(ConfigError, match=msg):
            RunConfig.from_preset("smoke", bad)
    with pytest.raises(ConfigError, match="expects true/false or auto"):
        parse_set_args(["parent_autocast_bf16=maybe"])
    # The hash holds the setting: "auto" and an explicit value are different configs.
    assert d.hash("00_parent") != d.replace(parent_autocast_bf16=True).hash("00_parent")
