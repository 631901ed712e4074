"""search (the level search's method): level assignments of the database searched on KL (or perplexity)
fitness with multi-step selection; the best is scored on the report windows and becomes the subnet as it
was scored (its database weights). Checkpointed per generation by the strategy (a resume continues it)."""

from __future__ import annotations

import logging
import time

from tqdm import tqdm

from searchllm.monitor import write_report
from searchllm.pruning.levels import GenomeCodec, error_allocation, uniform_genome
from searchllm.search.levelsearch import PROBE_STAGE, fitness_metric, stage_tokens
from searchllm.stages.context import RunContext, Searched, Subnet
from searchllm.stages.export import manifest_source

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
        for w in stages + ([stage_tokens(PROBE_STAGE)] if lv.probe_own_tokens else []):
            pool.set_targets(codec, full, w, lv.topk, batch)
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
    bar = lambda gen, stage, total: tqdm(
        total=total,
        desc=f"gen {gen + 1}/{cfg.search.generations} stage {stage + 1}",  # noqa: E731
        unit="cand",
        leave=False,
        mininterval=1,
        disable=None,
    )
    search = ctx.plan.strategy.make(
        db,
        space.top,
        g.total_params,
        band,
        lv,
        LevelEvaluator(pool, codec, batch, metric),
        ctx.run,
        cfg.search.seed,
        cfg.search.generations,
        ctx.monitor,
        lambda x: summarize_levels(db, x),
        bar,
    )
    result = search.run_search(inits, ladder)
    wall = time.perf_counter() - t0
    best = result.best
    dense_rep, best_rep = (
        nll.ppl for _, nll, _ in sorted(pool.stream(codec, [full, best], "report", batch), key=lambda x: x[0])
    )
    structure = summarize_levels(db, best)
    corpus = f"{where['report']}, {tokens['report'].shape[0]} x {tokens['report'].shape[1]} tokens"
    rows = [
        {"model": "original", "params": g.total_params, "kept": 1.0, "report ppl": dense_rep, "corpus": corpus},
        {
            "model": "searched",
            "params": result.params,
            "kept": result.params / g.total_params,
            "report ppl": best_rep,
            "corpus": corpus,
        },
    ]
    ctx.monitor.set_summary(rows)
    ctx.run.save_json(
        "best.json",
        {
            "key": best.tobytes().hex(),
            "params": result.params,
            "ratio": result.ratio,
            "fitness": result.fitness,
            "fitness_kind": lv.fitness,
            **structure,
        },
    )
    ctx.run.save_json(
        "summary.json",
        {
            "model": cfg.model.path,
            "total_params": g.total_params,
            "target": cfg.budget.target,
            "best_params": result.params,
            "best_ratio": result.ratio,
            "fitness_corpus": where["fitness"],
            "fitness_kind": lv.fitness,
            "fitness_tokens": [list(tokens[w].shape) for w in stages],
            "best_fitness": result.fitness,
            "report_corpus": where["report"],
            "report_tokens": list(tokens["report"].shape),
            "dense_report_ppl": dense_rep,
            "best_report_ppl": best_rep,
            "generations": result.generations,
            "evaluations": result.evaluations,
            "search_seconds": wall,
            "history": result.history,
            "level_database": ctx.database.record,
        },
    )
    print(
        f"\nbest subnet: kept ratio {result.ratio:.4f} ({result.params / 1e6:.2f}M of {g.total_params / 1e6:.2f}M "
        "params) after "
        f"{result.generations} generations / {result.evaluations} evaluations in {wall:.0f}s\n"
        f"  fitness ({lv.fitness}, {where['fitness']}, {tokens[stages[-1]].numel()} tokens): {result.fitness:.5f}\n"
        f"  report ppl ({corpus}): dense {dense_rep:.2f} -> subnet {best_rep:.2f}\n  run dir: {ctx.run.path}"
    )
    if cfg.monitor.report:
        write_report(ctx.monitor, ctx.run.path / "report.html")
    ctx.searched = Searched(result, dense_rep, best_rep, wall, rows)
    scored = {r["origin"] for r in ctx.run.load_evals().values() if r["generation"] == 0}  # the ladder stops early
    manifest = {
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
            "inits": [o for _, o in ladder + inits if o in scored],
        },
        "level_database": ctx.database.record,
        "ratio": {"target": cfg.budget.target, "actual": result.ratio, "count": cfg.budget.count},
        "params": {
            "original": g.total_params,
            "subnet": result.params,
            "decoder_original": g.num_layers * g.layer_params,
            "decoder_subnet": result.params - g.outer_params,
        },
        "structure": structure,
        "perplexity": {"corpus": where["report"], "windows": list(tokens["report"].shape)},
    }
    ctx.subnet = Subnet(
        db.slices(best),
        db.overrides(best),
        result.params,
        {"original": dense_rep, "searched": best_rep},
        manifest,
        "chosen by the level search",
    )
