"""Faults: a dead evaluator actor, a candidate whose evaluation raises, a driver killed with SIGKILL."""

import json
import logging
import os

import pytest
import torch

from searchllm.cluster.actor import StageActor
from searchllm.driver import main
from searchllm.pruning.space import SearchSpace
from searchllm.rundir import RunDir

from conftest import tiny_run_args
from helpers import CODES, evaluator_pool, signal_driver_at, small_search

pytestmark = pytest.mark.ray


class KillAfter:
    """Passes results through and kills one stage actor of a replica after the n-th."""

    def __init__(self, inner, pool, replica, n, no_restart):
        self.inner, self.pool, self.replica, self.n, self.no_restart, self.seen = inner, pool, replica, n, no_restart, 0

    def evaluate(self, cands):
        import ray

        for item in self.inner.evaluate(cands):
            self.seen += 1
            if self.seen == self.n:
                ray.kill(self.pool.replicas[self.replica][0], no_restart=self.no_restart)
            yield item


def search_on(pool, adapter, run_dir, fault=None):
    r = small_search(pool, adapter, run_dir, fault)
    keys = [json.loads(line)["key"] for line in (run_dir / "evals.jsonl").read_text().splitlines()]
    return (r.best.key(), r.fitness), keys


@pytest.fixture(scope="module")
def undisturbed(ray_cluster, tmp_path_factory):
    from searchllm.models.adapters import adapter_for

    from conftest import tiny_model

    g = torch.Generator().manual_seed(1)
    model = tiny_model("llama")
    tokens = torch.randint(0, 128, (3, 32), generator=g)
    with evaluator_pool(model, adapter_for(model.config), tokens, replicas=2) as p:
        return search_on(p, adapter_for(model.config), tmp_path_factory.mktemp("undisturbed"))


def test_a_killed_evaluator_restarts_and_the_search_ends_as_an_undisturbed_one(
    undisturbed, llama, adapter, tokens, tmp_path
):
    with evaluator_pool(llama, adapter, tokens, replicas=2, max_restarts=2) as p:
        pid = p.placed[0][0]["pid"]
        result, keys = search_on(p, adapter, tmp_path, lambda e: KillAfter(e, p, 0, 11, no_restart=False))
        assert p.alive == [0, 1]
        import ray

        assert ray.get(p.replicas[0][0].ready.remote())["pid"] != pid  # it really died and came back
    assert result == undisturbed[0]
    # Nothing evaluated is lost and nothing is evaluated twice: the same candidates, each logged once.
    assert sorted(keys) == sorted(undisturbed[1]) and len(set(keys)) == len(keys)


def test_an_evaluator_that_cannot_come_back_leaves_the_search_on_fewer_replicas(
    undisturbed, llama, adapter, tokens, tmp_path, caplog
):
    with caplog.at_level(logging.WARNING, logger="searchllm"), evaluator_pool(llama, adapter, tokens, replicas=2) as p:
        result, keys = search_on(p, adapter, tmp_path, lambda e: KillAfter(e, p, 1, 5, no_restart=True))
        assert p.alive == [0]
    assert "replica 1 is gone for good" in caplog.text and "continuing with 1 replica(s)" in caplog.text
    assert result == undisturbed[0] and sorted(keys) == sorted(undisturbed[1])


def flaky(poison, times):
    """A stage actor whose evaluation of one subnet raises (like a CUDA OOM) its first `times` times."""

    class Flaky(StageActor):
        raised = 0

        def forward(self, slices, *rest):
            if tuple(slices[i] for i in sorted(slices)) == poison and self.raised < times:
                self.raised += 1
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return super().forward(slices, *rest)

    return Flaky


def candidates(adapter):
    space = SearchSpace(adapter.geometry())
    cands = [space.full() for _ in range(3)]
    for i, c in enumerate(cands):
        c.mlp[:, i::5] = False
    return space, cands


def test_a_candidate_that_raises_once_is_retried_and_scored(ray_cluster, llama, adapter, tokens):
    space, cands = candidates(adapter)
    with evaluator_pool(llama, adapter, tokens) as p:
        clean = {i: n.ppl for i, n, _ in p.stream(space, cands)}
    with evaluator_pool(llama, adapter, tokens, actor=flaky(tuple(space.slices(cands[1])), 1)) as p:
        got = {i: n for i, n, _ in p.stream(space, cands)}
    assert {i: n.ppl for i, n in got.items()} == clean and got[1].error is None


def test_a_candidate_that_keeps_raising_is_recorded_failed_and_the_rest_are_scored(
    ray_cluster, llama, adapter, tokens, caplog
):
    space, cands = candidates(adapter)
    with (
        caplog.at_level(logging.WARNING, logger="searchllm"),
        evaluator_pool(llama, adapter, tokens, actor=flaky(tuple(space.slices(cands[1])), 99)) as p,
    ):
        got = {i: n for i, n, _ in p.stream(space, cands)}
    assert sorted(got) == [0, 1, 2] and got[1].ppl == float("inf")
    assert got[1].error.startswith("OutOfMemoryError: CUDA out of memory (injected)")
    assert got[0].error is None and got[0].ppl < float("inf") and got[2].ppl < float("inf")
    assert "retrying once" in caplog.text and "failed twice" in caplog.text


# -- the driver killed with SIGKILL, then resumed ------------------------------------------------------


@pytest.fixture(scope="module")
def reference(ray_cluster, checkpoint, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(tiny_run_args(*checkpoint, run)) == 0
    return run


def kill_driver_at(run, checkpoint, method, after):
    import ray

    args = tiny_run_args(*checkpoint, run, f"ray.address={ray.get_runtime_context().gcs_address}")
    proc = signal_driver_at(args, method, after, "SIGKILL")
    assert proc.returncode == -9, proc.stderr[-2000:]


def same_final_result(run, reference):
    got, want = (json.loads((r / "manifest.json").read_text()) for r in (run, reference))
    assert got["search"]["chosen"] == want["search"]["chosen"]
    assert [c["key"] for c in got["reform"]["candidates"]] == [c["key"] for c in want["reform"]["candidates"]]
    for c, w in zip(got["reform"]["candidates"], want["reform"]["candidates"]):
        assert c["final_ppl"] == pytest.approx(w["final_ppl"], rel=1e-5)
    assert got["perplexity"]["exported"] == pytest.approx(want["perplexity"]["exported"], rel=1e-5)
    assert sorted(RunDir(run).archive().key) == sorted(RunDir(reference).archive().key)
    return got


def test_a_driver_killed_mid_search_resumes_with_the_same_command_to_the_same_result(reference, checkpoint, tmp_path):
    run = tmp_path / "run"
    kill_driver_at(run, checkpoint, "append_eval", 8 + 3)  # generation 0 has 8 candidates: dies inside generation 1
    assert json.loads((run / "checkpoint.json").read_text())["generation"] == 0
    logged = len((run / "evals.jsonl").read_text().splitlines())
    assert logged == 11 and not (run / "manifest.json").exists()
    # The same command again with resume=auto, as a retried cluster job would run it.
    assert main(tiny_run_args(*checkpoint, run, "resume=auto")) == 0
    keys = [json.loads(line)["key"] for line in (run / "evals.jsonl").read_text().splitlines()]
    assert len(keys) == len(
        set(keys)
    )  # the 3 candidates of generation 1 finished before the kill are not evaluated again
    same_final_result(run, reference)


def test_a_driver_killed_mid_reformation_resumes_from_the_last_finished_layer(reference, checkpoint, tmp_path):
    run = tmp_path / "run"
    kill_driver_at(run, checkpoint, "save_layer", 2)
    [folder] = (run / "reform").iterdir()
    saved = sorted(folder.glob("layer-*.pt"))
    assert len(saved) == 2 and not (run / "manifest.json").exists()
    stamps = [f.stat().st_mtime_ns for f in saved]
    assert main([f"resume={run}"]) == 0
    m = same_final_result(run, reference)
    first = m["reform"]["candidates"][0]
    assert first["reused_layers"] == 2 and all(c["reused_layers"] == 0 for c in m["reform"]["candidates"][1:])
    assert [f.stat().st_mtime_ns for f in saved] == stamps  # the two finished layers were not solved again


def test_a_driver_killed_mid_export_leaves_no_export_and_a_resume_without_corpora_writes_it(
    reference, checkpoint, tmp_path
):
    run = tmp_path / "run"
    kill_driver_at(
        run, checkpoint, "searchllm.export.hf:write_info", 1
    )  # the weights are written, the export is not complete
    assert not (run / "export").exists() and not (run / "manifest.json").exists()
    assert main([f"resume={run}", "eval.corpora=[]"]) == 0  # and no evaluation corpora: a valid, empty evaluation
    same_final_result(run, reference)
    assert (run / "export" / "model.safetensors").is_file() and not list(run.glob(".export.*"))
    assert json.loads((run / "manifest.json").read_text())["evaluation"] == {
        "rows": 0,
        "reason": "eval.corpora and eval.tasks are empty",
    }


def test_a_damaged_checkpoint_stops_the_resume_and_the_previous_one_resumes_to_the_same_result(
    reference, checkpoint, tmp_path, capsys
):
    run = tmp_path / "run"
    kill_driver_at(run, checkpoint, "append_eval", 8 + 8 + 3)  # generations 0 and 1 checkpointed, dies inside 2
    (run / "checkpoint.json").write_text('{"generation": 1, "par')
    with open(run / "evals.jsonl", "a") as f:
        f.write('{"key": "0a1b", "ppl": 12.')  # and the last evaluation line cut, as a kill mid-write leaves it
    evals = (run / "evals.jsonl").read_bytes()
    assert main([f"resume={run}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint.json is damaged" in err[0] and "checkpoint.prev.json" in err[0]
    assert (run / "evals.jsonl").read_bytes() == evals  # nothing else touched
    os.replace(run / "checkpoint.prev.json", run / "checkpoint.json")
    assert main([f"resume={run}"]) == 0
    assert all(json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines())  # the cut line was dropped
    same_final_result(run, reference)


def test_a_second_driver_on_a_run_dir_in_use_stops_naming_the_holder(checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    with RunDir(run).create().locked():
        assert main(tiny_run_args(*checkpoint, run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"in use by the driver with pid {os.getpid()}" in err[0]
    assert not (run / "config.yaml").exists()  # it stopped before writing anything


# -- SIGINT / SIGTERM: one line, the signal's exit code, the resume command ------------------------------


def test_a_second_interrupt_while_shutting_down_exits_at_once(checkpoint, tmp_path):
    import ray

    args = tiny_run_args(*checkpoint, tmp_path / "run", f"ray.address={ray.get_runtime_context().gcs_address}")
    proc = signal_driver_at(args, "append_eval", 3, "SIGINT", again=True)
    assert proc.returncode == 130 and proc.stderr.strip().splitlines() == ["searchllm: SIGINT again: exiting now"]


@pytest.mark.parametrize("sig", CODES)
def test_the_export_and_evaluate_commands_end_an_interrupt_with_one_line_and_its_exit_code(sig, capsys):
    import signal
    import time

    from searchllm.interrupt import cli

    before = signal.getsignal(signal.SIGINT)

    def main(argv):
        os.kill(os.getpid(), getattr(signal, sig))
        time.sleep(5)  # interrupted here
        return 0

    assert cli(main) == CODES[sig]
    assert capsys.readouterr().err.strip().splitlines() == [
        f"searchllm: interrupted by {sig}; what was finished is kept: run the same command again"
    ]
    assert signal.getsignal(signal.SIGINT) is before  # the handlers it replaced are back
