"""What a run has shown so far, served live as a progress page and written as a static report. No Ray.

`Monitor` collects the driver's and the search's events (stage, every evaluated candidate, generation
statistics with the current best's per-layer structure, reformation progress, the final evaluation
table) into one JSON-able state. `ProgressServer` serves it on loopback (`/` the page, `/state.json` the
state, polled by the page every 2 s); `write_report` puts the same page with the state embedded into the
run directory, readable without a server. Sinks (Ray metrics, terminal bars) subscribe to the events.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional

log = logging.getLogger("searchllm")
PAGE = Path(__file__).with_name("progress.html")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both kept params (lower) and fitness (lower)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def heal_pace(rec: dict[str, Any]) -> tuple[float, float]:
    """(tokens/s since the heal started, seconds left at that rate) of a heal step's record."""
    return rec["tokens"] / max(rec["seconds"], 1e-9), (rec["steps"] - rec["step"]) * rec["seconds"] / rec["step"]


class Monitor:
    def __init__(self, run: dict[str, Any]) -> None:
        self._lock = threading.Lock()
        self.state: dict[str, Any] = {
            "run": run | {"started": time.strftime("%Y-%m-%d %H:%M:%S")},
            "stage": "starting",
            "generations": [],
            "candidates": [],
            "best": None,
            "best_label": "current best of the search",
            "reform": None,
            "summary": None,
            "eval": [],
            "heal": None,
            "updated": time.time(),
        }
        self.sinks: list[Callable[[str, dict[str, Any]], None]] = []

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        with self._lock:
            self.state["updated"] = time.time()
        for sink in self.sinks:
            sink(event, data)

    def stage(self, name: str) -> None:
        with self._lock:
            self.state["stage"] = name
        self._emit("stage", {"stage": name})

    # -- the search's observer protocol ------------------------------------------------------------
    def on_result(self, rec: dict[str, Any]) -> None:
        point = {k: rec[k] for k in ("key", "generation", "params", "ratio", "origin")}
        point["fitness"] = rec["fitness"] if math.isfinite(rec["fitness"]) else None
        with self._lock:
            self.state["candidates"].append(point)
        self._emit("result", rec)

    def on_generation(self, stats: dict[str, Any], best: dict[str, Any]) -> None:
        with self._lock:
            self.state["generations"].append({k: v for k, v in stats.items() if isinstance(v, (int, float))})
            self.state["best"] = best
        self._emit("generation", stats)

    # -- reformation and after ---------------------------------------------------------------------
    def on_reform(self, finalist: str, index: int, finalists: int, done: int, layers: int) -> None:
        """Finalist `index` of `finalists` (named `finalist`) has `done` of its `layers` reformed."""
        data = {"finalist": finalist, "index": index, "finalists": finalists, "done": done, "layers": layers}
        with self._lock:
            self.state["reform"] = data
        self._emit("reform", data)

    def on_heal(self, rec: dict[str, Any]) -> None:
        """A heal step's record (healing.distill: step, steps, tokens, loss, lr, seconds, held_out_kl)."""
        with self._lock:
            heal = self.state["heal"] or {"curve": []}
            if rec["step"] < len(heal["curve"]):  # a resumed heal goes back to its checkpoint
                heal["curve"] = heal["curve"][: rec["step"]]
            heal["curve"].append({k: v for k, v in rec.items() if isinstance(v, (int, float))})
            pace = {}
            if "loss" in rec:
                pace = dict(zip(("tokens_per_s", "eta_s"), heal_pace(rec)))
                heal |= pace | {"step": rec["step"], "steps": rec["steps"]}
            self.state["heal"] = heal
        self._emit("heal", rec | pace)

    def on_heal_done(self, record: dict[str, Any]) -> None:
        """The finished heal: its curve and the report perplexity before and after."""
        with self._lock:
            self.state["heal"] = {
                "curve": record["curve"],
                "step": record["steps"],
                "steps": record["steps"],
                "tokens_per_s": record["tokens_per_s"],
                "eta_s": 0.0,
                "before": record["report_ppl_before"],
                "after": record["report_ppl_after"],
            }

    def set_best(self, best: dict[str, Any], label: str) -> None:
        """The structure shown as the best from now on (after reformation: the finalist chosen)."""
        with self._lock:
            self.state["best"], self.state["best_label"] = best, label

    def set_summary(self, summary: list[dict[str, Any]]) -> None:
        """Rows of original / searched / reformed / exported: params, kept ratio, report perplexity."""
        with self._lock:
            self.state["summary"] = list(summary)  # a copy: the driver goes on adding rows to its own

    def set_eval(self, rows: list[dict[str, Any]], worst: Optional[dict[int, dict[str, Any]]] = None) -> None:
        """The evaluation's rows, and per window length the held-out domain the export loses most on."""
        with self._lock:
            self.state["eval"] = rows
            self.state["worst_domain"] = {str(n): w for n, w in (worst or {}).items()}

    def snapshot(self) -> str:
        with self._lock:
            state = dict(self.state)
            pts = [(c["params"], c["fitness"]) for c in state["candidates"] if c["fitness"] is not None]
            keys = [c["key"] for c in state["candidates"] if c["fitness"] is not None]
            state["front"] = [keys[i] for i in pareto_front(pts)]
            return json.dumps(_clean(state), allow_nan=False)


def _clean(o: Any) -> Any:
    """JSON a browser can parse: no NaN/inf (-> null), numpy scalars and arrays as plain values."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if hasattr(o, "tolist"):
        return _clean(o.tolist())
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if o is None or isinstance(o, (str, int, bool)):
        return o
    return str(o)


def render(state_json: Optional[str]) -> str:
    """The page: live (polls /state.json) when state_json is None, else static with the state inside."""
    page = PAGE.read_text()
    data = "null" if state_json is None else state_json.replace("</", "<\\/")
    return page.replace("/*STATE*/null", data)


def write_report(monitor: Monitor, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(monitor.snapshot()))
    tmp.replace(path)
    return path


class ProgressServer:
    """The live page on host:port (0 or a busy port: any free one), in a daemon thread."""

    def __init__(self, monitor: Monitor, host: str = "127.0.0.1", port: int = 8266) -> None:
        page = render(None).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.split("?")[0] == "/state.json":
                    body, kind = monitor.snapshot().encode(), "application/json"
                elif self.path.split("?")[0] in ("/", "/index.html"):
                    body, kind = page, "text/html; charset=utf-8"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # keep the driver's output clean
                pass

        try:
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError:
            self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True, name="searchllm-progress").start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
