"""llama.cpp itself, through llama-cpp-python (the optional `gguf` extra): quantize a GGUF with llama.cpp's own
quantizer, and score one on token windows (perplexity, prefill and decode tokens/s) in the runtime users run.

Install: CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install "searchllm[gguf]" (builds llama.cpp from source, about
8 minutes on 2 cores; -DGGML_NATIVE=OFF keeps the build portable across CPUs).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from pathlib import Path

import numpy as np
import torch

from searchllm.pruning.shard import NLL

INSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install "llama-cpp-python==0.3.36"'


class LlamaCppMissing(ImportError):
    pass


def require():
    try:
        import llama_cpp
    except ImportError:
        raise LlamaCppMissing(f"GGUF quantization and evaluation need llama.cpp's Python bindings: {INSTALL}") from None
    return llama_cpp


def available() -> bool:
    try:
        require()
        return True
    except LlamaCppMissing:
        return False


@contextlib.contextmanager
def _quiet():
    """llama.cpp logs every load to stderr (fd 2) from C: silence it unless SEARCHLLM_LLAMA_LOG is set."""
    if os.environ.get("SEARCHLLM_LLAMA_LOG"):
        yield
        return
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def quantize(
    src: Path,
    dst: Path,
    ftype: int,
    threads: int = 0,
    imatrix: dict[str, np.ndarray] | None = None,
    types: dict[str, int] | None = None,
) -> None:
    """llama.cpp's file quantizer (llama-quantize): `ftype`'s mix, with `imatrix` (GGUF tensor name -> one
    value per input column, averaged) where its types use one, and `types` (GGUF tensor name -> ggml_type)
    overriding the mix per tensor (anchored patterns: llama.cpp searches them unanchored)."""
    llama_cpp = require()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, threads
    keep = []  # the C arrays must outlive the call
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for k, (name, v) in enumerate(imatrix.items()):
            data = np.ascontiguousarray(v, dtype=np.float32)
            keep.append(data)
            arr[k].name = name.encode()
            arr[k].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[k].size = data.size
        params.imatrix, _ = arr, keep.append(arr)
    if types:
        over = (llama_cpp.llama_model_tensor_override * (len(types) + 1))()
        for k, (name, t) in enumerate(types.items()):
            over[k].pattern = ("^" + name.replace(".", r"\.") + "$").encode()
            over[k].type = t
        params.tt_overrides, _ = over, keep.append(over)
    with _quiet():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(
            f"llama.cpp could not quantize {src} (llama_model_quantize returned {rc}); "
            "rerun with SEARCHLLM_LLAMA_LOG=1 to see its log"
        )


def load(path: Path, n_ctx: int, threads: int | None = None, logits_all: bool = True, f32_cache: bool = False):
    """A llama.cpp model and context (raises RuntimeError where llama.cpp refuses the file). The KV cache
    is llama.cpp's default f16 (what users run) unless `f32_cache` (exact comparisons with f32 weights)."""
    llama_cpp = require()
    threads = threads or torch.get_num_threads()
    cache = (
        {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32, "flash_attn": False} if f32_cache else {}
    )
    with _quiet():
        try:
            return llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=min(n_ctx, 512),
                n_ubatch=min(n_ctx, 512),
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=logits_all,
                verbose=bool(os.environ.get("SEARCHLLM_LLAMA_LOG")),
                **cache,
            )
        except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
            raise RuntimeError(f"llama.cpp refused {path}: {e} (SEARCHLLM_LLAMA_LOG=1 shows why)") from None


def _scores(llm, ids: list[int]) -> np.ndarray:
    """llama-cpp-python's own logits array after `ids` in a fresh context: a view, overwritten by the next
    eval."""
    llm.reset()
    llm.eval(ids)
    return llm.scores[: len(ids)]


def logits(llm, ids: list[int]) -> np.ndarray:
    """Next-token logits at every position of one sequence (a fresh context each call)."""
    return np.array(_scores(llm, ids), dtype=np.float32)


def perplexity(llm, windows: torch.Tensor, rows: int = 64) -> NLL:
    """The same protocol as evaluate.perplexity: each window on its own, tokens 1..T given their prefix.
    The NLL is read off llama-cpp-python's own logits array in float64 slices of `rows` positions: a copy of
    the whole window in float64 is 4 GiB on a 262k vocabulary (gemma 3), and took as long as llama.cpp."""
    t0, total, count = time.perf_counter(), 0.0, 0
    for row in windows.tolist():
        z = torch.from_numpy(_scores(llm, row))
        target = torch.tensor(row[1:])
        for i in range(0, len(row) - 1, rows):
            zc, tc = z[i : min(i + rows, len(row) - 1)].double(), target[i : i + rows]
            total += float((zc.logsumexp(-1) - zc.gather(1, tc[:, None])[:, 0]).sum())
        count += len(row) - 1
    return NLL(total, count, time.perf_counter() - t0)


def greedy(llm, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after the prompt, one llama.cpp decode per token (the decode path users run);
    `llm` loaded with logits_all (llama-cpp-python keeps no logits otherwise)."""
    _scores(llm, prompt)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


def speed(path: Path, prompt: list[int], decode: int, threads: int | None = None) -> tuple[float, float]:
    """(prefill, decode) tokens/s: the prompt in one batch, then `decode` tokens one at a time, as a
    serving loop does (logits of the last position only)."""
    llm = load(path, len(prompt) + decode + 1, threads, logits_all=False)
    llm.eval(prompt[:8])  # warm-up: first-call allocations out of the timing
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    tok = 0
    for _ in range(decode):
        llm.eval([tok])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), decode / (t2 - t1)
