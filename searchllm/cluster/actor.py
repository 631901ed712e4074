"""One shard of one evaluator replica: the Ray actor around a `ShardRunner`."""

from __future__ import annotations

import os
import time
from typing import Any, Iterator, Optional

import ray
import torch

from searchllm.cluster.workers import fetch
from searchllm.models.adapters import Architecture
from searchllm.models.sliced import LayerSlice
from searchllm.pruning.prefix import PrefixCache
from searchllm.pruning.reform import ReformParams, iter_reform
from searchllm.pruning.scores import LayerScores
from searchllm.pruning.shard import ShardRunner, ShardSpec, bf16_native, resolve_score_dtype
from searchllm.streams import resolve_streams


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
        streams: int = 1,
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
        self.runner.streams = self.scorer.streams = resolve_streams(streams, device)
        self.tokens = {k: fetch(store, f"tokens.{k}") for k in token_names}
        self.spec, self.arch, self.store = spec, arch, store
        self.sampler = self.runner  # what decode_begin chose to sample the batch with
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
            "streams": self.runner.streams,
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
                if self.scorer.prefix is not None:
                    self.scorer.prefix.batch = None  # its views are found again
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
        if runner.prefix is not None and runner.prefix.batch != batch:
            runner.prefix.set_views(self.tokens, batch)
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

    def decode_begin(self, rows: int, max_len: int, seed: int, indices: list[int], dtype: str = "model") -> None:
        """A batch to sample in `dtype` (model | auto | float32 | bfloat16, as levels.score_dtype): on the
        model's weights or the scorer's where either has it, else on a copy made for it and kept."""
        want = resolve_score_dtype(dtype, self.runner.dtype, bf16_native(self.runner.device))
        if self.sampler.dtype != want:
            held = [r for r in (self.runner, self.scorer) if r.dtype == want]
            state = None if held else fetch(self.store, f"shard{self.spec.start}")
            self.sampler = held[0] if held else ShardRunner(self.arch, state, self.spec, self.runner.device, want)
        self.sampler.decode_begin(rows, max_len, seed, indices)

    def decode_step(self, inp: Any, start: int, temperature: float, top_p: float) -> Any:
        return self.sampler.decode_step(inp, start, temperature, top_p)

    def decode_rest(self, inp: Any, start: int, stop: int, temperature: float, top_p: float) -> Any:
        return self.sampler.decode_rest(inp, start, stop, temperature, top_p)

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
