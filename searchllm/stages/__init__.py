"""The pipeline as stages. A method is an ordered list of stages; the driver runs them in order, the
ones marked `pool` while the evaluator pool is up, the rest after it is gone.

    plan -> load -> generate -> [calibrate | database] -> search -> reform -> build -> heal -> export -> evaluate
    -> report
    (a byte budget: generate -> database -> search over levels and tensor types -> build -> ... -> report)

plan and load run before the pool exists (the driver calls them: stages.plan); which list runs after is
decided by the kind of search.mode's registered strategy (strategies.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from searchllm.stages import (
    calibrate,
    database,
    evaluate,
    export,
    generate,
    heal,
    reform,
    report,
    search_joint,
    search_levels,
    search_masks,
)
from searchllm.stages.context import RunContext


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[RunContext], None]
    pool: bool  # runs on the evaluator pool (it is shut down before the first stage without)


_TAIL = (
    Stage("build", export.build_subnet, True),  # the export in memory, from the pool's original weights
    Stage("heal", heal.run, False),  # on Ray Train workers: the pool's resources are free by then
    Stage("export", export.run, False),
    Stage("evaluate", evaluate.run, False),
    Stage("report", report.run, False),
)
METHODS: dict[str, tuple[Stage, ...]] = {
    # the level search: the compensated level database, then a search over level assignments
    "levels": (
        Stage("generate", generate.run, True),
        Stage("database", database.run, True),
        Stage("search", search_levels.run, True),
        Stage("reform", reform.levels, True),
        *_TAIL,
    ),
    # the paper's channel-mask search, random search, and the baselines chosen outright
    "search": (
        Stage("generate", generate.run, True),
        Stage("calibrate", calibrate.run, True),
        Stage("search", search_masks.run, True),
        Stage("reform", reform.finalists, True),
        *_TAIL,
    ),
}
METHODS["baseline"] = METHODS["search"]
# the level search under a byte budget (budget.size): levels and each weight's llama.cpp type searched together
METHODS["joint"] = (
    Stage("generate", generate.run, True),
    Stage("database", database.run, True),
    Stage("search", search_joint.run, True),
    *_TAIL,
)


def stages_for(kind: str, size: bool = False) -> tuple[Stage, ...]:
    """The stages of a strategy kind (strategies.KINDS); `size`: a byte budget (the levels kind only)."""
    return METHODS["joint" if size and kind == "levels" else kind]
