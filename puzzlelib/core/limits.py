"""Limits up front: refuse sizes that cannot fit this machine's memory before any work starts.

What it does: `memory_errors(cfg)` (called by `validation.range_errors`, so `show-config`, `run`
and every notebook refuse such a config with exit code 2 before anything is written) estimates a
*lower bound* on the bytes each stage of an embedded-parent run must hold at once, and compares
the largest with the memory of the device that holds it:

    00_parent   the BPE trainer's tables (it reserves them for vocab_size entries up front: the
                tokenizers library reserved ~3 GB of address space for vocab_size=3e7 on this
                machine, and died with a Rust out-of-memory backtrace for 1e9), then training:
                fp32 weights, gradients and AdamW's two moments (16 bytes a parameter) plus one
                step's logits and their gradient (8 bytes x batch x seq_len x vocab). On the CPU:
                the embedded parent is trained there whatever `device` says.
    02_bld      the parent's weights and its three activation streams (tokens x hidden each)
    03_scoring  the parent's weights and its reference logits on every held-out scoring token
    05_gkd      the parent's weights, the child's embeddings with their optimizer state, and two
                fp32 logit tensors (the child's and its gradient) for one micro-batch

Each term counts only what must exist (activations inside the layers, allocator slack and the
Python process itself come on top), so a refusal is certain, never a guess; the message gives
the estimate, the memory (physical RAM or the cgroup limit, whichever is lower, with what is
available now; or the GPU's memory for `device="cuda"`), and the field to lower with the largest
value that fits. A model never trained can still be too slow: that is not checked here.

Reads: /proc/meminfo and the cgroup memory limit (Linux; `os.sysconf` elsewhere), and, for
`device="cuda"`/`"auto"`, the GPU's total memory (torch if it is already imported, else
`nvidia-smi`), each once per process. Writes nothing. Leaves out: HF parents (their sizes are in
their own config.json, read by stage 00; `vocab_size` and the parent_* shape fields do not apply
to them). `PUZZLELIB_SKIP_MEMORY_CHECK=1` switches the check off (e.g. a machine with a lot of
swap, or to reproduce the failure).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import subprocess
import sys
from typing import Any

from .presets import PRESETS

# A `core.config.RunConfig`: named, not imported (config -> validation -> limits is one-way).
Config = Any

SKIP_ENV = "PUZZLELIB_SKIP_MEMORY_CHECK"
# Bytes the tokenizers BPE trainer reserves per vocab_size entry, at least (its hash maps are
# sized for vocab_size; measured: vocab_size=3e7 needed more than 2.5 GB of address space).
BPE_BYTES_PER_TOKEN = 32
# byte tokens + data.SPECIAL_TOKENS: the vocabulary before any merge.
_BASE_VOCAB = 256 + 8
# The fields a user can lower, in the order they are suggested when two help alike.
SIZE_FIELDS = ("vocab_size", "parent_hidden_size", "parent_num_layers", "parent_intermediate_size",
               "seq_len", "parent_batch_size", "bld_tokens_per_variant", "scoring_tokens",
               "gkd_batch_size", "corpus_max_bytes")
# The smallest valid value of a field (validation's ranges): a suggestion below it is no fix.
_MIN = {"vocab_size": _BASE_VOCAB, "seq_len": 2}
_ELT = {"float32": 4, "bfloat16": 2, "float16": 2}
GiB = 1 << 30


def _params(v: dict[str, Any], vocab: int) -> int:
    """Parameters of the embedded parent (parent.embedded_config): embeddings (twice if untied),
    per layer q/k/v/o, a SwiGLU and two RMSNorms, and the final norm."""
    h, heads, kv = v["parent_hidden_size"], v["parent_num_heads"], v["parent_num_kv_heads"]
    hd = h // max(heads, 1)
    layer = 2 * h * heads * hd + 2 * h * kv * hd + 3 * h * v["parent_intermediate_size"] + 2 * h
    return vocab * h * (1 if v["parent_tie_embeddings"] else 2) + v["parent_num_layers"] * layer + h


def stage_bytes(v: dict[str, Any]) -> list[tuple[str, str, int, str]]:
    """[(stage, where, bytes, what)] lower bounds for a config's values (a dict of field values);
    where is "cpu" (always host memory) or "device" (the run's device)."""
    # The BPE cannot learn more merges than its training text has bytes: the model's vocabulary
    # is at most that, however large vocab_size is (the trainer still reserves vocab_size slots).
    vocab = min(v["vocab_size"], _BASE_VOCAB + v["corpus_max_bytes"])
    p = _params(v, vocab)
    elt = _ELT.get(v["dtype"], 4)
    h, t = v["parent_hidden_size"], v["seq_len"]
    emb = vocab * h * (1 if v["parent_tie_embeddings"] else 2)
    micro = max(1, v["gkd_batch_size"] // max(1, v["gkd_grad_accum"]))
    scored = min(v["scoring_tokens"], v["corpus_max_bytes"])  # held-out tokens <= corpus bytes
    streams = 0 if v["bld_activations_on_disk"] else 3 * v["bld_tokens_per_variant"] * h * elt
    return [
        ("00_parent", "cpu", BPE_BYTES_PER_TOKEN * v["vocab_size"],
         f"the BPE trainer's tables for vocab_size={v['vocab_size']:,}"),
        ("00_parent", "cpu", 16 * p + 8 * v["parent_batch_size"] * t * vocab,
         f"training {p:,} parameters (fp32 weights, gradients, AdamW moments) and one step's "
         f"logits ({v['parent_batch_size']} x {t} x {vocab:,})"),
        ("02_bld", "device", elt * p + streams,
         f"the parent's weights and 3 activation streams of {v['bld_tokens_per_variant']:,} "
         f"tokens x {h}"),
        ("03_scoring", "device", elt * p + elt * scored * vocab,
         f"the parent's weights and its logits on {scored:,} scoring tokens x {vocab:,}"),
        ("05_gkd", "device", elt * p + 16 * emb + 8 * micro * t * vocab,
         f"the parent's weights, the child's embeddings with their AdamW state, and one "
         f"micro-batch's logits ({micro} x {t} x {vocab:,})"),
    ]


# ---------------------------------------------------------------------------- the machine

@functools.lru_cache(maxsize=1)
def host_memory() -> tuple[int | None, int | None]:
    """(usable bytes, available-now bytes): physical RAM, capped by a cgroup memory limit."""
    total = avail = None
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                k, _, rest = line.partition(":")
                info[k] = int(rest.split()[0]) * 1024
        total, avail = info.get("MemTotal"), info.get("MemAvailable")
    except (OSError, ValueError, IndexError):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = int(open(path).read().strip())
        except (OSError, ValueError):  # "max" = no limit
            continue
        if total is None or limit < total:
            total = limit
            avail = min(avail, limit) if avail is not None else None
    return total, avail


@functools.lru_cache(maxsize=1)
def gpu_memory() -> tuple[int | None, str]:
    """(total bytes of GPU 0, its name), or (None, "") when no GPU is found. Uses torch only if
    some code imported it already (importing it costs seconds), else nvidia-smi."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                prop = torch.cuda.get_device_properties(0)
                return int(prop.total_memory), str(prop.name)
            return None, ""
        except Exception:  # noqa: BLE001 - a broken CUDA setup: leave the check to the stage
            return None, ""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None, ""
    try:
        out = subprocess.run([exe, "--query-gpu=memory.total,name", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        mib, name = out.splitlines()[0].split(",", 1)
        return int(float(mib)) << 20, name.strip()
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None, ""


def _fmt(n: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", 1 << 20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


# ---------------------------------------------------------------------------- the check

def _peak(v: dict[str, Any], wheres: tuple[str, ...]) -> tuple[int, str, str]:
    """(bytes, stage, what) of the largest term held in one of ``wheres``."""
    rows = [r for r in stage_bytes(v) if r[1] in wheres]
    stage, _, need, what = max(rows, key=lambda r: r[2])
    return need, stage, what


def _largest_fitting(v: dict[str, Any], name: str, wheres: tuple[str, ...],
                     limit: int) -> int | None:
    """The largest value of field ``name`` (<= its current value) whose estimate fits, or None."""
    lo, hi = 1, int(v[name])
    if _peak({**v, name: lo}, wheres)[0] > limit:
        return None
    while lo < hi:  # the estimate grows with every size field: bisect
        mid = (lo + hi + 1) // 2
        if _peak({**v, name: mid}, wheres)[0] <= limit:
            lo = mid
        else:
            hi = mid - 1
    if name == "parent_hidden_size":  # a valid width: whole heads of an even head dim
        lo -= lo % (2 * v["parent_num_heads"])
    return lo or None


def memory_errors(c: Config) -> list[str]:
    """One error per memory (host RAM, GPU) the run cannot fit, or []. See the module docstring."""
    if os.environ.get(SKIP_ENV, "").strip() not in ("", "0") or c.parent != "embedded":
        return []
    names = (*SIZE_FIELDS, "parent_num_heads", "parent_num_kv_heads", "gkd_grad_accum")
    v = {f: getattr(c, f) for f in (*names, "parent_tie_embeddings", "dtype",
                                    "bld_activations_on_disk")}
    if min(v[f] for f in names) <= 0:
        return []  # a range error says so already
    base = {f.name: f.default for f in dataclasses.fields(c)} | PRESETS.get(c.preset, {})
    gpu, gpu_name = gpu_memory() if c.device in ("cuda", "auto") else (None, "")
    total, avail = host_memory()
    if gpu is not None:  # stage 00 trains on the CPU, the others on the GPU
        checks = [(("cpu",), total, "RAM", avail),
                  (("device",), gpu, f"GPU memory ({gpu_name})", None)]
    elif c.device == "cuda":  # no GPU visible here: check what runs on the CPU only
        checks = [(("cpu",), total, "RAM", avail)]
    else:
        checks = [(("cpu", "device"), total, "RAM", avail)]
    errors = []
    for wheres, limit, label, now in checks:
        if limit is None or _peak(v, wheres)[0] <= limit:
            continue
        # Named: the first stage that would run out (where the run would die), by its largest term.
        stage = next(r[0] for r in stage_bytes(v) if r[1] in wheres and r[2] > limit)
        _, need, what = max(((r[0], r[2], r[3]) for r in stage_bytes(v)
                             if r[0] == stage and r[1] in wheres), key=lambda r: r[1])
        # The field to lower: of those that alone can make it fit, the one furthest above its
        # preset's value (the one that was blown up), first in SIZE_FIELDS on a tie.
        # (Not corpus_max_bytes, the last of SIZE_FIELDS: it only caps the vocabulary.)
        best = None
        above = {n: v[n] / max(1, base.get(n, v[n])) for n in SIZE_FIELDS[:-1]}
        for name in above:
            fits = _largest_fitting(v, name, wheres, limit)
            if (fits is not None and fits >= _MIN.get(name, 1)
                    and (best is None or above[name] > best[2])):
                best = (name, fits, above[name])
        raised = sorted((n for n in above if above[n] > 1), key=lambda n: -above[n])
        fix = (f"lower {best[0]} (at most {best[1]:,} fits)" if best else
               "no one field alone brings it down: lower " + (" and ".join(
                   f"{n} ({v[n]:,}; preset {c.preset!r} has {base[n]:,})" for n in raised[:3])
                   or "vocab_size, parent_hidden_size, parent_num_layers or seq_len"))
        errors.append(f"{stage} cannot fit this machine's memory: it needs at least {_fmt(need)} "
                      f"for {what}, and the machine has {_fmt(limit)} of {label}"
                      f"{f' ({_fmt(now)} available now)' if now else ''}; {fix}, or set "
                      f"{SKIP_ENV}=1 to skip this estimate")
    return errors
