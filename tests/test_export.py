"""Self-contained DeciLM checkpoints: round trip, fresh-process loading without puzzlelib,
the fields other DeciLM readers need (intermediate_size + ffn_mult, top-level RoPE, o_proj_bias),
strict loading, vLLM / NVIDIA compatibility, the folder's README + lm-eval command, and lm-eval's
HFLM on a child. tests/test_export_decilm4.py loads a child under transformers 4.53 (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig

import pytest
import torch

from puzzlelib.core.blocks import build_child
from puzzlelib.core.export import (CheckpointError, load_checkpoint, nvidia_decilm_compatible, save_checkpoint,
                              vllm_compatible)
from puzzlelib.core.modeling_decilm import PuzzleForCausalLM
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
print(type(m).__name__, type(m.config).__name__, tok.vocab_size)
m.save_pretrained(CKPT + "/again")  # a re-saved folder keeps DeciLM's names (vLLM dispatches on them)
print(json.load(open(CKPT + "/again/config.json"))["architectures"])
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
    r = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DeciLMForCausalLM DeciLMConfig 300\n['DeciLMForCausalLM']" in r.stdout
    out = torch.load(ckpt / "out.pt")
    with torch.no_grad():
        assert torch.allclose(out["logits"], child(x).logits, atol=1e-6)
        ref = child.generate(x[:1], max_new_tokens=8, do_sample=False, pad_token_id=2)
    assert torch.equal(out["gen"], ref)


def test_checkpoint_layout_and_schema(child, tmp_path):
    ckpt = save_checkpoint(child, tmp_path / "c")
    files = sorted(p.name for p in ckpt.iterdir())
    assert files == ["README.md", "config.json", "configuration_decilm.py", "export.json", "generation_config.json",
                     "model.safetensors", "modeling_decilm.py"]
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model_type"] == "nemotron-nas" and cfg["architectures"] == ["DeciLMForCausalLM"]
    assert cfg["num_key_value_heads"] is None and cfg["intermediate_size"] is None
    assert cfg["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig",
                               "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
    assert cfg["head_dim"] == 16 and cfg["o_proj_bias"] is False and cfg["pretraining_tp"] == 1
    assert cfg["rope_theta"] == 10000.0 and cfg["rope_scaling"] is None
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    b = cfg["block_configs"]
    assert b[0] == {"attention": {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False},
                    "ffn": {"ffn_mult": None, "intermediate_size": 48, "hidden_act": "silu", "gated": True,
                            "no_op": False, "replace_with_linear": False}}
    assert b[1]["ffn"] == {"ffn_mult": None, "intermediate_size": None, "no_op": False, "replace_with_linear": True}
    assert b[3]["ffn"]["intermediate_size"] == 24
    assert b[1]["attention"]["replace_with_linear"] and b[1]["ffn"]["replace_with_linear"]
    assert b[2]["attention"]["n_heads_in_group"] == 4 and b[2]["ffn"]["no_op"]
    from safetensors import safe_open
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any(k.startswith("model.layers.0.self_attn") or k == "model.layers.0.input_layernorm.weight"
                   for k in keys)
    assert not any(k.startswith("model.layers.2.mlp") or k == "model.layers.2.post_attention_layernorm.weight"
                   for k in keys)
    assert "model.layers.1.self_attn.linear_attn.weight" in keys and "model.layers.1.mlp.linear_mlp.weight" in keys
    assert "lm_head.weight" not in keys  # tied: stored once


def test_ffn_mult_round_trip_for_multiples_of_256(tmp_path):
    torch.manual_seed(0)
    parent = PuzzleForCausalLM(tiny_config(intermediate_size=512)).eval()
    child = build_child(parent, [("attn:kv2", "ffn:0.50"), ("attn:kv2", "ffn:0.25")])  # widths 256, 128
    ckpt = save_checkpoint(child, tmp_path / "m")
    b = json.loads((ckpt / "config.json").read_text())["block_configs"]
    # Both: NVIDIA's later code reads intermediate_size only, vLLM derives the width from ffn_mult.
    assert b[0]["ffn"] == {"ffn_mult": 6.0, "intermediate_size": 256, "hidden_act": "silu", "gated": True,
                           "no_op": False, "replace_with_linear": False}  # int(2*6*64/3)=256
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


def test_vllm_and_nvidia_compatibility_report(child, tmp_path):
    ok, reasons = vllm_compatible(child.config)
    assert not ok and reasons == ["layer 1: attention replaced by a linear layer",
                                  "layer 1: ffn replaced by a linear layer",
                                  "layer 0: FFN width 48 is not a multiple of 256",
                                  "layer 3: FFN width 24 is not a multiple of 256"]
    ok, reasons = nvidia_decilm_compatible(child.config)  # NVIDIA's code builds linear sub-blocks
    assert not ok and reasons == ["layer 0: FFN width 48 is not a multiple of 256",
                                  "layer 3: FFN width 24 is not a multiple of 256"]
    on_grid = tiny_config(intermediate_size=512)
    assert vllm_compatible(on_grid) == (True, []) and nvidia_decilm_compatible(on_grid) == (True, [])
    assert vllm_compatible(tiny_config()) == (False, ["layer 0: FFN width 96 is not a multiple of 256",
                                                      "layer 1: FFN width 96 is not a multiple of 256"])
    # The exported folder says the same, for tools (export.json) and people (README.md).
    ckpt = save_checkpoint(child, tmp_path / "c")
    info = json.loads((ckpt / "export.json").read_text())
    assert info["vllm"] == {"compatible": False, "reasons": vllm_compatible(child.config)[1]}
    assert info["nvidia_decilm"]["compatible"] is False and "transformers>=5" in info["transformers"]
    readme = (ckpt / "README.md").read_text()
    assert "- vLLM (`DeciLMForCausalLM`): no — layer 1: attention replaced by a linear layer;" in readme
    assert "lm_eval" not in readme  # no stage-06 settings given: no command to show


def test_rope_fields_at_top_level_equal_the_parents(tmp_path):
    """4.x-era readers (NVIDIA's DeciLM code) read rope_theta / rope_scaling, not rope_parameters."""
    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    yarn = {"rope_type": "yarn", "rope_theta": 20000.0, "factor": 4.0, "original_max_position_embeddings": 32}
    for rope in (llama3, yarn, {"rope_type": "default", "rope_theta": 123.0}):
        torch.manual_seed(0)
        m = PuzzleForCausalLM(tiny_config(rope_parameters=dict(rope))).eval()
        ckpt = save_checkpoint(m, tmp_path / rope["rope_type"])
        cfg = json.loads((ckpt / "config.json").read_text())
        assert cfg["rope_theta"] == rope["rope_theta"]
        want = None if rope["rope_type"] == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
        assert cfg["rope_scaling"] == want
        back = load_checkpoint(ckpt)
        assert back.config.rope_parameters == m.config.rope_parameters
        x = torch.randint(3, 300, (1, 40))
        assert torch.allclose(back(x).logits, m(x).logits, atol=1e-6)
    # A folder whose two RoPE descriptions disagree is refused, not read one way here and another there.
    cfg["rope_theta"] = 10000.0
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rope_theta=10000.0 / rope_scaling=None disagree with rope_parameters"):
        load_checkpoint(ckpt)


def test_llama_with_attention_bias_round_trips_o_proj_bias(tmp_path):
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    from puzzlelib.core.model import from_llama

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True)).eval()
    for layer in llama.model.layers:  # non-zero biases, so dropping one would change the logits
        torch.nn.init.normal_(layer.self_attn.o_proj.bias, std=0.5)
    ckpt = save_checkpoint(from_llama(llama), tmp_path / "b")
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["o_proj_bias"] is True and cfg["attention_bias"] is True
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("model.layers.1.self_attn.o_proj.bias"),
                           llama.model.layers[1].self_attn.o_proj.bias)
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.allclose(load_checkpoint(ckpt)(x).logits, llama(x).logits, atol=1e-5)
    cfg["o_proj_bias"] = False  # this model cannot drop o_proj's bias alone: refuse, do not ignore
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="o_proj_bias=False differs from attention_bias=True"):
        load_checkpoint(ckpt)


def test_inconsistent_ffn_fields_are_refused(tmp_path):
    torch.manual_seed(0)
    m = PuzzleForCausalLM(tiny_config(intermediate_size=512)).eval()
    ckpt = save_checkpoint(m, tmp_path / "m")
    cfg = json.loads((ckpt / "config.json").read_text())
    good = json.dumps(cfg)
    cfg["block_configs"][1]["ffn"]["ffn_mult"] = 3.0  # int(2*3*64/3)=128, rounded up to 256 by ffn_mult readers
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError,
                       match=r"block_configs\[1\].ffn: ffn_mult=3.0 gives width 256 but intermediate_size=512"):
        load_checkpoint(ckpt)
    cfg = json.loads(good)
    cfg["block_configs"][0]["ffn"]["hidden_act"] = "gelu"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="only gated SiLU"):
        load_checkpoint(ckpt)


def test_readme_carries_the_stage_06_lm_eval_command(child, tiny_tokenizer, tmp_path):
    settings = {"max_length": 77, "prefix_token_id": 1, "tasks": ["next_line", "bpb"], "batch_size": 4,
                "tasks_dir": str(tmp_path / "tasks")}
    ckpt = save_checkpoint(child, tmp_path / "c", tokenizer=tiny_tokenizer, lm_eval=settings)
    info = json.loads((ckpt / "export.json").read_text())
    cmd = info["lm_eval"]["command"]
    assert cmd[:3] == ["lm_eval", "--model", "hf"]
    args = dict(kv.split("=", 1) for kv in cmd[cmd.index("--model_args") + 1].split(","))
    assert args == {"pretrained": str(ckpt.absolute()), "trust_remote_code": "True", "max_length": "77",
                    "prefix_token_id": "1"}
    assert cmd[cmd.index("--tasks") + 1] == "next_line,bpb" and cmd[cmd.index("--batch_size") + 1] == "4"
    assert cmd[cmd.index("--include_path") + 1] == str((tmp_path / "tasks").absolute())
    readme = (ckpt / "README.md").read_text()
    assert "max_length=77" in readme and "prefix_token_id=1" in readme
    assert " ".join(cmd) in readme  # no character needs quoting in these paths


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


@pytest.mark.filterwarnings("ignore:.*weight norms")
def test_ffn_width_multiple_256_keeps_children_servable(tmp_path):
    from puzzlelib.core.config import RunConfig
    from puzzlelib.parent.stage import ParentResult

    torch.manual_seed(0)
    parent = PuzzleForCausalLM(tiny_config(intermediate_size=1024)).eval()
    plan = [("attn:kv2", "ffn:0.30"), ("attn:noop", "ffn:0.60")]
    off = build_child(parent, plan)  # default grid 8: 0.30 * 1024 -> 304, 0.60 * 1024 -> 616
    assert [off.config.ffn_width(i) for i in range(2)] == [304, 616]
    assert vllm_compatible(off.config)[1] == ["layer 0: FFN width 304 is not a multiple of 256",
                                              "layer 1: FFN width 616 is not a multiple of 256"]
    # The stages read the grid from RunConfig.ffn_width_multiple through the loaded parent.
    ckpt = save_checkpoint(parent, tmp_path / "parent")
    grid_parent = ParentResult(tmp_path, ckpt, {}, {}, [], False, ffn_width_multiple=256).load_model()
    on = build_child(grid_parent, plan)
    assert [on.config.ffn_width(i) for i in range(2)] == [256, 512]
    assert vllm_compatible(on.config) == (True, []) and nvidia_decilm_compatible(on.config) == (True, [])
    b = json.loads((save_checkpoint(on, tmp_path / "on") / "config.json").read_text())["block_configs"]
    assert [(f["ffn"]["ffn_mult"], f["ffn"]["intermediate_size"]) for f in b] == [(6.0, 256), (12.0, 512)]
    # Off by default and out of the hash there, so existing runs stay fresh.
    assert "ffn_width_multiple" not in RunConfig().hashed_values("01_profiling")
    assert RunConfig(ffn_width_multiple=256).hashed_values("01_profiling")["ffn_width_multiple"] == 256
    assert RunConfig(ffn_width_multiple=256).hash("01_profiling") != RunConfig().hash("01_profiling")
