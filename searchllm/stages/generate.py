"""generate: self-generated calibration text. Where a data.<role>.mix names `generated`, the dense model
samples the sequences the mixtures take (data.generated_need) on the evaluator pool, batched with a KV
cache on every replica at once; they are saved as <run>/generated.pt (a resume reads them back) and
the token sets that hold generated windows are rebuilt with them and handed to the pool. The stages after
see only token windows."""

from __future__ import annotations

import logging
import time

from searchllm.data import generated_need, generation_prompt, token_sets
from searchllm.stages.context import RunContext
from searchllm.stages.plan import selection_sets

log = logging.getLogger("searchllm")


def run(ctx: RunContext) -> None:
    cfg = ctx.cfg
    selection = selection_sets(cfg) if ctx.plan.strategy.kind == "levels" else {}
    need = generated_need(cfg, selection)
    if need is None:
        return
    g = cfg.data.generate
    prompt = generation_prompt(ctx.loaded.tokenizer, g.chat)
    settings = {
        "model": cfg.model.path,
        "sequences": need.sequences,
        "seqlen": need.seqlen,
        "seed": cfg.data.seed,
        "temperature": g.temperature,
        "top_p": g.top_p,
        "prompt": prompt,
        "batch": g.batch,  # the batch fixes the arithmetic each sequence is sampled with
    }
    generated = ctx.run.load_generated(settings)
    if generated is None:
        pool = ctx.need_pool()
        ctx.monitor.stage("generating calibration text")
        log.info(
            "sampling %d sequences x %d tokens from the dense model (temperature %g, top-p %g, %s)",
            need.sequences,
            need.seqlen,
            g.temperature,
            g.top_p,
            "from the chat template's first user turn" if len(prompt) > 1 else "from BOS",
        )
        t0 = time.perf_counter()
        with ctx.monitor.bar(need.sequences, "generate", "seq") as bar:
            generated = pool.generate(
                prompt, need.sequences, need.seqlen, cfg.data.seed, g.temperature, g.top_p, g.batch, bar.update
            )
        seconds = time.perf_counter() - t0
        new = need.sequences * (need.seqlen - len(prompt))
        log.info("sampled %d tokens in %.1fs (%.0f tokens/s)", new, seconds, new / seconds)
        ctx.run.save_generated(generated, settings)
        ctx.run.save_json("generated.json", settings | {"seconds": seconds, "tokens_per_s": new / seconds})
    else:
        log.info("generated calibration text: %d sequences read back from generated.pt", generated.shape[0])
    ctx.generated = generated
    tokens, _ = token_sets(cfg, ctx.loaded.tokenizer, selection, generated)
    changed = {k: v for k, v in tokens.items() if not v.equal(ctx.plan.tokens[k])}
    ctx.plan.tokens.update(changed)
    if ctx.pool is not None:
        ctx.pool.set_tokens(changed)
