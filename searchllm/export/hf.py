"""Export a subnet as a physically smaller dense Hugging Face checkpoint.

Two forms, chosen by the subnet's structure:
  plain      every kept layer keeps the same number of whole KV heads and the same MLP size: the source
             family's own config class (LlamaConfig, Qwen2Config, ...) with smaller sizes; no remote code.
  searchllm  anything else (per-layer head counts, per-head widths, kept rotary pairs): SearchLLMConfig
             with each layer's structure, and modeling_searchllm.py (with blocks.py) copied beside the weights, loadable
             with from_pretrained(path, trust_remote_code=True) where searchllm is not installed.
Weights hold exactly the kept rows and columns (parameter count = the search's count). Heads of one
layer with different widths are zero-padded to the widest at run time only; the padding is reported.
Dropped blocks are left out, so the exported model has fewer layers.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from searchllm.models import blocks, modeling_searchllm
from searchllm.models.adapters import ModelAdapter
from searchllm.models.modeling_searchllm import SearchLLMForCausalLM
from searchllm.models.sliced import MODULE_PATHS, LayerSlice, slice_weights

# Standard outer keys (adapters' outer_state_keys) -> names in the searchllm form.
OUTER_NAMES = {
    "embed": "model.embed_tokens.weight",
    "positions": "model.embed_positions.weight",
    "norm": "model.norm.weight",
    "norm_bias": "model.norm.bias",
    "lm_head": "lm_head.weight",
}
AUTO_MAP = {
    "AutoConfig": "modeling_searchllm.SearchLLMConfig",
    "AutoModelForCausalLM": "modeling_searchllm.SearchLLMForCausalLM",
}


@dataclass
class ExportInfo:
    kind: str  # plain | searchllm
    params: int
    layers: int  # kept blocks
    attention_dims: int  # kept query dims summed over layers (real work)
    padded_attention_dims: int  # query dims after padding heads to the widest of their layer
    original_params: int = 0  # of the source model, for the inheriting ratio of the export alone
    original_decoder_params: int = 0
    # Zero biases given to layers that a reformation left without the o/down bias other layers gained
    # (the export's bias layout is one per model): parameters of the export the subnet itself lacks.
    zero_biases: int = 0

    @property
    def padding(self) -> float:
        return self.padded_attention_dims / max(self.attention_dims, 1) - 1


def is_uniform(slices: Sequence[LayerSlice], g) -> bool:
    """Every kept layer keeps the same number of whole KV heads, the same number of query heads in every
    kept group, and the same MLP size; none dropped."""
    if not all(s.active for s in slices):
        return False
    shapes = {(tuple(c for c in s.q_counts(g) if c), len(s.mlp)) for s in slices}
    whole = all(len(p) in (0, g.head_dim // 2) for s in slices for p in s.kv_pairs)
    heads = next(iter(shapes))[0]
    return whole and len(shapes) == 1 and len(heads) > 0 and len(set(heads)) == 1


def build(
    adapter: ModelAdapter,
    state: Mapping[str, torch.Tensor],
    slices: Sequence[LayerSlice],
    reformed: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.nn.Module, ExportInfo]:
    """The exported model in memory (weights on CPU), from the original state dict, the slices and the
    reformed o/down weights per layer."""
    from transformers import AutoModelForCausalLM

    g = adapter.geometry()
    kept = [i for i, s in enumerate(slices) if s.active]
    if not kept:
        raise ValueError("the subnet keeps no blocks; nothing to export")
    # Biases a reformation added where the family has none (FLAP's compensation): only our config has them.
    added = g.new_biases({k for w in (reformed or {}).values() for k in w})
    config = None
    if is_uniform(slices, g) and not added:
        counts = [c for c in slices[kept[0]].q_counts(g) if c]
        config = adapter.plain_config(len(kept), len(counts), len(slices[kept[0]].mlp), counts[0])
    uniform = config is not None
    outer = adapter.outer_state_keys()
    if uniform:
        names = lambda j: adapter.plain_names(adapter.block_state_keys(j))  # noqa: E731
        outer_names = adapter.plain_names(outer) | {"lm_head": "lm_head.weight"}  # a tied head is still an entry
    else:
        pruned_q = any(slices[i].q_heads is not None for i in kept)
        config = adapter.sliced_config(
            [[list(p) for p in slices[i].kv_pairs] for i in kept],
            [len(slices[i].mlp) for i in kept],
            kept,
            [slices[i].q_counts(g) for i in kept] if pruned_q else None,
        )
        config.auto_map = dict(AUTO_MAP)
        config.o_bias |= "o_bias" in added
        config.down_bias = "down_bias" in added
        names = lambda j: {k: f"model.layers.{j}.{path}" for k, path in MODULE_PATHS.items()}  # noqa: E731
        outer_names = {k: OUTER_NAMES[k] for k in outer}
    sd: dict[str, torch.Tensor] = {}
    q_dims = padded = zero_biases = 0
    for j, i in enumerate(kept):
        w = {k: state[n] for k, n in adapter.block_state_keys(i).items()}
        zeros = {k: torch.zeros(g.hidden, dtype=w["o"].dtype) for k in added - set((reformed or {}).get(i, {}))}
        zero_biases += g.hidden * len(zeros)
        sliced = slice_weights(w, slices[i], g) | zeros | dict((reformed or {}).get(i, {}))
        sd |= {names(j)[k]: t for k, t in sliced.items()}
        counts = slices[i].q_counts(g)
        widths = [(2 * len(p), c) for p, c in zip(slices[i].kv_pairs, counts) if p and c]
        q_dims += sum(w * c for w, c in widths)
        padded += max((w for w, _ in widths), default=0) * sum(c for _, c in widths)
    sd |= {outer_names[k]: state[n] for k, n in outer.items()}
    target = dtype or state[outer["embed"]].dtype
    sd = {k: v.detach().to("cpu", target).contiguous() for k, v in sd.items()}
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on meta (replaced below); buffers such as rotary tables real
        model = (
            AutoModelForCausalLM.from_config(config, dtype=target)
            if uniform
            else SearchLLMForCausalLM(config).to(target)
        )
    model.load_state_dict(sd, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    return model, ExportInfo(
        "plain" if uniform else "searchllm",
        params,
        len(kept),
        q_dims,
        padded,
        g.total_params,
        g.num_layers * g.layer_params,
        zero_biases,
    )


def save(model: torch.nn.Module, info: ExportInfo, out: str | Path, tokenizer=None, source: str | None = None) -> Path:
    """Write safetensors, config.json (with auto_map for the searchllm form), the remote code files,
    the tokenizer, and the source's generation config."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if info.kind == "searchllm":
        for module in (modeling_searchllm, blocks):
            shutil.copy(module.__file__, out / Path(module.__file__).name)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if source is not None:
        try:
            from transformers import GenerationConfig

            GenerationConfig.from_pretrained(source).save_pretrained(out)
        except OSError:
            pass  # the source has no generation config
    write_info(info, out)
    return out


def write_info(info: ExportInfo, out: Path) -> None:
    """searchllm_export.json: the export's counts and the source's (the evaluation's kept ratios)."""
    (out / "searchllm_export.json").write_text(json.dumps(asdict(info) | {"padding": info.padding}, indent=2))
