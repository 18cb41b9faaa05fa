"""Stage 00 on a tiny configuration: artifact layout, reuse, staleness, resume == uninterrupted,
a Hugging Face parent directory, bad inputs — and notebook 00 through papermill on `smoke`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from puzzlelib.parent import stage as parent
from puzzlelib.core.config import RunConfig
from puzzlelib.core.rundir import RunDir, StageNotReady

TINY = {"corpus_max_bytes": 200_000, "tokenizer_train_bytes": 200_000, "vocab_size": 300, "seq_len": 32,
        "parent_hidden_size": 32, "parent_num_layers": 2, "parent_num_heads": 4, "parent_num_kv_heads": 2,
        "parent_intermediate_size": 64, "parent_train_tokens": 16 * 32 * 12, "parent_batch_size": 16,
        "parent_warmup_steps": 3, "parent_eval_every": 4, "parent_eval_tokens": 2048,
        "parent_checkpoint_every": 4}


def tiny_cfg(tmp_path, name="t", **kw):
    return RunConfig.from_preset("smoke", {**TINY, "runs_root": str(tmp_path / "runs"), **kw}, run_name=name)


def test_stage_layout_metrics_and_reuse(tmp_path):
    cfg = tiny_cfg(tmp_path)
    res = parent.run(cfg)
    d = res.dir
    assert sorted(p.name for p in d.iterdir()) == ["corpus.json", "history.json", "manifest.json", "metrics.json",
                                                   "model", "samples.json", "tokenizer", "tokens"]
    assert {"config.json", "configuration_decilm.py", "model.safetensors", "modeling_decilm.py",
            "tokenizer.json"} <= {p.name for p in (d / "model").iterdir()}
    m = res.metrics
    assert len(res.history["step"]) == 12 and res.history["eval_step"] == [4, 8, 12]
    # Training works: the loss falls well below the uniform-guess loss ln(300) = 5.70.
    assert res.history["train_loss"][-1] < res.history["train_loss"][0] - 0.5
    assert m["heldout_loss"] < 5.70
    model = res.load_model()
    assert m["params"] == sum(p.numel() for p in model.parameters())
    assert 0 < m["fixed_flops_share"] < 1 and len(res.samples) >= 1
    assert RunDir(cfg).manifest("00_parent")["status"] == "done"
    again = parent.run(cfg)
    assert again.reused and again.metrics == m
    assert len(RunDir(cfg).manifest("00_parent")["reuses"]) == 1   # the manifest says so
    assert RunDir(cfg).is_fresh("00_parent")                         # and recording it kept it fresh
    # A field of this stage changes -> stale -> retrained.
    changed = parent.run(cfg.replace(parent_lr=2e-3))
    assert not changed.reused and changed.metrics["heldout_loss"] != m["heldout_loss"]


def test_interrupted_training_resumes_to_identical_weights(tmp_path):
    ref = parent.run(tiny_cfg(tmp_path / "a"))
    cfg = tiny_cfg(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        parent.run(cfg, stop_after=6)  # checkpoint at step 4, killed at step 6
    rd = RunDir(cfg)
    assert rd.manifest("00_parent")["status"] == "failed"
    with pytest.raises(StageNotReady):
        rd.require("00_parent")      # a later stage never reads a half-trained parent
    assert json.loads((rd.stage_dir("00_parent") / "train_state" / "state.json").read_text())["step"] == 4
    res = parent.run(cfg)
    a = load_file(str(ref.model_dir / "model.safetensors"))
    b = load_file(str(res.model_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert res.history["train_loss"] == ref.history["train_loss"]
    assert not (res.dir / "train_state").exists()


def test_huggingface_parent_directory(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    # A tokenizer from the embedded pipeline, and a Llama of matching vocabulary saved like a hub model.
    base = parent.run(tiny_cfg(tmp_path, "base"))
    tok = base.load_tokenizer()
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    hf.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    res = parent.run(tiny_cfg(tmp_path, "hf", parent=str(tmp_path / "llama")))
    assert res.history["step"] == [] and res.metrics["parent"].endswith("llama")
    x = torch.randint(0, len(tok), (1, 12))
    with torch.no_grad():
        assert torch.allclose(res.load_model()(x).logits, hf(x).logits, atol=1e-5)


def test_bad_inputs(tmp_path, tiny_tokenizer):
    from conftest import tiny_config

    with pytest.raises(parent.ParentStageError, match="tokenizer has 300 tokens but the model's vocabulary is 100"):
        parent.check_compatible(tiny_config(vocab_size=100), tiny_tokenizer, 32)
    with pytest.raises(parent.ParentStageError, match="max_position_embeddings"):
        parent.check_compatible(tiny_config(), tiny_tokenizer, 1024)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    from puzzlelib.core.data import DataError
    with pytest.raises(DataError):
        parent.run(tiny_cfg(tmp_path, "e", corpus=str(empty)))
    assert RunDir(tiny_cfg(tmp_path, "e")).manifest("00_parent")["status"] == "failed"


@pytest.mark.slow
def test_notebook_00_runs_headless_on_smoke(smoke_run):
    """Notebook 00 as the shared smoke pipeline ran it through papermill (one headless run of every
    notebook per suite, conftest.py): its HTML export, no error output, both figures."""
    report = smoke_run.report_dir
    assert (report / "00_parent.ipynb").exists() and (report / "00_parent.html").exists()
    nb = json.loads((report / "00_parent.ipynb").read_text())
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = [o for c in nb["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # loss curves + compute split
