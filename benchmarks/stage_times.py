"""Where the default run's time goes: wall seconds of every stage (RUN/timings.json, written by the driver),
one column per run, with the CPU each ran on.

    python benchmarks/stage_times.py --run runs/time-bf16 [key=value ...]   # runs the driver, then prints
    python benchmarks/stage_times.py RUN [RUN ...]                           # prints finished runs

The whole run is timed from outside (Python's start-up and imports included). Run it alone on the cores:
Ray's workers run at nice 15 and anything else running starves them. For the AVX2 path on a bf16 machine, set
ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 and nothing else: oneDNN then reports
no native bfloat16, so levels.score_dtype=auto falls back to float32 and levels.float32_share cuts the tokens, as
on an AVX2 machine (levels.score_dtype=model would score the full tokens in float32: not the default's path).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def run(run_dir: Path, overrides: list[str]) -> None:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "searchllm.driver", f"run_dir={run_dir}", *overrides], check=True)
    f = run_dir / "timings.json"
    times = json.loads(f.read_text())
    times["whole"] = round(time.perf_counter() - t0, 1)
    f.write_text(json.dumps(times, indent=2))


def table(runs: list[Path]) -> str:
    times = [json.loads((r / "timings.json").read_text()) for r in runs]
    stages = list(dict.fromkeys(s for t in times for s in t["stages"]))
    lines = ["| stage | " + " | ".join(r.name for r in runs) + " |", "|---|" + "---:|" * len(runs)]
    for s in stages:
        lines.append(f"| {s} | " + " | ".join(f"{t['stages'].get(s, float('nan')):.0f}" for t in times) + " |")
    lines.append("| sum of stages | " + " | ".join(f"{sum(t['stages'].values()):.0f}" for t in times) + " |")
    lines.append("| **whole run** | " + " | ".join(f"**{t.get('whole', float('nan')):.0f}**" for t in times) + " |")
    cpu = [t["cpu"] for t in times]
    notes = [
        f"{r.name}: {c['model']}, {c['cores']} cores, native bf16 {c['native_bf16']}, caps {c['isa_caps'] or 'none'}"
        for r, c in zip(runs, cpu)
    ]
    return "\n".join(lines + [""] + notes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="*", help="finished run dirs, or key=value overrides for --run")
    ap.add_argument("--run", default=None, help="run the default command into this run dir first")
    a = ap.parse_args()
    runs = [Path(r) for r in a.runs if "=" not in r]
    overrides = [r for r in a.runs if "=" in r]
    if a.run:
        run(Path(a.run), overrides)
        runs.append(Path(a.run))
    print(table(runs))


if __name__ == "__main__":
    main()
