"""Runner / CLI: exit codes, stage selection, and tiny throwaway notebooks run through papermill."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

import puzzlelib
from puzzlelib.core.config import RunConfig
from puzzlelib.core.rundir import RunDir
from puzzlelib.runner import UsageError, kernel_env, main, parse_stages

PARAMS = "run_name = 'default'\npreset = 'default'\noverrides = {}"
# A real stage in miniature: resolve the config exactly as the real notebooks do, write through
# RunDir, and record what the kernel saw (parameters, cwd, environment).
STAGE_BODY = """
import json, os
from pathlib import Path
from puzzlelib.core.config import RunConfig
from puzzlelib.core.rundir import RunDir
cfg = RunConfig.from_preset(preset, overrides, run_name)
rd = RunDir(cfg)
with rd.stage({stage!r}) as st:
    st.path("out.txt").write_text("ok")
Path("seen_{stage}.json").write_text(json.dumps({{
    "run_name": run_name, "preset": preset, "overrides": overrides, "cwd": os.getcwd(),
    "offline": os.environ.get("HF_HUB_OFFLINE"), "hf_home": os.environ.get("HF_HOME")}}))
print("stage {stage} finished")
"""


def write_nb(path: Path, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(PARAMS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


@pytest.fixture
def repo(tmp_path):
    return tmp_path / "repo"


def test_parse_stages():
    assert parse_stages("all") == parse_stages("00-06") == parse_stages("0-6")
    assert parse_stages("00-02") == ["00_parent", "01_profiling", "02_bld"]
    assert parse_stages("04,00") == ["00_parent", "04_search"]
    assert parse_stages("bld,03_scoring") == ["02_bld", "03_scoring"]
    for bad, needle in [("07", "unknown stage '07'"), ("03-01", "runs backwards"), ("x", "all")]:
        with pytest.raises(UsageError, match=needle):
            parse_stages(bad)


def test_kernel_env_is_offline_local_and_respects_the_user(tmp_path):
    env = kernel_env(tmp_path, base={"PYTHONPATH": "/x"})
    assert [env[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")] == ["1"] * 3
    # explicitly set by the user: kept, and the other two switches follow it (online for all)
    env = kernel_env(tmp_path, base={"HF_HUB_OFFLINE": "0", "PYTHONPATH": "/x"})
    assert [env[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")] == ["0"] * 3
    assert env["TOKENIZERS_PARALLELISM"] == "false"
    # online (a hub id asked for, HF_HUB_OFFLINE unset): no offline switch at all
    env = kernel_env(tmp_path, base={"PYTHONPATH": "/x"}, online=True)
    assert not {"HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"} & set(env)
    for k in ("HF_HOME", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR",
              "IPYTHONDIR", "MPLCONFIGDIR"):
        assert env[k].startswith(str(tmp_path / ".cache")), k
    # the kernel imports this very puzzlelib, installed or not
    here = str(Path(puzzlelib.__file__).parent.parent)
    assert env["PYTHONPATH"].split(os.pathsep) == [here, "/x"]


@pytest.mark.parametrize("argv,needle", [
    (["run", "--preset", "nope"], "unknown preset 'nope'"),
    (["run", "--preset", "smoke", "--set", "seqlen=3"], "did you mean 'seq_len'"),
    (["run", "--preset", "smoke", "--set", "seq_len=abc"], "seq_len expects an integer"),
    (["run", "--preset", "smoke", "--run-name", "../x"], "not a safe folder name"),
    (["run", "--preset", "smoke", "--stages", "09"], "unknown stage '09'"),
    (["run", "--preset", "smoke", "--set", "corpus=missing.txt"], "does not exist"),
    (["run", "--preset", "smoke"], "no notebook to run"),
    (["show-config", "--preset", "smok"], "did you mean 'smoke'"),
    (["status", "--run-name", "nope"], "no run named 'nope'"),
])
def test_bad_input_exits_2_without_writing_reports(repo, capsys, argv, needle):
    (repo / "notebooks").mkdir(parents=True)
    if argv[0] == "status":
        argv = argv + ["--runs-root", str(repo / "runs")]
    else:
        argv = argv + ["--repo-root", str(repo)] if argv[0] == "run" else argv
    assert main(argv) == 2
    assert needle in capsys.readouterr().err
    assert not (repo / "reports").exists()


def test_missing_upstream_is_refused_before_running(repo, capsys):
    write_nb(repo / "notebooks" / "02_bld.ipynb", "print('never')")
    assert main(["run", "--preset", "smoke", "--stages", "02", "--repo-root", str(repo)]) == 2
    err = capsys.readouterr().err
    assert "stage 02_bld reads 00_parent" in err and "--stages 00,02" in err
    assert not (repo / "reports").exists()


def test_show_config(capsys):
    assert main(["show-config", "--preset", "smoke", "--set", "seq_len=32"]) == 0
    out = capsys.readouterr().out
    assert "[00_parent]" in out and "seq_len               = 32" in out
    assert main(["show-config", "--preset", "smoke", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run_name"] == "smoke"


def test_two_notebook_pipeline(repo, capfd, monkeypatch):
    # The runner only fills in caches the caller left unset (`make test` sets its own HF_HOME).
    monkeypatch.delenv("HF_HOME", raising=False)
    for stage in ("00_parent", "01_profiling"):
        write_nb(repo / "notebooks" / f"{stage}.ipynb", STAGE_BODY.format(stage=stage))
    rc = main(["run", "--preset", "smoke", "--run-name", "tiny", "--set", "seq_len=32",
               "--force", "--repo-root", str(repo)])
    out = capfd.readouterr().out
    assert rc == 0, out
    report = repo / "reports" / "tiny"
    for stage in ("00_parent", "01_profiling"):
        nb = nbformat.read(report / f"{stage}.ipynb", as_version=4)
        assert f"stage {stage} finished" in json.dumps(nb.cells[-1].outputs)
        assert "<html" in (report / f"{stage}.html").read_text()[:500].lower()
        seen = json.loads((repo / f"seen_{stage}.json").read_text())
        assert seen == {"run_name": "tiny", "preset": "smoke",
                        "overrides": {"seq_len": 32, "force": True}, "cwd": str(repo),
                        "offline": seen["offline"], "hf_home": seen["hf_home"]}
        assert seen["hf_home"].startswith(str(repo / ".cache"))
    assert "no notebook yet for 02_bld" in out and f"Reports in {report}" in out
    summary = json.loads((report / "pipeline.json").read_text())
    assert [(s["stage"], s["status"]) for s in summary["stages"]][-2:] == [
        ("00_parent", "ok"), ("01_profiling", "ok")]
    assert not list(report.glob(".*"))  # no half-written notebooks left behind
    # the notebooks wrote the run through RunDir, relative to the repo root
    rd = RunDir(RunConfig.from_preset("smoke", {"seq_len": 32, "runs_root": str(repo / "runs")},
                                      run_name="tiny"), create=False)
    assert rd.is_fresh("00_parent") and rd.is_fresh("01_profiling")
    assert main(["status", "--run-name", "tiny", "--runs-root", str(repo / "runs")]) == 0
    status = capfd.readouterr().out
    assert "00_parent      fresh" in status and "02_bld         missing" in status
    # Rerunning one stage keeps the other stage's entry (its executed notebook is still in the
    # report folder), marked as from an earlier run, instead of rewriting the summary with one stage.
    first = {s["stage"]: s for s in summary["stages"]}
    assert main(["run", "--preset", "smoke", "--run-name", "tiny", "--set", "seq_len=32", "--stages", "00",
                 "--repo-root", str(repo)]) == 0
    capfd.readouterr()
    again = json.loads((report / "pipeline.json").read_text())["stages"]
    assert [(s["stage"], s["status"], s.get("earlier_run", False)) for s in again] == [
        ("00_parent", "ok", False), ("01_profiling", "ok", True)]
    assert again[1] == {**first["01_profiling"], "earlier_run": True}
    (report / "pipeline.json").write_text("{not json")  # an unreadable summary is replaced, not fatal
    assert main(["run", "--preset", "smoke", "--run-name", "tiny", "--set", "seq_len=32", "--stages", "00",
                 "--repo-root", str(repo)]) == 0
    capfd.readouterr()
    assert [s["stage"] for s in json.loads((report / "pipeline.json").read_text())["stages"]] == ["00_parent"]


def test_failing_notebook_stops_the_run(repo, capfd):
    write_nb(repo / "notebooks" / "00_parent.ipynb", "print('fine')")
    write_nb(repo / "notebooks" / "01_profiling.ipynb",
             "def measure():\n    raise ValueError('boom-xyz: set device=cpu')\nmeasure()")
    write_nb(repo / "notebooks" / "02_bld.ipynb",
             "from pathlib import Path\nPath('ran_02').write_text('x')")
    rc = main(["run", "--preset", "smoke", "--repo-root", str(repo)])
    out = capfd.readouterr().out
    assert rc == 1
    assert "01_profiling: FAILED" in out and "ValueError: boom-xyz: set device=cpu" in out
    assert "----> 2     raise ValueError" in out  # traceback tail, ANSI colours stripped
    assert "\x1b[" not in out
    report = repo / "reports" / "smoke"
    assert f"executed notebook with the error: {report / '01_profiling.html'}" in out
    assert not (repo / "ran_02").exists() and not (report / "02_bld.ipynb").exists()
    summary = json.loads((report / "pipeline.json").read_text())
    assert [s["status"] for s in summary["stages"] if s["status"] != "skipped"] == ["ok", "error"]


def test_a_second_runner_on_the_same_run_name_is_refused(repo, capfd):
    """While another process holds the run's pipeline lock, `run` exits 3 naming the lock and
    executes nothing; once it is released (as the OS does when its holder dies) the run goes on."""
    from filelock import FileLock

    write_nb(repo / "notebooks" / "00_parent.ipynb", "print('ran')")
    argv = ["run", "--preset", "smoke", "--run-name", "busy", "--stages", "00", "--repo-root", str(repo)]
    lock = FileLock(repo / "runs" / "busy" / ".locks" / "pipeline.lock", timeout=0)
    with lock:
        assert main(argv) == 3
        err = capfd.readouterr().err
        assert "another process is running the pipeline for run 'busy'" in err and "--run-name" in err
        assert not (repo / "reports" / "busy" / "00_parent.ipynb").exists()
    assert main(argv) == 0
    assert (repo / "reports" / "busy" / "00_parent.ipynb").is_file()


def test_module_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "puzzlelib", "run", "--preset", "nope",
                        "--repo-root", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "Available presets" in r.stderr


# ---- live progress (progress.py) ----------------------------------------------------------------
def test_latest_line_keeps_the_last_redraw_of_a_bar():
    from puzzlelib.progress import latest_line

    chunk = "\rtrain:  10%|#  | 1/10 [00:01<00:09]\rtrain:  20%|## | 2/10 [00:02<00:08, loss=3.2]"
    assert latest_line(chunk) == "train:  20%|## | 2/10 [00:02<00:08, loss=3.2]"
    assert latest_line("done\n") == "done"
    assert latest_line("\x1b[31mred\x1b[0m text\n\n") == "red text"  # colours stripped
    assert latest_line("\r          \r") is None  # a leave=False bar erasing itself
    assert latest_line("") is None


def test_display_on_a_terminal_redraws_one_line_in_place():
    import io

    from puzzlelib.progress import ProgressDisplay

    out = io.StringIO()
    d = ProgressDisplay("[1/7] 00_parent", out, tty=True, width=60, now=0.0)
    d.tick(now=1.0)
    assert out.getvalue() == "\r[1/7] 00_parent 0:01 starting the kernel\x1b[K"
    d.event({"cell": 4, "cells": 27})
    d.event({"line": "parent training:  45%|####5     | 900/2000 [01:23<01:40, 10.8step/s]"})
    d.tick(now=83.0)
    drawn = out.getvalue().split("\r")[-1]
    # cut to one column short of the width, so that it never wraps (which breaks "\r")
    assert drawn == "[1/7] 00_parent 1:23 cell 4/27 | parent training:  45%|###…\x1b[K"
    assert len(drawn) - len("\x1b[K") == 59
    before = out.getvalue()
    d.tick(now=83.4)  # same second, same content: nothing written
    assert out.getvalue() == before
    d.text("a warning from the kernel\n")  # printed above the line: the line is erased first
    assert out.getvalue()[len(before):] == "\r\x1b[Ka warning from the kernel\n"
    d.close()
    assert "\n" not in out.getvalue().replace("a warning from the kernel\n", "")


def test_display_in_a_log_prints_full_lines_at_most_every_interval():
    import io

    from puzzlelib.progress import ProgressDisplay

    out = io.StringIO()
    d = ProgressDisplay("[2/7] 02_bld", out, tty=False, interval=30, now=0.0)
    for t in range(0, 200):  # a bar redrawn every second for 200 s
        d.event({"cell": 9, "cells": 31, "line": f"BLD: {t // 20}0%|"})
        d.tick(now=float(t))
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert out.getvalue().endswith("\n")
    assert lines[0] == "[2/7] 02_bld 0:30 cell 9/31 | BLD: 10%|"
    assert 5 <= len(lines) <= 7  # ~200 s / 30 s, not 200
    d.tick(now=1000.0)  # nothing new since the last line: nothing printed
    assert len(out.getvalue().splitlines()) == len(lines)


def test_summary_line_takes_the_key_numbers_from_the_manifest():
    import datetime

    from puzzlelib.progress import summary_line

    started = datetime.datetime(2026, 1, 1, 12, 0, 0, 500000, tzinfo=datetime.timezone.utc)
    m = {"stage": "00_parent", "status": "done", "finished": "2026-01-01T12:10:00+00:00",
         "metrics": {"heldout_loss": 2.3456, "heldout_perplexity": 10.44,
                     "train_tokens_per_second": 3210.0}}
    assert summary_line("[1/7] 00_parent", 600.04, m, started) == (
        "[1/7] 00_parent: done in 600.0 s: held-out loss 2.346 (perplexity 10.4), 3.2 k tokens/s")
    reused = {**m, "finished": "2025-12-31T09:00:00+00:00"}
    assert "(reused the stage built 2025-12-31T09:00:00+00:00)" in summary_line("h", 4.0, reused, started)
    same_second = {**m, "finished": "2026-01-01T12:00:00+00:00"}  # built in this run's first second
    assert "reused" not in summary_line("h", 0.4, same_second, started)
    ev = {"stage": "06_evaluation", "status": "done", "finished": m["finished"],
          "metrics": {"model": "puzzle-1", "retention": 1.006, "measured_speedup": 2.104}}
    assert summary_line("[7/7] 06_evaluation", 84.0, ev, started).endswith(
        "puzzle-1: 100.6 % of the parent's accuracy at 2.10× its speed")
    assert summary_line("h", 1.0, None, started) == "h: done in 1.0 s"


def test_stream_tap_sends_the_latest_line_and_the_cell_over_a_pipe():
    from types import SimpleNamespace

    from puzzlelib.progress import ProgressSender, StreamTap

    r, w = os.pipe()
    sender = ProgressSender(w)
    sender.on_notebook_start(notebook=SimpleNamespace(cells=[1, 2, 3]))
    sender.on_cell_start(cell=None, cell_index=1)
    StreamTap(sender).write("\rstep 1/9\rstep 2/9")
    StreamTap(sender).write("\r   \r")  # blank: nothing sent
    os.close(w)
    with os.fdopen(r) as f:
        assert [json.loads(x) for x in f] == [{"cell": 2, "cells": 3}, {"line": "step 2/9"}]
    sender.send(line="after the reader left")  # a closed pipe silences it, never raises
    assert sender.fd is None


PROGRESS_BODY = """
import time
from tqdm import tqdm
from puzzlelib.core.config import RunConfig
from puzzlelib.core.rundir import RunDir
rd = RunDir(RunConfig.from_preset(preset, overrides, run_name))
with rd.stage("00_parent") as st:
    for i in tqdm(range(12), desc="parent training", unit="step"):
        time.sleep(0.25)
    st.metrics.update(heldout_loss=2.5, heldout_perplexity=12.18, train_tokens_per_second=4000)
"""


def test_headless_run_shows_the_stage_progress_and_a_summary(repo):
    """One real notebook run, output not a terminal (as in CI): the kernel's tqdm bar reaches the
    runner's output as whole lines (no carriage returns, no papermill cell markers), then the
    stage's one-line result with the numbers from its manifest."""
    write_nb(repo / "notebooks" / "00_parent.ipynb", PROGRESS_BODY)
    env = {**os.environ, "PUZZLELIB_PROGRESS_SECONDS": "0.5", "TQDM_MININTERVAL": "0.5"}
    r = subprocess.run([sys.executable, "-m", "puzzlelib", "run", "--preset", "smoke", "--run-name",
                        "live", "--stages", "00", "--repo-root", str(repo)], env=env, text=True,
                       capture_output=True, timeout=300, check=False)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    bars = [ln for ln in out.splitlines() if ln.startswith("[1/1] 00_parent ") and "parent training:" in ln]
    assert bars, out
    assert all(" cell 3/3 | parent training: " in ln for ln in bars), bars
    assert any(re.search(r"\d+/12 \[[0-9:]+<[0-9:]+, +[0-9.]+step/s\]", ln) for ln in bars), bars
    assert "\r" not in out and "Executing Cell" not in out and "Executing:" not in out
    assert "[1/1] 00_parent: done in " in out
    assert ": held-out loss 2.500 (perplexity 12.2), 4.0 k tokens/s" in out


def test_hub_ids_go_online_unless_the_user_said_otherwise(tmp_path):
    """The embedded path stays offline; a parent hub id or an hf: corpus goes online (said in one
    line) when HF_HUB_OFFLINE is unset; a HF_HUB_OFFLINE the user set always wins."""
    from puzzlelib.runner import hub_access

    (tmp_path / "local-llama").mkdir()
    smoke = RunConfig.from_preset("smoke")
    assert hub_access(smoke, tmp_path, {}) == (False, None)
    hub = smoke.replace(parent="meta-llama/Llama-3.2-1B")
    online, note = hub_access(hub, tmp_path, {})
    assert online and note == ("puzzlelib: parent 'meta-llama/Llama-3.2-1B' comes from the Hugging "
                               "Face hub: the notebooks may download (set HF_HUB_OFFLINE=1 to use "
                               "only what is cached)")
    assert hub_access(hub, tmp_path, {"HF_HUB_OFFLINE": "1"}) == (False, None)
    assert hub_access(smoke.replace(corpus="hf:wikitext:wikitext-2-raw-v1"), tmp_path, {})[0]
    # local folders, GGUF files and named parents (fetched once, then offline) stay offline
    for local in ("local-llama", str(tmp_path / "local-llama"), "./x", "/models/a/b", "m.gguf",
                  "smollm2-135m"):
        assert hub_access(smoke.replace(parent=local), tmp_path, {}) == (False, None), local
    # what the kernel then gets
    assert "HF_HUB_OFFLINE" not in kernel_env(tmp_path, {}, online=True)
    assert kernel_env(tmp_path, {}, online=False)["HF_HUB_OFFLINE"] == "1"
