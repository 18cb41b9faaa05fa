"""The ranks of a stage that runs under ``torchrun`` (02 BLD, 05 GKD), and those stages' CLI.

Stages 02 and 05 are launched either as one process (``python -m puzzlelib.bld …``, or from
their notebook) or as N processes (``torchrun --nproc_per_node N -m puzzlelib.gkd …``). Both need
the same few things, kept here so the two stages cannot drift apart:

* ``Dist``: this process's rank and the world size, read from the environment torchrun sets
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); one process of world size 1 when they are absent.
  It picks the device (``cuda:<LOCAL_RANK>`` or the CPU), starts the process group (nccl on GPU,
  gloo on CPU) when there is more than one rank, and offers the few collectives the stages use:
  agreeing on success, sums / maxima / means of numbers, rank 0's decision, gradient averaging, a
  barrier. Each is a no-op with one process, so the single-process path runs the same code.
* ``stage_main``: the command line of such a stage (``--preset``, ``--run-name``, ``--set``,
  ``--force``), its exit codes (0 done, 1 the stage failed, 2 a bad config) and the process
  group's teardown.

Reads: torchrun's environment variables. Writes: nothing (the stages write their own folders).
Leaves out: launching the processes (torchrun's job, and its own flags cover multi-node runs),
``DistributedDataParallel`` (GKD averages gradients explicitly, see ``Dist.average_grads``), and
any collective the stages do not use.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from .config import ConfigError, RunConfig, parse_set_args

R = TypeVar("R")


class DistributedError(ValueError):
    """The requested device cannot be used; the message says what to change."""


class Dist:
    """RANK / WORLD_SIZE from torchrun's environment; a single process when they are absent.

    ``device`` is the config's ``device`` field: ``cpu``, ``cuda`` or ``auto`` (CUDA when there
    is one). The process group is started here, once per process; ``stage_main`` destroys it.
    """

    def __init__(self, device: str = "cpu"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if cuda and not torch.cuda.is_available():
            raise DistributedError("device='cuda' but no CUDA device is available; "
                                   "set device=cpu or auto.")
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda
                                   else "cpu")
        if cuda:  # nccl runs collectives (barrier too) on the current device: make it this rank's
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")

    @property
    def main(self) -> bool:
        """Rank 0: the process that owns the stage's manifest and prints."""
        return self.rank == 0

    def _reduce(self, value: float, op) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.item()

    def all_ok(self, ok: bool) -> bool:
        """True on every rank when ``ok`` is true on every rank (a failure anywhere is seen
        everywhere, instead of leaving the other ranks waiting in their next collective)."""
        return bool(self._reduce(1.0 if ok else 0.0, dist.ReduceOp.MIN))

    def sum(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.SUM)

    def max(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.MAX)

    def mean(self, value: float) -> float:
        """The mean of a per-rank number (e.g. the global batch's loss, for logging)."""
        return self.sum(value) / self.world

    def decide(self, value: bool) -> bool:
        """Rank 0's boolean, on every rank."""
        return bool(self._reduce(1.0 if (value and self.main) else 0.0, dist.ReduceOp.MAX))

    def average_grads(self, model: torch.nn.Module) -> None:
        """Mean of every gradient over ranks (what DDP's all-reduce does, made explicit so the
        single-process and N-process paths run the very same optimizer code)."""
        if self.world == 1:
            return
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= self.world

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def stage_main(argv: list[str] | None, module: str, title: str, parallel: str,
               run: Callable[[RunConfig], R], report: Callable[[R], None]) -> int:
    """The CLI of ``python -m puzzlelib.<module>``, a stage that may run under torchrun: parse the
    arguments into a ``RunConfig``, ``run`` it (every rank), ``report`` the result (rank 0 only)
    and tear the process group down. ``title`` and ``parallel`` (what N processes do) go to --help.

    Returns 0 when the stage finished, 1 when it failed (the message goes to stderr), 2 when the
    arguments do not make a valid config.
    """
    cmd = f"-m puzzlelib.{module} --preset smoke"
    ap = argparse.ArgumentParser(
        prog=f"python -m puzzlelib.{module}",
        description=f"{title}. One process: python {cmd}. "
                    f"{parallel}: torchrun --nproc_per_node N {cmd}.")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--run-name", default=None)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field (repeatable), e.g. --set threads=1")
    ap.add_argument("--force", action="store_true",
                    help="redo the stage even when it is fresh (force=True)")
    args = ap.parse_args(argv)
    try:
        overrides = parse_set_args(args.sets)
        if args.force:
            overrides["force"] = True
        cfg = RunConfig.from_preset(args.preset, overrides, args.run_name)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        res = run(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            report(res)
    except (ValueError, RuntimeError) as e:  # the stages' own errors are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
