"""Subnets chosen without search, at the same budget and from the same calibration pass as the search.

  uniform  the same kept ratio in every block, units chosen by the paper's importance scores (this is
           also the paper's initial subnet: SearchSpace.initial).
  layerdrop  ShortGPT (Men et al., 2024): whole blocks removed in order of least block influence (1 -
           mean cosine similarity of a block's input and output on calibration data) until the subnet is
           at or below the budget's upper bound; no compensation. One block is a coarse step, so the kept
           ratio is the closest below the band's top, not necessarily inside it.
  flap     FLAP (An et al., AAAI 2024) as its paper describes it: the fluctuation metric WIFV of every
           input channel of o and down, standardised per layer and module, one global threshold across
           layers and modules (AL-AM) so the structure adapts per layer, and bias compensation: the pruned
           channels' mean contribution on calibration data becomes a bias of o / down.
FLAP's units are this search space's units (rotary pairs of each KV head, or whole GQA groups with
space.attention=heads; FLAP itself prunes whole heads of MHA models and has no GQA support). Units are
taken in order of standardised score while they fit the budget; a unit that would overshoot is passed
over so that cheaper ones just below the threshold fill the budget exactly (coarse head units would
otherwise miss it by up to a head). Every block
keeps at least one attention unit and one MLP channel, and the biases' own parameters are paid for from
the budget, so the exported model has the budget's size.
"""

from __future__ import annotations

import numpy as np

from searchllm.pruning.scores import Scores
from searchllm.pruning.space import Budget, BudgetError, Candidate, SearchSpace
from searchllm.strategies import register


def standardize(x: np.ndarray) -> np.ndarray:
    """Per layer (leading axis): zero mean, unit standard deviation (FLAP's `standarlization`)."""
    x = x.astype(np.float64)
    mu, sd = x.mean(-1, keepdims=True), x.std(-1, keepdims=True)
    return (x - mu) / np.where(sd > 0, sd, 1.0)


def flap_unit_scores(space: SearchSpace, flap_o: np.ndarray) -> np.ndarray:
    """(L, q_dim) standardised WIFV of o's input columns -> (L, G, U) mean over each unit's columns."""
    g = space.geometry
    z = standardize(flap_o).reshape(g.num_layers, g.num_kv_heads, g.group_size, g.head_dim)
    if space.attention == "heads":
        return z.mean(axis=(2, 3))[:, None, :]
    half = g.head_dim // 2
    return (z[..., :half] + z[..., half:]).mean(axis=2) / 2  # a rotary pair: dims p and p + half


def bias_params(space: SearchSpace) -> int:
    """Parameters FLAP's compensation adds: an o and a down bias per block, where the family has none."""
    g = space.geometry
    return g.num_layers * g.hidden * len(g.new_biases({"o_bias", "down_bias"}))


@register("uniform", "baseline", "the same kept ratio in every block, units by the paper's scores")
def uniform(space: SearchSpace, scores: Scores, budget: Budget) -> Candidate:
    return space.initial(scores.attn, scores.mlp, budget)


@register("flap", "baseline", "FLAP: fluctuation metric, one global threshold, bias compensation", compensates=True)
def flap(space: SearchSpace, scores: Scores, budget: Budget) -> Candidate:
    g, L = space.geometry, space.num_layers
    attn = flap_unit_scores(space, scores.flap_o)
    mlp = standardize(scores.flap_down)
    kv_per_unit = 2 if space.attention == "channels" else g.head_dim
    # Marginal costs past the first unit: an output bias (o, down) comes with the first unit only, and every
    # block keeps at least one of each, so those biases sit in the fixed part.
    cost_kv = g.layer_count(2, 0) - g.layer_count(1, 0)
    cost_attn, cost_mlp = kv_per_unit * cost_kv, g.layer_count(0, 2) - g.layer_count(0, 1)
    fixed = g.layer_count(1, 1) - cost_kv - cost_mlp
    base = fixed * L + (g.outer_params if budget.count == "total" else 0)
    allowed = budget.target * space.total(budget.count) - bias_params(space)
    # Every block keeps its best attention unit and MLP channel; the rest compete on one threshold.
    keep_a = np.zeros(attn.shape, bool)
    flat = attn.reshape(L, -1)
    keep_a.reshape(L, -1)[np.arange(L), flat.argmax(1)] = True
    keep_m = np.zeros(mlp.shape, bool)
    keep_m[np.arange(L), mlp.argmax(1)] = True
    used = base + keep_a.sum() * cost_attn + keep_m.sum() * cost_mlp
    if used > allowed:
        raise BudgetError(f"budget.target={budget.target} is below FLAP's minimum (one unit per module per block)")
    values = np.concatenate([attn.ravel(), mlp.ravel()])
    costs = np.concatenate([np.full(attn.size, cost_attn), np.full(mlp.size, cost_mlp)])
    taken = np.concatenate([keep_a.ravel(), keep_m.ravel()])
    for idx in np.argsort(-values, kind="stable"):
        if taken[idx]:
            continue
        if used + costs[idx] > allowed:
            continue  # past the global threshold; cheaper units below it may still fill the budget exactly
        taken[idx], used = True, used + costs[idx]
    return Candidate(np.ones(L, bool), taken[: attn.size].reshape(attn.shape), taken[attn.size :].reshape(mlp.shape))


@register("layerdrop", "baseline", "ShortGPT: whole blocks of least influence removed, no compensation")
def layer_drop(space: SearchSpace, scores: Scores, budget: Budget) -> Candidate:
    cand = space.full()
    for i in np.argsort(scores.influence.reshape(-1), kind="stable"):
        if space.ratio(cand, budget.count) <= budget.high + 1e-12 or cand.depth == 1:
            break
        cand.active[i] = False
    return cand
