"""Stage 01 on tiny models: static costs equal the built modules, KV bytes equal what generation
allocates, no-ops cost nothing, the table covers every (layer, variant), shapes are deterministic,
bad input is refused — and the stage end to end on `smoke`, reused when fresh."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from puzzlelib.parent import stage as parent_stage
from puzzlelib.profiling import stage as P
from puzzlelib.core import rundir
from puzzlelib.profiling import additivity
from puzzlelib.profiling import benches
from puzzlelib.profiling import costs
from puzzlelib.profiling import timing
from puzzlelib.core.blocks import build_child, list_library
from puzzlelib.core.config import ConfigError, RunConfig
from puzzlelib.core.modeling_decilm import PuzzleForCausalLM
from puzzlelib.core.model import count_params
from puzzlelib.core.rundir import RunDir, StageNotReady

from conftest import tiny_config

SCENARIOS = [costs.Scenario(1, 8, 4), costs.Scenario(3, 8, 4)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # One intra-op thread: on a shared CI machine two OpenMP threads stall each other for whole
    # scheduler slices, turning milliseconds into seconds (see notebook 01).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PuzzleForCausalLM(tiny_config()).eval()


@pytest.fixture(scope="module")
def profiled(model):
    samples: dict = {}
    table = benches.profile_model(model, SCENARIOS, warmup=1, repeats=5, progress=False,
                            samples_out=samples, clock="cpu")
    return table, samples


def _child(parent, spec):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return build_child(parent, spec)


def _names(lib):
    return {k: [v.name for v in lib[k]] for k in ("attn", "ffn")}


# ---------------------------------------------------------------------------- static costs

def test_params_and_bytes_equal_the_built_sub_blocks(model, profiled):
    table, _ = profiled
    lib = _names(list_library(model.config))
    parent_spec = table.parent_choices()
    for i in range(model.config.num_hidden_layers):
        for a in lib["attn"]:
            spec = list(parent_spec)
            spec[i] = (a, spec[i][1])
            layer = _child(model, spec).model.layers[i]
            mods = [m for m in (layer.self_attn, layer.input_layernorm) if m is not None]
            n = sum(p.numel() for m in mods for p in m.parameters())
            assert table.cost(i, a, "params") == n, (i, a)
            assert table.cost(i, a, "weight_bytes") == 4 * n  # float32
        for f in lib["ffn"]:
            spec = list(parent_spec)
            spec[i] = (spec[i][0], f)
            layer = _child(model, spec).model.layers[i]
            mods = [m for m in (layer.mlp, layer.post_attention_layernorm) if m is not None]
            n = sum(p.numel() for m in mods for p in m.parameters())
            assert table.cost(i, f, "params") == n, (i, f)
    # fixed part = embeddings + LM head (untied in tiny_config) + final norm
    h, v = model.config.hidden_size, model.config.vocab_size
    assert table.fixed("params") == 2 * v * h + h
    # a whole child: fixed part + sub-blocks = every distinct parameter of the built model
    for spec in [parent_spec] + additivity.random_children(model.config, 5, seed=3):
        assert table.predict(spec, "params") == count_params(_child(model, spec))


def test_kv_bytes_match_the_cache_generate_allocates(model, profiled):
    table, _ = profiled
    assert table.cost(0, "attn:kv2", "kv_bytes_per_token") == 2 * 2 * 16 * 4  # K+V, 2 heads, hd 16, fp32
    assert table.cost(0, "attn:kv1", "kv_bytes_per_token") == 2 * 1 * 16 * 4
    for a in ("attn:linear", "attn:noop"):
        assert table.cost(0, a, "kv_bytes_per_token") == 0
    specs = [[("attn:kv1", "ffn:0.50"), ("attn:noop", "ffn:noop")],
             [("attn:linear", "ffn:1.00"), ("attn:kv2", "ffn:linear")],
             [("attn:noop", "ffn:1.00"), ("attn:noop", "ffn:0.25")],
             table.parent_choices()]
    for spec in specs:
        child = _child(model, spec)
        ids = torch.randint(3, 300, (2, 5))
        out = child.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=2,
                             return_dict_in_generate=True)
        cache = out.past_key_values
        tokens = cache.get_seq_length()
        assert tokens == 5 + 4 - 1  # the last generated token is never fed back
        assert cache.kv_bytes() == 2 * tokens * table.predict(spec, "kv_bytes_per_token"), spec
        # what the additivity check measures: a prefill of batch x tokens into a real cache
        assert additivity.measured_kv_bytes(child, 3, 7) == 3 * 7 * table.predict(spec, "kv_bytes_per_token")


def test_noop_variants_cost_nothing(model, profiled):
    table, _ = profiled
    for i in range(2):
        for name in ("attn:noop", "ffn:noop"):
            for metric in costs.STATIC_METRICS:
                assert table.cost(i, name, metric) == 0
            for s in SCENARIOS:
                for metric in costs.TIMED_METRICS:
                    parent_block = "attn:kv2" if name.startswith("attn") else "ffn:1.00"
                    # a Python call returning its input: microseconds against a real sub-block
                    assert table.cost(i, name, metric, s.batch) < 0.25 * table.cost(
                        i, parent_block, metric, s.batch), (name, metric, s)


# ---------------------------------------------------------------------------- the table

def test_table_has_every_layer_and_variant(model, profiled):
    table, samples = profiled
    lib = _names(list_library(model.config))
    L = model.config.num_hidden_layers
    assert len(table.rows) == 1 + L * (len(lib["attn"]) + len(lib["ffn"]))
    for i in range(L):
        assert table.variants(i, "attn") == lib["attn"]
        assert table.variants(i, "ffn") == lib["ffn"]
    # identical layers: layer 0 is timed and its row copied to layer 1, and the table says so
    assert {r["measured_on_layer"] for r in table.rows if r["layer"] >= 0} == {0}
    for name in lib["attn"] + lib["ffn"]:
        assert table.cost(1, name, "decode_ms", 3) == table.cost(0, name, "decode_ms", 3)
    assert table.parent_choices() == [("attn:kv2", "ffn:1.00")] * L
    assert table.choices_from_config(model.config) == table.parent_choices()
    for col in ("prefill_ms@b1", "prefill_ms_p10@b1", "prefill_ms_p90@b1", "decode_ms@b3",
                "decode_ms_p90@b3"):
        assert col in table.columns
    for r in table.rows:
        for s in SCENARIOS:
            for ph in costs.PHASES:
                lo, mid, hi = (r[f"{ph}_ms_p10@{s.key}"], r[f"{ph}_ms@{s.key}"],
                               r[f"{ph}_ms_p90@{s.key}"])
                assert 0 <= lo <= mid <= hi and mid < 1e4
    # every bench has exactly `repeats` samples: real measurements, not placeholders
    assert all(len(v) == 5 and min(v) > 0 for v in samples.values())
    assert len(samples) == 2 * len(SCENARIOS) * (len(lib["attn"]) + len(lib["ffn"]) + 1)


def test_heterogeneous_parent_times_each_distinct_layer(model):
    cfg = tiny_config(block_configs=[
        {"attention": {"n_heads_in_group": 2}, "ffn": {"intermediate_size": 96}},
        {"attention": {"n_heads_in_group": 2}, "ffn": {"intermediate_size": 48}},
        {"attention": {"n_heads_in_group": 2}, "ffn": {"intermediate_size": 96}}],
        num_hidden_layers=3)
    torch.manual_seed(0)
    het = PuzzleForCausalLM(cfg).eval()
    table = benches.profile_model(het, [costs.Scenario(1, 4, 2)], warmup=0, repeats=1, progress=False)
    assert table.meta["representative_layers"] == {"0": [0, 2], "1": [1]}
    on = {r["layer"]: r["measured_on_layer"] for r in table.rows if r["layer"] >= 0}
    assert on == {0: 0, 1: 1, 2: 0}
    assert table.cost(1, "ffn:1.00", "params") == 3 * 64 * 48 + 64
    assert table.cost(2, "ffn:1.00", "params") == 3 * 64 * 96 + 64
    assert table.parent_choices()[1] == ("attn:kv2", "ffn:1.00")


def test_shapes_are_deterministic_and_csv_round_trips(model, profiled, tmp_path):
    table, _ = profiled
    again = benches.profile_model(model, SCENARIOS, warmup=0, repeats=2, progress=False)
    assert again.columns == table.columns
    key = lambda r: (r["layer"], r["variant"], r["params"], r["weight_bytes"],  # noqa: E731
                     r["kv_bytes_per_token"], r["measured_on_layer"], r["is_parent"])
    assert [key(r) for r in again.rows] == [key(r) for r in table.rows]
    table.to_csv(tmp_path / "costs.csv")
    back = costs.CostTable.from_csv(tmp_path / "costs.csv", SCENARIOS)
    assert [key(r) for r in back.rows] == [key(r) for r in table.rows]
    spec = additivity.random_children(model.config, 1, seed=1)[0]
    for metric, b in (("decode_ms", 3), ("prefill_ms", 1), ("params", None)):
        assert back.predict(spec, metric, b) == pytest.approx(table.predict(spec, metric, b), rel=1e-5)
    assert additivity.random_children(model.config, 4, seed=7) == additivity.random_children(model.config, 4, seed=7)


def test_predictions_add_up(model, profiled):
    table, _ = profiled
    L = model.config.num_hidden_layers
    noop = [("attn:noop", "ffn:noop")] * L
    for metric, b in (("params", None), ("weight_bytes", None), ("kv_bytes_per_token", None),
                      ("decode_ms", 1), ("prefill_ms", 3)):
        parts = table.fixed(metric, b) + sum(table.cost(i, n, metric, b)
                                             for i, pair in enumerate(table.parent_choices())
                                             for n in pair)
        assert table.predict(table.parent_choices(), metric, b) == pytest.approx(parts)
    # the all-no-op child is exactly the fixed part (its no-op rows are subtracted from it)
    assert table.predict(noop, "decode_ms", 1) == pytest.approx(
        table.fixed("decode_ms", 1) + sum(table.cost(i, n, "decode_ms", 1)
                                          for i in range(L) for n in noop[i]))
    sc = table.predict_scenario(table.parent_choices(), 3)
    s = table.scenario(3)
    assert sc["generation_s"] == pytest.approx((sc["prefill_ms"] + s.gen_len * sc["decode_ms"]) / 1e3)
    assert sc["tokens_per_s"] == pytest.approx(3 * s.gen_len / sc["generation_s"])
    assert sc["memory_bytes"] == sc["weight_bytes"] + 3 * s.total_len * 2 * (2 * 2 * 16 * 4)
    names, mat = table.cost_matrix("ffn", "params")
    assert mat.shape == (L, len(names)) and mat[0, names.index("ffn:noop")] == 0


def test_additivity_rows_are_real_measurements(model, profiled):
    table, _ = profiled
    children = additivity.random_children(model.config, 3, seed=0)
    samples: dict = {}
    rows, memory = additivity.check_additivity(model, table, children, warmup=1, repeats=3,
                                      progress=False, samples_out=samples)
    assert len(rows) == len(SCENARIOS) * 4 and rows[0]["is_parent"]
    for r in rows:
        assert r["meas_prefill_ms"] > 0 and r["meas_decode_ms"] > 0
        assert r["memory_rel_err"] == 0  # weights + KV are counted exactly, not estimated
        assert json.loads(r["choices"])
    parent_rows = [r for r in rows if r["is_parent"]]
    assert all(r["meas_decode_speedup"] == 1.0 for r in parent_rows)
    summary = additivity.summarize_additivity(rows)
    assert summary["n_children"] == 3 and summary["memory_max_rel_err"] == 0
    # restating with another statistic reuses the samples, measures nothing new
    t2, r2 = additivity.restate(table, rows, {"sub_blocks": profiled[1], "children": samples}, memory, "min")
    assert len(r2) == len(rows) and t2.meta["statistic"] == "min"
    assert all(a["meas_decode_ms"] <= b["meas_decode_ms"] for a, b in zip(r2, rows))


def test_cache_ablation_and_rotation(model):
    rows = additivity.cache_ablation(model, [costs.Scenario(2, 8, 4)], warmup=0, repeats=2, clock="cpu",
                            progress=False)
    assert [r["batch"] for r in rows] == [2]
    for k in ("meas_decode_ms", "pred_hot_ms", "pred_rotated_ms"):
        assert rows[0][k] > 0
    # copies touch as many bytes as one parent step, capped at twice the last-level cache
    assert timing.rotation_copies(100, 1000, 10**6) == 10
    assert timing.rotation_copies(100, 10**9, 1000) == 20
    assert timing.rotation_copies(0, 1000, None) == 1 and timing.rotation_copies(10**9, 1000, None) == 1
    calls = []
    bench = timing.rotating([timing.Bench(lambda a, i=i: calls.append(i)) for i in range(3)])
    calls.clear()
    bench.fn(bench.prepare())
    # the timed call (last) reuses copy 0 after the other copies ran: a steady cycle, as in a model
    assert calls == [0, 1, 2] * timing.ROTATION_CYCLES + [0]


def test_bigger_blocks_cost_more_on_one_core():
    # CPU time of one thread is immune to the other processes of a shared machine, so even a
    # loaded CI box orders a 4x wider FFN correctly.
    torch.manual_seed(0)
    big = PuzzleForCausalLM(tiny_config(hidden_size=256, intermediate_size=1024,
                                        num_hidden_layers=1, num_attention_heads=8)).eval()
    t = benches.profile_model(big, [costs.Scenario(4, 64, 4)], warmup=1, repeats=5, progress=False,
                        clock="cpu")
    assert t.cost(0, "ffn:1.00", "prefill_ms", 4) > 1.5 * t.cost(0, "ffn:0.25", "prefill_ms", 4)
    assert t.cost(0, "ffn:0.25", "prefill_ms", 4) > 5 * t.cost(0, "ffn:noop", "prefill_ms", 4)


# ---------------------------------------------------------------------------- bad input

def test_bad_scenarios_devices_and_lookups(model, profiled):
    table, _ = profiled
    with pytest.raises(timing.ProfilingError, match="batch size must be >= 1"):
        costs.Scenario(0, 8, 4).check()
    with pytest.raises(timing.ProfilingError, match="exceeds the model's max_position_embeddings=128.*"
                                               "profile_prompt_len"):
        benches.profile_model(model, [costs.Scenario(1, 100, 40)], progress=False)
    with pytest.raises(timing.ProfilingError, match="profile_batch_sizes"):
        costs.parse_batch_sizes("2,x")
    with pytest.raises(timing.ProfilingError, match="unknown device 'tpu'"):
        timing.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(timing.ProfilingError, match="no CUDA device.*device='cpu'"):
            timing.resolve_device("cuda")
    with pytest.raises(timing.ProfilingError, match="on a GPU set profile_clock='wall'"):
        timing.check_clock("cpu", torch.device("cuda"), 1)
    with pytest.raises(timing.ProfilingError, match="needs one intra-op thread"):
        timing.check_clock("cpu", torch.device("cpu"), 2)
    with pytest.raises(timing.ProfilingError, match="not profiled at layer 0; profiled: attn:kv2"):
        table.cost(0, "attn:kv4", "params")
    with pytest.raises(timing.ProfilingError, match="batch size 8 was not profiled"):
        table.cost(0, "attn:kv2", "decode_ms", 8)
    with pytest.raises(timing.ProfilingError, match="depends on the batch size"):
        table.predict(table.parent_choices(), "decode_ms")
    with pytest.raises(timing.ProfilingError, match="one .attention, ffn. pair per layer"):
        table.predict([("attn:kv2", "ffn:1.00")], "params")
    with pytest.raises(timing.ProfilingError, match="unknown metric"):
        table.fixed("flops")
    for bad in ({"device": "tpu"}, {"profile_batch_sizes": "0,4"}, {"profile_batch_sizes": "-1"},
                {"profile_prompt_len": 0}, {"profile_repeats": 0}, {"profile_clock": "gpu"}):
        with pytest.raises(ConfigError):
            RunConfig.from_preset("smoke", bad)


# ---------------------------------------------------------------------------- the stage

TINY = {"corpus_max_bytes": 200_000, "tokenizer_train_bytes": 200_000, "vocab_size": 300,
        "seq_len": 32, "parent_hidden_size": 32, "parent_num_layers": 2, "parent_num_heads": 4,
        "parent_num_kv_heads": 2, "parent_intermediate_size": 64, "parent_train_tokens": 16 * 32 * 4,
        "parent_batch_size": 16, "parent_warmup_steps": 1, "parent_eval_every": 4,
        "parent_eval_tokens": 1024, "profile_batch_sizes": "1,2", "profile_prompt_len": 16,
        "profile_gen_len": 8, "profile_repeats": 3, "profile_num_random_children": 2}


def test_stage_writes_reuses_and_refuses(tmp_path):
    cfg = RunConfig.from_preset("smoke", {**TINY, "runs_root": str(tmp_path / "runs")}, run_name="p")
    with pytest.raises(StageNotReady, match="00_parent"):
        P.run(cfg, progress=False)
    parent_stage.run(cfg)
    res = P.run(cfg, progress=False)
    assert not res.reused
    assert {p.name for p in res.dir.iterdir()} == {"costs.csv", "additivity.csv", "metrics.json",
                                                   "scenarios.json", "samples.json", "manifest.json"}
    m = res.metrics
    for k in ("prefill_median_rel_err", "decode_median_rel_err", "memory_max_rel_err",
              "prefill_speedup_median_rel_err", "decode_max_rel_err"):
        assert k in m and m[k] >= 0
    assert m["memory_max_rel_err"] == 0 and m["n_children"] == 2 and m["clock"] == "cpu"
    assert m["torch_threads"] == 1 and res.scenarios["scenarios"][1] == {
        "batch": 2, "prompt_len": 16, "gen_len": 8}
    assert len(res.additivity) == 2 * 3 and res.costs.batch_sizes == [1, 2]
    again = P.run(cfg, progress=False)
    assert again.reused and again.metrics == m
    table = P.load_costs(cfg)
    assert table.predict(table.parent_choices(), "params") == parent_stage.load(cfg).metrics["params"]
    # a changed profiling field makes the stage stale; bad ones are refused before any write
    stale = cfg.replace(profile_repeats=4)
    assert not RunDir(stale).is_fresh("01_profiling")
    for bad, needle in (({"profile_prompt_len": 250}, "max_position_embeddings"),
                        ({"device": "cuda"}, "CUDA"), ({"threads": 2, "force": True}, "threads=1")):
        if bad.get("device") == "cuda" and torch.cuda.is_available():
            continue
        before = (res.dir / "costs.csv").read_bytes()
        with pytest.raises(timing.ProfilingError, match=needle):
            P.run(cfg.replace(**bad), progress=False)
        assert (res.dir / "costs.csv").read_bytes() == before  # nothing overwritten


def test_an_imported_cost_table_is_checked_then_used_as_measured(tmp_path):
    """profile_costs_from: the earlier table, byte for byte, with its provenance in the stage's
    metrics; a table for other scenarios, another parent or a missing one is refused, naming the
    field to change, before the stage folder is touched."""
    import shutil

    cfg = RunConfig.from_preset("smoke", {**TINY, "runs_root": str(tmp_path / "runs")}, run_name="p")
    parent_stage.run(cfg)
    measured = P.run(cfg, progress=False)
    src = tmp_path / "shared" / "01_profiling"
    shutil.copytree(measured.dir, src)
    imp = P.run(cfg.replace(profile_costs_from=str(tmp_path / "shared")), progress=False)
    assert not imp.reused
    assert (imp.dir / "costs.csv").read_bytes() == (src / "costs.csv").read_bytes()
    assert imp.metrics["costs_imported_from"] == str(src / "costs.csv")
    assert imp.metrics["costs_sha256"] == rundir.file_sha256(src / "costs.csv")
    assert imp.scenarios["imported_from"]["path"] == str(src / "costs.csv")
    assert imp.samples["sub_blocks"] == measured.samples["sub_blocks"]  # restate still works
    assert len(imp.additivity) == len(measured.additivity)  # measured here, against the import
    additivity.restate(imp.costs, imp.additivity, imp.samples, imp.samples["memory"], "p10")
    before = (imp.dir / "costs.csv").read_bytes()
    damaged = tmp_path / "other" / "costs.csv"
    damaged.parent.mkdir()
    shutil.copy(src / "scenarios.json", damaged.parent)
    costs_csv = (src / "costs.csv").read_text()
    damaged.write_text(costs_csv.replace(",attn:kv1,gqa,1,0,0,False,", ",attn:kv1,gqa,1,0,0,False,1"))
    for over, needle in (({"profile_costs_from": str(tmp_path / "nowhere")}, "no costs.csv"),
                         ({"profile_costs_from": str(src), "profile_batch_sizes": "1"}, "profile_batch_sizes"),
                         ({"profile_costs_from": str(src), "profile_statistic": "p10"}, "profile_statistic='median'"),
                         ({"profile_costs_from": str(damaged)}, r"attn:kv1 has params=1\d+ \(this parent")):
        with pytest.raises(timing.ProfilingError, match=needle):
            P.run(cfg.replace(**over), progress=False)
        assert (imp.dir / "costs.csv").read_bytes() == before  # nothing overwritten
