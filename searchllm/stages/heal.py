"""heal: full-parameter distillation of the built subnet from the original model (healing.distill), on the
run's healer (Ray Train workers; the driver sets ctx.healer), after the evaluator pool is gone and before
the export is written, so every export format holds the healed weights.

Everything lives in <run>/heal/<tag>/ (tag: the heal settings and the subnet's weights): student/ (the
subnet before healing), windows.pt, checkpoint.pt (a killed heal resumes there), progress.jsonl,
curve.json and healed.pt (a finished heal is read back, not redone).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch

from searchllm.config import HealConfig
from searchllm.data import HealWindows, heal_windows
from searchllm.evaluate import perplexity
from searchllm.files import writing
from searchllm.healing.distill import CURVE, HEALED, PROGRESS, HealJob
from searchllm.monitor import heal_pace
from searchllm.stages.context import Built, RunContext

log = logging.getLogger("searchllm")
# Keys that change how a heal runs, not what it computes (left out of its folder's tag).
EXECUTION = ("enabled", "workers", "cpus_per_worker", "fsdp", "checkpoint_every")


# The heal.* keys of 2026-12-07, each in every tag. A key added later enters the tag only when set away from its
# default (which keeps the earlier behaviour), so an upgrade finds every earlier heal's folder, a killed one's
# checkpoint included, instead of starting it again from zero.
TAGGED = frozenset(
    ("batch", "candidate_tokens", "candidates", "ce", "chunk", "clip", "dtype", "eval_every", "eval_windows")
    + ("generated", "lr", "min_lr", "mix", "seed", "seqlen", "teacher", "temperature", "tokens", "train")
    + ("warmup", "weight_decay")
)


def tag_of(settings: dict, model: torch.nn.Module) -> str:
    defaults = asdict(HealConfig())
    keyed = {
        k: v
        for k, v in settings.items()
        if k not in EXECUTION and (k in TAGGED or k not in defaults or v != defaults[k])
    }
    h = hashlib.sha1(json.dumps(keyed, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def run(ctx: RunContext) -> None:
    cfg, subnet = ctx.cfg, ctx.subnet
    if not cfg.heal.enabled or ctx.built is None or subnet is None:
        return
    ctx.monitor.stage("healing")
    selection = choose(ctx) if len(ctx.candidates) > 1 else None
    built = ctx.built
    settings = asdict(cfg.heal)
    record, folder = heal_once(ctx, built, settings)
    model = built.model
    model.load_state_dict(torch.load(folder / HEALED, weights_only=True))
    model.eval()
    before = subnet.ppl.get("reformed", subnet.ppl["searched"])
    after = perplexity(model, ctx.plan.tokens["report"], ctx.batch).ppl
    subnet.ppl["healed"] = after
    subnet.manifest["heal"] = {
        "settings": settings,
        "dir": str(folder),
        **{k: record[k] for k in ("steps", "tokens", "seconds", "tokens_per_s", "workers", "dtype", "fsdp")},
        "data": record.get("data"),
        "report_ppl_before": before,
        "report_ppl_after": after,
        "curve": record["curve"],
        **({"selection": selection} if selection else {}),
    }
    ctx.monitor.on_heal_done(subnet.manifest["heal"])
    log.info(
        "healed on %d tokens in %.0fs (%.0f tokens/s): report ppl %.3f -> %.3f",
        record["tokens"],
        record["seconds"],
        record["tokens_per_s"],
        before,
        after,
    )


def heal_once(ctx: RunContext, built: Built, settings: dict) -> tuple[dict, Path]:
    """Heal `built` with `settings` (a finished heal of the same settings and weights is read back):
    (its record, its folder)."""
    folder = ctx.run.path / "heal" / tag_of(settings, built.model)
    if (folder / HEALED).is_file():
        log.info("heal: finished before in %s; reading it back", folder)
        return json.loads((folder / CURVE).read_text()), folder
    return heal(ctx, built, folder, settings), folder


def choose(ctx: RunContext) -> list[dict]:
    """The training-aware choice: a short heal of each candidate (heal.candidate_tokens, no warmup); the one
    with the lowest held-out KL after it becomes the subnet (ctx.built, ctx.subnet) the full heal trains."""
    from searchllm.stages.search_levels import summarize_levels

    cfg, subnet, db = ctx.cfg, ctx.subnet, ctx.database
    assert subnet is not None and db is not None, "the choice runs on the level search's candidates"
    short = asdict(cfg.heal) | {"tokens": cfg.heal.candidate_tokens, "warmup": 0, "eval_every": 10**9}
    rows = []
    for c in ctx.candidates:
        log.info("heal: candidate %s (search fitness %.5f), %d tokens", c.label, c.fitness, short["tokens"])
        record, _ = heal_once(ctx, c.built, short)
        kl = [r["held_out_kl"] for r in record["curve"] if "held_out_kl" in r]
        rows.append(
            {
                "candidate": c.label,
                "search_fitness": c.fitness,
                "params": c.params,
                "held_out_kl_before": kl[0],
                "held_out_kl_after": kl[-1],
                "tokens": record["tokens"],
                "seconds": record["seconds"],
            }
        )
    best = min(range(len(rows)), key=lambda i: rows[i]["held_out_kl_after"])
    rows[best]["chosen"] = True
    log.info(
        "heal: %s chosen after the short heals (held-out KL %s)",
        rows[best]["candidate"],
        ", ".join(f"{r['candidate']} {r['held_out_kl_before']:.4f} -> {r['held_out_kl_after']:.4f}" for r in rows),
    )
    c = ctx.candidates[best]
    if best:  # another parent than the search's best: it becomes the subnet
        g = db.space.geometry
        ctx.built = c.built
        subnet.slices, subnet.weights, subnet.params = c.slices, c.weights, c.params
        subnet.ppl = {"original": subnet.ppl["original"]} | {
            "searched": perplexity(c.built.model, ctx.plan.tokens["report"], ctx.batch).ppl
        }
        m = subnet.manifest
        m["structure"] = summarize_levels(db.db, c.genome)
        m["ratio"]["actual"] = c.params / g.total_params
        m["params"] |= {"subnet": c.params, "decoder_subnet": c.params - g.outer_params}
        m.pop("rereform", None)
        subnet.chosen_as = f"chosen after short heals ({c.label})"
    ctx.candidates = []  # the others' models are freed
    return rows


def heal(ctx: RunContext, built: Built, folder: Path, settings: dict) -> dict:
    assert ctx.healer is not None, "the driver sets the healer"
    cfg = replace(ctx.cfg, heal=HealConfig(**settings))
    h = cfg.heal
    folder.mkdir(parents=True, exist_ok=True)
    student = folder / "student"
    if not (student / "config.json").is_file():
        with writing(student, folder / ".student.tmp") as tmp:
            built.model.save_pretrained(tmp, safe_serialization=True)
    windows = folder / "windows.pt"
    if windows.is_file():
        data = HealWindows(**torch.load(windows, weights_only=True))
    else:
        text = ctx.heal_generated if ctx.heal_generated is not None else ctx.generated
        data = heal_windows(cfg, ctx.loaded.tokenizer, text)
        with writing(windows, folder / ".windows.pt.tmp") as tmp:
            torch.save(asdict(data), tmp)
    for source, passes in data.repeats.items():
        log.warning("heal: every source is used up; %s is read %.1f times", source, passes)
    steps = data.train.shape[0] // h.batch
    log.info(
        "healing: %d steps x %d windows x %d tokens (%d tokens) of %s; lr %g -> %g (warmup %d), %d worker(s); in %s",
        steps,
        h.batch,
        h.seqlen,
        steps * h.batch * h.seqlen,
        data.where,
        h.lr,
        h.min_lr,
        h.warmup,
        h.workers,
        folder,
    )
    # Absolute: Ray Train runs the workers in a directory of its own (a relative run dir would not be found).
    teacher = Path(ctx.loaded.checkpoint)
    teacher_path = str(teacher.resolve()) if teacher.exists() else ctx.loaded.checkpoint  # else a hub id
    job = HealJob(str(student.resolve()), teacher_path, str(windows.resolve()), str(folder.resolve()), settings)
    with Follow(folder / PROGRESS, Progress(ctx)):
        record = ctx.healer(job)
    record["data"] = {"sources": data.where, "repeats": data.repeats, "eval_windows": int(data.eval.shape[0])}
    (folder / CURVE).write_text(json.dumps(record))
    return record


class Progress:
    """Each step's record to the monitor (page, metrics); a log line on every held-out KL and at most
    every LOG_EVERY seconds between."""

    LOG_EVERY = 30.0

    def __init__(self, ctx: RunContext) -> None:
        self.ctx, self.logged = ctx, 0.0

    def __call__(self, rec: dict) -> None:
        self.ctx.monitor.on_heal(rec)
        if "loss" not in rec:
            log.info("heal: held-out KL %.4f before training", rec["held_out_kl"])
            return
        if time.monotonic() - self.logged < self.LOG_EVERY and "held_out_kl" not in rec:
            return
        self.logged = time.monotonic()
        self.show(rec)

    @staticmethod
    def show(rec: dict) -> None:
        rate, eta = heal_pace(rec)
        log.info(
            "heal step %d/%d: %d tokens, loss %.4f%s, lr %.2e, %.0f tokens/s, ETA %.0fs",
            rec["step"],
            rec["steps"],
            rec["tokens"],
            rec["loss"],
            f", held-out KL {rec['held_out_kl']:.4f}" if "held_out_kl" in rec else "",
            rec["lr"],
            rate,
            eta,
        )


class Follow:
    """Calls `fn` on every JSON line appended to `path` while the block runs (the heal's workers write
    progress.jsonl; the driver shows it)."""

    def __init__(self, path: Path, fn: Callable[[dict], None], every: float = 1.0) -> None:
        self.path, self.fn, self.every = path, fn, every
        self._stop = threading.Event()
        self._pos = self.path.stat().st_size if self.path.is_file() else 0
        self._thread = threading.Thread(target=self._run, name="searchllm-heal-progress", daemon=True)

    def __enter__(self) -> "Follow":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._read()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._read()

    def _read(self) -> None:
        if not self.path.is_file():
            return
        if self.path.stat().st_size < self._pos:  # rewritten by a resumed heal
            self._pos = 0
        with open(self.path, "rb") as f:
            f.seek(self._pos)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._pos += len(complete)
        for line in complete.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            try:
                self.fn(rec)
            except Exception as e:  # a display problem never stops the heal
                log.debug("heal progress: %s", e)
