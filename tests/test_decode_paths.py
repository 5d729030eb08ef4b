"""Decode attention paths and what a decode step does: every path gives the tokens of the default one,
the cache says which path ran, and the greedy loop reads tokens back in blocks, not every step."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompt, tiny_model

import lavakv
from lavakv.cache import resolve_attention_path
from lavakv.decoding import TokenFeed


def _batch_tokens(model, prompts, path, method="ada-snapkv", budget=40, steps=6):
    cache = lavakv.CompressedCache(model, method=method, budget=budget, attention_path=path)
    feed = TokenFeed(model, cache)
    logits = feed.prefill(prompts, pad_id=0)
    return feed.greedy(logits, steps, stop_ids=set()), cache


@pytest.mark.parametrize("kind", ["llama", "mistral-sliding", "gemma3", "llama-mha"])
def test_every_path_decodes_a_padded_batch_to_the_same_tokens(kind, path):
    model = tiny_model(kind)
    prompts = [random_prompt(150, seed=1), random_prompt(110, seed=2)]
    expected, _ = _batch_tokens(model, prompts, "gather")
    got, cache = _batch_tokens(model, prompts, path)
    assert got == expected
    assert cache.stats(positions=False).attention_paths == [path]


def test_auto_picks_gather_on_cpu_and_flex_elsewhere():
    assert resolve_attention_path("auto", torch.device("cpu")) == "gather"
    assert resolve_attention_path("auto", torch.device("meta")) == "flex"
    assert resolve_attention_path("flex", torch.device("cpu")) == "flex"
    model = tiny_model("llama")
    _, cache = _batch_tokens(model, [random_prompt(80)], "auto")
    assert cache.stats(positions=False).attention_paths == ["gather"]
    assert cache.copy().stats(positions=False).attention_paths == ["gather"]


def test_a_bad_attention_path_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="attention_path must be 'auto' or one of gather, padded, flex, got 'dense'"):
        lavakv.CompressedCache(tiny_model("llama"), budget=32, attention_path="dense")


def test_greedy_reads_tokens_back_in_blocks_and_stops_like_a_step_by_step_loop(monkeypatch):
    model = tiny_model("llama")
    prompts = [random_prompt(60, seed=3), random_prompt(40, seed=4)]
    reads = []
    original = torch.Tensor.tolist

    def counting(tensor):
        reads.append(tuple(tensor.shape))
        return original(tensor)

    results = {}
    for every in (1, 4):
        feed = TokenFeed(model, lavakv.CompressedCache(model, method="snapkv", budget=40))
        logits = feed.prefill(prompts, pad_id=0)
        first = logits.argmax(-1).tolist()
        stop = {first[1]}
        reads.clear()
        monkeypatch.setattr(torch.Tensor, "tolist", counting)
        results[every] = feed.greedy(logits, 10, stop_ids=stop, check_every=every)
        monkeypatch.setattr(torch.Tensor, "tolist", original)
        token_reads = [shape for shape in reads if len(shape) == 2 and shape[0] == 2]
        if every == 4:
            assert len(token_reads) == 3, token_reads
    assert results[1] == results[4]
    assert len(results[4][1]) == 1 and len(results[4][0]) == 10


def test_auto_falls_back_to_gather_when_flex_cannot_run(monkeypatch, caplog):
    from lavakv import ragged

    def broken(device):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(ragged, "flex_kernel", broken)
    model = tiny_model("llama")
    expected, _ = _batch_tokens(model, [random_prompt(80)], "gather")
    cache = lavakv.CompressedCache(model, method="ada-snapkv", budget=40)
    feed = TokenFeed(model, cache)
    logits = feed.prefill([random_prompt(80)], pad_id=0)
    for layer in cache.layers:
        layer.attention_path = "flex"
    assert feed.greedy(logits, 6, stop_ids=set()) == expected
    assert cache.stats(positions=False).attention_paths == ["gather"]
    assert "FlexAttention failed" in caplog.text
