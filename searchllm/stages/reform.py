"""reform: rectify the kept o_proj/down_proj weights of the chosen subnet from the omitted ones by least
squares, layer by layer on the pool (each layer saved under <run>/reform/ as it is solved, so a resume
solves only the layers left).

finalists (the mask search's methods): the top `reform.finalists` parents (and FLAP's subnet with
reform.flap_finalist) are each reformed and the best after reformation on the "final" windows is kept:
the search ranks subnets before reformation, which does not preserve that order.
levels (levels.rereform): the level search's choice reformed from the original weights, kept only where it
scores better than its database weights on the last selection stage's tokens.
"""

from __future__ import annotations

import logging
import time

from searchllm.pruning.space import Budget
from searchllm.search.baselines import flap
from searchllm.search.levelsearch import fitness_metric, stage_tokens
from searchllm.search.loop import summarize
from searchllm.stages.context import RunContext, Subnet
from searchllm.stages.export import manifest_source

log = logging.getLogger("searchllm")


def finalists(ctx: RunContext) -> None:
    cfg, space, searched = ctx.cfg, ctx.plan.space, ctx.searched
    assert searched is not None, "reformation runs after the search"
    if not (cfg.reform.enabled or cfg.export.enabled):
        return
    result, g = searched.result, space.geometry
    best = result.best
    reformed, layers, seconds, record = dict(searched.overrides), [], 0.0, []
    ppl = {"original": searched.dense_report_ppl, "searched": searched.report_ppl}
    if cfg.reform.enabled:
        r, c = cfg.reform, cfg.data.calibration
        log.info(
            "reforming o/down of the top-%d parents%s: solver=%s inputs=%s targets=%s features=%s bias=%s damp=%g on "
            "%d x %d tokens of %s",
            r.finalists,
            " and FLAP's subnet" if r.flap_finalist else "",
            r.solver,
            r.inputs,
            r.targets,
            r.features,
            r.bias,
            r.damp,
            c.samples,
            c.seqlen,
            ctx.plan.where["calibration"],
        )
        t0 = time.perf_counter()
        ctx.monitor.stage("reforming")
        best, results, record = reform_finalists(ctx)
        seconds = time.perf_counter() - t0
        reformed = {x.layer: x.weights for x in results}
        layers = [
            {"layer": x.layer, "error_before": x.error_before, "error_after": x.error_after, "seconds": x.seconds}
            for x in results
        ]
        ppl["reformed"] = next(nll for _, nll, _ in ctx.need_pool().stream(space, [best], "report", ctx.batch)).ppl
        log.info("reformed in %.1fs: report ppl %.3f -> %.3f", seconds, searched.report_ppl, ppl["reformed"])
    added = sum(w[k].numel() for w in reformed.values() for k in g.new_biases(w))
    params = space.params(best) + added
    manifest = {
        **manifest_source(ctx),
        "search": {
            "mode": cfg.search.mode,
            "init": cfg.search.init,
            "seed": cfg.search.seed,
            "generations": result.generations,
            "evaluations": result.evaluations,
            "fitness_corpus": ctx.plan.where["fitness"],
            "best_fitness_ppl": result.fitness,
            "chosen": best.key(),
            "seconds": searched.seconds,
        },
        "ratio": {"target": cfg.budget.target, "actual": params / g.total_params, "count": ctx.plan.budget.count},
        "params": {
            "original": g.total_params,
            "subnet": params,
            "added_biases": added,
            "decoder_original": g.num_layers * g.layer_params,
            "decoder_subnet": int(space.layer_params(best).sum()),
        },
        "structure": summarize(space, best),
        "reform": {
            "enabled": cfg.reform.enabled,
            **vars(cfg.reform),
            "seconds": seconds,
            "candidates": record,
            "layers": layers,
        },
        "perplexity": {"corpus": ctx.plan.where["report"], "windows": list(ctx.plan.tokens["report"].shape)},
    }
    origin = next((c["origin"] for c in record if c["key"] == best.key()), None)
    ctx.subnet = Subnet(
        space.slices(best), reformed, params, ppl, manifest, f"chosen after reformation ({origin})" if record else None
    )


def reform_finalists(ctx: RunContext):
    """Reform each finalist on the pool and keep the one with the lowest perplexity after reformation on the
    "final" windows (reform.final_windows of the fitness corpus). Returns (chosen subnet, its per-layer
    results, a record of every finalist)."""
    cfg, run, space, pool, monitor = ctx.cfg, ctx.run, ctx.plan.space, ctx.need_pool(), ctx.monitor
    result, scores, r, batch = ctx.searched.result, ctx.scores, cfg.reform, ctx.batch
    cands = [(c, f"parent {k + 1}", fit) for k, (c, fit) in enumerate(result.finalists[: r.finalists])] or [
        (result.best, "best", result.fitness)
    ]
    if r.flap_finalist and scores is not None and space.multiple == 1:  # FLAP's counts ignore space.round_to
        f = flap(space, scores, Budget(cfg.budget.target, cfg.budget.tol, ctx.plan.budget.count))
        if f.key() not in {c.key() for c, _, _ in cands}:
            cands.append((f, "flap", None))
    chosen, record = None, []
    for k, (cand, origin, before) in enumerate(cands):
        tag = f"{cand.key()}-{r.digest()}"
        saved = run.load_layers(tag)
        if saved:
            log.info(
                "finalist %s (%s): layers %s were reformed before the restart; solving the rest",
                cand.key(),
                origin,
                sorted(saved),
            )
        progress = [len(saved)]  # layers of this finalist reformed so far
        show = lambda: monitor.on_reform(origin, k + 1, len(cands), progress[0], cand.depth)  # noqa: E731
        show()
        with monitor.bar(cand.depth, f"reform {origin}", "layer", len(saved)) as bar:

            def finished(res, tag=tag, bar=bar):
                run.save_layer(tag, res)  # first: a resume starts after it
                progress[0] += 1
                bar.update(1)
                show()

            fresh = pool.reform(space.slices(cand), r, batch, {i: x.weights for i, x in saved.items()}, finished)
        results = sorted([*saved.values(), *fresh], key=lambda x: x.layer)
        after = next(nll for _, nll, _ in pool.stream(space, [cand], "final", batch))
        record.append(
            {
                "key": cand.key(),
                "origin": origin,
                "ratio": space.ratio(cand, ctx.plan.budget.count),
                "search_fitness": before,
                "final_ppl": after.ppl,
                "final_tokens": after.tokens,
                "reused_layers": len(saved),
            }
        )
        log.info(
            "finalist %s (%s): search fitness %s, after reformation ppl %.3f on %d tokens",
            cand.key(),
            origin,
            "-" if before is None else f"{before:.3f}",
            after.ppl,
            after.tokens,
        )
        if chosen is None or after.ppl < chosen[2]:
            chosen = (cand, results, after.ppl)
    cand, results, _ = chosen
    if len(cands) > 1:  # the pool holds the last finalist's weights: put the chosen one's back
        pool.set_overrides(space.slices(cand), {x.layer: x.weights for x in results})
    return cand, results, record


def levels(ctx: RunContext) -> None:
    """levels.rereform: keep whichever of the reformed and the database weights scores better."""
    cfg, pool, subnet, searched = ctx.cfg, ctx.need_pool(), ctx.subnet, ctx.searched
    assert subnet is not None and searched is not None, "re-reformation runs after the level search"
    if not cfg.levels.rereform:
        return
    ctx.monitor.stage("reforming")
    t0 = time.perf_counter()
    best, fitness, slices = searched.result.best, searched.result.fitness, subnet.slices
    tag = f"levels-{best.tobytes().hex()[:16]}-{cfg.reform.digest()}"
    saved = ctx.run.load_layers(tag)
    fresh = pool.reform(
        slices,
        cfg.reform,
        ctx.batch,
        {i: x.weights for i, x in saved.items()},
        lambda res: ctx.run.save_layer(tag, res),
    )
    weights = {x.layer: x.weights for x in [*saved.values(), *fresh]}

    class Slices:  # the reformed subnet: its slices with the reformed weights the pool now holds
        def slices(self, _):
            return slices

    after = next(
        nll
        for _, nll, _ in pool.stream(
            Slices(), [None], stage_tokens(len(cfg.levels.tokens) - 1), ctx.batch, fitness_metric(cfg.levels.fitness)
        )
    ).value
    rep = next(nll for _, nll, _ in pool.stream(Slices(), [None], "report", ctx.batch)).ppl
    keep = after < fitness
    subnet.manifest["rereform"] = {
        "fitness_database": fitness,
        "fitness_rereformed": after,
        "report_ppl_rereformed": rep,
        "kept": "rereformed" if keep else "database",
        "seconds": time.perf_counter() - t0,
    }
    log.info(
        "re-reformed the chosen assignment in %.1fs: fitness %.5f (database weights %.5f), report ppl %.2f; keeping "
        "the %s weights",
        subnet.manifest["rereform"]["seconds"],
        after,
        fitness,
        rep,
        subnet.manifest["rereform"]["kept"],
    )
    if keep:
        subnet.weights, subnet.ppl = weights, subnet.ppl | {"reformed": rep}
