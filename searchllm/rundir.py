"""Everything a run leaves on disk, and what a resume reads back.

  config.yaml          the resolved config (a resume uses it, not the command line)
  scores.npz           channel importance scores (calibration is not repeated on resume)
  evals.jsonl          one line per finished evaluation, appended as results stream in
  checkpoint.json      after each generation: its number, the parents, the RNG state, the keys seen
  archive/gen-*.parquet every evaluated candidate of each generation (pd.read_parquet(run/"archive"))
  reform/<subnet>-<settings>/layer-*.pt  each reformed layer of a finalist, saved as it is solved
  levels/<settings>/layer-*.safetensors  the level database, a layer at a time as it is built (levels.py)
  best.json, summary.json
Files are replaced atomically (write to a temp file, then rename), so a killed driver never leaves a
half-written checkpoint that a resume would trust.
"""
from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import torch

from .reform import LayerResult
from .scores import Scores


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def create(self) -> "RunDir":
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "archive").mkdir(exist_ok=True)
        return self

    @property
    def started(self) -> bool:
        return (self.path / "config.yaml").is_file()

    # -- config and scores -------------------------------------------------------------------------
    def write_text(self, name: str, text: str) -> None:
        _atomic_write(self.path / name, text.encode())

    def read_text(self, name: str) -> str:
        return (self.path / name).read_text()

    def save_scores(self, scores: Scores) -> None:
        tmp = self.path / "scores.tmp.npz"
        np.savez(tmp, **asdict(scores))
        os.replace(tmp, self.path / "scores.npz")

    def load_scores(self) -> Scores | None:
        p = self.path / "scores.npz"
        if not p.is_file():
            return None
        with np.load(p) as z:
            names = [f.name for f in fields(Scores)]
            return Scores(**{n: z[n] for n in names}) if all(n in z for n in names) else None

    # -- evaluations --------------------------------------------------------------------------------
    def append_eval(self, record: dict[str, Any]) -> None:
        row = dict(record, genes=base64.b64encode(record["genes"]).decode())
        with open(self.path / "evals.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def load_evals(self) -> dict[str, dict[str, Any]]:
        p = self.path / "evals.jsonl"
        out: dict[str, dict[str, Any]] = {}
        if p.is_file():
            for line in p.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill mid-write
                    continue
                row["genes"] = base64.b64decode(row["genes"])
                out[row["key"]] = row
        return out

    def write_generation(self, generation: int, records: list[dict[str, Any]]) -> None:
        df = pd.DataFrame(records)
        tmp = self.path / "archive" / f".gen-{generation:04d}.parquet.tmp"
        df.to_parquet(tmp, index=False)
        os.replace(tmp, self.path / "archive" / f"gen-{generation:04d}.parquet")

    def archive(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / "archive")

    # -- checkpoint ---------------------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        _atomic_write(self.path / "checkpoint.json", json.dumps(state).encode())

    def load_checkpoint(self) -> dict[str, Any] | None:
        p = self.path / "checkpoint.json"
        return json.loads(p.read_text()) if p.is_file() else None

    # -- reformation, layer by layer ----------------------------------------------------------------
    def save_layer(self, tag: str, result: LayerResult) -> None:
        folder = self.path / "reform" / tag
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".layer-{result.layer:04d}.pt.tmp"
        torch.save(asdict(result), tmp)
        os.replace(tmp, folder / f"layer-{result.layer:04d}.pt")

    def load_layers(self, tag: str) -> dict[int, LayerResult]:
        """The layers of reformation `tag` finished before (a resume solves only the others)."""
        out = {}
        for f in sorted((self.path / "reform" / tag).glob("layer-*.pt")):
            res = LayerResult(**torch.load(f, weights_only=True))
            out[res.layer] = res
        return out

    def save_json(self, name: str, obj: Any) -> None:
        _atomic_write(self.path / name, json.dumps(obj, indent=2, default=_json_default).encode())

    def load_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, bytes):
        return base64.b64encode(o).decode()
    raise TypeError(f"not JSON serialisable: {type(o)}")
