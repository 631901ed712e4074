"""evaluate: the evaluation protocol (searchllm.evaluate: perplexity by corpus and length, zero-shot tasks,
memory and tokens/s) on the original model and the export, after the evaluator pool is gone (its weights
are freed first); the GGUF exports in llama.cpp next to the original written to the same types. Rows are
appended to <run>/eval.parquet and the manifest gains the speed and llama.cpp records."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from searchllm.config import Config
from searchllm.data import data_root
from searchllm.evaluate import (
    RESULTS,
    Evaluated,
    against_original,
    append_results,
    count_params,
    describe,
    device_of,
    evaluate_gguf,
    evaluate_model,
    format_table,
    worst_domain,
)
from searchllm.export.formats import gguf_files
from searchllm.models.loading import load_pretrained, source_gguf
from searchllm.monitor import Monitor
from searchllm.rundir import RunDir
from searchllm.stages.context import RunContext

log = logging.getLogger("searchllm")


def run(ctx: RunContext) -> None:
    """The evaluation protocol on the original and the exported model; rows appended to the run's table."""
    cfg, run_dir, loaded, export_dir, monitor = ctx.cfg, ctx.run, ctx.loaded, ctx.export_dir, ctx.monitor
    if export_dir is None or not cfg.eval.enabled:
        return
    monitor.stage("evaluating")
    ids: dict = {}
    manifest = run_dir.load_json("manifest.json")
    export = manifest["export"]
    key = protocol(cfg, loaded.checkpoint)
    # The original's rows an earlier evaluation of this run scored in the same protocol are not scored again.
    prior = prior_rows(run_dir.path, key) if cfg.eval.original else {}
    reused = [prior["original"]] if "original" in prior else []
    tables = []
    models: tuple[tuple[str, str], ...] = (("original", loaded.checkpoint),) if cfg.eval.original and not reused else ()
    models += (("exported", str(export_dir)),) if "hf" in export.get("formats", ["hf"]) else ()
    for name, path in models:
        model, tokenizer = load_pretrained(path)
        model.to(device_of(cfg.eval.device))
        if name == "exported":  # its searchllm_export.json holds the source's counts
            what = describe(model, export_dir)
            what.name = f"exported ({cfg.method})"
        else:
            total, decoder = count_params(model)
            what = Evaluated(name, total, decoder, total, decoder)
        steps = len(cfg.eval.corpora) * len(cfg.eval.lengths) + bool(cfg.eval.tasks)
        with monitor.bar(steps, f"evaluate {name}", "step") as bar:
            tables.append(
                evaluate_model(
                    model, tokenizer or loaded.tokenizer, what, cfg.eval, cfg.data.root, ids, lambda: bar.update(1)
                ).assign(protocol=key if name == "original" else None)
            )
        del model
    if "gguf" in export:
        new, old = evaluate_ggufs(cfg, run_dir, loaded, export, ids, monitor, key, prior)
        tables, reused = tables + new, reused + old
    for r in reused:
        log.info("evaluation: %s's rows of %s reused (the same protocol)", r.model.iloc[0], r.time.iloc[0])
    fresh = pd.concat(tables or [pd.DataFrame()], ignore_index=True).assign(method=cfg.method, target=cfg.budget.target)
    table = against_original(pd.concat([*reused, fresh], ignore_index=True))
    if table.empty or "metric" not in table:  # eval.corpora=[] and eval.tasks=[]: a valid, empty evaluation
        log.info("evaluation: nothing to evaluate (eval.corpora and eval.tasks are empty)")
        manifest["evaluation"] = {"rows": 0, "reason": "eval.corpora and eval.tasks are empty"}
        run_dir.save_json("manifest.json", manifest)
        return
    append_results(run_dir.path, table.iloc[len(table) - len(fresh) :])
    worst = worst_domain(table)
    monitor.set_eval(table.to_dict("records"), worst)
    # The manifest carries the measured speed and memory of the export next to its perplexity.
    hf_rows = table[table.runtime.isna()] if "runtime" in table else table
    ppl = hf_rows[(hf_rows.metric == "ppl") & (hf_rows.status == "ok")]
    manifest["speed"] = {
        ("exported" if name != "original" else "original"): {
            "prefill_tokens_per_s": float(rows.tokens_per_s.median()),
            "weights_mib": float(rows.weights_mib.iloc[0]),
            "measured_on": f"eval.corpora perplexity passes, batch {cfg.eval.batch}, device "
            f"{device_of(cfg.eval.device)}",
        }
        for name, rows in ppl.groupby("model")
    }
    if "runtime" in table:
        manifest["llama_cpp"] = llama_cpp_summary(table[table.runtime == "llama.cpp"])
    if worst:  # the number a user who prunes for other text than the calibration's should look at first
        manifest["worst_domain"] = worst
        for n, w in worst.items():
            log.info(
                "worst held-out domain @%d: %s at %.3fx the original's perplexity", n, w["domain"], w["x_original"]
            )
    run_dir.save_json("manifest.json", manifest)
    print(format_table(table))


def protocol(cfg: Config, checkpoint) -> str:
    """What the original's rows depend on besides their own columns: its checkpoint, the data, every eval.*
    setting that changes a number, the device. Equal keys: an earlier evaluation's rows stand for a new one."""
    settings = {k: v for k, v in asdict(cfg.eval).items() if k not in ("enabled", "original", "device", "streams")}
    what = [str(checkpoint), str(data_root(cfg.data.root)), str(device_of(cfg.eval.device)), settings]
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prior_rows(run: Path, key: str) -> dict[str, pd.DataFrame]:
    """The original's rows the run's table already holds under protocol `key`, by model (`original`,
    `original <type>`), each model's last such evaluation."""
    path = run / f"{RESULTS}.parquet"
    table = pd.read_parquet(path) if path.is_file() else pd.DataFrame()
    if "protocol" not in table:
        return {}
    rows = table[table.protocol == key]
    return {m: r[r.time == r.time.iloc[-1]].reset_index(drop=True) for m, r in rows.groupby("model", sort=False)}


def evaluate_ggufs(
    cfg: Config, run_dir: RunDir, loaded, export: dict, ids: dict, monitor: Monitor, key: str, prior: dict
) -> tuple[list[pd.DataFrame], list[pd.DataFrame]]:
    """The exported GGUFs in llama.cpp, and (eval.original) the original model written and quantized to the
    same types by the same writer, so the two are compared in the runtime users run, type for type.
    Returns (the new tables, the original's tables reused from `prior`, prior_rows under protocol `key`)."""
    g = loaded.adapter.geometry()
    files = [(f["type"], Path(f["path"])) for f in export["gguf"]["files"]]
    runs = [(f"exported ({cfg.method}) {t}", p, export["params"]) for t, p in files]
    types = ["f16" if t == "mixed" else t for t, _ in files]  # a byte budget's file against the f16 original
    todo = [t for t in types if f"original {t}" not in prior] if cfg.eval.original else []
    if todo:
        model, _ = load_pretrained(loaded.checkpoint)
        _, paths = gguf_files(
            model,
            loaded.tokenizer,
            run_dir.path / "original-gguf",
            source_gguf(cfg.model, data_root(cfg.data.root)),
            todo,
        )
        del model
        runs = [(f"original {t}", p, g.total_params) for t, p in paths] + runs
    decoder = g.num_layers * g.layer_params
    ctx, tables = int(loaded.adapter.config.max_position_embeddings), []
    with monitor.bar(len(runs), "evaluate in llama.cpp", "gguf") as bar:
        for name, p, n in runs:
            evaluated = Evaluated(name, n, n - g.outer_params, g.total_params, decoder)
            table = evaluate_gguf(p, loaded.tokenizer, evaluated, cfg.eval, cfg.data.root, ctx, ids)
            tables.append(table.assign(protocol=key if name.startswith("original ") else None))
            bar.update(1)
    return tables, [prior[f"original {t}"] for t in types if f"original {t}" in prior]


def llama_cpp_summary(rows: pd.DataFrame) -> list[dict]:
    """Per GGUF: its perplexities, prefill/decode tokens/s and file size (the manifest's llama.cpp table)."""
    out = []
    for name, r in rows.groupby("model", sort=False):
        ok = r[r.status == "ok"]
        metric = lambda m: float(ok[ok.metric == m].value.iloc[0]) if (ok.metric == m).any() else None  # noqa: E731
        out.append(
            {
                "model": name,
                "file_mib": float(r.weights_mib.iloc[0]),
                "prefill_tok_s": metric("prefill_tok_s"),
                "decode_tok_s": metric("decode_tok_s"),
                "ppl": {
                    f"{t.task}/{t.split}@{int(t.seqlen)}": float(t.value) for t in ok[ok.metric == "ppl"].itertuples()
                },
            }
        )
    return out
