"""Shared fixtures: tiny models (2 layers, hidden 64) and a tiny byte-level tokenizer, built in
seconds on CPU so every test asserts real numbers without any download."""

from __future__ import annotations

import os

import pytest
import torch

# Nothing in the test suite may reach a hub or write to the user's home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_config(**kw):
    from puzzlelib.core.configuration_decilm import PuzzleConfig

    base = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                bos_token_id=0, eos_token_id=1, pad_token_id=2)
    base.update(kw)
    return PuzzleConfig(**base)


@pytest.fixture
def tiny_parent():
    from puzzlelib.core.modeling_decilm import PuzzleForCausalLM

    torch.manual_seed(0)
    return PuzzleForCausalLM(tiny_config()).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A 300-token byte-level BPE tokenizer trained on a few lines of Python."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
            "class Point:\n    def __init__(self, x, y):\n        self.x = x\n"] * 20
    tok.train_from_iterator(text, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                 pad_token="<|pad|>", model_max_length=128)
    out = tmp_path_factory.mktemp("tok")
    hf.save_pretrained(out)
    return hf


class SmokeRun:
    """Where the shared smoke pipeline wrote: ``runs/<name>/`` and ``reports/<name>/`` under ``root``."""

    def __init__(self, root, name, overrides, seconds):
        self.root, self.name, self.overrides, self.seconds = root, name, overrides, seconds
        self.run_dir = root / "runs" / name
        self.report_dir = root / "reports" / name


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """ONE uninterrupted run of every notebook on the `smoke` preset (~4-5 min on 2 cores), shared by
    the slow tests (each notebook's executed outputs, fault injection with the determinism check, the
    student copies' rerun with the reuse check) so CI pays for it once. Treat it as read-only: copy it
    (shutil.copytree) before writing into it."""
    import time

    from puzzlelib.runner import run_pipeline

    root = tmp_path_factory.mktemp("smoke")
    over = {"runs_root": str(root / "runs"), "reports_root": str(root / "reports")}
    t0 = time.perf_counter()
    res = run_pipeline("smoke", run_name="smoke", overrides=over, echo=lambda *a, **k: None)
    assert res.exit_code == 0, res
    return SmokeRun(root, "smoke", over, time.perf_counter() - t0)
