"""search (the mask search's methods: the paper, random search, the baselines): search.mode's strategy
picks a subnet of the channel space, a generational search on the pool (checkpointed per generation) or a
baseline chosen outright; the choice is scored on the report windows (best.json, summary.json)."""

from __future__ import annotations

import logging
import time

from searchllm.pruning.scores import flap_biases
from searchllm.pruning.space import Candidate, SearchSpace
from searchllm.search.baselines import flap
from searchllm.search.loop import Search, SearchResult, summarize
from searchllm.stages.context import Pool, RunContext, Searched
from searchllm.stages.report import search_summary, write_search_report

log = logging.getLogger("searchllm")


class PoolEvaluator:
    """The Search loop's evaluator over a pool: every candidate on the fitness windows."""

    def __init__(self, pool: Pool, space: SearchSpace, batch: int) -> None:
        self.pool, self.space, self.batch = pool, space, batch

    def evaluate(self, cands: list[Candidate]):
        return self.pool.stream(self.space, cands, "fitness", self.batch)


def run(ctx: RunContext) -> None:
    cfg, pool, space, budget, batch = ctx.cfg, ctx.need_pool(), ctx.plan.space, ctx.plan.budget, ctx.batch
    scores, s = ctx.scores, cfg.search
    assert scores is not None, "the mask search runs after calibration"
    dense = space.full()
    fit = {i: nll for i, nll, _ in pool.stream(space, [dense], "fitness", batch)}[0]
    log.info("dense model: fitness ppl %.3f on %s, %d tokens", fit.ppl, ctx.plan.where["fitness"], fit.tokens)
    ctx.monitor.stage("searching")
    t0 = time.perf_counter()
    chosen = ctx.plan.strategy
    compensate = s.compensate or chosen.compensates  # FLAP is defined with its compensation
    if compensate:
        pool.set_compensation(scores)
    uniform = space.initial(scores.attn, scores.mlp, budget)
    log.info(
        "uniform subnet: kept ratio %.4f, %d attention units and %d MLP channels per block",
        space.ratio(uniform, budget.count),
        int(uniform.attn[0].sum()) // space.groups,
        int(uniform.mlp[0].sum()),
    )
    if chosen.kind == "baseline":
        best = chosen.make(space, scores, budget)
        nll = next(nll for _, nll, _ in pool.stream(space, [best], "fitness", batch))
        rec = {
            "generation": 0,
            "best": nll.ppl,
            "median": nll.ppl,
            "best_ratio": space.ratio(best, budget.count),
            "evaluated": 1,
        }
        result = SearchResult(best, nll.ppl, space.params(best), space.ratio(best, budget.count), 0, 1, [rec])
        log.info("%s subnet: kept ratio %.4f, fitness ppl %.3f", s.mode, result.ratio, nll.ppl)
    else:
        inits = [uniform]
        if s.init == "flap" and space.multiple == 1:
            inits.append(flap(space, scores, budget))
            log.info("FLAP subnet joins generation 0: kept ratio %.4f", space.ratio(inits[-1], budget.count))
        strategy = chosen.make(space, budget, s)
        bar = lambda gen, total: ctx.monitor.bar(total, f"search gen {gen + 1}/{s.generations}", "cand")  # noqa: E731
        result = Search(
            space, strategy, PoolEvaluator(pool, space, batch), ctx.run, s.seed, s.generations, bar, ctx.monitor
        ).run_search(inits)
    overrides = {}
    if compensate:  # the subnet was judged with its compensation biases: the export carries them
        state = pool.original_state()
        overrides = flap_biases(ctx.loaded.adapter, state, space.slices(result.best), scores)
        del state
    wall = time.perf_counter() - t0
    dense_rep, best_rep = (
        nll for _, nll, _ in sorted(pool.stream(space, [dense, result.best], "report", batch), key=lambda x: x[0])
    )
    report(ctx, result, fit.ppl, dense_rep.ppl, best_rep.ppl, wall)
    fitness = {
        "fitness_tokens": list(ctx.plan.tokens["fitness"].shape),
        "dense_fitness_ppl": fit.ppl,
        "best_fitness_ppl": result.fitness,
    }
    rows = search_summary(ctx, result, dense_rep.ppl, best_rep.ppl, wall, result.ratio, fitness, {})
    write_search_report(ctx)
    ctx.searched = Searched(result, dense_rep.ppl, best_rep.ppl, wall, rows, overrides)


def report(
    ctx: RunContext, result: SearchResult, dense_fit: float, dense_rep: float, best_rep: float, wall: float
) -> None:
    """best.json, and the search's lines on stdout."""
    space, where, tokens = ctx.plan.space, ctx.plan.where, ctx.plan.tokens
    g = space.geometry
    ctx.run.save_json(
        "best.json",
        {
            "key": result.best.key(),
            "params": result.params,
            "ratio": result.ratio,
            "fitness": result.fitness,
            "genes": result.best.to_bytes(),
            "attention": space.attention,
            **summarize(space, result.best),
        },
    )
    n, t = tokens["report"].shape
    print(
        f"\nbest subnet: kept ratio {result.ratio:.4f} ({result.params / 1e6:.2f}M of {g.total_params / 1e6:.2f}M "
        "params), "
        f"depth {result.best.depth}/{g.num_layers}, after {result.generations} generations / {result.evaluations} "
        "evaluations "
        f"in {wall:.0f}s\n"
        f"  fitness ppl ({where['fitness']}): dense {dense_fit:.2f} -> subnet {result.fitness:.2f}\n"
        f"  report ppl  ({where['report']}, {n}x{t} tokens): dense {dense_rep:.2f} -> subnet {best_rep:.2f}\n"
        f"  run dir: {ctx.run.path}"
    )
