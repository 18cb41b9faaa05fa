"""An exported child read under transformers 4.53 — the version NVIDIA's DeciLM code pins — by a
minimal reader written here from the DeciLM config schema alone (slow: builds a virtualenv once).

The reader (``READER`` below) uses only what NVIDIA's schema documents and its readers use:
per layer ``attention.{n_heads_in_group, no_op, replace_with_linear}`` and
``ffn.{intermediate_size, no_op, replace_with_linear}`` (``intermediate_size`` must be a multiple
of 256, as NVIDIA's FFN config asserts), top-level ``hidden_size``, ``num_attention_heads``,
``head_dim``, ``rms_norm_eps``, ``vocab_size``, ``tie_word_embeddings``, ``attention_bias`` (q/k/v),
``o_proj_bias``, ``mlp_bias``, and RoPE from top-level ``rope_theta`` / ``rope_scaling`` through
transformers 4.53's own ``LlamaRotaryEmbedding``. It never looks at ``rope_parameters`` or
``ffn_mult``, never imports puzzlelib, and loads the safetensors strictly (no missing, no
unexpected tensor). Its logits must equal our model's.

The virtualenv lives in ``.cache/decilm-tf453`` (transformers 4.53 from PyPI; torch is borrowed
from the project's environment through a ``.pth`` line, so nothing large is downloaded). No
network and no cache: the test is skipped, saying so.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from puzzlelib.core.blocks import build_child
from puzzlelib.core.export import nvidia_decilm_compatible, save_checkpoint
from puzzlelib.core.modeling_decilm import PuzzleForCausalLM

pytestmark = pytest.mark.slow

VENV = Path(__file__).resolve().parents[1] / ".cache" / "decilm-tf453"

READER = r'''
import json, sys
import torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import load_file
import transformers
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

assert transformers.__version__.startswith("4.53"), transformers.__version__
ckpt = sys.argv[1]
c = json.load(open(ckpt + "/config.json"))
H, NH, HD = c["hidden_size"], c["num_attention_heads"], c["head_dim"]


class Norm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(H))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["rms_norm_eps"]))


class Attention(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.kv = NH // groups
        self.q_proj = nn.Linear(H, NH * HD, bias=c["attention_bias"])
        self.k_proj = nn.Linear(H, self.kv * HD, bias=c["attention_bias"])
        self.v_proj = nn.Linear(H, self.kv * HD, bias=c["attention_bias"])
        self.o_proj = nn.Linear(NH * HD, H, bias=c["o_proj_bias"])

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, NH, HD).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv, HD).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv, HD).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = (z.repeat_interleave(NH // self.kv, dim=1) for z in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.gate_proj = nn.Linear(H, width, bias=c["mlp_bias"])
        self.up_proj = nn.Linear(H, width, bias=c["mlp_bias"])
        self.down_proj = nn.Linear(width, H, bias=c["mlp_bias"])

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Linear(nn.Module):
    def __init__(self, name):
        super().__init__()
        setattr(self, name, nn.Linear(H, H, bias=False))
        self.name = name

    def forward(self, x, *rope):
        return getattr(self, self.name)(x)


class Layer(nn.Module):
    def __init__(self, bc):
        super().__init__()
        a, f = bc["attention"], bc["ffn"]
        self.self_attn = self.mlp = None
        if not a["no_op"]:
            self.input_layernorm = Norm()
            self.self_attn = Linear("linear_attn") if a["replace_with_linear"] else Attention(a["n_heads_in_group"])
        if not f["no_op"]:
            self.post_attention_layernorm = Norm()
            if f["replace_with_linear"]:
                self.mlp = Linear("linear_mlp")
            else:
                assert f["intermediate_size"] % 256 == 0, "intermediate_size must be a multiple of 256"
                self.mlp = MLP(f["intermediate_size"])

    def forward(self, x, cos, sin):
        if self.self_attn is not None:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        if self.mlp is not None:
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], H)
        self.layers = nn.ModuleList(Layer(bc) for bc in c["block_configs"])
        self.norm = Norm()


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = Inner()
        self.lm_head = nn.Linear(H, c["vocab_size"], bias=False)
        rope_cfg = LlamaConfig(hidden_size=H, num_attention_heads=NH, head_dim=HD, rope_theta=c["rope_theta"],
                               rope_scaling=c["rope_scaling"], max_position_embeddings=c["max_position_embeddings"])
        self.rope = LlamaRotaryEmbedding(rope_cfg)

    def forward(self, ids):
        x = self.model.embed_tokens(ids)
        cos, sin = self.rope(x, torch.arange(ids.shape[1])[None])
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))


m = Model()
state = load_file(ckpt + "/model.safetensors")
if c["tie_word_embeddings"]:
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
missing, unexpected = m.load_state_dict(state, strict=False)
missing = [k for k in missing if not k.startswith("rope.")]
assert not missing and not unexpected, (missing, unexpected)
x = torch.load(ckpt + "/x.pt")
with torch.no_grad():
    torch.save(m.eval()(x), ckpt + "/logits4.pt")
print("read", len(c["block_configs"]), "layers with transformers", transformers.__version__)
'''


def _venv_python() -> Path:
    """The cached transformers-4.53 interpreter, built on first use (skip when pip cannot reach PyPI)."""
    py = VENV / "bin" / "python"
    marker = VENV / ".ready"
    if marker.exists():
        return py
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(VENV)], check=True)
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "transformers==4.53.*"],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        pytest.skip(f"could not install transformers 4.53 into {VENV}: {r.stderr[-500:]}")
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # torch from the project's environment, *after* the venv's own packages (transformers 4.53 and
    # the tokenizers / huggingface_hub it pins win); .pth files inside it are not processed, so the
    # editable puzzlelib stays out of reach.
    Path(site, "zz_project_torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    marker.write_text("transformers==4.53.*\n")
    return py


def _check(model: PuzzleForCausalLM, ckpt: Path, tmp_path: Path, atol: float) -> None:
    x = torch.randint(3, model.config.vocab_size, (2, 40))
    torch.save(x, ckpt / "x.pt")
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([str(_venv_python()), "-c", READER, str(ckpt)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "with transformers 4.53" in r.stdout
    with torch.no_grad():
        ref = model(x).logits
    assert torch.allclose(torch.load(ckpt / "logits4.pt"), ref, atol=atol)


@pytest.mark.filterwarnings("ignore:.*weight norms")
def test_grid_child_with_llama3_rope_and_biases_reads_under_transformers_4_53(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    torch.manual_seed(0)
    parent = PuzzleForCausalLM(tiny_config(intermediate_size=512, num_hidden_layers=4, attention_bias=True,
                                           rope_parameters=rope, tie_word_embeddings=True)).eval()
    for layer in parent.model.layers:  # biases that matter
        torch.nn.init.normal_(layer.self_attn.o_proj.bias, std=0.5)
        torch.nn.init.normal_(layer.self_attn.q_proj.bias, std=0.5)
    child = build_child(parent, [("attn:noop", "ffn:0.50"), ("attn:kv1", "ffn:noop"), ("attn:kv2", "ffn:1.00"),
                                 ("attn:noop", "ffn:0.50")])  # widths 256, 512: on the grid
    assert nvidia_decilm_compatible(child.config) == (True, [])
    ckpt = save_checkpoint(child, tmp_path / "child")
    _check(child, ckpt, tmp_path, atol=1e-5)


def test_yarn_child_with_linear_blocks_reads_under_transformers_4_53(tmp_path):
    # transformers 4.x takes YaRN's factor as max_position_embeddings / original length (128 / 16);
    # with a factor equal to that ratio both versions build the same frequencies.
    rope = {"rope_type": "yarn", "rope_theta": 20000.0, "factor": 8.0, "original_max_position_embeddings": 16}
    torch.manual_seed(0)
    parent = PuzzleForCausalLM(tiny_config(intermediate_size=256, num_hidden_layers=3, rope_parameters=rope)).eval()
    child = build_child(parent, [("attn:linear", "ffn:1.00"), ("attn:kv1", "ffn:linear"), ("attn:kv2", "ffn:1.00")])
    ckpt = save_checkpoint(child, tmp_path / "child")
    assert json.loads((ckpt / "export.json").read_text())["nvidia_decilm"] == {"compatible": True, "reasons": []}
    _check(child, ckpt, tmp_path, atol=1e-5)
    # Another factor is flagged: a 4.x reader would rotate differently.
    other = PuzzleForCausalLM(tiny_config(intermediate_size=256, rope_parameters={**rope, "factor": 4.0}))
    assert nvidia_decilm_compatible(other.config)[1] == [
        "yarn factor 4.0 differs from max_position_embeddings / original_max_position_embeddings = 8, "
        "which transformers 4.x uses instead"]
