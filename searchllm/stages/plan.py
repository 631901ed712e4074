"""The first two stages. plan: the search space, the budget, the strategy and the token windows, all
checked before any weights load (a bad ratio, format or export dir stops in seconds). load: the weights."""

from __future__ import annotations

import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Callable

from searchllm import strategies
from searchllm.config import Config
from searchllm.data import data_root, token_sets
from searchllm.export.formats import FORMATS, check_export_dir, check_format
from searchllm.export.vllm import check_biases
from searchllm.files import check_writable, existing_ancestor
from searchllm.models.adapters import Geometry
from searchllm.models.loading import LoadedModel, load, load_config_only, load_tokenizer, source_gguf
from searchllm.pruning.levels import LevelError, LevelSpace, implied_levels, predicted_bytes
from searchllm.pruning.space import Budget, BudgetError, SearchSpace
from searchllm.rundir import RunDir
from searchllm.search.baselines import bias_params
from searchllm.search.levelsearch import PROBE_STAGE, stage_tokens
from searchllm.stages.context import Plan
from searchllm.stages.search_joint import joint_costs


def plan(cfg: Config, run: RunDir, alongside: Callable[[], None] = lambda: None) -> Plan:
    """Everything checked before any weights load, and the run's token windows. `alongside` runs while the
    corpora are tokenized (the tokenizer leaves the GIL): the driver starts Ray there, ~3 s less on 2 cores."""
    check_paths(cfg, run)
    _, _, adapter = load_config_only(cfg.model, data_root(cfg.data.root))
    g = adapter.geometry()
    if cfg.levels.refit == "stream" and adapter.architecture().block.sandwich_norm:
        raise LevelError(
            f"levels.refit=stream cannot be solved for {adapter.config.model_type}: its blocks normalize the "
            "o/down output before the residual, so the stream is not linear in the refit weights; use "
            "levels.refit=module or dense"
        )
    s = cfg.space
    space = SearchSpace.for_target(
        g,
        cfg.budget.target,
        s.attention,
        s.attn_min,
        s.attn_max,
        s.attn_step,
        s.mlp_min,
        s.mlp_max,
        s.mlp_step,
        s.depth_min,
        s.round_to,
    )
    # Biases that reformation will add (reform.bias, where the family has none) are paid for from the budget.
    adds_bias = (cfg.reform.enabled and cfg.reform.bias) or cfg.search.compensate
    strategy = strategies.get(cfg.search.mode)
    if cfg.export.enabled:  # a format, type or export dir that cannot be written stops here, not after the search
        check_format(cfg.export.format, cfg.export.gguf_types, adapter.config.model_type)
        check_export_dir(run.export_dir(cfg.export.dir), cfg.export.overwrite)
    extra = (
        bias_params(space) if adds_bias and strategy.kind != "levels" and not strategy.compensates else 0
    )  # flap() budgets its own
    if cfg.export.enabled and "vllm" in FORMATS[cfg.export.format] and adds_bias and strategy.kind != "levels":
        check_biases(g.new_biases({"o_bias", "down_bias"}), adapter.config.model_type)
    if cfg.budget.size is not None:
        check_size(cfg, strategy.kind)
        joint_costs(cfg, adapter, load_tokenizer(cfg.model, data_root(cfg.data.root)))
    if strategy.kind == "levels":  # bad level settings and unreachable budgets stop here, before any weights load
        implied_levels(LevelSpace(g, cfg.levels), *level_band(cfg, g))
        check_database_fits(cfg, g, run)
    count = budget_count(cfg.budget.count, g)  # the config keeps `auto`: a resume resolves it again, the same way
    budget = Budget(cfg.budget.target - extra / space.total(count), cfg.budget.tol, count)
    lo, hi = space.bounds(budget.count)
    if budget.high < lo or budget.low > hi:
        raise BudgetError(space.infeasible_message(budget))
    selection = selection_sets(cfg) if strategy.kind == "levels" else {}
    with ThreadPoolExecutor(1) as pool:
        sets = pool.submit(token_sets, cfg, load_tokenizer(cfg.model, data_root(cfg.data.root)), selection)
        alongside()
        tokens, where = sets.result()
    return Plan(space, budget, strategy, tokens, where)


def check_size(cfg: Config, kind: str) -> None:
    """A byte budget is the level search's, written as one GGUF, with llama.cpp's quantizer at hand."""
    from searchllm.quant.ggml import lib

    if kind != "levels":
        raise BudgetError(
            f"budget.size={cfg.budget.size} is searched by the level search; drop search.mode={cfg.search.mode} "
            "(or method=...) or budget.size"
        )
    if not cfg.export.enabled or cfg.export.format not in ("gguf", "both"):
        raise BudgetError(
            f"budget.size={cfg.budget.size} sizes a GGUF file; add export.format=gguf (or both) to write it "
            f"(export.format={cfg.export.format}, export.enabled={cfg.export.enabled})"
        )
    if cfg.heal.enabled:
        raise BudgetError(
            f"budget.size={cfg.budget.size} chooses types for the search's weights, which a heal would change; "
            "set heal.enabled=false (heal first and search the healed model's GGUF, or heal without budget.size)"
        )
    lib()  # llama.cpp's quantizer: one line naming the install where it is missing


def budget_count(count: str, g: Geometry) -> str:
    """budget.count=auto: the decoder alone where embeddings and LM head are most of the model (a budget of
    the total would then cut most of the blocks), else the total, as the paper counts."""
    if count != "auto":
        return count
    return "decoder" if g.outer_params > g.total_params / 2 else "total"


def check_paths(cfg: Config, run: RunDir) -> None:
    """Every directory the run writes can be written, checked before anything (a GGUF conversion) loads."""
    check_writable(run.path, "run_dir")
    if cfg.export.enabled and cfg.export.dir:
        check_writable(Path(cfg.export.dir), "export.dir")
    if cfg.model.path == "smollm2" or source_gguf(cfg.model, None) is not None:  # converted into the cache
        check_writable(Path(cfg.model.cache_dir), "model.cache_dir")


def check_database_fits(cfg: Config, g: Geometry, run: RunDir) -> None:
    """Stop with one line when the level database cannot fit on the run dir's disk (what a resume already
    built of it counts as written), naming the settings that shrink it."""
    space = LevelSpace(g, cfg.levels)
    need = predicted_bytes(space)
    built = sum(f.stat().st_size for f in run.path.glob(f"levels/{cfg.levels.digest()}-*/layer-*.safetensors"))
    free = shutil.disk_usage(existing_ancestor(run.path)).free
    if need - built > free:
        fewer = replace(cfg.levels, mlp_levels=max(2, cfg.levels.mlp_levels // 2))
        smaller = predicted_bytes(LevelSpace(g, fewer))
        raise LevelError(
            f"the level database needs {gib(need - built)} more in {run.path / 'levels'} ({gib(need)} in all: "
            f"{g.num_layers} layers x ({space.attn_top} attention + {space.mlp_top} MLP levels) in "
            f"{cfg.levels.dtype}) but that disk has {gib(free)} free; free space, use a run_dir on a larger disk, "
            f"or set levels.mlp_levels={fewer.mlp_levels} ({gib(smaller)} in all)"
        )


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def float32_cut(cfg: Config, native_bf16: bool, local: bool) -> str | None:
    """levels.float32_share applied in place where levels.score_dtype=auto falls back to float32 (`native_bf16`:
    this CPU's; `local`: the Ray that scores runs here, on no GPU); the share becomes 1, so the config.yaml it
    goes into is not cut again on resume. A dtype set by hand is scored on the tokens set. Returns what changed."""
    lv = cfg.levels
    if lv.float32_share == 1 or not local or lv.score_dtype != "auto" or native_bf16:
        return None
    lv.tokens = [max(2, round(t * lv.float32_share)) for t in lv.tokens]
    lv.probe_tokens = max(2, round(lv.probe_tokens * lv.float32_share)) if lv.probe_tokens else 0
    lv.float32_share = 1.0
    return f"levels.tokens={lv.tokens} levels.probe_tokens={lv.probe_tokens}"


def selection_sets(cfg: Config) -> dict[str, tuple[int, str]]:
    """The level search's token sets: each selection stage's first windows of the fitness corpus holding its
    tokens, and the probes' own (levels.probe_tokens, set only then)."""
    sets = {stage_tokens(k): (t, f"levels.tokens[{k}]") for k, t in enumerate(cfg.levels.tokens)}
    if cfg.levels.probe_own_tokens:
        sets[stage_tokens(PROBE_STAGE)] = (cfg.levels.probe_own_tokens, "levels.probe_tokens")
    return sets


def level_band(cfg: Config, g: Geometry) -> tuple[int, int]:
    """The parameter counts (whole model) budget.target +- budget.tol allows, in budget.count's terms."""
    b = cfg.budget
    if budget_count(b.count, g) == "decoder":
        d = g.num_layers * g.layer_params
        return int(math.ceil(g.outer_params + (b.target - b.tol) * d)), int(g.outer_params + (b.target + b.tol) * d)
    return int(math.ceil((b.target - b.tol) * g.total_params)), int((b.target + b.tol) * g.total_params)


def load_model(cfg: Config) -> LoadedModel:
    return load(cfg.model, data_root(cfg.data.root))
