"""Perplexity of any causal LM (a Hugging Face model or an export) on token windows.

Every window is scored on its own, tokens 1..T given their prefix: the same protocol as the search's
fitness (shard.NLL), so numbers from both are comparable.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .shard import NLL


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokens: torch.Tensor, batch: int = 1) -> NLL:
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(0, tokens.shape[0], batch):
        t = tokens[s : s + batch].to(device)
        logits = model(t, use_cache=False).logits.float()
        total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1), reduction="sum"))
        count += t[:, 1:].numel()
    return NLL(total, count, time.perf_counter() - t0)
