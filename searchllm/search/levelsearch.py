"""The level search (EvoPress): evolve assignments of database levels under an exact parameter budget.
NumPy only; knows nothing of Ray.

A genome is an (L, 2) integer array: each block's attention level and MLP level in the level database.
Mutation makes 1-3 level switches (min of two draws of 1..3, as EvoPress): one module goes down a level
and another module of the same type goes up one, only where both steps cost the same parameters, so the
count never changes. Crossover takes each block from one of two parents, then restores the parent's count
per module type with single-level moves. Duplicates are never evaluated twice.

Multi-step selection: every offspring is scored on the first token set, the best `survivors[0]` on the
second, ..., and the last stage's candidates compete with the parents (elitism) on the last, largest set.
Every evaluation is logged as it arrives (`<genome>@<stage>`), the parents and RNG state after each
generation, so a resumed search replays nothing it has done and ends identical.
"""

from __future__ import annotations

import hashlib
import logging
import math
import statistics
import time
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import numpy as np

from searchllm.config import LevelSearchParams
from searchllm.rundir import RunDir
from searchllm.search.loop import SearchResult  # best: the genome; finalists: the final parents
from searchllm.strategies import register

log = logging.getLogger("searchllm")


class Costs(Protocol):
    """What the search needs of the database: exact counts, and each level's cost per layer and module."""

    def params(self, genome: np.ndarray) -> int: ...

    def costs(self, layer: int, module: int) -> np.ndarray: ...


class StageEvaluator(Protocol):
    def evaluate(self, genomes: list[np.ndarray], stage: int) -> Iterator[tuple[int, Any, int]]: ...


PROBE_STAGE = -1  # the stage the probes are scored as when they have their own tokens (levels.probe_tokens)


def fitness_metric(fitness: str) -> str:
    """What the evaluators compute for levels.fitness: kl (mean KL from the dense model) or nll (perplexity)."""
    return "kl" if fitness == "kl" else "nll"


def stage_tokens(stage: int) -> str:
    """The name of the token set selection stage `stage` scores on."""
    return "levels-probe" if stage == PROBE_STAGE else f"levels{stage}"


def genome_key(genome: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(genome, dtype=np.int16).tobytes()).hexdigest()[:16]


def genome_from(data: bytes, layers: int) -> np.ndarray:
    return np.frombuffer(data, dtype=np.int16).astype(np.int64).reshape(layers, -1)


@register(
    "levels", "levels", "EvoPress-style search over level assignments of the level database, multi-step selection"
)
class LevelSearch:
    def __init__(
        self,
        db: Costs,
        top: np.ndarray,
        total: int,
        band: tuple[int, int],
        p: LevelSearchParams,
        evaluator: StageEvaluator,
        run: RunDir,
        seed: int,
        generations: int,
        observer=None,
        summarize: Optional[Callable[[np.ndarray], dict[str, Any]]] = None,
        progress: Optional[Callable[[int, int, int], Any]] = None,
    ) -> None:
        self.db, self.top, self.total, self.band, self.p = db, np.asarray(top), total, band, p
        self.evaluator, self.run, self.seed, self.generations = evaluator, run, seed, generations
        self.observer, self.summarize, self.progress = observer, summarize, progress
        self.skipped = 0

    # -- operators -------------------------------------------------------------------------------------
    def in_band(self, genome: np.ndarray) -> bool:
        lo, hi = self.band
        return lo <= self.db.params(genome) <= hi

    def switch(self, genome: np.ndarray, rng: np.random.Generator) -> bool:
        """One level switch in place (a module down a level, another of the same type up one, same cost)."""
        L = genome.shape[0]
        for _ in range(50):
            mod = int(rng.integers(2))
            down = np.flatnonzero(genome[:, mod] > 0)
            up = np.flatnonzero(genome[:, mod] < self.top[mod])
            if not len(down) or not len(up):
                continue
            a, b = int(rng.choice(down)), int(rng.choice(up))
            if a == b and L > 1:
                continue
            la, lb = genome[a, mod], genome[b, mod]
            ca, cb = self.db.costs(a, mod), self.db.costs(b, mod)
            if a != b and ca[la] - ca[la - 1] == cb[lb + 1] - cb[lb]:
                genome[a, mod] -= 1
                genome[b, mod] += 1
                return True
        return False

    def mutate(self, parent: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        child = parent.copy()
        for _ in range(min(int(rng.integers(1, 4)), int(rng.integers(1, 4)))):
            self.switch(child, rng)
        return child

    def module_params(self, genome: np.ndarray, mod: int) -> int:
        return int(sum(self.db.costs(i, mod)[lvl] for i, lvl in enumerate(genome[:, mod])))

    def crossover(self, a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Each block from one parent, then single-level moves until each module type costs what it costs in `a`."""
        take_b = np.asarray(rng.random(a.shape[0]) < 0.5)
        child = np.where(take_b[:, None], b, a).copy()
        for mod in (0, 1):
            want = self.module_params(a, mod)
            for _ in range(4 * a.shape[0] * int(self.top[mod] + 1)):
                diff = self.module_params(child, mod) - want
                if diff == 0:
                    break
                if diff > 0:
                    pool: Sequence[int] = list(map(int, np.flatnonzero(child[:, mod] > 0)))
                    step = -1
                else:
                    pool = [
                        i
                        for i in map(int, np.flatnonzero(child[:, mod] < self.top[mod]))
                        if self.db.costs(i, mod)[child[i, mod] + 1] - self.db.costs(i, mod)[child[i, mod]] <= -diff
                    ]
                    step = 1
                if not len(pool):
                    break
                child[int(rng.choice(pool)), mod] += step
        return child

    def offspring(
        self, parents: list[tuple[np.ndarray, float]], rng: np.random.Generator, seen: set[str]
    ) -> list[tuple[np.ndarray, str]]:
        out: list[tuple[np.ndarray, str]] = []
        for _ in range(self.p.offspring):
            for _try in range(self.p.max_tries):
                if len(parents) >= 2 and rng.random() < self.p.crossover:
                    i, j = rng.choice(len(parents), 2, replace=False)
                    child, origin = self.crossover(parents[i][0], parents[j][0], rng), "crossover"
                else:
                    child, origin = self.mutate(parents[int(rng.integers(len(parents)))][0], rng), "mutation"
                key = genome_key(child)
                if key not in seen and self.in_band(child):
                    seen.add(key)
                    out.append((child, origin))
                    break
            else:
                self.skipped += 1
        return out

    def reallocations(
        self, base: np.ndarray, done: dict[str, dict], seen: set[str]
    ) -> tuple[list[tuple[np.ndarray, str]], list[dict]]:
        """Sensitivity probes around `base` (each (layer, module) lowered by `probe` levels on its own,
        scored on stage 0), then for each module type and k in 1, 2, 4, 8...: the k least sensitive layers
        lowered and the k most sensitive raised by the same levels, kept where the count is exact."""
        d = self.p.probe
        probes, sens = [], {}
        cands = []
        for mod in (0, 1):
            if (base[:, mod] + d > self.top[mod]).all():
                continue  # no layer could take the levels: nothing to reallocate in this module type
            for i in range(base.shape[0]):
                if base[i, mod] >= d:
                    g = base.copy()
                    g[i, mod] -= d
                    cands.append(((i, mod), g))
        recs = self._stage(0, PROBE_STAGE if self.p.probe_own_tokens else 0, [(g, "probe") for _, g in cands], done)
        for ((i, mod), _), r in zip(cands, recs):
            sens[(i, mod)] = r["fitness"]
        probes += recs
        out = []
        for mod in (0, 1):
            ranked = sorted((sens[(i, m)], i) for (i, m) in sens if m == mod)
            order = [i for _, i in ranked]  # least sensitive first
            k = 1
            while 2 * k <= len(order):
                child = base.copy()
                down = order[:k]
                up = [i for i in reversed(order) if child[i, mod] + d <= self.top[mod] and i not in down][:k]
                if len(up) < k:
                    break
                child[down, mod] -= d
                child[up, mod] += d
                key = genome_key(child)
                if self.db.params(child) == self.db.params(base) and key not in seen:
                    seen.add(key)
                    out.append((child, f"reallocation {'attention' if mod == 0 else 'MLP'} k={k}"))
                k *= 2
        return out, probes

    # -- evaluation and selection ------------------------------------------------------------------------
    def _record(
        self, genome: np.ndarray, origin: str, generation: int, stage: int, nll, replica: int
    ) -> dict[str, Any]:
        n = self.db.params(genome)
        value = nll.value
        return {
            "key": f"{genome_key(genome)}@{stage}",
            "genome": genome_key(genome),
            "stage": stage,
            "generation": generation,
            "origin": origin,
            "params": n,
            "ratio": n / self.total,
            "fitness": value if math.isfinite(value) else math.inf,
            "nll": nll.total,
            "tokens": nll.tokens,
            "seconds": nll.seconds,
            "replica": replica,
            "error": nll.error or "",
            "finished_at": time.time(),
            "genes": np.ascontiguousarray(genome, dtype=np.int16).tobytes(),
        }

    def _stage(
        self, generation: int, stage: int, cands: list[tuple[np.ndarray, str]], done: dict[str, dict]
    ) -> list[dict]:
        keys = [f"{genome_key(g)}@{stage}" for g, _ in cands]
        todo = [k for k, key in enumerate(keys) if key not in done]
        bar = self.progress(generation, stage, len(cands)) if self.progress else None
        if bar is not None:
            bar.update(len(cands) - len(todo))
        for j, nll, replica in self.evaluator.evaluate([cands[k][0] for k in todo], stage):
            genome, origin = cands[todo[j]]
            rec = self._record(genome, origin, generation, stage, nll, replica)
            self.run.append_eval(rec)
            done[rec["key"]] = rec
            if self.observer is not None:
                self.observer.on_result(rec)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return [done[k] for k in keys]

    def select(
        self, generation: int, cands: list[tuple[np.ndarray, str]], done: dict[str, dict]
    ) -> tuple[list[tuple[np.ndarray, float]], list[dict], list[int]]:
        """Multi-step selection: (the last stage's candidates with their fitness, every record, survivors per stage)."""
        records, counts = [], []
        last = len(self.p.tokens) - 1
        for stage in range(last + 1):
            counts.append(len(cands))
            recs = self._stage(generation, stage, cands, done)
            records += recs
            order = sorted(range(len(cands)), key=lambda k: (recs[k]["fitness"], recs[k]["genome"]))
            if stage < last:
                cands = [cands[k] for k in order[: self.p.survivors[stage]]]
            else:
                return [(cands[k][0], recs[k]["fitness"]) for k in order], records, counts
        raise AssertionError("unreachable")

    def fresh(self, cands: Sequence[tuple[np.ndarray, str]], seen: set[str]) -> list[tuple[np.ndarray, str]]:
        """The candidates not seen before and inside the band (marked seen)."""
        out = []
        for genome, origin in cands:
            if genome_key(genome) not in seen and self.in_band(genome):
                seen.add(genome_key(genome))
                out.append((genome, origin))
        return out

    def climb(
        self, ladder: Sequence[tuple[np.ndarray, str]], done: dict[str, dict], seen: set[str]
    ) -> list[tuple[np.ndarray, str]]:
        """The rungs of `ladder` scored one by one on the first stage until one scores worse than the rung
        before it; the rungs scored. Along the uniform assignments from the whole attention down, the KL was
        unimodal at every ratio measured (docs/results.md), so the rungs past the first worse one never win."""
        rungs, prev = [], math.inf
        for genome, origin in self.fresh(ladder, seen):
            fit = self._stage(0, 0, [(genome, origin)], done)[0]["fitness"]
            rungs.append((genome, origin))
            if fit > prev:
                break
            prev = fit
        return rungs

    def run_search(
        self, inits: list[tuple[np.ndarray, str]], ladder: Sequence[tuple[np.ndarray, str]] = ()
    ) -> SearchResult:
        """Generation 0 scores `inits` and the rungs of `ladder` that `climb` reaches; later ones evolve the parents."""
        first = (list(ladder) + list(inits))[0][0]  # the fallback base of the probes
        L = first.shape[0]
        done = self.run.load_evals()
        ckpt = self.run.load_checkpoint()
        if ckpt is None:
            parents: list[tuple[np.ndarray, float]]
            rng, seen, start, parents, history = np.random.default_rng(self.seed), set(), 0, [], []
        else:
            rng = np.random.default_rng()
            rng.bit_generator.state = ckpt["rng"]
            seen, start, history = set(ckpt["seen"]), ckpt["generation"] + 1, ckpt["history"]
            parents = [(genome_from(done[k]["genes"], L), done[k]["fitness"]) for k in ckpt["parents"]]
            log.info(
                "resuming the level search after generation %d with %d evaluations logged",
                ckpt["generation"],
                len(done),
            )
        if self.observer is not None:  # a resumed run shows what it did before too
            for rec in done.values():
                self.observer.on_result(rec)
            for stats in history:
                self.observer.on_generation(stats, self.summarize(parents[0][0]) if self.summarize else {})
        last = len(self.p.tokens) - 1
        for gen in range(start, self.generations):
            t0 = time.perf_counter()
            if gen == 0:
                children = self.climb(ladder, done, seen) + self.fresh(inits, seen)
            else:
                children = self.offspring(parents, rng, seen)
            finals, records, counts = self.select(gen, children, done)
            if gen == 0 and self.p.probe:
                best = min(finals, key=lambda x: x[1])[0] if finals else first
                moved, probes = self.reallocations(best, done, seen)
                more, recs, _ = self.select(gen, moved, done)
                finals, records = finals + more, records + probes + recs
            self.run.write_generation(gen, records)
            pool = {genome_key(g): (g, f) for g, f in parents + finals}
            parents = sorted(
                pool.values(), key=lambda x: (x[1] if math.isfinite(x[1]) else math.inf, genome_key(x[0]))
            )[: self.p.parents]
            stage0 = [r["fitness"] for r in records if r["stage"] == 0 and math.isfinite(r["fitness"])]
            wall = time.perf_counter() - t0
            stats = {
                "generation": gen,
                "best": parents[0][1],
                "median": statistics.median(stage0) if stage0 else math.inf,
                "best_ratio": self.db.params(parents[0][0]) / self.total,
                "evaluated": len(records),
                "evals_per_s": len(records) / max(wall, 1e-9),
                "skipped": self.skipped,
                "failed": sum(1 for r in records if not math.isfinite(r["fitness"])),
                **{f"stage{k}_candidates": n for k, n in enumerate(counts)},
            }
            history.append(stats)
            if self.observer is not None:
                self.observer.on_generation(stats, self.summarize(parents[0][0]) if self.summarize else {})
            log.info(
                "gen %d/%d  best %.5f  median(stage 0) %.5f  kept %.4f  candidates per stage %s  %.2f evals/s",
                gen + 1,
                self.generations,
                stats["best"],
                stats["median"],
                stats["best_ratio"],
                counts,
                stats["evals_per_s"],
            )
            self.run.save_checkpoint(
                {
                    "generation": gen,
                    "parents": [f"{genome_key(g)}@{last}" for g, _ in parents],
                    "rng": rng.bit_generator.state,
                    "seen": sorted(seen),
                    "history": history,
                }
            )
        best, fit = parents[0]
        n = self.db.params(best)
        return SearchResult(best, fit, n, n / self.total, len(history), len(done), history, parents)
