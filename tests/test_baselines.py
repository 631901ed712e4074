import numpy as np
import pytest
import torch

from searchllm.evaluate import perplexity
from searchllm.export.hf import build
from searchllm.models.weights import share
from searchllm.pruning.scores import Scores, flap_biases
from searchllm.pruning.shard import ShardRunner, split_layers
from searchllm.pruning.space import Budget, SearchSpace
from searchllm.search.baselines import bias_params, flap, standardize
from searchllm.search.evolution import EvolutionParams, RandomSearch

from conftest import FAMILIES, tiny_family


def calibrated(model, adapter, tokens):
    g = adapter.geometry()
    runner = ShardRunner(adapter.architecture(), share(model.state_dict()), split_layers(g.num_layers, 1)[0])
    runner.calibrate(tokens)
    return runner, Scores.stack(runner.scores)


@pytest.fixture
def scored(llama, adapter, tokens):
    return calibrated(llama, adapter, tokens)


@pytest.mark.parametrize("target", [0.9, 0.7, 0.5])
@pytest.mark.parametrize("attention", ["channels", "heads"])
def test_flap_hits_the_budget_including_its_biases(llama, adapter, scored, target, attention):
    runner, scores = scored
    space = SearchSpace.for_target(adapter.geometry(), target, attention)
    budget = Budget(target, 0.02)
    cand = flap(space, scores, budget)
    slices = space.slices(cand)
    model, info = build(adapter, llama.state_dict(), slices, flap_biases(adapter, llama.state_dict(), slices, scores))
    assert info.params == space.params(cand) + bias_params(space)
    assert budget.contains(info.params / adapter.geometry().total_params)
    assert cand.active.all() and (cand.attn.sum((1, 2)) >= 1).all() and (cand.mlp.sum(1) >= 1).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_flap_hits_the_budget_in_every_family(family, tokens):
    """Output biases (OPT, and o/down biases elsewhere) come with a block's first unit, not with every unit."""
    model, adapter = tiny_family(family)
    _, scores = calibrated(model, adapter, tokens)
    space = SearchSpace.for_target(adapter.geometry(), 0.7)
    cand = flap(space, scores, Budget(0.7, 0.02))
    assert Budget(0.7, 0.02).contains((space.params(cand) + bias_params(space)) / adapter.geometry().total_params)


def test_flap_structure_adapts_per_layer_from_one_global_threshold(adapter, scored):
    _, scores = scored
    space = SearchSpace.for_target(adapter.geometry(), 0.6)
    cand = flap(space, scores, Budget(0.6, 0.02))
    assert len(set(cand.mlp.sum(1).tolist())) > 1  # not the same MLP width everywhere
    # Within a layer, FLAP keeps the channels with the highest standardised fluctuation.
    z = standardize(scores.flap_down)
    for i in range(space.num_layers):
        assert z[i][cand.mlp[i]].min() >= z[i][~cand.mlp[i]].max()


def test_flap_bias_compensation_adds_the_pruned_channels_mean_contribution(llama, adapter, scored):
    _, scores = scored
    g = adapter.geometry()
    space = SearchSpace.for_target(g, 0.7)
    slices = space.slices(flap(space, scores, Budget(0.7, 0.02)))
    biases = flap_biases(adapter, llama.state_dict(), slices, scores)
    w = llama.state_dict()[adapter.block_state_keys(1)["down"]]
    pruned = np.setdiff1d(np.arange(g.intermediate), slices[1].mlp)
    expected = w[:, pruned].double() @ torch.as_tensor(scores.mean_down[1][pruned], dtype=torch.float64)
    torch.testing.assert_close(biases[1]["down_bias"].double(), expected, rtol=1e-5, atol=1e-6)
    assert biases[1]["o_bias"].shape == (g.hidden,)


def test_flap_export_with_biases_computes_what_the_search_evaluated(llama, adapter, scored, tokens):
    runner, scores = scored
    space = SearchSpace.for_target(adapter.geometry(), 0.7)
    slices = space.slices(flap(space, scores, Budget(0.7, 0.02)))
    biases = flap_biases(adapter, llama.state_dict(), slices, scores)
    runner.reformed = {i: (slices[i], b) for i, b in biases.items()}
    with_bias = runner.forward(slices, tokens).ppl
    runner.reformed = {}
    assert runner.forward(slices, tokens).ppl != pytest.approx(with_bias, rel=1e-4)  # the biases matter
    model, info = build(adapter, llama.state_dict(), slices, biases)
    assert info.kind == "searchllm" and model.config.down_bias and model.config.o_bias
    assert perplexity(model, tokens).ppl == pytest.approx(with_bias, rel=1e-4)


def test_uniform_baseline_keeps_the_same_counts_in_every_block_within_budget(adapter, scored):
    _, scores = scored
    space = SearchSpace.for_target(adapter.geometry(), 0.7)
    budget = Budget(0.7, 0.03)
    cand = space.initial(scores.attn, scores.mlp, budget)
    assert budget.contains(space.ratio(cand)) and len(set(cand.mlp.sum(1).tolist())) == 1
    assert len(set(cand.attn.sum(-1).ravel().tolist())) == 1


def test_random_search_draws_valid_distinct_subnets_reproducibly(adapter):
    space = SearchSpace.for_target(adapter.geometry(), 0.7)
    budget = Budget(0.7, 0.03)
    params = EvolutionParams(population=12, parents=3, mutations=4, crossovers=2)

    def draw(seed):
        return [
            c for c, _ in RandomSearch(space, budget, params).first_generation([], np.random.default_rng(seed), set())
        ]

    gen = draw(0)
    assert len(gen) == 12 and len({c.key() for c in gen}) == 12
    assert all(budget.contains(space.ratio(c)) for c in gen)
    assert [c.key() for c in gen] == [c.key() for c in draw(0)]
    assert len({int(c.mlp[0].sum()) for c in gen}) > 1  # widths vary, not only masks


def test_compensated_fitness_runs_each_candidate_with_its_flap_biases(llama, adapter, scored, tokens):
    runner, scores = scored
    space = SearchSpace.for_target(adapter.geometry(), 0.7)
    slices = space.slices(space.initial(scores.attn, scores.mlp, Budget(0.7, 0.03)))
    plain = runner.forward(slices, tokens).ppl
    runner.means = {i: (scores.mean_o[i], scores.mean_down[i]) for i in range(space.num_layers)}
    compensated = runner.forward(slices, tokens).ppl
    model, _ = build(adapter, llama.state_dict(), slices, flap_biases(adapter, llama.state_dict(), slices, scores))
    assert compensated == pytest.approx(perplexity(model, tokens).ppl, rel=1e-4)
    assert compensated != pytest.approx(plain, rel=1e-4)
    full = space.slices(space.full())
    runner.means, dense = {}, runner.forward(full, tokens).ppl
    runner.means = {i: (scores.mean_o[i], scores.mean_down[i]) for i in range(space.num_layers)}
    assert runner.forward(full, tokens).ppl == pytest.approx(dense, rel=1e-6)  # nothing pruned, nothing added


def test_layer_drop_removes_the_blocks_of_least_influence_until_the_budget(llama, adapter, tokens):
    from searchllm.search.baselines import layer_drop

    model, adapter = tiny_family("llama", layers=6)
    runner, scores = calibrated(model, adapter, tokens)
    g = adapter.geometry()
    space = SearchSpace(g, depth_range=(1, g.num_layers))
    budget = Budget(0.7, 0.01)
    cand = layer_drop(space, scores, budget)
    assert space.ratio(cand) <= budget.high and not (~cand.active).sum() == 0
    kept_bi, dropped_bi = scores.influence[cand.active].ravel(), scores.influence[~cand.active].ravel()
    assert dropped_bi.max() <= kept_bi.min()  # ShortGPT's order: least influence first
    one_less = cand.copy()
    one_less.active[np.flatnonzero(~cand.active)[-1]] = True
    assert space.ratio(one_less) > budget.high  # no more blocks dropped than the budget needs
