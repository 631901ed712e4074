"""Healing: distillation of the pruned subnet from the original (healing.distill, stages.heal, searchllm.heal)."""

import json
import math
from dataclasses import asdict, replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from searchllm.config import ConfigError, HealConfig, load_config
from searchllm.data import DataError, heal_generated_need, heal_sources, heal_windows
from searchllm.healing.distill import (
    CHECKPOINT,
    CURVE,
    HEALED,
    ChunkedKL,
    Comm,
    HealJob,
    Live,
    TopK,
    lr_factor,
    train,
)

from conftest import WORDS, make_tiny_checkpoint, tiny_model, tiny_run_args


def test_chunked_kl_equals_the_full_logits_loss_and_its_gradients():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(10, 8, generator=g, dtype=torch.float64), torch.randn(30, 8, generator=g, dtype=torch.float64)
    h_t, w_t = (
        torch.randn(10, 8, generator=g, dtype=torch.float64),
        torch.randn(30, 8, generator=g, dtype=torch.float64),
    )
    labels = torch.randint(0, 30, (10,), generator=g)
    labels[-1] = -100
    for temperature, ce in ((1.0, 0.0), (2.0, 0.5)):
        h.requires_grad_(True), w.requires_grad_(True)
        loss = ChunkedKL.apply(h, w, Live(h_t, w_t), labels, temperature, ce, 3, torch.float64)
        got = torch.autograd.grad(loss, (h, w))
        t = temperature
        ref = (
            t
            * t
            * torch.nn.functional.kl_div(
                torch.log_softmax(h @ w.T / t, -1),
                torch.log_softmax(h_t @ w_t.T / t, -1),
                log_target=True,
                reduction="sum",
            )
        )
        ref = (ref + ce * torch.nn.functional.cross_entropy(h @ w.T, labels, reduction="sum")) / 10
        want = torch.autograd.grad(ref, (h, w))
        assert float(loss.detach()) == pytest.approx(
            float(ref.detach()), rel=1e-5
        )  # the softmax arithmetic runs in float32
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _top_k(h_t, w_t, k, t):
    log_pt = torch.log_softmax(h_t @ w_t.T / t, -1)
    top = log_pt.topk(k, -1)
    return TopK(top.indices, top.values, torch.logsumexp(log_pt.scatter(-1, top.indices, -math.inf), -1))


@pytest.mark.parametrize("k", [5, 30])
def test_a_cached_teacher_gives_the_exact_kl_on_its_top_k_and_the_rest_of_the_mass_as_one_bucket(k):
    """K = the vocabulary (30): the live teacher's loss and gradients; K < V: exact KL on the K tokens plus
    rest_t log(rest_t / rest_s), and its gradients."""
    g = torch.Generator().manual_seed(0)
    h, w, h_t, w_t = (torch.randn(n, 8, generator=g, dtype=torch.float64) for n in (10, 30, 10, 30))
    labels = torch.randint(0, 30, (10,), generator=g)
    for t in (1.0, 2.0):
        h.requires_grad_(True), w.requires_grad_(True)
        cached = _top_k(h_t, w_t, k, t)
        loss = ChunkedKL.apply(h, w, cached, labels, t, 0.0, 3, torch.float64)
        got = torch.autograd.grad(loss, (h, w))
        log_pt, log_ps = torch.log_softmax(h_t @ w_t.T / t, -1), torch.log_softmax(h @ w.T / t, -1)
        on = torch.zeros_like(log_pt, dtype=torch.bool).scatter(-1, cached.idx, True)
        pt = log_pt.exp()
        ref = (torch.where(on, pt * (log_pt - log_ps), 0.0)).sum()
        if k < 30:
            rest_t, rest_s = (torch.where(on, 0.0, x.exp()).sum(-1) for x in (log_pt, log_ps))
            ref = ref + (rest_t * (rest_t.log() - rest_s.log())).sum()
        ref = t * t * ref / 10
        want = torch.autograd.grad(ref, (h, w))
        assert float(loss) == pytest.approx(float(ref), rel=1e-5)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        if k == 30:
            live = ChunkedKL.apply(h, w, Live(h_t, w_t), labels, t, 0.0, 3, torch.float64)
            assert float(loss) == pytest.approx(float(live), rel=1e-5)


def test_the_learning_rate_warms_up_then_decays_to_min_lr():
    p = HealConfig(lr=1e-3, min_lr=1e-4, warmup=4)
    factors = [lr_factor(s, 20, p) for s in range(20)]
    assert factors[:4] == sorted(factors[:4]) and factors[3] < 1
    assert factors[4] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)
    assert factors[4:] == sorted(factors[4:], reverse=True)


@pytest.fixture
def heal_job(tmp_path):
    """A teacher, a student that is the teacher with noise on every decoder-layer weight (as a search leaves
    the embeddings and head the original's), and random windows."""
    teacher = tiny_model(layers=2, seed=0)
    teacher.save_pretrained(tmp_path / "teacher")
    student = tiny_model(layers=2, seed=0)
    with torch.no_grad():
        for name, q in student.named_parameters():
            if ".layers." in name:
                q.add_(0.05 * torch.randn(q.shape, generator=torch.Generator().manual_seed(q.numel())))
    student.save_pretrained(tmp_path / "student")
    g, vocab = torch.Generator().manual_seed(0), teacher.config.vocab_size
    torch.save(
        {
            "train": torch.randint(0, vocab, (48, 16), generator=g),
            "eval": torch.randint(0, vocab, (4, 16), generator=g),
        },
        tmp_path / "windows.pt",
    )
    params = asdict(
        HealConfig(
            tokens=768, seqlen=16, batch=4, lr=2e-3, warmup=2, checkpoint_every=4, eval_every=4, dtype="float32", ce=0.0
        )
    )

    def make(name: str) -> HealJob:
        (tmp_path / name).mkdir(exist_ok=True)
        return HealJob(
            str(tmp_path / "student"),
            str(tmp_path / "teacher"),
            str(tmp_path / "windows.pt"),
            str(tmp_path / name),
            params,
        )

    return make


def test_healing_lowers_the_kl_on_held_out_windows(heal_job):
    record = train(heal_job("a"))
    kl = [r["held_out_kl"] for r in record["curve"] if "held_out_kl" in r]
    assert record["steps"] == 12 and record["tokens"] == 12 * 4 * 16
    assert kl[-1] < 0.9 * kl[0]


def test_a_heal_of_the_blocks_alone_keeps_every_other_weight_and_still_lowers_the_kl(heal_job, tmp_path):
    job = heal_job("blocks")
    record = train(replace(job, params={**job.params, "train": "blocks"}))
    kl = [r["held_out_kl"] for r in record["curve"] if "held_out_kl" in r]
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "student").state_dict()
    after = torch.load(tmp_path / "blocks" / HEALED, weights_only=True)
    frozen = [k for k in after if ".layers." not in k]
    assert "model.embed_tokens.weight" in frozen and "model.norm.weight" in frozen
    assert all(torch.equal(after[k], before[k]) for k in frozen)
    assert all(not torch.equal(after[k], before[k]) for k in after if k.endswith("proj.weight"))
    assert kl[-1] < 0.9 * kl[0]


def test_a_heal_killed_between_checkpoints_resumes_to_the_same_weights(heal_job, tmp_path):
    train(heal_job("whole"))
    assert train(heal_job("killed"), stop_after=6) is None  # killed after step 6; the checkpoint holds step 4
    assert torch.load(tmp_path / "killed" / CHECKPOINT, weights_only=True)["step"] == 4
    resumed = train(heal_job("killed"))
    a, b = (torch.load(tmp_path / d / HEALED, weights_only=True) for d in ("whole", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "progress.jsonl").read_text().splitlines()]
    assert steps == list(range(13)) and len(resumed["curve"]) == 13


def test_a_cached_teacher_of_the_whole_vocabulary_heals_as_the_live_one_and_is_computed_once(
    heal_job, tmp_path, monkeypatch
):
    from searchllm.healing.distill import Teacher

    live = train(heal_job("live"))
    job = heal_job("cached")
    job.params = job.params | {"teacher": "cached:1000"}  # more than the vocabulary: every token
    cached = train(job)
    a, b = ([r.get("loss", r.get("held_out_kl")) for r in c["curve"]] for c in (live, cached))
    assert a == pytest.approx(b, rel=1e-4)
    [made] = list(tmp_path.glob("teacher-top1000-*.pt"))
    monkeypatch.setattr(Teacher, "top_k", lambda *a: pytest.fail("the cached teacher was computed again"))
    again = heal_job("again")
    again.params = job.params
    assert [r.get("loss") for r in train(again)["curve"]] == [r.get("loss") for r in cached["curve"]]
    assert list(tmp_path.glob("teacher-top1000-*.pt")) == [made]


def test_two_ray_train_workers_give_the_one_worker_loss_curve(ray_cluster, heal_job, tmp_path):
    """The same global batch split over 2 gloo workers (DDP) follows the in-process curve to float32 rounding."""
    from searchllm.cluster.train import RayHealer
    from searchllm.config import RayConfig

    one = train(heal_job("one"), Comm())
    two = RayHealer(HealConfig(workers=2, cpus_per_worker=1), RayConfig(), "test")(heal_job("two"))
    assert two["workers"] == 2
    a, b = ([r.get("loss", r.get("held_out_kl")) for r in c["curve"]] for c in (one, two))
    assert a == pytest.approx(b, rel=1e-4)


def test_fsdp_over_two_workers_follows_the_one_worker_curve_and_saves_the_whole_model(ray_cluster, heal_job, tmp_path):
    """heal.fsdp=on shards both models over the workers (FSDP2; gloo here, NCCL on GPUs): same curve, and the
    checkpoint and healed weights are whole tensors under the model's own names."""
    from searchllm.cluster.train import RayHealer
    from searchllm.config import RayConfig

    one = train(heal_job("one"), Comm())
    two = RayHealer(HealConfig(workers=2, cpus_per_worker=1, fsdp="on"), RayConfig(), "test")(heal_job("fsdp"))
    assert two["fsdp"] is True
    a, b = ([r.get("loss", r.get("held_out_kl")) for r in c["curve"]] for c in (one, two))
    assert a == pytest.approx(b, rel=1e-4)
    x, y = (torch.load(tmp_path / d / HEALED, weights_only=True) for d in ("one", "fsdp"))
    assert x.keys() == y.keys() and all(x[k].shape == y[k].shape for k in x)
    torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def _cfg(tmp_path, *overrides):
    corpus = tmp_path / "corpus.txt"
    g = torch.Generator().manual_seed(0)
    corpus.write_text(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (3000,), generator=g).tolist()))
    return load_config(
        [
            "data.calibration.name=text",
            f"data.calibration.path={corpus}",
            "heal.seqlen=16",
            "heal.batch=2",
            "heal.tokens=320",
            "heal.eval_windows=3",
            "heal.generated=null",  # the calibration text alone, no sampling
            *overrides,
        ]
    )


def test_heal_windows_set_eval_windows_apart_and_repeat_none_before_the_text_runs_out(tmp_path, checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint[0])
    w = heal_windows(_cfg(tmp_path), tok)
    assert w.train.shape == (20, 16) and w.eval.shape == (3, 16) and not w.repeats
    rows = {tuple(r) for r in w.train.tolist()}
    assert len(rows) == 20 and not rows & {tuple(r) for r in w.eval.tolist()}
    more = heal_windows(_cfg(tmp_path, "heal.tokens=60000"), tok)
    assert more.repeats and not {tuple(r) for r in more.train.tolist()} & {tuple(r) for r in more.eval.tolist()}


def test_a_source_short_of_its_share_gives_the_rest_to_the_others_before_any_repeats():
    from searchllm.data import fill

    assert fill(10, [1, 1], [2, 100]) == [2, 8]
    assert fill(12, [2, 1, 1], [100, 1, 100]) == [7, 1, 4]
    assert fill(10, [1, 1], [2, 3]) == [5, 5]  # both used up: the rest by weight, repeating


@pytest.mark.parametrize("mix", ["ptb:test=1", "code=1"])
def test_heal_never_trains_on_a_test_split_or_a_held_out_domain(tmp_path, mix):
    with pytest.raises(ConfigError, match="heal.mix"):
        _cfg(tmp_path, f"heal.mix=[{mix}]")


def test_heal_generated_sets_the_sampled_texts_share_and_keeps_the_other_sources_ratios(tmp_path):
    mix = ["data.calibration.name=mix", "data.calibration.mix=[wikitext2:validation=2,ptb:train=1,generated=1]"]
    parts, where = heal_sources(_cfg(tmp_path, *mix, "heal.generated=0.5"))
    assert [w for _, w in parts] == [2, 1, 3] and parts[-1][0] is None and where.endswith("generated=3")
    parts, _ = heal_sources(_cfg(tmp_path, "heal.generated=0.25"))  # a single calibration corpus
    assert [w for _, w in parts] == [1, pytest.approx(1 / 3)]
    dropped = _cfg(tmp_path, *mix, "heal.generated=0", "heal.enabled=true")
    assert all(s is not None for s, _ in heal_sources(dropped)[0]) and heal_generated_need(dropped) is None
    with pytest.raises(DataError, match="heal.generated=0.5"):
        heal_sources(_cfg(tmp_path, "heal.mix=[generated=1]", "heal.generated=0.5"))


def test_heal_refuses_calibration_text_that_is_a_test_split(tmp_path):
    cfg = _cfg(tmp_path, "data.calibration.name=ptb", "data.calibration.split=test")
    with pytest.raises(DataError, match="heal.mix"):
        heal_sources(cfg)


@pytest.mark.parametrize(
    "override, key",
    [
        ("heal.batch=3 heal.workers=2", "heal.batch=3"),
        ("heal.lr=0", "heal.lr=0"),
        ("heal.tokens=10", "heal.tokens=10"),
        ("heal.dtype=fp8", "heal.dtype"),
        ("heal.fsdp=maybe", "heal.fsdp"),
        ("heal.train=head", "heal.train"),
        ("heal.min_lr=1", "heal.min_lr=1"),
        ("heal.cpus_per_worker=0", "heal.cpus_per_worker=0"),
        ("heal.steps=3", "heal.steps"),
        ("heal.teacher=cached:0", "heal.teacher='cached:0'"),
        ("heal.teacher=top64", "heal.teacher='top64'"),
        ("heal.generated=1", "heal.generated=1"),
    ],
)
def test_bad_heal_values_stop_with_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(override.split())
    assert key in str(e.value) and "\n" not in str(e.value)


def test_the_healed_export_reloads_with_the_in_memory_logits_and_heal_reuses_a_finished_search(
    ray_cluster, tmp_path, monkeypatch
):
    """A run without healing, then `python -m searchllm.heal RUN` (RUN relative, as users type it: Ray Train's
    workers run elsewhere): no search again, the export is the healed model (its reloaded logits are the healed
    weights'), the manifest records the heal."""
    from searchllm.driver import main
    from searchllm.heal import main as heal_main
    from searchllm.models.loading import load_pretrained

    path, corpus = make_tiny_checkpoint(tmp_path)
    run = tmp_path / "run"
    assert main(tiny_run_args(path, corpus, run, "search.generations=1", "monitor.page=false")) == 0
    evals = (run / "evals.jsonl").read_text()
    before = json.loads((run / "manifest.json").read_text())["perplexity"]
    monkeypatch.chdir(tmp_path)
    assert heal_main(["run", "heal.tokens=1024", "heal.seqlen=32", "heal.batch=2", "heal.lr=1e-3"]) == 0
    assert (run / "evals.jsonl").read_text() == evals  # the search was not run again
    manifest = json.loads((run / "manifest.json").read_text())
    heal = manifest["heal"]
    assert heal["steps"] == 16 and heal["tokens"] == 1024 and len(heal["curve"]) == 17
    assert heal["report_ppl_before"] == pytest.approx(before["reformed"])
    assert manifest["perplexity"]["exported"] == pytest.approx(heal["report_ppl_after"], rel=1e-4)
    exported, _ = load_pretrained(str(run / "export"), "float32")
    student, _ = load_pretrained(str(tmp_path / heal["dir"] / "student"), "float32")
    student.load_state_dict(torch.load(tmp_path / heal["dir"] / HEALED, weights_only=True))
    ids = torch.randint(0, student.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, student(ids).logits)
        assert not torch.allclose(
            exported(ids).logits, load_pretrained(str(tmp_path / heal["dir"] / "student"), "float32")[0](ids).logits
        )
    assert json.loads((tmp_path / heal["dir"] / CURVE).read_text())["steps"] == 16


def test_heal_needs_a_finished_run(tmp_path, capsys):
    from searchllm.heal import main as heal_main

    assert heal_main([str(tmp_path)]) == 2
    assert "not a searchllm run dir" in capsys.readouterr().err


def test_a_heal_key_added_at_its_default_keeps_an_earlier_heals_folder(monkeypatch):
    from searchllm.stages import heal as stage

    model = tiny_model()
    settings = asdict(HealConfig())
    earlier = stage.tag_of({k: v for k, v in settings.items() if k != "clip"}, model)
    monkeypatch.setattr(stage, "TAGGED", stage.TAGGED - {"clip"})  # as if heal.clip were new in this version
    assert stage.tag_of(settings, model) == earlier
    assert stage.tag_of({**settings, "clip": settings["clip"] * 2}, model) != earlier
    assert stage.tag_of({**settings, "workers": 4}, model) == earlier  # how it runs is not in the tag
