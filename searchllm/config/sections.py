"""The settings: every stage's dataclass, the run's Config that holds them, and the allowed values."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

from searchllm.quant.types import LADDER as QUANT_LADDER

REPO = Path(__file__).resolve().parent.parent.parent
# conf/ of a checkout (editable install), else the copy a wheel installs as searchllm/conf (pyproject).
CONF = REPO / "conf" if (REPO / "conf").is_dir() else Path(__file__).resolve().parent.parent / "conf"
DEFAULT_CONFIG = CONF / "default.yaml"
METHOD_DIR = CONF / "method"
# Corpora by name. code, docs and chat are the held-out evaluation domains (data.DOMAINS: the Python standard
# library's source, its reference documentation, and English conversations in the model's chat template):
# calibration, fitness and selection may never read them.
DOMAINS = ("code", "docs", "chat")
CORPORA = ("wikitext2", "wikitext2-raw", "ptb", "c4", "text", "hf", *DOMAINS)
MIX = "mix"  # data.<role>.name for a weighted mixture of sources (data.<role>.mix)
GENERATED = "generated"  # a data.<role>.mix source: text sampled from the dense model itself (data.generate)
DTYPES = ("float32", "bfloat16", "float16")
# How the subnet is chosen: the level search over the compensated level database (levels.py, levelsearch.py),
# the paper's evolution or random search over masks (evolution.py), or a baseline chosen outright (baselines.py).
LEVEL_FITNESS = ("kl", "ppl")
LEVEL_INITS = ("all", "uniform", "errors")
SEARCH_INITS = ("uniform", "flap")  # generation 0 of the evolution: the paper's uniform subnet, or it and FLAP's
METHODS = ("searchllm", "paper", "uniform", "flap", "random", "layerdrop")  # presets in conf/method/<name>.yaml
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    pass


# Settings of each stage: plain dataclasses the stages read and the run config below extends.
# -- the evaluation (evaluate)
DEFAULT_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


class EvalError(ValueError):
    pass


@dataclass
class EvalConfig:
    enabled: bool = True  # a driver step after export (the original and the exported model)
    original: bool = True  # evaluate the original model too (a benchmark of many runs measures it once)
    # "name:split" of data.CORPORA (local files under data.root, else the hub), or "text:<path>".
    # The held-out domains (code, docs, chat) are read by name alone; the report's worst-domain ratio is over them.
    corpora: list[str] = field(
        default_factory=lambda: ["wikitext2-raw:test", "ptb:test", "c4:validation", "code", "docs", "chat"]
    )
    # Window lengths; "full" is the model's context (max_position_embeddings).
    lengths: list[str] = field(default_factory=lambda: ["128", "full"])
    max_windows: int = 0  # 0: every window of the split (the standard protocol); > 0: the first N
    missing: str = "skip"  # a corpus that cannot be loaded: skip (a row says why) | error
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))  # lm-eval zero-shot tasks
    task_limit: Optional[int] = None  # examples per task (None: all)
    include_path: Optional[str] = None  # extra lm-eval task YAMLs (local, offline tasks)
    batch: int = 1  # windows per forward pass
    streams: int = 0  # perplexity passes at once on CPU, sharing the threads (0: 2 where >= 2 threads; 1 on CUDA)
    seed: int = 0  # lm-eval's seed
    device: str = "auto"  # auto: CUDA where present


def resolve_length(length: str | int, model_config) -> int:
    if str(length) == "full":
        n = getattr(model_config, "max_position_embeddings", None)
        if not n:
            raise EvalError(
                "eval.lengths has 'full' but the model config has no max_position_embeddings; give a number"
            )
        return int(n)
    try:
        n = int(length)
    except ValueError:
        raise EvalError(f"eval.lengths entry {length!r} is not a number or 'full'") from None
    if n < 2:
        raise EvalError(f"eval.lengths entry {n} must be >= 2")
    return n


def parse_source(spec: str, key: str) -> tuple[Optional[CorpusConfig], float]:
    """One data.<role>.mix entry "SOURCE=WEIGHT" -> (the corpus, None for generated text; its weight)."""
    source, sep, weight = spec.rpartition("=")
    try:
        w = float(weight) if sep else float("nan")
    except ValueError:
        w = float("nan")
    if not sep or not source or not w >= 0:
        raise ConfigError(
            f"{key} entry {spec!r} is not SOURCE=WEIGHT with a weight >= 0, e.g. wikitext2:validation=0.5"
        )
    if source == GENERATED:
        return None, w
    name, _, rest = source.partition(":")
    if name not in CORPORA:
        raise ConfigError(
            f"{key} entry {spec!r}: unknown corpus {name!r}; choose from {', '.join(CORPORA)} or {GENERATED}"
        )
    if name in DOMAINS:
        raise ConfigError(f"{key} entry {spec!r}: {name} is a held-out evaluation domain; calibrate on other text")
    if name == "text":
        if not rest or not Path(rest).expanduser().is_file():
            raise ConfigError(f"{key} entry {spec!r}: text needs an existing file, text:<path>=WEIGHT")
        return CorpusConfig(name="text", split="train", path=rest), w
    if name == "hf":
        return hf_corpus(rest, spec, key), w
    return CorpusConfig(name=name, split=rest or "validation"), w


def hf_corpus(rest: str, spec: str, key: str, error: type[ValueError] = ConfigError) -> CorpusConfig:
    """Any `datasets` corpus with a text column: hf:<dataset>[#<config>]:<split>."""
    dataset, _, split = rest.rpartition(":")
    if not dataset or not split:
        raise error(
            f"{key} entry {spec!r}: a hub dataset is hf:<dataset>[#<config>]:<split>, e.g. hf:allenai/c4#en:train"
        )
    return CorpusConfig(name="hf", split=split, path=dataset)


def parse_mix(entries: list[str], key: str) -> list[tuple[Optional[CorpusConfig], float]]:
    parts = [parse_source(e, key) for e in entries]
    if parts and not sum(w for _, w in parts) > 0:
        raise ConfigError(f"{key}={list(entries)}: the weights must sum to a positive number")
    return parts


def parse_corpus(spec: str) -> CorpusConfig:
    name, _, rest = spec.partition(":")
    if name not in CORPORA:
        raise EvalError(
            f"eval.corpora entry {spec!r}: unknown corpus {name!r}; choose from {', '.join(CORPORA)} (as name:split)"
        )
    if name == "text":
        if not rest:
            raise EvalError(f"eval.corpora entry {spec!r} needs a file: text:<path>")
        return CorpusConfig(name="text", split="test", path=rest, samples=0)
    if name == "hf":
        corpus = hf_corpus(rest, spec, "eval.corpora", EvalError)
        corpus.samples = 0
        return corpus
    return CorpusConfig(name=name, split=rest or "test", samples=0)


# -- the search space and budget (pruning.space)
ATTENTION_MODES = ("channels", "heads")
BUDGET_COUNTS = ("auto", "total", "decoder")


# -- the paper's evolution (search.evolution)
@dataclass
class EvolutionParams:
    population: int = 100  # candidates per generation
    parents: int = 10  # the best kept as the next generation's parents (top-k)
    mutations: int = 50  # children made by mutation per generation
    crossovers: int = 30  # children made by crossover per generation
    prob_mask_init: float = 0.6  # generation 0: probability of mutating each mask of the initial subnet
    prob_ratio_init: float = 0.3  # generation 0: probability of mutating each kept ratio
    prob_mask: float = 0.3  # later generations: probability of mutating each mask
    prob_ratio: float = 0.1  # later generations: probability of mutating each kept ratio
    prob_depth: float = 0.1  # probability of dropping or restoring a block
    alpha: float = 0.8  # a mutated mask keeps at least this share of the units it kept
    max_tries: int = 1000  # draws per child before it is given up


# -- the level database (pruning.levels)
HEAD_MODES = ("equal", "free")
DB_INPUTS = ("accumulated", "dense")
DB_DTYPES = ("float16", "bfloat16", "float32")
WEIGHTINGS = ("fisher", "none")
REFITS = ("module", "dense", "stream")


class LevelError(ValueError):
    pass


@dataclass
class LevelParams:
    """How the database is built (a resume reuses a saved database only with the same settings)."""

    heads: str = "equal"  # equal: one query head per KV group per level (standard GQA layers); free: any head
    mlp_levels: int = 16  # MLP levels: kept channels in steps of intermediate / mlp_levels
    obs_group: int = 16  # MLP channels removed per OBS step (a group update, as Týr's groups of 16; 1 = one at a time)
    obs_damp: float = 0.01  # H^-1 of the OBS order: H + obs_damp * mean(diag H) I
    damp: float = 0.1  # the refit's damping toward the original weights (reform.solve_exact)
    inputs: str = "accumulated"  # accumulated (error accumulation) | dense
    dtype: str = "float16"  # of the stored weights
    # How output errors are weighed when OBS picks the MLP channels to remove: fisher (each block's K-FAC output
    # factor, E[g g^T] of the loss gradient where the MLP adds into the residual stream, on the dense model with
    # next tokens drawn from its own distribution; LLM-Surgeon) or none (every output direction alike, ZipLM).
    # Query heads keep the unweighted order: weighing them measured worse (docs/results.md).
    weighting: str = "fisher"
    # Calibration windows of the output factors' backward pass (the first ones; all when fewer).
    fisher_windows: int = 16
    # What the refit of a level reproduces (inputs=accumulated): module (the original o/down on the same pruned
    # inputs), dense (the dense model's o/down output on the dense stream, OSSCAR's fullseq) or stream (the dense
    # model's residual stream after the module: the refit also cancels the upstream error where it can).
    refit: str = "module"

    def digest(self) -> str:
        params = {f.name: getattr(self, f.name) for f in fields(LevelParams)}
        return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]

    def check(self, g: Any) -> None:  # g: models.adapters.Geometry
        if self.heads not in HEAD_MODES:
            raise LevelError(f"levels.heads={self.heads!r} is not allowed; choose one of: {', '.join(HEAD_MODES)}")
        if self.inputs not in DB_INPUTS:
            raise LevelError(f"levels.inputs={self.inputs!r} is not allowed; choose one of: {', '.join(DB_INPUTS)}")
        if self.dtype not in DB_DTYPES:
            raise LevelError(f"levels.dtype={self.dtype!r} is not allowed; choose one of: {', '.join(DB_DTYPES)}")
        if self.weighting not in WEIGHTINGS:
            raise LevelError(
                f"levels.weighting={self.weighting!r} is not allowed; choose one of: {', '.join(WEIGHTINGS)}"
            )
        if self.refit not in REFITS:
            raise LevelError(f"levels.refit={self.refit!r} is not allowed; choose one of: {', '.join(REFITS)}")
        if self.fisher_windows < 1:
            raise LevelError(
                f"levels.fisher_windows={self.fisher_windows} must be >= 1 (calibration windows of the output factors)"
            )
        if self.mlp_levels < 1 or g.intermediate % self.mlp_levels:
            divisors = [d for d in (4, 8, 12, 16, 24, 32, 48, 64) if g.intermediate % d == 0]
            raise LevelError(
                f"levels.mlp_levels={self.mlp_levels} must divide the MLP width {g.intermediate} (equal steps); "
                f"e.g. {', '.join(map(str, divisors)) or 1}"
            )
        if self.obs_group < 1 or self.obs_damp <= 0 or self.damp < 0:
            raise LevelError(
                f"levels.obs_group={self.obs_group} must be >= 1, levels.obs_damp={self.obs_damp} > 0 and "
                f"levels.damp={self.damp} >= 0"
            )


# -- the level search (search.levelsearch)
@dataclass
class LevelSearchParams:
    offspring: int = 16  # lambda: children per generation
    parents: int = 2  # kept between generations (the best on the last stage)
    # Multi-step selection: tokens scored per stage, and how many candidates each stage but the last passes on.
    tokens: list[int] = field(default_factory=lambda: [512, 2048, 8192])
    survivors: list[int] = field(default_factory=lambda: [4, 1])  # one count per stage but the last
    crossover: float = 0.25  # share of children made by crossover (with >= 2 parents)
    max_tries: int = 200  # draws per child before it is given up (counted as skipped)
    # Sensitivity probes after generation 0 (0: none): each layer's module lowered by this many levels
    # alone is scored on the first stage's tokens; the least sensitive layers then give levels to the
    # most sensitive ones (a few exact-budget candidates of different sizes join the selection).
    probe: int = 2
    # Tokens the probes are scored on (0, or at least the first stage's: the first stage's). A shorter set ranks
    # the layers for a fraction of generation 0's time: 4,096 of 8,192 exported as good a model at 0.8 and 0.5,
    # 2,048 a worse one at 0.5 (docs/results.md).
    probe_tokens: int = 0

    @property
    def probe_own_tokens(self) -> int:
        """The probes' own token count; 0 where they are scored on the first stage's tokens."""
        return self.probe_tokens if self.probe and 0 < self.probe_tokens < self.tokens[0] else 0


# -- reformation (pruning.reform)
SOLVERS = ("exact", "admm")
INPUTS = ("sequential", "independent")
FEATURES = ("full", "pruned")
TARGETS = ("original", "layer")


@dataclass
class ReformParams:
    solver: str = "exact"
    inputs: str = "sequential"  # sequential: features from the already reformed upstream; independent: original
    features: str = "full"  # full: module inputs from the layer's full q/k/v, gate/up; pruned: from the pruned layer
    # With sequential inputs: what the reformed layer must reproduce. original: the original model's
    # activations (corrects upstream drift too); layer: the original layer applied to the same inputs
    # (SparseGPT's and the paper code's choice). Independent inputs make both the same.
    targets: str = "layer"
    damp: float = 0.1  # ridge toward the original kept weights, times mean(diag H)
    # Fit a bias of o/down jointly with the kept weights (affine least squares: a constant input column),
    # so the omitted channels' mean contribution is absorbed too (FLAP's bias compensation, made optimal).
    bias: bool = False
    rho: float = 1.0  # ADMM penalty on the normalised problem
    iters: int = 30  # ADMM iterations

    def digest(self) -> str:
        """Names these solver settings: saved layers are reused only by a resume with the same ones."""
        params = {f.name: getattr(self, f.name) for f in fields(ReformParams)}
        return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]


@dataclass
class ModelConfig:
    # "smollm2" (the bundled SmolLM2-135M-Instruct GGUF), a local HF checkpoint dir, a .gguf file, or a hub id.
    path: str = "smollm2"
    gguf_file: Optional[str] = None  # the .gguf file inside a hub repo, when model.path names one
    revision: Optional[str] = None  # a hub revision (branch, tag or commit)
    dtype: str = "float32"  # of the weights the search and the export compute with
    cache_dir: str = "~/.cache/searchllm"  # GGUF conversions are cached here (converted once)


@dataclass
class CorpusConfig:
    # wikitext2 (tokenized, <unk>), wikitext2-raw, ptb, c4, text (a local file: path) or hf (any `datasets`
    # corpus with a text column: path=<dataset>[#<config>])
    name: str = "wikitext2"
    split: str = "validation"  # train, validation or test
    path: Optional[str] = None  # a local file; when unset, data.root is searched, then the hub
    samples: int = 5  # windows
    seqlen: int = 2048  # tokens per window
    # With name=mix (calibration and fitness), the sources instead of split/path: "SOURCE=WEIGHT" entries, SOURCE one of
    # name:split, text:<path>, hf:<dataset>[#<config>]:<split> or generated; shared out by weight (largest remainders).
    mix: list[str] = field(default_factory=list)


@dataclass
class GenerateConfig:
    """Self-generated calibration text (Williams et al. 2024): sequences sampled from the dense model on the
    evaluator pool, cached in the run dir. Used where a data.<role>.mix names `generated`."""

    temperature: float = 1.0  # of the sampling distribution
    top_p: float = 0.95  # nucleus sampling: the smallest set of tokens holding this much probability
    chat: str = "auto"  # start in the chat template's first user turn: auto (where the tokenizer has one) | on | off
    batch: int = 32  # sequences sampled together on one replica (a KV cache each)
    # The weights it samples with, as levels.score_dtype: auto (bfloat16 where the CPU or GPU computes it natively:
    # 1.7x faster on 2 cores, its export as good or better on every corpus, docs/results.md) | model | float32 | ...
    dtype: str = "auto"


@dataclass
class DataConfig:
    # Folder with local corpora (the layout of ../shared/data); "auto": $SEARCHLLM_DATA, else ../shared/data.
    root: str = "auto"
    seed: int = 0  # draws the random calibration windows
    batch: int = 1  # windows per forward pass
    calibration: CorpusConfig = field(default_factory=lambda: CorpusConfig(samples=128))
    fitness: CorpusConfig = field(default_factory=CorpusConfig)
    report: CorpusConfig = field(default_factory=lambda: CorpusConfig(name="wikitext2-raw", split="test", samples=0))
    generate: GenerateConfig = field(default_factory=GenerateConfig)


@dataclass
class SpaceConfig:
    attention: str = "channels"  # channels (inside each head, the paper's space) | heads (whole GQA groups)
    attn_min: Optional[float] = None  # None: paper Table 1 row for budget.target
    attn_max: float = 1.0  # the largest kept share of each attention group's channels
    attn_step: float = 0.01  # the ratio mutation's step of the attention share
    mlp_min: Optional[float] = None  # None: paper Table 1 row for budget.target
    mlp_max: float = 1.0  # the largest kept share of MLP channels
    mlp_step: float = 0.05  # the ratio mutation's step of the MLP share
    depth_min: Optional[int] = None  # None: paper Table 1 (LLaMA-7B share of blocks)
    # Kept MLP channels and kept dims per attention head in multiples of this (8, 64, 128): exported
    # subnets (and the search's own evaluations) then run on the fast GPU matrix kernels; 1: any count.
    round_to: int = 1


@dataclass
class BudgetConfig:
    target: float = 0.8  # inheriting ratio: kept / original parameters
    tol: float = 0.01  # the kept ratio may miss budget.target by this much either way
    # total (embeddings and LM head included, as the paper) | decoder (the blocks alone) | auto: decoder where
    # embeddings and LM head are over half the model (Gemma 3's 262k vocabulary: 63% of gemma-3-270m), else total
    count: str = "auto"
    # A file size instead (opt-in): the whole GGUF must fit in it ("89MiB", "1.5GiB", bytes, or "4.5bpw" of the
    # model's parameters); the level search then also picks each weight's llama.cpp type (quant.*), and the
    # export is that one GGUF.
    size: Optional[str] = None


@dataclass
class QuantConfig:
    """The tensor types a byte budget (budget.size) chooses from, and their importance matrix."""

    # llama.cpp types from the most bytes to the fewest; a type a row length cannot take is llama.cpp's fallback
    types: list[str] = field(default_factory=lambda: list(QUANT_LADDER))
    imatrix_windows: int = 32  # calibration windows of the importance matrix (llama-imatrix reads ~100 of 512)
    # generations of the joint search (search.generations counts the level search's): ~300 genes, not ~60
    generations: int = 40
    cache_mb: int = 2048  # quantized weights kept per evaluator (re-quantized when dropped)


@dataclass
class SearchConfig(EvolutionParams):
    """The paper's search hyper-parameters (EvolutionParams: population, parents, mutations, crossovers,
    mutation probabilities, alpha, max_tries) plus how the run is driven."""

    mode: str = "levels"  # the registered search strategy (strategies.py)
    init: str = "uniform"
    # Judge every candidate with FLAP's bias compensation (the pruned channels' calibration mean folded
    # into o/down biases; a matrix-vector product per block), closer to what reformation will make of it.
    compensate: bool = False
    seed: int = 0  # the search's random draws
    generations: int = 50  # of the mask search, and of the level search
    score_damp: float = 0.01  # damping of the Gram inverse in the importance scores


@dataclass
class LevelsConfig(LevelParams, LevelSearchParams):
    """search.mode=levels: how the level database is built (LevelParams: heads, mlp_levels, inputs, damping,
    dtype, the output-Fisher weighting) and searched (LevelSearchParams: offspring, parents, the multi-step
    schedule tokens/survivors, crossover); search.generations and search.seed apply."""

    fitness: str = "kl"  # kl: mean KL divergence from the dense model (top-k sparse) | ppl
    topk: int = 256  # dense tokens kept per position for the KL (the rest is one bin)
    # Starting points: uniform (the same levels in every layer, from the whole attention down while the fitness
    # falls), errors (greedy allocation by the database's own reconstruction errors), or all. The error
    # allocation never ranked in generation 0's best two at 0.9, 0.8, 0.7 or 0.5 (docs/results.md).
    init: str = "uniform"
    # Re-reform the chosen assignment with the reformation stage (reform.*) from the original weights and
    # keep whichever of it and the database weights scores better on the last stage's tokens.
    rereform: bool = False
    # Per evaluator actor: hidden states of recent candidates after each layer, so a child runs only the
    # layers from its first change on (exact; 0 turns it off). Memory of the actor's device.
    cache_mb: int = 2048
    # The dtype the level search scores candidates in (every selection stage and its KL targets): model
    # (model.dtype), auto (bfloat16 where the evaluator's device computes it natively: CUDA with bf16, a CPU
    # with AVX-512; else model.dtype), or a dtype. The database build, reformation and report stay in model.dtype.
    score_dtype: str = "model"
    # Where score_dtype=auto falls back to float32 (a CPU without native bfloat16), each forward pass costs ~2.7x
    # bfloat16's: levels.tokens and levels.probe_tokens are cut to this share when the run starts (decided on the
    # driver's machine, for a Ray started here; the cut values go into config.yaml). 1: no cut.
    float32_share: float = 1.0


@dataclass
class ReformConfig(ReformParams):
    """Reformation after the search (ReformParams: solver, inputs, features, targets, damp, bias, rho,
    iters) and which subnets it is tried on; calibrates on data.calibration."""

    enabled: bool = True  # reform the chosen subnet (the mask search's methods)
    bias: bool = True  # searchllm's default: fit o/down biases too (their parameters come out of the budget)
    # Reformation-aware final choice (stages.reform.finalists): reform the top `finalists` parents of the
    # search (and FLAP's subnet with flap_finalist) and keep the lowest perplexity after reformation.
    finalists: int = 3
    flap_finalist: bool = True  # FLAP's subnet of the same budget joins the finalists
    # Finalists are judged on the first N windows of the fitness corpus (0: the search's own fitness
    # windows): a few reformed subnets can afford more tokens than the thousands of screened ones.
    final_windows: int = 16


@dataclass
class ExportConfig:
    enabled: bool = True  # write the chosen subnet as a physically smaller model
    dir: Optional[str] = None  # None: <run_dir>/export
    dtype: Optional[str] = None  # None: model.dtype
    overwrite: bool = False  # replace an existing export.dir that is not a searchllm export
    # hf | gguf (llama.cpp; needs the `gguf` extra) | both (hf + gguf) | vllm (hf + <export>/vllm, the checkpoint
    # vLLM serves) | all (searchllm.export.formats)
    format: str = "hf"
    # llama.cpp types of the GGUF export (f32, f16, bf16, q8_0, q4_0, q4_k_m, ...), quantized by llama.cpp.
    gguf_types: list[str] = field(default_factory=lambda: ["f16", "q8_0", "q4_k_m"])


def teacher_top_k(spec: str) -> Optional[int]:
    """heal.teacher's K (cached:K), None for live or a malformed value."""
    kind, _, k = str(spec).partition(":")
    return int(k) if kind == "cached" and k.isdigit() and int(k) >= 1 else None


@dataclass
class HealConfig:
    """Healing after the search: full-parameter distillation of the exported subnet from the original model
    (forward KL on the next-token distributions) on Ray Train workers, before the export is written."""

    enabled: bool = False  # heal the subnet (python -m searchllm.heal RUN heals a finished run)
    tokens: int = 100_000  # training tokens in all (steps = tokens // (batch * seqlen))
    seqlen: int = 512  # tokens per training window
    batch: int = 4  # windows per optimizer step, over all workers (a multiple of heal.workers)
    # Peak learning rate of AdamW (betas 0.9, 0.95): of 1e-4, 3e-4 and 1e-3 on SmolLM2 at 0.8 kept and 100k tokens, 3e-4
    # healed every corpus furthest; 1e-3 raised the held-out KL (docs/results.md).
    lr: float = 3e-4
    min_lr: float = 1e-5  # where the cosine decay ends
    warmup: int = 10  # steps of linear warmup from 0
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    clip: float = 1.0  # gradient-norm clipping (0: none)
    temperature: float = 1.0  # of both distributions in the KL (the loss is scaled by its square)
    # Weight of a next-token cross-entropy term added to the KL: it fits the heal text's domains (WikiText-2 1.374x
    # -> 1.218x on SmolLM2 at 0.8 kept, 100k tokens); with heal.generated=0.5 the held-out domains heal too.
    ce: float = 0.5
    # What the heal updates: all (every weight) or blocks (the decoder layers; embeddings, final norm and head stay
    # the original's, as the search left them: SmolLM2 0.8 kept, 100k: every held-out domain 1-2% better, 15% faster).
    train: str = "blocks"
    chunk: int = 1024  # positions per slice of the logits (memory: chunk x vocabulary floats, not seqlen x)
    # The teacher's distributions: live (a teacher forward every step) or cached:K (its top K log-probabilities per
    # position computed once per training text, in <run>/heal/, and read back by every heal of it: exact KL on the
    # K tokens plus the rest of the mass as one bucket; the held-out KL always uses the live teacher).
    teacher: str = "live"
    # Compute dtype of both models' matrix products: auto (bfloat16 where the device computes it natively: CUDA
    # with bf16, a CPU with AVX-512 bf16 or AMX; else float32), float32 or bfloat16. Weights and AdamW stay float32.
    # The heal's own text (heal.generated) is sampled in it too.
    dtype: str = "auto"
    workers: int = 1  # Ray Train data-parallel workers (gloo on CPU, NCCL on GPUs)
    cpus_per_worker: Union[int, str] = "auto"  # auto: the cluster's CPUs shared out over the workers
    fsdp: str = "auto"  # shard student and teacher over the workers: auto (on GPUs with 2+ workers) | on | off
    checkpoint_every: int = 25  # steps between checkpoints in <run>/heal/<tag>/ (a killed heal resumes there)
    eval_every: int = 25  # steps between KL measurements on the held-out heal windows (and at the end)
    eval_windows: int = 4  # windows of the heal sources set aside, never trained on, for that KL
    seed: int = 0  # the window draws
    # Training-aware choice (DarwinLM; the level search): heal each of the search's final `candidates` parents, best
    # first, on candidate_tokens tokens (no warmup) and give the full heal to the one with the lowest held-out KL
    # after it; 1: the search's best.
    candidates: int = 1
    candidate_tokens: int = 8192  # training tokens of each candidate's short heal
    # Training text: "SOURCE=WEIGHT" entries as in data.<role>.mix (name:split, text:<path>, hf:..., generated);
    # empty: the calibration's sources. Test splits and held-out evaluation domains are refused. A source whose
    # share is more than its windows gives the rest to the others: none repeats while another has windows left.
    mix: list[str] = field(default_factory=list)
    # Share of the training and held-out windows from text the original samples for the heal (`generated`), the
    # other sources keeping their ratios: it follows the model's own domains, where WikiText-2 and PTB teach their
    # own. None: the mix's own weight of `generated`; 0 drops it. 0.5 with ce 0.5 healed SmolLM2 best (results.md).
    generated: Optional[float] = 0.5


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: $RAY_ADDRESS, else the cluster `ray start` runs here, else start one
    # Evaluator replicas, and actors per replica (each a contiguous shard of layers): a number, or auto
    # (from the GPUs Ray lists and the model's size; the choice is printed).
    replicas: Union[int, str] = 1
    stages: Union[int, str] = 1  # actors per replica
    in_flight: int = 2  # candidates queued per replica
    # Intra-op threads of each actor: auto = the CPUs it reserves. CPU bfloat16 matrix kernels round by thread
    # count (1e-4 of the KL), so runs reproduce each other's scores to the bit only with equal threads per actor.
    threads: Union[int, str] = "auto"
    # Window batches each actor runs at once, sharing its threads (0: 2 on a CPU with 2 threads or more, 1 on
    # CUDA): the scores do not depend on it (searchllm.streams).
    streams: int = 0
    num_cpus: Optional[int] = None  # only when the driver starts its own Ray
    device: str = "auto"  # auto: a GPU per actor when Ray lists GPUs
    max_restarts: int = 3  # per actor; a replica whose actor runs out of restarts is dropped
    placement_timeout: float = 600.0  # seconds to wait for the actors' resources (an autoscaler may add nodes)


@dataclass
class MonitorConfig:
    """Watching a run: the live progress page, Ray metrics, the static report."""

    page: bool = True  # serve the progress page while the driver runs
    host: str = "127.0.0.1"  # loopback by default; 0.0.0.0 to reach it from elsewhere
    port: int = 8266  # taken or 0: any free port (the URL is printed)
    metrics: bool = True  # ray.util.metrics: Prometheus export of every Ray node
    report: bool = True  # <run dir>/report.html after the search and after the evaluation
    # Without a terminal (a log file, `ray job logs`) each long stage logs a progress line this often (seconds)
    log_every: float = 60.0
    summary_every: int = 50  # the search logs a summary line every this many evaluations (each one at debug level)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    levels: LevelsConfig = field(default_factory=LevelsConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    reform: ReformConfig = field(default_factory=ReformConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # after export: the original and the exported model
    heal: HealConfig = field(default_factory=HealConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    # A named method: `method=NAME` on the command line applies conf/method/NAME.yaml (before the other
    # overrides); the resolved keys are what a run records, so a resume never re-applies it.
    method: str = "searchllm"
    run_dir: Optional[str] = None  # None: runs/<time>
    # A run dir to continue; `auto`: continue run_dir if it holds a started run of the same config, else
    # start it (a re-submitted or retried cluster job picks up where the last one died).
    resume: Optional[str] = None


CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": DTYPES,
    "data.calibration.name": (*CORPORA, MIX),
    "data.fitness.name": (*CORPORA, MIX),
    "data.report.name": CORPORA,
    "space.attention": ATTENTION_MODES,
    "budget.count": BUDGET_COUNTS,
    "search.init": SEARCH_INITS,
    "levels.score_dtype": ("model", "auto", *DTYPES),
    "data.generate.dtype": ("model", "auto", *DTYPES),
    "levels.heads": HEAD_MODES,
    "levels.inputs": DB_INPUTS,
    "levels.dtype": DB_DTYPES,
    "levels.weighting": WEIGHTINGS,
    "levels.refit": REFITS,
    "levels.fitness": LEVEL_FITNESS,
    "levels.init": LEVEL_INITS,
    "method": METHODS,
    "reform.solver": SOLVERS,
    "reform.inputs": INPUTS,
    "reform.features": FEATURES,
    "reform.targets": TARGETS,
    "ray.device": DEVICES,
    "eval.missing": ("skip", "error"),
    "eval.device": DEVICES,
    "heal.dtype": ("auto", "float32", "bfloat16"),
    "heal.fsdp": ("auto", "on", "off"),
    "heal.train": ("all", "blocks"),
}
