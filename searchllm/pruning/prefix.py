"""The level search's prefix cache, and the token sets whose windows are batches of another set's (views).
Knows nothing of Ray."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

import torch

View = tuple[str, list[int]]  # (a larger token set, the rows of it a set's windows are)


def window_views(tokens: Mapping[str, torch.Tensor], batch: int) -> dict[str, list[View]]:
    """For each token set whose windows are whole batches of larger sets' windows: every such (set, its rows),
    largest first (two sets may hold the same windows, e.g. the final set and the first selection set, and
    only one of them may have been computed). A forward pass over such a set computes, batch for batch, what
    the larger set's pass computed for those windows, to the bit (the probes' set is the first windows of each
    source of the first selection set's mixture: with an even batch, every probe batch is one of its batches)."""
    views: dict[str, list[View]] = {}
    for name, t in tokens.items():
        for parent, p in sorted(tokens.items(), key=lambda x: (-x[1].shape[0], x[0])):
            if parent == name or p.shape[0] <= t.shape[0] or p.shape[1:] != t.shape[1:]:
                continue
            where: dict[bytes, int] = {}
            for i, row in enumerate(p):
                where.setdefault(row.numpy().tobytes(), i)
            rows = [where.get(row.numpy().tobytes(), -1) for row in t]
            if all(_whole_batch(rows[k : k + batch], batch, p.shape[0]) for k in range(0, len(rows), batch)):
                views.setdefault(name, []).append((parent, rows))
    return views


def _whole_batch(chunk: list[int], batch: int, count: int) -> bool:
    """Whether `chunk` is exactly one batch of a set of `count` windows batched `batch` at a time."""
    start = chunk[0]
    return start >= 0 and start % batch == 0 and chunk == list(range(start, start + min(batch, count - start)))


class PrefixCache:
    """Hidden states of recent level-search candidates after each layer, keyed by the token set and the levels
    of every layer up to it. A child that first differs from its parent at layer j runs only layers j..;
    the states are those a full run computes (the same blocks on the same window batches). A token set that
    is a view of another (`set_views`) also starts from that set's states, cut to its rows. LRU within a
    byte budget; emptied when the database changes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes, self.hits, self.skipped = max_bytes, 0, 0, 0
        self.data: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.views: dict[str, list[View]] = {}
        self.batch: int | None = None  # the batch the views hold for

    def set_views(self, tokens: Mapping[str, torch.Tensor], batch: int) -> None:
        self.views, self.batch = window_views(tokens, batch), batch

    @staticmethod
    def key(which: str, slices: Mapping[int, Any], layer: int) -> tuple:
        return which, tuple(slices[i] for i in range(layer + 1))

    def _deepest(self, which: str, slices: Mapping[int, Any], layers: range) -> tuple[int, list[tuple]]:
        """(layers of the longest cached prefix of `which` in `layers`, the keys along it)."""
        keys = [self.key(which, slices, layer) for layer in layers]
        return next((j + 1 for j in range(len(keys) - 1, -1, -1) if keys[j] in self.data), 0), keys

    def longest(self, which: str, slices: Mapping[int, Any], layers: range) -> tuple[int, torch.Tensor | None]:
        """(layers already run, the hidden states after them) for the longest cached prefix in `layers`,
        of this token set or of a set it is a view of."""
        done, keys = self._deepest(which, slices, layers)
        rows = None
        for parent, parent_rows in self.views.get(which, []):
            deeper, parent_keys = self._deepest(parent, slices, layers)
            if deeper > done:
                done, keys, rows = deeper, parent_keys, parent_rows
        if not done:
            return 0, None
        for key in keys[:done]:  # the whole chain stays: a parent's next child may branch earlier or later
            if key in self.data:
                self.data.move_to_end(key)
        self.hits, self.skipped = self.hits + 1, self.skipped + done
        hidden = self.data[keys[done - 1]]
        return done, hidden if rows is None else hidden[rows]

    def put(self, which: str, slices: Mapping[int, Any], layer: int, hidden: torch.Tensor) -> None:
        size = hidden.numel() * hidden.element_size()
        if size > self.max_bytes:
            return
        key = self.key(which, slices, layer)
        if key in self.data:
            return
        self.data[key], self.bytes = hidden, self.bytes + size
        while self.bytes > self.max_bytes:
            _, old = self.data.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
