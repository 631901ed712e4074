"""The level search's prefix cache: replay a finished run's logged evaluations (every candidate, in the
order the search scored them, each on its stage's tokens) with the cache off and on, in this process on
one shard, and print the seconds, the layers skipped and whether every fitness equals the logged one.

    python benchmarks/prefix_cache.py RUN [--cache-mb 2048] [--limit N] [--modes off,on]

The candidates are scored in the run's levels.score_dtype as this machine resolves it (bfloat16 for `auto`
where native), as the run's evaluators did.

RUN is a run dir of method=searchllm (its config.yaml, levels/ and evals.jsonl); its token sets come from
the driver's own token windows (`data.token_sets` with the level search's selection sets). Asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--cache-mb", type=int, default=2048)
    ap.add_argument("--limit", type=int, default=0, help="replay only the first N evaluations (0: all)")
    ap.add_argument("--modes", default="off,on", help="which of the cache off and on to replay")
    a = ap.parse_args()
    torch.set_num_threads(2)

    from searchllm.config import load_config
    from searchllm.data import data_root, token_sets
    from searchllm.models.loading import load
    from searchllm.pruning.levels import LevelSpace, load_layers
    from searchllm.pruning.prefix import PrefixCache
    from searchllm.pruning.shard import ShardRunner, ShardSpec, bf16_native, resolve_score_dtype
    from searchllm.rundir import RunDir
    from searchllm.search.levelsearch import fitness_metric, genome_from, stage_tokens
    from searchllm.stages.plan import selection_sets

    run = RunDir(Path(a.run))
    cfg = load_config([], base_file=run.path / "config.yaml")
    loaded = load(cfg.model, data_root(cfg.data.root))
    g = loaded.adapter.geometry()
    gen = run.path / "generated.pt"  # the run's sampled text, where its mixtures take some
    generated = torch.load(gen, weights_only=True)["tokens"] if gen.is_file() else None
    tokens, _ = token_sets(cfg, loaded.tokenizer, selection_sets(cfg), generated)
    space = LevelSpace(g, cfg.levels)
    folder = next(p for p in (run.path / "levels").iterdir() if p.is_dir())
    model_dtype = getattr(torch, cfg.model.dtype)
    scored = resolve_score_dtype(cfg.levels.score_dtype, model_dtype, bf16_native(torch.device("cpu")))
    runner = ShardRunner(
        loaded.adapter.architecture(),
        loaded.model.state_dict(),
        ShardSpec(0, g.num_layers, True, True),
        dtype=scored,
    )
    runner.levels, runner.level_space = load_layers(folder), space
    evals = sorted(run.load_evals().values(), key=lambda r: r["finished_at"])
    evals = evals[: a.limit] if a.limit else evals
    metric = fitness_metric(cfg.levels.fitness)
    full = [tuple(x) for x in space.full()]
    for w in selection_sets(cfg):
        if metric == "kl":
            runner.forward(full, tokens[w], tokens[w], cfg.data.batch, f"targets:{cfg.levels.topk}", w)
    rows = []
    modes = [m for m in (("off", 0), ("on", a.cache_mb)) if m[0] in a.modes.split(",")]
    for name, mb in modes:
        runner.prefix = PrefixCache(mb * 2**20) if mb else None
        if runner.prefix is not None:
            runner.prefix.set_views(tokens, cfg.data.batch)
        t0, same, worst = time.perf_counter(), 0, 0.0
        for r in evals:
            w = stage_tokens(r["stage"])
            choice = [tuple(int(v) for v in x) for x in genome_from(r["genes"], g.num_layers)]
            got = runner.forward(choice, tokens[w], tokens[w], cfg.data.batch, metric, w).value
            same += got == r["fitness"]
            worst = max(worst, abs(got - r["fitness"]) / max(abs(r["fitness"]), 1e-30))
        c = runner.prefix
        rows.append((name, time.perf_counter() - t0, c.hits if c else 0, c.skipped if c else 0, same, worst))
    print(f"{len(evals)} evaluations of {a.run} ({g.num_layers} layers), batch {cfg.data.batch}, 2 threads, {scored}")
    print("| cache | seconds | hits | layers skipped | fitness equal to the log | max rel. diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, s, hits, skipped, same, worst in rows:
        print(
            f"| {name} | {s:.1f} | {hits} | {skipped} of {len(evals) * g.num_layers} | {same}/{len(evals)} | "
            f"{worst:.1e} |"
        )


if __name__ == "__main__":
    main()
