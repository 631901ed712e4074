"""Evolutionary operators: budget, depth range, mask similarity, determinism."""

import numpy as np
import pytest

from searchllm.models.adapters import Geometry
from searchllm.pruning.space import Budget, SearchSpace
from searchllm.search.evolution import Evolution, EvolutionParams, mutate_mask

# SmolLM2-135M's real shapes (no weights needed to test the operators).
SMOL = Geometry(30, 576, 9, 3, 64, 1536, 49152, False, False, False, 1152, 49152 * 576 + 576)


def setup(target, attention="channels", seed=0):
    space = SearchSpace.for_target(SMOL, target, attention)
    budget = Budget(target, 0.02)  # heads on 3 KV heads with a 0.05 MLP grid cannot hit 0.9 within 0.01
    rng = np.random.default_rng(seed)
    init = space.initial(rng.random((30, 3, 32)), rng.random((30, 1536)), budget)
    return (
        space,
        budget,
        Evolution(space, budget, EvolutionParams(population=30, parents=5, mutations=15, crossovers=9)),
        init,
    )


@pytest.mark.parametrize("target", [0.9, 0.7, 0.5])
@pytest.mark.parametrize("attention", ["channels", "heads"])
def test_every_child_lies_inside_the_budget_and_depth_range(target, attention):
    space, budget, evo, init = setup(target, attention)
    rng, seen = np.random.default_rng(1), set()
    gen0 = [c for c, _ in evo.first_generation([init], rng, seen)]
    kids = [c for c, _ in evo.offspring(gen0[:5], rng, seen)]
    for c in gen0 + kids:
        assert budget.contains(space.ratio(c))
        assert space.depth_range[0] <= c.depth <= space.depth_range[1]
    assert len(gen0) == 30 and len(kids) == 30 and evo.skipped == 0
    assert len({c.key() for c in gen0 + kids}) == 60  # no candidate is evaluated twice


def test_crossover_takes_each_block_from_one_parent():
    space, _, evo, init = setup(0.8)
    rng = np.random.default_rng(2)
    a, b = (evo.mutate(init, rng, 1.0, 0.0, 0.0) for _ in range(2))
    c = evo.crossover(a, b, rng)
    for i in range(space.num_layers):
        assert ((c.mlp[i] == a.mlp[i]).all() and (c.attn[i] == a.attn[i]).all()) or (
            (c.mlp[i] == b.mlp[i]).all() and (c.attn[i] == b.attn[i]).all()
        )


@pytest.mark.parametrize("old,new", [(100, 100), (100, 60), (60, 100), (30, 150)])
def test_mask_mutation_keeps_at_least_alpha_of_the_kept_set(old, new):
    rng = np.random.default_rng(3)
    mask = np.zeros(160, bool)
    mask[rng.choice(160, old, replace=False)] = True
    for _ in range(50):
        out = mutate_mask(mask, new, 0.8, rng)
        assert out.sum() == new
        assert (out & mask).sum() >= 0.8 * min(old, new)


def test_depth_mutation_drops_and_restores_whole_blocks():
    space, budget, evo, init = setup(0.5)
    rng = np.random.default_rng(4)
    depths = {evo.mutate(init, rng, 0.0, 0.0, 1.0).depth for _ in range(40)}
    assert min(depths) == space.depth_range[0] and max(depths) == space.num_layers


def test_same_seed_same_generation():
    def gen(seed):
        space, _, evo, init = setup(0.7)
        return [c.key() for c, _ in evo.first_generation([init], np.random.default_rng(seed), set())]

    assert gen(5) == gen(5) and gen(5) != gen(6)


def test_selection_is_elitist_and_ranks_failures_last():
    space, _, evo, init = setup(0.8)
    rng = np.random.default_rng(5)
    cands = [evo.mutate(init, rng, 1.0, 0.0, 0.0) for _ in range(4)]
    top = Evolution.select([(cands[0], float("nan")), (cands[1], 3.0), (cands[2], 1.0), (cands[3], float("inf"))], 3)
    assert [f for _, f in top][:2] == [1.0, 3.0]
