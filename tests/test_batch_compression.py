"""A batch is compressed in one pass of tensor operations and keeps, per sequence, what it keeps alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import random_prompt, tiny_model

import lavakv
from lavakv.methods import Method
from lavakv.methods.registry import register_score
from lavakv.methods.scores import SnapKVScore
from lavakv.recording import PrefillRecord

WINDOW = 8
METHODS = ["snapkv", "pyramidkv", "ada-snapkv", "ada-pyramidkv", "cake", "lava", "h2o", "streamingllm"]
METHODS += ["expected-attention", "criticalkv", "critical-adakv", "defensivekv", "layer-defensivekv"]


def _alone(record: PrefillRecord, row: int, method: str, budget: int, progressive: bool) -> lavakv.CompressedCache:
    """Row ``row`` of a recorded batch, compressed as a batch of one from exactly the same tensors."""
    cache = lavakv.CompressedCache(record.config, method=method, budget=budget, progressive=progressive, window=WINDOW)
    mask = None if record.attention_mask is None else record.attention_mask[row : row + 1]
    input_mask = None if record.input_mask is None else record.input_mask[row : row + 1]
    cache.observe_inputs(record.input_ids[row : row + 1], input_mask)
    with torch.inference_mode():
        for layer, (query, key, value, scaling, weights) in enumerate(record.layers):
            cache.compress_layer(
                layer, query[row : row + 1], key[row : row + 1], value[row : row + 1], mask, scaling, weights
            )
    return cache


def _assert_rows_match(batched: lavakv.CompressedCache, record: PrefillRecord, method, budget, progressive):
    stats = batched.stats()
    for row in range(record.input_ids.shape[0]):
        alone = _alone(record, row, method, budget, progressive)
        assert stats.sequences[row].kept_positions == alone.stats().sequences[0].kept_positions, (method, row)
        for layer in (0, batched.num_layers - 1):
            for (p1, k1, v1), (p2, k2, v2) in zip(batched.kept_kv(layer, row), alone.kept_kv(layer, 0)):
                assert torch.equal(p1, p2) and torch.equal(k1, k2) and torch.equal(v1, v2)


@pytest.mark.parametrize("progressive", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_a_batch_keeps_per_sequence_what_each_sequence_keeps_alone(method, progressive):
    model = tiny_model("llama")
    ids = torch.tensor([random_prompt(150, seed=seed) for seed in range(4)])
    record = PrefillRecord(model, ids)
    batched = record.compress(method, budget=36, progressive=progressive, reuse_scores=False, window=WINDOW)
    _assert_rows_match(batched, record, method, 36, progressive)


@pytest.mark.parametrize("kind", ["llama-mha", "qwen3", "gemma3", "mistral-sliding"])
@pytest.mark.parametrize("method", ["lava", "ada-snapkv", "cake"])
def test_batches_of_other_layouts_and_sliding_windows_match_sequence_by_sequence(kind, method):
    model = tiny_model(kind)
    ids = torch.tensor([random_prompt(140, seed=seed) for seed in range(3)])
    record = PrefillRecord(model, ids)
    batched = record.compress(method, budget=40, progressive=True, reuse_scores=False, window=WINDOW)
    _assert_rows_match(batched, record, method, 40, True)


@pytest.mark.parametrize("method", ["lava", "snapkv", "ada-pyramidkv", "expected-attention", "critical-adakv"])
def test_a_padded_batch_is_compressed_in_runs_of_equal_lengths(method):
    model = tiny_model("llama")
    lengths = [150, 150, 110, 150]
    ids = torch.zeros(len(lengths), 150, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, 150 - length :] = torch.tensor(random_prompt(length, seed=row))
        mask[row, 150 - length :] = 1
    record = PrefillRecord(model, ids, attention_mask=mask)
    batched = record.compress(method, budget=36, progressive=True, reuse_scores=False, window=WINDOW)
    assert [s.prompt_length for s in batched.stats().sequences] == lengths
    _assert_rows_match(batched, record, method, 36, True)


SEEN_KV_HEADS: list[int] = []


@register_score("test-layer-normalised")
@dataclass(frozen=True)
class LayerNormalisedScore(SnapKVScore):
    """SnapKV's score divided by its sum over the whole layer: it compares heads, so it is not row-independent."""

    rows_independent: ClassVar[bool] = False

    def __call__(self, layer):
        SEEN_KV_HEADS.append(layer.key.shape[0])
        scores = super().__call__(layer)
        return scores / scores.sum()


def test_scores_that_compare_heads_are_computed_sequence_by_sequence():
    model = tiny_model("llama")
    ids = torch.tensor([random_prompt(120, seed=seed) for seed in range(3)])
    record = PrefillRecord(model, ids)
    method = Method(score="test-layer-normalised", heads="ada", layers="uniform")
    SEEN_KV_HEADS.clear()
    batched = record.compress(method, budget=30, reuse_scores=False, window=WINDOW)
    assert set(SEEN_KV_HEADS) == {model.config.num_key_value_heads}
    for row in range(3):
        alone = _alone(record, row, method, 30, False)
        assert batched.stats().sequences[row].kept_positions == alone.stats().sequences[0].kept_positions


def test_batched_allocations_equal_the_per_sequence_ones():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(5, 4, 30, generator=generator)
    scores[1, 2, 20:] = -torch.inf
    scores[3, :, 25:] = -torch.inf
    scores[4] = torch.round(scores[4] * 4) / 4  # ties
    slots = [6, 3, 9, 1, 6]
    for spec in ("ada-snapkv", "snapkv", "lava:alpha=0.5"):
        heads = lavakv.methods.method.resolve_method(spec).heads
        batch = heads.allocate_batch(scores, slots)
        retained = heads.retain_batch(scores, slots)
        for row, count in enumerate(slots):
            assert batch[row].tolist() == heads.allocate(scores[row], count), (spec, row)
            assert retained[row].tolist() == heads.retain(scores[row], count), (spec, row)
