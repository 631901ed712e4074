"""What every Ray worker of a run may load first: the setup hook and the weight store. Light (no torch):
Ray imports this module in each worker process, the store's included, and a torch import costs seconds."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray


def setup() -> None:
    """Ray's worker_process_setup_hook (connect): quiets Ray Train's controller and workers, which log every
    report and, without a dashboard, a warning every few seconds that its state API is unavailable; and points
    the state API at the worker's own Ray."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    # Ray's state API, which Ray Train's placement-group cleaner polls, finds its cluster by RAY_ADDRESS or by
    # looking for GCS processes on the machine: with a second Ray there (a notebook's, a test suite's) it
    # raises, and the cleaner's thread dies with a traceback in the driver's output.
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


class WeightStore:
    """Holds the pool's ObjectRefs (weights per shard, token sets) for the pool's life, under a name.

    Evaluator actors look it up by name and fetch their refs from it, so their constructor arguments are
    plain values: an actor restarted after its first references went out of scope still finds its weights
    (ray#53727; Ray logs an error for every restartable actor whose constructor arguments are ObjectRefs)."""

    def __init__(self) -> None:
        self.refs: dict[str, list] = {}

    def put(self, key: str, refs: list) -> None:  # refs in a list: the store keeps the refs, not their values
        self.refs[key] = refs

    def get(self, key: str) -> list:
        return self.refs[key]


def fetch(store: str, key: str) -> Any:
    (ref,) = ray.get(ray.get_actor(store).get.remote(key))
    return ray.get(ref)
