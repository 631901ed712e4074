"""A pre-norm decoder (LLaMA, Mistral, Qwen2, OPT) whose layers keep their own heads, head widths and MLP sizes.

Self-contained (torch and transformers only): the exporter copies this file next to every non-uniform
checkpoint, so `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works without
searchllm. searchllm's search builds its sliced blocks from the same classes, so what the search scores
is what the export runs.

Attention of a layer is described by `kv_pairs`: for each original KV head, the rotary pairs it keeps
(pair d is dims (d, d + head_dim/2) of the original head; an empty list drops the head and its query
heads). A kept head's dims are stored as [first halves..., second halves...], so rotating with the
original cos/sin of the kept frequencies equals rotating the full head and dropping dims. Query heads
share their KV head's dims (GQA); `layer_q_heads` may keep fewer query heads per KV head (whole query heads
pruned inside their group; unequal groups are allowed). The scale stays 1/sqrt(original head_dim). Heads of one layer that keep
different widths are zero-padded to the widest at run time only: weights hold exactly the kept rows and
columns, so parameter counts are exact; the padding costs attention FLOPs, not parameters.

Family differences are config fields, not classes: RMSNorm or LayerNorm (`norm`), rotary or learned
positions (`positions`, OPT's table offset by `position_offset`), a gated (SwiGLU) or plain MLP
(`gated_mlp`), and per-layer sliding-window attention (`sliding_window` with `layer_types`). Without
rotary positions a "pair" is just two dims of a head that are kept or dropped together.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import GenerationMixin, LlamaConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

Recorder = Optional[Callable[[str, torch.Tensor], None]]
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

    def __post_init__(self, **kwargs):
        # Always a list: generate() with a static cache builds one mask per layer type from it.
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * len(self.layer_kv_pairs or [])
        super().__post_init__(**kwargs)

    def layer_window(self, layer: int) -> int | None:
        if self.sliding_window is None or not self.layer_types:
            return None
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same arithmetic as LlamaRMSNorm (fp32 statistics, cast back before the weight).
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm without a bias, LayerNorm with one."""
    if bias is None:
        return rms_norm(x, weight, eps)
    return F.layer_norm(x, weight.shape, weight, bias, eps)


class Norm(nn.Module):
    def __init__(self, size: int, eps: float, kind: str = "rms", device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(size, device=device, dtype=dtype)) if kind == "layer" else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm(x, self.weight, self.bias, self.eps)


def window_mask(t: int, kv: int, window: int, device) -> torch.Tensor:
    """Boolean (t, kv) mask of the last t queries: causal, and each sees at most `window` keys back."""
    q = torch.arange(kv - t, kv, device=device)[:, None]
    k = torch.arange(kv, device=device)[None]
    return (k <= q) & (k > q - window)


def kv_dims(pairs: list[int] | tuple[int, ...], head_dim: int) -> list[int]:
    return list(pairs) + [p + head_dim // 2 for p in pairs]


class SlicedAttention(nn.Module):
    def __init__(self, hidden: int, kv_pairs, head_dim: int, group: int, scale: float, qkv_bias: bool, o_bias: bool,
                 device=None, dtype=None, buffer_device=None, rope: bool = True, window: int | None = None,
                 q_counts: list[int] | None = None) -> None:
        super().__init__()
        self.rope, self.window = rope, window
        # Query heads kept per original KV head (`q_counts`, default the whole group): a KV head whose
        # group keeps none is gone. Equal counts are a standard GQA layer; unequal ones repeat each KV head
        # for its own query heads (exact, at the cost of repeated K/V in the attention product).
        counts = list(q_counts) if q_counts is not None else [group] * len(kv_pairs)
        kept = [h for h, p in enumerate(kv_pairs) if len(p) and counts[h]]
        widths = [2 * len(kv_pairs[h]) for h in kept]
        self.counts = [counts[h] for h in kept]
        self.n_kv, self.scale = len(kept), scale
        self.equal = len(set(self.counts)) <= 1
        self.rep = self.counts[0] if self.counts and self.equal else 1
        self.n_q = sum(self.counts)
        self.width = max(widths, default=0)
        self.uniform = len(set(widths)) <= 1
        q_dim, kv_dim = sum(w * c for w, c in zip(widths, self.counts)), sum(widths)
        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden, q_dim, bias=qkv_bias, **kw)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=qkv_bias, **kw)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=qkv_bias, **kw)
        self.o_proj = nn.Linear(q_dim, hidden, bias=o_bias and q_dim > 0, **kw)
        self.kv_pairs, self.head_dim = [list(kv_pairs[h]) for h in kept], head_dim
        dev = buffer_device if buffer_device is not None else (None if str(device) == "meta" else device)
        for name, value in self.layout().items():
            self.register_buffer(name, value.to(dev), persistent=False)

    def layout(self) -> dict[str, torch.Tensor]:
        """Index buffers: the original frequency of every (padded) dim per kept KV head, where kept dims
        sit in the padded head layout (padding dims carry zeros, so their frequency is arbitrary), and,
        with unequal groups, the KV head of every query head."""
        wh, half = self.width // 2, self.head_dim // 2
        freq = torch.zeros(self.n_kv, self.width, dtype=torch.long)
        pos = []
        for j, pairs in enumerate(self.kv_pairs):
            n = len(pairs)
            freq[j, :n] = torch.tensor(pairs)
            freq[j, wh : wh + n] = torch.tensor(pairs) + half
            pos.append(list(range(n)) + list(range(wh, wh + n)))
        q_kv = [j for j, c in enumerate(self.counts) for _ in range(c)]
        out = {"freq": freq}
        if not self.equal:
            out["q_kv"] = torch.tensor(q_kv, dtype=torch.long)
        if not self.uniform:
            out["kv_pos"] = torch.tensor([j * self.width + p for j, ps in enumerate(pos) for p in ps], dtype=torch.long)
            out["q_pos"] = torch.tensor([qi * self.width + p for qi, j in enumerate(q_kv) for p in pos[j]], dtype=torch.long)
        return out

    def _heads(self, x: torch.Tensor, n_heads: int, pos_name: str) -> torch.Tensor:
        b, t, _ = x.shape
        if not self.uniform:
            x = x.new_zeros(b, t, n_heads * self.width).index_copy_(-1, getattr(self, pos_name), x)
        return x.view(b, t, n_heads, self.width).transpose(1, 2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, record: Recorder = None,
                mask: torch.Tensor | None = None, cache: Cache | None = None, layer_idx: int = 0) -> torch.Tensor:
        if self.n_kv == 0:
            return torch.zeros_like(x)
        b, t, _ = x.shape
        nq = self.n_q
        q = self._heads(self.q_proj(x), nq, "q_pos")
        k = self._heads(self.k_proj(x), self.n_kv, "kv_pos")
        v = self._heads(self.v_proj(x), self.n_kv, "kv_pos")
        if self.rope:
            # cos/sin: (b, t, head_dim) of the original head -> per kept KV head (b, n_kv, t, width).
            idx = self.freq[None, :, None, :].expand(b, self.n_kv, t, self.width)
            ck = cos[:, None].expand(b, self.n_kv, t, cos.shape[-1]).gather(-1, idx)
            sk = sin[:, None].expand(b, self.n_kv, t, sin.shape[-1]).gather(-1, idx)
            if self.equal:  # query heads of a group share their KV head's frequencies: broadcast, not repeat
                qg = q.view(b, self.n_kv, self.rep, t, self.width)
                q = (qg * ck[:, :, None] + rotate_half(qg) * sk[:, :, None]).view(b, nq, t, self.width)
            else:
                cq, sq = ck.index_select(1, self.q_kv), sk.index_select(1, self.q_kv)
                q = q * cq + rotate_half(q) * sq
            k = k * ck + rotate_half(k) * sk
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
        if not self.equal:
            k, v = k.index_select(1, self.q_kv), v.index_select(1, self.q_kv)
        if mask is None and self.window is not None and k.shape[2] > self.window:
            mask = window_mask(t, k.shape[2], self.window, x.device)  # a block run alone (search, reformation)
        causal = mask is None and t > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=self.rep > 1)
        out = out.transpose(1, 2).reshape(b, t, nq * self.width)
        if not self.uniform:
            out = out.index_select(-1, self.q_pos)
        if record is not None:
            record("o", out)
        return self.o_proj(out)


class SlicedMLP(nn.Module):
    def __init__(self, hidden: int, channels: int, act: str, bias: bool, device=None, dtype=None, down_bias: bool = False,
                 gated: bool = True) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.empty = channels == 0
        self.gate_proj = nn.Linear(hidden, channels, bias=bias, **kw) if gated else None
        self.up_proj = nn.Linear(hidden, channels, bias=bias, **kw)
        self.down_proj = nn.Linear(channels, hidden, bias=(bias or down_bias) and channels > 0, **kw)
        self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor, record: Recorder = None) -> torch.Tensor:
        if self.empty:
            return torch.zeros_like(x)
        h = self.act(self.gate_proj(x)) * self.up_proj(x) if self.gate_proj is not None else self.act(self.up_proj(x))
        if record is not None:
            record("down", h)
        return self.down_proj(h)


class SlicedDecoderLayer(nn.Module):
    """A pre-norm block. `record(key, x)` sees the inputs of q/k/v ("qkv"), o ("o"), gate/up ("mlp"), down ("down")."""

    def __init__(self, config: SearchLLMConfig, kv_pairs, channels: int, device=None, dtype=None, buffer_device=None,
                 window: int | None = None, q_counts: list[int] | None = None) -> None:
        super().__init__()
        import warnings

        warnings.filterwarnings("ignore", "Initializing zero-element tensors")  # a module pruned away is an empty Linear
        c, kw = config, dict(device=device, dtype=dtype)
        self.input_layernorm = Norm(c.hidden_size, c.rms_norm_eps, c.norm, **kw)
        group = c.num_attention_heads // c.num_key_value_heads
        self.self_attn = SlicedAttention(c.hidden_size, kv_pairs, c.head_dim, group, c.head_dim**-0.5, c.qkv_bias, c.o_bias,
                                        buffer_device=buffer_device, rope=c.positions == "rope", window=window, q_counts=q_counts, **kw)
        self.post_attention_layernorm = Norm(c.hidden_size, c.rms_norm_eps, c.norm, **kw)
        self.mlp = SlicedMLP(c.hidden_size, channels, c.hidden_act, c.mlp_bias, down_bias=c.down_bias, gated=c.gated_mlp, **kw)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, record: Recorder = None,
                mask: torch.Tensor | None = None, cache: Cache | None = None, layer_idx: int = 0) -> torch.Tensor:
        h = self.input_layernorm(x)
        if record is not None:
            record("qkv", h)
        x = x + self.self_attn(h, cos, sin, record, mask, cache, layer_idx)
        h = self.post_attention_layernorm(x)
        if record is not None:
            record("mlp", h)
        return x + self.mlp(h, record)


class SearchLLMPreTrainedModel(PreTrainedModel):
    config_class = SearchLLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["SlicedDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SlicedAttention):  # index buffers are not saved: rebuild them after loading
            with torch.no_grad():
                for name, value in module.layout().items():
                    getattr(module, name).copy_(value)


class SearchLLMModel(SearchLLMPreTrainedModel):
    def __init__(self, config: SearchLLMConfig) -> None:
        super().__init__(config)
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, c.pad_token_id)
        self.layers = nn.ModuleList(
            SlicedDecoderLayer(c, p, m, window=c.layer_window(i), q_counts=c.layer_q_heads[i] if c.layer_q_heads else None)
            for i, (p, m) in enumerate(zip(c.layer_kv_pairs, c.layer_intermediate))
        )
        self.norm = Norm(c.hidden_size, c.rms_norm_eps, c.norm)
        if c.positions == "rope":
            self.rotary_emb = LlamaRotaryEmbedding(config=c)  # at the original head_dim; heads gather their pairs
        else:
            self.embed_positions = nn.Embedding(c.max_position_embeddings + c.position_offset, c.hidden_size)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, cache=None, **kwargs) -> BaseModelOutputWithPast:
        past_key_values = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
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
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h), **{CACHE_FIELD: past_key_values if use_cache else None})


class SearchLLMForCausalLM(SearchLLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SearchLLMConfig) -> None:
        super().__init__(config)
        self.model = SearchLLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, cache=None, **kwargs) -> CausalLMOutputWithPast:
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
