"""Reformation (paper Sec. 3.3): rectify the kept input columns of o_proj and down_proj from calibration data.

For a module with original weight W (out x n) and kept input columns S, with X its target input (the
original model's) and F the features the pruned model feeds it (F = X[:, S] when they coincide):

    min_{W'}  ||W X - W' F||^2  +  damp * sum_j G_jj ||W'_j - W_{S_j}||^2,        G = F F^T

The damping pulls toward the original kept weights, scaled per column by its input energy, so it never
shrinks a weight toward zero (findings.md: ridge toward zero made reformation hurt at 80% kept). Only
these column-sliced modules are reformed: q/k/v and gate/up lose output rows, and an omitted row's output
is simply gone; least squares would return the kept rows unchanged.

Solvers: `exact` (closed form, float64 Cholesky) and `admm` (the paper's Eq. 7-9 with the feasible
projection (W + U) * keep, on the input-normalised problem as the paper's code does). Both see the same
statistics; ADMM converges to the exact solution as its iterations grow.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from searchllm.config import ReformParams
from searchllm.models.sliced import COLUMN_SLICED, LayerSlice

if TYPE_CHECKING:
    from searchllm.pruning.shard import ShardRunner


class Normal:
    """Sufficient statistics of one module's least-squares problem, summed over calibration batches.

    G = F^T F over features, C = X^T F (target inputs x features), T = X^T X (for the error only). When
    the features are the target inputs themselves (independent inputs, full features), G = C = T."""

    def __init__(self, cols: list[int], same: bool) -> None:
        self.cols = torch.tensor(cols, dtype=torch.long)  # original input column of each feature
        self.same = same
        self.G: torch.Tensor | None = None
        self.C: torch.Tensor | None = None
        self.T: torch.Tensor | None = None

    def add(self, target: torch.Tensor, feats: torch.Tensor | None = None) -> None:
        x = target.reshape(-1, target.shape[-1]).float()
        if self.same:
            self.G = _acc(self.G, x.T @ x)
            return
        f = feats.reshape(-1, feats.shape[-1]).float()
        self.G = _acc(self.G, f.T @ f)
        self.C = _acc(self.C, x.T @ f)
        self.T = _acc(self.T, x.T @ x)

    def stats(self, keep: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(G_SS, C_:S, T) in float64 for the kept columns S (which must all be among the features)."""
        pos = _positions(self.cols, keep)
        G = self.G.double()
        C = G if self.same else self.C.double()
        T = G if self.same else self.T.double()
        return G[pos][:, pos], C[:, pos], T


def _acc(total: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x if total is None else total.add_(x)


def _positions(cols: torch.Tensor, keep: list[int]) -> torch.Tensor:
    where = {int(c): i for i, c in enumerate(cols)}
    missing = [k for k in keep if k not in where]
    if missing:
        raise ValueError(f"kept columns {missing[:5]} have no recorded features")
    return torch.tensor([where[k] for k in keep], dtype=torch.long, device=cols.device)


def solve_exact(
    W: torch.Tensor,
    G: torch.Tensor,
    C: torch.Tensor | None,
    keep: list[int],
    damp: float,
    R: torch.Tensor | None = None,
) -> torch.Tensor:
    """W' (out x |S|) solving W' (G + damp diag G) = W C + damp W_S diag G; R = Y X_S^T replaces W C when the
    target Y is not the original module's output on the same inputs."""
    W = W.double().to(G.device)
    d = damp * G.diagonal().clamp_min(1e-12)
    rhs = (W @ C if R is None else R.double()) + W[:, keep] * d
    chol = torch.linalg.cholesky(G + torch.diag(d))
    return torch.cholesky_solve(rhs.T, chol).T


def solve_admm(
    W: torch.Tensor, G: torch.Tensor, C: torch.Tensor, keep: list[int], damp: float, rho: float, iters: int
) -> torch.Tensor:
    """The paper's ADMM over the full column set of W, on the problem normalised by sqrt(diag G)
    (the official code's scaling, so rho is relative to unit input energy).

    Omitted columns have no features, so their rows of G and C are zero; the projection keeps them at zero."""
    W = W.double().to(G.device)
    n = W.shape[1]
    idx = torch.tensor(keep, dtype=torch.long, device=G.device)
    Gf = torch.zeros(n, n, dtype=G.dtype, device=G.device)
    Gf[idx[:, None], idx[None, :]] = G
    Cf = torch.zeros(C.shape[0], n, dtype=C.dtype, device=C.device)
    Cf[:, idx] = C
    D = Gf.diagonal().clamp_min(0).sqrt()
    D = torch.where(D > 0, D, torch.ones_like(D))
    Gn = Gf / D[:, None] / D[None, :]
    Wn = W * D  # the same map on normalised features F / D
    keep_mask = torch.zeros(n, dtype=torch.bool, device=G.device)
    keep_mask[idx] = True
    damp_diag = damp * (Gf.diagonal() > 0).double()
    rhs0 = W @ (Cf / D[None, :]) + Wn * damp_diag  # damping toward the original weights, as in the exact solver
    chol = torch.linalg.cholesky(Gn + torch.diag(damp_diag + rho))
    Z, U = Wn.clone(), torch.zeros_like(Wn)
    for _ in range(iters):
        Wh = torch.cholesky_solve((rhs0 + rho * (Z - U)).T, chol).T  # Eq. 7
        Z = (Wh + U) * keep_mask  # Eq. 8, projecting onto the feasible set (the paper prints the mask inverted)
        U = U + Wh - Z  # Eq. 9
    return (Z / D)[:, idx]


Stats = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # Normal.stats: (G_SS, C_:S, T)


def solve(W: torch.Tensor, stats: Stats, keep: list[int], p: ReformParams) -> torch.Tensor:
    G, C, _ = stats
    if p.solver == "admm":
        return solve_admm(W, G, C, keep, p.damp, p.rho, p.iters)
    return solve_exact(W, G, C, keep, p.damp)


def reconstruction_error(W: torch.Tensor, stats: Stats, W_kept: torch.Tensor) -> float:
    """||W X - W_kept F||^2 / ||W X||^2 from the accumulated statistics."""
    G, C, T = stats
    W, Wk = W.double().to(G.device), W_kept.double().to(G.device)
    ref = (W @ T * W).sum()
    err = ref - 2 * (Wk @ C.T * W).sum() + (Wk @ G * Wk).sum()
    return float(err.clamp_min(0) / ref.clamp_min(1e-30))


@dataclass
class LayerResult:
    layer: int
    weights: dict[str, torch.Tensor]  # reformed o/down over their kept input columns, by standard key
    error_before: dict[str, float]  # relative reconstruction error of plain slicing, per module
    error_after: dict[str, float]
    seconds: float


def reform_shard(
    runner: "ShardRunner",
    slices: Sequence[LayerSlice],
    dense: torch.Tensor | None,
    stream: torch.Tensor | None,
    p: ReformParams,
    batch: int = 1,
    done: Mapping[int, dict[str, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, list[LayerResult]]:
    """Reform every layer of a shard, in order (`iter_reform`, collected): returns both hidden states
    leaving the shard and the results of the layers solved here."""
    gen = iter_reform(runner, slices, dense, stream, p, batch, done)
    results = []
    while True:
        try:
            res = next(gen)
        except StopIteration as stop:
            return *stop.value, results
        if res is not None:
            results.append(res)


def iter_reform(
    runner: "ShardRunner",
    slices: Sequence[LayerSlice],
    dense: torch.Tensor | None,
    stream: torch.Tensor | None,
    p: ReformParams,
    batch: int = 1,
    done: Mapping[int, dict[str, torch.Tensor]] | None = None,
) -> Generator[LayerResult | None, None, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Reform every layer of a shard, in order, yielding each layer's result as soon as it is solved
    (None for a dropped layer or one in `done`) and returning both hidden states leaving the shard.

    `dense` is the original model's hidden state entering the shard (tokens on the first shard; None when
    nothing downstream needs it), `stream` the reformed upstream's (None with independent inputs).
    `done` holds weights solved before (a resumed run): those layers are not solved again, only run, so
    the layers after them see the same inputs as in an uninterrupted run. The runner keeps the reformed
    weights, so its later forwards of these slices use them."""
    done = done or {}
    g = runner.geometry
    sequential = p.inputs == "sequential"
    if runner.spec.first:
        h = runner.embed(dense)
        dense, stream = h, (h if sequential else None)
    else:
        dense = None if dense is None else dense.to(runner.device, runner.dtype)
        stream = stream.to(runner.device, runner.dtype) if sequential else None
    if sequential and p.targets == "layer":
        dense = None  # targets come from the stream itself: the original model's activations are not needed
    full = LayerSlice.full(g)
    n_inputs = {"o": len(full.q_rows(g)), "down": g.intermediate}
    for i in runner.spec.layers:
        t0 = time.perf_counter()
        s, w = slices[i], runner.blocks_w[i]
        full_block = runner.block(i, full)
        if not s.active:  # a dropped block: the original model still runs it, the subnet skips it
            dense = None if dense is None else runner.run_blocks({str(i): full_block}, dense, batch)
            yield None
            continue
        if i in done:
            overrides = {k: v.to(runner.device, runner.dtype) for k, v in done[i].items()}
            runner.reformed[i] = (s, overrides)
            dense = None if dense is None else runner.run_blocks({str(i): full_block}, dense, batch)
            if stream is not None:
                stream = runner.run_blocks({str(i): runner.block(i, s, overrides)}, stream, batch)
            yield None
            continue
        src = stream if stream is not None else dense  # what the subnet's layer receives
        tgt = dense if dense is not None else src  # what the original layer receives
        keep = {k: s.kept_inputs(k, g) for k in COLUMN_SLICED}
        todo = [k for k in COLUMN_SLICED if 0 < len(keep[k]) < n_inputs[k]]
        same = p.features == "full" and tgt is src
        if p.bias:  # the constant input is one more kept column, index n, whose weight is the bias
            keep = {k: v + [n_inputs[k]] for k, v in keep.items()}
            ones = lambda x: torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1)  # noqa: E731
        feats = {k: list(range(n_inputs[k] + p.bias)) if p.features == "full" else keep[k] for k in todo}
        normals = {k: Normal(feats[k], same) for k in todo}
        # Full features come from one pass; pruned features of down depend on the reformed o, so o goes first.
        phases = [todo] if p.features == "full" else [[k] for k in todo]
        overrides: dict[str, torch.Tensor] = {}
        before, after, tgt_out = {}, {}, None
        for phase in phases:
            feat_block = full_block if p.features == "full" else runner.block(i, s, overrides)
            outs = []
            for b in range(0, src.shape[0], batch):
                t_rec, f_rec = {}, {}
                t_out = runner.run_block(full_block, tgt[b : b + batch], t_rec.__setitem__)
                if tgt_out is None:  # the original layer's output is the same in every phase: keep the first
                    outs.append(t_out)
                if not same:
                    runner.run_block(feat_block, src[b : b + batch], f_rec.__setitem__)
                for k in phase:
                    t_in, f_in = t_rec[k], f_rec.get(k)
                    if p.bias:
                        t_in, f_in = ones(t_in), (None if same else ones(f_in))
                    normals[k].add(t_in, f_in)
            tgt_out = torch.cat(outs) if tgt_out is None else tgt_out
            for k in phase:
                W, stats = w[k], normals.pop(k).stats(keep[k])  # popped: the Grams go before the next module's
                if p.bias:
                    b = w.get(f"{k}_bias", torch.zeros(W.shape[0], dtype=W.dtype, device=W.device))
                    W = torch.cat([W, b[:, None]], 1)
                new = solve(W, stats, keep[k], p)
                before[k] = reconstruction_error(W, stats, W[:, keep[k]])
                after[k] = reconstruction_error(W, stats, new)
                new = new.to(device=W.device, dtype=W.dtype)
                if p.bias:
                    overrides[f"{k}_bias"] = new[:, -1].contiguous()
                    new = new[:, :-1]
                overrides[k] = new.contiguous()
                del stats
        runner.reformed[i] = (s, overrides)
        if dense is not None:
            dense = (
                tgt_out
                if tgt_out is not None and tgt is dense
                else runner.run_blocks({str(i): full_block}, dense, batch)
            )
        if stream is not None:
            stream = runner.run_blocks({str(i): runner.block(i, s, overrides)}, stream, batch)
        yield LayerResult(i, {k: v.cpu() for k, v in overrides.items()}, before, after, time.perf_counter() - t0)
    return dense, stream
