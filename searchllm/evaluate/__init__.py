"""Evaluation in one protocol: perplexity, real parameter counts, zero-shot accuracy, one results table.

`python -m searchllm.evaluate <checkpoint dir | run dir | file.gguf> [key=value ...]` (keys: eval.*, data.root).
A .gguf is evaluated in llama.cpp (the `gguf` extra): the same perplexity windows, plus prefill and decode
tokens/s and the file's size.

Perplexity uses the standard non-overlapping-window protocol (GPTQ, SliceGPT, FLAP, the paper): the test
text is tokenized whole, cut into consecutive windows of `seqlen` tokens, the last partial window is dropped,
and every window is scored on its own (tokens 1..T given their prefix). The same rule as the search's
fitness (shard.NLL), so numbers from both are comparable. `eval.max_windows` caps the windows for reduced
CPU budgets; the windows and tokens scored are printed beside every number.

Zero-shot accuracy goes through EleutherAI's lm-eval harness (Python API, an HFLM wrapping the model in
memory); acc_norm for HellaSwag, ARC-c and OBQA and acc elsewhere, as LLM-Pruner's pipeline (the paper's).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from searchllm.config import EvalConfig, EvalError, parse_corpus, resolve_length
from searchllm.files import export_dir
from searchllm.pruning.shard import NLL
from searchllm.streams import in_streams, resolve_streams

log = logging.getLogger("searchllm")

NORM_METRIC_TASKS = ("hellaswag", "arc_challenge", "openbookqa")
RESULTS = "eval"  # <run dir>/eval.parquet and eval.csv


@dataclass
class Evaluated:
    """What was evaluated and how big it really is."""

    name: str
    params: int
    decoder_params: int
    original_params: Optional[int] = None
    original_decoder_params: Optional[int] = None

    @property
    def ratio(self) -> Optional[float]:
        return self.params / self.original_params if self.original_params else None

    @property
    def decoder_ratio(self) -> Optional[float]:
        return self.decoder_params / self.original_decoder_params if self.original_decoder_params else None


# -- perplexity ---------------------------------------------------------------------------------------
def perplexity(model: torch.nn.Module, tokens: torch.Tensor, batch: int = 1, streams: int = 1) -> NLL:
    """Perplexity of `tokens` (windows x length), `batch` windows per forward pass, `streams` passes at once
    (searchllm.streams: the sums are added in window order, so the result does not depend on them)."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    chunks = [tokens[s : s + batch] for s in range(0, tokens.shape[0], batch)]

    def score(t: torch.Tensor) -> float:
        t = t.to(device)
        logits = model(t, use_cache=False).logits.float()
        flat = logits[:, :-1].reshape(-1, logits.shape[-1])
        return float(F.cross_entropy(flat, t[:, 1:].reshape(-1), reduction="sum"))

    sums = in_streams(score, chunks, streams)
    return NLL(sum(sums), sum(t[:, 1:].numel() for t in chunks), time.perf_counter() - t0)


# -- parameters ---------------------------------------------------------------------------------------
def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(total, decoder-only) parameters; tied tensors counted once. Decoder = the decoder layers."""
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    layers = model.get_decoder().layers if hasattr(model, "get_decoder") else model.model.layers
    decoder = {p.data_ptr(): p.numel() for p in layers.parameters()}
    return sum(unique.values()), sum(decoder.values())


# -- zero-shot ------------------------------------------------------------------------------------------
def lm_eval_version() -> str:
    try:
        import lm_eval

        return getattr(lm_eval, "__version__", "unknown")
    except ImportError:
        return "not installed"


def zero_shot(
    model,
    tokenizer,
    tasks: Sequence[str],
    limit: Optional[int] = None,
    include_path: Optional[str] = None,
    batch: int = 1,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """{task: {"metric": name, "value": accuracy, "stderr": ...}} through lm-eval's simple_evaluate."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError(
            "zero-shot needs EleutherAI's harness: pip install 'searchllm[eval]' (or set eval.tasks=[])"
        ) from None
    if tokenizer is None:
        raise EvalError(
            "zero-shot needs the model's tokenizer beside the checkpoint; save one there or set eval.tasks=[]"
        )
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise EvalError(
            f"eval.tasks {unknown} are not lm-eval tasks; set eval.include_path=<dir of task YAMLs> for local ones"
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch)
    out = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        limit=limit,
        task_manager=manager,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=False,
    )
    results = {}
    for task in tasks:
        r = out["results"][task]
        metric = "acc_norm" if task in NORM_METRIC_TASKS and "acc_norm,none" in r else "acc"
        results[task] = {
            "metric": metric,
            "value": float(r[f"{metric},none"]),
            "stderr": float(r.get(f"{metric}_stderr,none", float("nan"))),
        }
    return results


# -- the whole protocol ---------------------------------------------------------------------------------
def perplexity_rows(
    score: Callable[[torch.Tensor], NLL],
    tokenizer,
    name: str,
    base: dict,
    lengths: list[int],
    cfg: EvalConfig,
    data_root: str = "auto",
    corpus_ids: Optional[dict[str, Any]] = None,
    step: Optional[Callable[[], None]] = None,
) -> list[dict]:
    """One row per corpus x length: `score` (a model's perplexity, in whichever runtime) on the first
    windows of the split; a corpus that cannot be read is a skipped row (or an error, eval.missing)."""
    from searchllm.data import DataError, first_windows, load_text, tokenize

    step = step or (lambda: None)
    rows, cache = [], corpus_ids if corpus_ids is not None else {}
    for spec in cfg.corpora:
        corpus = parse_corpus(spec)
        if spec not in cache:
            try:
                text, source = load_text(corpus, data_root, tokenizer)
                cache[spec] = (tokenize(text, tokenizer), source)
            except DataError as e:
                if cfg.missing == "error":
                    raise
                cache[spec] = str(e)
        got = cache[spec]
        for seqlen in lengths:
            row = base | {"metric": "ppl", "task": corpus.name, "split": corpus.split, "seqlen": seqlen}
            step()
            if isinstance(got, str):
                log.warning("eval: skipping %s: %s", spec, got)
                rows.append(row | {"status": f"skipped: {got}"})
                continue
            ids, source = got
            try:
                windows = first_windows(ids, cfg.max_windows, seqlen, f"eval {spec} @ {seqlen}")
            except DataError as e:
                rows.append(row | {"status": f"skipped: {e}"})
                continue
            nll = score(windows)
            rows.append(
                row
                | {
                    "value": nll.ppl,
                    "windows": windows.shape[0],
                    "tokens": nll.tokens,
                    "source": source,
                    "seconds": nll.seconds,
                    "tokens_per_s": windows.numel() / nll.seconds,
                    "status": "ok",
                }
            )
            log.info(
                "eval %s: ppl %.3f on %s/%s @ %d (%d windows, %d tokens)",
                name,
                nll.ppl,
                corpus.name,
                corpus.split,
                seqlen,
                windows.shape[0],
                nll.tokens,
            )
    return rows


def base_row(what: Evaluated, cfg: EvalConfig) -> dict[str, Any]:
    """The columns every row of one evaluated model shares, whichever runtime scored it."""
    return {
        "model": what.name,
        "params": what.params,
        "decoder_params": what.decoder_params,
        "ratio": what.ratio,
        "decoder_ratio": what.decoder_ratio,
        "seed": cfg.seed,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def evaluate_model(
    model,
    tokenizer,
    what: Evaluated,
    cfg: EvalConfig,
    data_root: str = "auto",
    corpus_ids: Optional[dict[str, Any]] = None,
    step: Optional[Callable[[], None]] = None,
) -> pd.DataFrame:
    """Every perplexity and zero-shot number of one model as rows of the results table, with the
    measured throughput of each perplexity pass and the weights' memory.

    `corpus_ids` caches tokenized corpora across models ({spec: (ids, source) or error string}); `step`
    is called after each corpus x length and after the zero-shot tasks (a progress bar)."""
    step = step or (lambda: None)
    base = base_row(what, cfg) | {"weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}
    lengths = [resolve_length(x, model.config) for x in cfg.lengths]
    streams = resolve_streams(cfg.streams, next(model.parameters()).device)
    rows = perplexity_rows(
        lambda w: perplexity(model, w, cfg.batch, streams),
        tokenizer,
        what.name,
        base,
        lengths,
        cfg,
        data_root,
        corpus_ids,
        step,
    )
    if cfg.tasks:
        t0 = time.perf_counter()
        version = lm_eval_version()
        try:
            acc = zero_shot(model, tokenizer, cfg.tasks, cfg.task_limit, cfg.include_path, cfg.batch, cfg.seed)
        except EvalError:
            raise
        except Exception as e:  # e.g. a task's dataset is not reachable: keep every number already computed
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            log.warning("eval: zero-shot failed (%s); perplexities are kept", reason)
            return pd.DataFrame(
                rows
                + [
                    base | {"metric": "acc", "task": t, "source": f"lm-eval {version}", "status": f"failed: {reason}"}
                    for t in cfg.tasks
                ]
            )
        seconds = time.perf_counter() - t0
        step()
        for task, r in acc.items():
            rows.append(
                base
                | {
                    "metric": r["metric"],
                    "task": task,
                    "value": r["value"],
                    "stderr": r["stderr"],
                    "source": f"lm-eval {version}",
                    "limit": cfg.task_limit,
                    "seconds": seconds,
                    "status": "ok",
                }
            )
        mean = sum(r["value"] for r in acc.values()) / len(acc)
        rows.append(
            base
            | {
                "metric": "acc_mean",
                "task": f"mean of {len(acc)}",
                "value": mean,
                "source": f"lm-eval {version}",
                "limit": cfg.task_limit,
                "status": "ok",
            }
        )
    return pd.DataFrame(rows)


def evaluate_runtime(
    what: Evaluated,
    runtime: str,
    weights_mib: float,
    context: int,
    score: Callable[[torch.Tensor], NLL],
    speed: Callable[[list[int], int], tuple[float, float]],
    tokenizer,
    cfg: EvalConfig,
    data_root: str = "auto",
    corpus_ids: Optional[dict[str, Any]] = None,
    step: Optional[Callable[[], None]] = None,
    prompt: int = 512,
    decode: int = 64,
) -> pd.DataFrame:
    """A model in another runtime (llama.cpp, vLLM): perplexity on the same windows as the HF path (the
    same tokenizer's ids) through `score`, prefill tokens/s on `prompt` tokens and decode tokens/s over
    `decode` tokens through `speed`."""
    base = base_row(what, cfg) | {"runtime": runtime, "weights_mib": weights_mib}
    lengths = [resolve_length(x, type("C", (), {"max_position_embeddings": context})()) for x in cfg.lengths]
    rows = perplexity_rows(score, tokenizer, what.name, base, lengths, cfg, data_root, corpus_ids, step)
    ids = torch.randint(0, len(tokenizer), (prompt,), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    prefill, dec = speed(ids, decode)
    rows += [
        base | {"metric": "prefill_tok_s", "task": f"{prompt} tokens", "value": prefill, "status": "ok"},
        base | {"metric": "decode_tok_s", "task": f"{decode} tokens", "value": dec, "status": "ok"},
    ]
    log.info(
        "eval %s in %s: prefill %.0f tokens/s, decode %.1f tokens/s, %.1f MiB",
        what.name,
        runtime,
        prefill,
        dec,
        weights_mib,
    )
    return pd.DataFrame(rows)


def evaluate_gguf(
    path: Path,
    tokenizer,
    what: Evaluated,
    cfg: EvalConfig,
    data_root: str = "auto",
    context: int = 2048,
    corpus_ids: Optional[dict[str, Any]] = None,
    step: Optional[Callable[[], None]] = None,
) -> pd.DataFrame:
    """A GGUF in llama.cpp (evaluate_runtime), with the file's size."""
    from searchllm.evaluate import llamacpp

    models: dict[int, Any] = {}

    def score(windows: torch.Tensor) -> NLL:
        n = windows.shape[1]
        if n not in models:
            models.clear()  # one context at a time (logits of every position are n x vocab floats)
            models[n] = llamacpp.load(path, n)
        return llamacpp.perplexity(models[n], windows)

    def speed(ids: list[int], decode: int) -> tuple[float, float]:
        models.clear()
        return llamacpp.speed(path, ids, decode)

    size = path.stat().st_size / 2**20
    args = (tokenizer, cfg, data_root, corpus_ids, step)
    return evaluate_runtime(what, "llama.cpp", size, context, score, speed, *args)


def evaluate_vllm(
    path: Path,
    tokenizer,
    what: Evaluated,
    cfg: EvalConfig,
    data_root: str = "auto",
    corpus_ids: Optional[dict[str, Any]] = None,
    step: Optional[Callable[[], None]] = None,
    greedy: int = 32,
) -> pd.DataFrame:
    """A checkpoint served by vLLM (evaluate_runtime, one engine for every window) in the checkpoint's own
    dtype, as transformers loads it (vLLM's `auto` would halve a float32 checkpoint), with its greedy text
    after the first report window's first 32 tokens in the log."""
    from searchllm.evaluate.vllm_engine import Engine, kv_bytes

    config = json.loads((path / "config.json").read_text())
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "auto")
    context = int(config.get("max_position_embeddings") or 2048)
    lengths = [resolve_length(x, type("C", (), {"max_position_embeddings": context})()) for x in cfg.lengths]
    prompt = min(512, context - 65)  # the speed prompt and its 64 decoded tokens fit the context
    longest = max(lengths + [prompt + 64]) + 1  # vLLM samples one token after every scored window
    with Engine(path, longest, dtype, kv_bytes(config, longest)) as engine:

        def score(windows: torch.Tensor) -> NLL:
            if greedy and not texts:
                first = windows[0, :32].tolist()
                texts.append(tokenizer.decode(first + engine.greedy(first, greedy)))
                log.info("eval %s in vLLM %s, greedy: %r", what.name, engine.version, texts[0])
            return engine.perplexity(windows)

        texts: list[str] = []
        size = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
        args = (tokenizer, cfg, data_root, corpus_ids, step)
        return evaluate_runtime(
            what, f"vllm {engine.version}", size, context, score, engine.speed, *args, prompt=prompt
        )


def append_results(run_dir: Path, table: pd.DataFrame) -> pd.DataFrame:
    """Append to <run dir>/eval.parquet and eval.csv (written whole each time, atomically)."""
    p = run_dir / f"{RESULTS}.parquet"
    full = pd.concat([pd.read_parquet(p), table], ignore_index=True) if p.is_file() else table
    for ext, write in (
        ("parquet", lambda f: full.to_parquet(f, index=False)),
        ("csv", lambda f: full.to_csv(f, index=False)),
    ):
        tmp = run_dir / f"{RESULTS}.tmp.{ext}"
        write(tmp)
        os.replace(tmp, run_dir / f"{RESULTS}.{ext}")
    return full


def against_original(table: pd.DataFrame) -> pd.DataFrame:
    """`table` with each perplexity's ratio to the original model's on the same corpus, split and length
    (column `x_original`; rows of the same runtime only: transformers to transformers)."""
    if "metric" not in table or not (table.model == "original").any():
        return table
    hf = table[table.runtime.isna()] if "runtime" in table else table
    ok = hf[(hf.metric == "ppl") & (hf.status == "ok")]
    dense = {(r.task, r.split, r.seqlen): r.value for r in ok[ok.model == "original"].itertuples()}
    is_hf = table.runtime.isna() if "runtime" in table else pd.Series(True, index=table.index)
    ratio = [
        v / dense[(t, s, n)] if hf_row and m == "ppl" and st == "ok" and (t, s, n) in dense else None
        for t, s, n, v, m, st, hf_row in zip(
            table.task, table.split, table.seqlen, table.value, table.metric, table.status, is_hf
        )
    ]
    return table.assign(x_original=ratio)


def worst_domain(table: pd.DataFrame) -> dict[int, dict[str, Any]]:
    """Per window length: the held-out domain (config.DOMAINS) where the exported model's perplexity is the
    largest multiple of the original's, {seqlen: {domain, x_original}}; empty without both models' rows."""
    from searchllm.config import DOMAINS

    if "x_original" not in table:
        return {}
    rows = table[table.task.isin(DOMAINS) & table.x_original.notna() & (table.model != "original")]
    out = {}
    for n, r in rows.groupby("seqlen"):
        top = r.loc[r.x_original.astype(float).idxmax()]
        out[int(n)] = {"domain": top.task, "x_original": float(top.x_original)}
    return out


def format_table(table: pd.DataFrame) -> str:
    cols = [
        c
        for c in (
            "model",
            "metric",
            "task",
            "split",
            "seqlen",
            "windows",
            "tokens",
            "value",
            "x_original",
            "stderr",
            "params",
            "ratio",
            "seed",
            "status",
        )
        if c in table
    ]
    t = table[cols].copy()
    for c in ("seqlen", "windows", "tokens"):
        if c in t:
            t[c] = t[c].map(lambda v: "" if pd.isna(v) else str(int(v)))
    if "params" in t:
        t["params"] = t["params"].map(lambda v: f"{v / 1e6:.2f}M")
    for c in ("value", "x_original", "stderr", "ratio"):
        if c in t:
            t[c] = t[c].map(lambda v: "" if v is None or pd.isna(v) else f"{v:.4f}")
    t["status"] = t["status"].map(lambda s: s if len(s) < 60 else s[:57] + "...")
    return t.to_string(index=False)


# -- command line -----------------------------------------------------------------------------------------
@dataclass
class Target:
    checkpoint: Path
    run_dir: Optional[Path]
    out: Path


def locate(path: str) -> Target:
    """A run dir (its export/ is evaluated, results land in the run dir) or a checkpoint dir."""
    p = Path(path).expanduser()
    if p.suffix == ".gguf":  # evaluated in llama.cpp, with the tokenizer saved beside it
        if not p.is_file():
            raise EvalError(f"GGUF file {str(p)!r} does not exist")
        if not (p.parent / "tokenizer_config.json").is_file():
            raise EvalError(
                f"{str(p)!r} has no tokenizer beside it (tokenizer_config.json); searchllm's GGUF exports write one"
            )
        return Target(p, None, p.parent)
    if (p / "config.yaml").is_file():
        export = run_export_dir(p)
        if (export / "config.json").is_file():
            return Target(export, p, p)
    if (p / "config.json").is_file():
        return Target(p, None, p)
    if (p / "config.yaml").is_file():
        raise EvalError(
            f"run dir {str(p)!r} has no export in {str(export)!r} yet; finish the run (export.enabled=true) "
            "or give a checkpoint dir"
        )
    raise EvalError(f"{str(p)!r} is neither a checkpoint dir (config.json) nor a searchllm run dir; give one of those")


def run_export_dir(run: Path) -> Path:
    """Where a run dir's export is, by the export.dir in its config.yaml."""
    from omegaconf import OmegaConf

    return export_dir(run, OmegaConf.load(run / "config.yaml").get("export", {}).get("dir"))


def describe(model, checkpoint: Path) -> Evaluated:
    total, decoder = count_params(model)
    info = checkpoint / "searchllm_export.json"
    meta = json.loads(info.read_text()) if info.is_file() else {}
    return Evaluated(str(checkpoint), total, decoder, meta.get("original_params"), meta.get("original_decoder_params"))


def describe_gguf(path: Path) -> Evaluated:
    """Parameters stored in a GGUF (padding included), and the source's counts when searchllm wrote it."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    total = sum(int(t.n_elements) for t in reader.tensors)
    decoder = sum(int(t.n_elements) for t in reader.tensors if t.name.startswith("blk."))
    info = path.parent / "searchllm_export.json"
    meta = json.loads(info.read_text()) if info.is_file() else {}
    return Evaluated(str(path), total, decoder, meta.get("original_params"), meta.get("original_decoder_params"))


def describe_safetensors(checkpoint: Path) -> Evaluated:
    """Parameters stored in a checkpoint's safetensors (padding included: a vLLM export holds zeros), and
    the source's counts from the searchllm export it belongs to (beside it or one folder up)."""
    from safetensors import safe_open

    total = decoder = 0
    for f in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n = st.get_slice(k).get_shape()
                size = int(torch.Size(n).numel())
                total += size
                decoder += size if ".layers." in k else 0
    info = next((p for p in (checkpoint, checkpoint.parent) if (p / "searchllm_export.json").is_file()), None)
    meta = json.loads((info / "searchllm_export.json").read_text()) if info else {}
    return Evaluated(str(checkpoint), total, decoder, meta.get("original_params"), meta.get("original_decoder_params"))


def device_of(choice: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if choice == "auto" else choice
