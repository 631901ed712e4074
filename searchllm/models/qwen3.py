"""Qwen3 (dense): LLaMA's block plus an RMSNorm over each query and key head (q_norm / k_norm, shared by all
heads) before RoPE, no q/k/v biases, GQA, tied or untied embeddings, per-layer sliding windows."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from searchllm.models.adapters import Geometry
from searchllm.models.llama import LlamaAdapter


class Qwen3Adapter(LlamaAdapter):
    model_types = ("qwen3",)

    def geometry(self) -> Geometry:
        g = super().geometry()
        return replace(g, norm_params=g.norm_params + 2 * g.head_dim)

    def block_state_keys(self, layer: int) -> dict[str, str]:
        p = f"model.layers.{layer}.self_attn."
        return super().block_state_keys(layer) | {"q_norm": p + "q_norm.weight", "k_norm": p + "k_norm.weight"}

    def family_fields(self) -> dict[str, Any]:
        return super().family_fields() | {"qk_norm": True}
