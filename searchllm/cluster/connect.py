"""Attach to Ray or start a local one, and what the cluster offers (nodes, GPU memory).

A Ray this process starts for itself runs in a session of its own: a signal sent to the driver's process
group (`kill -- -PGID`, systemd, Slurm's scancel, a supervisor) then reaches the driver alone, which unwinds
(one line, the resume command, the lock released) and shuts its Ray down, instead of losing its GCS and
raylet first and dying inside Ray's C++ client.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
from typing import TYPE_CHECKING, Optional

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from searchllm.cluster.layout import ClusterError, NodeInfo

if TYPE_CHECKING:
    from searchllm.config import RayConfig


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


@contextlib.contextmanager
def _own_session():
    """Ray's processes started meanwhile (GCS, raylet, and through the raylet every worker) get a session of
    their own. They still die with this process: Ray's fate sharing (PR_SET_PDEATHSIG) does not depend on it."""
    from ray._private import services

    popen = getattr(services, "ConsolePopen", None)
    if popen is None or not isinstance(popen, type) or not issubclass(popen, subprocess.Popen):
        yield  # a Ray that spawns differently: the group's signal reaches its processes as before
        return

    class Detached(popen):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("start_new_session", True)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = Detached
    try:
        yield
    finally:
        services.ConsolePopen = popen


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
        runtime_env={"worker_process_setup_hook": "searchllm.cluster.workers.setup"},
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
    with _own_session():
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
