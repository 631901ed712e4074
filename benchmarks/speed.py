"""Speed of exported subnets against the dense model: prefill tokens/s over a batch x length grid, decode
tokens/s with the KV cache, weights and peak memory, all in one run with the same settings; and the
cost of channel-level sizes against hardware-friendly rounding (`space.round_to`).

    python benchmarks/speed.py                                   # SmolLM2-135M, CPU
    python benchmarks/speed.py --shape llama-7b --dtype float16  # random weights of a real shape, GPU

Each subnet is the paper's importance-initialised uniform subnet at the ratio (SmolLM2: scores from a
short calibration pass, and its perplexity on a few WikiText-2 test windows, without reformation, shows
what the rounding costs in quality; random shapes: random scores), exported by `export.build` exactly as
the driver exports. "ideal" is 1 / kept decoder-parameter share, what prefill could gain if time followed
the decoder's matrix work. Prints a table; asserts nothing.

Decode is measured twice on a GPU: eagerly with the dynamic KV cache (what plain `generate()` does, bound
by Python and kernel launches for a 7B model at batch 1), and with a static KV cache whose one-token step
is captured once as a CUDA graph and replayed (`--graphs`; what `generate(cache_implementation="static")`
gets from its automatic torch.compile, without the compile time), where time follows the weights read.
`--compile` adds a third: the same graphed step, with the forward compiled by torch.compile (inductor
fuses the many small element-wise kernels whose fixed cost still dominates a graphed 7B step at batch 1).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from scale import SHAPES, random_llama  # benchmarks/ is the script's directory, so on sys.path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2", choices=["smollm2", *SHAPES])
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, float16 on GPU")
    ap.add_argument("--ratios", default="0.9,0.7,0.5")
    ap.add_argument("--round-to", default="1,8,64")
    ap.add_argument("--prefill", default=None, help="batch x length grid, e.g. 1x256,4x256")
    ap.add_argument("--decode", default=None, help="batches for decoding, e.g. 1,8")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--graphs",
        choices=["auto", "yes", "no"],
        default="auto",
        help="also decode with a static cache as a CUDA graph (auto: on GPU)",
    )
    ap.add_argument(
        "--compile", action="store_true", help="also decode with the graphed step compiled by torch.compile"
    )
    a = ap.parse_args()

    from searchllm.export.hf import build
    from searchllm.models.adapters import adapter_for
    from searchllm.pruning.space import Budget, SearchSpace

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    dtype = getattr(torch, a.dtype or ("float16" if gpu else "float32"))
    prefill = [
        tuple(int(v) for v in x.split("x"))
        for x in (a.prefill or ("1x2048,8x2048" if gpu else "1x256,4x256")).split(",")
    ]
    decode = [int(b) for b in (a.decode or ("1,16" if gpu else "1,4")).split(",")]
    new_tokens = a.new_tokens or (128 if gpu else 32)
    graphs = a.graphs == "yes" or (a.graphs == "auto" and gpu)
    if not gpu:
        torch.set_num_threads(torch.get_num_threads())

    ppl_windows = None
    if a.shape == "smollm2":
        from searchllm.config import CorpusConfig, ModelConfig
        from searchllm.data import data_root, first_windows, load_text, random_windows, tokenize
        from searchllm.models.weights import share
        from searchllm.pruning.shard import ShardRunner, split_layers

        loaded = load_model_smollm2(ModelConfig, data_root)
        model, adapter = loaded.model.to(dtype), loaded.adapter
        g = adapter.geometry()
        calib = random_windows(
            tokenize(load_text(CorpusConfig("wikitext2", "validation"), "auto")[0], loaded.tokenizer),
            8,
            256,
            0,
            "calib",
        )
        runner = ShardRunner(adapter.architecture(), share(model.state_dict()), split_layers(g.num_layers, 1)[0])
        runner.calibrate(calib, 4, 0.01)
        attn_scores = np.stack([runner.scores[i].attn for i in range(g.num_layers)])
        mlp_scores = np.stack([runner.scores[i].mlp for i in range(g.num_layers)])
        ppl_windows = first_windows(
            tokenize(load_text(CorpusConfig("wikitext2-raw", "test"), "auto")[0], loaded.tokenizer), 8, 256, "ppl"
        )
        name = "SmolLM2-135M"
    else:
        model = random_llama(a.shape, device, dtype)
        adapter = adapter_for(model.config)
        g = adapter.geometry()
        rng = np.random.default_rng(0)
        attn_scores, mlp_scores = (
            rng.random((g.num_layers, g.num_kv_heads, g.head_dim // 2)),
            rng.random((g.num_layers, g.intermediate)),
        )
        name = f"{a.shape} (random weights)"
    model = model.to(device).eval()
    state = model.state_dict()
    vocab = model.config.vocab_size

    rows = [
        (
            "dense",
            1.0,
            1.0,
            measure(model, vocab, prefill, decode, new_tokens, a.repeats, device, graphs, a.compile),
            ppl(model, ppl_windows),
        )
    ]
    for ratio in (float(r) for r in a.ratios.split(",")):
        for multiple in (int(m) for m in a.round_to.split(",")):
            space = SearchSpace.for_target(g, ratio, multiple=multiple)
            budget = Budget(ratio, 0.01)
            try:
                cand = space.initial(attn_scores, mlp_scores, budget)
            except Exception as e:  # a coarse grid may miss a narrow band
                print(f"skip ratio {ratio} round_to {multiple}: {e}")
                continue
            sub, info = build(adapter, state, space.slices(cand), {}, dtype)
            sub = sub.to(device).eval()
            kept, dec = space.ratio(cand, "total"), space.ratio(cand, "decoder")
            rows.append(
                (
                    f"{ratio:g} / round {multiple}",
                    kept,
                    dec,
                    measure(sub, vocab, prefill, decode, new_tokens, a.repeats, device, graphs, a.compile),
                    ppl(sub, ppl_windows),
                )
            )
            del sub
            if gpu:
                torch.cuda.empty_cache()

    where = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"\n{name}, {str(dtype).removeprefix('torch.')}, {where}; decode: {new_tokens} new tokens after a 32-token "
        "prompt\n"
    )
    base = rows[0][3]
    head = (
        ["subnet", "kept", "decoder kept", "ideal x"]
        + [f"prefill {b}x{n} tok/s (x)" for b, n in prefill]
        + [f"decode b{b} tok/s (x)" for b in decode]
        + ([f"{'graphed' if gpu else 'static-cache'} decode b{b} tok/s (x)" for b in decode] if graphs else [])
        + (
            [f"compiled {'graphed' if gpu else 'static-cache'} decode b{b} tok/s (x)" for b in decode]
            if a.compile
            else []
        )
        + ["weights MiB", "peak MiB"]
        + (["ppl (no reform)"] if ppl_windows is not None else [])
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for label, kept, dec, m, p in rows:
        cells = [label, f"{kept:.3f}", f"{dec:.3f}", f"{1 / dec:.2f}"]
        cells += [f"{m['prefill'][k]:,.0f} ({m['prefill'][k] / base['prefill'][k]:.2f})" for k in range(len(prefill))]
        for key in ("decode",) + (("graphed",) if graphs else ()) + (("compiled",) if a.compile else ()):
            cells += [f"{m[key][k]:,.1f} ({m[key][k] / base[key][k]:.2f})" for k in range(len(decode))]
        cells += [f"{m['weights']:.0f}", f"{m['peak']:.0f}" if m["peak"] else "-"]
        if p is not None:
            cells.append(f"{p:.2f}")
        print("| " + " | ".join(cells) + " |")


def load_model_smollm2(model_config, data_root):
    from searchllm.models.loading import load

    return load(model_config(), data_root("auto"))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def static_decode(model, ids: torch.Tensor, new_tokens: int, graph: bool, forward=None) -> tuple[float, torch.Tensor]:
    """Greedy decoding with a static KV cache: (seconds for `new_tokens` steps, the generated tokens).
    For full-attention models (a sliding layer's static cache is only its window long).

    Every step reads the same tensors (token, position, mask, cache), so with `graph` the step is
    captured once as a CUDA graph and replayed; the cache's write position is a tensor it advances itself.
    `forward` (a compiled model) runs the one-token steps in place of the model."""
    from transformers import StaticCache

    b, n = ids.shape
    dev = ids.device
    length = n + new_tokens + 3  # room for the 3 warm-up steps
    cache = StaticCache(config=model.config, max_cache_len=length)
    mask = torch.zeros(b, 1, 1, length, dtype=torch.bool, device=dev)  # keys each step may see
    tok = torch.zeros(b, 1, dtype=torch.long, device=dev)
    pos = torch.zeros(b, 1, dtype=torch.long, device=dev)

    def prefill() -> None:
        cache.reset()
        mask.zero_()
        mask[..., :n] = True
        logits = model(
            ids, past_key_values=cache, use_cache=True, position_ids=torch.arange(n, device=dev)[None].expand(b, -1)
        ).logits
        tok.copy_(logits[:, -1:].argmax(-1))

    def step() -> torch.Tensor:
        return (
            (model if forward is None else forward)(
                tok, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True
            )
            .logits[:, -1:]
            .argmax(-1)
        )

    def warm_up() -> None:  # compiles `forward`; the layers' static tensors exist once a forward has run
        prefill()
        for p in range(n, n + 3):
            mask[..., p] = True
            pos.fill_(p)
            tok.copy_(step())

    run = step
    if graph:  # warm up on a side stream, then capture, as torch.cuda.graphs asks
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            warm_up()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            nxt = step()
        run = lambda: (g.replay(), nxt)[1]  # noqa: E731
    elif forward is not None:
        warm_up()
    prefill()
    out = []
    sync(dev.type)
    t0 = time.perf_counter()
    for p in range(n, n + new_tokens):
        out.append(tok.clone())
        mask[..., p] = True
        pos.fill_(p)
        tok.copy_(run())
    sync(dev.type)
    return time.perf_counter() - t0, torch.cat(out, 1)


@torch.no_grad()
def measure(
    model,
    vocab: int,
    prefill,
    decode,
    new_tokens: int,
    repeats: int,
    device: str,
    graphs: bool = False,
    compile: bool = False,
) -> dict:
    gen = torch.Generator().manual_seed(0)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {"prefill": [], "decode": [], "graphed": [], "compiled": [], "weights": weights / 2**20}
    compiled = torch.compile(model, dynamic=False) if compile else None
    if device == "cuda":  # peak of this model alone: what else is resident (the dense model) is taken out
        torch.cuda.reset_peak_memory_stats()
        others = torch.cuda.memory_allocated() - weights
    for b, n in prefill:
        ids = torch.randint(0, vocab, (b, n), generator=gen).to(device)
        model(ids, use_cache=False)  # warm-up
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            model(ids, use_cache=False)
            sync(device)
            times.append(time.perf_counter() - t0)
        out["prefill"].append(b * n / statistics.median(times))
    for b in decode:
        ids = torch.randint(0, vocab, (b, 32), generator=gen).to(device)
        times = []
        for _ in range(max(1, repeats - 1) + 1):  # the first is a warm-up
            res = model(ids, use_cache=True)
            past, nxt = res.past_key_values, res.logits[:, -1:].argmax(-1)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                res = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = res.past_key_values, res.logits[:, -1:].argmax(-1)
            sync(device)
            times.append(time.perf_counter() - t0)
        out["decode"].append(b * new_tokens / statistics.median(times[1:]))
        for key, on, forward in (("graphed", graphs, None), ("compiled", compile, compiled)):
            if not on:
                continue
            try:
                secs = [static_decode(model, ids, new_tokens, device == "cuda", forward)[0] for _ in range(repeats)]
                out[key].append(b * new_tokens / statistics.median(secs))
            except Exception as e:  # report the row without it rather than lose the whole table
                print(f"{key} decode failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                out[key].append(float("nan"))
        print(
            f"  measured batch {b}: "
            + ", ".join(f"{k} {out[k][-1]:.1f} tok/s" for k in ("decode", "graphed", "compiled") if out[k]),
            flush=True,
        )
    out["peak"] = (torch.cuda.max_memory_allocated() - others) / 2**20 if device == "cuda" else None
    return out


@torch.no_grad()
def ppl(model, windows) -> float | None:
    if windows is None:
        return None
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for w in windows:
        w = w[None].to(device)
        logits = model(w, use_cache=False).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits[0, :-1], w[0, 1:], reduction="sum"))
        count += w.shape[1] - 1
    return float(np.exp(total / count))


if __name__ == "__main__":
    main()
