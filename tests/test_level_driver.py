"""The level search through the driver on Ray: what is scored is what is exported, a resume reuses the
saved database and ends identical, and the result does not depend on how many replicas or stages ran it."""

import json

import pytest

from searchllm.driver import main

from conftest import make_tiny_checkpoint, tiny_run_args
from helpers import CODES, ended_cleanly, signal_driver_at

pytestmark = pytest.mark.ray


def level_args(path, corpus, run, *extra):
    return tiny_run_args(
        path,
        corpus,
        run,
        "search.mode=levels",
        "levels.tokens=[64,128]",
        "levels.survivors=[2]",
        "levels.offspring=6",
        "levels.mlp_levels=8",
        "monitor.page=false",
        *extra,
    )


def outcome(run):
    m = json.loads((run / "manifest.json").read_text())
    return m["search"]["levels"], m["search"]["best_fitness"], m["perplexity"]["exported"]


@pytest.fixture(scope="module")
def two_generations(ray_cluster, checkpoint, tmp_path_factory):
    """A finished two-generation level search on one replica (read, never changed, by the tests below); its
    log (debug level, progress lines every 10 ms, a search summary every 5 evaluations) beside it in log.txt."""
    import logging

    run = tmp_path_factory.mktemp("levels") / "run"
    handler = logging.FileHandler(run.parent / "log.txt")
    logger = logging.getLogger("searchllm")
    level, _ = logger.level, logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        args = level_args(*checkpoint, run, "search.generations=2", "monitor.log_every=0.01")
        assert main([*args, "monitor.summary_every=5"]) == 0
    finally:
        logger.removeHandler(handler), logger.setLevel(level), handler.close()
    return run


def test_the_level_search_exports_exactly_the_subnet_it_scored(two_generations):
    run = two_generations
    m = json.loads((run / "manifest.json").read_text())
    assert m["perplexity"]["exported"] == pytest.approx(m["perplexity"]["searched"], rel=1e-4)
    assert m["export"]["params"] == m["params"]["subnet"]
    assert 0.67 <= m["ratio"]["actual"] <= 0.73
    db = m["level_database"]
    assert (
        db["layers_built"] == 4
        and db["disk_bytes"] > 0
        and len(list((run / "levels").glob("*/layer-*.safetensors"))) == 4
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["history"][-1]["stage0_candidates"] == 6 and summary["history"][-1]["stage1_candidates"] == 2
    assert summary["fitness_kind"] == "kl" and summary["best_fitness"] > 0


def test_a_copied_run_gets_its_export_in_another_format_in_its_own_dir(two_generations, tmp_path):
    import shutil

    from searchllm.export.__main__ import main as export_main

    copy = tmp_path / "copy"
    shutil.copytree(two_generations, copy)
    before = sorted(p.name for p in (two_generations / "export").iterdir())
    assert export_main([str(copy), "export.format=vllm"]) == 0
    m = json.loads((copy / "manifest.json").read_text())
    assert m["export"]["dir"] == str(copy / "export") and m["export"]["vllm"]["dir"] == str(copy / "export" / "vllm")
    assert (copy / "export" / "vllm" / "config.json").is_file()
    assert sorted(p.name for p in (two_generations / "export").iterdir()) == before  # the original's untouched


def test_the_run_dir_records_each_stages_wall_time_and_the_cpu_it_ran_on(two_generations):
    times = json.loads((two_generations / "timings.json").read_text())
    stages = ["load", "pool", "generate", "database", "search", "reform", "build", "export", "evaluate", "report"]
    assert [s for s in times["stages"] if s != "heal"] == stages and all(v >= 0 for v in times["stages"].values())
    assert times["stages"]["search"] > 0 and times["cpu"]["cores"] >= 1 and "native_bf16" in times["cpu"]


@pytest.mark.parametrize("family,model_type", [("qwen3", "qwen3"), ("gemma3", "gemma3_text")])
def test_qwen3_and_gemma3_go_through_the_default_method_end_to_end(ray_cluster, family, model_type, tmp_path):
    """Database, level search, export and evaluation of the two newer families through the driver."""
    path, corpus = make_tiny_checkpoint(tmp_path, family)
    run = tmp_path / "run"
    assert main(level_args(path, corpus, run, "search.generations=1")) == 0
    m = json.loads((run / "manifest.json").read_text())
    assert m["source"]["model_type"] == model_type and m["level_database"]["layers_built"] == 4
    assert m["perplexity"]["exported"] == pytest.approx(m["perplexity"]["searched"], rel=1e-4)
    assert m["export"]["params"] == m["params"]["subnet"] and 0.67 <= m["ratio"]["actual"] <= 0.73


@pytest.mark.parametrize("kind", ["sliding_attention", "full_attention"])
def test_a_gemma3_whose_layers_are_all_of_one_kind_goes_through_the_default_method_end_to_end(
    ray_cluster, kind, tmp_path
):
    """transformers makes only the rotary tables its layer types use; a config of one kind still runs."""
    path, corpus = make_tiny_checkpoint(tmp_path, "gemma3", layer_types=[kind] * 4)
    run = tmp_path / "run"
    assert main(level_args(path, corpus, run, "search.generations=1")) == 0
    m = json.loads((run / "manifest.json").read_text())
    assert m["perplexity"]["exported"] == pytest.approx(m["perplexity"]["searched"], rel=1e-4)


def test_the_manifest_names_the_starting_points_scored_not_the_rungs_the_ladder_skipped(
    ray_cluster, checkpoint, tmp_path
):
    run = (
        tmp_path / "run"
    )  # at 0.5 the tiny model's level 1 scores worse than level 2: level 0 is offered, never scored
    assert main(level_args(*checkpoint, run, "search.generations=1", "budget.target=0.5")) == 0
    evals = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    scored = [
        r["origin"]
        for r in evals
        if r["generation"] == r["stage"] == 0 and r["origin"].startswith("uniform attention level")
    ]
    inits = json.loads((run / "manifest.json").read_text())["search"]["inits"]
    assert inits == scored == ["uniform attention level 2", "uniform attention level 1"]


def test_a_resumed_level_search_reuses_its_database_and_ends_identical(ray_cluster, tiny_checkpoint, tmp_path):
    path, corpus = tiny_checkpoint
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(level_args(path, corpus, straight, "search.generations=3")) == 0
    assert main(level_args(path, corpus, stopped, "search.generations=1")) == 0
    assert main([f"resume={stopped}", "search.generations=3"]) == 0
    assert outcome(stopped) == outcome(straight)
    assert json.loads((stopped / "manifest.json").read_text())["level_database"]["layers_built"] == 0


def test_one_replica_and_two_two_stage_replicas_find_the_same_subnet(two_generations, checkpoint, tmp_path):
    assert (
        main(level_args(*checkpoint, tmp_path / "two", "search.generations=2", "ray.replicas=2", "ray.stages=2")) == 0
    )
    assert outcome(two_generations) == outcome(tmp_path / "two")


def test_bfloat16_scoring_moves_fitness_slightly_and_never_the_report(ray_cluster, tiny_checkpoint, tmp_path):
    path, corpus = tiny_checkpoint
    runs = {d: tmp_path / d for d in ("float32", "bfloat16")}
    for dtype, run in runs.items():
        assert main(level_args(path, corpus, run, "search.generations=1", f"levels.score_dtype={dtype}")) == 0
    evals = {
        d: {e["key"]: e["fitness"] for e in map(json.loads, (r / "evals.jsonl").read_text().splitlines())}
        for d, r in runs.items()
    }
    both = sorted(set(evals["float32"]) & set(evals["bfloat16"]))
    assert len(both) >= 3  # generation 0 starts from the same candidates
    for key in both:
        assert evals["bfloat16"][key] == pytest.approx(evals["float32"][key], rel=0.05, abs=1e-3)
    assert any(evals["bfloat16"][k] != evals["float32"][k] for k in both)  # it did score in bfloat16
    summaries = {d: json.loads((r / "summary.json").read_text()) for d, r in runs.items()}
    assert (
        summaries["bfloat16"]["dense_report_ppl"] == summaries["float32"]["dense_report_ppl"]
    )  # the report runs in model.dtype


def test_sensitivity_probes_run_on_their_own_first_windows(ray_cluster, tiny_checkpoint, tmp_path):
    path, corpus = tiny_checkpoint
    run = tmp_path / "run"
    assert main(level_args(path, corpus, run, "search.generations=1", "levels.probe_tokens=32")) == 0
    evals = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    probes = [e for e in evals if e["origin"] == "probe"]
    assert probes and all(e["tokens"] == 31 for e in probes)  # the first window of 32 (31 next-token predictions)
    assert all(e["tokens"] in (62, 124) for e in evals if e["origin"] != "probe")  # the stages' 64 and 128 tokens


@pytest.mark.parametrize(
    "override, message",
    [
        ("levels.mlp_levels=7", "levels.mlp_levels=7 must divide the MLP width 96"),
        ("levels.survivors=[2,2]", "levels.survivors=[2, 2] must list 1 counts >= 1"),
        ("levels.heads=some", "levels.heads='some' is not allowed; choose one of: equal, free"),
        ("levels.fitness=acc", "levels.fitness='acc' is not allowed; choose one of: kl, ppl"),
        ("levels.fisher_windows=0", "levels.fisher_windows=0 must be >= 1"),
        ("levels.refit=output", "levels.refit='output' is not allowed; choose one of: module, dense, stream"),
        (
            "levels.score_dtype=int8",
            "levels.score_dtype='int8' is not allowed; choose one of: model, auto, float32, bfloat16, float16",
        ),
        ("levels.probe_tokens=1", "levels.probe_tokens=1 0 (the first stage's tokens) or a token count >= 2"),
    ],
)
def test_bad_level_settings_stop_early_with_one_line_naming_the_key(
    tiny_checkpoint, tmp_path, capsys, override, message
):
    path, corpus = tiny_checkpoint
    run = tmp_path / "run"
    assert main([*level_args(path, corpus, run), override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not run.exists()


def test_a_stream_refit_of_a_family_with_output_norms_stops_early_with_one_line(tmp_path, capsys):
    path, corpus = make_tiny_checkpoint(tmp_path, "gemma3")
    run, _ = tmp_path / "run", capsys.readouterr()  # the checkpoint's own save progress
    assert main([*level_args(path, corpus, run), "levels.refit=stream"]) == 2
    err = capsys.readouterr().err
    assert "levels.refit=stream cannot be solved for gemma3_text" in err and "use levels.refit=module" in err
    assert len(err.strip().splitlines()) == 1 and not run.exists()


def test_training_aware_choice_heals_the_final_parents_and_exports_the_one_chosen(two_generations, tmp_path):
    """heal.candidates=2: both final parents get a short heal, the lowest held-out KL after it is healed in
    full and exported, and the manifest describes that subnet."""
    import shutil

    from searchllm.heal import main as heal_main

    run = tmp_path / "run"
    shutil.copytree(two_generations, run, ignore=shutil.ignore_patterns("export", "heal"))
    assert (
        heal_main(
            [
                str(run),
                "heal.candidates=2",
                "heal.candidate_tokens=128",
                "heal.tokens=256",
                "heal.seqlen=32",
                "heal.batch=2",
                "heal.eval_windows=2",
            ]
        )
        == 0
    )
    m = json.loads((run / "manifest.json").read_text())
    rows = m["heal"]["selection"]
    assert [r["candidate"] for r in rows] == ["search's best", "parent 2"]
    assert sum(bool(r.get("chosen")) for r in rows) == 1 and all(r["tokens"] == 128 for r in rows)
    chosen = min(rows, key=lambda r: r["held_out_kl_after"])
    assert chosen.get("chosen") and m["export"]["params"] == m["params"]["subnet"] == chosen["params"]
    assert m["heal"]["tokens"] == 256


@pytest.mark.parametrize("sig", CODES)
def test_interrupts_in_the_database_the_search_and_the_export_end_with_one_line_and_the_run_ends_identical(
    two_generations, checkpoint, tmp_path, sig
):
    import ray

    run = tmp_path / "run"
    args = level_args(*checkpoint, run, "search.generations=2", f"ray.address={ray.get_runtime_context().gcs_address}")
    for stage, method, after in (
        ("database", "searchllm.stages.database:save_layer", 2),
        ("search", "append_eval", 3),
        ("export", "searchllm.export.hf:write_info", 1),
    ):
        args = ended_cleanly(signal_driver_at(args, method, after, sig), run, sig, stage)  # the printed command
        if stage == "database":
            assert len(list((run / "levels").glob("*/layer-*.safetensors"))) == 2
    assert main(args) == 0
    assert outcome(run) == outcome(two_generations)


def test_without_a_terminal_each_long_stage_logs_progress_lines_and_the_search_sums_up(two_generations):
    import re

    text = (two_generations.parent / "log.txt").read_text()  # pytest's stderr is no terminal: timed lines
    assert re.search(r"level database: \d/4 layer, [\d.e+-]+ layer/s, \d+s elapsed, ETA", text)
    assert re.search(r"search gen 1/2 stage 1: \d/\d cand", text)
    assert re.search(r"evaluated \S+ \(generation 0, replica 0, [\d.]+s\): fitness [\d.]+", text)
    assert "search: 5 candidates evaluated, best fitness so far" in text


def test_the_database_size_predicted_from_the_geometry_is_what_the_build_writes(two_generations):
    db = json.loads((two_generations / "manifest.json").read_text())["level_database"]
    assert db["predicted_bytes"] == pytest.approx(db["disk_bytes"], rel=0.03)


def test_a_database_that_cannot_fit_on_the_disk_stops_before_any_weights_load(
    checkpoint, tmp_path, capsys, monkeypatch
):
    from collections import namedtuple

    import searchllm.driver
    import searchllm.stages.plan as plan

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(plan.shutil, "disk_usage", lambda p: usage(2**40, 2**40 - 1000, 1000))
    monkeypatch.setattr(searchllm.driver, "load_model", lambda cfg: pytest.fail("weights loaded"))
    run = tmp_path / "run"
    assert main(level_args(*checkpoint, run)) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("searchllm: error: the level database needs") and "that disk has 0.0 MiB free" in line
    assert "levels.mlp_levels=4" in line and not run.exists()


def _ray_daemons() -> set[int]:
    import psutil

    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in ("raylet", "gcs_server")}


def test_sigterm_to_the_process_group_of_a_driver_that_started_its_own_ray_ends_as_sigint_does(
    ray_cluster, checkpoint, tmp_path
):
    """systemd, Slurm's scancel and `kill -- -PGID` signal the whole group: the driver's own Ray runs in a
    session of its own, so the driver alone gets it, and the printed command resumes. Sampling and the heal
    (Ray Train's workers) here; the database, the search and the export on a shared cluster in the test above
    (the own Ray's shutdown is the same in every stage)."""
    import shutil

    path, corpus = checkpoint
    mix = [
        f"data.{r}.{k}" for r in ("calibration", "fitness") for k in ("name=mix", f"mix=[text:{corpus}=1,generated=1]")
    ]
    heal = ["heal.enabled=true", "heal.candidates=1", "heal.tokens=256", "heal.seqlen=32", "heal.batch=2"]
    heal += ["heal.eval_windows=2", "heal.eval_every=2", "heal.checkpoint_every=2"]
    args = level_args(path, corpus, tmp_path / "undisturbed", "search.generations=2", *mix, *heal, "ray.num_cpus=2")
    assert main([*args, f"ray.address={ray_cluster.get_runtime_context().gcs_address}"]) == 0
    run, daemons = tmp_path / "run", _ray_daemons()
    args = [a.replace(str(tmp_path / "undisturbed"), str(run)) for a in args]
    for stage, method, after in (
        ("generate", "save_generated", 1),
        ("heal", "searchllm.stages.heal:Progress.__call__", 2),
    ):
        proc = signal_driver_at(args, method, after, "SIGTERM", group=True)
        args = ended_cleanly(proc, run, "SIGTERM", stage, worker_logs=stage == "heal")
        assert _ray_daemons() == daemons  # the driver's own Ray is gone with it
    assert main([*args, f"ray.address={ray_cluster.get_runtime_context().gcs_address}"]) == 0
    assert outcome(run) == outcome(tmp_path / "undisturbed")
    # The heal again, its text already sampled, and a Ctrl-C: Ray Train's SIGINT handler (exit code 1) never
    # replaces the driver's, and its run is ended before the driver's Ray goes (left in flight, it crashed the
    # exiting driver with SIGSEGV)
    again = tmp_path / "again"
    shutil.copytree(tmp_path / "undisturbed", again, ignore=shutil.ignore_patterns("export", "heal"))
    heal_at = ("searchllm.stages.heal:Progress.__call__", 2, "SIGINT")
    proc = signal_driver_at([f"resume={again}", *heal], *heal_at, group=True)
    ended_cleanly(proc, again, "SIGINT", "heal", worker_logs=True)
