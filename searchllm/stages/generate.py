"""generate: self-generated calibration text. Where a data.<role>.mix names `generated`, the dense model
samples the sequences the mixtures take (data.generated_need) on the evaluator pool, batched with a KV
cache on every replica at once; they are saved as <run>/generated.pt (a resume reads them back) and
the token sets that hold generated windows are rebuilt with them and handed to the pool. The stages after
see only token windows. A heal whose sources name `generated` gets text of its own, as much as heal.tokens
takes (data.heal_generated_need), in <run>/heal-generated.pt."""

from __future__ import annotations

import logging
import time

import torch

from searchllm.data import generated_need, generation_prompt, heal_generated_need, token_sets
from searchllm.stages.context import RunContext
from searchllm.stages.plan import selection_sets

log = logging.getLogger("searchllm")
HEAL_GENERATED = "heal-generated.pt"


HEAL_FIRST = 1 << 19  # the heal's sequences are seeded by index from here: none is a calibration sequence


def run(ctx: RunContext) -> None:
    calibration_text(ctx)
    heal_text(ctx)


def heal_text(ctx: RunContext) -> None:
    """The heal's own text (heal-generated.pt): what heal.tokens takes of it, sampled once; a heal asking for
    more later samples only the sequences after those kept."""
    cfg = ctx.cfg
    need = heal_generated_need(cfg)
    if need is None:
        return
    g = cfg.data.generate
    prompt = generation_prompt(ctx.loaded.tokenizer, g.chat)
    # Sampled in heal.dtype, as the heal's teacher computes: bfloat16 where native samples ~1.7x faster.
    settings = sampling(cfg, prompt, need.seqlen) | {"dtype": cfg.heal.dtype}
    have = ctx.run.load_generated(settings, HEAL_GENERATED)
    kept = 0 if have is None else have.shape[0]
    if kept < need.sequences:
        pool, count = ctx.need_pool(), need.sequences - kept
        ctx.monitor.stage("generating heal text")
        log.info("sampling %d sequences x %d tokens of heal text from the dense model", count, need.seqlen)
        # Saved a round of batches at a time (one per replica): a long heal's text (a million tokens for 2M
        # at heal.generated=0.5, over an hour on 2 cores) survives a stop; whole batches keep each
        # sequence's arithmetic what one call would give it.
        chunk = g.batch * max(1, len(pool.alive))
        t0 = time.perf_counter()
        with ctx.monitor.bar(count, "heal text", "seq") as bar:
            while kept < need.sequences:
                n = min(chunk, need.sequences - kept)
                args = (prompt, n, need.seqlen, cfg.data.seed, g.temperature, g.top_p, g.batch, bar.update)
                more = pool.generate(*args, first=HEAL_FIRST + kept, dtype=cfg.heal.dtype)
                have = more if have is None else torch.cat([have, more])
                ctx.run.save_generated(have, settings, HEAL_GENERATED)
                kept += n
        seconds, new = time.perf_counter() - t0, count * (need.seqlen - len(prompt))
        log.info("sampled %d heal tokens in %.1fs (%.0f tokens/s)", new, seconds, new / seconds)
    assert have is not None
    ctx.heal_generated = have[: need.sequences]


def sampling(cfg, prompt: list[int], seqlen: int) -> dict:
    """What fixes a sampled sequence (a cached file with other settings is sampled again)."""
    g = cfg.data.generate
    return {
        "model": cfg.model.path,
        "seqlen": seqlen,
        "seed": cfg.data.seed,
        "temperature": g.temperature,
        "top_p": g.top_p,
        "prompt": prompt,
        "batch": g.batch,  # the batch fixes the arithmetic each sequence is sampled with
    }


def calibration_text(ctx: RunContext) -> None:
    cfg = ctx.cfg
    selection = selection_sets(cfg) if ctx.plan.strategy.kind == "levels" else {}
    need = generated_need(cfg, selection)
    if need is None:
        return
    g = cfg.data.generate
    prompt = generation_prompt(ctx.loaded.tokenizer, g.chat)
    settings = sampling(cfg, prompt, need.seqlen) | {"sequences": need.sequences}
    if g.dtype != "model":  # text sampled in the model's dtype (before data.generate.dtype) stays valid
        settings["dtype"] = g.dtype
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
                prompt,
                need.sequences,
                need.seqlen,
                cfg.data.seed,
                g.temperature,
                g.top_p,
                g.batch,
                bar.update,
                dtype=g.dtype,
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
