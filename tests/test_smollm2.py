"""On the real SmolLM2-135M (GQA 9/3 heads, RoPE, tied embeddings), with small token budgets."""

import numpy as np
import pytest

from searchllm.config import CorpusConfig
from searchllm.data import first_windows, load_text, tokenize
from searchllm.models.weights import share
from searchllm.pruning.shard import ShardRunner, split_layers
from searchllm.pruning.space import SearchSpace

from helpers import hf_ppl, masked_model

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def windows(smollm2):
    text, _ = load_text(CorpusConfig("wikitext2", "validation"), "auto")
    return first_windows(tokenize(text[:20000], smollm2.tokenizer), 1, 96, "test")


@pytest.fixture(scope="module")
def runner(smollm2):
    g = smollm2.adapter.geometry()
    return ShardRunner(
        smollm2.adapter.architecture(), share(smollm2.model.state_dict()), split_layers(g.num_layers, 1)[0]
    )


def test_full_candidate_gives_the_original_perplexity(smollm2, runner, windows):
    space = SearchSpace(smollm2.adapter.geometry())
    assert runner.forward(space.slices(space.full()), windows).ppl == pytest.approx(
        hf_ppl(smollm2.model, windows), rel=1e-4
    )


@pytest.mark.parametrize("attention", ["channels", "heads"])
def test_sliced_candidate_equals_the_masked_model(smollm2, runner, windows, attention):
    space = SearchSpace(smollm2.adapter.geometry(), attention)
    rng = np.random.default_rng(0)
    c = space.full()
    c.attn = rng.random(c.attn.shape) < 0.8
    c.attn[..., 0] = True
    c.mlp = rng.random(c.mlp.shape) < 0.7
    c.active[[5, 17]] = False
    slices = space.slices(c)
    got = runner.forward(slices, windows).ppl
    assert got == pytest.approx(hf_ppl(masked_model(smollm2.model, smollm2.adapter, slices), windows), rel=1e-4)
