"""Stage 03 (replace-1-block scoring): prefix-cached == naive, parent blocks score 0, determinism,
the score table stage 04 reads, the interaction check, bad inputs — and notebook 03 on a tiny run.

Unit tests use the tiny parent of conftest (2 layers, hidden 64) with blocks initialised from it
and perturbed (as training would); stage tests run the real stages 02 and 03 on a tiny parent
registered as a finished 00_parent stage of a throwaway run.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from puzzlelib.bld import stage as bld

from puzzlelib.scoring import stage as scoring
from puzzlelib.scoring import interactions
from puzzlelib.scoring import prefix_scoring
from puzzlelib.scoring import score_table
from puzzlelib.core.blocks import init_variant, list_library, parse_variant
from puzzlelib.core.config import ConfigError, RunConfig
from puzzlelib.core.export import save_checkpoint
from puzzlelib.bld.library import Library, LibraryMismatch
from puzzlelib.core.modeling_decilm import PuzzleForCausalLM
from puzzlelib.core.rundir import RunDir, StageNotReady
from puzzlelib.core.atomic import atomic_write_json
from conftest import tiny_config

PAIR = "attn:kv1+ffn:0.50"


# ------------------------------------------------------------------------------- unit level

def perturbed_blocks(parent, seed=0, scale=0.02):
    """Every library variant of every layer, initialised from the parent and perturbed (the
    parent's own blocks left exact), plus one coupled pair per layer."""
    lib = list_library(parent.config)
    g = torch.Generator().manual_seed(seed)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for i in range(parent.config.num_hidden_layers):
            for v in lib["attn"] + lib["ffn"]:
                t = init_variant(parent, i, v)
                if not v.is_parent(parent.config, i):
                    t = {k: x + scale * torch.randn(x.shape, generator=g) for k, x in t.items()}
                out[(i, v.name)] = t
            a, f = PAIR.split("+")
            out[(i, PAIR)] = {**out[(i, a)], **out[(i, f)]}
    return out


def batches_of(seed=0, n=10, seq=24, vocab=300, bs=4):
    x = torch.randint(0, vocab, (n, seq + 1), generator=torch.Generator().manual_seed(seed))
    return [(x[i:i + bs, :-1], x[i:i + bs, 1:]) for i in range(0, n, bs)]


def same_rows(a: list[dict], b: list[dict]) -> bool:
    """Row lists equal, NaN equal to NaN (e.g. nmse of blocks with no BLD record)."""
    norm = lambda rows: [{k: ("nan" if isinstance(v, float) and v != v else v) for k, v in r.items()}  # noqa: E731
                         for r in rows]
    return norm(a) == norm(b)


@pytest.fixture(scope="module")
def scored():
    torch.manual_seed(0)
    parent = PuzzleForCausalLM(tiny_config()).eval()
    cands = prefix_scoring.blocks_candidates(perturbed_blocks(parent))
    batches = batches_of()
    return parent, cands, batches, prefix_scoring.score_candidates(parent, cands, batches, progress=False)


def test_prefix_cached_scores_equal_naive_full_forward(scored):
    parent, cands, batches, cached = scored
    naive = prefix_scoring.score_naive(parent, cands, batches)
    assert [(r["layer"], r["variant"]) for r in naive.rows] == [(r["layer"], r["variant"]) for r in cached.rows]
    assert {r["sub_block"] for r in cached.rows} == {"attn", "ffn", "pair"}
    for a, b in zip(cached.rows, naive.rows):
        for m in ("kl", "lm_loss", "lm_loss_delta", "top1_agreement"):
            assert abs(a[m] - b[m]) <= 1e-5, (a["layer"], a["variant"], m, a[m], b[m])
    assert cached.parent == naive.parent
    # Not a vacuous comparison: replaced blocks do change the model, by different amounts.
    kls = [r["kl"] for r in cached.rows if not r["is_parent"]]
    assert min(kls) > 0 and len(set(kls)) == len(kls)


def test_parent_blocks_score_zero_and_noop_scores_positive(scored):
    parent, cands, batches, cached = scored
    par = [r for r in cached.rows if r["is_parent"]]
    assert len(par) == 2 * parent.config.num_hidden_layers
    for r in par:
        assert r["kl"] == 0.0 and r["top1_agreement"] == 1.0 and r["lm_loss_delta"] == 0.0, r
    tokens = sum(y.numel() for _, y in batches)
    assert all(r["tokens"] == tokens for r in cached.rows)
    # Removing a sub-block (no-op) costs more than the small perturbation of any GQA block.
    for i in range(parent.config.num_hidden_layers):
        noop = next(r["kl"] for r in cached.rows if r["layer"] == i and r["variant"] == "attn:noop")
        assert noop > 0


def test_scores_are_deterministic(scored):
    parent, cands, batches, first = scored
    again = prefix_scoring.score_candidates(parent, cands, batches, progress=False)
    assert same_rows(again.rows, first.rows)


def test_candidate_choices_and_parent_names(tiny_parent):
    pc = tiny_parent.config
    assert prefix_scoring.parent_choices(pc) == [("attn:kv2", "ffn:1.00")] * 2
    c = prefix_scoring.Candidate(1, PAIR)
    assert c.sub_block == "pair" and not c.is_parent(pc)
    assert c.choices(pc) == [("attn:kv2", "ffn:1.00"), ("attn:kv1", "ffn:0.50")]
    assert prefix_scoring.Candidate(0, "ffn:1.00").is_parent(pc)
    with pytest.raises(score_table.ScoringError, match="out of range"):
        prefix_scoring.score_candidates(tiny_parent, [prefix_scoring.Candidate(2, "attn:kv1", load=dict)],
                                 batches_of(), progress=False)
    with pytest.raises(score_table.ScoringError, match="no held-out batch"):
        prefix_scoring.score_candidates(tiny_parent, [], [], progress=False)


def test_score_table_api_and_csv_round_trip(scored, tmp_path):
    parent, cands, batches, cached = scored
    table = score_table.ScoreTable(cached.rows)
    assert table.num_layers == 2 and table.sources == ["bld"]
    assert table.variants(0, "attn") == ["attn:kv1", "attn:kv2", "attn:linear", "attn:noop"]
    assert table.variants(1, "pair") == [PAIR]
    assert table.score(0, "attn:kv2") == 0.0
    assert table.score(1, parse_variant("ffn:0.50"), "lm_loss") == next(
        r["lm_loss"] for r in cached.rows if r["layer"] == 1 and r["variant"] == "ffn:0.50")
    names, mat = table.score_matrix("ffn")
    assert mat.shape == (2, len(names)) and not np.isnan(mat).any()
    assert table.parent_choices() == prefix_scoring.parent_choices(parent.config)
    child = [("attn:kv1", "ffn:0.25"), ("attn:kv2", "ffn:noop")]
    assert table.predict(child) == pytest.approx(table.score(0, "attn:kv1") + table.score(0, "ffn:0.25")
                                                 + table.score(1, "ffn:noop"))
    table.to_csv(tmp_path / "s.csv")
    back = score_table.ScoreTable.from_csv(tmp_path / "s.csv")
    assert same_rows(back.to_rows(), table.to_rows())  # repr-exact floats, typed columns
    # Stage 04 asks for what its cost table lists: a variant the library lacks is a clear error.
    with pytest.raises(score_table.ScoringError, match=r"ffn:0.30.*bld_ffn_fractions.*02_bld"):
        table.score(0, "ffn:0.30")
    with pytest.raises(score_table.ScoringError, match=r"1 \(layer, variant\) pairs listed in the cost "
                                                   r"table have no score.*\(1, 'attn:kv4'\)"):
        table.require([(0, "attn:kv1"), (1, "attn:kv4")])
    with pytest.raises(score_table.ScoringError, match="unknown metric"):
        table.score(0, "attn:kv1", "accuracy")
    with pytest.raises(score_table.ScoringError, match="no 'init' scores"):
        table.score(0, "attn:kv1", source="init")


def test_interaction_children_span_mild_to_severe(scored):
    parent, cands, batches, cached = scored
    table = score_table.ScoreTable([r for r in cached.rows if r["sub_block"] != "pair"])
    kids = interactions.interaction_children(table, 5, seed=3)
    assert kids == interactions.interaction_children(table, 5, seed=3)
    assert kids != interactions.interaction_children(table, 5, seed=4)
    base = table.parent_choices()
    n = [sum(v != b for p, q in zip(k, base) for v, b in zip(p, q)) for k in kids]
    assert n[0] == 1 and n[-1] == 2 and n == sorted(n)  # 1 .. L replaced sub-blocks
    assert interactions.spearman([1, 2, 3, 4], [10, 20, 25, 100]) == 1.0
    assert interactions.spearman([1, 2, 3], [3, 2, 1]) == -1.0
    assert interactions.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)


# ------------------------------------------------------------------------------ stage level

OVERRIDES = dict(seq_len=32, bld_ffn_fractions="1.0,0.5,0.25", bld_coupled_pairs=PAIR,
                 bld_tokens_per_variant=2048, bld_batch_size=8, bld_warmup_steps=2,
                 bld_calib_tokens=1024, bld_eval_tokens=1024, bld_eval_every=4, threads=1,
                 scoring_tokens=1024, scoring_batch_size=8, scoring_interaction_children=4,
                 scoring_naive_check=3)


def make_config(root: Path, **kw) -> RunConfig:
    return RunConfig.from_preset("smoke", {**OVERRIDES, "runs_root": str(root), **kw}, run_name="t")


def make_parent_stage(cfg: RunConfig, seed: int = 0, heldout: int = 6000) -> PuzzleForCausalLM:
    """Register a tiny parent + token arrays as a finished 00_parent stage for ``cfg``."""
    torch.manual_seed(seed)
    model = PuzzleForCausalLM(tiny_config()).eval()
    rng = np.random.default_rng(0)
    with RunDir(cfg).stage("00_parent") as st:
        save_checkpoint(model, st.dir / "model")
        tok = st.dir / "tokens"
        tok.mkdir()
        words = rng.integers(3, 300, size=(60, 5))
        stream = words[rng.integers(0, 60, size=8000)].ravel().astype(np.uint16)
        stream[:30000].tofile(tok / "train.bin")
        stream[30000:30000 + heldout].tofile(tok / "heldout.bin")
        atomic_write_json(tok / "tokens.json", {"dtype": "uint16", "n_train_tokens": 30000,
                                                "n_heldout_tokens": heldout})
        for name in ("metrics.json", "history.json"):
            atomic_write_json(st.dir / name, {})
        atomic_write_json(st.dir / "samples.json", [])
    return model


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cfg = make_config(root)
    parent = make_parent_stage(cfg)
    bres = bld.run(cfg, progress=False)
    res = scoring.run(cfg, progress=False)
    return cfg, parent, bres, res


def test_stage_artifacts_table_and_metrics(stage):
    cfg, parent, bres, res = stage
    assert not res.reused
    assert sorted(p.name for p in res.dir.iterdir()) == [
        "interactions.csv", "manifest.json", "metrics.json", "scores.csv", "scores.json", "timing.json"]
    t = res.table
    lib = Library.open(bres.library_dir)
    # Every library block scored once from BLD; every trained one also from its initialisation.
    assert {(r["layer"], r["variant"]) for r in t.rows if r["source"] == "bld"} == set(lib.jobs())
    trained = {(r["layer"], r["variant"]) for r in lib.records(False) if r["trained"]}
    assert {(r["layer"], r["variant"]) for r in t.rows if r["source"] == "init"} == trained
    assert t.variants(0, "ffn") == ["ffn:1.00", "ffn:0.50", "ffn:0.25", "ffn:linear", "ffn:noop"]
    assert t.score(1, "attn:kv2") == 0.0 and t.score(1, "ffn:noop", source="init") == t.score(1, "ffn:noop")
    # Untrained blocks answer for both sources: the init view lists the same variants.
    assert t.variants(0, "ffn", "init") == t.variants(0, "ffn")
    names, init_kl = t.score_matrix("attn", source="init")
    assert not np.isnan(init_kl).any() and (init_kl >= t.score_matrix("attn")[1] * 0).all()
    assert all(r["tokens"] == 1024 for r in t.rows)
    # BLD's own measurements travel with the scores.
    assert t.score(0, "ffn:0.25", "nmse") == lib.record(0, "ffn:0.25")["final_nmse"]
    assert score_table.ScoreTable.from_csv(res.dir / "scores.csv").to_rows() == t.to_rows()
    m = res.metrics
    assert m["parent_blocks_max_kl"] == 0.0 and m["tokens_scored"] == 1024
    assert m["naive_check"]["candidates"] == 3 and m["naive_check"]["max_abs_diff_kl"] <= 1e-5
    assert m["candidates"] == len(t) and m["bld_improved_share"] is not None
    inter = res.interactions
    assert len(inter) == 4 and m["interactions"]["children"] == 4
    assert all(r["measured_kl"] > 0 and r["predicted_kl"] > 0 for r in inter)
    assert -1 <= m["interactions"]["spearman_kl"] <= 1
    assert res.timing["candidates"] == len(t) and res.timing["speedup_prefix_caching"] > 0
    assert scoring.load(cfg).table.to_rows() == t.to_rows()
    assert scoring.load_scores(cfg).to_rows() == t.to_rows()


def test_stage_reuse_and_determinism(stage, capsys):
    cfg, parent, bres, res = stage
    again = scoring.run(cfg, progress=False)
    assert again.reused and "reusing" in capsys.readouterr().out
    before = (res.dir / "scores.json").read_text()
    forced = scoring.run(cfg.replace(force=True), progress=False)
    assert not forced.reused
    assert (res.dir / "scores.json").read_text() == before  # same seed -> same bytes
    assert forced.metrics == res.metrics
    assert forced.interactions == res.interactions
    # A scoring field changes -> stale -> rescored; stage 02 is untouched.
    fewer = scoring.run(cfg.replace(scoring_include_init=False, scoring_interaction_children=0,
                                    scoring_naive_check=0), progress=False)
    assert not fewer.reused and fewer.table.sources == ["bld"] and fewer.interactions == []
    assert RunDir(cfg).is_fresh("02_bld")
    scoring.run(cfg, progress=False)  # leave the fixture's run as it was


def test_stage_before_bld_names_the_notebook(tmp_path):
    cfg = make_config(tmp_path)
    make_parent_stage(cfg)
    with pytest.raises(StageNotReady, match=r"02_bld.*notebooks/02_bld.ipynb"):
        scoring.run(cfg, progress=False)
    assert not (tmp_path / "t" / "03_scoring").exists()


def test_library_of_another_parent_is_refused(stage):
    cfg, parent, bres, res = stage
    torch.manual_seed(1)
    other = PuzzleForCausalLM(tiny_config()).eval()
    with pytest.raises(LibraryMismatch, match=r"03_scoring cannot score.*another parent"):
        scoring.open_library(bres.library_dir, other)
    with pytest.raises(LibraryMismatch, match="another parent"):
        prefix_scoring.library_candidates(other, Library.open(bres.library_dir))


def test_bad_heldout_and_config_are_clear_errors(tmp_path):
    cfg = make_config(tmp_path)
    with pytest.raises(score_table.ScoringError, match=r"held-out set has 0 tokens.*heldout_fraction"):
        scoring.heldout_batches(np.zeros(0, np.uint16), cfg)
    with pytest.raises(score_table.ScoringError, match="fewer than one sequence"):
        scoring.heldout_batches(np.zeros(32, np.uint16), cfg)
    assert len(scoring.heldout_batches(np.zeros(33, np.uint16), cfg)) == 1
    with pytest.raises(ConfigError, match="scoring_tokens must cover at least one sequence"):
        make_config(tmp_path, scoring_tokens=0)
    with pytest.raises(ConfigError, match="scoring_interaction_children must be 0"):
        make_config(tmp_path, scoring_interaction_children=2)
    # A run whose held-out split is shorter than a sequence: refused before any 03 artifact.
    short = make_config(tmp_path / "short")
    make_parent_stage(short, heldout=20)
    with pytest.raises(score_table.ScoringError, match="held-out set has 20 tokens"):
        scoring.run(short, progress=False)
    assert not (tmp_path / "short" / "t" / "03_scoring").exists()


@pytest.mark.slow
def test_notebook_03_runs_headless(stage, tmp_path):
    from puzzlelib.runner import run_pipeline

    cfg, *_ = stage
    reports = tmp_path / "reports"
    res = run_pipeline("smoke", run_name="t", stages="03", overrides={
        **OVERRIDES, "runs_root": cfg.runs_root, "reports_root": str(reports)},
        echo=lambda *a, **k: None)
    assert res.exit_code == 0
    nb = json.loads((reports / "t" / "03_scoring.ipynb").read_text())
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = [o for c in nb["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 4  # heatmap, score ranges per variant, BLD vs init, interactions
