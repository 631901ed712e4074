"""report: the run's page, report.html (the progress page's last state: search, structure, evaluation)."""

from __future__ import annotations

import logging
from typing import Any

from searchllm.monitor import write_report
from searchllm.stages.context import RunContext

log = logging.getLogger("searchllm")


def run(ctx: RunContext) -> None:
    ctx.monitor.stage("done")
    if ctx.cfg.monitor.report:
        log.info("report: %s", write_report(ctx.monitor, ctx.run.path / "report.html"))


def search_summary(
    ctx: RunContext, result: Any, dense_rep: float, best_rep: float, wall: float, kept: float, fitness: dict, more: dict
) -> list[dict[str, Any]]:
    """After a search: summary.json (`fitness`: the strategy's fitness keys; `more`: keys after the common
    ones), the report page's first rows (original, searched) and report.html. Returns the rows."""
    cfg, where, tokens = ctx.cfg, ctx.plan.where, ctx.plan.tokens
    total = ctx.plan.space.geometry.total_params
    ctx.run.save_json(
        "summary.json",
        {
            "model": cfg.model.path,
            "total_params": total,
            "target": cfg.budget.target,
            "best_params": result.params,
            "best_ratio": result.ratio,
            "fitness_corpus": where["fitness"],
            **fitness,
            "report_corpus": where["report"],
            "report_tokens": list(tokens["report"].shape),
            "dense_report_ppl": dense_rep,
            "best_report_ppl": best_rep,
            "generations": result.generations,
            "evaluations": result.evaluations,
            "search_seconds": wall,
            "history": result.history,
            **more,
        },
    )
    corpus = f"{where['report']}, {tokens['report'].shape[0]} x {tokens['report'].shape[1]} tokens"
    rows = [
        {"model": "original", "params": total, "kept": 1.0, "report ppl": dense_rep, "corpus": corpus},
        {"model": "searched", "params": result.params, "kept": kept, "report ppl": best_rep, "corpus": corpus},
    ]
    ctx.monitor.set_summary(rows)
    return rows


def write_search_report(ctx: RunContext) -> None:
    """report.html as the search left it (written again at the end of the run)."""
    if ctx.cfg.monitor.report:
        write_report(ctx.monitor, ctx.run.path / "report.html")
