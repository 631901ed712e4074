"""Watching a run: the progress page (live, in headless Chromium), metrics in Ray's Prometheus export,
the static report, the Grafana dashboard, and the analysis notebook executed on a fresh run."""

import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from searchllm.monitor import Monitor, ProgressServer, pareto_front, render

from conftest import make_tiny_checkpoint, tiny_run_args
from helpers import evaluator_pool

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium)"
)


def browse(url: str, screenshot: Path) -> str:
    """The page's DOM after its scripts ran, and a screenshot of it."""
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1400,1300",
        "--virtual-time-budget=6000",
    ]
    subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    if os.environ.get("SEARCHLLM_SCREENSHOTS"):  # to look at them
        shutil.copy(screenshot, Path(os.environ["SEARCHLLM_SCREENSHOTS"]) / screenshot.name)
    return dom


def marks(dom: str, chart: str) -> int:
    return int(re.search(rf'id="{chart}" data-marks="(\d+)"', dom).group(1))


# -- the monitor alone ---------------------------------------------------------------------------------


def monitor_with(points):
    m = Monitor(
        {
            "model": "m",
            "target": 0.7,
            "method": "searchllm",
            "generations": 2,
            "attn_units": 4,
            "mlp_channels": 8,
        }
    )
    for i, (params, fit) in enumerate(points):
        m.on_result(
            {
                "key": f"k{i}",
                "generation": 0,
                "params": params,
                "ratio": params / 100,
                "origin": "mutation",
                "fitness": fit,
            }
        )
    return m


def test_the_pareto_front_keeps_candidates_no_other_beats_on_size_and_fitness():
    assert pareto_front([(70, 30.0), (60, 40.0), (65, 45.0), (80, 20.0), (80, 25.0)]) == [1, 0, 3]


def test_the_state_is_json_a_browser_can_parse_even_with_failed_candidates():
    m = monitor_with([(70, 30.0), (60, float("inf"))])
    m.on_generation({"generation": 0, "best": 30.0, "median": float("nan")}, {"active": [1]})
    state = json.loads(m.snapshot())  # strict: NaN/inf would not parse in a browser
    assert state["candidates"][1]["fitness"] is None and state["generations"][0]["median"] is None
    assert state["front"] == ["k0"]


def test_the_page_serves_the_state_and_follows_new_results():
    m = monitor_with([(70, 30.0)])
    server = ProgressServer(m, "127.0.0.1", 0)
    try:
        assert server.url.startswith("http://127.0.0.1:")
        page = urllib.request.urlopen(server.url, timeout=5).read().decode()
        assert '<svg id="pareto"' in page and "const STATIC = null" in page  # live: it polls state.json
        first = json.loads(urllib.request.urlopen(server.url + "state.json", timeout=5).read())
        m.on_result({"key": "k9", "generation": 1, "params": 60, "ratio": 0.6, "origin": "crossover", "fitness": 25.0})
        second = json.loads(urllib.request.urlopen(server.url + "state.json", timeout=5).read())
    finally:
        server.close()
    assert len(first["candidates"]) == 1 and len(second["candidates"]) == 2 and second["front"] == ["k9"]


def test_a_static_report_embeds_its_state():
    html = render(monitor_with([(70, 30.0)]).snapshot())
    state = json.loads(re.search(r"const STATIC = (\{.*?\});\n", html).group(1))
    assert state["candidates"][0]["key"] == "k0"


def heal_records(steps: int, start: int = 0):
    out = [{"step": 0, "tokens": 0, "held_out_kl": 0.5, "seconds": 0.0}] if start == 0 else []
    for k in range(max(start, 1), steps + 1):
        out.append({"step": k, "steps": steps, "tokens": 64 * k, "loss": 1 / k, "lr": 1e-4, "seconds": 2.0 * k})
    return out


def test_a_resumed_heal_replaces_the_steps_after_its_checkpoint_on_the_page():
    m = monitor_with([(70, 30.0)])
    for rec in heal_records(6) + heal_records(8, start=4):  # killed after 6, resumed from the checkpoint at 4
        m.on_heal(rec)
    heal = json.loads(m.snapshot())["heal"]
    assert [r["step"] for r in heal["curve"]] == list(range(9))
    assert heal["step"] == 8 and heal["tokens_per_s"] == pytest.approx(32.0) and heal["eta_s"] == 0


@needs_browser
def test_the_report_draws_the_heal_curve(tmp_path):
    m = monitor_with([(70, 30.0)])
    for rec in heal_records(5):
        m.on_heal(rec)
    page = tmp_path / "report.html"
    page.write_text(render(m.snapshot()))
    dom = browse(page.as_uri(), tmp_path / "heal.png")
    assert marks(dom, "heal") == 5 + 1  # the loss of 5 steps and the held-out KL before training
    assert "32 tokens/s" in dom


def test_the_grafana_dashboard_plots_only_metrics_the_driver_exports():
    dash = json.loads((ROOT / "cluster" / "grafana-searchllm.json").read_text())
    exported = {
        f"ray_searchllm_{n}"
        for n in (
            "generation",
            "best_fitness",
            "median_fitness",
            "evaluations_per_second",
            "candidates_in_flight",
            "reform_layer",
            "reform_layers",
            "heal_loss",
            "heal_held_out_kl",
            "heal_tokens_per_second",
            "heal_eta_seconds",
        )
    }
    exported |= {"ray_searchllm_evaluations_total", "ray_searchllm_actor_busy_seconds_total"}
    source = "".join((ROOT / "searchllm" / "cluster" / f).read_text() for f in ("metrics.py", "actor.py"))
    for name in exported:  # each is defined in the code (counters get _total in the export)
        assert (
            f'"{name.removeprefix("ray_").removesuffix("_total")}' in source
            or f'"{name.removeprefix("ray_searchllm_").removesuffix("_total")}"' in source
        )
    used = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"ray_searchllm_\w+", t["expr"])}
    assert used and used <= exported and len(used) >= 7


# -- a real run, watched ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def watched(ray_cluster, tmp_path_factory):
    """A short driver run whose search pauses after its second generation while the live page is
    loaded in headless Chromium; then it runs to the end (report, export, evaluation)."""
    import searchllm.monitor as monitor_module
    from searchllm.driver import main

    root = tmp_path_factory.mktemp("watched")
    path, corpus = make_tiny_checkpoint(root)
    run = root / "run"
    reached, proceed, urls = threading.Event(), threading.Event(), []
    original_generation, original_server = monitor_module.Monitor.on_generation, monitor_module.ProgressServer.__init__

    def on_generation(self, stats, best):
        original_generation(self, stats, best)
        if stats["generation"] == 1:
            reached.set()
            proceed.wait(180)

    def server_init(self, *args, **kwargs):
        original_server(self, *args, **kwargs)
        urls.append(self.url)

    monitor_module.Monitor.on_generation, monitor_module.ProgressServer.__init__ = on_generation, server_init
    result = {}
    driver = threading.Thread(
        target=lambda: result.setdefault(
            "rc", main(tiny_run_args(path, corpus, run, "search.generations=4", "monitor.port=0"))
        )
    )
    driver.start()
    try:
        assert reached.wait(180), "the search never reached its second generation"
        live = {}
        if CHROMIUM:
            live["dom"] = browse(urls[0], root / "progress-page.png")
            live["png"] = root / "progress-page.png"
        live["state"] = json.loads(urllib.request.urlopen(urls[0] + "state.json", timeout=10).read())
    finally:
        proceed.set()
        driver.join(300)
        monitor_module.Monitor.on_generation, monitor_module.ProgressServer.__init__ = (
            original_generation,
            original_server,
        )
    assert result.get("rc") == 0
    return run, live


@needs_browser
@pytest.mark.browser
def test_the_live_progress_page_shows_populated_plots_in_a_headless_browser(watched):
    run, live = watched
    dom = live["dom"]
    assert "stage: searching" in dom and "generation 2 of 4" in dom and "| live" in dom
    assert marks(dom, "convergence") == 4  # best and median of 2 generations
    assert marks(dom, "pareto") > 8  # every candidate so far, plus the front
    assert marks(dom, "structure") == 8  # attention and MLP bars of 4 layers
    assert live["png"].stat().st_size > 20_000


def test_the_page_state_during_the_run_holds_the_first_generations(watched):
    _, live = watched
    state = live["state"]
    assert state["stage"] == "searching" and len(state["generations"]) == 2
    assert len(state["candidates"]) == 16 and state["front"] and len(state["best"]["mlp_channels"]) == 4


@needs_browser
@pytest.mark.browser
def test_the_report_is_written_with_all_plots_and_the_evaluation_table(watched, tmp_path):
    run, _ = watched
    dom = browse((run / "report.html").as_uri(), tmp_path / "report.png")
    assert "stage: done" in dom and "static report" in dom and "generation 4 of 4" in dom
    assert marks(dom, "convergence") == 8 and marks(dom, "pareto") > 30 and marks(dom, "structure") == 8
    assert "exported (searchllm)" in dom and "tokens_per_s" in dom and "weights_mib" in dom  # the evaluation table
    assert "finalist 4 of 4 (flap)" in dom  # reformation progress, finished


def test_the_notebook_executes_on_a_fresh_run(watched, monkeypatch):
    import nbclient
    import nbformat

    run, _ = watched
    monkeypatch.setenv("SEARCHLLM_RUNS", str(run))
    nb = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3  # convergence, Pareto front, structure
    evaluations = json.loads((run / "summary.json").read_text())["evaluations"]
    assert any(f"{evaluations} evaluations, 0 failed" in o.get("text", "") for o in outputs)


def test_run_metrics_stay_in_rays_prometheus_export_between_updates(ray_cluster, llama, adapter, tokens):
    from searchllm.cluster.metrics import RayMetrics
    from searchllm.pruning.space import SearchSpace

    metrics = RayMetrics("metrics-test")
    metrics("generation", {"generation": 2, "best": 12.5, "median": 20.0, "evals_per_s": 3.0})
    metrics("result", {})
    metrics("reform", {"done": 3, "layers": 4})
    updated = time.time()
    try:
        with evaluator_pool(llama, adapter, tokens, metrics=metrics) as pool:
            space = SearchSpace(adapter.geometry())
            list(pool.stream(space, [space.full()] * 3))
            port = ray_cluster.nodes()[0]["MetricsExportPort"]
            # This run's series (other tests' runs export theirs too), each with its run tag, read when
            # Ray's agent has dropped gauge values not re-reported since they were set (after 20-30 s).
            wanted = [
                rf'{name}\{{[^}}]*run="metrics-test"[^}}]*\}} ([0-9.e+]+)'
                for name in (
                    "ray_searchllm_best_fitness",
                    "ray_searchllm_generation",
                    "ray_searchllm_evaluations_total",
                    "ray_searchllm_reform_layer",
                    "ray_searchllm_candidates_in_flight",
                )
            ]
            wanted.append(
                r"ray_searchllm_actor_busy_seconds_total\{[^}]*"
                r'actor="searchllm-\w+-replica0-layers0-2"[^}]*\} ([0-9.e+]+)'
            )
            time.sleep(max(0.0, updated + 35 - time.time()))
            deadline, text = time.time() + 60, ""
            while time.time() < deadline and not all(re.search(w, text) for w in wanted):
                time.sleep(2)
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        metrics.close()
    found = [re.search(w, text) for w in wanted]
    assert all(found), [w for w, f in zip(wanted, found) if not f]
    values = [float(f.group(1)) for f in found]
    assert values[:4] == [12.5, 3, 1, 3] and values[5] > 0  # best, generation, evaluations, reform layer; busy seconds


def test_a_log_bar_logs_while_a_single_step_blocks_and_once_at_the_end(caplog):
    import time

    from searchllm.monitor import LogBar

    with caplog.at_level("INFO", logger="searchllm"):
        with LogBar(3, "level database", "layer", every=0.05) as bar:
            time.sleep(0.3)  # one long step: the timer thread still reports
            bar.update(1)
            time.sleep(0.06)
        lines = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("level database: 0/3 layer") for m in lines) >= 3
    assert lines[-1].startswith("level database: 1/3 layer") and "ETA" in lines[-1]
