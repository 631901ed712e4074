"""Quality at the same budget: model x inheriting ratio x method -> WikiText-2 perplexity at 128 and at a
long length, exported parameters, and search + reformation wall time. Prints one Markdown table.

    python benchmarks/quality.py [--ratios 0.9 0.8 0.7 0.6 0.5] [--generations 4 --population 12] [--out FILE]

Methods (conf/method/*.yaml; the driver runs the same code on Ray):
  uniform            same kept ratio in every block, units by the paper's importance scores, no reformation
  uniform+reform     ablation: that subnet with searchllm's reformation (exact, fitted bias)
  flap               FLAP: WIFV metric, global threshold (AL-AM), bias compensation
  random             random search, same evaluation budget as the evolution; its best reformed as searchllm
  paper              evolution from the uniform subnet + ADMM reformation (rho 1, 30 iterations)
  paper+exact        ablation: the paper's best subnet, exact solver (no bias)
  paper+exact+bias   ablation: the paper's best subnet, exact solver with a fitted o/down bias
  searchllm-noflap   ablation: the best of the paper search's top-3 parents after reformation (+bias)
  searchllm          the best after reformation (+bias) of the top-3 parents and FLAP's subnet
  init=flap, compensate  (--extra) searchllm with FLAP's subnet in generation 0 / with FLAP's bias
                     compensation in every fitness evaluation (options whose effect was mixed)
The searches aim below the target by the parameters of the biases they will add (2 x hidden per block).
Everything is in-process on one shard (no Ray), the search on the same calibration scores for every
method. Calibration and fitness on WikiText-2 validation; perplexity on WikiText-2 raw test (held out).
Every subnet is exported (physically sliced) and its real parameter count is reported.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    ap.add_argument("--methods", nargs="+", default=["uniform", "uniform+reform", "flap", "random", "paper", "paper+exact", "paper+exact+bias",
                                                  "searchllm-noflap", "searchllm"])
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--population", type=int, default=12)
    ap.add_argument("--calib", type=int, default=16, help="calibration windows (scores and reformation)")
    ap.add_argument("--fitness", type=int, default=2, help="fitness windows")
    ap.add_argument("--final", type=int, default=16, help="windows of the fitness corpus that judge the finalists")
    ap.add_argument("--seqlen", type=int, default=256, help="calibration and fitness window length")
    ap.add_argument("--short", type=int, default=32, help="windows of 128 tokens for ppl@128")
    ap.add_argument("--long", type=int, default=2, help="windows of --long-len tokens for the long perplexity")
    ap.add_argument("--long-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the rows as CSV")
    a = ap.parse_args()

    import pandas as pd

    from searchllm.baselines import bias_params, flap, flap_biases
    from searchllm.config import CorpusConfig, ModelConfig
    from searchllm.data import data_root, first_windows, load_text, random_windows, tokenize
    from searchllm.evaluate import count_params, perplexity
    from searchllm.evolution import Evolution, EvolutionParams, RandomSearch
    from searchllm.export import build
    from searchllm.models.loading import load
    from searchllm.models.weights import share
    from searchllm.reform import ReformParams, reform_shard
    from searchllm.rundir import RunDir
    from searchllm.scores import Scores
    from searchllm.search import LocalEvaluator, Search
    from searchllm.shard import ShardRunner, split_layers
    from searchllm.space import Budget, SearchSpace

    torch.manual_seed(a.seed)
    m = load(ModelConfig(), data_root("auto"))
    valid = tokenize(load_text(CorpusConfig("wikitext2", "validation"), "auto")[0], m.tokenizer)
    test = tokenize(load_text(CorpusConfig("wikitext2-raw", "test"), "auto")[0], m.tokenizer)
    calib = random_windows(valid, a.calib, a.seqlen, a.seed, "calibration")
    fitness = first_windows(valid, a.fitness, a.seqlen, "fitness")
    final = first_windows(valid, a.final, a.seqlen, "final")
    short = first_windows(test, a.short, 128, "ppl@128")
    long = first_windows(test, a.long, a.long_len, f"ppl@{a.long_len}")
    g = m.adapter.geometry()
    state = share(m.model.state_dict())
    orig_state = m.model.state_dict()
    spec = split_layers(g.num_layers, 1)[0]
    scorer = ShardRunner(m.adapter, state, spec)
    t0 = time.perf_counter()
    scorer.calibrate(calib)
    scores = Scores.stack(scorer.scores)
    calib_s = time.perf_counter() - t0
    dense128, dense_long = perplexity(m.model, short).ppl, perplexity(m.model, long).ppl
    evo = EvolutionParams(population=a.population, parents=max(2, a.population // 4), mutations=a.population // 2,
                          crossovers=max(1, a.population // 3))
    exact = ReformParams()
    ours = ReformParams(bias=True)
    admm = ReformParams(solver="admm", rho=1.0, iters=30)
    print(f"SmolLM2-135M-Instruct (fp32, {torch.get_num_threads()} threads). Calibration {a.calib}x{a.seqlen} and fitness "
          f"{a.fitness}x{a.seqlen} tokens of WikiText-2 valid (seed {a.seed}), finalists judged on {a.final}x{a.seqlen}; perplexity on WikiText-2 raw test, first "
          f"{a.short}x128 and {a.long}x{a.long_len} tokens. Search budget: {a.generations} generations x population "
          f"{a.population} (paper: 50 x 100). Calibration pass {calib_s:.0f}s (shared by all methods).")
    print(f"dense: ppl@128 {dense128:.2f}, ppl@{a.long_len} {dense_long:.2f}, {g.total_params / 1e6:.2f}M params\n", flush=True)
    print(f"| ratio | method | ppl@128 | ppl@{a.long_len} | params (M) | kept | search+reform s |")
    print("|---|---|---|---|---|---|---|")
    rows = []

    means = {i: (scores.mean_o[i], scores.mean_down[i]) for i in range(g.num_layers)}

    def search(space, budget, strategy, inits, seed, compensate):
        runner = ShardRunner(m.adapter, state, spec)
        runner.means = means if compensate else {}
        with tempfile.TemporaryDirectory() as d:
            s = Search(space, strategy(space, budget, evo), LocalEvaluator(space, [runner], fitness), RunDir(d).create(),
                       seed, a.generations)
            return s.run_search(inits)

    reforms: dict[tuple, tuple] = {}  # (subnet, params) -> (weights, fitness after, seconds)

    def reform(space, cand, params):
        key = (cand.key(), repr(params))
        if key not in reforms:
            runner = ShardRunner(m.adapter, state, spec)
            t0 = time.perf_counter()
            _, _, res = reform_shard(runner, space.slices(cand), calib, None, params, 1)
            secs = time.perf_counter() - t0
            reforms[key] = ({r.layer: r.weights for r in res}, runner.forward(space.slices(cand), final).ppl, secs)
        return reforms[key]

    def best_after_reform(space, cands, params):
        """The reformation-aware final choice: the lowest perplexity after reformation on the final windows."""
        done = [(c, *reform(space, c, params)) for c in cands]
        cand, weights, _, _ = min(done, key=lambda x: x[2])
        return cand, weights, sum(x[3] for x in done)

    def finish(ratio, method, space, cand, params, overrides, seconds):
        slices = space.slices(cand)
        if params is not None:
            overrides, _, secs = reform(space, cand, params)
            seconds += secs
        model, info = build(m.adapter, orig_state, slices, overrides)
        p128, plong = perplexity(model, short).ppl, perplexity(model, long).ppl
        total, _ = count_params(model)
        row = dict(model="SmolLM2-135M", ratio=ratio, method=method, ppl128=p128, ppl_long=plong, params=total,
                   kept=total / g.total_params, seconds=seconds)
        rows.append(row)
        print(f"| {ratio} | {method} | {p128:.2f} | {plong:.2f} | {total / 1e6:.2f} | {total / g.total_params:.3f} | {seconds:.0f} |",
              flush=True)

    for ratio in a.ratios:
        space = SearchSpace.for_target(g, ratio)
        budget = Budget(ratio, 0.01)
        # Methods that add biases pay for them: their subnets aim that much lower.
        biased = Budget(ratio - bias_params(space) / g.total_params, 0.01)
        uniform = space.initial(scores.attn, scores.mlp, budget)
        flap_cand = flap(space, scores, budget)
        searches: dict[tuple, tuple] = {}  # rows that differ only in the solver share one search

        def searched(strategy, seeds, b, compensate=False):
            key = (strategy.__name__, tuple(c.key() for c in seeds), b.target, compensate)
            if key not in searches:
                t0 = time.perf_counter()
                searches[key] = (search(space, b, strategy, seeds, a.seed, compensate), time.perf_counter() - t0)
            return searches[key]

        paper_init = [space.initial(scores.attn, scores.mlp, biased)]
        for method in a.methods:
            if method == "uniform":
                finish(ratio, method, space, uniform, None, {}, 0.0)
            elif method == "uniform+reform":
                finish(ratio, method, space, paper_init[0], ours, {}, 0.0)
            elif method == "flap":
                t0 = time.perf_counter()
                biases = flap_biases(m.adapter, orig_state, space.slices(flap_cand), scores)
                finish(ratio, method, space, flap_cand, None, biases, time.perf_counter() - t0)
            elif method == "random":
                res, secs = searched(RandomSearch, [], biased)
                finish(ratio, method, space, res.best, ours, {}, secs)
            elif method in ("paper", "paper+exact"):
                res, secs = searched(Evolution, [uniform], budget)
                finish(ratio, method, space, res.best, admm if method == "paper" else exact, {}, secs)
            elif method in ("paper+exact+bias", "searchllm-noflap", "searchllm", "init=flap", "compensate"):
                seeds = paper_init + ([flap_cand] if method == "init=flap" else [])
                res, secs = searched(Evolution, seeds, biased, compensate=method == "compensate")
                cands = [c for c, _ in res.finalists[: 1 if method == "paper+exact+bias" else 3]]
                if method not in ("paper+exact+bias", "searchllm-noflap"):
                    cands.append(flap_cand)
                cand, weights, reform_s = best_after_reform(space, cands, ours)
                finish(ratio, method, space, cand, None, weights, secs + reform_s)
            else:
                raise SystemExit(f"unknown method {method!r}; choose from the list in this script's docstring")
    table = pd.DataFrame(rows)
    if a.out:
        table.to_csv(a.out, index=False)
    wins = []
    for ratio, grp in table.groupby("ratio"):
        by = dict(zip(grp.method, grp.ppl_long))
        if "searchllm" in by:
            wins.append(f"{ratio}: " + ", ".join(f"{'<' if by['searchllm'] < v else '>='} {k}" for k, v in by.items() if k != "searchllm"))
    print("\nsearchllm ppl@long vs the others, per ratio:\n  " + "\n  ".join(wins))


if __name__ == "__main__":
    main()
