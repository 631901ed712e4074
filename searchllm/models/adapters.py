"""Per-family knowledge: where a model keeps its blocks, heads and channels.

Everything downstream (scores, search, shards, reformation, export) talks to a `ModelAdapter` and a
`Geometry`, never to a family's module names. A new family is one subclass registered for its
`config.model_type` values.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class Geometry:
    """Shapes of a decoder-only transformer, as far as the search space cares."""

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    norm_params: int  # per decoder layer (both norms)
    outer_params: int  # embeddings, final norm and LM head (counted once when tied)

    def new_biases(self, keys) -> set[str]:
        """Of the o/down bias keys given, those this family has no tensor for (added by compensation)."""
        have = {"o_bias": self.o_bias, "down_bias": self.mlp_bias}
        return {k for k in keys if k in have and not have[k]}

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def layer_params(self) -> int:
        return int(self.layer_count(self.num_kv_heads * self.head_dim, self.intermediate))

    @property
    def total_params(self) -> int:
        return self.outer_params + self.num_layers * self.layer_params

    def layer_count(self, kv: Any, mlp: Any) -> Any:
        """Parameters of a block keeping `kv` dims summed over its KV heads and `mlp` MLP channels.

        Works elementwise on numpy arrays, so whole populations are counted at once."""
        q = kv * self.group_size
        h = self.hidden
        n = h * (q + 2 * kv) + q * h + 3 * h * mlp + self.norm_params
        if self.qkv_bias:
            n = n + q + 2 * kv
        if self.o_bias:
            n = n + h * (q > 0)
        if self.mlp_bias:
            n = n + 2 * mlp + h * (mlp > 0)
        return n


# Standard names a block's tensors are exposed under, whatever the family calls them.
BLOCK_KEYS = ("q", "k", "v", "o", "gate", "up", "down", "in_norm", "post_norm")


class ModelAdapter(ABC):
    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config) -> None:
        self.config = config

    @abstractmethod
    def geometry(self) -> Geometry: ...

    @abstractmethod
    def block_state_keys(self, layer: int) -> dict[str, str]:
        """Map from standard block keys (BLOCK_KEYS, plus '<key>_bias') to state-dict names."""

    @abstractmethod
    def outer_state_keys(self) -> dict[str, str]:
        """Map from 'embed', 'norm', 'lm_head' to state-dict names ('lm_head' may equal 'embed')."""

    @abstractmethod
    def rotary(self) -> nn.Module:
        """Module with forward(x, position_ids) -> (cos, sin) at the full head dim."""

    @property
    def attention_scale(self) -> float:
        return self.geometry().head_dim ** -0.5

    @property
    def norm_eps(self) -> float:
        return float(self.config.rms_norm_eps)

    @property
    def hidden_act(self) -> str:
        return self.config.hidden_act


class LlamaAdapter(ModelAdapter):
    """LLaMA 1/2/3, Mistral and Qwen2: pre-norm RMSNorm blocks, RoPE, GQA, SwiGLU MLP."""

    model_types = ("llama", "mistral", "qwen2")

    def geometry(self) -> Geometry:
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        tied = bool(getattr(c, "tie_word_embeddings", False))
        embed = c.vocab_size * c.hidden_size
        qkv_bias = bool(getattr(c, "attention_bias", False)) or c.model_type == "qwen2"
        return Geometry(
            num_layers=c.num_hidden_layers,
            hidden=c.hidden_size,
            num_heads=c.num_attention_heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            intermediate=c.intermediate_size,
            vocab=c.vocab_size,
            qkv_bias=qkv_bias,
            o_bias=bool(getattr(c, "attention_bias", False)),
            mlp_bias=bool(getattr(c, "mlp_bias", False)),
            norm_params=2 * c.hidden_size,
            outer_params=embed * (1 if tied else 2) + c.hidden_size,
        )

    def block_state_keys(self, layer: int) -> dict[str, str]:
        p = f"model.layers.{layer}."
        keys = {
            "q": p + "self_attn.q_proj.weight",
            "k": p + "self_attn.k_proj.weight",
            "v": p + "self_attn.v_proj.weight",
            "o": p + "self_attn.o_proj.weight",
            "gate": p + "mlp.gate_proj.weight",
            "up": p + "mlp.up_proj.weight",
            "down": p + "mlp.down_proj.weight",
            "in_norm": p + "input_layernorm.weight",
            "post_norm": p + "post_attention_layernorm.weight",
        }
        g = self.geometry()
        if g.qkv_bias:
            keys |= {f"{n}_bias": p + f"self_attn.{n}_proj.bias" for n in "qkv"}
        if g.o_bias:
            keys["o_bias"] = p + "self_attn.o_proj.bias"
        if g.mlp_bias:
            keys |= {f"{n}_bias": p + f"mlp.{n}_proj.bias" for n in ("gate", "up", "down")}
        return keys

    def outer_state_keys(self) -> dict[str, str]:
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        return {
            "embed": "model.embed_tokens.weight",
            "norm": "model.norm.weight",
            "lm_head": "model.embed_tokens.weight" if tied else "lm_head.weight",
        }

    def sliced_config(self, layer_kv_pairs: list | None = None, layer_intermediate: list | None = None):
        """The export's SearchLLMConfig: this model's LlamaConfig fields plus each kept layer's structure."""
        import dataclasses

        from transformers import LlamaConfig

        from .modeling_searchllm import SearchLLMConfig

        g, src = self.geometry(), self.config.to_dict()
        fields = {f.name for f in dataclasses.fields(LlamaConfig)} - {"num_hidden_layers", "head_dim", "num_key_value_heads", "mlp_bias"}
        kw = {k: src[k] for k in fields if k in src}
        return SearchLLMConfig(
            **kw,
            head_dim=g.head_dim,
            num_key_value_heads=g.num_kv_heads,
            num_hidden_layers=len(layer_kv_pairs or []),
            layer_kv_pairs=layer_kv_pairs or [],
            layer_intermediate=layer_intermediate or [],
            qkv_bias=g.qkv_bias,
            o_bias=g.o_bias,
            mlp_bias=g.mlp_bias,
            source_model_type=self.config.model_type,
        )

    def plain_config(self, num_layers: int, num_kv_heads: int, intermediate: int):
        """This family's own config for a subnet whose layers all keep the same whole heads and MLP size."""
        g = self.geometry()
        changes = dict(
            num_hidden_layers=num_layers,
            num_attention_heads=num_kv_heads * g.group_size,
            num_key_value_heads=num_kv_heads,
            intermediate_size=intermediate,
            head_dim=g.head_dim,
        )
        src = self.config.to_dict()
        if isinstance(src.get("layer_types"), list):  # per-layer lists (Qwen2) follow the kept depth
            changes["layer_types"] = src["layer_types"][:num_layers]
        src.update(changes)
        return type(self.config).from_dict(src)

    def rotary(self) -> nn.Module:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        # Llama's rotary module reads only rope parameters and head_dim, which all three families share.
        return LlamaRotaryEmbedding(config=self.config)


ADAPTERS: tuple[type[ModelAdapter], ...] = (LlamaAdapter,)


def adapter_for(config) -> ModelAdapter:
    model_type = getattr(config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(config)
    supported = sorted(t for cls in ADAPTERS for t in cls.model_types)
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported; supported model types: {', '.join(supported)}"
    )
