"""Decode attention paths and what a decode step does: every path gives the tokens of the default one,
the cache says which path ran, and the greedy loop reads tokens back in blocks, not every step."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import random_prompt, tiny_model

import lavakv
from lavakv import backends
from lavakv.backends import resolve_backend
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


def test_auto_picks_packed_on_cpu_and_flex_elsewhere(monkeypatch):
    monkeypatch.setattr(backends, "_flex_probes", {})
    monkeypatch.setattr(backends, "flex_kernel", lambda device: lambda *args, **kwargs: None)
    assert resolve_backend("auto", torch.device("cpu")) == "packed"
    assert resolve_backend("auto", torch.device("meta")) == "flex"
    assert resolve_backend("flex", torch.device("cpu")) == "flex"
    model = tiny_model("llama")
    _, cache = _batch_tokens(model, [random_prompt(80)], "auto")
    assert cache.stats(positions=False).attention_paths == ["packed"]
    assert cache.copy().stats(positions=False).attention_paths == ["packed"]


def test_a_bad_attention_path_is_refused_with_the_valid_ones():
    with pytest.raises(
        ValueError, match="attention_path must be 'auto' or one of gather, packed, padded, flex, bucketed, got 'dense'"
    ):
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


def test_an_unknown_backend_name_is_refused_with_the_valid_ones():
    with pytest.raises(
        ValueError, match="unknown attention backend 'dense'; valid backends: auto, gather, packed, padded, flex"
    ):
        resolve_backend("dense", torch.device("cpu"))


def test_auto_resolves_to_gather_with_a_logged_cause_when_flex_cannot_run(monkeypatch, caplog):
    calls = []

    def broken(device):
        calls.append(device)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(backends, "_flex_probes", {})
    monkeypatch.setattr(backends, "flex_kernel", broken)
    with caplog.at_level(logging.WARNING, logger="lavakv.backends"):
        assert resolve_backend("auto", torch.device("meta")) == "gather"
        assert resolve_backend("auto", torch.device("meta")) == "gather"
    assert len(calls) == 1, "the probe runs once per device"
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings and "FlexAttention does not run on meta" in warnings[0].getMessage()
    assert "no compiler here" in warnings[0].getMessage()
    assert isinstance(warnings[0].exc_info[1], RuntimeError)
    assert resolve_backend("flex", torch.device("meta")) == "flex"


def test_an_explicit_flex_that_fails_raises_instead_of_falling_back(monkeypatch):
    def broken(device):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(backends, "flex_kernel", broken)
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="no compiler here"):
        _batch_tokens(model, [random_prompt(80)], "flex")
