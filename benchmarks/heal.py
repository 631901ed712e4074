"""Heal throughput: tokens/s of the heal (healing.distill.train) against a plain single-process torch loop
doing the same work (teacher forward, student forward and backward, full logits, KL, AdamW), in-process and
on Ray Train with 1 and 2 workers, on the export of a finished run.

    python benchmarks/heal.py RUN [--steps 6] [--modes plain inprocess ray1 ray2] [-- heal.key=value ...]

RUN is a finished run (its export/ is the student, its config's model the teacher); the windows are the
run's heal windows (data.heal_windows with the heal.* given). The first step of each mode is warm-up and
left out of its rate. A random-weight model of a real shape (--shape llama3-8b) replaces the run's models
where a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch


def plain_loop(job, steps: int) -> float:
    """The reference: no chunking, no Ray, no checkpoints. Returns tokens/s after the first step."""
    from searchllm.healing.distill import autocast, compute_dtype, load_models

    h = job.params
    device = torch.device("cpu")
    dtype = compute_dtype(h["dtype"], device)
    student, teacher = load_models(job, device, dtype)
    windows = torch.load(job.windows, weights_only=True)["train"]
    opt = torch.optim.AdamW(student.parameters(), lr=h["lr"], betas=(0.9, 0.95))
    t0 = 0.0
    for step in range(steps):
        if step == 1:
            t0 = time.perf_counter()
        ids = windows[step * h["batch"] : (step + 1) * h["batch"]]
        with torch.no_grad(), autocast(device, dtype):
            t = teacher(ids).logits.float()
        with autocast(device, dtype):
            s = student(ids).logits.float()
        loss = torch.nn.functional.kl_div(
            torch.log_softmax(s, -1).flatten(0, 1),
            torch.log_softmax(t, -1).flatten(0, 1),
            log_target=True,
            reduction="batchmean",
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), h["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (steps - 1) * h["batch"] * windows.shape[1] / (time.perf_counter() - t0)


def rate_of(folder: Path) -> float:
    """tokens/s of a heal's steps after its first (progress.jsonl's step_seconds)."""
    recs = [json.loads(line) for line in (folder / "progress.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r][1:]
    return sum(r["tokens"] / r["step"] for r in steps) / sum(r["step_seconds"] for r in steps)


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--modes", nargs="+", default=["plain", "inprocess", "ray1", "ray2"])
    a = ap.parse_args(argv)

    import pandas as pd

    from searchllm.cluster.connect import connect
    from searchllm.cluster.train import RayHealer
    from searchllm.config import load_config
    from searchllm.data import data_root, heal_windows
    from searchllm.healing.distill import HealJob, train
    from searchllm.models.loading import load_tokenizer, resolve

    run = Path(a.run)
    cfg = load_config(extra, base_file=run / "config.yaml")
    cfg.heal.tokens = a.steps * cfg.heal.batch * cfg.heal.seqlen
    generated = (
        torch.load(run / "generated.pt", weights_only=True)["tokens"] if (run / "generated.pt").is_file() else None
    )
    root = Path(tempfile.mkdtemp(prefix="heal-bench-"))
    w = heal_windows(cfg, load_tokenizer(cfg.model, data_root(cfg.data.root)), generated)
    torch.save({"train": w.train, "eval": w.eval[:1]}, root / "windows.pt")
    teacher = resolve(cfg.model, data_root(cfg.data.root))
    params = asdict(cfg.heal) | {"eval_every": 10**9, "checkpoint_every": 10**9}

    def job(name: str) -> HealJob:
        (root / name).mkdir()
        return HealJob(str(run / "export"), teacher, str(root / "windows.pt"), str(root / name), params)

    rows = []
    for mode in a.modes:
        workers = {"ray1": 1, "ray2": 2}.get(mode, 1)
        if mode == "plain":
            rate = plain_loop(job(mode), a.steps)
        elif mode == "inprocess":
            torch.set_num_threads(int(cfg.heal.cpus_per_worker) if cfg.heal.cpus_per_worker != "auto" else 2)
            train(job(mode))
            rate = rate_of(root / mode)
        else:
            connect(cfg.ray)
            cfg.heal.workers = workers
            t0 = time.time()
            RayHealer(cfg.heal, cfg.ray, "bench")(job(mode))
            rate = rate_of(root / mode)
            print(f"{mode}: {time.time() - t0:.0f}s with start-up", flush=True)
        rows.append({"mode": mode, "workers": workers, "tokens/s": rate})
        print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    base = df[df["mode"] == "plain"]["tokens/s"]
    if len(base):
        df["x plain"] = df["tokens/s"] / float(base.iloc[0])
    print(
        f"heal throughput, {cfg.heal.batch} x {cfg.heal.seqlen} tokens per step, dtype {cfg.heal.dtype}, "
        f"{a.steps - 1} timed steps, student {run / 'export'}"
    )
    print(df.to_markdown(index=False, floatfmt=".3g"))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
