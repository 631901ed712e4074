"""Scale: one evaluator replica on a random-weight model of a real LLaMA shape, on one device (no Ray).

    python benchmarks/scale.py [--shape llama-7b --dtype float16 --windows 5 --seqlen 2048 --candidates 6]
    python benchmarks/scale.py --shape llama3-8b --dtype bfloat16 --windows 16 --seqlen 512 --level-layers 2

Prints the layout `ray.replicas=auto ray.stages=auto` would choose for this device (its memory measured
like the Ray probe does), the time to evaluate one candidate subnet (fitness on windows x seqlen tokens,
the paper's 5 x 2048 by default) at several kept ratios against the dense model, and the time to reform
a few layers on calibration windows. From these, the wall-clock of a search of G generations of P
candidates on R such replicas is about G * P * t_eval / R. With --level-layers K > 0 also the level
database (method=searchllm): the output factors of the whole model (levels.fisher_windows windows) and
the entries of its first K layers (`levels.build_local`, conf defaults, 0.8 kept implied), per layer and
extrapolated to every layer (the build is one layer after another, so it scales with the depth). Asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "tiny": (256, 4, 4, 2, 688, 1000),  # a smoke run on CPU
    "llama-7b": (4096, 32, 32, 32, 11008, 32000),
    "llama-13b": (5120, 40, 40, 40, 13824, 32000),
    "llama3-8b": (4096, 32, 32, 8, 14336, 128256),
    "llama3-70b": (8192, 80, 64, 8, 28672, 128256),
    "smollm2-135m": (576, 30, 9, 3, 1536, 49152),
}


def random_llama(shape: str, device: str, dtype: torch.dtype, layers: int | None = None) -> torch.nn.Module:
    """A random-weight LlamaForCausalLM of one of SHAPES (its first `layers` layers), built on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, depth, heads, kv, inter, vocab = SHAPES[shape]
    layers = layers or depth
    cfg = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        vocab_size=vocab,
        max_position_embeddings=4096,
    )
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype).eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-7b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--candidates", type=int, default=6)
    ap.add_argument("--ratios", default="0.9,0.7,0.5")
    ap.add_argument("--reform-layers", type=int, default=2)
    ap.add_argument("--calib", type=int, default=16, help="calibration windows for the reformation timing")
    ap.add_argument("--round-to", default="1", help="space.round_to values to time the evaluation with, e.g. 1,8,128")
    ap.add_argument(
        "--level-layers", type=int, default=0, help="layers of the level database to build and time (0: none)"
    )
    ap.add_argument(
        "--level-calib", type=int, default=64, help="calibration windows of 512 tokens for the level database"
    )
    ap.add_argument(
        "--layers", type=int, default=0, help="build only the first N layers of the shape (0: all; sizes per layer)"
    )
    ap.add_argument(
        "--predict-only", action="store_true", help="print the predicted level database sizes of every shape, no model"
    )
    a = ap.parse_args()
    predicted_sizes()
    if a.predict_only:
        return

    from searchllm.cluster.layout import NodeInfo, choose_layout
    from searchllm.models.adapters import adapter_for
    from searchllm.pruning.reform import ReformParams, iter_reform
    from searchllm.pruning.shard import ShardRunner, ShardSpec
    from searchllm.pruning.space import Budget, SearchSpace
    from searchllm.search.evolution import Evolution, EvolutionParams

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, a.dtype)
    t0 = time.perf_counter()
    model = random_llama(a.shape, device, dtype, a.layers)
    cfg = model.config
    _, _, _, _, inter, vocab = SHAPES[a.shape]
    layers = cfg.num_hidden_layers
    build_s = time.perf_counter() - t0
    state = model.state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    mem = torch.cuda.mem_get_info()[1] if device == "cuda" else None

    class Auto:  # the keys the layout reads, as `ray.replicas=auto ray.stages=auto`
        replicas = stages = threads = "auto"
        device = "auto"

    lay = choose_layout(Auto, [NodeInfo("this", 16, 1 if mem else 0, 128 * 2**30)], nbytes, layers, mem)
    print(
        f"{a.shape} ({sum(t.numel() for t in state.values()) / 1e9:.2f}B params, {nbytes / 2**30:.2f} GiB {a.dtype}) "
        f"on {name}; "
        f"built in {build_s:.1f}s"
    )
    print(f"auto layout on this machine: {lay.why}")

    adapter = adapter_for(cfg)
    g = adapter.geometry()
    runner = ShardRunner(adapter.architecture(), state, ShardSpec(0, layers, True, True), device, dtype)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (a.windows, a.seqlen), generator=gen)
    rng = np.random.default_rng(0)

    def timed(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    if a.layers:  # a truncated model: only the level database's per-layer figures mean anything
        level_database(a, adapter, state, runner, device, dtype, vocab, gen, timed)
        return
    rows = []
    dense = SearchSpace(g).full()
    runner.forward(SearchSpace(g).slices(dense), tokens, tokens, 1)  # warm-up
    rows.append(
        (
            "1.00 (dense)",
            statistics.median(
                timed(lambda: runner.forward(SearchSpace(g).slices(dense), tokens, tokens, 1)) for _ in range(3)
            ),
        )
    )
    for ratio in (float(r) for r in a.ratios.split(",")):
        for multiple in (int(m) for m in a.round_to.split(",")):
            space = SearchSpace.for_target(g, ratio, multiple=multiple)
            budget = Budget(ratio, 0.01)
            init = space.initial(
                rng.random((layers, g.num_kv_heads, g.head_dim // 2)), rng.random((layers, inter)), budget
            )
            cands = [
                c
                for c, _ in Evolution(space, budget, EvolutionParams(population=a.candidates)).first_generation(
                    [init], rng, set()
                )
            ]
            times = [timed(lambda c=c: runner.forward(space.slices(c), tokens, tokens, 1)) for c in cands]
            rows.append(
                (
                    f"{ratio:.2f}" + (f" round {multiple}" if multiple > 1 else ""),
                    statistics.median(times[1:] or times),
                )
            )
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")

    # Reformation of the first few layers of a 0.7 subnet on calibration windows (sequential inputs).
    space = SearchSpace.for_target(g, 0.7)
    budget = Budget(0.7, 0.01)
    cand = space.initial(rng.random((layers, g.num_kv_heads, g.head_dim // 2)), rng.random((layers, inter)), budget)
    calib = torch.randint(0, vocab, (a.calib, a.seqlen), generator=gen)
    part = ShardRunner(adapter.architecture(), state, ShardSpec(0, a.reform_layers, True, False), device, dtype)
    solved = []
    it = iter_reform(part, space.slices(cand), calib, None, ReformParams(bias=True), 1)
    t = time.perf_counter()
    for res in it:
        if res is not None:
            solved.append((res.layer, time.perf_counter() - t, res.error_before, res.error_after))
            t = time.perf_counter()

    toks = a.windows * a.seqlen
    print(
        f"\n| kept ratio | evaluate one candidate ({a.windows} x {a.seqlen} tokens) s | tokens/s | evaluations/s per "
        "replica |"
    )
    print("|---|---|---|---|")
    for r, s in rows:
        print(f"| {r} | {s:.3f} | {toks / s:,.0f} | {1 / s:.2f} |")
    print(f"\npeak GPU memory while evaluating: {peak:.1f} GiB")
    print(
        f"\n| layer | reform (o+down, exact, bias) on {a.calib} x {a.seqlen} tokens s | rel. error o before -> after "
        "| down before -> after |"
    )
    print("|---|---|---|---|")
    for layer, s, before, after in solved:
        print(
            f"| {layer} | {s:.2f} | {before['o']:.4f} -> {after['o']:.4f} | {before['down']:.4f} -> "
            f"{after['down']:.4f} |"
        )
    if a.level_layers:
        level_database(a, adapter, state, runner, device, dtype, vocab, gen, timed)


def geometry(shape: str):
    from searchllm.models.adapters import Geometry

    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    norms, outer = 2 * hidden, 2 * vocab * hidden + hidden
    return Geometry(layers, hidden, heads, kv, hidden // heads, inter, vocab, False, False, False, norms, outer)


def predicted_sizes() -> None:
    """The level database's size on disk (levels.* defaults) as the driver predicts it before building."""
    from searchllm.config import LevelsConfig
    from searchllm.pruning.levels import LevelSpace, predicted_bytes

    print("| shape | layers | level database predicted (conf defaults), GiB | per layer, MiB |")
    print("|---|---|---|---|")
    for shape in SHAPES:
        space = LevelSpace(geometry(shape), LevelsConfig())
        print(
            f"| {shape} | {space.num_layers} | {predicted_bytes(space) / 2**30:.2f} | "
            f"{predicted_bytes(space, 1) / 2**20:.1f} |"
        )
    print()


def level_database(a, adapter, state, runner, device, dtype, vocab, gen, timed) -> None:
    """Times the level database: output factors of the whole model, then the first --level-layers layers."""
    import tempfile
    from pathlib import Path

    from searchllm.config import LevelsConfig
    from searchllm.pruning.levels import LevelSpace, build_local, implied_levels, predicted_bytes, save_layer
    from searchllm.pruning.shard import ShardRunner, ShardSpec

    g, p = adapter.geometry(), LevelsConfig()
    space, layers = LevelSpace(g, p), g.num_layers
    calib = torch.randint(0, vocab, (a.level_calib, 512), generator=gen)
    factors = {}
    fisher_s = timed(lambda: factors.update(runner.output_factors(calib[: p.fisher_windows], None, 1, 0)[1]))
    k = min(a.level_layers, layers)
    part = ShardRunner(adapter.architecture(), state, ShardSpec(0, k, True, False), device, dtype)
    if a.layers:  # 0.75 of the decoder (0.8 of SmolLM2 in all): the embeddings of a truncated model dominate
        decoder = layers * g.layer_params
        implied = implied_levels(space, int(g.outer_params + 0.74 * decoder), int(g.outer_params + 0.76 * decoder))
    else:
        implied = implied_levels(space, int(0.79 * g.total_params), int(0.81 * g.total_params))
    built = {}
    build_s = timed(
        lambda: built.update(build_local(part, space, implied, calib, 1, factors={i: factors[i] for i in range(k)})[0])
    )
    with tempfile.TemporaryDirectory() as tmp:  # the files the driver writes, measured
        for e in built.values():
            save_layer(Path(tmp), e)
        sizes = {int(f.stem.split("-")[1]): f.stat().st_size for f in Path(tmp).glob("layer-*.safetensors")}
    nbytes = sum(sizes.values())
    full = SHAPES[a.shape][1]
    print(
        f"\n| level database ({a.level_calib} x 512 calibration tokens, {space.mlp_top} MLP levels, {p.dtype}) | s | "
        "MiB on disk | MiB predicted |"
    )
    print("|---|---|---|---|")
    print(
        f"| output factors, all {layers} layers ({min(p.fisher_windows, a.level_calib)} x 512 tokens) | "
        f"{fisher_s:.1f} | | |"
    )
    one = predicted_bytes(space, 1) / 2**20
    for i, e in sorted(built.items()):
        print(f"| layer {i} | {e.seconds:.1f} | {sizes[i] / 2**20:.1f} | {one:.1f} |")
    print(f"| {k} layers built | {build_s:.1f} | {nbytes / 2**20:.1f} | {one * k:.1f} |")
    print(
        f"| all {full} layers of {a.shape} (extrapolated) | {build_s / k * full:.0f} | "
        f"{nbytes / k * full / 2**20:,.0f} | {one * full:,.0f} |"
    )


if __name__ == "__main__":
    main()
