"""quantize + search under a byte budget (budget.size): the importance matrix of every weight's input on
calibration text, then the level search over pruning levels and llama.cpp tensor types together
(search.jointsearch); the best becomes the subnet with each weight's type, which the export writes as one
GGUF stitched from the same quantized rows. The matrix is saved in the run dir (a resume reuses it); the
quantized levels are made where they are scored, on the evaluators, deterministically from it."""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from searchllm.config import Config
from searchllm.data import data_root
from searchllm.export.formats import MIXED
from searchllm.export.gguf import llama3_rope_factors, metadata_bytes
from searchllm.files import writing
from searchllm.models.loading import source_gguf
from searchllm.models.sliced import LayerSlice
from searchllm.pruning.joint import (
    EMBED,
    GGUF_NAMES,
    INPUTS,
    KINDS,
    JointCosts,
    Layout,
    QuantLevelSpace,
)
from searchllm.pruning.levels import GenomeCodec, LevelSpace
from searchllm.pruning.shard import ShardRunner, ShardSpec
from searchllm.quant.types import QuantError, parse_size
from searchllm.search.jointsearch import JointSearch
from searchllm.search.levelsearch import PROBE_STAGE, fitness_metric, stage_tokens
from searchllm.stages.context import RunContext, Searched, Subnet
from searchllm.stages.report import write_search_report
from searchllm.stages.search_levels import (
    LevelEvaluator,
    level_manifest,
    record_best,
    scored_first,
    search_args,
    summarize_levels,
)

log = logging.getLogger("searchllm")


class JointCodec(GenomeCodec):
    """Joint genomes -> what a stage actor applies: each layer as (levels..., types..., embedding type);
    a plain (L, 2) genome (the dense targets) as levels alone."""

    def slices(self, genome: np.ndarray) -> list[tuple[int, ...]]:
        return [tuple(int(v) for v in row) for row in genome]


def importance(ctx: RunContext, state: dict, windows: int) -> dict:
    """The importance matrix: per layer and module input (qkv, o, mlp, down) the mean square of each input
    column over the first `windows` calibration windows of the dense model, and `output` (the final normed
    hidden state, the LM head's input). Saved in the run dir."""
    tokens = ctx.plan.tokens["calibration"][:windows]
    digest = hashlib.sha1(tokens.numpy().tobytes()).hexdigest()[:8]
    path = ctx.run.path / "quant" / f"imatrix-{digest}.npz"
    if path.is_file():
        try:
            return load_imatrix(path)
        except (OSError, ValueError, KeyError) as e:  # a cut file: it is derived data, computed again
            log.warning("importance matrix %s unreadable (%s): computing it again", path, e)
    t0 = time.perf_counter()
    arch = ctx.loaded.adapter.architecture()
    L = arch.geometry.num_layers
    runner = ShardRunner(arch, state, ShardSpec(0, L, True, True))
    sums: dict[tuple[int, str], torch.Tensor] = {}
    rows: dict[tuple[int, str], int] = {}

    def record(layer: int, key: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        k = (layer, key)
        sums[k] = sums.get(k, 0) + (x * x).sum(0)
        rows[k] = rows.get(k, 0) + x.shape[0]

    blocks = runner.blocks({i: LayerSlice.full(arch.geometry) for i in range(L)})
    with torch.no_grad():
        hidden = runner.run_blocks(blocks, runner.embed(tokens), ctx.batch, record=record)
        h = runner.final_norm(hidden).double().reshape(-1, hidden.shape[-1])
    out: dict = {}
    for (layer, key), s in sums.items():
        out.setdefault(layer, {})[key] = (s / rows[(layer, key)]).float().numpy()
    out["output"] = (h * h).mean(0).float().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    with writing(path, path.with_name(f".{path.stem}.tmp.npz")) as tmp:
        np.savez(
            tmp,
            **{f"{layer}:{key}": v for layer, d in out.items() if layer != "output" for key, v in d.items()},
            output=out["output"],
        )
    log.info(
        "importance matrix of %d layers on %d x %d calibration tokens in %.1fs",
        L,
        *tokens.shape,
        time.perf_counter() - t0,
    )
    return out


def load_imatrix(path: Path) -> dict:
    """An importance matrix saved by `importance`: {layer: {input: values}, "output": values}."""
    out: dict = {}
    with np.load(path) as z:
        for name in z.files:
            if name == "output":
                out["output"] = z[name]
            else:
                layer, key = name.split(":")
                out.setdefault(int(layer), {})[key] = z[name]
    return out


def layout(adapter, tokenizer, src: Path | None) -> Layout:
    """What the candidates' GGUF files hold besides their searched weights, measured on the writer itself."""
    c, arch = adapter.config, adapter.architecture()
    g = arch.geometry
    head_dim = g.head_dim
    full = (g.num_heads, g.num_kv_heads, g.intermediate)
    deci = [full] * (g.num_layers - 1) + [(g.num_heads, g.num_kv_heads, g.intermediate // 2)]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        kv_uniform = metadata_bytes(c, [full] * g.num_layers, Path(tmp), src, MIXED)
        kv_deci = metadata_bytes(c, deci, Path(tmp), src, MIXED)
    assert kv_uniform is not None, "a uniform subnet always has its family's arch"
    rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    theta = float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
    outer = [("output_norm.weight", (g.hidden,))]
    if llama3_rope_factors(rope, head_dim, theta) is not None:
        outer.append(("rope_freqs.weight", (head_dim // 2,)))
    return Layout(
        hidden=g.hidden,
        head_dim=head_dim,
        vocab=int(c.vocab_size),
        kv_uniform=kv_uniform,
        kv_deci=kv_deci,
        outer=outer,
        tied=bool(c.tie_word_embeddings),
        extras=set(arch.block_keys[0]),
        qwen2=c.model_type == "qwen2",
    )


def joint_costs(cfg: Config, adapter, tokenizer) -> tuple[JointCosts, tuple[int, int]]:
    """The byte costs of the run's candidates and the band of file sizes the budget allows; stops with one
    line (before any weights load) when no candidate can fit."""
    g = adapter.geometry()
    src = source_gguf(cfg.model, data_root(cfg.data.root))
    lay = layout(adapter, tokenizer, src)
    space = LevelSpace(g, cfg.levels)
    costs = JointCosts(space, tuple(cfg.quant.types), lay, lock_levels=lay.kv_deci is None)
    hi = parse_size(cfg.budget.size).resolve(g.total_params)
    L = g.num_layers
    low = (
        (space.attn_top, space.mlp_top)
        if costs.lock_levels
        else min(
            ((a, m) for a in range(space.attn_top + 1) for m in range(space.mlp_top + 1) if a or m),
            key=lambda p: costs.params(np.tile(p, (L, 1))),
        )
    )
    smallest = np.zeros((L, EMBED + 1), dtype=np.int64)
    smallest[:, :2] = low
    for col in range(2, EMBED + 1):
        for i in range(L):
            smallest[i, col] = costs.choices(i, col, smallest)[0]
    if costs.bytes(smallest) > hi:
        raise QuantError(
            f"budget.size={cfg.budget.size} ({hi / 2**20:.2f} MiB) is below the smallest file this model can be "
            f"({costs.bytes(smallest) / 2**20:.2f} MiB: every block at its lowest level"
            + (" (its family has no llama.cpp arch for per-layer sizes: none pruned)" if costs.lock_levels else "")
            + ", every weight at the smallest of quant.types); raise budget.size"
        )
    return costs, (0, hi)  # any file that fits: stepping up a type can add error (re-quantizing a source grid)


def gguf_choice(costs: JointCosts, genome: np.ndarray, space: QuantLevelSpace, db) -> tuple[dict, dict]:
    """The best genome's types (GGUF name -> type asked for) and importance matrices by GGUF name (the
    kept columns of o and down), as the export writes them."""
    types = {n: t for n, s, t in costs.tensors(genome) if len(s) == 2}
    imatrix: dict[str, np.ndarray] = {}
    g = db.space.geometry
    for i, (a, m) in enumerate(genome[:, :2]):
        s = db.layers[i].slice(db.space, int(a), int(m))
        for kind in KINDS:
            name = f"blk.{i}.{GGUF_NAMES[kind]}.weight"
            kept = s.kept_inputs(kind, g) if kind in ("o", "down") else None
            imat = space.input_imatrix(i, kind, kept)
            if name in types and imat is not None:
                imatrix[name] = imat
    if "output" in space.imatrix:  # the LM head's input; the tied embedding is the head too
        imatrix["output.weight" if "output.weight" in types else "token_embd.weight"] = space.imatrix["output"]
    return types, imatrix


def run(ctx: RunContext) -> None:
    cfg, pool, lv, batch = ctx.cfg, ctx.need_pool(), ctx.cfg.levels, ctx.batch
    assert ctx.database is not None and cfg.budget.size is not None, "the joint search runs after the database"
    space, db = ctx.database.space, ctx.database.db
    ctx.monitor.stage("quantizing")
    costs, byte_band = joint_costs(cfg, ctx.loaded.adapter, ctx.loaded.tokenizer)
    hi = byte_band[1]
    state = pool.original_state()
    imatrix = importance(ctx, state, cfg.quant.imatrix_windows)
    errors = quant_errors(ctx, state, costs, imatrix)
    del state
    qspace = QuantLevelSpace(space, tuple(cfg.quant.types), imatrix, cfg.quant.cache_mb * 2**20)
    codec, full = JointCodec(), space.full()
    pool.set_levels(qspace, db.layers, lv.cache_mb * 2**20)
    metric = fitness_metric(lv.fitness)
    stages = [stage_tokens(k) for k in range(len(lv.tokens))]
    if metric == "kl":
        for w in stages + ([stage_tokens(PROBE_STAGE)] if lv.probe_own_tokens else []):
            pool.set_targets(codec, full, w, lv.topk, batch)
    ctx.monitor.stage("searching")
    t0 = time.perf_counter()
    evaluator = LevelEvaluator(pool, codec, batch, metric)
    search = JointSearch(costs, byte_band, *search_args(ctx, evaluator, cfg.quant.generations, lambda x: x[:, :2]))
    inits = starting_points(search, costs, space, errors, np.random.default_rng(cfg.search.seed))
    result = search.run_search(inits)
    wall = time.perf_counter() - t0
    best = result.best
    dense_rep, best_rep = (
        nll.ppl for _, nll, _ in sorted(pool.stream(codec, [full, best], "report", batch), key=lambda x: x[0])
    )
    structure = summarize_levels(db, best[:, :2])
    written = costs.effective_types(best)
    by_type: dict[str, int] = {}
    for n, s, t in costs.tensors(best):
        if len(s) == 2:
            by_type[written[n]] = by_type.get(written[n], 0) + int(np.prod(s))
    quant = {
        "budget": cfg.budget.size,
        "budget_bytes": hi,
        "bytes": costs.bytes(best),
        "embedding_type": written["token_embd.weight"],
        "params_by_type": by_type,
        "types": {k: v for k, v in written.items()},
        "arch": "uniform" if costs.uniform(best) else "deci",
    }
    rows = record_best(ctx, result, structure, wall, dense_rep, best_rep, {"quant": quant})
    print(
        f"\nbest file: {quant['bytes'] / 2**20:.2f} MiB of {hi / 2**20:.2f} MiB ({cfg.budget.size}), "
        f"kept {result.ratio:.4f} of the parameters, embedding {quant['embedding_type']}, "
        + ", ".join(f"{t} {n / 1e6:.1f}M" for t, n in sorted(by_type.items(), key=lambda x: -x[1]))
        + f"\n  after {result.generations} generations / {result.evaluations} evaluations in {wall:.0f}s; "
        f"fitness ({lv.fitness}): {result.fitness:.5f}\n"
        f"  report ppl ({rows[0]['corpus']}): dense {dense_rep:.2f} -> quantized subnet {best_rep:.2f}"
    )
    write_search_report(ctx)
    ctx.searched = Searched(result, dense_rep, best_rep, wall, rows)
    scored = scored_first(ctx)
    manifest = level_manifest(ctx, result, structure, [o for _, o in inits if o in scored], wall)
    manifest["quant"] = quant
    types, imat = gguf_choice(costs, best, qspace, db)
    ctx.subnet = Subnet(
        db.slices(best[:, :2]),
        db.overrides(best[:, :2]),
        result.params,
        {"original": dense_rep, "searched": best_rep},
        manifest,
        "chosen by the joint search",
        (types, imat),
    )


def quant_errors(ctx: RunContext, state: dict, costs: JointCosts, imatrix: dict) -> dict:
    """Per weight of the whole model and per type it can take: the importance-weighted squared error of
    quantizing it (sum_j imatrix_j ||W[:, j] - Q(W)[:, j]||^2, the output error llama.cpp's quantizer
    minimizes), for generation 0's allocation. Quantized on the driver's threads (libggml releases the GIL);
    saved in the run dir."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    from searchllm.quant.ggml import roundtrip

    path = ctx.run.path / "quant" / f"errors-{hashlib.sha1(repr(costs.types).encode()).hexdigest()[:8]}.json"
    if path.is_file():
        raw = json.loads(path.read_text())
        return {tuple(map(int, k.split(":"))): {int(t): v for t, v in e.items()} for k, e in raw.items()}
    arch = ctx.loaded.adapter.architecture()
    L = arch.geometry.num_layers
    full = np.zeros((L, EMBED + 1), dtype=np.int64)
    full[:, :2] = costs.space.top
    jobs = []
    for i in range(L):
        for j, kind in enumerate(KINDS):
            w = state[arch.block_keys[i][kind]].float().numpy()
            for k in costs.choices(i, 2 + j, full):
                jobs.append(((i, 2 + j), k, w, imatrix[i][INPUTS[kind]]))
    head = state[arch.outer_keys["lm_head"]].float().numpy()
    jobs += [((0, EMBED), k, head, imatrix["output"]) for k in costs.choices(0, EMBED, full)]

    def error(job) -> float:
        _, k, w, imat = job
        d = roundtrip(w, costs.types[k], imat) - w
        return float((imat.astype(np.float64) * (d.astype(np.float64) ** 2).sum(0)).sum())

    t0 = time.perf_counter()
    with (
        ctx.monitor.bar(len(jobs), "quantization errors", "tensor") as bar,
        ThreadPoolExecutor(max(1, torch.get_num_threads())) as ex,
    ):
        out: dict = {}
        for job, err in zip(jobs, ex.map(error, jobs)):
            out.setdefault(job[0], {})[job[1]] = err
            bar.update(1)
    log.info("quantization errors of %d tensor types in %.1fs", len(jobs), time.perf_counter() - t0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({f"{i}:{c}": {str(t): v for t, v in e.items()} for (i, c), e in out.items()}))
    return out


def starting_points(search: JointSearch, costs: JointCosts, space, errors: dict, rng) -> list[tuple[np.ndarray, str]]:
    """Generation 0: every layer whole with each of the three largest embedding types that leave room, the
    other types allocated by quantization error per byte (JointSearch.allocate); the same whole model with
    one type everywhere (the uniform baseline); and the two uniform pruned level pairs with the most
    parameters whose file fits, allocated the same way."""
    L, out = space.num_layers, []
    top = np.tile(space.top, (L, 1))
    probe = np.zeros((L, EMBED + 1), dtype=np.int64)
    probe[:, :2] = top
    embeds = costs.choices(0, EMBED, probe)[::-1]  # the most bytes first
    for e in embeds:
        genome = search.allocate(top, e, errors)
        if genome is not None:
            out.append((genome, f"keep everything, {costs.types[e]} embedding, types by error per byte"))
        if len(out) == 3:
            break
    uniform = search.fill(top, rng)
    if uniform is not None:
        out.append((uniform, f"keep everything, {costs.types[int(uniform[0, 2])]} everywhere"))
    if costs.lock_levels:  # no llama.cpp arch for per-layer sizes of this family: types alone
        return out
    pairs = [(a, m) for a in range(space.attn_top, -1, -1) for m in range(space.mlp_top, -1, -1) if a or m]
    pairs.sort(key=lambda p: -costs.params(np.tile(p, (L, 1))))
    pruned = 0
    for a, m in pairs[1:]:
        levels = np.tile([a, m], (L, 1))
        genome = next((g for e in embeds if (g := search.allocate(levels, e, errors)) is not None), None)
        if genome is not None:
            t = costs.types[int(genome[0, EMBED])]
            out.append((genome, f"attention level {a}, MLP level {m} in every layer, {t} embedding"))
            pruned += 1
        if pruned == 2:
            break
    return out
