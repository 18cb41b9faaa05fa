"""Stage 06 (evaluation): ECE / AURC against hand-computed values, the local lm-eval tasks (built
deterministically, run offline, scored as our own forward pass scores them), KV-cache throughput,
the whole stage on a tiny real pipeline (00 → 05), its report, the README table, and the exported
child through the ``lm_eval`` command line in a separate process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from puzzlelib.evaluation import stage as E
from puzzlelib.evaluation import report
from puzzlelib.evaluation import throughput
from puzzlelib.evaluation import uncertainty
from puzzlelib.core import eval_tasks as T
from puzzlelib.core.config import RunConfig
from puzzlelib.core.rundir import RunDir, StageNotReady

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ ECE / AURC (hand-computed)

def test_ece_and_aurc_equal_hand_computed_values():
    conf = [0.95, 0.85, 0.85, 0.65, 0.45]
    ok = [1, 1, 0, 1, 0]
    # Bins (0.9,1], (0.8,0.9], (0.6,0.7], (0.4,0.5]: gaps .05, |.5-.85|=.35 (2 samples), .35, .45.
    assert uncertainty.ece(conf, ok, bins=10) == pytest.approx((0.05 + 2 * 0.35 + 0.35 + 0.45) / 5)  # 0.31
    # Thresholds .95 | .85 (a tie: both enter together) | .65 | .45 -> coverage .2 .6 .8 1,
    # risk 0, 1/3, 1/4, 2/5; step integral .2*0 + .4/3 + .2/4 + .2*2/5.
    cov, risk = uncertainty.risk_coverage(conf, ok)
    assert cov.tolist() == pytest.approx([0.2, 0.6, 0.8, 1.0])
    assert risk.tolist() == pytest.approx([0.0, 1 / 3, 0.25, 0.4])
    assert uncertainty.aurc(conf, ok) == pytest.approx(0.4 / 3 + 0.05 + 0.08)
    # A perfect ranking of 3 right + 2 wrong: risks 0,0,0,1/4,2/5 -> mean 0.13.
    assert uncertainty.optimal_aurc(ok) == pytest.approx(0.13)
    # Without ties AURC is the mean risk of the k most confident answers.
    assert uncertainty.aurc([0.9, 0.8, 0.7, 0.6], [0, 1, 1, 1]) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert uncertainty.aurc([0.9, 0.8, 0.7, 0.6], [1, 1, 1, 0]) == pytest.approx(uncertainty.optimal_aurc([1, 1, 1, 0]))


def test_uncertainty_metrics_of_choice_probabilities():
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.45, 0.05]])
    m = uncertainty.uncertainty_metrics(probs, np.array([0, 2, 2]), bins=10)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["mean_confidence"] == pytest.approx((0.7 + 0.6 + 0.45) / 3)
    # one sample per bin: |1-.7| + |0-.6| + |1-.45| over 3
    assert m["ece"] == pytest.approx((0.3 + 0.6 + 0.55) / 3)
    assert m["aurc"] == pytest.approx((0 + 1 / 2 + 1 / 3) / 3)
    assert m["e_aurc"] == pytest.approx(m["aurc"] - (0 + 0 + 1 / 3) / 3)
    assert m["nll"] == pytest.approx(-(np.log(0.7) + np.log(0.2) + np.log(0.45)) / 3)
    assert np.allclose(uncertainty.softmax(np.log(probs)), probs)


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(0)
    a = {"t": rng.integers(0, 2, 200).astype(float)}
    assert uncertainty.bootstrap_retention(a, a, iters=300) == pytest.approx((1.0, 1.0))
    worse = {"t": a["t"] * (rng.random(200) < 0.8)}  # loses ~20 % of the right answers
    lo, hi = uncertainty.bootstrap_retention(a, worse, iters=500)
    point = worse["t"].mean() / a["t"].mean()
    assert lo < point < hi < 1.0


# ----------------------------------------------------------------------------- local tasks

def synthetic_docs(n_docs: int = 4, n_funcs: int = 30) -> tuple[list[str], list[str]]:
    docs = []
    for d in range(n_docs):
        body = []
        for f in range(n_funcs):
            body += [f"def compute_{d}_{f}(value_{f}, scale_{d}):",
                     f"    total_{f} = value_{f} * scale_{d} + {f}",
                     f"    result_{f} = helper_{d}(total_{f}, value_{f})",
                     f"    return result_{f} - scale_{d}", ""]
        docs.append("\n".join(body) + "\n")
    return docs, [f"mod{d}.py" for d in range(n_docs)]


SIZES = dict(next_line=20, name_recall=20, bpb_chunks=5, bpb_chunk_bytes=256, context_lines=4, seed=0)


def test_tasks_are_deterministic_and_well_formed():
    docs, names = synthetic_docs()
    a, b = T.build_tasks(docs, names, **SIZES), T.build_tasks(docs, names, **SIZES)
    assert [t.rows for t in a] == [t.rows for t in b]
    assert [t.rows for t in T.build_tasks(docs, names, **{**SIZES, "seed": 1})] != [t.rows for t in a]
    nl, nr, bpb = a
    for r in nl.rows:
        file, line = r["source"].rsplit(":", 1)
        lines = docs[names.index(file)].split("\n")
        true = r["choices"][r["label"]]
        assert true == lines[int(line) - 1] + "\n" and r["context"].endswith(lines[int(line) - 2] + "\n")
        assert len(set(c.strip() for c in r["choices"])) == 4
        indent = true[: len(true) - len(true.lstrip())]
        assert all(c.startswith(indent) and not c[len(indent)].isspace() for c in r["choices"])
        # distractors come from other files (every line of file d names scale_d or helper_d)
        d = names.index(file)
        assert all(f"scale_{d}" not in c and f"helper_{d}(" not in c
                   for k, c in enumerate(r["choices"]) if k != r["label"])
    for r in nr.rows:
        true = r["choices"][r["label"]]
        assert len(set(r["choices"])) == 4 and len({c[-1] for c in r["choices"]}) == 1
        assert all(c[:-1] in r["context"] for c in r["choices"])  # every choice was seen: recall
    assert len(bpb.rows) == 5 and all(len(r["text"].encode()) <= 256 for r in bpb.rows)
    assert nl.chance == nr.chance == 0.25 and bpb.chance is None


def test_too_few_heldout_lines_name_the_config_to_change():
    docs, names = synthetic_docs(n_docs=2, n_funcs=2)
    with pytest.raises(T.TaskBuildError, match="eval_next_line_samples=500.*heldout_fraction"):
        T.build_tasks(docs, names, **{**SIZES, "next_line": 500})
    with pytest.raises(T.TaskBuildError, match="eval_name_samples"):
        T.build_tasks(docs, names, **{**SIZES, "next_line": 2, "name_recall": 500})
    with pytest.raises(T.TaskBuildError, match="eval_bpb_chunks"):
        T.build_tasks(docs, names, **{**SIZES, "next_line": 2, "name_recall": 2, "bpb_chunks": 500})
    with pytest.raises(T.TaskBuildError, match="heldout_fraction"):
        T.build_tasks([], [], **SIZES)


def _own_loglik(model, tok, context: str, cont: str, max_length: int) -> float:
    """Log-likelihood of ``cont`` after ``context`` by our own forward pass, with lm-eval's token
    split (trailing context whitespace joins the choice) and left truncation to ``max_length``."""
    ctx = tok(context.rstrip())["input_ids"] if context.strip() else [tok.eos_token_id]
    whole = tok(context + cont)["input_ids"] if context.strip() else ctx + tok(cont)["input_ids"]
    cont_ids = whole[len(ctx):]
    ids = (ctx + cont_ids)[-(max_length + 1):]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].float(), -1)
    n = len(ids) - 1
    return sum(lp[n - len(cont_ids) + j, t].item() for j, t in enumerate(cont_ids))


def _report_metrics(run_dir: Path, quality: float, speed: float) -> dict:
    """A stage-06 metrics dict shaped like summarize()'s, with ``speed`` in every measured field."""
    def row(name: str, src: str) -> dict:
        return {"name": name, "method": "mip" if name != "parent" else "parent", "gkd": True,
                "source": src, "accuracy": {"t": quality}, "retention": quality,
                "predicted_speedup": 2.0, "measured_speedup": speed,
                "measured": {"best": {"speedup": speed, "tokens_per_s": 100 * speed}},
                "speedup_error": speed / 2.0 - 1, "eval_seconds": speed,
                "search": {"batch": 4, "predicted": {"speedup": 2.0}, "measured": {"speedup": speed}}}

    return {"run_name": "r", "preset": "smoke", "device": "cpu", "threads": 1,
            "models": [row("parent", str(run_dir / "00_parent" / "model")),
                       row("puzzle-1", str(run_dir / "05_gkd" / "children" / "puzzle-1")),
                       row("puzzle-1 (before GKD)", "BLD library")],
            "headline": {"model": "puzzle-1", "measured_speedup": speed, "predicted_speedup": 2.0,
                         "retention": quality, "goal_met": speed >= 2,
                         "baselines": {"depth": {"retention": 0.5, "measured_speedup": speed}}},
            "pareto": [{"target_speedup": 2, "speedup": 2.1, "seconds": speed}],
            "timing": {"quality_seconds": speed}, "settings": {"bootstrap": 10}}


def test_report_split_keeps_timings_out_of_metrics_and_merges_back(tmp_path, capsys):
    """Two runs that differ only in wall-clock measurements (and where their run folder lives)
    write the same metrics.json; metrics + timings give back what stage 06 returned."""
    a, b = _report_metrics(tmp_path / "a", 0.9, 1.7), _report_metrics(tmp_path / "b", 0.9, 2.3)
    (da, ta), (db, tb) = report.split_report(a, tmp_path / "a"), report.split_report(b, tmp_path / "b")
    assert json.dumps(da) == json.dumps(db) and ta != tb
    assert [m["source"] for m in da["models"]] == ["00_parent/model", "05_gkd/children/puzzle-1", "BLD library"]
    assert "1.7" not in json.dumps(da) and "measured" not in json.dumps(da)
    merged = report.merge_report(da, ta)
    assert merged == {**a, "models": [{**m, "source": d["source"]} for m, d in zip(a["models"], da["models"])]}
    # Files: the split layout merges; the single-file layout of older reports reads as it is.
    d = tmp_path / "report"
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps(da))
    with pytest.raises(T.EvaluationError, match="timings.json is missing"):
        report.read_report(d / "metrics.json")
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.MARKERS[0]}\n{report.MARKERS[1]}\n")
    assert not report.update_readme_results(readme, d / "metrics.json") and "timings.json" in capsys.readouterr().out
    (d / "timings.json").write_text(json.dumps(ta))
    assert report.read_report(d / "metrics.json")["headline"]["measured_speedup"] == 1.7
    (d / "metrics.json").write_text(json.dumps(a))
    assert report.read_report(d / "metrics.json") == a


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models on a shared 2-core machine: a second intra-op thread only adds waiting.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.filterwarnings("ignore")
def test_task_yamls_load_and_run_offline_on_a_tiny_model(tiny_parent, tiny_tokenizer, tmp_path):
    docs, names = synthetic_docs()
    built = T.build_tasks(docs, names, **{**SIZES, "next_line": 8, "name_recall": 8, "bpb_chunks": 3})
    info = T.write_tasks(built, tmp_path / "tasks", SIZES)
    for t in T.LOCAL_TASKS:
        assert info["tasks"][t]["jsonl_sha256"] == T._sha256(tmp_path / "tasks" / f"{t}.jsonl")
    loaded = T.task_manager(tmp_path / "tasks").load(list(T.LOCAL_TASKS))
    q = E.evaluate_model(tiny_parent, tiny_tokenizer, loaded, batch_size=4, max_length=128,
                         prefix_token_id=tiny_tokenizer.eos_token_id)
    assert set(q["results"]) == set(T.LOCAL_TASKS)
    assert {"acc", "acc_norm", "acc_mutual_info"} <= set(q["results"][T.NEXT_LINE])
    assert q["results"][T.BPB]["bits_per_byte"] > 0
    for task, metric in E.HEADLINE_METRIC.items():
        s = q["samples"][task]
        acc = np.mean(np.argmax(s["scores"], 1) == np.array(s["labels"]))
        assert acc == pytest.approx(q["results"][task][metric])
        assert np.allclose(np.sum(s["probs"], 1), 1, atol=1e-5)
    # The scores lm-eval produced are what our own forward pass gives: PMI for next-line.
    r = T.read_rows(tmp_path / "tasks", T.NEXT_LINE)[0]
    pmi = [_own_loglik(tiny_parent, tiny_tokenizer, r["context"], c, 128)
           - _own_loglik(tiny_parent, tiny_tokenizer, "", c, 128) for c in r["choices"]]
    assert q["samples"][T.NEXT_LINE]["scores"][0] == pytest.approx(pmi, abs=2e-3)
    r = T.read_rows(tmp_path / "tasks", T.NAME_RECALL)[0]
    ll = [_own_loglik(tiny_parent, tiny_tokenizer, r["context"], c, 128) for c in r["choices"]]
    assert q["samples"][T.NAME_RECALL]["scores"][0] == pytest.approx(ll, abs=2e-3)


# ------------------------------------------------------------------------------- throughput

def test_cached_greedy_decoding_equals_generate_and_throughput_is_relative(tiny_parent):
    from puzzlelib.core.blocks import build_child

    ids = torch.randint(3, 300, (2, 10))
    toks, times = throughput.greedy_generate(tiny_parent, ids, 6)
    ref = tiny_parent.generate(ids, max_new_tokens=7, do_sample=False, pad_token_id=2)
    assert torch.equal(toks, ref[:, 10:]) and set(times) == {"wall", "cpu"}
    child = build_child(tiny_parent, [("attn:noop", "ffn:noop"), ("attn:kv1", "ffn:0.50")])
    thr = throughput.measure_throughput({"parent": tiny_parent, "child": child}, [(1, 8, 4), (2, 8, 4)], rounds=3,
                               warmup=1, progress=False)
    assert len(thr["samples"]["wall"]["child"]["b2"]["decode_s"]) == 3
    p, c = thr["models"]["parent"], thr["models"]["child"]
    assert p["b1"]["speedup"] == 1.0 and p["best"]["speedup"] == 1.0
    assert c["best"]["speedup"] > 1.0  # half the work removed
    raw = thr["samples"]["wall"]["child"]["b2"]
    assert c["b2"]["tokens_per_s"] == pytest.approx(2 * 4 / np.median(np.add(raw["prefill_s"], raw["decode_s"])))
    assert c["b2"]["prefill_tokens_per_s"] == pytest.approx(2 * 8 / np.median(raw["prefill_s"]))
    with pytest.raises(T.EvaluationError, match="reference"):
        throughput.measure_throughput({"child": child}, [(1, 8, 4)], rounds=1, progress=False)


# ------------------------------------------------------------------ the stage on a tiny pipeline

TINY = dict(corpus_max_bytes=300_000, tokenizer_train_bytes=200_000, vocab_size=300, seq_len=64,
            parent_hidden_size=32, parent_num_layers=2, parent_num_heads=4, parent_num_kv_heads=2,
            parent_intermediate_size=64, parent_train_tokens=16 * 64 * 12, parent_batch_size=16,
            parent_warmup_steps=3, parent_eval_every=4, parent_eval_tokens=2048, parent_checkpoint_every=4,
            threads=1, profile_batch_sizes="1,2", profile_prompt_len=16, profile_gen_len=8, profile_repeats=3,
            profile_num_random_children=3, bld_ffn_fractions="1.0,0.5", bld_tokens_per_variant=1024,
            bld_batch_size=8, bld_calib_tokens=512, bld_eval_tokens=512, bld_eval_every=0, scoring_tokens=512,
            scoring_interaction_children=0, scoring_naive_check=0, search_speedup=1.2, search_num_solutions=1,
            search_pareto_speedups="1.2,1.5", search_influence_tokens=512, search_random_tries=50,
            gkd_tokens=1024, gkd_batch_size=8, gkd_eval_tokens=512, gkd_ablation=False, gkd_eval_every=0,
            eval_next_line_samples=16, eval_name_samples=16, eval_bpb_chunks=4, eval_context_lines=3,
            eval_speed_rounds=2, eval_bootstrap=100)


def tiny_cfg(root: Path, **kw) -> RunConfig:
    return RunConfig.from_preset("smoke", {**TINY, "runs_root": str(root / "runs"),
                                           "reports_root": str(root / "reports"), **kw}, run_name="t")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Stages 00 → 05 for real on a tiny config (a few seconds), then stage 06."""
    from puzzlelib.bld import stage as bld
    from puzzlelib.gkd import stage as gkd
    from puzzlelib.parent import stage as parent
    from puzzlelib.profiling import stage as profiling
    from puzzlelib.scoring import stage as scoring
    from puzzlelib.search import stage as search

    root = tmp_path_factory.mktemp("eval")
    cfg = tiny_cfg(root)
    parent.run(cfg)
    for mod in (profiling, bld, scoring, search):
        mod.run(cfg, progress=False)
    with pytest.raises(StageNotReady, match=r"05_gkd.*notebooks/05_gkd\.ipynb"):
        E.run(cfg, progress=False)  # stage 05 has not run yet: refused, nothing written
    assert RunDir(cfg).manifest(E.STAGE) is None
    gkd.run(cfg)
    return cfg, E.run(cfg, progress=False)


def test_stage_writes_tasks_results_throughput_and_metrics(pipeline):
    cfg, res = pipeline
    assert not res.reused and RunDir(cfg).is_fresh(E.STAGE)
    d = res.dir
    assert {p.name for p in (d / "tasks").iterdir()} >= {f"{t}.{x}" for t in T.LOCAL_TASKS for x in ("jsonl", "yaml")}
    for t, v in res.tasks["tasks"].items():
        assert v["jsonl_sha256"] == T._sha256(d / "tasks" / f"{t}.jsonl")
    names = [m["name"] for m in res.models]
    mip = [m for m in res.models if m["method"] == "mip" and m["gkd"]]
    assert names[0] == "parent" and f"{mip[0]['name']} (before GKD)" in names  # eval_before_gkd="best"
    assert all(m["gkd"] for m in res.models if m["method"] not in ("parent", "mip"))
    p = res.row("parent")
    assert p["retention"] == 1.0 and p["measured_speedup"] == 1.0 and p["predicted_speedup"] == pytest.approx(1.0)
    for m in res.models:
        assert (d / "results" / f"{E._safe(m['name'])}.json").is_file()
        assert m["lm_eval_consistency"] < 1e-9  # lm-eval's accuracy == ours from the per-sample scores
        assert m["measured_speedup"] > 0 and 0 <= m["ece"] <= 1 and m["bpb"] > 0
        lo, hi = m["retention_ci"]
        assert lo <= m["retention"] + 1e-9 and m["retention"] <= hi + 1e-9
        assert set(m["measured"]) == {"b1", "b2", "best"} and set(m["uncertainty"]) == set(T.MC_TASKS)
    assert res.metrics["headline"]["model"] == mip[0]["name"]
    # The child "before GKD" is the very model stage 05 started from: same held-out KL to the parent.
    from puzzlelib.bld import stage as bld
    from puzzlelib.core import data
    from puzzlelib.gkd import stage as gkd
    from puzzlelib.parent import stage as parent
    from puzzlelib.profiling import stage as profiling
    from puzzlelib.search import stage as search

    pres = parent.load(cfg)
    pm = pres.load_model()
    entries, _ = E.collect_models(cfg, pm, pres.model_dir, search.load(cfg), gkd.load(cfg), profiling.load(cfg).costs,
                                  lambda: bld.load(cfg).library_dir)
    before = next(e for e in entries if e.gkd is False)
    st = gkd.GKDSettings.from_config(cfg)
    ev = gkd.evaluate(before.build(), pm, data.load_tokens(pres.dir / "tokens", "heldout"), st.seq_len,
                      st.batch_size, st.eval_tokens, torch.device("cpu"))
    assert ev["kl"] == pytest.approx(gkd.load(cfg).metrics["children"][mip[0]["name"]]["before"]["kl"], rel=1e-4)
    assert len(res.throughput["samples"]["wall"]["parent"]["b1"]["prefill_s"]) == cfg.eval_speed_rounds
    again = E.run(cfg, progress=False)
    assert again.reused and again.metrics == res.metrics


def test_a_stale_upstream_is_refused_naming_its_notebook(pipeline):
    cfg, _ = pipeline
    with pytest.raises(StageNotReady, match=r"05_gkd.*gkd_lr.*notebooks/05_gkd\.ipynb"):
        E.run(cfg.replace(gkd_lr=5e-4), progress=False)


def test_report_folder_has_every_expected_file(pipeline):
    cfg, res = pipeline
    paths = report.write_report(cfg, res)
    out = Path(cfg.reports_root) / cfg.run_name
    assert sorted(p.name for p in out.iterdir()) == sorted(report.REPORT_FILES)
    assert all(paths[n] == out / n and paths[n].stat().st_size > 0 for n in report.REPORT_FILES)
    summary = (out / "summary.md").read_text()
    assert "| parent |" in summary and res.metrics["headline"]["model"] in summary
    assert json.loads((out / "metrics.json").read_text())["models"][0]["name"] == "parent"
    # The figure data the notebook draws.
    curves = E.curve_data(res, T.NAME_RECALL)
    assert set(curves) == {m["name"] for m in res.models} and curves["parent"]["coverage"][-1] == 1.0


def test_update_readme_results(pipeline, tmp_path, capsys):
    cfg, res = pipeline
    metrics = Path(cfg.reports_root) / cfg.run_name / "metrics.json"
    report.write_report(cfg, res)
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nno markers here\n")
    assert not report.update_readme_results(readme, metrics)
    assert readme.read_text() == "# x\n\nno markers here\n" and "markers" in capsys.readouterr().out
    assert not report.update_readme_results(readme, tmp_path / "missing.json")
    readme.write_text(f"# x\n\n{report.MARKERS[0]}\nold table\n{report.MARKERS[1]}\n\nafter\n")
    assert report.update_readme_results(readme, metrics)
    text = readme.read_text()
    assert "old table" not in text and "| parent |" in text and text.endswith(f"{report.MARKERS[1]}\n\nafter\n")
    report.update_readme_results(readme, metrics)
    assert readme.read_text() == text  # idempotent


@pytest.mark.filterwarnings("ignore")
def test_exported_child_evaluates_through_the_lm_eval_command_line(pipeline, tmp_path):
    from puzzlelib.gkd import stage as gkd

    from puzzlelib.parent import stage as parent

    cfg, res = pipeline
    child = gkd.load(cfg).child_dir(res.metrics["headline"]["model"])
    # Stage 05 exports children without a tokenizer (reported); the parent's is the same one.
    tok = None if (child / "tokenizer.json").is_file() else parent.load(cfg).model_dir
    st = res.metrics["settings"]
    cmd = T.lm_eval_command(child, res.dir / "tasks", batch_size=4, limit=3, max_length=st["max_length"],
                            prefix_token_id=st["prefix_token_id"], tokenizer=tok)
    assert cmd[:4] == ["lm_eval", "--model", "hf", "--model_args"]
    # The child's folder carries the command stage 06's settings give (export.json and README.md).
    exported = json.loads((child / "export.json").read_text())["lm_eval"]
    assert (exported["max_length"], exported["prefix_token_id"]) == (st["max_length"], st["prefix_token_id"])
    assert exported["command"] == T.lm_eval_command(child, res.dir / "tasks", batch_size=cfg.eval_batch_size,
                                                    max_length=st["max_length"], prefix_token_id=st["prefix_token_id"])
    assert " ".join(exported["command"]) in (child / "README.md").read_text()
    assert cmd[4].startswith(f"pretrained={child},trust_remote_code=True")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-m", "lm_eval", *cmd[1:], "--output_path", str(tmp_path / "out"),
                        "--log_samples"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out = json.loads(next((tmp_path / "out").rglob("results*.json")).read_text())
    assert set(out["results"]) == set(T.LOCAL_TASKS)
    assert 0 <= out["results"][T.NEXT_LINE]["acc_mutual_info,none"] <= 1
    # A fresh process without puzzlelib's model code reproduces the stage's per-sample PMI scores.
    logged = [json.loads(line) for line in next((tmp_path / "out").rglob(f"samples_{T.NEXT_LINE}_*.jsonl"))
              .read_text().splitlines()]
    mine = res.samples(res.metrics["headline"]["model"])[T.NEXT_LINE]["scores"]
    for smp in logged:
        lls = [float(x[0]) for x in smp["filtered_resps"]]
        assert np.subtract(lls[:4], lls[4:]) == pytest.approx(mine[smp["doc_id"]], abs=1e-3)


@pytest.mark.slow
def test_notebook_06_runs_headless(pipeline):
    from puzzlelib.runner import run_pipeline

    cfg, _ = pipeline
    overrides = {**TINY, "runs_root": cfg.runs_root, "reports_root": cfg.reports_root}
    res = run_pipeline("smoke", run_name="t", stages="06", overrides=overrides, repo_root=REPO,
                       echo=lambda *a, **k: None)
    assert res.exit_code == 0, res.stages[-1].error
    nb = json.loads((Path(cfg.reports_root) / "t" / "06_evaluation.ipynb").read_text())
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = [o for c in nb["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 4
    assert (Path(cfg.reports_root) / "t" / "summary.md").is_file()


def test_measured_pareto_evaluates_every_sweep_child_with_kl_to_the_parent(pipeline):
    """eval_pareto + eval_fidelity_tokens: every (method, target) child of stage 04's sweep gets a
    point backed by an evaluated model, KL(parent ‖ parent) is 0, the parent's NLL over the fidelity
    windows is stage 00's held-out loss over the same windows, and the report shows both tables."""
    from puzzlelib.core import data
    from puzzlelib.core.rundir import read_csv_rows
    from puzzlelib.parent import stage as parent
    from puzzlelib.search import stage as search

    cfg0, _ = pipeline
    cfg = cfg0.replace(eval_pareto=True, eval_fidelity_tokens=256)
    res = E.run(cfg, progress=False)
    pe, rows = res.metrics["pareto_eval"], {m["name"]: m for m in res.models}
    feasible = {(r["method"], float(r["target_speedup"])) for r in read_csv_rows(search.load(cfg).dir / "pareto.csv")
                if r["feasible"] in (True, "True") and r["method"] in ("mip", "greedy", "uniform", "depth")}
    assert {(p["method"], p["target"]) for p in pe["points"]} == feasible and len(feasible) >= 4
    assert all(p["model"] in rows for p in pe["points"])
    assert rows["parent"]["kl_per_token"] == 0.0 and rows["parent"]["fidelity_tokens"] == 256
    assert all(r["kl_per_token"] >= 0 for r in rows.values())
    pres = parent.load(cfg)
    nll = parent.evaluate(pres.load_model(), data.load_tokens(pres.dir / "tokens", "heldout"), cfg, 256)
    fid = json.loads((res.dir / "results" / "parent.json").read_text())["fidelity"]
    assert sum(fid["nll"]) / sum(fid["tokens"]) == pytest.approx(nll, rel=1e-5)
    non_mip = [p for p in pe["points"] if p["method"] != "mip"]
    before = [c for c in pe["comparisons"] if c["stage"] == "before GKD"]
    assert len(before) == len(non_mip)
    for c in pe["comparisons"]:
        for k in ("accuracy_diff", "kl_diff", "bpb_diff"):
            p, lo, hi = c[k]
            assert lo - 1e-12 <= p <= hi + 1e-12
    after = {c["baseline"] for c in pe["comparisons"] if c["stage"] == "after GKD"}
    assert after == {m["name"] for m in res.models if m["gkd"] and m["method"] in ("greedy", "uniform", "depth")}
    paths = report.write_report(cfg, res)
    summary = paths["summary.md"].read_text()
    assert "## Measured Pareto" in summary and "### Matched comparisons" in summary and "**Goal**" in summary
    assert paths["pareto.png"].stat().st_size > 0
    assert not any("@" in line.split("|")[1] for line in report.results_table(res.metrics).splitlines()[2:])
