"""What travels between the stages: the run context and the artefacts each stage leaves in it.

A stage is `run(ctx: RunContext) -> None`: it reads the artefacts of the stages before it from `ctx` and
sets its own. Every artefact that is expensive to recompute is also saved in the run dir (rundir.py) as it
is made, so a resume reads it back instead of computing it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import torch

from searchllm.config import Config
from searchllm.models.loading import LoadedModel
from searchllm.monitor import Monitor
from searchllm.pruning.levels import LevelDatabase, LevelSpace
from searchllm.pruning.reform import LayerResult, ReformParams
from searchllm.pruning.scores import Scores
from searchllm.pruning.shard import NLL
from searchllm.pruning.space import Budget, SearchSpace
from searchllm.rundir import RunDir
from searchllm.strategies import Strategy


class Pool(Protocol):
    """The evaluator pool the stages run their forward passes on (built by searchllm.cluster; stages never
    import Ray). Token sets are named: "calibration", "fitness", "report", "final", "levels<k>"."""

    specs: list

    def stream(
        self, space: Any, cands: list, which: str = "fitness", batch: int = 1, metric: str = "nll"
    ) -> Iterator[tuple[int, NLL, int]]: ...

    def calibrate(self, batch: int, damp: float, on_stage: Optional[Callable[[], None]] = None) -> Scores: ...

    def output_factors(self, windows: int, batch: int, seed: int) -> dict[int, torch.Tensor]: ...

    def build_levels(
        self,
        space: Any,
        implied: Any,
        batch: int,
        done: Optional[dict] = None,
        on_layer: Optional[Callable[[Any], None]] = None,
        factors: Optional[dict] = None,
    ) -> list: ...

    def set_levels(self, space: Any, layers: dict[int, Any], cache_bytes: int = 0) -> None: ...

    def set_targets(self, codec: Any, dense: Any, which: str, k: int, batch: int) -> NLL: ...

    def set_compensation(self, scores: Scores) -> None: ...

    def set_overrides(self, slices: list, weights: dict[int, dict[str, torch.Tensor]]) -> None: ...

    def reform(
        self,
        slices: list,
        params: ReformParams,
        batch: int,
        done: Optional[dict] = None,
        on_layer: Optional[Callable[[LayerResult], None]] = None,
    ) -> list[LayerResult]: ...

    def original_state(self) -> dict[str, torch.Tensor]: ...

    def set_tokens(self, tokens: dict[str, torch.Tensor]) -> None: ...

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
    ) -> torch.Tensor: ...


@dataclass
class Plan:
    """What the run will do, decided and checked before any weights load (stages.plan)."""

    space: SearchSpace  # the channel space of the mask search; its geometry is the model's
    budget: Budget
    strategy: Strategy  # search.mode's registered strategy: its kind picks the method's stages
    tokens: dict[str, torch.Tensor]  # token windows by name (data.token_sets)
    where: dict[str, str]  # corpus descriptions by role, for logs, reports and the manifest


@dataclass
class Database:
    """The level database (stages.database): saved under <run>/levels/<settings digest>/."""

    space: LevelSpace
    db: LevelDatabase
    band: tuple[int, int]  # the whole-model parameter counts the budget allows
    record: dict[str, Any]  # the manifest's level_database record


@dataclass
class Searched:
    """The search's choice (stages.search_levels / stages.search_masks): best.json and summary.json."""

    result: Any  # search.loop.SearchResult (best: a Candidate, or a level genome)
    dense_report_ppl: float
    report_ppl: float
    seconds: float
    rows: list[dict[str, Any]]  # the report page's summary rows so far
    overrides: dict[int, dict[str, torch.Tensor]] = field(
        default_factory=dict
    )  # tensors beyond the slices (FLAP's biases)


@dataclass
class Subnet:
    """What the export writes (stages.reform, or the search's choice as it is): the slices of the original
    weights, the tensors that replace sliced ones, and the manifest so far."""

    slices: list
    weights: dict[int, dict[str, torch.Tensor]]
    params: int  # counted by the search (added biases included)
    ppl: dict[str, float]  # report perplexity by stage: original, searched, reformed
    manifest: dict[str, Any]
    chosen_as: Optional[str] = None  # the report page's label for the chosen structure, where it has one
    # budget.size: each weight's llama.cpp type and importance matrix by GGUF name, as the search scored them
    quant: Optional[tuple[dict[str, str], dict[str, Any]]] = None


@dataclass
class Built:
    """The subnet as a model in memory (stages.export.build_subnet): what the heal stage trains and the
    export writes."""

    model: torch.nn.Module
    info: Any  # export.hf.ExportInfo


@dataclass
class Candidate:
    """One of the search's final parents built for the training-aware choice (heal.candidates)."""

    label: str
    genome: Any
    fitness: float  # the search's
    built: Built
    slices: list
    weights: dict[int, dict[str, torch.Tensor]]
    params: int


class Healer(Protocol):
    """Runs a heal (healing.distill.HealJob) to the end and returns its record (searchllm.cluster.train on
    Ray Train; healing.distill.train in-process)."""

    def __call__(self, job: Any) -> dict: ...


@dataclass
class RunContext:
    cfg: Config
    run: RunDir
    plan: Plan
    loaded: LoadedModel
    monitor: Monitor
    pool: Optional[Pool] = None  # set while the stages that need it run
    scores: Optional[Scores] = None
    database: Optional[Database] = None
    searched: Optional[Searched] = None
    subnet: Optional[Subnet] = None
    built: Optional[Built] = None
    candidates: list[Candidate] = field(default_factory=list)  # the search's best first (heal.candidates > 1)
    healer: Optional[Healer] = None  # set by the driver: how the heal stage trains
    generated: Optional[torch.Tensor] = None  # the sequences the generate stage sampled (None: none)
    heal_generated: Optional[torch.Tensor] = None  # the heal's own sampled text, heal.seqlen each (None: none)
    export_dir: Optional[Path] = None

    @property
    def batch(self) -> int:
        return self.cfg.data.batch

    def need_pool(self) -> Pool:
        assert self.pool is not None, "this stage runs on the evaluator pool"
        return self.pool
