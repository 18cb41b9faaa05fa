"""Reliability of whole runs (issue #10): determinism, SIGKILL at any point, concurrent runs.

Each test drives the real command line (``python -m puzzlelib run``) or ``run_pipeline`` on the
`smoke` preset and compares against the shared uninterrupted run U (the ``smoke_run`` fixture).
A second run can only reproduce U's children if it uses U's *cost table*: the table is a timing
measurement, and another measurement can make the search pick another child. So every run here
imports U's table (``profile_costs_from``); U itself measured it. Nothing in
``reports/<run>/metrics.json`` says where the costs came from (that is in stage 01's manifest and
metrics and in ``reports/<run>/environment.json``), so U and an importing run must match byte for
byte. Weights are compared as tensors: safetensors files with more than one metadata key differ in
bytes between two identical saves (the writer orders metadata keys at random).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


# ---- helpers ------------------------------------------------------------------------------------
def _overrides(root: Path, costs_from: Path | None = None) -> dict:
    over = {"runs_root": str(root / "runs"), "reports_root": str(root / "reports")}
    if costs_from is not None:
        over["profile_costs_from"] = str(costs_from)
    return over


def _cli(args: list[str], over: dict, run_name: str = "smoke") -> list[str]:
    sets = [f"{k}={v}" for k, v in over.items()]
    return [sys.executable, "-m", "puzzlelib", *args, "--preset", "smoke", "--run-name", run_name,
            "--set", *sets]


def _start(args: list[str], over: dict, log: Path, run_name: str = "smoke") -> subprocess.Popen:
    """The pipeline in its own process group, output to ``log`` (read back on failure)."""
    with open(log, "ab") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(_cli(args, over, run_name), cwd=REPO, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _tail(log: Path, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no log)"


def _where(runner: subprocess.Popen, tree: list) -> str:
    """What a hung runner and its processes are doing (status; Python stacks when py-spy is
    installed), then every one of them killed so the suite goes on."""
    import shutil

    import psutil

    local = Path(sys.executable).with_name("py-spy")
    spy = shutil.which("py-spy") or (str(local) if local.exists() else None)
    lines = []
    for p in [psutil.Process(runner.pid), *tree]:
        try:
            lines.append(f"pid {p.pid} {p.status()}: {' '.join(p.cmdline())[:160]}")
        except psutil.Error as e:
            lines.append(f"pid {p.pid}: {type(e).__name__}")
            continue
        if spy:
            out = subprocess.run([spy, "dump", "--pid", str(p.pid)], capture_output=True, text=True,
                                 timeout=30, check=False)
            lines.append((out.stdout or out.stderr)[-3000:])
    _kill_pipeline(runner)
    return "\n".join(lines)


def _kill_pipeline(proc: subprocess.Popen) -> None:
    """SIGKILL the runner, its notebook process and the Jupyter kernel. The kernel runs in a
    session of its own (jupyter_client starts it so), so killing the runner's process group
    alone would leave it training; it is found as a descendant first."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    os.killpg(proc.pid, signal.SIGKILL)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait(timeout=30)


def _wait_until(proc: subprocess.Popen, cond, what: str, log: Path, timeout: float = 600) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the pipeline exited (rc {proc.returncode}) before {what}:\n{_tail(log)}")
        if time.monotonic() - t0 > timeout:
            _kill_pipeline(proc)
            pytest.fail(f"no sign of {what} after {timeout} s:\n{_tail(log)}")
        time.sleep(0.05)


def _status(run_dir: Path, stage: str) -> str | None:
    try:
        return json.loads((run_dir / stage / "manifest.json").read_text()).get("status")
    except (OSError, ValueError):  # not written yet
        return None


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def _assert_same_weights(a: Path, b: Path, pattern: str) -> int:
    """Every ``pattern`` safetensors file under run dir ``a`` has equal tensors under ``b``."""
    files = sorted(p.relative_to(a) for p in a.glob(pattern))
    assert files, f"no {pattern} under {a}"
    assert files == sorted(p.relative_to(b) for p in b.glob(pattern))
    for rel in files:
        ta, tb = _tensors(a / rel), _tensors(b / rel)
        assert ta.keys() == tb.keys(), rel
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{rel}: tensor {k} differs"
    return len(files)


def _assert_same_results(u_root: Path, other_root: Path) -> None:
    """Same report metrics (bytes) and the same trained weights as run U."""
    u_report, o_report = u_root / "reports" / "smoke", other_root / "reports" / "smoke"
    assert (o_report / "metrics.json").read_bytes() == (u_report / "metrics.json").read_bytes()
    u_run, o_run = u_root / "runs" / "smoke", other_root / "runs" / "smoke"
    _assert_same_weights(u_run, o_run, "00_parent/model/model.safetensors")
    assert _assert_same_weights(u_run, o_run, "02_bld/library/blocks/*/*.safetensors") >= 40
    assert _assert_same_weights(u_run, o_run, "05_gkd/children/*/model.safetensors") >= 3


def _first_bar_start(notebook: Path, desc: str) -> int:
    """The step the first ``desc`` progress bar of an executed notebook started at: > 0 when the
    training resumed from a checkpoint instead of starting over."""
    m = re.search(rf"{desc}[^:]*: +\d+%\|[^|]*\| (\d+)/\d+", notebook.read_text())
    assert m, f"no {desc!r} progress bar in {notebook}"
    return int(m.group(1))


def _refused_downstream(over: dict, stage: str, killed: str, log: Path) -> None:
    """A later stage does not start on the killed stage's leftovers: the runner exits 2 naming it."""
    r = subprocess.run(_cli(["run", "--stages", stage], over), cwd=REPO, capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 2, (r.stdout, r.stderr, _tail(log))
    assert killed in r.stderr and "interrupted" in r.stderr and "--stages" in r.stderr, r.stderr


def _check_interrupted(root: Path, over: dict, stage: str, later: str, log: Path) -> None:
    from puzzlelib.core.config import RunConfig
    from puzzlelib.core.rundir import RunDir, StageNotReady

    run_dir = root / "runs" / "smoke"
    assert _status(run_dir, stage) == "running"  # killed inside the stage, not between two
    rd = RunDir(RunConfig.from_preset("smoke", over, "smoke"), create=False)
    assert rd.state(stage)[0] == "interrupted"
    with pytest.raises(StageNotReady, match=rf"{stage}.*interrupted.*notebooks/{stage}\.ipynb"):
        rd.require(stage)
    st = subprocess.run([sys.executable, "-m", "puzzlelib", "status", "--run-name", "smoke",
                         "--runs-root", str(root / "runs")], cwd=REPO, capture_output=True,
                        text=True, timeout=120, check=False)
    line = next(ln for ln in st.stdout.splitlines() if ln.strip().startswith(stage))
    assert st.returncode == 0 and "interrupted" in line and "run the stage again" in line, st.stdout
    _refused_downstream(over, later, stage, log)


# ---- determinism ------------------------------------------------------------------------------
def _assert_rerun_is_bit_identical(u: Path, other: Path, costs_from: Path) -> None:
    """``other`` (a fresh root, the same run name, U's cost table imported) reproduces U: the
    imported table's bytes and provenance, reports/smoke/metrics.json byte-identical, every trained
    tensor equal. The wall-clock numbers that differ are in timings.json; environment.json says what
    would break bit-identity elsewhere (GPU kernels, other versions, thread counts)."""
    run = other / "runs" / "smoke"
    # Imported as it was measured: the same table, its provenance in stage 01's metrics only.
    assert (run / "01_profiling" / "costs.csv").read_bytes() == (costs_from / "costs.csv").read_bytes()
    m01 = json.loads((run / "01_profiling" / "metrics.json").read_text())
    assert m01["costs_imported_from"] == str(costs_from / "costs.csv")
    _assert_same_results(u, other)
    # The split: what differs between two runs is out of metrics.json and in timings.json.
    report = other / "reports" / "smoke"
    metrics = json.loads((report / "metrics.json").read_text())
    timings = json.loads((report / "timings.json").read_text())
    assert "timing" not in metrics and "measured_speedup" not in metrics["models"][0]
    assert not any(str(m["source"]).startswith("/") for m in metrics["models"])
    assert timings["models"]["parent"]["measured_speedup"] == 1.0 and timings["timing"]["quality_seconds"] > 0
    env = json.loads((report / "environment.json").read_text())
    assert env["cost_table"]["imported_from"] == str(costs_from)
    assert any("GPU" in b for b in env["breaks_bit_identity"]) and env["corpus"]["fingerprint"]


# ---- fault injection ----------------------------------------------------------------------------
def test_sigkill_inside_parent_bld_and_gkd_then_rerun_equals_an_uninterrupted_run(smoke_run, tmp_path):
    """K: the smoke pipeline from the command line, SIGKILLed (runner, notebook process and
    kernel) inside parent training after a resumable checkpoint, inside BLD with some blocks
    written, and inside GKD with one child exported and another mid-training. After each kill
    the stage reads "interrupted" (status, ``require``) and a later stage refuses to start; the
    reruns resume, and the end result equals U's bit for bit.

    K is also the determinism check (a second run with U's cost table imported reproduces U byte
    for byte, :func:`_assert_rerun_is_bit_identical`): an uninterrupted second run is a special
    case of it, and a separate one cost the suite another whole smoke run (~4 min on 2 cores)."""
    costs_from = smoke_run.run_dir / "01_profiling"
    over = _overrides(tmp_path, costs_from)
    run_dir, log = tmp_path / "runs" / "smoke", tmp_path / "pipeline.log"
    n_blocks = len(list((smoke_run.run_dir / "02_bld" / "library" / "blocks").glob("*/*.json")))

    # 1. Parent training, once a resumable train state exists (it is written atomically).
    proc = _start(["run"], over, log)
    state = run_dir / "00_parent" / "train_state"
    _wait_until(proc, lambda: _status(run_dir, "00_parent") == "running" and state.is_dir()
                and any(state.iterdir()), "a parent train-state checkpoint", log)
    _kill_pipeline(proc)
    assert not (run_dir / "00_parent" / "model").exists()
    _check_interrupted(tmp_path, over, "00_parent", "01", log)

    # 2. BLD, with some but not all blocks in the library (each block is written atomically).
    def blocks() -> int:
        return len(list((run_dir / "02_bld" / "library" / "blocks").glob("*/*.json")))

    proc = _start(["run"], over, log)
    _wait_until(proc, lambda: _status(run_dir, "02_bld") == "running" and blocks() >= 8,
                "BLD blocks being written", log)
    _kill_pipeline(proc)
    kept = blocks()
    assert _status(run_dir, "00_parent") == "done" and 8 <= kept < n_blocks
    reports = tmp_path / "reports" / "smoke"
    assert _first_bar_start(reports / "00_parent.ipynb", "parent training") > 0  # it resumed
    _check_interrupted(tmp_path, over, "02_bld", "03", log)

    # 3. GKD, with one child exported and another one's checkpoint on disk.
    gkd = run_dir / "05_gkd"

    def gkd_midway() -> bool:
        # A checkpoint of a child not yet exported (an exported child's state is removed just
        # after its export, so a state alone could belong to a finished child).
        states = gkd / "train_state"
        exported = {p.parent.name for p in gkd.glob("children/*/gkd.json")}
        midway = states.is_dir() and any(
            p.is_dir() and not p.name.startswith(".") and p.name not in exported and any(p.iterdir())
            for p in states.iterdir())
        return _status(run_dir, "05_gkd") == "running" and bool(exported) and midway

    proc = _start(["run", "--stages", "02-06"], over, log)
    _wait_until(proc, gkd_midway, "GKD between two checkpoints", log)
    _kill_pipeline(proc)
    assert f"resuming: {kept} of {n_blocks} blocks already" in (reports / "02_bld.ipynb").read_text()
    _check_interrupted(tmp_path, over, "05_gkd", "06", log)

    # 4. Finish: the killed stage resumes, the rest runs; the result is U's.
    proc = _start(["run", "--stages", "05-06"], over, log)
    assert proc.wait(timeout=900) == 0, _tail(log)
    assert _first_bar_start(reports / "05_gkd.ipynb", "GKD ") > 0  # the first child left was resumed
    _assert_rerun_is_bit_identical(smoke_run.root, tmp_path, costs_from)


# ---- concurrency --------------------------------------------------------------------------------
# Stage 00 alone with a short training (64 steps): seconds, but long enough to overlap.
_SHORT = {"parent_train_tokens": 131_072}


def test_same_run_name_is_refused_and_different_names_run_in_parallel(tmp_path):
    """(b) While one process runs stage 00 of run "same", a second runner on that name exits 3
    with the lock message and a second writer of the stage gets StageLocked; the first one
    finishes with intact artifacts. (a) Runs "c1" and "c2" in parallel both finish, with the same
    parent weights as the first (sequential) run."""
    from puzzlelib.core.config import RunConfig
    from puzzlelib.core.rundir import RunDir, StageLocked

    over = {**_overrides(tmp_path), **_SHORT}
    log = tmp_path / "same.log"
    first = _start(["run", "--stages", "00"], over, log, run_name="same")
    same = tmp_path / "runs" / "same"
    _wait_until(first, lambda: _status(same, "00_parent") == "running", "stage 00 running", log)
    cfg = RunConfig.from_preset("smoke", over, "same")
    locked = r"another process is running stage 00_parent of run 'same'"
    with pytest.raises(StageLocked, match=locked), RunDir(cfg).stage("00_parent"):
        pass
    second = subprocess.run(_cli(["run", "--stages", "00"], over, "same"), cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)
    assert second.returncode == 3, (second.stdout, second.stderr)
    assert "another process is running the pipeline for run 'same'" in second.stderr
    assert first.poll() is None, "the first run ended before the second was refused: nothing was tested"
    assert first.wait(timeout=600) == 0, _tail(log)
    rd = RunDir(cfg, create=False)
    assert rd.is_fresh("00_parent") and rd.verify("00_parent") == []
    nb = json.loads((tmp_path / "reports" / "same" / "00_parent.ipynb").read_text())
    assert not [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]

    logs = {n: tmp_path / f"{n}.log" for n in ("c1", "c2")}
    procs = {n: _start(["run", "--stages", "00"], over, logs[n], run_name=n) for n in logs}
    for n, p in procs.items():
        assert p.wait(timeout=600) == 0, _tail(logs[n])
    for n in procs:
        _assert_same_weights(same, tmp_path / "runs" / n, "00_parent/model/model.safetensors")
        assert RunDir(RunConfig.from_preset("smoke", over, n), create=False).verify("00_parent") == []


# ---- signals, copies and pipes (issue #17, A3, A4, A8) ------------------------------------------
# A stage that trains "forever" (a tqdm loop inside the stage), writing the kernel's pid first.
_LONG_STAGE = """
import os, time
from tqdm import tqdm
from puzzlelib.core.config import RunConfig
from puzzlelib.core.rundir import RunDir
rd = RunDir(RunConfig.from_preset(preset, overrides, run_name))
with rd.stage("00_parent") as st:
    (rd.root / "kernel.pid").write_text(str(os.getpid()))
    for i in tqdm(range(100_000), desc="parent training"):
        time.sleep(0.05)
"""


def _tiny_repo(root: Path, body: str) -> Path:
    import nbformat

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("run_name = 'x'\npreset = 'smoke'\noverrides = {}")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    (root / "notebooks").mkdir(parents=True)
    nbformat.write(nb, root / "notebooks" / "00_parent.ipynb")
    return root


def _alive(p) -> bool:
    import psutil

    try:  # a zombie has finished; in a container nobody may reap it
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _lock_free(path: Path) -> bool:
    import fcntl

    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C", "SIGKILL to the runner"])
def test_a_signal_stops_the_notebook_and_its_kernel(tmp_path, how):
    """`timeout` / `kill` / a scheduler (SIGTERM), the terminal's Ctrl-C (SIGINT to the foreground
    process group), and a runner killed outright: the notebook process and the kernel are gone
    soon after, never after the pipeline lock was released, the stage reads "interrupted", and
    the runner (when it can) says so in one line, exit 128 + the signal."""
    import psutil

    repo = _tiny_repo(tmp_path / "repo", _LONG_STAGE)
    run_dir, log = repo / "runs" / "sig", tmp_path / "runner.log"
    # A foreground process on a terminal gets Ctrl-C at SIGINT's default disposition. An ignored
    # SIGINT is inherited across exec (and Python then keeps ignoring it): some library in the
    # suite leaves pytest's SIGINT ignored, and the runner, started from it, never saw the Ctrl-C
    # (reproduced by ignoring SIGINT before pytest starts). So the runner starts as a terminal's would.
    with open(log, "wb") as f:
        runner = subprocess.Popen([sys.executable, "-m", "puzzlelib", "run", "--preset", "smoke",
                                   "--run-name", "sig", "--stages", "00", "--repo-root", str(repo)],
                                  cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    pid_file = run_dir / "kernel.pid"
    _wait_until(runner, lambda: pid_file.is_file() and pid_file.read_text(), "the stage running", log,
                timeout=180)
    time.sleep(1.0)  # inside the training loop
    tree = psutil.Process(runner.pid).children(recursive=True)
    kernel = psutil.Process(int(pid_file.read_text()))
    assert kernel in tree and len(tree) >= 2  # the notebook process and its kernel
    lock = run_dir / ".locks" / "pipeline.lock"
    if how == "SIGTERM":
        runner.send_signal(signal.SIGTERM)
    elif how == "Ctrl-C":
        os.killpg(runner.pid, signal.SIGINT)  # what the terminal does: the whole foreground group
    else:
        runner.kill()
    t0 = time.monotonic()
    while runner.poll() is None and time.monotonic() - t0 < 60:
        if _lock_free(lock):  # the lock may go only once every process under the runner is gone
            assert not [p for p in tree if _alive(p)], "pipeline lock released before the kernel died"
        time.sleep(0.02)
    try:
        rc = runner.wait(timeout=5)
    except subprocess.TimeoutExpired:  # hung: say where, so the next occurrence can be diagnosed
        pytest.fail(f"the runner did not exit within 65 s of {how}:\n{_where(runner, tree)}\n{_tail(log)}")
    gone, alive = psutil.wait_procs(tree, timeout=30)
    assert not [p for p in alive if _alive(p)], f"left running: {alive}\n{_tail(log)}"
    out = log.read_text()
    if how == "SIGKILL to the runner":
        assert rc == -signal.SIGKILL  # it could say nothing; the notebook process stopped itself
    else:
        assert rc == 128 + (signal.SIGTERM if how == "SIGTERM" else signal.SIGINT), out
        by = "SIGTERM" if how == "SIGTERM" else "Ctrl-C"
        assert out.rstrip().splitlines()[-1].startswith(f"puzzlelib: stopped by {by} during 00_parent"), out
        assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
        summary = json.loads((repo / "reports" / "sig" / "pipeline.json").read_text())
        assert summary["stages"][-1]["status"] == "interrupted"
    st = subprocess.run([sys.executable, "-m", "puzzlelib", "status", "--run-name", "sig", "--runs-root",
                         str(repo / "runs")], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert re.search(r"00_parent +interrupted", st.stdout), st.stdout + st.stderr
    assert _lock_free(lock)


def _finished_run(root: Path, name: str) -> Path:
    """A run with stage 00 done through RunDir (no notebook), under root/runs/name."""
    from puzzlelib.core.config import RunConfig
    from puzzlelib.core.rundir import RunDir

    rd = RunDir(RunConfig.from_preset("smoke", {"runs_root": str(root / "runs")}, name))
    with rd.stage("00_parent") as st:
        st.path("model.bin").write_bytes(b"weights")
    return rd.root


def test_a_copied_run_folder_is_read_as_itself(tmp_path):
    """`cp -r runs/a runs/b; status --run-name b` reads runs/b (it used to read runs/a, the
    run_name inside config.json, and report every stage "missing" once runs/a was gone)."""
    import shutil

    a = _finished_run(tmp_path, "a")
    shutil.copytree(a, tmp_path / "runs" / "b")
    shutil.rmtree(a)
    r = subprocess.run([sys.executable, "-m", "puzzlelib", "status", "--run-name", "b", "--runs-root",
                        str(tmp_path / "runs")], cwd=REPO, capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert f"run 'b' (preset smoke) at {tmp_path / 'runs' / 'b'}" in r.stdout
    assert re.search(r"00_parent +fresh", r.stdout), r.stdout


def test_status_into_a_closed_pipe_ends_quietly(tmp_path):
    """`status | head`: the reader closes the pipe; the command ends without a BrokenPipeError
    traceback (exit 141, as a command stopped by SIGPIPE)."""
    _finished_run(tmp_path, "p")
    proc = subprocess.Popen([sys.executable, "-m", "puzzlelib", "status", "--run-name", "p", "--runs-root",
                             str(tmp_path / "runs")], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # closed before anything is written: every write hits a broken pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == "", err
