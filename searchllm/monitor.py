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
import sys
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


class LogBar:
    """tqdm's interface where no terminal shows a bar (output to a file, `ray job logs`): a line with the
    stage, done/total, rate and ETA every `every` seconds from a timer thread, so a long step (one evaluation,
    one layer) still shows the run is alive; and one when it closes."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, every: float = 60.0) -> None:
        self.total, self.desc, self.unit, self.n, self.start = total, desc, unit, initial, initial
        self.t0, self.postfix = time.monotonic(), ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, args=(every,), daemon=True, name="searchllm-progress-log")
        self._thread.start()

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            self.line()

    def line(self) -> None:
        elapsed = time.monotonic() - self.t0
        rate = (self.n - self.start) / elapsed if elapsed > 0 else 0.0
        eta = f"ETA {fmt_seconds((self.total - self.n) / rate)}" if rate > 0 else "ETA unknown"
        log.info(
            "%s: %d/%d %s, %.3g %s/s, %s elapsed, %s%s",
            self.desc,
            self.n,
            self.total,
            self.unit,
            rate,
            self.unit,
            fmt_seconds(elapsed),
            eta,
            f" ({self.postfix})" if self.postfix else "",
        )

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in kw.items())

    def close(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            if time.monotonic() - self.t0 >= 1.0:  # a step of a second or more: say it finished
                self.line()

    def __enter__(self) -> "LogBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Monitor:
    def __init__(self, run: dict[str, Any], log_every: float = 60.0, summary_every: int = 50) -> None:
        self.log_every, self.summary_every = log_every, summary_every
        self._evaluated, self._best = 0, math.inf
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

    def bar(self, total: int, desc: str, unit: str, initial: int = 0) -> Any:
        """A progress bar on a terminal (tqdm); elsewhere a LogBar's timed lines."""
        if sys.stderr.isatty():
            from tqdm import tqdm

            return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, mininterval=1)
        return LogBar(total, desc, unit, initial, self.log_every)

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
            self._evaluated += 1
            self._best = min(self._best, rec["fitness"])
            n, best = self._evaluated, self._best
        log.debug(
            "evaluated %s (generation %s, replica %s, %.2fs): fitness %.5g, kept ratio %.4f",
            rec["key"],
            rec["generation"],
            rec.get("replica", "?"),
            rec.get("seconds", math.nan),
            rec["fitness"],
            rec["ratio"],
        )
        if n % self.summary_every == 0:
            log.info("search: %d candidates evaluated, best fitness so far %.5g", n, best)
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
