"""Reformation on SmolLM2-135M: perplexity before/after, per solver x inputs x features, and time taken.

    python benchmarks/reform_quality.py [--ratios 0.8 0.5 --calib 16 --eval 8 --seqlen 256]

The subnets are the paper's importance-initialised uniform subnets at each kept ratio (scores from the
same calibration windows), so every variant reforms the same structure. Calibration: random windows of
WikiText-2 validation (data.seed 0); perplexity: the first windows of WikiText-2 raw *test* (held out).
Reformation runs in-process on one ShardRunner holding every layer (the actor pool runs the same code
per shard). Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.5])
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--eval", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--damps", type=float, nargs="+", default=[0.1])
    ap.add_argument("--solvers", nargs="+", default=["exact", "admm"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from searchllm.config import CorpusConfig, ModelConfig
    from searchllm.data import data_root, first_windows, load_text, random_windows, tokenize
    from searchllm.models.loading import load
    from searchllm.models.sliced import LayerSlice
    from searchllm.models.weights import share
    from searchllm.pruning.reform import FEATURES, TARGETS, ReformParams, reform_shard
    from searchllm.pruning.scores import Scores
    from searchllm.pruning.shard import ShardRunner, split_layers
    from searchllm.pruning.space import Budget, SearchSpace

    m = load(ModelConfig(), data_root("auto"))
    valid = tokenize(load_text(CorpusConfig("wikitext2", "validation"), "auto")[0], m.tokenizer)
    test = tokenize(load_text(CorpusConfig("wikitext2-raw", "test"), "auto")[0], m.tokenizer)
    calib = random_windows(valid, a.calib, a.seqlen, 0, "calibration")
    evals = first_windows(test, a.eval, a.seqlen, "report")
    g = m.adapter.geometry()
    state = share(m.model.state_dict())
    spec = split_layers(g.num_layers, 1)[0]
    scorer = ShardRunner(m.adapter.architecture(), state, spec)
    scorer.calibrate(calib, a.batch)
    sc = Scores.stack(scorer.scores)
    dense = scorer.forward([LayerSlice.full(g)] * g.num_layers, evals, batch=a.batch).ppl
    print(
        f"SmolLM2-135M, {torch.get_num_threads()} threads; calibration {a.calib}x{a.seqlen} WikiText-2 valid; "
        f"ppl on {a.eval}x{a.seqlen} WikiText-2 raw test; dense ppl {dense:.2f}\n"
    )
    print("| kept | solver | inputs | targets | features | damp | ppl before | ppl after | reform s |")
    print("|---|---|---|---|---|---|---|---|---|")
    # Targets only differ with sequential inputs (independent inputs: the original model's activations).
    modes = [("sequential", t) for t in TARGETS] + [("independent", "original")]
    for ratio in a.ratios:
        space = SearchSpace.for_target(g, ratio)
        cand = space.initial(sc.attn, sc.mlp, Budget(ratio, 0.01))
        slices = space.slices(cand)
        before = scorer.forward(slices, evals, batch=a.batch).ppl
        for solver, (inputs, targets), features, damp in itertools.product(a.solvers, modes, FEATURES, a.damps):
            runner = ShardRunner(m.adapter.architecture(), state, spec)
            t0 = time.perf_counter()
            p = ReformParams(solver=solver, inputs=inputs, features=features, targets=targets, damp=damp)
            reform_shard(runner, slices, calib, None, p, a.batch)
            secs = time.perf_counter() - t0
            after = runner.forward(slices, evals, batch=a.batch).ppl
            print(
                f"| {space.ratio(cand):.3f} | {solver} | {inputs} | {targets if inputs == 'sequential' else '-'} | "
                f"{features} | {damp:g} | {before:.2f} | {after:.2f} | {secs:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
