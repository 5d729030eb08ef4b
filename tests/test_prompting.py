"""One prompt builder and one decoding loop for generate and eval."""

from __future__ import annotations

import sqlite3

import pytest
import torch
from conftest import TinyTokenizer, random_prompt, tiny_model

import lavakv
from lavakv.cli import main
from lavakv.decoding import TokenFeed
from lavakv.eval.runner import evaluate_sample, make_pairs, prepare
from lavakv.eval.samples import Sample
from lavakv.eval.store import SCHEMA_VERSION, ResultStore
from lavakv.generate import QUESTION_SEPARATOR
from lavakv.prompting import encode_prompt, split_prompt


def test_the_two_parts_are_the_whole_prompt_without_a_template():
    tokenizer = TinyTokenizer()
    context, question = split_prompt(tokenizer, "1 2 3 4 ", "5 6", chat_template=True)
    assert (context, question) == ([1, 2, 3, 4], [5, 6])
    assert context + question == encode_prompt(tokenizer, "1 2 3 4 5 6", chat_template=True)


@pytest.mark.smollm2
def test_generate_and_eval_split_a_templated_prompt_the_same_way(smollm2):
    model, tokenizer = smollm2
    context = "The lighthouse keeper's cat is called Marmalade. " * 12
    question = "What is the cat called?"
    ids = split_prompt(tokenizer, context + QUESTION_SEPARATOR, question, chat_template=True)
    whole = tokenizer.decode(encode_prompt(tokenizer, context + QUESTION_SEPARATOR + question, chat_template=True))
    assert tokenizer.decode(ids[0]) + tokenizer.decode(ids[1]) == whole
    assert "assistant" in tokenizer.decode(ids[1]) and "Marmalade" not in tokenizer.decode(ids[1])
    sample = Sample("t", "d", "1", context + QUESTION_SEPARATOR, question, ["Marmalade"], 8, "qa_f1", True)
    prepared = prepare(tokenizer, sample, "auto", 8192)
    assert (prepared.context, prepared.question) == ids
    row = next(evaluate_sample(model, tokenizer, prepared, make_pairs(["snapkv"], [64]), "query-agnostic"))
    out = lavakv.generate(model, tokenizer, context, method="snapkv", budget=64, question=question, max_new_tokens=8)
    assert row.prediction == out.text


def test_batch_rows_stop_on_their_own(tokenizer):
    model = tiny_model("llama")
    prompts = [random_prompt(60, seed=1), random_prompt(45, seed=2)]
    alone = [lavakv.generate(model, tokenizer, p, method="full", max_new_tokens=6).token_ids for p in prompts]
    cache = lavakv.CompressedCache(model, method="full")
    feed = TokenFeed(model, cache)
    logits = feed.prefill(prompts, pad_id=0)
    stop = {alone[0][2]}
    got = feed.greedy(logits, 6, stop_ids=stop)
    first_stop = next(i for i, t in enumerate(alone[0]) if t in stop)
    assert got[0] == alone[0][: first_stop + 1]
    second = next((i for i, t in enumerate(alone[1]) if t in stop), 5)
    assert got[1] == alone[1][: second + 1]
    finished = feed.greedy(feed.extend([[1], [1]]), 4, set(), finished=lambda tokens: len(tokens) == 2)
    assert [len(tokens) for tokens in finished] == [2, 2]


def test_settings_the_greedy_loop_does_not_apply_are_named(tokenizer, caplog):
    model = tiny_model("llama")
    lavakv.generate(model, tokenizer, random_prompt(40), method="full", max_new_tokens=2)
    assert not caplog.records
    model.generation_config.repetition_penalty = 1.3
    with caplog.at_level("WARNING", logger="lavakv"):
        lavakv.generate(model, tokenizer, random_prompt(40), method="full", max_new_tokens=2)
    assert "ignores the model's generation config settings repetition_penalty=1.3" in caplog.text


@pytest.mark.parametrize("bad", [[5, 96], [5, -1]])
def test_token_ids_outside_the_vocabulary_are_named(bad, tokenizer):
    with pytest.raises(ValueError, match=rf"token id {bad[-1]} at position {len(bad) - 1} .*vocabulary of 96 ids"):
        lavakv.generate(tiny_model("llama"), tokenizer, bad, method="full", max_new_tokens=2)


def test_stores_of_other_programs_and_newer_schemas_are_refused_clearly(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    with sqlite3.connect(other / "results.sqlite") as connection:
        connection.execute("CREATE TABLE things (x)")
    with pytest.raises(ValueError, match="is not a lavakv results store .no identity, results table"):
        ResultStore(other, create=False)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "results.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match="is not a lavakv results store"):
        ResultStore(corrupt)
    newer = tmp_path / "newer"
    ResultStore(newer).close()
    with sqlite3.connect(newer / "results.sqlite") as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ValueError, match=f"schema {SCHEMA_VERSION + 1}; this lavakv reads schema {SCHEMA_VERSION}"):
        ResultStore(newer, create=False)
    assert main(["report", str(corrupt)]) == 2


def test_cli_method_options_are_routed_and_checked_before_loading(capsys):
    assert main(["generate", "--method", "snapkv", "--alpha", "0.5", "--prompt", "hi", "--model", "/no/model"]) == 2
    assert "unknown option 'alpha'" in capsys.readouterr().err
    assert main(["generate", "--method", "lava:heads=uniform", "--kernel", "x", "--prompt", "hi"]) == 2
    assert "kernel of lava score takes an integer, got 'x'" in capsys.readouterr().err
    assert main(["demo", "--budget", "32", "--model", "/no/model"]) == 2
    assert "greater than the window (32)" in capsys.readouterr().err
    assert main(["demo", "--budget", "32", "--window", "8", "--model", "/no/model"]) == 2
    assert "/no/model" in capsys.readouterr().err


def test_cli_eval_takes_method_specs(capsys, tmp_path):
    command = ["eval", "--benchmark", "niah", "--methods", "lava,lava:heads=grumpy", "--out", str(tmp_path / "x")]
    assert main(command) == 2
    assert "unknown heads 'grumpy'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_decoding_positions_follow_each_row(tokenizer):
    model = tiny_model("llama")
    short, long = random_prompt(30, seed=3), random_prompt(50, seed=4)
    cache = lavakv.CompressedCache(model, method="full")
    feed = TokenFeed(model, cache)
    feed.prefill([short, long], pad_id=0)
    assert feed.next_position.tolist() == [[30], [50]]
    feed.extend(torch.tensor([[1, 2], [3, 4]]))
    assert feed.next_position.tolist() == [[32], [52]]
