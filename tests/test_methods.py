"""Scores, allocations and methods on hand-made tensors whose answers are worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_prompt, tiny_model

import lavakv
from lavakv.methods import HEAD_ALLOCATIONS, LAYER_ALLOCATIONS, SCORES, LayerInput, Method
from lavakv.methods import scores as scores_module
from lavakv.methods.registry import proportional_shares, round_to_total
from lavakv.methods.scores import pool, reduce_group
from lavakv.selection import GroupCompression


def hand_layer(window_attention: torch.Tensor, values: torch.Tensor | None = None, prefix: int | None = None):
    """A LayerInput whose window attention is given directly: ``[H, w, n]``."""
    heads, observed, length = window_attention.shape
    kv_heads = heads if values is None else values.shape[0]
    values = torch.ones(kv_heads, length, 2) if values is None else values
    return LayerInput(
        query=torch.zeros(heads, length, 2),
        key=torch.zeros(kv_heads, length, 2),
        value=values,
        scaling=1.0,
        observed=observed,
        prefix_length=length - observed if prefix is None else prefix,
        _window_attention=window_attention,
    )


def test_pooling_spreads_a_peak_to_its_neighbours():
    scores = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
    assert pool(scores, "max", 3).tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0, 0.0]]
    assert pool(scores, "avg", 3)[0, 1].item() == pytest.approx(1 / 3)
    assert pool(scores, "max", 1).tolist() == scores.tolist()


def test_gqa_reduction_mean_and_max_choose_different_entries():
    scores = torch.tensor([[1.0, 0.0, 0.4], [0.0, 0.7, 0.4]])
    mean = reduce_group(scores, 1, "mean")
    maximum = reduce_group(scores, 1, "max")
    torch.testing.assert_close(mean, torch.tensor([[0.5, 0.35, 0.4]]))
    torch.testing.assert_close(maximum, torch.tensor([[1.0, 0.7, 0.4]]))
    assert set(mean[0].topk(2).indices.tolist()) == {0, 2}
    assert set(maximum[0].topk(2).indices.tolist()) == {0, 1}


def test_snapkv_score_is_window_mean_pooled_then_group_mean():
    attention = torch.zeros(2, 2, 6)
    attention[0, :, 1] = 1.0
    attention[1, 0, 3] = 1.0
    attention[1, 1, 3] = 0.5
    layer = hand_layer(attention, values=torch.ones(1, 6, 2), prefix=5)
    score = SCORES["snapkv"](kernel=1)(layer)
    torch.testing.assert_close(score, torch.tensor([[0.0, 0.5, 0.0, 0.375, 0.0]]))
    pooled = SCORES["snapkv"](kernel=3)(layer)
    torch.testing.assert_close(pooled, torch.tensor([[0.5, 0.5, 0.875, 0.375, 0.375]]))


def test_lava_score_weights_each_head_by_its_largest_value_norm_and_takes_group_max():
    attention = torch.zeros(4, 1, 5)
    attention[0, 0, 0] = 0.6
    attention[1, 0, 1] = 0.8
    attention[2, 0, 0] = 0.6
    attention[3, 0, 1] = 0.8
    values = torch.ones(2, 5, 2)
    values[1, 2] = torch.tensor([3.0, -2.0])
    values[1, 4] = torch.tensor([9.0, 9.0])
    layer = hand_layer(attention, values=values, prefix=4)
    score = SCORES["lava"](kernel=1)(layer)
    torch.testing.assert_close(score, torch.tensor([[1.2, 1.6, 0.0, 0.0], [3.0, 4.0, 0.0, 0.0]]))


def test_value_norm_factor_moves_slots_to_the_head_with_larger_values():
    attention = torch.zeros(2, 1, 9)
    attention[:, 0, :8] = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05, 0.05])
    values = torch.ones(2, 9, 4)
    values[1] *= 10
    layer = hand_layer(attention, values=values, prefix=8)
    heads = HEAD_ALLOCATIONS["ada"](alpha=0.0)
    lava_caps = heads.allocate(SCORES["lava"](kernel=1)(layer), 3)
    snap_caps = heads.allocate(SCORES["snapkv"](kernel=1)(layer), 3)
    assert lava_caps == [0, 6]
    assert snap_caps == [3, 3]


def test_cake_score_adds_gamma_times_variance_over_window_queries():
    attention = torch.zeros(1, 2, 4)
    attention[0, :, 0] = torch.tensor([0.2, 0.2])
    attention[0, :, 1] = torch.tensor([0.0, 0.4])
    layer = hand_layer(attention, prefix=3)
    score = SCORES["cake"](pooling="none", gamma=10)(layer)
    torch.testing.assert_close(score, torch.tensor([[0.2, 0.2 + 10 * 0.04, 0.0]]))


def test_h2o_score_accumulates_attention_from_every_query():
    length = 6
    layer = LayerInput(
        query=torch.zeros(1, length, 2),
        key=torch.zeros(1, length, 2),
        value=torch.ones(1, length, 2),
        scaling=1.0,
        observed=2,
        prefix_length=4,
    )
    score = SCORES["h2o"]()(layer)
    expected = [sum(1 / (j + 1) for j in range(i, length)) for i in range(4)]
    assert score[0].tolist() == pytest.approx(expected)


@pytest.mark.parametrize("queries", [40, 12])
def test_h2o_score_in_chunks_equals_the_whole_causal_attention_matrix(monkeypatch, queries):
    monkeypatch.setattr(scores_module, "H2O_QUERY_CHUNK", 7)
    torch.manual_seed(0)
    length, heads, kv_heads = 40, 4, 2
    query, key = torch.randn(heads, queries, 8), torch.randn(kv_heads, length, 8)
    layer = LayerInput(query, key, torch.randn(kv_heads, length, 8), scaling=0.3, observed=4, prefix_length=30)
    logits = (query @ key.repeat_interleave(heads // kv_heads, dim=0).transpose(1, 2)) * 0.3
    positions = torch.arange(length - queries, length)[:, None]
    logits = logits.masked_fill(torch.arange(length)[None, :] > positions, -math.inf)
    received = torch.softmax(logits, dim=-1).sum(dim=1)[:, :30]
    expected = received.reshape(kv_heads, heads // kv_heads, 30).mean(dim=1)
    torch.testing.assert_close(SCORES["h2o"]()(layer), expected)


def test_streamingllm_score_ranks_sinks_first_then_recency():
    layer = hand_layer(torch.zeros(1, 2, 10), prefix=8)
    score = SCORES["streamingllm"](sink=2)(layer)
    kept = sorted(score[0].topk(4).indices.tolist())
    assert kept == [0, 1, 6, 7]


def test_window_attention_is_causal_softmax():
    query = torch.randn(2, 5, 3)
    key = torch.randn(1, 5, 3)
    layer = LayerInput(query, key, torch.ones(1, 5, 3), scaling=0.5, observed=2, prefix_length=3)
    attention = layer.window_attention
    logits = query[:, 3:] @ key[0].T * 0.5
    logits[:, 0, 4] = -math.inf
    torch.testing.assert_close(attention, torch.softmax(logits, dim=-1))


def test_uniform_heads_give_every_head_the_same_slots():
    assert HEAD_ALLOCATIONS["uniform"]().allocate(torch.rand(3, 10), 4) == [4, 4, 4]


@pytest.mark.parametrize(("alpha", "expected"), [(0.0, [4, 0]), (0.2, [4, 0]), (0.5, [3, 1]), (1.0, [2, 2])])
def test_flattened_topk_with_floor(alpha, expected):
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0], [1.0, 0.5, 0.2, 0.1]])
    assert HEAD_ALLOCATIONS["ada"](alpha=alpha).allocate(scores, 2) == expected


def test_flattened_topk_never_gives_a_head_more_than_it_has():
    scores = torch.tensor([[9.0, 8.0, -math.inf, -math.inf], [1.0, 0.5, 0.2, 0.1]])
    caps = HEAD_ALLOCATIONS["ada"](alpha=0.0).allocate(scores, 3)
    assert caps == [2, 4]


def test_pyramid_layers_fall_linearly_and_sum_exactly():
    caps = [1000] * 4
    budgets = LAYER_ALLOCATIONS["pyramid"]().allocate(None, caps, 20, 80)
    assert budgets == [38, 27, 14, 1]
    assert sum(budgets) == 80
    tight = LAYER_ALLOCATIONS["pyramid"]().allocate(None, [30] * 4, 20, 80)
    assert tight == [29, 24, 17, 10]


def test_lava_entropy_is_one_for_flat_scores_and_zero_for_a_single_entry():
    allocation = LAYER_ALLOCATIONS["lava"]()
    assert allocation.summarize(None, torch.ones(2, 8)) == pytest.approx(1.0)
    peaked = torch.zeros(2, 8)
    peaked[1, 3] = 5.0
    assert allocation.summarize(None, peaked) == pytest.approx(0.0)
    half = torch.zeros(1, 4)
    half[0, :2] = 1.0
    assert allocation.summarize(None, half) == pytest.approx(0.5)


def test_lava_layers_are_proportional_to_entropy_and_full_layers_give_slots_back():
    allocation = LAYER_ALLOCATIONS["lava"]()
    assert allocation.allocate([1.0, 0.5, 0.5], [100] * 3, 8, 24) == [12, 6, 6]
    assert allocation.allocate([1.0, 0.5, 0.5], [3, 100, 100], 8, 8) == [3, 3, 2]


def test_cake_preference_is_dispersion_times_shift():
    attention = torch.zeros(1, 2, 3)
    attention[0, 0, 0] = 0.5
    attention[0, 1, 0] = 0.1
    attention[0, 0, 1] = 0.5
    layer = hand_layer(attention, prefix=2)
    dispersion = -(0.5 * math.log(0.5) * 2 + 0.1 * math.log(0.1))
    shift = 0.04 + 0.0625
    got = LAYER_ALLOCATIONS["cake"]().summarize(layer, None)
    assert got == pytest.approx(dispersion * shift)
    got = LAYER_ALLOCATIONS["cake"](tau1=2.0).summarize(layer, None)
    assert got == pytest.approx(math.sqrt(dispersion) * shift)


def test_rounding_keeps_totals_exact_and_respects_caps():
    assert round_to_total([1.5, 1.5, 1.0], 4, [10, 10, 10]) == [2, 1, 1]
    assert sum(round_to_total([0.3] * 10, 3, [1] * 10)) == 3
    assert proportional_shares([1.0, 1.0, 1.0], [1, 50, 50], 30) == [1, 15, 14]
    assert proportional_shares([0.0, 0.0], [5, 5], 6) == [3, 3]


@pytest.mark.parametrize("method", [m for m in lavakv.METHODS if m != "full"])
@pytest.mark.parametrize("budget", [33, 40, 64, 100])
def test_every_method_keeps_exactly_the_budget(method, budget, tokenizer):
    model = tiny_model("llama", num_hidden_layers=6)
    n = 180
    options = {"sink": 1} if method == "streamingllm" and budget < 36 else {}
    out = lavakv.generate(model, tokenizer, random_prompt(n), method=method, budget=budget, max_new_tokens=1, **options)
    kv_heads, layers = model.config.num_key_value_heads, model.config.num_hidden_layers
    assert out.stats.kept_entries == min(budget, n) * kv_heads * layers
    for layer in out.stats.kept_positions:
        for positions in layer:
            assert positions[-32:] == list(range(n - 32, n))


@pytest.mark.parametrize("method", ["lava", "cake", "ada-pyramidkv"])
def test_ratio_budget_is_a_fraction_of_each_prompt(method, tokenizer):
    model = tiny_model("llama")
    out = lavakv.generate(model, tokenizer, random_prompt(200), method=method, ratio=0.3, max_new_tokens=1)
    assert out.stats.budget == 60
    assert out.stats.kept_entries == 60 * 2 * 4


@pytest.mark.parametrize("method", ["lava", "cake"])
@pytest.mark.parametrize("budget", [34, 48, 90])
def test_progressive_and_one_shot_compression_keep_the_same_entries(method, budget):
    model = tiny_model("llama", num_hidden_layers=8, seed=4)
    ids = torch.tensor([random_prompt(300, seed=5)])
    kept = {}
    peaks = {}
    for progressive in (True, False):
        cache = lavakv.CompressedCache(model, method=method, budget=budget, progressive=progressive)
        with torch.no_grad():
            model(ids, **lavakv.cache_argument(model, cache), use_cache=True)
        kept[progressive] = cache.stats().sequences[0].kept_positions
        peaks[progressive] = cache.peak_prefill_bytes
    assert kept[True] == kept[False]
    assert peaks[True] < peaks[False]


def test_layer_budgets_are_reported_and_vary_under_dynamic_allocation(tokenizer):
    model = tiny_model("llama", num_hidden_layers=6)
    out = lavakv.generate(model, tokenizer, random_prompt(200), method="pyramidkv", budget=64, max_new_tokens=1)
    assert out.stats.layer_budgets == sorted(out.stats.layer_budgets, reverse=True)
    assert out.stats.layer_budgets[0] > out.stats.layer_budgets[-1]
    assert len(out.stats.head_budgets) == 6 and len(out.stats.head_budgets[0]) == 2


@pytest.mark.parametrize(
    "composed",
    [
        Method(score="lava", heads="uniform", layers="lava"),
        Method(score="lava", heads="ada", layers="uniform"),
        Method(score="snapkv", heads="ada", layers="lava"),
        Method(score="snapkv", heads="uniform", layers="cake"),
    ],
)
def test_composed_methods_run_and_keep_the_budget(composed, tokenizer):
    model = tiny_model("llama")
    out = lavakv.generate(model, tokenizer, random_prompt(200), method=composed, budget=50, max_new_tokens=2)
    assert out.stats.kept_entries == 50 * 2 * 4


def test_composition_differs_from_the_preset(tokenizer):
    model = tiny_model("llama", num_hidden_layers=6, seed=2)
    ids = random_prompt(220, seed=7)
    preset = lavakv.generate(model, tokenizer, ids, method="lava", budget=50, max_new_tokens=1)
    no_heads = lavakv.generate(
        model, tokenizer, ids, method=Method(score="lava", layers="lava"), budget=50, max_new_tokens=1
    )
    assert set(map(tuple, no_heads.stats.head_budgets)) == {(h, h) for h, _ in no_heads.stats.head_budgets}
    assert preset.stats.kept_positions != no_heads.stats.kept_positions


@pytest.mark.parametrize("method", ["snapkv", "lava", "cake", "h2o", "streamingllm"])
@pytest.mark.parametrize(("length", "budget", "ratio"), [(10, 64, None), (20, None, 0.5), (50, 40, None)])
def test_short_prompts_work(method, length, budget, ratio, tokenizer):
    model = tiny_model("llama")
    out = lavakv.generate(
        model, tokenizer, random_prompt(length), method=method, budget=budget, ratio=ratio, max_new_tokens=3
    )
    expected_budget = min(length, budget if budget else math.ceil(ratio * length))
    assert out.stats.kept_entries == expected_budget * 2 * 4
    assert len(out.token_ids) == 3


def test_group_compression_keeps_everything_when_the_budget_covers_the_prompt():
    sequence = GroupCompression(Method.preset("lava"), length=20, budget=64, visible_lengths=[20] * 2, progressive=True)
    assert not sequence.compresses


@pytest.mark.parametrize(
    ("preset", "options", "message"),
    [
        ("lava", {"alpha": 1.5}, "alpha"),
        ("lava", {"alpha": -0.1}, "alpha"),
        ("lava", {"kernel": 4}, "kernel"),
        ("lava", {"kernel": 0}, "kernel"),
        ("lava", {"window": 0}, "window"),
        ("lava", {"pooling": "median"}, "pooling"),
        ("pyramidkv", {"beta": 0.5}, "beta"),
        ("cake", {"gamma": -1}, "gamma"),
        ("cake", {"tau1": -1}, "tau1"),
        ("cake", {"tau2": 0}, "tau2"),
        ("streamingllm", {"sink": -2}, "sink"),
    ],
)
def test_bad_options_are_refused_with_their_name(preset, options, message):
    with pytest.raises(ValueError, match=message):
        Method.preset(preset, **options)


def test_unknown_parts_are_refused_with_the_valid_names():
    with pytest.raises(ValueError, match="unknown score 'magic'.*snapkv"):
        Method(score="magic")
    with pytest.raises(ValueError, match="unknown heads"):
        Method(heads="greedy")
    with pytest.raises(ValueError, match="unknown layers"):
        Method(layers="random")
