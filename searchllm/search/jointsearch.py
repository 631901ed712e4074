"""The joint search (budget.size): the level search's evolution over pruning levels and llama.cpp tensor
types together, under a byte budget. NumPy only; knows nothing of Ray.

A genome is pruning.joint's (L, 10) array. Its cost is its GGUF file's exact size; a candidate is in the
band when the file fits the budget (bytes left over are allowed: on a source grid, more bytes can mean
more error). A move is one gene one step: a layer's attention or MLP level up or down, or one weight's type
up to the next type its row length can hold (the token embedding's type moves in every row at once);
after 1-3 moves (min of two draws, as EvoPress) a repair steps random type genes down while the file is
too large, so a child is its parent with a few types moved up and others down to pay for them.
Crossover takes each layer from one of two parents, then repairs.
Whether pruning is worth its bytes is the fitness's answer: "keep everything" is a level like any other.
Multi-step selection, the evaluation log, checkpoints and resume are the level search's.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from searchllm.pruning.joint import EMBED, JointCosts
from searchllm.search.levelsearch import LevelSearch


class JointSearch(LevelSearch):
    def __init__(self, costs: JointCosts, band: tuple[int, int], *args: Any, **kwargs: Any) -> None:
        super().__init__(costs, costs.top, *args, **kwargs)
        self.costs, self.byte_band = costs, band

    def in_band(self, genome: np.ndarray) -> bool:
        lo, hi = self.byte_band
        return lo <= self.costs.bytes(genome) <= hi

    # -- moves ------------------------------------------------------------------------------------------
    def step_type(self, genome: np.ndarray, layer: int, col: int, up: bool) -> bool:
        """Move a type gene to the next written type with more (up) or fewer bytes; False at the end."""
        choices = self.costs.choices(layer, col, genome)
        cur = self.costs.effective_index(layer, col, genome, choices)
        nxt = cur + (1 if up else -1)
        if not 0 <= nxt < len(choices):
            return False
        if col == EMBED:
            genome[:, EMBED] = choices[nxt]
        else:
            genome[layer, col] = choices[nxt]
        return True

    def random_type_gene(self, genome: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
        L = genome.shape[0]
        if rng.random() < 1 / (L + 1):  # the embedding weighs like a layer
            return 0, EMBED
        return int(rng.integers(L)), int(rng.integers(2, EMBED))

    def move(self, genome: np.ndarray, rng: np.random.Generator) -> None:
        L = genome.shape[0]
        for _ in range(20):
            if not self.costs.lock_levels and rng.random() < 0.25:
                i, mod = int(rng.integers(L)), int(rng.integers(2))
                d = 1 if rng.random() < 0.5 else -1
                if 0 <= genome[i, mod] + d <= self.top[mod]:
                    genome[i, mod] += d
                    return
            else:  # a type one step up: the repair then steps others down to fit (EvoPress's switch)
                i, col = self.random_type_gene(genome, rng)
                if self.step_type(genome, i, col, up=True):
                    return

    def repair(self, genome: np.ndarray, rng: np.random.Generator, tries: int = 4000) -> None:
        """Random type steps down while over the budget, then up while under the band (never over)."""
        lo, hi = self.byte_band
        n = self.costs.bytes(genome)
        for _ in range(tries):
            if n <= hi:
                break
            i, col = self.random_type_gene(genome, rng)
            if self.step_type(genome, i, col, up=False):
                n = self.costs.bytes(genome)
        for _ in range(tries):
            if n >= lo or n > hi:
                break
            i, col = self.random_type_gene(genome, rng)
            trial = genome.copy()
            if self.step_type(trial, i, col, up=True):
                m = self.costs.bytes(trial)
                if m <= hi:
                    genome[:], n = trial, m

    def mutate(self, parent: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        child = parent.copy()
        for _ in range(min(int(rng.integers(1, 4)), int(rng.integers(1, 4)))):
            self.move(child, rng)
        self.repair(child, rng)
        return child

    def crossover(self, a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        take_b = np.asarray(rng.random(a.shape[0]) < 0.5)
        child = np.where(take_b[:, None], b, a).copy()
        child[:, EMBED] = (b if rng.random() < 0.5 else a)[0, EMBED]
        self.repair(child, rng)
        return child

    def reallocations(self, base, done, seen):
        return [], []  # the level search's probes move levels at equal parameters, not bytes

    def _record(self, genome, origin, generation, stage, nll, replica) -> dict[str, Any]:
        rec = super()._record(genome, origin, generation, stage, nll, replica)
        rec["bytes"] = self.costs.bytes(genome)
        return rec

    # -- starting points --------------------------------------------------------------------------------
    def allocate(self, levels: np.ndarray, embed: int, errors: dict) -> Optional[np.ndarray]:
        """`levels` with the embedding at type `embed` and every weight's type chosen as a knapsack by the
        importance-weighted quantization error (what llama.cpp's quantizer minimizes per tensor, in output
        units): each weight starts at its smallest type and moves along the lower convex hull of its
        (bytes, error) points, the step that removes the most error per byte first, while the file fits.
        `errors[(layer, col)][type index]`; None when the smallest types do not fit."""
        import heapq

        L, hi = levels.shape[0], self.byte_band[1]
        genome = np.zeros((L, EMBED + 1), dtype=np.int64)
        genome[:, :2], genome[:, EMBED] = levels, embed
        hulls: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (type index, bytes) along each hull
        for i in range(L):
            for col in range(2, EMBED):
                choices = self.costs.choices(i, col, genome)
                genome[i, col] = choices[0]
                if (i, col) in errors and len(choices) > 1:
                    hulls[(i, col)] = self._hull(genome, i, col, choices, errors[(i, col)])
                    genome[i, col] = hulls[(i, col)][0][0]  # of the smallest types, the least error
        n = self.costs.bytes(genome)
        if n > hi:
            return None
        heap: list[tuple[float, int, int, int]] = []

        def push(i: int, col: int, at: int) -> None:
            hull = hulls.get((i, col), [])
            if at + 1 < len(hull):
                a, b = hull[at], hull[at + 1]
                gain = errors[(i, col)][a[0]] - errors[(i, col)][b[0]]
                heapq.heappush(heap, (-gain / max(b[1] - a[1], 1), i, col, at + 1))

        for i, col in hulls:
            push(i, col, 0)
        while heap:
            _, i, col, at = heapq.heappop(heap)
            old = genome[i, col]
            genome[i, col] = hulls[(i, col)][at][0]
            m = self.costs.bytes(genome)
            if m > hi:
                genome[i, col] = old  # this step no longer fits; a smaller one elsewhere may
                continue
            n = m
            push(i, col, at)
        return genome

    def _hull(self, genome: np.ndarray, i: int, col: int, choices: list[int], err: dict) -> list[tuple[int, int]]:
        """[(type index, bytes)] of a weight's lower convex hull of (bytes, error), from its smallest type."""
        pts = []
        for k in choices:
            trial = genome.copy()
            trial[i, col] = k
            pts.append((k, self.costs.bytes(trial)))
        pts.sort(key=lambda p: (p[1], err[p[0]]))
        hull: list[tuple[int, int]] = []
        for k, b in pts:
            if hull and err[k] >= err[hull[-1][0]]:
                continue  # more bytes, no less error: never worth it
            while len(hull) >= 2:
                (k1, b1), (k2, b2) = hull[-2], hull[-1]
                # k2 lies above the chord from k1 to k: its slope is not steeper than the next
                if (err[k1] - err[k2]) * (b - b1) <= (err[k1] - err[k]) * (b2 - b1):
                    hull.pop()
                else:
                    break
            hull.append((k, b))
        return hull

    def fill(self, levels: np.ndarray, rng: np.random.Generator) -> Optional[np.ndarray]:
        """`levels` with every weight at the one ladder type that fits the budget with the most bytes,
        (None when even the smallest type is too large)."""
        L, hi = levels.shape[0], self.byte_band[1]
        genome = np.zeros((L, EMBED + 1), dtype=np.int64)
        genome[:, :2] = levels
        best = None
        for k in range(len(self.costs.types)):
            genome[:, 2:] = k
            if self.costs.bytes(genome) <= hi and (best is None or self.costs.bytes(genome) > self.costs.bytes(best)):
                best = genome.copy()
        if best is None:
            return None
        self.repair(best, rng)
        return best
