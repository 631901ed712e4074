"""The paper's evolutionary search (Sec. 3.3, Algorithm 1): pure NumPy, no Ray, no torch.

Generation 0 is the importance-initialised subnet plus mutations of it (mask prob 0.6, ratio prob 0.3).
Later generations: N_m mutants (mask 0.3, ratio 0.1, depth 0.1) and N_c crossovers of random top-k parents,
and the rest mutants "with larger randomness" (the generation-0 probabilities, from random parents).
Parents compete with their children (elitist). Every child lies inside the budget and is new. A child
outside the budget band is repaired (random ratio genes moved one grid step toward the band, masks shrunk
or grown at random), not discarded as in the paper: with the paper's probabilities, discarding wasted
nearly every draw at low ratios (SmolLM2 at 0.5: 42 of 100 first-generation slots unfilled after 1000
draws each). A child that is still invalid or already seen is redrawn, at most `max_tries` times.

Mask mutation is Algorithm 1 made constructive: as printed it asks |old ∩ new| >= alpha*N, infeasible for
ratios below alpha, and rejection sampling rarely reaches the overlap for large N. Here a random share
>= alpha of the smaller of the old and new kept sets is retained and the rest is filled from the dropped
set (then, if needed, from the old kept set).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from searchllm.config import EvolutionParams
from searchllm.pruning.space import Budget, Candidate, SearchSpace
from searchllm.strategies import register


def mutate_mask(mask: np.ndarray, count: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    kept, dropped = np.flatnonzero(mask), np.flatnonzero(~mask)
    base = min(len(kept), count)
    retain = int(rng.integers(math.ceil(alpha * base), base + 1)) if base else 0
    retained = rng.choice(kept, retain, replace=False)
    need = count - retain
    # Fill from the dropped set; only when it is too small are other old units re-admitted.
    fresh = rng.choice(dropped, min(need, len(dropped)), replace=False)
    readmitted = rng.choice(np.setdiff1d(kept, retained), need - len(fresh), replace=False)
    out = np.zeros_like(mask)
    out[retained] = out[fresh] = out[readmitted] = True
    return out


@register("evolution", "search", "the paper's evolution over masks (mask and ratio mutation, crossover)")
class Evolution:
    def __init__(self, space: SearchSpace, budget: Budget, params: EvolutionParams) -> None:
        self.space, self.budget, self.p = space, budget, params
        self.skipped = 0  # children abandoned after max_tries (reported, never silently zero)

    def valid(self, cand: Candidate) -> bool:
        lo, hi = self.space.depth_range
        return lo <= cand.depth <= hi and self.budget.contains(self.space.ratio(cand, self.budget.count))

    # -- operators ---------------------------------------------------------------------------------
    def mutate(self, parent: Candidate, rng: np.random.Generator, pm: float, ps: float, pd: float) -> Candidate:
        s, c = self.space, parent.copy()
        lo, hi = s.depth_range
        if hi > lo and rng.random() < pd:
            depth = int(rng.integers(lo, hi + 1))
            on, off = np.flatnonzero(c.active), np.flatnonzero(~c.active)
            if depth < len(on):
                c.active[rng.choice(on, len(on) - depth, replace=False)] = False
            elif depth > len(on):
                c.active[rng.choice(off, depth - len(on), replace=False)] = True
        for i in np.flatnonzero(c.active):
            for grp in range(s.groups):
                c.attn[i, grp] = self._mutate_gene(c.attn[i, grp], s.attn_choices, rng, pm, ps)
            c.mlp[i] = self._mutate_gene(c.mlp[i], s.mlp_choices, rng, pm, ps)
        return c

    def _mutate_gene(
        self, mask: np.ndarray, choices: np.ndarray, rng: np.random.Generator, pm: float, ps: float
    ) -> np.ndarray:
        count = int(mask.sum())
        new = int(rng.choice(choices)) if rng.random() < ps else count
        if new != count or rng.random() < pm:  # a changed ratio forces a mask change
            return mutate_mask(mask, new, self.p.alpha, rng)
        return mask

    def crossover(self, a: Candidate, b: Candidate, rng: np.random.Generator) -> Candidate:
        """Each block's masks (and whether it is kept) come from one parent or the other."""
        take_b = rng.random(self.space.num_layers) < 0.5
        c = a.copy()
        c.active[take_b], c.attn[take_b], c.mlp[take_b] = b.active[take_b], b.attn[take_b], b.mlp[take_b]
        return c

    def repair(self, c: Candidate, rng: np.random.Generator) -> Candidate:
        """Step random genes one grid step toward the budget band until inside it (or no gene can move)."""
        s, b = self.space, self.budget
        for _ in range(10 * s.num_layers * (s.groups + 1)):
            r = s.ratio(c, b.count)
            if b.contains(r):
                break
            grow = r < b.low
            genes = [(i, grp) for i in np.flatnonzero(c.active) for grp in range(s.groups + 1)]
            for idx in rng.permutation(len(genes)):
                i, grp = genes[idx]
                mask = c.mlp[i] if grp == s.groups else c.attn[i, grp]
                counts = s.mlp_counts if grp == s.groups else s.attn_counts
                k = counts.index(int(mask.sum())) if int(mask.sum()) in counts else None
                if k is None or not (0 <= k + (1 if grow else -1) < len(counts)):
                    continue
                target = counts[k + (1 if grow else -1)]
                pool = np.flatnonzero(~mask if grow else mask)
                mask[rng.choice(pool, abs(target - int(mask.sum())), replace=False)] = grow
                break
            else:
                break
        return c

    # -- generations -------------------------------------------------------------------------------
    def _children(
        self, n: int, make, seen: set[str], rng: np.random.Generator, origin: str
    ) -> list[tuple[Candidate, str]]:
        out = []
        for _ in range(n):
            for _try in range(self.p.max_tries):
                child = self.repair(make(), rng)
                if self.valid(child) and child.key() not in seen:
                    seen.add(child.key())
                    out.append((child, origin))
                    break
            else:
                self.skipped += 1
        return out

    def first_generation(
        self, inits: list[Candidate], rng: np.random.Generator, seen: set[str]
    ) -> list[tuple[Candidate, str]]:
        """The initial subnets themselves, then mutants of them in turn (the paper has one initial subnet)."""
        p = self.p
        first = []
        for init in inits:
            if init.key() not in seen and self.valid(init):
                first.append((init, "init"))
                seen.add(init.key())
        turn = itertools.cycle(inits)
        return first + self._children(
            p.population - len(first),
            lambda: self.mutate(next(turn), rng, p.prob_mask_init, p.prob_ratio_init, 0.0),
            seen,
            rng,
            "mutation",
        )

    def offspring(
        self, parents: list[Candidate], rng: np.random.Generator, seen: set[str]
    ) -> list[tuple[Candidate, str]]:
        p = self.p

        def pick() -> Candidate:
            return parents[int(rng.integers(len(parents)))]

        def cross() -> Candidate:
            i, j = rng.choice(len(parents), 2, replace=len(parents) < 2)
            return self.crossover(parents[i], parents[j], rng)

        rest = p.population - p.mutations - p.crossovers
        return (
            self._children(
                p.mutations,
                lambda: self.mutate(pick(), rng, p.prob_mask, p.prob_ratio, p.prob_depth),
                seen,
                rng,
                "mutation",
            )
            + self._children(p.crossovers, cross, seen, rng, "crossover")
            + self._children(
                rest,
                lambda: self.mutate(pick(), rng, p.prob_mask_init, p.prob_ratio_init, p.prob_depth),
                seen,
                rng,
                "random",
            )
        )

    @staticmethod
    def select(scored: list[tuple[Candidate, float]], k: int) -> list[tuple[Candidate, float]]:
        """Top-k by fitness (lower is better); failed evaluations (NaN/inf) last; ties by key."""

        def rank(item: tuple[Candidate, float]) -> tuple[float, str]:
            f = item[1]
            return (f if math.isfinite(f) else math.inf, item[0].key())

        return sorted(scored, key=rank)[:k]


@register("random", "search", "random masks at the budget, the same number of evaluations (the paper's baseline)")
class RandomSearch(Evolution):
    """The random-search baseline: every generation is `population` fresh uniformly random subnets of the
    space inside the budget (same evaluation budget as the evolution); the best seen so far are kept."""

    def random_candidate(self, rng: np.random.Generator) -> Candidate:
        s, c = self.space, self.space.full()
        lo, hi = s.depth_range
        depth = int(rng.integers(lo, hi + 1))
        c.active[:] = False
        c.active[rng.choice(s.num_layers, depth, replace=False)] = True
        for i in range(s.num_layers):
            for grp in range(s.groups):
                c.attn[i, grp] = _random_mask(s.units, int(rng.choice(s.attn_choices)), rng)
            c.mlp[i] = _random_mask(s.geometry.intermediate, int(rng.choice(s.mlp_choices)), rng)
        return c

    def first_generation(
        self, inits: list[Candidate], rng: np.random.Generator, seen: set[str]
    ) -> list[tuple[Candidate, str]]:
        return self._children(self.p.population, lambda: self.random_candidate(rng), seen, rng, "random")

    def offspring(
        self, parents: list[Candidate], rng: np.random.Generator, seen: set[str]
    ) -> list[tuple[Candidate, str]]:
        return self.first_generation([], rng, seen)


def _random_mask(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros(n, bool)
    mask[rng.choice(n, count, replace=False)] = True
    return mask
