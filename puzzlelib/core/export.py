"""Self-contained checkpoints in the DeciLM / "nemotron-nas" schema, and strict loading.

What it does:
* :func:`save_checkpoint` writes a child (or the parent) as a folder that a fresh Python process
  with only ``torch`` + ``transformers`` 5 loads via
  ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``:
  ``config.json`` in NVIDIA's schema (:func:`decilm_config_dict`), ``model.safetensors`` with Llama
  tensor names (none for no-op sub-blocks), ``configuration_decilm.py`` / ``modeling_decilm.py``
  copied from this package, the tokenizer, ``export.json`` (which readers can load the folder and
  why not, and the lm-eval settings of stage 06) and a ``README.md`` saying the same for people,
  with the exact ``lm_eval`` command that reproduces stage 06's numbers. The folder is built under
  a temporary name and renamed into place, so a crash never leaves a half-written checkpoint that
  looks complete.
* config.json carries every field the DeciLM readers we know use, so they build the same model:
  per FFN both ``intermediate_size`` (NVIDIA's later code, Model-Optimizer's ``deci_lm_hf_code``,
  reads only this and asserts it is a multiple of 256) and ``ffn_mult`` (vLLM's ``DeciLMForCausalLM``
  derives the width from it, rounded up to a multiple of 256; null when no ``ffn_mult`` gives the
  width), top-level ``rope_theta`` / ``rope_scaling`` next to transformers 5's ``rope_parameters``
  (4.x-era readers otherwise fall back to θ = 10000 without scaling, silently), ``o_proj_bias``
  (else NVIDIA's code drops ``o_proj.bias``), ``head_dim``, ``position_embedding_type`` and
  ``pretraining_tp``. Our own config class reads them back and refuses disagreeing values.
* :func:`vllm_compatible` / :func:`nvidia_decilm_compatible` say whether vLLM / NVIDIA's DeciLM code
  can serve a child, and why not (linear replacements; FFN widths off the 256 grid — keep them on
  it with ``RunConfig.ffn_width_multiple=256``).
* :func:`load_checkpoint` loads one back *strictly*: a missing or extra tensor, or a truncated
  safetensors file, is an error naming the tensors, not a silently re-initialised weight.

Which transformers read the folder: the modelling code written into it needs transformers 5
(tested with the pinned 5.23.0); transformers 4.x (e.g. 4.53, which NVIDIA's DeciLM code pins)
reads config.json + model.safetensors with NVIDIA's own DeciLM code (``tests/test_export_decilm4.py``
loads a child with a reader written from that schema under transformers 4.53).

Reads/writes: the checkpoint folder only. Leaves out: pushing to a hub, sharding (children of
the models this kit targets fit in one file), quantisation.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .configuration_decilm import PuzzleConfig, legacy_rope_fields, width_to_ffn_mult
from .eval_tasks import lm_eval_command
from .modeling_decilm import PuzzleForCausalLM

_HERE = Path(__file__).resolve().parent
REMOTE_CODE_FILES = ("configuration_decilm.py", "modeling_decilm.py")
WEIGHTS_NAME = "model.safetensors"
EXPORT_INFO = "export.json"
# NVIDIA's DeciLM FFN config asserts intermediate_size % 256 == 0; vLLM's DeciLM rounds the width it
# derives from ffn_mult up to a multiple of 256.
DECILM_FFN_GRID = 256
# What the folder's own modelling code needs, and the version it was tested with.
TRANSFORMERS_NOTE = ("transformers>=5 (tested with 5.23.0) via trust_remote_code; transformers 4.x "
                     "(e.g. 4.53) only with NVIDIA's DeciLM code in place of the two .py files")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as it is; the message says what is wrong."""


def decilm_config_dict(config: PuzzleConfig) -> dict:
    """The config as NVIDIA's DeciLM schema writes it, plus every field another reader needs
    (see the module docstring and DESIGN.md §4)."""
    d = config.to_dict()
    d["model_type"] = "nemotron-nas"
    d["architectures"] = ["DeciLMForCausalLM"]
    d["auto_map"] = {"AutoConfig": "configuration_decilm.DeciLMConfig",
                     "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
    d["num_key_value_heads"] = None  # per layer in block_configs
    d["intermediate_size"] = None
    d["rope_theta"], d["rope_scaling"] = legacy_rope_fields(config.rope_parameters)
    d["o_proj_bias"] = bool(config.attention_bias)  # our attention has one bias flag for q/k/v/o
    d["position_embedding_type"] = "rope"
    d["pretraining_tp"] = 1
    blocks = []
    for i, b in enumerate(config.block_configs):
        kind = config.ffn_kind(i)
        if kind == "swiglu":
            width = config.ffn_width(i)
            ffn = {"ffn_mult": width_to_ffn_mult(width, config.hidden_size), "intermediate_size": width,
                   "hidden_act": "silu", "gated": True, "no_op": False, "replace_with_linear": False}
        else:
            ffn = {"ffn_mult": None, "intermediate_size": None, "no_op": kind == "noop",
                   "replace_with_linear": kind == "linear"}
        blocks.append({"attention": dict(b["attention"]), "ffn": ffn})
    d["block_configs"] = blocks
    return d


def _linear_reasons(config: PuzzleConfig) -> list[str]:
    return [f"layer {i}: {kind} replaced by a linear layer"
            for i in range(config.num_hidden_layers)
            for kind, k in (("attention", config.attn_kind(i)), ("ffn", config.ffn_kind(i)))
            if k == "linear"]


def _grid_reasons(config: PuzzleConfig) -> list[str]:
    out = []
    for i in range(config.num_hidden_layers):
        w = config.ffn_width(i)
        if w and width_to_ffn_mult(w, config.hidden_size) is None:
            out.append(f"layer {i}: FFN width {w} is not a multiple of {DECILM_FFN_GRID}"
                       if w % DECILM_FFN_GRID else f"layer {i}: no ffn_mult gives FFN width {w}")
    return out


def vllm_compatible(config: PuzzleConfig) -> tuple[bool, list[str]]:
    """(ok, reasons): vLLM's DeciLM serves no-op and any-KV-head layers, not linear replacements,
    and builds each FFN from ``ffn_mult`` on a 256 grid (so other widths load as the wrong shape)."""
    reasons = _linear_reasons(config) + _grid_reasons(config)
    return not reasons, reasons


def nvidia_decilm_compatible(config: PuzzleConfig) -> tuple[bool, list[str]]:
    """(ok, reasons): NVIDIA's DeciLM code (Model-Optimizer's ``deci_lm_hf_code``) builds linear and
    no-op sub-blocks too, but refuses an FFN width that is not a multiple of 256, and its linear
    replacements have no bias (ours carry one when the parent's attention / MLP has biases)."""
    reasons = _grid_reasons(config)
    for i in range(config.num_hidden_layers):
        for kind, k, bias in (("attention", config.attn_kind(i), config.attention_bias),
                              ("ffn", config.ffn_kind(i), config.mlp_bias)):
            if k == "linear" and bias:
                reasons.append(f"layer {i}: linear {kind} with a bias (NVIDIA's linear replacement has none)")
    rope = config.rope_parameters
    if rope.get("rope_type") == "yarn" and "original_max_position_embeddings" in rope:
        # transformers 4.x replaces YaRN's factor by this ratio when the original length is given.
        ratio = config.max_position_embeddings / rope["original_max_position_embeddings"]
        if rope.get("factor") != ratio:
            reasons.append(f"yarn factor {rope.get('factor')} differs from max_position_embeddings / "
                           f"original_max_position_embeddings = {ratio:g}, which transformers 4.x uses instead")
    return not reasons, reasons


def export_info(config: PuzzleConfig, lm_eval: dict | None = None) -> dict:
    """What ``export.json`` holds: which readers load the folder (and why not), and stage 06's
    lm-eval settings when given."""
    info = {"format": "nemotron-nas (DeciLM)", "transformers": TRANSFORMERS_NOTE}
    for name, fn in (("vllm", vllm_compatible), ("nvidia_decilm", nvidia_decilm_compatible)):
        ok, reasons = fn(config)
        info[name] = {"compatible": ok, "reasons": reasons}
    if lm_eval is not None:
        info["lm_eval"] = lm_eval
    return info


def readme_text(name: str, info: dict) -> str:
    """The exported folder's README.md: how to load it, who can, how stage 06 evaluated it."""
    def verdict(key: str, who: str) -> str:
        r = info[key]
        return (f"- {who}: yes.\n" if r["compatible"] else
                f"- {who}: no — " + "; ".join(r["reasons"][:6]) + (" …" if len(r["reasons"]) > 6 else "") + ".\n")

    text = (f"# {name}\n\nA heterogeneous Llama (\"nemotron-nas\" / DeciLM schema) written by puzzlelib.\n\n"
            "## Loading\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(\"<this folder>\", trust_remote_code=True)\n```\n\n"
            f"Which transformers: {info['transformers']}.\n\n"
            "Other readers of the DeciLM schema:\n\n"
            + verdict("vllm", "vLLM (`DeciLMForCausalLM`)")
            + verdict("nvidia_decilm", "NVIDIA's DeciLM modelling code (Model-Optimizer, transformers 4.53)")
            + "\n(`export.json` holds the same in machine-readable form.)\n")
    ev = info.get("lm_eval")
    if ev:
        cmd = " ".join(shlex.quote(c) for c in ev["command"])
        text += ("\n## Evaluating it as stage 06 did\n\n"
                 "A plain `lm_eval --model hf --model_args pretrained=...` gives other numbers: lm-eval "
                 "takes its window from `max_position_embeddings` and puts the tokenizer's BOS before "
                 "context-free scores, while stage 06 used "
                 f"`max_length={ev['max_length']}` and `prefix_token_id={ev['prefix_token_id']}`. lm-eval "
                 "reads neither from a model folder, only from `--model_args`, so pass them:\n\n"
                 f"```bash\n{cmd}\n```\n\n"
                 "The tasks (`--include_path`) are the files stage 06 writes under its run folder; "
                 "change the paths if you moved the folders.\n")
    return text


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def tensors_to_save(model: PuzzleForCausalLM) -> dict[str, torch.Tensor]:
    """The model's tensors as stored on disk: contiguous, on CPU, tied LM head stored once."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # it *is* the embedding
    return state


def lm_eval_for(out_dir: str | Path, settings: dict) -> dict:
    """``settings`` (``max_length``, ``prefix_token_id``, ``tasks``, ``tasks_dir``, ``batch_size``,
    as ``eval_tasks.hflm_settings`` gives them) plus the ``lm_eval`` command for ``out_dir``."""
    cmd = lm_eval_command(out_dir, settings["tasks_dir"], tuple(settings["tasks"]),
                          batch_size=settings["batch_size"], max_length=settings["max_length"],
                          prefix_token_id=settings["prefix_token_id"])
    return {**settings, "command": cmd}


def save_checkpoint(model: PuzzleForCausalLM, out_dir: str | Path, tokenizer=None,
                    extra_files: dict[str, str] | None = None, overwrite: bool = True,
                    lm_eval: dict | None = None) -> Path:
    """Write ``model`` (+ ``tokenizer``) as a self-contained DeciLM checkpoint at ``out_dir``.

    ``lm_eval``: stage 06's HFLM settings (see :func:`lm_eval_for`); the folder's README.md and
    export.json then carry the exact command that reproduces stage 06's numbers.
    """
    out_dir = Path(out_dir)
    info = export_info(model.config, lm_eval_for(out_dir, lm_eval) if lm_eval is not None else None)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir} exists; pass overwrite=True or choose another folder.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(tensors_to_save(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(decilm_config_dict(model.config), indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(_HERE / name, tmp / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(readme_text(out_dir.name, info))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        _fsync_dir(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_config(ckpt_dir: str | Path) -> PuzzleConfig:
    """The checkpoint's config, validated (bad block configs raise with the layer named)."""
    path = Path(ckpt_dir) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{ckpt_dir} has no config.json: it is not a checkpoint folder.")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}).") from e
    if d.get("model_type") != "nemotron-nas":
        raise CheckpointError(f"{path}: model_type {d.get('model_type')!r} is not 'nemotron-nas'; "
                              "load Hugging Face parents with puzzlelib.core.model.load_parent.")
    for k in ("model_type", "architectures", "auto_map", "transformers_version"):
        d.pop(k, None)
    try:
        return PuzzleConfig(**d)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e


def load_checkpoint(ckpt_dir: str | Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> PuzzleForCausalLM:
    """Load a kit checkpoint strictly: every expected tensor present, nothing extra, shapes right."""
    ckpt_dir = Path(ckpt_dir)
    config = read_config(ckpt_dir)
    wpath = ckpt_dir / WEIGHTS_NAME
    if not wpath.exists():
        raise CheckpointError(f"{ckpt_dir} has no {WEIGHTS_NAME}: the checkpoint is incomplete; re-export it.")
    try:
        with safe_open(str(wpath), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{wpath} is corrupt or truncated ({e}); re-export the checkpoint.") from e
    model = PuzzleForCausalLM(config)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
        state.pop("lm_head.weight", None)
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise CheckpointError(
            f"{wpath} does not match its config.json: missing tensors {missing[:6]}"
            f"{' …' if len(missing) > 6 else ''}, unexpected tensors {extra[:6]}{' …' if len(extra) > 6 else ''}."
        )
    ref = model.state_dict()
    bad = [f"{k} {tuple(v.shape)} vs {tuple(ref[k].shape)}" for k, v in state.items() if v.shape != ref[k].shape]
    if bad:
        raise CheckpointError(f"{wpath}: tensor shapes do not match config.json: {bad[:4]}.")
    model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(device=device, dtype=dtype).eval()
