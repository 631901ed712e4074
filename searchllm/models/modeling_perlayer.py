"""A family's own transformers model whose layers each keep their own heads and MLP width (vLLM's path).

Remote code (transformers only): the vLLM export copies this file beside its weights. Each class is the
family's own (LLaMA, Mistral, Qwen2, Qwen3, Gemma 3 text) with one change: layer i is built from
`config.per_layer_config[i]`, transformers' per-layer overrides of `num_attention_heads`,
`num_key_value_heads` and `intermediate_size`. Everything else (attention through the attention-function
registry, norms, RoPE, caches) is the family's code, which is what vLLM's Transformers modeling backend
needs to serve a heterogeneous checkpoint (it sizes each layer's attention and KV cache from the same
overrides). Every layer keeps at least one head and one MLP channel: the export writes zeros there.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Gemma3TextModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    MistralModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Model,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
)

PER_LAYER = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


@contextmanager
def _global_sizes(config):
    """The family's constructor sizes every layer from the global values (on the meta device when loading);
    its layers are rebuilt from their own configs right after, so reading the global values is safe here."""
    quiet = logging.getLogger("transformers.integrations.heterogeneity.configuration_utils")
    level, allow = quiet.level, config.allow_global_per_layer_attribute_access
    quiet.setLevel(logging.ERROR)
    config.allow_global_per_layer_attribute_access = True
    try:
        yield
    finally:
        config.allow_global_per_layer_attribute_access = allow
        quiet.setLevel(level)


def _family(name: str, config_cls, model_cls, causal_cls):
    @strict
    class Config(config_cls):
        model_type = f"searchllm_{config_cls.model_type}"

        def validate_architecture(self):
            pass  # head_dim is explicit: a layer may keep any number of heads

    class Model(model_cls):
        config_class = Config

        def __init__(self, config) -> None:
            with _global_sizes(config):
                super().__init__(config)
            if config.is_heterogeneous:
                layer = type(self.layers[0])
                self.layers = nn.ModuleList(layer(c, i) for i, c in enumerate(config.per_layer_config))
                self.post_init()

    class ForCausalLM(causal_cls):
        config_class = Config

        def __init__(self, config) -> None:
            with _global_sizes(config):
                super().__init__(config)
            self.model = Model(config)
            self.post_init()

    for cls, suffix in ((Config, "Config"), (Model, "Model"), (ForCausalLM, "ForCausalLM")):
        cls.__name__ = cls.__qualname__ = f"PerLayer{name}{suffix}"
    return Config, Model, ForCausalLM


PerLayerLlamaConfig, PerLayerLlamaModel, PerLayerLlamaForCausalLM = _family(
    "Llama", LlamaConfig, LlamaModel, LlamaForCausalLM
)
PerLayerMistralConfig, PerLayerMistralModel, PerLayerMistralForCausalLM = _family(
    "Mistral", MistralConfig, MistralModel, MistralForCausalLM
)
PerLayerQwen2Config, PerLayerQwen2Model, PerLayerQwen2ForCausalLM = _family(
    "Qwen2", Qwen2Config, Qwen2Model, Qwen2ForCausalLM
)
PerLayerQwen3Config, PerLayerQwen3Model, PerLayerQwen3ForCausalLM = _family(
    "Qwen3", Qwen3Config, Qwen3Model, Qwen3ForCausalLM
)
PerLayerGemma3Config, PerLayerGemma3Model, PerLayerGemma3ForCausalLM = _family(
    "Gemma3", Gemma3TextConfig, Gemma3TextModel, Gemma3ForCausalLM
)

# model_type of the family's plain config -> the name of its classes here
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma3_text": "Gemma3"}
