"""Self-generated calibration: sampling with a KV cache on the pool, its cache in the run dir, mixtures."""

import json

import pytest
import torch

from searchllm.config import ConfigError, load_config
from searchllm.data import apportion, token_sets
from searchllm.models.adapters import adapter_for
from searchllm.pruning.shard import ShardRunner, split_layers
from tests.conftest import FAMILIES, family_model
from tests.helpers import evaluator_pool


def greedy(model, prompt: torch.Tensor, length: int) -> torch.Tensor:
    """transformers' model, a full forward per token, no cache: the reference."""
    seq = prompt
    with torch.no_grad():
        while seq.shape[1] < length:
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


@pytest.mark.parametrize("family", list(FAMILIES))
def test_decoding_with_the_kv_cache_follows_the_full_forward(family):
    model = family_model(family)
    adapter = adapter_for(model.config)
    (spec,) = split_layers(model.config.num_hidden_layers, 1)
    runner = ShardRunner(adapter.architecture(), model.state_dict(), spec)
    prompt = torch.tensor([[1, 5, 9], [2, 7, 3]])
    runner.decode_begin(2, 24, 0, [0, 1])
    seq, tok = prompt, runner.decode_step(prompt, 0, temperature=0.0)
    while True:
        seq = torch.cat([seq, tok[:, None]], 1)
        if seq.shape[1] == 24:
            break
        tok = runner.decode_step(tok[:, None], seq.shape[1] - 1, temperature=0.0)
    assert torch.equal(seq, greedy(model, prompt, 24))


@pytest.mark.parametrize("dtype", ["model", "bfloat16"])
def test_generated_text_is_the_same_on_one_or_two_replicas_and_follows_the_seed(
    ray_cluster, llama, adapter, tokens, dtype
):
    def sample(seed: int, replicas: int = 1, stages: int = 1) -> torch.Tensor:
        # one thread per actor: CPU bfloat16 kernels round by thread count
        with evaluator_pool(llama, adapter, tokens, replicas=replicas, stages=stages, threads=1) as pool:
            return pool.generate([1, 2], 5, 12, seed, 1.0, 0.9, 2, dtype=dtype)

    one = sample(0)
    assert one.shape == (5, 12) and (one[:, :2] == torch.tensor([1, 2])).all()
    assert torch.equal(one, sample(0, replicas=2, stages=2))  # two replicas of two pipelined shards each
    assert not torch.equal(one, sample(1))


def test_sampling_in_bfloat16_samples_what_a_bfloat16_model_samples(ray_cluster, llama, adapter, tokens):
    (spec,) = split_layers(llama.config.num_hidden_layers, 1)
    runner = ShardRunner(adapter.architecture(), llama.state_dict(), spec, "cpu", torch.bfloat16)
    prompt = torch.tensor([[1, 2]] * 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the actor's
    try:
        runner.decode_begin(4, 12, 0, [0, 1, 2, 3])
        alone = runner.decode_rest(prompt, 0, 12, 1.0, 0.9)
    finally:
        torch.set_num_threads(threads)
    with evaluator_pool(llama, adapter, tokens, threads=1) as pool:
        pooled = pool.generate([1, 2], 4, 12, 0, 1.0, 0.9, 4, dtype="bfloat16")
    assert torch.equal(pooled[:, 2:], alone)


@pytest.mark.ray
def test_a_resume_reuses_the_cached_generated_windows(ray_cluster, tiny_checkpoint, tmp_path, monkeypatch):
    from searchllm.cluster.pool import EvaluatorPool
    from searchllm.driver import main
    from tests.test_level_driver import level_args

    path, corpus = tiny_checkpoint
    run = tmp_path / "run"
    mix = [
        f"data.{r}.{k}" for r in ("calibration", "fitness") for k in ("name=mix", f"mix=[text:{corpus}=1,generated=1]")
    ]
    assert main(level_args(path, corpus, run, "search.generations=1", *mix)) == 0
    saved = torch.load(run / "generated.pt")["tokens"]
    assert saved.shape == (4, 32)  # the calibration takes the most: half of its 8 windows of 32

    def refuse(*args, **kwargs):
        raise AssertionError("a resume sampled the text again")

    monkeypatch.setattr(EvaluatorPool, "generate", refuse)
    assert main([f"resume={run}", "search.generations=2"]) == 0
    assert torch.equal(torch.load(run / "generated.pt")["tokens"], saved)


@pytest.mark.ray
def test_the_calibration_text_is_sampled_in_data_generate_dtype(ray_cluster, tiny_checkpoint, tmp_path, monkeypatch):
    from searchllm.cluster.pool import EvaluatorPool
    from searchllm.driver import main
    from tests.test_level_driver import level_args

    path, corpus = tiny_checkpoint
    sample, dtypes = EvaluatorPool.generate, []

    def recorded(self, *args, dtype="model", **kwargs):
        dtypes.append(dtype)
        return sample(self, *args, dtype=dtype, **kwargs)

    monkeypatch.setattr(EvaluatorPool, "generate", recorded)
    mix = [f"data.calibration.{k}" for k in ("name=mix", f"mix=[text:{corpus}=1,generated=1]")]
    run = tmp_path / "run"
    assert main(level_args(path, corpus, run, "search.generations=1", "data.generate.dtype=bfloat16", *mix)) == 0
    assert dtypes == ["bfloat16"] and json.loads((run / "generated.json").read_text())["dtype"] == "bfloat16"


def sampled(calls: list[tuple[int, int]]) -> tuple[int, int]:
    """The first and one past the last heal sequence index the calls sampled, checking they follow each other."""
    from searchllm.stages.generate import HEAL_FIRST

    heal = [c for c in calls if c[1] >= HEAL_FIRST]
    for (count, first), (_, following) in zip(heal, heal[1:]):
        assert following == first + count
    return heal[0][1], heal[-1][1] + heal[-1][0]


@pytest.mark.ray
def test_a_heals_own_text_is_kept_batch_by_batch_and_only_what_no_earlier_heal_sampled_is_sampled(
    ray_cluster, tiny_checkpoint, tmp_path, monkeypatch
):
    from searchllm.cluster.pool import EvaluatorPool
    from searchllm.driver import main
    from searchllm.stages.generate import HEAL_FIRST
    from tests.test_level_driver import level_args

    path, corpus = tiny_checkpoint
    run = tmp_path / "run"
    mix = [f"data.calibration.{k}" for k in ("name=mix", f"mix=[text:{corpus}=1,generated=1]")]
    heal = ["heal.enabled=true", "heal.seqlen=16", "heal.batch=2", "heal.eval_windows=2"]
    calls, sample, stop, dtypes = [], EvaluatorPool.generate, [True], set()

    def counted(self, prompt, count, *args, first=0, dtype="model"):
        if stop[0] and first >= HEAL_FIRST and any(f >= HEAL_FIRST for _, f in calls):
            raise KeyboardInterrupt  # a stop after the first round of batches
        calls.append((count, first))
        if first >= HEAL_FIRST:
            dtypes.add(dtype)
        return sample(self, prompt, count, *args, first=first, dtype=dtype)

    monkeypatch.setattr(EvaluatorPool, "generate", counted)
    monkeypatch.setattr("searchllm.stages.heal.run", lambda ctx: None)  # the text is sampled before; no training
    args = level_args(path, corpus, run, "search.generations=1", *mix, *heal, "data.generate.batch=4")
    assert main([*args, "heal.tokens=256"]) != 0
    kept = torch.load(run / "heal-generated.pt")["tokens"]
    assert 0 < kept.shape[0] < 12 and kept.shape[0] % 4 == 0  # whole batches
    calls.clear()
    stop[0] = False
    assert main([f"resume={run}", *heal, "heal.tokens=256"]) == 0
    first = torch.load(run / "heal-generated.pt")["tokens"]
    # 16 training windows and 2 held out, half of each generated, one spare: 10, in whole batches of 4
    assert first.shape == (12, 16) and sampled(calls) == (HEAL_FIRST + kept.shape[0], HEAL_FIRST + 12)
    assert torch.equal(first[: kept.shape[0]], kept)
    calls.clear()
    assert main([f"resume={run}", *heal, "heal.tokens=512"]) == 0
    more = torch.load(run / "heal-generated.pt")["tokens"]
    assert sampled(calls) == (HEAL_FIRST + 12, HEAL_FIRST + 20) and more.shape == (20, 16)
    assert torch.equal(more[:12], first)
    calls.clear()
    assert main([f"resume={run}", *heal, "heal.tokens=256"]) == 0  # fewer: the first ones again, nothing sampled
    assert calls == [] and dtypes == {"auto"}  # sampled as the heal computes (heal.dtype)
    assert main([f"resume={run}", *heal, "heal.tokens=256", "heal.dtype=float32"]) == 0
    assert sampled(calls) == (HEAL_FIRST, HEAL_FIRST + 12) and dtypes == {"auto", "float32"}  # another dtype, again


def test_a_mixture_draws_its_windows_in_the_stated_proportions(tmp_path):
    from tests.conftest import word_tokenizer

    tok = word_tokenizer(tmp_path / "tok")
    (tmp_path / "a.txt").write_text(" ".join(["the"] * 4000))
    (tmp_path / "b.txt").write_text(" ".join(["of"] * 4000))
    cfg = load_config(
        [
            "data.calibration.name=mix",
            f"data.calibration.mix=[text:{tmp_path / 'a.txt'}=3,text:{tmp_path / 'b.txt'}=1,generated=0.5]",
            "data.calibration.samples=18",
            "data.calibration.seqlen=16",
            "data.fitness.name=text",
            f"data.fitness.path={tmp_path / 'a.txt'}",
        ]
    )
    windows = token_sets(cfg, tok)[0]["calibration"]
    the, of = tok.convert_tokens_to_ids("the"), tok.convert_tokens_to_ids("of")
    kinds = [int(w[0]) for w in windows]
    assert (kinds.count(the), kinds.count(of), kinds.count(0)) == (12, 4, 2) == tuple(apportion(18, [3, 1, 0.5]))


@pytest.mark.parametrize(
    "entry, says",
    [
        ("wikitext3:validation=1", "unknown corpus 'wikitext3'"),
        ("ptb:train=0", "must sum to a positive number"),
        ("ptb:train=-1", "weight >= 0"),
        ("ptb:train", "SOURCE=WEIGHT"),
        ("text:/nonexistent/file.txt=1", "needs an existing file"),
        ("code:test=1", "held-out evaluation domain"),
        ("hf:allenai/c4=1", "hf:<dataset>[#<config>]:<split>"),
    ],
)
def test_a_bad_mixture_stops_with_one_line_naming_the_key(entry, says):
    with pytest.raises(ConfigError) as e:
        load_config(["data.calibration.name=mix", f"data.calibration.mix=[{entry}]"])
    assert "data.calibration.mix" in str(e.value) and says in str(e.value) and "\n" not in str(e.value)


def ngrams(windows: torch.Tensor, n: int) -> set[tuple[int, ...]]:
    rows = windows.reshape(-1, windows.shape[-1]).tolist()
    return {tuple(r[i : i + n]) for r in rows for i in range(len(r) - n + 1)}


def test_no_evaluation_text_reaches_a_calibration_or_selection_window(smollm2):
    """Every window the run calibrates, scores or selects on (here with the WikiText-2 + PTB mixture) shares
    no 12 tokens in a row with a held-out domain, and no 32 with the WikiText-2 and PTB test splits (shorter
    runs recur in both halves of those corpora: stock phrases of news text)."""
    from searchllm.config import parse_corpus
    from searchllm.data import load_text, tokenize
    from searchllm.stages.plan import selection_sets

    mix = [
        f"data.{r}.{k}"
        for r in ("calibration", "fitness")
        for k in ("name=mix", "mix=[wikitext2:validation=1,ptb:train=1]")
    ]
    cfg = load_config(mix)
    tokens = token_sets(cfg, smollm2.tokenizer, selection_sets(cfg))[0]
    for spec, n in (("wikitext2-raw:test", 32), ("ptb:test", 32), ("code", 12), ("docs", 12), ("chat", 12)):
        held = ngrams(tokenize(load_text(parse_corpus(spec), "auto", smollm2.tokenizer)[0], smollm2.tokenizer), n)
        for role, windows in tokens.items():
            if role != "report":
                assert not ngrams(windows, n) & held, f"{spec} text in the {role} windows"
