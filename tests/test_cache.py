"""The compressed cache: exact tokens without eviction, exact attention with it, real memory savings."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_MODELS, plain_generate, random_prompt, tiny_model
from transformers import DynamicCache

import lavakv

ALL_METHODS = list(lavakv.METHODS)


@pytest.mark.parametrize("kind", list(TINY_MODELS))
def test_full_cache_gives_the_tokens_of_plain_generate(kind, tokenizer):
    model = tiny_model(kind)
    ids = random_prompt(150)
    expected = plain_generate(model, ids, 12)
    out = lavakv.generate(model, tokenizer, ids, method="full", max_new_tokens=12)
    assert out.token_ids == expected
    windows = lavakv.CompressedCache(model.config, method="full").sliding_windows
    visible = sum(min(150, window or 150) for window in windows)
    assert out.stats.kept_entries == visible * model.config.num_key_value_heads


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_budget_at_least_prompt_length_changes_nothing(kind, method, tokenizer):
    model = tiny_model(kind)
    ids = random_prompt(90)
    expected = plain_generate(model, ids, 8)
    budget = None if method == "full" else 90
    out = lavakv.generate(model, tokenizer, ids, method=method, budget=budget, max_new_tokens=8)
    assert out.token_ids == expected


def test_plain_model_generate_with_the_cache_matches_lavakv_generate(tokenizer):
    model = tiny_model("llama")
    ids = random_prompt(200)
    out = lavakv.generate(model, tokenizer, ids, method="lava", budget=48, max_new_tokens=10)
    cache = lavakv.CompressedCache(model, method="lava", budget=48)
    generated = model.generate(
        torch.tensor([ids]), **lavakv.cache_argument(model, cache), max_new_tokens=10, do_sample=False
    )
    assert generated[0, len(ids) :].tolist() == out.token_ids
    assert cache.stats().kept_entries == out.stats.kept_entries
    sequence = cache.stats().sequences[0]
    assert (sequence.kv_bytes, sequence.kept_positions) == (out.stats.kv_bytes, out.stats.kept_positions)
    assert cache.get_seq_length() == len(ids) + 9


def _full_prefill(model, ids):
    """Keys (after RoPE) and values of every layer from an uncompressed prefill."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.tensor([ids]), **lavakv.cache_argument(model, cache), use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def _dense_reference(query, keys, values, kept, scaling, new_keys, new_values):
    """Attention of query[1, H, q, d] over each KV head's kept entries plus the new tokens (causal)."""
    _, heads, q_len, _ = query.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    outputs = []
    for head in range(heads):
        kv = head // group
        k = torch.cat([keys[0, kv, kept[kv]], new_keys[0, kv]])
        v = torch.cat([values[0, kv, kept[kv]], new_values[0, kv]])
        logits = query[0, head] @ k.T * scaling
        prefix = len(kept[kv])
        causal = torch.arange(q_len)[:, None] < torch.arange(q_len)[None, :]
        logits[:, prefix:] = logits[:, prefix:].masked_fill(causal, -math.inf)
        outputs.append(torch.softmax(logits, dim=-1) @ v)
    return torch.stack(outputs)[None]


@pytest.mark.parametrize("kind", ["llama", "llama-mha", "qwen3"])
@pytest.mark.parametrize("method", ["snapkv", "ada-snapkv", "lava", "streamingllm"])
@pytest.mark.parametrize("q_len", [1, 3])
def test_decode_attention_equals_dense_reference_with_evicted_entries_masked(kind, method, q_len, path):
    model = tiny_model(kind)
    ids = random_prompt(160)
    full = _full_prefill(model, ids)
    cache = lavakv.CompressedCache(model, method=method, budget=40, attention_path=path)
    with torch.no_grad():
        model(torch.tensor([ids]), **lavakv.cache_argument(model, cache), use_cache=True)
    stats = cache.stats().sequences[0]
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    generator = torch.Generator().manual_seed(3)
    for layer_idx, layer in enumerate(cache.layers):
        new_k = torch.randn(1, kv_heads, q_len, dim, generator=generator)
        new_v = torch.randn(1, kv_heads, q_len, dim, generator=generator)
        query = torch.randn(1, heads, q_len, dim, generator=generator)
        layer.update(new_k, new_v)
        got = layer.attend(query, dim**-0.5, None).transpose(1, 2)
        kept = [torch.tensor(p) for p in stats.kept_positions[layer_idx]]
        expected = _dense_reference(query, *full[layer_idx], kept, dim**-0.5, new_k, new_v)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert sum(len(p) for p in kept) < 160 * kv_heads


@pytest.mark.parametrize("method", [m for m in ALL_METHODS if m != "full"])
def test_cache_bytes_are_the_kept_entries_bytes(method, tokenizer):
    model = tiny_model("llama")
    ids = random_prompt(300)
    out = lavakv.generate(model, tokenizer, ids, method=method, budget=64, max_new_tokens=6)
    stats = out.stats
    dim = model.config.hidden_size // model.config.num_attention_heads
    appended = (stats.generated_tokens - 1) * model.config.num_key_value_heads * model.config.num_hidden_layers
    expected = (stats.kept_entries + appended) * 2 * dim * 4
    assert stats.kept_entries == 64 * 2 * 4
    assert abs(stats.kv_bytes - expected) <= 0.05 * expected
    assert stats.kv_bytes < 0.25 * stats.full_kv_bytes


@pytest.mark.parametrize("method", ["snapkv", "ada-snapkv", "lava", "cake", "full"])
def test_batch_of_different_lengths_gives_each_prompt_its_own_tokens(method, tokenizer):
    model = tiny_model("llama")
    prompts = [random_prompt(180, seed=1), random_prompt(120, seed=2), random_prompt(150, seed=3)]
    budget = None if method == "full" else 48
    alone = [lavakv.generate(model, tokenizer, p, method=method, budget=budget, max_new_tokens=8) for p in prompts]
    batch = lavakv.generate(model, tokenizer, prompts, method=method, budget=budget, max_new_tokens=8)
    assert [o.token_ids for o in batch] == [o.token_ids for o in alone]
    assert [o.stats.kept_positions for o in batch] == [o.stats.kept_positions for o in alone]


def test_kept_positions_are_sorted_and_include_the_window(tokenizer):
    model = tiny_model("llama")
    out = lavakv.generate(model, tokenizer, random_prompt(200), method="ada-snapkv", budget=50, max_new_tokens=2)
    for layer in out.stats.kept_positions:
        for positions in layer:
            assert positions == sorted(set(positions))
            assert positions[-32:] == list(range(168, 200))
    assert [sum(layer) for layer in out.stats.head_budgets] == [100] * 4


def test_sliding_window_layers_only_keep_what_the_window_can_still_see(tokenizer):
    model = tiny_model("gemma3")
    out = lavakv.generate(model, tokenizer, random_prompt(200), method="snapkv", budget=60, max_new_tokens=4)
    sliding = out.stats.kept_positions[0]
    assert all(min(p) >= 200 - 80 for p in sliding)
    assert out.stats.kept_entries == 60 * 2 * 4


def test_model_without_lavakv_attention_gets_a_clear_error():
    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    cache = lavakv.CompressedCache(model.config, method="snapkv", budget=40)
    with pytest.raises(RuntimeError, match="prepare_model"):
        model.generate(torch.tensor([random_prompt(100)]), **lavakv.cache_argument(model, cache), max_new_tokens=2)


def test_beam_search_is_refused_clearly():
    model = tiny_model("llama")
    cache = lavakv.CompressedCache(model, method="snapkv", budget=40)
    with pytest.raises(NotImplementedError, match="beam search|num_return_sequences"):
        model.generate(
            torch.tensor([random_prompt(100)]), **lavakv.cache_argument(model, cache), max_new_tokens=2, num_beams=2
        )


def test_lavakv_attention_without_a_lavakv_cache_is_plain_sdpa():
    model = tiny_model("llama")
    ids = torch.tensor([random_prompt(64)])
    with torch.no_grad():
        ours = model(ids).logits
        model.set_attn_implementation("sdpa")
        theirs = model(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
