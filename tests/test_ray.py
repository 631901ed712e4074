"""Evaluator actors on a local Ray: sharding, replicas, streaming, and the driver end to end."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from searchllm.driver import main
from searchllm.pruning.space import SearchSpace
from searchllm.rundir import RunDir

from conftest import make_tiny_checkpoint, tiny_family, tiny_run_args
from helpers import SIGNAL_AT, small_search
from helpers import evaluator_pool as pool

pytestmark = pytest.mark.ray


@pytest.mark.parametrize("family", ["llama", "opt"])  # OPT: position table on the first stage, norm bias on the last
def test_two_stage_replica_gives_the_same_fitness_as_one_stage(ray_cluster, family, tokens):
    model, adapter = tiny_family(family)
    space = SearchSpace(adapter.geometry())
    cand = space.full()
    cand.mlp[:, ::3] = False
    with pool(model, adapter, tokens) as p:
        one = [n.ppl for _, n, _ in p.stream(space, [cand, space.full()])]
    with pool(model, adapter, tokens, stages=2) as p:
        two = [n.ppl for _, n, _ in p.stream(space, [cand, space.full()])]
    assert sorted(one) == pytest.approx(sorted(two), rel=1e-6)


def test_scores_from_a_sharded_calibration_equal_the_unsharded(ray_cluster, llama, adapter, tokens):
    with pool(llama, adapter, tokens) as p:
        one = p.calibrate(1, 0.01)
    with pool(llama, adapter, tokens, stages=3) as p:
        three = p.calibrate(1, 0.01)
    for name in ("attn", "mlp", "flap_o", "flap_down", "mean_o", "mean_down"):
        np.testing.assert_allclose(getattr(one, name), getattr(three, name), rtol=1e-5, atol=1e-7)
    assert one.attn.shape == (3, 2, 8) and one.mlp.shape == (3, 96) and one.flap_o.shape == (3, 64)


def test_results_stream_back_from_every_replica(ray_cluster, llama, adapter, tokens):
    space = SearchSpace(adapter.geometry())
    cands = [space.full() for _ in range(6)]
    for i, c in enumerate(cands):
        c.mlp[:, i::7] = False
    with pool(llama, adapter, tokens, replicas=2) as p:
        got = list(p.stream(space, cands))
    assert sorted(i for i, _, _ in got) == list(range(6))
    assert {r for _, _, r in got} == {0, 1}


def test_every_actor_runs_the_intra_op_threads_ray_threads_names(ray_cluster, llama, adapter, tokens):
    # equal threads per actor is what makes bfloat16 CPU scores reproduce across layouts (README)
    with pool(llama, adapter, tokens, replicas=2, threads=3) as p:
        assert [a["threads"] for chain in p.placed for a in chain] == [3, 3]


def test_evaluator_actors_import_neither_transformers_nor_pandas(ray_cluster, llama, adapter, tokens):
    # each actor is a new process: those imports cost it seconds (most of a test-suite's Ray time)
    with pool(llama, adapter, tokens) as p:
        actor = p.replicas[0][0]
        loaded = ray_cluster.get(
            actor.__ray_call__.remote(lambda _: [m for m in ("transformers", "pandas") if m in sys.modules])
        )
    assert loaded == []


@pytest.mark.parametrize(
    "inputs,targets", [("sequential", "original"), ("sequential", "layer"), ("independent", "original")]
)
def test_a_two_actor_reformation_gives_the_same_weights_as_a_one_actor_one(
    ray_cluster, llama, adapter, tokens, inputs, targets
):
    from searchllm.pruning.reform import ReformParams

    from test_slicing import random_slices

    slices = random_slices(adapter.geometry(), np.random.default_rng(8))
    params = ReformParams(inputs=inputs, targets=targets)
    with pool(llama, adapter, tokens) as p:
        one = {r.layer: r.weights for r in p.reform(slices, params, 1)}
    with pool(llama, adapter, tokens, replicas=1, stages=2) as p:
        two = {r.layer: r.weights for r in p.reform(slices, params, 1)}
    assert sorted(one) == sorted(two) == [0, 1, 2]
    for i in one:
        for k in one[i]:
            torch.testing.assert_close(one[i][k], two[i][k], rtol=1e-6, atol=1e-7)


def test_reformed_weights_reach_every_replica(ray_cluster, llama, adapter, tokens):
    from searchllm.pruning.reform import ReformParams

    space = SearchSpace(adapter.geometry())
    cand = space.full()
    cand.mlp[:, ::2] = False
    with pool(llama, adapter, tokens, replicas=2) as p:
        before = next(iter(p.stream(space, [cand])))[1].ppl
        p.reform(space.slices(cand), ReformParams(), 1)
        after = {r: n.ppl for _, n, r in p.stream(space, [cand] * 4)}
    assert set(after) == {0, 1} and after[0] == after[1] != before


def search_best(model, adapter, tokens, run_dir, replicas):
    with pool(model, adapter, tokens, replicas=replicas) as p:
        r = small_search(p, adapter, run_dir)
    return r.best.key(), r.fitness, RunDir(run_dir).archive().sort_values("key").key.tolist()


def test_one_and_two_replicas_with_the_same_seed_find_the_same_best(ray_cluster, llama, adapter, tokens, tmp_path):
    assert search_best(llama, adapter, tokens, tmp_path / "one", 1) == search_best(
        llama, adapter, tokens, tmp_path / "two", 2
    )


def test_driver_runs_the_search_end_to_end_refuses_to_overwrite_it_and_resumes(
    ray_cluster, tiny_checkpoint, tmp_path, capsys
):
    path, corpus = tiny_checkpoint
    run = tmp_path / "run"
    assert main(tiny_run_args(path, corpus, run, "search.generations=2")) == 0
    out = capsys.readouterr().out
    assert "best subnet: kept ratio" in out and "dense" in out
    summary = json.loads((run / "summary.json").read_text())
    assert 0.67 <= summary["best_ratio"] <= 0.73 and summary["generations"] == 2
    # The same command again does not start over the finished run.
    assert main(tiny_run_args(path, corpus, run, "search.generations=2")) == 2
    assert "already holds a search; pass resume=" in capsys.readouterr().err
    # Continue the same run for one more generation: the first two are not evaluated again.
    assert main([f"resume={run}", "search.generations=3"]) == 0
    arch = RunDir(run).archive()
    assert sorted(arch.generation.unique()) == [0, 1, 2] and arch.key.is_unique


def test_driver_reforms_exports_and_writes_the_manifest(ray_cluster, tiny_checkpoint, tmp_path):
    path, corpus = tiny_checkpoint
    run = tmp_path / "run"
    assert main(tiny_run_args(path, corpus, run, "search.generations=1", "ray.stages=2")) == 0
    m = json.loads((run / "manifest.json").read_text())
    ppl = m["perplexity"]
    assert set(ppl) >= {"original", "searched", "reformed", "exported"}
    assert ppl["exported"] == pytest.approx(ppl["reformed"], rel=1e-4)
    assert m["export"]["params"] == m["params"]["subnet"] and m["ratio"]["actual"] == pytest.approx(
        m["params"]["subnet"] / m["params"]["original"]
    )
    assert m["calibration"]["seed"] == 0 and m["source"]["model"] == str(path)
    assert len(m["structure"]["mlp_channels"]) == 4 and m["reform"]["solver"] == "exact"
    # Reformation-aware choice: the top-3 parents and FLAP's subnet were reformed; the lowest fitness won
    # (and the pool evaluated the winner's weights, not the last finalist's: exported == reformed above).
    fin = m["reform"]["candidates"]
    assert m["reform"]["finalists"] == 3
    assert [f["origin"] for f in fin] == ["parent 1", "parent 2", "parent 3", "flap"]
    winner = min(fin, key=lambda f: f["final_ppl"])
    assert (
        fin[0]["final_tokens"] == 4 * 31
    )  # judged on reform.final_windows=4 windows, the search on data.fitness.samples=2
    assert m["search"]["chosen"] == winner["key"] and m["search"]["seconds"] > 0
    assert (run / "export" / "model.safetensors").is_file() and (run / "export" / "tokenizer.json").is_file()
    # The same saved search, reformed again with ADMM into another directory, without searching again.
    assert main([f"resume={run}", "reform.solver=admm", f"export.dir={tmp_path / 'admm'}"]) == 0
    m2 = json.loads((run / "manifest.json").read_text())
    assert m2["reform"]["solver"] == "admm" and m2["search"]["evaluations"] == m["search"]["evaluations"]
    assert (tmp_path / "admm" / "config.json").is_file()


def test_driver_searches_reforms_and_exports_an_opt_model(ray_cluster, tmp_path):
    """The paper's second family end to end: LayerNorm with biases, fc1/fc2, learned positions."""
    path, corpus = make_tiny_checkpoint(tmp_path, "opt")
    run = tmp_path / "run"
    assert main(tiny_run_args(path, corpus, run, "search.generations=1")) == 0
    m = json.loads((run / "manifest.json").read_text())
    assert m["source"]["model_type"] == "opt" and m["export"]["kind"] == "searchllm"
    assert m["perplexity"]["exported"] == pytest.approx(m["perplexity"]["reformed"], rel=1e-4)
    assert m["export"]["params"] == m["params"]["subnet"]


def test_driver_runs_the_flap_baseline_exports_its_biases_and_evaluates(ray_cluster, tiny_checkpoint, tmp_path):
    path, corpus = tiny_checkpoint
    run = tmp_path / "run"
    assert main(tiny_run_args(path, corpus, run, "method=flap")) == 0
    m = json.loads((run / "manifest.json").read_text())
    assert m["method"] == "flap" and m["search"]["evaluations"] == 1 and not m["reform"]["enabled"]
    assert m["perplexity"]["exported"] == pytest.approx(
        m["perplexity"]["searched"], rel=1e-4
    )  # biases included in both
    assert 0.67 <= m["export"]["params"] / m["params"]["original"] <= 0.73
    table = pd.read_parquet(run / "eval.parquet")
    assert set(table.model) == {"original", "exported (flap)"} and (table.status == "ok").all()
    exported = table[table.model == "exported (flap)"].iloc[0]
    assert exported.ratio == pytest.approx(m["export"]["params"] / m["params"]["original"])
    # The manifest carries the measured speed and weight memory of the export beside the original's.
    speed = json.loads((run / "manifest.json").read_text())["speed"]
    assert (
        set(speed) == {"original", "exported"} and speed["exported"]["weights_mib"] < speed["original"]["weights_mib"]
    )
    assert speed["exported"]["prefill_tokens_per_s"] == pytest.approx(exported.tokens_per_s)
    # The evaluation CLI on the run dir evaluates its export and appends to the same table.
    from searchllm.evaluate.__main__ import main as evaluate_main

    assert evaluate_main([str(run), "eval.lengths=[8]"]) == 0
    again = pd.read_parquet(run / "eval.parquet")
    assert len(again) == len(table) + 1 and again.iloc[-1].seqlen == 8 and again.iloc[-1].model == str(run / "export")


def test_evaluating_a_run_again_reuses_the_originals_rows_of_the_same_protocol(ray_cluster, tiny_checkpoint, tmp_path):
    """A heal (or any resume) evaluates the export again; the original is scored once per eval protocol."""
    path, corpus = tiny_checkpoint
    run = tmp_path / "run"
    assert main(tiny_run_args(path, corpus, run, "method=flap")) == 0
    first = pd.read_parquet(run / "eval.parquet")
    original = first[first.model == "original"].iloc[0]
    assert main([f"resume={run}"]) == 0
    again = pd.read_parquet(run / "eval.parquet").iloc[len(first) :]
    assert list(again.model) == ["exported (flap)"]  # only the export was scored
    assert again.iloc[0].x_original == pytest.approx(again.iloc[0].value / original.value)
    assert main([f"resume={run}", "eval.lengths=[8]"]) == 0  # another protocol: the original is scored in it
    third = pd.read_parquet(run / "eval.parquet").iloc[len(first) + len(again) :]
    assert list(third.model) == ["original", "exported (flap)"] and (third.seqlen == 8).all()


@pytest.mark.parametrize(
    "override,message",
    [
        ("budget.target=1.5", "budget.target=1.5 must be in (0, 1]"),
        ("space.attention=blocks", "space.attention='blocks' is not allowed; choose one of: channels, heads"),
        ("search.populaton=5", "unknown config key 'search.populaton'"),
        ("model.path=/nonexistent/model", "model.path='/nonexistent/model' does not exist"),
        ("budget.target=0.1", "cannot be met"),
        ("data.fitness.seqlen=100000", "shorter than one sequence of 100000"),
        (
            "data.calibration.seqlen=100000",
            "data.calibration: the corpus has 6000 tokens, shorter than one sequence of 100000",
        ),
        (
            "model.path={gpt_neox}",
            "model type 'gpt_neox' is not supported; supported model types: gemma3, gemma3_text, llama, mistral, opt",
        ),
        ("ray.replicas=many", "ray.replicas='many' must be an integer >= 1 or auto"),
        ("export.dir=/proc/nope", "export.dir='/proc/nope' cannot be written (No such file or directory)"),
        ("run_dir=/proc/nope/run", "run_dir='/proc/nope/run' cannot be written"),
        ("model.path={gguf} model.cache_dir=/proc/nope", "model.cache_dir='/proc/nope' cannot be written"),
    ],
)
def test_bad_input_stops_early_with_one_line_and_exit_code_2(tiny_checkpoint, tmp_path, capsys, override, message):
    path, corpus = tiny_checkpoint
    other = tmp_path / "gpt-neox"  # a family without an adapter
    shutil.copytree(path, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(
        json.dumps(cfg | {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]})
    )
    run = tmp_path / "run"
    # in process (the command line's own exit code and stderr: test_an_unreachable_ray_address_stops_early)
    gguf = tmp_path / "m.gguf"  # never read: the cache dir is checked first
    gguf.write_bytes(b"GGUF")
    assert main([*tiny_run_args(path, corpus, run), *override.format(gpt_neox=other, gguf=gguf).split()]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not run.exists()  # nothing a resume could mistake for progress


CONNECT = """
import ray
from searchllm.config import RayConfig
from searchllm.cluster.connect import connect
print(connect(RayConfig(num_cpus=1)))
print(ray.get_runtime_context().gcs_address)
"""


def test_a_driver_starts_its_own_ray_beside_one_another_process_started_for_itself(ray_cluster):
    # the session's Ray was started by ray.init() in this process, as a notebook's would be: not joined
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", CONNECT], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    message, address = proc.stdout.strip().splitlines()[-2:]
    assert message.startswith("started a local Ray")
    assert address != ray_cluster.get_runtime_context().gcs_address


OWN_RAY_FOR_THE_STATE_API = (
    CONNECT
    + """
@ray.remote
def found():
    from ray._private.services import canonicalize_bootstrap_address_or_die

    return canonicalize_bootstrap_address_or_die(None)  # how Ray's state API finds its cluster without an address

print(ray.get(found.remote()) == ray.get_runtime_context().gcs_address)
"""
)


def test_a_worker_of_a_drivers_own_ray_beside_another_finds_its_own_ray_for_the_state_api(ray_cluster):
    # Ray Train's placement-group cleaner polls the state API; with two Rays on the machine and no address
    # it raised "Found multiple active Ray instances" and its thread died with a traceback in the driver's output
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-c", OWN_RAY_FOR_THE_STATE_API], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.parametrize("how", ["environment", "config"])
def test_an_unreachable_ray_address_stops_early(tiny_checkpoint, tmp_path, how):
    # a subprocess: a Ray already started in this process would be reused, and this is the command line's own exit code
    path, corpus = tiny_checkpoint
    run = tmp_path / "run"
    env = dict(os.environ, RAY_ADDRESS="127.0.0.1:1") if how == "environment" else dict(os.environ)
    extra = ["ray.address=127.0.0.1:1"] if how == "config" else []
    proc = subprocess.run(
        [sys.executable, "-m", "searchllm.driver", *tiny_run_args(path, corpus, run), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert ("RAY_ADDRESS" if how == "environment" else "cannot reach the Ray cluster at '127.0.0.1:1'") in proc.stderr
    assert not run.exists()


def raylets() -> set[int]:
    procs = set()
    for p in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if p.name.isdigit() and (p / "cmdline").read_bytes().split(b"\0")[0].endswith(b"/raylet"):
                procs.add(int(p.name))
    return procs


def test_a_run_on_its_own_ray_prints_no_ray_errors_and_an_interrupt_shuts_that_ray_down(checkpoint, tmp_path):
    # the default layout (max_restarts > 0) on a Ray the driver starts: no `E` line from Ray (its actors'
    # constructor arguments are not ObjectRefs), then SIGTERM in the export: one line, and its Ray is gone
    before = raylets()
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-c", SIGNAL_AT, "searchllm.export.hf:write_info", "1", "SIGTERM", "once"]
        + tiny_run_args(*checkpoint, run, "search.generations=2"),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 143 and "started a local Ray" in proc.stdout
    [line] = proc.stderr.strip().splitlines()  # nothing else: no Ray error, no stack dump, no traceback
    assert line.startswith("searchllm: interrupted by SIGTERM during the export stage")
    for _ in range(50):
        if raylets() <= before:
            break
        time.sleep(0.2)
    assert raylets() <= before
