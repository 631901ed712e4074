"""The sliced decoder block of every supported family, in torch alone.

Both the search's actors and the exported remote code (`modeling_searchllm.py`, which imports this file
beside it) build their layers from these classes, so what the search scores is what the export runs;
actors import only this and torch (transformers costs seconds per process).

Attention of a layer is described by `kv_pairs`: for each original KV head, the rotary pairs it keeps
(pair d is dims (d, d + head_dim/2) of the original head; an empty list drops the head and its query
heads). A kept head's dims are stored as [first halves..., second halves...], so rotating with the
original cos/sin of the kept frequencies equals rotating the full head and dropping dims. Query heads
share their KV head's dims (GQA); `q_counts` may keep fewer query heads per KV head (whole query heads
pruned inside their group; unequal groups are allowed). The scale stays 1/sqrt(original head_dim). Heads of one layer
that keep
different widths are zero-padded to the widest at run time only: weights hold exactly the kept rows and
columns, so parameter counts are exact; the padding costs attention FLOPs, not parameters.

Family differences are config fields, not classes: RMSNorm or LayerNorm (`norm`, Gemma's 1 + w with
`norm_offset`), rotary or learned positions (`positions`, OPT's table offset by `position_offset`), a
gated (SwiGLU/GeGLU) or plain MLP (`gated_mlp`), per-head q/k norms (`qk_norm`), norms on the attention
and MLP outputs (`sandwich_norm`), the attention and embedding scales, and per-layer sliding-window
attention with its own RoPE base (`local_rope`). Without rotary positions a "pair" is just two dims
of a head that are kept or dropped together.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from transformers.cache_utils import Cache

Recorder = Optional[Callable[[str, torch.Tensor], None]]


# Rows (decoding: a few sequences, one position each) at which a CPU computes a float32 linear layer as
# weight @ x^T: MKL then packs the activations, not the whole weight, on every call (16 rows: 30% faster;
# SmolLM2 samples 16% faster on AVX2), and every output is F.linear's to the bit: measured at 12-64 rows with
# AVX-512 and AVX2 kernels, while at 2-11 rows the two round differently. bfloat16 gained nothing measurable.
FEW_ROWS = range(12, 65)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear, with FEW_ROWS float32 rows on a CPU as weight @ x^T, made contiguous again (a transposed
    output slowed the attention after it 3x and changed its bits)."""
    rows = x.shape[:-1].numel()
    if x.device.type != "cpu" or x.dtype != torch.float32 or rows not in FEW_ROWS:
        return F.linear(x, weight, bias)
    y = (weight @ x.reshape(rows, x.shape[-1]).T).T.contiguous().reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


class Linear(nn.Linear):
    """nn.Linear computed by `linear` (its state and initialisation are nn.Linear's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


@dataclass(frozen=True)
class BlockConfig:
    """The fields of a model config (SearchLLMConfig names) that its blocks read."""

    hidden_size: int
    rms_norm_eps: float
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    down_bias: bool = False
    norm: str = "rms"
    positions: str = "rope"
    position_offset: int = 0
    gated_mlp: bool = True
    qk_norm: bool = False  # RMSNorm of each query/key head over head_dim before RoPE (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # RMSNorms scale by (offset + weight) in float32 (Gemma: 1.0)
    sandwich_norm: bool = False  # attention and MLP outputs normalized before the residual (Gemma 2/3)
    query_pre_attn_scalar: Optional[float] = None  # attention scale 1/sqrt(this); None: head_dim
    embed_scale: float = 1.0  # token embeddings are multiplied by this (Gemma: sqrt(hidden))
    local_rope: bool = False  # sliding-window layers rotate with their own base (the rope's second half)

    @classmethod
    def of(cls, config: Any) -> "BlockConfig":
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


class Rope(nn.Module):
    """Rotary cos/sin at the full head dim from fixed inverse frequencies: the arithmetic of transformers'
    LlamaRotaryEmbedding for every rope type whose frequencies do not depend on the sequence length."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.float().clone(), persistent=False)
        self.attention_scaling = attention_scaling

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


# Activations of the supported families, as transformers' ACT2FN computes them; others come from ACT2FN.
ACTIVATIONS = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
}


def activation(name: str) -> nn.Module:
    if name in ACTIVATIONS:
        return ACTIVATIONS[name]()
    from transformers.activations import ACT2FN

    return ACT2FN[name]


class DualRope(nn.Module):
    """Two rotary tables side by side, (cos, sin) of width 2 x head_dim: full-attention layers read the
    first half, sliding-window layers (whose RoPE base differs, as in Gemma 3) the second."""

    def __init__(self, full: nn.Module, local: nn.Module) -> None:
        super().__init__()
        self.full, self.local = full, local

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (c1, s1), (c2, s2) = self.full(x, position_ids), self.local(x, position_ids)
        return torch.cat((c1, c2), -1), torch.cat((s1, s2), -1)


def default_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, dim: int | None = None
) -> torch.Tensor:
    """LlamaRMSNorm's arithmetic (fp32 statistics, cast back before the weight); with an offset Gemma's
    (scale by offset + weight in fp32, then cast). `dim`: the mean's divisor, when x holds only the kept
    dims of a wider vector whose other dims are zero."""
    dtype = x.dtype
    h = x.float()
    ms = h.pow(2).mean(-1, keepdim=True) if dim is None else h.pow(2).sum(-1, keepdim=True) / dim
    h = h * torch.rsqrt(ms + eps)
    if offset:
        return (h * (offset + weight.float())).to(dtype)
    return weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, offset: float = 0.0
) -> torch.Tensor:
    """RMSNorm without a bias, LayerNorm with one."""
    if bias is None:
        return rms_norm(x, weight, eps, offset)
    return F.layer_norm(x, weight.shape, weight, bias, eps)


class Norm(nn.Module):
    def __init__(self, size: int, eps: float, kind: str = "rms", device=None, dtype=None, offset: float = 0.0) -> None:
        super().__init__()
        # Gemma's weights are stored as (scale - offset): the identity norm holds zeros.
        self.weight = nn.Parameter(torch.full((size,), 1.0 - offset, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(size, device=device, dtype=dtype)) if kind == "layer" else None
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm(x, self.weight, self.bias, self.eps, self.offset)


def window_mask(t: int, kv: int, window: int, device) -> torch.Tensor:
    """Boolean (t, kv) mask of the last t queries: causal, and each sees at most `window` keys back."""
    q = torch.arange(kv - t, kv, device=device)[:, None]
    k = torch.arange(kv, device=device)[None]
    return (k <= q) & (k > q - window)


def kv_dims(pairs: list[int] | tuple[int, ...], head_dim: int) -> list[int]:
    return list(pairs) + [p + head_dim // 2 for p in pairs]


class SlicedAttention(nn.Module):
    def __init__(
        self,
        hidden: int,
        kv_pairs,
        head_dim: int,
        group: int,
        scale: float,
        qkv_bias: bool,
        o_bias: bool,
        device=None,
        dtype=None,
        buffer_device=None,
        rope: bool = True,
        window: int | None = None,
        q_counts: list[int] | None = None,
        qk_norm: tuple[float, float] | None = None,
        rope_offset: int = 0,
    ) -> None:
        super().__init__()
        self.rope, self.window, self.rope_offset = rope, window, rope_offset
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
        self.q_proj = Linear(hidden, q_dim, bias=qkv_bias, **kw)
        self.k_proj = Linear(hidden, kv_dim, bias=qkv_bias, **kw)
        self.v_proj = Linear(hidden, kv_dim, bias=qkv_bias, **kw)
        self.o_proj = Linear(q_dim, hidden, bias=o_bias and q_dim > 0, **kw)
        self.kv_pairs, self.head_dim = [list(kv_pairs[h]) for h in kept], head_dim
        # (eps, offset) of the per-head q/k RMSNorms. Their weights stay whole (head_dim): kept dims gather
        # theirs by `freq`, and the mean divides by head_dim, so a head that keeps some pairs computes what
        # the whole head computes with the other dims zeroed.
        self.q_norm = self.k_norm = None
        if qk_norm is not None:
            self.q_norm = Norm(head_dim, qk_norm[0], offset=qk_norm[1], **kw)
            self.k_norm = Norm(head_dim, qk_norm[0], offset=qk_norm[1], **kw)
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
            out["q_pos"] = torch.tensor(
                [qi * self.width + p for qi, j in enumerate(q_kv) for p in pos[j]], dtype=torch.long
            )
        return out

    def _heads(self, x: torch.Tensor, n_heads: int, pos_name: str) -> torch.Tensor:
        b, t, _ = x.shape
        if not self.uniform:
            x = x.new_zeros(b, t, n_heads * self.width).index_copy_(-1, getattr(self, pos_name), x)
        return x.view(b, t, n_heads, self.width).transpose(1, 2)

    def _head_norm(self, x: torch.Tensor, n: Norm, queries: bool) -> torch.Tensor:
        """(b, heads, t, width) -> each head RMS-normalized as its whole original head would be."""
        w = n.weight[self.freq]  # (n_kv, width): padding dims read dim 0's weight but hold zeros
        if queries:
            w = w.repeat_interleave(self.rep, 0) if self.equal else w.index_select(0, self.q_kv)
        return rms_norm(x, w[None, :, None, :], n.eps, n.offset, self.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        record: Recorder = None,
        mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        if self.n_kv == 0:
            return torch.zeros_like(x)
        b, t, _ = x.shape
        nq = self.n_q
        q = self._heads(self.q_proj(x), nq, "q_pos")
        k = self._heads(self.k_proj(x), self.n_kv, "kv_pos")
        v = self._heads(self.v_proj(x), self.n_kv, "kv_pos")
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self._head_norm(q, self.q_norm, True), self._head_norm(k, self.k_norm, False)
        if self.rope:
            # cos/sin: (b, t, head_dim) of the original head -> per kept KV head (b, n_kv, t, width).
            freq = self.freq + self.rope_offset if self.rope_offset else self.freq
            idx = freq[None, :, None, :].expand(b, self.n_kv, t, self.width)
            ck = cos[:, None].expand(b, self.n_kv, t, cos.shape[-1]).gather(-1, idx)
            sk = sin[:, None].expand(b, self.n_kv, t, sin.shape[-1]).gather(-1, idx)
            if self.equal:  # query heads of a group share their KV head's frequencies: broadcast, not repeat
                qg = q.view(b, self.n_kv, self.rep, t, self.width)
                q = (qg * ck[:, :, None] + rotate_half(qg) * sk[:, :, None]).view(b, nq, t, self.width)
            else:
                cq, sq = ck.index_select(1, self.q_kv), sk.index_select(1, self.q_kv)
                q = q * cq + rotate_half(q) * sq
            k = k * ck + rotate_half(k) * sk
        dtype = q.dtype
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
            q = q.to(k.dtype)
        if not self.equal:
            k, v = k.index_select(1, self.q_kv), v.index_select(1, self.q_kv)
        if mask is None and self.window is not None and k.shape[2] > self.window:
            mask = window_mask(t, k.shape[2], self.window, x.device)  # a block run alone (search, reformation)
        causal = mask is None and t > 1
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=self.rep > 1
        )
        out = out.transpose(1, 2).reshape(b, t, nq * self.width).to(dtype)
        if not self.uniform:
            out = out.index_select(-1, self.q_pos)
        if record is not None:
            record("o", out)
        return self.o_proj(out)


class SlicedMLP(nn.Module):
    def __init__(
        self,
        hidden: int,
        channels: int,
        act: str,
        bias: bool,
        device=None,
        dtype=None,
        down_bias: bool = False,
        gated: bool = True,
    ) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.empty = channels == 0
        self.gate_proj = Linear(hidden, channels, bias=bias, **kw) if gated else None
        self.up_proj = Linear(hidden, channels, bias=bias, **kw)
        self.down_proj = Linear(channels, hidden, bias=(bias or down_bias) and channels > 0, **kw)
        self.act = activation(act)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The input of down_proj."""
        return (
            self.act(self.gate_proj(x)) * self.up_proj(x) if self.gate_proj is not None else self.act(self.up_proj(x))
        )

    def forward(self, x: torch.Tensor, record: Recorder = None) -> torch.Tensor:
        if self.empty:
            return torch.zeros_like(x)
        h = self.features(x)
        if record is not None:
            record("down", h)
        return self.down_proj(h)


class SlicedDecoderLayer(nn.Module):
    """A pre-norm block. `record(key, x)` sees the inputs of q/k/v ("qkv"), o ("o"), gate/up ("mlp"), down ("down")."""

    def __init__(
        self,
        config: "BlockConfig",
        kv_pairs,
        channels: int,
        device=None,
        dtype=None,
        buffer_device=None,
        window: int | None = None,
        q_counts: list[int] | None = None,
    ) -> None:
        super().__init__()
        import warnings

        warnings.filterwarnings(
            "ignore", "Initializing zero-element tensors"
        )  # a module pruned away is an empty Linear
        c, kw = config, dict(device=device, dtype=dtype)
        norm_kw = dict(kind=c.norm, offset=c.norm_offset, **kw)
        self.input_layernorm = Norm(c.hidden_size, c.rms_norm_eps, **norm_kw)
        group = c.num_attention_heads // c.num_key_value_heads
        self.self_attn = SlicedAttention(
            c.hidden_size,
            kv_pairs,
            c.head_dim,
            group,
            (c.query_pre_attn_scalar or c.head_dim) ** -0.5,
            c.qkv_bias,
            c.o_bias,
            buffer_device=buffer_device,
            rope=c.positions == "rope",
            window=window,
            q_counts=q_counts,
            qk_norm=(c.rms_norm_eps, c.norm_offset) if c.qk_norm else None,
            rope_offset=c.head_dim if c.local_rope and window is not None else 0,
            **kw,
        )
        # The norm before the MLP (LLaMA's name for it); with sandwich norms also one on each output.
        self.post_attention_layernorm = Norm(c.hidden_size, c.rms_norm_eps, **norm_kw)
        self.attn_out_norm = Norm(c.hidden_size, c.rms_norm_eps, **norm_kw) if c.sandwich_norm else None
        self.mlp_out_norm = Norm(c.hidden_size, c.rms_norm_eps, **norm_kw) if c.sandwich_norm else None
        self.mlp = SlicedMLP(
            c.hidden_size, channels, c.hidden_act, c.mlp_bias, down_bias=c.down_bias, gated=c.gated_mlp, **kw
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        record: Recorder = None,
        mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        h = self.input_layernorm(x)
        if record is not None:
            record("qkv", h)
        x = self.attn_residual(x, self.self_attn(h, cos, sin, record, mask, cache, layer_idx))
        h = self.post_attention_layernorm(x)
        if record is not None:
            record("mlp", h)
        return self.mlp_residual(x, self.mlp(h, record))

    def attn_residual(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """The stream after the attention, given its o_proj output."""
        return x + (attn_out if self.attn_out_norm is None else self.attn_out_norm(attn_out))

    def mlp_residual(self, x: torch.Tensor, mlp_out: torch.Tensor) -> torch.Tensor:
        """The stream after the MLP, given its down_proj output."""
        return x + (mlp_out if self.mlp_out_norm is None else self.mlp_out_norm(mlp_out))
