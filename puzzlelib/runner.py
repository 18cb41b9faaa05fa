"""Pipeline runner: execute the stage notebooks headlessly with papermill; write reports/.

    python -m puzzlelib run --preset smoke [--run-name N] [--stages 00-03|00,02|all]
                            [--set key=value ...] [--force] [--log-output]
    python -m puzzlelib show-config --preset smoke [--set key=value ...] [--json]
    python -m puzzlelib status --run-name smoke

What it does: resolves and validates the RunConfig first (a bad preset, key or value exits with
code 2 before any notebook starts or any report file is written), then runs
`notebooks/<stage>.ipynb` in stage order, each with the same parameters (run_name, preset,
overrides), and writes `reports/<run_name>/<stage>.ipynb` + `.html` and a `pipeline.json`
summary. It stops at the first failing notebook, prints the failing cell's error, and exits 1.

Each notebook runs in a child process (papermill + a fresh kernel) with an environment that keeps
everything inside the repo and offline: HF_*_OFFLINE=1, HF_HOME / Jupyter / IPython / matplotlib
dirs under <repo>/.cache (each only when not already set, so `HF_HUB_OFFLINE=0 python -m puzzlelib
...` still works on a machine with network). A child process, rather than papermill in this
process, is how the environment reaches the kernel without mutating this process's os.environ.

Reads: notebooks/*.ipynb, runs/<run_name>/ (for `status` and the upstream pre-check).
Writes: reports/<run_name>/ only, and holds runs/<run_name>/.locks/pipeline.lock while it runs (a
second runner on the same run name is refused instead of overwriting the reports; the stage locks
of rundir.py guard the artifacts); the notebooks themselves write runs/<run_name>/.
Leaves out: every algorithm. This is a thin layer over config.py and rundir.py, on purpose: it
must run (and fail clearly) without torch or any stage module.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


from .config import PRESETS, ConfigError, RunConfig, parse_set_args, project_root
from .rundir import (NOTEBOOKS, STAGES, UPSTREAM, RunDir, atomic_write_json, atomic_write_text,
                     try_lock)

KERNEL_NAME = "python3"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_PACKAGE_PARENT = Path(__file__).resolve().parent.parent


class UsageError(ValueError):
    """Bad command-line input other than the config itself (stages, missing notebooks, ...)."""


class RunLocked(RuntimeError):
    """Another process is running the pipeline for the same run name (exit code 3)."""


# Next to the stage locks of rundir.py, not in reports/ (which is committed for the default run).
PIPELINE_LOCK = Path(".locks") / "pipeline.lock"


@dataclass
class StageResult:
    stage: str
    status: str  # "ok" | "error" (a cell raised) | "crash" (kernel/papermill died) | "skipped"
    seconds: float = 0.0
    notebook: str | None = None
    html: str | None = None
    error: dict[str, Any] | None = None


@dataclass
class PipelineResult:
    exit_code: int
    report_dir: Path | None
    stages: list[StageResult] = field(default_factory=list)


# ---- inputs -------------------------------------------------------------------------------------
def default_repo_root() -> Path:
    """The project folder (config.project_root: the one holding notebooks/, also from inside
    notebooks/ or student/), else the checkout this package lives in."""
    root = project_root()
    return root if (root / "notebooks").is_dir() else _PACKAGE_PARENT


def parse_stages(spec: str) -> list[str]:
    """'all' | '00-03' | '00,02' | '2' | '02_bld' | 'bld' -> stage names in pipeline order."""
    spec = spec.strip()
    if spec.lower() in ("all", ""):
        return list(STAGES)
    chosen: set[str] = set()
    for part in spec.split(","):
        part = part.strip()
        if "-" in part:
            a, b = (_stage_index(x, spec) for x in part.split("-", 1))
            if a > b:
                raise UsageError(f"--stages {spec!r}: range {part!r} runs backwards; write it "
                                 f"low-high, e.g. {STAGES[b][:2]}-{STAGES[a][:2]}")
            chosen.update(STAGES[a:b + 1])
        else:
            chosen.add(STAGES[_stage_index(part, spec)])
    return [s for s in STAGES if s in chosen]


def _stage_index(token: str, spec: str) -> int:
    token = token.strip().lower()
    for i, s in enumerate(STAGES):
        if token in (s, s[3:]) or (token.isdigit() and int(token) == i):
            return i
    raise UsageError(f"--stages {spec!r}: unknown stage {token!r}. Use numbers "
                     f"00-{len(STAGES) - 1:02d}, ranges (00-03), lists (00,02), names "
                     f"({', '.join(STAGES)}) or all")


def kernel_env(repo_root: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the notebook process and its kernel: offline, caches under <repo>/.cache."""
    env = dict(os.environ if base is None else base)
    cache = repo_root / ".cache"
    defaults = {
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(cache / "hf"),
        "JUPYTER_CONFIG_DIR": str(cache / "jupyter" / "config"),
        "JUPYTER_DATA_DIR": str(cache / "jupyter" / "data"),
        # Kernel connection files go to the runtime dir, by default under ~.
        "JUPYTER_RUNTIME_DIR": str(cache / "jupyter" / "runtime"),
        "JUPYTER_PLATFORM_DIRS": "1",  # silences jupyter_core's path-migration warning
        "IPYTHONDIR": str(cache / "ipython"),
        "MPLCONFIGDIR": str(cache / "matplotlib"),
        "TOKENIZERS_PARALLELISM": "false",  # tokenizers + fork warns and may deadlock
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",  # silences the kernel debugger's frozen-modules note
        # A saved notebook keeps every progress-bar redraw as text: redraw at most every 10 s so
        # the report shows the progress, not thousands of lines of it.
        "TQDM_MININTERVAL": "10",
        # Libraries the kit imports (huggingface_hub, lm-eval) use tqdm.auto, which warns in every
        # notebook that ipywidgets is missing; the kit's own bars are plain text on purpose.
        "PYTHONWARNINGS": "ignore:IProgress not found",
    }
    for k, v in defaults.items():
        env.setdefault(k, v)
    # The child process and the kernel import the same puzzlelib as this process, installed or not.
    paths = [str(_PACKAGE_PARENT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _resolve(repo_root: Path, p: str) -> Path:
    return Path(p) if Path(p).is_absolute() else repo_root / p


def _check_corpus(cfg: RunConfig, repo_root: Path) -> None:
    """config.py cannot check a local corpus path: only here is the notebooks' cwd known."""
    if cfg.corpus != "stdlib" and not cfg.corpus.startswith("hf:"):
        path = _resolve(repo_root, cfg.corpus)
        if not path.exists():
            raise ConfigError(f"corpus {cfg.corpus!r} does not exist (looked for {path}; relative "
                              "paths are resolved against the repo root, where notebooks run)")
        if path.is_file() and path.stat().st_size == 0:
            raise ConfigError(f"corpus {cfg.corpus!r} is an empty file ({path}): point corpus at "
                              "a .txt/.jsonl file or folder with text, or use corpus=stdlib")


def _check_parent(cfg: RunConfig, repo_root: Path) -> None:
    """A local parent directory is checked here (files, architecture, positions, pickle-only
    weights) so a bad one fails before anything is written; a hub id is left to stage 00."""
    if cfg.parent == "embedded":
        return
    path = _resolve(repo_root, os.path.expanduser(cfg.parent))
    # A hub id is "name" or "org/name"; anything else that does not exist is a mistyped path.
    path_like = cfg.parent.startswith(("/", ".", "~")) or cfg.parent.count("/") > 1
    if not path.exists():
        if path_like:
            raise ConfigError(f"parent {cfg.parent!r}: no such directory ({path}); set parent to a "
                              "local Hugging Face model folder, a hub id or 'embedded'")
        return
    from .model import ParentError, check_parent_dir  # imports torch: only for local parents

    try:
        check_parent_dir(path, cfg.seq_len)
    except ParentError as e:
        raise ConfigError(f"parent {cfg.parent!r}: {e}") from None


def _check_writable(name: str, value: str, repo_root: Path) -> None:
    """runs_root / reports_root must be (or be creatable in) a writable folder. Probed with a
    nameless temp file in the nearest existing folder, so the check itself leaves nothing."""
    path = _resolve(repo_root, value)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{name} {value!r}: {probe} is a file, not a folder; set {name} to a "
                          "folder path (it is created if missing)")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ConfigError(f"{name} {value!r}: cannot write in {probe} ({e.strerror or e}); set "
                          f"{name} to a writable folder") from None


def _check_upstream(cfg: RunConfig, repo_root: Path, will_run: list[str]) -> None:
    """Every stage read by a stage we run must either run too or already be fresh."""
    rd = RunDir(cfg.replace(runs_root=str(_resolve(repo_root, cfg.runs_root))), create=False)
    for s in will_run:
        for u in UPSTREAM[s]:
            if u in will_run:
                continue
            state, reason = rd.state(u)
            if state != "fresh":
                need = sorted({u, *will_run}, key=STAGES.index)
                raise UsageError(
                    f"stage {s} reads {u}, which is not part of this run and is not ready "
                    f"(status: {state}{': ' + reason if reason else ''}). Include it, e.g. "
                    f"--stages {','.join(x[:2] for x in need)}")


# ---- running ------------------------------------------------------------------------------------
def run_pipeline(
    preset: str = "default",
    *,
    run_name: str | None = None,
    stages: str = "all",
    overrides: dict[str, Any] | None = None,
    force: bool = False,
    repo_root: str | Path | None = None,
    notebooks_dir: str | Path | None = None,
    log_output: bool = False,
    kernel_name: str = KERNEL_NAME,
    echo: Callable[[str], None] = lambda s: print(s, flush=True),
) -> PipelineResult:
    """Validate, then run the selected notebooks in order. Raises ConfigError / UsageError for bad
    input (nothing has been written then) and RunLocked when another process is running the same
    run name; returns exit_code 0 (all ok) or 1 (a notebook failed)."""
    overrides = dict(overrides or {})
    if force:
        overrides["force"] = True
    cfg = RunConfig.from_preset(preset, overrides, run_name)  # raises ConfigError
    if cfg.trust_remote_code and cfg.parent != "embedded":  # said first, whatever fails next
        echo(f"puzzlelib: WARNING: trust_remote_code=true: Python files shipped with parent "
             f"{cfg.parent!r} will run with your permissions; use it only for sources you trust")
    selected = parse_stages(stages)  # raises UsageError
    repo_root = Path(repo_root or default_repo_root()).resolve()
    _check_corpus(cfg, repo_root)
    for name in ("runs_root", "reports_root"):
        _check_writable(name, getattr(cfg, name), repo_root)
    nb_dir = Path(notebooks_dir).resolve() if notebooks_dir else repo_root / "notebooks"
    found = [(s, nb_dir / Path(NOTEBOOKS[s]).name) for s in selected]
    missing = [s for s, p in found if not p.is_file()]
    todo = [(s, p) for s, p in found if p.is_file()]
    if not todo:
        raise UsageError(f"no notebook to run: none of {', '.join(selected)} exists in {nb_dir}")
    _check_upstream(cfg, repo_root, [s for s, _ in todo])
    if "00_parent" in selected:
        _check_parent(cfg, repo_root)

    report_dir = _resolve(repo_root, cfg.reports_root) / cfg.run_name
    report_dir.mkdir(parents=True, exist_ok=True)
    # One runner per run name: a second one would overwrite the executed notebooks and
    # pipeline.json under the first one's feet (the stage locks already guard runs/<run>/). The
    # OS drops the lock when its holder dies, even by SIGKILL, so a killed run never blocks a rerun.
    lock = try_lock(_resolve(repo_root, cfg.runs_root) / cfg.run_name / PIPELINE_LOCK,
                    lambda path: RunLocked(
                        f"another process is running the pipeline for run {cfg.run_name!r} (lock "
                        f"file {path}); wait for it to finish or use another --run-name"))
    try:
        return _run_locked(cfg, preset, overrides, todo, missing, report_dir, repo_root, log_output,
                           kernel_name, echo)
    finally:
        lock.release()


def _run_locked(cfg: RunConfig, preset: str, overrides: dict[str, Any], todo: list, missing: list,
                report_dir: Path, repo_root: Path, log_output: bool, kernel_name: str,
                echo: Callable[[str], None]) -> PipelineResult:
    env = kernel_env(repo_root)
    for k in ("HF_HOME", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "MPLCONFIGDIR"):
        Path(env[k]).mkdir(parents=True, exist_ok=True)
    params = {"run_name": cfg.run_name, "preset": preset, "overrides": overrides}
    summary: dict[str, Any] = {"run_name": cfg.run_name, "preset": preset, "overrides": overrides,
                               "config": cfg.to_dict(), "stages": []}
    result = PipelineResult(exit_code=0, report_dir=report_dir)
    echo(f"puzzlelib: run {cfg.run_name!r} (preset {preset}), {len(todo)} notebook(s), "
         f"reports -> {report_dir}")
    if missing:
        echo(f"  note: no notebook yet for {', '.join(missing)}; skipped")
        result.stages += [StageResult(s, "skipped") for s in missing]

    for i, (stage, nb_path) in enumerate(todo, 1):
        echo(f"[{i}/{len(todo)}] {stage}: executing {nb_path}")
        r = _execute(stage, nb_path, report_dir, params, repo_root, env, log_output, kernel_name)
        result.stages.append(r)
        summary["stages"].append(vars(r))
        atomic_write_json(report_dir / "pipeline.json", summary)
        if r.status == "ok":
            echo(f"[{i}/{len(todo)}] {stage}: done in {r.seconds:.1f} s -> {r.html or r.notebook}")
            continue
        echo(_format_failure(r, i, len(todo)))
        result.exit_code = 1
        break
    if result.exit_code == 0:
        # The one-page overview (docs/how_puzzle_works.md) of whatever this run has finished.
        from .overview import write_pipeline_figure

        write_pipeline_figure(_resolve(repo_root, cfg.runs_root) / cfg.run_name,
                              report_dir / "pipeline.png")
        echo(f"puzzlelib: all done. Reports in {report_dir}")
    return result


def _execute(stage: str, nb_path: Path, report_dir: Path, params: dict, repo_root: Path,
             env: dict[str, str], log_output: bool, kernel_name: str) -> StageResult:
    """Run one notebook in a child process (see module doc) and collect its result."""
    out_nb, out_html = report_dir / f"{stage}.ipynb", report_dir / f"{stage}.html"
    with tempfile.TemporaryDirectory(prefix="puzzlelib-run-") as tmp:
        spec = {"input": str(nb_path), "output": str(out_nb), "html": str(out_html),
                "parameters": params, "cwd": str(repo_root), "kernel_name": kernel_name,
                "log_output": log_output, "result": str(Path(tmp) / "result.json")}
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        code = "import sys; from puzzlelib.runner import _child; sys.exit(_child(sys.argv[1]))"
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", code, str(spec_path)], env=env,
                                cwd=repo_root)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            # The terminal sent SIGINT to the child too; give papermill time to stop the kernel.
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        seconds = time.perf_counter() - t0
        result_path = Path(spec["result"])
        if rc != 0 or not result_path.is_file():
            return StageResult(stage, "crash", seconds, error={
                "ename": "RunnerCrash", "evalue": f"the notebook process exited with code {rc} "
                "(killed? out of memory?) before reporting a result", "traceback": []})
        res = json.loads(result_path.read_text())
    return StageResult(stage, res["status"], seconds,
                       notebook=str(out_nb) if out_nb.is_file() else None,
                       html=str(out_html) if out_html.is_file() else None,
                       error=res.get("error"))


def _format_failure(r: StageResult, i: int, n: int) -> str:
    err = r.error or {}
    where = ""
    if err.get("cell_index") is not None:  # papermill counts its injected-parameters cell too
        where = f" in cell #{err['cell_index']} (In [{err.get('exec_count')}])"
    lines = [f"[{i}/{n}] {r.stage}: FAILED after {r.seconds:.1f} s{where}",
             f"  {err.get('ename', 'Error')}: {err.get('evalue', '')}"]
    if re.search(r"No space left|File too large|Disk quota|Errno (28|27|122)\b", str(err.get("evalue"))):
        lines.append("  hint: the disk looks full: free disk space, or set runs_root / reports_root "
                     "to a folder on a disk with room")
    tb = [ln for ln in err.get("traceback", []) if ln.strip()][-15:]
    if tb:
        lines.append("  traceback (last lines):")
        lines += ["    " + ln for ln in tb]
    if r.notebook:
        lines.append(f"  executed notebook with the error: {r.html or r.notebook}")
    lines.append("puzzlelib: stopped; later stages were not run.")
    return "\n".join(lines)


def _child(spec_path: str) -> int:
    """Runs in the child process: papermill, then the HTML export, then a result file."""
    import logging

    import nbformat
    import papermill as pm
    from nbconvert import HTMLExporter
    from papermill.exceptions import PapermillExecutionError

    spec = json.loads(Path(spec_path).read_text())
    if spec["log_output"]:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    out = Path(spec["output"])
    # papermill saves after every cell: run into a hidden file so reports/ never holds a
    # half-executed notebook under the final name.
    running = out.with_name(f".{out.stem}.running.ipynb")
    result: dict[str, Any] = {"status": "ok"}
    # The kernel's own log is infrastructure noise (a TCP-without-encryption warning, and a
    # "KeyboardInterrupt caught in kernel" when jupyter_client's shutdown SIGINT races a
    # handler); cell errors are in the notebook either way. --log-output keeps it for debugging.
    quiet = [] if spec["log_output"] else ["--IPKernelApp.log_level=CRITICAL"]
    try:
        pm.execute_notebook(spec["input"], str(running), parameters=spec["parameters"],
                            kernel_name=spec["kernel_name"], cwd=spec["cwd"], progress_bar=True,
                            log_output=spec["log_output"], start_timeout=120,
                            extra_arguments=quiet)
    except PapermillExecutionError as e:
        result = {"status": "error", "error": {
            "ename": e.ename, "evalue": e.evalue, "cell_index": e.cell_index,
            "exec_count": e.exec_count, "traceback": _clean_tb(e.traceback)}}
    except Exception as e:  # kernel died, bad notebook JSON, kernel not found, ...
        result = {"status": "crash", "error": {
            "ename": type(e).__name__, "evalue": str(e),
            "traceback": traceback.format_exc().splitlines()}}
    if running.exists():
        os.replace(running, out)
        try:
            body, _ = HTMLExporter().from_notebook_node(nbformat.read(out, as_version=4))
            atomic_write_text(out.with_suffix(".html"), body)
        except Exception as e:  # the .ipynb is still there; say why the html is not
            result["html_error"] = f"{type(e).__name__}: {e}"
            print(f"puzzlelib: HTML export failed: {e}", file=sys.stderr)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def _clean_tb(tb: Any) -> list[str]:
    lines = "\n".join(tb if isinstance(tb, list) else [str(tb)])
    return _ANSI.sub("", lines).splitlines()


# ---- CLI ----------------------------------------------------------------------------------------
def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m puzzlelib", description="Puzzle NAS research kit")
    sub = ap.add_subparsers(dest="command", required=True)

    def config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--preset", default="default", help=f"one of: {', '.join(PRESETS)}")
        p.add_argument("--run-name", default=None, help="run folder name (default: the preset)")
        p.add_argument("--set", dest="sets", action="extend", nargs="+", default=[],
                       metavar="KEY=VALUE", help="override config fields, e.g. --set seq_len=128")

    run = sub.add_parser("run", help="execute the notebooks with papermill into reports/")
    config_args(run)
    run.add_argument("--stages", default="all", help="all | 00-03 | 00,02 | 02_bld (default all)")
    run.add_argument("--force", action="store_true", help="recompute stages even if fresh")
    run.add_argument("--log-output", action="store_true", help="stream cell output to the terminal")
    run.add_argument("--repo-root", default=None, help="repo holding notebooks/ (default: here)")
    run.add_argument("--notebooks-dir", default=None, help="default: <repo-root>/notebooks")
    show = sub.add_parser("show-config", help="print the resolved config")
    config_args(show)
    show.add_argument("--json", action="store_true", help="print JSON instead of the table")
    status = sub.add_parser("status", help="print each stage's status for a run")
    status.add_argument("--run-name", required=True)
    status.add_argument("--runs-root", default=None, help="default: <repo>/runs")
    figure = sub.add_parser("figure", help="draw the one-page pipeline figure of a run as a PNG")
    figure.add_argument("--run-name", required=True)
    figure.add_argument("--runs-root", default=None, help="default: <repo>/runs")
    figure.add_argument("--out", default=None, help="default: reports/<run_name>/pipeline.png")
    # Listed here for --help; __main__ hands `student` to student.main, which has its own options.
    sub.add_parser("student", help="write student copies of the notebooks (see: student --help)",
                   add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    """CLI entry point. Exit codes: 0 ok, 1 a notebook failed, 2 bad input, 3 another process is
    running this run name, 130 interrupted."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "show-config":
            cfg = RunConfig.from_preset(args.preset, parse_set_args(args.sets), args.run_name)
            print(json.dumps(cfg.to_dict(), indent=2) if args.json else cfg.summary())
            return 0
        if args.command == "status":
            return _status(args.run_name, args.runs_root)
        if args.command == "figure":
            return _figure(args.run_name, args.runs_root, args.out)
        if args.command == "student":
            from .student import main as student_main

            return student_main([])
        res = run_pipeline(args.preset, run_name=args.run_name, stages=args.stages,
                           overrides=parse_set_args(args.sets), force=args.force,
                           repo_root=args.repo_root, notebooks_dir=args.notebooks_dir,
                           log_output=args.log_output)
        return res.exit_code
    except (ConfigError, UsageError) as e:
        print(f"puzzlelib: error: {e}", file=sys.stderr)
        return 2
    except RunLocked as e:
        print(f"puzzlelib: refused: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("puzzlelib: interrupted", file=sys.stderr)
        return 130


def _figure(run_name: str, runs_root: str | None, out: str | None) -> int:
    from .overview import write_pipeline_figure

    root = default_repo_root()
    run_dir = (_resolve(root, runs_root) if runs_root else root / "runs") / run_name
    if not run_dir.is_dir():
        raise UsageError(f"no run named {run_name!r} in {run_dir.parent}: run the pipeline first "
                         f"(python -m puzzlelib run --run-name {run_name})")
    path = write_pipeline_figure(run_dir, _resolve(root, out) if out else
                                 root / "reports" / run_name / "pipeline.png")
    print(f"puzzlelib: wrote {path}")
    return 0


def _status(run_name: str, runs_root: str | None) -> int:
    root = Path(runs_root) if runs_root else default_repo_root() / "runs"
    try:
        rd = RunDir.existing(run_name, root)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    print(f"run {run_name!r} (preset {rd.cfg.preset}) at {rd.root}")
    for stage, state, reason in rd.describe():
        m = rd.manifest(stage) or {}
        when = f"{m.get('finished')} ({m.get('seconds')} s)" if state == "fresh" else ""
        print(f"  {stage:<14} {state:<12} {reason or when}")
    return 0
