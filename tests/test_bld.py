"""Stage 02 (BLD): exact parent blocks, held-out gains, resume == uninterrupted, 2 ranks == 1.

Every test runs the real stage on a tiny parent (2 layers, hidden 64) registered as a finished
00_parent stage of a throwaway run, with a tiny token budget: real numbers in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from puzzlelib.bld import stage as bld
from puzzlelib.bld import plan
from puzzlelib.core.blocks import build_child
from puzzlelib.core.config import ConfigError, RunConfig
from puzzlelib.core.export import save_checkpoint
from puzzlelib.bld.library import Library, load_blocks
from puzzlelib.core.modeling_decilm import PuzzleForCausalLM
from puzzlelib.core.rundir import RunDir, StageNotReady
from puzzlelib.core.atomic import atomic_write_json
from conftest import tiny_config

REPO = Path(__file__).resolve().parent.parent
PAIR = "attn:kv1+ffn:0.50"
# A tiny library: per layer attn kv2 (parent), kv1, linear, noop; ffn 1.00 (parent), 0.50, 0.25,
# linear, noop; one coupled pair. 8 steps of 8x32 tokens per trained block.
OVERRIDES = dict(seq_len=32, bld_ffn_fractions="1.0,0.5,0.25", bld_coupled_pairs=PAIR,
                 bld_tokens_per_variant=2048, bld_batch_size=8, bld_lr=1e-3, bld_warmup_steps=2,
                 bld_calib_tokens=1024, bld_eval_tokens=1024, bld_eval_every=4, threads=1)


def make_config(root: Path, **kw) -> RunConfig:
    return RunConfig.from_preset("smoke", {**OVERRIDES, "runs_root": str(root), **kw}, run_name="t")


def make_parent_stage(cfg: RunConfig) -> PuzzleForCausalLM:
    """Register a tiny parent + token arrays as a finished 00_parent stage for ``cfg``."""
    torch.manual_seed(0)
    model = PuzzleForCausalLM(tiny_config()).eval()
    rng = np.random.default_rng(0)
    rd = RunDir(cfg)
    with rd.stage("00_parent") as st:
        save_checkpoint(model, st.dir / "model")
        tok = st.dir / "tokens"
        tok.mkdir()
        # A repetitive token stream (short "words"), so the parent's activations have structure.
        words = rng.integers(3, 300, size=(60, 5))
        stream = words[rng.integers(0, 60, size=8000)].ravel().astype(np.uint16)
        stream[:30000].tofile(tok / "train.bin")
        stream[30000:36000].tofile(tok / "heldout.bin")
        atomic_write_json(tok / "tokens.json", {"dtype": "uint16", "n_train_tokens": 30000,
                                                "n_heldout_tokens": 6000})
        for name in ("metrics.json", "history.json"):
            atomic_write_json(st.dir / name, {})
        atomic_write_json(st.dir / "samples.json", [])
    return model


def library_state(lib_dir: Path) -> dict:
    """Every block's tensors and its deterministic record fields."""
    lib = Library.open(lib_dir)
    out = {}
    for layer, name in lib.jobs():
        rec = lib.record(layer, name)
        hist = rec["history"]
        out[(layer, name)] = (load_file(str(lib_dir / "blocks" / f"L{layer:02d}" / rec["file"])),
                              rec["init_nmse"], rec["final_nmse"], hist["train_nmse"], hist["eval_nmse"])
    out["scores"] = load_file(str(lib_dir / "channel_scores.safetensors"))
    return out


def assert_same_library(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if k == "scores":
            ta, tb = a[k], b[k]
            rest = ()
        else:
            ta, tb = a[k][0], b[k][0]
            rest = (a[k][1:], b[k][1:])
        assert ta.keys() == tb.keys(), k
        for name in ta:
            assert torch.equal(ta[name], tb[name]), (k, name)
        if rest:
            assert rest[0] == rest[1], k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted single-process run every other test compares against."""
    root = tmp_path_factory.mktemp("ref")
    cfg = make_config(root)
    parent = make_parent_stage(cfg)
    res = bld.run(cfg, progress=False)
    return cfg, parent, res, library_state(res.library_dir)


def test_parent_variant_is_exact_and_noop_is_one(reference):
    cfg, parent, res, _ = reference
    rows = {(r["layer"], r["variant"]): r for r in res.table()}
    for layer in (0, 1):
        # The parent's own sub-blocks, initialised from the parent, reproduce it exactly.
        assert rows[(layer, "attn:kv2")]["init_nmse"] == 0.0
        assert rows[(layer, "ffn:1.00")]["init_nmse"] == 0.0
        assert not rows[(layer, "attn:kv2")]["trained"]
        # A no-op adds nothing: its normalized MSE is exactly 1, before and after.
        for v in ("attn:noop", "ffn:noop"):
            assert rows[(layer, v)]["init_nmse"] == rows[(layer, v)]["final_nmse"] == 1.0
    # and the stored parent blocks are the parent's tensors
    blk = res.library.read_block(1, "ffn:1.00")
    assert torch.equal(blk["mlp.down_proj.weight"], parent.model.layers[1].mlp.down_proj.weight)


def test_bld_lowers_heldout_nmse_of_every_trained_block(reference):
    cfg, parent, res, _ = reference
    m = res.metrics
    assert m["blocks"] == 2 * (4 + 5 + 1) and m["trained_blocks"] == 2 * (2 + 3 + 1)
    assert m["improved_blocks"] == m["trained_blocks"]
    assert m["tokens_per_variant"] == 2048 and m["steps_per_variant"] == 8
    for rec in res.records():
        if rec["trained"]:
            assert rec["final_nmse"] < 0.95 * rec["init_nmse"], rec["variant"]
            assert rec["tokens"] == 2048 and len(rec["history"]["train_nmse"]) == 8
            assert rec["history"]["eval_step"] == [0, 4, 8]
    pv = m["per_variant"]
    # Sanity on the scale: pruning half the FFN is far from removing it; a pair is trained too.
    assert 0 < pv["ffn:0.50"]["final_nmse_mean"] < 0.5
    assert pv[PAIR]["kind"] == "pair" and pv[PAIR]["final_nmse_mean"] < pv[PAIR]["init_nmse_mean"]
    # The library feeds build_child; the BLD child is closer to the parent than the pure init.
    blocks = load_blocks(res.library_dir, parent)
    choices = [("attn:kv1", "ffn:0.25")] * 2
    ids = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    ref = parent(ids).logits
    err = {name: (build_child(parent, choices, res.library.channel_scores(), b)(ids).logits - ref)
           .pow(2).mean().item() for name, b in (("bld", blocks), ("init", None))}
    assert err["bld"] < err["init"], err


def test_precision_decision_is_recorded(reference):
    """The stage's manifest says which precision BLD trained in and why; the library's index
    records the decided bool (never "auto") with the settings the blocks depend on."""
    cfg, _, res, _ = reference
    p = RunDir(cfg, create=False).manifest("02_bld")["metrics"]["precision"]
    assert (p["field"], p["setting"], p["bf16"], p["probe"]) == ("bld_autocast_bf16", False, False, None)
    index = json.loads((res.library_dir / "index.json").read_text())
    assert index["settings"]["bld"]["autocast_bf16"] is False
    assert index["settings"]["config"]["bld_autocast_bf16"] is False


def test_second_run_reuses(reference, capsys):
    cfg, _, res, _ = reference
    again = bld.run(cfg, progress=False)
    assert again.reused and "reusing fresh artifacts" in capsys.readouterr().out
    assert again.metrics == res.metrics and bld.load(cfg).metrics == res.metrics


def test_killed_and_restarted_equals_uninterrupted(reference, tmp_path, capsys):
    cfg = make_config(tmp_path, bld_activations_on_disk=True)  # a "run" field: same library
    make_parent_stage(cfg)
    with pytest.raises(KeyboardInterrupt, match="stopped after 7 blocks"):
        bld.run(cfg, stop_after_jobs=7, progress=False)
    rd = RunDir(cfg, create=False)
    assert rd.state("02_bld")[0] == "interrupted"  # a KeyboardInterrupt reads as interrupted
    with pytest.raises(StageNotReady, match="02_bld"):
        bld.load(cfg)
    lib = Library.open(rd.stage_dir("02_bld") / "library")
    assert len(lib.jobs()) - len(lib.missing()) == 7
    assert not list(rd.stage_dir("02_bld").glob(".activations*/*.bin"))  # cleaned up on the way out
    res = bld.run(cfg, progress=False)
    assert "resuming: 7 of 20 blocks" in capsys.readouterr().out
    assert res.timing["jobs_run"] == 13
    assert_same_library(library_state(res.library_dir), reference[3])
    assert res.metrics == reference[2].metrics


def test_two_rank_torchrun_equals_one_process(reference, tmp_path):
    cfg = make_config(tmp_path)
    make_parent_stage(cfg)
    sets = [f"--set={k}={v}" for k, v in {**OVERRIDES, "runs_root": str(tmp_path)}.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "puzzlelib.bld", "--preset", "smoke", "--run-name", "t", *sets],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "over 2 process(es)" in proc.stdout
    timing = json.loads((tmp_path / "t" / "02_bld" / "timing.json").read_text())
    assert timing["world_size"] == 2 and timing["jobs_run"] == 20
    assert RunDir(cfg, create=False).state("02_bld")[0] == "fresh"
    assert_same_library(library_state(tmp_path / "t" / "02_bld" / "library"), reference[3])


def test_shards_cover_every_job_once_and_balance(reference):
    cfg, parent, _, _ = reference
    _, jobs = plan.plan(parent.config, cfg)
    for world in (1, 2, 3):
        shards = plan.assign(jobs, world, parent.config, cfg.seq_len)
        flat = [(j.layer, j.name) for s in shards for j in s]
        assert sorted(flat) == sorted((j.layer, j.name) for j in jobs)
        assert shards == plan.assign(jobs, world, parent.config, cfg.seq_len)
        loads = [sum(j.cost(parent.config, cfg.seq_len) for j in s) for s in shards]
        assert max(loads) <= 1.5 * min(loads) or world == 1
    assert jobs[0].seed(0) == jobs[0].seed(0) != jobs[1].seed(0)  # crc32: stable across processes


@pytest.mark.parametrize("overrides,match", [
    (dict(bld_tokens_per_variant=0), "bld_tokens_per_variant must be > 0"),
    (dict(bld_kv_heads="", bld_ffn_fractions="1.0", bld_include_linear=False,
          bld_include_noop=False, bld_coupled_pairs=""), "variant list is empty"),
    (dict(bld_ffn_fractions="0.5,1.5"), r"fractions in \(0, 1\]"),
    (dict(bld_kv_heads="two"), "bld_kv_heads must be 'auto'"),
    (dict(bld_coupled_pairs="kv1+0.5"), "attn:<variant>\\+ffn:<variant>"),
])
def test_bad_config_is_refused_before_anything_runs(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        make_config(tmp_path, **overrides)
    assert not (tmp_path / "t").exists()


def test_bad_inputs_against_the_parent_leave_nothing(reference, tmp_path):
    cfg, parent, res, ref_state = reference
    # The parent alone decides these: 3 KV heads do not divide 4 query heads; only the parent's
    # own sub-blocks selected (kv2 is the parent's, fraction 1.0 too).
    for kw, match in ((dict(bld_kv_heads="3", parent="hf-org/parent"), "must divide"),
                      (dict(bld_kv_heads="2", bld_ffn_fractions="1.0", bld_include_linear=False,
                            bld_include_noop=False, bld_coupled_pairs=""), "variant list is empty")):
        bad = make_config(tmp_path, **kw)
        with pytest.raises(plan.BLDError, match=match):
            plan.plan(parent.config, bad)
    # No parent stage in this run yet: a clear pointer to the notebook, no 02_bld folder.
    lonely = make_config(tmp_path / "lonely")
    with pytest.raises(StageNotReady, match="00_parent.*00_parent.ipynb"):
        bld.run(lonely, progress=False)
    assert not (tmp_path / "lonely" / "t" / "02_bld").exists()
    # The reference library is untouched by all of this.
    assert_same_library(library_state(res.library_dir), ref_state)


def test_sigkilled_process_resumes_to_the_same_library(tmp_path):
    """A real kill: SIGKILL the CLI once a few blocks are on disk, then rerun the stage."""
    import signal
    import time

    slow = dict(bld_tokens_per_variant=8192)  # 32 steps per block: slow enough to kill mid-way
    killed, clean = make_config(tmp_path / "k", **slow), make_config(tmp_path / "c", **slow)
    for c in (killed, clean):
        make_parent_stage(c)
    sets = [f"--set={k}={v}" for k, v in {**OVERRIDES, **slow, "runs_root": str(tmp_path / "k")}.items()]
    proc = subprocess.Popen([sys.executable, "-m", "puzzlelib.bld", "--preset", "smoke", "--run-name", "t", *sets],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    blocks = tmp_path / "k" / "t" / "02_bld" / "library" / "blocks"
    deadline = time.time() + 120
    while len(list(blocks.glob("*/*.json"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(blocks.glob("*/*.json")))
    if done == 20:
        pytest.skip("the process finished before it could be killed")
    assert RunDir(killed, create=False).state("02_bld")[0] == "interrupted"
    res = bld.run(killed, progress=False)
    assert res.timing["jobs_run"] == 20 - done
    assert_same_library(library_state(res.library_dir),
                        library_state(bld.run(clean, progress=False).library_dir))


@pytest.mark.slow
def test_notebook_02_runs_headless_on_smoke(smoke_run):
    """Notebook 02 as the shared smoke pipeline ran it through papermill (one headless run of every
    notebook per suite, conftest.py): no error output, all four figures."""
    nb = json.loads((smoke_run.report_dir / "02_bld.ipynb").read_text())
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = [o for c in nb["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 4  # before/after, loss curves, layer heatmap, channel contributions


@pytest.mark.parametrize("kind", ["attn", "ffn"])
def test_linear_blocks_fit_by_least_squares_equal_torch_lstsq(kind):
    """bld_linear_init="lstsq": the linear replacement is the least-squares map from the sub-block's
    normalized input to the parent sub-block's output (oracle: torch.linalg.lstsq), and it fits the
    parent's output better than the product of the parent's own matrices."""
    from puzzlelib.bld.train import fit_linear, job_module, nmse, sub_out
    from puzzlelib.core.blocks import Variant

    torch.manual_seed(0)
    parent = PuzzleForCausalLM(tiny_config()).eval()
    job = plan.Job(layer=1, name=f"{kind}:linear", kind=kind, variants=(Variant(kind, "linear"),), trained=True)
    module = job_module(parent, job, None)
    ref = parent.model.layers[1]
    hd = parent.config.hidden_size
    x = torch.randn(2, 4, 16, hd)
    cos, sin = parent.model.rotary_emb(x[0], torch.arange(16)[None])
    batches = [(x[k], sub_out(ref, kind, x[k], cos, sin).detach()) for k in range(2)]
    with torch.no_grad():
        before = float(sum(nmse(sub_out(module, kind, xb, cos, sin), t) for xb, t in batches))
    fit_linear(module, kind, batches)
    norm = module.input_layernorm if kind == "attn" else module.post_attention_layernorm
    X = torch.cat([norm(xb).flatten(0, 1) for xb, _ in batches]).double()
    Y = torch.cat([t.flatten(0, 1) for _, t in batches]).double()
    oracle = torch.linalg.lstsq(X, Y).solution.T
    lin = module.self_attn.linear_attn if kind == "attn" else module.mlp.linear_mlp
    assert torch.allclose(lin.weight.double(), oracle, atol=1e-4)
    with torch.no_grad():
        after = float(sum(nmse(sub_out(module, kind, xb, cos, sin), t) for xb, t in batches))
    assert after < before and after < 1.0
