"""GKD: the loss, one step, data parallelism, resume, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from puzzlelib.core import data
from puzzlelib.gkd.stage import GKDError, distill, evaluate, gkd_loss
from gkd_worker import SETTINGS, make

HERE = Path(__file__).parent


def test_child_equal_to_parent_has_zero_loss(tiny_parent):
    x = torch.randint(3, 300, (2, 16))
    out = tiny_parent(x, output_hidden_states=True)
    loss, terms = gkd_loss(out, out, x, replace(SETTINGS, lm_weight=0.0))
    assert abs(loss.item()) < 1e-6 and abs(terms["kl"]) < 1e-7 and abs(terms["cosine"]) < 1e-6
    ev = evaluate(tiny_parent, tiny_parent, data_tokens(), 16, 4, 512, torch.device("cpu"))
    assert ev["kl"] < 1e-7 and ev["top1_agreement"] == 1.0


def data_tokens():
    import numpy as np

    return np.random.default_rng(1).integers(3, 300, 5000).astype(np.uint16)


def test_one_step_lowers_the_loss_on_a_fixed_batch():
    parent, child, tokens = make()
    s = replace(SETTINGS, tokens=SETTINGS.batch_size * SETTINGS.seq_len, warmup_steps=1)
    x, y = data.batch_at(tokens, s.batch_size, s.seq_len, s.seed, 0)

    def loss_now():
        with torch.no_grad():
            return gkd_loss(child(x, output_hidden_states=True), parent(x, output_hidden_states=True), y, s)[0].item()

    before = loss_now()
    hist = distill(child, parent, tokens, tokens[:2000], s)
    assert len(hist["step"]) == 1 and hist["loss"][0] == pytest.approx(before, rel=1e-5)
    assert loss_now() < before - 1e-3
    # Both terms are really there: the child starts away from the parent in both.
    assert hist["cosine"][0] > 0 and hist["kl"][0] > 0


def test_killed_and_resumed_equals_uninterrupted(tmp_path):
    s = replace(SETTINGS, tokens=SETTINGS.batch_size * SETTINGS.seq_len * 6, checkpoint_every=2, eval_every=3)
    parent, ref, tokens = make()
    href = distill(ref, parent, tokens, tokens[:2000], s)
    parent, child, tokens = make()
    with pytest.raises(KeyboardInterrupt):
        distill(child, parent, tokens, tokens[:2000], s, tmp_path / "state", key="k", stop_after=3)
    parent, child, tokens = make()  # a fresh process: nothing in memory survives a kill
    h = distill(child, parent, tokens, tokens[:2000], s, tmp_path / "state", key="k")
    assert h["loss"] == href["loss"] and h["eval"] == href["eval"]
    a, b = ref.state_dict(), child.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A checkpoint made under another config key is ignored, not resumed.
    parent, other, tokens = make()
    h2 = distill(other, parent, tokens, tokens[:2000], replace(s, lr=1e-3), tmp_path / "state", key="other")
    assert len(h2["step"]) == 6


@pytest.mark.slow
def test_two_rank_gloo_run_matches_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    one = subprocess.run([sys.executable, str(HERE / "gkd_worker.py"), str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", str(HERE / "gkd_worker.py"), str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a = load_file(str(tmp_path / "one" / "child.safetensors"))
    b = load_file(str(tmp_path / "two" / "child.safetensors"))
    # Same global batches and averaged gradients: equal up to float summation order.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    la = [float(v) for v in (tmp_path / "one" / "loss.txt").read_text().split()]
    lb = [float(v) for v in (tmp_path / "two" / "loss.txt").read_text().split()]
    assert la == pytest.approx(lb, abs=1e-5)


def test_bad_settings():
    with pytest.raises(GKDError, match="token budget must be positive"):
        replace(SETTINGS, tokens=0).check()
    with pytest.raises(GKDError, match="divisible"):
        replace(SETTINGS, batch_size=6, grad_accum=4).check()
    with pytest.raises(GKDError, match="loss weights are 0"):
        replace(SETTINGS, cos_weight=0.0, kl_weight=0.0).check()
    from puzzlelib.core.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="gkd_tokens must be > 0"):
        RunConfig.from_preset("smoke", {"gkd_tokens": 0})


def test_stage_without_parent_is_refused(tmp_path):
    from puzzlelib.gkd import stage as gkd
    from puzzlelib.core.config import RunConfig
    from puzzlelib.core.rundir import StageNotReady

    cfg = RunConfig.from_preset("smoke", {"runs_root": str(tmp_path)}, run_name="nothing")
    with pytest.raises(StageNotReady, match="00_parent"):
        gkd.run(cfg)


def test_child_not_in_library_is_refused(tmp_path, tiny_parent):
    from puzzlelib.core.distributed import Dist
    from puzzlelib.gkd.stage import distill_children
    from puzzlelib.bld.library import Library

    lib = Library.create(tmp_path / "lib", tiny_parent, {"x": 1}, [(0, "attn:kv1")], {"attn": ["attn:kv1"]})
    with pytest.raises(GKDError, match="does not match the block library"):
        distill_children(tiny_parent, [("c", [("attn:kv1", "ffn:0.50"), ("attn:kv2", "ffn:1.00")])], lib.root,
                         data_tokens(), data_tokens(), SETTINGS, tmp_path / "out", "k", Dist())


@pytest.mark.slow
def test_force_discards_finished_children_instead_of_keeping_them(smoke_run, tmp_path):
    # A rerun keeps children finished under the same key (resume after a kill); force must not.
    import shutil

    from puzzlelib.gkd import stage as gkd
    from puzzlelib.core.config import RunConfig

    shutil.copytree(smoke_run.root, tmp_path, dirs_exist_ok=True)
    cfg = RunConfig.from_preset("smoke", {"runs_root": str(tmp_path / "runs"),
                                          "reports_root": str(tmp_path / "reports")}, "smoke")
    children = tmp_path / "runs" / "smoke" / "05_gkd" / "children"
    assert len(list(children.glob("*/gkd.json"))) >= 4
    with pytest.raises(KeyboardInterrupt):
        gkd.run(cfg.replace(force=True), stop_after=1)  # interrupted during the first child
    assert not list(children.glob("*/gkd.json"))  # nothing finished survived the forced rerun
