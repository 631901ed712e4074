"""The evaluator pool: place evaluator stage actors, stream fitness back (attaching to Ray: `connect`).

An evaluator replica is a chain of `StageActor`s, each holding a contiguous shard of layers (a `ShardRunner`);
activations travel stage to stage as ObjectRefs. Each
replica's stages sit in one placement group, packed on one node when they fit there, and replicas are
spread over nodes (`plan_layout`). Weights are put in the object store once per shard as read-only numpy
arrays: Ray copies an object to a node once, and every actor there maps it zero-copy. The driver keeps
`in_flight` candidates queued on every replica and consumes results with ray.wait as each finishes.

Faults: actors restart (`ray.max_restarts`) and Ray re-runs their queued tasks; what the driver told
them after they started (compensation means, reformed weights) travels as a versioned object with every
call, so a restarted actor catches up before it evaluates. A replica whose restarts are spent is dropped
and its candidates go to the others. A candidate whose evaluation raises is retried once, then reported
with its error.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import ray
import torch
from ray.util import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from searchllm.cluster.actor import StageActor
from searchllm.cluster.connect import cluster_nodes, probe_gpu_memory
from searchllm.cluster.layout import ClusterError, choose_layout
from searchllm.cluster.metrics import RayMetrics
from searchllm.cluster.workers import WeightStore
from searchllm.models.adapters import ModelAdapter
from searchllm.models.sliced import LayerSlice
from searchllm.models.weights import share, unshare
from searchllm.pruning.reform import LayerResult, ReformParams
from searchllm.pruning.scores import LayerScores, Scores
from searchllm.pruning.shard import (
    NLL,
    ShardSpec,
    planned_weight_bytes,
    shard_state_names,
    split_layers,
)
from searchllm.pruning.space import Candidate, SearchSpace

if TYPE_CHECKING:  # at run time actors would import every stage's config (pandas, omegaconf) for nothing
    from searchllm.config import RayConfig

log = logging.getLogger("searchllm")


class EvaluatorPool:
    """Replicas x stages of StageActors sharing one copy of the weights per shard and node."""

    def __init__(
        self,
        model: torch.nn.Module,
        adapter: ModelAdapter,
        cfg: RayConfig,
        dtype: str,
        tokens: dict[str, torch.Tensor],
        actor: type = StageActor,
        metrics: Optional[RayMetrics] = None,
        score_dtype: str = "model",
    ) -> None:
        self.metrics = metrics
        g = adapter.geometry()
        state = model.state_dict()
        unique = {t.data_ptr(): t for t in state.values()}.values()  # tied embeddings count once
        model_bytes = planned_weight_bytes(sum(t.numel() for t in unique), getattr(torch, dtype), score_dtype)
        nodes = cluster_nodes()
        gpu_memory = (
            probe_gpu_memory(nodes)
            if cfg.device != "cpu" and any(n.gpus >= 1 for n in nodes) and "auto" in (cfg.stages, cfg.replicas)
            else None
        )
        self.layout = layout = choose_layout(cfg, nodes, model_bytes, g.num_layers, gpu_memory)
        if layout.why:
            log.info("%s", layout.why)
        self.specs = split_layers(g.num_layers, layout.stages)
        self.cfg = cfg
        # Held for the pool's life: a restarted actor re-reads its constructor arguments from the store.
        arch = adapter.architecture()
        t0 = time.perf_counter()
        self.shard_refs = shard_refs = [ray.put(share(state, shard_state_names(arch, s))) for s in self.specs]
        self.token_refs = token_refs = {k: ray.put(v) for k, v in tokens.items()}
        self.put_seconds = time.perf_counter() - t0
        self._extras: dict[str, Any] = {"means": {}, "reformed": {}, "levels": None, "targets": {}, "tokens": {}}
        self._version = (0, [ray.put(self._extras)])
        self.groups = [self._group(r, node) for r, node in enumerate(layout.nodes)]
        actor_cls = ray.remote(actor)
        run_id = uuid.uuid4().hex[:6]
        self.replicas: list[list[Any]] = []
        store = f"searchllm-{run_id}-weights"
        self.store = ray.remote(WeightStore).options(name=store, num_cpus=0).remote()
        puts = [self.store.put.remote(f"shard{spec.start}", [ref]) for spec, ref in zip(self.specs, shard_refs)]
        puts += [self.store.put.remote(f"tokens.{k}", [ref]) for k, ref in token_refs.items()]
        try:
            self._wait_placed()  # while the store's process starts
            ray.get(puts)
            for r, pg in enumerate(self.groups):
                chain = []
                for k, spec in enumerate(self.specs):
                    chain.append(
                        actor_cls.options(
                            name=f"searchllm-{run_id}-replica{r}-layers{spec.start}-{spec.stop - 1}",
                            num_cpus=layout.num_cpus,
                            num_gpus=layout.num_gpus,
                            max_restarts=cfg.max_restarts,
                            max_task_retries=-1 if cfg.max_restarts else 0,
                            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=k),
                        ).remote(arch, store, spec, dtype, layout.threads, list(token_refs), score_dtype, cfg.streams)
                    )
                self.replicas.append(chain)
            self.placed = [ray.get([a.ready.remote() for a in chain]) for chain in self.replicas]
        except BaseException:
            self.shutdown()
            raise
        for r, chain in enumerate(self.placed):
            log.info(
                "replica %d: %s",
                r,
                "; ".join(
                    f"layers {a['layers']} on {a['device']} @ node {a['node'][:8]}, {a['threads']} thread(s) "
                    f"in {a['streams']} stream(s) ({a['load_s']:.2f}s to load)"
                    for a in chain
                ),
            )
        self.alive = list(range(len(self.replicas)))

    def _group(self, replica: int, node: Optional[str]):
        bundle = {"CPU": self.layout.num_cpus} | ({"GPU": self.layout.num_gpus} if self.layout.num_gpus else {})
        n = len(self.specs)
        if node is None:  # no node has room for the whole replica now: Ray packs it as tightly as it can
            return placement_group([bundle] * n, strategy="PACK", name=f"searchllm-replica{replica}")
        return placement_group(
            [bundle] * n,
            strategy="STRICT_PACK",
            name=f"searchllm-replica{replica}",
            bundle_label_selector=[{"ray.io/node-id": node}] * n,
        )

    def _wait_placed(self) -> None:
        try:
            ray.get([pg.ready() for pg in self.groups], timeout=self.cfg.placement_timeout)
        except ray.exceptions.GetTimeoutError:
            lay = self.layout
            raise ClusterError(
                f"could not place {lay.replicas} replica(s) x {lay.stages} stage(s) of {lay.num_cpus:g} CPU / "
                f"{lay.num_gpus:g} GPU each "
                f"within ray.placement_timeout={self.cfg.placement_timeout:g}s on a cluster with "
                f"{ray.available_resources()}; "
                "lower ray.replicas / ray.stages (or use auto), or add nodes"
            ) from None

    def shutdown(self) -> None:
        for chain in self.replicas:
            for actor in chain:
                ray.kill(actor, no_restart=True)
        for pg in getattr(self, "groups", []):
            remove_placement_group(pg)
        if getattr(self, "store", None) is not None:
            ray.kill(self.store)
            self.store = None
        self.replicas, self.alive, self.groups = [], [], []

    def __enter__(self) -> "EvaluatorPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def lead(self) -> list[Any]:
        """The first live replica's chain: calibration and reformation run there."""
        if not self.alive:
            raise ClusterError("every evaluator replica has died")
        return self.replicas[self.alive[0]]

    def _publish(self) -> None:
        """Every actor applies the new extras before its next evaluation (a restarted one too)."""
        self._version = (self._version[0] + 1, [ray.put(self._extras)])

    def _submit(self, replica: int, slices: list, which: str, batch: int, metric: str = "nll") -> ray.ObjectRef:
        out = None
        for spec, actor in zip(self.specs, self.replicas[replica]):
            # Level candidates carry the upstream layers' levels too: the key of a shard's prefix cache.
            part = {i: slices[i] for i in range(0 if isinstance(slices[0], tuple) else spec.start, spec.stop)}
            out = actor.forward.remote(part, out, which, batch, self._version, metric)
        return out

    def _drop(self, replica: int, why: str) -> None:
        if replica in self.alive:
            self.alive.remove(replica)
            log.warning(
                "replica %d is gone for good (%s); continuing with %d replica(s)", replica, why, len(self.alive)
            )

    def stream(
        self, space: SearchSpace, cands: list[Candidate], which: str = "fitness", batch: int = 1, metric: str = "nll"
    ) -> Iterator[tuple[int, NLL, int]]:
        """Evaluate candidates on every live replica, yielding (index, NLL, replica) as each finishes;
        `space` turns a candidate into its per-layer slices (a SearchSpace, or levels.GenomeCodec)."""
        queue = deque(range(len(cands)))
        inflight: dict[ray.ObjectRef, tuple[int, int]] = {}
        failures: dict[int, int] = {}
        load = {r: 0 for r in self.alive}
        while queue or inflight:
            for r in list(self.alive):
                while queue and load[r] < self.cfg.in_flight:
                    i = queue.popleft()
                    inflight[self._submit(r, space.slices(cands[i]), which, batch, metric)] = (i, r)
                    load[r] += 1
            if not inflight:
                raise ClusterError("every evaluator replica has died; nothing left to evaluate on")
            if self.metrics is not None:
                self.metrics.set(self.metrics.in_flight, len(inflight))
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            i, r = inflight.pop(ref)
            load[r] -= 1
            try:
                nll = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                # Restarts spent (or none allowed): the replica's work goes to the others.
                self._drop(r, type(e).__name__)
                queue.appendleft(i)
                continue
            except ray.exceptions.RayTaskError as e:
                failures[i] = failures.get(i, 0) + 1
                if failures[i] < 2:
                    log.warning("candidate %d raised on replica %d (%s); retrying once", i, r, _first_line(e))
                    queue.appendleft(i)
                    continue
                log.warning("candidate %d failed twice; recorded as failed: %s", i, _first_line(e))
                nll = NLL(math.inf, 1, error=_first_line(e))
            yield i, nll, r

    def original_state(self) -> dict[str, torch.Tensor]:
        """The original weights from the object store (zero-copy on this node)."""
        state: dict[str, torch.Tensor] = {}
        for ref in self.shard_refs:
            state |= unshare(ray.get(ref))
        return state

    def reform(
        self,
        slices: list[LayerSlice],
        params: ReformParams,
        batch: int,
        done: Optional[dict[int, dict[str, torch.Tensor]]] = None,
        on_layer: Optional[Callable[[LayerResult], None]] = None,
    ) -> list[LayerResult]:
        """Layer-wise reformation on the lead replica's stage actors; the reformed weights (with those in
        `done`, solved before and not solved again) then reach every replica. `on_layer` sees each
        layer's result as soon as it is solved (the driver saves it: a resume starts after it).

        Sequential inputs chain the stages (each hands on the original and the reformed hidden states).
        Independent inputs hand on only the original hidden state, computed first by a dense pass, so
        every stage solves its layers while the next one already works on its own."""
        done = done or {}
        dense = stream = None
        gens, results = [], []
        for spec, actor in zip(self.specs, self.lead):
            part = {i: slices[i] for i in spec.layers}
            mine = {i: w for i, w in done.items() if i in spec.layers}
            call = actor.reform.options(num_returns="streaming")
            if params.inputs == "independent":
                nxt = None if spec.last else actor.dense_forward.remote(dense, self._version)
                gens.append((spec, call.remote(part, dense, None, params, batch, mine, self._version)))
                dense = nxt
            else:
                gen = call.remote(part, dense, stream, params, batch, mine, self._version)
                dense, stream = _collect(spec, gen, results, on_layer)
        for spec, gen in gens:  # independent stages all run at once; read them in order
            _collect(spec, gen, results, on_layer)
        self.set_overrides(slices, done | {r.layer: r.weights for r in results})
        return results

    def output_factors(self, windows: int, batch: int, seed: int) -> dict[int, torch.Tensor]:
        """Every layer's MLP output factor (ShardRunner.output_factors) on the first `windows` calibration
        windows: the dense stream forward through the lead replica's stages, then the gradient back."""
        streams = [None]
        for actor in self.lead[:-1]:
            streams.append(actor.dense_forward.remote(streams[-1], self._version, windows))
        grad, parts = None, []
        for actor, stream in zip(reversed(self.lead), reversed(streams)):
            grad, part = actor.output_factors.options(num_returns=2).remote(
                stream, grad, windows, batch, seed, self._version
            )
            parts.append(part)
        return {i: f for part in ray.get(parts) for i, f in part.items()}

    def build_levels(
        self,
        space: Any,
        implied: Any,
        batch: int,
        done: Optional[dict] = None,
        on_layer: Optional[Callable[[Any], None]] = None,
        factors: Optional[dict] = None,
    ) -> list[Any]:
        """Build the level database on the lead replica's stages, in order (each stage's calibration stream
        feeds the next: error accumulation), OBS weighed by `factors` where given; `on_layer` sees each
        layer's entries as they arrive (the driver saves them: a resume builds only the layers left)."""
        done, factors = done or {}, factors or {}
        stream, results = None, []
        for spec, actor in zip(self.specs, self.lead):
            mine = {i: e for i, e in done.items() if i in spec.layers}
            their = {i: f for i, f in factors.items() if i in spec.layers}
            gen = actor.build_levels.options(num_returns="streaming").remote(
                stream, space, implied, batch, mine, their, self._version
            )
            (stream,) = _collect(spec, gen, results, on_layer, 1)
        return results

    def set_tokens(self, tokens: dict[str, torch.Tensor]) -> None:
        """Replace token sets on every actor (a restarted actor picks them up before its next call)."""
        self._extras["tokens"] = dict(self._extras["tokens"]) | {k: ray.put(v) for k, v in tokens.items()}
        self._publish()

    def generate(
        self,
        prompt: list[int],
        count: int,
        seqlen: int,
        seed: int,
        temperature: float,
        top_p: float,
        batch: int,
        on_batch: Optional[Callable[[int], None]] = None,
        first: int = 0,
        dtype: str = "model",
    ) -> torch.Tensor:
        """`count` sequences of `seqlen` tokens sampled from the dense model, each starting with `prompt`:
        fixed batches of `batch` sequences (a KV cache each), one batch at a time on every live replica, all
        replicas at once; a sequence is the same whichever replica samples it. `on_batch(rows)` sees each
        finished batch. A batch whose replica fails starts again elsewhere. `first`: the index of the first
        sequence (each is seeded by its index: more of the same text continues where an earlier call ended).
        `dtype`: of the sampling forward (model | auto | float32 | bfloat16)."""
        out = torch.zeros(count, seqlen, dtype=torch.long)
        out[:, : len(prompt)] = torch.tensor(prompt)
        queue = deque(range(-(-count // batch)))
        running: dict[ray.ObjectRef, tuple[int, int, int]] = {}  # step -> (replica, batch, position it samples)
        failures: dict[int, int] = {}

        def step(r: int, b: int, inp: torch.Tensor, start: int) -> ray.ObjectRef:
            if len(self.replicas[r]) == 1:  # a whole model samples the rest of the batch in one call
                return self.replicas[r][0].decode_rest.remote(inp, start, seqlen, temperature, top_p)
            ref = inp
            for actor in self.replicas[r]:
                ref = actor.decode_step.remote(ref, start, temperature, top_p)
            return ref

        def begin(r: int) -> None:
            if not queue:
                return
            b = queue.popleft()
            rows = list(range(b * batch, min(count, (b + 1) * batch)))
            for actor in self.replicas[r]:  # an actor runs its calls in order: no wait for this one
                actor.decode_begin.remote(len(rows), seqlen, seed, [first + i for i in rows], dtype)
            running[step(r, b, out[rows, : len(prompt)], 0)] = (r, b, len(prompt))

        for r in list(self.alive):
            begin(r)
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            r, b, pos = running.pop(ref)
            rows = list(range(b * batch, min(count, (b + 1) * batch)))
            try:
                tok = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                failures[b] = failures.get(b, 0) + 1
                if isinstance(e, ray.exceptions.RayActorError) and not self.cfg.max_restarts:
                    self._drop(r, type(e).__name__)
                if failures[b] > 2 or not self.alive:
                    raise ClusterError(f"sampling batch {b} failed {failures[b]} times: {_first_line(e)}") from None
                log.warning("sampling batch %d failed on replica %d (%s); starting it again", b, r, _first_line(e))
                queue.appendleft(b)
                for idle in set(self.alive) - {v[0] for v in running.values()}:
                    begin(idle)
                continue
            tok = tok.reshape(len(rows), -1)  # one position per step, or all the rest
            out[rows, pos : pos + tok.shape[1]] = tok
            if pos + tok.shape[1] < seqlen:
                running[step(r, b, tok[:, -1:], pos)] = (r, b, pos + 1)
                continue
            if on_batch is not None:
                on_batch(len(rows))
            begin(r)
        return out

    def set_levels(self, space: Any, layers: dict[int, Any], cache_bytes: int = 0) -> None:
        """Hand every actor its shard's database entries (one object per shard in the object store), and a
        prefix cache of `cache_bytes` per actor for the candidates assembled from them."""
        refs = {spec.start: ray.put({i: layers[i] for i in spec.layers}) for spec in self.specs}
        self._extras["levels"] = (space, refs, cache_bytes)
        self._publish()

    def set_targets(self, codec: Any, dense: Any, which: str, k: int, batch: int) -> NLL:
        """Cache the dense model's top-k next-token distributions on token set `which` as every replica's
        KL targets (computed once on the lead replica, then published); returns the dense NLL there."""
        self.lead  # raises when no replica is left
        nll, targets = ray.get(self._submit(self.alive[0], codec.slices(dense), which, batch, f"targets:{k}"))
        self._extras["targets"] = dict(self._extras["targets"]) | {which: ray.put((which, targets))}
        self._publish()
        return nll

    def view_targets(self, which: str, parent: str, rows: list[int]) -> None:
        """Token set `which`'s KL targets cut from `parent`'s, whose windows `rows` it holds (the same numbers
        set_targets would compute: window_views)."""
        _, (logp, idx) = ray.get(self._extras["targets"][parent])
        self._extras["targets"] = dict(self._extras["targets"]) | {which: ray.put((which, (logp[rows], idx[rows])))}
        self._publish()

    def set_compensation(self, scores: Scores) -> None:
        """From now on every candidate runs with FLAP's bias compensation from these calibration means."""
        self._extras["means"] = {i: (scores.mean_o[i], scores.mean_down[i]) for i in range(len(scores.mean_o))}
        self._publish()

    def set_overrides(self, slices: list[LayerSlice], weights: dict[int, dict[str, torch.Tensor]]) -> None:
        """Replace tensors of the given layers' sliced blocks (reformed o/down) on every replica; they
        apply while a candidate keeps exactly these slices."""
        self._extras["reformed"] = {i: (slices[i], w) for i, w in weights.items()}
        self._publish()

    def calibrate(self, batch: int, damp: float, on_stage: Optional[Callable[[], None]] = None) -> Scores:
        """Dense calibration pass through the lead replica, returning the scores of every layer;
        `on_stage` is called as each stage's scores arrive."""
        out, parts = None, []
        for actor in self.lead:
            out, part = actor.calibrate.options(num_returns=2).remote(out, batch, damp, self._version)
            parts.append(part)
        per_layer: dict[int, LayerScores] = {}
        for part in parts:  # stages finish in order
            per_layer.update(ray.get(part))
            if on_stage is not None:
                on_stage()
        return Scores.stack(per_layer)


def _collect(spec: ShardSpec, gen, results: list, on_layer, tail: int = 2) -> tuple[Any, ...]:
    """Read a stage's per-layer stream (reformation results, level database entries): each layer's item
    (handed to on_layer as it comes), then the refs of the `tail` hidden states it hands on."""
    refs = iter(gen)
    for _ in spec.layers:
        res = ray.get(next(refs))
        if res is not None:
            results.append(res)
            if on_layer is not None:
                on_layer(res)
    return tuple(next(refs) for _ in range(tail))


def _first_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e
    return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"[:300]
