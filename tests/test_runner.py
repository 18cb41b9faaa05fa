"""Runner / CLI: exit codes, stage selection, and tiny throwaway notebooks run through papermill."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

import puzzlelib
from puzzlelib.config import RunConfig
from puzzlelib.rundir import RunDir
from puzzlelib.runner import UsageError, kernel_env, main, parse_stages

PARAMS = "run_name = 'default'\npreset = 'default'\noverrides = {}"
# A real stage in miniature: resolve the config exactly as the real notebooks do, write through
# RunDir, and record what the kernel saw (parameters, cwd, environment).
STAGE_BODY = """
import json, os
from pathlib import Path
from puzzlelib.config import RunConfig
from puzzlelib.rundir import RunDir
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
    env = kernel_env(tmp_path, base={"HF_HUB_OFFLINE": "0", "PYTHONPATH": "/x"})
    assert env["HF_HUB_OFFLINE"] == "0"  # explicitly set by the user: kept
    assert env["TRANSFORMERS_OFFLINE"] == "1" and env["TOKENIZERS_PARALLELISM"] == "false"
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
