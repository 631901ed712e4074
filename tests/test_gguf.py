"""GGUF export: non-uniform subnets that llama.cpp loads and runs exactly as the HF export does."""

import numpy as np
import pytest
import torch

from searchllm.evaluate.llamacpp import available
from searchllm.export.formats import check_format
from searchllm.export.gguf import GGUFError, family_of, modelfile, write
from searchllm.export.hf import build
from searchllm.models.adapters import adapter_for
from searchllm.models.sliced import LayerSlice

from conftest import bpe_tokenizer, make_tiny_checkpoint, tiny_model
from helpers import FAMILY_KW, one_generation_args, subnet

needs_llama = pytest.mark.skipif(
    not available(),
    reason="llama.cpp bindings not installed (CMAKE_ARGS=-DGGML_NATIVE=OFF pip install llama-cpp-python==0.3.36)",
)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe")
    return bpe_tokenizer(path), path


class Fp16Gelu(torch.nn.Module):
    """GELU as llama.cpp's CPU kernel computes it: from a table over float16 inputs, in float16, inside
    (-10, 10); x or 0 outside."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x >= 10, x, torch.where(x <= -10, torch.zeros_like(x), table))


def exported(family, kind, bpe, seed=0, **config):
    tok, _ = bpe
    model = tiny_model(family, layers=4, seed=seed, vocab_size=len(tok), **(FAMILY_KW[family] | config))
    adapter = adapter_for(model.config)
    out, _ = build(adapter, model.state_dict(), subnet(adapter.geometry(), kind))
    return out


def ids(n=24, seed=0):
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@needs_llama
@pytest.mark.parametrize(
    "family,kind",
    [("llama", k) for k in ("uniform", "per-layer", "dropped", "channels", "unequal")]
    + [
        ("mistral", "uniform"),
        ("mistral", "per-layer"),
        ("qwen2", "uniform"),
        ("qwen2", "per-layer"),
        ("qwen2", "unequal"),
    ],
)
def test_llama_cpp_runs_the_gguf_with_the_hf_exports_logits(family, kind, bpe, tmp_path):
    from searchllm.evaluate import llamacpp

    model = exported(family, kind, bpe)
    info = write(model, bpe[1], tmp_path / "m.gguf")
    assert info.arch == (
        "deci" if kind != "uniform" or family == "qwen2" else "llama"
    )  # qwen2: fewer query heads than hidden
    assert info.layers == (3 if kind == "dropped" else 4)
    seq = ids()
    want = model(torch.tensor([seq])).logits[0].detach().numpy()
    got = llamacpp.logits(llamacpp.load(tmp_path / "m.gguf", 64, f32_cache=True), seq)
    assert np.abs(got - want).max() < 1e-3


@needs_llama
@pytest.mark.parametrize(
    "family,kind,arch",
    [
        ("qwen3", "uniform", "qwen3"),
        ("qwen3", "uniform-channels", "qwen3"),
        ("gemma3_text", "uniform", "gemma3"),
        ("gemma3_text", "uniform-channels", "gemma3"),
    ],
)
def test_uniform_qwen3_and_gemma3_subnets_run_in_llama_cpp_with_the_hf_exports_logits(
    family, kind, arch, bpe, tmp_path
):
    """Per-head q/k norms (also of heads padded with zero dims), Gemma's 1 + w norms, scaled embeddings and
    the sliding layers' own window and RoPE base, as llama.cpp's own qwen3 and gemma3 run them."""
    from searchllm.evaluate import llamacpp

    model = exported(family, kind, bpe)
    assert write(model, bpe[1], tmp_path / "m.gguf").arch == arch
    seq = ids(40)  # past the 8-token window
    got = llamacpp.logits(llamacpp.load(tmp_path / "m.gguf", 64, f32_cache=True), seq)
    with torch.no_grad():
        want = model(torch.tensor([seq])).logits[0].numpy()
        assert np.abs(got - want).max() < 1e-2
        if family == "gemma3_text":  # the rest of the gap is llama.cpp's float16 GELU table
            for layer in model.model.layers:  # transformers' Gemma3MLP calls it act_fn, ours act
                setattr(layer.mlp, "act" if hasattr(layer.mlp, "act") else "act_fn", Fp16Gelu())
            want = model(torch.tensor([seq])).logits[0].numpy()
    assert np.abs(got - want).max() < 1e-3


@needs_llama
@pytest.mark.parametrize("kind", ["sliding_attention", "full_attention"])
def test_a_gemma3_whose_layers_are_all_of_one_kind_runs_in_llama_cpp_with_the_hf_exports_logits(kind, bpe, tmp_path):
    """transformers builds only the rotary tables its layer types use; llama.cpp reads the layer pattern."""
    from searchllm.evaluate import llamacpp

    model = exported("gemma3_text", "uniform", bpe, layer_types=[kind] * 4, query_pre_attn_scalar=16)
    write(model, bpe[1], tmp_path / "m.gguf")
    seq = ids(40)  # past the 8-token window
    got = llamacpp.logits(llamacpp.load(tmp_path / "m.gguf", 64, f32_cache=True), seq)
    with torch.no_grad():
        for layer in model.model.layers:  # the gap to llama.cpp is its float16 GELU table
            setattr(layer.mlp, "act" if hasattr(layer.mlp, "act") else "act_fn", Fp16Gelu())
        want = model(torch.tensor([seq])).logits[0].numpy()
    assert np.abs(got - want).max() < 1e-3


@needs_llama
@pytest.mark.parametrize("family,arch", [("qwen3", "qwen3"), ("gemma3_text", "gemma3")])
def test_per_layer_qwen3_and_gemma3_subnets_are_refused_for_gguf_in_one_line(family, arch, bpe, tmp_path):
    """What llama.cpp does with per-layer sizes under these archs (measured: it sizes every layer like the
    first and refuses the file), and the line the writer stops with instead."""
    from searchllm.evaluate import llamacpp

    model = exported(family, "per-layer", bpe)
    with pytest.raises(GGUFError, match=f"llama.cpp's {arch} cannot load .*export.format=hf"):
        write(model, bpe[1], tmp_path / "m.gguf")
    write(model, bpe[1], tmp_path / "forced.gguf", arch=arch, per_layer=True)
    with pytest.raises(RuntimeError, match="llama.cpp refused"):
        llamacpp.load(tmp_path / "forced.gguf", 64)


@needs_llama
def test_padding_is_counted_and_only_where_llama_cpp_needs_it(bpe, tmp_path):
    uniform = write(exported("llama", "uniform", bpe), bpe[1], tmp_path / "u.gguf")
    assert uniform.padding_params == 0
    model = exported("llama", "channels", bpe)
    info = write(model, bpe[1], tmp_path / "c.gguf")
    assert info.padding_params > 0
    assert info.params - info.padding_params == sum(p.numel() for p in model.parameters())


@needs_llama
def test_a_per_layer_subnet_written_as_plain_llama_is_refused_by_llama_cpp(bpe, tmp_path):
    from searchllm.evaluate import llamacpp

    write(exported("llama", "per-layer", bpe), bpe[1], tmp_path / "bad.gguf", arch="llama")
    with pytest.raises(RuntimeError, match="llama.cpp refused"):
        llamacpp.load(tmp_path / "bad.gguf", 64)


@needs_llama
def test_q8_0_perplexity_is_within_two_percent_of_f32(bpe, tmp_path):
    from searchllm.evaluate import llamacpp
    from searchllm.export.gguf import FTYPES

    write(exported("llama", "per-layer", bpe), bpe[1], tmp_path / "f32.gguf")
    llamacpp.quantize(tmp_path / "f32.gguf", tmp_path / "q8.gguf", FTYPES["q8_0"])
    assert (tmp_path / "q8.gguf").stat().st_size < 0.5 * (tmp_path / "f32.gguf").stat().st_size
    windows = torch.tensor([ids(32, s) for s in range(3)])
    f32 = llamacpp.perplexity(llamacpp.load(tmp_path / "f32.gguf", 32), windows).ppl
    q8 = llamacpp.perplexity(llamacpp.load(tmp_path / "q8.gguf", 32), windows).ppl
    assert abs(q8 - f32) / f32 < 0.02


@needs_llama
def test_llama_cpp_perplexity_is_the_mean_nll_of_the_hf_exports_logits_in_slices_of_any_size(bpe, tmp_path):
    from searchllm.evaluate import llamacpp

    model = exported("llama", "per-layer", bpe)
    write(model, bpe[1], tmp_path / "m.gguf")
    windows = torch.tensor([ids(32, s) for s in range(2)])
    logp = model(windows).logits[:, :-1].double().log_softmax(-1)
    want = -logp.gather(2, windows[:, 1:, None]).sum().item()
    llm = llamacpp.load(tmp_path / "m.gguf", 32, f32_cache=True)
    for rows in (5, 64):  # slices that end mid-window and one that holds it whole
        got = llamacpp.perplexity(llm, windows, rows)
        assert got.tokens == 2 * 31
        assert abs(got.total - want) / want < 1e-4


@needs_llama
def test_greedy_generation_from_the_gguf_gives_the_hf_exports_tokens(bpe, tmp_path):
    from searchllm.evaluate import llamacpp

    model = exported("llama", "unequal", bpe)
    write(model, bpe[1], tmp_path / "m.gguf")
    prompt = ids(8)
    hf = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt) :].tolist()
    assert llamacpp.greedy(llamacpp.load(tmp_path / "m.gguf", 32, f32_cache=True), prompt, 10) == hf


def test_the_modelfile_names_the_gguf_and_carries_the_chat_template_and_stop_tokens(bpe):
    tok, _ = bpe
    text = modelfile("model-q4_k_m.gguf", tok.chat_template, tok.eos_token)
    assert text.splitlines()[0] == "FROM ./model-q4_k_m.gguf"
    assert 'TEMPLATE """' in text and "<|im_start|>{{ .Role }}" in text
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_a_tokenizer_gguf_cannot_express_stops_the_export_naming_it(tmp_path):
    from conftest import word_tokenizer

    tok = word_tokenizer(tmp_path / "words")
    model = tiny_model("llama", layers=2, vocab_size=len(tok))
    out, _ = build(
        adapter_for(model.config), model.state_dict(), [LayerSlice.full(adapter_for(model.config).geometry())] * 2
    )
    with pytest.raises(GGUFError, match="not a GPT-2 style byte-level BPE"):
        write(out, tmp_path / "words", tmp_path / "m.gguf")


def test_opt_is_refused_by_name():
    with pytest.raises(GGUFError, match="'opt' has no llama.cpp path"):
        family_of(tiny_model("opt", layers=1).config)


def test_bad_gguf_types_stop_with_one_line_naming_the_value():
    with pytest.raises(GGUFError) as e:
        check_format("gguf", ["f16", "q9_9"], "llama")
    assert "export.gguf_types" in str(e.value) and "q9_9" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(GGUFError, match="export.format='onnx'"):
        check_format("onnx", ["f16"], "llama")


@needs_llama
@pytest.mark.ray
def test_a_run_exports_both_formats_and_evaluates_them_in_llama_cpp_then_adds_a_type_without_searching(
    ray_cluster, tmp_path
):
    import json

    from searchllm.driver import main
    from searchllm.export.__main__ import main as export_main

    path, corpus = make_tiny_checkpoint(tmp_path, tokenizer=bpe_tokenizer)
    run = tmp_path / "run"
    args = one_generation_args(
        path,
        corpus,
        run,
        "export.format=both",
        "export.gguf_types=[f32,q8_0]",
    )
    assert main(args) == 0
    m = json.loads((run / "manifest.json").read_text())
    files = {f["type"]: f for f in m["export"]["gguf"]["files"]}
    assert set(files) == {"f32", "q8_0"} and (run / "export" / "config.json").is_file()
    assert files["f32"]["ppl"] == pytest.approx(
        m["perplexity"]["exported"], rel=5e-3
    )  # llama.cpp ~ the HF export (f16 KV cache)
    assert (run / "export" / "Modelfile").read_text().startswith("FROM ./model-f32.gguf")
    names = [r["model"] for r in m["llama_cpp"]]
    assert names == ["original f32", "original q8_0", "exported (searchllm) f32", "exported (searchllm) q8_0"]
    assert all(r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["ppl"] for r in m["llama_cpp"])
    assert export_main([str(run), "export.format=gguf", "export.gguf_types=[q4_0]"]) == 0
    m2 = json.loads((run / "manifest.json").read_text())
    assert [f["type"] for f in m2["export"]["gguf"]["files"]] == ["f32", "q8_0", "q4_0"] and (
        run / "export" / "model-q4_0.gguf"
    ).is_file()
    assert m2["search"] == m["search"]  # nothing searched again


# -- a GGUF as model.path: damaged files and the conversion cache ------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(bpe, tmp_path_factory):
    model = tiny_model("llama", layers=2, vocab_size=len(bpe[0]))
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write(model, bpe[1], path)
    return path


def test_a_truncated_gguf_stops_with_one_line_naming_the_file(tiny_gguf, tmp_path):
    from searchllm.config import ModelConfig
    from searchllm.models.loading import ModelError, resolve

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size * 2 // 3])  # a download cut short
    with pytest.raises(ModelError) as e:
        resolve(ModelConfig(path=str(cut), cache_dir=str(tmp_path / "cache")), None)
    msg = str(e.value)
    assert "\n" not in msg and str(cut) in msg and "not a complete GGUF file" in msg and "download it again" in msg
    assert not list((tmp_path / "cache").glob("*"))  # nothing cached


def test_a_damaged_cached_conversion_is_converted_again(tiny_gguf, tmp_path, caplog):
    from searchllm.config import ModelConfig
    from searchllm.models.loading import MARK, resolve

    cfg = ModelConfig(path=str(tiny_gguf), cache_dir=str(tmp_path / "cache"))
    entry = __import__("pathlib").Path(resolve(cfg, None))
    weights = entry / "model.safetensors"
    whole = weights.read_bytes()
    assert (entry / MARK).is_file() and not list(entry.parent.glob("*.tmp*"))
    weights.write_bytes(whole[:100])  # cut, as a full disk or a copy cut short leaves it
    with caplog.at_level("WARNING", logger="searchllm"):
        assert resolve(cfg, None) == str(entry)
    assert weights.read_bytes() == whole and "converting" in caplog.text


def test_a_conversion_that_cannot_be_written_leaves_no_entry(tiny_gguf, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    from searchllm.config import ModelConfig
    from searchllm.models.loading import ModelError, resolve

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full)
    with pytest.raises(ModelError, match="No space left on device"):
        resolve(ModelConfig(path=str(tiny_gguf), cache_dir=str(tmp_path / "cache")), None)
    assert not list((tmp_path / "cache").iterdir())
