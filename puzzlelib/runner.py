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

While a notebook runs, one live line shows the stage's own progress (the cell, the latest tqdm bar
or printed line of the kernel; progress.py), redrawn in place on a terminal and printed at most
every 30 s elsewhere; a finished stage prints one line with its time and key numbers. `--log-output`
streams every cell output instead (papermill's log, with its cell markers).

Each notebook runs in a child process (papermill + a fresh kernel) with an environment that keeps
everything inside the repo: HF_HOME / Jupyter / IPython / matplotlib dirs under <repo>/.cache, each
only when not already set. The hub: offline (HF_*_OFFLINE=1) unless the config asks for a hub id
(a parent like meta-llama/Llama-3.2-1B, an hf: corpus) and HF_HUB_OFFLINE is not set, then online,
said in one line; an HF_HUB_OFFLINE the user set always wins. A child process, rather than
papermill in this process, is how the environment reaches the kernel without mutating this
process's os.environ.

Signals: Ctrl-C, SIGTERM (timeout, kill, a batch scheduler) and SIGHUP stop the whole tree the
same way: the notebook process gets one SIGINT (papermill stops the kernel and saves the notebook
so far), whatever is left after a grace period is killed, and only then is the pipeline lock
released; the stage reads "interrupted" and the runner exits 130 / 143 / 129 with one line.

Reads: notebooks/*.ipynb, runs/<run_name>/ (for `status`, `figure` and the upstream pre-check;
every command takes a validated run name and reads exactly the folder it names).
Writes: reports/<run_name>/ only, and holds runs/<run_name>/.locks/pipeline.lock while it runs (a
second runner on the same run name is refused instead of overwriting the reports; the stage locks
of rundir.py guard the artifacts); the notebooks themselves write runs/<run_name>/.
Leaves out: every algorithm. This is a thin layer over config.py and rundir.py, on purpose: it
must run (and fail clearly) without torch or any stage module.
"""

import argparse
import datetime
import errno
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


from .core.presets import PRESETS
from .core.config import ConfigError, RunConfig, default_repo_root, parse_set_args
from .progress import ProgressDisplay, ProgressSender, StreamTap, summary_line
from .core.rundir import NOTEBOOKS, STAGES, UPSTREAM, RunDir, try_lock
from .core.atomic import atomic_write_json, atomic_write_text
from .core.validation import RUN_NAME_PATTERN

KERNEL_NAME = "python3"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_PACKAGE_PARENT = Path(__file__).resolve().parent.parent


class UsageError(ValueError):
    """Bad command-line input other than the config itself (stages, missing notebooks, ...)."""


class RunLocked(RuntimeError):
    """Another process is running the pipeline for the same run name (exit code 3)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP, raised in the main thread by the CLI's handler: a KeyboardInterrupt, so
    every path that cleans up after Ctrl-C cleans up after these too."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Interrupted(KeyboardInterrupt):
    """A notebook was stopped by a signal; its process tree is gone when this is raised."""

    def __init__(self, signum: int, result: "StageResult"):
        super().__init__(f"{signal.Signals(signum).name} during {result.stage}")
        self.signum, self.stage, self.result = signum, result.stage, result


# How long the notebook process may take to stop its kernel and save the notebook after SIGINT.
STOP_GRACE_SECONDS = 20.0


# Next to the stage locks of rundir.py, not in reports/ (which is committed for the default run).
PIPELINE_LOCK = Path(".locks") / "pipeline.lock"


@dataclass
class StageResult:
    stage: str
    # "ok" | "error" (a cell raised) | "crash" (kernel/papermill died) | "skipped" |
    # "interrupted" (Ctrl-C, SIGTERM)
    status: str
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


_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def kernel_env(repo_root: Path, base: dict[str, str] | None = None,
               online: bool = False) -> dict[str, str]:
    """Environment for the notebook process and its kernel: caches under <repo>/.cache, and the
    hub offline unless `online` (see hub_access). A HF_HUB_OFFLINE the user set is kept and the
    other two offline switches follow it, so `HF_HUB_OFFLINE=0` means online for all three."""
    env = dict(os.environ if base is None else base)
    cache = repo_root / ".cache"
    user = env.get("HF_HUB_OFFLINE")
    offline = {} if online else {k: user if user is not None else "1" for k in _OFFLINE_VARS}
    defaults = {
        **offline,
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


def _is_hub_id(parent: str, repo_root: Path) -> bool:
    """'org/name' or 'name' that is not a local folder (a path starts with / . ~ or has 2+ '/'),
    a .gguf file or a named parent (parent/source.py: those work offline once fetched)."""
    from .parent.source import NAMED_PARENTS  # no torch at import

    if (parent == "embedded" or parent.startswith(("/", ".", "~")) or parent.count("/") > 1
            or parent.lower().endswith(".gguf") or parent in NAMED_PARENTS):
        return False
    return not _resolve(repo_root, os.path.expanduser(parent)).exists()


def hub_access(cfg: RunConfig, repo_root: Path,
               environ: dict[str, str] | None = None) -> tuple[bool, str | None]:
    """(online, the line to say): online when the config names something on the hub (a parent hub
    id, an hf: corpus) and the user has not set HF_HUB_OFFLINE; the embedded path stays offline."""
    environ = os.environ if environ is None else environ
    wants = []
    if _is_hub_id(cfg.parent, repo_root):
        wants.append(f"parent {cfg.parent!r}")
    if cfg.corpus.startswith("hf:"):
        wants.append(f"corpus {cfg.corpus!r}")
    if not wants or "HF_HUB_OFFLINE" in environ:
        return False, None
    return True, (f"puzzlelib: {' and '.join(wants)} come{'s' if len(wants) == 1 else ''} from the "
                  "Hugging Face hub: the notebooks may download (set HF_HUB_OFFLINE=1 to use only "
                  "what is cached)")


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
    from .parent.source import NAMED_PARENTS, ParentSourceError, check  # no torch at import

    if cfg.parent.lower().endswith(".gguf") or cfg.parent in NAMED_PARENTS:
        # A GGUF file (header only) or a named real parent (cached? else: the command to run).
        gguf = cfg.parent.lower().endswith(".gguf")
        try:
            check(str(_resolve(repo_root, os.path.expanduser(cfg.parent))) if gguf else cfg.parent,
                  cfg.seq_len, cache_dir=repo_root / ".cache" / "parents",
                  hf_home=kernel_env(repo_root)["HF_HOME"])  # the HF cache the notebooks see
        except ParentSourceError as e:
            raise ConfigError(f"parent {cfg.parent!r}: {e}") from None
        return
    path = _resolve(repo_root, os.path.expanduser(cfg.parent))
    # A hub id is "name" or "org/name"; anything else that does not exist is a mistyped path.
    if _is_hub_id(cfg.parent, repo_root):
        return
    if not path.exists():
        raise ConfigError(f"parent {cfg.parent!r}: no such directory ({path}); set parent to a "
                          "local Hugging Face model folder, a hub id or 'embedded'")
    from .core.model import ParentError, check_parent_dir  # imports torch: only for local parents

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


def check_run_name(name: str) -> str:
    """The rule `run` applies (validation.py), for every command that takes --run-name: the name
    becomes a folder under runs/ and reports/, so no separators, no '..', no leading dot."""
    if not re.fullmatch(RUN_NAME_PATTERN, name or ""):
        raise UsageError(f"run_name {name!r} is not a safe folder name: use 1-64 of A-Z a-z 0-9 . "
                         "_ - starting with a letter or digit (no '/', no spaces), e.g. "
                         "--run-name smoke-2")
    return name


def check_links(path: Path, what: str) -> None:
    """`path` and the folders above it may be symbolic links, but each must lead somewhere: a
    link loop or a link to nothing is refused in one line, before anything is written (mkdir
    through it would fail half-way with a raw traceback, after the report folder was made)."""
    for p in [path, *path.parents]:
        if not p.is_symlink():
            continue
        try:
            os.stat(p)
        except OSError as e:
            target = os.readlink(p)
            why = ("is a symbolic link loop" if e.errno == errno.ELOOP else
                   f"is a symbolic link to {target}, which does not exist")
            raise UsageError(f"{what} {path}: {p} {why}; remove the link (rm {p}) or point it at "
                             "a folder") from None
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file, not a folder; remove it or use another "
                         "--run-name")


def _check_upstream(cfg: RunConfig, repo_root: Path, will_run: list[str]) -> None:
    """Every stage read by a stage we run must either run too or already be fresh."""
    rd = RunDir(cfg.replace(runs_root=str(_resolve(repo_root, cfg.runs_root))), create=False)
    for s in will_run:
        for u in UPSTREAM[s]:
            if u in will_run:
                continue
            state, reason = rd.state(u)
            if state == "missing":
                reason = f"nothing in {rd.stage_dir(u)}"
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
    progress: bool | None = None,
) -> PipelineResult:
    """Validate, then run the selected notebooks in order. Raises ConfigError / UsageError for bad
    input (nothing has been written then), RunLocked when another process is running the same run
    name, and Interrupted (a KeyboardInterrupt) when Ctrl-C or a signal stopped a notebook (its
    process tree is gone by then); returns exit_code 0 (all ok) or 1 (a notebook failed).
    `progress`: the live line on stdout (progress.py); default on unless `log_output`."""
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
    run_dir = _resolve(repo_root, cfg.runs_root) / cfg.run_name
    report_dir = _resolve(repo_root, cfg.reports_root) / cfg.run_name
    check_links(run_dir, "run folder")
    check_links(report_dir, "report folder")
    _check_upstream(cfg, repo_root, [s for s, _ in todo])
    if "00_parent" in selected:
        _check_parent(cfg, repo_root)
    online, hub_note = hub_access(cfg, repo_root)
    if hub_note:
        echo(hub_note)

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
                           kernel_name, echo, online,
                           (not log_output) if progress is None else progress)
    finally:  # after _run_locked: an interrupted notebook's processes are gone by then
        lock.release()


def _run_locked(cfg: RunConfig, preset: str, overrides: dict[str, Any], todo: list, missing: list,
                report_dir: Path, repo_root: Path, log_output: bool, kernel_name: str,
                echo: Callable[[str], None], online: bool, progress: bool) -> PipelineResult:
    env = kernel_env(repo_root, online=online)
    for k in ("HF_HOME", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "MPLCONFIGDIR"):
        Path(env[k]).mkdir(parents=True, exist_ok=True)
    params = {"run_name": cfg.run_name, "preset": preset, "overrides": overrides}
    summary: dict[str, Any] = {"run_name": cfg.run_name, "preset": preset, "overrides": overrides,
                               "config": cfg.to_dict(), "stages": []}
    earlier = _earlier_stages(report_dir / "pipeline.json", {s for s, _ in todo})
    result = PipelineResult(exit_code=0, report_dir=report_dir)
    echo(f"puzzlelib: run {cfg.run_name!r} (preset {preset}), {len(todo)} notebook(s), "
         f"reports -> {report_dir}")
    if missing:
        echo(f"  note: no notebook yet for {', '.join(missing)}; skipped")
        result.stages += [StageResult(s, "skipped") for s in missing]

    rd = RunDir(cfg.replace(runs_root=str(_resolve(repo_root, cfg.runs_root))), create=False)
    for i, (stage, nb_path) in enumerate(todo, 1):
        head = f"[{i}/{len(todo)}] {stage}"
        echo(f"{head}: executing {nb_path}")
        started = datetime.datetime.now(datetime.timezone.utc)
        display = ProgressDisplay(head) if progress else None
        try:
            r = _execute(stage, nb_path, report_dir, params, repo_root, env, log_output,
                         kernel_name, display)
        except Interrupted as e:
            result.stages.append(e.result)
            summary["stages"].append(vars(e.result))
            atomic_write_json(report_dir / "pipeline.json", _merged(summary, earlier))
            raise
        result.stages.append(r)
        summary["stages"].append(vars(r))
        atomic_write_json(report_dir / "pipeline.json", _merged(summary, earlier))
        if r.status == "ok":
            echo(summary_line(head, r.seconds, rd.manifest(stage), started))
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


def _earlier_stages(path: Path, running: set[str]) -> list[dict]:
    """The entries of an earlier ``pipeline.json`` for stages this call does not run: their executed
    notebooks stay in the report folder, so the summary keeps listing them (``--stages 00`` on a
    finished run must not make stages 01-06 vanish from it). Each is marked ``"earlier_run": true``;
    an unreadable file keeps nothing."""
    try:
        old = json.loads(path.read_text())
        stages = [dict(st, earlier_run=True) for st in old["stages"]
                  if isinstance(st, dict) and st.get("stage") in STAGES and st["stage"] not in running]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return stages


def _merged(summary: dict[str, Any], earlier: list[dict]) -> dict[str, Any]:
    """``summary`` with the earlier run's entries of the stages not run now, in stage order."""
    stages = sorted(earlier + summary["stages"], key=lambda st: STAGES.index(st["stage"]))
    return {**summary, "stages": stages}


def _execute(stage: str, nb_path: Path, report_dir: Path, params: dict, repo_root: Path,
             env: dict[str, str], log_output: bool, kernel_name: str,
             display: ProgressDisplay | None = None) -> StageResult:
    """Run one notebook in a child process (see module doc) and collect its result. With a
    `display`, the child's progress events and output come back through pipes and are shown by it;
    without, the child writes to this process's stdout / stderr directly (--log-output)."""
    out_nb, out_html = report_dir / f"{stage}.ipynb", report_dir / f"{stage}.html"
    with tempfile.TemporaryDirectory(prefix="puzzlelib-run-") as tmp:
        spec = {"input": str(nb_path), "output": str(out_nb), "html": str(out_html),
                "parameters": params, "cwd": str(repo_root), "kernel_name": kernel_name,
                "log_output": log_output, "result": str(Path(tmp) / "result.json"),
                "progress_fd": None}
        events_r = events_w = None
        if display is not None:
            events_r, events_w = os.pipe()
            spec["progress_fd"] = events_w
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        code = "import sys; from puzzlelib.runner import _child; sys.exit(_child(sys.argv[1]))"
        piped = subprocess.PIPE if display is not None else None
        t0 = time.perf_counter()
        # A session of its own: a Ctrl-C on the terminal reaches only this process, which stops
        # the child exactly once (_stop_tree); two SIGINTs could cut papermill's cleanup short.
        try:
            proc = subprocess.Popen([sys.executable, "-c", code, str(spec_path)], env=env,
                                    cwd=repo_root, stdin=subprocess.DEVNULL, stdout=piped,
                                    stderr=subprocess.STDOUT if piped else None,
                                    pass_fds=(events_w,) if events_w is not None else (),
                                    start_new_session=True)
        finally:
            if events_w is not None:
                os.close(events_w)  # the child holds it now: EOF when the child is gone
        try:
            rc = _follow(proc, events_r, display)
        except KeyboardInterrupt as e:
            if display is not None:
                display.close()
            _stop_tree(proc)
            seconds = time.perf_counter() - t0
            r = StageResult(stage, "interrupted", seconds,
                            notebook=str(out_nb) if out_nb.is_file() else None,
                            html=str(out_html) if out_html.is_file() else None,
                            error={"ename": "Interrupted", "evalue": str(e) or "SIGINT",
                                   "traceback": []})
            raise Interrupted(getattr(e, "signum", signal.SIGINT), r) from None
        finally:
            if events_r is not None:
                os.close(events_r)
            if display is not None:
                display.close()
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


def _follow(proc: subprocess.Popen, events_fd: int | None,
            display: ProgressDisplay | None) -> int:
    """Wait for the notebook process; meanwhile feed its progress events and output lines to the
    display (two reader threads, one queue, this thread draws). Returns its exit code."""
    if display is None:
        return proc.wait()
    q: queue.Queue = queue.Queue()
    own_fd = os.dup(events_fd)  # the thread's own copy: the caller closes events_fd when it likes

    def read_events() -> None:
        with os.fdopen(own_fd, "rb") as f:
            for raw in f:
                try:
                    q.put(("event", json.loads(raw)))
                except ValueError:
                    pass
        q.put(("eof", None))

    def read_output() -> None:
        for raw in proc.stdout:
            q.put(("text", raw.decode("utf-8", "replace")))
        q.put(("eof", None))

    for target in (read_events, read_output):
        threading.Thread(target=target, daemon=True).start()
    open_pipes, deadline = 2, None
    while open_pipes:
        try:
            kind, item = q.get(timeout=0.5)
        except queue.Empty:
            kind, item = None, None
        if kind == "event":
            display.event(item)
        elif kind == "text":
            display.text(item)
        elif kind == "eof":
            open_pipes -= 1
        if proc.poll() is not None:
            # A kernel that outlives its notebook process still holds the output pipe; its
            # parent poller ends it within a second or two. Do not wait for it forever.
            deadline = deadline or time.monotonic() + 5
            if time.monotonic() > deadline:
                break
        else:
            display.tick()
    return proc.wait()


def _descendants(pid: int) -> list:
    try:
        import psutil  # a dependency (pyproject.toml); imported here: only stopping needs it

        return psutil.Process(pid).children(recursive=True)
    except Exception:  # gone already, or no psutil: papermill's own cleanup is all there is
        return []


_STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP")
                      if hasattr(signal, n))


def _stop_tree(proc: subprocess.Popen, grace: float = STOP_GRACE_SECONDS) -> None:
    """Stop the notebook process and everything below it (the kernel runs in a session of its
    own, so no process group covers it): one SIGINT, as Ctrl-C would send, so papermill stops the
    kernel and saves the notebook so far; whatever is still alive after `grace` seconds is
    killed, and a second Ctrl-C / SIGTERM meanwhile kills at once. Returns when all are gone."""
    tree = _descendants(proc.pid)

    def kill_all(*_: Any) -> None:
        for p in [proc, *tree]:
            try:
                p.kill()
            except Exception:  # gone already
                pass

    in_main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, kill_all) for s in _STOP_SIGNALS} if in_main else {}
    try:
        try:
            proc.send_signal(signal.SIGINT)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            kill_all()
            proc.wait()
        try:
            import psutil
        except ImportError:
            return
        # The kernel: papermill kills it on the way out, else its parent poller ends it about a
        # second after the notebook process is gone. Wait for that, then kill what is left.
        _, alive = psutil.wait_procs(tree, timeout=max(2.0, deadline - time.monotonic()))
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


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

    # SIGTERM / SIGHUP sent to this process directly (a scheduler killing every process of a
    # job) stop it like the runner's SIGINT does: papermill shuts the kernel down on the way out.
    for s in _STOP_SIGNALS:
        signal.signal(s, signal.default_int_handler)
    threading.Thread(target=_stop_when_orphaned, args=(os.getppid(),), daemon=True).start()
    spec = json.loads(Path(spec_path).read_text())
    if spec["log_output"]:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    live: dict[str, Any] = {}
    if spec.get("progress_fd") is not None:  # the runner's live line: streams and cell numbers
        sender = ProgressSender(spec["progress_fd"])
        tap = StreamTap(sender)
        live = {"stdout_file": tap, "stderr_file": tap,
                "on_notebook_start": sender.on_notebook_start,
                "on_cell_start": sender.on_cell_start}
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
                            kernel_name=spec["kernel_name"], cwd=spec["cwd"],
                            progress_bar=not live, log_output=spec["log_output"],
                            start_timeout=120, extra_arguments=quiet, **live)
    except KeyboardInterrupt:
        # Stopped by the runner (or a signal): papermill has shut the kernel down. Save what ran,
        # undisturbed by a second signal, and say so; no traceback, the runner prints one line.
        for s in _STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        result = {"status": "interrupted", "error": {
            "ename": "KeyboardInterrupt", "evalue": "stopped by a signal", "traceback": []}}
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


def _stop_when_orphaned(runner_pid: int) -> None:
    """In the notebook process: if the runner dies without stopping us (SIGKILL, out of memory),
    interrupt ourselves, as the runner would have, so no notebook trains on unwatched."""
    while os.getppid() == runner_pid:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGINT)


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
    # fetch-parent: parent_source.main parses its own options (see: fetch-parent --help).
    sub.add_parser("fetch-parent", help="download a named real parent once (smollm2-135m) into "
                   ".cache/parents/", add_help=False).add_argument("rest", nargs=argparse.REMAINDER)
    return ap


def main(argv: list[str] | None = None) -> int:
    """CLI entry point. Exit codes: 0 ok, 1 a notebook failed, 2 bad input, 3 another process is
    running this run name, 128 + the signal when stopped: 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP."""
    args = _build_parser().parse_args(argv)
    old = _raise_on_termination()
    try:
        rc = _command(args)
        sys.stdout.flush()  # here, where a closed pipe (`status | head`) is caught below
        return rc
    except (ConfigError, UsageError) as e:
        print(f"puzzlelib: error: {e}", file=sys.stderr)
        return 2
    except RunLocked as e:
        print(f"puzzlelib: refused: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as e:
        print(_interrupted_line(e), file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except BrokenPipeError:
        # `status | head`: the reader left. Point stdout at /dev/null so the interpreter's final
        # flush does not raise again, and end quietly, as a command killed by SIGPIPE would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)


def _raise_on_termination() -> dict:
    """SIGTERM and SIGHUP raise Terminated (a KeyboardInterrupt) in the main thread, so they stop
    a run as Ctrl-C does instead of killing this process and orphaning the notebook. Returns the
    previous handlers (none outside the main thread, where Python allows no handler)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    return {s: signal.signal(s, handler) for s in _STOP_SIGNALS if s != signal.SIGINT}


def _interrupted_line(e: BaseException) -> str:
    sig = signal.Signals(getattr(e, "signum", signal.SIGINT)).name
    how = "Ctrl-C" if sig == "SIGINT" else sig
    if isinstance(e, Interrupted):
        return (f"puzzlelib: stopped by {how} during {e.stage}: its notebook and kernel are "
                "stopped (the stage reads 'interrupted' in `status`); run the same command again "
                "to resume, finished stages are reused")
    return f"puzzlelib: stopped by {how}"


def _command(args: argparse.Namespace) -> int:
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
    if args.command == "fetch-parent":
        from .parent.source import main as fetch_parent_main

        return fetch_parent_main(args.rest)
    res = run_pipeline(args.preset, run_name=args.run_name, stages=args.stages,
                       overrides=parse_set_args(args.sets), force=args.force,
                       repo_root=args.repo_root, notebooks_dir=args.notebooks_dir,
                       log_output=args.log_output)
    return res.exit_code


def _run_folder(run_name: str, runs_root: str | None) -> Path:
    """runs/<run_name> (or <runs_root>/<run_name>) for `status` / `figure`: a safe name, links that
    lead somewhere, and a folder that holds a run; else UsageError."""
    root = default_repo_root()
    run_dir = (_resolve(root, runs_root) if runs_root else root / "runs") / check_run_name(run_name)
    check_links(run_dir, "run folder")
    if not (run_dir / "config.json").is_file():
        have = sorted(q.parent.name for q in run_dir.parent.glob("*/config.json"))
        raise UsageError(f"no run named {run_name!r} in {run_dir.parent} (runs there: "
                         f"{', '.join(have) or 'none'}): run the pipeline first (python -m "
                         f"puzzlelib run --run-name {run_name})")
    return run_dir


def _figure(run_name: str, runs_root: str | None, out: str | None) -> int:
    from .overview import write_pipeline_figure

    root = default_repo_root()
    run_dir = _run_folder(run_name, runs_root)
    out_path = _resolve(root, out) if out else root / "reports" / run_name / "pipeline.png"
    check_links(out_path.parent, "output folder")
    path = write_pipeline_figure(run_dir, out_path)
    print(f"puzzlelib: wrote {path}")
    return 0


def _status(run_name: str, runs_root: str | None) -> int:
    run_dir = _run_folder(run_name, runs_root)
    try:
        rd = RunDir.existing(run_name, run_dir.parent)
    except (FileNotFoundError, ConfigError) as e:
        raise UsageError(str(e)) from None
    print(f"run {run_name!r} (preset {rd.cfg.preset}) at {rd.root}")
    for stage, state, reason in rd.describe():
        m = rd.manifest(stage) or {}
        when = f"{m.get('finished')} ({m.get('seconds')} s)" if state == "fresh" else ""
        print(f"  {stage:<14} {state:<12} {reason or when}")
    return 0
