"""build, then export: the subnet built in memory from the original weights (on the pool: it holds them),
its slices and the tensors replacing sliced ones (`build`); after the pool is gone and the heal stage has
had it, written in export.format (searchllm.export: hf, gguf), reloaded from disk and scored on the report
windows (`run`); manifest.json records every stage's perplexity. A resume writes the export again
(another format, say)."""

from __future__ import annotations

import logging
from pathlib import Path

from searchllm.data import data_root
from searchllm.export.formats import ExportJob, write_all
from searchllm.export.hf import build
from searchllm.models.loading import DTYPES as DTYPES_BY_NAME
from searchllm.models.loading import source_gguf
from searchllm.stages.context import Built, Candidate, RunContext, Subnet

log = logging.getLogger("searchllm")


def manifest_source(ctx: RunContext) -> dict:
    """What every manifest says first: the method, the source model and the calibration data."""
    cfg = ctx.cfg
    return {
        "method": cfg.method,
        "source": {
            "model": cfg.model.path,
            "revision": cfg.model.revision,
            "checkpoint": ctx.loaded.checkpoint,
            "model_type": ctx.loaded.adapter.config.model_type,
        },
        "calibration": {
            "corpus": ctx.plan.where["calibration"],
            "samples": cfg.data.calibration.samples,
            "seqlen": cfg.data.calibration.seqlen,
            "seed": cfg.data.seed,
        },
    }


def build_subnet(ctx: RunContext) -> None:
    """The export in memory (ctx.built), from the pool's copy of the original weights."""
    subnet, cfg = ctx.subnet, ctx.cfg
    if subnet is None or ctx.searched is None or not (cfg.export.enabled or cfg.heal.enabled):
        return
    ctx.monitor.stage("exporting")
    state = ctx.need_pool().original_state()
    dtype = DTYPES_BY_NAME[cfg.export.dtype or cfg.model.dtype]
    model, info = build(ctx.loaded.adapter, state, subnet.slices, subnet.weights, dtype)
    if info.params != subnet.params + info.zero_biases:
        log.warning(
            "exported model has %d params, the search counted %d (+%d zero biases)",
            info.params,
            subnet.params,
            info.zero_biases,
        )
    ctx.built = Built(model, info)
    db, result = ctx.database, ctx.searched.result
    if cfg.heal.enabled and cfg.heal.candidates > 1 and db is not None:  # the training-aware choice's candidates
        ctx.candidates = [
            Candidate(
                "search's best", result.best, result.fitness, ctx.built, subnet.slices, subnet.weights, subnet.params
            )
        ]
        for k, (genome, fitness) in enumerate(result.finalists[1 : cfg.heal.candidates]):
            slices, weights = db.db.slices(genome), db.db.overrides(genome)
            built = Built(*build(ctx.loaded.adapter, state, slices, weights, dtype))
            ctx.candidates.append(
                Candidate(f"parent {k + 2}", genome, fitness, built, slices, weights, db.db.params(genome))
            )
    del state


def run(ctx: RunContext) -> None:
    subnet, searched = ctx.subnet, ctx.searched
    if subnet is None or searched is None:  # nothing chosen to export (reform and export both off)
        return
    cfg, manifest, ppl = ctx.cfg, subnet.manifest, subnet.ppl
    if cfg.export.enabled and ctx.built is not None:
        manifest["export"] = export_subnet(ctx, subnet, ctx.built)
        ppl["exported"] = manifest["export"].pop("ppl")
        ctx.export_dir = Path(manifest["export"]["dir"])
    manifest["perplexity"] |= ppl
    ctx.run.save_json("manifest.json", manifest)
    g, rows = ctx.loaded.adapter.geometry(), searched.rows
    corpus = rows[0]["corpus"]
    exported = manifest.get("export", {}).get("params")
    for stage, n in (("reformed", subnet.params), ("healed", exported or subnet.params), ("exported", exported)):
        if stage in ppl:
            rows.append(
                {
                    "model": stage,
                    "params": n,
                    "kept": n / g.total_params,
                    "report ppl": ppl[stage],
                    "corpus": corpus,
                }
            )
    ctx.monitor.set_summary(rows)
    if subnet.chosen_as is not None:
        ctx.monitor.set_best(manifest["structure"], subnet.chosen_as)
    print("  perplexity (" + ctx.plan.where["report"] + "): " + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items()))


def export_subnet(ctx: RunContext, subnet: Subnet, built: Built) -> dict:
    """Save, reload and score the export; returns the manifest's export record (with its report `ppl`)."""
    cfg, loaded, e = ctx.cfg, ctx.loaded, ctx.cfg.export
    ctx.monitor.stage("exporting")
    job = ExportJob(
        built.model,
        built.info,
        ctx.run.export_dir(e.dir),
        loaded.tokenizer,
        ctx.plan.tokens["report"],
        ctx.batch,
        loaded.checkpoint,
        source_gguf(cfg.model, data_root(cfg.data.root)),
        list(e.gguf_types),
        subnet.ppl.get("healed", subnet.ppl.get("reformed", subnet.ppl["searched"])),
        *(subnet.quant or (None, None)),
    )
    return write_all(job, e.format)
