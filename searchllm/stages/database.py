"""database (the level search's method): every block's attention and MLP at every level, pruned in OBS order
and refit, on the pool. Loaded from <run>/levels/<settings digest>-<calibration digest>/ where a run built it
before; the missing layers are built and saved as each arrives (a killed run resumes after the last saved layer)."""

from __future__ import annotations

import hashlib
import logging
import time

from searchllm.pruning.levels import (
    LevelDatabase,
    LevelSpace,
    implied_levels,
    load_layers,
    predicted_bytes,
    save_layer,
)
from searchllm.stages.context import Database, RunContext
from searchllm.stages.plan import gib, level_band

log = logging.getLogger("searchllm")


def run(ctx: RunContext) -> None:
    cfg, pool = ctx.cfg, ctx.need_pool()
    space = LevelSpace(ctx.loaded.adapter.geometry(), cfg.levels)
    band = level_band(cfg, space.geometry)
    # The database depends on the level settings and on the exact calibration windows (a mixture or generated
    # text makes other ones): a folder per pair, so a database is only ever reused for the same of both.
    windows = hashlib.sha1(ctx.plan.tokens["calibration"].numpy().tobytes()).hexdigest()[:8]
    folder = ctx.run.path / "levels" / f"{cfg.levels.digest()}-{windows}"
    saved = load_layers(folder) if folder.is_dir() else {}
    implied = implied_levels(space, *band)
    L = space.num_layers
    t0 = time.perf_counter()
    if len(saved) < L:
        ctx.monitor.stage("building levels")
        c = cfg.data.calibration
        log.info(
            "building the level database (heads=%s, %d MLP levels, inputs=%s, implied levels %s) on %d x %d "
            "calibration tokens, %s on disk when built%s",
            cfg.levels.heads,
            cfg.levels.mlp_levels,
            cfg.levels.inputs,
            implied[0].tolist(),
            c.samples,
            c.seqlen,
            gib(predicted_bytes(space)),
            f"; layers {sorted(saved)} were built before" if saved else "",
        )
        factors, t1 = None, time.perf_counter()
        if cfg.levels.weighting == "fisher":  # deterministic (seeded draws): a resume recomputes the same factors
            windows = min(cfg.levels.fisher_windows, c.samples)
            with ctx.monitor.bar(1, "output factors", "pass") as bar:
                factors = pool.output_factors(windows, ctx.batch, cfg.data.seed)
                bar.update(1)
            log.info(
                "output factors (true Fisher, K-FAC) of %d layers on %d x %d calibration tokens in %.1fs",
                len(factors),
                windows,
                c.seqlen,
                time.perf_counter() - t1,
            )
        factor_seconds = time.perf_counter() - t1
        progress = [len(saved)]
        with ctx.monitor.bar(L, "level database", "layer", len(saved)) as bar:

            def on_layer(entry):
                save_layer(folder, entry)  # first: a resume starts after it
                bar.update(1)
                progress[0] += 1
                ctx.monitor.on_reform("level database", 1, 1, progress[0], L)

            fresh = pool.build_levels(space, implied, ctx.batch, saved, on_layer, factors)
        layers = saved | {e.layer: e for e in fresh}
    else:
        layers, factor_seconds = saved, 0.0
    seconds = time.perf_counter() - t0
    db = LevelDatabase(space, layers)
    disk = sum(f.stat().st_size for f in folder.glob("layer-*.safetensors"))
    record = {
        "dir": str(folder),
        "layers_built": L - len(saved),
        "build_seconds": seconds,
        "factor_seconds": factor_seconds,
        "weighting": cfg.levels.weighting,
        "bytes": db.nbytes(),
        "disk_bytes": disk,
        "predicted_bytes": predicted_bytes(space),
        "implied": implied[0].tolist(),
        "attn_levels": space.attn_top + 1,
        "mlp_levels": space.mlp_top + 1,
    }
    log.info(
        "level database: %d layers x (%d attention + %d MLP levels), %.1f MiB on disk, %s in %.1fs",
        L,
        space.attn_top + 1,
        space.mlp_top + 1,
        disk / 2**20,
        f"{L - len(saved)} layers built" if len(saved) < L else "reused",
        seconds,
    )
    ctx.database = Database(space, db, band, record)
