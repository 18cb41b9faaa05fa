"""The block library on disk: one trained (layer, variant) block per file, tied to its parent.

What it does: stores what stage 02 (BLD) produces so that scoring, the search, GKD and evaluation
can read blocks *without importing any training code*:

    <library>/index.json                    format, parent fingerprint, settings, variants, jobs
    <library>/channel_scores.safetensors    FFN channel contributions ("layer.<i>") used to prune
    <library>/blocks/L03/attn-kv1.safetensors   the block's tensors, named relative to
                                            "model.layers.3." (its pre-norm included; none for a
                                            no-op, whose file is empty)
    <library>/blocks/L03/attn-kv1.json      its record: loss history, normalized MSE before/after
                                            BLD, tokens, seconds, and the safetensors' sha256

* **Atomic, resumable.** A block is written as safetensors first, then its JSON record, each
  through a temp file + rename. The record is the completion marker: a block "exists" only when
  its record does and the tensor file has the record's size and sha256 (hashed once per process).
  A process killed mid-write leaves at most a dot-prefixed temp file, which nothing reads; a
  damaged block counts as missing, so rerunning stage 02 trains it again.
* **Tied to one parent.** ``index.json`` holds :func:`parent_fingerprint` (sha256 of the parent's
  architecture and every weight, in fp32) and the hash of the settings the blocks were trained
  with. Opening a library for another parent raises :class:`LibraryMismatch`, and so does writing
  into one; nothing is overwritten unless the caller asks with ``overwrite=True``.
* **Ready for ``blocks.build_child``.** :func:`load_blocks` returns ``{(layer, variant_name):
  tensors}``; :func:`child_blocks` / :func:`build_child_from_library` assemble a child from
  per-layer choices, preferring a coupled (attention+FFN trained together) block when the library
  has one for that pair.

Reads/writes: only the library folder. Leaves out: how blocks are trained (``bld.py``), how they
are scored (``scoring.py``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..core.atomic import atomic_path, atomic_write_json
from ..core.rundir import cached_sha256, file_sha256, remember_sha256

FORMAT = 1
INDEX = "index.json"
SCORES = "channel_scores.safetensors"
# Config fields that, besides the weights, define what a parent computes.
_ARCH_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
              "rms_norm_eps", "rope_parameters", "attention_bias", "mlp_bias", "block_configs",
              "tie_word_embeddings")
# Tensor-name prefixes of each half of a layer, for splitting a coupled block.
ATTN_PREFIXES = ("input_layernorm.", "self_attn.")
FFN_PREFIXES = ("post_attention_layernorm.", "mlp.")


class LibraryError(ValueError):
    """A library folder that cannot be used as asked; the message says what to do."""


class LibraryMismatch(LibraryError):
    """The library was built from another parent, or with other settings."""


# ------------------------------------------------------------------------------- fingerprints

def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(_canonical(settings).encode()).hexdigest()[:16]


@torch.no_grad()
def parent_fingerprint(model: torch.nn.Module) -> str:
    """sha256 (24 hex) of the parent's architecture fields and every tensor, cast to fp32.

    Casting to fp32 makes a bf16 checkpoint loaded as fp32 and as bf16 hash alike (the upcast is
    exact). Tied weights are hashed once under their first name.
    """
    h = hashlib.sha256()
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    h.update(_canonical({k: cfg.get(k) for k in _ARCH_KEYS}).encode())
    seen: set[int] = set()
    for name, t in sorted(model.state_dict(keep_vars=False).items()):
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def _as_hash(parent: torch.nn.Module | str) -> str:
    return parent if isinstance(parent, str) else parent_fingerprint(parent)


# ---------------------------------------------------------------------------------- names

def block_stem(name: str) -> str:
    """File stem of a variant: "attn:kv2" -> "attn-kv2", "attn:kv1+ffn:0.50" -> "attn-kv1+ffn-0.50"
    (no ':' in file names, so a library copies onto any filesystem)."""
    return name.replace(":", "-")


def pair_name(attn: str, ffn: str) -> str:
    """Name of a coupled block: "attn:kv1+ffn:0.50"."""
    return f"{attn}+{ffn}"


def split_pair_name(name: str) -> tuple[str, str] | None:
    """("attn:kv1", "ffn:0.50") for a coupled name, None for a single sub-block."""
    if "+" not in name:
        return None
    a, f = name.split("+", 1)
    return a, f


def split_pair_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """A coupled block's tensors -> (attention half, FFN half), names unchanged."""
    attn = {k: v for k, v in tensors.items() if k.startswith(ATTN_PREFIXES)}
    ffn = {k: v for k, v in tensors.items() if k.startswith(FFN_PREFIXES)}
    other = set(tensors) - set(attn) - set(ffn)
    if other:
        raise LibraryError(f"coupled block has tensors of neither half: {sorted(other)[:5]}")
    return attn, ffn


# -------------------------------------------------------------------------------- library

class Library:
    """A block library folder. Use :meth:`create` (writer) or :meth:`open` (reader)."""

    def __init__(self, root: str | Path, index: dict):
        self.root = Path(root)
        self.index = index

    # ---- construction ----
    @classmethod
    def create(cls, root: str | Path, parent: torch.nn.Module | str, settings: dict,
               jobs: Iterable[tuple[int, str]], variants: dict[str, list[str]],
               parent_config: dict | None = None, overwrite: bool = False) -> "Library":
        """Start a library at ``root``, or resume the one there if it was made from the same
        parent with the same settings.

        A library made from another parent or with other settings is refused
        (:class:`LibraryMismatch`, nothing touched) unless ``overwrite=True``, which deletes it.
        A non-empty folder that is not a library is always refused.
        """
        root = Path(root)
        jobs = [[int(i), str(n)] for i, n in jobs]
        if not jobs:
            raise LibraryError("a library needs at least one (layer, variant) job; the variant "
                               "lists are empty")
        index = {"format": FORMAT, "parent_hash": _as_hash(parent),
                 "parent_config": parent_config or {}, "settings": settings,
                 "settings_hash": settings_hash(settings), "variants": variants, "jobs": jobs}
        if (root / INDEX).is_file():
            old = cls.open(root)
            problem = old._mismatch(index["parent_hash"], index["settings_hash"])
            if not problem:
                if old.index["jobs"] != jobs or old.index["variants"] != variants:
                    problem = "it lists other (layer, variant) jobs"
            if not problem:
                return old
            if not overwrite:
                raise LibraryMismatch(f"{root} holds a library that {problem}; refusing to "
                                      "overwrite it. Use another folder, delete it, or pass "
                                      "overwrite=True.")
            cls.delete(root)
        elif root.exists() and any(root.iterdir()):
            raise LibraryError(f"{root} is not empty and holds no {INDEX}: not a block library; "
                               "refusing to write into it. Pass an empty or new folder.")
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(root / INDEX, index)
        return cls(root, index)

    @classmethod
    def open(cls, root: str | Path, parent: torch.nn.Module | str | None = None) -> "Library":
        """Open an existing library; with ``parent`` (model or fingerprint) check it matches."""
        root = Path(root)
        path = root / INDEX
        if not path.is_file():
            raise LibraryError(f"no block library in {root} ({INDEX} missing): run stage 02_bld "
                               "(notebooks/02_bld.ipynb) first")
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LibraryError(f"{path} is not valid JSON ({e}); delete the library and rerun "
                               "stage 02_bld") from None
        if index.get("format") != FORMAT:
            raise LibraryError(f"{path} has format {index.get('format')!r}; this puzzlelib reads "
                               f"format {FORMAT}. Rebuild the library with stage 02_bld.")
        lib = cls(root, index)
        if parent is not None:
            lib.check_parent(parent)
        return lib

    @staticmethod
    def delete(root: str | Path) -> None:
        """Remove a library folder: renamed aside first, so it never exists half-deleted."""
        root = Path(root)
        if not (root / INDEX).is_file():
            raise LibraryError(f"{root} is not a block library; not deleting it")
        aside = root.with_name(f".{root.name}.deleting")
        shutil.rmtree(aside, ignore_errors=True)
        root.rename(aside)
        shutil.rmtree(aside)

    # ---- identity ----
    @property
    def parent_hash(self) -> str:
        return self.index["parent_hash"]

    def _mismatch(self, parent_hash: str, settings_h: str | None = None) -> str:
        if parent_hash != self.parent_hash:
            return (f"was built from another parent (fingerprint {self.parent_hash}, this parent "
                    f"is {parent_hash})")
        if settings_h is not None and settings_h != self.index["settings_hash"]:
            return (f"was trained with other settings (settings hash "
                    f"{self.index['settings_hash']}, now {settings_h})")
        return ""

    def check_parent(self, parent: torch.nn.Module | str) -> None:
        """Raise :class:`LibraryMismatch` unless the library was built from ``parent``."""
        problem = self._mismatch(_as_hash(parent))
        if problem:
            raise LibraryMismatch(f"the block library in {self.root} {problem}. Its blocks "
                                  "imitate another model's sub-blocks; rerun stage 02_bld for "
                                  "this parent.")

    # ---- jobs ----
    def jobs(self) -> list[tuple[int, str]]:
        return [(i, n) for i, n in self.index["jobs"]]

    def _paths(self, layer: int, name: str) -> tuple[Path, Path]:
        d = self.root / "blocks" / f"L{layer:02d}"
        stem = block_stem(name)
        return d / f"{stem}.safetensors", d / f"{stem}.json"

    def has(self, layer: int, name: str) -> bool:
        """True when the block's record exists and its tensor file has the recorded size and
        sha256 (hashed once per process: ``rundir.cached_sha256``). A damaged block is thus
        "missing": stage 02 trains it again, and readers refuse it."""
        tensors, record = self._paths(layer, name)
        if not record.is_file():
            return False
        try:
            rec = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return False
        if not tensors.is_file() or tensors.stat().st_size != rec.get("bytes"):
            return False
        return not rec.get("sha256") or cached_sha256(tensors) == rec["sha256"]

    def missing(self) -> list[tuple[int, str]]:
        return [j for j in self.jobs() if not self.has(*j)]

    def is_complete(self) -> bool:
        return not self.missing()

    # ---- writing ----
    def write_block(self, layer: int, name: str, tensors: dict[str, torch.Tensor],
                    record: dict, parent: torch.nn.Module | str | None = None) -> dict:
        """Write one block atomically (tensors, then the record that marks it complete).

        Refuses a (layer, name) the index does not list, and — when ``parent`` is given — a
        parent other than the library's. Returns the record as written.
        """
        if parent is not None:
            self.check_parent(parent)
        if [layer, name] not in self.index["jobs"]:
            raise LibraryError(f"({layer}, {name!r}) is not a job of the library in {self.root}; "
                               f"its jobs are listed in {INDEX}")
        tpath, rpath = self._paths(layer, name)
        tpath.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(tpath) as tmp:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                      str(tmp), metadata={"layer": str(layer), "variant": name,
                                          "parent_hash": self.parent_hash})
        digest = file_sha256(tpath)
        remember_sha256(tpath, digest)  # has() / readers in this process need not hash it again
        rec = {**record, "layer": layer, "variant": name, "file": tpath.name,
               "bytes": tpath.stat().st_size, "sha256": digest}
        atomic_write_json(rpath, rec)
        return rec

    def write_channel_scores(self, scores: dict[int, torch.Tensor]) -> None:
        with atomic_path(self.root / SCORES) as tmp:
            save_file({f"layer.{i}": s.detach().to("cpu", torch.float32).contiguous()
                       for i, s in scores.items()}, str(tmp),
                      metadata={"parent_hash": self.parent_hash})

    # ---- reading ----
    def record(self, layer: int, name: str) -> dict:
        if not self.has(layer, name):
            tensors = self._paths(layer, name)[0]
            raise LibraryError(f"block ({layer}, {name!r}) is not in the library {self.root} "
                               f"(not trained yet, or its files are damaged: {tensors}); rerun "
                               "stage 02_bld (it trains only the missing or damaged blocks)")
        return json.loads(self._paths(layer, name)[1].read_text(encoding="utf-8"))

    def records(self, with_history: bool = True) -> list[dict]:
        """Every finished block's record, in job order."""
        out = []
        for j in self.jobs():
            if self.has(*j):
                r = self.record(*j)
                if not with_history:
                    r.pop("history", None)
                out.append(r)
        return out

    def read_block(self, layer: int, name: str, dtype: torch.dtype | None = None,
                   device: str | torch.device = "cpu", verify: bool = False) -> dict:
        """One block's tensors (names relative to "model.layers.{layer}."). The file's sha256 is
        checked against its record (once per process); ``verify=True`` hashes it again now."""
        rec = self.record(layer, name)
        path = self._paths(layer, name)[0]
        if verify and file_sha256(path) != rec["sha256"]:
            raise LibraryError(f"{path}: sha256 differs from its record (modified or corrupt); "
                               "delete the block's .json and rerun stage 02_bld to rebuild it")
        try:
            tensors = load_file(str(path), device=str(device))
        except SafetensorError as e:
            raise LibraryError(f"{path} is not a readable safetensors file ({e}); delete the "
                               "block's .json and rerun stage 02_bld to rebuild it") from None
        if dtype is not None:
            tensors = {k: v.to(dtype) for k, v in tensors.items()}
        return tensors

    def channel_scores(self) -> dict[int, torch.Tensor] | None:
        """The FFN channel contributions the pruned variants were initialised with (or None)."""
        path = self.root / SCORES
        if not path.is_file():
            return None
        return {int(k.split(".")[1]): v for k, v in load_file(str(path)).items()}


# ------------------------------------------------------------------------ consumers' helpers

def load_blocks(root: str | Path, parent: torch.nn.Module | str | None = None,
                layers: Iterable[int] | None = None, variants: Iterable[str] | None = None,
                dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                verify: bool = False, require_complete: bool = True) -> dict[tuple[int, str], dict]:
    """``{(layer, variant_name): tensors}`` for ``blocks.build_child(..., blocks=...)``.

    ``parent`` (a model or its fingerprint) is checked against the library's; ``layers`` /
    ``variants`` filter; an incomplete library is refused unless ``require_complete=False``.
    """
    lib = Library.open(root, parent)
    if require_complete and not lib.is_complete():
        miss = lib.missing()
        raise LibraryError(f"the library in {lib.root} is incomplete: {len(miss)} blocks missing, "
                           f"e.g. {miss[:3]}; finish stage 02_bld (it resumes) first")
    layers = None if layers is None else set(layers)
    variants = None if variants is None else set(variants)
    return {(i, n): lib.read_block(i, n, dtype, device, verify) for i, n in lib.jobs()
            if (layers is None or i in layers) and (variants is None or n in variants)
            and lib.has(i, n)}


def child_blocks(root: str | Path, parent: torch.nn.Module | str,
                 choices: list[tuple[str, str]], prefer_coupled: bool = True,
                 dtype: torch.dtype | None = None) -> dict[tuple[int, str], dict]:
    """The library blocks a child with per-layer ``choices`` [(attn_name, ffn_name), ...] needs.

    For each layer, a coupled block for exactly that pair is used when the library has one (and
    ``prefer_coupled``); otherwise the two decoupled blocks. A choice the library lacks raises.
    """
    lib = Library.open(root, parent)
    out: dict[tuple[int, str], dict] = {}
    for i, (a, f) in enumerate(choices):
        a, f = str(a), str(f)
        pair = pair_name(a, f)
        if prefer_coupled and lib.has(i, pair):
            ta, tf = split_pair_tensors(lib.read_block(i, pair, dtype))
            out[(i, a)], out[(i, f)] = ta, tf
            continue
        for n in (a, f):
            if not lib.has(i, n):
                raise LibraryError(f"layer {i}: variant {n!r} is not in the library {lib.root}; "
                                   f"its variants are {lib.index['variants']}")
            out[(i, n)] = lib.read_block(i, n, dtype)
    return out


def build_child_from_library(parent: torch.nn.Module, choices: list[tuple[str, str]],
                             root: str | Path, prefer_coupled: bool = True):
    """A child whose every block comes from the library (BLD-trained), ready to score or train."""
    from ..core.blocks import build_child  # here: the library itself needs no model code to read

    lib = Library.open(root, parent)
    blocks = child_blocks(root, lib.parent_hash, choices, prefer_coupled)
    return build_child(parent, choices, channel_scores=lib.channel_scores(), blocks=blocks)
