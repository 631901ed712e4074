"""report: the run's page, report.html (the progress page's last state: search, structure, evaluation)."""

from __future__ import annotations

import logging

from searchllm.monitor import write_report
from searchllm.stages.context import RunContext

log = logging.getLogger("searchllm")


def run(ctx: RunContext) -> None:
    ctx.monitor.stage("done")
    if ctx.cfg.monitor.report:
        log.info("report: %s", write_report(ctx.monitor, ctx.run.path / "report.html"))
