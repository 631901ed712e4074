"""A physically sliced subnet computes exactly what the masked original model computes."""

import numpy as np
import pytest

from searchllm.models.adapters import adapter_for
from searchllm.models.sliced import LayerSlice
from searchllm.models.weights import share
from searchllm.pruning.shard import ShardRunner, split_layers

from conftest import FAMILIES, family_model, tiny_family
from helpers import hf_ppl, masked_model


def whole(adapter, model):
    return ShardRunner(
        adapter.architecture(), share(model.state_dict()), split_layers(adapter.geometry().num_layers, 1)[0]
    )


def random_slices(g, rng, heads_only=False, drop_layer=None):
    out = []
    for i in range(g.num_layers):
        if heads_only:
            kept = rng.random(g.num_kv_heads) < 0.6
            kept[rng.integers(g.num_kv_heads)] = True
            pairs = tuple(tuple(range(g.head_dim // 2)) if k else () for k in kept)
        else:  # different widths per head, arbitrary (non-contiguous) pairs
            pairs = tuple(
                tuple(sorted(rng.choice(g.head_dim // 2, rng.integers(2, g.head_dim // 2 + 1), replace=False).tolist()))
                for _ in range(g.num_kv_heads)
            )
        mlp = tuple(sorted(rng.choice(g.intermediate, rng.integers(8, g.intermediate), replace=False).tolist()))
        out.append(LayerSlice(pairs, mlp, active=i != drop_layer))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_full_subnet_gives_the_original_perplexity(family, tokens):
    model, adapter = tiny_family(family)
    full = [LayerSlice.full(adapter.geometry())] * adapter.geometry().num_layers
    assert whole(adapter, model).forward(full, tokens).ppl == pytest.approx(hf_ppl(model, tokens), rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("heads_only", [False, True])
def test_sliced_subnet_equals_masked_model(family, heads_only, tokens):
    model, adapter = tiny_family(family)
    slices = random_slices(adapter.geometry(), np.random.default_rng(3), heads_only=heads_only)
    got = whole(adapter, model).forward(slices, tokens).ppl
    want = hf_ppl(masked_model(model, adapter, slices), tokens)
    assert got == pytest.approx(want, rel=1e-4)
    assert got != pytest.approx(hf_ppl(model, tokens), rel=1e-3)  # the subnet really differs


@pytest.mark.parametrize("family", FAMILIES)
def test_dropped_layer_equals_zeroed_layer(family, tokens):
    model, adapter = tiny_family(family)
    slices = random_slices(adapter.geometry(), np.random.default_rng(5), drop_layer=1)
    got = whole(adapter, model).forward(slices, tokens).ppl
    assert got == pytest.approx(hf_ppl(masked_model(model, adapter, slices), tokens), rel=1e-4)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_layers_see_only_their_window(family, tokens):
    """The same weights with the window removed give another loss: the window is applied, not ignored."""
    windowed = family_model(family)
    full = family_model(family, sliding_window=None, use_sliding_window=False)
    got = [
        whole(adapter_for(m.config), m).forward([LayerSlice.full(adapter_for(m.config).geometry())] * 3, tokens).ppl
        for m in (windowed, full)
    ]
    assert got[0] == pytest.approx(hf_ppl(windowed, tokens), rel=1e-5)
    assert got[0] != pytest.approx(got[1], rel=1e-3)


def test_gqa_query_heads_follow_their_kv_head(llama, adapter, tokens):
    """Dropping a KV head removes all query heads of its group: the q projection shrinks by group size."""
    g = adapter.geometry()
    full = LayerSlice.full(g)
    one_head = LayerSlice((full.kv_pairs[0], ()), full.mlp)
    block = whole(adapter, llama).blocks([one_head] * g.num_layers)["0"]
    assert block.self_attn.q_proj.weight.shape[0] == g.group_size * g.head_dim
    assert block.self_attn.k_proj.weight.shape[0] == g.head_dim


def test_two_shards_give_the_same_loss_as_one(llama, adapter, tokens):
    g = adapter.geometry()
    slices = random_slices(g, np.random.default_rng(7))
    state = share(llama.state_dict())
    a, b = (ShardRunner(adapter.architecture(), state, s) for s in split_layers(g.num_layers, 2))
    two = b.forward(slices, a.forward(slices, tokens), tokens).ppl
    assert two == pytest.approx(whole(adapter, llama).forward(slices, tokens).ppl, rel=1e-6)


def query_head_slices(g, rng, equal: bool):
    """Whole query heads kept inside their KV group: the same number in every group (equal) or any."""
    out = []
    full = LayerSlice.full(g)
    for _ in range(g.num_layers):
        if equal:
            r = int(rng.integers(1, g.group_size + 1))
            q = tuple(tuple(sorted(rng.choice(g.group_size, r, replace=False).tolist())) for _ in range(g.num_kv_heads))
        else:
            q = tuple(
                tuple(sorted(rng.choice(g.group_size, int(rng.integers(0, g.group_size + 1)), replace=False).tolist()))
                for _ in range(g.num_kv_heads)
            )
            if not any(q):
                q = ((0,),) + q[1:]
        pairs = tuple(full.kv_pairs[h] if q[h] else () for h in range(g.num_kv_heads))
        mlp = tuple(sorted(rng.choice(g.intermediate, g.intermediate // 2, replace=False).tolist()))
        out.append(LayerSlice(pairs, mlp, True, q))
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("equal", [True, False])
def test_query_head_slices_equal_the_masked_model(family, equal, tokens):
    model, adapter = tiny_family(family, num_attention_heads=8) if family != "opt" else tiny_family(family)
    g = adapter.geometry()
    slices = query_head_slices(g, np.random.default_rng(4), equal)
    if family != "opt":
        assert g.group_size == 4 and (equal or any(len(set(s.q_counts(g)) - {0}) > 1 for s in slices))
    got = whole(adapter, model).forward(slices, tokens).ppl
    assert got == pytest.approx(hf_ppl(masked_model(model, adapter, slices), tokens), rel=1e-4)
    assert got != pytest.approx(hf_ppl(model, tokens), rel=1e-3)


def test_slice_parameter_count_is_the_numel_of_its_block(tokens):
    model, adapter = tiny_family("qwen2", num_attention_heads=8)
    g = adapter.geometry()
    runner = whole(adapter, model)
    for equal in (True, False):
        for i, s in enumerate(query_head_slices(g, np.random.default_rng(6), equal)):
            assert s.params(g) == sum(p.numel() for p in runner.block(i, s).parameters())
