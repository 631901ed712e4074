"""The Ray layer: attach to or start Ray, place evaluator stage actors, stream fitness back.

This is the only module that imports ray. An evaluator replica is a chain of `StageActor`s, each holding a
contiguous shard of layers (a `ShardRunner`); activations travel stage to stage as ObjectRefs. Weights
are put in the object store once per shard as read-only numpy arrays and mapped zero-copy by every
replica's actor on a node. The driver keeps `in_flight` candidates queued on every replica and consumes
results with ray.wait as each finishes.
"""
from __future__ import annotations

import logging
import os
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator

import ray
import torch

from .config import RayConfig
from .models.adapters import ModelAdapter, adapter_for
from .models.sliced import LayerSlice
from .models.weights import share, unshare
from .reform import LayerResult, ReformParams, reform_shard
from .scores import LayerScores, Scores
from .shard import NLL, ShardRunner, ShardSpec, shard_state_names, split_layers
from .space import Candidate, SearchSpace

log = logging.getLogger("searchllm")


class ClusterError(RuntimeError):
    pass


def connect(cfg: RayConfig) -> str:
    """Attach to $RAY_ADDRESS / ray.address, else to a running local cluster, else start a local Ray."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return "Ray already initialised in this process"
    quiet = dict(logging_level=logging.WARNING, log_to_driver=True)
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, **quiet)
        except Exception as e:
            raise ClusterError(
                f"cannot reach the Ray cluster at {address!r} ({type(e).__name__}); check RAY_ADDRESS / ray.address "
                "or unset it to run on a local Ray"
            ) from None
        return f"attached to Ray at {address}"
    try:
        ray.init(address="auto", **quiet)
        return "attached to the running local Ray cluster"
    except ConnectionError:
        pass
    # Our own throwaway cluster: no token auth left behind (it would lock later `ray start --head` users
    # out of their dashboard), no dashboard processes (~1 GB RSS on a laptop-sized machine).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, **quiet)
    return f"started a local Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"


class StageActor:
    """One shard of one evaluator replica."""

    def __init__(self, hf_config: Any, state: dict, spec: ShardSpec, dtype: str, threads: int, tokens: dict) -> None:
        torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # from torch, not from Ray's GPU ids
        self.runner = ShardRunner(adapter_for(hf_config), state, spec, device, getattr(torch, dtype))
        self.tokens = {k: ray.get(v) for k, v in tokens.items()}
        self.spec = spec

    def ready(self) -> str:
        return f"layers {self.spec.start}-{self.spec.stop - 1} on {self.runner.device}"

    def forward(self, slices: dict[int, LayerSlice], inp: Any, which: str, batch: int) -> Any:
        tokens = self.tokens[which]
        return self.runner.forward(slices, tokens if self.spec.first else inp, tokens, batch)

    def calibrate(self, inp: Any, batch: int, damp: float) -> Any:
        return self.runner.calibrate(self.tokens["calibration"] if self.spec.first else inp, batch, damp)

    def scores(self) -> dict[int, LayerScores]:
        return self.runner.scores

    def dense_forward(self, inp: Any) -> Any:
        """The original model's hidden state leaving this shard (on the calibration windows)."""
        full = LayerSlice.full(self.runner.geometry)
        src = self.tokens["calibration"] if self.spec.first else inp
        return self.runner.forward({i: full for i in self.spec.layers}, src)

    def reform(self, slices: dict[int, LayerSlice], dense: Any, stream: Any, params: ReformParams, batch: int) -> tuple:
        src = self.tokens["calibration"] if self.spec.first else dense
        return reform_shard(self.runner, slices, src, stream, params, batch)

    def set_means(self, means: dict[int, tuple[Any, Any]]) -> None:
        self.runner.means = {i: m for i, m in means.items() if i in self.spec.layers}

    def set_reformed(self, reformed: dict[int, tuple[LayerSlice, dict[str, torch.Tensor]]]) -> None:
        device = self.runner.device
        for i, (s, w) in reformed.items():
            if i in self.spec.layers:
                self.runner.reformed[i] = (s, {k: v.to(device, self.runner.dtype) for k, v in w.items()})


@dataclass
class Placement:
    num_cpus: float
    num_gpus: float
    threads: int

    @classmethod
    def plan(cls, cfg: RayConfig, actors: int) -> "Placement":
        res = ray.cluster_resources()
        gpus, cpus = res.get("GPU", 0.0), res.get("CPU", 1.0)
        if cfg.device == "cuda" and gpus < 1:
            raise ClusterError("ray.device=cuda but the Ray cluster lists no GPUs; use ray.device=auto or cpu")
        if cfg.device != "cpu" and gpus >= 1:
            return cls(1, min(1.0, gpus / actors), 1)
        # Never ask for GPUs a cluster does not list, nor more CPUs than it has: such actors never start.
        per = cpus / actors if actors > cpus else float(int(cpus // actors))
        return cls(per, 0, max(1, int(per)))


class EvaluatorPool:
    """Replicas x stages of StageActors sharing one copy of the weights per shard."""

    def __init__(self, model: torch.nn.Module, adapter: ModelAdapter, cfg: RayConfig, dtype: str, tokens: dict[str, torch.Tensor]) -> None:
        g = adapter.geometry()
        self.specs = split_layers(g.num_layers, cfg.stages)
        self.cfg = cfg
        state = model.state_dict()
        # Held for the pool's life: a restarted actor re-reads its constructor arguments from the store.
        self.shard_refs = shard_refs = [ray.put(share(state, shard_state_names(adapter, s))) for s in self.specs]
        self.token_refs = token_refs = {k: ray.put(v) for k, v in tokens.items()}
        place = Placement.plan(cfg, cfg.replicas * cfg.stages)
        self.placement = place
        actor_cls = ray.remote(StageActor)
        run_id = uuid.uuid4().hex[:6]
        self.replicas: list[list[Any]] = []
        for r in range(cfg.replicas):
            chain = []
            for spec, ref in zip(self.specs, shard_refs):
                chain.append(
                    actor_cls.options(
                        name=f"searchllm-{run_id}-replica{r}-layers{spec.start}-{spec.stop - 1}",
                        num_cpus=place.num_cpus,
                        num_gpus=place.num_gpus,
                        max_restarts=cfg.max_restarts,
                        max_task_retries=-1 if cfg.max_restarts else 0,
                    ).remote(model.config, ref, spec, dtype, place.threads, token_refs)
                )
            self.replicas.append(chain)
        for r, chain in enumerate(self.replicas):
            log.info("replica %d: %s", r, "; ".join(ray.get([a.ready.remote() for a in chain])))
        self.alive = list(range(len(self.replicas)))

    def shutdown(self) -> None:
        for chain in self.replicas:
            for actor in chain:
                ray.kill(actor, no_restart=True)
        self.replicas, self.alive = [], []

    def __enter__(self) -> "EvaluatorPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _submit(self, replica: int, slices: list[LayerSlice], which: str, batch: int) -> ray.ObjectRef:
        out = None
        for spec, actor in zip(self.specs, self.replicas[replica]):
            part = {i: slices[i] for i in spec.layers}
            out = actor.forward.remote(part, out, which, batch)
        return out

    def stream(self, space: SearchSpace, cands: list[Candidate], which: str = "fitness", batch: int = 1) -> Iterator[tuple[int, NLL, int]]:
        queue = deque(range(len(cands)))
        inflight: dict[ray.ObjectRef, tuple[int, int]] = {}
        failures: dict[int, int] = {}
        load = {r: 0 for r in self.alive}
        while queue or inflight:
            for r in list(self.alive):
                while queue and load[r] < self.cfg.in_flight:
                    i = queue.popleft()
                    inflight[self._submit(r, space.slices(cands[i]), which, batch)] = (i, r)
                    load[r] += 1
            if not inflight:
                raise ClusterError("every evaluator replica has died; nothing left to evaluate on")
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            i, r = inflight.pop(ref)
            load[r] -= 1
            try:
                yield i, ray.get(ref), r
            except ray.exceptions.RayActorError:
                # The replica is gone for good (restarts spent): re-queue its work on the others.
                log.warning("replica %d died; re-queuing candidate %d and continuing with %d replicas", r, i, len(self.alive) - 1)
                if r in self.alive:
                    self.alive.remove(r)
                queue.appendleft(i)
            except ray.exceptions.RayTaskError as e:
                failures[i] = failures.get(i, 0) + 1
                if failures[i] < 2:
                    queue.appendleft(i)
                else:
                    log.warning("candidate %d failed twice (%s); recorded as failed", i, str(e).splitlines()[0][:200])
                    yield i, NLL(float("inf"), 1), r

    def original_state(self) -> dict[str, torch.Tensor]:
        """The original weights from the object store (zero-copy on this node)."""
        state: dict[str, torch.Tensor] = {}
        for ref in self.shard_refs:
            state |= unshare(ray.get(ref))
        return state

    def reform(self, slices: list[LayerSlice], params: ReformParams, batch: int) -> list[LayerResult]:
        """Layer-wise reformation on replica 0's stage actors; the reformed weights then reach every replica.

        Sequential inputs chain the stages (each hands on the original and the reformed hidden states).
        Independent inputs hand on only the original hidden state, computed first by a dense pass, so
        every stage solves its layers while the next one already works on its own."""
        dense = stream = None
        pending = []
        for spec, actor in zip(self.specs, self.replicas[0]):
            part = {i: slices[i] for i in spec.layers}
            if params.inputs == "independent":
                nxt = None if spec.last else actor.dense_forward.remote(dense)
                _, _, res = actor.reform.options(num_returns=3).remote(part, dense, None, params, batch)
                dense = nxt
            else:
                dense, stream, res = actor.reform.options(num_returns=3).remote(part, dense, stream, params, batch)
            pending.append(res)
        results = [r for ref in pending for r in ray.get(ref)]
        self.set_overrides(slices, {r.layer: r.weights for r in results}, replicas=self.replicas[1:])
        return results

    def set_compensation(self, scores: Scores) -> None:
        """From now on every candidate runs with FLAP's bias compensation from these calibration means."""
        means = {i: (scores.mean_o[i], scores.mean_down[i]) for i in range(len(scores.mean_o))}
        ray.get([a.set_means.remote(means) for chain in self.replicas for a in chain])

    def set_overrides(self, slices: list[LayerSlice], weights: dict[int, dict[str, torch.Tensor]], replicas=None) -> None:
        """Replace tensors of the given layers' sliced blocks (reformed o/down, FLAP's biases) on every
        replica; they apply while a candidate keeps exactly these slices."""
        entries = {i: (slices[i], w) for i, w in weights.items()}
        ray.get([a.set_reformed.remote(entries) for chain in (self.replicas if replicas is None else replicas) for a in chain])

    def calibrate(self, batch: int, damp: float) -> Scores:
        """Dense calibration pass through replica 0, returning the scores of every layer."""
        out = None
        for actor in self.replicas[0]:
            out = actor.calibrate.remote(out, batch, damp)
        ray.wait([out])
        per_layer: dict[int, LayerScores] = {}
        for actor in self.replicas[0]:
            per_layer.update(ray.get(actor.scores.remote()))
        return Scores.stack(per_layer)


class RayEvaluator:
    """The search's Evaluator protocol over a pool."""

    def __init__(self, pool: EvaluatorPool, space: SearchSpace, batch: int) -> None:
        self.pool, self.space, self.batch = pool, space, batch

    def evaluate(self, cands: list[Candidate]) -> Iterator[tuple[int, NLL, int]]:
        return self.pool.stream(self.space, cands, "fitness", self.batch)
