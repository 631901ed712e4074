"""Reference computations the tests compare searchllm against."""

import copy
import os
import re
import shlex
import subprocess
import sys
import time

import torch

from searchllm.models.adapters import ModelAdapter
from searchllm.models.sliced import LayerSlice

from conftest import FAMILIES


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
    from searchllm.cluster.actor import StageActor
    from searchllm.cluster.pool import EvaluatorPool
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


SIGNAL_AT = """
import importlib, os, signal, sys
target, after, sig, how = sys.argv[1], int(sys.argv[2]), getattr(signal, sys.argv[3]), sys.argv[4]
again, send = how == "again", (lambda s: os.killpg(0, s)) if how == "group" else (lambda s: os.kill(os.getpid(), s))
module, _, path = target.rpartition(":")  # a RunDir method, or module:function
owner = importlib.import_module(module or "searchllm.rundir")
parts = path.split(".") if module else ["RunDir", path]
for p in parts[:-1]:
    owner = getattr(owner, p)
original, calls = getattr(owner, parts[-1]), [0]
def counted(*args):
    original(*args)
    calls[0] += 1
    if calls[0] == after:  # the driver (or its whole process group) gets the signal here
        send(sig)
setattr(owner, parts[-1], counted)
if again:  # and once more while it shuts its evaluators down
    from searchllm.cluster.pool import EvaluatorPool
    shutdown = EvaluatorPool.shutdown
    def twice(self):
        if calls[0] >= after:
            os.kill(os.getpid(), sig)
        shutdown(self)
    EvaluatorPool.shutdown = twice
from searchllm.driver import main
sys.exit(main(sys.argv[5:]))
"""


def signal_driver_at(args, method, after, sig="SIGKILL", again=False, group=False):
    """Run the driver with `args` in a subprocess that sends itself `sig` after the `after`-th call of `method`
    (a RunDir method, or module:function) returns; with `again`, the signal once more during the shutdown;
    with `group`, to its whole process group (the driver leads a session of its own, as under a supervisor)."""
    how = "group" if group else "again" if again else "once"
    return subprocess.run(
        [sys.executable, "-c", SIGNAL_AT, method, str(after), sig, how, *args],
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=group,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} if group else None,
    )


CODES = {"SIGINT": 130, "SIGTERM": 143}


RAY_WORKER_LOG = re.compile(r"^(\x1b\[\d+m)?\(\w+ pid=\d+")  # a line Ray forwards from a worker's log


def ended_cleanly(proc, run, sig, stage, worker_logs=False):
    """The interrupted driver's whole stderr is one line naming the stage and the resume command (with
    `worker_logs`, beside the lines Ray forwards from its workers' logs, e.g. Ray Train's); the lock is
    released and every evaluator actor is gone. Returns the resume command's arguments."""
    import ray

    assert proc.returncode == CODES[sig], proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    own = [t for t in lines if not RAY_WORKER_LOG.match(t)] if worker_logs else lines
    assert len(own) == 1, "its own lines:\n" + "\n".join(own)[:3000] + "\nits stderr:\n" + proc.stderr[-2000:]
    [line] = own
    head = f"searchllm: interrupted by {sig} during the {stage} stage; every finished step is saved in {run}; "
    assert line.startswith(head + f"resume with: python -m searchllm.driver resume={run}"), line
    assert not (run / "lock").exists()
    for _ in range(50):  # the actors' CPUs come back once Ray has reaped them
        if ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"]:
            break
        time.sleep(0.2)
    assert ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"]
    return shlex.split(line.split("resume with: ")[1])[3:]


# -- subnets of every shape an export must express (4-layer models of each family) -------------------------
FAMILY_KW = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {"use_sliding_window": False},
    "qwen3": {"use_sliding_window": False},
    # sliding and global layers alternating (not llama.cpp's default 5:1): the per-layer pattern is written
    "gemma3_text": FAMILIES["gemma3"][1] | {"query_pre_attn_scalar": 16},
}


def subnet(g, kind):
    """Slices of a 4-layer model (4 query heads in 2 KV groups, head_dim 16, MLP 96) of each shape the
    GGUF writer must express."""
    full_pairs = tuple(range(g.head_dim // 2))
    both = (full_pairs, full_pairs)
    mlp = lambda n: tuple(range(0, 2 * n, 2))  # noqa: E731  (non-contiguous channels)
    if kind == "uniform":
        return [LayerSlice(both, mlp(32), True, ((1,), (0,)))] * g.num_layers
    if kind == "per-layer":
        return [
            LayerSlice(both, mlp(40)),
            LayerSlice(both, mlp(24), True, ((0,), (1,))),
            LayerSlice((full_pairs, ()), mlp(48), True, ((0, 1), ())),
            LayerSlice(both, mlp(8)),
        ]
    if kind == "uniform-channels":  # every layer alike once heads are padded to head_dim with zeros
        return [LayerSlice(((0, 2, 5), (1, 3, 4, 6, 7)), mlp(32))] * g.num_layers
    if kind == "dropped":
        return [
            LayerSlice(both, mlp(32)),
            LayerSlice(both, mlp(32), active=False),
            LayerSlice(both, mlp(16)),
            LayerSlice(both, mlp(40)),
        ]
    if kind == "channels":  # in-head channel space: heads of different widths
        return [
            LayerSlice(((0, 2, 5), (1, 3, 4, 6, 7)), mlp(32)),
            LayerSlice((full_pairs, (0, 1)), mlp(40)),
            LayerSlice(both, mlp(24)),
            LayerSlice(((7,), full_pairs), mlp(32)),
        ]
    if kind == "unequal":  # unequal query heads per KV group; an attention-free layer; a layer without MLP
        return [
            LayerSlice(both, mlp(32), True, ((0, 1), (1,))),
            LayerSlice(((), ()), mlp(40), True, ((), ())),
            LayerSlice(both, (), True, ((1,), (0, 1))),
            LayerSlice(both, mlp(24)),
        ]
    raise KeyError(kind)


def one_generation_args(path, corpus, run, *extra):
    """A tiny level search of one generation (4 children on 64 tokens, no probes) for tests of what comes after."""
    from conftest import tiny_run_args

    return tiny_run_args(
        path,
        corpus,
        run,
        "method=searchllm",
        "search.generations=1",
        "levels.tokens=[64]",
        "levels.survivors=[]",
        "levels.offspring=4",
        "levels.mlp_levels=8",
        "levels.probe=0",
        "monitor.page=false",
        *extra,
    )
