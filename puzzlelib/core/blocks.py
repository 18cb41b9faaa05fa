"""The block library's vocabulary: variant specs, library listing, initialisation from the parent.

What it does:
* names every sub-block variant with a stable string — ``attn:kv2`` (GQA with 2 KV heads),
  ``attn:linear``, ``attn:noop``, ``ffn:0.50`` (SwiGLU at 50 % of the parent width),
  ``ffn:linear``, ``ffn:noop`` — and parses them back (:func:`parse_variant`);
* lists a library for a parent config (:func:`list_library`), optionally without linear
  replacements (vLLM's ``DeciLMForCausalLM`` cannot serve them);
* initialises every variant from the parent's weights, as DESIGN.md §1 says:
  fewer KV heads → mean-pool the K/V heads that serve the same query heads;
  linear attention → ``W_o · W_v`` (a token attending only to itself);
  narrower FFN → keep the channels with the largest *channel contribution*
  ``mean_tokens |act_c| · ‖W_down[:, c]‖₂`` measured on calibration activations
  (:func:`ffn_channel_scores`), or — when no calibration data is given — a weight-norm proxy, with
  a warning that says so; linear FFN → ``W_down · W_up`` (gate ignored);
* builds a child from per-layer choices with pure-init blocks (:func:`build_child`).

Reads: a parent ``PuzzleForCausalLM`` and, optionally, calibration token batches. Writes
nothing. Leaves out: training the blocks (``bld.py``) and storing them (``library.py``).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch

from .configuration_decilm import PuzzleConfig
from .modeling_decilm import PuzzleForCausalLM
from .model import child_config, load_weights

# The paper's FFN menu for Llama-70B (fractions of the parent width; 1.00 is the parent's own).
DEFAULT_FFN_FRACTIONS = (1.0, 0.875, 0.75, 0.5, 0.25, 0.2, 0.1)

_ATTN_RE = re.compile(r"^attn:(?:kv(\d+)|linear|noop)$")
_FFN_RE = re.compile(r"^ffn:(?:(\d+(?:\.\d+)?)|linear|noop)$")


class VariantError(ValueError):
    """An unknown or impossible variant; the message lists what is valid."""


@dataclass(frozen=True, order=True)
class Variant:
    """One sub-block variant. ``kind`` is 'attn' or 'ffn'; ``op`` is gqa|swiglu|linear|noop."""

    kind: str
    op: str
    kv_heads: int = 0        # GQA only
    fraction: float = 0.0    # SwiGLU only: width as a fraction of the parent's

    @property
    def name(self) -> str:
        if self.op in ("linear", "noop"):
            return f"{self.kind}:{self.op}"
        if self.kind == "attn":
            return f"attn:kv{self.kv_heads}"
        # Two decimals when they suffice (ffn:0.50), three otherwise (ffn:0.875): names round-trip.
        s = f"{self.fraction:.3f}"
        return f"ffn:{s[:-1] if s.endswith('0') else s}"

    def __str__(self) -> str:
        return self.name

    def is_parent(self, parent: PuzzleConfig, layer: int = 0) -> bool:
        """True when this variant is exactly the parent's own sub-block at ``layer``."""
        if self.kind == "attn":
            return self.op == "gqa" and parent.attn_kind(layer) == "gqa" and self.kv_heads == parent.kv_heads(layer)
        return (self.op == "swiglu" and parent.ffn_kind(layer) == "swiglu"
                and self.width(parent, layer) == parent.ffn_width(layer))

    def width(self, parent: PuzzleConfig, layer: int = 0, multiple: int | None = None) -> int:
        """SwiGLU width for this fraction of the parent's width at ``layer``.

        Rounded to a multiple of ``multiple`` (default: the parent config's ``ffn_width_multiple``,
        8 — friendly to vector units — unless set to 256, the grid NVIDIA's DeciLM code and vLLM
        read) and never below it; the parent's own width is never changed by rounding.
        """
        multiple = multiple or getattr(parent, "ffn_width_multiple", 8) or 8
        pw = parent.ffn_width(layer)
        if self.fraction >= 1.0 or pw <= multiple:
            return pw if self.fraction >= 1.0 else max(1, round(self.fraction * pw))
        return min(pw, max(multiple, multiple * int(self.fraction * pw / multiple + 0.5)))  # half up

    def block_config(self, parent: PuzzleConfig, layer: int = 0) -> dict:
        """This variant's half of a DeciLM block config."""
        if self.kind == "attn":
            if self.op == "gqa":
                return {"n_heads_in_group": parent.num_attention_heads // self.kv_heads, "no_op": False,
                        "replace_with_linear": False}
            return {"n_heads_in_group": None, "no_op": self.op == "noop", "replace_with_linear": self.op == "linear"}
        if self.op == "swiglu":
            return {"ffn_mult": None, "intermediate_size": self.width(parent, layer), "no_op": False,
                    "replace_with_linear": False}
        return {"ffn_mult": None, "intermediate_size": None, "no_op": self.op == "noop",
                "replace_with_linear": self.op == "linear"}


def parse_variant(name: str, parent: PuzzleConfig | None = None) -> Variant:
    """``'attn:kv2'`` → ``Variant``; checked against ``parent`` when given."""
    if not isinstance(name, str):
        raise VariantError(f"Variant names are strings like 'attn:kv2' or 'ffn:0.50', got {name!r}.")
    m = _ATTN_RE.match(name)
    if m:
        if m.group(1) is not None:
            v = Variant("attn", "gqa", kv_heads=int(m.group(1)))
        else:
            v = Variant("attn", name.split(":")[1])
    else:
        m = _FFN_RE.match(name)
        if not m:
            raise VariantError(
                f"Unknown variant {name!r}. Valid forms: attn:kv<N> (N divides the query heads), "
                "attn:linear, attn:noop, ffn:<fraction in (0, 1]> e.g. ffn:0.50, ffn:linear, ffn:noop."
            )
        if m.group(1) is not None:
            frac = round(float(m.group(1)), 3)
            if not 0.0 < frac <= 1.0:
                raise VariantError(f"{name!r}: an FFN width fraction must be in (0, 1] (wider than the parent "
                                   "has no parent weights to start from).")
            v = Variant("ffn", "swiglu", fraction=frac)
        else:
            v = Variant("ffn", name.split(":")[1])
    if parent is not None:
        check_variant(v, parent)
    return v


def check_variant(v: Variant, parent: PuzzleConfig) -> None:
    """Refuse a variant the parent cannot initialise (e.g. KV heads not dividing query heads)."""
    h = parent.num_attention_heads
    if v.kind == "attn" and v.op == "gqa" and (v.kv_heads <= 0 or h % v.kv_heads):
        valid = [d for d in range(1, h + 1) if h % d == 0]
        raise VariantError(f"attn:kv{v.kv_heads}: the KV-head count must divide the {h} query heads; valid: {valid}.")
    if v.kind == "ffn" and v.op == "swiglu" and v.width(parent) <= 0:
        raise VariantError(f"{v.name}: width must be positive.")


def list_library(parent: PuzzleConfig, kv_heads: list[int] | None = None,
                 ffn_fractions: tuple[float, ...] = DEFAULT_FFN_FRACTIONS,
                 include_linear: bool = True, include_noop: bool = True) -> dict[str, list[Variant]]:
    """The variants to build for every layer: ``{"attn": [...], "ffn": [...]}``, parent first.

    ``kv_heads`` defaults to every divisor of the query heads that is ≤ the parent's KV heads
    (more KV heads than the parent would have nothing to be initialised from). Set
    ``include_linear=False`` for a vLLM-servable search space.
    """
    h, pkv = parent.num_attention_heads, parent.kv_heads(0)
    if kv_heads is None:
        kv_heads = [d for d in range(pkv, 0, -1) if h % d == 0]
    attn = [Variant("attn", "gqa", kv_heads=k) for k in sorted(set(kv_heads), reverse=True)]
    ffn = [Variant("ffn", "swiglu", fraction=round(f, 3)) for f in sorted(set(ffn_fractions), reverse=True)]
    for v in attn + ffn:
        check_variant(v, parent)
    # Distinct fractions can round to one width on small parents; keep the first (largest) name.
    seen, unique_ffn = set(), []
    for v in ffn:
        if v.width(parent) not in seen:
            seen.add(v.width(parent))
            unique_ffn.append(v)
    ffn = unique_ffn
    for kind, lst in (("attn", attn), ("ffn", ffn)):
        if include_linear:
            lst.append(Variant(kind, "linear"))
        if include_noop:
            lst.append(Variant(kind, "noop"))
    return {"attn": attn, "ffn": ffn}


# ---------------------------------------------------------------- initialisation from the parent

@torch.no_grad()
def ffn_channel_scores(parent: PuzzleForCausalLM, batches, max_batches: int | None = None) -> dict[int, torch.Tensor]:
    """Channel contribution per FFN channel and layer: mean_tokens |act_c| · ‖W_down[:, c]‖₂.

    ``act`` is the input of ``down_proj`` (``silu(gate(x)) * up(x)``), captured with forward
    hooks while the parent runs the calibration ``batches`` (token id tensors ``[B, T]``).
    """
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    hooks = []
    for i, layer in enumerate(parent.model.layers):
        if parent.config.ffn_kind(i) != "swiglu":
            continue

        def hook(mod, inp, _out, i=i):
            a = inp[0].detach().float().abs().flatten(0, -2)
            sums[i] = sums.get(i, 0) + a.sum(0)
            counts[i] = counts.get(i, 0) + a.shape[0]

        hooks.append(layer.mlp.down_proj.register_forward_hook(hook))
    try:
        was_training = parent.training
        parent.eval()
        for n, batch in enumerate(batches):
            if max_batches is not None and n >= max_batches:
                break
            parent(batch if isinstance(batch, torch.Tensor) else batch[0])
        parent.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    if not sums:
        raise ValueError("No calibration batch was run: give at least one batch of token ids.")
    return {i: (sums[i] / counts[i]) * parent.model.layers[i].mlp.down_proj.weight.float().norm(dim=0)
            for i in sums}


def _weight_norm_scores(mlp) -> torch.Tensor:
    # Without activations, a channel's typical size is bounded by its gate/up row norms; times its
    # down column norm this is the data-free analogue of channel contribution.
    return (mlp.gate_proj.weight.float().norm(dim=1) * mlp.up_proj.weight.float().norm(dim=1)
            * mlp.down_proj.weight.float().norm(dim=0))


def _kv_pool_matrix(num_heads: int, kv_parent: int, kv_child: int) -> torch.Tensor:
    """[kv_child, kv_parent] weights: child head j averages the parent heads serving its queries."""
    qp, qc = num_heads // kv_parent, num_heads // kv_child
    w = torch.zeros(kv_child, kv_parent)
    for q in range(num_heads):
        w[q // qc, q // qp] += 1.0
    return w / w.sum(1, keepdim=True)


def _expand_v(weight: torch.Tensor, num_heads: int, kv: int, head_dim: int) -> torch.Tensor:
    """Repeat each KV head's rows for its query heads: [kv*hd, ...] → [H*hd, ...]."""
    return weight.view(kv, head_dim, *weight.shape[1:]).repeat_interleave(num_heads // kv, 0).flatten(0, 1)


@torch.no_grad()
def init_variant(parent: PuzzleForCausalLM, layer: int, v: Variant,
                 channel_scores: dict[int, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Weights of variant ``v`` at ``layer``, initialised from the parent.

    Returns tensors named relative to ``model.layers.{layer}.`` (including the sub-block's
    pre-norm, copied from the parent); a no-op returns ``{}``.
    """
    cfg = parent.config
    check_variant(v, cfg)
    pl = parent.model.layers[layer]
    out: dict[str, torch.Tensor] = {}
    if v.op == "noop":
        return out
    if v.kind == "attn":
        if cfg.attn_kind(layer) != "gqa":
            raise VariantError(f"Layer {layer} of the parent has no attention to initialise {v.name} from.")
        a, hd, h, pkv = pl.self_attn, cfg.head_dim, cfg.num_attention_heads, cfg.kv_heads(layer)
        out["input_layernorm.weight"] = pl.input_layernorm.weight.clone()
        if v.op == "linear":
            # softmax over a single visible token is 1, so attention = W_o · W_v · x (+ biases).
            wv = _expand_v(a.v_proj.weight, h, pkv, hd)
            out["self_attn.linear_attn.weight"] = a.o_proj.weight @ wv
            if cfg.attention_bias:
                bv = _expand_v(a.v_proj.bias, h, pkv, hd)
                out["self_attn.linear_attn.bias"] = a.o_proj.weight @ bv + a.o_proj.bias
            return out
        pool = _kv_pool_matrix(h, pkv, v.kv_heads).to(a.k_proj.weight.dtype)
        for name in ("q_proj", "o_proj"):
            for t in ("weight", "bias"):
                p = getattr(getattr(a, name), t)
                if p is not None:
                    out[f"self_attn.{name}.{t}"] = p.clone()
        for name in ("k_proj", "v_proj"):
            for t in ("weight", "bias"):
                p = getattr(getattr(a, name), t)
                if p is not None:
                    heads = p.view(pkv, hd, -1)
                    pooled = torch.einsum("cp,pdx->cdx", pool, heads)
                    out[f"self_attn.{name}.{t}"] = pooled.reshape(v.kv_heads * hd, *p.shape[1:])
        return out
    # FFN
    if cfg.ffn_kind(layer) != "swiglu":
        raise VariantError(f"Layer {layer} of the parent has no SwiGLU FFN to initialise {v.name} from.")
    m = pl.mlp
    out["post_attention_layernorm.weight"] = pl.post_attention_layernorm.weight.clone()
    if v.op == "linear":
        out["mlp.linear_mlp.weight"] = m.down_proj.weight @ m.up_proj.weight
        if cfg.mlp_bias:
            out["mlp.linear_mlp.bias"] = m.down_proj.weight @ m.up_proj.bias + m.down_proj.bias
        return out
    width = v.width(cfg, layer)
    if channel_scores is not None and layer in channel_scores:
        scores = channel_scores[layer]
    else:
        if width < cfg.ffn_width(layer):
            warnings.warn(
                f"Layer {layer} {v.name}: no calibration activations given, pruning FFN channels by "
                "weight norms instead of channel contribution (pass channel_scores from ffn_channel_scores).",
                stacklevel=2,
            )
        scores = _weight_norm_scores(m)
    keep = torch.topk(scores, width).indices.sort().values  # sorted: keeps the parent's channel order
    out["mlp.gate_proj.weight"] = m.gate_proj.weight[keep].clone()
    out["mlp.up_proj.weight"] = m.up_proj.weight[keep].clone()
    out["mlp.down_proj.weight"] = m.down_proj.weight[:, keep].clone()
    if cfg.mlp_bias:
        out["mlp.gate_proj.bias"] = m.gate_proj.bias[keep].clone()
        out["mlp.up_proj.bias"] = m.up_proj.bias[keep].clone()
        out["mlp.down_proj.bias"] = m.down_proj.bias.clone()
    return out


def choices_to_block_configs(parent: PuzzleConfig, choices: list[tuple[Variant, Variant]]) -> list[dict]:
    """Per-layer (attention, FFN) variants → DeciLM ``block_configs``."""
    if len(choices) != parent.num_hidden_layers:
        raise VariantError(f"A child needs one (attention, ffn) choice per layer: got {len(choices)}, "
                           f"the parent has {parent.num_hidden_layers} layers.")
    return [{"attention": a.block_config(parent, i), "ffn": f.block_config(parent, i)}
            for i, (a, f) in enumerate(choices)]


@torch.no_grad()
def build_child(parent: PuzzleForCausalLM, choices: list[tuple[Variant | str, Variant | str]],
                channel_scores: dict[int, torch.Tensor] | None = None,
                blocks: dict[tuple[int, str], dict[str, torch.Tensor]] | None = None) -> PuzzleForCausalLM:
    """Assemble a child: layer ``i`` uses ``choices[i] = (attn_variant, ffn_variant)``.

    Each block's weights come from ``blocks[(i, variant_name)]`` when given (e.g. BLD-trained
    blocks from the library) and are otherwise initialised from the parent. Embeddings, final
    norm and LM head are the parent's.
    """
    cfg = parent.config
    choices = [(parse_variant(a, cfg) if isinstance(a, str) else a, parse_variant(f, cfg) if isinstance(f, str) else f)
               for a, f in choices]
    for i, (a, f) in enumerate(choices):
        if a.kind != "attn" or f.kind != "ffn":
            raise VariantError(f"Layer {i}: choices must be (attention, ffn) pairs, got ({a.name}, {f.name}).")
    child = PuzzleForCausalLM(child_config(cfg, choices_to_block_configs(cfg, choices)))
    child = child.to(next(parent.parameters()).dtype)
    state = {k: v for k, v in parent.state_dict().items() if not k.startswith("model.layers.")}
    for i, pair in enumerate(choices):
        for v in pair:
            w = (blocks or {}).get((i, v.name))
            if w is None:
                w = init_variant(parent, i, v, channel_scores)
            state.update({f"model.layers.{i}.{k}": t for k, t in w.items()})
    load_weights(child, state, VariantError, "Block weights do not fit the child")
    return child.eval()
