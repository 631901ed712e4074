"""LLaMA 1/2/3, Mistral and Qwen2: pre-norm RMSNorm blocks, RoPE, GQA, SwiGLU MLP."""

from __future__ import annotations

from typing import Any

from torch import nn

from searchllm.models.adapters import Geometry, ModelAdapter
from searchllm.models.blocks import Rope


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

    def family_fields(self) -> dict[str, Any]:
        import dataclasses

        from transformers import LlamaConfig

        src = self.config.to_dict()
        fields = {f.name for f in dataclasses.fields(LlamaConfig)} - {
            "num_hidden_layers",
            "head_dim",
            "num_key_value_heads",
            "mlp_bias",
        }
        return {k: src[k] for k in fields if k in src}

    def window(self, layer: int) -> int | None:
        # Mistral: one window for every layer; Qwen2: per-layer types (set only with use_sliding_window).
        w = getattr(self.config, "sliding_window", None)
        types = getattr(self.config, "layer_types", None)
        if w is None or (isinstance(types, list) and types[layer] != "sliding_attention"):
            return None
        return int(w)

    def plain_config(self, num_layers: int, num_kv_heads: int, intermediate: int, group: int | None = None):
        """This family's own config for a subnet whose layers all keep the same whole heads and MLP size
        (`group` query heads per kept KV head; default all of them)."""
        g = self.geometry()
        changes = dict(
            num_hidden_layers=num_layers,
            num_attention_heads=num_kv_heads * (group or g.group_size),
            num_key_value_heads=num_kv_heads,
            intermediate_size=intermediate,
            head_dim=g.head_dim,
        )
        src = self.config.to_dict()
        if isinstance(src.get("layer_types"), list):  # per-layer lists (Qwen2) follow the kept depth
            changes["layer_types"] = src["layer_types"][:num_layers]
        src.update(changes)
        from huggingface_hub.errors import StrictDataclassError

        try:
            return type(self.config).from_dict(src)
        except StrictDataclassError:  # e.g. a head count that does not divide hidden_size: the searchllm form holds it
            return None

    def rotary(self) -> nn.Module:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        # Llama's rotary module reads only rope parameters and head_dim, which all three families share.
        # Its frequencies, once made, are all a forward needs, except for the rope types that change them
        # with the sequence length (dynamic NTK, LongRoPE): those keep the module itself.
        module = LlamaRotaryEmbedding(config=self.config)
        if "dynamic" in module.rope_type or module.rope_type == "longrope":
            return module
        return Rope(module.inv_freq, module.attention_scaling)
