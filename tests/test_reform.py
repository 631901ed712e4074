"""Reformation: the solvers against float64 references, and layer-wise reformation on tiny and real models."""

import numpy as np
import pytest
import torch

from searchllm.models.sliced import LayerSlice
from searchllm.pruning.reform import Normal, ReformParams, reform_shard, solve_admm, solve_exact

from conftest import FAMILIES, tiny_family
from test_slicing import random_slices, whole


def problem(seed=0, n=24, out=10, tokens=400, same=True):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix  # correlated inputs, as in real layers
    F = X if same else X + 0.3 * torch.randn(tokens, n, generator=g, dtype=torch.float64)
    W = torch.randn(out, n, generator=g, dtype=torch.float64)
    keep = sorted(torch.randperm(n, generator=g)[: n // 2].tolist())
    return X, F, W, keep


def stats(X, F, keep, same):
    normal = Normal(list(range(X.shape[1])), same)
    normal.add(X, None if same else F)
    return normal.stats(keep)


@pytest.mark.parametrize("same", [True, False], ids=["features-are-targets", "distinct-features"])
def test_exact_solver_equals_a_float64_least_squares_reference(same):
    X, F, W, keep = problem(same=same)
    G, C, _ = stats(X, F, keep, same)
    got = solve_exact(W, G, C, keep, damp=0.0)
    ref = torch.linalg.lstsq(F[:, keep], X @ W.T).solution.T  # min ||X W^T - F_S W'^T||
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_admm_converges_to_the_exact_solution():
    X, F, W, keep = problem(1)
    G, C, _ = stats(X, F, keep, True)
    exact = solve_exact(W, G, C, keep, damp=0.01)
    gaps = [float((solve_admm(W, G, C, keep, 0.01, 1.0, it) - exact).norm() / exact.norm()) for it in (5, 30, 300)]
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 1e-3


@pytest.mark.parametrize(
    "inputs,targets", [("sequential", "original"), ("sequential", "layer"), ("independent", "original")]
)
@pytest.mark.parametrize("features", ["full", "pruned"])
@pytest.mark.parametrize("solver", ["exact", "admm"])
def test_reformation_never_increases_the_layer_reconstruction_error(
    llama, adapter, tokens, inputs, targets, features, solver
):
    slices = random_slices(adapter.geometry(), np.random.default_rng(3))
    p = ReformParams(solver=solver, inputs=inputs, features=features, targets=targets)
    _, _, results = reform_shard(whole(adapter, llama), slices, tokens, None, p, batch=2)
    assert [r.layer for r in results] == [0, 1, 2]
    for r in results:
        assert set(r.error_after) == {"o", "down"}
        for k in r.error_after:
            assert r.error_after[k] <= r.error_before[k] + 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_reformation_lowers_the_reconstruction_error_in_every_family(family, tokens):
    model, adapter = tiny_family(family)
    slices = random_slices(adapter.geometry(), np.random.default_rng(3))
    _, _, results = reform_shard(whole(adapter, model), slices, tokens, None, ReformParams(), batch=2)
    for r in results:
        assert all(r.error_after[k] < r.error_before[k] for k in ("o", "down"))


def test_reformed_weights_keep_the_sliced_shapes_and_skip_untouched_modules(llama, adapter, tokens):
    g = adapter.geometry()
    full = LayerSlice.full(g)
    only_mlp = LayerSlice(full.kv_pairs, full.mlp[: g.intermediate // 2])
    runner = whole(adapter, llama)
    _, _, results = reform_shard(runner, [only_mlp] * g.num_layers, tokens, None, ReformParams(), batch=3)
    for r in results:
        assert set(r.weights) == {"down"}  # heads are all kept: o has nothing to fold in
        assert r.weights["down"].shape == (g.hidden, g.intermediate // 2)


def test_a_dropped_block_is_skipped_and_later_layers_still_reformed(llama, adapter, tokens):
    slices = random_slices(adapter.geometry(), np.random.default_rng(5), drop_layer=1)
    _, _, results = reform_shard(whole(adapter, llama), slices, tokens, None, ReformParams(), batch=3)
    assert [r.layer for r in results] == [0, 2]


@pytest.mark.parametrize("solver", ["exact", "admm"])
def test_a_fitted_bias_never_reconstructs_worse_than_weights_alone(llama, adapter, tokens, solver):
    slices = random_slices(adapter.geometry(), np.random.default_rng(3))
    errs = {}
    for bias in (False, True):
        p = ReformParams(
            solver=solver, inputs="independent", targets="original", bias=bias, damp=0.0 if solver == "exact" else 0.1
        )
        _, _, results = reform_shard(whole(adapter, llama), slices, tokens, None, p, batch=2)
        errs[bias] = [r.error_after[k] for r in results for k in ("o", "down")]
    assert all(b <= a + 1e-9 for a, b in zip(errs[False], errs[True]))
    assert sum(errs[True]) < sum(errs[False])


@pytest.mark.parametrize("family", ["llama", "opt"])  # without and with biases of its own on o/down
def test_reformation_with_bias_exports_and_computes_what_the_runner_computed(family, tokens):
    from searchllm.evaluate import perplexity
    from searchllm.export.hf import build

    model, adapter = tiny_family(family)
    g = adapter.geometry()
    slices = random_slices(g, np.random.default_rng(4))
    runner = whole(adapter, model)
    _, _, results = reform_shard(runner, slices, tokens, None, ReformParams(bias=True), batch=3)
    assert set(results[0].weights) == {"o", "down", "o_bias", "down_bias"} and results[0].weights["o_bias"].shape == (
        g.hidden,
    )
    model, info = build(adapter, model.state_dict(), slices, {r.layer: r.weights for r in results})
    assert model.config.o_bias and (model.config.down_bias or model.config.mlp_bias)
    assert perplexity(model, tokens).ppl == pytest.approx(runner.forward(slices, tokens).ppl, rel=1e-4)


@pytest.mark.smollm2
def test_reformation_lowers_perplexity_of_smollm2_at_half_kept(smollm2):
    from searchllm.config import CorpusConfig
    from searchllm.data import first_windows, load_text, random_windows, tokenize
    from searchllm.models.weights import share
    from searchllm.pruning.shard import ShardRunner, split_layers
    from searchllm.pruning.space import Budget, SearchSpace

    torch.set_num_threads(2)
    ids = tokenize(load_text(CorpusConfig("wikitext2", "validation"), "auto")[0], smollm2.tokenizer)
    calib = random_windows(ids, 8, 256, 0, "calibration")
    held_out = tokenize(load_text(CorpusConfig("wikitext2-raw", "test"), "auto")[0], smollm2.tokenizer)
    evals = first_windows(held_out, 2, 256, "report")
    g = smollm2.adapter.geometry()
    runner = ShardRunner(
        smollm2.adapter.architecture(), share(smollm2.model.state_dict()), split_layers(g.num_layers, 1)[0]
    )
    runner.calibrate(calib, batch=4)
    space = SearchSpace.for_target(g, 0.5)
    attn = np.stack([runner.scores[i].attn.numpy() for i in range(g.num_layers)])
    mlp = np.stack([runner.scores[i].mlp.numpy() for i in range(g.num_layers)])
    slices = space.slices(space.initial(attn, mlp, Budget(0.5, 0.02)))
    before = runner.forward(slices, evals, batch=2).ppl
    reform_shard(runner, slices, calib, None, ReformParams(), batch=4)
    after = runner.forward(slices, evals, batch=2).ppl
    assert after < 0.8 * before


def test_a_layer_left_without_a_fitted_bias_exports_a_counted_zero_bias(llama, adapter, tokens):
    """reform.bias fits o/down biases only where inputs were dropped; the export's one bias layout gives
    the other layers zeros, which ExportInfo counts apart from the subnet's own parameters."""
    from searchllm.evaluate import perplexity
    from searchllm.export.hf import build

    g = adapter.geometry()
    slices = random_slices(g, np.random.default_rng(4))
    slices[0] = LayerSlice(LayerSlice.full(g).kv_pairs, slices[0].mlp)  # every head dim kept: o is not reformed
    runner = whole(adapter, llama)
    _, _, results = reform_shard(runner, slices, tokens, None, ReformParams(bias=True), batch=3)
    reformed = {r.layer: r.weights for r in results}
    assert "o_bias" not in reformed[0] and "o_bias" in reformed[1]
    model, info = build(adapter, llama.state_dict(), slices, reformed)
    fitted = sum(t.numel() for w in reformed.values() for k, t in w.items() if k.endswith("_bias"))
    sliced_only, _ = build(adapter, llama.state_dict(), slices)
    assert info.zero_biases == g.hidden
    assert info.params == sliced_only.num_parameters() + fitted + info.zero_biases
    assert perplexity(model, tokens).ppl == pytest.approx(runner.forward(slices, tokens).ppl, rel=1e-4)
