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
        model(ids, cache=cache, use_cache=True)
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
    assert "| full cache | 100.0 |" in text and "| lava with uniform heads |" in text
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
