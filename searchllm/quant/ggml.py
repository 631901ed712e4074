"""llama.cpp's own quantizer, called per tensor: libggml's `ggml_quantize_chunk` through ctypes (the call
llama.cpp's file quantizer makes for each tensor), and gguf-py's dequantize, bit-exact with llama.cpp's, to
read the quantized weights back for scoring. The library comes with llama-cpp-python (the `gguf` extra)."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

from searchllm.quant.types import GGML, QuantError, effective, row_bytes

INSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install "llama-cpp-python==0.3.36"'


@functools.cache
def lib() -> ctypes.CDLL:
    try:
        import llama_cpp
    except ImportError:
        raise QuantError(
            f"budget.size quantizes with llama.cpp's own quantizer; install its bindings: {INSTALL}"
        ) from None
    folder = Path(llama_cpp.__file__).parent / "lib"
    found = sorted(folder.glob("libggml-base.*"))
    if not found:
        raise QuantError(f"no libggml-base in {folder}: reinstall llama.cpp's bindings ({INSTALL})")
    so = ctypes.CDLL(str(found[0]))
    so.ggml_quantize_chunk.restype = ctypes.c_size_t
    so.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    so.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    so.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    so.ggml_row_size.restype = ctypes.c_size_t
    so.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return so


def requires_imatrix(t: str) -> bool:
    return bool(lib().ggml_quantize_requires_imatrix(GGML[t][0]))


def quantize(w: np.ndarray, t: str, imatrix: np.ndarray | None = None, name: str = "") -> tuple[str, np.ndarray]:
    """(the type written, the quantized rows as uint8 (rows, row bytes)) of a 2-d float weight asked to be
    `t`, with llama.cpp's fallback for its row length applied; `imatrix` (one value per column) weighs the
    rounding where the type uses one."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    rows, n = w.shape
    t = effective(t, n)
    if t == "f32":
        return t, w.view(np.uint8).reshape(rows, 4 * n)
    if t in ("f16", "bf16"):
        import gguf

        data = w.astype(np.float16) if t == "f16" else gguf.quants.quantize(w, gguf.GGMLQuantizationType.BF16)
        return t, np.ascontiguousarray(data).view(np.uint8).reshape(rows, -1)
    so = lib()
    if imatrix is None and requires_imatrix(t):  # the C code asserts (aborts the process) without one
        raise QuantError(
            f"{t} needs an importance matrix and {name or 'this tensor'} has none; drop {t} from quant.types "
            "(llama.cpp's quantizer would abort)"
        )
    imat = None
    if imatrix is not None:
        imat = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imat.shape != (n,):
            raise QuantError(f"the importance matrix of {name or 'a tensor'} has {imat.shape} values, not ({n},)")
    out = np.empty((rows, row_bytes(t, n)), np.uint8)
    size = so.ggml_quantize_chunk(
        GGML[t][0], w.ctypes.data, out.ctypes.data, 0, rows, n, None if imat is None else imat.ctypes.data
    )
    assert size == out.nbytes, (t, size, out.nbytes)
    return t, out


def dequantize(data: np.ndarray, t: str, n: int) -> np.ndarray:
    """Float32 (rows, n) from quantized rows: gguf-py's reading, bit-exact with llama.cpp's."""
    import gguf

    if t == "f32":
        return data.view(np.float32).reshape(-1, n)
    if t == "f16":
        return data.view(np.float16).reshape(-1, n).astype(np.float32)
    out = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(GGML[t][0]))
    return np.asarray(out, dtype=np.float32).reshape(-1, n)


def roundtrip(w: np.ndarray, t: str, imatrix: np.ndarray | None = None, name: str = "") -> np.ndarray:
    """The weight as llama.cpp computes with it after quantizing it to `t`."""
    t, data = quantize(w, t, imatrix, name)
    return dequantize(data, t, w.shape[1])
