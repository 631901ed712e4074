"""Distil the pruned student from the original teacher: forward KL(teacher || student) on the next-token
distributions at every position (Minitron: logit KL alone, temperature 1, is the best loss), an optional
cross-entropy term, AdamW (betas 0.9/0.95) with linear warmup and cosine decay, gradient clipping.

Memory stays bounded by a fused head-and-loss function (`ChunkedKL`): the vocabulary-sized logits exist
a chunk of positions at a time, and the chunk's gradients are taken in the same pass, so neither model's
full logits (49k x 2048 floats per SmolLM2 window) are ever held. The whole loss is one autograd node of
one module's forward, so the same step runs plain, under DDP or under FSDP2.

`train(job, rank, world)` is one worker's loop; every `checkpoint_every` steps rank 0 writes the student,
AdamW and schedule state (checkpoint.pt) and a resumed loop continues from it: the window order and the
schedule are functions of the step, so a resumed heal ends identical to an unbroken one on the same layout.
progress.jsonl gets a line per step (rank 0), curve.json and healed.pt come at the end.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from searchllm.config import HealConfig, teacher_top_k
from searchllm.files import writing
from searchllm.pruning.shard import bf16_native

CHECKPOINT, PROGRESS, CURVE, HEALED = "checkpoint.pt", "progress.jsonl", "curve.json", "healed.pt"


@dataclass
class HealJob:
    """What a worker needs, all on disk (shared storage on a multi-node cluster)."""

    student: str  # checkpoint dir of the subnet before healing (load_pretrained)
    teacher: str  # checkpoint dir of the original model
    windows: str  # torch file {"train": [N, seqlen], "eval": [M, seqlen]} (data.heal_windows)
    out: str  # the heal's folder: checkpoint.pt, progress.jsonl, curve.json, healed.pt
    params: dict  # HealConfig as a dict
    fsdp: bool = False  # shard both models over the workers (FSDP2)


@dataclass
class Live:
    """The live teacher's hidden states [N, H] and head [V, H]: its whole distribution, a chunk at a time."""

    h: torch.Tensor
    weight: torch.Tensor


@dataclass
class TopK:
    """A cached teacher (heal.teacher=cached:K): per position its K most likely tokens [N, K], their
    log-probabilities at the heal's temperature [N, K] and the log of the rest of its mass [N]."""

    idx: torch.Tensor
    log_p: torch.Tensor
    log_rest: torch.Tensor


def log_probs(h: torch.Tensor, w: torch.Tensor, t: float, dtype: torch.dtype) -> torch.Tensor:
    """A teacher's log-probabilities at temperature t from its hidden states and head (matrix product in dtype)."""
    with torch.no_grad():
        return torch.log_softmax((h.to(dtype) @ w.T).float() / t, -1)


def kl_and_target(log_ps: torch.Tensor, teacher, s: int, e: int, t: float, dtype: torch.dtype):
    """KL(teacher || student) summed over positions s:e, and the distribution q whose difference from the
    student's gives the gradient (d KL / d(z / T) = p_s - q). For a cached teacher the KL is exact on its K
    tokens, and the rest of both masses counts as one bucket (the student's rest follows the teacher's
    share: q there is p_s scaled by rest_t / rest_s)."""
    if isinstance(teacher, Live):
        log_pt = log_probs(teacher.h[s:e], teacher.weight.to(dtype), t, dtype)
        pt = log_pt.exp()
        return (pt * (log_pt - log_ps)).sum(), pt
    idx, log_pt, log_rt = teacher.idx[s:e].long(), teacher.log_p[s:e].float(), teacher.log_rest[s:e].float()
    pt = log_pt.exp()
    log_rs = torch.logsumexp(log_ps.scatter(-1, idx, -math.inf), -1)
    has_rest = torch.isfinite(log_rt)  # K = vocabulary: no rest
    kl = (pt * (log_pt - log_ps.gather(-1, idx))).sum()
    kl += torch.where(has_rest, log_rt.exp() * (log_rt - log_rs), 0.0).sum()
    scale = torch.where(has_rest, (log_rt - log_rs).exp(), 0.0)
    q = (log_ps.exp() * scale[:, None]).scatter(-1, idx, pt)
    return kl, q


class ChunkedKL(torch.autograd.Function):
    """Loss and its gradient through the LM head, a chunk of positions at a time.

    forward(h [N, H] student hidden states, weight [V, H] student head, teacher (Live or TopK), labels [N]
    (-100: none), temperature, ce weight, chunk, dtype) -> scalar mean over positions of T^2 KL(p_t^T || p_s^T)
    + ce * CE(p_s, labels); the matrix products run in `dtype`, the softmax arithmetic in float32."""

    @staticmethod
    def forward(ctx, h, weight, teacher, labels, temperature, ce, chunk, dtype):
        n, t = h.shape[0], temperature
        grad_h = torch.zeros_like(h, dtype=torch.float32)
        head = ctx.needs_input_grad[1]  # a frozen head (heal.train=blocks) skips its weight's gradient
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if head else None
        w = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            hs = h[s : s + chunk].to(dtype)
            z = (hs @ w.T).float()
            log_ps = torch.log_softmax(z / t, -1)
            kl, q = kl_and_target(log_ps, teacher, s, s + chunk, t, dtype)
            total += t * t * kl
            g = t * (log_ps.exp() - q)  # d(T^2 KL)/dz
            if ce:
                lab = labels[s : s + chunk]
                ok = lab >= 0
                log_p1 = log_ps if t == 1 else torch.log_softmax(z, -1)
                total -= ce * log_p1[ok].gather(-1, lab[ok, None]).sum()
                onehot = torch.zeros_like(g)
                onehot[ok] = onehot[ok].scatter(-1, lab[ok, None], 1.0)
                g += ce * (log_p1.exp() * ok[:, None] - onehot)
            g = (g / n).to(dtype)
            grad_h[s : s + chunk] = (g @ w).float()
            if grad_w is not None:
                grad_w += (g.T @ hs).float()
        ctx.save_for_backward(grad_h.to(h.dtype), None if grad_w is None else grad_w.to(weight.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, None if grad_w is None else grad_w * grad_out, None, None, None, None, None, None


class Distill(nn.Module):
    """The student with the loss as its forward (what DDP or FSDP wraps); the teacher's hidden states and
    head come in as arguments, so the teacher stays outside the wrapper (frozen, no gradients)."""

    def __init__(self, student: nn.Module, p: HealConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.student, self.p, self.dtype = student, p, dtype

    def forward(self, ids: torch.Tensor, teacher: Live | TopK, ce: Optional[float] = None) -> torch.Tensor:
        """`teacher`: its hidden states for these windows [B, L, H] and head (Live), or its cached top K (TopK);
        `ce`: the cross-entropy weight (None: heal.ce)."""
        with autocast(ids.device, self.dtype):
            h = self.student.model(input_ids=ids, use_cache=False).last_hidden_state
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1).reshape(-1)
        p = self.p
        if isinstance(teacher, Live):
            teacher = Live(teacher.h.reshape(-1, teacher.h.shape[-1]), teacher.weight)
        else:
            teacher = TopK(*(x.reshape(-1, *x.shape[2:]) for x in (teacher.idx, teacher.log_p, teacher.log_rest)))
        return ChunkedKL.apply(
            h.reshape(-1, h.shape[-1]),
            self.student.lm_head.weight,
            teacher,
            labels,
            p.temperature,
            p.ce if ce is None else ce,
            p.chunk,
            self.dtype,
        )


class Teacher(nn.Module):
    """The frozen teacher: hidden states and its head's weight (a copy when sharded: FSDP gathers the
    weight only while this module's forward runs)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, copy_head: bool = False) -> None:
        super().__init__()
        self.model, self.dtype, self.copy_head = model, dtype, copy_head

    def forward(self, ids: torch.Tensor) -> Live:
        with torch.no_grad(), autocast(ids.device, self.dtype):
            h = self.model.model(input_ids=ids, use_cache=False).last_hidden_state
        w = self.model.lm_head.weight
        return Live(h, w.detach().clone() if self.copy_head else w)

    def top_k(self, ids: torch.Tensor, k: int, temperature: float, chunk: int) -> TopK:
        """The cached form of this teacher's distributions on `ids` [B, L] (the same arithmetic as Live's)."""
        live = self(ids)
        h, w = live.h.reshape(-1, live.h.shape[-1]), live.weight.to(self.dtype)
        parts = []
        with torch.no_grad():
            for s in range(0, h.shape[0], chunk):
                log_pt = log_probs(h[s : s + chunk], w, temperature, self.dtype)
                top = log_pt.topk(min(k, log_pt.shape[-1]), -1)
                rest = torch.logsumexp(log_pt.scatter(-1, top.indices, -math.inf), -1)
                parts.append((top.indices.int(), top.values, rest))
        return TopK(*(torch.cat(x).reshape(*ids.shape, *x[0].shape[1:]).cpu() for x in zip(*parts)))


def freeze(student: nn.Module, what: str) -> None:
    """With heal.train=blocks, every weight outside a decoder layer (embeddings, final norm, head) keeps the
    original's values."""
    if what == "blocks":
        for name, q in student.named_parameters():
            q.requires_grad_(".layers." in name)


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """heal.dtype: auto is bfloat16 where the device computes it natively."""
    if name == "auto":
        return torch.bfloat16 if bf16_native(device) else torch.float32
    return getattr(torch, name)


def lr_factor(step: int, steps: int, p: HealConfig) -> float:
    """Linear warmup over heal.warmup steps, then cosine from heal.lr down to heal.min_lr at the last step."""
    if step < p.warmup:
        return (step + 1) / (p.warmup + 1)
    span = max(steps - p.warmup - 1, 1)
    cos = 0.5 * (1 + math.cos(math.pi * min(step - p.warmup, span) / span))
    return (p.min_lr + (p.lr - p.min_lr) * cos) / p.lr


class Comm:
    """The collectives a worker needs; world 1 without a process group (in-process)."""

    def __init__(self, rank: int = 0, world: int = 1) -> None:
        self.rank, self.world = rank, world

    def mean(self, value: float, device: torch.device) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t) / self.world

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def load_models(job: HealJob, device: torch.device, dtype: torch.dtype):
    from transformers.utils import logging as hf_logging

    from searchllm.models.loading import load_pretrained

    hf_logging.disable_progress_bar()
    student = load_pretrained(job.student, "float32")[0].to(device).train()
    # The teacher is only ever run forward: held in the compute dtype (half the memory in bfloat16).
    teacher = load_pretrained(job.teacher, "float32" if dtype == torch.float32 else "bfloat16")[0]
    return student, teacher.to(device).eval().requires_grad_(False)


def shard(core: Distill, teacher: Teacher) -> None:
    """FSDP2: every decoder layer of both models its own unit, the rest of each (embeddings, norm, head)
    with the module whose forward uses it."""
    from torch.distributed.fsdp import fully_shard

    for model in (core.student, teacher.model):
        for layer in model.model.layers:
            fully_shard(layer)
    fully_shard(teacher)
    fully_shard(core)


def full_state(model: nn.Module, opt: Optional[torch.optim.Optimizer], fsdp: bool):
    if not fsdp:
        return model.state_dict(), opt.state_dict() if opt is not None else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=o), get_optimizer_state_dict(model, opt, options=o) if opt else None


def set_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    if not fsdp:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    o = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=o)
    set_optimizer_state_dict(model, opt, state["optim"], options=o)


def read_checkpoint(out: Path) -> Optional[dict]:
    from searchllm.files import damaged

    p = out / CHECKPOINT
    if not p.is_file():
        return None
    try:
        return torch.load(p, weights_only=True, map_location="cpu")
    except Exception as e:  # a cut file: torch.load raises many kinds
        raise damaged(p, e, f"delete it to heal from the start on resume (rm {p})") from None


def held_out_kl(core: Distill, teacher: Teacher, windows: torch.Tensor, device: torch.device) -> float:
    """Mean KL (nats/token) of the student from the (live) teacher on windows never trained on: the KL alone,
    whatever heal.ce adds to the training loss, so recipes compare."""
    total = 0.0
    with torch.no_grad():
        for row in windows.split(1):
            ids = row.to(device)
            total += float(core(ids, teacher(ids), ce=0.0))
    return total / max(len(windows), 1)


def cached_teacher(
    job: HealJob, p: HealConfig, teacher: Teacher, windows: torch.Tensor, device: torch.device, comm: Comm
) -> TopK:
    """heal.teacher=cached:K: the teacher's top K on every training window, computed once per training text
    and teacher settings and kept beside the heals (<run>/heal/teacher-*.pt), so every heal of the same text
    (a sweep, a resume, another recipe) reads it back instead of running the teacher each step."""
    import hashlib

    k = teacher_top_k(p.teacher)
    assert k is not None
    digest = hashlib.sha256(windows.numpy().tobytes())
    digest.update(f"{job.teacher}|{k}|{p.temperature}|{teacher.dtype}".encode())
    path = Path(job.out).parent / f"teacher-top{k}-{digest.hexdigest()[:12]}.pt"
    if not path.is_file():  # every rank runs the teacher (FSDP needs all of them); rank 0 writes
        parts = [teacher.top_k(row.to(device), k, p.temperature, p.chunk) for row in windows.split(1)]
        cache = TopK(*(torch.cat(x) for x in zip(*[(t.idx, t.log_p, t.log_rest) for t in parts])))
        if comm.rank == 0:
            with writing(path, path.parent / f".{path.name}.tmp") as tmp:
                torch.save(asdict(cache), tmp)
        comm.barrier()
        return cache
    from searchllm.files import damaged

    try:
        return TopK(**torch.load(path, weights_only=True))
    except Exception as e:
        raise damaged(path, e, f"delete it to compute the teacher again (rm {path})") from None


def train(
    job: HealJob,
    comm: Optional[Comm] = None,
    device: Optional[torch.device] = None,
    on_step: Optional[Callable[[dict], None]] = None,
    stop_after: Optional[int] = None,
) -> Optional[dict]:
    """One worker's heal. Returns the curve record (rank 0; None elsewhere, or when stopped by `stop_after`
    steps, which the tests use to kill a heal between two checkpoints)."""
    comm = comm or Comm()
    device = device or torch.device("cpu")
    p = HealConfig(**{k: v for k, v in job.params.items() if k in HealConfig.__dataclass_fields__})
    out = Path(job.out)
    dtype = compute_dtype(p.dtype, device)
    torch.manual_seed(p.seed)
    student, teacher_model = load_models(job, device, dtype)
    data = torch.load(job.windows, weights_only=True)
    train_w, eval_w = data["train"], data["eval"]
    steps, local = train_w.shape[0] // p.batch, p.batch // comm.world
    freeze(student, p.train)  # before DDP or FSDP wrap it: they register what trains
    core, teacher = Distill(student, p, dtype), Teacher(teacher_model, dtype, copy_head=job.fsdp)
    net: nn.Module = core
    if job.fsdp:
        shard(core, teacher)
    elif comm.world > 1:
        net = nn.parallel.DistributedDataParallel(core)
    params = [q for q in student.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=p.lr, betas=(0.9, 0.95), weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, p))
    start, curve, seconds = 0, [], 0.0
    t_cache = time.perf_counter()
    cache = cached_teacher(job, p, teacher, train_w, device, comm) if p.teacher != "live" else None
    t_cache = time.perf_counter() - t_cache
    saved = read_checkpoint(out)
    if saved is not None and saved["step"] <= steps:
        set_state(student, opt, saved, job.fsdp)
        sched.load_state_dict(saved["sched"])
        start, curve, seconds = saved["step"], saved["curve"], saved["seconds"]
        if comm.rank == 0:  # the steps after the checkpoint are done again: their lines go
            (out / PROGRESS).write_text("".join(json.dumps(r) + "\n" for r in curve))
    if start == 0:
        curve = [{"step": 0, "tokens": 0, "held_out_kl": held_out_kl(core, teacher, eval_w, device), "seconds": 0.0}]
        write_progress(out, curve[0], comm)
    t0 = time.perf_counter() - seconds
    for step in range(start, steps):
        at = slice(step * p.batch + comm.rank * local, step * p.batch + (comm.rank + 1) * local)
        rows = train_w[at].to(device)
        t_step = time.perf_counter()
        if cache is None:
            loss = net(rows, teacher(rows))
        else:
            loss = net(rows, TopK(cache.idx[at].to(device), cache.log_p[at].to(device), cache.log_rest[at].to(device)))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, p.clip) if p.clip > 0 else torch.zeros(())
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        rec = {
            "step": done,
            "tokens": done * p.batch * train_w.shape[1],
            "loss": comm.mean(float(loss.detach()), device),
            "lr": lr,
            "grad_norm": float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm),
            "step_seconds": time.perf_counter() - t_step,
            "seconds": time.perf_counter() - t0,
            "steps": steps,
        }
        if done % p.eval_every == 0 or done == steps:
            rec["held_out_kl"] = held_out_kl(core, teacher, eval_w, device)
        curve.append(rec)
        write_progress(out, rec, comm)
        if done % p.checkpoint_every == 0 or done == steps:
            model_sd, optim_sd = full_state(student, opt, job.fsdp)
            if comm.rank == 0:
                state = {"step": done, "model": model_sd, "optim": optim_sd, "sched": sched.state_dict()}
                with writing(out / CHECKPOINT, out / f".{CHECKPOINT}.tmp") as tmp:
                    torch.save(state | {"curve": curve, "seconds": rec["seconds"]}, tmp)
            comm.barrier()
        if on_step is not None:
            on_step(rec)
        if stop_after is not None and done >= stop_after:
            return None
    model_sd, _ = full_state(student, None, job.fsdp)
    if comm.rank != 0:
        return None
    last = curve[-1]
    record = {
        "steps": steps,
        "tokens": last.get("tokens", 0),
        "seconds": last["seconds"],
        "tokens_per_s": last.get("tokens", 0) / max(last["seconds"], 1e-9),
        "workers": comm.world,
        "dtype": str(dtype).removeprefix("torch."),
        "fsdp": job.fsdp,
        "teacher": p.teacher,
        "teacher_cache_seconds": t_cache,  # making (or reading back) the cached teacher, outside `seconds`
        "curve": curve,
    }
    with writing(out / HEALED, out / f".{HEALED}.tmp") as tmp:
        torch.save(model_sd, tmp)
    with writing(out / CURVE, out / f".{CURVE}.tmp") as tmp:
        Path(tmp).write_text(json.dumps(record))
    return record


def write_progress(out: Path, rec: dict, comm: Comm) -> None:
    if comm.rank != 0:
        return
    with open(out / PROGRESS, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())
