"""The run's progress as Ray metrics (Prometheus), fed by the driver's Monitor events."""

from __future__ import annotations

import math
import threading
from typing import Any

import ray


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
