"""`python -m searchllm.driver [--config FILE] [key=value ...]`: calibrate, score, search on Ray.

Flow: config -> model config/adapter -> search space and budget (checked before any weights load) ->
corpora -> Ray -> evaluator pool -> then, by search.mode: the level database -> level search -> export
(levels, the default), or dense baseline -> calibration scores -> initial subnet -> evolution / random /
a baseline -> report -> reformation -> export; then the evaluation. Bad input stops early with one line
on stderr and exit code 2.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from .config import Config, ConfigError, check_resume_overrides, differing_keys, load_config, to_yaml
from .data import DataError, data_root, first_windows, load_text, random_windows, tokenize
from . import strategies
from .baselines import bias_params, flap, flap_biases
from .evaluate import Evaluated
from .formats import ExportDirError, check_export_dir, check_format
from .gguf_export import GGUFError
from .llamacpp import LlamaCppMissing
from .layout import ClusterError
from .levels import LevelError, LevelSpace
from .levelsearch import PROBE_STAGE
from .monitor import Monitor, ProgressServer, write_report
from .models.adapters import UnsupportedModelError
from .models.loading import DTYPES as DTYPES_BY_NAME
from .models.loading import ModelError, load, load_config_only, load_tokenizer
from .rundir import RunDir, RunFileError
from .scores import Scores
from .search import Search, SearchResult, summarize
from .space import Budget, BudgetError, SearchSpace

log = logging.getLogger("searchllm")
USER_ERRORS = (ConfigError, DataError, ModelError, UnsupportedModelError, BudgetError, ClusterError, LevelError, GGUFError,
               LlamaCppMissing, RunFileError, ExportDirError)


@dataclass
class Prepared:
    cfg: Config
    run: RunDir
    space: SearchSpace
    budget: Budget
    tokens: dict[str, torch.Tensor]
    where: dict[str, str]  # corpus descriptions for the report


def resolve_config(argv: list[str]) -> tuple[Config, RunDir]:
    cfg = load_config(argv)
    if cfg.resume == "auto":
        if not cfg.run_dir:
            raise ConfigError("resume=auto needs run_dir=<a fixed path> (the run to continue, or to start there)")
        run = RunDir(cfg.run_dir)
        if not run.started:
            cfg.resume = None
            return cfg, run
        diff = differing_keys(load_config([], base_file=run.path / "config.yaml"), cfg)
        if diff:
            k, old, new = diff[0]
            raise ConfigError(f"resume=auto: run_dir={cfg.run_dir!r} was started with {k}={old!r}, this command asks for {new!r}; "
                              "use the same settings or another run_dir")
        log.info("resume=auto: continuing the run in %s", run.path)
        cfg.resume = str(run.path)
        return cfg, run
    if cfg.resume:
        run = RunDir(cfg.resume)
        if not run.started:
            raise ConfigError(f"resume={cfg.resume!r} is not a searchllm run directory (no config.yaml); give the run dir of a started search")
        check_resume_overrides(argv)
        saved = run.path / "config.yaml"
        # The run's own config decides what is computed; the command line may only change execution.
        cfg = load_config([a for a in argv if not a.startswith("resume=")], base_file=saved)
        cfg.resume, cfg.run_dir = str(run.path), str(run.path)
        return cfg, run
    path = cfg.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
    if RunDir(path).load_checkpoint() is not None:
        raise ConfigError(f"run_dir={path!r} already holds a search; pass resume={path} to continue it or pick a new run_dir")
    cfg.run_dir = path
    return cfg, RunDir(path)


def prepare(argv: list[str]) -> Prepared:
    cfg, run = resolve_config(argv)
    _, _, adapter = load_config_only(cfg.model, data_root(cfg.data.root))
    g = adapter.geometry()
    s = cfg.space
    space = SearchSpace.for_target(
        g, cfg.budget.target, s.attention, s.attn_min, s.attn_max, s.attn_step, s.mlp_min, s.mlp_max, s.mlp_step, s.depth_min, s.round_to
    )
    # Biases that reformation will add (reform.bias, where the family has none) are paid for from the budget.
    adds_bias = (cfg.reform.enabled and cfg.reform.bias) or cfg.search.compensate
    strategy = strategies.get(cfg.search.mode)
    if cfg.export.enabled:  # a format, type or export dir that cannot be written stops here, not after the search
        check_format(cfg.export.format, cfg.export.gguf_types, adapter.config.model_type)
        check_export_dir(Path(cfg.export.dir or run.path / "export"), cfg.export.overwrite)
    extra = bias_params(space) if adds_bias and strategy.kind != "levels" and not strategy.compensates else 0  # flap() budgets its own
    if strategy.kind == "levels":  # bad level settings and unreachable budgets stop here, before any weights load
        from .levels import implied_levels

        implied_levels(LevelSpace(g, cfg.levels), *level_band(cfg, g))
    budget = Budget(cfg.budget.target - extra / space.total(cfg.budget.count), cfg.budget.tol, cfg.budget.count)
    lo, hi = space.bounds(budget.count)
    if budget.high < lo or budget.low > hi:
        raise BudgetError(space.infeasible_message(budget))
    tokens, where = token_sets(cfg, load_tokenizer(cfg.model, data_root(cfg.data.root)))
    return Prepared(cfg, run, space, budget, tokens, where)


def token_sets(cfg: Config, tokenizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    d, ids, tokens, where = cfg.data, {}, {}, {}
    for name in ("calibration", "fitness", "report"):
        corpus = getattr(d, name)
        key = (corpus.name, corpus.split, corpus.path)
        if key not in ids:  # a corpus shared by several roles is read and tokenized once
            ids[key] = tokenize(load_text(corpus, d.root)[0], tokenizer)
        where[name] = f"{corpus.name}/{corpus.split} ({corpus.path or 'auto'})"
        if name == "calibration":
            tokens[name] = random_windows(ids[key], corpus.samples, corpus.seqlen, d.seed, f"data.{name}")
        else:
            tokens[name] = first_windows(ids[key], corpus.samples, corpus.seqlen, f"data.{name}")
        if name == "fitness":  # the finalists' judge: more windows of the same corpus
            n = cfg.reform.final_windows
            tokens["final"] = first_windows(ids[key], n, corpus.seqlen, "reform.final_windows") if n else tokens[name]
            if strategies.get(cfg.search.mode).kind == "levels":  # the level search's selection stages: the first windows holding their tokens
                for k, t in enumerate(cfg.levels.tokens):
                    tokens[stage_tokens(k)] = first_windows(ids[key], -(-t // corpus.seqlen), corpus.seqlen, f"levels.tokens[{k}]")
                if cfg.levels.probe_own_tokens:  # the probes' own windows (targets set only then too)
                    n = -(-cfg.levels.probe_own_tokens // corpus.seqlen)
                    tokens[stage_tokens(PROBE_STAGE)] = first_windows(ids[key], n, corpus.seqlen, "levels.probe_tokens")
    return tokens, where


def main(argv: Optional[list[str]] = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    try:
        p = prepare(sys.argv[1:] if argv is None else argv)
        return run(p)
    except USER_ERRORS as e:
        print(f"searchllm: error: {e}", file=sys.stderr)
        return 2


def run(p: Prepared) -> int:
    from .distributed import EvaluatorPool, RayMetrics, connect

    cfg, run_dir, space, budget = p.cfg, p.run, p.space, p.budget
    g = space.geometry
    log.info(
        "model %s: %d layers, %d heads / %d KV heads, MLP %d, %.1fM params; target kept ratio %.3f ± %.3f (%s)",
        cfg.model.path, g.num_layers, g.num_heads, g.num_kv_heads, g.intermediate, g.total_params / 1e6,
        budget.target, budget.tol, budget.count,
    )
    levels = strategies.get(cfg.search.mode).kind == "levels"
    if levels:
        lv = cfg.levels
        log.info("levels: attention by query heads (%s), MLP in %d levels; fitness %s; selection on %s tokens keeping %s", lv.heads,
                 lv.mlp_levels, lv.fitness, list(lv.tokens), list(lv.survivors))
    else:
        log.info("space: attention=%s, per-group ratio %s, MLP ratio %s, depth %s", space.attention, space.attn_range, space.mlp_range,
                 space.depth_range)
    tokens, where = p.tokens, p.where
    name = f"searchllm {cfg.method} {Path(cfg.model.path).name} {cfg.budget.target:g} ({run_dir.path.name})"
    log.info("%s", connect(cfg.ray, name))  # before anything is written or loaded: an unreachable cluster fails in seconds
    run_dir.create()
    with run_dir.locked():  # a second driver on this run dir stops here (before any actor), naming this one
        loaded = load(cfg.model, data_root(cfg.data.root))
        if not run_dir.started:
            run_dir.write_text("config.yaml", to_yaml(cfg))
        monitor = Monitor({"model": cfg.model.path, "target": cfg.budget.target, "method": cfg.method, "run_dir": str(run_dir.path),
                           "generations": cfg.search.generations, "layers": g.num_layers, "total_params": g.total_params,
                           "attn_units": g.num_heads if levels else int(space.full().attn[0].size), "mlp_channels": g.intermediate,
                           "fitness": {"kl": "KL from dense (nats/token)", "ppl": "perplexity"}[cfg.levels.fitness] if levels else "perplexity"})
        m = cfg.monitor
        server = ProgressServer(monitor, m.host, m.port) if m.page else None
        if server is not None:
            log.info("progress page: %s", server.url)
        metrics = RayMetrics(run_dir.path.name) if m.metrics else None
        if metrics is not None:
            monitor.sinks.append(metrics)
        try:
            with EvaluatorPool(loaded.model, loaded.adapter, cfg.ray, cfg.model.dtype, tokens, metrics=metrics,
                               score_dtype=cfg.levels.score_dtype if levels else "model") as pool:
                del loaded.model  # the object store holds the weights now
                export_dir = search_and_report(cfg, run_dir, space, budget, pool, tokens, where, loaded, monitor)
            if export_dir is not None and cfg.eval.enabled:  # after the pool is gone: its weights are freed first
                monitor.stage("evaluating")
                evaluate_run(cfg, run_dir, loaded, export_dir, monitor)
            monitor.stage("done")
            if m.report:
                log.info("report: %s", write_report(monitor, run_dir.path / "report.html"))
        finally:
            if server is not None:
                server.close()
            if metrics is not None:
                metrics.close()
        return 0


def search_and_report(cfg: Config, run_dir: RunDir, space: SearchSpace, budget: Budget, pool, tokens, where,
                      loaded, monitor: Monitor) -> Optional[Path]:
    """Search (or choose a baseline subnet), report, reform and export; returns the export dir, if any."""
    from tqdm import tqdm

    batch = cfg.data.batch

    if strategies.get(cfg.search.mode).kind == "levels":
        return levels_search_and_export(cfg, run_dir, pool, tokens, where, loaded, monitor)
    dense = space.full()
    fit = {i: nll for i, nll, _ in pool.stream(space, [dense], "fitness", batch)}[0]
    log.info("dense model: fitness ppl %.3f on %s, %d tokens", fit.ppl, where["fitness"], fit.tokens)

    scores = run_dir.load_scores()
    if scores is None:
        c = cfg.data.calibration
        log.info("calibrating on %d windows x %d tokens of %s", c.samples, c.seqlen, where["calibration"])
        monitor.stage("calibrating")
        t0 = time.perf_counter()
        with tqdm(total=len(pool.specs), desc="calibrate", unit="stage", leave=False, disable=None) as bar:
            scores = pool.calibrate(batch, cfg.search.score_damp, lambda: bar.update(1))
        run_dir.save_scores(scores)
        log.info("channel scores ready in %.1fs", time.perf_counter() - t0)
    monitor.stage("searching")
    result, overrides, wall = choose_subnet(cfg, run_dir, space, budget, pool, scores, loaded, monitor)

    dense_rep, best_rep = (nll for _, nll, _ in sorted(pool.stream(space, [dense, result.best], "report", batch), key=lambda x: x[0]))
    report(run_dir, cfg, space, result, fit.ppl, dense_rep.ppl, best_rep.ppl, where, wall, tokens)
    corpus, g = f"{where['report']}, {tokens['report'].shape[0]} x {tokens['report'].shape[1]} tokens", space.geometry
    rows = [{"model": "original", "params": g.total_params, "kept": 1.0, "report ppl": dense_rep.ppl, "corpus": corpus},
            {"model": "searched", "params": result.params, "kept": result.ratio, "report ppl": best_rep.ppl, "corpus": corpus}]
    monitor.set_summary(rows)
    if cfg.monitor.report:
        write_report(monitor, run_dir.path / "report.html")
    if cfg.reform.enabled or cfg.export.enabled:
        manifest = reform_and_export(cfg, run_dir, space, result, pool, tokens, where, loaded, dense_rep.ppl, best_rep.ppl, wall,
                                     overrides, scores, monitor)
        ppl = manifest["perplexity"]
        for stage in ("reformed", "exported"):
            if stage in ppl:
                n = manifest["export"]["params"] if stage == "exported" else manifest["params"]["subnet"]
                rows.append({"model": stage, "params": n, "kept": n / g.total_params, "report ppl": ppl[stage], "corpus": corpus})
        monitor.set_summary(rows)
        if manifest["reform"]["candidates"]:
            origin = next(c["origin"] for c in manifest["reform"]["candidates"] if c["key"] == manifest["search"]["chosen"])
            monitor.set_best(manifest["structure"], f"chosen after reformation ({origin})")
        if "export" in manifest:
            return Path(manifest["export"]["dir"])
    return None


def level_band(cfg: Config, g) -> tuple[int, int]:
    """The parameter counts (whole model) budget.target +- budget.tol allows, in budget.count's terms."""
    b = cfg.budget
    if b.count == "decoder":
        d = g.num_layers * g.layer_params
        return int(math.ceil(g.outer_params + (b.target - b.tol) * d)), int(g.outer_params + (b.target + b.tol) * d)
    return int(math.ceil((b.target - b.tol) * g.total_params)), int((b.target + b.tol) * g.total_params)


def build_level_database(cfg: Config, run_dir: RunDir, pool, space, band: tuple[int, int], monitor: Optional[Monitor] = None):
    """The run's level database: loaded from the run dir where it was built before (a resume), the
    missing layers built on the pool and saved as each arrives. Returns (database, build record)."""
    from tqdm import tqdm

    from .levels import LevelDatabase, implied_levels, load_layers, save_layer

    folder = run_dir.path / "levels" / cfg.levels.digest()
    saved = load_layers(folder) if folder.is_dir() else {}
    implied = implied_levels(space, *band)
    L = space.num_layers
    t0 = time.perf_counter()
    if len(saved) < L:
        if monitor is not None:
            monitor.stage("building levels")
        c = cfg.data.calibration
        log.info("building the level database (heads=%s, %d MLP levels, inputs=%s, implied levels %s) on %d x %d calibration tokens%s",
                 cfg.levels.heads, cfg.levels.mlp_levels, cfg.levels.inputs, implied[0].tolist(), c.samples, c.seqlen,
                 f"; layers {sorted(saved)} were built before" if saved else "")
        factors, t1 = None, time.perf_counter()
        if cfg.levels.weighting == "fisher":  # deterministic (seeded draws): a resume recomputes the same factors
            windows = min(cfg.levels.fisher_windows, c.samples)
            factors = pool.output_factors(windows, cfg.data.batch, cfg.data.seed)
            log.info("output factors (true Fisher, K-FAC) of %d layers on %d x %d calibration tokens in %.1fs", len(factors),
                     windows, c.seqlen, time.perf_counter() - t1)
        factor_seconds = time.perf_counter() - t1
        progress = [len(saved)]
        with tqdm(total=L, initial=len(saved), desc="level database", unit="layer", leave=False, disable=None) as bar:
            def on_layer(entry):
                save_layer(folder, entry)  # first: a resume starts after it
                bar.update(1)
                progress[0] += 1
                if monitor is not None:
                    monitor.on_reform("level database", 1, 1, progress[0], L)

            fresh = pool.build_levels(space, implied, cfg.data.batch, saved, on_layer, factors)
        layers = saved | {e.layer: e for e in fresh}
    else:
        layers, factor_seconds = saved, 0.0
    seconds = time.perf_counter() - t0
    db = LevelDatabase(space, layers)
    disk = sum(f.stat().st_size for f in folder.glob("layer-*.safetensors"))
    record = {"dir": str(folder), "layers_built": L - len(saved), "build_seconds": seconds, "factor_seconds": factor_seconds,
              "weighting": cfg.levels.weighting, "bytes": db.nbytes(), "disk_bytes": disk,
              "implied": implied[0].tolist(), "attn_levels": space.attn_top + 1, "mlp_levels": space.mlp_top + 1}
    log.info("level database: %d layers x (%d attention + %d MLP levels), %.1f MiB on disk, %s in %.1fs", L, space.attn_top + 1,
             space.mlp_top + 1, disk / 2**20, f"{L - len(saved)} layers built" if len(saved) < L else "reused", seconds)
    return db, record


class LevelEvaluator:
    """The level search's StageEvaluator over a pool: stage k scores on token set levels<k> (the probes' own
    set, levels.probe_tokens, is stage PROBE_STAGE)."""

    def __init__(self, pool, codec, batch: int, metric: str) -> None:
        self.pool, self.codec, self.batch, self.metric = pool, codec, batch, metric

    def evaluate(self, genomes, stage: int):
        return self.pool.stream(self.codec, genomes, stage_tokens(stage), self.batch, self.metric)


def stage_tokens(stage: int) -> str:
    return "levels-probe" if stage == PROBE_STAGE else f"levels{stage}"


def summarize_levels(db, genome) -> dict:
    """Per-layer structure of an assignment, in the shape the progress page draws (attention units =
    kept query heads per KV group)."""
    g = db.space.geometry
    slices = db.slices(genome)
    return {"active": [int(s.active) for s in slices], "attn_units": [s.q_counts(g) for s in slices],
            "kv_dims": [len(s.kv_rows(g)) for s in slices], "mlp_channels": [len(s.mlp) for s in slices],
            "depth": sum(1 for s in slices if s.active), "levels": genome.tolist()}


def levels_search_and_export(cfg: Config, run_dir: RunDir, pool, tokens, where, loaded, monitor: Monitor) -> Optional[Path]:
    """A `levels` strategy (search.mode=levels): build (or reuse) the level database, search level assignments with multi-step
    selection on KL (or perplexity) fitness, export the best exactly as it was scored."""
    from tqdm import tqdm

    from .levels import GenomeCodec, LevelSpace, error_allocation, uniform_genome

    g, lv, batch = loaded.adapter.geometry(), cfg.levels, cfg.data.batch
    space = LevelSpace(g, lv)
    band = level_band(cfg, g)
    codec, full = GenomeCodec(), space.full()
    db, built = build_level_database(cfg, run_dir, pool, space, band, monitor)
    pool.set_levels(space, db.layers, lv.cache_mb * 2**20)
    stages = [stage_tokens(k) for k in range(len(lv.tokens))]
    metric = "kl" if lv.fitness == "kl" else "nll"
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
    monitor.stage("searching")
    t0 = time.perf_counter()
    bar = lambda gen, stage, total: tqdm(total=total, desc=f"gen {gen + 1}/{cfg.search.generations} stage {stage + 1}", unit="cand",  # noqa: E731
                                         leave=False, mininterval=1, disable=None)
    search = strategies.get(cfg.search.mode).make(db, space.top, g.total_params, band, lv, LevelEvaluator(pool, codec, batch, metric), run_dir, cfg.search.seed,
                         cfg.search.generations, monitor, lambda x: summarize_levels(db, x), bar)
    result = search.run_search(inits, ladder)
    wall = time.perf_counter() - t0
    best = result.best
    dense_rep, best_rep = (nll.ppl for _, nll, _ in sorted(pool.stream(codec, [full, best], "report", batch), key=lambda x: x[0]))
    structure = summarize_levels(db, best)
    corpus = f"{where['report']}, {tokens['report'].shape[0]} x {tokens['report'].shape[1]} tokens"
    rows = [{"model": "original", "params": g.total_params, "kept": 1.0, "report ppl": dense_rep, "corpus": corpus},
            {"model": "searched", "params": result.params, "kept": result.params / g.total_params, "report ppl": best_rep, "corpus": corpus}]
    monitor.set_summary(rows)
    run_dir.save_json("best.json", {"key": best.tobytes().hex(), "params": result.params, "ratio": result.ratio, "fitness": result.fitness,
                                    "fitness_kind": lv.fitness, **structure})
    run_dir.save_json("summary.json", {
        "model": cfg.model.path, "total_params": g.total_params, "target": cfg.budget.target, "best_params": result.params,
        "best_ratio": result.ratio, "fitness_corpus": where["fitness"], "fitness_kind": lv.fitness,
        "fitness_tokens": [list(tokens[w].shape) for w in stages], "best_fitness": result.fitness, "report_corpus": where["report"],
        "report_tokens": list(tokens["report"].shape), "dense_report_ppl": dense_rep, "best_report_ppl": best_rep,
        "generations": result.generations, "evaluations": result.evaluations, "search_seconds": wall, "history": result.history,
        "level_database": built})
    print(f"\nbest subnet: kept ratio {result.ratio:.4f} ({result.params / 1e6:.2f}M of {g.total_params / 1e6:.2f}M params) after "
          f"{result.generations} generations / {result.evaluations} evaluations in {wall:.0f}s\n"
          f"  fitness ({lv.fitness}, {where['fitness']}, {tokens[stages[-1]].numel()} tokens): {result.fitness:.5f}\n"
          f"  report ppl ({corpus}): dense {dense_rep:.2f} -> subnet {best_rep:.2f}\n  run dir: {run_dir.path}")
    if cfg.monitor.report:
        write_report(monitor, run_dir.path / "report.html")
    reformed, ppl = db.overrides(best), {"original": dense_rep, "searched": best_rep}
    scored = {r["origin"] for r in run_dir.load_evals().values() if r["generation"] == 0}  # the ladder stops early
    manifest = {
        **manifest_source(cfg, loaded, where),
        "search": {"mode": "levels", "seed": cfg.search.seed, "generations": result.generations, "evaluations": result.evaluations,
                   "fitness_corpus": where["fitness"], "fitness": lv.fitness, "best_fitness": result.fitness, "seconds": wall,
                   "levels": best.tolist(), "inits": [o for _, o in ladder + inits if o in scored]},
        "level_database": built,
        "ratio": {"target": cfg.budget.target, "actual": result.ratio, "count": cfg.budget.count},
        "params": {"original": g.total_params, "subnet": result.params, "decoder_original": g.num_layers * g.layer_params,
                   "decoder_subnet": result.params - g.outer_params},
        "structure": structure,
        "perplexity": {"corpus": where["report"], "windows": list(tokens["report"].shape)},
    }
    slices = db.slices(best)
    if lv.rereform:
        slices, reformed, ppl, manifest["rereform"] = rereform_levels(cfg, run_dir, pool, db, best, codec, stages[-1], metric,
                                                                       result.fitness, ppl, monitor)
    out = None
    if cfg.export.enabled:
        manifest["export"] = export_subnet(cfg, run_dir, loaded, pool, slices, reformed, tokens, result.params,
                                           ppl.get("reformed", best_rep), monitor)
        ppl["exported"] = manifest["export"].pop("ppl")
        out = Path(manifest["export"]["dir"])
        rows.append({"model": "exported", "params": manifest["export"]["params"], "kept": manifest["export"]["params"] / g.total_params,
                     "report ppl": ppl["exported"], "corpus": corpus})
        monitor.set_summary(rows)
    manifest["perplexity"] |= ppl
    run_dir.save_json("manifest.json", manifest)
    monitor.set_best(structure, "chosen by the level search")
    print("  perplexity (" + where["report"] + "): " + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items()))
    return out


def rereform_levels(cfg: Config, run_dir: RunDir, pool, db, best, codec, which: str, metric: str, fitness: float, ppl: dict,
                    monitor: Optional[Monitor] = None):
    """levels.rereform: reform the chosen assignment's slices from the original weights with the
    reformation stage (reform.*), score it on the last selection stage's tokens, and keep whichever of it
    and the database weights is better. Returns (slices, overrides, perplexities, record)."""
    slices = db.slices(best)
    if monitor is not None:
        monitor.stage("reforming")
    t0 = time.perf_counter()
    tag = f"levels-{best.tobytes().hex()[:16]}-{cfg.reform.digest()}"
    saved = run_dir.load_layers(tag)
    fresh = pool.reform(slices, cfg.reform, cfg.data.batch, {i: x.weights for i, x in saved.items()}, lambda res: run_dir.save_layer(tag, res))
    weights = {x.layer: x.weights for x in [*saved.values(), *fresh]}
    dense_slices = [s for s in slices]

    class Slices:  # the reformed subnet: its slices with the reformed weights the pool now holds
        def slices(self, _):
            return dense_slices

    after = next(nll for _, nll, _ in pool.stream(Slices(), [None], which, cfg.data.batch, metric)).value
    rep = next(nll for _, nll, _ in pool.stream(Slices(), [None], "report", cfg.data.batch)).ppl
    keep = after < fitness
    record = {"fitness_database": fitness, "fitness_rereformed": after, "report_ppl_rereformed": rep, "kept": "rereformed" if keep else "database",
              "seconds": time.perf_counter() - t0}
    log.info("re-reformed the chosen assignment in %.1fs: fitness %.5f (database weights %.5f), report ppl %.2f; keeping the %s weights",
             record["seconds"], after, fitness, rep, record["kept"])
    if keep:
        return slices, weights, ppl | {"reformed": rep}, record
    return slices, db.overrides(best), ppl, record


def choose_subnet(cfg: Config, run_dir: RunDir, space: SearchSpace, budget: Budget, pool, scores: Scores,
                  loaded, monitor: Optional[Monitor] = None) -> tuple[SearchResult, dict[int, dict[str, torch.Tensor]], float]:
    """search.mode's strategy decides: a `search` (evolution, random) on the pool, or a `baseline` chosen
    outright (uniform, FLAP, layer drop). With search.compensate every candidate is judged with FLAP's
    bias compensation.
    Returns the result, tensors the subnet carries beyond sliced weights (those biases), and the wall time."""
    from tqdm import tqdm

    from .distributed import RayEvaluator

    s, batch, t0 = cfg.search, cfg.data.batch, time.perf_counter()
    chosen = strategies.get(s.mode)
    compensate = s.compensate or chosen.compensates  # FLAP is defined with its compensation
    if compensate:
        pool.set_compensation(scores)
    uniform = space.initial(scores.attn, scores.mlp, budget)
    log.info("uniform subnet: kept ratio %.4f, %d attention units and %d MLP channels per block", space.ratio(uniform, budget.count),
             int(uniform.attn[0].sum()) // space.groups, int(uniform.mlp[0].sum()))
    if chosen.kind == "baseline":
        best = chosen.make(space, scores, budget)
        fit = next(nll for _, nll, _ in pool.stream(space, [best], "fitness", batch))
        rec = {"generation": 0, "best": fit.ppl, "median": fit.ppl, "best_ratio": space.ratio(best, budget.count), "evaluated": 1}
        result = SearchResult(best, fit.ppl, space.params(best), space.ratio(best, budget.count), 0, 1, [rec])
        log.info("%s subnet: kept ratio %.4f, fitness ppl %.3f", s.mode, result.ratio, fit.ppl)
    else:
        inits = [uniform]
        if s.init == "flap" and space.multiple == 1:
            inits.append(flap(space, scores, budget))
            log.info("FLAP subnet joins generation 0: kept ratio %.4f", space.ratio(inits[-1], budget.count))
        strategy = chosen.make(space, budget, s)
        bar = lambda gen, total: tqdm(total=total, desc=f"gen {gen + 1}/{s.generations}", unit="cand", leave=False, mininterval=1, disable=None)
        search = Search(space, strategy, RayEvaluator(pool, space, batch), run_dir, s.seed, s.generations, bar, monitor)
        result = search.run_search(inits)
    overrides = {}
    if compensate:  # the subnet was judged with its compensation biases: the export carries them
        state = pool.original_state()
        overrides = flap_biases(loaded.adapter, state, space.slices(result.best), scores)
        del state
    return result, overrides, time.perf_counter() - t0


def evaluate_run(cfg: Config, run_dir: RunDir, loaded, export_dir: Path, monitor: Optional[Monitor] = None) -> None:
    """The evaluation protocol on the original and the exported model; rows appended to the run's table."""
    from tqdm import tqdm

    from .evaluate import append_results, count_params, describe, device_of, evaluate_model, format_table
    from .models.loading import load_pretrained

    ids: dict = {}
    tables = []
    manifest = run_dir.load_json("manifest.json")
    export = manifest["export"]
    models = (("original", loaded.checkpoint),) if cfg.eval.original else ()
    models += (("exported", str(export_dir)),) if "hf" in export.get("formats", ["hf"]) else ()
    for name, path in models:
        model, tokenizer = load_pretrained(path)
        model.to(device_of(cfg.eval.device))
        if name == "exported":  # its searchllm_export.json holds the source's counts
            what = describe(model, export_dir)
            what.name = f"exported ({cfg.method})"
        else:
            total, decoder = count_params(model)
            what = Evaluated(name, total, decoder, total, decoder)
        steps = len(cfg.eval.corpora) * len(cfg.eval.lengths) + bool(cfg.eval.tasks)
        with tqdm(total=steps, desc=f"evaluate {name}", unit="step", leave=False, disable=None) as bar:
            tables.append(evaluate_model(model, tokenizer or loaded.tokenizer, what, cfg.eval, cfg.data.root, ids, lambda: bar.update(1)))
        del model
    if "gguf" in export:
        tables += evaluate_ggufs(cfg, run_dir, loaded, export, ids)
    table = pd.concat(tables or [pd.DataFrame()], ignore_index=True).assign(method=cfg.method, target=cfg.budget.target)
    if table.empty or "metric" not in table:  # eval.corpora=[] and eval.tasks=[]: a valid, empty evaluation
        log.info("evaluation: nothing to evaluate (eval.corpora and eval.tasks are empty)")
        manifest["evaluation"] = {"rows": 0, "reason": "eval.corpora and eval.tasks are empty"}
        run_dir.save_json("manifest.json", manifest)
        return
    append_results(run_dir.path, table)
    if monitor is not None:
        monitor.set_eval(table.to_dict("records"))
    # The manifest carries the measured speed and memory of the export next to its perplexity.
    hf_rows = table[table.runtime.isna()] if "runtime" in table else table
    ppl = hf_rows[(hf_rows.metric == "ppl") & (hf_rows.status == "ok")]
    manifest["speed"] = {
        ("exported" if name != "original" else "original"): {
            "prefill_tokens_per_s": float(rows.tokens_per_s.median()), "weights_mib": float(rows.weights_mib.iloc[0]),
            "measured_on": f"eval.corpora perplexity passes, batch {cfg.eval.batch}, device {device_of(cfg.eval.device)}"}
        for name, rows in ppl.groupby("model")
    }
    if "runtime" in table:
        manifest["llama_cpp"] = llama_cpp_summary(table[table.runtime == "llama.cpp"])
    run_dir.save_json("manifest.json", manifest)
    print(format_table(table))


def evaluate_ggufs(cfg: Config, run_dir: RunDir, loaded, export: dict, ids: dict) -> list[pd.DataFrame]:
    """The exported GGUFs in llama.cpp, and (eval.original) the original model written and quantized to the
    same types by the same writer, so the two are compared in the runtime users run, type for type."""
    from .evaluate import evaluate_gguf
    from .formats import gguf_files
    from .models.loading import load_pretrained, source_gguf

    g = loaded.adapter.geometry()
    files = [(f["type"], Path(f["path"])) for f in export["gguf"]["files"]]
    runs = [(f"exported ({cfg.method}) {t}", p, export["params"]) for t, p in files]
    if cfg.eval.original:
        model, _ = load_pretrained(loaded.checkpoint)
        _, paths = gguf_files(model, loaded.tokenizer, run_dir.path / "original-gguf", source_gguf(cfg.model, data_root(cfg.data.root)),
                              [t for t, _ in files])
        del model
        runs = [(f"original {t}", p, g.total_params) for t, p in paths] + runs
    decoder = g.num_layers * g.layer_params
    ctx = int(loaded.adapter.config.max_position_embeddings)
    return [evaluate_gguf(p, loaded.tokenizer, Evaluated(name, n, n - g.outer_params, g.total_params, decoder), cfg.eval, cfg.data.root, ctx, ids)
            for name, p, n in runs]


def llama_cpp_summary(rows: pd.DataFrame) -> list[dict]:
    """Per GGUF: its perplexities, prefill/decode tokens/s and file size (the manifest's llama.cpp table)."""
    out = []
    for name, r in rows.groupby("model", sort=False):
        ok = r[r.status == "ok"]
        metric = lambda m: float(ok[ok.metric == m].value.iloc[0]) if (ok.metric == m).any() else None  # noqa: E731
        out.append({"model": name, "file_mib": float(r.weights_mib.iloc[0]), "prefill_tok_s": metric("prefill_tok_s"),
                    "decode_tok_s": metric("decode_tok_s"),
                    "ppl": {f"{t.task}/{t.split}@{int(t.seqlen)}": float(t.value) for t in ok[ok.metric == "ppl"].itertuples()}})
    return out


def reform_finalists(cfg: Config, run_dir: RunDir, space: SearchSpace, result: SearchResult, pool, scores: Optional[Scores],
                     monitor: Optional[Monitor] = None):
    """Reform the top `reform.finalists` parents (and FLAP's subnet with reform.flap_finalist), each on
    the pool, and keep the one with the lowest perplexity after reformation on the "final" windows
    (reform.final_windows of the fitness corpus): the search ranks subnets before reformation, and
    reformation does not preserve that order. Each layer is saved in the run dir as it is solved, so a
    killed driver's resume solves only the layers left. Returns (chosen subnet, its per-layer results,
    a record of every finalist)."""
    from tqdm import tqdm

    r, batch = cfg.reform, cfg.data.batch
    cands = [(c, f"parent {k + 1}", fit) for k, (c, fit) in enumerate(result.finalists[: r.finalists])] or [(result.best, "best", result.fitness)]
    if r.flap_finalist and scores is not None and space.multiple == 1:  # FLAP's counts ignore space.round_to
        f = flap(space, scores, Budget(cfg.budget.target, cfg.budget.tol, cfg.budget.count))
        if f.key() not in {c.key() for c, _, _ in cands}:
            cands.append((f, "flap", None))
    chosen, record = None, []
    for k, (cand, origin, before) in enumerate(cands):
        tag = f"{cand.key()}-{r.digest()}"
        saved = run_dir.load_layers(tag)
        if saved:
            log.info("finalist %s (%s): layers %s were reformed before the restart; solving the rest", cand.key(), origin, sorted(saved))
        progress = [len(saved)]  # layers of this finalist reformed so far
        show = (lambda: monitor.on_reform(origin, k + 1, len(cands), progress[0], cand.depth)) if monitor is not None else (lambda: None)
        show()
        with tqdm(total=cand.depth, initial=len(saved), desc=f"reform {origin}", unit="layer", leave=False, disable=None) as bar:

            def finished(res, tag=tag, bar=bar):
                run_dir.save_layer(tag, res)  # first: a resume starts after it
                progress[0] += 1
                bar.update(1)
                show()

            fresh = pool.reform(space.slices(cand), r, batch, {i: x.weights for i, x in saved.items()}, finished)
        results = sorted([*saved.values(), *fresh], key=lambda x: x.layer)
        after = next(nll for _, nll, _ in pool.stream(space, [cand], "final", batch))
        record.append({"key": cand.key(), "origin": origin, "ratio": space.ratio(cand, cfg.budget.count),
                       "search_fitness": before, "final_ppl": after.ppl, "final_tokens": after.tokens, "reused_layers": len(saved)})
        log.info("finalist %s (%s): search fitness %s, after reformation ppl %.3f on %d tokens", cand.key(), origin,
                 "-" if before is None else f"{before:.3f}", after.ppl, after.tokens)
        after = after.ppl
        if chosen is None or after < chosen[2]:
            chosen = (cand, results, after)
    cand, results, _ = chosen
    if len(cands) > 1:  # the pool holds the last finalist's weights: put the chosen one's back
        pool.set_overrides(space.slices(cand), {x.layer: x.weights for x in results})
    return cand, results, record


def reform_and_export(cfg: Config, run_dir: RunDir, space: SearchSpace, result: SearchResult, pool, tokens, where,
                      loaded, dense_ppl: float, searched_ppl: float, search_seconds: float, overrides: Optional[dict] = None,
                      scores: Optional[Scores] = None, monitor: Optional[Monitor] = None) -> dict:
    """Reform the best subnet on the actor pool, export it, reload the export from disk, and write
    manifest.json with the perplexity of every stage on the report windows."""
    best, batch, g = result.best, cfg.data.batch, space.geometry
    slices = space.slices(best)
    reformed, layers, seconds, finalists = dict(overrides or {}), [], 0.0, []
    ppl = {"original": dense_ppl, "searched": searched_ppl}
    if cfg.reform.enabled:
        r = cfg.reform
        c = cfg.data.calibration
        log.info("reforming o/down of the top-%d parents%s: solver=%s inputs=%s targets=%s features=%s bias=%s damp=%g on %d x %d tokens of %s",
                 r.finalists, " and FLAP's subnet" if r.flap_finalist else "", r.solver, r.inputs, r.targets, r.features, r.bias, r.damp,
                 c.samples, c.seqlen, where["calibration"])
        t0 = time.perf_counter()
        if monitor is not None:
            monitor.stage("reforming")
        best, results, finalists = reform_finalists(cfg, run_dir, space, result, pool, scores, monitor)
        slices = space.slices(best)
        seconds = time.perf_counter() - t0
        reformed = {x.layer: x.weights for x in results}
        layers = [{"layer": x.layer, "error_before": x.error_before, "error_after": x.error_after, "seconds": x.seconds} for x in results]
        ppl["reformed"] = next(nll for _, nll, _ in pool.stream(space, [best], "report", batch)).ppl
        log.info("reformed in %.1fs: report ppl %.3f -> %.3f", seconds, searched_ppl, ppl["reformed"])
    added = sum(w[k].numel() for w in reformed.values() for k in g.new_biases(w))
    manifest = {
        **manifest_source(cfg, loaded, where),
        "search": {"mode": cfg.search.mode, "init": cfg.search.init, "seed": cfg.search.seed, "generations": result.generations, "evaluations": result.evaluations,
                   "fitness_corpus": where["fitness"], "best_fitness_ppl": result.fitness, "chosen": best.key(), "seconds": search_seconds},
        "ratio": {"target": cfg.budget.target, "actual": (space.params(best) + added) / g.total_params, "count": cfg.budget.count},
        "params": {"original": g.total_params, "subnet": space.params(best) + added, "added_biases": added,
                   "decoder_original": g.num_layers * g.layer_params, "decoder_subnet": int(space.layer_params(best).sum())},
        "structure": summarize(space, best),
        "reform": {"enabled": cfg.reform.enabled, **vars(cfg.reform), "seconds": seconds, "candidates": finalists, "layers": layers},
        "perplexity": {"corpus": where["report"], "windows": list(tokens["report"].shape)},
    }
    if cfg.export.enabled:
        manifest["export"] = export_subnet(cfg, run_dir, loaded, pool, slices, reformed, tokens, space.params(best) + added,
                                           ppl.get("reformed", searched_ppl), monitor)
        ppl["exported"] = manifest["export"].pop("ppl")
    manifest["perplexity"] |= ppl
    run_dir.save_json("manifest.json", manifest)
    print("  perplexity (" + where["report"] + "): " + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items()))
    return manifest


def manifest_source(cfg: Config, loaded, where) -> dict:
    """What every manifest says first: the method, the source model and the calibration data."""
    return {
        "method": cfg.method,
        "source": {"model": cfg.model.path, "revision": cfg.model.revision, "checkpoint": loaded.checkpoint,
                   "model_type": loaded.adapter.config.model_type},
        "calibration": {"corpus": where["calibration"], "samples": cfg.data.calibration.samples,
                        "seqlen": cfg.data.calibration.seqlen, "seed": cfg.data.seed},
    }


def export_subnet(cfg: Config, run_dir: RunDir, loaded, pool, slices, reformed, tokens, counted: int, ref_ppl: float,
                  monitor: Optional[Monitor] = None) -> dict:
    """Build the export from the original weights, the slices and the tensors replacing sliced ones, save it,
    reload it from disk and score it on the report windows; returns the manifest's export record (with
    its report `ppl`)."""
    from .export import build
    from .formats import ExportJob, write_all
    from .models.loading import source_gguf

    if monitor is not None:
        monitor.stage("exporting")
    state = pool.original_state()
    model, info = build(loaded.adapter, state, slices, reformed, DTYPES_BY_NAME[cfg.export.dtype or cfg.model.dtype])
    del state
    if info.params != counted + info.zero_biases:
        log.warning("exported model has %d params, the search counted %d (+%d zero biases)", info.params, counted, info.zero_biases)
    e = cfg.export
    job = ExportJob(model, info, Path(e.dir or run_dir.path / "export"), loaded.tokenizer, tokens["report"], cfg.data.batch,
                    loaded.checkpoint, source_gguf(cfg.model, data_root(cfg.data.root)), list(e.gguf_types), ref_ppl)
    return write_all(job, e.format)


def report(run_dir: RunDir, cfg: Config, space: SearchSpace, result: SearchResult, dense_fit: float, dense_rep: float,
           best_rep: float, where: dict[str, str], wall: float, tokens: dict[str, torch.Tensor]) -> None:
    g = space.geometry
    best = {
        "key": result.best.key(),
        "params": result.params,
        "ratio": result.ratio,
        "fitness": result.fitness,
        "genes": result.best.to_bytes(),
        "attention": space.attention,
        **summarize(space, result.best),
    }
    run_dir.save_json("best.json", best)
    summary = {
        "model": cfg.model.path,
        "total_params": g.total_params,
        "target": cfg.budget.target,
        "best_params": result.params,
        "best_ratio": result.ratio,
        "fitness_corpus": where["fitness"],
        "fitness_tokens": list(tokens["fitness"].shape),
        "dense_fitness_ppl": dense_fit,
        "best_fitness_ppl": result.fitness,
        "report_corpus": where["report"],
        "report_tokens": list(tokens["report"].shape),
        "dense_report_ppl": dense_rep,
        "best_report_ppl": best_rep,
        "generations": result.generations,
        "evaluations": result.evaluations,
        "search_seconds": wall,
        "history": result.history,
    }
    run_dir.save_json("summary.json", summary)
    n, t = tokens["report"].shape
    print(
        f"\nbest subnet: kept ratio {result.ratio:.4f} ({result.params / 1e6:.2f}M of {g.total_params / 1e6:.2f}M params), "
        f"depth {result.best.depth}/{g.num_layers}, after {result.generations} generations / {result.evaluations} evaluations "
        f"in {wall:.0f}s\n"
        f"  fitness ppl ({where['fitness']}): dense {dense_fit:.2f} -> subnet {result.fitness:.2f}\n"
        f"  report ppl  ({where['report']}, {n}x{t} tokens): dense {dense_rep:.2f} -> subnet {best_rep:.2f}\n"
        f"  run dir: {run_dir.path}"
    )


if __name__ == "__main__":
    sys.exit(main())
