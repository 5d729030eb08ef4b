"""Compressed caches in applications: many questions, copies, files, conversations, a decode-time budget."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from conftest import random_prompt, tiny_model
from transformers import DynamicCache

import lavakv
from lavakv import CompressedCache, ContinuationError
from lavakv.decoding import TokenFeed

QUESTIONS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]


def _compressed(model, prompt, method="lava", budget=40, **settings) -> CompressedCache:
    cache = CompressedCache(model, method=method, budget=None if method == "full" else budget, **settings)
    TokenFeed(model, cache).prefill([prompt], pad_id=0)
    return cache


def _answer(model, cache, new_ids, steps=6) -> list[int]:
    feed = TokenFeed(model, cache, lengths=[len(cache.token_ids())])
    return feed.greedy(feed.extend([new_ids]), steps, stop_ids=set())[0]


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("method", ["snapkv", "lava", "full"])
def test_many_questions_get_the_tokens_each_gets_alone(kind, method, tokenizer):
    model = tiny_model(kind)
    context = " ".join(map(str, random_prompt(130, seed=3)))
    questions = [" 5 6 7", " 8 9", " 10 11 12 13 14"]
    budget = None if method == "full" else 40
    many = lavakv.generate(
        model, tokenizer, context, method=method, budget=budget, questions=questions, max_new_tokens=7
    )
    for question, out in zip(questions, many):
        alone = lavakv.generate(
            model, tokenizer, context, method=method, budget=budget, question=question, max_new_tokens=7
        )
        assert out.token_ids == alone.token_ids
        assert out.stats.kept_entries == alone.stats.kept_entries
        assert out.history == alone.history


def test_questions_of_a_compressed_context_leave_it_unchanged(tokenizer):
    model = tiny_model("llama")
    context = " ".join(map(str, random_prompt(120, seed=4)))
    cache = lavakv.compress(model, tokenizer, context, method="ada-snapkv", budget=48)
    before = [kv[1].clone() for kv in cache.kept_kv(1)]
    held = cache.token_ids()
    answers = lavakv.generate(model, tokenizer, cache=cache, questions=[" 1 2", " 3 4 5"], max_new_tokens=5)
    assert len(answers) == 2
    assert cache.token_ids() == held
    assert all(torch.equal(a, b[1]) for a, b in zip(before, cache.kept_kv(1)))
    one = lavakv.generate(model, tokenizer, cache=cache, question=" 1 2", max_new_tokens=5)
    assert one.token_ids == answers[0].token_ids
    assert cache.token_ids() == held
    assert lavakv.generate(model, tokenizer, cache=cache, question=" 1 2", max_new_tokens=5).token_ids == one.token_ids


def test_copy_is_independent():
    model = tiny_model("llama")
    prompt = random_prompt(100, seed=5)
    cache = _compressed(model, prompt, "lava")
    copy = cache.copy()
    kept = [(p.clone(), k.clone()) for p, k, _ in copy.kept_kv(2)]
    tokens = _answer(model, cache, [7, 8, 9], steps=5)
    assert copy.token_ids() == prompt
    assert copy.stats().appended_tokens == 0 and cache.stats().appended_tokens == 3 + 4
    for (positions, keys), (p, k, _) in zip(kept, copy.kept_kv(2)):
        assert torch.equal(positions, p) and torch.equal(keys, k)
    assert _answer(model, copy, [7, 8, 9], steps=5) == tokens


def test_stacked_caches_of_different_lengths_decode_as_each_alone():
    model = tiny_model("mistral-sliding")
    prompts = [random_prompt(140, seed=6), random_prompt(90, seed=7)]
    caches = [_compressed(model, p, "ada-snapkv") for p in prompts]
    alone = [_answer(model, c.copy(), q) for c, q in zip(caches, QUESTIONS)]
    logits = []
    for cache, question in zip(caches, QUESTIONS):
        logits.append(TokenFeed(model, cache, lengths=[len(cache.token_ids())]).extend([question]))
    stacked = CompressedCache.stack(caches)
    assert stacked.batch_size == 2
    feed = TokenFeed(model, stacked, lengths=[len(p) + len(q) for p, q in zip(prompts, QUESTIONS)])
    assert feed.greedy(torch.cat(logits), 6, stop_ids=set()) == alone
    stats = stacked.stats()
    assert [s.prompt_length for s in stats.sequences] == [140, 90]
    with pytest.raises(ValueError, match="differ in method .snapkv. vs .ada-snapkv."):
        CompressedCache.stack([caches[0], _compressed(model, prompts[0], "snapkv")])


def test_batch_repeat_and_select_give_independent_rows():
    model = tiny_model("llama")
    cache = _compressed(model, random_prompt(80, seed=8), "lava")
    positions = cache.stats().sequences[0].kept_positions
    cache.batch_repeat_interleave(3)
    assert cache.batch_size == 3
    assert all(s.kept_positions == positions for s in cache.stats().sequences)
    feed = TokenFeed(model, cache, lengths=[80] * 3)
    tokens = feed.greedy(feed.extend([[4], [5], [4]]), 4, stop_ids=set())
    assert tokens[0] == tokens[2] != tokens[1]
    cache.batch_select_indices([1])
    assert cache.batch_size == 1 and cache.token_ids()[80] == 5
    with pytest.raises(IndexError, match="outside this cache's batch"):
        cache.batch_select_indices([3])


def test_num_return_sequences_with_sampling_matches_plain_transformers():
    model = tiny_model("llama")
    ids = torch.tensor([random_prompt(60, seed=9)])
    torch.manual_seed(0)
    ours = model.generate(
        ids,
        **lavakv.cache_argument(model, CompressedCache(model, method="full")),
        max_new_tokens=6,
        do_sample=True,
        num_return_sequences=3,
    )
    torch.manual_seed(0)
    plain = model.generate(ids, max_new_tokens=6, do_sample=True, num_return_sequences=3)
    assert torch.equal(ours, plain)
    assert len({tuple(row) for row in ours[:, -6:].tolist()}) > 1
    cache = CompressedCache(model, method="snapkv", budget=40)
    model.generate(ids, **lavakv.cache_argument(model, cache), max_new_tokens=4, do_sample=True, num_return_sequences=2)
    first, second = cache.stats().sequences
    assert first.kept_positions == second.kept_positions


# save and load


@pytest.mark.parametrize("kind", ["llama", "mistral-sliding", "gemma3"])
def test_a_loaded_cache_gives_the_tokens_of_the_original(kind, tmp_path, tokenizer):
    model = tiny_model(kind)
    prompt = random_prompt(120, seed=10)
    cache = _compressed(model, prompt, "lava")
    TokenFeed(model, cache, lengths=[120]).extend([[3, 4, 5]])
    path = tmp_path / "context.lkv"
    size = cache.save(path)
    assert size == path.stat().st_size
    assert size < cache.stats().full_kv_bytes
    loaded = CompressedCache.load(path, model)
    assert loaded.token_ids() == cache.token_ids()
    assert loaded.stats().kept_entries == cache.stats().kept_entries
    history = prompt + [3, 4, 5, 6, 7]
    expected = lavakv.generate(model, tokenizer, history, cache=cache.copy(), max_new_tokens=6).token_ids
    assert lavakv.generate(model, tokenizer, history, cache=loaded, max_new_tokens=6).token_ids == expected


def _saved(tmp_path, kind="llama"):
    model = tiny_model(kind)
    path = tmp_path / "c.lkv"
    _compressed(model, random_prompt(90, seed=11), "snapkv").save(path)
    return model, path


def test_loading_into_another_model_or_dtype_names_what_differs(tmp_path):
    model, path = _saved(tmp_path)
    with pytest.raises(ValueError, match="num_key_value_heads: file 2, model 4"):
        CompressedCache.load(path, tiny_model("llama-mha"))
    with pytest.raises(ValueError, match="other weights"):
        CompressedCache.load(path, tiny_model("llama", seed=1))
    with pytest.raises(ValueError, match="saved in float32, but the model runs in bfloat16"):
        CompressedCache.load(path, tiny_model("llama").to(torch.bfloat16))


def test_truncated_corrupt_foreign_and_newer_files_are_refused(tmp_path):
    model, path = _saved(tmp_path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.lkv"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        CompressedCache.load(truncated, model)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    corrupt = tmp_path / "corrupt.lkv"
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum"):
        CompressedCache.load(corrupt, model)
    header_length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_length])
    inner = json.loads(header["__metadata__"]["lavakv"])
    inner["format_version"] = 99
    header["__metadata__"]["lavakv"] = json.dumps(inner)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    newer = tmp_path / "newer.lkv"
    newer.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + header_length :])
    with pytest.raises(ValueError, match="format version 99 is newer"):
        CompressedCache.load(newer, model)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="without a lavakv header"):
        CompressedCache.load(foreign, model)
    with pytest.raises(FileNotFoundError, match="not found"):
        CompressedCache.load(tmp_path / "missing.lkv", model)


# conversations


@pytest.mark.parametrize("method", ["snapkv", "lava"])
def test_turn_two_through_the_cache_equals_a_cache_fed_the_same_history(method, tokenizer):
    model = tiny_model("llama")
    prompt = random_prompt(110, seed=12)
    cache = CompressedCache(model, method=method, budget=40)
    first = lavakv.generate(model, tokenizer, prompt, cache=cache, max_new_tokens=6)
    assert cache.token_ids() == prompt + first.token_ids[:-1]
    history = first.history + [20, 21, 22]
    second = lavakv.generate(model, tokenizer, history, cache=cache, max_new_tokens=6)
    reference = _compressed(model, prompt, method)
    assert second.token_ids == _answer(model, reference, history[len(prompt) :])


def test_full_method_conversation_equals_plain_transformers():
    model = tiny_model("llama")
    ids = torch.tensor([random_prompt(70, seed=13)])
    ours, plain = CompressedCache(model, method="full"), DynamicCache(config=model.config)
    turn = torch.tensor([[30, 31, 32]])
    a = model.generate(ids, **lavakv.cache_argument(model, ours), max_new_tokens=5, do_sample=False)
    b = model.generate(ids, **lavakv.cache_argument(model, plain), max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)
    a = model.generate(torch.cat([a, turn], 1), **lavakv.cache_argument(model, ours), max_new_tokens=5, do_sample=False)
    b = model.generate(
        torch.cat([b, turn], 1), **lavakv.cache_argument(model, plain), max_new_tokens=5, do_sample=False
    )
    assert torch.equal(a, b)
    assert ours.token_ids() == a[0, :-1].tolist()


def test_another_prompt_is_refused_with_how_to_start_fresh(tokenizer):
    model = tiny_model("llama")
    cache = CompressedCache(model, method="snapkv", budget=40)
    lavakv.generate(model, tokenizer, random_prompt(90, seed=14), cache=cache, max_new_tokens=4)
    with pytest.raises(ContinuationError, match="holds another prompt.*new CompressedCache"):
        lavakv.generate(model, tokenizer, random_prompt(120, seed=15), cache=cache, max_new_tokens=4)
    with pytest.raises(ContinuationError, match="not longer than"):
        model.generate(
            torch.tensor([random_prompt(40, seed=16)]),
            **lavakv.cache_argument(model, cache),
            max_new_tokens=3,
            do_sample=False,
        )
    with pytest.raises(ValueError, match="brings its own method"):
        lavakv.generate(model, tokenizer, [1, 2], cache=cache, method="lava")


# decode-time budget


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("method", ["lava", "snapkv", "h2o", "streamingllm", "cake", "ada-pyramidkv"])
def test_decode_budget_bounds_the_cache_and_keeps_exact_entries(kind, method):
    model = tiny_model(kind)
    prompt = random_prompt(150, seed=17)
    decode_budget, interval = 40, 8
    cache = _compressed(model, prompt, method, budget=64, decode_budget=decode_budget, decode_interval=interval)
    feed = TokenFeed(model, cache, lengths=[150])
    logits = feed.extend([[3]])
    heads = cache.num_layers * 2
    for _ in range(60):
        assert cache.stats(positions=False).held_entries / heads <= decode_budget + interval
        before = [_entries(cache, layer) for layer in range(cache.num_layers)]
        logits = feed.extend(logits.argmax(-1, keepdim=True))
        newest = len(cache.token_ids()) - 1
        for layer in range(cache.num_layers):
            for head, entries in enumerate(_entries(cache, layer)):
                assert all(torch.equal(key, before[layer][head][p]) for p, key in entries.items() if p != newest)
    stats = cache.stats(positions=False)
    assert stats.decode_evictions > 0 and stats.held_entries / heads <= decode_budget + interval
    full = CompressedCache(model, method="full")
    TokenFeed(model, full).prefill([cache.token_ids()], pad_id=0)
    for held, every in zip(_entries(cache, 0), _entries(full, 0)):
        assert all(torch.allclose(key, every[p], atol=1e-5) for p, key in held.items() if p in every)


def _entries(cache, layer) -> list[dict[int, torch.Tensor]]:
    """Per KV head of ``layer``: position -> key held."""
    return [dict(zip(positions.tolist(), keys)) for positions, keys, _ in cache.kept_kv(layer)]


@pytest.mark.parametrize("method", ["lava", "cake", "snapkv", "h2o"])
def test_a_decode_budget_above_the_length_changes_no_token(method, tokenizer):
    model = tiny_model("llama")
    prompt = random_prompt(120, seed=18)
    settings = dict(method=method, budget=48, max_new_tokens=200)
    plain = lavakv.generate(model, tokenizer, prompt, **settings)
    cache = CompressedCache(model, method=method, budget=48, decode_budget=120 + 200 + 1)
    bounded = lavakv.generate(model, tokenizer, prompt, cache=cache, max_new_tokens=200)
    assert plain.token_ids == bounded.token_ids
    assert cache.stats(positions=False).decode_evictions == 0


def test_the_bound_holds_from_the_prefill_on_and_survives_copies_and_files(tmp_path, tokenizer):
    model = tiny_model("llama")
    prompt = random_prompt(150, seed=19)
    cache = _compressed(model, prompt, "lava", budget=96, decode_budget=40, decode_interval=8)
    heads = cache.num_layers * 2
    assert cache.stats(positions=False).held_entries / heads <= 48
    assert cache.stats(positions=False).decode_evictions > 0
    feed = TokenFeed(model, cache, lengths=[150])
    logits = feed.extend([[3, 4]])
    for _ in range(20):
        logits = feed.extend(logits.argmax(-1, keepdim=True))
    path = tmp_path / "bounded.lkv"
    cache.save(path)
    history = cache.token_ids() + [5, 6]
    expected = lavakv.generate(model, tokenizer, history, cache=cache.copy(), max_new_tokens=40).token_ids
    loaded = CompressedCache.load(path, model)
    assert (loaded.decode_budget, loaded.decode_interval) == (40, 8)
    assert lavakv.generate(model, tokenizer, history, cache=loaded, max_new_tokens=40).token_ids == expected
    assert loaded.stats(positions=False).held_entries / heads <= 48


def test_many_questions_with_a_decode_budget_match_each_alone(tokenizer):
    model = tiny_model("llama")
    context = " ".join(map(str, random_prompt(130, seed=20)))
    questions = [" 5 6 7", " 8 9", " 10 11 12 13 14"]
    settings = dict(method="ada-snapkv", budget=64, decode_budget=40, decode_interval=4, max_new_tokens=30)
    many = lavakv.generate(model, tokenizer, context, questions=questions, **settings)
    for question, out in zip(questions, many):
        assert out.token_ids == lavakv.generate(model, tokenizer, context, question=question, **settings).token_ids


def test_eviction_keeps_what_the_methods_score_ranks_first():
    from lavakv.methods import Method
    from lavakv.selection import select_while_decoding

    generator = torch.Generator().manual_seed(0)
    count, dim = 40, 16
    keys, values = torch.randn(2, count, dim, generator=generator)
    positions = torch.arange(count)
    heads = [(positions, keys, values)]
    queries = torch.randn(1, 4, dim, generator=generator)
    streaming = Method.preset("streamingllm", sink=3, window=4)
    kept, window = select_while_decoding(streaming, heads, queries, 0.25, target=10, next_position=count)
    assert kept[0].tolist() == [0, 1, 2, 33, 34, 35, 36, 37, 38, 39] and window == 4
    snap = Method.preset("snapkv", window=4, kernel=1)
    kept, _ = select_while_decoding(snap, heads, queries, 0.25, target=10, next_position=count)
    attention = torch.softmax((queries[0] @ keys.T) * 0.25 + torch.triu(torch.full((4, count), -1e9), count - 3), -1)
    best = attention[:, : count - 4].mean(0).topk(6).indices.sort().values
    assert kept[0].tolist() == best.tolist() + [36, 37, 38, 39]
    kept, _ = select_while_decoding(snap, heads, queries, 0.25, target=10, next_position=count, sliding_window=20)
    assert min(kept[0].tolist()) >= count - 20


class ChatTokenizer:
    """A tokenizer with a chat template around the user's message (numbers in, numbers out)."""

    pad_token_id = 0
    eos_token_id = None
    chat_template = "1 {content} 2"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return " ".join(f"1 {m['content']} 2" for m in messages) + " 3"

    def decode(self, ids, **kwargs):
        return " ".join(str(i) for i in ids)

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(t) % 96 for t in text.split()]}


def test_questions_must_be_built_as_the_context_was(tokenizer):
    model = tiny_model("llama")
    context = " ".join(map(str, random_prompt(80, seed=21)))
    cache = lavakv.compress(model, ChatTokenizer(), context, method="snapkv", budget=40)
    assert cache.prompt_format == "chat"
    with pytest.raises(ValueError, match="compressed as a chat prompt but the question would be a plain one"):
        lavakv.generate(model, ChatTokenizer(), cache=cache, question=" 4 5", chat_template=False)
    chat = lavakv.generate(model, ChatTokenizer(), cache=cache, question=" 4 5", max_new_tokens=4)
    alone = lavakv.generate(
        model, ChatTokenizer(), context, method="snapkv", budget=40, question=" 4 5", max_new_tokens=4
    )
    assert chat.token_ids == alone.token_ids


def test_history_checks_for_model_generate_and_old_keyword():
    import warnings

    model = tiny_model("llama")
    prompt = random_prompt(80, seed=22)
    cache = CompressedCache(model, method="snapkv", budget=40)
    first = model.generate(
        torch.tensor([prompt]), **lavakv.cache_argument(model, cache), max_new_tokens=3, do_sample=False
    )
    longer = torch.cat([torch.tensor([random_prompt(83, seed=23)]), torch.tensor([[4, 5]])], dim=1)
    with pytest.raises(ContinuationError, match="holds another prompt"):
        model.generate(longer, **lavakv.cache_argument(model, cache), max_new_tokens=3, do_sample=False)
    with pytest.raises(ContinuationError, match="hold 2 sequences, but this CompressedCache holds 1"):
        model.generate(
            torch.cat([first, first]), **lavakv.cache_argument(model, cache), max_new_tokens=3, do_sample=False
        )
    assert cache.token_ids() == first[0, :-1].tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.inference_mode():
            model(input_ids=first[:, -1:], past_key_values=cache, use_cache=True)
    assert cache.token_ids() == first[0].tolist()


def test_a_loaded_cache_keeps_its_lengths_on_the_cpu(tmp_path):
    model, path = _saved(tmp_path)
    loaded = CompressedCache.load(path, model)
    assert all(layer.storage.lengths.device.type == "cpu" for layer in loaded.layers)


def test_decode_budget_is_validated():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="keeps every entry"):
        CompressedCache(model, method="full", decode_budget=64)
    with pytest.raises(ValueError, match="greater than the method's window"):
        CompressedCache(model, method="lava", budget=64, decode_budget=32)
    with pytest.raises(ValueError, match="decode_interval must be an integer >= 1"):
        CompressedCache(model, method="lava", budget=64, decode_budget=64, decode_interval=0)


def test_a_sink_that_does_not_fit_the_budget_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="sink 200 does not fit in budget 64"):
        CompressedCache(model, method="streamingllm", budget=64, sink=200)
    with pytest.raises(ValueError, match="decode_budget 40: .*sink 20 does not fit in budget 40"):
        CompressedCache(model, method="streamingllm", budget=64, sink=20, decode_budget=40)


def test_cli_checks_cache_arguments_before_loading_a_model(tmp_path, capsys):
    from lavakv.cli import main

    missing = str(tmp_path / "none.lkv")
    assert main(["generate", "--cache", missing, "--question", "Q?", "--model", "/no/such/model"]) == 2
    assert "compressed cache file not found" in capsys.readouterr().err
    assert main(["generate", "--cache", missing, "--model", "/no/such/model"]) == 2
    assert "needs at least one --question" in capsys.readouterr().err
    assert main(["generate", "--cache", missing, "--question", "Q?", "--budget", "64"]) == 2
    assert "leave out --budget" in capsys.readouterr().err
    command = ["generate", "--prompt", "hi", "--method", "full", "--decode-budget", "64", "--model", "/no/such/model"]
    assert main(command) == 2
    assert "keeps every entry" in capsys.readouterr().err
