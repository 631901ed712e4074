"""calibrate (the mask search's methods): channel importance scores and the means FLAP compensates with, from
the calibration windows on the pool; saved as scores.npz, so a resume does not calibrate again."""

from __future__ import annotations

import logging
import time

from searchllm.stages.context import RunContext

log = logging.getLogger("searchllm")


def run(ctx: RunContext) -> None:
    scores = ctx.run.load_scores()
    if scores is None:
        pool, c = ctx.need_pool(), ctx.cfg.data.calibration
        log.info("calibrating on %d windows x %d tokens of %s", c.samples, c.seqlen, ctx.plan.where["calibration"])
        ctx.monitor.stage("calibrating")
        t0 = time.perf_counter()
        with ctx.monitor.bar(len(pool.specs), "calibrate", "stage") as bar:
            scores = pool.calibrate(ctx.batch, ctx.cfg.search.score_damp, lambda: bar.update(1))
        ctx.run.save_scores(scores)
        log.info("channel scores ready in %.1fs", time.perf_counter() - t0)
    ctx.scores = scores
