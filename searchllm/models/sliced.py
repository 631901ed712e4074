"""Physically sliced decoder blocks: kept heads/channels only, so compute falls with size.

A `LayerSlice` says which dims of each KV head and which MLP channels a block keeps. Dims of a KV head
come as rotary pairs (d, d + head_dim/2), listed as [first halves..., second halves...], so rotating
the sliced vector with the same cos/sin entries equals rotating the full vector and dropping dims.
Query heads share their KV head's dims (GQA). The attention scale stays 1/sqrt(original head_dim).
With these rules a sliced block computes exactly what the original block computes with the dropped
rows/columns zeroed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .adapters import Geometry

Recorder = Optional[Callable[[str, torch.Tensor], None]]


@dataclass(frozen=True)
class LayerSlice:
    kv_pairs: tuple[tuple[int, ...], ...]  # per KV head: kept rotary-pair indices (empty: head dropped)
    mlp: tuple[int, ...]  # kept intermediate channels
    active: bool = True

    @classmethod
    def full(cls, g: Geometry) -> "LayerSlice":
        pairs = tuple(range(g.head_dim // 2))
        return cls(tuple(pairs for _ in range(g.num_kv_heads)), tuple(range(g.intermediate)))

    def kv_dims(self, head_dim: int) -> list[list[int]]:
        half = head_dim // 2
        return [list(p) + [i + half for i in p] for p in self.kv_pairs]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same arithmetic as LlamaRMSNorm (fp32 statistics, cast back before the weight).
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class SlicedAttention(nn.Module):
    def __init__(self, w: dict[str, torch.Tensor], kv_dims: list[list[int]], g: Geometry, scale: float):
        super().__init__()
        kept = [h for h, d in enumerate(kv_dims) if d]
        sizes = [len(kv_dims[h]) for h in kept]
        self.n_kv, self.rep, self.scale = len(kept), g.group_size, scale
        self.width = max(sizes, default=0)  # heads are padded to the widest kept head of the layer
        self.uniform = len(set(sizes)) <= 1
        dev = w["q"].device
        kv_rows = [h * g.head_dim + d for h in kept for d in kv_dims[h]]
        q_rows = [
            (h * g.group_size + r) * g.head_dim + d for h in kept for r in range(g.group_size) for d in kv_dims[h]
        ]
        qi = torch.tensor(q_rows, dtype=torch.long, device=dev)
        kvi = torch.tensor(kv_rows, dtype=torch.long, device=dev)
        self.q = _sliced_linear(w, "q", qi, rows=True)
        self.k = _sliced_linear(w, "k", kvi, rows=True)
        self.v = _sliced_linear(w, "v", kvi, rows=True)
        self.o = _sliced_linear(w, "o", qi, rows=False)
        # Frequency index of every (padded) dim per KV head; padding dims carry zeros, so any index works.
        half, wh = g.head_dim // 2, self.width // 2
        freq = torch.zeros(self.n_kv, self.width, dtype=torch.long)
        pad_pos_kv = []
        for j, h in enumerate(kept):
            n = len(kv_dims[h]) // 2
            pairs = kv_dims[h][:n]
            freq[j, :n] = torch.tensor(pairs)
            freq[j, wh : wh + n] = torch.tensor(pairs) + half
            pad_pos_kv.append(list(range(n)) + list(range(wh, wh + n)))
        self.register_buffer("freq", freq.to(dev), persistent=False)
        if not self.uniform:
            kv_pos = [j * self.width + p for j, pos in enumerate(pad_pos_kv) for p in pos]
            q_pos = [
                (j * self.rep + r) * self.width + p
                for j, pos in enumerate(pad_pos_kv)
                for r in range(self.rep)
                for p in pos
            ]
            self.register_buffer("kv_pos", torch.tensor(kv_pos, dtype=torch.long, device=dev), persistent=False)
            self.register_buffer("q_pos", torch.tensor(q_pos, dtype=torch.long, device=dev), persistent=False)

    def _heads(self, x: torch.Tensor, n_heads: int, pos_name: str) -> torch.Tensor:
        b, t, _ = x.shape
        if not self.uniform:
            pad = x.new_zeros(b, t, n_heads * self.width)
            x = pad.index_copy_(-1, getattr(self, pos_name), x)
        return x.view(b, t, n_heads, self.width).transpose(1, 2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, record: Recorder = None) -> torch.Tensor:
        if self.n_kv == 0:
            return torch.zeros_like(x)
        b, t, _ = x.shape
        nq = self.n_kv * self.rep
        q = self._heads(self.q(x), nq, "q_pos")
        k = self._heads(self.k(x), self.n_kv, "kv_pos")
        v = self._heads(self.v(x), self.n_kv, "kv_pos")
        # cos/sin: (b, t, head_dim) -> per KV head (b, n_kv, t, width), repeated for its query heads.
        ck = cos[:, None, :, :].expand(b, self.n_kv, t, cos.shape[-1]).gather(
            -1, self.freq[None, :, None, :].expand(b, self.n_kv, t, self.width)
        )
        sk = sin[:, None, :, :].expand(b, self.n_kv, t, sin.shape[-1]).gather(
            -1, self.freq[None, :, None, :].expand(b, self.n_kv, t, self.width)
        )
        cq, sq = ck.repeat_interleave(self.rep, dim=1), sk.repeat_interleave(self.rep, dim=1)
        q = q * cq + rotate_half(q) * sq
        k = k * ck + rotate_half(k) * sk
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=self.rep > 1)
        out = out.transpose(1, 2).reshape(b, t, nq * self.width)
        if not self.uniform:
            out = out.index_select(-1, self.q_pos)
        if record is not None:
            record("o", out)
        return self.o(out)


class SlicedMLP(nn.Module):
    def __init__(self, w: dict[str, torch.Tensor], mlp: tuple[int, ...], act: str):
        super().__init__()
        idx = torch.tensor(mlp, dtype=torch.long, device=w["gate"].device)
        self.empty = len(mlp) == 0
        self.gate = _sliced_linear(w, "gate", idx, rows=True)
        self.up = _sliced_linear(w, "up", idx, rows=True)
        self.down = _sliced_linear(w, "down", idx, rows=False)
        self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor, record: Recorder = None) -> torch.Tensor:
        if self.empty:
            return torch.zeros_like(x)
        h = self.act(self.gate(x)) * self.up(x)
        if record is not None:
            record("down", h)
        return self.down(h)


class SlicedBlock(nn.Module):
    """One pre-norm decoder block built from the original weights and a LayerSlice."""

    def __init__(self, w: dict[str, torch.Tensor], s: LayerSlice, g: Geometry, scale: float, eps: float, act: str):
        super().__init__()
        self.eps = eps
        self.in_norm = nn.Parameter(w["in_norm"], requires_grad=False)
        self.post_norm = nn.Parameter(w["post_norm"], requires_grad=False)
        self.attn = SlicedAttention(w, s.kv_dims(g.head_dim), g, scale)
        self.mlp = SlicedMLP(w, s.mlp, act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, record: Recorder = None) -> torch.Tensor:
        h = rms_norm(x, self.in_norm, self.eps)
        if record is not None:
            record("qkv", h)
        x = x + self.attn(h, cos, sin, record)
        h = rms_norm(x, self.post_norm, self.eps)
        if record is not None:
            record("mlp", h)
        return x + self.mlp(h, record)


def _sliced_linear(w: dict[str, torch.Tensor], name: str, idx: torch.Tensor, rows: bool) -> nn.Linear:
    weight = w[name].index_select(0 if rows else 1, idx)
    bias = w.get(f"{name}_bias")
    if bias is not None and rows:
        bias = bias.index_select(0, idx)
    if bias is not None and not rows and idx.numel() == 0:
        bias = None  # a block with no kept inputs has no output projection at all
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin
