"""`python -m searchllm.driver [--config FILE] [key=value ...]`: search a smaller subnet of an LLM on Ray.

The driver reads the config, opens the run dir, plans (everything checked before any weights load), loads
the model, starts the evaluator pool (searchllm.cluster: the only code that imports Ray) and runs the
method's stages in order (searchllm.stages). Bad input stops with one line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

from searchllm import interrupt
from searchllm.cluster.layout import ClusterError
from searchllm.config import (
    RESUMABLE_PREFIXES,
    Config,
    ConfigError,
    check_resume_overrides,
    differing_keys,
    load_config,
    to_yaml,
)
from searchllm.data import DataError
from searchllm.evaluate.llamacpp import LlamaCppMissing
from searchllm.export.formats import ExportDirError
from searchllm.export.gguf import GGUFError
from searchllm.export.vllm import VLLMError
from searchllm.files import RunFileError
from searchllm.models.adapters import UnsupportedModelError
from searchllm.models.loading import ModelError
from searchllm.monitor import Monitor, ProgressServer
from searchllm.pruning.levels import LevelError
from searchllm.pruning.space import BudgetError
from searchllm.quant.types import QuantError
from searchllm.rundir import RunDir
from searchllm.stages import stages_for
from searchllm.stages.context import Plan, RunContext
from searchllm.stages.plan import float32_cut, load_model, plan

log = logging.getLogger("searchllm")
USER_ERRORS = (
    ConfigError,
    DataError,
    ModelError,
    UnsupportedModelError,
    BudgetError,
    ClusterError,
    LevelError,
    GGUFError,
    VLLMError,
    LlamaCppMissing,
    RunFileError,
    ExportDirError,
    QuantError,
)


def cpu_float32_cut(cfg: Config) -> Config:
    """levels.float32_share on this machine: a Ray started or attached here (no ray.address / $RAY_ADDRESS)
    on a CPU without native bfloat16."""
    import torch

    from searchllm.pruning.shard import bf16_native

    local = not (cfg.ray.address or os.environ.get("RAY_ADDRESS")) and not torch.cuda.is_available()
    cut = float32_cut(cfg, bf16_native(torch.device("cpu")), local)
    if cut:
        log.info("this CPU scores candidates in float32: %s (levels.float32_share)", cut)
    return cfg


def resolve_config(argv: list[str]) -> tuple[Config, RunDir]:
    cfg = load_config(argv)
    if cfg.resume in (None, "", "auto"):  # a resume=RUN reads the config the run was cut to
        cfg = cpu_float32_cut(cfg)
    if cfg.resume == "auto":
        if not cfg.run_dir:
            raise ConfigError("resume=auto needs run_dir=<a fixed path> (the run to continue, or to start there)")
        run = RunDir(cfg.run_dir)
        if not run.started:
            cfg.resume = None
            return cfg, run
        diff = differing_keys(load_config([], base_file=run.path / "config.yaml"), cfg)
        if diff:
            k, old, new = diff[0]
            raise ConfigError(
                f"resume=auto: run_dir={cfg.run_dir!r} was started with {k}={old!r}, this command asks for {new!r}; "
                "use the same settings or another run_dir"
            )
        log.info("resume=auto: continuing the run in %s", run.path)
        cfg.resume = str(run.path)
        return cfg, run
    if cfg.resume:
        run = RunDir(cfg.resume)
        if not run.started:
            raise ConfigError(
                f"resume={cfg.resume!r} is not a searchllm run directory (no config.yaml); give the run dir of a "
                "started search"
            )
        check_resume_overrides(argv)
        saved = run.path / "config.yaml"
        # The run's own config decides what is computed; the command line may only change execution.
        cfg = load_config([a for a in argv if not a.startswith("resume=")], base_file=saved)
        cfg.resume, cfg.run_dir = str(run.path), str(run.path)
        return cfg, run
    path = cfg.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
    if RunDir(path).load_checkpoint() is not None:
        raise ConfigError(
            f"run_dir={path!r} already holds a search; pass resume={path} to continue it or pick a new run_dir"
        )
    cfg.run_dir = path
    return cfg, RunDir(path)


def main(argv: Optional[list[str]] = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    args = sys.argv[1:] if argv is None else argv
    previous, run_dir = interrupt.catch(), None
    try:
        cfg, run_dir = resolve_config(args)
        return run(cfg, run_dir, plan(cfg, run_dir, alongside=lambda: start_ray(cfg, run_dir)))
    except USER_ERRORS as e:
        print(f"searchllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        e = interrupt.received()
        ray_link = sys.modules.get("searchllm.cluster.connect")  # imported (and Ray maybe started) once a run starts
        if ray_link is not None:
            ray_link.disconnect()
        print(f"searchllm: {interrupted(e, run_dir, args)}", file=sys.stderr)
        return e.exit_code
    finally:
        interrupt.release(previous)


def interrupted(e: interrupt.Interrupted, run_dir: Optional[RunDir], args: list[str]) -> str:
    """The one line an interrupted driver ends with: where it stopped, what is kept, how to go on."""
    head = f"interrupted by {e.name} " + ("while starting" if e.stage == "start" else f"during the {e.stage} stage")
    if run_dir is None or not run_dir.started:
        return f"{head}, before anything was saved; run the same command again"
    keep = [a for a in args if "=" in a and a.startswith(RESUMABLE_PREFIXES) and not a.startswith("resume=")]
    cmd = shlex.join(["python", "-m", "searchllm.driver", f"resume={run_dir.path}", *keep])
    return f"{head}; every finished step is saved in {run_dir.path}; resume with: {cmd}"


def job_name(cfg: Config, run_dir: RunDir) -> str:
    return f"searchllm {cfg.method} {Path(cfg.model.path).name} {cfg.budget.target:g} ({run_dir.path.name})"


def start_ray(cfg: Config, run_dir: RunDir) -> None:
    """Attach to or start Ray (the plan runs it while the corpora are tokenized): before anything is written or
    loaded, so an unreachable cluster fails in seconds."""
    from searchllm.cluster.connect import connect  # Ray is imported only once a run starts

    log.info("%s", connect(cfg.ray, job_name(cfg, run_dir)))
    interrupt.catch()  # again: ray.init replaced the SIGTERM handler with its own (a stack dump)


def run(cfg: Config, run_dir: RunDir, p: Plan) -> int:
    from searchllm.cluster.metrics import RayMetrics
    from searchllm.cluster.pool import EvaluatorPool  # Ray is imported only once a run starts
    from searchllm.cluster.train import RayHealer

    g, budget = p.space.geometry, p.budget
    log.info(
        "model %s: %d layers, %d heads / %d KV heads, MLP %d, %.1fM params; target kept ratio %.3f ± %.3f (%s)",
        cfg.model.path,
        g.num_layers,
        g.num_heads,
        g.num_kv_heads,
        g.intermediate,
        g.total_params / 1e6,
        budget.target,
        budget.tol,
        budget.count,
    )
    levels = p.strategy.kind == "levels"
    if levels:
        lv = cfg.levels
        log.info(
            "levels: attention by query heads (%s), MLP in %d levels; fitness %s; selection on %s tokens keeping %s",
            lv.heads,
            lv.mlp_levels,
            lv.fitness,
            list(lv.tokens),
            list(lv.survivors),
        )
    else:
        s = p.space
        log.info(
            "space: attention=%s, per-group ratio %s, MLP ratio %s, depth %s",
            s.attention,
            s.attn_range,
            s.mlp_range,
            s.depth_range,
        )
    name = job_name(cfg, run_dir)
    run_dir.create()
    with run_dir.locked():  # a second driver on this run dir stops here (before any actor), naming this one
        with interrupt.during("load"), run_dir.timed("load"):
            loaded = load_model(cfg)
        if not run_dir.started:
            run_dir.write_text("config.yaml", to_yaml(cfg))
        monitor = Monitor(
            {
                "model": cfg.model.path,
                "target": cfg.budget.target,
                "method": cfg.method,
                "run_dir": str(run_dir.path),
                "generations": cfg.search.generations,
                "layers": g.num_layers,
                "total_params": g.total_params,
                "attn_units": g.num_heads if levels else int(p.space.full().attn[0].size),
                "mlp_channels": g.intermediate,
                "fitness": {"kl": "KL from dense (nats/token)", "ppl": "perplexity"}[cfg.levels.fitness]
                if levels
                else "perplexity",
            },
            cfg.monitor.log_every,
            cfg.monitor.summary_every,
        )
        m = cfg.monitor
        server = ProgressServer(monitor, m.host, m.port) if m.page else None
        if server is not None:
            log.info("progress page: %s", server.url)
        metrics = RayMetrics(run_dir.path.name) if m.metrics else None
        if metrics is not None:
            monitor.sinks.append(metrics)
        ctx = RunContext(cfg, run_dir, p, loaded, monitor, healer=RayHealer(cfg.heal, cfg.ray, name))
        stages = stages_for(p.strategy.kind, cfg.budget.size is not None)
        try:
            t0 = time.perf_counter()
            with EvaluatorPool(
                loaded.model,
                loaded.adapter,
                cfg.ray,
                cfg.model.dtype,
                p.tokens,
                metrics=metrics,
                score_dtype=cfg.levels.score_dtype if levels else "model",
            ) as pool:
                del loaded.model  # the object store holds the weights now
                run_dir.record_time("pool", time.perf_counter() - t0)  # actors up, weights in the object store
                ctx.pool = pool
                for stage in stages:
                    if stage.pool:
                        with interrupt.during(stage.name), run_dir.timed(stage.name):
                            stage.run(ctx)
            ctx.pool = None  # after the pool is gone: its weights are freed before the evaluation loads models
            for stage in stages:
                if not stage.pool:
                    with interrupt.during(stage.name), run_dir.timed(stage.name):
                        stage.run(ctx)
        finally:
            if server is not None:
                server.close()
            if metrics is not None:
                metrics.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
