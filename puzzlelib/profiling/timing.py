"""Timing primitives for stage 01: how one callable is timed, on a shared CPU or on a GPU.

What it does:
* ``Bench`` (a callable plus untimed set-up, e.g. a fresh KV cache) and ``Timing`` (its samples
  in ms and their median / p10 / p90 / min: ``STATISTICS``);
* the clocks (``CLOCKS``: "wall" elapsed time or "cpu" time of one thread), refused by
  ``check_clock`` where they would not measure runtime;
* ``time_interleaved``: warm-up calls, then rounds in which every bench runs once in a fresh
  random order, ``cuda.synchronize`` around each sample and a loop of calls per sample on CUDA;
* the cache state of memory-bound decode: ``rotating`` / ``rotation_copies`` /
  ``last_level_cache_bytes`` (reuse a sub-block's weights at the distance they have in the
  parent) and ``warm_step`` (right after one untimed call of itself);
* ``resolve_device`` and ``ProfilingError``, the error every stage-01 module raises.

Reads: only the CPU's cache sizes from sysfs (``/sys/devices/system/cpu/cpu0/cache``). Writes
nothing. Leaves out: what is timed (``benches``), the cost table (``costs``), the end-to-end check
(``additivity``), the stage and its files (``profiling``); CUDA events, ``torch.compile`` / CUDA
graphs, and any summary of the samples beyond median, p10, p90 and min.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm  # plain text bars: tqdm.auto needs ipywidgets in Jupyter

# How a bench's samples become one number. Noise from other processes only ever adds time, and
# it hits a long call more often than a short one: see the notebook for what each choice does.
STATISTICS = ("median", "p10", "min")
# On CUDA one sample is a loop of calls lasting at least this long, so that a kernel launch queue
# and the synchronisation around the sample do not dominate a sub-millisecond sub-block. On CPU a
# sample is one call: perf_counter resolves well below the ~10 µs of the smallest real sub-block,
# and a single call sees the caches as the full model does (see the notebook's discussion).
CUDA_MIN_SAMPLE_MS = 1.0
MAX_INNER = 1000
# Decode benches cycle through at most this many copies of a sub-block (see `rotating`), and
# assume this last-level cache when the device does not report one.
MAX_COPIES = 256
ROTATION_CYCLES = 2
DEFAULT_CACHE_BYTES = 32 * 1024 ** 2


class ProfilingError(ValueError):
    """A profiling request that cannot be measured; the message says what to change."""


def resolve_device(name: str) -> torch.device:
    """'cpu' | 'cuda' | 'auto' (cuda when available) -> a torch.device; clear errors otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (isinstance(name, str) and name.startswith("cuda:")):
        if not torch.cuda.is_available():
            raise ProfilingError(
                f"device={name!r} but torch sees no CUDA device (torch {torch.__version__}, built "
                f"with CUDA {torch.version.cuda}): set device='cpu' or 'auto', or run on a GPU "
                "machine with a CUDA build of torch")
        return torch.device(name)
    raise ProfilingError(f"unknown device {name!r}: use 'cpu', 'cuda' or 'auto'")


# ------------------------------------------------------------------------------ timing

@dataclass
class Timing:
    """Samples (ms per call) of one bench and their summary."""

    samples: list[float]
    inner: int = 1

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    @property
    def p10(self) -> float:
        return float(np.percentile(self.samples, 10))

    @property
    def p90(self) -> float:
        return float(np.percentile(self.samples, 90))

    def stat(self, statistic: str) -> float:
        """``median`` | ``p10`` | ``min`` of the samples."""
        check_statistic(statistic)
        return {"median": np.median, "p10": lambda x: np.percentile(x, 10), "min": np.min
                }[statistic](self.samples).item()


def check_statistic(statistic: str) -> None:
    if statistic not in STATISTICS:
        raise ProfilingError(f"unknown statistic {statistic!r}: use one of {', '.join(STATISTICS)}")


@dataclass
class Bench:
    """A callable to time. ``prepare()`` runs outside the timed region and returns the argument
    of ``fn`` (e.g. a fresh or restored KV cache), so set-up never counts as runtime."""

    fn: Callable[[Any], Any]
    prepare: Callable[[], Any] = lambda: None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# "wall": elapsed time, what a dedicated device delivers. "cpu": CPU time of this process, which
# does not run while another process holds the core, so a shared machine's load leaves it alone;
# it equals elapsed time only for single-threaded CPU work (checked in `check_clock`).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def check_clock(clock: str, device: torch.device, threads: int | None = None) -> None:
    """Refuse a clock that would not measure runtime on this device / thread count."""
    if clock not in CLOCKS:
        raise ProfilingError(f"unknown profile_clock {clock!r}: use 'wall' or 'cpu'")
    if clock == "cpu" and device.type != "cpu":
        raise ProfilingError("profile_clock='cpu' times CPU work only; on a GPU set "
                             "profile_clock='wall' (the kernels run asynchronously on the device)")
    threads = torch.get_num_threads() if threads is None else threads
    if clock == "cpu" and threads != 1:
        raise ProfilingError(
            f"profile_clock='cpu' needs one intra-op thread (CPU time of {threads} threads is not "
            "runtime, and idle OpenMP threads spin): set threads=1, or profile_clock='wall'")


def _sample(b: Bench, inner: int, device: torch.device, clock: str = "wall") -> float:
    args = [b.prepare() for _ in range(inner)]
    now = CLOCKS[clock]
    _sync(device)
    t0 = now()
    for a in args:
        b.fn(a)
    _sync(device)
    return (now() - t0) * 1e3 / inner


def rotating(benches: list[Bench]) -> Bench:
    """Time ``benches[0]`` with the cache state it has inside a forward pass.

    Before each timed call, ``benches[0]`` runs once untimed and then every other bench (copies
    of the same sub-block on their own weights) runs untimed: when the timed call starts, its
    weights were last touched that many bytes ago — as inside a real forward, where the rest of
    the model runs between two uses of one layer. The code path (Python, dispatcher, kernels)
    stays hot, exactly as it does in a forward pass, which a cache flush would not give.
    """
    if len(benches) == 1:
        return benches[0]
    first = benches[0]

    def prepare():
        for _ in range(ROTATION_CYCLES):
            for b in benches:
                b.fn(b.prepare())
        return first.prepare()

    return Bench(first.fn, prepare)


def warm_step(b: Bench) -> Bench:
    """``b`` timed right after one untimed call of itself: a whole model in steady-state decoding,
    where the previous step has just run (rather than whatever the interleaved benches left)."""
    def prepare():
        b.fn(b.prepare())
        return b.prepare()

    return Bench(b.fn, prepare)


def last_level_cache_bytes(device: torch.device) -> int | None:
    """Size of the device's last-level cache (CPU L3 from sysfs, GPU L2), or None if unknown."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or None
    best = None
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (d / "size").read_text().strip().upper()
            level = int((d / "level").read_text())
        except (OSError, ValueError):
            continue
        mult = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1:], 1)
        size = int(text.rstrip("KMG")) * mult
        if best is None or level > best[0]:
            best = (level, size)
    return best[1] if best else None


def rotation_copies(bytes_per_call: int, working_set: int, cache_bytes: int | None) -> int:
    """How many copies of a sub-block to cycle through so that its weights are reused at the
    distance they have in the parent (``working_set`` bytes touched per decode step), capped at
    twice the last-level cache: beyond that everything is evicted anyway."""
    if bytes_per_call <= 0:
        return 1
    reach = min(working_set, 2 * (cache_bytes or DEFAULT_CACHE_BYTES))
    return int(max(1, min(MAX_COPIES, round(reach / bytes_per_call))))


@torch.inference_mode()
def time_interleaved(benches: dict[str, Bench], device: torch.device, warmup: int, repeats: int,
                     seed: int = 0, desc: str | None = None, progress: bool = True,
                     min_sample_ms: float | None = None, clock: str = "wall") -> dict[str, Timing]:
    """Time every bench ``repeats`` times, interleaved: each round runs every bench once in a new
    random order. Returns ms per call for each bench.

    Interleaving is what makes the numbers comparable on a shared machine: a burst of load from
    another process lands on a few samples of *every* bench instead of on all samples of one.
    """
    if repeats <= 0:
        raise ProfilingError(f"repeats must be >= 1, got {repeats}: fix profile_repeats")
    check_clock(clock, device)
    if min_sample_ms is None:
        min_sample_ms = CUDA_MIN_SAMPLE_MS if device.type == "cuda" else 0.0
    inner: dict[str, int] = {}
    for name, b in benches.items():
        for _ in range(max(warmup, 0)):
            _sample(b, 1, device)
        single = _sample(b, 1, device) if min_sample_ms > 0 else min_sample_ms
        inner[name] = 1 if min_sample_ms <= 0 else int(
            min(MAX_INNER, max(1, math.ceil(min_sample_ms / max(single, 1e-6)))))
    rng = random.Random(seed)
    out = {name: Timing([], inner[name]) for name in benches}
    names = list(benches)
    for _ in tqdm(range(repeats), desc=desc or "timing", unit="round", disable=not progress,
                  leave=False):
        rng.shuffle(names)
        for name in names:
            out[name].samples.append(_sample(benches[name], inner[name], device, clock))
    return out
