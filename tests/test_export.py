"""Self-contained DeciLM checkpoints: round trip, fresh-process loading without puzzlelib,
ffn_mult, strict loading, vLLM compatibility, and lm-eval's HFLM on a child."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig

import pytest
import torch

from puzzlelib.blocks import build_child
from puzzlelib.export import CheckpointError, load_checkpoint, save_checkpoint, vllm_compatible
from puzzlelib.model import PuzzleForCausalLM
from conftest import tiny_config

MIXED = [("attn:noop", "ffn:0.50"), ("attn:linear", "ffn:linear"), ("attn:kv1", "ffn:noop"), ("attn:kv2", "ffn:0.25")]

# Runs with `python -S`: no site-packages processing, so neither the editable install of
# puzzlelib nor the repository is importable; only torch/transformers are added back by path.
FRESH = r"""
import sys, importlib.util, json
sys.path.append(SITE)
assert importlib.util.find_spec("puzzlelib") is None, "puzzlelib must not be importable here"
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained(CKPT, trust_remote_code=True).eval()
x = torch.load(CKPT + "/x.pt")
with torch.no_grad():
    logits = m(x).logits
    gen = m.generate(x[:1], max_new_tokens=8, do_sample=False, pad_token_id=2)
tok = AutoTokenizer.from_pretrained(CKPT)
torch.save({"logits": logits, "gen": gen}, CKPT + "/out.pt")
print(type(m).__name__, tok.vocab_size)
"""


@pytest.fixture
def child():
    torch.manual_seed(0)
    parent = PuzzleForCausalLM(tiny_config(num_hidden_layers=4, tie_word_embeddings=True)).eval()
    return build_child(parent, MIXED)


@pytest.mark.filterwarnings("ignore:.*weight norms")
def test_mixed_child_loads_in_fresh_process_without_puzzlelib(child, tiny_tokenizer, tmp_path):
    ckpt = save_checkpoint(child, tmp_path / "child", tokenizer=tiny_tokenizer)
    x = torch.randint(3, 300, (2, 11))
    torch.save(x, ckpt / "x.pt")
    code = FRESH.replace("SITE", repr(sysconfig.get_paths()["purelib"])).replace("CKPT", repr(str(ckpt)))
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "PuzzleForCausalLM 300" in r.stdout
    out = torch.load(ckpt / "out.pt")
    with torch.no_grad():
        assert torch.allclose(out["logits"], child(x).logits, atol=1e-6)
        ref = child.generate(x[:1], max_new_tokens=8, do_sample=False, pad_token_id=2)
    assert torch.equal(out["gen"], ref)


def test_checkpoint_layout_and_schema(child, tmp_path):
    ckpt = save_checkpoint(child, tmp_path / "c")
    files = sorted(p.name for p in ckpt.iterdir())
    assert files == ["config.json", "configuration_decilm.py", "generation_config.json", "model.safetensors", "modeling_decilm.py"]
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model_type"] == "nemotron-nas" and cfg["architectures"] == ["DeciLMForCausalLM"]
    assert cfg["num_key_value_heads"] is None and cfg["intermediate_size"] is None
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_decilm.DeciLMForCausalLM"
    b = cfg["block_configs"]
    assert b[0] == {"attention": {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False},
                    "ffn": {"ffn_mult": None, "intermediate_size": 48, "no_op": False, "replace_with_linear": False}}
    assert b[1]["attention"]["replace_with_linear"] and b[1]["ffn"]["replace_with_linear"]
    assert b[2]["attention"]["n_heads_in_group"] == 4 and b[2]["ffn"]["no_op"]
    from safetensors import safe_open
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any(k.startswith("model.layers.0.self_attn") or k == "model.layers.0.input_layernorm.weight" for k in keys)
    assert not any(k.startswith("model.layers.2.mlp") or k == "model.layers.2.post_attention_layernorm.weight" for k in keys)
    assert "model.layers.1.self_attn.linear_attn.weight" in keys and "model.layers.1.mlp.linear_mlp.weight" in keys
    assert "lm_head.weight" not in keys  # tied: stored once


def test_ffn_mult_round_trip_for_multiples_of_256(tmp_path):
    torch.manual_seed(0)
    parent = PuzzleForCausalLM(tiny_config(intermediate_size=512)).eval()
    child = build_child(parent, [("attn:kv2", "ffn:0.50"), ("attn:kv2", "ffn:0.25")])  # widths 256, 128
    ckpt = save_checkpoint(child, tmp_path / "m")
    b = json.loads((ckpt / "config.json").read_text())["block_configs"]
    assert b[0]["ffn"] == {"ffn_mult": 6.0, "no_op": False, "replace_with_linear": False}  # int(2*6*64/3)=256
    assert b[1]["ffn"]["ffn_mult"] is None and b[1]["ffn"]["intermediate_size"] == 128
    back = load_checkpoint(ckpt)
    assert [back.config.ffn_width(i) for i in range(2)] == [256, 128]
    x = torch.randint(0, 300, (1, 9))
    assert torch.allclose(back(x).logits, child(x).logits, atol=1e-6)


def test_strict_loading_refuses_bad_checkpoints(child, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = save_checkpoint(child, tmp_path / "c")
    state = load_file(str(ckpt / "model.safetensors"))
    missing = dict(state)
    missing.pop("model.layers.3.mlp.up_proj.weight")
    save_file(missing, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensors.*layers.3.mlp.up_proj"):
        load_checkpoint(ckpt)
    extra = dict(state, **{"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)})
    save_file(extra, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensors.*layers.0.self_attn.q_proj"):
        load_checkpoint(ckpt)
    save_file(state, str(ckpt / "model.safetensors"))
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path / "nowhere")


def test_failed_save_leaves_nothing(child, tmp_path):
    class Boom:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(child, tmp_path / "c", tokenizer=Boom())
    assert list(tmp_path.iterdir()) == []


def test_vllm_compatibility_report(child):
    ok, reasons = vllm_compatible(child.config)
    assert not ok and reasons == ["layer 1: attention replaced by a linear layer", "layer 1: ffn replaced by a linear layer"]
    assert vllm_compatible(tiny_config())[0]


@pytest.mark.filterwarnings("ignore")
def test_lm_eval_hflm_runs_on_a_child(child, tiny_tokenizer, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    rows = [{"context": "def add(a, b):\n    return", "choices": ["a + b", "print(i)"], "label": 0},
            {"context": "for i in range(10):\n    print(i)\nfor", "choices": ["self.x = x", "print(i)"], "label": 1},
            {"context": "class Point:\n    def", "choices": ["__init__(self, x, y):", "range(10)"], "label": 0}]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n"
    )
    lm = HFLM(pretrained=child, tokenizer=tiny_tokenizer, batch_size=2, max_length=128)
    tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    res = simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=tm, log_samples=True, bootstrap_iters=0)
    assert 0.0 <= res["results"]["tiny_mc"]["acc,none"] <= 1.0
    # Every log-likelihood lm-eval computed through HFLM must equal our own forward pass.
    samples = res["samples"]["tiny_mc"]
    assert len(samples) == 3
    for smp in samples:
        for (ctx_text, cont_text), resp in zip(smp["arguments"], smp["resps"]):
            ctx = tiny_tokenizer(ctx_text)["input_ids"]
            cont = tiny_tokenizer(ctx_text + cont_text)["input_ids"][len(ctx):]
            with torch.no_grad():
                lp = torch.log_softmax(child(torch.tensor([ctx + cont])).logits[0, :-1].float(), -1)
            mine = sum(lp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
            assert resp[0][0] == pytest.approx(mine, abs=1e-3)
