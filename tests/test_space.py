"""Parameter counting, the budget and the importance-initialised subnet."""

import numpy as np
import pytest

from searchllm.models.adapters import adapter_for
from searchllm.models.weights import share
from searchllm.pruning.shard import ShardRunner, split_layers
from searchllm.pruning.space import Budget, BudgetError, SearchSpace

from conftest import FAMILIES, family_model, tiny_family


def random_candidate(space, rng):
    c = space.full()
    c.attn = rng.random(c.attn.shape) < 0.7
    c.attn[..., 0] = True
    c.mlp = rng.random(c.mlp.shape) < 0.6
    c.active[1] = False
    return c


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", ["channels", "heads"])
def test_param_count_equals_numel_of_physically_sliced_layers(family, attention):
    model, adapter = tiny_family(family, **({"attention_bias": True} if family == "llama" else {}))
    space = SearchSpace(adapter.geometry(), attention)
    cand = random_candidate(space, np.random.default_rng(0))
    runner = ShardRunner(adapter.architecture(), share(model.state_dict()), split_layers(space.num_layers, 1)[0])
    blocks = runner.blocks(space.slices(cand))
    numel = sum(p.numel() for p in blocks.parameters())
    assert space.layer_params(cand).sum() == numel


@pytest.mark.parametrize("family", FAMILIES)
def test_full_candidate_counts_every_parameter_of_the_model(family):
    model = family_model(family)
    space = SearchSpace(adapter_for(model.config).geometry())
    assert space.params(space.full()) == sum(p.numel() for p in model.parameters())
    assert space.ratio(space.full()) == 1.0


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_tied_embeddings_are_counted_once(family):
    model = family_model(family, tie_word_embeddings=True)
    space = SearchSpace(adapter_for(model.config).geometry())
    assert space.params(space.full()) == sum(p.numel() for p in model.parameters())  # parameters() dedups ties


def test_decoder_count_ignores_embeddings(adapter):
    space = SearchSpace(adapter.geometry())
    c = space.full()
    c.mlp[:, c.mlp.shape[1] // 2 :] = False
    assert space.ratio(c, "decoder") < space.ratio(c, "total")


def test_initial_subnet_keeps_top_scores_at_one_ratio_in_every_block(adapter):
    g = adapter.geometry()
    space = SearchSpace.for_target(g, 0.8, mlp_min=0.2)
    rng = np.random.default_rng(0)
    attn_s, mlp_s = (
        rng.random((g.num_layers, g.num_kv_heads, g.head_dim // 2)),
        rng.random((g.num_layers, g.intermediate)),
    )
    budget = Budget(0.8, 0.02)
    init = space.initial(attn_s, mlp_s, budget)
    assert budget.contains(space.ratio(init))
    assert len(set(init.mlp.sum(-1))) == 1 and len(set(init.attn.sum(-1).ravel())) == 1
    k = int(init.mlp[0].sum())
    assert set(np.flatnonzero(init.mlp[0])) == set(np.argsort(-mlp_s[0])[:k])


def test_unreachable_budget_is_refused_with_the_space_bounds(adapter):
    space = SearchSpace.for_target(adapter.geometry(), 0.9)
    with pytest.raises(BudgetError, match="cannot be met.*spans kept ratios"):
        space.initial(np.ones((3, 2, 8)), np.ones((3, 96)), Budget(0.3, 0.01))


def test_heads_space_treats_a_kv_group_as_one_unit(adapter):
    g = adapter.geometry()
    space = SearchSpace(g, "heads", attn_range=(0.5, 1.0))
    c = space.full()
    c.attn[0, 0, 1] = False
    s = space.slices(c)[0]
    assert s.kv_pairs[1] == () and len(s.kv_pairs[0]) == g.head_dim // 2
    assert space.kv_dims(c)[0].tolist() == [g.head_dim, 0]


def test_candidate_round_trips_through_bytes(adapter):
    space = SearchSpace(adapter.geometry())
    c = random_candidate(space, np.random.default_rng(1))
    back = space.from_bytes(c.to_bytes())
    assert back.key() == c.key() and (back.mlp == c.mlp).all() and (back.attn == c.attn).all()


def test_rounded_space_keeps_mlp_channels_and_head_dims_in_multiples(adapter):
    from searchllm.search.evolution import Evolution, EvolutionParams

    g = adapter.geometry()  # head_dim 16 (8 rotary pairs), MLP 96
    space = SearchSpace.for_target(g, 0.7, multiple=8)
    assert set(space.mlp_counts) <= set(range(8, 97, 8)) and set(space.attn_counts) <= {4, 8}
    budget = Budget(0.7, 0.05)
    rng = np.random.default_rng(0)
    init = space.initial(
        rng.random((g.num_layers, g.num_kv_heads, g.head_dim // 2)), rng.random((g.num_layers, g.intermediate)), budget
    )
    children = Evolution(space, budget, EvolutionParams(population=12)).first_generation([init], rng, set())
    for c, _ in children:
        assert (c.mlp.sum(-1) % 8 == 0).all() and (space.kv_dims(c) % 8 == 0).all()


def test_round_to_must_be_even_for_channel_attention():
    from searchllm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="space.round_to=3 must be 1 or an even number"):
        load_config(["space.round_to=3"])
    assert load_config(["space.round_to=64"]).space.round_to == 64


def test_a_rounded_grid_that_steps_over_the_budget_mixes_two_mlp_sizes(adapter):
    g = adapter.geometry()  # 3 layers, MLP 96: with multiples of 16 no single MLP size lands in 0.8 +- 0.005
    space = SearchSpace.for_target(g, 0.8, multiple=16)
    budget = Budget(0.8, 0.005)
    rng = np.random.default_rng(0)
    init = space.initial(
        rng.random((g.num_layers, g.num_kv_heads, g.head_dim // 2)), rng.random((g.num_layers, g.intermediate)), budget
    )
    assert budget.contains(space.ratio(init)) and init.depth == g.num_layers
    sizes = init.mlp.sum(-1).tolist()
    assert len(set(sizes)) == 2 and all(n % 16 == 0 for n in sizes) and sorted(sizes, reverse=True) == sizes
