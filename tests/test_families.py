"""Model families: which are accepted, which variants are refused, and the shapes each must handle."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from searchllm.export.hf import build
from searchllm.models.adapters import UnsupportedModelError, adapter_for
from searchllm.models.sliced import LayerSlice
from searchllm.models.weights import share
from searchllm.pruning.shard import ShardRunner, split_layers

from conftest import family_model, tiny_family, tiny_model
from helpers import hf_ppl, masked_model
from test_slicing import random_slices, whole


def test_an_unsupported_architecture_is_refused_with_the_supported_list():
    from transformers import GPTNeoXConfig

    with pytest.raises(
        UnsupportedModelError,
        match="'gpt_neox' is not supported; supported model types: gemma3, gemma3_text, llama, mistral, opt, qwen2, "
        "qwen3",
    ):
        adapter_for(GPTNeoXConfig())


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"do_layer_norm_before": False}, "post-norm blocks (do_layer_norm_before=False"),
        ({"word_embed_proj_dim": 32}, "projected embeddings (word_embed_proj_dim=32 != hidden_size=64)"),
    ],
)
def test_opt_variants_the_blocks_cannot_reproduce_are_refused_by_name(overrides, message):
    from transformers import OPTConfig

    with pytest.raises(UnsupportedModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        adapter_for(OPTConfig(hidden_size=64, num_attention_heads=4, ffn_dim=96, **overrides))


def test_a_gemma3_layer_type_the_blocks_do_not_run_is_refused_by_name():
    config = tiny_model("gemma3_text").config
    config.layer_types = ["sliding_attention", "chunked_attention", "full_attention", "full_attention"]
    with pytest.raises(UnsupportedModelError, match=r"layer types \['chunked_attention'\]"):
        adapter_for(config)


@pytest.mark.parametrize("kv_heads", [1, 2, 4, 8])
def test_gqa_groups_of_any_size_slice_exactly(kv_heads, tokens):
    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=kv_heads, head_dim=8)
    adapter = adapter_for(model.config)
    assert adapter.geometry().group_size == 8 // kv_heads
    slices = random_slices(adapter.geometry(), np.random.default_rng(kv_heads))
    got = whole(adapter, model).forward(slices, tokens).ppl
    assert got == pytest.approx(hf_ppl(masked_model(model, adapter, slices), tokens), rel=1e-4)


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def test_llama3_rope_scaling_is_kept_by_slices_and_export(tokens):
    """Llama-3 goes through the LLaMA adapter: its scaled rotary frequencies survive slicing and export."""
    from searchllm.evaluate import perplexity

    model = family_model("llama", rope_parameters=LLAMA3_ROPE)
    plain_rope = family_model("llama")
    adapter = adapter_for(model.config)
    slices = random_slices(adapter.geometry(), np.random.default_rng(9))
    runner = whole(adapter, model)
    got = runner.forward(slices, tokens).ppl
    assert got == pytest.approx(hf_ppl(masked_model(model, adapter, slices), tokens), rel=1e-4)
    assert got != pytest.approx(whole(adapter_for(plain_rope.config), plain_rope).forward(slices, tokens).ppl, rel=1e-3)
    exported, _ = build(adapter, model.state_dict(), slices)
    assert exported.config.rope_parameters["rope_type"] == "llama3"
    assert perplexity(exported, tokens).ppl == pytest.approx(got, rel=1e-5)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        LLAMA3_ROPE,
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
        {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
    ],
    ids=lambda r: r["rope_type"],
)
def test_the_rotary_actors_run_is_transformers_rotary_to_the_bit(rope):
    """What the architecture ships to actors computes transformers' cos/sin exactly, past the original
    context too (where dynamic NTK rescales its frequencies)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=96,
        vocab_size=128,
        max_position_embeddings=16,
        rope_parameters=rope,
    )
    ours, theirs = adapter_for(config).architecture().rope, LlamaRotaryEmbedding(config)
    for dtype in (torch.float32, torch.bfloat16):
        for length in (8, 64):
            x, pos = torch.empty(1, dtype=dtype), torch.arange(length)[None]
            assert all(torch.equal(a, b) for a, b in zip(ours(x, pos), theirs(x, pos)))


@pytest.mark.parametrize("name", ["silu", "swish", "relu", "gelu", "gelu_pytorch_tanh"])
def test_the_blocks_torch_activations_are_transformers_to_the_bit(name):
    from transformers.activations import ACT2FN

    from searchllm.models.blocks import ACTIVATIONS, activation

    assert name in ACTIVATIONS
    x = torch.randn(4, 64) * 4
    assert torch.equal(activation(name)(x), ACT2FN[name](x))


@pytest.mark.parametrize("shape", [(2, 1, 48), (16, 48), (0, 48), (3, 0), (4, 40, 48)])
@pytest.mark.parametrize("bias", [False, True])
def test_the_blocks_linear_computes_f_linear_on_few_rows_and_many(shape, bias):
    from searchllm.models.blocks import FEW_ROWS, Linear

    layer = Linear(shape[-1], 24, bias=bias)
    x = torch.randn(*shape)
    assert isinstance(layer, torch.nn.Linear) and (math.prod(shape[:-1]) in FEW_ROWS) == (shape == (16, 48))
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_opt_positions_follow_the_attention_mask_under_left_padding(tokens):
    """OPT-style learned positions in the export: a left-padded prompt generates what the unpadded one does."""
    model, adapter = tiny_family("opt")
    exported, _ = build(adapter, model.state_dict(), random_slices(adapter.geometry(), np.random.default_rng(1)))
    prompt = tokens[:1, :6]
    padded = torch.cat([torch.zeros(1, 3, dtype=prompt.dtype), prompt], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(prompt)], 1)
    a = exported.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    b = exported.generate(padded, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(a[:, 6:], b[:, 9:])


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
@pytest.mark.parametrize("heads_only", [True, False], ids=["whole-heads", "kept-pairs"])
def test_sliced_blocks_give_transformers_logits_on_the_kept_units(family, heads_only, tokens):
    """Per-head q/k norms, Gemma's (1 + w) sandwich norms, scaled embeddings, its attention scale and two RoPE
    bases: the sliced model's logits are those of transformers' own model with the dropped units zeroed."""
    model, adapter = tiny_family(family)
    slices = random_slices(adapter.geometry(), np.random.default_rng(11), heads_only=heads_only, drop_layer=2)
    runner = whole(adapter, model)
    with torch.no_grad():
        ours = torch.stack([runner.logits(h) for h in runner.run_blocks(runner.blocks(slices), runner.embed(tokens))])
        theirs = masked_model(model, adapter, slices)(tokens).logits
        dense = model(tokens).logits
    assert (ours - theirs).abs().max() < 1e-5
    assert (ours - dense).abs().max() > 1e-2


def test_gemma3s_two_rope_bases_and_embedding_scale_matter(tokens):
    """Guard against a test model too small to tell: another local base or no embedding scale changes the loss."""
    model, adapter = tiny_family("gemma3")
    full = [LayerSlice.full(adapter.geometry())] * adapter.geometry().num_layers
    base = whole(adapter, model).forward(full, tokens).ppl
    assert base == pytest.approx(hf_ppl(model, tokens), rel=1e-5)
    for change in ({"local_rope": False}, {"embed_scale": 1.0}):
        arch = adapter.architecture()
        arch = dataclasses.replace(arch, block=dataclasses.replace(arch.block, **change))
        runner = ShardRunner(arch, share(model.state_dict()), split_layers(arch.geometry.num_layers, 1)[0])
        assert runner.forward(full, tokens).ppl != pytest.approx(base, rel=1e-3)


def test_the_text_tower_of_a_multimodal_gemma3_checkpoint_is_searched_and_exports_as_text_model(tokens):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text, _ = tiny_family("gemma3")
    config = Gemma3Config(
        text_config=text.config.to_dict(),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        mm_tokens_per_image=4,
    )
    mm = Gemma3ForConditionalGeneration(config).eval()
    lm = mm.model.language_model
    lm.load_state_dict(text.model.state_dict())
    adapter = adapter_for(mm.config)
    assert adapter.geometry() == adapter_for(text.config).geometry()
    slices = random_slices(adapter.geometry(), np.random.default_rng(2), heads_only=True)
    runner = whole(adapter, mm)
    assert runner.forward(slices, tokens).ppl == pytest.approx(
        whole(adapter_for(text.config), text).forward(slices, tokens).ppl, rel=1e-6
    )
    g = adapter.geometry()
    one_head = (tuple(range(g.head_dim // 2)),) + ((),) * (g.num_kv_heads - 1)
    uniform = [LayerSlice(one_head, tuple(range(48)))] * g.num_layers
    exported, info = build(adapter, mm.state_dict(), uniform)
    assert info.kind == "plain" and type(exported).__name__ == "Gemma3ForCausalLM"
    assert runner.forward(uniform, tokens).ppl == pytest.approx(hf_ppl(exported, tokens), rel=1e-5)


def test_the_auto_budget_counts_the_decoder_alone_where_embeddings_are_most_of_the_model():
    from searchllm.stages.plan import budget_count

    big_vocab = adapter_for(tiny_model("gemma3_text", vocab_size=20000, tie_word_embeddings=True).config).geometry()
    small_vocab = adapter_for(tiny_model("llama").config).geometry()
    assert big_vocab.outer_params > big_vocab.total_params / 2 > small_vocab.outer_params
    assert budget_count("auto", big_vocab) == "decoder" and budget_count("auto", small_vocab) == "total"
    assert budget_count("total", big_vocab) == "total"
