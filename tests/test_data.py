"""Corpora and token windows."""

import pytest
import torch

from searchllm.config import CorpusConfig
from searchllm.data import DataError, first_windows, join_rows, load_text, random_windows, rows_of_file


def test_first_windows_are_non_overlapping_and_drop_the_partial_tail():
    w = first_windows(torch.arange(10), 0, 3, "x")
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert first_windows(torch.arange(10), 2, 3, "x").shape == (2, 3)


def test_random_windows_are_seeded():
    ids = torch.arange(1000)
    assert torch.equal(random_windows(ids, 4, 16, 0, "x"), random_windows(ids, 4, 16, 0, "x"))
    assert not torch.equal(random_windows(ids, 4, 16, 0, "x"), random_windows(ids, 4, 16, 1, "x"))


def test_corpus_shorter_than_one_sequence_names_the_fix():
    with pytest.raises(DataError, match="shorter than one sequence of 64; lower its seqlen"):
        first_windows(torch.arange(10), 1, 64, "data.fitness")


def test_wikitext_rows_are_joined_like_the_hf_recipe():
    raw = " = Title = \n \n text line \n"
    assert (
        join_rows("wikitext2", rows_of_file("wikitext2", raw))
        == " = Title = \n" + "\n\n" + "" + "\n\n" + " text line \n"
    )


def test_missing_local_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_text(CorpusConfig("text", path=str(tmp_path / "none.txt")), "auto")


@pytest.mark.parametrize("domain", ["code", "docs", "chat"])
def test_each_held_out_domain_is_read_from_text_every_machine_has(domain):
    from tests.conftest import CHATML

    class Template:  # the chat domain is rendered through the model's own chat template
        chat_template = CHATML

        def apply_chat_template(self, messages, tokenize=False):
            return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)

    text, source = load_text(CorpusConfig(name=domain, split="test"), "auto", Template())
    assert len(text) > 300_000 and source
    if domain == "chat":
        assert text.startswith("<|im_start|>user\n") and "<|im_start|>assistant\n" in text


def test_a_held_out_domain_has_only_a_test_split():
    with pytest.raises(DataError, match="only a test split"):
        load_text(CorpusConfig(name="docs", split="train"), "auto")


@pytest.mark.parametrize("role", ["calibration", "fitness"])
def test_a_held_out_domain_cannot_calibrate_or_select(role):
    from searchllm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"data.{role}.name=code is a held-out evaluation domain"):
        load_config([f"data.{role}.name=code", f"data.{role}.split=test"])


def test_a_corpus_tokenized_again_in_a_process_is_not_tokenized_again_and_its_ids_are_the_callers_own(
    tmp_path, monkeypatch
):
    from searchllm.data import tokenize

    from conftest import WORDS, bpe_tokenizer, word_tokenizer

    words, bpe = word_tokenizer(tmp_path / "words"), bpe_tokenizer(tmp_path / "bpe")
    text = " ".join(WORDS * 3)
    first = tokenize(text, words)
    first[:] = 0  # a caller's writes stay its own
    calls = []
    monkeypatch.setattr(type(words), "__call__", lambda *a, **k: calls.append(a) or pytest.fail("tokenized again"))
    again = tokenize(text, word_tokenizer(tmp_path / "words2"))  # the same tokenizer, loaded again
    assert again.tolist() == [WORDS.index(w) + 2 for w in WORDS * 3] and not calls
    monkeypatch.undo()
    assert tokenize(text, bpe).tolist() != again.tolist()  # another tokenizer: its own ids
