"""RunConfig: presets, validation messages, overrides, typed --set parsing, hashing, round trips."""

import dataclasses
import inspect
import json
import re

import pytest

from puzzlelib.core.presets import PRESETS
from puzzlelib.core.config import STAGE_TAGS, ConfigError, RunConfig, parse_set_args


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_is_valid(preset):
    cfg = RunConfig.from_preset(preset)
    assert cfg.preset == preset
    assert cfg.run_name == preset  # run_name defaults to the preset: presets never share a run dir


def test_smoke_preset_is_small():
    c = RunConfig.from_preset("smoke")
    assert (c.parent_num_layers, c.parent_hidden_size, c.parent_num_heads, c.parent_num_kv_heads,
            c.parent_intermediate_size, c.vocab_size, c.seq_len) == (4, 64, 4, 2, 192, 512, 64)


def test_gpu_preset_targets_a_real_llama():
    c = RunConfig.from_preset("gpu-llama-3.2-1b")
    assert c.parent == "meta-llama/Llama-3.2-1B" and c.device == "cuda" and c.dtype == "bfloat16"
    assert c.corpus.startswith("hf:") and c.seq_len == 2048


def test_overrides_and_run_name_precedence():
    c = RunConfig.from_preset("smoke", {"seq_len": 32, "run_name": "a"}, run_name="b")
    assert c.seq_len == 32 and c.run_name == "b" and c.vocab_size == 512
    assert RunConfig.from_preset("smoke", {"run_name": "a"}).run_name == "a"


BAD = [
    # (overrides, substrings the message must contain)
    ({"seqlen": 3}, ["unknown config key", "did you mean 'seq_len'", "Valid keys"]),
    ({"seq_len": "abc"}, ["seq_len expects an integer", "'abc'"]),
    ({"seq_len": True}, ["seq_len expects an integer"]),
    ({"seq_len": 2.5}, ["seq_len expects an integer"]),
    ({"force": "yes"}, ["force expects true/false"]),
    ({"parent_lr": "fast"}, ["parent_lr expects a number"]),
    ({"parent_lr": float("nan")}, ["parent_lr expects a number"]),
    ({"seq_len": 0}, ["seq_len must be >= 2"]),
    ({"heldout_fraction": 1.0}, ["heldout_fraction must be strictly between 0 and 1"]),
    ({"heldout_fraction": 0}, ["heldout_fraction"]),
    ({"parent_num_kv_heads": 3}, ["must be a multiple of parent_num_kv_heads"]),
    ({"parent_hidden_size": 66}, ["must be divisible by parent_num_heads"]),
    ({"parent_hidden_size": 72, "parent_num_heads": 8, "parent_num_kv_heads": 4}, ["must be even"]),
    ({"vocab_size": 100}, ["vocab_size must be >= 264"]),
    ({"parent_lr": 0}, ["parent_lr must be > 0"]),
    ({"parent_min_lr_ratio": 2.0}, ["parent_min_lr_ratio must be in [0, 1]"]),
    ({"device": "gpu"}, ["device must be one of", "'cuda'"]),
    ({"dtype": "fp8"}, ["dtype must be one of", "'bfloat16'"]),
    ({"run_name": "../evil"}, ["not a safe folder name"]),
    ({"run_name": "a/b"}, ["not a safe folder name"]),
    ({"run_name": ".hidden"}, ["not a safe folder name"]),
    ({"run_name": ""}, ["not a safe folder name"]),
    ({"run_name": "x" * 65}, ["not a safe folder name"]),
    ({"corpus": "hf:"}, ["'hf:<dataset>'"]),
    ({"corpus": "hf:a:b:c"}, ["'hf:<dataset>:<config>'"]),
    ({"corpus": "data.csv"}, [".txt or .jsonl"]),
    ({"seed": -1}, ["seed must be in"]),
    ({"parent_train_tokens": 10}, ["must cover at least one step"]),
    ({"preset": "default"}, ["cannot be overridden", "--preset"]),
]


@pytest.mark.parametrize("overrides,needles", BAD, ids=[repr(b[0])[:40] for b in BAD])
def test_bad_input_names_the_fix(overrides, needles):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_preset("smoke", overrides)
    for needle in needles:
        assert needle in str(e.value)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match=r"did you mean 'smoke'.*Available presets: smoke, def"):
        RunConfig.from_preset("smok")


def test_all_errors_are_reported_at_once():
    with pytest.raises(ConfigError) as e:
        RunConfig.from_preset("smoke", {"seq_len": 0, "parent_lr": -1.0})
    assert "seq_len" in str(e.value) and "parent_lr" in str(e.value)


def test_numbers_are_canonicalised():
    a = RunConfig.from_preset("smoke", {"parent_lr": 1, "parent_train_tokens": 2e6})
    b = RunConfig.from_preset("smoke", {"parent_lr": 1.0, "parent_train_tokens": 2_000_000})
    assert isinstance(a.parent_lr, float) and type(a.parent_train_tokens) is int
    assert a == b and a.hash() == b.hash()


def test_parse_set_args_types():
    got = parse_set_args(["seq_len=128", "parent_train_tokens=2e6", "parent_lr=3e-4",
                          "force=yes", "parent_tie_embeddings=Off", "corpus=hf:wikitext:raw",
                          "run_name=a=b"])
    assert got == {"seq_len": 128, "parent_train_tokens": 2_000_000, "parent_lr": 3e-4,
                   "force": True, "parent_tie_embeddings": False, "corpus": "hf:wikitext:raw",
                   "run_name": "a=b"}
    assert type(got["seq_len"]) is int


@pytest.mark.parametrize("arg,needle", [
    ("seq_len=abc", "seq_len expects an integer"),
    ("seq_len=2.5", "seq_len expects an integer"),
    ("force=maybe", "force expects true/false"),
    ("parent_lr=x", "parent_lr expects a number"),
    ("seq_len", "expects key=value"),
    ("=3", "expects key=value"),
    ("seqlen=3", "did you mean 'seq_len'"),
])
def test_parse_set_args_errors(arg, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        parse_set_args([arg])


def test_every_field_is_tagged_defaulted_and_commented():
    src = inspect.getsource(RunConfig)
    for f in dataclasses.fields(RunConfig):
        assert f.metadata["stage"] in STAGE_TAGS
        assert f.default is not dataclasses.MISSING
        line = next(ln for ln in src.splitlines() if re.match(rf"\s+{f.name}: ", ln))
        assert "#" in line, f"field {f.name} needs a comment saying what it is"
    assert set(RunConfig.fields_for("00_parent")) >= {"parent", "parent_lr", "dtype"}
    with pytest.raises(ConfigError, match="unknown stage"):
        RunConfig.fields_for("02_bdl")


def test_hash_tracks_exactly_the_stage_fields():
    base = RunConfig.from_preset("smoke")
    stages = [t for t in STAGE_TAGS if t != "run"]

    def changed(other):
        return {s for s in stages if base.hash(s) != other.hash(s)} | (
            {None} if base.hash() != other.hash() else set())

    assert changed(base.replace(parent_lr=0.01)) == {"00_parent", None}
    assert changed(base.replace(device="auto")) == {"01_profiling", None}
    assert changed(base.replace(seq_len=32)) == set(stages) | {None}  # data feeds every stage
    assert changed(base.replace(seed=1)) == set(stages) | {None}
    for run_field in ({"run_name": "x"}, {"force": True}, {"runs_root": "/r"}):
        assert changed(base.replace(**run_field)) == set()
    assert re.fullmatch(r"[0-9a-f]{16}", base.hash("02_bld"))
    with pytest.raises(ConfigError):
        base.hash("run")


def test_dict_and_file_round_trip(tmp_path):
    cfg = RunConfig.from_preset("smoke", {"seq_len": 32}, run_name="rt")
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "sub" / "config.json"
    cfg.save(path)
    assert RunConfig.load(path) == cfg
    assert json.loads(path.read_text())["seq_len"] == 32
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]  # no temp file left


def test_from_dict_is_strict_but_tolerates_missing_keys(tmp_path):
    d = RunConfig.from_preset("smoke").to_dict()
    with pytest.raises(ConfigError, match="did you mean 'seq_len'"):
        RunConfig.from_dict({**d, "seqlen": 3})
    with pytest.raises(ConfigError, match="force expects true/false"):
        RunConfig.from_dict({**d, "force": "no"})
    del d["threads"]  # a config.json written before a field existed still loads
    assert RunConfig.from_dict(d).threads == "auto"
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        RunConfig.load(tmp_path / "bad.json")


def test_frozen_and_replace_validates():
    cfg = RunConfig.from_preset("smoke")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seq_len = 3  # type: ignore[misc]
    assert cfg.replace(seq_len=32).seq_len == 32 and cfg.seq_len == 64
    with pytest.raises(ConfigError, match="seq_len must be"):
        cfg.replace(seq_len=1)
    with pytest.raises(ConfigError, match="did you mean 'seq_len'"):
        cfg.replace(seqlen=32)


def test_summary_lists_every_field():
    text = RunConfig.from_preset("smoke").summary()
    for f in dataclasses.fields(RunConfig):
        assert f.name in text


def test_relative_paths_resolve_against_the_project_folder_also_from_notebooks(tmp_path, monkeypatch):
    # JupyterLab starts a kernel in the notebook's own folder: runs must still land in <project>/runs.
    from pathlib import Path

    from puzzlelib.core.config import RunConfig, project_root, resolve_path
    from puzzlelib.core.rundir import RunDir

    (tmp_path / "notebooks").mkdir()
    (tmp_path / "student").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert project_root(tmp_path) == tmp_path
    assert project_root(tmp_path / "notebooks") == tmp_path
    assert project_root(tmp_path / "student") == tmp_path
    assert project_root(elsewhere) == elsewhere  # outside a project: the current directory
    for cwd in (tmp_path, tmp_path / "notebooks", tmp_path / "student"):
        monkeypatch.chdir(cwd)
        assert resolve_path("runs") == tmp_path / "runs"
        assert resolve_path("/abs/runs") == Path("/abs/runs")
        cfg = RunConfig.from_preset("smoke", {}, "lab")
        assert RunDir(cfg, create=False).root == tmp_path / "runs" / "lab"


def test_smollm2_preset_menu_follows_the_parents_shape():
    """The smollm2 preset on a SmolLM2-135M-shaped config (30 layers, hidden 576, 9 query / 3 KV
    heads, SwiGLU 1536): KV heads 3 -> 1, FFN widths 1152/768/384 on the 64 grid, linear and no-op
    of both, linear blocks started by least squares; a real parent, nothing trained from scratch."""
    from puzzlelib.bld import plan
    from puzzlelib.core.blocks import parse_variant
    from conftest import tiny_config

    cfg = RunConfig.from_preset("smollm2")
    assert cfg.parent == "smollm2-135m" and cfg.bld_linear_init == "lstsq" and cfg.eval_pareto
    assert cfg.eval_fidelity_tokens >= 20_000
    assert [float(x) for x in cfg.search_pareto_speedups.split(",")] == [1.25, 1.5, 2.0, 2.5]
    pc = tiny_config(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3)
    names, jobs = plan.plan(pc, cfg)
    assert names["attn"] == ["attn:kv3", "attn:kv1", "attn:linear", "attn:noop"]
    assert names["ffn"] == ["ffn:1.00", "ffn:0.75", "ffn:0.50", "ffn:0.25", "ffn:linear", "ffn:noop"]
    widths = [parse_variant(n).width(pc) for n in names["ffn"][:4]]
    assert widths == [1536, 1152, 768, 384] and all(w % 64 == 0 for w in widths)
    assert sum(j.trained for j in jobs) == 30 * 6  # kv1, attn:linear, three FFN widths, ffn:linear
