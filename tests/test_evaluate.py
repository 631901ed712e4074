import json
import math
import subprocess
import sys

import pandas as pd
import pytest
import torch
from torch import nn

from searchllm.evaluate import EvalConfig, Evaluated, count_params, evaluate_model, perplexity, zero_shot

from conftest import tiny_model, word_tokenizer


class Bigram(nn.Module):
    """logits[t] = table[token t]: a model whose perplexity can be computed by hand."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, ids, use_cache=False):
        return type("Out", (), {"logits": self.table[ids]})()


def test_perplexity_of_a_fixed_text_matches_the_hand_computed_value():
    # Each token predicts its successor with probability 1/2, every other token with 1/(2 (V-1)).
    V = 5
    table = torch.full((V, V), math.log(0.5 / (V - 1)))
    table[torch.arange(V), (torch.arange(V) + 1) % V] = math.log(0.5)
    text = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 3]])  # 6 successor steps, one miss (1 -> 3)
    nll = perplexity(Bigram(table), text)
    hand = math.exp(-(6 * math.log(0.5) + math.log(0.5 / (V - 1))) / 7)
    assert nll.tokens == 7
    assert nll.ppl == pytest.approx(hand, rel=1e-6)


def test_perplexity_in_streams_adds_every_batch_in_order_without_autograd_and_restores_the_threads():
    model = tiny_model("llama", layers=2, vocab_size=64)
    grad = []
    model.register_forward_hook(lambda *_: grad.append(torch.is_grad_enabled()))
    windows = torch.randint(0, 64, (5, 16), generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    two = perplexity(model, windows, batch=2, streams=2)
    assert torch.get_num_threads() == threads and grad == [False] * 3
    one = perplexity(model, windows, batch=2)
    by_batch = [perplexity(model, windows[s : s + 2], batch=2) for s in (0, 2, 4)]
    assert two.tokens == one.tokens == sum(b.tokens for b in by_batch) == 5 * 15
    assert two.total == pytest.approx(sum(b.total for b in by_batch), rel=1e-6)
    assert two.ppl == pytest.approx(one.ppl, rel=1e-6)


def test_windows_are_non_overlapping_and_the_last_partial_window_is_dropped(tmp_path):
    tok = word_tokenizer(tmp_path / "tok")
    model = tiny_model("llama", layers=1, vocab_size=len(tok))
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(["the"] * 10))  # 10 tokens: two windows of 4, 2 tokens left over
    cfg = EvalConfig(corpora=[f"text:{corpus}"], lengths=["4", "11"], tasks=[])
    table = evaluate_model(model, tok, Evaluated("m", 1, 1), cfg)
    row = table[table.seqlen == 4].iloc[0]
    assert (row.windows, row.tokens, row.status) == (2, 6, "ok")
    ids = torch.tensor(tok(corpus.read_text()).input_ids)
    assert row.value == pytest.approx(perplexity(model, ids[:8].view(2, 4)).ppl, rel=1e-6)
    # A text shorter than one window is reported, not silently scored.
    short = table[table.seqlen == 11].iloc[0]
    assert short.status.startswith("skipped") and "shorter than one sequence of 11" in short.status


def test_params_counted_match_numel_with_tied_embeddings_once():
    model = tiny_model("llama", layers=2, tie_word_embeddings=True)
    model.tie_weights()
    total, decoder = count_params(model)
    assert total == sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    assert total == model.num_parameters()
    assert decoder == sum(p.numel() for p in model.model.layers.parameters())
    assert total - decoder == 128 * 64 + 64  # embeddings (= LM head) and the final norm


def test_evaluated_ratio_is_against_the_original_counts():
    e = Evaluated("x", 80, 60, 100, 80)
    assert e.ratio == pytest.approx(0.8) and e.decoder_ratio == pytest.approx(0.75)
    assert Evaluated("y", 1, 1).ratio is None


TASK_YAML = """
task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""
DOCS = [
    {"question": "the of and", "choices": ["to in", "a is", "was for"], "label": 0},
    {"question": "he at from", "choices": ["his it", "an that"], "label": 1},
    {"question": "were are which", "choices": ["this be", "the of", "and to"], "label": 2},
    {"question": "in a is", "choices": ["was", "for on"], "label": 0},
    {"question": "by he", "choices": ["at", "from his", "it an"], "label": 1},
]


def local_task(tmp_path):
    data = tmp_path / "tiny.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_choice.yaml").write_text(TASK_YAML.format(data=data))
    return tasks


def test_lm_eval_zero_shot_runs_offline_on_a_local_task_and_agrees_with_a_direct_loglikelihood(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tok = word_tokenizer(tmp_path / "tok")
    model = tiny_model("llama", layers=2, vocab_size=len(tok))
    got = zero_shot(model, tok, ["tiny_choice"], include_path=str(local_task(tmp_path)))
    # The harness's answer: argmax over choices of log p(choice tokens | question tokens).
    correct = 0
    with torch.no_grad():
        for d in DOCS:
            ctx = tok(d["question"]).input_ids
            scores = []
            for c in d["choices"]:
                cont = tok(c).input_ids
                ids = torch.tensor([ctx + cont])
                logp = model(ids).logits.log_softmax(-1)[0, len(ctx) - 1 : -1]
                scores.append(float(logp.gather(1, torch.tensor(cont)[:, None]).sum()))
            correct += int(max(range(len(scores)), key=scores.__getitem__) == d["label"])
    assert got["tiny_choice"]["metric"] == "acc"
    assert got["tiny_choice"]["value"] == pytest.approx(correct / len(DOCS))


def test_evaluate_cli_appends_a_results_table_to_the_checkpoint_dir(tiny_checkpoint):
    path, corpus = tiny_checkpoint
    args = [
        sys.executable,
        "-m",
        "searchllm.evaluate",
        str(path),
        f"eval.corpora=[text:{corpus}]",
        "eval.lengths=[16,full]",
        "eval.tasks=[]",
        "eval.max_windows=3",
    ]
    for _ in range(2):
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert "ppl" in proc.stdout and "text" in proc.stdout
    table = pd.read_parquet(path / "eval.parquet")
    assert len(table) == 4 and set(table.seqlen) == {16, 256}  # two runs appended; full = max_position_embeddings
    assert (table.windows == 3).all() and (table.status == "ok").all()
    assert pd.read_csv(path / "eval.csv").shape[0] == 4


def test_evaluate_cli_rejects_a_path_that_is_not_a_checkpoint(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "searchllm.evaluate", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "neither a checkpoint dir" in proc.stderr and "Traceback" not in proc.stderr


def test_a_run_dir_is_evaluated_at_the_export_dir_its_config_names(tmp_path):
    from searchllm.config import EvalError
    from searchllm.evaluate import locate

    export = tmp_path / "elsewhere"
    export.mkdir()
    (export / "config.json").write_text("{}")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"export:\n  dir: {export}\n")
    assert (locate(str(run)).checkpoint, locate(str(run)).run_dir) == (export, run)
    (run / "config.yaml").write_text("export:\n  dir: null\n")
    with pytest.raises(EvalError, match="no export in .*run/export"):
        locate(str(run))


def test_the_worst_held_out_domain_is_the_largest_ratio_to_the_original():
    import pandas as pd

    from searchllm.evaluate import against_original, worst_domain

    rows = [
        (model, task, n, value)
        for model, scale in (("original", 1.0), ("exported", 2.0))
        for task, n, value in (
            ("wikitext2-raw", 2048, 10.0),
            ("code", 2048, 4.0),
            ("chat", 2048, 8.0),
            ("chat", 512, 9.0),
        )
    ]
    table = pd.DataFrame(
        [
            {"model": m, "metric": "ppl", "task": t, "split": "test", "seqlen": n, "value": v, "status": "ok"}
            for m, t, n, v in rows
        ]
    )
    table.loc[(table.model == "exported") & (table.task == "code"), "value"] = 4.0 * 3.5
    table.loc[(table.model == "exported") & (table.task == "chat"), "value"] *= 2.0
    table.loc[(table.model == "exported") & (table.task == "wikitext2-raw"), "value"] = 50.0  # not a held-out domain
    out = against_original(table)
    assert out[out.model == "original"].x_original.tolist() == [1.0] * 4
    assert worst_domain(out) == {
        2048: {"domain": "code", "x_original": 3.5},
        512: {"domain": "chat", "x_original": 2.0},
    }
