"""OPT (the paper's second family): pre-norm LayerNorm blocks with biases everywhere, learned positions,
multi-head attention (no GQA, no RoPE), and a plain ReLU MLP (fc1 -> act -> fc2).

In searchllm's standard keys fc1 is "up" (no "gate") and fc2 is "down". The searched unit of attention
is a pair of dims of a head (dims d and d + head_dim/2), as for the rotary families, so one search
space serves all of them.
"""

from __future__ import annotations

from typing import Any

from searchllm.models.adapters import Geometry, ModelAdapter, UnsupportedModelError

# OPT's LayerNorm is torch's default (eps 1e-5); its config does not store it.
LAYER_NORM_EPS = 1e-5


class OPTAdapter(ModelAdapter):
    model_types = ("opt",)

    def check(self) -> None:
        c = self.config
        why = []
        if not getattr(c, "do_layer_norm_before", True):
            why.append("post-norm blocks (do_layer_norm_before=False, as in opt-350m)")
        if getattr(c, "word_embed_proj_dim", c.hidden_size) not in (None, c.hidden_size):
            why.append(
                f"projected embeddings (word_embed_proj_dim={c.word_embed_proj_dim} != hidden_size={c.hidden_size})"
            )
        if getattr(c, "_remove_final_layer_norm", False):
            why.append("no final layer norm (_remove_final_layer_norm=True)")
        if not getattr(c, "layer_norm_elementwise_affine", True):
            why.append("layer norms without weights (layer_norm_elementwise_affine=False)")
        if why:
            raise UnsupportedModelError(
                f"this OPT variant is not supported: {'; '.join(why)}; the pre-norm OPT models "
                "(opt-125m, opt-1.3b and larger) are"
            )

    def geometry(self) -> Geometry:
        c = self.config
        h, bias = c.hidden_size, bool(getattr(c, "enable_bias", True))
        tied = bool(getattr(c, "tie_word_embeddings", True))
        positions = (c.max_position_embeddings + 2) * h
        return Geometry(
            num_layers=c.num_hidden_layers,
            hidden=h,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_attention_heads,
            head_dim=h // c.num_attention_heads,
            intermediate=c.ffn_dim,
            vocab=c.vocab_size,
            qkv_bias=bias,
            o_bias=bias,
            mlp_bias=bias,
            norm_params=4 * h,  # two LayerNorms, weight and bias
            outer_params=c.vocab_size * h * (1 if tied else 2) + positions + 2 * h,
            gated_mlp=False,
        )

    def block_state_keys(self, layer: int) -> dict[str, str]:
        p = f"model.decoder.layers.{layer}."
        keys = {
            "q": p + "self_attn.q_proj.weight",
            "k": p + "self_attn.k_proj.weight",
            "v": p + "self_attn.v_proj.weight",
            "o": p + "self_attn.out_proj.weight",
            "up": p + "fc1.weight",
            "down": p + "fc2.weight",
            "in_norm": p + "self_attn_layer_norm.weight",
            "in_norm_bias": p + "self_attn_layer_norm.bias",
            "post_norm": p + "final_layer_norm.weight",
            "post_norm_bias": p + "final_layer_norm.bias",
        }
        if self.geometry().qkv_bias:
            keys |= {f"{n}_bias": p + f"self_attn.{n}_proj.bias" for n in "qkv"}
            keys |= {"o_bias": p + "self_attn.out_proj.bias", "up_bias": p + "fc1.bias", "down_bias": p + "fc2.bias"}
        return keys

    def outer_state_keys(self) -> dict[str, str]:
        tied = bool(getattr(self.config, "tie_word_embeddings", True))
        return {
            "embed": "model.decoder.embed_tokens.weight",
            "positions": "model.decoder.embed_positions.weight",
            "norm": "model.decoder.final_layer_norm.weight",
            "norm_bias": "model.decoder.final_layer_norm.bias",
            "lm_head": "model.decoder.embed_tokens.weight" if tied else "lm_head.weight",
        }

    def family_fields(self) -> dict[str, Any]:
        c = self.config
        return dict(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.ffn_dim,
            num_attention_heads=c.num_attention_heads,
            hidden_act=c.activation_function,
            max_position_embeddings=c.max_position_embeddings,
            rms_norm_eps=LAYER_NORM_EPS,
            pad_token_id=c.pad_token_id,
            bos_token_id=c.bos_token_id,
            eos_token_id=c.eos_token_id,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
            norm="layer",
            positions="learned",
            position_offset=2,
        )

    def plain_config(self, num_layers: int, num_kv_heads: int, intermediate: int, group: int | None = None):
        # OPT ties the attention width to hidden_size: only subnets keeping every head fit OPTConfig.
        if num_kv_heads != self.config.num_attention_heads or group not in (None, 1):
            return None
        src = self.config.to_dict() | {"num_hidden_layers": num_layers, "ffn_dim": intermediate}
        return type(self.config).from_dict(src)
