"""The vLLM export: the family's own transformers classes with per-layer sizes, served by vLLM's
Transformers modeling backend (see models/modeling_perlayer.py and docs/design.md for why this path).

A uniform subnet is the family's plain checkpoint (vLLM's native model serves it). Any other subnet is
written as `PerLayer<Family>ForCausalLM`: each kept layer's query heads, KV heads and MLP width as
transformers' `per_layer_config`, remote code beside the weights. What the family's layers cannot hold
as it is becomes zeros, exactly as the llama.cpp export pads (export.gguf.layer_tensors): heads that keep
only some rotary pairs are widened to head_dim, KV groups with fewer query heads than their layer's
largest get zero query heads, and a layer without attention or MLP keeps one zero head or channel (vLLM
sizes every layer's attention and KV cache, so none may be empty). `VLLMInfo.padding_params` counts the
zeros. OPT (heads tied to hidden_size / heads) and biases a reformation added where the family has none
have no such path and stop with one line, before the search.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from searchllm.export.gguf import layer_shape, layer_tensors

# llama.cpp tensor names of export.gguf.layer_tensors -> the family's module names
HF_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_down.bias": "mlp.down_proj.bias",
}
GEMMA3_NAMES = HF_NAMES | {
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
SUBDIR = "vllm"  # the vLLM checkpoint's folder inside the export dir
REMOTE = "modeling_perlayer.py"


class VLLMError(ValueError):
    pass


@dataclass
class VLLMInfo:
    kind: str  # plain | per_layer
    architecture: str
    params: int  # in the checkpoint, padding included
    padding_params: int  # zeros added so the family's layers hold the subnet


def check_family(model_type: str) -> None:
    """Before the search: a family with a vLLM path (its plain config when uniform, PerLayer* otherwise)."""
    from searchllm.models import modeling_perlayer

    if model_type in ("gemma3",) or model_type in modeling_perlayer.FAMILIES:
        return
    raise VLLMError(
        f"export.format=vllm supports {', '.join(sorted(set(modeling_perlayer.FAMILIES) | {'gemma3'}))} models; "
        f"{model_type!r} has no vLLM path with per-layer sizes here (its attention width is tied to hidden_size); "
        "use export.format=hf (transformers) or search a uniform subnet"
    )


def check_biases(added: set[str], model_type: str) -> None:
    """Before the search: o/down biases the method adds (reform.bias, search.compensate) where the family's
    layers have none cannot be held by the family's classes."""
    if added:
        raise VLLMError(
            f"export.format=vllm cannot hold the {' and '.join(sorted(added))} this method adds to {model_type} "
            "(its layers have none); set reform.bias=false (and search.compensate=false) or use export.format=hf"
        )


def _names(family: str) -> dict[str, str]:
    return GEMMA3_NAMES if family == "gemma3_text" else HF_NAMES


def per_layer_state(model, base, family: str) -> tuple[dict[str, torch.Tensor], list[dict[str, int]], int]:
    """The padded weights of every layer of a searchllm-form model under the family's names, each layer's
    sizes, and the zeros added."""
    c, head_dim = model.config, int(model.config.head_dim)
    names, dtype = _names(family), model.model.embed_tokens.weight.dtype
    sd: dict[str, torch.Tensor] = {}
    sizes, padding = [], 0
    for j, layer in enumerate(model.model.layers):
        tensors, pad = layer_tensors(layer, c, head_dim, rotate=False)
        n_head, n_kv, n_ff = layer_shape(layer, c, head_dim)
        padding += pad
        hidden = c.hidden_size
        if n_kv == 0:  # one zero head: vLLM gives every layer an attention and a KV cache
            n_head = n_kv = 1
            tensors |= {
                "attn_norm.weight": layer.input_layernorm.weight.detach().float().numpy(),
                "attn_q.weight": torch.zeros(head_dim, hidden).numpy(),
                "attn_k.weight": torch.zeros(head_dim, hidden).numpy(),
                "attn_v.weight": torch.zeros(head_dim, hidden).numpy(),
                "attn_output.weight": torch.zeros(hidden, head_dim).numpy(),
            }
            padding += 4 * head_dim * hidden + hidden
        if n_ff == 0:
            n_ff = 1
            tensors |= {
                "ffn_norm.weight": layer.post_attention_layernorm.weight.detach().float().numpy(),
                "ffn_gate.weight": torch.zeros(1, hidden).numpy(),
                "ffn_up.weight": torch.zeros(1, hidden).numpy(),
                "ffn_down.weight": torch.zeros(hidden, 1).numpy(),
            }
            padding += 3 * hidden + hidden
        for n, t in tensors.items():
            if n not in names:
                raise VLLMError(f"layer {j}'s {n} has no place in {family}'s layers; use export.format=hf")
            sd[f"model.layers.{j}.{names[n]}"] = torch.from_numpy(t).to(dtype)
        sizes.append({"num_attention_heads": n_head, "num_key_value_heads": n_kv, "intermediate_size": n_ff})
    return sd, sizes, padding


def per_layer_config(base, sizes: list[dict[str, int]], source_config) -> Any:
    """The family's config (global sizes: the source's) with each layer's sizes where they differ."""
    from searchllm.models import modeling_perlayer

    family = base.model_type
    name = modeling_perlayer.FAMILIES[family]
    cls = getattr(modeling_perlayer, f"PerLayer{name}Config")
    d = base.to_dict()
    if "layer_types" in d and getattr(source_config, "layer_types", None):
        d["layer_types"] = list(source_config.layer_types)  # the kept layers' own (a dropped layer shifts them)
    changed = [{k: v for k, v in s.items() if v != d[k]} for s in sizes]
    overrides = {i: c for i, c in enumerate(changed) if c}
    module = Path(modeling_perlayer.__file__).stem
    d |= {
        "model_type": cls.model_type,
        "architectures": [f"PerLayer{name}ForCausalLM"],
        "auto_map": {
            "AutoConfig": f"{module}.PerLayer{name}Config",
            "AutoModel": f"{module}.PerLayer{name}Model",
            "AutoModelForCausalLM": f"{module}.PerLayer{name}ForCausalLM",
        },
    }
    d.pop("transformers_version", None)
    return cls.from_dict(d | {"per_layer_config": overrides or None})


def build(model, base) -> tuple[torch.nn.Module, VLLMInfo]:
    """The vLLM form of a built export (`model`, plain or searchllm form) in memory; `base` is the family's
    plain config at the source's sizes with the export's layer count (adapter.plain_config)."""
    from accelerate import init_empty_weights

    from searchllm.models import modeling_perlayer

    if getattr(model.config, "model_type", None) != "searchllm":  # uniform: the family's own checkpoint
        params = sum(p.numel() for p in model.parameters())
        return model, VLLMInfo("plain", model.config.architectures[0] if model.config.architectures else "", params, 0)
    family = base.model_type
    if family not in modeling_perlayer.FAMILIES:
        check_family(family)
    sd, sizes, padding = per_layer_state(model, base, family)
    config = per_layer_config(base, sizes, model.config)
    cls = getattr(modeling_perlayer, config.architectures[0])
    own = model.state_dict()
    sd |= {k: own[k] for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")}
    with init_empty_weights():
        out = cls(config).to(sd["model.norm.weight"].dtype)
    expected = out.state_dict()
    for k, t in expected.items():  # biases the family always has (Qwen2's q/k/v) where the subnet has none
        if k not in sd and k.endswith(".bias"):
            sd[k] = torch.zeros(t.shape, dtype=sd["model.norm.weight"].dtype)
            padding += t.numel()
    extra = [k for k in sd if k not in expected]
    if extra:
        raise VLLMError(
            f"{extra[0]} has no place in {family}'s layers (a bias reformation added); export.format=hf, or "
            "search with reform.bias=false"
        )
    out.load_state_dict(sd, strict=True, assign=True)
    if config.tie_word_embeddings:
        out.tie_weights()
    out.eval()
    params = sum(p.numel() for p in out.parameters())
    return out, VLLMInfo("per_layer", config.architectures[0], params, padding)


def save(model, info: VLLMInfo, out: Path, tokenizer=None, generation_from: Path | None = None) -> Path:
    """safetensors, config.json, the remote code (per-layer form), tokenizer and generation config."""
    from searchllm.models import modeling_perlayer

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if info.kind == "per_layer":
        shutil.copy(modeling_perlayer.__file__, out / REMOTE)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if generation_from is not None and (generation_from / "generation_config.json").is_file():
        shutil.copy(generation_from / "generation_config.json", out / "generation_config.json")
    (out / "searchllm_vllm.json").write_text(json.dumps(asdict(info), indent=2))
    return out
