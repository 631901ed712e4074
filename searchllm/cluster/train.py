"""Healing on Ray Train: a TorchTrainer whose workers each run healing.distill.train on their share of every
step's windows (gloo on CPU, NCCL on GPUs; FSDP2 over the workers where heal.fsdp says so). The loop's own
checkpoints in the heal folder make it restartable: Ray Train restarts a failed worker group up to
ray.max_restarts times, and a killed driver's resume starts the trainer again; either way the loop
continues from checkpoint.pt."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

import ray
import ray.train

from searchllm.cluster.connect import cluster_nodes
from searchllm.cluster.layout import ClusterError, uses_gpu
from searchllm.config import HealConfig, RayConfig
from searchllm.healing.distill import CURVE, HealJob

log = logging.getLogger("searchllm")


def _loop(config: dict) -> None:
    import torch
    from ray.train.torch import get_device

    from searchllm.healing.distill import Comm, train

    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    comm = Comm(ctx.get_world_rank(), ctx.get_world_size())
    record = train(HealJob(**config["job"]), comm, get_device())
    ray.train.report({"done": 1, **({"tokens_per_s": record["tokens_per_s"]} if record else {})})


class RayHealer:
    """ctx.healer of a driver run: `heal.workers` Ray Train workers with the run's device choice."""

    def __init__(self, heal: HealConfig, cfg: RayConfig, name: str) -> None:
        self.heal, self.cfg, self.name = heal, cfg, name

    def resources(self) -> tuple[bool, float]:
        nodes = cluster_nodes()
        gpus, cpus = sum(n.gpus for n in nodes), sum(n.cpus for n in nodes)
        use_gpu = uses_gpu(self.cfg, gpus)
        w = self.heal.workers
        if use_gpu and w > gpus:
            raise ClusterError(f"heal.workers={w} wants a GPU each, the cluster lists {gpus:g}; lower heal.workers")
        per = self.heal.cpus_per_worker
        if per == "auto":
            per = 1 if use_gpu else max(1, int(cpus // w))
        if not use_gpu and w * per > cpus:
            raise ClusterError(
                f"heal.workers={w} x heal.cpus_per_worker={per} CPUs > the cluster's {cpus:g}; lower either"
            )
        return use_gpu, float(per)

    def __call__(self, job: HealJob) -> dict:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        use_gpu, cpus = self.resources()
        h = self.heal
        fsdp = h.fsdp == "on" or (h.fsdp == "auto" and use_gpu and h.workers > 1)
        job = replace(job, fsdp=fsdp)
        log.info(
            "heal on Ray Train: %d worker(s), %g CPU(s)%s each%s",
            h.workers,
            cpus,
            " and a GPU" if use_gpu else "",
            ", FSDP" if fsdp else "",
        )
        out = Path(job.out)
        trainer = TorchTrainer(
            _loop,
            train_loop_config={"job": asdict(job), "threads": max(1, int(cpus))},
            scaling_config=ScalingConfig(
                num_workers=h.workers,
                use_gpu=use_gpu,
                resources_per_worker={"CPU": cpus} | ({"GPU": 1} if use_gpu else {}),
            ),
            run_config=RunConfig(
                name=f"heal-{out.name}",
                storage_path=str((out / "ray").resolve()),
                failure_config=FailureConfig(max_failures=self.cfg.max_restarts),
            ),
        )
        # Ray Train's hook for its own SIGINT handler (in the main thread it aborts the run and exits with code
        # 1, so a Ctrl-C would not unwind the driver as in every other stage) keeps the run's controller instead.
        controllers: list = []
        trainer._register_sigint_handler = controllers.append
        try:
            trainer.fit()
        except KeyboardInterrupt:
            # The heal's checkpoint is on disk; ending the controller ends its workers with it, before the
            # driver shuts Ray down under a run still in flight.
            for controller in controllers:
                ray.kill(controller, no_restart=True)
            raise
        except (ray.exceptions.RayError, ray.train.TrainingFailedError) as e:
            raise ClusterError(
                f"the heal's workers failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); its checkpoint "
                f"in {out} is kept: resume the run to continue"
            ) from None
        return json.loads((out / CURVE).read_text())
