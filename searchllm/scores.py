"""Importance of attention and MLP channels (paper Eq. 1-3), from calibration Gram matrices.

Phi_ij = W_ij^2 / [(2 X X^T)^-1]_jj with X a linear layer's input on calibration tokens (damped inverse).
A channel's score sums its rows of Q/K/V (or gate/up) and its columns of O (or down): every matrix that
shares the mask. Attention is scored per rotary pair of each KV head, over all query heads of its group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .models.adapters import Geometry


class GramAccumulator:
    """Sums X^T X of recorded layer inputs, keyed by (layer, input name)."""

    def __init__(self) -> None:
        self.grams: dict[tuple[int, str], torch.Tensor] = {}

    def add(self, layer: int, key: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        g = x.T @ x
        k = (layer, key)
        if k in self.grams:
            self.grams[k] += g
        else:
            self.grams[k] = g

    def gram(self, layer: int, key: str) -> torch.Tensor:
        return self.grams[(layer, key)]


@dataclass
class LayerScores:
    attn: torch.Tensor  # (num_kv_heads, head_dim // 2): one score per rotary pair of each KV head
    mlp: torch.Tensor  # (intermediate,)


def inverse_diag(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """diag((2 (H + damp * mean(diag H) I))^-1), computed in float64 for stability."""
    h = gram.double()
    h = h + damp * h.diagonal().mean().clamp_min(1e-12) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    chol = torch.linalg.cholesky(2 * h)
    return torch.cholesky_inverse(chol).diagonal()


def layer_scores(w: dict[str, torch.Tensor], grams: GramAccumulator, layer: int, g: Geometry, damp: float) -> LayerScores:
    def rows(name: str, key: str) -> torch.Tensor:
        return (w[name].double() ** 2 / inverse_diag(grams.gram(layer, key), damp)[None, :]).sum(1)

    def cols(name: str, key: str) -> torch.Tensor:
        return (w[name].double() ** 2 / inverse_diag(grams.gram(layer, key), damp)[None, :]).sum(0)

    hd, half = g.head_dim, g.head_dim // 2
    kv = (rows("k", "qkv") + rows("v", "qkv")).view(g.num_kv_heads, hd)
    q = (rows("q", "qkv") + cols("o", "o")).view(g.num_kv_heads, g.group_size, hd).sum(1)
    per_dim = kv + q
    attn = per_dim[:, :half] + per_dim[:, half:]  # a rotary pair is one unit
    mlp = rows("gate", "mlp") + rows("up", "mlp") + cols("down", "down")
    return LayerScores(attn.float().cpu(), mlp.float().cpu())
