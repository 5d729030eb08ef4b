"""bfloat16 and float16 models: the whole path runs in the model's dtype, scores and softmax in float32."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import plain_generate, random_prompt, tiny_model

import lavakv
from lavakv.backends import create_backend
from lavakv.ragged import RaggedKV

HALF = [torch.bfloat16, torch.float16]


class UpcastCache(lavakv.CompressedCache):
    """A cache that scores float32 copies of exactly the half-precision tensors it is given."""

    def compress_layer(self, layer_idx, query, key, value, attention_mask, scaling, weights=None):
        super().compress_layer(layer_idx, query.float(), key.float(), value.float(), attention_mask, scaling, weights)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", ["llama", "gemma3", "qwen3"])
def test_a_budget_above_the_prompt_gives_the_tokens_of_plain_generate_in_the_same_dtype(kind, dtype, tokenizer):
    model = tiny_model(kind).to(dtype)
    ids = random_prompt(90)
    expected = plain_generate(model, ids, 8)
    for method in ("lava", "snapkv", "ada-snapkv", "cake"):
        out = lavakv.generate(model, tokenizer, ids, method=method, budget=90, max_new_tokens=8)
        assert out.token_ids == expected, method


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("method", ["lava", "ada-snapkv", "cake", "pyramidkv", "h2o"])
def test_kept_positions_are_those_scored_in_float32_from_the_same_tensors(method, dtype):
    model = tiny_model("llama").to(dtype)
    ids = torch.tensor([random_prompt(160)])
    kept = []
    for cache_class in (lavakv.CompressedCache, UpcastCache):
        cache = cache_class(model, method=method, budget=40)
        with torch.inference_mode():
            model(ids, **lavakv.cache_argument(model, cache), use_cache=True)
        kept.append(cache.stats().sequences[0].kept_positions)
        assert cache.layers[0].storage.keys.dtype == (dtype if cache_class is lavakv.CompressedCache else torch.float32)
    assert kept[0] == kept[1]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("method", ["lava", "snapkv"])
def test_half_precision_caches_hold_half_the_bytes_and_decode(method, dtype, tokenizer):
    model = tiny_model("llama")
    ids = random_prompt(160)
    full_precision = lavakv.generate(model, tokenizer, ids, method=method, budget=40, max_new_tokens=6)
    half = lavakv.generate(model.to(dtype), tokenizer, ids, method=method, budget=40, max_new_tokens=6)
    assert half.stats.kv_bytes * 2 == full_precision.stats.kv_bytes
    assert len(half.token_ids) == 6 and all(0 <= t < 96 for t in half.token_ids)


@pytest.mark.parametrize("dtype", HALF)
def test_every_attention_path_in_half_precision_matches_float32_attention(dtype, path):
    generator = torch.Generator().manual_seed(0)
    lengths = [[5, 9], [12, 3]]
    rows = []
    for heads in lengths:
        row = []
        for count in heads:
            positions = torch.randperm(30, generator=generator)[:count].sort().values
            row.append((positions, *torch.randn(2, count, 16, generator=generator).to(dtype)))
        rows.append(row)
    storage = RaggedKV.pack(rows, [0, 0], append_start=30)
    tail = torch.randn(2, 2, 2, 2, 16, generator=generator).to(dtype)
    storage.append(tail[0], tail[1])
    query = torch.randn(2, 4, 1, 16, generator=generator).to(dtype)
    got = create_backend(path, storage).attend(query, 0.25)
    assert got.dtype == dtype
    expected = torch.zeros(2, 1, 4, 16)
    for b in range(2):
        for h in range(4):
            _, keys, values = rows[b][h // 2]
            keys = torch.cat([keys, tail[0][b, h // 2]]).float()
            values = torch.cat([values, tail[1][b, h // 2]]).float()
            weights = torch.softmax(keys @ query[b, h, 0].float() * 0.25, dim=0)
            expected[b, 0, h] = weights @ values
    tolerance = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=tolerance)
    assert not math.isnan(got.float().sum().item())
