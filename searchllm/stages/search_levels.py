"""search (the level search's method): level assignments of the database searched on KL (or perplexity)
fitness with multi-step selection; the best is scored on the report windows and becomes the subnet as it
was scored (its database weights). Checkpointed per generation by the strategy (a resume continues it)."""

from __future__ import annotations

import logging
import time

from searchllm.pruning.levels import GenomeCodec, error_allocation, uniform_genome
from searchllm.pruning.prefix import window_views
from searchllm.search.levelsearch import PROBE_STAGE, fitness_metric, stage_tokens
from searchllm.stages.context import RunContext, Searched, Subnet
from searchllm.stages.export import manifest_source
from searchllm.stages.report import search_summary, write_search_report

log = logging.getLogger("searchllm")


class LevelEvaluator:
    """The level search's StageEvaluator over a pool: stage k scores on token set levels<k> (the probes' own
    set, levels.probe_tokens, is stage PROBE_STAGE)."""

    def __init__(self, pool, codec, batch: int, metric: str) -> None:
        self.pool, self.codec, self.batch, self.metric = pool, codec, batch, metric

    def evaluate(self, genomes, stage: int):
        return self.pool.stream(self.codec, genomes, stage_tokens(stage), self.batch, self.metric)


def summarize_levels(db, genome) -> dict:
    """Per-layer structure of an assignment, in the shape the progress page draws (attention units =
    kept query heads per KV group)."""
    g = db.space.geometry
    slices = db.slices(genome)
    return {
        "active": [int(s.active) for s in slices],
        "attn_units": [s.q_counts(g) for s in slices],
        "kv_dims": [len(s.kv_rows(g)) for s in slices],
        "mlp_channels": [len(s.mlp) for s in slices],
        "depth": sum(1 for s in slices if s.active),
        "levels": genome.tolist(),
    }


def run(ctx: RunContext) -> None:
    cfg, pool, lv, batch, tokens, where = (
        ctx.cfg,
        ctx.need_pool(),
        ctx.cfg.levels,
        ctx.batch,
        ctx.plan.tokens,
        ctx.plan.where,
    )
    assert ctx.database is not None, "the level search runs after the database stage"
    space, db, band = ctx.database.space, ctx.database.db, ctx.database.band
    g = space.geometry
    codec, full = GenomeCodec(), space.full()
    pool.set_levels(space, db.layers, lv.cache_mb * 2**20)
    stages = [stage_tokens(k) for k in range(len(lv.tokens))]
    metric = fitness_metric(lv.fitness)
    if metric == "kl":
        sets = stages + ([stage_tokens(PROBE_STAGE)] if lv.probe_own_tokens else [])
        views, have = window_views({w: tokens[w] for w in sets}, batch), set()
        for w in sets:
            view = next((v for v in views.get(w, []) if v[0] in have), None)
            if view is not None:  # the probes' windows are the first stage's: no second dense pass
                pool.view_targets(w, *view)
            else:
                pool.set_targets(codec, full, w, lv.topk, batch)
            have.add(w)
    inits, ladder = [], []
    if lv.init in ("all", "uniform"):  # from the whole attention down, as far as the KL keeps falling
        for a in range(space.attn_top, -1, -1):
            genome = uniform_genome(space, db.params, *band, a)
            if genome is not None:
                ladder.append((genome, f"uniform attention level {a}"))
    if lv.init in ("all", "errors"):
        inits.append((error_allocation(db, *band), "error allocation"))
    ctx.monitor.stage("searching")
    t0 = time.perf_counter()
    tail = search_args(ctx, LevelEvaluator(pool, codec, batch, metric), cfg.search.generations, lambda x: x)
    search = ctx.plan.strategy.make(db, space.top, *tail)
    result = search.run_search(inits, ladder)
    wall = time.perf_counter() - t0
    best = result.best
    dense_rep, best_rep = (
        nll.ppl for _, nll, _ in sorted(pool.stream(codec, [full, best], "report", batch), key=lambda x: x[0])
    )
    structure = summarize_levels(db, best)
    rows = record_best(ctx, result, structure, wall, dense_rep, best_rep)
    corpus = rows[0]["corpus"]
    print(
        f"\nbest subnet: kept ratio {result.ratio:.4f} ({result.params / 1e6:.2f}M of {g.total_params / 1e6:.2f}M "
        "params) after "
        f"{result.generations} generations / {result.evaluations} evaluations in {wall:.0f}s\n"
        f"  fitness ({lv.fitness}, {where['fitness']}, {tokens[stages[-1]].numel()} tokens): {result.fitness:.5f}\n"
        f"  report ppl ({corpus}): dense {dense_rep:.2f} -> subnet {best_rep:.2f}\n  run dir: {ctx.run.path}"
    )
    write_search_report(ctx)
    ctx.searched = Searched(result, dense_rep, best_rep, wall, rows)
    scored = scored_first(ctx)
    inits_scored = [o for _, o in ladder + inits if o in scored]
    manifest = level_manifest(ctx, result, structure, inits_scored, wall)
    ctx.subnet = Subnet(
        db.slices(best),
        db.overrides(best),
        result.params,
        {"original": dense_rep, "searched": best_rep},
        manifest,
        "chosen by the level search",
    )


def search_args(ctx: RunContext, evaluator: LevelEvaluator, generations: int, levels_of) -> tuple:
    """The level search's arguments after its costs and top levels: (total params, band, params, evaluator,
    run dir, seed, generations, observer, summarize, progress bar); `levels_of` takes a genome's levels."""
    assert ctx.database is not None
    db, cfg = ctx.database.db, ctx.cfg
    bar = lambda gen, stage, total: ctx.monitor.bar(  # noqa: E731
        total, f"search gen {gen + 1}/{generations} stage {stage + 1}", "cand"
    )
    summarize = lambda x: summarize_levels(db, levels_of(x))  # noqa: E731
    g = ctx.database.space.geometry
    return (g.total_params, ctx.database.band, cfg.levels, evaluator, ctx.run, cfg.search.seed, generations,
            ctx.monitor, summarize, bar)  # fmt: skip


def record_best(
    ctx: RunContext, result, structure: dict, wall: float, dense_rep: float, best_rep: float, extra: dict | None = None
) -> list[dict]:
    """best.json and summary.json of the level search's choice (`extra` keys added to both); the report
    page's first rows."""
    lv, tokens, g = ctx.cfg.levels, ctx.plan.tokens, ctx.plan.space.geometry
    assert ctx.database is not None
    best = result.best
    ctx.run.save_json(
        "best.json",
        {
            "key": best.tobytes().hex(),
            "params": result.params,
            "ratio": result.ratio,
            "fitness": result.fitness,
            "fitness_kind": lv.fitness,
            **structure,
            **(extra or {}),
        },
    )
    fitness = {
        "fitness_kind": lv.fitness,
        "fitness_tokens": [list(tokens[stage_tokens(k)].shape) for k in range(len(lv.tokens))],
        "best_fitness": result.fitness,
    }
    kept = result.params / g.total_params
    more = {"level_database": ctx.database.record, **(extra or {})}
    return search_summary(ctx, result, dense_rep, best_rep, wall, kept, fitness, more)


def scored_first(ctx: RunContext) -> set[str]:
    """The starting points generation 0 scored (the ladder stops at the first rung that scores worse)."""
    return {r["origin"] for r in ctx.run.load_evals().values() if r["generation"] == 0}


def level_manifest(ctx: RunContext, result, structure: dict, inits_scored: list[str], wall: float) -> dict:
    """The manifest of the level search's choice, before the export adds its record."""
    cfg, lv, where, tokens, g = ctx.cfg, ctx.cfg.levels, ctx.plan.where, ctx.plan.tokens, ctx.plan.space.geometry
    best = result.best
    assert ctx.database is not None
    return {
        **manifest_source(ctx),
        "search": {
            "mode": "levels",
            "seed": cfg.search.seed,
            "generations": result.generations,
            "evaluations": result.evaluations,
            "fitness_corpus": where["fitness"],
            "fitness": lv.fitness,
            "best_fitness": result.fitness,
            "seconds": wall,
            "levels": best.tolist(),
            "inits": inits_scored,
        },
        "level_database": ctx.database.record,
        "ratio": {"target": cfg.budget.target, "actual": result.ratio, "count": ctx.plan.budget.count},
        "params": {
            "original": g.total_params,
            "subnet": result.params,
            "decoder_original": g.num_layers * g.layer_params,
            "decoder_subnet": result.params - g.outer_params,
        },
        "structure": structure,
        "perplexity": {"corpus": where["report"], "windows": list(tokens["report"].shape)},
    }
