"""The joint search (budget.size): the level search's evolution over pruning levels and llama.cpp tensor
types together, under a byte budget. NumPy only; knows nothing of Ray.

A genome is pruning.joint's (L, 10) array. Its cost is its GGUF file's exact size; a candidate is in the
band when it fits the budget and wastes at most budget.tol of it. A move is one gene one step: a layer's
attention or MLP level, or one weight's type to the next type its row length can hold (the token
embedding's type moves in every row at once); after 1-3 moves (min of two draws, as EvoPress) a repair
steps random type genes down while the file is too large and up while it wastes more than the band
allows, so every child is in the band. Crossover takes each layer from one of two parents, then repairs.
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
            else:
                i, col = self.random_type_gene(genome, rng)
                if self.step_type(genome, i, col, bool(rng.random() < 0.5)):
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
        """`levels` with the embedding at type `embed` and every weight's type chosen greedily: from each
        weight's smallest type, the step up that removes the most quantization error per byte first, while
        the file fits (a knapsack by the importance-weighted error: what llama.cpp minimizes per tensor).
        `errors[(layer, col)][type index]`; None when the smallest types do not fit."""
        import heapq

        L, hi = levels.shape[0], self.byte_band[1]
        genome = np.zeros((L, EMBED + 1), dtype=np.int64)
        genome[:, :2], genome[:, EMBED] = levels, embed
        heap: list[tuple[float, int, int, int]] = []
        for i in range(L):
            for col in range(2, EMBED):
                genome[i, col] = self.costs.choices(i, col, genome)[0]
        n = self.costs.bytes(genome)
        if n > hi:
            return None

        def push(i: int, col: int) -> None:
            choices = self.costs.choices(i, col, genome)
            at = self.costs.effective_index(i, col, genome, choices)
            if (i, col) in errors and at + 1 < len(choices):
                trial = genome.copy()
                trial[i, col] = choices[at + 1]
                gain = errors[(i, col)][choices[at]] - errors[(i, col)][choices[at + 1]]
                cost = max(self.costs.bytes(trial) - n, 1)
                heapq.heappush(heap, (-gain / cost, i, col, choices[at + 1]))

        for i in range(L):
            for col in range(2, EMBED):
                push(i, col)
        while heap:
            _, i, col, k = heapq.heappop(heap)
            old = genome[i, col]
            genome[i, col] = k
            m = self.costs.bytes(genome)
            if m > hi:
                genome[i, col] = old  # this step no longer fits; a smaller one elsewhere may
                continue
            n = m
            push(i, col)
        return genome

    def fill(self, levels: np.ndarray, rng: np.random.Generator) -> Optional[np.ndarray]:
        """`levels` with every weight at the one ladder type that fits the budget with the most bytes,
        then random single steps up while they fit (None when even the smallest type is too large)."""
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
