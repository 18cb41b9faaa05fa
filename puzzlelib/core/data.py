"""Corpora, the byte-level BPE tokenizer, packed token files and deterministic batches.

What it does
    1. Reads a corpus -- the running Python's standard library ("stdlib", the embedded default), a
       local .txt file, a .jsonl file ({"text": ...} per line), a folder of .txt/.py/.md files, or
       "hf:<name>[:<config>]" when `datasets` is installed and the network is reachable -- caps it
       at `max_bytes` and splits it into train / held-out *by document* (a file, a jsonl line, a
       piece of a single .txt file), so evaluation tasks can be built from whole unseen files.
    2. Trains a byte-level BPE tokenizer (`tokenizers`) and saves it as a `transformers` tokenizer.
    3. Encodes the corpus into flat token files (`train.bin`, `heldout.bin`, `tokens.json`), each
       document followed by <|eos|>, and serves deterministic, resumable random training windows,
       fixed held-out windows and calibration windows as int64 torch tensors.

Reads: the corpus named by `spec`. Writes: a tokenizer folder (`train_tokenizer`) and a token cache
folder (`build_token_cache`); nothing else. Every write is atomic (temporary name, then rename).

Leaves out: document-aware attention masks (windows cross <|eos|> boundaries, as in nanoGPT),
de-duplication, data-loader worker processes (a batch is one numpy gather), streaming of local
files larger than memory, and escaping of literal "<|eos|>" strings inside the text.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import socket
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from .atomic import atomic_dir, atomic_path
from .config import resolve_path

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD]  # ids 0, 1, 2: the trainer adds special tokens first
MAX_FILE_BYTES = 1_000_000  # larger files are generated data (tables, dumps), not prose or code
# Path parts that mark test suites or non-stdlib code inside the stdlib folder.
# encodings/ (codec tables) and pydoc_data/ (doc strings dumped as data) are generated, not
# written code: they would make "which line comes next" trivially easy and teach the parent tables.
STDLIB_EXCLUDED_PARTS = {"test", "tests", "idle_test", "__pycache__", "site-packages",
                         "dist-packages", "encodings", "pydoc_data"}
FOLDER_SUFFIXES = {".txt", ".py", ".md"}
TOKENIZER_META = "puzzlelib_tokenizer.json"


class DataError(ValueError):
    """A corpus, tokenizer or token cache cannot be used; the message says what to change."""


# ----------------------------------------------------------------------------------- corpora
def _read_tree(root: Path, suffixes: set[str], excluded_parts: set[str]):
    """Return ([(relative path, text, nbytes)], [skipped names]) for files under root, sorted.

    Excluded and hidden folders are pruned during the walk (the stdlib folder may hold a large
    site-packages); files > MAX_FILE_BYTES or not UTF-8 are skipped and named in the second list.
    """
    kept, skipped, paths = [], [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in excluded_parts and not d.startswith(".")]
        paths += [Path(dirpath, f).relative_to(root) for f in filenames
                  if Path(f).suffix in suffixes and not f.startswith(".")]
    for rel in sorted(paths, key=lambda r: r.as_posix()):
        full = root / rel
        if not full.is_file():
            continue
        if full.stat().st_size > MAX_FILE_BYTES:
            skipped.append(rel.as_posix())
            continue
        try:
            raw = full.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {full}: {e.strerror}; fix its permissions") from e
        try:
            kept.append((rel, raw.decode("utf-8"), len(raw)))
        except UnicodeDecodeError:  # e.g. latin-1 fixtures; the model is trained on UTF-8 text
            skipped.append(rel.as_posix())
    return kept, skipped


def _read_stdlib(root: Path | None):
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"stdlib folder {root} does not exist; pass the folder holding os.py")
    kept, skipped = _read_tree(root, {".py"}, STDLIB_EXCLUDED_PARTS)
    # _sysconfigdata_*.py is the interpreter's build configuration (compiler flags, install
    # paths): machine-specific, so keeping it would give two installs of one Python different
    # fingerprints.
    kept = [k for k in kept if not k[0].name.startswith("_sysconfigdata")]
    return kept, skipped


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Relative paths of the stdlib's .py sources, sorted, without test suites, site-packages,
    __pycache__, files > 1 MB and files that are not UTF-8."""
    return [rel for rel, _, _ in _read_stdlib(root)[0]]


def _unit_hash(*parts) -> float:
    """A number in [0, 1) from a sha256 of the parts: stable across runs, machines and Pythons
    (unlike hash(), which is salted per process)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_files(files: list, heldout_fraction: float, seed: int,
                key=lambda f: f.as_posix() if isinstance(f, PurePath) else str(f)):
    """Split documents into (train, heldout) by a hash of (seed, key(document)).

    key gives a document's name (default: its relative path). A document's side depends only on
    its own name and the seed, not on which other documents are present -- so a larger corpus
    (a bigger max_bytes) never moves a smoke-run training file into the held-out set. Order
    within each side is kept. With >= 2 documents and a positive fraction, each side gets at
    least one document.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise DataError(f"heldout_fraction={heldout_fraction} must be in [0, 1); 0.05 is typical")
    keys = [_unit_hash("split", seed, key(f)) for f in files]
    held = {i for i, k in enumerate(keys) if k < heldout_fraction}
    if heldout_fraction > 0 and len(files) >= 2:
        # Small corpora may land entirely on one side by chance: move the extreme-hash document.
        if not held:
            held = {min(range(len(files)), key=keys.__getitem__)}
        if len(held) == len(files):
            held.discard(max(range(len(files)), key=keys.__getitem__))
    train = [f for i, f in enumerate(files) if i not in held]
    heldout = [f for i, f in enumerate(files) if i in held]
    return train, heldout


@dataclass
class Corpus:
    source: str
    python_version: str
    train_docs: list[str]
    heldout_docs: list[str]
    train_names: list[str]
    heldout_names: list[str]
    fingerprint: str  # sha256 over (side, name, bytes, sha256 of content) of every document
    train_bytes: int
    heldout_bytes: int
    skipped: list[str] = field(default_factory=list)  # filtered out: > 1 MB or not UTF-8

    def summary(self) -> dict:
        """Everything but the texts: what a stage manifest should record."""
        return {"source": self.source, "python_version": self.python_version,
                "fingerprint": self.fingerprint, "train_docs": len(self.train_docs),
                "heldout_docs": len(self.heldout_docs), "train_bytes": self.train_bytes,
                "heldout_bytes": self.heldout_bytes, "skipped": len(self.skipped),
                "heldout_names": self.heldout_names}


def _read_text_file(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read corpus file {path}: {e.strerror}; fix its permissions") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"corpus file {path} is not UTF-8 (bad byte at offset {e.start}); "
                        "convert it, e.g. `iconv -f latin1 -t utf-8`") from e


def _read_txt(path: Path) -> list[tuple[str, str]]:
    """One .txt file becomes pieces cut at line ends, so it can still be split by document."""
    text = _read_text_file(path)
    piece = min(32_768, max(1_024, len(text) // 50))  # ~50 pieces, 1-32 KB each
    docs, start = [], 0
    while start < len(text):
        end = text.find("\n", start + piece)
        end = len(text) if end < 0 else end + 1
        docs.append((f"{path.name}#{len(docs):05d}", text[start:end]))
        start = end
    return docs


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    docs = []
    for lineno, line in enumerate(_read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be "
                            'an object like {"text": "..."}') from e
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f'{path}:{lineno}: expected an object with a string "text" field, '
                            f"got {line[:80]!r}")
        docs.append((f"{path.name}:{lineno}", row["text"]))
    return docs


def _offline_reason(host: str = "huggingface.co") -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return f"{var} is set"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as e:
        return f"cannot reach {host}:443 ({e})"
    return None


def _read_hf(spec: str, max_bytes: int) -> list[tuple[str, str]]:
    name, _, config = spec[3:].partition(":")
    local_hint = ("use a local corpus instead: 'stdlib', a .txt file, a .jsonl file with one "
                  '{"text": ...} per line, or a folder of .txt/.py/.md files')
    if not name:
        raise DataError(f"corpus {spec!r}: write hf:<dataset>[:<config>], e.g. hf:wikitext:"
                        "wikitext-2-raw-v1")
    try:
        import datasets  # optional: only the hf: path needs it
    except ImportError as e:
        raise DataError(f"corpus {spec!r} needs the `datasets` package (pip install datasets); "
                        f"or {local_hint}") from e
    reason = _offline_reason()
    if reason:
        raise DataError(f"corpus {spec!r}: this machine looks offline ({reason}); {local_hint}")
    try:
        stream = datasets.load_dataset(name, config or None, split="train", streaming=True)
    except Exception as e:  # datasets raises many types; the user needs the message either way
        raise DataError(f"corpus {spec!r}: datasets.load_dataset failed: {e}") from e
    docs, total = [], 0
    for i, row in enumerate(tqdm(stream, desc=f"read {name}", unit="doc")):
        if not isinstance(row.get("text"), str):
            raise DataError(f"corpus {spec!r}: rows have no string 'text' column ({list(row)})")
        docs.append((f"{name}#{i:09d}", row["text"]))
        total += len(row["text"].encode())
        if total >= max_bytes:
            break
    return docs


def load_corpus(spec: str, max_bytes: int, heldout_fraction: float, seed: int) -> Corpus:
    """Read a corpus, cap it at max_bytes and split it into train / held-out by document.

    The cap takes whole documents in a fixed order while they fit: stdlib and folders in a hash
    order of their relative paths, .jsonl/.txt in file order, hf: in stream order. See the
    module docstring for the specs; errors are DataError naming the path and the fix.
    """
    if max_bytes <= 0:
        raise DataError(f"max_bytes={max_bytes} must be positive (e.g. 1_500_000)")
    if not 0.0 <= heldout_fraction < 1.0:
        raise DataError(f"heldout_fraction={heldout_fraction} must be in [0, 1); 0.05 is typical")
    skipped: list[str] = []
    if spec == "stdlib":
        kept, skipped = _read_stdlib(None)
        # Files are taken in a fixed hash order, not alphabetically, so a small cap samples the
        # whole library instead of only modules that start with "_" or "a".
        entries = sorted(((r.as_posix(), t) for r, t, _ in kept),
                         key=lambda e: _unit_hash("order", e[0]))
    elif spec.startswith("hf:"):
        entries = _read_hf(spec, max_bytes)
    else:
        path = resolve_path(spec)
        if path.is_dir():
            kept, skipped = _read_tree(path, FOLDER_SUFFIXES, {"__pycache__"})
            entries = sorted(((r.as_posix(), t) for r, t, _ in kept),
                             key=lambda e: _unit_hash("order", e[0]))
        elif path.is_file() and path.suffix == ".jsonl":
            entries = _read_jsonl(path)
        elif path.is_file() and path.suffix in {".txt", ".py", ".md"}:
            entries = _read_txt(path)
        elif path.is_file():
            raise DataError(f"corpus file {path} has suffix {path.suffix!r}; use .txt or .jsonl")
        else:
            raise DataError(f"corpus {spec!r}: no such file or folder; set it to 'stdlib', a "
                            ".txt/.jsonl file, a folder, or hf:<name>[:<config>]")
    # Cap: take documents in order while they fit; skipping one that does not fit (instead of
    # stopping) lets a small cap still fill up with smaller documents.
    picked, total = [], 0
    for name, text in entries:
        n = len(text.encode("utf-8"))
        if n == 0 or not text.strip():
            continue
        if total + n <= max_bytes:
            picked.append((name, text, n))
            total += n
    if not picked:
        if any(t.strip() for _, t in entries):
            why = (f"corpus_max_bytes={max_bytes} is smaller than every document; raise "
                   "corpus_max_bytes")
        else:
            why = "it holds no text" + (f"; skipped (> 1 MB or not UTF-8): {skipped[:5]}"
                                        if skipped else "")
        raise DataError(f"corpus {spec!r} is empty: {why}")
    if heldout_fraction > 0 and len(picked) < 2:
        # Only advice that works: heldout_fraction must stay > 0 (validation.py), and the cap is
        # the config field corpus_max_bytes.
        texts = sum(1 for _, t in entries if t.strip())
        more = (f"raise corpus_max_bytes (now {max_bytes}): only one of its {texts} documents fits"
                if texts > 1 else
                "add documents: more lines in a .jsonl, more files in a folder, or more text in a "
                ".txt (it is cut at line ends into pieces of at least 1 KB: give it 2 KB or more, "
                "over several lines)")
        raise DataError(f"corpus {spec!r} has one document, so nothing can be held out for "
                        f"evaluation; {more}")
    train, heldout = split_files(picked, heldout_fraction, seed, key=lambda e: e[0])
    h = hashlib.sha256()
    for side, docs in (("train", train), ("heldout", heldout)):
        for name, text, n in docs:
            content = hashlib.sha256(text.encode("utf-8")).hexdigest()
            h.update(f"{side}\t{name}\t{n}\t{content}\n".encode())
    return Corpus(source=spec, python_version=platform.python_version(),
                  train_docs=[t for _, t, _ in train], heldout_docs=[t for _, t, _ in heldout],
                  train_names=[n for n, _, _ in train], heldout_names=[n for n, _, _ in heldout],
                  fingerprint=h.hexdigest(), train_bytes=sum(n for *_, n in train),
                  heldout_bytes=sum(n for *_, n in heldout), skipped=skipped)


# --------------------------------------------------------------------------------- tokenizer
def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON (vocab, merges, pre-tokenizer, specials)."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    return hashlib.sha256(json.dumps(backend, sort_keys=True).encode()).hexdigest()


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise DataError(f"no tokenizer in {path} (tokenizer.json missing); run train_tokenizer "
                        "(stage 00_parent) first")
    # trust_remote_code=False: a checkpoint folder's config.json carries an auto_map for the model
    # code; without an explicit answer AutoTokenizer would stop and ask about it interactively.
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def train_tokenizer(docs: list[str], vocab_size: int, out_dir: str | Path, seq_len: int = 1024,
                    max_train_bytes: int = 16_000_000, reuse: bool = True):
    """Train a byte-level BPE on docs (whole documents, in order, until max_train_bytes is
    reached); save it to out_dir. 12 MB trains in ~1.5 s on 2 cores, so the cap only matters
    for large custom corpora.

    Returns a `PreTrainedTokenizerFast` with <|bos|>=0, <|eos|>=1, <|pad|>=2 and
    model_max_length=seq_len. Training is deterministic: the same docs give the same merges.
    If out_dir already holds a tokenizer trained on the same text with the same vocab_size,
    it is loaded instead (set reuse=False to force training).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DataError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs 256 byte "
                        f"tokens + {len(SPECIAL_TOKENS)} special tokens, so at least 259 "
                        "(512 for smoke runs, 2048 by default)")
    # Cap by whole documents in their given order, so the cap is deterministic.
    sample, total = [], 0
    for d in docs:
        if total >= max_train_bytes:
            break
        sample.append(d)
        total += len(d.encode("utf-8"))
    if not sample:
        raise DataError("train_tokenizer got no text; pass corpus.train_docs")
    h = hashlib.sha256()
    for d in sample:
        h.update(hashlib.sha256(d.encode("utf-8")).digest())
    meta = {"vocab_size": vocab_size, "train_bytes": total, "train_docs": len(sample),
            "train_sha256": h.hexdigest(), "seq_len": seq_len}
    out_dir = Path(out_dir)
    meta_path = out_dir / TOKENIZER_META
    if out_dir.exists() and any(out_dir.iterdir()) and not meta_path.is_file():
        raise DataError(f"{out_dir} is not empty and holds no tokenizer of ours; refusing to "
                        "overwrite it -- pass an empty or new folder")
    if reuse and meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if {k: old.get(k) for k in meta} == meta:
            return load_tokenizer(out_dir)

    tok = Tokenizer(models.BPE())
    # No normalizer and ByteLevel on both sides: decode(encode(s)) == s for any string, which
    # bits-per-byte and "which line comes next" tasks rely on. add_prefix_space=False so a
    # document's first token is not changed by the tokenizer.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=True)
    t0 = time.perf_counter()
    tok.train_from_iterator(sample, trainer=trainer, length=len(sample))
    meta["train_seconds"] = round(time.perf_counter() - t0, 3)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                 pad_token=PAD, model_max_length=seq_len,
                                 clean_up_tokenization_spaces=False)
    meta["tokenizer_hash"] = tokenizer_hash(hf)
    # Saved into a temporary sibling, then swapped in: a crash never leaves half a tokenizer.
    with atomic_dir(out_dir) as tmp:
        hf.save_pretrained(str(tmp))
        (tmp / TOKENIZER_META).write_text(json.dumps(meta, indent=2) + "\n")
    return hf


# ---------------------------------------------------------------------------- packed tokens
def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def encode_docs(tokenizer, docs: list[str], batch_docs: int = 64,
                desc: str = "encode") -> np.ndarray:
    """Concatenate the token ids of every document, each followed by <|eos|>."""
    backend = tokenizer.backend_tokenizer  # the Rust tokenizer: encode_batch uses every core
    dtype = token_dtype(len(tokenizer))
    eos = np.array([tokenizer.eos_token_id], dtype=dtype)
    parts = []
    for i in tqdm(range(0, len(docs), batch_docs), desc=desc, unit="batch", leave=False):
        for enc in backend.encode_batch(docs[i:i + batch_docs], add_special_tokens=False):
            parts += [np.asarray(enc.ids, dtype=dtype), eos]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _atomic_write_bytes(path: Path, write) -> None:
    try:
        with atomic_path(path) as tmp:
            write(tmp)
    except OSError as e:
        # numpy's tofile reports a short write as "N requested and M written", without errno:
        # say what it almost always means.
        msg = (f"writing {path} failed ({e.strerror or e}): the disk is probably full or over "
               "quota; free disk space or set runs_root to a folder on a disk with room")
        raise (OSError(e.errno, msg) if e.errno else OSError(msg)) from e


def build_token_cache(corpus: Corpus, tokenizer, cache_dir: str | Path) -> dict:
    """Write train.bin / heldout.bin (raw token ids) and tokens.json; reuse them if they were
    built from the same corpus fingerprint and tokenizer. Returns tokens.json plus "reused"."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta_path = cache_dir / "tokens.json"
    key = {"fingerprint": corpus.fingerprint, "tokenizer_hash": tokenizer_hash(tokenizer)}
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        size = {s: (cache_dir / f"{s}.bin").stat().st_size if (cache_dir / f"{s}.bin").is_file()
                else -1 for s in ("train", "heldout")}
        sizes_ok = all(size[s] == old[f"n_{s}_tokens"] * np.dtype(old["dtype"]).itemsize
                       for s in size)
        if {k: old.get(k) for k in key} == key and sizes_ok:
            return {**old, "reused": True}
    t0 = time.perf_counter()
    arrays = {"train": encode_docs(tokenizer, corpus.train_docs, desc="encode train"),
              "heldout": encode_docs(tokenizer, corpus.heldout_docs, desc="encode heldout")}
    seconds = time.perf_counter() - t0
    meta = {**key, "dtype": str(token_dtype(len(tokenizer))), "vocab_size": len(tokenizer),
            "eos_id": tokenizer.eos_token_id, "source": corpus.source,
            "python_version": corpus.python_version,
            "n_train_tokens": int(arrays["train"].size),
            "n_heldout_tokens": int(arrays["heldout"].size),
            "train_bytes": corpus.train_bytes, "heldout_bytes": corpus.heldout_bytes,
            "train_docs": len(corpus.train_docs), "heldout_docs": len(corpus.heldout_docs),
            "tokens_per_byte": round(arrays["train"].size / max(corpus.train_bytes, 1), 4),
            "encode_seconds": round(seconds, 3)}
    # tokens.json is written last: it is the marker that both .bin files are complete.
    meta_path.unlink(missing_ok=True)
    for split, arr in arrays.items():
        _atomic_write_bytes(cache_dir / f"{split}.bin", arr.tofile)
    _atomic_write_bytes(meta_path, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return {**meta, "reused": False}


def load_tokens(cache_dir: str | Path, split: str = "train") -> np.ndarray:
    """Memory-map train.bin or heldout.bin of a token cache (read-only)."""
    meta_path = Path(cache_dir) / "tokens.json"
    if not meta_path.is_file():
        raise DataError(f"no token cache in {cache_dir}; run build_token_cache (stage 00) first")
    meta = json.loads(meta_path.read_text())
    n = meta[f"n_{split}_tokens"]
    if n == 0:  # np.memmap refuses empty files
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(Path(cache_dir) / f"{split}.bin", dtype=meta["dtype"], mode="r", shape=(n,))


# ----------------------------------------------------------------------------------- batches
def _check_windows(tokens: np.ndarray, seq_len: int) -> None:
    if seq_len < 1 or len(tokens) < seq_len + 1:
        raise DataError(f"only {len(tokens)} tokens, but one window needs seq_len+1 = "
                        f"{seq_len + 1}; use a larger corpus (max_bytes) or a smaller seq_len")


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int):
    w = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    # Contiguous copies: losses call y.view(-1), which fails on a strided slice.
    return torch.from_numpy(w[:, :-1].copy()), torch.from_numpy(w[:, 1:].copy())


def batch_at(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int):
    """Training batch number `step`: random windows drawn from a generator seeded by
    (seed, step) alone, so a run resumed at step k sees exactly the batches an uninterrupted run
    sees, with no generator state to checkpoint. The last seed word (non-zero) keeps this stream
    apart from sample_windows'."""
    rng = np.random.default_rng([seed, step, 0xB47C])
    return _windows(tokens, rng.integers(0, len(tokens) - seq_len, size=batch_size), seq_len)


def batches(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, start_step: int = 0,
            num_steps: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) int64 batches of shape [batch_size, seq_len], y = x shifted by one; endless unless
    num_steps is given. Starting at start_step=k yields what an uninterrupted run yields at k."""
    _check_windows(tokens, seq_len)  # here, not lazily at the first batch
    steps = (itertools.count(start_step) if num_steps is None
             else range(start_step, start_step + num_steps))
    return (batch_at(tokens, batch_size, seq_len, seed, step) for step in steps)


def heldout_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                    max_tokens: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed windows from the start of `tokens`, stride seq_len: every target token is scored
    exactly once, and every model sees identical data. max_tokens caps the scored tokens."""
    _check_windows(tokens, seq_len)
    n = (len(tokens) - 1) // seq_len
    if max_tokens is not None:
        n = max(1, min(n, max_tokens // seq_len))
    starts = np.arange(n) * seq_len
    return [_windows(tokens, starts[i:i + batch_size], seq_len) for i in range(0, n, batch_size)]


def sample_windows(tokens: np.ndarray, n: int, seq_len: int, seed: int):
    """n distinct random windows -> (x, y) of shape [n, seq_len]; deterministic in seed."""
    _check_windows(tokens, seq_len)
    positions = len(tokens) - seq_len
    rng = np.random.default_rng([seed, 0x5A3E])
    starts = rng.choice(positions, size=n, replace=n > positions)
    return _windows(tokens, np.asarray(starts), seq_len)


def calibration_batches(tokens: np.ndarray, n: int, batch_size: int, seq_len: int, seed: int):
    """Calibration data (channel contributions, BLD inputs): sample_windows cut into batches."""
    x, y = sample_windows(tokens, n, seq_len, seed)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]
