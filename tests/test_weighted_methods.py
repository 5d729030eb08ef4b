"""Methods that read the layer's own weights: Expected Attention, CriticalKV, DefensiveKV (and the global layers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_prompt, tiny_model

import lavakv
from lavakv.methods import LayerInput, LayerWeights, Method, OptionError, parse_spec
from lavakv.methods.defensivekv import DefensiveKVScore, GlobalLayers
from lavakv.methods.expected_attention import rotate_half, unrotate
from lavakv.methods.scores import SnapKVScore
from lavakv.recording import PrefillRecord

LENGTH = 120
NEW_PRESETS = ["expected-attention", "criticalkv", "critical-adakv", "defensivekv", "layer-defensivekv"]


def _pre_rope_queries(model, ids: list[int]) -> tuple[PrefillRecord, list[torch.Tensor]]:
    """A prefill record and every layer's queries before RoPE ``[H, n, d]``, read from the query projection."""
    captured = []
    heads, dim = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    hooks = [
        layer.self_attn.q_proj.register_forward_hook(
            lambda module, args, out: captured.append(out[0].view(-1, heads, dim).transpose(0, 1).float())
        )
        for layer in model.model.layers
    ]
    try:
        record = PrefillRecord(model, torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()
    return record, captured


def _layer_input(record: PrefillRecord, layer: int, observed: int) -> LayerInput:
    query, key, value, scaling, weights = record.layers[layer]
    length = key.shape[2]
    return LayerInput(
        query[0], key[0], value[0], scaling, observed, length - observed, layer_weights=LayerWeights(*weights)
    )


def _top(scores: torch.Tensor, count: int) -> list[int]:
    return sorted(torch.sort(scores, descending=True, stable=True).indices[:count].tolist())


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_the_rotary_inverse_recovers_the_queries_before_rope(kind):
    model = tiny_model(kind, seed=4)
    record, before = _pre_rope_queries(model, random_prompt(40, seed=2))
    for layer, (query, _, _, _, (output, rotary)) in enumerate(record.layers):
        cos, sin = rotary(torch.arange(40))
        torch.testing.assert_close(unrotate(query[0].float(), cos, sin), before[layer], rtol=1e-4, atol=1e-5)
        assert output is model.model.layers[layer].self_attn.o_proj.weight
    x = torch.randn(5, 8)
    assert torch.equal(rotate_half(rotate_half(x)), -x)


def _expected_attention(model, queries: torch.Tensor, keys: torch.Tensor, values, sinks=4, future=512):
    """Expected Attention's scores ``[H_kv, n]`` written out from the paper's formulas, one query head at a time."""
    heads, length, dim = queries.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    cos, sin = model.model.rotary_emb(queries, torch.arange(length, length + future)[None])
    rotate = rotate_half(torch.eye(dim)).T
    rotation = torch.stack([torch.diag(c) + torch.diag(s) @ rotate for c, s in zip(cos[0], sin[0])]).mean(dim=0)
    per_head = []
    for head in range(heads):
        q = queries[head, sinks:]
        mean = rotation @ q.mean(dim=0)
        covariance = rotation @ torch.cov(q.T, correction=0) @ rotation.T
        k = keys[head // group, sinks:].float()
        logits = k @ mean / dim**0.5 + torch.einsum("nd,de,ne->n", k, covariance, k) / dim / 2
        per_head.append(logits.softmax(dim=-1))
    expected = torch.stack(per_head).view(kv_heads, group, -1).mean(dim=1)
    expected = expected * values[:, sinks:].float().norm(dim=-1)
    return torch.cat([expected.max(dim=1, keepdim=True).values.expand(-1, sinks), expected], dim=1)


def test_expected_attention_keeps_each_heads_best_expected_entries_with_no_window():
    model = tiny_model("llama", num_hidden_layers=3, seed=6)
    ids = random_prompt(LENGTH, seed=3)
    record, before = _pre_rope_queries(model, ids)
    kept = record.compress("expected-attention", budget=30).stats().sequences[0].kept_positions
    for layer, (_, key, value, _, _) in enumerate(record.layers):
        scores = _expected_attention(model, before[layer], key[0], value[0])
        for head, positions in enumerate(kept[layer]):
            assert positions == _top(scores[head], 30)
            assert positions[:4] == [0, 1, 2, 3]
    assert parse_spec("expected-attention").window == 0


def _projected_norms(model, layer: int, values: torch.Tensor, heads: int) -> torch.Tensor:
    weight = model.model.layers[layer].self_attn.o_proj.weight.detach().float()
    kv_heads, _, dim = values.shape
    group = heads // kv_heads
    norms = [
        (values[head // group].float() @ weight[:, head * dim : (head + 1) * dim].T).abs().sum(dim=-1)
        for head in range(heads)
    ]
    return torch.stack(norms).view(kv_heads, group, -1).mean(dim=1)


def test_criticalkv_keeps_half_its_slots_by_attention_and_the_rest_by_attention_times_projected_values():
    model = tiny_model("llama", num_hidden_layers=3, seed=7)
    record = PrefillRecord(model, torch.tensor([random_prompt(LENGTH, seed=4)]))
    budget, window = 40, 32
    slots = budget - window
    kept = record.compress("criticalkv", budget=budget).stats().sequences[0].kept_positions
    for layer in range(3):
        part = _layer_input(record, layer, window)
        attention = SnapKVScore()(part)
        second = (attention + 1e-4) * _projected_norms(model, layer, part.value[:, : part.prefix_length], 4)
        for head, positions in enumerate(kept[layer]):
            first = _top(attention[head], slots // 2)
            rest = second[head].clone()
            rest[first] = float("inf")
            assert positions[:slots] == _top(rest, slots)
            assert set(first) <= set(positions)
            assert positions[slots:] == list(range(LENGTH - window, LENGTH))


def test_critical_adakv_divides_heads_as_ada_snapkv_and_keeps_exact_totals():
    model = tiny_model("llama", num_hidden_layers=4, seed=8)
    record = PrefillRecord(model, torch.tensor([random_prompt(150, seed=5)]))
    critical = record.compress("critical-adakv", budget=48).stats()
    ada = record.compress("ada-snapkv", budget=48).stats()
    assert critical.kept_entries == ada.kept_entries == 48 * 2 * 4
    for ours, theirs in zip(critical.sequences[0].kept_positions, ada.sequences[0].kept_positions):
        assert [len(p) for p in ours] == [len(p) for p in theirs]
    assert critical.sequences[0].kept_positions != ada.sequences[0].kept_positions


def test_defensive_protection_stops_before_the_cumulative_share_reaches_the_threshold():
    attention = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]])
    protected = DefensiveKVScore._protected(attention, 0.85)
    assert protected.tolist() == [[True, False, True, False], [True, True, True, False]]
    assert DefensiveKVScore._protected(attention, 0.8).tolist()[0] == [True, False, False, False]
    assert not DefensiveKVScore._protected(attention, 0.0).any()


def test_defensivekv_scores_are_max_aggregated_clamped_and_weighted_by_normalized_projected_values():
    model = tiny_model("llama", num_hidden_layers=2, seed=9)
    record = PrefillRecord(model, torch.tensor([random_prompt(80, seed=6)]))
    part = _layer_input(record, 1, 16)
    scores = DefensiveKVScore(mass=0.0)(part)
    rows = part.window_attention[:, :, : part.prefix_length]
    pooled = F.avg_pool1d(rows.reshape(-1, 1, part.prefix_length), 5, stride=1, padding=2).view(rows.shape)
    pooled = pooled * rows.sum(dim=-1, keepdim=True) / pooled.sum(dim=-1, keepdim=True)
    defensive = pooled.view(2, -1, part.prefix_length).max(dim=1).values
    defensive = defensive.clamp(min=defensive.mean(dim=-1, keepdim=True))
    norms = _projected_norms(model, 1, part.value[:, : part.prefix_length], 4)
    torch.testing.assert_close(scores, defensive * norms / norms.sum(dim=0, keepdim=True))
    protected = DefensiveKVScore()(part)
    assert bool((protected == protected.max()).sum() > (scores == scores.max()).sum())


def test_the_global_layer_allocation_gives_each_layer_its_share_of_the_top_scores():
    allocation = GlobalLayers()
    summaries = [torch.tensor([9.0, 8, 7, 1]), torch.tensor([6.0, 0.5, 0.4, 0.3]), None]
    assert allocation.allocate(summaries, [2, 2, 0], 2, 4) == [2, 2, 0]
    assert allocation.allocate(summaries[:2], [2, 2], 1, 2) == [2, 0]
    assert allocation.allocate([torch.tensor([9.0, 8, 1, 0]), torch.tensor([7.0, 6, 0.4, 0.3])], [2, 2], 1, 2) == [1, 1]
    assert allocation.allocate([torch.tensor([5.0, 4]), torch.tensor([3.0, 2])], [2, 2], 1, 2) == [2, 0]


@pytest.mark.parametrize("method", NEW_PRESETS)
def test_each_new_preset_keeps_exact_totals_and_progressive_equals_one_shot(method):
    model = tiny_model("llama", num_hidden_layers=5, seed=3)
    record = PrefillRecord(model, torch.tensor([random_prompt(200, seed=9)]))
    kept = {}
    for progressive in (True, False):
        stats = record.compress(method, budget=48, progressive=progressive).stats()
        assert stats.kept_entries == 48 * 2 * 5
        kept[progressive] = stats.sequences[0].kept_positions
    assert kept[True] == kept[False]


@pytest.mark.parametrize("method", NEW_PRESETS)
def test_each_new_preset_generates_through_the_cache_and_frees_memory(method, tokenizer):
    model = tiny_model("llama", num_hidden_layers=3, seed=2)
    ids = random_prompt(160, seed=7)
    out = lavakv.generate(model, tokenizer, ids, method=method, budget=40, max_new_tokens=4)
    full = lavakv.generate(model, tokenizer, ids, method="full", max_new_tokens=4)
    assert out.stats.kept_entries == 40 * 2 * 3
    assert out.stats.kv_bytes < full.stats.kv_bytes / 3
    assert len(out.token_ids) == 4


def test_two_stage_scores_refuse_dynamic_layer_budgets_and_decode_budgets(tokenizer):
    with pytest.raises(ValueError, match="criticalkv score ranks entries by budget .* not 'lava'"):
        parse_spec("criticalkv:layers=lava")
    model = tiny_model("llama", num_hidden_layers=2)
    for method, reason in (("criticalkv", "reads the layer's weights"), ("expected-attention", "reads the layer")):
        with pytest.raises(ValueError, match=f"cannot evict while decoding: its .* score {reason}"):
            lavakv.generate(model, tokenizer, random_prompt(60), method=method, budget=40, decode_budget=48)


def test_the_new_options_parse_and_bad_ones_are_named():
    method = parse_spec("expected-attention:use_covariance=false,n_future_positions=64")
    assert method.score.use_covariance is False and method.score.n_future_positions == 64
    assert parse_spec(method.spec) == method
    assert parse_spec("critical-adakv:first_stage_ratio=0.25,alpha=0.5").heads.alpha == 0.5
    assert parse_spec("layer-defensivekv").layers.name == "global"
    with pytest.raises(OptionError, match="use_vnorm of expected-attention score takes true or false, got 'maybe'"):
        parse_spec("expected-attention:use_vnorm=maybe")
    with pytest.raises(ValueError, match="first_stage_ratio must be a number in \\[0, 1\\], got 2.0"):
        parse_spec("criticalkv:first_stage_ratio=2")
    with pytest.raises(ValueError, match="unknown option 'kernel'"):
        parse_spec("expected-attention:kernel=5")
    with pytest.raises(ValueError, match="use_covariance must be true or false, got 1"):
        Method(score="expected-attention", use_covariance=1)
