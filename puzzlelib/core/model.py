"""The kit's model API: Auto-class registration, parent loading and conversion, child configs.

What it does:
* registers the heterogeneous decoder (``PuzzleConfig`` in ``configuration_decilm``,
  ``PuzzleForCausalLM`` / ``PuzzleCache`` in ``modeling_decilm``: the self-contained files that
  export copies into checkpoints; import them from there) with ``AutoConfig`` /
  ``AutoModelForCausalLM`` under ``model_type = "nemotron-nas"`` on import;
* converts a Hugging Face Llama-layout parent (``LlamaForCausalLM``; Qwen2 and Mistral configs
  with the same layout) into a ``PuzzleForCausalLM`` whose every block is the parent's, with
  identical logits;
* small helpers every stage needs: building a child config from per-layer choices, counting
  parameters.

Reads: a local HF model directory (``config.json`` + safetensors) or an in-memory model; a hub
id only when the machine has network. Writes nothing. Leaves out: saving (see ``export.py``) and
choosing variants (see ``blocks.py``).
"""

from __future__ import annotations

import copy
import json
import struct
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .configuration_decilm import PuzzleConfig, parent_block_config
from .modeling_decilm import PuzzleForCausalLM

AutoConfig.register(PuzzleConfig.model_type, PuzzleConfig, exist_ok=True)
AutoModelForCausalLM.register(PuzzleConfig, PuzzleForCausalLM, exist_ok=True)

# Parents whose tensors have Llama's names and shapes. Anything else (Gemma's norm offsets,
# Phi's fused qkv, MoE, …) needs a converter of its own, so we refuse it instead of guessing.
SUPPORTED_PARENT_TYPES = ("llama", "mistral", "qwen2")

__all__ = [
    "SUPPORTED_PARENT_TYPES",
    "check_parent_dir",
    "child_config",
    "count_params",
    "from_llama",
    "load_parent",
    "load_weights",
]


class ParentError(ValueError):
    """A parent model the kit cannot convert; the message says what is supported."""


def load_weights(model: PuzzleForCausalLM, state: dict[str, torch.Tensor], error: type[Exception],
                 what: str) -> None:
    """``model.load_state_dict(state)`` that raises ``error("<what>: missing …, unexpected …")`` for
    any missing or unexpected tensor (a tied LM head excepted) instead of keeping a silently random
    weight, then ties the embeddings when the config says so. (Checkpoints on disk are loaded
    strictly by ``export.load_checkpoint``; this is for state dicts assembled in memory.)"""
    tied = model.config.tie_word_embeddings
    if tied:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise error(f"{what}: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    if tied:
        model.tie_weights()


def _puzzle_config_from_hf(cfg) -> PuzzleConfig:
    mt = getattr(cfg, "model_type", None)
    if mt == PuzzleConfig.model_type:
        return copy.deepcopy(cfg)
    if mt not in SUPPORTED_PARENT_TYPES:
        raise ParentError(
            f"Parent model_type {mt!r} is not supported. Supported: {', '.join(SUPPORTED_PARENT_TYPES)} "
            f"(Llama-layout decoders: separate q/k/v/o projections, SwiGLU MLP, RMSNorm, RoPE)."
        )
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ParentError(f"Parent hidden_act={cfg.hidden_act!r}: only SwiGLU ('silu') parents are supported.")
    if mt in ("mistral", "qwen2") and getattr(cfg, "sliding_window", None) and (
        mt == "mistral" or getattr(cfg, "use_sliding_window", False)
    ) and cfg.sliding_window < cfg.max_position_embeddings:
        raise ParentError(
            f"Parent uses sliding-window attention (sliding_window={cfg.sliding_window}); the kit's "
            "decoder implements full causal attention only. Use a checkpoint without a sliding window."
        )
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        raise ParentError("Parent has pretraining_tp > 1; convert it to a standard checkpoint first.")
    kv = cfg.num_key_value_heads or cfg.num_attention_heads
    rope = dict(cfg.rope_parameters) if getattr(cfg, "rope_parameters", None) else None
    # Qwen2 puts biases on q/k/v only; the kit's attention has one bias flag for all four
    # projections, so Qwen2's o_proj gets a zero bias (same function, one more tensor).
    attention_bias = bool(getattr(cfg, "attention_bias", False)) or mt == "qwen2"
    return PuzzleConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=kv, head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        initializer_range=getattr(cfg, "initializer_range", 0.02),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        rope_parameters=rope, attention_bias=attention_bias, mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        block_configs=[parent_block_config(cfg.num_attention_heads, kv, cfg.intermediate_size)
                       for _ in range(cfg.num_hidden_layers)],
    )


def from_llama(hf_model: PreTrainedModel, dtype: torch.dtype | None = None) -> PuzzleForCausalLM:
    """Convert an in-memory Llama-layout causal LM into an all-parent ``PuzzleForCausalLM``.

    Tensor names are Llama's on both sides, so this is a strict ``load_state_dict``: any missing or
    unexpected tensor is an error rather than a silently random weight.
    """
    config = _puzzle_config_from_hf(hf_model.config)
    dtype = dtype or next(hf_model.parameters()).dtype
    model = PuzzleForCausalLM(config).to(dtype)
    state = {k: v for k, v in hf_model.state_dict().items() if "rotary_emb" not in k}
    if config.attention_bias:
        for i in range(config.num_hidden_layers):
            key = f"model.layers.{i}.self_attn.o_proj.bias"
            if key not in state:
                state[key] = torch.zeros(config.hidden_size, dtype=dtype)
    load_weights(model, state, ParentError, "Parent tensors do not match a Llama layout")
    return model.eval()


def load_parent(path_or_id: str | Path | PreTrainedModel, dtype: torch.dtype = torch.float32,
                trust_remote_code: bool = False) -> PuzzleForCausalLM:
    """Load a parent from a local directory, a hub id (needs network) or an in-memory model.

    A directory that already holds a ``nemotron-nas`` checkpoint (e.g. the kit's own embedded
    parent) loads directly. ``trust_remote_code`` stays off unless the user asks, because it runs
    Python shipped with the checkpoint.
    """
    if isinstance(path_or_id, PreTrainedModel):
        return path_or_id.eval() if isinstance(path_or_id, PuzzleForCausalLM) else from_llama(path_or_id, dtype)
    src = str(path_or_id)
    if trust_remote_code:
        warnings.warn(f"trust_remote_code=True: Python code shipped with {src!r} will run.", stacklevel=2)
    local = Path(src)
    if local.exists():
        check_parent_dir(local)
    cfg = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    if cfg.model_type == PuzzleConfig.model_type and local.exists():
        from .export import load_checkpoint  # strict: no silently re-initialised tensors

        return load_checkpoint(local, dtype=dtype)
    if cfg.model_type == PuzzleConfig.model_type:
        return PuzzleForCausalLM.from_pretrained(src, dtype=dtype).eval()
    _puzzle_config_from_hf(cfg)  # refuse unsupported architectures before loading any weight
    # use_safetensors=True: a hub repo with only pytorch_model.bin is refused rather than unpickled.
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, trust_remote_code=trust_remote_code,
                                              use_safetensors=True)
    return from_llama(hf, dtype)


def check_parent_dir(path: str | Path, seq_len: int | None = None) -> None:
    """Refuse a local parent directory the kit cannot load, reading only JSON and file headers.

    Checked: it is a folder with a ``config.json`` object of a supported ``model_type``; its
    weights are safetensors (pickle-based ``*.bin`` / ``*.pt`` are refused, because unpickling runs
    arbitrary code); every ``*.safetensors`` file is as long as its header says (a truncated
    download fails here, not halfway through a stage); a ``tokenizer.json`` next to it emits no id
    beyond ``vocab_size``; ``seq_len`` fits its positions. Reads only JSON and file headers, so
    the runner calls it before any notebook starts.
    """
    path = Path(path)
    if not path.is_dir():
        raise ParentError(f"{path} is not a folder: point `parent` at a Hugging Face model directory "
                          "(config.json + *.safetensors), a hub id, or 'embedded'.")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ParentError(f"{path} has no config.json: point `parent` at a Hugging Face model directory.")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ParentError(f"{cfg_path} is not readable JSON ({e}); re-download the parent.") from None
    if not isinstance(cfg, dict):
        raise ParentError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}.")
    mt = cfg.get("model_type")
    if mt != PuzzleConfig.model_type and mt not in SUPPORTED_PARENT_TYPES:
        raise ParentError(f"Parent model_type {mt!r} (in {cfg_path}) is not supported. Supported: "
                          f"{', '.join(SUPPORTED_PARENT_TYPES)} (Llama-layout decoders), or a "
                          f"{PuzzleConfig.model_type!r} checkpoint of this kit.")
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in [*path.glob("*.bin"), *path.glob("*.pt"), *path.glob("*.pth")])
        if pickles:
            raise ParentError(
                f"{path} holds only pickle weights ({', '.join(pickles[:3])}); the kit loads safetensors "
                "only, because unpickling a file runs code from it. Convert it once where you trust the "
                "file: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True).")
        raise ParentError(f"{path} has no weights (*.safetensors): the checkpoint is incomplete.")
    for shard in shards:
        problem = _safetensors_problem(shard)
        if problem:
            raise ParentError(f"{shard} is truncated or corrupt ({problem}); download or export it again.")
    _check_tokenizer_fits(path, cfg.get("vocab_size"))
    max_pos = cfg.get("max_position_embeddings")
    if seq_len is not None and isinstance(max_pos, int) and seq_len > max_pos:
        raise ParentError(f"seq_len={seq_len} exceeds the parent's max_position_embeddings={max_pos} "
                          f"(in {cfg_path}): set seq_len <= {max_pos}.")


def _check_tokenizer_fits(path: Path, vocab_size: object) -> None:
    """A tokenizer.json next to the weights must not emit an id the embedding does not have."""
    tok_path = path / "tokenizer.json"
    if not tok_path.is_file() or not isinstance(vocab_size, int):
        return
    try:
        tok = json.loads(tok_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ParentError(f"{tok_path} is not readable JSON ({e}); re-download the parent.") from None
    vocab = (tok.get("model") or {}).get("vocab") or {}
    # BPE / WordPiece store {token: id}; Unigram stores [[token, score], ...] with id = position.
    ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))
    ids |= {t["id"] for t in tok.get("added_tokens") or [] if isinstance(t, dict) and "id" in t}
    top = max((i for i in ids if isinstance(i, int)), default=-1)
    if top >= vocab_size:
        raise ParentError(f"the tokenizer in {tok_path} emits ids up to {top} but the model's vocabulary "
                          f"(vocab_size in config.json) is {vocab_size}: use the tokenizer that came with "
                          "the parent.")


def _safetensors_problem(path: Path) -> str:
    """'' if the file's size matches its header (8-byte length, JSON header, tensor data)."""
    size = path.stat().st_size
    if size < 8:
        return f"{size} bytes, shorter than the 8-byte header length"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            return f"header says {n} header bytes but the file has {size} bytes"
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"header is not JSON: {e}"
    ends = [t["data_offsets"][1] for k, t in header.items()
            if k != "__metadata__" and isinstance(t, dict) and "data_offsets" in t]
    expected = 8 + n + max(ends, default=0)
    return "" if size == expected else f"{size} bytes, the header describes {expected}"


def child_config(parent: PuzzleConfig, block_configs: list[dict]) -> PuzzleConfig:
    """The parent's config with new per-layer blocks (validated and normalised)."""
    d = parent.to_dict()
    d["block_configs"] = block_configs
    for k in ("model_type", "transformers_version", "architectures", "auto_map"):
        d.pop(k, None)
    return PuzzleConfig(**d)


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        n += p.numel()
    return n
