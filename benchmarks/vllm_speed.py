"""vLLM's prefill and decode tokens/s of checkpoints (a dense model and its searchllm vLLM export), each in
vLLM's native implementation where it has one and through its Transformers modeling backend (the path a
per-layer export takes), eager and compiled.

    SEARCHLLM_VLLM_PYTHON=.venv-vllm/bin/python python benchmarks/vllm_speed.py DENSE_DIR RUN/export/vllm \
        [--prompt 512] [--decode 64] [--compiled]

Prints a markdown table; run it alone on the cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from searchllm.evaluate.vllm_engine import Engine, kv_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--compiled", action="store_true", help="also vLLM's compiled graphs (not enforce_eager)")
    a = ap.parse_args()
    ids = torch.randint(0, 1000, (a.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    for ckpt in map(Path, a.checkpoints):
        config = json.loads((ckpt / "config.json").read_text())
        per_layer = "per_layer_config" in config
        impls = ["transformers"] if per_layer else ["vllm", "transformers"]
        for impl in impls:
            for eager in [True, False] if a.compiled else [True]:
                n = a.prompt + a.decode + 1
                dtype = str(config.get("dtype") or config.get("torch_dtype") or "auto")
                with Engine(ckpt, n, dtype, kv_bytes(config, n), eager=eager, impl=impl) as e:
                    prefill, decode = e.speed(ids, a.decode)
                rows.append((ckpt, impl, "eager" if eager else "compiled", prefill, decode))
                print(rows[-1], flush=True)
    print(f"\n| checkpoint | vLLM implementation | mode | prefill tok/s ({a.prompt}) | decode tok/s ({a.decode}) |")
    print("|---|---|---|---:|---:|")
    for ckpt, impl, mode, p, d in rows:
        print(f"| {ckpt} | {impl} | {mode} | {p:.0f} | {d:.1f} |")


if __name__ == "__main__":
    main()
