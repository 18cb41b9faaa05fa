"""PuzzleConfig: the configuration of a heterogeneous ("nemotron-nas" / DeciLM) decoder.

What it does: holds Llama's fields plus ``block_configs``, one entry per layer, saying which
attention and which FFN variant that layer uses. This is the schema of NVIDIA's published Puzzle
models (Llama-3.1-Nemotron-51B and friends), so tools that know those checkpoints know ours.

Self-contained on purpose: this file imports only ``transformers`` and the standard library,
because ``puzzlelib.export`` copies it verbatim into every exported checkpoint as
``configuration_decilm.py``; a user with no ``puzzlelib`` installed then loads a child with
``AutoConfig.from_pretrained(dir, trust_remote_code=True)``.

One block config (after normalisation) reads::

    {"attention": {"n_heads_in_group": 2,      # query heads per KV head; null for linear/no-op
                   "no_op": False,             # drop the sub-block *and* its pre-norm
                   "replace_with_linear": False},
     "ffn":       {"ffn_mult": None,           # DeciLM width rule, when it reproduces the width
                   "intermediate_size": 768,   # exact SwiGLU width (our extension, see below)
                   "no_op": False,
                   "replace_with_linear": False}}

DeciLM derives the FFN width as ``find_multiple(int(2 * ffn_mult * hidden / 3), 256)``; tiny
models have widths that are not multiples of 256, so we also accept (and always keep, internally)
an exact ``intermediate_size``. NVIDIA's later DeciLM code (Model-Optimizer) reads only
``intermediate_size`` and vLLM prefers ``ffn_mult``: the export writes both (``export.py``).

Fields that other DeciLM readers use and this class reads back only to check them against its
own: top-level ``rope_theta`` / ``rope_scaling`` (must say what ``rope_parameters`` says),
``o_proj_bias`` (must equal ``attention_bias``: one flag covers q/k/v/o here),
``position_embedding_type`` ("rope"), ``pretraining_tp`` (1), and per FFN ``hidden_act`` ("silu")
and ``gated`` (true). A value this model cannot honour is an error, never silently ignored.

``DeciLMConfig`` is a real subclass, so a folder re-saved by ``save_pretrained`` keeps DeciLM's
class names (vLLM picks its implementation by the ``architectures`` name).
Leaves out: anything about training or search.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PreTrainedConfig

# Rope types whose inverse frequencies are fixed at construction. "dynamic" and "longrope"
# rescale during the forward pass based on the sequence length; supporting them would mean
# per-call frequency updates that the heterogeneous cache does not track yet.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of ``k`` that is ≥ ``n`` (DeciLM's width rounding)."""
    return n if n % k == 0 else n + k - (n % k)


def ffn_mult_to_width(ffn_mult: float, hidden_size: int) -> int:
    """The FFN width DeciLM derives from ``ffn_mult``."""
    return find_multiple(int(2 * ffn_mult * hidden_size / 3), 256)


def width_to_ffn_mult(width: int, hidden_size: int) -> float | None:
    """An ``ffn_mult`` that DeciLM maps back to exactly ``width``, or None when none exists.

    Only multiples of 256 can come out of DeciLM's rule, so every other width is written as an
    exact ``intermediate_size`` instead.
    """
    if width <= 0 or width % 256:
        return None
    mult = round(width * 3 / (2 * hidden_size), 6)
    return mult if ffn_mult_to_width(mult, hidden_size) == width else None


class PuzzleConfig(PreTrainedConfig):
    """Llama fields + one ``block_configs`` entry per layer (see the module docstring)."""

    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    # The parent's SwiGLU width and KV-head count. They only seed ``block_configs`` when none is
    # given; once blocks exist each layer carries its own, and the DeciLM export writes these null.
    intermediate_size: int | None = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    block_configs: list | None = None
    # The grid that narrower FFN variants cut from this (parent) model are rounded to
    # (``blocks.Variant.width``): 8 by default; 256 keeps every child's widths where NVIDIA's DeciLM
    # code and vLLM can read them (``RunConfig.ffn_width_multiple``; ``export.vllm_compatible``).
    ffn_width_multiple: int = 8

    def __post_init__(self, **kwargs):
        check_foreign_fields(kwargs, self.rope_parameters, self.attention_bias)
        # Checked above; the export writes them again from this class's own fields.
        for key in FOREIGN_FIELDS + (("rope_theta", "rope_scaling") if self.rope_parameters is not None else ()):
            kwargs.pop(key, None)
        if self.rope_parameters is None and "rope_theta" not in kwargs and "rope_scaling" not in kwargs:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                    f"({self.num_attention_heads}); set head_dim explicitly or change the head count."
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not isinstance(self.ffn_width_multiple, int) or self.ffn_width_multiple <= 0:
            raise ValueError(f"ffn_width_multiple={self.ffn_width_multiple!r} must be a positive int (8 or 256).")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r}: only SwiGLU ('silu') FFNs are supported.")
        if self.block_configs is None:
            kv = self.num_key_value_heads or self.num_attention_heads
            if self.intermediate_size is None:
                raise ValueError("Give either block_configs or intermediate_size (the parent FFN width).")
            self.block_configs = [
                parent_block_config(self.num_attention_heads, kv, self.intermediate_size)
                for _ in range(self.num_hidden_layers)
            ]
        self.block_configs = [
            normalize_block_config(b, i, self.num_attention_heads, self.hidden_size)
            for i, b in enumerate(self.block_configs)
        ]
        if len(self.block_configs) != self.num_hidden_layers:
            raise ValueError(
                f"block_configs has {len(self.block_configs)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}: give exactly one block config per layer."
            )
        super().__post_init__(**kwargs)
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_type={rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}."
            )

    # -- per-layer accessors: the rest of the kit asks these instead of parsing dicts ----------
    def attn_kind(self, i: int) -> str:
        """'gqa', 'linear' or 'noop' for layer ``i``."""
        a = self.block_configs[i]["attention"]
        return "noop" if a["no_op"] else "linear" if a["replace_with_linear"] else "gqa"

    def ffn_kind(self, i: int) -> str:
        """'swiglu', 'linear' or 'noop' for layer ``i``."""
        f = self.block_configs[i]["ffn"]
        return "noop" if f["no_op"] else "linear" if f["replace_with_linear"] else "swiglu"

    def kv_heads(self, i: int) -> int:
        """KV heads of layer ``i`` (0 when it has no GQA attention)."""
        a = self.block_configs[i]["attention"]
        return self.num_attention_heads // a["n_heads_in_group"] if self.attn_kind(i) == "gqa" else 0

    def ffn_width(self, i: int) -> int:
        """SwiGLU width of layer ``i`` (0 when it has no SwiGLU FFN)."""
        return self.block_configs[i]["ffn"]["intermediate_size"] if self.ffn_kind(i) == "swiglu" else 0

    @property
    def attention_layers(self) -> list[int]:
        """Indices of the layers that keep softmax attention (and so a KV cache)."""
        return [i for i in range(self.num_hidden_layers) if self.attn_kind(i) == "gqa"]


def legacy_rope_fields(rope_parameters: dict) -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling)`` as transformers 4.x-era readers (NVIDIA's DeciLM code, older
    vLLM) expect them at the top level of config.json: the scaling dict without ``rope_theta``,
    or None for plain RoPE."""
    theta = float(rope_parameters["rope_theta"])
    scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
    return theta, (None if scaling.get("rope_type", "default") == "default" else scaling)


# Top-level fields of other DeciLM readers that this class checks and then drops (module doc).
FOREIGN_FIELDS = ("o_proj_bias", "position_embedding_type", "pretraining_tp")


def check_foreign_fields(kwargs: dict, rope_parameters: dict | None, attention_bias: bool) -> None:
    """Refuse DeciLM fields whose value this model would silently not honour (see module doc)."""
    if rope_parameters is not None and ("rope_theta" in kwargs or "rope_scaling" in kwargs):
        theta, scaling = legacy_rope_fields(rope_parameters)
        got_theta, got_scaling = kwargs.get("rope_theta", theta), kwargs.get("rope_scaling", scaling)
        if got_scaling is not None and got_scaling.get("rope_type", got_scaling.get("type")) == "default":
            got_scaling = None
        if got_theta is None or float(got_theta) != theta or (got_scaling or None) != scaling:
            raise ValueError(
                f"rope_theta={got_theta!r} / rope_scaling={got_scaling!r} disagree with rope_parameters="
                f"{rope_parameters!r}; other DeciLM readers use the former, this model the latter: make "
                "them agree (or drop rope_theta/rope_scaling and re-export).")
    if "o_proj_bias" in kwargs and bool(kwargs["o_proj_bias"]) != bool(attention_bias):
        raise ValueError(f"o_proj_bias={kwargs['o_proj_bias']!r} differs from attention_bias={attention_bias!r}: "
                         "this model has one bias flag for q/k/v/o_proj.")
    for key, allowed in (("position_embedding_type", ("rope",)), ("pretraining_tp", (1,))):
        if key in kwargs and kwargs[key] not in allowed:
            raise ValueError(f"{key}={kwargs[key]!r} is not supported (only {allowed[0]!r}).")


def parent_block_config(num_heads: int, num_kv_heads: int, width: int) -> dict[str, Any]:
    """The block config of an unchanged Llama layer."""
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"num_key_value_heads={num_kv_heads} must divide num_attention_heads={num_heads}."
        )
    return {
        "attention": {"n_heads_in_group": num_heads // num_kv_heads, "no_op": False,
                      "replace_with_linear": False},
        "ffn": {"ffn_mult": None, "intermediate_size": int(width), "no_op": False,
                "replace_with_linear": False},
    }


def normalize_block_config(block: dict, i: int, num_heads: int, hidden: int) -> dict[str, Any]:
    """Validate one layer's block config and fill in every key (exact width included)."""
    if not isinstance(block, dict) or set(block) - {"attention", "ffn"} or not {"attention", "ffn"} <= set(block):
        raise ValueError(f"block_configs[{i}] must be a dict with exactly 'attention' and 'ffn' keys, got {block!r}.")
    a = copy.deepcopy(block["attention"])
    f = copy.deepcopy(block["ffn"])
    for name, sub in (("attention", a), ("ffn", f)):
        if sub.get("no_op") and sub.get("replace_with_linear"):
            raise ValueError(
                f"block_configs[{i}].{name} has both no_op and replace_with_linear set; choose one."
            )
    a = {"n_heads_in_group": a.get("n_heads_in_group"), "no_op": bool(a.get("no_op", False)),
         "replace_with_linear": bool(a.get("replace_with_linear", False))}
    if a["no_op"] or a["replace_with_linear"]:
        a["n_heads_in_group"] = None
    else:
        g = a["n_heads_in_group"]
        if not isinstance(g, int) or g <= 0 or num_heads % g:
            raise ValueError(
                f"block_configs[{i}].attention.n_heads_in_group={g!r}: it must be a positive divisor of "
                f"num_attention_heads={num_heads} (KV heads = {num_heads} // n_heads_in_group)."
            )
    if f.get("hidden_act", "silu") not in ("silu", None) or f.get("gated", True) is False:
        raise ValueError(f"block_configs[{i}].ffn: hidden_act={f.get('hidden_act')!r}, gated={f.get('gated')!r}; "
                         "only gated SiLU (SwiGLU) FFNs are supported.")
    f = {"ffn_mult": f.get("ffn_mult"), "intermediate_size": f.get("intermediate_size"),
         "no_op": bool(f.get("no_op", False)), "replace_with_linear": bool(f.get("replace_with_linear", False))}
    if f["no_op"] or f["replace_with_linear"]:
        f["ffn_mult"] = f["intermediate_size"] = None
    else:
        width = f["intermediate_size"]
        if width is None:
            if f["ffn_mult"] is None:
                raise ValueError(f"block_configs[{i}].ffn needs ffn_mult or intermediate_size.")
            width = ffn_mult_to_width(float(f["ffn_mult"]), hidden)
        if not isinstance(width, int) or width <= 0:
            raise ValueError(f"block_configs[{i}].ffn width must be a positive int, got {width!r}.")
        if f["ffn_mult"] is not None and ffn_mult_to_width(float(f["ffn_mult"]), hidden) != width:
            raise ValueError(
                f"block_configs[{i}].ffn: ffn_mult={f['ffn_mult']} gives width "
                f"{ffn_mult_to_width(float(f['ffn_mult']), hidden)} but intermediate_size={width}; "
                "readers that use ffn_mult (vLLM) would build another model: make them agree.")
        f["intermediate_size"] = width
    return {"attention": a, "ffn": f}


class DeciLMConfig(PuzzleConfig):
    """``PuzzleConfig`` under DeciLM's class name: what ``auto_map`` in an exported config.json
    names, so a loaded config (and a folder re-saved from it) carries NVIDIA's names."""


__all__ = ["PuzzleConfig", "DeciLMConfig", "find_multiple", "ffn_mult_to_width", "width_to_ffn_mult",
           "legacy_rope_fields"]
