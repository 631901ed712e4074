"""How many evaluator replicas and stages, with what resources, on which nodes. Pure: no Ray.

The Ray layer (distributed.py) reads the cluster's nodes and GPU memory, asks `choose_layout`, and places
each replica's stages in one placement group on the node chosen here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # only its attributes are read: this module stays importable without omegaconf
    from searchllm.config import RayConfig

GiB = 2**30
# A stage needs its weights plus activations and workspace: plan with this much room above the weights.
HEADROOM = 1.3


class ClusterError(RuntimeError):
    """The cluster cannot run what was asked (unreachable, too small, no GPUs): a user error."""


@dataclass
class NodeInfo:
    node_id: str
    cpus: float
    gpus: float
    memory: float  # bytes of RAM Ray may use on the node


@dataclass
class Layout:
    replicas: int
    stages: int
    num_cpus: float  # per stage actor
    num_gpus: float
    threads: int
    nodes: list[Optional[str]] = field(default_factory=list)  # per replica: the node it is pinned to, or None
    why: str = ""


def _pin(layout: Layout, nodes: list[NodeInfo]) -> list[Optional[str]]:
    """A node per replica that holds all its stages, spreading replicas over nodes (fewest replicas
    first, then most free CPUs); None where no node has room left (Ray's PACK then decides)."""
    free = {n.node_id: [n.cpus, n.gpus] for n in nodes}
    count = {n.node_id: 0 for n in nodes}
    need_c, need_g = layout.num_cpus * layout.stages, layout.num_gpus * layout.stages
    out: list[Optional[str]] = []
    for _ in range(layout.replicas):
        fits = [i for i, (c, g) in free.items() if c + 1e-9 >= need_c and g + 1e-9 >= need_g]
        if not fits:
            out.append(None)
            continue
        best = min(fits, key=lambda i: (count[i], -free[i][0]))
        free[best][0] -= need_c
        free[best][1] -= need_g
        count[best] += 1
        out.append(best)
    return out


def uses_gpu(cfg: RayConfig, gpus: float) -> bool:
    """ray.device against the GPUs the cluster lists: whether actors (and heal workers) get a GPU."""
    if cfg.device == "cuda" and gpus < 1:
        raise ClusterError("ray.device=cuda but the Ray cluster lists no GPUs; use ray.device=auto or cpu")
    return cfg.device != "cpu" and gpus >= 1


def choose_layout(
    cfg: RayConfig, nodes: list[NodeInfo], model_bytes: int, num_layers: int, gpu_memory: Optional[float] = None
) -> Layout:
    """Replicas x stages and each actor's resources, from the cluster's nodes and the model's size.

    `auto` stages: the fewest shards such that a shard (with HEADROOM) fits one GPU (or, on CPU, one
    node's memory); `auto` replicas: as many as the GPUs allow (all GPUs busy), on CPU one per node with
    all its CPUs (a CPU replica uses intra-op threads; more replicas on a node only split them)."""
    gpus = sum(n.gpus for n in nodes)
    cpus = sum(n.cpus for n in nodes)
    use_gpu = uses_gpu(cfg, gpus)
    per_device = gpu_memory if use_gpu and gpu_memory else min(n.memory for n in nodes) if nodes else float("inf")
    what = (
        f"GPU of {per_device / GiB:.1f} GiB" if use_gpu and gpu_memory else f"node with {per_device / GiB:.1f} GiB RAM"
    )
    why = []
    if cfg.stages == "auto":
        stages = min(num_layers, max(1, math.ceil(model_bytes * HEADROOM / per_device)))
        why.append(f"stages=auto -> {stages}: {model_bytes / GiB:.2f} GiB of weights (x{HEADROOM} room) per {what}")
    else:
        stages = int(cfg.stages)
    if cfg.replicas == "auto":
        if use_gpu:
            replicas = int(gpus // stages)
            if replicas < 1:
                raise ClusterError(
                    f"one replica needs {stages} GPUs ({model_bytes / GiB:.1f} GiB of weights) but the cluster lists "
                    f"{gpus:g}; "
                    "add GPUs, use a smaller model.dtype, or set ray.device=cpu"
                )
            why.append(f"replicas=auto -> {replicas}: {gpus:g} GPUs / {stages} per replica")
        else:
            replicas = max(1, len(nodes) // stages)
            why.append(f"replicas=auto -> {replicas}: {len(nodes)} node(s), no GPU, one replica per {stages} node(s)")
    else:
        replicas = int(cfg.replicas)
    actors = replicas * stages
    if use_gpu:
        # Auto: a whole GPU per stage. Explicit counts may share GPUs (never ask for more than exist).
        num_gpus = 1.0 if cfg.stages == "auto" or cfg.replicas == "auto" else min(1.0, gpus / actors)
        layout = Layout(replicas, stages, 1.0, num_gpus, 1)
    elif cfg.replicas == "auto":
        per = min(n.cpus for n in nodes) if stages == 1 else cpus / actors
        layout = Layout(replicas, stages, per, 0.0, max(1, int(per)))
    else:
        # Never more CPUs than the cluster has: such actors never start.
        per = cpus / actors if actors > cpus else float(int(cpus // actors))
        layout = Layout(replicas, stages, per, 0.0, max(1, int(per)))
    if cfg.threads != "auto":
        layout.threads = int(cfg.threads)
    layout.nodes = _pin(layout, nodes)
    layout.why = "; ".join(why)
    return layout
