"""The speed and memory benchmark: what it measures must be right even where the timings are noise."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import random_prompt, tiny_model

import lavakv
from lavakv.bench import (
    RANDOM_MODELS,
    ResidentSampler,
    check_bench_arguments,
    compression_overhead,
    format_table,
    random_model,
    ratios,
    resident_bytes,
    run_bench,
)
from lavakv.cli import main

LENGTH, BUDGETS, DECODE = 160, (48, 96), 3


@pytest.fixture(scope="module")
def measured():
    model = tiny_model("llama")
    input_ids = torch.tensor([random_prompt(LENGTH)])
    return model, run_bench(model, input_ids, budgets=BUDGETS, decode_tokens=DECODE, model_name="tiny")


def test_every_configuration_is_measured_once(measured):
    _, results = measured
    keys = [(m.method, m.budget) for m in results]
    expected = [("full", None)] + [("reference", b) for b in BUDGETS]
    expected += [(method, b) for b in BUDGETS for method in ("snapkv", "ada-snapkv", "cake", "lava")]
    assert keys == expected
    assert all(m.decode_tokens == DECODE and m.decode_ms_per_token > 0 for m in results)
    assert all(m.decode_peak_bytes >= m.kv_bytes for m in results)


def test_cache_bytes_are_the_kept_entries_bytes(measured):
    model, results = measured
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_entry = 2 * head_dim * 4
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    full = results[0]
    assert full.kv_bytes == LENGTH * kv_heads * layers * per_entry
    for m in results[1 + len(BUDGETS) :]:
        assert m.kept_entry_bytes == m.budget * kv_heads * layers * per_entry, (m.method, m.budget)
        assert m.kept_entry_bytes <= m.kv_bytes <= 1.05 * m.kept_entry_bytes, (m.method, m.budget)
        assert m.index_bytes > 0


def test_compression_time_is_split_into_its_phases(measured):
    _, results = measured
    for m in results:
        if m.method in ("full", "reference"):
            assert m.compress_seconds == 0
            continue
        assert m.compress_seconds > 0
        assert m.score_seconds > 0
        assert m.score_seconds + m.allocate_seconds <= m.compress_seconds
        assert m.compress_seconds < m.prefill_seconds


def test_ratios_are_relative_to_the_full_cache_of_the_same_run(measured):
    _, results = measured
    rows = ratios(results)
    full = results[0]
    for row, m in zip(rows, results):
        assert row["kv_bytes_fraction"] == pytest.approx(m.kv_bytes / full.kv_bytes)
        assert row["decode_speedup"] == pytest.approx(full.decode_ms_per_token / m.decode_ms_per_token)
    table = format_table(results)
    assert len(table.splitlines()) == 2 + len(results)
    assert "| lava | 96 |" in table


def test_peak_resident_memory_sees_a_transient_allocation():
    if resident_bytes() is None:
        pytest.skip("no /proc/self/statm on this system")
    with ResidentSampler() as sampler:
        with sampler.phase() as transient:
            block = torch.ones(64 * 2**20 // 4)
            held_from = transient.samples
            deadline = time.monotonic() + 10
            while transient.samples < held_from + 2 and time.monotonic() < deadline:
                time.sleep(0.001)
            del block
        assert transient.samples >= held_from + 2, "the sampler took no reading in 10 s"
        with sampler.phase() as idle:
            pass
    assert transient.added >= 48 * 2**20
    assert idle.added < 8 * 2**20


def test_a_resumed_run_skips_what_is_done():
    model = tiny_model("llama")
    input_ids = torch.tensor([random_prompt(80)])
    seen = []
    results = run_bench(
        model,
        input_ids,
        methods=["lava"],
        budgets=[48],
        decode_tokens=1,
        done=lambda m: m.method in ("full", "reference"),
        on_result=seen.append,
    )
    assert [(m.method, m.budget) for m in results] == [("lava", 48)] == [(m.method, m.budget) for m in seen]


@pytest.mark.parametrize(
    "methods, budgets, length, decode, message",
    [
        (["lava"], [32], 160, 4, "lava: budget must be greater than the window (32)"),
        (["lava"], [200], 160, 4, "must be smaller than the prompt (160 tokens)"),
        (["full"], [64], 160, 4, "does not compress"),
        (["nope"], [64], 160, 4, "nope"),
        (["lava"], [64], 160, 0, "decode tokens must be an integer >= 1, got 0"),
    ],
)
def test_bad_benchmark_requests_are_refused(methods, budgets, length, decode, message):
    with pytest.raises(ValueError, match=None) as error:
        check_bench_arguments(methods, budgets, length, decode)
    assert message in str(error.value)


def test_cli_bench_refuses_bad_input(capsys):
    assert main(["bench", "--budgets", "16", "--model", "/no/such/model"]) == 2
    assert "greater than the window" in capsys.readouterr().err
    assert main(["bench", "--budgets", "64,x"]) == 2
    assert "--budgets" in capsys.readouterr().err
    assert main(["bench", "--model", "/no/such/model"]) == 2
    assert "/no/such/model" in capsys.readouterr().err


def test_random_models_have_llama3_attention_layout():
    for config in RANDOM_MODELS.values():
        assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (32, 8, 128)
    with pytest.raises(ValueError, match="llama3-layout-1b"):
        random_model("llama3-layout-7b")


def test_compression_overhead_times_compression_alone():
    model = tiny_model("llama")
    input_ids = torch.tensor([random_prompt(LENGTH)])
    rows = compression_overhead(model, input_ids, ["snapkv", "lava"], [48, 96], repeats=2)
    assert [(row["method"], row["budget"]) for row in rows] == [
        ("snapkv", 48),
        ("snapkv", 96),
        ("lava", 48),
        ("lava", 96),
    ]
    for row in rows:
        assert row["full_prefill_seconds"] > 0 and row["repeats"] == 2
        assert 0 < row["score_seconds"] and row["score_seconds"] + row["allocate_seconds"] <= row["compress_seconds"]
        assert row["share_of_full_prefill"] == pytest.approx(row["compress_seconds"] / row["full_prefill_seconds"])


def test_replayed_progressive_compression_keeps_what_a_compressing_prefill_keeps():
    from lavakv import CompressedCache
    from lavakv.recording import PrefillRecord

    model = tiny_model("llama")
    input_ids = torch.tensor([random_prompt(LENGTH)])
    record = PrefillRecord(model, input_ids)
    live = CompressedCache(model, method="lava", budget=48)
    with torch.inference_mode():
        model(input_ids=input_ids, **lavakv.cache_argument(model, live), use_cache=True)
    replayed = record.compress("lava", 48, progressive=True, reuse_scores=False)
    assert replayed.clock.seconds["score"] > 0
    assert replayed.stats().sequences[0].kept_positions == live.stats().sequences[0].kept_positions


def test_memory_sizes_are_parsed_with_their_units_and_bad_ones_refused():
    from lavakv.bench import parse_memory

    assert parse_memory("80GiB") == 80 * 2**30
    assert parse_memory("141 GB") == 141 * 10**9
    assert parse_memory("1.5mib") == int(1.5 * 2**20)
    for bad in ("80", "80 parsecs", "-1GiB", "0GiB", ""):
        with pytest.raises(ValueError, match="memory size must"):
            parse_memory(bad)


def test_capacity_counts_sequences_from_measured_bytes_and_compressed_caches_fit_more():
    from lavakv.bench import measure_capacity, model_bytes, sequences_that_fit, token_kv_bytes

    assert sequences_that_fit(100, 40, 10, 30) == 4
    assert sequences_that_fit(100, 40, 10, 61) == 0
    model = tiny_model("llama")
    ids = torch.tensor([random_prompt(400)])
    memory = model_bytes(model) + 64 * 2**20
    results = measure_capacity(model, ids, memory, ["snapkv", "lava"], [64], generate_tokens=16)
    by_method = {r.method: r for r in results}
    full, lava = by_method["full"], by_method["lava"]
    per_token = token_kv_bytes(model)
    assert per_token == 4 * 2 * 2 * 16 * 4
    assert full.sequence_bytes == (400 + 16) * per_token
    assert lava.sequence_bytes >= (64 + 16) * per_token and lava.sequence_bytes < full.sequence_bytes / 4
    for r in results:
        assert r.sequences == sequences_that_fit(memory, r.model_bytes, r.sequence_bytes, r.prefill_peak_bytes)
    assert lava.sequences > full.sequences


def test_cli_bench_capacity_prints_the_table_and_refuses_a_bad_size(capsys):
    assert main(["bench", "--capacity", "lots"]) == 2
    assert "memory size must be a number with a unit" in capsys.readouterr().err
