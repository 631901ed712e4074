"""The joint space of pruning levels and llama.cpp tensor types (budget.size). Knows nothing of Ray.

A joint genome is an (L, 10) integer array: per layer its attention and MLP level in the level database
("keep everything" is the top level), then the index in `types` of each of its seven weights (q, k, v, o,
gate, up, down), then the token embedding's type (the same in every row; it is also the output head's).
A candidate is scored on the weights llama.cpp will compute with: each sliced (and refit) weight quantized
by libggml with its importance matrix and read back, so the export is exactly what was scored. Its cost is
the size of its GGUF file in bytes, counted the way llama.cpp lays the file out (tensor infos, 32-byte
alignment, each type's row size after llama.cpp's fallback for the row length).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from searchllm.pruning.levels import LevelSpace
from searchllm.quant.types import QuantError, effective, tensor_bytes

KINDS = ("q", "k", "v", "o", "gate", "up", "down")
GGUF_NAMES = {
    "q": "attn_q",
    "k": "attn_k",
    "v": "attn_v",
    "o": "attn_output",
    "gate": "ffn_gate",
    "up": "ffn_up",
    "down": "ffn_down",
}
INPUTS = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "gate": "mlp", "up": "mlp", "down": "down"}
EMBED = 2 + len(KINDS)  # the genome column of the token embedding's type
ALIGN = 32  # general.alignment: every tensor's data starts on it


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class QuantLevelSpace(LevelSpace):
    """The level space with what a stage actor needs to quantize: the ladder of types and the importance
    matrices (per layer and module input: the mean square of each input column over calibration text;
    `output`: the final normed hidden state's, for the tied embedding as the output head)."""

    def __init__(self, space: LevelSpace, types: tuple[str, ...], imatrix: dict, cache_bytes: int = 2**31) -> None:
        super().__init__(space.geometry, space.params)
        self.types, self.imatrix, self.cache_bytes = tuple(types), imatrix, cache_bytes

    def input_imatrix(self, layer: int, kind: str, kept: list[int] | None) -> np.ndarray | None:
        full = self.imatrix.get(layer, {}).get(INPUTS[kind])
        if full is None:
            return None
        return full if kept is None else full[kept]


@dataclass
class Layout:
    """What the GGUF file of a candidate holds besides the searched weights: the metadata's bytes for a
    uniform subnet (the family's own arch) and a per-layer one (deci, or None where the family has none),
    the outer tensors and the per-layer extras (norms and biases, f32)."""

    hidden: int
    head_dim: int
    vocab: int
    kv_uniform: int
    kv_deci: int | None
    outer: list[tuple[str, tuple[int, ...]]]  # f32 tensors: output_norm, rope_freqs
    tied: bool
    extras: set[str] = field(default_factory=set)  # standard keys present: q_bias, o_bias, down_bias, q_norm, ...
    qwen2: bool = False  # llama.cpp's qwen2 sizes q and o as hidden x hidden: narrower heads need deci


def info_bytes(name: str, ndim: int) -> int:
    """A tensor's entry in the GGUF header: name (u64 length + bytes), n_dims, dims, type, offset."""
    return 8 + len(name.encode()) + 4 + 8 * ndim + 4 + 8


class JointCosts:
    """Exact GGUF bytes and parameter counts of joint genomes over a level space (levels.heads=equal: a
    layer's shape depends on its levels alone, so the costs are known before the database is built)."""

    def __init__(self, space: LevelSpace, types: tuple[str, ...], layout: Layout, lock_levels: bool) -> None:
        check_joint(space, types)
        self.space, self.types, self.layout, self.lock_levels = space, tuple(types), layout, lock_levels
        self.top = np.array([space.attn_top, space.mlp_top] + [len(types) - 1] * (len(KINDS) + 1))

    def shape(self, layer: int, a: int, m: int) -> tuple[int, int, int]:
        """(n_head, n_kv, n_ff) of a layer at these levels as llama.cpp sees it (gguf.layer_shape)."""
        g = self.space.geometry
        n_kv = g.num_kv_heads if a else 0
        n_ff = self.space.channels(m)
        return a * n_kv, n_kv, max(n_ff, 1) if n_kv else n_ff

    def costs(self, layer: int, module: int) -> np.ndarray:
        """The parameters of each level of a module type (the level search's Costs)."""
        s = self.space
        if module == 0:
            return np.array([s.nominal_attn_params(a) for a in range(s.attn_top + 1)], dtype=np.int64)
        return np.array([s.mlp_params(m) for m in range(s.mlp_top + 1)], dtype=np.int64)

    def uniform(self, genome: np.ndarray) -> bool:
        shapes = {self.shape(i, int(a), int(m)) for i, (a, m) in enumerate(genome[:, :2])}
        (h, _, f), lay = next(iter(shapes)), self.layout
        return len(shapes) == 1 and h > 0 and f > 0 and not (lay.qwen2 and h * lay.head_dim != lay.hidden)

    def tensors(self, genome: np.ndarray) -> list[tuple[str, tuple[int, ...], str]]:
        """(GGUF name, shape in torch order, type asked for) of every tensor of the candidate's file."""
        lay, t = self.layout, self.types
        out = [(n, s, "f32") for n, s in lay.outer]
        te = t[int(genome[0, EMBED])]
        out.append(("token_embd.weight", (lay.vocab, lay.hidden), te))
        if not lay.tied:
            out.append(("output.weight", (lay.vocab, lay.hidden), te))
        hd, hid, x = lay.head_dim, lay.hidden, lay.extras
        for i, row in enumerate(genome):
            n_head, n_kv, n_ff = self.shape(i, int(row[0]), int(row[1]))
            p = f"blk.{i}."
            ty = {k: t[int(row[2 + j])] for j, k in enumerate(KINDS)}
            if "attn_out_norm" in x:
                out += [(p + "post_attention_norm.weight", (hid,), "f32"), (p + "post_ffw_norm.weight", (hid,), "f32")]
            if "q_norm" in x:
                out += [(p + "attn_q_norm.weight", (hd,), "f32"), (p + "attn_k_norm.weight", (hd,), "f32")]
            if n_kv:
                out.append((p + "attn_norm.weight", (hid,), "f32"))
                q, kv = n_head * hd, n_kv * hd
                out += [
                    (p + "attn_q.weight", (q, hid), ty["q"]),
                    (p + "attn_k.weight", (kv, hid), ty["k"]),
                    (p + "attn_v.weight", (kv, hid), ty["v"]),
                    (p + "attn_output.weight", (hid, q), ty["o"]),
                ]
                if "q_bias" in x:
                    out += [(p + "attn_q.bias", (q,), "f32"), (p + "attn_k.bias", (kv,), "f32")]
                    out.append((p + "attn_v.bias", (kv,), "f32"))
                if "o_bias" in x:
                    out.append((p + "attn_output.bias", (hid,), "f32"))
            if n_ff:
                out.append((p + "ffn_norm.weight", (hid,), "f32"))
                out += [
                    (p + "ffn_gate.weight", (n_ff, hid), ty["gate"]),
                    (p + "ffn_up.weight", (n_ff, hid), ty["up"]),
                    (p + "ffn_down.weight", (hid, n_ff), ty["down"]),
                ]
                if "down_bias" in x:
                    out.append((p + "ffn_down.bias", (hid,), "f32"))
        return out

    def bytes(self, genome: np.ndarray) -> int:
        """The candidate's GGUF file size: header (24) + metadata + tensor infos, aligned, then each tensor's
        data aligned."""
        ts = self.tensors(genome)
        lay = self.layout
        kv = lay.kv_uniform if self.uniform(genome) else lay.kv_deci
        if kv is None:
            return 1 << 62  # no llama.cpp arch loads it: never inside a budget
        head = 24 + kv + sum(info_bytes(n, len(s)) for n, s, _ in ts)
        return align(head) + sum(align(tensor_bytes(t, s)) for _, s, t in ts)

    def params(self, genome: np.ndarray) -> int:
        return self.space.nominal_params(np.asarray(genome)[:, :2])

    def effective_types(self, genome: np.ndarray) -> dict[str, str]:
        """GGUF name -> the type written, of every quantized tensor."""
        return {n: effective(t, s[-1]) for n, s, t in self.tensors(genome) if len(s) == 2}

    def choices(self, layer: int, col: int, genome: np.ndarray) -> list[int]:
        """Indices of `types` whose written type differs, for a type gene (the first of each written type,
        ordered by the bytes of the row), so a mutation never spends a step on a no-op."""
        row = self._row(layer, col, genome)
        if row is None:
            return [int(genome[layer, col])]
        seen: dict[str, int] = {}
        for k, t in enumerate(self.types):
            seen.setdefault(effective(t, row), k)
        return sorted(seen.values(), key=lambda k: tensor_bytes(self.types[k], (1, row)))

    def effective_index(self, layer: int, col: int, genome: np.ndarray, choices: list[int]) -> int:
        """Where the gene's written type sits in `choices`."""
        row = self._row(layer, col, genome)
        if row is None:
            return 0
        want = effective(self.types[int(genome[layer, col])], row)
        return next(j for j, k in enumerate(choices) if effective(self.types[k], row) == want)

    def _row(self, layer: int, col: int, genome: np.ndarray) -> int | None:
        lay = self.layout
        if col == EMBED:
            return lay.hidden
        n_head, n_kv, n_ff = self.shape(layer, int(genome[layer, 0]), int(genome[layer, 1]))
        kind = KINDS[col - 2]
        if kind in ("q", "k", "v", "gate", "up"):
            return lay.hidden if (n_kv if kind in "qkv" else n_ff) else None
        return (n_head * lay.head_dim if n_kv else None) if kind == "o" else (n_ff or None)


def check_joint(space: LevelSpace, types: tuple[str, ...]) -> None:
    if space.params.heads != "equal":
        raise QuantError(
            f"budget.size needs levels.heads=equal (got {space.params.heads!r}): unequal query heads per KV group "
            "are padded with zero columns in GGUF, and quantization would not keep them zero; set levels.heads=equal"
        )
    if len(types) > 127:
        raise QuantError(f"quant.types has {len(types)} types; at most 127")


def weight_of(
    source: dict[str, torch.Tensor], overrides: dict[str, torch.Tensor], s, g, kind: str
) -> tuple[np.ndarray, list[int] | None]:
    """A sliced (and refit) weight as float32 in GGUF orientation (rows = outputs), and the kept input
    columns (None: all of them) that select its importance matrix."""
    if kind in overrides:
        w = overrides[kind]
    elif kind in ("q", "k", "v", "gate", "up"):
        rows = s.q_rows(g) if kind == "q" else s.kv_rows(g) if kind in "kv" else list(s.mlp)
        w = source[kind][rows]
    else:
        w = source[kind][:, s.kept_inputs(kind, g)]
    kept = None if kind in ("q", "k", "v", "gate", "up") else s.kept_inputs(kind, g)
    return w.detach().float().cpu().numpy(), kept
