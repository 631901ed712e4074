"""Gemma 3 text (`gemma3_text`, and the language model of a multimodal `gemma3` checkpoint): four RMSNorms
per block (input, post-attention, pre-feedforward, post-feedforward) computing x * (1 + w), q/k norms per
head, GeGLU (gelu tanh), embeddings scaled by sqrt(hidden), attention scaled by query_pre_attn_scalar,
sliding and global layers (5:1) with their own RoPE bases, tied embeddings.

The norm offset, sandwich norms, embedding scale and second rotary base are block config fields
(blocks.BlockConfig): the blocks, the search and the export run Gemma without a class of their own.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from searchllm.models.adapters import Geometry, ModelAdapter, UnsupportedModelError
from searchllm.models.blocks import DualRope, Rope, default_inv_freq


class Gemma3Adapter(ModelAdapter):
    model_types = ("gemma3_text", "gemma3")

    def __init__(self, config) -> None:
        # A multimodal checkpoint: its text tower is searched; the vision tower stays out of the count.
        self.text = getattr(config, "text_config", None) if config.model_type == "gemma3" else config
        self.prefix = "model.language_model." if config.model_type == "gemma3" else "model."
        super().__init__(config)

    def check(self) -> None:
        c, why = self.text, []
        if c is None:
            why.append("a gemma3 config without a text_config")
        else:
            for name in ("attn_logit_softcapping", "final_logit_softcapping"):
                if getattr(c, name, None) is not None:
                    why.append(f"logit soft-capping ({name}={getattr(c, name)})")
            if getattr(c, "use_bidirectional_attention", False):
                why.append("bidirectional attention (use_bidirectional_attention=True, an embedding model)")
            other = sorted(set(getattr(c, "layer_types", None) or []) - {"sliding_attention", "full_attention"})
            if other:
                why.append(f"layer types {other} (Gemma 3 layers are sliding_attention or full_attention)")
            rope = getattr(c, "rope_parameters", None) or {}
            for kind, allowed in (("full_attention", ("default", "linear")), ("sliding_attention", ("default",))):
                if (rope.get(kind) or {}).get("rope_type", "default") not in allowed:
                    why.append(f"{rope[kind]['rope_type']} RoPE on {kind} layers")
        if why:
            raise UnsupportedModelError(
                f"this Gemma 3 variant is not supported: {'; '.join(why)}; causal Gemma 3 language models "
                "(gemma-3-270m to 27b) are"
            )

    def geometry(self) -> Geometry:
        c = self.text
        h = c.hidden_size
        return Geometry(
            num_layers=c.num_hidden_layers,
            hidden=h,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            intermediate=c.intermediate_size,
            vocab=c.vocab_size,
            qkv_bias=bool(c.attention_bias),
            o_bias=bool(c.attention_bias),
            mlp_bias=False,
            norm_params=4 * h + 2 * c.head_dim,
            outer_params=c.vocab_size * h + h,  # embeddings always tied
        )

    def block_state_keys(self, layer: int) -> dict[str, str]:
        p = f"{self.prefix}layers.{layer}."
        a = p + "self_attn."
        keys = {n: a + f"{n}_proj.weight" for n in "qkvo"}
        keys |= {n: p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
        keys |= {
            "in_norm": p + "input_layernorm.weight",
            "attn_out_norm": p + "post_attention_layernorm.weight",
            "post_norm": p + "pre_feedforward_layernorm.weight",
            "mlp_out_norm": p + "post_feedforward_layernorm.weight",
            "q_norm": a + "q_norm.weight",
            "k_norm": a + "k_norm.weight",
        }
        if self.text.attention_bias:
            keys |= {f"{n}_bias": a + f"{n}_proj.bias" for n in "qkvo"}
        return keys

    def outer_state_keys(self) -> dict[str, str]:
        embed = self.prefix + "embed_tokens.weight"
        return {"embed": embed, "norm": self.prefix + "norm.weight", "lm_head": embed}

    def family_fields(self) -> dict[str, Any]:
        c = self.text
        rope = c.rope_parameters
        return dict(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_attention_heads=c.num_attention_heads,
            hidden_act=c.hidden_activation,
            max_position_embeddings=c.max_position_embeddings,
            rms_norm_eps=c.rms_norm_eps,
            rope_parameters=dict(rope["full_attention"]),
            local_rope_theta=float(rope["sliding_attention"]["rope_theta"]),
            pad_token_id=c.pad_token_id,
            bos_token_id=c.bos_token_id,
            eos_token_id=c.eos_token_id,
            tie_word_embeddings=True,
            qk_norm=True,
            norm_offset=1.0,
            sandwich_norm=True,
            query_pre_attn_scalar=float(c.query_pre_attn_scalar),
            embed_scale=float(c.hidden_size**0.5),
            local_rope=True,
        )

    def window(self, layer: int) -> int | None:
        return int(self.text.sliding_window) if self.text.layer_types[layer] == "sliding_attention" else None

    def rotary(self) -> nn.Module:
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

        module = Gemma3RotaryEmbedding(self.text)

        def table(kind: str) -> Rope:
            if hasattr(module, f"{kind}_inv_freq"):
                return Rope(getattr(module, f"{kind}_inv_freq"), getattr(module, f"{kind}_attention_scaling"))
            # transformers builds only the tables its layer types use (all sliding, or all global); no layer
            # reads this one, which keeps the two-table layout of every Gemma 3 block.
            theta = float(self.text.rope_parameters[kind]["rope_theta"])
            return Rope(default_inv_freq(theta, self.text.head_dim), 1.0)

        return DualRope(table("full_attention"), table("sliding_attention"))

    def plain_config(self, num_layers: int, num_kv_heads: int, intermediate: int, group: int | None = None):
        """A Gemma3TextConfig (the text model alone, also from a multimodal checkpoint)."""
        from transformers import Gemma3TextConfig

        src = self.text.to_dict() | dict(
            num_hidden_layers=num_layers,
            num_attention_heads=num_kv_heads * (group or self.geometry().group_size),
            num_key_value_heads=num_kv_heads,
            intermediate_size=intermediate,
            layer_types=self.text.layer_types[:num_layers],
            model_type="gemma3_text",
        )
        return Gemma3TextConfig.from_dict(src)

    def plain_names(self, keys: dict[str, str]) -> dict[str, str]:
        return {k: n.replace(self.prefix, "model.", 1) for k, n in keys.items()}
