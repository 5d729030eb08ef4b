"""The cache's read API: ``stats()`` totals agree with its sequences, and with what generate reports."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompt, tiny_model

import lavakv
from lavakv.decoding import TokenFeed


@pytest.mark.parametrize("method", ["snapkv", "ada-snapkv", "lava", "full"])
def test_totals_are_the_sums_of_the_sequences(method):
    model = tiny_model("llama")
    budget = None if method == "full" else 40
    cache = lavakv.CompressedCache(model, method=method, budget=budget)
    feed = TokenFeed(model, cache)
    logits = feed.prefill([random_prompt(150, seed=1), random_prompt(110, seed=2)], pad_id=0)
    feed.greedy(logits, 5, stop_ids=set())
    stats = cache.stats()
    assert stats.method == method
    assert stats.appended_tokens == 4
    assert stats.kv_bytes == sum(s.kv_bytes for s in stats.sequences) == cache.kv_bytes()
    assert stats.kept_entries == sum(s.kept_entries for s in stats.sequences)
    assert stats.full_entries == sum(s.full_entries for s in stats.sequences) == (150 + 110) * 2 * 4
    per_entry = 2 * 16 * 4
    for sequence in stats.sequences:
        kept = min(budget or sequence.prompt_length, sequence.prompt_length) * 2 * 4
        assert sequence.kept_entries == kept == sum(map(sum, sequence.head_budgets))
        assert sequence.kv_bytes == (kept + 4 * 2 * 4) * per_entry
        assert sequence.full_kv_bytes == (sequence.prompt_length + 4) * 2 * 4 * per_entry
        assert sequence.appended_tokens == 4
        assert [len(p) for layer in sequence.kept_positions for p in layer] == sum(sequence.head_budgets, [])
    assert stats.kept_entry_bytes == stats.kept_entries * per_entry
    assert stats.compression_seconds["total"] >= stats.compression_seconds["score"]


def test_kept_kv_returns_copies_of_each_heads_entries():
    model = tiny_model("llama")
    cache = lavakv.CompressedCache(model, method="ada-snapkv", budget=40)
    with torch.no_grad():
        model(torch.tensor([random_prompt(120)]), **lavakv.cache_argument(model, cache))
    rows = cache.kept_kv(2)
    positions = cache.stats().sequences[0].kept_positions[2]
    assert [p.tolist() for p, _, _ in rows] == positions
    rows[0][1].zero_()
    assert cache.kept_kv(2)[0][1].abs().sum() > 0
    assert cache.stats(positions=False).sequences[0].kept_positions == []


def test_reading_an_empty_cache_is_a_clear_error():
    cache = lavakv.CompressedCache(tiny_model("llama"), method="snapkv", budget=40)
    with pytest.raises(RuntimeError, match="nothing has been prefilled"):
        cache.stats()
