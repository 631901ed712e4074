"""The search loop: improvement over the initial population, checkpoints and identical resumes."""

import json

import numpy as np
import pytest

from searchllm.models.weights import share
from searchllm.pruning.shard import ShardRunner, split_layers
from searchllm.pruning.space import Budget, SearchSpace
from searchllm.rundir import RunDir
from searchllm.search.evolution import Evolution, EvolutionParams
from searchllm.search.loop import LocalEvaluator, Search

PARAMS = EvolutionParams(population=8, parents=3, mutations=4, crossovers=2)


def make_search(model, adapter, tokens, run_dir, generations, params=PARAMS, target=0.7):
    g = adapter.geometry()
    space = SearchSpace.for_target(g, target)
    budget = Budget(target, 0.03)
    runner = ShardRunner(adapter.architecture(), share(model.state_dict()), split_layers(g.num_layers, 1)[0])
    init = space.initial(
        np.random.default_rng(0).random((g.num_layers, g.num_kv_heads, g.head_dim // 2)),
        np.random.default_rng(1).random((g.num_layers, g.intermediate)),
        budget,
    )
    search = Search(
        space,
        Evolution(space, budget, params),
        LocalEvaluator(space, [runner], tokens),
        RunDir(run_dir).create(),
        0,
        generations,
    )
    return search, init


def outcome(run_dir):
    arch = RunDir(run_dir).archive().sort_values(["generation", "key"])
    return list(zip(arch.generation, arch.key, arch.fitness.round(9))), json.loads(
        (run_dir / "checkpoint.json").read_text()
    )["parents"]


def test_checkpoint_after_every_generation_and_archive_of_every_evaluation(llama, adapter, tokens, tmp_path):
    search, init = make_search(llama, adapter, tokens, tmp_path, 2)
    result = search.run_search([init])
    arch = RunDir(tmp_path).archive()
    assert len(arch) == result.evaluations == 16
    assert set(arch.columns) >= {"generation", "key", "params", "ratio", "fitness", "seconds", "genes", "origin"}
    assert json.loads((tmp_path / "checkpoint.json").read_text())["generation"] == 1
    assert result.fitness == arch.fitness.min()


def test_run_stopped_after_a_generation_and_resumed_ends_identical(llama, adapter, tokens, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    make_search(llama, adapter, tokens, straight, 4)[0].run_search(
        [make_search(llama, adapter, tokens, straight, 4)[1]]
    )
    s, init = make_search(llama, adapter, tokens, stopped, 2)
    s.run_search([init])
    s, init = make_search(llama, adapter, tokens, stopped, 4)
    s.run_search([init])
    assert outcome(stopped) == outcome(straight)


def test_run_killed_mid_generation_resumes_identical_without_re_evaluating(llama, adapter, tokens, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    s, init = make_search(llama, adapter, tokens, straight, 3)
    s.run_search([init])
    s, init = make_search(llama, adapter, tokens, killed, 2)
    s.run_search([init])
    saved = (killed / "checkpoint.json").read_text()
    s, init = make_search(llama, adapter, tokens, killed, 3)
    s.run_search([init])
    # Rewind to "killed halfway through generation 3": its checkpoint never written, half its evals logged.
    (killed / "checkpoint.json").write_text(saved)
    (killed / "archive" / "gen-0002.parquet").unlink()
    lines = (killed / "evals.jsonl").read_text().splitlines()
    (killed / "evals.jsonl").write_text("\n".join(lines[:-4]) + "\n" + lines[-4][:30])  # last line cut mid-write
    s, init = make_search(llama, adapter, tokens, killed, 3)
    calls = []
    inner = s.evaluator.evaluate
    s.evaluator.evaluate = lambda cands: (calls.append(len(cands)), inner(cands))[1]
    s.run_search([init])
    assert calls == [4]  # only what was lost is evaluated again
    assert outcome(killed) == outcome(straight)


@pytest.mark.smollm2
def test_search_on_smollm2_improves_on_its_initial_population(smollm2, tmp_path):
    from searchllm.config import CorpusConfig
    from searchllm.data import first_windows, load_text, tokenize

    text, _ = load_text(CorpusConfig("wikitext2", "validation"), "auto")
    tokens = first_windows(tokenize(text[:20000], smollm2.tokenizer), 1, 128, "fitness")
    params = EvolutionParams(population=6, parents=2, mutations=3, crossovers=2)
    s, init = make_search(smollm2.model, smollm2.adapter, tokens, tmp_path, 4, params, target=0.8)
    result = s.run_search([init])
    arch = RunDir(tmp_path).archive()
    first = arch[arch.generation == 0].fitness.min()
    assert result.fitness < first
    assert result.history[-1]["best"] < result.history[0]["best"]


class FailingOn:
    """An evaluator that reports one candidate as failed (as the Ray pool does after its retry)."""

    def __init__(self, inner, bad_key):
        self.inner, self.bad_key, self.cands = inner, bad_key, []

    def evaluate(self, cands):
        from searchllm.pruning.shard import NLL

        for i, nll, r in self.inner.evaluate(cands):
            yield (
                i,
                (NLL(float("inf"), 1, error="OutOfMemoryError: injected") if cands[i].key() == self.bad_key else nll),
                r,
            )


def test_a_failed_evaluation_is_recorded_with_its_error_and_the_search_goes_on(llama, adapter, tokens, tmp_path):
    search, init = make_search(llama, adapter, tokens, tmp_path, 2)
    bad = init.key()  # generation 0's first candidate
    search.evaluator = FailingOn(search.evaluator, bad)
    result = search.run_search([init])
    arch = RunDir(tmp_path).archive().set_index("key")
    assert arch.loc[bad, "error"] == "OutOfMemoryError: injected" and arch.loc[bad, "fitness"] == float("inf")
    assert (arch.drop(bad).error == "").all() and result.best.key() != bad and np.isfinite(result.fitness)
    assert result.history[0]["failed"] == 1 and result.generations == 2
