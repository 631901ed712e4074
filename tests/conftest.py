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

    if model_type == "opt":  # multi-head attention, fc1/fc2, learned positions; biases everywhere
        kw = dict(
            hidden_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            ffn_dim=96,
            vocab_size=128,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    else:
        kw = dict(
            hidden_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=96,
            vocab_size=128,
            max_position_embeddings=256,
            head_dim=16,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        )
    kw.update(overrides)
    if isinstance(kw.get("layer_types"), list):  # per-layer lists follow the layer count
        kw["layer_types"] = kw["layer_types"][: kw["num_hidden_layers"]]
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # larger-than-init weights and non-zero biases, so pruning visibly changes the outputs
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "norm" in name and model_type in ("qwen3", "gemma3_text"):  # off the identity: a misplaced norm shows
                p.uniform_(0.5, 1.5) if p.mean() > 0.5 else p.uniform_(-0.5, 0.5)
    return model


# Every supported family as the tests build it: (model_type, config overrides). The windowed ones use a
# window shorter than the test windows (32 tokens), so sliding attention really changes the outputs.
FAMILIES = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {"sliding_window": 8}),
    "qwen2": ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    "opt": ("opt", {}),
    "qwen3": ("qwen3", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    # Gemma 3: every other layer global (the real 5:1 pattern needs six layers), a local RoPE base of its own
    "gemma3": (
        "gemma3_text",
        {
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"] * 3,
            "query_pre_attn_scalar": 24,
            "hidden_activation": "gelu_pytorch_tanh",
            "tie_word_embeddings": True,
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        },
    ),
}


def family_model(family: str, **overrides):
    model_type, kw = FAMILIES[family]
    return tiny_model(model_type, **(kw | overrides))


def tiny_family(family: str, **overrides):
    """(model, adapter) of a family as FAMILIES builds it."""
    model = family_model(family, **overrides)
    return model, adapter_for(model.config)


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


def start_local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2**20)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session, never attached to a user's cluster."""
    ray = pytest.importorskip("ray")
    start_local_ray()
    yield ray
    ray.shutdown()


WORDS = "the of and to in a is was for on as with by he at from his it an that were are which this be".split()


def word_tokenizer(path):
    """A small word-level tokenizer built offline (no hub), saved next to a tiny checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def bpe_tokenizer(path):
    """A byte-level BPE tokenizer (GPT-2 style, what a GGUF `gpt2` vocabulary expresses) with a ChatML
    chat template, trained offline on the test words and saved at `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    )
    tok.train_from_iterator([" ".join(WORDS * 20)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    return fast


def make_tiny_checkpoint(root, family: str = "llama", tokenizer=word_tokenizer, **overrides):
    """A tiny random model of a family (FAMILIES) saved as a Hugging Face checkpoint with its tokenizer,
    plus a text corpus."""
    path = root / f"tiny-{family}"
    tok = tokenizer(path)
    model = family_model(family, layers=4, vocab_size=len(tok), **overrides)
    model.save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    words = [WORDS[i] for i in torch.randint(0, len(WORDS), (6000,), generator=g).tolist()]
    corpus = root / "corpus.txt"
    corpus.write_text(" ".join(words))
    return path, corpus


@pytest.fixture
def tiny_checkpoint(tmp_path):
    return make_tiny_checkpoint(tmp_path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint shared by one module's tests (runs that only read it)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def tiny_run_args(path, corpus, run_dir, *extra):
    data = [
        f"data.{n}.name=text data.{n}.path={corpus} data.{n}.seqlen=32" for n in ("calibration", "fitness", "report")
    ]
    return [
        f"model.path={path}",
        f"run_dir={run_dir}",
        *" ".join(data).split(),
        "data.calibration.samples=8",
        "data.fitness.samples=2",
        "data.report.samples=2",
        *(
            () if any(a.startswith("method=") for a in extra) else ("search.mode=evolution",)
        ),  # a method preset names its own mode
        "search.generations=3",
        "search.population=8",
        "search.parents=3",
        "search.mutations=4",
        "search.crossovers=2",
        "budget.target=0.7",
        "budget.tol=0.03",
        f"eval.corpora=[text:{corpus}]",
        "eval.lengths=[16]",
        "eval.tasks=[]",
        "reform.final_windows=4",
        "levels.float32_share=1",  # the same tokens on every CPU (the cut has its own tests)
        *extra,
    ]


SMOLLM2_ROOT = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (converted once from the GGUF and cached); skipped when the GGUF is absent."""
    from searchllm.config import ModelConfig
    from searchllm.data import data_root
    from searchllm.models.loading import ModelError, load

    try:
        return load(ModelConfig(), data_root("auto"))
    except ModelError as e:
        pytest.skip(str(e))
