"""PuzzleForCausalLM: conversion from Llama-layout parents, every variant, generation with the
heterogeneous KV cache, bad configs."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from puzzlelib.core.blocks import build_child
from puzzlelib.core.model import ParentError, count_params, from_llama, load_parent
from puzzlelib.core.modeling_decilm import PuzzleCache
from puzzlelib.core.configuration_decilm import PuzzleConfig
from conftest import tiny_config

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _greedy_no_cache(model, ids, n):
    seq = ids
    for _ in range(n):
        nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    return seq


@pytest.mark.parametrize("tie,rope", [(False, None), (True, LLAMA3_ROPE)])
def test_llama_conversion_matches_logits(tie, rope):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=tie, rope_parameters=rope)).eval()
    pm = from_llama(hf)
    x = torch.randint(0, 300, (2, 40))  # 40 > original_max_position_embeddings: llama3 scaling matters
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, pm(x).logits, atol=1e-5)
    assert count_params(pm) == count_params(hf)
    assert pm.config.tie_word_embeddings == tie
    if rope:
        assert pm.config.rope_parameters["rope_type"] == "llama3"


def test_llama_directory_conversion(tmp_path):
    torch.manual_seed(1)
    hf = LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    hf.save_pretrained(tmp_path / "llama")
    pm = load_parent(tmp_path / "llama")
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, pm(x).logits, atol=1e-5)


@pytest.mark.parametrize("cls,cfg_cls,extra", [
    (Qwen2ForCausalLM, Qwen2Config, {}),
    (MistralForCausalLM, MistralConfig, {"sliding_window": None}),
])
def test_qwen2_and_mistral_layouts(cls, cfg_cls, extra):
    torch.manual_seed(2)
    hf = cls(cfg_cls(**SMALL, **extra)).eval()
    pm = from_llama(hf)
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, pm(x).logits, atol=1e-5)


def test_unsupported_parents_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ParentError, match="Supported: llama, mistral, qwen2"):
        from_llama(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)))
    with pytest.raises(ParentError, match="sliding-window"):
        from_llama(MistralForCausalLM(MistralConfig(**SMALL, sliding_window=16)))


def test_parent_directory_missing_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ParentError, match="no config.json"):
        load_parent(tmp_path / "empty")
    LlamaConfig(**SMALL).save_pretrained(tmp_path / "noweights")
    with pytest.raises(ParentError, match="no weights"):
        load_parent(tmp_path / "noweights")


def test_every_variant_runs_and_has_expected_params(tiny_parent):
    x = torch.randint(0, 300, (2, 10))
    h, inter, hd = 64, 96, 16
    attn = 2 * h * h + 2 * (2 * hd) * h      # q, o + k, v with 2 KV heads
    ffn = 3 * h * inter
    cases = {
        ("attn:kv2", "ffn:1.00"): 0,
        ("attn:kv1", "ffn:0.50"): -(2 * hd * h) - 3 * h * 48,   # one KV head fewer (k and v), half the FFN
        ("attn:linear", "ffn:linear"): (h * h - attn) + (h * h - ffn),
        ("attn:noop", "ffn:noop"): -(attn + h) - (ffn + h),      # the pre-norms go too
    }
    base = count_params(tiny_parent)
    for (a, f), delta in cases.items():
        child = build_child(tiny_parent, [(a, f), ("attn:kv2", "ffn:1.00")])
        assert child(x).logits.shape == (2, 10, 300)
        assert count_params(child) == base + delta, (a, f)


def test_noop_blocks_have_no_tensors(tiny_parent):
    child = build_child(tiny_parent, [("attn:noop", "ffn:noop"), ("attn:linear", "ffn:linear")])
    keys = set(child.state_dict())
    assert not any(k.startswith("model.layers.0.") for k in keys)
    assert "model.layers.1.self_attn.linear_attn.weight" in keys
    assert "model.layers.1.mlp.linear_mlp.weight" in keys
    # An all-no-op child is embeddings → final norm → head.
    x = torch.randint(0, 300, (1, 5))
    allnoop = build_child(tiny_parent, [("attn:noop", "ffn:noop")] * 2)
    ref = tiny_parent.lm_head(tiny_parent.model.norm(tiny_parent.model.embed_tokens(x)))
    assert torch.allclose(allnoop(x).logits, ref, atol=1e-6)


MIXED = [("attn:noop", "ffn:0.50"), ("attn:kv1", "ffn:linear")]


@pytest.mark.parametrize("choices", [
    MIXED,                                                   # layer 0 has no attention
    [("attn:linear", "ffn:noop"), ("attn:noop", "ffn:0.25")],  # no layer has attention
    [("attn:kv2", "ffn:1.00"), ("attn:kv1", "ffn:noop")],
])
def test_generate_with_cache_equals_cache_free_greedy(tiny_parent, choices):
    child = build_child(tiny_parent, choices)
    x = torch.randint(3, 300, (1, 7))
    with torch.no_grad():
        out = child.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=2)
        ref = _greedy_no_cache(child, x, 12)
    assert torch.equal(out, ref)


def test_cache_layout_is_heterogeneous(tiny_parent):
    child = build_child(tiny_parent, [("attn:noop", "ffn:1.00"), ("attn:kv1", "ffn:1.00")])
    cache = child.new_cache()
    child(torch.randint(0, 300, (3, 9)), past_key_values=cache, use_cache=True)
    assert cache.layers[0].keys is None                     # no attention → no cache
    assert cache.layers[1].keys.shape == (3, 1, 9, 16)     # 1 KV head, 9 tokens, head_dim 16
    assert cache.get_seq_length() == 9
    assert cache.kv_bytes() == 2 * 3 * 1 * 9 * 16 * 4
    parent_cache = tiny_parent.new_cache()
    tiny_parent(torch.randint(0, 300, (3, 9)), past_key_values=parent_cache, use_cache=True)
    assert parent_cache.kv_bytes() == 2 * 2 * 3 * 2 * 9 * 16 * 4  # 2 layers × 2 KV heads


def test_batched_left_padded_generation_matches_single(tiny_parent):
    child = build_child(tiny_parent, MIXED)
    a, b = torch.randint(3, 300, (1, 8)), torch.randint(3, 300, (1, 5))
    ids = torch.cat([a, torch.cat([torch.full((1, 3), 2), b], 1)])
    mask = torch.tensor([[1] * 8, [0] * 3 + [1] * 5])
    with torch.no_grad():
        both = child.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=2)
        one_a = child.generate(a, max_new_tokens=6, do_sample=False, pad_token_id=2)
        one_b = child.generate(b, max_new_tokens=6, do_sample=False, pad_token_id=2)
    assert torch.equal(both[0, 8:], one_a[0, 8:])
    assert torch.equal(both[1, 8:], one_b[0, 5:])


def test_foreign_cache_is_refused(tiny_parent):
    from transformers import DynamicCache

    with pytest.raises(TypeError, match="PuzzleCache"):
        tiny_parent(torch.randint(0, 300, (1, 4)), past_key_values=DynamicCache(), use_cache=True)


def test_hidden_states_and_loss(tiny_parent):
    x = torch.randint(0, 300, (2, 10))
    out = tiny_parent(x, labels=x, output_hidden_states=True)
    assert len(out.hidden_states) == 3  # embeddings + 2 layers
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 300), x[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, manual)


def test_auto_classes_are_registered(tiny_parent, tmp_path):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("nemotron-nas", **{k: v for k, v in SMALL.items()})
    assert isinstance(cfg, PuzzleConfig) and len(cfg.block_configs) == 2


@pytest.mark.parametrize("bad,match", [
    (dict(num_key_value_heads=3), "must divide"),
    (dict(block_configs=[{"attention": {"n_heads_in_group": 3}, "ffn": {"intermediate_size": 96}}] * 2),
     "positive divisor"),
    (dict(block_configs=[{"attention": {"no_op": True, "replace_with_linear": True},
                          "ffn": {"intermediate_size": 96}}] * 2),
     "both no_op and replace_with_linear"),
    (dict(block_configs=[{"attention": {"n_heads_in_group": 2}, "ffn": {"intermediate_size": 0}}] * 2), "positive int"),
    (dict(block_configs=[{"attention": {"n_heads_in_group": 2}, "ffn": {"intermediate_size": 96}}] * 3),
     "3 entries but num_hidden_layers is 2"),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}), "not supported"),
])
def test_bad_configs_have_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**bad)


def test_puzzlecache_counts_tokens_without_attention(tiny_parent):
    child = build_child(tiny_parent, [("attn:noop", "ffn:1.00")] * 2)
    cache = PuzzleCache(child.config)
    child(torch.randint(0, 300, (1, 4)), past_key_values=cache, use_cache=True)
    child(torch.randint(0, 300, (1, 1)), past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 5 and cache.kv_bytes() == 0
