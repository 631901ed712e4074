import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from searchllm.models.adapters import adapter_for


def tiny_model(model_type: str = "llama", layers: int = 3, seed: int = 0, **overrides):
    """A random-weight model of a supported family, small enough for unit tests."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(
        hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, vocab_size=128, max_position_embeddings=256, head_dim=16,
        rope_theta=10000.0, tie_word_embeddings=False,
    )
    kw.update(overrides)
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # larger-than-init weights, so pruning visibly changes the outputs
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (3, 32), generator=g)


@pytest.fixture
def adapter(llama):
    return adapter_for(llama.config)
