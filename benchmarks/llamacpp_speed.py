"""Speed in llama.cpp: the original model against the export, type for type, from a finished run with
export.format=gguf|both and its evaluation (which writes RUN/original-gguf/).

    python benchmarks/llamacpp_speed.py RUN [--repeats 5] [--prompt 512] [--decode 128] [--threads 2]

Each measurement is `searchllm.evaluate.llamacpp.speed` (the prompt in one batch, then tokens one at a time); the
original and the export alternate, and the table shows the best of the repeats (shared or virtual CPUs
only ever slow a run down: repeats of one file vary by +-20% on the 2-core dev machine) and the ratio
against issue 15's goals: prefill >= 0.9 / kept, decode >= 0.8 / kept.
"""

import argparse
import json
from pathlib import Path

import torch

from searchllm.evaluate import llamacpp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    run = Path(a.run)
    m = json.loads((run / "manifest.json").read_text())
    kept = m["ratio"]["actual"]
    ids = torch.randint(0, 1000, (a.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    print(
        f"{run}: kept {kept:.3f}; prompt {a.prompt}, decode {a.decode} tokens, {a.threads} threads, best of {a.repeats}"
    )
    print(
        "| type | original MiB | export MiB | original prefill tok/s | export prefill tok/s | ratio (goal) | "
        "original decode tok/s | export decode tok/s | ratio (goal) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for f in m["export"]["gguf"]["files"]:
        t, exp = f["type"], Path(f["path"])
        orig = run / "original-gguf" / exp.name
        got = {"o": [], "e": []}
        for _ in range(a.repeats):
            for k, p in (("o", orig), ("e", exp)):
                got[k].append(llamacpp.speed(p, ids, a.decode, a.threads))
        med = {k: (max(x[0] for x in v), max(x[1] for x in v)) for k, v in got.items()}
        (op, od), (ep, ed) = med["o"], med["e"]
        print(
            f"| {t} | {orig.stat().st_size / 2**20:.1f} | {exp.stat().st_size / 2**20:.1f} | {op:.0f} | {ep:.0f} | "
            f"{ep / op:.2f}x ({0.9 / kept:.2f}x) | {od:.1f} | {ed:.1f} | {ed / od:.2f}x ({0.8 / kept:.2f}x) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
