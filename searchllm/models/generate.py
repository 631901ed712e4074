"""Sampling with a KV cache, in torch alone: the pieces a shard needs to generate text batch by batch.

Every sequence draws from its own generator, seeded by (seed, its index): a sequence's tokens do not depend
on which replica samples it or on which others share its batch (batches are fixed by index, so the forward
arithmetic is the same too).
"""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated keys and values per layer: the `update(k, v, layer)` a SlicedAttention calls with a
    cache. Grows by the step's tokens; returns the keys and values of every position so far (the attention
    runs in their dtype)."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.length: dict[int, int] = {}

    def update(self, k: torch.Tensor, v: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.k:
            b, h, _, d = k.shape
            # float32 on a CPU: its bfloat16 attention kernel is ~3x slower for one query than float32's
            dtype = torch.float32 if k.device.type == "cpu" else k.dtype
            self.k[layer] = k.new_empty(b, h, self.max_len, d, dtype=dtype)
            self.v[layer] = v.new_empty(b, h, self.max_len, d, dtype=dtype)
            self.length[layer] = 0
        start = self.length[layer]
        stop = start + k.shape[2]
        if stop > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full")
        self.k[layer][:, :, start:stop] = k
        self.v[layer][:, :, start:stop] = v
        self.length[layer] = stop
        return self.k[layer][:, :, :stop], self.v[layer][:, :, :stop]


def generators(seed: int, indices: list[int]) -> list[torch.Generator]:
    return [torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + i) for i in indices]


NUCLEUS_K = 1024  # the top tokens a nucleus is first looked for in (a full sort of the vocabulary costs 10x more)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gens: list[torch.Generator]) -> torch.Tensor:
    """One token per row of `logits` (rows, vocab): greedy at temperature 0, else drawn from the
    temperature-scaled distribution cut to its top-p nucleus, each row with its own generator. The
    nucleus is exact: a row whose nucleus is not inside its top NUCLEUS_K tokens is sorted whole."""
    logits = logits.float().cpu()
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    out = torch.empty(probs.shape[0], dtype=torch.long)
    k = probs.shape[-1] if top_p >= 1 else min(NUCLEUS_K, probs.shape[-1])
    top, order = probs.topk(k, -1)
    for row, (p, g) in enumerate(zip(top, gens)):
        ids = order[row]
        if top_p < 1 and float(p.sum()) < top_p:  # a flat distribution: its nucleus reaches past the top k
            p, ids = probs[row].sort(descending=True)
        if top_p < 1:
            p = p * (p.cumsum(-1) - p < top_p)  # the most likely token is always kept
        out[row] = ids[torch.multinomial(p, 1, generator=g)]
    return out
