"""Fast tests for puzzlelib.core.data: corpora, split, tokenizer, token cache and batches (CPU, ~5 s)."""
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from puzzlelib.core import data
from puzzlelib.core.data import DataError

SNIPPET = 'def f(x):\n\treturn {"a": x , \'héllo ☃\'}  # trailing  \r\n\n    pass\n'


@pytest.fixture(scope="module")
def corpus():
    return data.load_corpus("stdlib", max_bytes=300_000, heldout_fraction=0.1, seed=0)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    data.train_tokenizer(corpus.train_docs, 384, out, seq_len=64)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return data.load_tokenizer(tok_dir)


# ----------------------------------------------------------------------------- stdlib + split
def test_stdlib_files_deterministic_and_without_tests():
    files = data.stdlib_files()
    assert files == data.stdlib_files() and files == sorted(files, key=lambda p: p.as_posix())
    posix = {f.as_posix() for f in files}
    assert {"os.py", "json/__init__.py"} <= posix
    for f in files:
        assert not ({"test", "tests", "idle_test", "__pycache__", "site-packages"} & set(f.parts))
        assert f.suffix == ".py" and not f.is_absolute()


def test_stdlib_filters_on_a_fake_root(tmp_path):
    keep = ["a.py", "pkg/b.py", "idlelib/c.py"]
    drop = ["test/t.py", "pkg/tests/t.py", "idlelib/idle_test/t.py", "lib2to3/tests/t.py",
            "site-packages/x/y.py", "__pycache__/z.py", "_sysconfigdata__linux.py"]
    for rel in keep + drop:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    (tmp_path / "big.py").write_text("#" * (data.MAX_FILE_BYTES + 1))
    (tmp_path / "latin.py").write_bytes(b"s = '\xe9'\n")
    assert [f.as_posix() for f in data.stdlib_files(tmp_path)] == sorted(keep)


def test_split_by_file_disjoint_deterministic():
    files = [Path(f"m{i}/f{i}.py") for i in range(200)]
    train, held = data.split_files(files, 0.2, seed=1)
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(files)
    assert 20 <= len(held) <= 60
    assert (train, held) == data.split_files(files, 0.2, seed=1)
    assert held != data.split_files(files, 0.2, seed=2)[1]
    # A file's side depends on its name and the seed only, not on the other files.
    _, held_half = data.split_files(files[:100], 0.2, seed=1)
    assert set(held_half) == set(held) & set(files[:100])
    # Tiny corpora still get one document on each side.
    assert [len(s) for s in data.split_files(["a", "b"], 0.05, seed=0)] == [1, 1]


def test_stdlib_corpus(corpus):
    assert 0 < corpus.train_bytes + corpus.heldout_bytes <= 300_000
    assert corpus.heldout_docs and len(corpus.heldout_names) == len(corpus.heldout_docs)
    assert set(corpus.heldout_names).isdisjoint(corpus.train_names)
    assert corpus.python_version == ".".join(map(str, sys.version_info[:3]))
    again = data.load_corpus("stdlib", max_bytes=300_000, heldout_fraction=0.1, seed=0)
    assert again.fingerprint == corpus.fingerprint and again.heldout_names == corpus.heldout_names
    other = data.load_corpus("stdlib", max_bytes=300_000, heldout_fraction=0.1, seed=1)
    assert other.fingerprint != corpus.fingerprint
    # A bigger cap never moves a file to the other side.
    big = data.load_corpus("stdlib", max_bytes=1_000_000, heldout_fraction=0.1, seed=0)
    assert set(corpus.heldout_names) & set(big.train_names) == set()
    assert json.dumps(corpus.summary())


# ------------------------------------------------------------------------------ other corpora
def test_jsonl_txt_and_folder_corpora(tmp_path):
    rows = [{"text": f"document number {i}\n" * 5} for i in range(20)]
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows[:10]) + "\n\n" +
                  "\n".join(json.dumps(r) for r in rows[10:]) + "\n")
    c = data.load_corpus(str(jl), 10**6, 0.2, seed=0)
    assert sorted(c.train_docs + c.heldout_docs) == sorted(r["text"] for r in rows)
    assert all(n.startswith("c.jsonl:") for n in c.train_names + c.heldout_names)

    txt = tmp_path / "book.txt"
    text = "".join(f"line {i} of a long book\n" for i in range(3000))
    txt.write_text(text)
    c = data.load_corpus(str(txt), 10**6, 0.1, seed=0)
    pieces = sorted(zip(c.train_names + c.heldout_names, c.train_docs + c.heldout_docs))
    assert len(pieces) > 10 and "".join(p for _, p in pieces) == text and c.heldout_docs

    folder = tmp_path / "docs"
    for rel in ["a.md", "sub/b.py", "sub/c.txt", "d.bin", ".hidden/e.txt", "__pycache__/f.py"]:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(f"content of {rel}\n")
    c = data.load_corpus(str(folder), 10**6, 0.3, seed=0)
    assert sorted(c.train_names + c.heldout_names) == ["a.md", "sub/b.py", "sub/c.txt"]


def _error(spec, **kw):
    args = {"max_bytes": 10**6, "heldout_fraction": 0.1, "seed": 0, **kw}
    with pytest.raises(DataError) as e:
        data.load_corpus(spec, **args)
    return str(e.value)


def test_bad_corpora_raise_helpful_errors(tmp_path, monkeypatch):
    (tmp_path / "empty.txt").write_text("")
    assert "empty" in _error(str(tmp_path / "empty.txt"))
    assert "no such file" in _error(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    assert "bad.jsonl:2" in _error(str(bad)) and "JSON" in _error(str(bad))
    (tmp_path / "notext.jsonl").write_text('{"body": "x"}\n')
    assert '"text"' in _error(str(tmp_path / "notext.jsonl"))
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n" * 10)
    assert "not UTF-8" in _error(str(tmp_path / "latin.txt"))
    (tmp_path / "data.csv").write_text("a,b\n")
    assert ".jsonl" in _error(str(tmp_path / "data.csv"))
    (tmp_path / "tiny.txt").write_text("one line\n")
    tiny = _error(str(tmp_path / "tiny.txt"))  # advice that validation accepts (#17 A8)
    assert "one document" in tiny and "2 KB or more" in tiny and "heldout_fraction=0" not in tiny
    assert data.load_corpus(str(tmp_path / "tiny.txt"), 100, 0.0, 0).train_docs == ["one line\n"]
    assert "raise corpus_max_bytes" in _error("stdlib", max_bytes=10)
    assert "heldout_fraction" in _error("stdlib", heldout_fraction=1.0)
    (tmp_path / "empty_dir").mkdir()
    assert "empty" in _error(str(tmp_path / "empty_dir"))

    # hf: offline must fail fast, without ever calling load_dataset.
    def boom(*a, **k):
        raise AssertionError("load_dataset must not be called offline")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=boom))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = _error("hf:wikitext:wikitext-2-raw-v1")
    assert "offline" in msg and ".jsonl" in msg
    assert "hf:<dataset>" in _error("hf:")


# -------------------------------------------------------------------------------- tokenizer
def test_tokenizer_deterministic_and_round_trips(corpus, tok, tok_dir, tmp_path):
    other = data.train_tokenizer(corpus.train_docs, 384, tmp_path / "again", seq_len=64,
                                 reuse=False)
    assert data.tokenizer_hash(other) == data.tokenizer_hash(tok)
    a = json.loads((tok_dir / "tokenizer.json").read_text())["model"]
    b = json.loads((tmp_path / "again" / "tokenizer.json").read_text())["model"]
    assert a["vocab"] == b["vocab"] and a["merges"] == b["merges"]
    assert len(tok) == 384 and tok.model_max_length == 64
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    ids = tok(SNIPPET, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(SNIPPET.encode()) and tok.decode(ids) == SNIPPET
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tok_dir)).decode(ids) == SNIPPET


def test_tokenizer_reuse_and_errors(corpus, tok_dir):
    mtime = (tok_dir / "tokenizer.json").stat().st_mtime_ns
    data.train_tokenizer(corpus.train_docs, 384, tok_dir, seq_len=64)
    assert (tok_dir / "tokenizer.json").stat().st_mtime_ns == mtime  # reused, not retrained
    with pytest.raises(DataError, match="at least 259"):
        data.train_tokenizer(corpus.train_docs, 258, tok_dir / "x")
    (tok_dir.parent / "user_dir").mkdir()
    (tok_dir.parent / "user_dir" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing to overwrite"):
        data.train_tokenizer(corpus.train_docs, 384, tok_dir.parent / "user_dir")
    with pytest.raises(DataError, match="tokenizer.json missing"):
        data.load_tokenizer(tok_dir / "nowhere")


# ------------------------------------------------------------------------------ token cache
def test_token_cache_reused_and_rebuilt(corpus, tok, tmp_path):
    meta = data.build_token_cache(corpus, tok, tmp_path)
    assert not meta["reused"] and meta["dtype"] == "uint16"
    train = data.load_tokens(tmp_path, "train")
    held = data.load_tokens(tmp_path, "heldout")
    assert len(train) == meta["n_train_tokens"] and len(held) == meta["n_heldout_tokens"]
    assert int((np.asarray(train) == tok.eos_token_id).sum()) == len(corpus.train_docs)
    first_eos = int(np.argmax(np.asarray(train) == tok.eos_token_id))
    assert tok.decode(train[:first_eos].tolist()) == corpus.train_docs[0]
    assert data.build_token_cache(corpus, tok, tmp_path)["reused"]
    changed = data.load_corpus("stdlib", max_bytes=200_000, heldout_fraction=0.1, seed=0)
    meta2 = data.build_token_cache(changed, tok, tmp_path)
    assert not meta2["reused"] and meta2["fingerprint"] == changed.fingerprint
    assert json.loads((tmp_path / "tokens.json").read_text())["fingerprint"] == changed.fingerprint
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


# ---------------------------------------------------------------------------------- batches
def test_batches_deterministic_and_resumable():
    tokens = np.arange(5000, dtype=np.uint16)
    run = list(data.batches(tokens, 4, 32, seed=7, num_steps=6))
    assert all(torch.equal(a[0], b[0]) for a, b in
               zip(run, data.batches(tokens, 4, 32, seed=7, num_steps=6)))
    resumed = list(data.batches(tokens, 4, 32, seed=7, start_step=3, num_steps=3))
    for (x, y), (rx, ry) in zip(run[3:], resumed):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    x, y = run[0]
    assert x.shape == (4, 32) and x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])
    assert x.is_contiguous() and y.is_contiguous()  # losses call y.view(-1)
    assert torch.equal(y, x + 1)  # tokens are arange, so windows are contiguous
    assert not torch.equal(x, next(data.batches(tokens, 4, 32, seed=8))[0])
    with pytest.raises(DataError, match="seq_len"):
        data.batches(tokens[:32], 4, 32, seed=0)  # raises before the first batch


def test_heldout_and_calibration_windows():
    tokens = np.arange(1000, dtype=np.uint16)
    bs = data.heldout_batches(tokens, 4, 50)
    xs = torch.cat([x for x, _ in bs])
    assert xs.shape == (19, 50) and torch.equal(xs.flatten(), torch.arange(950))
    assert all(torch.equal(y, x + 1) for x, y in bs)
    assert sum(x.numel() for x, _ in data.heldout_batches(tokens, 4, 50, max_tokens=200)) == 200
    x, y = data.sample_windows(tokens, 8, 16, seed=3)
    assert x.shape == (8, 16) and torch.equal(x, data.sample_windows(tokens, 8, 16, seed=3)[0])
    assert not torch.equal(x, data.sample_windows(tokens, 8, 16, seed=4)[0])
    assert len(set(x[:, 0].tolist())) == 8  # distinct windows
    cal = data.calibration_batches(tokens, 10, 4, 16, seed=3)
    assert [b[0].shape[0] for b in cal] == [4, 4, 2]
    assert torch.equal(cal[0][0], data.sample_windows(tokens, 10, 16, seed=3)[0][:4])
    with pytest.raises(DataError, match="only 10 tokens"):
        data.heldout_batches(tokens[:10], 1, 16)
