"""Physically sliced decoder blocks built from a model's original weights: compute falls with size.

A `LayerSlice` says which rotary pairs of each KV head and which MLP channels a block keeps. The block
itself is the export's `SlicedDecoderLayer` (blocks.py), so the search scores exactly the
module the exported checkpoint runs; with its rules a sliced block computes what the original block
computes with the dropped rows/columns zeroed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from searchllm.models.adapters import Geometry
from searchllm.models.blocks import BlockConfig, SlicedDecoderLayer, kv_dims

# Standard block keys (adapters.BLOCK_KEYS) -> parameter paths inside a SlicedDecoderLayer (LLaMA's names).
MODULE_PATHS = (
    {
        "q": "self_attn.q_proj.weight",
        "k": "self_attn.k_proj.weight",
        "v": "self_attn.v_proj.weight",
        "o": "self_attn.o_proj.weight",
        "gate": "mlp.gate_proj.weight",
        "up": "mlp.up_proj.weight",
        "down": "mlp.down_proj.weight",
        "in_norm": "input_layernorm.weight",
        "post_norm": "post_attention_layernorm.weight",
    }
    | {f"{k}_bias": f"self_attn.{k}_proj.bias" for k in "qkvo"}
    | {f"{k}_bias": f"mlp.{k}_proj.bias" for k in ("gate", "up", "down")}
    | {
        "in_norm_bias": "input_layernorm.bias",
        "post_norm_bias": "post_attention_layernorm.bias",
        "q_norm": "self_attn.q_norm.weight",
        "k_norm": "self_attn.k_norm.weight",
        "attn_out_norm": "attn_out_norm.weight",
        "mlp_out_norm": "mlp_out_norm.weight",
    }
)

# Modules whose *input* columns a slice removes (reformation rectifies these); the rest lose output rows.
COLUMN_SLICED = ("o", "down")


@dataclass(frozen=True)
class LayerSlice:
    kv_pairs: tuple[tuple[int, ...], ...]  # per KV head: kept rotary-pair indices (empty: head dropped)
    mlp: tuple[int, ...]  # kept intermediate channels
    active: bool = True
    # Per KV head: the kept query heads of its group (indices 0..group_size-1); None keeps them all. A KV
    # head whose group keeps no query head must have no pairs either (it is gone with its queries).
    q_heads: tuple[tuple[int, ...], ...] | None = None

    @classmethod
    def full(cls, g: Geometry) -> "LayerSlice":
        pairs = tuple(range(g.head_dim // 2))
        return cls(tuple(pairs for _ in range(g.num_kv_heads)), tuple(range(g.intermediate)))

    def kv_rows(self, g: Geometry) -> list[int]:
        """Kept rows of K/V in the original layout, in the sliced layout's order."""
        return [h * g.head_dim + d for h, p in enumerate(self.kv_pairs) for d in kv_dims(p, g.head_dim)]

    def group_heads(self, g: Geometry, h: int) -> tuple[int, ...]:
        """Kept query heads (within the group) of KV head h."""
        return tuple(range(g.group_size)) if self.q_heads is None else self.q_heads[h]

    def q_counts(self, g: Geometry) -> list[int]:
        """Kept query heads per original KV head (0 where the KV head is dropped)."""
        return [len(self.group_heads(g, h)) if p else 0 for h, p in enumerate(self.kv_pairs)]

    def q_rows(self, g: Geometry) -> list[int]:
        """Kept rows of Q (= kept input columns of O) in the original layout, in the sliced layout's order."""
        return [
            (h * g.group_size + r) * g.head_dim + d
            for h, p in enumerate(self.kv_pairs)
            for r in self.group_heads(g, h)
            for d in kv_dims(p, g.head_dim)
        ]

    def params(self, g: Geometry) -> int:
        """Parameters of this block as sliced (0 when dropped)."""
        if not self.active:
            return 0
        return int(g.layer_count(len(self.kv_rows(g)), len(self.mlp), len(self.q_rows(g))))

    def kept_inputs(self, key: str, g: Geometry) -> list[int]:
        """Kept input columns of a column-sliced module ('o' or 'down')."""
        return self.q_rows(g) if key == "o" else list(self.mlp)


def slice_weights(w: Mapping[str, torch.Tensor], s: LayerSlice, g: Geometry) -> dict[str, torch.Tensor]:
    """Standard-keyed weights of the sliced block: kept rows of q/k/v/gate/up, kept columns of o/down."""
    dev = w["q"].device
    q = torch.tensor(s.q_rows(g), dtype=torch.long, device=dev)
    kv = torch.tensor(s.kv_rows(g), dtype=torch.long, device=dev)
    mlp = torch.tensor(s.mlp, dtype=torch.long, device=dev)
    rows = {"q": q, "k": kv, "v": kv, "gate": mlp, "up": mlp}
    cols = {"o": q, "down": mlp}
    out = {}
    for key, t in w.items():
        base = key.removesuffix("_bias")
        if base in rows:
            out[key] = t.index_select(0, rows[base])
        elif key in cols:
            out[key] = t.index_select(1, cols[key])
        elif base in cols and cols[base].numel() == 0:
            continue  # an output projection with no kept inputs is gone, bias included
        else:
            out[key] = t  # norms and output biases of o/down are kept whole
    return out


def build_block(
    config: BlockConfig,
    w: Mapping[str, torch.Tensor],
    s: LayerSlice,
    g: Geometry,
    overrides: Mapping[str, torch.Tensor] | None = None,
    window: int | None = None,
) -> SlicedDecoderLayer:
    """A SlicedDecoderLayer sharing storage with `w` where it can; `overrides` replaces sliced tensors
    (reformed o/down) by standard key; `window` is the layer's sliding attention window."""
    block = SlicedDecoderLayer(
        config,
        s.kv_pairs,
        len(s.mlp),
        device="meta",
        buffer_device=w["q"].device,
        window=window,
        q_counts=None if s.q_heads is None else s.q_counts(g),
    )
    tensors = slice_weights(w, s, g) | dict(overrides or {})
    for key, t in tensors.items():
        owner, name = MODULE_PATHS[key].rsplit(".", 1)
        setattr(block.get_submodule(owner), name, nn.Parameter(t, requires_grad=False))
    return block
