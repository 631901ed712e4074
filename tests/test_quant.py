"""A byte budget (budget.size): llama.cpp's tensor types as levels of the search, counted and quantized as
llama.cpp does, searched jointly with pruning levels and exported as exactly the GGUF that was scored."""

import json
import re

import numpy as np
import pytest

from searchllm.evaluate.llamacpp import available
from searchllm.quant.types import GGML, QuantError, effective, parse_size, tensor_bytes

from conftest import bpe_tokenizer, make_tiny_checkpoint, tiny_model, tiny_run_args
from helpers import signal_driver_at

needs_llama = pytest.mark.skipif(
    not available(),
    reason="llama.cpp bindings not installed (CMAKE_ARGS=-DGGML_NATIVE=OFF pip install llama-cpp-python==0.3.36)",
)
WIDE = {"hidden_size": 256, "intermediate_size": 320, "head_dim": 64}  # K types fit 256-wide rows, not 320


def test_a_type_falls_back_as_llama_cpp_does_when_its_block_does_not_divide_the_row():
    assert effective("q4_k", 1536) == "q4_k"
    assert [effective(t, 576) for t in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs", "iq2_s")] == [
        "q4_0",
        "q4_0",
        "q5_0",
        "q5_1",
        "q8_0",
        "iq4_nl",
        "iq4_nl",
    ]
    assert effective("q4_0", 48) == "f16"  # neither the type nor its fallback divides the row
    assert tensor_bytes("q4_k", (576, 576)) == 576 * 576 // 32 * 22  # q5_0 rows


def test_budget_size_reads_file_sizes_and_bits_per_weight_and_names_a_bad_value():
    assert parse_size("89MiB").resolve(10) == 89 * 2**20
    assert parse_size("1.5GiB").bytes == int(1.5 * 2**30)
    assert parse_size("4.5bpw").resolve(1000) == 562
    with pytest.raises(QuantError) as e:
        parse_size("89 potatoes")
    assert "budget.size='89 potatoes'" in str(e.value) and "89MiB" in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def llama_quantized(tmp_path_factory):
    """A tiny model's f32 GGUF and llama.cpp's own quantization of it (llama_model_quantize), each weight
    asked for a type by override, with an importance matrix."""
    pytest.importorskip("llama_cpp")
    import gguf

    from searchllm.evaluate import llamacpp
    from searchllm.export.gguf import write

    d = tmp_path_factory.mktemp("q")
    model = tiny_model("llama", layers=2, vocab_size=len(bpe_tokenizer(d)), **WIDE)
    write(model, d, d / "f32.gguf")
    src = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(d / "f32.gguf")).tensors}
    rng = np.random.default_rng(0)
    imat = {n: rng.random(a.shape[1]).astype(np.float32) + 0.1 for n, a in src.items() if a.ndim == 2}
    want = {n: "iq3_s" if "ffn_down" in n else "q3_k" if "attn" in n else "iq2_xs" for n in imat}
    llamacpp.quantize(d / "f32.gguf", d / "q.gguf", 10, imatrix=imat, types={n: GGML[t][0] for n, t in want.items()})
    out = {t.name: t for t in gguf.GGUFReader(str(d / "q.gguf")).tensors if t.name in want}
    return src, imat, want, out


@needs_llama
def test_the_types_written_are_the_fallbacks_llama_cpp_applies(llama_quantized):
    src, _, want, out = llama_quantized
    written = {n: t.tensor_type.name.lower() for n, t in out.items()}
    assert written == {n: effective(want[n], src[n].shape[1]) for n in want}
    assert written["blk.0.ffn_down.weight"] == "iq4_nl" and written["blk.0.attn_q.weight"] == "q3_k"


@needs_llama
def test_a_quantized_weight_is_bit_for_bit_what_llama_cpp_writes_with_the_same_importance_matrix(llama_quantized):
    from searchllm.quant import ggml

    src, imat, want, out = llama_quantized
    for name, t in out.items():
        written, data = ggml.quantize(src[name], want[name], imat[name])
        assert np.array_equal(np.array(t.data).view(np.uint8).reshape(data.shape), data), name
        back = ggml.dequantize(data, written, src[name].shape[1])
        assert back.shape == src[name].shape and 0 < np.abs(back - src[name]).max() < 1


@needs_llama
def test_a_type_that_needs_an_importance_matrix_stops_with_one_line_without_one():
    from searchllm.quant import ggml

    with pytest.raises(QuantError) as e:
        ggml.quantize(np.ones((4, 256), np.float32), "iq2_xs", None, "blk.0.ffn_down.weight")
    assert "iq2_xs needs an importance matrix" in str(e.value) and "blk.0.ffn_down.weight" in str(e.value)


def joint_args(path, corpus, run, size, *extra):
    return tiny_run_args(
        path,
        corpus,
        run,
        "method=searchllm",
        "search.generations=3",
        "levels.tokens=[64]",
        "levels.survivors=[]",
        "levels.offspring=4",
        "levels.mlp_levels=8",
        "levels.probe=0",
        "levels.score_dtype=float32",
        "quant.generations=3",
        "monitor.page=false",
        "export.format=gguf",
        "eval.enabled=false",
        f"budget.size={size}",
        *extra,
    )


@pytest.fixture(scope="module")
def joint_run(ray_cluster, tmp_path_factory):
    """A finished joint search of a tiny model whose budget needs pruning (read, never changed, below)."""
    from searchllm.driver import main

    root = tmp_path_factory.mktemp("joint")
    path, corpus = make_tiny_checkpoint(root, tokenizer=bpe_tokenizer, **WIDE)
    run = root / "run"
    assert main(joint_args(path, corpus, run, "0.6MiB")) == 0
    return path, corpus, run


@needs_llama
@pytest.mark.ray
def test_the_byte_count_of_the_chosen_candidate_is_the_size_of_the_file_written(joint_run):
    *_, run = joint_run
    m = json.loads((run / "manifest.json").read_text())
    q, [f] = m["quant"], m["export"]["gguf"]["files"]
    assert f["bytes"] == q["bytes"] == (run / "export" / "model-mixed.gguf").stat().st_size <= 0.6 * 2**20
    assert m["export"]["params"] == m["params"]["subnet"] < m["params"]["original"]  # pruned, as scored


@needs_llama
@pytest.mark.ray
def test_the_stitched_gguf_holds_each_weight_at_the_type_the_search_chose(joint_run):
    import gguf

    *_, run = joint_run
    chosen = json.loads((run / "manifest.json").read_text())["quant"]["types"]
    reader = gguf.GGUFReader(str(run / "export" / "model-mixed.gguf"))
    written = {t.name: t.tensor_type.name.lower() for t in reader.tensors if t.name in chosen}
    assert written == chosen and len(set(written.values())) > 1


@needs_llama
@pytest.mark.ray
def test_llama_cpp_scores_the_export_as_the_search_scored_its_dequantized_weights(joint_run):
    *_, run = joint_run
    m = json.loads((run / "manifest.json").read_text())
    # llama.cpp quantizes activations to 8 bits for quantized dot products and keeps an f16 KV cache: the two
    # differ by that, by how much depending on the types chosen (a random tiny model's perplexity in the
    # thousands magnifies it: 6.9% on this run's choice); SmolLM2 and gemma-3-270m within 1%: docs/results.md
    assert m["perplexity"]["exported"] == pytest.approx(m["perplexity"]["searched"], rel=0.1)


@pytest.mark.ray
def test_a_budget_below_the_smallest_possible_file_stops_before_any_weights_load(checkpoint_wide, tmp_path, capsys):
    from searchllm.driver import main

    path, corpus = checkpoint_wide
    assert main(joint_args(path, corpus, tmp_path / "run", "0.1MiB")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("searchllm: error: budget.size=0.1MiB (0.10 MiB) is below the smallest file")
    smallest = float(re.search(r"can be \(([\d.]+) MiB: every block at its lowest level", err).group(1))
    assert smallest > 0.1 and "\n" not in err and not (tmp_path / "run" / "levels").exists()


@pytest.fixture(scope="module")
def checkpoint_wide(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("wide"), tokenizer=bpe_tokenizer, **WIDE)


def test_budget_size_with_an_hf_export_stops_with_one_line_naming_the_fix(checkpoint_wide, tmp_path, capsys):
    from searchllm.driver import main

    path, corpus = checkpoint_wide
    assert main(joint_args(path, corpus, tmp_path / "run", "1MiB", "export.format=hf")) == 2
    err = capsys.readouterr().err.strip()
    assert "budget.size=1MiB sizes a GGUF file; add export.format=gguf" in err and "\n" not in err


@needs_llama
@pytest.mark.ray
def test_a_killed_joint_search_resumes_to_the_same_file(joint_run, tmp_path):
    from searchllm.driver import main

    path, corpus, done = joint_run
    run = tmp_path / "run"
    args = joint_args(path, corpus, run, "0.6MiB")
    killed = signal_driver_at(args, "append_eval", 6)  # in generation 1
    assert killed.returncode != 0 and (run / "evals.jsonl").is_file()
    assert main([f"resume={run}"]) == 0
    a, b = (json.loads((r / "manifest.json").read_text()) for r in (run, done))
    assert a["search"]["levels"] == b["search"]["levels"] and a["quant"] == b["quant"]
    assert (run / "export" / "model-mixed.gguf").read_bytes() == (done / "export" / "model-mixed.gguf").read_bytes()


@needs_llama
@pytest.mark.parametrize(
    "levels",
    [
        [(2, 8), (2, 8), (2, 8)],  # uniform: the family's own arch
        [(2, 8), (1, 3), (2, 5)],  # per-layer sizes: deci
        [(0, 8), (2, 0), (1, 8)],  # a layer without attention, one without MLP (one zero channel)
    ],
)
def test_the_byte_count_of_any_candidate_is_the_size_of_its_file(levels, tmp_path):
    """JointCosts.bytes, known before any search, against the file the export writes for the same levels."""
    from searchllm.config import LevelParams
    from searchllm.export.gguf import write
    from searchllm.export.hf import build
    from searchllm.models.adapters import adapter_for
    from searchllm.pruning.joint import EMBED, JointCosts
    from searchllm.pruning.levels import LayerLevels, LevelSpace
    from searchllm.stages.search_joint import layout

    tok = bpe_tokenizer(tmp_path)
    model = tiny_model("llama", layers=3, vocab_size=len(tok), **WIDE)
    adapter = adapter_for(model.config)
    space = LevelSpace(adapter.geometry(), LevelParams(mlp_levels=8))
    costs = JointCosts(space, ("q8_0", "q4_k", "iq4_xs", "q2_k"), layout(adapter, tok, None), lock_levels=False)
    g = space.geometry
    equal = sorted(range(g.num_heads), key=lambda h: (h % g.group_size, h // g.group_size))  # one per group a level
    entries = [LayerLevels(i, equal, list(range(g.intermediate))) for i in range(3)]
    rng = np.random.default_rng(0)
    genome = np.concatenate([np.array(levels), rng.integers(0, 4, (3, EMBED - 1))], axis=1)
    genome[:, EMBED] = genome[0, EMBED]
    slices = [e.slice(space, a, m) for e, (a, m) in zip(entries, levels)]
    exported, _ = build(adapter, model.state_dict(), slices)
    out = tmp_path / "model-mixed.gguf"
    info = write(
        exported, tmp_path, out, types={n: t for n, s, t in costs.tensors(genome) if len(s) == 2}, name="model-mixed"
    )
    assert out.stat().st_size == costs.bytes(genome)
    assert info.arch == ("llama" if costs.uniform(genome) else "deci")
