"""The block library on disk: atomic blocks, parent fingerprints, refusals, child assembly."""

from __future__ import annotations

import json

import pytest
import torch

from puzzlelib.core.blocks import build_child, init_variant, parse_variant
from puzzlelib.bld.library import (Library, LibraryError, LibraryMismatch, build_child_from_library,
                               child_blocks, load_blocks, pair_name, parent_fingerprint,
                               split_pair_tensors)
from puzzlelib.core.modeling_decilm import PuzzleForCausalLM
from conftest import tiny_config

JOBS = [(0, "attn:kv1"), (0, "ffn:0.50"), (0, "attn:noop"), (1, "attn:kv1"), (1, "ffn:0.50"),
        (1, "attn:noop"), (1, pair_name("attn:kv1", "ffn:0.50"))]
VARIANTS = {"attn": ["attn:kv2", "attn:kv1", "attn:noop"], "ffn": ["ffn:1.00", "ffn:0.50"],
            "pairs": [pair_name("attn:kv1", "ffn:0.50")]}
SETTINGS = {"tokens": 1024, "lr": 1e-3}


def _tensors(parent, layer, name):
    if "+" in name:
        a, f = name.split("+")
        return {**init_variant(parent, layer, parse_variant(a)), **init_variant(parent, layer, parse_variant(f))}
    return init_variant(parent, layer, parse_variant(name))


def _fill(lib, parent, jobs=JOBS, scale=1.0):
    for layer, name in jobs:
        t = {k: v * scale for k, v in _tensors(parent, layer, name).items()}
        lib.write_block(layer, name, t, {"init_nmse": 0.5, "final_nmse": 0.1, "trained": True,
                                         "kind": "attn", "history": {"step": [0]}})


def _snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def other_parent():
    torch.manual_seed(1)
    return PuzzleForCausalLM(tiny_config()).eval()


def test_fingerprint_tracks_weights_not_object_identity(tiny_parent):
    fp = parent_fingerprint(tiny_parent)
    clone = PuzzleForCausalLM(tiny_config()).eval()
    clone.load_state_dict(tiny_parent.state_dict())
    assert parent_fingerprint(clone) == fp and len(fp) == 24
    with torch.no_grad():
        clone.model.layers[1].mlp.up_proj.weight[3, 5] += 1e-3
    assert parent_fingerprint(clone) != fp


def test_round_trip_and_build_child(tmp_path, tiny_parent):
    lib = Library.create(tmp_path / "lib", tiny_parent, SETTINGS, JOBS, VARIANTS)
    assert lib.missing() == JOBS and not lib.is_complete()
    _fill(lib, tiny_parent, scale=0.5)
    assert lib.is_complete()
    # File names carry no ':'; no temp files are left behind.
    names = [p.name for p in (tmp_path / "lib").rglob("*")]
    assert not any(":" in n or n.startswith(".") for n in names), names
    rec = lib.record(0, "attn:kv1")
    assert rec["layer"] == 0 and rec["variant"] == "attn:kv1" and len(rec["sha256"]) == 64
    assert lib.read_block(0, "attn:noop") == {}  # a no-op: an empty, but present, block
    blocks = load_blocks(tmp_path / "lib", tiny_parent, verify=True)
    assert set(blocks) == set(JOBS)
    assert torch.equal(blocks[(0, "ffn:0.50")]["mlp.up_proj.weight"],
                       0.5 * init_variant(tiny_parent, 0, parse_variant("ffn:0.50"))["mlp.up_proj.weight"])
    # The blocks plug into build_child: the child computes with the stored (scaled) weights.
    choices = [("attn:kv1", "ffn:0.50"), ("attn:noop", "ffn:0.50")]
    child = build_child(tiny_parent, choices, blocks=blocks)
    assert torch.equal(child.model.layers[1].mlp.down_proj.weight,
                       blocks[(1, "ffn:0.50")]["mlp.down_proj.weight"])
    ids = torch.randint(0, 300, (2, 10))
    assert torch.isfinite(child(ids).logits).all()


def test_child_blocks_prefers_coupled_pair(tmp_path, tiny_parent):
    lib = Library.create(tmp_path / "lib", tiny_parent, SETTINGS, JOBS, VARIANTS)
    _fill(lib, tiny_parent, jobs=[j for j in JOBS if "+" not in j[1]])
    pair = pair_name("attn:kv1", "ffn:0.50")
    coupled = {k: 2 * v for k, v in _tensors(tiny_parent, 1, pair).items()}
    lib.write_block(1, pair, coupled, {"trained": True, "kind": "pair"})
    a, f = split_pair_tensors(coupled)
    assert set(a) | set(f) == set(coupled) and not set(a) & set(f)
    choices = [("attn:kv1", "ffn:0.50"), ("attn:kv1", "ffn:0.50")]
    got = child_blocks(tmp_path / "lib", tiny_parent, choices)
    assert torch.equal(got[(1, "attn:kv1")]["self_attn.q_proj.weight"], coupled["self_attn.q_proj.weight"])
    assert torch.equal(got[(0, "attn:kv1")]["self_attn.q_proj.weight"],
                       lib.read_block(0, "attn:kv1")["self_attn.q_proj.weight"])
    decoupled = child_blocks(tmp_path / "lib", tiny_parent, choices, prefer_coupled=False)
    assert torch.equal(decoupled[(1, "ffn:0.50")]["mlp.up_proj.weight"],
                       lib.read_block(1, "ffn:0.50")["mlp.up_proj.weight"])
    child = build_child_from_library(tiny_parent, choices, tmp_path / "lib")
    assert torch.equal(child.model.layers[1].mlp.up_proj.weight, coupled["mlp.up_proj.weight"])
    with pytest.raises(LibraryError, match="'ffn:0.25' is not in the library"):
        child_blocks(tmp_path / "lib", tiny_parent, [("attn:kv1", "ffn:0.25"), ("attn:kv1", "ffn:0.50")])


def test_library_of_another_parent_is_refused_and_untouched(tmp_path, tiny_parent, other_parent):
    root = tmp_path / "lib"
    lib = Library.create(root, tiny_parent, SETTINGS, JOBS, VARIANTS)
    _fill(lib, tiny_parent)
    before = _snapshot(root)
    with pytest.raises(LibraryMismatch, match="another parent.*refusing to overwrite"):
        Library.create(root, other_parent, SETTINGS, JOBS, VARIANTS)
    with pytest.raises(LibraryMismatch, match="another parent.*rerun stage 02_bld"):
        load_blocks(root, other_parent)
    with pytest.raises(LibraryMismatch, match="another parent"):
        Library.open(root, parent_fingerprint(other_parent))
    with pytest.raises(LibraryMismatch):
        lib.write_block(0, "attn:kv1", _tensors(other_parent, 0, "attn:kv1"), {}, parent=other_parent)
    with pytest.raises(LibraryMismatch):
        build_child_from_library(other_parent, [("attn:kv1", "ffn:0.50")] * 2, root)
    assert _snapshot(root) == before
    # Other settings: refused as well, unless the caller asks to overwrite.
    with pytest.raises(LibraryMismatch, match="other settings"):
        Library.create(root, tiny_parent, {**SETTINGS, "lr": 2e-3}, JOBS, VARIANTS)
    assert _snapshot(root) == before
    fresh = Library.create(root, tiny_parent, {**SETTINGS, "lr": 2e-3}, JOBS, VARIANTS, overwrite=True)
    assert fresh.missing() == JOBS and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_resume_same_library_and_bad_folders(tmp_path, tiny_parent):
    root = tmp_path / "lib"
    lib = Library.create(root, tiny_parent, SETTINGS, JOBS, VARIANTS)
    _fill(lib, tiny_parent, jobs=JOBS[:2])
    again = Library.create(root, tiny_parent, SETTINGS, JOBS, VARIANTS)  # same parent + settings
    assert again.missing() == JOBS[2:]
    with pytest.raises(LibraryError, match="incomplete: 5 blocks missing"):
        load_blocks(root, tiny_parent)
    assert set(load_blocks(root, tiny_parent, require_complete=False)) == set(JOBS[:2])
    with pytest.raises(LibraryError, match="not a job"):
        lib.write_block(5, "attn:kv1", {}, {})
    with pytest.raises(LibraryError, match="at least one"):
        Library.create(tmp_path / "empty", tiny_parent, SETTINGS, [], VARIANTS)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(LibraryError, match="not a block library"):
        Library.create(junk, tiny_parent, SETTINGS, JOBS, VARIANTS)
    assert (junk / "notes.txt").read_text() == "mine"
    with pytest.raises(LibraryError, match="run stage 02_bld"):
        Library.open(tmp_path / "nowhere")


def test_interrupted_or_damaged_block_is_not_taken(tmp_path, tiny_parent, monkeypatch):
    root = tmp_path / "lib"
    lib = Library.create(root, tiny_parent, SETTINGS, JOBS, VARIANTS)
    import puzzlelib.bld.library as library

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(library, "atomic_write_json", boom)  # dies between tensors and record
    with pytest.raises(OSError, match="disk full"):
        lib.write_block(0, "attn:kv1", _tensors(tiny_parent, 0, "attn:kv1"), {})
    monkeypatch.undo()
    assert not lib.has(0, "attn:kv1") and (0, "attn:kv1") in lib.missing()
    _fill(lib, tiny_parent, jobs=[(0, "ffn:0.50")])
    st = root / "blocks" / "L00" / "ffn-0.50.safetensors"
    st.write_bytes(st.read_bytes()[:-7])  # truncated after the fact
    assert not lib.has(0, "ffn:0.50")
    with pytest.raises(LibraryError, match="not trained yet, or its files are damaged"):
        lib.read_block(0, "ffn:0.50")
    _fill(lib, tiny_parent, jobs=[(0, "ffn:0.50")])
    rec = json.loads((root / "blocks" / "L00" / "ffn-0.50.json").read_text())
    data = bytearray(st.read_bytes())
    data[-1] ^= 1  # same size, different bytes: the sha256 check notices
    assert lib.has(0, "ffn:0.50")  # (hashed and cached before the change)
    st.write_bytes(bytes(data))
    assert not lib.has(0, "ffn:0.50") and rec["bytes"] == len(data)
    assert (0, "ffn:0.50") in lib.missing()  # so stage 02 trains it again
    with pytest.raises(LibraryError, match="damaged: .*ffn-0.50.safetensors"):
        lib.read_block(0, "ffn:0.50")
