"""Level database settings -> quality of the database's uniform assignments, before any search.

    python benchmarks/level_db.py [calib=64] [seqlen=512] [target=0.8] [LevelParams field=value ...]

Builds the level database in this process (`ShardRunner.output_factors` and `levels.build_local`: what the
stage actors run, on one shard), then scores the uniform assignments of the top attention levels (every block at the
same levels,
the MLP filling the budget) by mean KL from the dense model (top-256) and perplexity on WikiText-2
*validation* windows 8..23 of 512 tokens: past the level search's own selection windows, and never the
test split. Calibration: `calib` random windows of WikiText-2 validation (seed 0), as the driver draws them.
"""

import sys
import time

import torch

from searchllm.config import CorpusConfig, ModelConfig
from searchllm.data import data_root, first_windows, load_text, random_windows, tokenize
from searchllm.models.loading import load
from searchllm.pruning.levels import LevelDatabase, LevelParams, LevelSpace, build_local, implied_levels, uniform_genome
from searchllm.pruning.shard import ShardRunner, ShardSpec


def main() -> None:
    torch.set_num_threads(2)
    kw = dict(a.split("=", 1) for a in sys.argv[1:])
    calib_n, seqlen, target = int(kw.pop("calib", 64)), int(kw.pop("seqlen", 512)), float(kw.pop("target", 0.8))
    params = LevelParams(**{k: type(getattr(LevelParams, k))(v) for k, v in kw.items()})
    loaded = load(ModelConfig(), data_root("auto"))
    g = loaded.adapter.geometry()
    ids = tokenize(load_text(CorpusConfig(name="wikitext2", split="validation"), "auto")[0], loaded.tokenizer)
    calib = random_windows(ids, calib_n, seqlen, 0, "calibration")
    held = first_windows(ids, 24, 512, "evaluation")[8:24]
    runner = ShardRunner(
        loaded.adapter.architecture(), loaded.model.state_dict(), ShardSpec(0, g.num_layers, True, True)
    )
    space = LevelSpace(g, params)
    band = (int((target - 0.01) * g.total_params), int((target + 0.01) * g.total_params))
    t0 = time.time()
    factors = (
        runner.output_factors(calib[: params.fisher_windows], None, 2, 0)[1] if params.weighting == "fisher" else None
    )
    t1 = time.time()
    layers, _ = build_local(runner, space, implied_levels(space, *band), calib, 2, factors=factors)
    print(f"output factors {t1 - t0:.0f} s, build {time.time() - t1:.0f} s, {params}, calibration {calib_n} x {seqlen}")
    db = LevelDatabase(space, layers)
    runner.levels, runner.level_space = layers, space
    runner.forward([tuple(x) for x in space.full()], held, held, 2, "targets:256", "held")
    for a in range(space.attn_top, max(space.attn_top - 2, -1), -1):
        genome = uniform_genome(space, db.params, *band, a)
        if genome is None:
            continue
        choice = [tuple(x) for x in genome]
        kl = runner.forward(choice, held, held, 2, "kl", "held").value
        ppl = runner.forward(choice, held, held, 2).ppl
        print(
            f"attention level {a}: kept {db.params(genome) / g.total_params:.4f}, KL {kl:.4f}, ppl {ppl:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
