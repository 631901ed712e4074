"""Everything a run leaves on disk, and what a resume reads back.

  config.yaml          the resolved config (a resume uses it, not the command line)
  scores.npz           channel importance scores (calibration is not repeated on resume)
  evals.jsonl          one line per finished evaluation, appended as results stream in
  checkpoint.json      after each generation: its number, the parents, the RNG state, the keys seen
  archive/gen-*.parquet every evaluated candidate of each generation (pd.read_parquet(run/"archive"))
  reform/<subnet>-<settings>/layer-*.pt  each reformed layer of a finalist, saved as it is solved
  levels/<settings>/layer-*.safetensors  the level database, a layer at a time as it is built (levels.py)
  best.json, summary.json, manifest.json
  lock                 who runs the run now (pid, host): a second driver on the same dir stops
Files are replaced atomically (write to a temp file, then rename), so a killed driver or a full disk never
leaves a half-written file under a real name; checkpoint.prev.json keeps the generation before. Every file
read back is checked: a damaged one stops the run with one line (RunFileError) naming the file, what is
wrong and what to do, and nothing else in the run dir is touched.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import time
import zipfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from searchllm.files import RunFileError, alive, atomic_write, damaged, export_dir, read_json, writing
from searchllm.pruning.reform import LayerResult
from searchllm.pruning.scores import Scores


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

    def export_dir(self, configured: str | None) -> Path:
        return export_dir(self.path, configured)

    # -- config and scores -------------------------------------------------------------------------
    def write_text(self, name: str, text: str) -> None:
        atomic_write(self.path / name, text.encode())

    def read_text(self, name: str) -> str:
        return (self.path / name).read_text()

    def save_scores(self, scores: Scores) -> None:
        with writing(self.path / "scores.npz", self.path / "scores.tmp.npz") as tmp:
            np.savez(tmp, **asdict(scores))

    def load_scores(self) -> Scores | None:
        """The saved calibration scores; None when there are none (missing: calibrate again)."""
        p = self.path / "scores.npz"
        if not p.is_file():
            return None
        try:
            with np.load(p) as z:
                names = [f.name for f in fields(Scores)]
                return Scores(**{n: z[n] for n in names}) if all(n in z for n in names) else None
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            raise damaged(p, e, f"delete it to calibrate again on resume (rm {p})") from None

    # -- evaluations --------------------------------------------------------------------------------
    def append_eval(self, record: dict[str, Any]) -> None:
        row = dict(record, genes=base64.b64encode(record["genes"]).decode())
        p = self.path / "evals.jsonl"
        if p.is_file() and p.stat().st_size:  # a line cut by a kill: cut it off, so this one starts a line
            with open(p, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    data = p.read_bytes()
                    f.truncate(data.rfind(b"\n") + 1)
        with open(p, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def load_evals(self) -> dict[str, dict[str, Any]]:
        """Every logged evaluation by key. A last line cut by a kill mid-write is skipped (that evaluation is
        redone; the next append cuts it off the file); a damaged line before it stops the resume."""
        p = self.path / "evals.jsonl"
        out: dict[str, dict[str, Any]] = {}
        if not p.is_file():
            return out
        data = p.read_bytes()
        lines = data.split(b"\n")
        for n, line in enumerate(lines):
            if not line:
                continue
            try:
                row = json.loads(line)
                row["genes"] = base64.b64decode(row["genes"])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, ValueError) as e:
                if n == len(lines) - 1:  # the cut last line (no newline after it)
                    break
                raise damaged(
                    p,
                    e,
                    f"line {n + 1} of {len(lines) - 1} is not an evaluation record; delete that line "
                    "(its evaluation is redone) and resume",
                ) from None
            out[row["key"]] = row
        return out

    def write_generation(self, generation: int, records: list[dict[str, Any]]) -> None:
        df = pd.DataFrame(records)
        final = self.path / "archive" / f"gen-{generation:04d}.parquet"
        with writing(final, self.path / "archive" / f".gen-{generation:04d}.parquet.tmp") as tmp:
            df.to_parquet(tmp, index=False)

    def archive(self) -> pd.DataFrame:
        """Every archived generation (a damaged file is named; evals.jsonl holds the same evaluations)."""
        import pyarrow

        frames = []
        for f in sorted((self.path / "archive").glob("gen-*.parquet")):
            try:
                frames.append(pd.read_parquet(f))
            except (pyarrow.ArrowException, OSError) as e:
                raise damaged(f, e, "delete it: evals.jsonl still holds every evaluation of that generation") from None
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    # -- checkpoint ---------------------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """checkpoint.json, the generation before kept as checkpoint.prev.json (a resume's fallback)."""
        p = self.path / "checkpoint.json"
        if p.is_file():
            atomic_write(self.path / "checkpoint.prev.json", p.read_bytes())
        atomic_write(p, json.dumps(state).encode())

    def load_checkpoint(self) -> dict[str, Any] | None:
        p = self.path / "checkpoint.json"
        if not p.is_file():
            return None
        prev = self.path / "checkpoint.prev.json"
        advice = (
            f"the generation before is in {prev.name}: `mv {prev} {p}` and resume (one generation is redone)"
            if prev.is_file()
            else f"delete it to restart the search from generation 0 (rm {p}); evaluations logged in evals.jsonl are "
            "not redone"
        )
        state = read_json(p, advice)
        if not isinstance(state, dict) or "generation" not in state:
            raise damaged(p, ValueError("not a checkpoint record"), advice)
        return state

    # -- generated calibration text ---------------------------------------------------------------------
    def save_generated(self, tokens: torch.Tensor, settings: dict[str, Any], name: str = "generated.pt") -> None:
        with writing(self.path / name, self.path / f".{name}.tmp") as tmp:
            torch.save({"tokens": tokens, "settings": settings}, tmp)

    def load_generated(self, settings: dict[str, Any], name: str = "generated.pt") -> torch.Tensor | None:
        """The sequences sampled before with the same settings (None: none yet, or other settings); `name`:
        generated.pt (calibration text) or heal-generated.pt (the heal's)."""
        p = self.path / name
        if not p.is_file():
            return None
        try:
            saved = torch.load(p, weights_only=True)
        except Exception as e:  # a cut file: torch.load raises many kinds
            raise damaged(p, e, f"delete it to sample the text again on resume (rm {p})") from None
        return saved["tokens"] if saved.get("settings") == settings else None

    # -- reformation, layer by layer ----------------------------------------------------------------
    def save_layer(self, tag: str, result: LayerResult) -> None:
        folder = self.path / "reform" / tag
        folder.mkdir(parents=True, exist_ok=True)
        with writing(folder / f"layer-{result.layer:04d}.pt", folder / f".layer-{result.layer:04d}.pt.tmp") as tmp:
            torch.save(asdict(result), tmp)

    def load_layers(self, tag: str) -> dict[int, LayerResult]:
        """The layers of reformation `tag` finished before (a resume solves only the others)."""
        out = {}
        for f in sorted((self.path / "reform" / tag).glob("layer-*.pt")):
            try:
                res = LayerResult(**torch.load(f, weights_only=True))
            except Exception as e:  # torch.load raises many kinds on a cut file (RuntimeError, EOFError, pickle errors)
                raise damaged(f, e, f"delete it to solve that layer again on resume (rm {f})") from None
            out[res.layer] = res
        return out

    def save_json(self, name: str, obj: Any) -> None:
        atomic_write(self.path / name, json.dumps(obj, indent=2, default=_json_default).encode())

    def load_json(self, name: str) -> Any:
        return read_json(self.path / name, f"rerun the step that writes it (a resume of the run rewrites {name})")

    @contextlib.contextmanager
    def timed(self, stage: str):
        """This invocation's wall seconds of `stage`, in RUN/timings.json with the CPU it ran on (a resume
        overwrites the stages it runs again; benchmarks/stage_times.py prints them)."""
        t0 = time.perf_counter()
        yield
        self.record_time(stage, time.perf_counter() - t0)

    def record_time(self, stage: str, seconds: float) -> None:
        f = self.path / "timings.json"
        times = json.loads(f.read_text()) if f.is_file() else {}
        times.setdefault("stages", {})[stage] = round(seconds, 1)
        times["cpu"] = cpu_kind()
        self.save_json("timings.json", times)

    # -- the lock ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self):
        """Hold RUN/lock while a driver uses the run dir. A lock of a process that no longer exists on this
        host (a crash) is stale and taken over; a live holder stops this driver with one line."""
        p, me = (
            self.path / "lock",
            {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")},
        )
        for _ in range(2):
            try:
                fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    holder = json.loads(p.read_text())
                except (OSError, ValueError):
                    holder = {}
                if holder.get("host") == me["host"] and not alive(holder.get("pid")):
                    p.unlink(missing_ok=True)  # stale: its driver is gone
                    continue
                raise RunFileError(
                    f"{self.path} is in use by the driver with pid {holder.get('pid', '?')} on host "
                    f"{holder.get('host', '?')} (since {holder.get('since', '?')}); wait for it or stop it "
                    f"(if it is gone, delete {p})"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            break
        try:
            yield self
        finally:
            p.unlink(missing_ok=True)


def cpu_kind() -> dict[str, Any]:
    """The CPU's model name, core count and whether it computes bfloat16 natively (AVX-512 bf16 or AMX), plus
    the ISA caps a stand-in run sets (ATEN_CPU_CAPABILITY and the like)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "unknown")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    caps = {
        k: v
        for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
        if (v := os.environ.get(k))
    }
    bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    return {"model": name, "cores": os.cpu_count(), "native_bf16": bf16, "isa_caps": caps}


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
