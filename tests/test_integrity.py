"""Artifacts on disk are checked, not trusted (issue 17, A1/A2), and sizes that cannot fit this
machine are refused up front (A5).

* A block of a real stage-02 library changed in place (same size, mtime put back as `touch -r`
  does) makes `status` say 02_bld is broken, naming the file; stage 03's read refuses it naming
  the file and the command; the advised `--stages 02` retrains that one block, bit for bit.
* Cost tables: a `nan` or `-0.9` cell is refused naming the line, the block and the column, in
  the stage's own table and in an imported one; an imported table changed after its run's stage
  01 wrote it is refused.
* Memory: vocab_size=1e9 (and a too-wide, too-deep or too-long model) is refused by validation,
  naming the field and the largest value that fits; through the CLI it exits 2 before anything
  is written.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from puzzlelib.bld import stage as bld

from puzzlelib.core import limits
from puzzlelib.profiling import stage as P
from puzzlelib.profiling import benches
from puzzlelib.profiling import costs
from puzzlelib.profiling import timing
from puzzlelib.core.config import ConfigError, RunConfig
from puzzlelib.bld.library import Library, load_blocks
from puzzlelib.core.rundir import RunDir, StageNotReady, file_sha256
from puzzlelib.core.atomic import atomic_write_json
from puzzlelib.runner import UsageError, _check_upstream
from puzzlelib.runner import main as cli_main
from test_bld import assert_same_library, library_state, make_config, make_parent_stage

REPO = Path(__file__).resolve().parent.parent


def tamper_same_size(path: Path, change) -> None:
    """Rewrite ``path`` with ``change(bytes) -> bytes`` (same length) and put its mtime back."""
    before = path.stat()
    data = path.read_bytes()
    new = change(data)
    assert len(new) == len(data) and new != data
    path.write_bytes(new)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # `touch -r`
    assert path.stat().st_mtime_ns == before.st_mtime_ns


def swap_a_shape(data: bytes) -> bytes:
    """Swap the two dims of a non-square tensor in a safetensors header: same size, same bytes
    of data, a tensor of another shape (what made stage 03 fail with a raw RuntimeError)."""
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].decode()
    for m in re.finditer(r'"shape":\[(\d+),(\d+)\]', header):
        a, b = m.groups()
        if a != b and len(a) == len(b):
            header = header[:m.start()] + f'"shape":[{b},{a}]' + header[m.end():]
            return data[:8] + header.encode() + data[8 + n:]
    raise AssertionError("no non-square tensor with equal-width dims in the header")


# ------------------------------------------------------------------------------- the library

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A finished tiny 00_parent + 02_bld (real BLD, 20 blocks in a few seconds)."""
    cfg = make_config(tmp_path_factory.mktemp("integrity"))
    make_parent_stage(cfg)
    res = bld.run(cfg, progress=False)
    return cfg, res, library_state(res.library_dir)


def test_same_size_block_damage_is_caught_named_and_repaired_by_the_advised_command(built, capsys):
    cfg, res, reference = built
    rd = RunDir(cfg, create=False)
    lib = Library.open(res.library_dir)
    layer, name = next((i, n) for i, n in lib.jobs() if n == "attn:kv1")
    path = res.library_dir / "blocks" / f"L{layer:02d}" / lib.record(layer, name)["file"]
    assert rd.is_fresh("02_bld")  # every file hashed (and cached) in this process
    tamper_same_size(path, swap_a_shape)
    bad_sha = file_sha256(path)

    # status: 02_bld (and what reads it) is not fresh, and the file is named
    state, reason = rd.state("02_bld")
    assert state == "broken" and str(path) in reason and "sha256 differs" in reason
    assert cli_main(["status", "--run-name", cfg.run_name, "--runs-root", cfg.runs_root]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("02_bld"))
    assert "broken" in line and path.name in line

    # stage 03 reads 02_bld through bld.load: refused, naming the file and the command
    with pytest.raises(StageNotReady) as e:
        bld.load(cfg)
    assert str(path) in str(e.value) and "--stages 02" in str(e.value)
    # the runner, asked for --stages 03 alone, says to include 02
    with pytest.raises(UsageError, match=r"--stages 02,03"):
        _check_upstream(cfg, REPO, ["03_scoring"])
    # the library itself refuses the block too (a reader outside any run directory)
    assert (layer, name) in lib.missing()

    # the advised command: stage 02 again retrains that block only, to the same bytes
    again = bld.run(cfg, progress=False)
    out = capsys.readouterr().out
    assert not again.reused and "removed 1 damaged artifact(s)" in out and path.name in out
    assert again.timing["jobs_run"] == 1
    assert rd.is_fresh("02_bld") and file_sha256(path) != bad_sha
    # the same tensors and numbers as before the damage (the file's bytes may differ: safetensors
    # writes its metadata map in a per-process order)
    assert_same_library(library_state(again.library_dir), reference)
    blocks = load_blocks(again.library_dir, layers=[layer], variants=[name])
    assert set(blocks) == {(layer, name)}


def test_a_damaged_block_record_or_index_is_rebuilt_too(built, capsys):
    cfg, res, reference = built
    rd = RunDir(cfg, create=False)
    record = res.library_dir / "blocks" / "L01" / "ffn-0.50.json"
    tamper_same_size(record, lambda b: b.replace(b'"final_nmse": 0.', b'"final_nmse": 1.', 1))
    assert rd.state("02_bld")[0] == "broken"
    again = bld.run(cfg, progress=False)
    assert again.timing["jobs_run"] == 1 and rd.is_fresh("02_bld")
    index = res.library_dir / "index.json"
    tamper_same_size(index, lambda b: b" " + b[1:])  # no longer JSON
    again = bld.run(cfg, progress=False)
    out = capsys.readouterr().out
    assert "lost its index.json: rebuilding the library" in out
    assert again.timing["jobs_run"] == len(reference) - 1 and rd.is_fresh("02_bld")  # every job
    assert_same_library(library_state(again.library_dir), reference)


# ------------------------------------------------------------------------------- cost tables

@pytest.fixture(scope="module")
def table_dir(tmp_path_factory):
    """A real cost table of the tiny parent (1 scenario, 1 repeat) with its scenarios.json."""
    from conftest import tiny_config
    from puzzlelib.core.modeling_decilm import PuzzleForCausalLM

    torch.manual_seed(0)
    model = PuzzleForCausalLM(tiny_config()).eval()
    sc = [costs.Scenario(1, 8, 4)]
    table = benches.profile_model(model, sc, warmup=0, repeats=1, progress=False)
    d = tmp_path_factory.mktemp("costs")
    table.to_csv(d / "costs.csv")
    atomic_write_json(d / "scenarios.json", {"scenarios": [vars(s) for s in sc],
                                             "dtype": "float32", "statistic": "median"})
    return model, sc, d


def _set_cell(text: str, variant: str, column: str, value: str) -> str:
    lines = text.splitlines(keepends=True)
    cols = lines[0].strip().split(",")
    for i, line in enumerate(lines[1:], start=1):
        cells = line.rstrip("\n").split(",")
        if cells[cols.index("variant")] == variant:
            cells[cols.index(column)] = value
            lines[i] = ",".join(cells) + "\n"
            return "".join(lines)
    raise AssertionError(variant)


@pytest.mark.parametrize("value, needle", [
    ("nan", "is 'nan', not a finite number"),
    ("-0.9", "is -0.9: a cost cannot be negative"),
    ("inf", "is 'inf', not a finite number"),
    ("fast", "'fast' is not a number"),
])
def test_cost_cells_must_be_finite_and_non_negative(table_dir, tmp_path, value, needle):
    model, sc, d = table_dir
    bad = tmp_path / "costs.csv"
    bad.write_text(_set_cell((d / "costs.csv").read_text(), "attn:kv1", "prefill_ms@b1", value))
    with pytest.raises(timing.ProfilingError, match=re.escape(needle)) as e:
        costs.CostTable.from_csv(bad, sc)
    assert re.search(r"line \d+ \(layer 0, attn:kv1\), column prefill_ms@b1", str(e.value))
    assert "rerun stage 01_profiling" in str(e.value)
    # the same table imported with profile_costs_from: refused the same way
    (tmp_path / "scenarios.json").write_bytes((d / "scenarios.json").read_bytes())
    with pytest.raises(timing.ProfilingError, match=re.escape(needle)):
        P.import_costs(model, sc, str(tmp_path), "median")


def test_an_imported_table_changed_after_its_run_wrote_it_is_refused(table_dir, tmp_path):
    model, sc, d = table_dir
    cfg = RunConfig.from_preset("smoke", {"runs_root": str(tmp_path / "runs")}, run_name="src")
    rd = RunDir(cfg)
    with rd.stage("01_profiling", check_upstream=False) as st:
        for name in ("costs.csv", "scenarios.json"):
            st.path(name).write_bytes((d / name).read_bytes())
    src = rd.stage_dir("01_profiling")
    table, *_ = P.import_costs(model, sc, str(src), "median")  # intact: imported
    assert table.rows
    text = (src / "costs.csv").read_text()
    cols = text.splitlines()[0].split(",")
    row = next(x for x in text.splitlines()[1:] if ",attn:kv1," in x)
    old = row.split(",")[cols.index("prefill_ms@b1")]
    new = str(old)[:-1] + ("1" if str(old)[-1] != "1" else "2")  # same width, another time
    tamper_same_size(src / "costs.csv", lambda b: b.replace(row.encode(), row.replace(
        "," + old + ",", "," + new + ",", 1).encode(), 1))
    with pytest.raises(timing.ProfilingError, match=r"costs.csv changed after that run's stage "
                                               r"01_profiling wrote it"):
        P.import_costs(model, sc, str(src), "median")
    assert [p.split(":")[0] for p in rd.verify("01_profiling")] == [str(src / "costs.csv")]


# ------------------------------------------------------------------------------- memory

GIB = 1 << 30


@pytest.fixture
def machine(monkeypatch):
    """Pretend this machine has 8 GiB of RAM and no GPU, so the numbers do not depend on it."""
    monkeypatch.setattr(limits, "host_memory", lambda: (8 * GIB, 6 * GIB))
    monkeypatch.setattr(limits, "gpu_memory", lambda: (None, ""))
    monkeypatch.delenv(limits.SKIP_ENV, raising=False)


@pytest.mark.parametrize("over, field", [
    ({"vocab_size": 1_000_000_000}, "vocab_size"),
    ({"parent_hidden_size": 32768, "parent_num_heads": 8}, "parent_hidden_size"),
    ({"parent_num_layers": 20_000}, "parent_num_layers"),
    ({"seq_len": 65536, "scoring_tokens": 65536, "search_influence_tokens": 65536,
      "parent_train_tokens": 16 * 65536}, "seq_len"),
    ({"bld_tokens_per_variant": 10**10}, "bld_tokens_per_variant"),
])
def test_sizes_that_cannot_fit_are_refused_naming_the_field_and_what_fits(machine, over, field):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_preset("default", over)
    msg = str(e.value)
    m = re.search(rf"needs at least ([\d.]+) (GiB|TiB) .* has 8\.0 GiB of RAM \(6\.0 GiB available "
                  rf"now\); lower {field} \(at most ([\d,]+) fits\)", msg)
    assert m, msg
    fits = int(m.group(3).replace(",", ""))
    # the value it names passes validation, and the next valid value up does not
    step = 2 * over.get("parent_num_heads", 8) if field == "parent_hidden_size" else 1
    RunConfig.from_preset("default", {**over, field: fits})
    with pytest.raises(ConfigError, match="cannot fit"):
        RunConfig.from_preset("default", {**over, field: fits + step})


def test_memory_check_reads_the_gpu_for_cuda_and_can_be_skipped(machine, monkeypatch):
    RunConfig.from_preset("default")  # fits 8 GiB
    over = {"bld_tokens_per_variant": 4_000_000, "device": "cuda"}  # 5.7 GiB of streams at hidden 128
    monkeypatch.setattr(limits, "host_memory", lambda: (64 * GIB, 60 * GIB))
    monkeypatch.setattr(limits, "gpu_memory", lambda: (4 * GIB, "Tiny GPU"))
    with pytest.raises(ConfigError, match=r"02_bld cannot fit .* 4\.0 GiB of GPU memory "
                                          r"\(Tiny GPU\); lower bld_tokens_per_variant"):
        RunConfig.from_preset("default", over)
    RunConfig.from_preset("default", {**over, "bld_activations_on_disk": True})  # streams on disk
    RunConfig.from_preset("default", {**over, "device": "cpu"})  # 64 GiB of RAM hold them
    monkeypatch.setenv(limits.SKIP_ENV, "1")
    RunConfig.from_preset("default", over)
    # an HF parent brings its own sizes: vocab_size does not apply to it
    monkeypatch.delenv(limits.SKIP_ENV)
    RunConfig.from_preset("gpu-llama-3.2-1b", {"vocab_size": 10**9})


def test_cli_refuses_vocab_1e9_before_any_work(tmp_path):
    need = limits._peak({**RunConfig.from_preset("default").to_dict(), "vocab_size": 10**9},
                        ("cpu", "device"))[0]
    if (limits.host_memory()[0] or 0) >= need:
        pytest.skip("this machine could hold it")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(limits.SKIP_ENV, None)
    for args in (["show-config", "--preset", "default"],
                 ["run", "--preset", "default", "--run-name", "big",
                  "--set", f"runs_root={tmp_path / 'runs'}",
                  "--set", f"reports_root={tmp_path / 'reports'}"]):
        p = subprocess.run([sys.executable, "-m", "puzzlelib", *args, "--set",
                            "vocab_size=1000000000"], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=120)
        assert p.returncode == 2, p.stderr
        assert "Traceback" not in p.stderr and p.stdout == ""
        errors = [x for x in p.stderr.splitlines() if x.strip().startswith("- ")]
        assert len(errors) == 1 and "00_parent cannot fit this machine's memory" in errors[0]
        assert "lower vocab_size (at most" in errors[0] and "GiB" in errors[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "reports").exists()


def test_when_no_one_field_fits_the_raised_fields_are_named(machine):
    over = {"seq_len": 10**7, "scoring_tokens": 10**7, "search_influence_tokens": 10**7,
            "parent_train_tokens": 10**9}
    with pytest.raises(ConfigError, match=r"no one field alone brings it down: lower seq_len "
                                          r"\(10,000,000; preset 'default' has 256\) and "
                                          r"scoring_tokens \(10,000,000; preset 'default' "
                                          r"has 4,096\)"):
        RunConfig.from_preset("default", over)
    # and a suggestion is never below the field's valid range (vocab_size >= 264)
    assert "lower vocab_size" not in str(pytest.raises(ConfigError, RunConfig.from_preset,
                                                        "default", over).value)
