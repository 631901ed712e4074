"""The generational search loop: evolve, evaluate (streamed), select, checkpoint. Knows nothing of Ray.

An `Evaluator` takes a list of candidates and yields (index, NLL, replica) as each evaluation finishes, in
any order. Results are logged to the run directory the moment they arrive; selection happens once the
generation is complete and ranks by (fitness, key), so the outcome does not depend on arrival order or on
how many replicas evaluated it.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Protocol

import numpy as np

from searchllm.pruning.shard import NLL, ShardRunner
from searchllm.pruning.space import Candidate, SearchSpace
from searchllm.rundir import RunDir
from searchllm.search.evolution import Evolution

log = logging.getLogger("searchllm")


class Evaluator(Protocol):
    def evaluate(self, cands: list[Candidate]) -> Iterator[tuple[int, NLL, int]]: ...


class Observer(Protocol):
    """Sees every evaluation as it is logged, and each generation's statistics with its best's structure."""

    def on_result(self, record: dict[str, Any]) -> None: ...

    def on_generation(self, stats: dict[str, Any], best: Optional[dict[str, Any]]) -> None: ...


class LocalEvaluator:
    """Evaluates in this process through a chain of shards (tests, and single-process use)."""

    def __init__(self, space: SearchSpace, runners: list[ShardRunner], tokens, batch: int = 1) -> None:
        self.space, self.runners, self.tokens, self.batch = space, runners, tokens, batch

    def evaluate(self, cands: list[Candidate]) -> Iterator[tuple[int, NLL, int]]:
        for i, cand in enumerate(cands):
            slices = self.space.slices(cand)
            out = self.tokens
            for r in self.runners:
                out = r.forward(slices, out, self.tokens, self.batch)
            yield i, out, 0


@dataclass
class SearchResult:
    best: Any  # a Candidate (the mask search), or a level genome (np.ndarray: the level search)
    fitness: float
    params: int
    ratio: float
    generations: int
    evaluations: int
    history: list[dict[str, Any]]
    finalists: list[tuple[Any, float]] = field(default_factory=list)  # the final parents, best first


def summarize(space: SearchSpace, cand: Candidate) -> dict[str, Any]:
    """Per-layer kept units, for logs, reports and the export."""
    return {
        "active": cand.active.astype(int).tolist(),
        "attn_units": cand.attn.sum(-1).tolist(),  # per layer, per group
        "kv_dims": space.kv_dims(cand).tolist(),
        "mlp_channels": cand.mlp.sum(-1).tolist(),
        "depth": cand.depth,
    }


class Search:
    def __init__(
        self,
        space: SearchSpace,
        evolution: Evolution,
        evaluator: Evaluator,
        run: RunDir,
        seed: int,
        generations: int,
        progress: Optional[Callable[[int, int], Any]] = None,
        observer: Optional[Observer] = None,
    ) -> None:
        self.space, self.evo, self.evaluator, self.run = space, evolution, evaluator, run
        self.seed, self.generations = seed, generations
        self.progress = progress  # factory: (generation, total) -> a tqdm-like bar
        self.observer = observer
        self._rate = 0.0

    def _record(self, cand: Candidate, origin: str, generation: int, nll: NLL, replica: int) -> dict[str, Any]:
        s, b = self.space, self.evo.budget
        return {
            "key": cand.key(),
            "generation": generation,
            "origin": origin,
            "params": s.params(cand),
            "ratio": s.ratio(cand, b.count),
            "depth": cand.depth,
            "attn_kept": float(cand.attn[cand.active].mean()) if cand.depth else 0.0,
            "mlp_kept": float(cand.mlp[cand.active].mean()) if cand.depth else 0.0,
            "fitness": nll.ppl if math.isfinite(nll.total) else math.inf,
            "nll": nll.total,
            "tokens": nll.tokens,
            "seconds": nll.seconds,
            "replica": replica,
            "error": nll.error or "",  # why a failed evaluation (fitness inf) failed
            "finished_at": time.time(),
            "genes": cand.to_bytes(),
        }

    def _evaluate(self, generation: int, children: list[tuple[Candidate, str]], done: dict[str, dict]) -> list[dict]:
        todo = [(c, o) for c, o in children if c.key() not in done]
        bar = self.progress(generation, len(children)) if self.progress else None
        if bar is not None:
            bar.update(len(children) - len(todo))
        t0, n = time.perf_counter(), 0
        for i, nll, replica in self.evaluator.evaluate([c for c, _ in todo]):
            cand, origin = todo[i]
            rec = self._record(cand, origin, generation, nll, replica)
            self.run.append_eval(rec)
            done[rec["key"]] = rec
            if self.observer is not None:
                self.observer.on_result(rec)
            n += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(ppl=f"{rec['fitness']:.2f}")
        if bar is not None:
            bar.close()
        self._rate = n / max(time.perf_counter() - t0, 1e-9)
        return [done[c.key()] for c, _ in children]

    def run_search(self, inits: list[Candidate]) -> SearchResult:
        done = self.run.load_evals()  # a resumed run re-uses every evaluation already logged
        ckpt = self.run.load_checkpoint()
        if ckpt is None:
            rng, seen, start = np.random.default_rng(self.seed), set(), 0
            parents: list[tuple[Candidate, float]] = []
            history: list[dict[str, Any]] = []
        else:
            rng = np.random.default_rng()
            rng.bit_generator.state = ckpt["rng"]
            seen, start, history = set(ckpt["seen"]), ckpt["generation"] + 1, ckpt["history"]
            parents = [(self.space.from_bytes(done[k]["genes"]), done[k]["fitness"]) for k in ckpt["parents"]]
            log.info("resuming after generation %d with %d evaluations logged", ckpt["generation"], len(done))
        if self.observer is not None:  # a resumed run shows what it did before too
            for rec in done.values():
                self.observer.on_result(rec)
            shown = summarize(self.space, parents[0][0]) if history else None
            for stats in history:
                self.observer.on_generation(stats, shown)
        for gen in range(start, self.generations):
            if gen == 0:
                children = self.evo.first_generation(inits, rng, seen)
            else:
                children = self.evo.offspring([c for c, _ in parents], rng, seen)
            records = self._evaluate(gen, children, done)
            self.run.write_generation(gen, records)
            scored = parents + [(c, r["fitness"]) for (c, _), r in zip(children, records)]
            parents = self.evo.select(scored, self.evo.p.parents)
            fits = [r["fitness"] for r in records if math.isfinite(r["fitness"])]
            stats = {
                "generation": gen,
                "best": parents[0][1],
                "median": statistics.median(fits) if fits else math.inf,
                "best_ratio": self.space.ratio(parents[0][0], self.evo.budget.count),
                "evaluated": len(records),
                "evals_per_s": self._rate,
                "skipped": self.evo.skipped,
                "failed": len(records) - len(fits),
            }
            history.append(stats)
            if self.observer is not None:
                self.observer.on_generation(stats, summarize(self.space, parents[0][0]))
            log.info(
                "gen %d/%d  best %.3f  median %.3f  kept %.4f  %d evals  %.2f evals/s",
                gen + 1,
                self.generations,
                stats["best"],
                stats["median"],
                stats["best_ratio"],
                len(records),
                self._rate,
            )
            self.run.save_checkpoint(
                {
                    "generation": gen,
                    "parents": [c.key() for c, _ in parents],
                    "rng": rng.bit_generator.state,
                    "seen": sorted(seen),
                    "history": history,
                }
            )
        best, fit = parents[0]
        return SearchResult(
            best,
            fit,
            self.space.params(best),
            self.space.ratio(best, self.evo.budget.count),
            len(history),
            len(done),
            history,
            parents,
        )
