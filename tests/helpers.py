"""Reference computations the tests compare searchllm against."""

import copy

import torch

from searchllm.models.adapters import ModelAdapter
from searchllm.models.sliced import LayerSlice


def masked_model(model, adapter: ModelAdapter, slices: list[LayerSlice]):
    """The original HF model with every dropped row/column (and dropped layer) zeroed: the 'masked' subnet."""
    m = copy.deepcopy(model)
    g = adapter.geometry()
    sd = m.state_dict()
    with torch.no_grad():
        for i, s in enumerate(slices):
            keys = adapter.block_state_keys(i)
            if not s.active:
                for k, name in keys.items():
                    if "norm" not in k:
                        sd[name].zero_()
                continue
            keep_kv = torch.zeros(g.num_kv_heads * g.head_dim, dtype=torch.bool)
            keep_kv[s.kv_rows(g)] = True
            keep_q = torch.zeros(g.num_heads * g.head_dim, dtype=torch.bool)
            keep_q[s.q_rows(g)] = True
            keep_m = torch.zeros(g.intermediate, dtype=torch.bool)
            keep_m[list(s.mlp)] = True
            for k, keep in (("q", keep_q), ("k", keep_kv), ("v", keep_kv), ("gate", keep_m), ("up", keep_m)):
                if k not in keys:
                    continue  # no gate in a plain MLP
                sd[keys[k]][~keep] = 0
                if f"{k}_bias" in keys:
                    sd[keys[f"{k}_bias"]][~keep] = 0
            sd[keys["o"]][:, ~keep_q] = 0
            sd[keys["down"]][:, ~keep_m] = 0
    return m


def hf_ppl(model, tokens: torch.Tensor) -> float:
    """Perplexity over windows, each window scored on its own (tokens 1..T given the prefix)."""
    with torch.no_grad():
        logits = model(tokens).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    return float(torch.exp(nll))


def evaluator_pool(
    model, adapter, tokens, replicas=1, stages=1, max_restarts=0, actor=None, metrics=None, threads="auto"
):
    """An EvaluatorPool on the session's Ray with `tokens` as every role's windows."""
    from searchllm.cluster.pool import EvaluatorPool, StageActor
    from searchllm.config import RayConfig

    tok = {"fitness": tokens, "calibration": tokens, "report": tokens}
    cfg = RayConfig(replicas=replicas, stages=stages, max_restarts=max_restarts, threads=threads)
    return EvaluatorPool(model, adapter, cfg, "float32", tok, actor=actor or StageActor, metrics=metrics)


def small_search(pool, adapter, run_dir, wrap=None):
    """Calibrate on the pool, then 3 generations of 8 at 0.7 kept with seed 7; `wrap` may wrap the
    evaluator (fault injection). Returns the SearchResult."""
    from searchllm.pruning.space import Budget, SearchSpace
    from searchllm.rundir import RunDir
    from searchllm.search.evolution import Evolution, EvolutionParams
    from searchllm.search.loop import Search
    from searchllm.stages.search_masks import PoolEvaluator

    space = SearchSpace.for_target(adapter.geometry(), 0.7)
    budget = Budget(0.7, 0.03)
    scores = pool.calibrate(1, 0.01)
    evaluator = PoolEvaluator(pool, space, 1)
    if wrap is not None:
        evaluator = wrap(evaluator)
    params = EvolutionParams(population=8, parents=3, mutations=4, crossovers=2)
    search = Search(space, Evolution(space, budget, params), evaluator, RunDir(run_dir).create(), 7, 3)
    return search.run_search([space.initial(scores.attn, scores.mlp, budget)])
