"""A decoder (LLaMA, Mistral, Qwen2, Qwen3, Gemma 3, OPT) whose layers keep their own heads, head widths and MLP sizes.

Remote code (torch and transformers only): the exporter copies this file and `blocks.py`, the sliced
decoder block it imports, next to every non-uniform checkpoint, so
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works without searchllm. searchllm's
search builds its blocks from the same `blocks.py`, so what the search scores is what the export runs.
`SearchLLMConfig` is the source model's config plus each layer's kept structure (see blocks.py).
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import GenerationMixin, LlamaConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from .blocks import (  # relative: the file ships beside exported weights
    DualRope,
    Linear,
    Norm,
    Rope,
    SlicedAttention,
    SlicedDecoderLayer,
    default_inv_freq,
)

# The model outputs' cache field: `past_key_values` up to transformers 5.23, `cache` from 5.24 (which
# generate() reads back and passes in as `cache=`).
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@strict
class SearchLLMConfig(LlamaConfig):
    """LlamaConfig of the source model (original head_dim, heads and rope) plus each layer's kept structure."""

    model_type = "searchllm"
    layer_kv_pairs: list | None = None  # [layer][original KV head] -> kept rotary-pair indices
    layer_intermediate: list | None = None  # [layer] -> kept MLP channels
    layer_q_heads: list | None = None  # [layer][original KV head] -> kept query heads (None: the whole group)
    qkv_bias: bool = False
    o_bias: bool = False
    down_bias: bool = False  # a down_proj bias without gate/up biases (FLAP's bias compensation)
    source_model_type: str = "llama"
    norm: str = "rms"  # rms | layer (LayerNorm with bias; rms_norm_eps is its eps)
    positions: str = "rope"  # rope | learned (a position table, `model.embed_positions`)
    position_offset: int = 0  # OPT's table starts 2 rows in
    gated_mlp: bool = True  # act(gate(x)) * up(x) -> down; False: act(up(x)) -> down (OPT's fc1/fc2)
    sliding_window: int | None = None
    layer_types: list | None = None  # [kept layer] -> "full_attention" | "sliding_attention"
    qk_norm: bool = False  # per-head q/k RMSNorm (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # RMSNorm scales by (offset + w): Gemma's 1
    sandwich_norm: bool = False  # attention/MLP outputs normalized before the residual (Gemma 3)
    query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(this); None: head_dim
    embed_scale: float = 1.0  # token embeddings times this (Gemma: sqrt(hidden_size))
    local_rope: bool = False  # sliding layers rotate with their own base, local_rope_theta
    local_rope_theta: float | None = None

    def __post_init__(self, **kwargs):
        # Always a list: generate() with a static cache builds one mask per layer type from it.
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * len(self.layer_kv_pairs or [])
        super().__post_init__(**kwargs)

    def layer_window(self, layer: int) -> int | None:
        if self.sliding_window is None or not self.layer_types:
            return None
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None


class SearchLLMPreTrainedModel(PreTrainedModel):
    config_class = SearchLLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["SlicedDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        with torch.no_grad():
            if isinstance(module, SlicedAttention):  # index buffers are not saved: rebuild them after loading
                for name, value in module.layout().items():
                    getattr(module, name).copy_(value)
            if isinstance(module, Rope):  # nor is the local rotary table
                module.inv_freq.copy_(default_inv_freq(self.config.local_rope_theta, self.config.head_dim))


class SearchLLMModel(SearchLLMPreTrainedModel):
    def __init__(self, config: SearchLLMConfig) -> None:
        super().__init__(config)
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, c.pad_token_id)
        self.layers = nn.ModuleList(
            SlicedDecoderLayer(
                c, p, m, window=c.layer_window(i), q_counts=c.layer_q_heads[i] if c.layer_q_heads else None
            )
            for i, (p, m) in enumerate(zip(c.layer_kv_pairs, c.layer_intermediate))
        )
        self.norm = Norm(c.hidden_size, c.rms_norm_eps, c.norm, offset=c.norm_offset)
        if c.positions == "rope":
            self.rotary_emb = LlamaRotaryEmbedding(config=c)  # at the original head_dim; heads gather their pairs
            if c.local_rope:
                local = Rope(default_inv_freq(c.local_rope_theta, c.head_dim), 1.0)
                self.rotary_emb = DualRope(self.rotary_emb, local)
        else:
            self.embed_positions = nn.Embedding(c.max_position_embeddings + c.position_offset, c.hidden_size)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        cache=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        past_key_values = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
            if self.config.embed_scale != 1.0:
                inputs_embeds = inputs_embeds * torch.tensor(self.config.embed_scale, dtype=inputs_embeds.dtype)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past)[None]
        # Positional: the cache argument is `past_key_values` up to transformers 5.23 and `cache` after.
        if isinstance(attention_mask, dict):  # prepared per layer type by generate() (static cache)
            masks = attention_mask
        else:
            args = (self.config, inputs_embeds, attention_mask, past_key_values, position_ids)
            masks = {"full_attention": create_causal_mask(*args)}
            if any(layer.self_attn.window is not None for layer in self.layers):
                masks["sliding_attention"] = create_sliding_window_causal_mask(*args)
        h = inputs_embeds
        if self.config.positions == "rope":
            cos, sin = self.rotary_emb(h, position_ids)
            cos, sin = cos.expand(h.shape[0], -1, -1), sin.expand(h.shape[0], -1, -1)
        else:
            h = h + self.embed_positions(position_ids + self.config.position_offset).to(h.dtype)
            cos = sin = None
        for i, layer in enumerate(self.layers):
            mask = masks["full_attention" if layer.self_attn.window is None else "sliding_attention"]
            h = layer(h, cos, sin, None, mask, past_key_values if use_cache else None, i)
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(h), **{CACHE_FIELD: past_key_values if use_cache else None}
        )


class SearchLLMForCausalLM(SearchLLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SearchLLMConfig) -> None:
        super().__init__(config)
        self.model = SearchLLMModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)  # the blocks' few-row path
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        cache=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        past_key_values = cache if cache is not None else past_key_values
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: getattr(out, CACHE_FIELD)})
