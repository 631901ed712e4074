"""The Ray layer: attach to or start Ray, place evaluator stage actors, stream fitness back.

This is the only module that imports ray. An evaluator replica is a chain of `StageActor`s, each holding a
contiguous shard of layers (a `ShardRunner`); activations travel stage to stage as ObjectRefs. Each
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
import os
import socket
import threading
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import ray
import torch
from ray.util import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from searchllm.cluster.layout import ClusterError, NodeInfo, choose_layout
from searchllm.cluster.workers import WeightStore, fetch
from searchllm.models.adapters import Architecture, ModelAdapter
from searchllm.models.sliced import LayerSlice
from searchllm.models.weights import share, unshare
from searchllm.pruning.reform import LayerResult, ReformParams, iter_reform
from searchllm.pruning.scores import LayerScores, Scores
from searchllm.pruning.shard import (
    NLL,
    PrefixCache,
    ShardRunner,
    ShardSpec,
    bf16_native,
    planned_weight_bytes,
    resolve_score_dtype,
    shard_state_names,
    split_layers,
)
from searchllm.pruning.space import Candidate, SearchSpace

if TYPE_CHECKING:  # at run time actors would import every stage's config (pandas, omegaconf) for nothing
    from searchllm.config import RayConfig

log = logging.getLogger("searchllm")


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after Ray's minute of retries, when nothing listens at host:port."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host or hostport, int(port) if port.isdigit() else 6379), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address!r} ({type(e).__name__}: {e}); check RAY_ADDRESS / ray.address "
            "(the head's GCS address, e.g. 10.0.0.1:6379) or unset it to run on a local Ray"
        ) from None


def _started_cluster() -> Optional[str]:
    """The address of the cluster `ray start` runs on this machine (what ray.init() without an address
    attaches to), if any. Not address="auto", which also takes a Ray another process started for itself with
    ray.init() (a notebook's, a test suite's, another driver's): a run there queues behind that one's work."""
    from ray._private.services import find_bootstrap_address

    return find_bootstrap_address(None)


_OWN_RAY: list[bool] = []  # non-empty while this process runs a Ray it started itself


def disconnect() -> None:
    """Shut down the Ray this process started (a cluster it attached to goes on)."""
    if _OWN_RAY and ray.is_initialized():
        ray.shutdown()
    _OWN_RAY.clear()


def connect(cfg: RayConfig, name: str = "searchllm") -> str:
    """Attach to $RAY_ADDRESS / ray.address, else to the cluster `ray start` runs here, else start a local Ray.
    `name` labels the driver's job (its metadata on the dashboard's Jobs page)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return "Ray already initialised in this process"
    quiet = dict(
        logging_level=logging.WARNING,
        log_to_driver=True,
        job_config=ray.job_config.JobConfig(metadata={"name": name}),
        runtime_env={"worker_process_setup_hook": "searchllm.cluster.workers.quiet"},
    )
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, **quiet)
        except Exception as e:
            raise ClusterError(
                f"cannot attach to the Ray cluster at {address!r} ({type(e).__name__}); check RAY_ADDRESS / "
                "ray.address "
                "or unset it to run on a local Ray"
            ) from None
        return f"attached to Ray at {address}"
    started = _started_cluster()
    if started:
        try:
            ray.init(address=started, **quiet)
            return f"attached to the local Ray cluster that `ray start` runs ({started})"
        except ConnectionError:
            pass  # the address file outlived its cluster
    # Our own throwaway cluster: no token auth left behind (it would lock later `ray start --head` users
    # out of their dashboard), no dashboard processes (~1 GB RSS on a laptop-sized machine).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, **quiet)
    _OWN_RAY.append(True)
    return f"started a local Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"


def cluster_nodes() -> list[NodeInfo]:
    return [
        NodeInfo(
            n["NodeID"],
            n["Resources"].get("CPU", 0.0),
            n["Resources"].get("GPU", 0.0),
            n["Resources"].get("memory", 0.0),
        )
        for n in ray.nodes()
        if n["Alive"] and n["Resources"].get("CPU", 0.0) > 0
    ]


def _device_memory() -> Optional[int]:
    return torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else None


def probe_gpu_memory(nodes: list[NodeInfo]) -> Optional[float]:
    """The smallest GPU's memory on the GPU nodes, measured by a one-GPU task on each (None when Ray's
    GPUs are not visible to torch, e.g. declared with --num-gpus on a machine without CUDA)."""
    probe = ray.remote(num_gpus=1, num_cpus=0)(_device_memory)
    got = ray.get(
        [
            probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False)).remote()
            for n in nodes
            if n.gpus >= 1
        ]
    )
    got = [m for m in got if m]
    return float(min(got)) if got else None


class RayMetrics:
    """The run's progress as Ray metrics (Prometheus export of every node: `ray_searchllm_*`), tagged
    with the run; subscribed to the driver's Monitor events. Actors add their busy time themselves.

    Ray (2.60) drops a gauge value from its export 20-30 s after it was set unless it is set again, and a
    generation or a finalist's reformation takes longer than that; so the last value of every gauge is
    re-set from a background thread until `close`."""

    def __init__(self, run: str) -> None:
        from ray.util.metrics import Counter, Gauge

        def gauge(name: str, doc: str) -> Gauge:
            g = Gauge(f"searchllm_{name}", doc, tag_keys=("run",))
            g.set_default_tags({"run": run})
            return g

        self.generation = gauge("generation", "generations finished")
        self.best = gauge("best_fitness", "best fitness (perplexity) so far")
        self.median = gauge("median_fitness", "median fitness of the last generation")
        self.rate = gauge("evaluations_per_second", "evaluations per second in the last generation")
        self.in_flight = gauge("candidates_in_flight", "candidate evaluations queued on the replicas")
        self.reform_layer = gauge("reform_layer", "layers of the current finalist reformed so far")
        self.reform_layers = gauge("reform_layers", "layers the current finalist has to reform")
        self.heal_step = gauge("heal_step", "heal steps done")
        self.heal_loss = gauge("heal_loss", "distillation loss (nats/token) of the last heal step")
        self.heal_kl = gauge("heal_held_out_kl", "KL from the original on the held-out heal windows")
        self.heal_rate = gauge("heal_tokens_per_second", "heal tokens per second since the heal started")
        self.heal_eta = gauge("heal_eta_seconds", "seconds the heal has left, at its rate so far")
        self.evaluations = Counter("searchllm_evaluations", "candidate evaluations finished", tag_keys=("run",))
        self.evaluations.set_default_tags({"run": run})
        self._last: dict[Any, float] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        # Half an export interval: every export the emitter makes then carries a fresh value.
        self.refresh_s = max(ray._config.metrics_report_interval_ms(), 1000) / 2000
        self._thread = threading.Thread(target=self._refresh, name="searchllm-metrics", daemon=True)
        self._thread.start()

    def set(self, gauge: Any, value: float) -> None:
        with self._lock:
            self._last[gauge] = value
        gauge.set(value)

    def _refresh(self) -> None:
        while not self._closed.wait(self.refresh_s):
            with self._lock:
                held = list(self._last.items())
            for gauge, value in held:
                gauge.set(value)

    def close(self) -> None:
        self._closed.set()
        self._thread.join()

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        if event == "result":
            self.evaluations.inc()
        elif event == "generation":
            self.set(self.generation, data["generation"] + 1)
            for gauge, key in ((self.best, "best"), (self.median, "median"), (self.rate, "evals_per_s")):
                if math.isfinite(data.get(key, math.inf)):
                    self.set(gauge, data[key])
        elif event == "reform":
            self.set(self.reform_layer, data["done"])
            self.set(self.reform_layers, data["layers"])
        elif event == "heal":
            if "loss" in data:
                self.set(self.heal_step, data["step"])
                self.set(self.heal_loss, data["loss"])
                self.set(self.heal_rate, data["tokens_per_s"])
                self.set(self.heal_eta, data["eta_s"])
            if "held_out_kl" in data:
                self.set(self.heal_kl, data["held_out_kl"])


# -- actors --------------------------------------------------------------------------------------------


class StageActor:
    """One shard of one evaluator replica."""

    def __init__(
        self,
        arch: Architecture,
        store: str,
        spec: ShardSpec,
        dtype: str,
        threads: int,
        token_names: list[str],
        score_dtype: str = "model",
    ) -> None:
        t0 = time.perf_counter()
        torch.set_num_threads(threads)
        state = fetch(store, f"shard{spec.start}")
        device = "cuda" if torch.cuda.is_available() else "cpu"  # from torch, not from Ray's GPU ids
        model_dtype = getattr(torch, dtype)
        self.runner = ShardRunner(arch, state, spec, device, model_dtype)
        # Candidates are scored by `scorer` (levels.score_dtype); a second copy of the weights only where it differs.
        scored = resolve_score_dtype(score_dtype, model_dtype, bf16_native(self.runner.device))
        self.scorer = self.runner if scored == model_dtype else ShardRunner(arch, state, spec, device, scored)
        self.tokens = {k: fetch(store, f"tokens.{k}") for k in token_names}
        self.spec = spec
        self.version = 0  # of the driver-set extras this actor has applied
        self._levels_ref = None  # the level database it holds
        self._target_refs: dict[str, str] = {}  # and the KL targets, by token set
        self._token_refs: dict[str, str] = {}  # and the token sets replaced since it started
        self.busy = None  # its metric, made on first use
        self.load_seconds = time.perf_counter() - t0

    def ready(self) -> dict[str, Any]:
        return {
            "layers": f"{self.spec.start}-{self.spec.stop - 1}",
            "device": str(self.runner.device),
            "node": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "load_s": self.load_seconds,
            "threads": torch.get_num_threads(),
        }

    def _sync(self, extras: tuple[int, list]) -> None:
        version, (ref,) = extras
        if version == self.version:
            return
        state = ray.get(ref)
        layers = self.spec.layers
        for runner in {id(r): r for r in (self.runner, self.scorer)}.values():
            runner.means = {i: m for i, m in state["means"].items() if i in layers}
            runner.reformed = {
                i: (s, {k: v.to(runner.device, runner.dtype) for k, v in w.items()})
                for i, (s, w) in state["reformed"].items()
                if i in layers
            }
        if state["levels"] is not None and state["levels"][1][self.spec.start].hex() != self._levels_ref:
            space, refs, cache_bytes = state["levels"]  # this shard's database entries, fetched once
            self._levels_ref = refs[self.spec.start].hex()
            self.runner.level_space, self.runner.levels = space, ray.get(refs[self.spec.start])
            self.scorer.level_space, self.scorer.levels = space, self.runner.levels
            self.scorer.prefix = PrefixCache(cache_bytes) if cache_bytes else None
        for name, ref in state["tokens"].items():  # token sets replaced after the pool started (generate stage)
            if self._token_refs.get(name) != ref.hex():
                self.tokens[name], self._token_refs[name] = ray.get(ref), ref.hex()
        if self.spec.last:  # KL targets: only the token sets not fetched before
            held = self.scorer.targets
            self.scorer.targets = {
                w: held[w] for w, ref in state["targets"].items() if self._target_refs.get(w) == ref.hex()
            }
            new = [w for w in state["targets"] if w not in self.scorer.targets]
            for w, t in ray.get([state["targets"][w] for w in new]):
                self.scorer.targets[w] = (t[0].to(self.scorer.device), t[1].to(self.scorer.device))
            self._target_refs = {w: ref.hex() for w, ref in state["targets"].items()}
        self.version = version

    def forward(
        self, slices: dict[int, Any], inp: Any, which: str, batch: int, extras: tuple[int, list], metric: str = "nll"
    ) -> Any:
        t0 = time.perf_counter()
        self._sync(extras)
        tokens = self.tokens[which]
        runner = self.runner if which == "report" else self.scorer  # the report is exact (model.dtype)
        out = runner.forward(slices, tokens if self.spec.first else inp, tokens, batch, metric, which)
        self._busy(time.perf_counter() - t0)
        return out

    def build_levels(
        self, inp: Any, space: Any, implied: Any, batch: int, done: dict, factors: dict, extras: tuple[int, list]
    ) -> Iterator[Any]:
        """A streaming generator: one item per layer of the shard (its LayerLevels, or None when it was
        in `done`), then the calibration stream leaving the shard."""
        from searchllm.pruning.levels import iter_build

        self._sync(extras)

        src = self.tokens["calibration"] if self.spec.first else inp
        out = yield from iter_build(self.runner, space, implied, src, batch, done, factors)
        yield out

    def output_factors(
        self, inp: Any, grad_out: Any, windows: int, batch: int, seed: int, extras: tuple[int, list]
    ) -> tuple[Any, dict]:
        """The shard's MLP output factors on the first `windows` calibration windows (inp: the dense stream
        entering the shard), and the gradient of its input for the shard before it."""
        self._sync(extras)
        src = self.tokens["calibration"][:windows] if self.spec.first else inp
        return self.runner.output_factors(src, grad_out, batch, seed)

    def decode_begin(self, rows: int, max_len: int, seed: int, indices: list[int]) -> None:
        self.runner.decode_begin(rows, max_len, seed, indices)

    def decode_step(self, inp: Any, start: int, temperature: float, top_p: float) -> Any:
        return self.runner.decode_step(inp, start, temperature, top_p)

    def _busy(self, seconds: float) -> None:
        if self.busy is None:
            from ray.util.metrics import Counter

            self.busy = Counter(
                "searchllm_actor_busy_seconds", "seconds an evaluator actor spent evaluating", tag_keys=("actor",)
            )
            self.busy.set_default_tags({"actor": ray.get_runtime_context().get_actor_name() or "unnamed"})
        self.busy.inc(seconds)

    def calibrate(
        self, inp: Any, batch: int, damp: float, extras: tuple[int, list]
    ) -> tuple[Any, dict[int, LayerScores]]:
        self._sync(extras)
        out = self.runner.calibrate(self.tokens["calibration"] if self.spec.first else inp, batch, damp)
        return out, self.runner.scores

    def dense_forward(self, inp: Any, extras: tuple[int, list], windows: Optional[int] = None) -> Any:
        """The original model's hidden state leaving this shard (on the calibration windows, or the first `windows`)."""
        self._sync(extras)
        full = LayerSlice.full(self.runner.geometry)
        src = self.tokens["calibration"][:windows] if self.spec.first else inp
        return self.runner.forward({i: full for i in self.spec.layers}, src)

    def reform(
        self,
        slices: dict[int, LayerSlice],
        dense: Any,
        stream: Any,
        params: ReformParams,
        batch: int,
        done: dict[int, dict[str, torch.Tensor]],
        extras: tuple[int, list],
    ) -> Iterator[Any]:
        """A streaming generator: one item per layer of the shard (its LayerResult, or None), then the
        original and the reformed hidden states leaving the shard."""
        self._sync(extras)
        src = self.tokens["calibration"] if self.spec.first else dense
        out = yield from iter_reform(self.runner, slices, src, stream, params, batch, done)
        yield out[0]
        yield out[1]


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
                        ).remote(arch, store, spec, dtype, layout.threads, list(token_refs), score_dtype)
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
                    f"({a['load_s']:.2f}s to load)"
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
    ) -> torch.Tensor:
        """`count` sequences of `seqlen` tokens sampled from the dense model, each starting with `prompt`:
        fixed batches of `batch` sequences (a KV cache each), one batch at a time on every live replica, all
        replicas at once; a sequence is the same whichever replica samples it. `on_batch(rows)` sees each
        finished batch. A batch whose replica fails starts again elsewhere."""
        out = torch.zeros(count, seqlen, dtype=torch.long)
        out[:, : len(prompt)] = torch.tensor(prompt)
        queue = deque(range(-(-count // batch)))
        running: dict[ray.ObjectRef, tuple[int, int, int]] = {}  # step -> (replica, batch, position it samples)
        failures: dict[int, int] = {}

        def step(r: int, b: int, inp: torch.Tensor, start: int) -> ray.ObjectRef:
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
                actor.decode_begin.remote(len(rows), seqlen, seed, rows)
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
            out[rows, pos] = tok
            if pos + 1 < seqlen:
                running[step(r, b, tok[:, None], pos)] = (r, b, pos + 1)
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
