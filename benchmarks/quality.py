"""Quality at the same budget: inheriting ratio x method -> perplexity of the exported model, its size, the
search + reformation wall time and the evaluations. Every row is one run of the driver itself
(`searchllm.driver.main`: the same stages, calibration, budget, export and evaluation protocol as a user's
run), in its own run dir; the table is read back from each run's manifest.json and eval.parquet.

    python benchmarks/quality.py [--ratios 0.9 0.8 0.7 0.6 0.5] [--methods searchllm uniform+obs ...]
                                 [--calibrations wikitext mixture generated generated+mixture]
                                 [--heal-tokens 100000 500000 2000000]
                                 [--windows N] [--root runs/quality] [--out FILE.csv] [--table-only]
                                 [-- key=value ...]

A row already run under --root (its eval.parquet there) is read back, not run again.

--heal-tokens adds, after each row, that row's subnet healed on each number of tokens: a copy of its run dir
(`<row>-heal<N>`, the level database linked) healed by `python -m searchllm.heal` (searchllm.heal.main: the
run's own stages, read back, then the heal stage, export and evaluation), each with its own schedule;
`heal s` is the heal's own wall time (heal.* overrides go after `--`).

Methods (a name -> driver overrides on top of conf/default.yaml; `--` passes more to every run):
  uniform         same kept ratio in every block by the paper's importance scores; no compensation
  uniform+obs     the level database's uniform assignments (every block at the same levels; the best
                  attention/MLP split on the selection stages, climbing down the attention levels while
                  the KL falls), exported with their OBS-compensated weights: no search over layers
  flap            FLAP (WIFV, global threshold, bias compensation)
  layerdrop       ShortGPT: blocks of least block influence removed, no compensation
  paper           the paper: evolution over in-head channel masks + ADMM reformation
  searchllm       the default: level search over the compensated database, KL fitness, single-step selection
Ablations of searchllm (one setting changed each):
  ab:ppl          fitness = perplexity instead of KL
  ab:multi-step   multi-step selection (the previous default): 12 children on 512 tokens, the best 3 on 2,048,
                  the best on 4,096, instead of 4 children each on 8,192
  ab:single-4k    single-step selection on 4,096 tokens instead of 8,192
  ab:fp32-score   candidates scored in float32 (model.dtype) instead of bfloat16
  ab:probe-2k     generation 0's sensitivity probes scored on the first 2,048 tokens instead of the stage's 8,192
  ab:probe-4k     the same on the first 4,096 tokens
  ab:fit2048      the selection's 8,192 tokens as 4 windows of 2,048 (the evaluation's length) instead of 16 of 512
  ab:long-stages  multi-step selection of 12 children on 2,048 -> 4,096 -> 8,192 tokens (3 -> 1 survivors)
  ab:8x1k         multi-step selection of 8 children on 1,024 -> 4,096 -> 8,192 tokens (2 -> 1 survivors)
  ab:dense-db     database built on the dense model's activations (no error accumulation)
  ab:unweighted   MLP channels removed in plain OBS order (ZipLM) instead of weighed by the output Fisher factors
  ab:mlp32        32 MLP levels (steps of intermediate / 32) instead of 16: finer allocation, twice the database
  ab:stream-refit the database's refit aims at the dense model's residual stream after each module (cancels the
                  upstream error too) instead of the module's own output on the pruned inputs
  ab:free-heads   query heads pruned freely inside their KV groups (unequal groups) instead of equally
  ab:rereform     the chosen assignment re-reformed from the original weights by the reformation stage
  ab:channels     searchllm's previous design: evolution over in-head channel masks, reformation of the
                  top parents + FLAP (the old default)

Calibrations (the text of calibration, output factors, level database and KL fitness; CALIBRATIONS):
  wikitext           WikiText-2 validation (the default before the domain work)
  mixture            WikiText-2 validation and PTB train, half each
  generated          text sampled from the dense model itself (data.generate), in its chat template
  generated+mixture  a third each
  wikitext-heavy     WikiText-2 validation half, PTB train and generated text a quarter each
  mixed-db           calibration as generated+mixture, the KL fitness and selection on WikiText-2 alone

Rows at the same ratio and calibration reuse the first searchllm run's level database where their settings build
the same one (copied into their run dir before the run: the driver then reports it as reused), so the search
rows differ only in the search; the mask methods reuse the first run's calibration scores (scores.npz,
the same calibration windows at every ratio), and the generated text (generated.pt). The numbers are WikiText-2
raw test, PTB test and the held-out domains (code, docs, chat: data.DOMAINS), which no calibration reads; `worst x`
is the largest ppl@2048 ratio to dense over the held-out domains.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

METHODS = {
    "uniform": ["method=uniform"],
    "uniform+obs": ["method=searchllm", "search.generations=1", "levels.init=uniform", "levels.probe=0"],
    "flap": ["method=flap"],
    "layerdrop": ["method=layerdrop"],
    "paper": ["method=paper"],
    "searchllm": ["method=searchllm"],
    "ab:ppl": ["method=searchllm", "levels.fitness=ppl"],
    "ab:multi-step": [
        "method=searchllm",
        "levels.tokens=[512,2048,4096]",
        "levels.survivors=[3,1]",
        "levels.offspring=12",
    ],
    "ab:single-4k": ["method=searchllm", "levels.tokens=[4096]"],
    "ab:fp32-score": ["method=searchllm", "levels.score_dtype=model"],
    "ab:probe-2k": ["method=searchllm", "levels.probe_tokens=2048"],
    "ab:probe-4k": ["method=searchllm", "levels.probe_tokens=4096"],
    "ab:fit2048": ["method=searchllm", "data.fitness.seqlen=2048"],
    "ab:long-stages": [
        "method=searchllm",
        "levels.tokens=[2048,4096,8192]",
        "levels.survivors=[3,1]",
        "levels.offspring=12",
    ],
    "ab:8x1k": ["method=searchllm", "levels.tokens=[1024,4096,8192]", "levels.survivors=[2,1]", "levels.offspring=8"],
    "ab:dense-db": ["method=searchllm", "levels.inputs=dense"],
    "ab:unweighted": ["method=searchllm", "levels.weighting=none"],
    "ab:stream-refit": ["method=searchllm", "levels.refit=stream"],
    "ab:mlp32": ["method=searchllm", "levels.mlp_levels=32"],
    "ab:free-heads": ["method=searchllm", "levels.heads=free"],
    "ab:rereform": ["method=searchllm", "levels.rereform=true"],
    "ab:channels": ["method=searchllm", "search.mode=evolution"],
}


def _mix(*sources: str) -> list[str]:
    return [
        f"data.{role}.{k}" for role in ("calibration", "fitness") for k in ("name=mix", f"mix=[{','.join(sources)}]")
    ]


CALIBRATIONS = {
    "wikitext": ["data.calibration.name=wikitext2", "data.fitness.name=wikitext2"],
    "mixture": _mix("wikitext2:validation=1", "ptb:train=1"),
    "generated+mixture": _mix("wikitext2:validation=1", "ptb:train=1", "generated=1"),
    "generated": _mix("generated=1"),
    "wikitext-heavy": _mix("wikitext2:validation=2", "ptb:train=1", "generated=1"),
    # the level database from the generated+mixture text, the KL fitness and selection on WikiText-2 alone
    "mixed-db": _mix("wikitext2:validation=1", "ptb:train=1", "generated=1")[:2] + ["data.fitness.name=wikitext2"],
}
# The evaluation of every row: ppl@128 on the first 32 windows of WikiText-2 raw test, ppl@2048 on the first 8
# of it, of PTB test and of each held-out domain.
EVAL = ["eval.enabled=false", "monitor.page=false", "monitor.metrics=false"]
DOMAINS = ("code", "docs", "chat")
WINDOWS = {("wikitext2-raw", 128): 32, ("wikitext2-raw", 2048): 8, ("ptb", 2048): 8} | {(d, 2048): 8 for d in DOMAINS}


def evaluate(model_dir: str, name: str, run: Path, extra: list[str]):
    """The evaluation stage (searchllm.evaluate) on each corpus x length of WINDOWS, rows appended to the
    run's eval.parquet."""
    import pandas as pd

    from searchllm.config import load_config
    from searchllm.evaluate import EvalConfig, Evaluated, append_results, count_params, describe, evaluate_model
    from searchllm.models.loading import load_pretrained

    cfg = load_config(extra)
    model, tok = load_pretrained(model_dir)
    if name == "original":
        total, decoder = count_params(model)
        what = Evaluated(name, total, decoder, total, decoder)
    else:
        what = describe(model, Path(model_dir))
    ids: dict = {}
    tables = [
        evaluate_model(
            model,
            tok,
            what,
            EvalConfig(corpora=[f"{c}:test"], lengths=[str(n)], max_windows=w, tasks=[]),
            cfg.data.root,
            ids,
        )
        for (c, n), w in WINDOWS.items()
    ]
    return append_results(run, pd.concat(tables, ignore_index=True))


def run_name(method: str, ratio: float, calibration: str) -> str:
    tail = "" if calibration == "wikitext" else f"-{calibration}"
    return f"{ratio:g}-{method.replace(':', '-')}{tail}"


def run_row(root: Path, method: str, ratio: float, calibration: str, extra: list[str]) -> dict:
    from searchllm.driver import main

    run = root / run_name(method, ratio, calibration)
    if (run / "manifest.json").is_file() and not (run / "eval.parquet").is_file():
        evaluate(json.loads((run / "manifest.json").read_text())["export"]["dir"], "exported", run, extra)
    if not (run / "manifest.json").is_file():
        if run.exists():
            shutil.rmtree(run)
        run.mkdir(parents=True)
        # Every database built before at this ratio, linked: a database's folder names its settings and its
        # calibration windows, so a run finds only one it would build itself (others build their own).
        for db in sorted(root.glob(f"{ratio:g}-*/levels/*")):
            if db.is_dir() and not db.is_symlink() and not (run / "levels" / db.name).exists():
                (run / "levels").mkdir(exist_ok=True)
                (run / "levels" / db.name).symlink_to(db.resolve(), target_is_directory=True)
        ratios = (0.9, 0.8, 0.7, 0.6, 0.5)
        same = [root / run_name(m, r, calibration) for m in METHODS for r in ratios]
        kin = [root / run_name(m, r, c) for c in CALIBRATIONS for m in METHODS for r in ratios]
        # Neither depends on the ratio or the method; generated.pt is read only where its settings match.
        for name, where in (("scores.npz", same), ("generated.pt", same + kin)):
            found = [p / name for p in where if (p / name).is_file()]
            if found:
                shutil.copy(found[0], run / name)
        t0 = time.time()
        code = main(
            [
                *METHODS[method],
                *CALIBRATIONS[calibration],
                f"budget.target={ratio}",
                f"run_dir={run}",
                *EVAL,
                *extra,
            ]
        )
        if code:
            raise SystemExit(f"{method} at {ratio} ({calibration}): the driver exited with {code}")
        (run / "wall.json").write_text(json.dumps({"seconds": time.time() - t0}))
        evaluate(json.loads((run / "manifest.json").read_text())["export"]["dir"], "exported", run, extra)
    return read_row(run, method, ratio) | {"calibration": calibration}


def heal_row(root: Path, base: Path, method: str, ratio: float, tokens: int, extra: list[str]) -> dict:
    """The subnet of run `base` healed on `tokens` tokens, in a copy of the run dir."""
    from searchllm.heal import main as heal

    run = base.with_name(f"{base.name}-heal{tokens}")
    if not (run / "eval.parquet").is_file():
        if run.exists():
            shutil.rmtree(run)
        skip = {"export", "levels", "eval.parquet", "eval.csv", "report.html", "heal", "wall.json"}
        shutil.copytree(base, run, ignore=lambda d, names: [n for n in names if d == str(base) and n in skip])
        (run / "levels").mkdir()
        for db in (base / "levels").iterdir():
            (run / "levels" / db.name).symlink_to(db.resolve(), target_is_directory=True)
        t0 = time.time()
        if heal([str(run), f"heal.tokens={tokens}", *EVAL, *extra]):
            raise SystemExit(f"{method} at {ratio} healed on {tokens} tokens: searchllm.heal failed")
        (run / "wall.json").write_text(json.dumps({"seconds": time.time() - t0}))
        evaluate(str(run / "export"), "exported", run, extra)
    return read_row(run, f"{method}+heal", ratio)


def read_row(run: Path, method: str, ratio: float) -> dict:
    import pandas as pd

    m = json.loads((run / "manifest.json").read_text())
    ev = pd.read_parquet(run / "eval.parquet")
    ev = ev[(ev.metric == "ppl") & (ev.status == "ok")]
    row = {
        "target": ratio,
        "method": method,
        "params": m["export"]["params"],
        "kept": m["export"]["params"] / m["params"]["original"],
    }
    for (corpus, length), n in WINDOWS.items():
        hit = ev[(ev.task == corpus) & (ev.seqlen == length)]
        row[f"{corpus}@{length}"] = float(hit.value.iloc[0]) if len(hit) else float("nan")
        row[f"{corpus}@{length} windows"] = int(min(hit.windows.iloc[0], n)) if len(hit) else 0
    search = m.get("search", {})
    row["search+reform s"] = (
        search.get("seconds", 0.0)
        + sum(m.get(k, {}).get("seconds", 0.0) for k in ("reform", "rereform"))
        + m.get("level_database", {}).get("build_seconds", 0.0)
    )
    row["evaluations"] = search.get("evaluations", 0)
    heal = m.get("heal", {})
    row["heal tokens"], row["heal s"] = heal.get("tokens", 0), heal.get("seconds", 0.0)
    row["wall s"] = (
        json.loads((run / "wall.json").read_text())["seconds"] if (run / "wall.json").is_file() else float("nan")
    )
    return row


def dense_row(root: Path, extra: list[str]) -> dict:
    """The original model in the same protocol (once)."""
    import pandas as pd

    from searchllm.config import load_config
    from searchllm.data import data_root
    from searchllm.models.loading import load

    if not (root / "eval.parquet").is_file():
        cfg = load_config(extra)
        evaluate(load(cfg.model, data_root(cfg.data.root)).checkpoint, "original", root, extra)
    ev = pd.read_parquet(root / "eval.parquet")
    ev = ev[(ev.metric == "ppl") & (ev.status == "ok")]
    row = {"target": 1.0, "method": "dense", "params": int(ev.params.iloc[0]), "kept": 1.0}
    for (corpus, length), _ in WINDOWS.items():
        hit = ev[(ev.task == corpus) & (ev.seqlen == length)]
        row[f"{corpus}@{length}"] = float(hit.value.iloc[0]) if len(hit) else float("nan")
    return row


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["searchllm", "uniform+obs", "uniform", "flap", "layerdrop", "paper"],
        choices=list(METHODS),
    )
    ap.add_argument("--calibrations", nargs="+", default=["wikitext"], choices=list(CALIBRATIONS))
    ap.add_argument("--heal-tokens", type=int, nargs="*", default=[], help="also heal each row's subnet on N tokens")
    ap.add_argument(
        "--windows", type=int, default=0, help="windows per text @2048 (4x as many @128) instead of 8 (32 @128)"
    )
    ap.add_argument("--root", default="runs/quality")
    ap.add_argument("--out", default=None, help="also write the rows as CSV")
    ap.add_argument(
        "--table-only", action="store_true", help="print the table of the rows already run under --root; run nothing"
    )
    a = ap.parse_args(argv)

    import pandas as pd

    if a.windows:  # fewer windows for a model whose evaluation is slow (a 262k vocabulary on CPU)
        WINDOWS.update({k: a.windows * (4 if length == 128 else 1) for k in WINDOWS for length in [k[1]]})
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    dense = dense_row(root, extra)
    rows = []
    for ratio in a.ratios:
        for calibration in a.calibrations:
            for method in a.methods:
                run = root / run_name(method, ratio, calibration)
                if a.table_only:
                    if (run / "eval.parquet").is_file():
                        rows.append(read_row(run, method, ratio) | {"calibration": calibration})
                    continue
                rows.append(run_row(root, method, ratio, calibration, extra))
                print(pd.DataFrame([rows[-1]]).to_string(index=False), flush=True)
                for tokens in a.heal_tokens:
                    rows.append(heal_row(root, run, method, ratio, tokens, extra) | {"calibration": calibration})
                    print(pd.DataFrame([rows[-1]]).to_string(index=False), flush=True)
    df = pd.DataFrame([dense | {"calibration": ""}, *rows])
    for col in [c for c in df.columns if c.endswith(("@128", "@2048"))]:
        df[f"{col} x"] = df[col] / dense[col]
    df["worst x"] = df[[f"{d}@2048 x" for d in DOMAINS if f"{d}@2048 x" in df]].max(axis=1)
    if a.out:
        df.to_csv(a.out, index=False)
    cols = [
        "target",
        "method",
        "calibration",
        "kept",
        "wikitext2-raw@2048",
        "wikitext2-raw@2048 x",
        "ptb@2048",
        "ptb@2048 x",
        *(f"{d}@2048{x}" for d in DOMAINS for x in ("", " x")),
        "worst x",
        "wikitext2-raw@128 x",
        "search+reform s",
        *(("heal tokens", "heal s") if a.heal_tokens else ()),
    ]
    print(df[[c for c in cols if c in df.columns]].to_markdown(index=False, floatfmt=".4g"))


if __name__ == "__main__":
    main()
