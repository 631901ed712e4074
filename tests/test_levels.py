"""The level database and the level search: exact budgets, entries that are OBS solves, candidates that are
exactly what the export holds, KL fitness, multi-step selection."""

import numpy as np
import pytest
import torch

from searchllm.export.hf import build
from searchllm.models.sliced import LayerSlice
from searchllm.models.weights import share
from searchllm.pruning.levels import (
    LevelDatabase,
    LevelError,
    LevelParams,
    LevelSpace,
    build_local,
    error_allocation,
    implied_levels,
    load_layers,
    save_layer,
    uniform_genome,
)
from searchllm.pruning.obs import gram, obs_channel_order, obs_head_order
from searchllm.pruning.prefix import PrefixCache, window_views
from searchllm.pruning.reform import solve_exact
from searchllm.pruning.shard import NLL, ShardRunner, drawn_tokens, sparse_kl, split_layers, topk_targets
from searchllm.rundir import RunDir
from searchllm.search.levelsearch import PROBE_STAGE, LevelSearch, LevelSearchParams, genome_key

from conftest import tiny_family
from test_slicing import whole


def build_db(family="llama", heads="equal", inputs="accumulated", target=0.7, seed=0, calib=None, refit="module"):
    """A tiny model of the family (8 query heads in 2 KV groups where it has GQA; OPT: 4 heads, free)
    and its level database built in this process at `target` kept."""
    if family == "opt":
        model, adapter = tiny_family(family, seed=seed)
        heads = "free"
    else:
        model, adapter = tiny_family(family, num_attention_heads=8, seed=seed)
    g = adapter.geometry()
    space = LevelSpace(g, LevelParams(heads=heads, mlp_levels=8, inputs=inputs, refit=refit))
    band = (int(0.97 * target * g.total_params), int(1.03 * target * g.total_params))
    runner = whole(adapter, model)
    calib = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(2)) if calib is None else calib
    layers, _ = build_local(runner, space, implied_levels(space, *band), calib, 2)
    runner.levels, runner.level_space = layers, space
    return model, adapter, runner, LevelDatabase(space, layers), band


def searcher(db, band, evaluator=None, run=None, params=None, generations=3):
    s = db.space
    return LevelSearch(
        db,
        s.top,
        s.geometry.total_params,
        band,
        params or LevelSearchParams(offspring=6, tokens=[32, 64], survivors=[2]),
        evaluator,
        run,
        0,
        generations,
    )


@pytest.mark.parametrize("heads", ["equal", "free"])
def test_level_switches_keep_the_parameter_count_exact(heads):
    _, _, _, db, band = build_db(heads=heads)
    search = searcher(db, band)
    rng = np.random.default_rng(0)
    genome = uniform_genome(db.space, db.params, *band, db.space.attn_top - 1)
    n = db.params(genome)
    moved = 0
    for _ in range(200):
        child = search.mutate(genome, rng)
        assert db.params(child) == n
        moved += int((child != genome).any())
        genome = child
    assert moved > 150  # switches really happen
    # and the count is the exported model's real parameter count
    model, adapter, *_ = build_db(heads=heads)
    exported, info = build(adapter, model.state_dict(), db.slices(genome), db.overrides(genome))
    assert info.params == n == sum(p.numel() for p in exported.parameters())


def test_crossover_restores_the_parents_count():
    _, _, _, db, band = build_db()
    search = searcher(db, band)
    rng = np.random.default_rng(1)
    a = uniform_genome(db.space, db.params, *band, db.space.attn_top)
    b = a.copy()
    for _ in range(10):
        b = search.mutate(b, rng)
    for _ in range(20):
        assert db.params(search.crossover(a, b, rng)) == db.params(a)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_a_database_entry_equals_a_direct_obs_solve_of_its_level(family):
    model, adapter, runner, db, _ = build_db(family, inputs="dense")
    g, space = adapter.geometry(), db.space
    # the dense inputs of layer 1's down_proj, recorded by the model itself
    calib = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(2))
    grams = {}

    def rec(layer, key, x):
        x = x.reshape(-1, x.shape[-1]).double()
        grams[(layer, key)] = grams.get((layer, key), 0) + x.T @ x

    runner.run_blocks(runner.blocks([LayerSlice.full(g)] * g.num_layers), runner.embed(calib), 2, rec)
    w = runner.blocks_w[1]
    for m in (2, 5):
        keep = db.layers[1].kept_channels(space, m)
        G = grams[(1, "down")]
        idx = torch.tensor(keep)
        want = solve_exact(w["down"], G[idx][:, idx], G[:, idx], keep, space.params.damp)
        assert torch.allclose(db.layers[1].mlp[m].float(), want.float(), atol=2e-3, rtol=2e-3)
    # the first head OBS removes is the one whose removal costs the least compensated error
    G = grams[(1, "o")]
    Hinv = torch.linalg.inv(G + space.params.obs_damp * G.diagonal().mean() * torch.eye(G.shape[0], dtype=G.dtype))
    W = w["o"].double()
    cost = []
    for h in range(g.num_heads):
        c = slice(h * g.head_dim, (h + 1) * g.head_dim)
        cost.append(float((W[:, c] @ torch.linalg.inv(Hinv[c, c]) * W[:, c]).sum()))
    per_group = [
        min(range(kv * g.group_size, (kv + 1) * g.group_size), key=cost.__getitem__) for kv in range(g.num_kv_heads)
    ]
    assert db.layers[1].head_order[0] == min(per_group, key=cost.__getitem__)
    assert obs_head_order(w["o"], G, g, True, space.params.obs_damp) == db.layers[1].head_order


def test_a_stream_refit_entry_solves_toward_the_dense_models_residual_stream():
    model, adapter, runner, db, band = build_db(refit="stream")
    g, space = adapter.geometry(), db.space
    calib = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(2))
    dense, pruned, feats = {}, {}, {}
    h = runner.embed(calib)
    runner.run_blocks(runner.blocks([LayerSlice.full(g)] * g.num_layers), h, 6, out=dense.__setitem__)
    implied = [tuple(int(v) for v in x) for x in implied_levels(space, *band)]
    runner.run_blocks(
        runner.blocks(implied), h, 6, lambda i, key, x: feats.__setitem__((i, key), x), pruned.__setitem__
    )
    i, (_, m_imp) = 1, implied[1]
    entry, w = db.layers[i], runner.blocks_w[i]
    # the stream entering the MLP of the implied model (its output less what its down_proj added), all its
    # MLP channels' features, and what its down_proj must add to reach the dense stream
    mid = pruned[i] - feats[(i, "down")] @ entry.mlp[m_imp].float().T
    full = runner.block(i, LayerSlice.full(g))
    with torch.no_grad():
        full.mlp(full.post_attention_layernorm(mid), lambda key, x: feats.__setitem__("full", x))
    f = feats["full"].reshape(-1, g.intermediate).double()
    y = (dense[i] - mid).reshape(-1, g.hidden).double()
    G = f.T @ f
    for m in (2, 5):
        keep = entry.kept_channels(space, m)
        idx = torch.tensor(keep)
        want = solve_exact(w["down"], G[idx][:, idx], None, keep, space.params.damp, y.T @ f[:, idx])
        assert torch.allclose(entry.mlp[m].float(), want.float(), atol=2e-3, rtol=2e-3)
    # layer 0's attention sees the dense stream: its stream target is its own output
    _, _, _, module, _ = build_db(refit="module")
    for a, wa in module.layers[0].attn.items():
        assert torch.allclose(db.layers[0].attn[a].float(), wa.float(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_the_gram_of_the_statistics_is_the_product_with_its_lower_blocks_mirrored(parts):
    x = torch.randn(300, 37, generator=torch.Generator().manual_seed(0))
    g, cut = gram(x, parts), round(37 / parts)
    torch.testing.assert_close(g, x.T @ x, rtol=1e-6, atol=1e-5)
    assert torch.equal(g[cut:, :cut], g[:cut, cut:].T)


def test_an_mlp_order_weighed_by_a_multiple_of_the_identity_is_the_unweighted_order():
    model, adapter, runner, db, _ = build_db()
    g, W = adapter.geometry(), runner.blocks_w[1]["down"]
    rng = torch.Generator().manual_seed(3)
    X = torch.randn(400, g.intermediate, generator=rng) * torch.rand(g.intermediate, generator=rng)
    eye = 7.0 * torch.eye(g.hidden, dtype=torch.float64)
    assert obs_channel_order(W, X.T @ X, 12, 4, 0.01, eye) == obs_channel_order(W, X.T @ X, 12, 4, 0.01)


@pytest.mark.parametrize("group", [1, 3])
def test_the_mlp_order_is_greedy_obs_re_solved_from_scratch_at_every_step(group):
    """At each step the channels removed are those of lowest w^T F w / (H_RR^-1)_jj, where w are the
    remaining columns R optimally compensated for everything removed before (W' = W H_:R H_RR^-1)."""
    rng = torch.Generator().manual_seed(5)
    d, n, step = 6, 12, 6
    W = torch.randn(d, n, generator=rng, dtype=torch.float64)
    X = torch.randn(40, n, generator=rng, dtype=torch.float64) @ torch.randn(n, n, generator=rng, dtype=torch.float64)
    A = torch.randn(d, d, generator=rng, dtype=torch.float64)
    F, H = A @ A.T, X.T @ X
    Hd = H + 0.01 * H.diagonal().mean() * torch.eye(n, dtype=torch.float64)
    want, alive = [], list(range(n))
    while alive:
        k = min(group, step - len(want) % step)
        R = torch.tensor(alive)
        Hinv = torch.linalg.inv(Hd[R][:, R])
        Wr = W @ Hd[:, R] @ Hinv
        score = ((F @ Wr) * Wr).sum(0) / Hinv.diagonal()
        pick = sorted(range(len(alive)), key=lambda j: float(score[j]))[:k]
        want += [alive[j] for j in pick]
        alive = [c for j, c in enumerate(alive) if j not in pick]
    assert obs_channel_order(W, H, step, group, 0.01, F) == want


def test_output_weighting_removes_first_the_channels_that_write_least_into_the_weighed_direction():
    model, adapter, runner, db, _ = build_db()
    g, W = adapter.geometry(), runner.blocks_w[1]["down"]
    H = torch.eye(
        g.intermediate, dtype=torch.float64
    )  # uncorrelated unit inputs: the OBS cost is the weighted column norm
    F = torch.zeros(g.hidden, g.hidden, dtype=torch.float64)
    F[0, 0] = 1.0  # only output 0 matters to the loss
    order = obs_channel_order(W, H, 12, 1, 0.01, F)
    assert order[:12] == torch.argsort(W[0].double() ** 2)[:12].tolist()
    assert order != obs_channel_order(W, H, 12, 1, 0.01)


def test_fisher_labels_are_drawn_from_the_models_own_distribution_seeded_by_window():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    logits = probs.clamp_min(1e-45).log().expand(40_000, -1)
    drawn = drawn_tokens(logits, 3, 7)
    freq = torch.bincount(drawn, minlength=5).double() / drawn.numel()
    assert freq[1] == 0  # a token the model gives no mass is never drawn
    torch.testing.assert_close(freq, probs.double(), rtol=0, atol=0.01)  # ~4.5 standard errors of the largest
    assert torch.equal(drawn, drawn_tokens(logits, 3, 7))
    assert not torch.equal(drawn, drawn_tokens(logits, 3, 8))


def test_output_factors_are_the_gradient_covariance_of_the_models_nll_on_its_own_drawn_tokens():
    model, adapter = tiny_family("llama", num_attention_heads=8)
    calib = torch.randint(0, 128, (3, 32), generator=torch.Generator().manual_seed(4))
    _, factors = whole(adapter, model).output_factors(calib, None, 2, 5)
    expect, outs = {}, {}
    hooks = [
        layer.mlp.register_forward_hook(lambda m, i, o, k=k: outs.__setitem__(k, o))
        for k, layer in enumerate(model.model.layers)
    ]
    for w in range(calib.shape[0]):  # the transformers model itself, one window at a time
        logits = model(calib[w : w + 1]).logits[0, :-1]
        for o in outs.values():
            o.retain_grad()
        torch.nn.functional.cross_entropy(logits, drawn_tokens(logits, 5, w), reduction="sum").backward()
        for k, o in outs.items():
            gr = o.grad[0].double()
            expect[k] = expect.get(k, 0) + gr.T @ gr
    for h in hooks:
        h.remove()
    for k, f in factors.items():
        torch.testing.assert_close(f, expect[k], rtol=1e-3, atol=1e-6 * float(expect[k].diagonal().sum()))


def test_output_factors_through_two_shards_equal_one_shard():
    model, adapter = tiny_family("llama", num_attention_heads=8, layers=4)
    g, state = adapter.geometry(), share(model.state_dict())
    calib = torch.randint(0, 128, (3, 32), generator=torch.Generator().manual_seed(4))
    none, one = whole(adapter, model).output_factors(calib, None, 2, 5)
    a, b = (ShardRunner(adapter.architecture(), state, s) for s in split_layers(g.num_layers, 2))
    grad, second = b.output_factors(a.forward([LayerSlice.full(g)] * g.num_layers, calib), None, 2, 5)
    _, first = a.output_factors(calib, grad, 2, 5)
    assert none is None and sorted(first | second) == sorted(one) == list(range(g.num_layers))
    for i, fm in (first | second).items():
        torch.testing.assert_close(fm, one[i], rtol=1e-4, atol=1e-9)
        assert torch.linalg.eigvalsh(fm).min() > -1e-9 * fm.diagonal().sum() and fm.diagonal().sum() > 0


def test_a_stream_refit_database_through_two_shards_equals_one_shard():
    model, adapter = tiny_family("llama", num_attention_heads=8, layers=4)
    g, state = adapter.geometry(), share(model.state_dict())
    space = LevelSpace(g, LevelParams(mlp_levels=8, refit="stream"))
    implied = implied_levels(space, int(0.6 * g.total_params), int(0.7 * g.total_params))
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(4))
    one, _ = build_local(whole(adapter, model), space, implied, calib, 2)
    a, b = (ShardRunner(adapter.architecture(), state, s) for s in split_layers(g.num_layers, 2))
    first, stream = build_local(a, space, implied, calib, 2)
    assert stream.shape[0] == 2 * calib.shape[0]  # the pruned and the dense stream, stacked
    two = first | build_local(b, space, implied, stream, 2)[0]
    assert sorted(two) == sorted(one) == list(range(g.num_layers))
    for i in one:
        assert two[i].mlp_order == one[i].mlp_order and two[i].head_order == one[i].head_order
        for m, w in one[i].mlp.items():
            torch.testing.assert_close(two[i].mlp[m], w)


def test_obs_compensation_beats_plain_removal():
    _, _, _, db, _ = build_db()
    attn, mlp = db.errors()
    assert (np.diff(mlp, axis=1) <= 1e-9).all()  # more kept, less error
    assert mlp[:, -1].max() == 0 and attn[:, 0].min() == 1


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "qwen3", "gemma3"])
def test_a_candidate_assembled_from_the_database_equals_the_exported_model(family):
    model, adapter, runner, db, band = build_db(family)
    rng = np.random.default_rng(3)
    genome = next(
        x for a in range(db.space.attn_top, -1, -1) if (x := uniform_genome(db.space, db.params, *band, a)) is not None
    )
    search = searcher(db, band)
    for _ in range(5):
        genome = search.mutate(genome, rng)
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(9))
    choices = [tuple(x) for x in genome]
    with torch.no_grad():
        h = runner.run_blocks(runner.blocks(choices), runner.embed(tokens))
        ours = torch.stack([runner.logits(x) for x in h])
        exported, _ = build(adapter, model.state_dict(), db.slices(genome), db.overrides(genome))
        theirs = exported(tokens).logits.float()
    assert (ours - theirs).abs().max() < 1e-4
    full = torch.stack(
        [
            runner.logits(x)
            for x in runner.run_blocks(runner.blocks([tuple(t) for t in db.space.full()]), runner.embed(tokens))
        ]
    )
    assert (ours - full).abs().max() > 1e-2  # the candidate is really pruned


def test_the_prefix_cache_runs_only_the_changed_layers_and_scores_exactly_as_a_full_run():
    _, _, runner, db, band = build_db()
    tokens = torch.randint(0, 128, (3, 32), generator=torch.Generator().manual_seed(4))
    parent = uniform_genome(db.space, db.params, *band, db.space.attn_top)
    child = parent.copy()
    L = len(child)
    child[L - 2, 1] -= 1  # a switch between the last two layers: the first L - 2 layers are the parent's
    child[L - 1, 1] += 1
    runner.forward([tuple(x) for x in db.space.full()], tokens, tokens, 2, "targets:16", "fit")
    plain = [runner.forward([tuple(x) for x in g], tokens, tokens, 2, "kl", "fit").total for g in (parent, child)]
    runner.prefix = PrefixCache(2**30)
    cached = [runner.forward([tuple(x) for x in g], tokens, tokens, 2, "kl", "fit").total for g in (parent, child)]
    assert cached == plain  # bitwise
    assert runner.prefix.hits == 1 and runner.prefix.skipped == L - 2
    runner.prefix = PrefixCache(1)  # a budget below one state keeps nothing
    runner.forward([tuple(x) for x in parent], tokens, tokens, 2, "kl", "fit")
    assert not runner.prefix.data


def test_a_token_set_of_whole_batches_of_a_larger_set_is_its_view_and_no_other_is():
    big = torch.arange(6 * 4).reshape(6, 4)
    views = window_views({"big": big, "pairs": big[[0, 1, 4, 5]], "split": big[[1, 2]], "odd": big[[4, 5, 2]]}, 2)
    assert views == {"pairs": [("big", [0, 1, 4, 5])]}  # (1, 2) straddles two batches of 2; (2,) is not a batch
    assert window_views({"big": big, "tail": big[[4, 5]], "one": big[[3]]}, 1) == {
        "tail": [("big", [4, 5])],
        "one": [("big", [3])],
    }
    two = window_views({"b": big, "a": big.clone(), "pairs": big[[0, 1]]}, 2)  # two sets of the same windows
    assert two == {"pairs": [("a", [0, 1]), ("b", [0, 1])]}


def test_a_view_starts_from_its_larger_sets_prefix_states_and_scores_exactly_as_a_full_run():
    _, _, runner, db, band = build_db()
    big = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(4))
    # "final" holds the same windows as "levels0" and sorts first, as in a run, but holds no states
    sets = {"levels0": big, "final": big.clone(), "some": big[[0, 1, 4, 5]]}
    base = uniform_genome(db.space, db.params, *band, db.space.attn_top)
    probe = base.copy()
    L = len(probe)
    probe[L - 1, 1] -= 1  # lowers the last layer: every layer before it is the base's
    full = [tuple(x) for x in db.space.full()]
    for name, t in sets.items():
        runner.forward(full, t, t, 2, "targets:16", name)
    plain = runner.forward([tuple(x) for x in probe], sets["some"], sets["some"], 2, "kl", "some").total
    runner.prefix = PrefixCache(2**30)
    runner.prefix.set_views(sets, 2)
    runner.forward([tuple(x) for x in base], big, big, 2, "kl", "levels0")
    assert runner.forward([tuple(x) for x in probe], sets["some"], sets["some"], 2, "kl", "some").total == plain
    assert runner.prefix.hits == 1 and runner.prefix.skipped == L - 1


def test_a_runner_in_two_streams_scores_targets_and_caches_to_the_bit_what_it_does_in_one():
    _, _, runner, db, band = build_db()
    tokens = torch.randint(0, 128, (5, 32), generator=torch.Generator().manual_seed(4))  # batches of 2, 2, 1
    parent = uniform_genome(db.space, db.params, *band, db.space.attn_top)
    child = parent.copy()
    child[-1, 1] -= 1
    full = [tuple(x) for x in db.space.full()]

    def run(streams: int):
        runner.streams, runner.prefix = streams, PrefixCache(2**30)
        dense, targets = runner.forward(full, tokens, tokens, 2, "targets:16", "fit")
        scores = [runner.forward([tuple(x) for x in g], tokens, tokens, 2, "kl", "fit").total for g in (parent, child)]
        scores.append(runner.forward([tuple(x) for x in child], tokens, tokens, 2, "nll").total)
        return dense.total, targets, scores, runner.prefix.data

    one, two = run(1), run(2)
    assert two[0] == one[0] and two[2] == one[2]  # bitwise
    assert all(torch.equal(a, b) for a, b in zip(two[1], one[1]))
    assert list(two[3]) == list(one[3]) and all(torch.equal(two[3][k], one[3][k]) for k in one[3])


@pytest.mark.parametrize("refit", ["module", "stream"])
def test_the_level_database_built_in_two_streams_is_the_one_built_in_one_to_the_bit(refit):
    model, adapter, runner, db, band = build_db(refit=refit)
    calib = torch.randint(0, 128, (5, 32), generator=torch.Generator().manual_seed(2))  # batches of 2, 2, 1
    implied = implied_levels(db.space, *band)
    builds = []
    for streams in (1, 2):
        runner.streams = streams
        builds.append(build_local(runner, db.space, implied, calib, 2))
    (one, out_one), (two, out_two) = builds
    assert torch.equal(out_two, out_one)
    plain = lambda e: (e.head_order, e.mlp_order, e.attn_error, e.mlp_error)  # noqa: E731
    for i, a in one.items():
        b = two[i]
        assert plain(b) == plain(a)
        assert all(torch.equal(b.attn[k], a.attn[k]) for k in a.attn)
        assert all(torch.equal(b.mlp[k], a.mlp[k]) for k in a.mlp)


def test_kl_of_the_dense_model_to_itself_is_zero_and_full_topk_is_the_exact_kl():
    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(20, 50) * 3, torch.randn(20, 50) * 3
    p = p_logits.log_softmax(-1)
    assert float(sparse_kl(p_logits, topk_targets(p, 5))) == pytest.approx(0, abs=1e-4)
    exact = torch.nn.functional.kl_div(q_logits.log_softmax(-1), p, log_target=True, reduction="sum")
    assert float(sparse_kl(q_logits, topk_targets(p, 50))) == pytest.approx(float(exact), rel=1e-4)
    assert 0 < float(sparse_kl(q_logits, topk_targets(p, 5))) <= float(exact) + 1e-4  # a lower bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_kl_in_blocks_of_positions_is_the_whole_window_kl_to_the_bit(monkeypatch, dtype):
    import searchllm.pruning.shard as shard

    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(150, 300) * 3, (torch.randn(150, 300) * 3).to(dtype)
    target = topk_targets(p_logits.log_softmax(-1), 20)
    monkeypatch.setattr(shard, "KL_ROWS", 10**6)
    whole_window = float(sparse_kl(q_logits, target))
    monkeypatch.setattr(shard, "KL_ROWS", 7)  # blocks that do not divide the window
    assert float(sparse_kl(q_logits, target)) == whole_window
    assert whole_window == pytest.approx(float(sparse_kl(q_logits.float(), target)), rel=1e-6)  # scored in float32


def test_kl_fitness_through_a_shard_is_zero_for_the_dense_model(llama, adapter, tokens):
    runner = whole(adapter, llama)
    full = [LayerSlice.full(adapter.geometry())] * adapter.geometry().num_layers
    runner.forward(full, tokens, tokens, 1, "targets:16", "fit")
    assert runner.forward(full, tokens, tokens, 1, "kl", "fit").value == pytest.approx(0, abs=1e-5)
    half = [LayerSlice(s.kv_pairs, s.mlp[::2]) for s in full]
    assert runner.forward(half, tokens, tokens, 1, "kl", "fit").value > 1e-3


def test_the_dense_targets_pass_returns_the_perplexity_a_plain_pass_scores(llama, adapter, tokens):
    runner = whole(adapter, llama)
    full = [LayerSlice.full(adapter.geometry())] * adapter.geometry().num_layers
    nll, (logp, idx) = runner.forward(full, tokens, tokens, 1, "targets:16", "fit")
    plain = runner.forward(full, tokens, tokens, 1, "nll")
    assert nll.tokens == plain.tokens and nll.total == pytest.approx(plain.total, rel=1e-6)
    assert logp.shape[-1] == idx.shape[-1] == 16


class FakeEvaluator:
    """Fitness = a fixed function of the genome plus stage noise that shrinks with more tokens."""

    def __init__(self, weights):
        self.weights, self.calls = weights, []

    def evaluate(self, genomes, stage):
        for i, gnm in enumerate(genomes):
            self.calls.append((genome_key(gnm), stage))
            true = float((self.weights * (gnm.max() - gnm)).sum())
            noise = (int(genome_key(gnm)[:6], 16) % 100) / 100 * (0.5 if stage == 0 else 0.0)
            yield i, NLL(true + noise, 1, kind="kl"), 0


def test_multi_step_selection_keeps_the_best_survivor(tmp_path):
    _, _, _, db, band = build_db()
    ev = FakeEvaluator(np.random.default_rng(0).random((db.space.num_layers, 2)))
    search = searcher(
        db, band, ev, RunDir(tmp_path).create(), LevelSearchParams(offspring=8, tokens=[32, 64, 128], survivors=[4, 2])
    )
    rng = np.random.default_rng(0)
    parent = uniform_genome(db.space, db.params, *band, db.space.attn_top)
    cands = [(c, "mutation") for c, _ in search.offspring([(parent, 0.0)], rng, set())]
    finals, records, counts = search.select(0, cands, {})
    assert counts == [8, 4, 2]
    stage0 = sorted((r["fitness"], r["genome"]) for r in records if r["stage"] == 0)
    last = {r["genome"]: r["fitness"] for r in records if r["stage"] == 2}
    assert set(last) <= {k for _, k in stage0[:4]}
    assert finals[0][1] == min(last.values())  # the best of the last stage is what selection returns
    # elitism: over generations the parent's fitness never gets worse
    result = search.run_search([(parent, "init")])
    hist = [h["best"] for h in result.history]
    assert hist == sorted(hist, reverse=True) and result.fitness == hist[-1]


def test_the_ladder_of_starting_points_stops_at_the_first_rung_scored_worse(tmp_path):
    _, _, _, db, band = build_db()
    space = db.space
    w = np.zeros((space.num_layers, 2))
    w[:, 0] = 1.0  # fitness grows with every attention level removed: the top rung is best, the second worse
    ev = FakeEvaluator(w)
    search = searcher(
        db,
        band,
        ev,
        RunDir(tmp_path).create(),
        LevelSearchParams(offspring=2, tokens=[32], survivors=[], probe=0),
        generations=1,
    )
    ladder = [
        (g, f"uniform attention level {a}")
        for a in range(space.attn_top, -1, -1)
        if (g := uniform_genome(space, db.params, *band, a)) is not None
    ]
    assert len(ladder) >= 3
    search.run_search([], ladder)
    scored = {r["origin"] for r in RunDir(tmp_path).load_evals().values()}
    assert scored == {ladder[0][1], ladder[1][1]}


def test_search_resumed_from_its_checkpoint_ends_identical(tmp_path):
    _, _, _, db, band = build_db()
    w = np.random.default_rng(1).random((db.space.num_layers, 2))
    init = [(uniform_genome(db.space, db.params, *band, db.space.attn_top), "init")]
    whole_run = searcher(db, band, FakeEvaluator(w), RunDir(tmp_path / "a").create(), generations=4).run_search(init)
    searcher(db, band, FakeEvaluator(w), RunDir(tmp_path / "b").create(), generations=2).run_search(init)
    ev = FakeEvaluator(w)
    resumed = searcher(db, band, ev, RunDir(tmp_path / "b"), generations=4).run_search(init)
    assert (resumed.best == whole_run.best).all() and resumed.fitness == whole_run.fitness
    assert all(s >= 0 for _, s in ev.calls) and len(ev.calls) < sum(1 for _ in open(tmp_path / "a" / "evals.jsonl"))


def test_database_layers_round_trip_through_safetensors(tmp_path):
    _, _, _, db, _ = build_db()
    for e in db.layers.values():
        save_layer(tmp_path, e)
    back = load_layers(tmp_path)
    for i, e in db.layers.items():
        assert back[i].head_order == e.head_order and back[i].mlp_order == e.mlp_order
        assert set(back[i].mlp) == set(e.mlp) and all(torch.equal(back[i].mlp[k], e.mlp[k]) for k in e.mlp)
        assert back[i].attn_error == e.attn_error


def test_error_accumulation_changes_the_database():
    _, _, _, acc, _ = build_db(inputs="accumulated")
    _, _, _, dense, _ = build_db(inputs="dense")
    assert acc.layers[0].head_order == dense.layers[0].head_order  # layer 0's attention sees the same inputs
    assert acc.layers[0].mlp_order != dense.layers[0].mlp_order  # its MLP sees the pruned attention
    assert any(acc.layers[i].mlp_order != dense.layers[i].mlp_order for i in (1, 2))


def test_error_allocation_lands_in_the_budget():
    _, _, _, db, band = build_db()
    genome = error_allocation(db, *band)
    assert band[0] <= db.params(genome) <= band[1]


def test_bad_level_settings_are_refused_naming_the_key():
    _, adapter = tiny_family("llama")
    with pytest.raises(LevelError, match="levels.mlp_levels=7 must divide the MLP width 96"):
        LevelSpace(adapter.geometry(), LevelParams(mlp_levels=7))
    with pytest.raises(LevelError, match="levels.heads='x'"):
        LevelSpace(adapter.geometry(), LevelParams(heads="x"))
    with pytest.raises(LevelError, match="levels.weighting='hessian' is not allowed; choose one of: fisher, none"):
        LevelSpace(adapter.geometry(), LevelParams(weighting="hessian"))
    with pytest.raises(LevelError, match="levels.refit='output' is not allowed; choose one of: module, dense, stream"):
        LevelSpace(adapter.geometry(), LevelParams(refit="output"))


def test_sensitivity_reallocation_moves_levels_toward_sensitive_layers_at_the_same_count(tmp_path):
    _, _, _, db, band = build_db()
    weights = np.zeros((db.space.num_layers, 2))
    weights[0, 1] = 5.0  # layer 0's MLP is by far the most sensitive
    search = searcher(
        db,
        band,
        FakeEvaluator(weights),
        RunDir(tmp_path).create(),
        LevelSearchParams(offspring=4, tokens=[32], survivors=[], probe=1),
    )
    base = uniform_genome(db.space, db.params, *band, db.space.attn_top)
    base[:, 1] = db.space.mlp_top - 2
    base[1, 1] += 1
    base[2, 1] -= 1
    moved, probes = search.reallocations(base, {}, set())
    assert len(probes) == db.space.num_layers and moved  # attention is whole everywhere: only MLP probes
    for child, origin in moved:
        assert db.params(child) == db.params(base) and "MLP" in origin
        assert child[0, 1] == base[0, 1] + 1  # the sensitive layer gained a level


@pytest.mark.parametrize("probe_tokens,probe_stage", [(16, PROBE_STAGE), (4096, 0)])  # the first stage has 32
def test_probes_are_scored_on_their_own_tokens_only_when_fewer_than_the_first_stages(
    tmp_path, probe_tokens, probe_stage
):
    _, _, _, db, band = build_db()
    ev = FakeEvaluator(np.ones((db.space.num_layers, 2)))
    params = LevelSearchParams(offspring=2, tokens=[32], survivors=[], probe=1, probe_tokens=probe_tokens)
    search = searcher(db, band, ev, RunDir(tmp_path).create(), params, generations=1)
    search.run_search([(uniform_genome(db.space, db.params, *band, db.space.attn_top), "uniform")])
    probes = [r for r in RunDir(tmp_path).load_evals().values() if r["origin"] == "probe"]
    assert probes and {r["stage"] for r in probes} == {probe_stage}
    assert {stage for _, stage in ev.calls} == {0, probe_stage}  # everything else on the selection stage


def test_a_build_resumed_after_its_first_layers_gives_the_same_database():
    model, adapter, _, db, band = build_db()
    space = db.space
    runner = whole(adapter, model)
    calib = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(2))
    fresh, _ = build_local(runner, space, implied_levels(space, *band), calib, 2, done={0: db.layers[0]})
    assert sorted(fresh) == [1, 2]  # layer 0 was only run
    for e in fresh.values():
        assert e.head_order == db.layers[e.layer].head_order and e.mlp_order == db.layers[e.layer].mlp_order
        assert all(torch.equal(e.mlp[k], db.layers[e.layer].mlp[k]) for k in e.mlp)
