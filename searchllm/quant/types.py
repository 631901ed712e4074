"""llama.cpp tensor types: block sizes, bytes, the fallbacks llama.cpp applies to row lengths a type cannot
take (src/llama-quant.cpp, b11312), and the ladder the search picks from.

A GGUF row is one output row of a weight (`in_features` values). K and IQ types quantize blocks of 256
values, the legacy types blocks of 32; llama.cpp silently substitutes a type whose block divides the row:
IQ2/IQ3/IQ1/IQ4_XS -> IQ4_NL, Q2_K/Q3_K/TQ* -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and F16
when the substitute does not divide the row either. The search and the byte count apply the same rule, so a
type in quant.types is a wish and `effective` is what the file holds."""

from __future__ import annotations

import re
from dataclasses import dataclass

# ggml_type ids (ggml.h) with (block size, bytes per block): the same as gguf-py's GGML_QUANT_SIZES.
GGML: dict[str, tuple[int, int, int]] = {
    "f32": (0, 1, 4),
    "f16": (1, 1, 2),
    "q4_0": (2, 32, 18),
    "q4_1": (3, 32, 20),
    "q5_0": (6, 32, 22),
    "q5_1": (7, 32, 24),
    "q8_0": (8, 32, 34),
    "q2_k": (10, 256, 84),
    "q3_k": (11, 256, 110),
    "q4_k": (12, 256, 144),
    "q5_k": (13, 256, 176),
    "q6_k": (14, 256, 210),
    "iq2_xxs": (16, 256, 66),
    "iq2_xs": (17, 256, 74),
    "iq3_xxs": (18, 256, 98),
    "iq1_s": (19, 256, 50),
    "iq4_nl": (20, 32, 18),
    "iq3_s": (21, 256, 110),
    "iq2_s": (22, 256, 82),
    "iq4_xs": (23, 256, 136),
    "iq1_m": (29, 256, 56),
    "bf16": (30, 1, 2),
}
FALLBACK = {
    "iq2_xxs": "iq4_nl",
    "iq2_xs": "iq4_nl",
    "iq2_s": "iq4_nl",
    "iq3_xxs": "iq4_nl",
    "iq3_s": "iq4_nl",
    "iq1_s": "iq4_nl",
    "iq1_m": "iq4_nl",
    "iq4_xs": "iq4_nl",
    "q2_k": "q4_0",
    "q3_k": "q4_0",
    "q4_k": "q5_0",
    "q5_k": "q5_1",
    "q6_k": "q8_0",
}
# The search's default ladder (quant.types): every type llama.cpp quantizes without an importance matrix
# being mandatory, f16 ("keep everything") down to 2.56 bits.
LADDER = (
    "f16",
    "q8_0",
    "q6_k",
    "q5_k",
    "q5_1",
    "q5_0",
    "q4_k",
    "q4_1",
    "iq4_xs",
    "iq4_nl",
    "q4_0",
    "q3_k",
    "iq3_s",
    "q2_k",
    "iq2_s",
)
# What the file's general.file_type says when one type holds most of its bytes (llama_ftype of llama.h).
FILE_TYPE = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k": 12, "q4_k": 15,
    "q5_k": 17, "q6_k": 18, "iq2_xxs": 19, "iq2_xs": 20, "iq3_xxs": 23, "iq1_s": 24, "iq4_nl": 25, "iq3_s": 26,
    "iq2_s": 28, "iq4_xs": 30, "iq1_m": 31, "bf16": 32,
}  # fmt: skip


class QuantError(ValueError):
    pass


def check_types(types) -> tuple[str, ...]:
    bad = [t for t in types if t not in GGML]
    if bad or not types:
        raise QuantError(
            f"quant.types={list(types)!r}: {bad[0] if bad else 'empty'} is not a llama.cpp tensor type; "
            f"choose from {', '.join(GGML)}"
        )
    return tuple(types)


def effective(t: str, row: int) -> str:
    """The type llama.cpp writes for a row of `row` values when asked for `t`."""
    _, block, _ = GGML[t]
    if block > 1 and row % block:
        t = FALLBACK.get(t, t)
        if row % GGML[t][1]:
            t = "f16"
    return t


def row_bytes(t: str, row: int) -> int:
    """Bytes of one row of `row` values of type t (t already effective for this row length)."""
    _, block, size = GGML[t]
    assert row % block == 0, (t, row)
    return row // block * size


def tensor_bytes(t: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor in GGUF (shape in torch order: rows first, the row length last)."""
    rows = 1
    for n in shape[:-1]:
        rows *= n
    return rows * row_bytes(effective(t, shape[-1]), shape[-1])


def bpw(t: str) -> float:
    _, block, size = GGML[t]
    return 8 * size / block


@dataclass(frozen=True)
class Size:
    """A byte budget: a file size (MiB, GiB, MB, bytes) or bits per weight of the model's parameters."""

    bytes: int | None = None
    bpw: float | None = None

    def resolve(self, params: int) -> int:
        return self.bytes if self.bytes is not None else int(params * float(self.bpw or 0) / 8)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "kib": 2**10, "mb": 10**6, "mib": 2**20, "gb": 10**9, "gib": 2**30}


def parse_size(text: str) -> Size:
    """budget.size: '89MiB', '1.5GiB', '90000000', '4.5bpw'."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if m and unit == "bpw" and 0 < float(m.group(1)) <= 32:
        return Size(bpw=float(m.group(1)))
    if m and unit in _UNITS and float(m.group(1)) > 0:
        return Size(bytes=int(float(m.group(1)) * _UNITS[unit]))
    raise QuantError(f"budget.size={text!r} is not a size; write it as 89MiB, 1.5GiB, 90000000 (bytes) or 4.5bpw")
