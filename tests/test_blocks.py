"""Block library vocabulary and initialisation from the parent (DESIGN.md §1 table)."""

from __future__ import annotations

import warnings

import pytest
import torch

from puzzlelib.core.blocks import (Variant, VariantError, build_child, ffn_channel_scores, init_variant,
                              list_library, parse_variant)
from conftest import tiny_config


def test_names_round_trip_and_library_listing():
    cfg = tiny_config()
    lib = list_library(cfg)
    assert [v.name for v in lib["attn"]] == ["attn:kv2", "attn:kv1", "attn:linear", "attn:noop"]
    assert [v.name for v in lib["ffn"]][:4] == ["ffn:1.00", "ffn:0.875", "ffn:0.75", "ffn:0.50"]
    for v in lib["attn"] + lib["ffn"]:
        assert parse_variant(v.name, cfg) == v
    assert lib["attn"][0].is_parent(cfg) and lib["ffn"][0].is_parent(cfg)
    assert not lib["attn"][1].is_parent(cfg)
    vllm = list_library(cfg, include_linear=False)
    assert not any(v.op == "linear" for v in vllm["attn"] + vllm["ffn"])
    # Widths: multiples of 8, never above the parent's (96).
    assert [v.width(cfg) for v in lib["ffn"] if v.op == "swiglu"] == [96, 88, 72, 48, 24, 16, 8]


@pytest.mark.parametrize("name,match", [
    ("attn:kv3", "must divide"),
    ("ffn:1.50", r"\(0, 1\]"),
    ("ffn:0", r"\(0, 1\]"),
    ("attention:kv2", "Unknown variant"),
    ("ffn:half", "Unknown variant"),
    ("attn:kv0", "must divide"),
])
def test_bad_variant_names(name, match):
    with pytest.raises(VariantError, match=match):
        parse_variant(name, tiny_config())


def test_kv_mean_pooling_is_exact_when_parent_heads_agree(tiny_parent):
    # If the parent's two KV heads are identical, pooling them to one head changes nothing.
    for layer in tiny_parent.model.layers:
        for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            w = proj.weight.data.view(2, 16, 64)
            w[1] = w[0]
    child = build_child(tiny_parent, [("attn:kv1", "ffn:1.00")] * 2)
    x = torch.randint(0, 300, (2, 12))
    assert torch.allclose(child(x).logits, tiny_parent(x).logits, atol=1e-5)


def test_kv_pooling_averages_group_heads(tiny_parent):
    w = init_variant(tiny_parent, 0, parse_variant("attn:kv1"))
    k = tiny_parent.model.layers[0].self_attn.k_proj.weight.view(2, 16, 64)
    assert torch.allclose(w["self_attn.k_proj.weight"], k.mean(0))


def test_linear_replacements_are_weight_products(tiny_parent):
    a = tiny_parent.model.layers[1].self_attn
    m = tiny_parent.model.layers[1].mlp
    wa = init_variant(tiny_parent, 1, parse_variant("attn:linear"))["self_attn.linear_attn.weight"]
    v_expanded = a.v_proj.weight.view(2, 16, 64).repeat_interleave(2, 0).reshape(64, 64)
    assert torch.allclose(wa, a.o_proj.weight @ v_expanded)
    wf = init_variant(tiny_parent, 1, parse_variant("ffn:linear"))["mlp.linear_mlp.weight"]
    assert torch.allclose(wf, m.down_proj.weight @ m.up_proj.weight)
    # For a one-token sequence, attention over itself IS W_o·W_v: identical logits.
    child = build_child(tiny_parent, [("attn:linear", "ffn:1.00")] * 2)
    x = torch.randint(0, 300, (3, 1))
    assert torch.allclose(child(x).logits, tiny_parent(x).logits, atol=1e-5)


def test_channel_scores_match_definition(tiny_parent):
    x = torch.randint(0, 300, (2, 16))
    scores = ffn_channel_scores(tiny_parent, [x])
    acts = {}
    def grab(mod, inp, out):
        acts["a"] = inp[0]

    h = tiny_parent.model.layers[0].mlp.down_proj.register_forward_hook(grab)
    tiny_parent(x)
    h.remove()
    manual = acts["a"].abs().flatten(0, 1).mean(0) * tiny_parent.model.layers[0].mlp.down_proj.weight.norm(dim=0)
    assert torch.allclose(scores[0], manual, rtol=1e-5)
    assert set(scores) == {0, 1}


def test_channel_contribution_beats_random_and_full_width_is_exact(tiny_parent):
    torch.manual_seed(3)
    # Make a third of the channels matter much more, so the measurement has something to find.
    for layer in tiny_parent.model.layers:
        layer.mlp.down_proj.weight.data[:, ::3] *= 8
    calib = [torch.randint(0, 300, (4, 32))]
    held = torch.randint(0, 300, (4, 32))
    scores = ffn_channel_scores(tiny_parent, calib)
    layer = tiny_parent.model.layers[0]
    xin = layer.post_attention_layernorm(tiny_parent.model.embed_tokens(held))
    ref = layer.mlp(xin)

    def err(keep):
        m = layer.mlp
        gate = torch.nn.functional.silu(xin @ m.gate_proj.weight[keep].T)
        y = m.down_proj.weight[:, keep] @ (gate * (xin @ m.up_proj.weight[keep].T)).transpose(1, 2)
        return ((y.transpose(1, 2) - ref) ** 2).mean().item()

    w = init_variant(tiny_parent, 0, parse_variant("ffn:0.50"), scores)
    keep = torch.topk(scores[0], 48).indices.sort().values
    assert torch.equal(w["mlp.gate_proj.weight"], layer.mlp.gate_proj.weight[keep])
    random_errs = [err(torch.randperm(96)[:48].sort().values) for _ in range(20)]
    assert err(keep) < min(random_errs)
    full = build_child(tiny_parent, [("attn:kv2", "ffn:1.00")] * 2, scores)
    assert torch.allclose(full(held).logits, tiny_parent(held).logits, atol=1e-6)


def test_pruning_without_calibration_warns(tiny_parent):
    with pytest.warns(UserWarning, match="weight norms"):
        init_variant(tiny_parent, 0, parse_variant("ffn:0.50"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        init_variant(tiny_parent, 0, parse_variant("ffn:1.00"))  # nothing pruned, nothing to warn about


def test_build_child_rejects_bad_choices(tiny_parent):
    with pytest.raises(VariantError, match="one \\(attention, ffn\\) choice per layer"):
        build_child(tiny_parent, [("attn:kv2", "ffn:1.00")])
    with pytest.raises(VariantError, match="pairs"):
        build_child(tiny_parent, [("ffn:1.00", "attn:kv2")] * 2)
    with pytest.raises(VariantError, match="Unknown variant"):
        build_child(tiny_parent, [("attn:kv2", "ffn:wide")] * 2)


def test_build_child_uses_given_blocks(tiny_parent):
    blocks = {(0, "ffn:linear"): {"post_attention_layernorm.weight": torch.full((64,), 2.0),
                                  "mlp.linear_mlp.weight": torch.zeros(64, 64)}}
    child = build_child(tiny_parent, [("attn:kv2", "ffn:linear"), ("attn:kv2", "ffn:1.00")], blocks=blocks)
    assert torch.equal(child.model.layers[0].mlp.linear_mlp.weight, torch.zeros(64, 64))
    assert torch.equal(child.model.layers[0].post_attention_layernorm.weight, torch.full((64,), 2.0))
    with pytest.raises(VariantError, match="do not fit"):
        build_child(tiny_parent, [("attn:kv2", "ffn:linear"), ("attn:kv2", "ffn:1.00")],
                    blocks={(0, "ffn:linear"): {"mlp.linear_mlp.weightz": torch.zeros(64, 64)}})


def test_variant_is_hashable_and_ordered():
    assert len({Variant("attn", "gqa", kv_heads=2), parse_variant("attn:kv2")}) == 1
