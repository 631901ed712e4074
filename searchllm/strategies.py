"""The registry of search strategies: what `search.mode` names. Knows nothing of Ray.

A strategy is one of three kinds, each with one small interface, and registers itself in its own module:

  levels    searches level assignments over the level database (levelsearch.LevelSearch); the driver
            builds the database, the strategy gets (space, database, params, evaluator, run dir, seed).
  search    a generational search over SearchSpace candidates: make(space, budget, params) returns an
            object with the Search loop's interface (initial / offspring / select: evolution.Evolution).
  baseline  a subnet chosen outright: make(space, scores, budget) returns the Candidate.

Adding a strategy is adding a module that calls `register` (and naming it in BUILTIN, or importing it
before the config is validated); the driver dispatches on the kind, never on the name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

KINDS = ("levels", "search", "baseline")
BUILTIN = ("searchllm.search.levelsearch", "searchllm.search.evolution", "searchllm.search.baselines")


@dataclass(frozen=True)
class Strategy:
    name: str
    kind: str
    make: Callable[..., Any]
    summary: str
    compensates: bool = False  # judged (and exported) with FLAP's bias compensation, which it budgets itself


_REGISTRY: dict[str, Strategy] = {}


def register(
    name: str, kind: str, summary: str, compensates: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: `make` becomes the strategy `name` of `kind`."""
    if kind not in KINDS:
        raise ValueError(f"strategy kind {kind!r} is not one of {', '.join(KINDS)}")

    def deco(make: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY and _REGISTRY[name].make is not make:
            raise ValueError(f"search strategy {name!r} is registered twice")
        _REGISTRY[name] = Strategy(name, kind, make, summary, compensates)
        return make

    return deco


def _load_builtin() -> None:
    for module in BUILTIN:
        importlib.import_module(module)


def names() -> tuple[str, ...]:
    _load_builtin()
    return tuple(_REGISTRY)


def get(name: str) -> Strategy:
    _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"search.mode={name!r} is not a registered strategy; choose one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]
