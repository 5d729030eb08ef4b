"""Integration tests on the embedded SmolLM2-135M-Instruct (converted once, then cached)."""

from __future__ import annotations

import json

import pytest
import torch

import lavakv
from lavakv.cli import main
from lavakv.passkey import passkey_prompt

pytestmark = pytest.mark.smollm2


def test_full_cache_matches_plain_generate_on_smollm2(smollm2):
    model, tokenizer = smollm2
    prompt = passkey_prompt(tokenizer, 400, depth=0.5, seed=3)
    ids = tokenizer(prompt.text)["input_ids"]
    out = lavakv.generate(model, tokenizer, ids, method="full", max_new_tokens=10)
    model.set_attn_implementation("sdpa")
    try:
        plain = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=2)
    finally:
        model.set_attn_implementation("lavakv")
    assert out.token_ids == plain[0, len(ids) :].tolist()[: len(out.token_ids)]
    budget_covers = lavakv.generate(model, tokenizer, ids, method="lava", budget=len(ids), max_new_tokens=10)
    assert budget_covers.token_ids == out.token_ids


def test_compressed_cache_really_shrinks_on_smollm2(smollm2):
    model, tokenizer = smollm2
    prompt = passkey_prompt(tokenizer, 2000, depth=0.3, seed=1)
    out = lavakv.generate(
        model, tokenizer, prompt.text, method="lava", budget=128, max_new_tokens=8, chat_template=False
    )
    stats = out.stats
    assert stats.kept_entries == 128 * 3 * 30
    appended = (stats.generated_tokens - 1) * 3 * 30
    expected = (stats.kept_entries + appended) * 2 * 64 * 4
    assert abs(stats.kv_bytes - expected) <= 0.05 * expected
    assert stats.full_kv_bytes / stats.kv_bytes > 10


def test_lava_peak_prefill_memory_is_bounded_on_a_4k_prompt(smollm2):
    model, tokenizer = smollm2
    prompt = passkey_prompt(tokenizer, 4000, depth=0.5, seed=2)
    ids = torch.tensor([tokenizer(prompt.text)["input_ids"]])
    cache = lavakv.CompressedCache(model, method="lava", budget=64)
    with torch.inference_mode():
        model(ids, **lavakv.cache_argument(model, cache), use_cache=True)
    length = ids.shape[1]
    final = cache.kv_bytes()
    one_full_layer = length * 3 * 2 * 64 * 4
    assert final == 64 * 3 * 30 * 2 * 64 * 4
    assert cache.peak_prefill_bytes < final + 2 * one_full_layer
    assert cache.peak_prefill_bytes >= final


def test_cli_generate_json_on_smollm2(capsys):
    code = main(
        [
            "generate",
            "--method",
            "streamingllm",
            "--budget",
            "64",
            "--prompt",
            "Name a colour.",
            "--max-new-tokens",
            "4",
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["stats"]["method"] == "streamingllm"
    assert 1 <= len(result["token_ids"]) <= 4


def test_eval_and_report_commands_on_smollm2(smollm2, tmp_path, capsys):
    out = tmp_path / "niah"
    command = [
        "eval",
        "--benchmark",
        "niah",
        "--lengths",
        "400",
        "--depths",
        "0.5",
        "--methods",
        "full,snapkv,lava,lava:heads=uniform",
        "--budgets",
        "64",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(command) == 0
    assert "4 results" in capsys.readouterr().out
    assert main(command) == 0
    assert "4 results" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| full cache | 100.0 [100.0, 100.0] |" in text and "| lava with uniform heads |" in text
    assert (out / "report.md").is_file() and (out / "niah_heatmap_b64.png").stat().st_size > 1000
    assert (
        main(
            [
                "eval",
                "--benchmark",
                "niah",
                "--lengths",
                "400",
                "--methods",
                "full",
                "--protocol",
                "query-agnostic",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 2
    )
    assert "protocol='query-aware'" in capsys.readouterr().err


def test_context_and_question_parts_alone_equal_the_split_prompt(smollm2):
    from lavakv.prompting import QUESTION_SEPARATOR, context_ids, question_ids, split_prompt

    _, tokenizer = smollm2
    context = "The lighthouse keeper's cat is called Marmalade. " * 8
    for question in ["What is the cat called?", "  Who keeps the lighthouse?  ", "Name it."]:
        expected = split_prompt(tokenizer, context + QUESTION_SEPARATOR, question, chat_template=True)
        assert (context_ids(tokenizer, context, True), question_ids(tokenizer, question, True)) == expected
        plain = split_prompt(tokenizer, context + QUESTION_SEPARATOR, question, chat_template=False)
        assert (context_ids(tokenizer, context, False), question_ids(tokenizer, question, False)) == plain


def test_compress_to_a_file_and_ask_it_from_the_command_line(smollm2, tmp_path, capsys):
    model, tokenizer = smollm2
    document = tmp_path / "doc.txt"
    document.write_text("The lighthouse keeper's cat is called Marmalade. She sleeps on the lamp. " * 20)
    path = tmp_path / "doc.lkv"
    assert (
        main(["compress", "--prompt-file", str(document), "--method", "lava", "--budget", "64", "--out", str(path)])
        == 0
    )
    assert "the full cache would hold" in capsys.readouterr().out
    questions = ["What is the cat called?", "Where does she sleep?"]
    command = ["generate", "--cache", str(path), "--json", "--max-new-tokens", "12"]
    assert main(command + [arg for q in questions for arg in ("--question", q)]) == 0
    answers = json.loads(capsys.readouterr().out)
    expected = lavakv.generate(
        model, tokenizer, document.read_text(), method="lava", budget=64, question=questions[1], max_new_tokens=12
    )
    assert answers[1]["token_ids"] == expected.token_ids
    assert main(["generate", "--cache", str(path), "--question", "Who?", "--method", "snapkv"]) == 2
    assert "--cache brings its own method" in capsys.readouterr().err


def test_a_chat_continues_through_its_compressed_cache(smollm2):
    model, tokenizer = smollm2
    chat = [{"role": "user", "content": "Name three colours. " + "Think carefully. " * 40}]
    cache = lavakv.CompressedCache(model, method="snapkv", budget=64)
    first = lavakv.generate(model, tokenizer, chat, cache=cache, max_new_tokens=12)
    follow = chat + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And two animals?"}]
    history = lavakv.prompting.encode_prompt(tokenizer, follow, True)
    assert history[: len(cache.token_ids())] == cache.token_ids()
    second = lavakv.generate(model, tokenizer, follow, cache=cache, max_new_tokens=12)
    reference = lavakv.CompressedCache(model, method="snapkv", budget=64)
    lavakv.generate(model, tokenizer, chat, cache=reference, max_new_tokens=12)
    again = lavakv.generate(model, tokenizer, history, cache=reference, max_new_tokens=12)
    assert second.token_ids == again.token_ids
    with pytest.raises(lavakv.ContinuationError, match="holds another prompt"):
        lavakv.generate(model, tokenizer, [{"role": "user", "content": "Something else."}], cache=cache)
