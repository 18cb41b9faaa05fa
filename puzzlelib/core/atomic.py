"""Atomic writes: a file or a folder appears whole under its name, or not at all.

What it does: ``atomic_path`` (a temp name next to the target, renamed onto it when the block
succeeds), ``atomic_write_bytes`` / ``_text`` / ``_json`` on top of it, ``atomic_dir`` (build a
folder under a temp name, then rename it over the old one) and ``json_default`` (how the kit turns
paths, arrays, dataclasses and sets into JSON). Every artifact of every stage, ``config.json`` and
the run directory's manifests are written through these, so a killed process leaves the old file
or nothing, never half a file.

Reads nothing. Writes only where it is told. Leaves out: locking (``rundir.try_lock``) and
checksums (``rundir.file_sha256``); durability is best effort (fsync of the file and its folder;
some filesystems refuse a folder's fsync).
"""

import dataclasses
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _tmp_sibling(path: Path, tag: str) -> Path:
    # Same directory, so os.replace is a rename on one filesystem; leading dot, so artifact
    # listings skip leftovers of a killed process.
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; durability is best effort
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; if the block succeeds it is renamed onto `path`, if it
    raises the temp file is removed and `path` is untouched. For writers that want a filename
    (safetensors.save_file, torch.save, tokenizer.save)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path, "tmp")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"atomic_path({path}): the block wrote nothing to {tmp}")
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):  # numpy arrays/scalars, torch tensors
        return o.tolist()
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable; convert it first")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Pretty JSON, written atomically. Serialised *before* the file is opened, so an
    unserialisable object leaves nothing behind. NaN/inf are written as NaN/Infinity (Python
    reads them back; strict JSON parsers do not)."""
    text = json.dumps(obj, indent=2, default=json_default) + "\n"
    atomic_write_text(path, text)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temp name, then rename it onto `path` (replacing an old one).
    On error the temp directory is deleted and `path` is untouched. Between the two renames of a
    replacement `path` briefly does not exist; it never exists half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                _fsync(p)
        if path.exists():
            old = _tmp_sibling(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
