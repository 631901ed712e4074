"""Perplexity against file size in llama.cpp: the dense model's llama.cpp ladder (without and with the same
importance matrix) against searchllm's joint search (budget.size) at each ladder file's size and below.

    python benchmarks/frontier.py [--sizes 89.2,87.8,87.5,84.1,80,75,70] [--ftypes q8_0,q4_k_m,...]
        [--windows 8] [--root runs/frontier] [--pruned RUN] [--skip-search] [--skip-ladder] [--imatrix-only]
        [--model-path smollm2|FILE.gguf|DIR] [-- key=value ...]

Each searchllm row is one driver run, `python -m searchllm.driver budget.size=<S>MiB export.format=gguf` (the
first run's sampled text, level database and importance matrix are copied into the others' run dirs, which
then reuse them). Every ladder file is searchllm's f32 GGUF of the dense model quantized by
llama_model_quantize; `+imatrix` files get the first run's importance matrix, the one the search used.
`--model-path`: the model of every row (the driver's model.path; SmolLM2 by default); what follows `--` goes
to every search run's command line. `--pruned RUN` (repeatable): a finished run's HF export quantized to the
same ftypes (today's pruned export, or a healed copy of its run). Every file is
scored by searchllm.evaluate.evaluate_gguf: ppl@2048 on the first N windows of WikiText-2 raw test, PTB test
and the held-out domains (code, docs, chat), prefill/decode tokens/s. Writes ROOT/frontier.json, a markdown
table on stdout and ROOT/frontier.png (WikiText-2 ppl against MiB, one line per method).
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from searchllm.config import EvalConfig, ModelConfig
from searchllm.data import data_root
from searchllm.evaluate import Evaluated, evaluate_gguf, llamacpp
from searchllm.export.gguf import FTYPES, write
from searchllm.models.loading import load_pretrained, resolve, source_gguf
from searchllm.stages.search_joint import load_imatrix

LADDER = "q8_0,q6_k,q5_k_m,q4_k_m,q5_0,q4_1,q4_k_s,q3_k_l,q3_k_m,iq4_nl,iq4_xs,q4_0,q3_k_s,q2_k"
CORPORA = ["wikitext2-raw:test", "ptb:test", "code", "docs", "chat"]
NAMES = {
    "qkv": ("attn_q", "attn_k", "attn_v"),
    "o": ("attn_output",),
    "mlp": ("ffn_gate", "ffn_up"),
    "down": ("ffn_down",),
}


def search(size: str, root: Path, seed_from: Path | None, overrides: list[str]) -> Path:
    run = root / f"search-{size}MiB"
    if not (run / "manifest.json").is_file():
        if seed_from is not None and not run.exists():  # the same sampled text, database and matrix
            run.mkdir(parents=True)
            for name in ("generated.pt", "levels", "quant"):
                src = seed_from / name
                if src.is_dir():
                    shutil.copytree(src, run / name)
                elif src.is_file():
                    shutil.copy(src, run / name)
        t0 = time.time()
        cmd = [sys.executable, "-m", "searchllm.driver", f"budget.size={size}MiB", "export.format=gguf"]
        args = [f"run_dir={run}", "resume=auto", "eval.enabled=false", "monitor.page=false", *overrides]
        subprocess.run([*cmd, *args], check=True)  # resume=auto: a stopped search continues
        (run / "wall.txt").write_text(f"{time.time() - t0:.0f}\n")
    return run


def gguf_imatrix(run: Path) -> dict:
    """The run's importance matrix by GGUF tensor name (the dense model's: every column)."""
    [path] = sorted((run / "quant").glob("imatrix-*.npz"))
    im = load_imatrix(path)
    out = {"token_embd.weight": im["output"], "output.weight": im["output"]}
    for layer, keys in im.items():
        if isinstance(layer, int):
            for key, v in keys.items():
                for n in NAMES[key]:
                    out[f"blk.{layer}.{n}.weight"] = v
    return out


def ladder(
    model_dir: str,
    root: Path,
    ftypes: list[str],
    imatrix: dict | None,
    tag: str,
    source: Path | None,
    plain: bool = True,
) -> list[tuple[str, Path]]:
    """The model written by searchllm's GGUF writer (the source GGUF's tokenizer, as the searches' files) and
    quantized by llama.cpp to each ftype, without and with the importance matrix."""
    model, tok = load_pretrained(model_dir)
    out = root / f"ladder-{tag}"
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    f32 = out / "model-f32.gguf"
    if not f32.is_file():
        write(model, out, f32, source)
    files = []
    for t in ftypes:
        for name, im in (("", None), ("+imatrix", imatrix)):
            if (name and im is None) or (not name and not plain and imatrix is not None):
                continue
            path = out / f"model-{t}{name}.gguf"
            if not path.is_file():
                llamacpp.quantize(f32, path, FTYPES[t], imatrix=im)
            files.append((f"{tag} {t}{name}", path))
    return files


def score(files: list[tuple[str, Path]], tokenizer, windows: int, done: dict) -> None:
    cfg = EvalConfig(corpora=CORPORA, lengths=["2048"], max_windows=windows, tasks=[])
    ids: dict = {}
    for name, path in files:
        if name in done:
            continue
        table = evaluate_gguf(path, tokenizer, Evaluated(name, 0, 0, 1, 1), cfg, "auto", 2048, ids)
        ok = table[table.status == "ok"]
        row = {"file": str(path), "mib": path.stat().st_size / 2**20}
        for r in ok.itertuples():
            row[r.task if r.metric == "ppl" else r.metric] = float(r.value)
        done[name] = row
        print(name, json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="89.2,87.8,87.5,84.1,80,75,70")
    ap.add_argument("--ftypes", default=LADDER)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--root", default="runs/frontier")
    ap.add_argument("--model", default=None, help="the dense model's checkpoint (default: the runs' source)")
    ap.add_argument(
        "--pruned", action="append", default=[], help="a finished run whose HF export is quantized to the ftypes"
    )
    ap.add_argument(
        "--seed-from", default=None, help="a run whose sampled text, database and matrix the searches reuse"
    )
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--skip-ladder", action="store_true")
    ap.add_argument("--imatrix-only", action="store_true", help="the ladder with the importance matrix alone")
    ap.add_argument("--model-path", default="smollm2", help="the driver's model.path for every row")
    ap.add_argument("overrides", nargs="*", help="after --: key=value for every search run")
    a = ap.parse_args()
    overrides = [f"model.path={a.model_path}", *a.overrides]
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    results_path = root / "frontier.json"
    done = json.loads(results_path.read_text()) if results_path.is_file() else {}
    runs, first = [], Path(a.seed_from) if a.seed_from else None
    for size in a.sizes.split(",") if not a.skip_search else []:
        run = search(size, root, first, overrides)
        first = first or run
        runs.append((size, run))
    if a.skip_search:  # the searches already in ROOT
        runs = [(d.name[len("search-") : -len("MiB")], d) for d in sorted(root.glob("search-*MiB"))]
        runs = [(size, d) for size, d in runs if (d / "export" / "model-mixed.gguf").is_file()]
    first = first or next(iter(sorted(root.glob("search-*"))), None)
    manifest = json.loads((first / "manifest.json").read_text()) if first else {}
    model = ModelConfig(path=a.model_path)
    model_dir = a.model or manifest.get("source", {}).get("checkpoint") or resolve(model, data_root("auto"))
    _, tok = load_pretrained(model_dir)
    source = source_gguf(model, data_root("auto"))
    files = [(f"searchllm {s} MiB", r / "export" / "model-mixed.gguf") for s, r in runs]
    if not a.skip_ladder:
        im = gguf_imatrix(first) if first else None
        files += ladder(model_dir, root, a.ftypes.split(","), im, "dense", source, not a.imatrix_only)
        for run in map(Path, a.pruned):  # tagged by run dir: a pruned export and its healed copy side by side
            files += ladder(str(run / "export"), root, a.ftypes.split(","), None, f"pruned-{run.name}", source)
    for i in range(len(files)):
        score(files[i : i + 1], tok, a.windows, done)
        results_path.write_text(json.dumps(done, indent=1))
    cols = ["wikitext2-raw", "ptb", "code", "docs", "chat"]
    print(f"\nllama.cpp ppl@2048, first {a.windows} windows; prefill/decode tokens/s\n")
    print("| file | MiB | " + " | ".join(cols) + " | prefill | decode |")
    print("|---|---:|" + "---:|" * (len(cols) + 2))
    for name, r in sorted(done.items(), key=lambda x: -x[1]["mib"]):
        vals = " | ".join(f"{r.get(c, float('nan')):.2f}" for c in cols)
        speed = f"{r.get('prefill_tok_s', 0):.0f} | {r.get('decode_tok_s', 0):.1f}"
        print(f"| {name} | {r['mib']:.1f} | {vals} | {speed} |")
    plot(done, root / "frontier.png")


def plot(done: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[float, float]]] = {}
    for name, r in done.items():
        if "wikitext2-raw" not in r:
            continue
        method = name.split(" ")[0] + (" +imatrix" if name.endswith("+imatrix") else "")
        lines.setdefault(method, []).append((r["mib"], r["wikitext2-raw"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
    ax.set_xlabel("GGUF file (MiB)")
    ax.set_ylabel("WikiText-2 ppl@2048 (llama.cpp)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
