"""KVzip: scores from a reconstruction pass, run once per prompt by the record, lavakv.generate and lavakv eval."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyTokenizer, random_prompt, tiny_model
from test_eval_registry import Digits, digits  # noqa: F401  (the fixture)

import lavakv
from lavakv.decoding import TokenFeed
from lavakv.eval.evaluation import EvalConfig, evaluate
from lavakv.methods.defensivekv import GlobalLayers
from lavakv.recording import RECONSTRUCTION_PROMPT, PrefillRecord

LAYERS, KV_HEADS, LENGTH, BUDGET = 3, 2, 90, 20


def _reconstruction_scores(model, ids: list[int], tokenizer) -> list[torch.Tensor]:
    """Every layer's KVzip scores ``[H_kv, n]`` from one eager forward over prompt, request and prompt again."""
    request = tokenizer(RECONSTRUCTION_PROMPT, add_special_tokens=False)["input_ids"]
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids + request + ids]), output_attentions=True)
    finally:
        model.set_attn_implementation("lavakv")
    scores = []
    for attention in out.attentions:
        rows = attention[0, :, len(ids) :, : len(ids)].amax(dim=1)
        per_kv = rows.view(KV_HEADS, -1, len(ids)).amax(dim=1)
        per_kv[:, :4] = 1.0
        scores.append(per_kv)
    return scores


def test_kvzip_keeps_the_entries_the_reconstruction_attends_to_most_across_all_layers():
    model, tokenizer = tiny_model("llama", num_hidden_layers=LAYERS, seed=4), TinyTokenizer()
    ids = random_prompt(LENGTH, seed=3)
    record = PrefillRecord(model, torch.tensor([ids]))
    with pytest.raises(ValueError, match="scores from a reconstruction pass: call record.reconstruct"):
        record.compress("kvzip", budget=BUDGET)
    record.reconstruct(tokenizer)
    stats = record.compress("kvzip", budget=BUDGET).stats()
    assert stats.kept_entries == BUDGET * KV_HEADS * LAYERS
    scores = _reconstruction_scores(model, ids, tokenizer)
    summaries = [torch.sort(s.reshape(-1), descending=True).values for s in scores]
    slots = GlobalLayers().allocate(summaries, [LENGTH] * LAYERS, BUDGET, BUDGET * LAYERS)
    for layer, (layer_scores, layer_slots) in enumerate(zip(scores, slots)):
        flat = torch.sort(layer_scores.reshape(-1), descending=True, stable=True).indices[: layer_slots * KV_HEADS]
        for head, positions in enumerate(stats.sequences[0].kept_positions[layer]):
            expected = sorted(int(i) % LENGTH for i in flat if int(i) // LENGTH == head)
            assert positions == expected
    assert record.compress("kvzip", budget=BUDGET).clock.seconds["pass"] == record.scoring_pass_seconds > 0


def test_generate_runs_the_reconstruction_pass_and_continues_at_the_prompts_positions(tokenizer):
    model = tiny_model("llama", num_hidden_layers=LAYERS, seed=5)
    ids = random_prompt(LENGTH, seed=4)
    out = lavakv.generate(model, tokenizer, ids, method="kvzip", budget=BUDGET, max_new_tokens=5)
    record = PrefillRecord(model, torch.tensor([ids]))
    record.reconstruct(tokenizer)
    cache = record.compress("kvzip", budget=BUDGET)
    reference = TokenFeed(model, cache, lengths=[LENGTH]).greedy(record.logits, 5, stop_ids=set())
    assert out.stats.kept_entries == BUDGET * KV_HEADS * LAYERS
    assert out.token_ids == reference[0]
    with pytest.raises(ValueError, match="cannot evict while decoding: its kvzip score reads a reconstruction pass"):
        lavakv.generate(model, tokenizer, ids, method="kvzip", budget=BUDGET, decode_budget=30)
    with pytest.raises(ValueError, match="compressing prefill cannot run"):
        model(
            torch.tensor([ids]),
            **lavakv.cache_argument(model, lavakv.CompressedCache(model, method="kvzip", budget=BUDGET)),
        )


def test_lavakv_eval_runs_kvzip_with_its_pass_and_no_error_rows(digits, tmp_path):  # noqa: F811
    config = EvalConfig(
        benchmarks=(Digits(),), out=str(tmp_path / "run"), methods=("kvzip",), budgets=(32,), progress=False
    )
    result = evaluate(config)
    assert result.errors == 0 and {row.method for row in result.rows} == {"kvzip"}
