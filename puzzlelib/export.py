"""Self-contained checkpoints in the DeciLM / "nemotron-nas" schema, and strict loading.

What it does:
* :func:`save_checkpoint` writes a child (or the parent) as a folder that a fresh Python process
  with only ``torch`` + ``transformers`` loads via
  ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``:
  ``config.json`` in NVIDIA's schema (``architectures: ["DeciLMForCausalLM"]``, top-level
  ``num_key_value_heads`` / ``intermediate_size`` null, ``block_configs`` with ``ffn_mult`` where
  the width is a multiple of 256 and an exact ``intermediate_size`` otherwise, ``auto_map``),
  ``model.safetensors`` with Llama tensor names (none for no-op sub-blocks),
  ``configuration_decilm.py`` / ``modeling_decilm.py`` copied from this package, and the tokenizer.
  The folder is built under a temporary name and renamed into place, so a crash never leaves a
  half-written checkpoint that looks complete.
* :func:`load_checkpoint` loads one back *strictly*: a missing or extra tensor, or a truncated
  safetensors file, is an error naming the tensors, not a silently re-initialised weight.
* :func:`vllm_compatible` says whether vLLM's ``DeciLMForCausalLM`` can serve a child (it
  supports no-op and variable-KV-head layers, not linear replacements).

Reads/writes: the checkpoint folder only. Leaves out: pushing to a hub, sharding (children of
the models this kit targets fit in one file), quantisation.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .configuration_decilm import PuzzleConfig, width_to_ffn_mult
from .modeling_decilm import PuzzleForCausalLM

_HERE = Path(__file__).resolve().parent
REMOTE_CODE_FILES = ("configuration_decilm.py", "modeling_decilm.py")
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as it is; the message says what is wrong."""


def decilm_config_dict(config: PuzzleConfig) -> dict:
    """The config as NVIDIA's DeciLM schema writes it (see DESIGN.md §4)."""
    d = config.to_dict()
    d["model_type"] = "nemotron-nas"
    d["architectures"] = ["DeciLMForCausalLM"]
    d["auto_map"] = {"AutoConfig": "configuration_decilm.DeciLMConfig",
                     "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
    d["num_key_value_heads"] = None
    d["intermediate_size"] = None
    blocks = []
    for b in config.block_configs:
        ffn = dict(b["ffn"])
        if not (ffn["no_op"] or ffn["replace_with_linear"]):
            mult = width_to_ffn_mult(ffn["intermediate_size"], config.hidden_size)
            if mult is not None:
                ffn = {"ffn_mult": mult, "no_op": False, "replace_with_linear": False}
            else:
                ffn = {"ffn_mult": None, "intermediate_size": ffn["intermediate_size"], "no_op": False,
                       "replace_with_linear": False}
        else:
            ffn = {"ffn_mult": None, "no_op": ffn["no_op"], "replace_with_linear": ffn["replace_with_linear"]}
        blocks.append({"attention": dict(b["attention"]), "ffn": ffn})
    d["block_configs"] = blocks
    return d


def vllm_compatible(config: PuzzleConfig) -> tuple[bool, list[str]]:
    """(ok, reasons): vLLM's DeciLM serves no-op and any-KV-head layers, not linear replacements."""
    reasons = [f"layer {i}: {kind} replaced by a linear layer"
               for i in range(config.num_hidden_layers)
               for kind, k in (("attention", config.attn_kind(i)), ("ffn", config.ffn_kind(i)))
               if k == "linear"]
    return not reasons, reasons


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


def save_checkpoint(model: PuzzleForCausalLM, out_dir: str | Path, tokenizer=None,
                    extra_files: dict[str, str] | None = None, overwrite: bool = True) -> Path:
    """Write ``model`` (+ ``tokenizer``) as a self-contained DeciLM checkpoint at ``out_dir``."""
    out_dir = Path(out_dir)
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
                              "load Hugging Face parents with puzzlelib.model.load_parent.")
    for k in ("model_type", "architectures", "auto_map", "transformers_version"):
        d.pop(k, None)
    return PuzzleConfig(**d)


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
