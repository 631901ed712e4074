"""Export: a physically smaller checkpoint that loads with plain from_pretrained and runs generate()."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from searchllm.export.hf import build, save
from searchllm.models.loading import load_pretrained
from searchllm.models.sliced import LayerSlice
from searchllm.pruning.reform import ReformParams, reform_shard
from searchllm.pruning.space import SearchSpace

from conftest import FAMILIES, tiny_family, word_tokenizer
from test_slicing import random_slices, whole


def random_candidate(space, rng, drop_layer=None):
    cand = space.full()
    cand.attn = rng.random(cand.attn.shape) < 0.6
    cand.attn[..., 0] = True
    cand.mlp = rng.random(cand.mlp.shape) < 0.5
    if drop_layer is not None:
        cand.active[drop_layer] = False
    return cand


def reformed_export(model, adapter, tokens, slices):
    runner = whole(adapter, model)
    _, _, results = reform_shard(runner, slices, tokens, None, ReformParams(), batch=3)
    exported, info = build(adapter, model.state_dict(), slices, {r.layer: r.weights for r in results})
    return runner, exported, info


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_parameter_count_equals_the_search_count(family):
    model, adapter = tiny_family(family)
    space = SearchSpace(adapter.geometry())
    cand = random_candidate(space, np.random.default_rng(0), drop_layer=1)
    exported, info = build(adapter, model.state_dict(), space.slices(cand))
    assert info.params == sum(p.numel() for p in exported.parameters()) == space.params(cand)
    assert info.kind == "searchllm" and info.layers == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_reformed_export_computes_what_the_reformed_subnet_computes(family, tokens):
    model, adapter = tiny_family(family)
    slices = random_slices(adapter.geometry(), np.random.default_rng(2), drop_layer=2)
    runner, exported, _ = reformed_export(model, adapter, tokens, slices)
    from searchllm.evaluate import perplexity

    assert perplexity(exported, tokens).ppl == pytest.approx(runner.forward(slices, tokens).ppl, rel=1e-5)


RELOAD = """
import sys, numpy as np, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
assert not any(k.startswith("searchllm") for k in sys.modules), "searchllm was imported"
tokens = torch.tensor(np.load(sys.argv[2]))
with torch.no_grad():
    np.save(sys.argv[3], m(tokens).logits.numpy())
"""


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip_in_a_fresh_process_without_searchllm(family, tokens, tmp_path):
    model, adapter = tiny_family(family)
    slices = random_slices(adapter.geometry(), np.random.default_rng(4))
    _, exported, info = reformed_export(model, adapter, tokens, slices)
    out = save(exported, info, tmp_path / "export", word_tokenizer(tmp_path / "tok"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "searchllm" and "AutoModelForCausalLM" in cfg["auto_map"]
    assert (
        len(cfg["layer_kv_pairs"]) == 3 and (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    )
    np.save(tmp_path / "tokens.npy", tokens.numpy())
    # Run outside the repo with a path that cannot reach searchllm's sources.
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    subprocess.run(
        [sys.executable, "-c", RELOAD, str(out), str(tmp_path / "tokens.npy"), str(tmp_path / "logits.npy")],
        check=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    with torch.no_grad():
        want = exported(tokens).logits.numpy()
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_the_kv_cache_matches_between_in_memory_and_reloaded_export(family, tokens, tmp_path):
    model, adapter = tiny_family(family)
    slices = random_slices(adapter.geometry(), np.random.default_rng(6))
    _, exported, info = reformed_export(model, adapter, tokens, slices)
    save(exported, info, tmp_path / "export")
    reloaded, _ = load_pretrained(str(tmp_path / "export"))
    prompt = tokens[:2, :8]  # 8 prompt + 12 new tokens: past the windowed families' 8-token window
    a = exported.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    b = reloaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    assert torch.equal(a, b)
    # The cache changes nothing: step-by-step greedy decoding without it gives the same tokens.
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, reloaded(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(a, seq)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_a_static_cache_matches_the_dynamic_cache(family, tokens):
    """A static cache is what generate() compiles (CUDA graphs) on a GPU: every layer's cache is sized
    from its own kept heads and widths, sliding layers' from their window."""
    model, adapter = tiny_family(family)
    exported, _ = build(adapter, model.state_dict(), random_slices(adapter.geometry(), np.random.default_rng(6)))
    prompt = tokens[:2, :8]
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    assert torch.equal(exported.generate(prompt, **kw), exported.generate(prompt, cache_implementation="static", **kw))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_a_static_cache_decode_step_compiles_without_graph_breaks(family, tokens):
    """torch.compile(fullgraph=True) traces one decode step: nothing in the sliced model forces Python
    back in, so CUDA graphs can cover the whole step."""
    from transformers import StaticCache

    model, adapter = tiny_family(family)
    exported, _ = build(adapter, model.state_dict(), random_slices(adapter.geometry(), np.random.default_rng(6)))
    prompt = tokens[:2, :8]
    cache = StaticCache(config=exported.config, max_cache_len=16)
    with torch.no_grad():
        nxt = exported(prompt, past_key_values=cache).logits[:, -1:].argmax(-1)
        step = torch.compile(exported, backend="eager", fullgraph=True)
        got = step(nxt, past_key_values=cache, position_ids=torch.full((2, 1), 8)).logits
    want = exported(torch.cat([prompt, nxt], 1), use_cache=False).logits[:, -1:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_uniform_subnet_exports_a_plain_llama_checkpoint(llama, adapter, tokens, tmp_path):
    g = adapter.geometry()
    full = LayerSlice.full(g)
    uniform = [LayerSlice((full.kv_pairs[0], ()), full.mlp[::2])] * g.num_layers  # one whole KV head, half the MLP
    runner, exported, info = reformed_export(llama, adapter, tokens, uniform)
    save(exported, info, tmp_path / "export")
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert info.kind == "plain" and cfg["model_type"] == "llama" and "auto_map" not in cfg
    assert (cfg["num_key_value_heads"], cfg["num_attention_heads"], cfg["intermediate_size"]) == (1, 2, 48)
    assert not (tmp_path / "export" / "modeling_searchllm.py").exists()
    from transformers import LlamaForCausalLM

    plain = LlamaForCausalLM.from_pretrained(tmp_path / "export")
    from searchllm.evaluate import perplexity

    assert perplexity(plain, tokens).ppl == pytest.approx(runner.forward(uniform, tokens).ppl, rel=1e-5)


def test_a_uniform_opt_subnet_keeping_every_head_exports_a_plain_opt_checkpoint(tokens, tmp_path):
    model, adapter = tiny_family("opt")
    full = LayerSlice.full(adapter.geometry())
    uniform = [LayerSlice(full.kv_pairs, full.mlp[::2])] * 3
    runner, exported, info = reformed_export(model, adapter, tokens, uniform)
    save(exported, info, tmp_path / "export")
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert info.kind == "plain" and cfg["model_type"] == "opt" and cfg["ffn_dim"] == 48
    from transformers import OPTForCausalLM

    from searchllm.evaluate import perplexity

    plain = OPTForCausalLM.from_pretrained(tmp_path / "export")
    assert perplexity(plain, tokens).ppl == pytest.approx(runner.forward(uniform, tokens).ppl, rel=1e-5)


def test_an_opt_subnet_with_fewer_heads_exports_the_searchllm_form(tokens):
    """OPT ties attention width to hidden size, so its own config cannot hold fewer heads."""
    model, adapter = tiny_family("opt")
    full = LayerSlice.full(adapter.geometry())
    uniform = [LayerSlice(full.kv_pairs[:2] + ((),) * 2, full.mlp)] * 3
    _, info = build(adapter, model.state_dict(), uniform)
    assert info.kind == "searchllm"


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_windows_follow_the_kept_layers_into_the_export(family, tokens, tmp_path):
    model, adapter = tiny_family(family)
    slices = random_slices(adapter.geometry(), np.random.default_rng(8), drop_layer=0)
    runner, exported, info = reformed_export(model, adapter, tokens, slices)
    save(exported, info, tmp_path / "export")
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    # Mistral slides in every layer; this Qwen2 from layer 1 on (max_window_layers=1), so after
    # dropping layer 0 both keep two sliding layers.
    assert cfg["sliding_window"] == 8 and cfg["layer_types"] == ["sliding_attention"] * 2
    reloaded, _ = load_pretrained(str(tmp_path / "export"))
    from searchllm.evaluate import perplexity

    assert perplexity(reloaded, tokens).ppl == pytest.approx(runner.forward(slices, tokens).ppl, rel=1e-5)


def test_a_uniform_qwen2_subnet_keeps_its_layer_types_in_the_plain_export(tokens, tmp_path):
    model, adapter = tiny_family("qwen2")
    full = LayerSlice.full(adapter.geometry())
    uniform = [LayerSlice((full.kv_pairs[0], ()), full.mlp[::2])] * 3
    runner, exported, info = reformed_export(model, adapter, tokens, uniform)
    save(exported, info, tmp_path / "export")
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert info.kind == "plain" and cfg["layer_types"] == ["full_attention"] + ["sliding_attention"] * 2
    from transformers import Qwen2ForCausalLM

    from searchllm.evaluate import perplexity

    plain = Qwen2ForCausalLM.from_pretrained(tmp_path / "export")
    assert perplexity(plain, tokens).ppl == pytest.approx(runner.forward(uniform, tokens).ppl, rel=1e-5)


@pytest.mark.parametrize("equal", [True, False])
def test_query_head_subnets_export_and_reload_with_the_same_perplexity(equal, tokens, tmp_path):
    from searchllm.evaluate import perplexity

    from test_slicing import query_head_slices

    model, adapter = tiny_family("llama", num_attention_heads=8)
    g = adapter.geometry()
    slices = query_head_slices(g, np.random.default_rng(8), equal)
    if equal:  # one query head per group and the same MLP size in every layer: the family's own config
        full = LayerSlice.full(g)
        slices = [LayerSlice(full.kv_pairs, slices[0].mlp, True, ((1,), (2,)))] * g.num_layers
    exported, info = build(adapter, model.state_dict(), slices)
    assert info.kind == ("plain" if equal else "searchllm")
    assert info.params == sum(s.params(g) for s in slices) + g.outer_params
    out = save(exported, info, tmp_path / "q", word_tokenizer(tmp_path / "tok"))
    reloaded, _ = load_pretrained(str(out))
    want = whole(adapter, model).forward(slices, tokens).ppl
    assert perplexity(reloaded, tokens).ppl == pytest.approx(want, rel=1e-5)
    if equal:
        assert reloaded.config.num_attention_heads == len(slices[0].q_rows(g)) // g.head_dim
