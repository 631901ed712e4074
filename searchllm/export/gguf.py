"""GGUF export of a subnet for llama.cpp (and what runs on it: Ollama, LM Studio, llama-server).

Reads an exported Hugging Face model (plain family checkpoint or the searchllm form) and writes one GGUF:
  uniform      every layer has the same query heads, KV heads and MLP width: the family's own llama.cpp
               architecture (`llama` for LLaMA and Mistral, `qwen2` for Qwen2 while its query heads still
               span the hidden size, which llama.cpp's qwen2 assumes).
               Qwen3 as `qwen3`, Gemma 3 as `gemma3` (its sliding layers as a per-layer pattern with their
               own RoPE base; norms written as llama.cpp's 1 + w).
  non-uniform  llama.cpp's `deci` architecture (DeciLM / Nemotron-NAS): per-layer `attention.head_count`,
               `attention.head_count_kv` and `feed_forward_length` arrays; dropped blocks are left out.
               Qwen3 and Gemma 3 have no such path (measured: their llama.cpp graphs size every layer like
               the first, and deci has no q/k norms): refused with one line.
What llama.cpp cannot express as it is gets zero rows/columns, which is exact: heads narrower than head_dim
(the in-head channel space) are widened with zero q/k/v dims (zero q.k terms, zero o columns); KV groups
with fewer query heads than the layer's largest get zero query heads (their attention output meets zero
o_proj columns); a layer that keeps attention but no MLP channel gets one zero channel (llama.cpp's deci
graph skips a layer's attention output when its FFN is empty); attention-free layers are n_head = 0.
`GGUFInfo.padding_params` counts the zeros written.

Q/K rows are permuted to llama.cpp's interleaved rotary layout per layer with that layer's head counts
(not for qwen2, whose llama.cpp graph rotates halves as HF does). Llama-3 rope scaling is written as
`rope_freqs`; tied embeddings write no `output`. The tokenizer is copied from the source GGUF when the
source was one, otherwise built from tokenizer.json (GPT-2 style byte-level BPE; anything else stops
with one line). OPT has no llama.cpp path here and is refused by name.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from searchllm.quant.types import FILE_TYPE, GGML, effective

# Source model type -> llama.cpp architecture of a uniform subnet (non-uniform ones: deci, for the families in DECI).
ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}
DECI = {"llama", "mistral", "qwen2"}  # deci's graph has no per-head q/k norms nor Gemma's sandwich norms
HALVES_ROTARY = {"qwen2", "qwen3", "gemma3"}  # llama.cpp arches that rotate (d, d + head_dim/2) like HF: no permutation
NORM_OFFSET = {"gemma3": 1.0}  # llama.cpp's Gemma norms hold the scale itself (1 + w of transformers' weights)
FTYPES = {  # llama.h llama_ftype; names as llama-quantize spells them (lower case)
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q8_0": 7,
    "q5_0": 8,
    "q5_1": 9,
    "q2_k": 10,
    "q3_k_s": 11,
    "q3_k_m": 12,
    "q3_k_l": 13,
    "q4_k_s": 14,
    "q4_k_m": 15,
    "q5_k_s": 16,
    "q5_k_m": 17,
    "q6_k": 18,
    "iq2_xxs": 19,
    "iq2_xs": 20,
    "q2_k_s": 21,
    "iq3_xs": 22,
    "iq3_xxs": 23,
    "iq1_s": 24,
    "iq4_nl": 25,
    "iq3_s": 26,
    "iq3_m": 27,
    "iq2_s": 28,
    "iq2_m": 29,
    "iq4_xs": 30,
    "iq1_m": 31,
    "bf16": 32,
    "tq1_0": 36,
    "tq2_0": 37,
}


class GGUFError(ValueError):
    pass


@dataclass
class GGUFInfo:
    path: str
    arch: str
    layers: int
    params: int  # parameters in the file, padding included
    padding_params: int  # zeros added so llama.cpp can express the subnet
    bytes: int
    type: str


def check_types(types: list[str]) -> None:
    bad = [t for t in types if t not in FTYPES]
    if bad or not types:
        raise GGUFError(
            f"export.gguf_types={list(types)!r}: {bad[0] if bad else 'empty'} is not a llama.cpp type; "
            f"choose from {', '.join(FTYPES)}"
        )


def family_of(config) -> str:
    family = getattr(config, "source_model_type", None) if config.model_type == "searchllm" else config.model_type
    if family not in ARCH:
        raise GGUFError(
            f"GGUF export supports {', '.join(ARCH)} models; {family!r} has no llama.cpp path here "
            "(use export.format=hf)"
        )
    return family


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half head layout -> llama.cpp's interleaved pairs (convert_hf_to_gguf's permute)."""
    if n_head == 0:
        return w
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _layout(attn, config, head_dim: int) -> tuple[list[list[int]], list[int]]:
    """Kept rotary pairs and query-head count of each kept KV head of a layer's attention."""
    if hasattr(attn, "kv_pairs"):  # searchllm's SlicedAttention: only kept heads, stored unpadded
        return [list(p) for p in attn.kv_pairs], list(attn.counts)
    n_kv = config.num_key_value_heads
    return [list(range(head_dim // 2))] * n_kv, [config.num_attention_heads // n_kv] * n_kv


def _full_rows(pairs: list[int], head_dim: int) -> list[int]:
    """Where a kept head's stored dims ([pairs..., pairs + half...]) sit in a full head."""
    return list(pairs) + [p + head_dim // 2 for p in pairs]


def layer_shape(layer, config, head_dim: int) -> tuple[int, int, int]:
    """(n_head, n_kv, n_ff) of a block as llama.cpp will see it (after the padding layer_tensors adds)."""
    pairs, counts = _layout(layer.self_attn, config, head_dim)
    n_kv, n_ff = len(pairs), layer.mlp.up_proj.weight.shape[0]
    return n_kv * max(counts, default=0), n_kv, max(n_ff, 1) if n_kv else n_ff


def layer_norms(layer) -> dict:
    """A block's norm weights (tensors) by llama.cpp name, from transformers' Gemma 3 / Qwen3 / LLaMA blocks
    or ours."""
    a = layer.self_attn
    if hasattr(layer, "pre_feedforward_layernorm"):  # transformers' Gemma 3 block
        out = {
            "attn_norm": layer.input_layernorm.weight,
            "post_attention_norm": layer.post_attention_layernorm.weight,
            "ffn_norm": layer.pre_feedforward_layernorm.weight,
            "post_ffw_norm": layer.post_feedforward_layernorm.weight,
        }
    else:
        out = {"attn_norm": layer.input_layernorm.weight, "ffn_norm": layer.post_attention_layernorm.weight}
        if getattr(layer, "attn_out_norm", None) is not None:
            out |= {"post_attention_norm": layer.attn_out_norm.weight, "post_ffw_norm": layer.mlp_out_norm.weight}
    if getattr(a, "q_norm", None) is not None:
        out |= {"attn_q_norm": a.q_norm.weight, "attn_k_norm": a.k_norm.weight}
    return out


def layer_tensors(layer, config, head_dim: int, rotate: bool, offset: float = 0.0) -> tuple[dict[str, np.ndarray], int]:
    """One block's GGUF tensors (f32, HF orientation; their sizes are layer_shape's) and the zeros added."""
    a, m = layer.self_attn, layer.mlp
    pairs, counts = _layout(a, config, head_dim)
    hidden = config.hidden_size
    n_kv, per = len(pairs), max(counts, default=0)
    f32 = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
    out: dict[str, np.ndarray] = {f"{n}.weight": f32(w) + offset for n, w in layer_norms(layer).items()}
    padding = 0
    if n_kv:
        q, k, v, o = (f32(getattr(a, f"{n}_proj").weight) for n in "qkvo")
        bias = {n: f32(getattr(a, f"{n}_proj").bias) for n in "qkv" if getattr(a, f"{n}_proj").bias is not None}
        Q = np.zeros((n_kv * per * head_dim, hidden), np.float32)
        K = np.zeros((n_kv * head_dim, hidden), np.float32)
        V, O = np.zeros_like(K), np.zeros((hidden, n_kv * per * head_dim), np.float32)  # noqa: E741 (q, k, v, o)
        QB, KB, VB = (
            np.zeros(Q.shape[0], np.float32),
            np.zeros(K.shape[0], np.float32),
            np.zeros(K.shape[0], np.float32),
        )
        src_q = src_kv = 0
        for j, (p, c) in enumerate(zip(pairs, counts)):
            rows, w = _full_rows(p, head_dim), 2 * len(p)
            kv_dst = [j * head_dim + r for r in rows]
            K[kv_dst], V[kv_dst] = k[src_kv : src_kv + w], v[src_kv : src_kv + w]
            if bias:
                KB[kv_dst], VB[kv_dst] = bias["k"][src_kv : src_kv + w], bias["v"][src_kv : src_kv + w]
            for r in range(c):
                dst = [(j * per + r) * head_dim + x for x in rows]
                Q[dst], O[:, dst] = q[src_q : src_q + w], o[:, src_q : src_q + w]
                if bias:
                    QB[dst] = bias["q"][src_q : src_q + w]
                src_q += w
            src_kv += w
        padding += Q.size + K.size + V.size + O.size - (q.size + k.size + v.size + o.size)
        if rotate:
            Q, K = _permute(Q, n_kv * per), _permute(K, n_kv)
            QB, KB = _permute(QB, n_kv * per), _permute(KB, n_kv)
        out |= {"attn_q.weight": Q, "attn_k.weight": K, "attn_v.weight": V, "attn_output.weight": O}
        if bias:
            out |= {"attn_q.bias": QB, "attn_k.bias": KB, "attn_v.bias": VB}
            padding += QB.size + KB.size + VB.size - sum(b.size for b in bias.values())
        if a.o_proj.bias is not None:
            out["attn_output.bias"] = f32(a.o_proj.bias)
    else:  # an attention-free layer has no attention norm in llama.cpp
        padding -= int(out.pop("attn_norm.weight").size)
    gate, up, down = f32(m.gate_proj.weight), f32(m.up_proj.weight), f32(m.down_proj.weight)
    n_ff = up.shape[0]
    if n_ff == 0 and n_kv:  # deci would drop the attention output with the empty FFN: one zero channel
        gate, up, down = (
            np.zeros((1, hidden), np.float32),
            np.zeros((1, hidden), np.float32),
            np.zeros((hidden, 1), np.float32),
        )
        n_ff, padding = 1, padding + 3 * hidden
    if n_ff:
        out |= {"ffn_gate.weight": gate, "ffn_up.weight": up, "ffn_down.weight": down}
        if m.down_proj.bias is not None:
            out["ffn_down.bias"] = f32(m.down_proj.bias)
    else:
        padding -= int(out.pop("ffn_norm.weight").size)
    return out, padding


def llama3_rope_factors(rope: dict, head_dim: int, theta: float) -> np.ndarray | None:
    """Llama-3 rope scaling as llama.cpp's `rope_freqs` (convert_hf_to_gguf's recipe)."""
    if rope.get("rope_type") != "llama3":
        return None
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def _rope(config) -> tuple[float, dict]:
    """The (global layers') RoPE base and parameters."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope = dict(rope.get("full_attention", rope))  # per layer type (Gemma 3): the global layers'
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))), rope


def gemma3_keys(w, c, head_dim: int, rope: dict) -> None:
    """Gemma 3's sliding layers (window, which layers, their RoPE base) and the global layers' linear RoPE
    scaling; settings llama.cpp's gemma3 cannot express stop with one line."""
    import gguf

    scalar = getattr(c, "query_pre_attn_scalar", None) or head_dim
    if scalar != head_dim:  # llama.cpp derives the scale from the model size (27B: hidden / heads)
        raise GGUFError(
            f"query_pre_attn_scalar={scalar} differs from head_dim={head_dim}: llama.cpp's gemma3 would scale "
            "this subnet's attention otherwise; use export.format=hf"
        )
    types = list(c.layer_types)
    if "sliding_attention" in types:
        w.add_sliding_window(int(c.sliding_window))
        w.add_sliding_window_pattern([t == "sliding_attention" for t in types])
        local = getattr(c, "local_rope_theta", None) or c.rope_parameters["sliding_attention"]["rope_theta"]
        w.add_rope_freq_base_swa(float(local))
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))


def write(
    model,
    tokenizer_dir: Path,
    out: Path,
    source_gguf: Path | None = None,
    arch: str | None = None,
    per_layer: bool | None = None,
    types: dict[str, str] | None = None,
    imatrix: dict[str, np.ndarray] | None = None,
    name: str | None = None,
) -> GGUFInfo:
    """Write `model` (an exported HF model, loaded) as a GGUF at `out`: f32, or each weight named in `types`
    quantized by libggml to its type (with its `imatrix` entry), the stitched file of a byte budget. `arch`
    forces the architecture and `per_layer` the per-layer size arrays (tests: what llama.cpp refuses)."""
    import gguf

    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    shapes = [layer_shape(layer, c, head_dim) for layer in model.model.layers]
    # general.file_type names the type most weights are written in (a label: llama.cpp reads each tensor's)
    most = Counter(effective(t, c.hidden_size) for t in (types or {}).values()).most_common(1)
    ftype = FILE_TYPE.get(most[0][0], 0) if most else FTYPES["f32"]
    w, arch = _open(c, shapes, head_dim, tokenizer_dir, out, source_gguf, arch, per_layer, name, ftype)
    kinds: dict[str, int] = {}

    def put(key: str, t: np.ndarray) -> None:
        t = np.ascontiguousarray(t, dtype=np.float32)
        if types is None or key not in types:
            w.add_tensor(key, t)
            return
        from searchllm.quant.ggml import quantize

        qt, data = quantize(t, types[key], (imatrix or {}).get(key), key)
        kinds[qt] = kinds.get(qt, 0) + data.nbytes
        w.add_tensor(key, data, raw_dtype=gguf.GGMLQuantizationType(GGML[qt][0]))

    rotate = arch not in HALVES_ROTARY
    offset = NORM_OFFSET.get(arch, 0.0)
    theta, rope = _rope(c)
    f32 = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
    put("token_embd.weight", f32(model.model.embed_tokens.weight))
    factors = llama3_rope_factors(rope, head_dim, theta)
    if factors is not None:
        put("rope_freqs.weight", factors)
    put("output_norm.weight", f32(model.model.norm.weight) + offset)
    if not c.tie_word_embeddings:
        put("output.weight", f32(model.lm_head.weight))
    params = sum(int(t.numel()) for t in (model.model.embed_tokens.weight, model.model.norm.weight))
    params += 0 if c.tie_word_embeddings else int(model.lm_head.weight.numel())
    padding = 0
    for i, layer in enumerate(model.model.layers):
        tensors, pad = layer_tensors(layer, c, head_dim, rotate, offset)
        for key, t in tensors.items():
            put(f"blk.{i}.{key}", t)
            params += t.size
        padding += pad
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    kind = max(kinds, key=lambda k: kinds[k]) if kinds else "f32"
    return GGUFInfo(str(out), arch, len(shapes), int(params), int(padding), Path(out).stat().st_size, kind)


def metadata_bytes(
    config, shapes: list[tuple[int, int, int]], tokenizer_dir: Path, source_gguf: Path | None, name: str
) -> int | None:
    """Bytes of the metadata (key/values) of a file `write` would write for these layer shapes (None: no
    llama.cpp arch loads them): what a byte budget counts besides the tensors."""
    import tempfile

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    quiet = [logging.getLogger(n) for n in ("gguf.gguf_writer", "gguf.vocab")]
    levels = [q.level for q in quiet]
    for q in quiet:  # the writer logs every file it writes: this one is a measurement
        q.setLevel(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "meta.gguf"
            try:
                w, _ = _open(config, shapes, head_dim, tokenizer_dir, path, source_gguf, None, None, name)
            except GGUFError:
                return None
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.close()
            return path.stat().st_size - 24  # magic, version, tensor and key/value counts
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def _open(c, shapes, head_dim: int, tokenizer_dir, out, source_gguf, arch, per_layer, name, ftype: int = 0):
    """A GGUFWriter at `out` with every key/value of the subnet's file, and the arch chosen."""
    import gguf

    family = family_of(c)
    uniform = len(set(shapes)) == 1 and shapes[0][0] > 0 and shapes[0][2] > 0
    if family == "qwen2" and uniform and shapes[0][0] * head_dim != c.hidden_size:
        uniform = False  # llama.cpp's qwen2 sizes Q and O as hidden x hidden; deci sizes them per layer
    if arch is None:
        arch = ARCH[family] if uniform else "deci" if family in DECI else None
    if arch is None:
        raise GGUFError(
            f"this {family} subnet keeps different head counts or MLP widths per layer ({len(set(shapes))} shapes), "
            f"which llama.cpp's {ARCH[family]} cannot load (it sizes every layer like the first, measured) and "
            "deci cannot run (no per-head q/k norms); export it for transformers or vLLM instead (resume the run "
            "with export.format=hf or export.format=vllm)"
        )
    if arch == "qwen3" and "sliding_attention" in (getattr(c, "layer_types", None) or []):
        raise GGUFError(
            "this qwen3 model has sliding-window layers (use_sliding_window), which llama.cpp's qwen3 runs as "
            "full attention (measured: other logits); export it as a Hugging Face checkpoint (export.format=hf)"
        )
    theta, rope = _rope(c)
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(name or Path(out).stem)
    w.add_block_count(len(shapes))
    w.add_context_length(int(c.max_position_embeddings))
    w.add_embedding_length(int(c.hidden_size))
    if arch == "gemma3":
        gemma3_keys(w, c, head_dim, rope)
    per_layer = arch == "deci" if per_layer is None else per_layer
    pick = lambda i: [s[i] for s in shapes] if per_layer else shapes[0][i]  # noqa: E731
    w.add_head_count(pick(0))
    w.add_head_count_kv(pick(1))
    w.add_feed_forward_length(pick(2))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_vocab_size(int(c.vocab_size))
    w.add_file_type(ftype)
    add_tokenizer(w, tokenizer_dir, source_gguf)
    return w, arch


def add_tokenizer(w, tokenizer_dir: Path, source_gguf: Path | None) -> None:
    """The source GGUF's tokenizer keys verbatim, else a GPT-2 style BPE from tokenizer.json."""
    import gguf

    if source_gguf is not None:
        reader = gguf.GGUFReader(str(source_gguf))
        for name, field in reader.fields.items():
            if not name.startswith("tokenizer."):
                continue
            vtype = field.types[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                w.add_key_value(name, field.contents(), vtype, sub_type=field.types[-1])
            else:
                w.add_key_value(name, field.contents(), vtype)
        return
    try:
        vocab = gguf.vocab.BpeVocab(Path(tokenizer_dir))
    except FileNotFoundError:
        raise GGUFError(
            f"the tokenizer in {tokenizer_dir} is not a GPT-2 style byte-level BPE (tokenizer.json), "
            "the one kind searchllm can write to GGUF; convert it with llama.cpp's convert_hf_to_gguf.py"
        ) from None
    tokens, types = [], []
    for text, _, kind in vocab.all_tokens():
        tokens.append(text)
        types.append(kind)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(Path(tokenizer_dir), load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(w)


# Ollama's TEMPLATE is a Go template, not Jinja: the chat formats we can recognise in the tokenizer's
# template are written out; for others Ollama falls back to the GGUF's own tokenizer.chat_template.
GO_TEMPLATES = {
    "<|im_start|>": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        ["<|im_start|>", "<|im_end|>"],
    ),
    "<|start_header_id|>": (
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ["<|eot_id|>", "<|start_header_id|>"],
    ),
}


def modelfile(gguf_name: str, chat_template: str | None, eos_token: str | None) -> str:
    """An Ollama Modelfile for the GGUF beside it: FROM, the chat TEMPLATE, stop tokens."""
    lines = [f"FROM ./{gguf_name}"]
    stops: list[str] = []
    for marker, (template, marker_stops) in GO_TEMPLATES.items():
        if chat_template and marker in chat_template:
            lines.append(f'TEMPLATE """{template}"""')
            stops = list(marker_stops)
            break
    else:
        lines.append("# chat template: the GGUF's tokenizer.chat_template (not one of the formats written out here)")
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"
