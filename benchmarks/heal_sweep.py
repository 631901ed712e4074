"""Heal recipes side by side on one finished run: each is `python -m searchllm.heal RUN <its settings>` (the
same subnet, the run's own evaluation protocol), and the table gives the exported model's perplexity ratio to
the original per corpus at each evaluation length, the held-out KL before and after, and tokens/s.

    python benchmarks/heal_sweep.py RUN --recipes "lr=1e-4" "lr=3e-4" "lr=1e-3 warmup=5" [--common heal.tokens=100000]

A recipe is space-separated heal.* settings (the `heal.` may be left out). Rows go to RUN/heal-sweep.json as
each heal ends (a rerun skips the recipes already there); the markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd


def settings(recipe: str) -> list[str]:
    return [a if a.startswith(("heal.", "eval.", "ray.")) else f"heal.{a}" for a in recipe.split()]


def heal(run: Path, args: list[str]) -> dict:
    rows_before = len(pd.read_parquet(run / "eval.parquet")) if (run / "eval.parquet").is_file() else 0
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "searchllm.heal", str(run), *args, "monitor.page=false"])
    try:
        rc = proc.wait()
    except KeyboardInterrupt:  # the heal got the same Ctrl-C: let it stop cleanly and print how it resumes
        raise SystemExit(proc.wait()) from None
    if rc:
        raise SystemExit(rc)
    wall = time.time() - t0
    table = pd.read_parquet(run / "eval.parquet").iloc[rows_before:]
    ppl = table[(table.metric == "ppl") & (table.status == "ok") & (table.model != "original")]
    m = json.loads((run / "manifest.json").read_text())
    h = m["heal"]
    kl = [r["held_out_kl"] for r in h["curve"] if "held_out_kl" in r]
    return {
        "ratios": {f"{r.task}@{r.seqlen}": float(r.x_original) for r in ppl.itertuples()},
        "held_out_kl": [kl[0], kl[-1]],
        "tokens": h["tokens"],
        "tokens_per_s": h["tokens_per_s"],
        "heal_seconds": h["seconds"],
        "wall_seconds": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--recipes", nargs="+", required=True)
    ap.add_argument("--common", nargs="*", default=["heal.tokens=100000"])
    a = ap.parse_args()
    run = Path(a.run)
    out = run / "heal-sweep.json"
    done = json.loads(out.read_text()) if out.is_file() else {}
    for recipe in a.recipes:
        if recipe not in done:
            done[recipe] = heal(run, [*settings(" ".join(a.common)), *settings(recipe)])
            out.write_text(json.dumps(done, indent=1))
    cols = sorted({k for r in done.values() for k in r["ratios"]}, key=lambda k: (int(k.split("@")[1]), k))
    print(f"\nexported / original perplexity after each heal ({' '.join(a.common)})\n")
    print("| recipe | " + " | ".join(cols) + " | held-out KL | tokens/s |")
    print("|---|" + "---:|" * (len(cols) + 2))
    for recipe, r in done.items():
        vals = " | ".join(f"{r['ratios'].get(c, float('nan')):.3f}" for c in cols)
        kl = f"{r['held_out_kl'][0]:.3f} -> {r['held_out_kl'][1]:.3f}"
        print(f"| {recipe} | {vals} | {kl} | {r['tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
