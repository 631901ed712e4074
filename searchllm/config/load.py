"""Loading and checking a run's configuration: defaults, conf/*.yaml, `key=value` overrides, validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, cast

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from searchllm.config.sections import (
    CHOICES,
    CONF,
    DEFAULT_CONFIG,
    DOMAINS,
    DTYPES,
    METHOD_DIR,
    METHODS,
    MIX,
    Config,
    ConfigError,
    CorpusConfig,
    HealConfig,
    parse_corpus,
    parse_mix,
    resolve_length,
    teacher_top_k,
)
from searchllm.quant.types import QuantError, check_types, parse_size

# Overrides allowed when resuming: they change how the run is executed, not what it computes.
RESUMABLE_PREFIXES = (
    "ray.",
    "resume",
    "search.generations",
    "quant.generations",
    "reform.",
    "export.",
    "eval.",
    "monitor.",
    "heal.",
)


def _merge(base: DictConfig, layer: Any, where: str) -> DictConfig:
    try:
        merged = OmegaConf.merge(base, layer)
        assert isinstance(merged, DictConfig)
        return merged
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        if isinstance(e, ConfigKeyError):
            raise ConfigError(f"unknown config key {key!r} ({where}); see conf/default.yaml for the keys") from None
        raise ConfigError(f"bad value for {key!r} ({where}): {msg}") from None


def parse_overrides(argv: list[str]) -> tuple[Optional[str], list[str]]:
    config_file, dotlist, it = None, [], iter(argv)
    for arg in it:
        if arg == "--config":
            config_file = next(it, None)
            if config_file is None:
                raise ConfigError("--config needs a file path, e.g. --config conf/default.yaml")
        elif arg.startswith("--config="):
            config_file = arg.split("=", 1)[1]
        elif "=" in arg and not arg.startswith("-"):
            dotlist.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}; use --config FILE and key=value overrides")
    return config_file, dotlist


def _load_yaml(path: Path) -> DictConfig:
    """A config file that must hold a mapping of keys; the error names the file, never its contents."""
    import yaml

    try:
        data = yaml.safe_load(path.read_bytes())
        node = OmegaConf.load(path) if isinstance(data, dict) else None
    except (yaml.YAMLError, UnicodeDecodeError, OmegaConfBaseException) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML{at}; fix it or pass another with --config"
        ) from None
    if data is None:  # an empty file: no keys
        return OmegaConf.create({})
    if not isinstance(node, DictConfig):
        raise ConfigError(
            f"config file {str(path)!r} holds a {type(data).__name__}, not a mapping of config keys "
            "(key: value lines, as conf/default.yaml)"
        )
    return node


def load_config(argv: list[str], base_file: Optional[Path] = None) -> Config:
    config_file, dotlist = parse_overrides(argv)
    cfg = OmegaConf.structured(Config)
    path = Path(config_file) if config_file else (base_file or DEFAULT_CONFIG)
    if config_file and not path.is_file() and (CONF / path.name).is_file():  # `--config paper.yaml` after a pip install
        path = CONF / path.name
    if path.is_dir():
        found = sorted(f.name for f in path.glob("*.yaml"))[:3]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise ConfigError(
            f"--config {str(path)!r} is a directory{hint}; pass a YAML file, e.g. --config conf/default.yaml"
        )
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing YAML with --config")
    cfg = _merge(cfg, _load_yaml(path), str(path))
    method = next((item.split("=", 1)[1] for item in dotlist if item.startswith("method=")), None)
    if method is not None:
        preset = METHOD_DIR / f"{method}.yaml"
        if method not in METHODS or not preset.is_file():
            raise ConfigError(f"method={method!r} is not allowed; choose one of: {', '.join(METHODS)}")
        cfg = _merge(cfg, OmegaConf.load(preset), str(preset))
    cfg = _merge(cfg, parse_dotlist(dotlist), "command line")
    try:
        obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as e:  # an interpolation (${...}) that resolves to nothing, ...
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"bad value for {key!r} (command line): {str(e).splitlines()[0]}") from None
    validate(obj)
    return obj


def parse_dotlist(dotlist: list[str]) -> DictConfig:
    """key=value overrides as a config; a value that is not YAML (an unclosed bracket or quote) is named."""
    import yaml

    for item in dotlist:
        try:
            OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError) as e:
            key, _, value = item.partition("=")
            what = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(
                f"cannot parse the override {item!r} ({what}); write {key}=VALUE with a plain value, [a,b] for a "
                "list, and quote values holding brackets or colons"
            ) from None
    try:
        return OmegaConf.from_dotlist(dotlist)
    except (OmegaConfBaseException, ValueError, TypeError) as e:  # `a=[]` then `a.x=0`: a list given a key
        raise ConfigError(f"the overrides {dotlist} contradict each other ({str(e).splitlines()[0]})") from None


def validate(c: Config) -> None:
    from searchllm import strategies  # the registered strategies (their modules import this one's neighbours)

    node = OmegaConf.structured(c)  # once: building it takes ~0.25 s
    for key, allowed in (CHOICES | {"search.mode": strategies.names()}).items():
        value = OmegaConf.select(node, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")
    if not 0 < c.budget.target <= 1:
        raise ConfigError(f"budget.target={c.budget.target} must be in (0, 1]: the kept share of parameters")
    if not 0 <= c.budget.tol < 1:
        raise ConfigError(f"budget.tol={c.budget.tol} must be in [0, 1)")
    if c.budget.size is not None:
        try:
            parse_size(c.budget.size)
            check_types(c.quant.types)
        except QuantError as err:
            raise ConfigError(str(err)) from None
        if c.levels.heads != "equal":
            raise ConfigError(
                f"budget.size needs levels.heads=equal (got {c.levels.heads!r}): unequal query heads per KV group "
                "are zero-padded in GGUF and quantization would not keep the padding zero"
            )
    q = c.quant
    if q.imatrix_windows < 1 or q.generations < 1 or q.cache_mb < 0:
        raise ConfigError(
            f"quant.imatrix_windows={q.imatrix_windows} and quant.generations={q.generations} must be >= 1, "
            f"quant.cache_mb={q.cache_mb} >= 0"
        )
    for key in ("attn", "mlp"):
        lo, hi, step = getattr(c.space, f"{key}_min"), getattr(c.space, f"{key}_max"), getattr(c.space, f"{key}_step")
        if lo is not None and not 0 < lo <= hi:
            raise ConfigError(f"space.{key}_min={lo} must be in (0, space.{key}_max={hi}]")
        if not 0 < hi <= 1:
            raise ConfigError(f"space.{key}_max={hi} must be in (0, 1]")
        if not 0 < step <= 1:
            raise ConfigError(f"space.{key}_step={step} must be in (0, 1]")
    s = c.search
    for key in ("generations", "population", "parents", "max_tries"):
        if getattr(s, key) < 1:
            raise ConfigError(f"search.{key}={getattr(s, key)} must be >= 1")
    if s.mutations < 0 or s.crossovers < 0 or s.mutations + s.crossovers > s.population:
        raise ConfigError(
            f"search.mutations={s.mutations} + search.crossovers={s.crossovers} must be >= 0 and <= "
            f"search.population={s.population}"
        )
    if s.parents > s.population:
        raise ConfigError(f"search.parents={s.parents} must be <= search.population={s.population}")
    for key in ("prob_mask_init", "prob_ratio_init", "prob_mask", "prob_ratio", "prob_depth", "alpha"):
        if not 0 <= getattr(s, key) <= 1:
            raise ConfigError(f"search.{key}={getattr(s, key)} must be in [0, 1]")
    for name in ("calibration", "fitness", "report"):
        corpus: CorpusConfig = getattr(c.data, name)
        if corpus.samples < 0 or corpus.seqlen < 2:
            raise ConfigError(f"data.{name}: samples={corpus.samples} must be >= 0 and seqlen={corpus.seqlen} >= 2")
        if corpus.name in ("text", "hf") and not corpus.path:
            raise ConfigError(
                f"data.{name}.name={corpus.name} needs data.{name}.path=<a local text file | a hub dataset id>"
            )
        if corpus.name == MIX and not corpus.mix:
            raise ConfigError(f"data.{name}.name=mix needs data.{name}.mix=[SOURCE=WEIGHT,...]")
        if corpus.name in DOMAINS and name != "report":
            raise ConfigError(
                f"data.{name}.name={corpus.name} is a held-out evaluation domain; calibrate and select on other text"
            )
        parse_mix(list(corpus.mix), f"data.{name}.mix")
    gen = c.data.generate
    if not gen.temperature >= 0 or not 0 < gen.top_p <= 1 or gen.batch < 1 or gen.chat not in ("auto", "on", "off"):
        raise ConfigError(
            f"data.generate: temperature={gen.temperature} must be >= 0, top_p={gen.top_p} in (0, 1], "
            f"batch={gen.batch} >= 1 and chat={gen.chat!r} one of auto, on, off"
        )
    if c.data.fitness.samples < 1 or c.data.calibration.samples < 1:
        raise ConfigError("data.fitness.samples and data.calibration.samples must be >= 1")
    lv = c.levels
    if not lv.tokens or any(not isinstance(t, int) or t < 2 for t in lv.tokens):
        raise ConfigError(
            f"levels.tokens={list(lv.tokens)} must be a non-empty list of token counts >= 2, one per selection stage, "
            "e.g. [512,2048,8192]"
        )
    if len(lv.survivors) != len(lv.tokens) - 1 or any(n < 1 for n in lv.survivors):
        raise ConfigError(
            f"levels.survivors={list(lv.survivors)} must list {len(lv.tokens) - 1} counts >= 1 "
            f"(how many candidates each stage but the last of levels.tokens={list(lv.tokens)} passes on)"
        )
    for key in ("offspring", "parents", "topk", "max_tries", "mlp_levels", "obs_group", "fisher_windows"):
        if getattr(lv, key) < 1:
            raise ConfigError(f"levels.{key}={getattr(lv, key)} must be >= 1")
    if not 0 < lv.float32_share <= 1:
        raise ConfigError(f"levels.float32_share={lv.float32_share} must be in (0, 1] (1: the same tokens everywhere)")
    if lv.cache_mb < 0:
        raise ConfigError(f"levels.cache_mb={lv.cache_mb} must be >= 0 (0: no prefix cache)")
    if lv.probe < 0 or lv.probe_tokens < 0 or lv.probe_tokens == 1:
        raise ConfigError(
            f"levels.probe={lv.probe} must be >= 0 (0: no sensitivity probes) and "
            f"levels.probe_tokens={lv.probe_tokens} "
            "0 (the first stage's tokens) or a token count >= 2"
        )
    if not 0 <= lv.crossover <= 1 or lv.obs_damp <= 0 or lv.damp < 0:
        raise ConfigError(
            f"levels.crossover={lv.crossover} must be in [0, 1], levels.obs_damp={lv.obs_damp} > 0 and "
            f"levels.damp={lv.damp} >= 0"
        )
    f = c.reform
    if f.final_windows < 0:
        raise ConfigError(f"reform.final_windows={f.final_windows} must be >= 0 (0: the fitness windows)")
    if f.finalists < 1:
        raise ConfigError(f"reform.finalists={f.finalists} must be >= 1 (1: reform only the search's best)")
    if f.damp < 0 or f.rho <= 0 or f.iters < 1:
        raise ConfigError(f"reform.damp={f.damp} must be >= 0, reform.rho={f.rho} > 0 and reform.iters={f.iters} >= 1")
    if c.export.dtype is not None and c.export.dtype not in DTYPES:
        raise ConfigError(
            f"export.dtype={c.export.dtype!r} is not allowed; choose one of: {', '.join(DTYPES)} (or null: model.dtype)"
        )
    e = c.eval
    if e.batch < 1 or e.max_windows < 0 or e.streams < 0 or (e.task_limit is not None and e.task_limit < 1):
        raise ConfigError(
            f"eval.batch={e.batch} must be >= 1, eval.max_windows={e.max_windows} >= 0, eval.streams={e.streams} "
            f">= 0 (0: auto) and eval.task_limit={e.task_limit} >= 1 or null"
        )
    if e.corpora and not e.lengths:
        raise ConfigError(
            f"eval.lengths=[] leaves eval.corpora={list(e.corpora)} without a window length; give one, e.g. "
            "eval.lengths=[128,2048]"
        )
    try:
        for spec in e.corpora:
            parse_corpus(spec)
        for length in e.lengths:
            if length != "full":
                resolve_length(length, None)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if c.space.round_to < 1 or (c.space.attention == "channels" and c.space.round_to > 1 and c.space.round_to % 2):
        raise ConfigError(
            f"space.round_to={c.space.round_to} must be 1 or an even number >= 2 (kept head dims come in rotary "
            "pairs), e.g. 8, 64 or 128"
        )
    validate_heal(c.heal)
    if not c.monitor.log_every > 0 or c.monitor.summary_every < 1:
        raise ConfigError(
            f"monitor.log_every={c.monitor.log_every} must be > 0 (seconds) and monitor.summary_every="
            f"{c.monitor.summary_every} >= 1"
        )
    if c.heal.candidates > 1 and strategies.get(c.search.mode).kind != "levels":
        raise ConfigError(
            f"heal.candidates={c.heal.candidates} chooses among the level search's final parents; search.mode="
            f"{c.search.mode} chooses after reformation (reform.finalists): set heal.candidates=1"
        )
    r = c.ray
    for key in ("replicas", "stages", "threads", "in_flight"):
        value = getattr(r, key)
        if (value != "auto" or key == "in_flight") and not (isinstance(value, int) and value >= 1):
            raise ConfigError(f"ray.{key}={value!r} must be an integer >= 1{' or auto' if key != 'in_flight' else ''}")
    if r.placement_timeout <= 0 or r.max_restarts < 0 or r.streams < 0:
        raise ConfigError(
            f"ray.placement_timeout={r.placement_timeout} must be > 0, ray.max_restarts={r.max_restarts} >= 0 and "
            f"ray.streams={r.streams} >= 0 (0: auto)"
        )


def validate_heal(h: HealConfig) -> None:
    for key in ("tokens", "seqlen", "batch", "workers", "chunk", "checkpoint_every", "eval_every", "candidates"):
        if not getattr(h, key) >= 1:
            raise ConfigError(f"heal.{key}={getattr(h, key)} must be an integer >= 1")
    if h.seqlen < 2:
        raise ConfigError(f"heal.seqlen={h.seqlen} must be >= 2 (a next token to predict)")
    if h.batch % h.workers:
        raise ConfigError(
            f"heal.batch={h.batch} must be a multiple of heal.workers={h.workers} (each worker takes an equal share)"
        )
    if h.tokens < h.batch * h.seqlen:
        raise ConfigError(
            f"heal.tokens={h.tokens} is less than one step of heal.batch x heal.seqlen = {h.batch * h.seqlen} tokens"
        )
    if h.candidates > 1 and h.candidate_tokens < h.batch * h.seqlen:
        raise ConfigError(
            f"heal.candidate_tokens={h.candidate_tokens} is less than one step of heal.batch x heal.seqlen = "
            f"{h.batch * h.seqlen} tokens"
        )
    if not (h.lr > 0 and 0 <= h.min_lr <= h.lr):
        raise ConfigError(f"heal.lr={h.lr} must be > 0 and heal.min_lr={h.min_lr} in [0, heal.lr]")
    for key in ("warmup", "eval_windows", "weight_decay", "clip", "ce"):
        if not getattr(h, key) >= 0:
            raise ConfigError(f"heal.{key}={getattr(h, key)} must be >= 0")
    if not h.temperature > 0:
        raise ConfigError(f"heal.temperature={h.temperature} must be > 0")
    if teacher_top_k(h.teacher) is None and h.teacher != "live":
        raise ConfigError(f"heal.teacher={h.teacher!r} must be live or cached:K with K >= 1 (e.g. cached:64)")
    if h.cpus_per_worker != "auto" and not (isinstance(h.cpus_per_worker, int) and h.cpus_per_worker >= 1):
        raise ConfigError(f"heal.cpus_per_worker={h.cpus_per_worker!r} must be an integer >= 1 or auto")
    if h.generated is not None and not 0 <= h.generated < 1:
        raise ConfigError(f"heal.generated={h.generated} is a share of the heal windows: set it in [0, 1) or null")
    for source, _ in parse_mix(list(h.mix), "heal.mix") if h.mix else []:
        if source is not None and source.split == "test":
            raise ConfigError(
                f"heal.mix names {source.name}:test; healing never trains on a test split (the reported text): use "
                "train or validation"
            )


def check_resume_overrides(argv: list[str]) -> None:
    _, dotlist = parse_overrides(argv)
    for item in dotlist:
        key = item.split("=", 1)[0]
        if not key.startswith(RESUMABLE_PREFIXES):
            raise ConfigError(
                f"{key!r} cannot change on resume (the run's saved config.yaml decides it); only ray.*, monitor.*, "
                "search.generations, quant.generations, reform.*, heal.*, export.* and eval.* can"
            )


def differing_keys(saved: Config, wanted: Config) -> list[tuple[str, Any, Any]]:
    """Keys that decide what a run computes and differ between two configs (execution keys excluded)."""
    a, b = (flatten(cast(dict, OmegaConf.to_container(OmegaConf.structured(c)))) for c in (saved, wanted))
    skip = RESUMABLE_PREFIXES + ("run_dir",)
    return [
        (k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if not k.startswith(skip) and a.get(k) != b.get(k)
    ]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def to_yaml(c: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(c))
