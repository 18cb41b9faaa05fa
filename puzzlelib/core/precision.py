"""Precision and threads chosen by capability and measurement (the ``auto`` settings).

What it does:
* ``bf16_native(device)`` says whether the device runs bf16 matmuls natively: on CPU oneDNN's
  own answer (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``: AVX512-BF16 or AMX, and it
  honours ``ONEDNN_MAX_CPU_ISA``), else the CPU flags ``avx512_bf16`` / ``amx_bf16``; on CUDA
  ``torch.cuda.is_bf16_supported()``. ``PUZZLELIB_FORCE_BF16_NATIVE=0/1`` overrides the answer
  (tests use it to cover both branches on any machine).
* ``probe(step)`` times a stage's real training step (its model, sequence length and width, on
  ``PROBE_ROWS`` sequences of its batch; forward + backward) in fp32 and under bf16 autocast,
  interleaved after a warm-up: 1-9 s for the default preset's stages on a busy 2-core machine.
* ``choose`` turns a ``*_autocast_bf16`` setting into a decision with its reason:
  ``False`` -> fp32 (no probe); ``True`` -> bf16 (on a device without native bf16 the probe runs
  and a ``RuntimeWarning`` gives the measured slowdown: 5-9x at the default preset's shapes and
  18-25x at hidden 256 on a CPU without it);
  ``"auto"`` -> fp32 without native bf16 (no probe), else bf16 only when the probe measures a
  bf16 step at most ``BF16_MARGIN`` of the fp32 one.
* ``decide`` is ``choose`` made stable per run: the decision is kept in ``runs/<run>/precision.json``
  under the stage's cache key, so a resumed or forced rerun of the stage on the same machine uses
  the same precision as the first run (a probe near the margin could otherwise flip, and a
  resumed training run would then not equal an uninterrupted one). The config hash holds the
  setting (``"auto"``), never the probe's outcome, so a finished stage stays fresh.
* ``auto_threads`` / ``resolve_threads`` / ``apply_threads``: the ``threads`` setting (``"auto"``,
  0 = torch's default, or a count). The rule (``benchmarks/bench_cpu.py`` measures it): one
  intra-op thread per two physical cores this process may use, at least 1 and at most
  ``MAX_AUTO_THREADS``. On a 2-core laptop that is 1 thread: two OpenMP threads beside any other
  busy process (a browser, a second run, the notebook server) make every step several times
  slower, while one thread loses only what a second core adds to this project's small matmuls.
  It depends on the machine only, not on its load at the moment, because the thread count
  changes the order of float sums: two runs on the same machine must pick the same count.

Reads: ``runs/<run>/precision.json`` (earlier decisions), ``/proc/cpuinfo`` and
``/sys/devices/system/cpu`` (CPU flags, SMT siblings). Writes: ``runs/<run>/precision.json`` and
the ``precision`` entry of ``runs/<run>/environment.json``.
Leaves out: the stages' probe steps (each stage module builds its own from its real shapes:
``parent.probe_step``, ``bld.probe_step``, ``gkd.probe_step``), fp16 (CPU autocast runs bf16),
and stage 01's thread rule for the CPU clock (``profiling.stage_threads``: one thread, always).
"""

from __future__ import annotations

import json
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

ENV_FORCE_NATIVE = "PUZZLELIB_FORCE_BF16_NATIVE"
# bf16 is chosen only when its step takes at most this share of fp32's. The margin keeps a
# decision away from noise (a 5 % difference flips with the machine's load) and pays for the
# rounding bf16 adds when it does not buy a clear speed-up.
BF16_MARGIN = 0.8
MAX_AUTO_THREADS = 8
# Sequences of the stage's batch the probe's step runs on (the model, sequence length and width
# are the stage's own). The bf16/fp32 ratio does not depend on it at these sizes: at the default
# preset's shapes, one core's CPU time gave 1.70 / 1.69 / 1.58 (parent step on 2 / 4 / 16
# sequences), 1.65 / 1.58 / 1.58 (GKD) and 1.74 / 1.70 / 1.73 (BLD, 8 = its batch), while the
# whole-batch probe took 21 s (parent) and 27 s (GKD) on a busy 2-core machine, 4 sequences 7-9 s.
PROBE_ROWS = 4
PRECISION_FILE = "precision.json"


# ---- capability ---------------------------------------------------------------------------------
def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_native(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """(does ``device`` run bf16 natively, how we know). ``PUZZLELIB_FORCE_BF16_NATIVE=0/1``
    overrides the check (tests; or to try bf16 on hardware the check does not know)."""
    forced = os.environ.get(ENV_FORCE_NATIVE, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise ValueError(f"{ENV_FORCE_NATIVE}={forced!r}: use 1 (native bf16), 0 (none) "
                             "or leave it unset (detect)")
        return forced == "1", f"{ENV_FORCE_NATIVE}={forced}"
    device = torch.device(device)
    if device.type == "cuda":
        ok = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        return ok, f"torch.cuda.is_bf16_supported() is {ok}"
    if device.type != "cpu":
        return False, f"no bf16 check for device {device.type!r}"
    try:
        ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
        return ok, ("oneDNN runs bf16 natively (AVX512-BF16 or AMX)" if ok else
                    "oneDNN has no native bf16 on this CPU (no AVX512-BF16/AMX)"
                    + (f", ONEDNN_MAX_CPU_ISA={isa}" if isa else ""))
    except (AttributeError, RuntimeError):
        flags = cpu_flags() & {"avx512_bf16", "amx_bf16"}
        return bool(flags), f"CPU flags: {', '.join(sorted(flags)) or 'no avx512_bf16 / amx_bf16'}"


# ---- the probe ----------------------------------------------------------------------------------
def probe(step: Callable[[bool], Any], device: torch.device | str = "cpu", warmup: int = 1,
          repeats: int = 3, budget_s: float = 6.0) -> dict[str, Any]:
    """Median seconds of ``step(bf16)`` for bf16=False and True, interleaved (so a change in the
    machine's load hits both alike) after ``warmup`` untimed calls of each. Stops repeating once
    ``budget_s`` has passed (one timed call of each at least).

    With one CPU thread the clock is this process's CPU time, which other processes' load does
    not stretch (on a busy 2-core machine the default parent step's wall-clock bf16/fp32 ratio
    read 1.14 where its CPU time read 1.69): the decision then does not depend on what else runs.
    With more threads, or on a GPU, it is wall time."""
    device = torch.device(device)
    cpu_clock = device.type == "cpu" and torch.get_num_threads() == 1
    clock = time.process_time if cpu_clock else time.perf_counter

    def timed(bf16: bool) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = clock()
        step(bf16)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return clock() - t

    start = time.perf_counter()
    for _ in range(warmup):
        step(False)
        step(True)
    fp32, bf16 = [], []
    for r in range(repeats):
        for flag in ((False, True) if r % 2 == 0 else (True, False)):
            (bf16 if flag else fp32).append(timed(flag))
        if time.perf_counter() - start > budget_s:
            break
    f, b = statistics.median(fp32), statistics.median(bf16)
    return {"fp32_ms": round(f * 1e3, 2), "bf16_ms": round(b * 1e3, 2),
            "bf16_over_fp32": round(b / max(f, 1e-12), 3), "repeats": len(fp32),
            "threads": torch.get_num_threads(), "clock": "cpu" if cpu_clock else "wall",
            "seconds": round(time.perf_counter() - start, 2)}


# ---- the decision -------------------------------------------------------------------------------
@dataclass
class PrecisionChoice:
    """What a stage trains in and why: recorded in its manifest and in environment.json."""

    stage: str
    field: str            # the config field, e.g. "parent_autocast_bf16"
    setting: Any          # its value: True, False or "auto"
    bf16: bool            # the decision: bf16 autocast (True) or fp32
    native_bf16: bool
    capability: str       # how native_bf16 was determined
    reason: str
    device: str
    probe: dict | None = None
    reused: bool = False  # taken from runs/<run>/precision.json (an earlier run of the stage)

    @property
    def precision(self) -> str:
        return "bf16 autocast" if self.bf16 else "fp32"

    def line(self) -> str:
        """One line for a notebook: the choice and why."""
        again = " (decided by an earlier run of this stage)" if self.reused else ""
        return f"{self.stage}: training in {self.precision}: {self.reason}{again}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "precision": self.precision}


def _probe_text(p: dict) -> str:
    return (f"bf16 step {p['bf16_ms']:.0f} ms vs fp32 {p['fp32_ms']:.0f} ms = "
            f"{p['bf16_over_fp32']:.2f}x on {p['threads']} thread(s)")


def choose(stage: str, field: str, setting: Any, device: torch.device | str,
           make_step: Callable[..., Callable[[bool], Any]] | None, *, native: bool | None = None,
           probe_result: dict | None = None, capability: str | None = None) -> PrecisionChoice:
    """The precision for a ``*_autocast_bf16`` setting (see the module docstring).

    ``make_step(rows)`` builds the stage's probe step on at most ``rows`` sequences of the stage's
    batch (called only when a probe runs): ``PROBE_ROWS`` for the ``auto`` decision, 1 for the
    warning's probe (an emulated bf16 step of a whole batch can take two minutes); ``native`` and
    ``probe_result`` replace the capability check and the probe (tests); ``capability`` says how
    a given ``native`` was found (recorded with the choice)."""
    device = torch.device(device)
    if native is None:
        native, how = bf16_native(device)
    else:
        how = capability or "given by the caller"
    base = dict(stage=stage, field=field, setting=setting, native_bf16=native, capability=how,
                device=device.type)

    def measure(rows: int = PROBE_ROWS) -> dict:
        if probe_result is not None:
            return dict(probe_result)
        if make_step is None:
            raise ValueError(f"{field}={setting!r} needs a probe step to measure")
        warn_only = rows == 1
        p = probe(make_step(rows), device, warmup=0 if warn_only else 1, repeats=1 if warn_only else 3)
        return {**p, "rows": rows}

    if setting is False:
        return PrecisionChoice(bf16=False, reason=f"{field}=false", **base)
    if setting is True:
        if native:
            return PrecisionChoice(bf16=True, reason=f"{field}=true ({how})", **base)
        p = measure(rows=1)
        warnings.warn(
            f"{field}=true on a {device.type} without native bf16 ({how}): the probe measured a "
            f"bf16 autocast step {p['bf16_over_fp32']:.1f}x the time of an fp32 step "
            f"({p['bf16_ms']:.0f} vs {p['fp32_ms']:.0f} ms). Set {field}=auto (or false) to train "
            "in fp32.", RuntimeWarning, stacklevel=2)
        return PrecisionChoice(bf16=True, probe=p, reason=f"{field}=true although {how}: "
                               f"{_probe_text(p)}", **base)
    if setting != "auto":
        raise ValueError(f"{field} must be true, false or 'auto', got {setting!r}")
    if not native:
        return PrecisionChoice(bf16=False, reason=f"auto: {how}, so bf16 autocast would be "
                               "emulated (measured 5-25x slower than fp32, more at larger widths: "
                               "benchmarks/bench_cpu.py); no probe needed", **base)
    p = measure()
    fast = p["bf16_over_fp32"] <= BF16_MARGIN
    verdict = ("bf16 is faster" if fast else
               f"bf16 is not faster by the margin (needs <= {BF16_MARGIN}x)")
    return PrecisionChoice(bf16=fast, probe=p, reason=f"auto: {how}; probe: {_probe_text(p)}; "
                           f"{verdict}", **base)


def decide(rd, stage: str, field: str, setting: Any, device: torch.device | str,
           make_step: Callable[..., Callable[[bool], Any]] | None, *, native: bool | None = None,
           probe_result: dict | None = None) -> PrecisionChoice:
    """``choose``, kept stable per run: an ``auto`` decision made for this stage's cache key, on
    this device and capability, is reused from ``runs/<run>/precision.json``; every decision is
    recorded there and in ``environment.json`` (``record``)."""
    dev = torch.device(device)
    how = None
    if setting == "auto":
        if native is None:  # checked here once (the record keeps how it was found)
            native, how = bf16_native(dev)
        old = read_choices(rd.root).get(stage) or {}
        c = old.get("choice") or {}
        if (old.get("key") == rd.config_key(stage) and c.get("device") == dev.type
                and c.get("native_bf16") == native and c.get("setting") == "auto"):
            c = {k: v for k, v in c.items() if k != "precision"}
            choice = PrecisionChoice(**{**c, "reused": True})
            record(rd, choice)
            return choice
    choice = choose(stage, field, setting, dev, make_step, native=native, probe_result=probe_result,
                    capability=how)
    record(rd, choice)
    return choice


def read_choices(run_root: str | Path) -> dict[str, Any]:
    """{stage: {"key": cache key, "choice": PrecisionChoice dict}} from runs/<run>/precision.json."""
    path = Path(run_root) / PRECISION_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def record(rd, choice: PrecisionChoice) -> None:
    """Keep ``choice`` in runs/<run>/precision.json and in environment.json's ``precision``."""
    from .atomic import atomic_write_json

    choices = read_choices(rd.root)
    choices[choice.stage] = {"key": rd.config_key(choice.stage), "choice": choice.to_dict()}
    atomic_write_json(rd.root / PRECISION_FILE, choices)
    env_path = rd.root / "environment.json"
    try:
        env = json.loads(env_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        env = {}
    env["precision"] = {s: v["choice"] for s, v in choices.items()}
    atomic_write_json(env_path, env)
    if getattr(rd, "_env", None) is not None:  # the environment later manifests of this process record
        rd._env["precision"] = env["precision"]


def summary_line(run_root: str | Path, stage: str) -> str:
    """The notebook's one line: the stage's recorded precision and why (or why none is recorded)."""
    c = (read_choices(run_root).get(stage) or {}).get("choice")
    if not c:
        return (f"{stage}: no precision decision recorded "
                "(the stage trains nothing, or ran before puzzlelib recorded it)")
    return PrecisionChoice(**{k: v for k, v in c.items() if k != "precision"}).line()


def resolve_flag(setting: Any, stage: str, field: str, device: torch.device | str,
                 make_step: Callable[..., Callable[[bool], Any]] | None) -> bool:
    """A setting as a bool, for code that runs without a run directory (``choose``, unrecorded)."""
    if isinstance(setting, bool):
        return setting
    return choose(stage, field, setting, device, make_step).bf16


# ---- threads ------------------------------------------------------------------------------------
def physical_cores() -> int:
    """Cores this process may run on, SMT siblings counted once."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        list(range(os.cpu_count() or 1))
    seen = set()
    for c in cpus:
        p = Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list")
        try:
            seen.add(p.read_text().strip())
        except OSError:
            seen.add(str(c))
    return max(1, len(seen))


def auto_threads(cores: int | None = None) -> int:
    """The ``threads="auto"`` rule: one thread per two physical cores, in [1, MAX_AUTO_THREADS]."""
    cores = physical_cores() if cores is None else cores
    return max(1, min(MAX_AUTO_THREADS, cores // 2))


def resolve_threads(setting: Any, cores: int | None = None) -> int:
    """The intra-op thread count a ``threads`` setting asks for; 0 = leave torch's default."""
    if setting == "auto":
        return auto_threads(cores)
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ValueError(f"threads must be 'auto', 0 (torch default) or a count >= 1, got {setting!r}")
    return setting


def apply_threads(setting: Any, cores: int | None = None) -> int:
    """Set torch's intra-op threads from a ``threads`` setting; return the count now in use."""
    n = resolve_threads(setting, cores)
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def threads_record(setting: Any) -> dict[str, Any]:
    """What environment.json says about threads: the setting, the count, the rule."""
    n = resolve_threads(setting)
    return {"setting": setting, "count": n or torch.get_num_threads(),
            "physical_cores": physical_cores(),
            "rule": ("auto: one thread per two physical cores, 1 to "
                     f"{MAX_AUTO_THREADS}" if setting == "auto" else
                     "0: torch's default" if setting == 0 else "set explicitly")}
