"""The search space: candidates (per-block masks), their parameter counts, and the budget.

A candidate is three boolean arrays over the whole model:
  active (L,)      which blocks are kept (depth);
  attn   (L, G, U) kept attention units: with `attention=channels` G = KV heads and U = rotary pairs per
                   head (each query head uses its KV head's mask); with `attention=heads` G = 1 and U = KV
                   heads (a whole GQA group is one unit);
  mlp    (L, P)    kept MLP intermediate channels.
Each group's ratio (kept units / U) lives on a grid; counts are round(ratio * U).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from searchllm.config import ATTENTION_MODES
from searchllm.models.adapters import Geometry
from searchllm.models.sliced import LayerSlice

# Paper Table 1 (LLaMA-7B column), by target inheriting ratio: (attention min ratio, MLP min ratio,
# fraction of blocks that may be dropped). The printed 0.3 attention minimum at 70% is read as 0.7.
TABLE1 = {
    0.9: (0.9, 0.6, 0.0),
    0.8: (0.8, 0.4, 0.0),
    0.7: (0.7, 0.2, 2 / 32),
    0.6: (0.6, 0.1, 4 / 32),
    0.5: (0.6, 0.1, 4 / 32),
}


def table1_row(target: float) -> tuple[float, float, float]:
    """The row for the largest tabulated ratio <= target (its ranges reach the target); 0.5 below that."""
    at_or_below = [r for r in TABLE1 if r <= target + 1e-9]
    return TABLE1[max(at_or_below) if at_or_below else 0.5]


@dataclass(eq=False)
class Candidate:
    active: np.ndarray
    attn: np.ndarray
    mlp: np.ndarray

    def copy(self) -> "Candidate":
        return Candidate(self.active.copy(), self.attn.copy(), self.mlp.copy())

    def to_bytes(self) -> bytes:
        bits = np.concatenate([self.active.ravel(), self.attn.ravel(), self.mlp.ravel()])
        return np.packbits(bits).tobytes()

    def key(self) -> str:
        return hashlib.sha1(self.to_bytes()).hexdigest()[:16]

    @property
    def depth(self) -> int:
        return int(self.active.sum())


@dataclass(frozen=True)
class Budget:
    target: float
    tol: float
    count: str = "total"

    @property
    def low(self) -> float:
        return self.target - self.tol

    @property
    def high(self) -> float:
        return self.target + self.tol

    def contains(self, ratio: float) -> bool:
        return self.low - 1e-12 <= ratio <= self.high + 1e-12


class SearchSpace:
    def __init__(
        self,
        geometry: Geometry,
        attention: str = "channels",
        attn_range: tuple[float, float] = (0.8, 1.0),
        attn_step: float = 0.01,
        mlp_range: tuple[float, float] = (0.4, 1.0),
        mlp_step: float = 0.05,
        depth_range: tuple[int, int] | None = None,
        multiple: int = 1,
    ) -> None:
        g = self.geometry = geometry
        if attention not in ATTENTION_MODES:
            raise ValueError(f"space.attention={attention!r}; allowed: {', '.join(ATTENTION_MODES)}")
        self.attention = attention
        self.groups, self.units = (g.num_kv_heads, g.head_dim // 2) if attention == "channels" else (1, g.num_kv_heads)
        # Hardware-friendly sizes: kept MLP channels and kept dims per head in multiples of `multiple`
        # (matrix products with such sizes run on the fast GPU kernels); a rotary pair is two dims.
        self.multiple = multiple
        attn_multiple = max(1, multiple // 2) if attention == "channels" else 1
        # Counts reached by each grid ratio (with repeats, so sampling a count = sampling a grid ratio).
        self.attn_choices = _grid_counts(attn_range, attn_step, self.units, attn_multiple)
        self.mlp_choices = _grid_counts(mlp_range, mlp_step, g.intermediate, multiple)
        self.attn_counts = sorted(set(self.attn_choices.tolist()))
        self.mlp_counts = sorted(set(self.mlp_choices.tolist()))
        self.depth_range = depth_range or (g.num_layers, g.num_layers)
        self.attn_range, self.mlp_range = attn_range, mlp_range

    @classmethod
    def for_target(
        cls,
        g: Geometry,
        target: float,
        attention: str = "channels",
        attn_min: float | None = None,
        attn_max: float = 1.0,
        attn_step: float = 0.01,
        mlp_min: float | None = None,
        mlp_max: float = 1.0,
        mlp_step: float = 0.05,
        depth_min: int | None = None,
        multiple: int = 1,
    ) -> "SearchSpace":
        """The paper's Table 1 space for a target ratio; any bound given explicitly wins."""
        a, m, drop = table1_row(target)
        depth_lo = depth_min if depth_min is not None else g.num_layers - round(g.num_layers * drop)
        if not 1 <= depth_lo <= g.num_layers:
            raise BudgetError(f"space.depth_min={depth_lo} must be between 1 and the model's {g.num_layers} layers")
        return cls(
            g,
            attention,
            (attn_min if attn_min is not None else a, attn_max),
            attn_step,
            (mlp_min if mlp_min is not None else m, mlp_max),
            mlp_step,
            (depth_lo, g.num_layers),
            multiple,
        )

    # -- shapes and conversions ---------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.geometry.num_layers

    def full(self) -> Candidate:
        g = self.geometry
        return Candidate(
            np.ones(g.num_layers, bool),
            np.ones((g.num_layers, self.groups, self.units), bool),
            np.ones((g.num_layers, g.intermediate), bool),
        )

    def from_bytes(self, data: bytes) -> Candidate:
        g = self.geometry
        sizes = [g.num_layers, g.num_layers * self.groups * self.units, g.num_layers * g.intermediate]
        bits = np.unpackbits(np.frombuffer(data, np.uint8), count=sum(sizes)).astype(bool)
        a, b, c = np.split(bits, np.cumsum(sizes)[:-1])
        return Candidate(a, b.reshape(g.num_layers, self.groups, self.units), c.reshape(g.num_layers, g.intermediate))

    def kv_dims(self, cand: Candidate) -> np.ndarray:
        """(L, KV) kept dims of every KV head."""
        if self.attention == "channels":
            return 2 * cand.attn.sum(-1)
        return cand.attn[:, 0, :] * self.geometry.head_dim

    def slices(self, cand: Candidate) -> list[LayerSlice]:
        g, out = self.geometry, []
        all_pairs = tuple(range(g.head_dim // 2))
        for i in range(g.num_layers):
            if self.attention == "channels":
                pairs = tuple(tuple(np.flatnonzero(m).tolist()) for m in cand.attn[i])
            else:
                pairs = tuple(all_pairs if k else () for k in cand.attn[i, 0])
            out.append(LayerSlice(pairs, tuple(np.flatnonzero(cand.mlp[i]).tolist()), bool(cand.active[i])))
        return out

    # -- counting -----------------------------------------------------------------------------------
    def layer_params(self, cand: Candidate) -> np.ndarray:
        g = self.geometry
        per = g.layer_count(self.kv_dims(cand).sum(-1), cand.mlp.sum(-1))
        return np.where(cand.active, per, 0)

    def params(self, cand: Candidate) -> int:
        return int(self.geometry.outer_params + self.layer_params(cand).sum())

    def total(self, count: str = "total") -> int:
        """The parameters a kept ratio is relative to: the whole model, or its decoder layers."""
        g = self.geometry
        return g.num_layers * g.layer_params if count == "decoder" else g.total_params

    def ratio(self, cand: Candidate, count: str = "total") -> float:
        if count == "decoder":
            return float(self.layer_params(cand).sum() / self.total(count))
        return self.params(cand) / self.total(count)

    # -- the importance-aware initial subnet ---------------------------------------------------------
    def top(self, scores: np.ndarray, count: int) -> np.ndarray:
        """Mask keeping the `count` highest scores along the last axis (ties broken by index)."""
        order = np.argsort(-scores, axis=-1, kind="stable")[..., :count]
        mask = np.zeros(scores.shape, bool)
        np.put_along_axis(mask, order, True, axis=-1)
        return mask

    def uniform(
        self, attn_scores: np.ndarray, mlp_scores: np.ndarray, attn_count: int, mlp_count: int, depth: int
    ) -> Candidate:
        """Same counts in every block, top-scoring units kept; the last blocks dropped if depth < L."""
        active = np.arange(self.num_layers) < depth
        return Candidate(
            active, self.top(self.attn_unit_scores(attn_scores), attn_count), self.top(mlp_scores, mlp_count)
        )

    def attn_unit_scores(self, attn_scores: np.ndarray) -> np.ndarray:
        """(L, KV, pairs) per-pair scores -> (L, G, U) scores of this space's units."""
        return attn_scores if self.attention == "channels" else attn_scores.sum(-1)[:, None, :]

    def initial(self, attn_scores: np.ndarray, mlp_scores: np.ndarray, budget: Budget) -> Candidate:
        """The paper's initialisation: one inheriting ratio for every block, at the budget.

        Among grid points inside the budget, take the one whose attention and MLP ratios are closest to
        each other (the same ratio everywhere), then closest to the target. A coarse (rounded) grid can
        step over the budget band: then the first k blocks take the next larger MLP count. Full depth
        unless nothing fits, in which case blocks are dropped from the end as the official code does."""
        for depth in range(self.num_layers, self.depth_range[0] - 1, -1):
            best = self._closest_counts(budget, depth, mix=False) or self._closest_counts(budget, depth, mix=True)
            if best is not None:
                a, m_lo, m_hi, k = best
                cand = self.uniform(attn_scores, mlp_scores, a, m_lo, depth)
                if k:
                    cand.mlp[:k] = self.top(mlp_scores[:k], m_hi)
                return cand
        raise BudgetError(self.infeasible_message(budget))

    def _closest_counts(self, budget: Budget, depth: int, mix: bool) -> tuple[int, int, int, int] | None:
        """(attention count, MLP count, larger MLP count, blocks that take it) inside the budget with the
        attention and mean MLP ratios closest to each other, then closest to the target."""
        best = None
        pairs = zip(self.mlp_counts, self.mlp_counts[1:]) if mix else ((m, m) for m in self.mlp_counts)
        for m_lo, m_hi in pairs:
            for a in self.attn_counts:
                for k in range(1, depth) if mix else (0,):
                    cand = self._counts_candidate(a, m_lo, depth)
                    cand.mlp[:k, :m_hi] = True
                    r = self.ratio(cand, budget.count)
                    if budget.contains(r):
                        mean_m = (k * m_hi + (depth - k) * m_lo) / depth
                        gap = (abs(a / self.units - mean_m / self.geometry.intermediate), abs(r - budget.target))
                        if best is None or gap < best[0]:
                            best = (gap, (a, m_lo, m_hi, k))
        return None if best is None else best[1]

    def _counts_candidate(self, a: int, m: int, depth: int) -> Candidate:
        L, g = self.num_layers, self.geometry
        attn = np.zeros((L, self.groups, self.units), bool)
        attn[..., :a] = True
        mlp = np.zeros((L, g.intermediate), bool)
        mlp[:, :m] = True
        return Candidate(np.arange(L) < depth, attn, mlp)

    def bounds(self, count: str) -> tuple[float, float]:
        lo = self._counts_candidate(self.attn_counts[0], self.mlp_counts[0], self.depth_range[0])
        hi = self._counts_candidate(self.attn_counts[-1], self.mlp_counts[-1], self.depth_range[1])
        return self.ratio(lo, count), self.ratio(hi, count)

    def infeasible_message(self, budget: Budget) -> str:
        lo, hi = self.bounds(budget.count)
        return (
            f"budget.target={budget.target} (tol {budget.tol}, count={budget.count}) cannot be met: this search space "
            f"spans kept ratios {lo:.3f}..{hi:.3f} (attention {self.attn_range}, MLP {self.mlp_range}, depth "
            f"{self.depth_range}); widen space.attn_min/space.mlp_min/space.depth_min or change "
            "budget.target/budget.tol"
        )


class BudgetError(ValueError):
    pass


def _grid_counts(rng: tuple[float, float], step: float, units: int, multiple: int = 1) -> np.ndarray:
    """Kept counts of each grid ratio, rounded to a multiple (all units stay allowed)."""
    lo, hi = rng
    grid = np.arange(lo, hi + step / 2, step)
    counts = np.round(grid * units / multiple) * multiple
    return np.clip(counts, min(multiple, units), units).astype(int)
