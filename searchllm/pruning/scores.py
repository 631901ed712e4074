"""Importance of attention and MLP channels (paper Eq. 1-3), from calibration Gram matrices.

Phi_ij = W_ij^2 / [(2 X X^T)^-1]_jj with X a linear layer's input on calibration tokens (damped inverse).
A channel's score sums its rows of Q/K/V (or gate/up) and its columns of O (or down): every matrix that
shares the mask. Attention is scored per rotary pair of each KV head, over all query heads of its group.

The same calibration pass also yields FLAP's statistics (An et al., AAAI 2024): the fluctuation metric
WIFV_j = Var(x_j) * ||W[:, j]||^2 of the inputs of o and down, and their means for bias compensation.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping

import numpy as np
import torch

from searchllm.models.adapters import Geometry, ModelAdapter
from searchllm.models.sliced import LayerSlice


class GramAccumulator:
    """Sums X^T X, X and the row count of recorded layer inputs, keyed by (layer, input name)."""

    def __init__(self) -> None:
        self.grams: dict[tuple[int, str], torch.Tensor] = {}
        self.sums: dict[tuple[int, str], torch.Tensor] = {}
        self.rows: dict[tuple[int, str], int] = {}

    def add(self, layer: int, key: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        k = (layer, key)
        if k in self.grams:
            self.grams[k] += x.T @ x
            self.sums[k] += x.sum(0)
            self.rows[k] += x.shape[0]
        else:
            self.grams[k], self.sums[k], self.rows[k] = x.T @ x, x.sum(0), x.shape[0]

    def gram(self, layer: int, key: str) -> torch.Tensor:
        return self.grams[(layer, key)]

    def mean(self, layer: int, key: str) -> torch.Tensor:
        return self.sums[(layer, key)] / self.rows[(layer, key)]

    def variance(self, layer: int, key: str) -> torch.Tensor:
        m = self.mean(layer, key)
        return (self.gram(layer, key).diagonal() / self.rows[(layer, key)] - m * m).clamp_min(0)


@dataclass
class LayerScores:
    attn: torch.Tensor  # (num_kv_heads, head_dim // 2): one score per rotary pair of each KV head
    mlp: torch.Tensor  # (intermediate,)
    flap_o: torch.Tensor  # (num_heads * head_dim,): WIFV of each input column of o
    flap_down: torch.Tensor  # (intermediate,): WIFV of each input column of down
    mean_o: torch.Tensor  # mean calibration input of o and down (FLAP's bias compensation)
    mean_down: torch.Tensor
    # ShortGPT's block influence: 1 - mean cosine similarity of the block's input and output hidden states.
    influence: torch.Tensor = None


@dataclass
class Scores:
    """LayerScores of every layer, stacked along a leading layer axis (what scores.npz holds)."""

    attn: np.ndarray
    mlp: np.ndarray
    flap_o: np.ndarray
    flap_down: np.ndarray
    mean_o: np.ndarray
    mean_down: np.ndarray
    influence: np.ndarray

    @classmethod
    def stack(cls, per_layer: dict[int, LayerScores]) -> "Scores":
        layers = sorted(per_layer)
        return cls(**{f.name: np.stack([getattr(per_layer[i], f.name).numpy() for i in layers]) for f in fields(cls)})


def inverse_diag(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """diag((2 (H + damp * mean(diag H) I))^-1), computed in float64 for stability."""
    h = gram.double()
    h = h + damp * h.diagonal().mean().clamp_min(1e-12) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    chol = torch.linalg.cholesky(2 * h)
    return torch.cholesky_inverse(chol).diagonal()


def layer_scores(
    w: dict[str, torch.Tensor], grams: GramAccumulator, layer: int, g: Geometry, damp: float
) -> LayerScores:
    def rows(name: str, key: str) -> torch.Tensor:
        return (w[name].double() ** 2 / inverse_diag(grams.gram(layer, key), damp)[None, :]).sum(1)

    def cols(name: str, key: str) -> torch.Tensor:
        return (w[name].double() ** 2 / inverse_diag(grams.gram(layer, key), damp)[None, :]).sum(0)

    hd, half = g.head_dim, g.head_dim // 2
    kv = (rows("k", "qkv") + rows("v", "qkv")).view(g.num_kv_heads, hd)
    q = (rows("q", "qkv") + cols("o", "o")).view(g.num_kv_heads, g.group_size, hd).sum(1)
    per_dim = kv + q
    attn = per_dim[:, :half] + per_dim[:, half:]  # a rotary pair is one unit
    mlp = sum(rows(k, "mlp") for k in ("gate", "up") if k in w) + cols("down", "down")

    def wifv(name: str, key: str) -> torch.Tensor:
        return (grams.variance(layer, key).double() * (w[name].double() ** 2).sum(0)).float().cpu()

    return LayerScores(
        attn.float().cpu(),
        mlp.float().cpu(),
        wifv("o", "o"),
        wifv("down", "down"),
        grams.mean(layer, "o").cpu(),
        grams.mean(layer, "down").cpu(),
    )


def compensation(
    w: Mapping[str, torch.Tensor], s: LayerSlice, g: Geometry, mean_o: np.ndarray, mean_down: np.ndarray
) -> dict[str, torch.Tensor]:
    """FLAP's bias compensation of one block: {"o_bias", "down_bias"} = the existing bias (if any) plus
    W[:, pruned] @ mean(x[pruned]), the pruned input channels' mean contribution on calibration data."""
    biases = {}
    for key, kept, mean in (("o", s.q_rows(g), mean_o), ("down", list(s.mlp), mean_down)):
        W = w[key]
        pruned = np.setdiff1d(np.arange(W.shape[1]), kept)
        m = torch.as_tensor(np.asarray(mean)[pruned], dtype=torch.float64, device=W.device)
        b = W[:, torch.as_tensor(pruned, dtype=torch.long, device=W.device)].double() @ m
        if f"{key}_bias" in w:
            b = b + w[f"{key}_bias"].double()
        biases[f"{key}_bias"] = b.to(W.dtype)
    return biases


def flap_biases(
    adapter: ModelAdapter, state: Mapping[str, torch.Tensor], slices: list[LayerSlice], scores: Scores
) -> dict[int, dict[str, torch.Tensor]]:
    """compensation() of every kept block, from the original state dict."""
    g = adapter.geometry()
    return {
        i: compensation(
            {k: state[n] for k, n in adapter.block_state_keys(i).items()}, s, g, scores.mean_o[i], scores.mean_down[i]
        )
        for i, s in enumerate(slices)
        if s.active
    }
