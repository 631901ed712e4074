"""Per-family knowledge: where a model keeps its blocks, heads and channels.

Everything downstream (scores, search, shards, reformation, export) talks to a `ModelAdapter` and a
`Geometry`, never to a family's module names. A new family is one subclass registered for its
`config.model_type` values.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from torch import nn

from searchllm.models.blocks import BlockConfig


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class Geometry:
    """Shapes of a decoder-only transformer, as far as the search space cares."""

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    norm_params: int  # per decoder layer (every norm weight and bias)
    outer_params: int  # embeddings, final norm and LM head (counted once when tied)
    gated_mlp: bool = True  # gate and up projections (SwiGLU); False: one input projection (OPT's fc1)

    def new_biases(self, keys) -> set[str]:
        """Of the o/down bias keys given, those this family has no tensor for (added by compensation)."""
        have = {"o_bias": self.o_bias, "down_bias": self.mlp_bias}
        return {k for k in keys if k in have and not have[k]}

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def layer_params(self) -> int:
        return int(self.layer_count(self.num_kv_heads * self.head_dim, self.intermediate))

    @property
    def total_params(self) -> int:
        return self.outer_params + self.num_layers * self.layer_params

    def layer_count(self, kv: Any, mlp: Any, q: Any = None) -> Any:
        """Parameters of a block keeping `kv` dims summed over its KV heads, `mlp` MLP channels and `q`
        query dims (default: every query head of each kept KV head).

        Works elementwise on numpy arrays, so whole populations are counted at once."""
        q = kv * self.group_size if q is None else q
        h = self.hidden
        inputs = 2 if self.gated_mlp else 1  # MLP input projections
        n = h * (q + 2 * kv) + q * h + (inputs + 1) * h * mlp + self.norm_params
        if self.qkv_bias:
            n = n + q + 2 * kv
        if self.o_bias:
            n = n + h * (q > 0)
        if self.mlp_bias:
            n = n + inputs * mlp + h * (mlp > 0)
        return n


# Standard names a block's tensors are exposed under, whatever the family calls them ("gate" only where
# the MLP is gated; "<key>_bias" where the family has that bias, e.g. "in_norm_bias" for a LayerNorm).
# "post_norm" is the norm before the MLP; per-head "q_norm"/"k_norm" and the output norms of sandwich
# blocks ("attn_out_norm", "mlp_out_norm") only where the family has them.
BLOCK_KEYS = ("q", "k", "v", "o", "gate", "up", "down", "in_norm", "post_norm")
OPTIONAL_BLOCK_KEYS = ("q_norm", "k_norm", "attn_out_norm", "mlp_out_norm")


@dataclass(frozen=True, eq=False)
class Architecture:
    """What running a model's layers takes, free of transformers: the adapter builds it in the driver and
    evaluator actors receive it, so their processes import torch alone (transformers took ~6 s of each start)."""

    geometry: Geometry
    block: BlockConfig
    block_keys: tuple[dict[str, str], ...]  # per layer: ModelAdapter.block_state_keys
    outer_keys: dict[str, str]  # ModelAdapter.outer_state_keys
    windows: tuple[Optional[int], ...]  # per layer: its sliding attention window, None for full attention
    # forward(x, position_ids) -> (cos, sin) at the full head dim (2 x head_dim: blocks.DualRope where
    # sliding layers have their own base); None without RoPE
    rope: Optional[nn.Module]


class ModelAdapter(ABC):
    """One family: its geometry, its state-dict names, and how its blocks map onto SearchLLMConfig."""

    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config) -> None:
        self.config = config
        self.check()

    def check(self) -> None:
        """Refuse variants of the family the sliced blocks cannot reproduce (UnsupportedModelError)."""

    @abstractmethod
    def geometry(self) -> Geometry: ...

    @abstractmethod
    def block_state_keys(self, layer: int) -> dict[str, str]:
        """Map from standard block keys (BLOCK_KEYS, plus '<key>_bias') to state-dict names."""

    @abstractmethod
    def outer_state_keys(self) -> dict[str, str]:
        """Map from 'embed', 'norm', 'lm_head' (may equal 'embed') and, where the family has them,
        'norm_bias' and 'positions' (a learned position table) to state-dict names."""

    @abstractmethod
    def family_fields(self) -> dict[str, Any]:
        """SearchLLMConfig fields (LlamaConfig names plus norm/positions/gated_mlp...) describing this model."""

    def rotary(self) -> nn.Module | None:
        """Module with forward(x, position_ids) -> (cos, sin) at the full head dim; None without RoPE."""
        return None

    def architecture(self) -> Architecture:
        g = self.geometry()
        layers = range(g.num_layers)
        return Architecture(
            g,
            BlockConfig.of(self.sliced_config()),
            tuple(self.block_state_keys(i) for i in layers),
            self.outer_state_keys(),
            tuple(self.window(i) for i in layers),
            self.rotary(),
        )

    def window(self, layer: int) -> int | None:
        """The sliding attention window of a layer, None for full attention."""
        return None

    def plain_config(self, num_layers: int, num_kv_heads: int, intermediate: int, group: int | None = None):
        """This family's own config for a subnet whose layers all keep the same whole heads and MLP size,
        or None where the family's config cannot express it."""
        return None

    def plain_names(self, keys: dict[str, str]) -> dict[str, str]:
        """State-dict names in plain_config's model of the source names in `keys` (a multimodal source's
        text tower exports as the text model)."""
        return keys

    def sliced_config(
        self,
        layer_kv_pairs: list | None = None,
        layer_intermediate: list | None = None,
        layers: list[int] | None = None,
        layer_q_heads: list | None = None,
    ):
        """The export's SearchLLMConfig: this model's fields plus the structure of each kept layer
        (`layers`: their original indices, for per-layer attention windows)."""
        from searchllm.models.modeling_searchllm import SearchLLMConfig

        g = self.geometry()
        windows = [self.window(i) for i in layers or []]
        window = next((w for w in windows if w is not None), None)  # one size per model (Mistral, Qwen2)
        return SearchLLMConfig(
            **self.family_fields(),
            head_dim=g.head_dim,
            num_key_value_heads=g.num_kv_heads,
            num_hidden_layers=len(layer_kv_pairs or []),
            layer_kv_pairs=layer_kv_pairs or [],
            layer_intermediate=layer_intermediate or [],
            layer_q_heads=layer_q_heads,
            qkv_bias=g.qkv_bias,
            o_bias=g.o_bias,
            mlp_bias=g.mlp_bias,
            gated_mlp=g.gated_mlp,
            source_model_type=self.config.model_type,
            sliding_window=window,
            layer_types=["full_attention" if w is None else "sliding_attention" for w in windows],
        )


# Modules of searchllm.models holding one family's adapter each (a subclass of ModelAdapter).
FAMILIES = ("llama", "opt", "qwen3", "gemma3")


def adapters() -> list[type[ModelAdapter]]:
    import importlib

    for name in FAMILIES:
        importlib.import_module(f"{__package__}.{name}")
    found, todo = [], list(ModelAdapter.__subclasses__())
    while todo:  # a family may extend another's adapter (Qwen3 is LLaMA's with per-head norms)
        cls = todo.pop(0)
        found.append(cls)
        todo += cls.__subclasses__()
    return found


def adapter_for(config) -> ModelAdapter:
    model_type = getattr(config, "model_type", None)
    for cls in adapters():
        if model_type in cls.model_types:
            return cls(config)
    supported = sorted(t for cls in adapters() for t in cls.model_types)
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported; supported model types: {', '.join(supported)}"
    )
