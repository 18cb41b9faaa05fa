"""PuzzleForCausalLM: a Llama decoder whose every layer may differ (the Puzzle "child").

What it does: one model class for the parent, every block-library member and every child.
Layer ``i`` reads ``config.block_configs[i]`` and builds

* attention: GQA with any KV-head count dividing the query heads (RoPE, SDPA), a single
  ``Linear(hidden, hidden)`` (``self_attn.linear_attn``: each token attending only to itself, so
  softmax attention collapses to ``W_o·W_v``), or nothing at all (no pre-norm either);
* FFN: SwiGLU of any width, a single ``Linear`` (``mlp.linear_mlp``), or nothing.

Generation uses :class:`PuzzleCache`, which holds K/V only for layers that have attention, each
with its own KV-head count, and counts the tokens it has seen itself — so positions stay right
when layer 0 has no attention or when no layer has any (a stock ``DynamicCache`` asks layer 0).

Self-contained on purpose: imports only torch, transformers and the sibling
``configuration_decilm``; ``puzzlelib.export`` copies this file into every checkpoint as
``modeling_decilm.py``. Leaves out: training, dropout, flash/flex attention kernels, tensor
parallelism, sliding windows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DummyLayer, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .configuration_decilm import DeciLMConfig, PuzzleConfig


class PuzzleRMSNorm(nn.Module):
    """Llama's RMSNorm, computed in fp32 like the reference so conversions match to 1e-5."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class PuzzleRotaryEmbedding(nn.Module):
    """RoPE cos/sin for given positions; llama3 / linear / yarn scaling via transformers' tables."""

    def __init__(self, config: PuzzleConfig):
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = self.compute_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @staticmethod
    def compute_inv_freq(config: PuzzleConfig) -> tuple[torch.Tensor, float]:
        """Inverse frequencies and the cos/sin scaling for the config's rope type."""
        rope_type = config.rope_parameters.get("rope_type", "default")
        if rope_type == "default":
            dim = config.head_dim
            base = config.rope_parameters["rope_theta"]
            return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
        return ROPE_INIT_FUNCTIONS[rope_type](config)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class PuzzleAttention(nn.Module):
    """Grouped-query softmax attention with ``num_kv_heads`` K/V heads."""

    def __init__(self, config: PuzzleConfig, layer_idx: int, num_kv_heads: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = config.head_dim
        h, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(h, num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(h, num_kv_heads * hd, bias=bias)
        # Llama puts the bias flag on o_proj too (Qwen2 has q/k/v biases only: see from_llama).
        self.o_proj = nn.Linear(self.num_heads * hd, h, bias=bias)

    def forward(self, x, cos, sin, mask, is_causal, cache):
        b, q_len, _ = x.shape
        q = self.q_proj(x).view(b, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.num_kv_heads != self.num_heads:
            # Expanding K/V explicitly keeps SDPA on its fused CPU/GPU kernels, which `enable_gqa`
            # does not reach for every mask shape.
            rep = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, -1))


class PuzzleLinearAttention(nn.Module):
    """Attention replaced by one linear map (``linear_attn``): position- and context-free."""

    def __init__(self, config: PuzzleConfig):
        super().__init__()
        self.linear_attn = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)

    def forward(self, x, cos, sin, mask, is_causal, cache):
        return self.linear_attn(x)


class PuzzleMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))`` with ``width`` channels."""

    def __init__(self, config: PuzzleConfig, width: int):
        super().__init__()
        h, bias = config.hidden_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, width, bias=bias)
        self.up_proj = nn.Linear(h, width, bias=bias)
        self.down_proj = nn.Linear(width, h, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PuzzleLinearMLP(nn.Module):
    """FFN replaced by one linear map (``linear_mlp``)."""

    def __init__(self, config: PuzzleConfig):
        super().__init__()
        self.linear_mlp = nn.Linear(config.hidden_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x):
        return self.linear_mlp(x)


def build_attention(config: PuzzleConfig, i: int) -> nn.Module | None:
    """The attention sub-block of layer ``i`` as its block config says (None for no-op)."""
    kind = config.attn_kind(i)
    if kind == "noop":
        return None
    if kind == "linear":
        return PuzzleLinearAttention(config)
    return PuzzleAttention(config, i, config.kv_heads(i))


def build_mlp(config: PuzzleConfig, i: int) -> nn.Module | None:
    """The FFN sub-block of layer ``i`` as its block config says (None for no-op)."""
    kind = config.ffn_kind(i)
    if kind == "noop":
        return None
    if kind == "linear":
        return PuzzleLinearMLP(config)
    return PuzzleMLP(config, config.ffn_width(i))


class PuzzleDecoderLayer(nn.Module):
    """Pre-norm residual layer; a no-op sub-block has neither module nor norm (no tensors)."""

    def __init__(self, config: PuzzleConfig, i: int):
        super().__init__()
        self.layer_idx = i
        self.self_attn = build_attention(config, i)
        self.input_layernorm = PuzzleRMSNorm(config.hidden_size, config.rms_norm_eps) if self.self_attn else None
        self.mlp = build_mlp(config, i)
        self.post_attention_layernorm = PuzzleRMSNorm(config.hidden_size, config.rms_norm_eps) if self.mlp else None

    def attn_residual(self, x, cos=None, sin=None, mask=None, is_causal=True, cache=None):
        """The attention half: ``x + attn(norm(x))`` (identity for a no-op)."""
        if self.self_attn is None:
            return x
        return x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache)

    def ffn_residual(self, x):
        """The FFN half: ``x + mlp(norm(x))`` (identity for a no-op)."""
        if self.mlp is None:
            return x
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x, cos, sin, mask, is_causal, cache):
        return self.ffn_residual(self.attn_residual(x, cos, sin, mask, is_causal, cache))


class PuzzleCache(Cache):
    """KV cache for heterogeneous layers.

    Layers with softmax attention get a growing ``DynamicLayer`` (shaped by their own KV-head
    count); every other layer gets a ``DummyLayer`` that stores nothing. The number of tokens seen
    is counted here rather than read off layer 0, which may have no attention at all.
    """

    def __init__(self, config: PuzzleConfig):
        attn = set(config.attention_layers)
        super().__init__(layers=[DynamicLayer() if i in attn else DummyLayer()
                                 for i in range(config.num_hidden_layers)])
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    @property
    def is_compileable(self) -> bool:
        # A growing cache: tells generate() not to pre-build static 4D masks (the model builds its
        # own, and an all-dummy cache would otherwise look "static").
        return False

    def kv_bytes(self) -> int:
        """Bytes held by cached keys and values (what a serving engine would have to keep)."""
        return sum(t.numel() * t.element_size() for layer in self.layers
                   for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))


class PuzzlePreTrainedModel(PreTrainedModel):
    config_class = PuzzleConfig
    config: PuzzleConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["PuzzleDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    def _init_weights(self, module):
        super()._init_weights(module)
        # from_pretrained builds modules on the meta device; the non-persistent RoPE buffer is not
        # in the checkpoint, so it must be recomputed here or it would hold garbage.
        if isinstance(module, PuzzleRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(module.config)[0])


class PuzzleModel(PuzzlePreTrainedModel):
    """Embeddings → heterogeneous layers → final norm."""

    def __init__(self, config: PuzzleConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(PuzzleDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = PuzzleRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = PuzzleRotaryEmbedding(config)
        self.post_init()

    def attention_inputs(self, hidden, position_ids=None, attention_mask=None, past_len=0):
        """cos/sin, boolean mask (or None) and the is_causal flag shared by every layer.

        The mask is built only when needed (padding, or several new tokens after a cache),
        so the common cases use SDPA's causal fast path.
        """
        b, q_len = hidden.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + q_len, device=hidden.device).unsqueeze(0)
        cos, sin = self.rotary_emb(hidden, position_ids)
        padded = attention_mask is not None and not bool(attention_mask.all())
        mask = None
        if padded or (past_len > 0 and q_len > 1):
            k_len = past_len + q_len
            q_pos = torch.arange(past_len, k_len, device=hidden.device)
            mask = (torch.arange(k_len, device=hidden.device)[None, :] <= q_pos[:, None])[None, None]
            if attention_mask is not None:
                mask = mask & attention_mask[:, None, None, -k_len:].bool()
            # A query row with no visible key (left padding) would give NaN; let it see everything
            # — its output is padding and never read.
            mask = mask | ~mask.any(-1, keepdim=True)
        return cos, sin, mask, q_len > 1

    def forward_layers(self, hidden, start: int = 0, end: int | None = None, position_ids=None,
                       attention_mask=None, cache: PuzzleCache | None = None, past_len: int = 0,
                       output_hidden_states: bool = False):
        """Run layers ``start … end-1`` on ``hidden`` (no final norm).

        Scoring uses this to resume from the parent's cached hidden state at layer ``start``
        instead of recomputing the prefix for every candidate.
        """
        cos, sin, mask, is_causal = self.attention_inputs(hidden, position_ids, attention_mask, past_len)
        states = [hidden] if output_hidden_states else None
        for layer in self.layers[start:end]:
            hidden = layer(hidden, cos, sin, mask, is_causal, cache)
            if output_hidden_states:
                states.append(hidden)
        return hidden, states

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=False, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Give exactly one of input_ids or inputs_embeds.")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if past_key_values is not None and not isinstance(past_key_values, PuzzleCache):
            raise TypeError(
                f"PuzzleForCausalLM needs a PuzzleCache (layers differ in KV heads and some have no "
                f"attention), got {type(past_key_values).__name__}. Use model.new_cache() or let "
                f"generate() create one."
            )
        if use_cache and past_key_values is None:
            past_key_values = PuzzleCache(self.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        hidden, states = self.forward_layers(hidden, 0, None, position_ids, attention_mask,
                                             past_key_values, past_len, output_hidden_states)
        if past_key_values is not None:
            past_key_values.seen_tokens += hidden.shape[1]
        return self.norm(hidden), past_key_values, states


class PuzzleForCausalLM(PuzzlePreTrainedModel, GenerationMixin):
    """The heterogeneous decoder with an LM head (tied to the embeddings when configured)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PuzzleConfig):
        super().__init__(config)
        self.model = PuzzleModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def new_cache(self) -> PuzzleCache:
        """An empty KV cache laid out for this model's layers."""
        return PuzzleCache(self.config)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # generate() would otherwise build a DynamicCache, whose length comes from layer 0 — wrong
        # for a child whose first layer has no attention. Static caches are not offered: they
        # assume one KV shape for all layers.
        if model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False:
            if generation_config.cache_implementation not in (None, "dynamic"):
                raise ValueError(
                    f"cache_implementation={generation_config.cache_implementation!r} is not supported "
                    "by heterogeneous layers; leave it unset."
                )
            model_kwargs["past_key_values"] = PuzzleCache(self.config)
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None,
                logits_to_keep: int = 0, return_dict=None, **kwargs) -> CausalLMOutputWithPast:
        """Standard causal-LM forward.

        With ``output_hidden_states=True`` the outputs carry L+1 states: the embeddings and the
        residual stream after every layer (before the final norm) — what GKD's cosine loss uses.
        """
        hidden, cache, states = self.model(input_ids, attention_mask, position_ids, past_key_values,
                                           inputs_embeds, use_cache, bool(output_hidden_states))
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache,
                                      hidden_states=tuple(states) if states is not None else None)


class DeciLMForCausalLM(PuzzleForCausalLM):
    """``PuzzleForCausalLM`` under DeciLM's class name: what ``auto_map`` and ``architectures`` in an
    exported config.json name, so ``save_pretrained`` of a loaded child writes
    ``architectures: ["DeciLMForCausalLM"]`` again (vLLM dispatches on that name)."""

    config_class = DeciLMConfig


__all__ = ["PuzzleForCausalLM", "DeciLMForCausalLM", "PuzzleModel", "PuzzleCache", "PuzzleConfig", "DeciLMConfig"]
