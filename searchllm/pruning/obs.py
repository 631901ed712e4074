"""The OBS arithmetic of the level database: greedy removal orders of attention heads and MLP channels
(ZipLM; the MLP's weighed by the block's output factor, LLM-Surgeon), the refit of every level's kept columns,
and the symmetric products the statistics are summed from. Pure torch."""

from __future__ import annotations

import torch

from searchllm.models.adapters import Geometry
from searchllm.pruning.reform import solve_exact


def gram(x: torch.Tensor, parts: int = 3) -> torch.Tensor:
    """x^T x (x: rows x features) from its upper blocks, the lower ones mirrored: two thirds of the product's
    arithmetic at parts=3. Each block is a slice of the one product: in float32 every entry came out equal to
    x.T @ x to the bit on the CPUs measured, with AVX-512 and AVX2 kernels (docs/results.md)."""
    n = x.shape[1]
    edges = [round(i * n / parts) for i in range(parts + 1)]
    out = x.new_empty(n, n)
    for i in range(parts):
        a = x[:, edges[i] : edges[i + 1]]
        for j in range(i, parts):
            p = a.T @ x[:, edges[j] : edges[j + 1]]
            out[edges[i] : edges[i + 1], edges[j] : edges[j + 1]] = p
            if j > i:
                out[edges[j] : edges[j + 1], edges[i] : edges[i + 1]] = p.T
    return out


def _damped_inverse(H: torch.Tensor, damp: float) -> torch.Tensor:
    H = H.double()
    H = H + damp * H.diagonal().mean().clamp_min(1e-12) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(H))


def _remove(W: torch.Tensor, Hinv: torch.Tensor, cols: torch.Tensor) -> None:
    """OBS removal of columns `cols` (in place): compensate the others, downdate H^-1."""
    block = torch.linalg.inv(Hinv[cols][:, cols])
    W -= W[:, cols] @ block @ Hinv[cols]
    Hinv -= Hinv[:, cols] @ block @ Hinv[cols]
    W[:, cols] = 0
    Hinv[cols] = 0
    Hinv[:, cols] = 0


def obs_head_order(W: torch.Tensor, H: torch.Tensor, g: Geometry, equal: bool, damp: float) -> list[int]:
    """Query heads in greedy OBS removal order: each step removes the head (a block of head_dim columns of
    o) whose removal, with the others compensated, adds the least error trace(W_G (H^-1_GG)^-1 W_G^T).
    `equal`: one head from every KV group per round, so all groups keep the same count."""
    W, Hinv = W.double().clone(), _damped_inverse(H, damp)
    hd, alive, order = g.head_dim, set(range(g.num_heads)), []
    cols = {h: torch.arange(h * hd, (h + 1) * hd, device=W.device) for h in alive}
    while alive:
        if equal:  # heads of the groups that still have the most heads (not yet reduced this round)
            count = {kv: sum(1 for h in alive if h // g.group_size == kv) for kv in range(g.num_kv_heads)}
            top = max(count.values())
            pool = [h for h in alive if count[h // g.group_size] == top]
        else:
            pool = list(alive)
        errs = []
        for h in sorted(pool):
            c = cols[h]
            wg = W[:, c]
            errs.append((float((wg @ torch.linalg.inv(Hinv[c][:, c]) * wg).sum()), h))
        _, best = min(errs)
        _remove(W, Hinv, cols[best])
        alive.remove(best)
        order.append(best)
    return order


def obs_channel_order(
    W: torch.Tensor, H: torch.Tensor, step: int, group: int, damp: float, F: torch.Tensor | None = None
) -> list[int]:
    """MLP channels in greedy OBS removal order (ZipLM): each step removes the `group` channels of lowest
    W_j^T F W_j / H^-1_jj jointly (never across a level boundary, every `step` channels). F, the output
    factor, weighs output directions (identity when None); the compensation does not depend on it.
    Removed columns leave W, F W and H^-1 physically (the updates of the rest are the same), so each step
    costs what is left: a third of zeroing them in place, on the MLP's 1,536 channels."""
    W, Hinv = W.double().clone(), _damped_inverse(H, damp)
    FW = None if F is None else F.to(W) @ W  # kept up to date with W: F (W - W_S B) = F W - (F W)_S B
    alive = torch.arange(W.shape[1], device=W.device)  # original index of each remaining column
    order: list[int] = []
    while len(alive):
        k = min(group, step - len(order) % step)
        score = (W * W if FW is None else FW * W).sum(0) / Hinv.diagonal().clamp_min(1e-30)
        pick = torch.topk(score, k, largest=False).indices
        pick = pick[torch.argsort(score[pick])]
        order += alive[pick].tolist()
        if k == len(alive):  # the last channels: nothing left to compensate
            break
        update = torch.linalg.inv(Hinv[pick][:, pick]) @ Hinv[pick]
        W -= W[:, pick] @ update
        if FW is not None:
            FW -= FW[:, pick] @ update
        Hinv -= Hinv[:, pick] @ update
        rest = torch.ones(len(alive), dtype=torch.bool, device=W.device)
        rest[pick] = False
        W, Hinv, alive = W[:, rest], Hinv[rest][:, rest], alive[rest]
        FW = None if FW is None else FW[:, rest]
    return order


def module_levels(
    W: torch.Tensor,
    G: torch.Tensor,
    kept: list[list[int]],
    damp: float,
    dtype: torch.dtype,
    F: torch.Tensor | None = None,
    target: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[dict[int, torch.Tensor], list[float]]:
    """Refit weights (for every level below the top that keeps something) and relative errors of each level;
    `kept[l]` are the kept input columns of level l (the last level is the whole module). The refit reproduces
    the module's own output W X unless `target` = (Y X^T, Y Y^T) names another Y. Errors are weighed by the
    output factor F where given: ||F^1/2 (Y - W' X_S)||^2 / ||F^1/2 Y||^2."""
    weights, errors = {}, []
    Gd, Wd = G.double(), W.double().to(G.device)
    R, YY = (Wd @ Gd, None) if target is None else (t.double().to(G.device) for t in target)
    YY = R @ Wd.T if YY is None else YY
    Fd = None if F is None else F.to(Wd)
    ref = float((YY if Fd is None else Fd @ YY).trace().clamp_min(1e-30))

    def error(new: torch.Tensor, Rs: torch.Tensor, Gss: torch.Tensor) -> float:
        Fnew = new if Fd is None else Fd @ new
        return max(ref - 2 * float((Fnew * Rs).sum()) + float((Fnew @ Gss * new).sum()), 0.0) / ref

    top = len(kept) - 1
    for level, keep in enumerate(kept):
        idx = torch.tensor(keep, dtype=torch.long, device=G.device)
        if level == top:  # the original module (refitting it toward the stream too measured worse: docs/results.md)
            errors.append(0.0 if target is None else error(Wd, R.index_select(1, idx), Gd[idx][:, idx]))
        elif not keep:
            errors.append(1.0)
        else:  # the kept columns re-solved by least squares, as reformation does (C = G: the module's own output)
            # W G_S = (W G)_S = R_S: the module's own target is a slice of R, not a product per level
            Gss, Rs = Gd.index_select(0, idx).index_select(1, idx), R.index_select(1, idx)
            new = solve_exact(W, Gss, None, keep, damp, Rs)
            errors.append(error(new, Rs, Gss))
            weights[level] = new.to("cpu", dtype).contiguous()
    return weights, errors
