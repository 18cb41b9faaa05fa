"""Live progress of a running notebook: what the runner shows between "executing" and "done".

Two halves, one per process (see runner.py for the processes):

- In the notebook process, papermill hands every stream output of the kernel (stdout, stderr) to
  the file objects it is given; `StreamTap` is one. It cuts the text at "\\r" and "\\n" (a tqdm bar
  redraws itself after a "\\r"), keeps the latest non-blank line, strips colours, and sends it to
  the runner as one JSON line on a pipe, with the cell being executed (`ProgressSender`).
- In the runner, `ProgressDisplay` shows one line per stage:

      [2/7] 02_bld 1:23 cell 9/31 | BLD layer 3: 45%|####5     | 36/80 [00:52<01:03, 0.7block/s]

  On a terminal it is redrawn in place ("\\r", erase to end of line, cut to the terminal's width
  so it never wraps). Elsewhere (CI logs, `| tee`, a file) it is printed as a full line, at most
  every `interval` seconds and only when it changed: a log gets a few lines per minute, never a
  carriage-return flood. Other output of the notebook process (warnings, the kernel's own log)
  is printed above the live line. `summary_line` turns a finished stage's manifest into the
  one-line result ("done in 93.1 s: 80 blocks, 12.4 k tokens/s").

Reads: the kernel's streams (notebook process) and the run's stage manifests (runner). Writes: the
pipe and the runner's stdout. Leaves out: papermill's cell markers (`--log-output` shows those and
turns this display off) and the kernel's rich outputs (figures, tables: they are in the report).
How often a bar redraws is tqdm's business: the runner sets TQDM_MININTERVAL for the kernel.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import sys
import time
from typing import Any, TextIO

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Seconds between two progress lines when the output is not a terminal (CI logs, files).
DEFAULT_LOG_INTERVAL = 30.0


def latest_line(text: str) -> str | None:
    """The last non-blank piece of `text` cut at "\\r" and "\\n", colours stripped; None if none.
    A tqdm redraw is "\\r<bar>"; a bar closed with leave=False is "\\r<spaces>\\r": ignored."""
    for piece in reversed(re.split(r"[\r\n]", _ANSI.sub("", text))):
        if piece.strip():
            return piece.rstrip()
    return None


def fit(line: str, width: int) -> str:
    """`line` cut to `width` characters (an ellipsis marks the cut), tabs made spaces."""
    line = line.replace("\t", " ")
    return line if len(line) <= width else line[:max(width - 1, 0)] + "…"


def clock(seconds: float) -> str:
    """93 -> '1:33', 3725 -> '1:02:05'."""
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


# ---- notebook process ---------------------------------------------------------------------------
class ProgressSender:
    """Writes progress events as JSON lines to a pipe (a file descriptor) the runner reads. A
    runner that went away (EPIPE) silences it: progress is never worth failing a notebook."""

    def __init__(self, fd: int):
        self.fd: int | None = fd
        self.cells = 0

    def send(self, **event: Any) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, (json.dumps(event) + "\n").encode())
        except OSError:
            self.fd = None

    # nbclient hooks (papermill passes them through to its NotebookClient)
    def on_notebook_start(self, notebook: Any = None, **_: Any) -> None:
        self.cells = len(getattr(notebook, "cells", []) or [])

    def on_cell_start(self, cell: Any = None, cell_index: int | None = None, **_: Any) -> None:
        if cell_index is not None:
            self.send(cell=cell_index + 1, cells=self.cells)


class StreamTap:
    """A write-only file object for papermill's stdout_file / stderr_file: forwards the latest
    line of what the kernel printed."""

    def __init__(self, sender: ProgressSender):
        self.sender = sender

    def write(self, text: str) -> int:
        line = latest_line(text)
        if line is not None:
            self.sender.send(line=line)
        return len(text)

    def flush(self) -> None:
        pass


# ---- runner -------------------------------------------------------------------------------------
class ProgressDisplay:
    """The live line of one running stage (see the module docstring). Call `event` with what the
    notebook process sends, `text` with its other output, `tick` now and then (it redraws or
    prints when due), and `close` before printing anything else."""

    def __init__(self, prefix: str, stream: TextIO | None = None, tty: bool | None = None,
                 interval: float | None = None, width: int | None = None,
                 now: float | None = None):
        self.prefix = prefix
        self.stream = stream if stream is not None else sys.stdout
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"
        self.tty = tty
        if interval is None:
            interval = float(os.environ.get("PUZZLELIB_PROGRESS_SECONDS", DEFAULT_LOG_INTERVAL))
        self.interval = interval
        self.width = width
        self.t0 = time.monotonic() if now is None else now
        self.cell = self.cells = 0
        self.line = ""
        self._shown = False  # a live line is on the terminal (tty)
        self._drawn = ""  # (tty) what it says
        self._last_print = self.t0  # (not tty) when the last line was printed
        self._printed = ""  # (not tty) its content, without the clock

    def event(self, ev: dict[str, Any]) -> None:
        if "cell" in ev:
            self.cell, self.cells = int(ev["cell"]), int(ev.get("cells") or 0)
        if ev.get("line"):
            self.line = str(ev["line"])

    def content(self) -> str:
        """What the line says, without the clock: the cell and the latest output."""
        parts = [] if self.cell or self.line else ["starting the kernel"]
        if self.cell:
            parts.append(f"cell {self.cell}/{self.cells}" if self.cells else f"cell {self.cell}")
        if self.line:
            parts.append(self.line.strip())
        return " | ".join(parts)

    def render(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        content = self.content()
        return f"{self.prefix} {clock(now - self.t0)}" + (f" {content}" if content else "")

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self.tty:
            width = self.width or shutil.get_terminal_size((100, 24)).columns
            # One column short of the edge: a line that fills it makes some terminals wrap.
            line = fit(self.render(now), width - 1)
            if self._shown and line == self._drawn:
                return
            self.stream.write("\r" + line + "\x1b[K")
            self._shown, self._drawn = True, line
        else:
            content = self.content()
            if not content or content == self._printed or now - self._last_print < self.interval:
                return
            self.stream.write(self.render(now) + "\n")
            self._printed, self._last_print = content, now
        self.stream.flush()

    def text(self, chunk: str) -> None:
        """Other output of the notebook process, printed above the live line."""
        self.close()
        self.stream.write(chunk if chunk.endswith("\n") else chunk + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Erase the live line (tty), so that what is printed next starts on a clean line."""
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False


# ---- the one-line result of a stage -------------------------------------------------------------
def _num(x: Any, spec: str = ".3g") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else "?"


def _rate(x: Any) -> str:
    if not isinstance(x, (int, float)):
        return "?"
    return f"{x / 1000:.1f} k" if x >= 1000 else f"{x:.0f}"


def key_numbers(stage: str, metrics: dict[str, Any]) -> str:
    """The number or two of a finished stage's manifest metrics worth a glance ('' if none)."""
    m = metrics or {}
    has = lambda *ks: all(k in m and m[k] is not None for k in ks)  # noqa: E731
    out = []
    if stage == "00_parent":
        if has("heldout_loss"):
            out.append(f"held-out loss {_num(m['heldout_loss'], '.3f')}"
                       + (f" (perplexity {_num(m['heldout_perplexity'], '.1f')})"
                          if has("heldout_perplexity") else ""))
        if has("train_tokens_per_second") and m["train_tokens_per_second"]:
            out.append(f"{_rate(m['train_tokens_per_second'])} tokens/s")
    elif stage == "01_profiling":
        if has("prefill_median_rel_err", "decode_median_rel_err"):
            out.append(f"runtime model off by {100 * m['prefill_median_rel_err']:.1f} % "
                       f"(prefill) / {100 * m['decode_median_rel_err']:.1f} % (decode), median")
    elif stage == "02_bld":
        if has("blocks"):
            out.append(f"{m['blocks']} blocks")
        if has("train_tokens_per_second") and m["train_tokens_per_second"]:
            out.append(f"{_rate(m['train_tokens_per_second'])} tokens/s")
    elif stage == "03_scoring":
        if has("candidates"):
            out.append(f"{m['candidates']} candidates scored")
        if has("candidates_per_second"):
            out.append(f"{_num(m['candidates_per_second'])}/s")
    elif stage == "04_search":
        if has("predicted_speedup"):
            out.append(f"best child predicted {_num(m['predicted_speedup'], '.2f')}× faster"
                       + (f" ({m['solver']})" if has("solver") else ""))
    elif stage == "05_gkd":
        kls = {k[:-len(".kl_after")]: v for k, v in m.items() if k.endswith(".kl_after")}
        if kls:
            name, kl = next(iter(kls.items()))
            out.append(f"{len(kls)} children distilled, {name} KL {_num(kl, '.4f')}")
    elif stage == "06_evaluation":
        if has("retention", "measured_speedup"):
            out.append(f"{m.get('model', 'child')}: {100 * m['retention']:.1f} % of the parent's "
                       f"accuracy at {_num(m['measured_speedup'], '.2f')}× its speed")
    return ", ".join(out)


def _parse_time(s: Any) -> datetime.datetime | None:
    try:
        return datetime.datetime.fromisoformat(str(s))
    except ValueError:
        return None


def summary_line(head: str, seconds: float, manifest: dict[str, Any] | None,
                 started: datetime.datetime) -> str:
    """'[3/7] 02_bld: done in 93.1 s: 80 blocks, 12.4 k tokens/s' from a stage's manifest; says
    when the stage was reused (built before `started`, this run only looked at it)."""
    line = f"{head}: done in {seconds:.1f} s"
    m = manifest or {}
    if m.get("status") != "done":
        return line
    finished = _parse_time(m.get("finished"))  # whole seconds: compare with whole seconds
    if (finished is not None and finished.tzinfo is not None
            and finished < started.replace(microsecond=0)):
        line += f" (reused the stage built {m.get('finished')})"
    numbers = key_numbers(m.get("stage", ""), m.get("metrics") or {})
    return line + (f": {numbers}" if numbers else "")
