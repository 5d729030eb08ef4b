"""The ragged storage on its own, against a dense reference, without any model."""

from __future__ import annotations

import math

import pytest
import torch

from lavakv import backends
from lavakv.backends import create_backend, width_buckets
from lavakv.ragged import RaggedKV

DIM = 8


def _rows(lengths: list[list[int]], length: int, seed: int = 0):
    """Random rows: for each (sequence, head) a sorted subset of ``length`` positions with keys and values."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for heads in lengths:
        row = []
        for count in heads:
            positions = torch.randperm(length, generator=generator)[:count].sort().values
            keys, values = torch.randn(2, count, DIM, generator=generator)
            row.append((positions, keys, values))
        rows.append(row)
    return rows


def _dense_reference(rows, appended_keys, appended_values, query, scaling, append_start, sliding_window=None):
    """Per query head: softmax over its KV head's kept entries and the appended tokens it may see."""
    batch, heads, q_len, _ = query.shape
    kv_heads = len(rows[0])
    group = heads // kv_heads
    steps = appended_keys.shape[2]
    out = torch.zeros(batch, q_len, heads, DIM)
    for b in range(batch):
        for h in range(heads):
            positions, keys, values = rows[b][h // group]
            keys = torch.cat([keys, appended_keys[b, h // group]])
            values = torch.cat([values, appended_values[b, h // group]])
            all_positions = torch.cat([positions, append_start + torch.arange(steps)])
            for i in range(q_len):
                query_position = append_start + steps - q_len + i
                visible = all_positions <= query_position
                if sliding_window:
                    visible &= query_position - all_positions < sliding_window
                logits = (keys @ query[b, h, i]) * scaling
                logits = logits.masked_fill(~visible, -math.inf)
                out[b, i, h] = torch.softmax(logits, dim=0) @ values
    return out


@pytest.mark.parametrize(
    "lengths",
    [
        [[5, 5], [5, 5]],
        [[3, 7], [6, 1]],
        [[9, 2, 4]],
    ],
)
@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("group", [1, 2])
def test_attention_over_ragged_rows_equals_the_dense_reference(lengths, q_len, group, path):
    rows = _rows(lengths, length=20)
    batch, kv_heads = len(lengths), len(lengths[0])
    storage = RaggedKV.pack(rows, [0] * batch, append_start=20)
    generator = torch.Generator().manual_seed(7)
    appended_keys = torch.randn(batch, kv_heads, q_len + 2, DIM, generator=generator)
    appended_values = torch.randn(batch, kv_heads, q_len + 2, DIM, generator=generator)
    storage.append(appended_keys[:, :, :2], appended_values[:, :, :2])
    storage.append(appended_keys[:, :, 2:], appended_values[:, :, 2:])
    query = torch.randn(batch, kv_heads * group, q_len, DIM, generator=generator)
    got = create_backend(path, storage).attend(query, DIM**-0.5)
    expected = _dense_reference(rows, appended_keys, appended_values, query, DIM**-0.5, append_start=20)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert storage.steps == q_len + 2


@pytest.mark.parametrize("q_len", [1, 2])
def test_sliding_window_hides_entries_too_far_back(q_len, path):
    rows = _rows([[6, 3]], length=30, seed=2)
    storage = RaggedKV.pack(rows, [0], append_start=30, track_positions=True)
    generator = torch.Generator().manual_seed(3)
    appended_keys = torch.randn(1, 2, q_len, DIM, generator=generator)
    appended_values = torch.randn(1, 2, q_len, DIM, generator=generator)
    storage.append(appended_keys, appended_values)
    query = torch.randn(1, 2, q_len, DIM, generator=generator)
    got = create_backend(path, storage).attend(query, 0.5, sliding_window=12)
    expected = _dense_reference(rows, appended_keys, appended_values, query, 0.5, 30, sliding_window=12)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_layout_lengths_indptr_and_rows():
    rows = _rows([[3, 7], [6, 1]], length=20)
    storage = RaggedKV.pack(rows, [4, 0], append_start=24)
    assert storage.lengths.tolist() == [[3, 7], [6, 1]]
    assert storage.indptr.tolist() == [0, 3, 10, 16, 17]
    assert storage.keys.shape == (17, DIM)
    for b in range(2):
        for h in range(2):
            positions, keys, values = storage.row(b, h)
            assert torch.equal(positions.long(), rows[b][h][0] + (4 if b == 0 else 0))
            assert torch.equal(keys, rows[b][h][1]) and torch.equal(values, rows[b][h][2])


def test_equal_rows_are_read_as_a_view_and_ragged_ones_padded():
    equal = RaggedKV.pack(_rows([[4, 4]], length=10), [0], append_start=10)
    assert equal.gather_index is None and equal.valid is None
    assert equal.padded(equal.keys).data_ptr() == equal.keys.data_ptr()
    ragged = RaggedKV.pack(_rows([[2, 5]], length=10), [0], append_start=10)
    padded = ragged.padded(ragged.keys)
    assert padded.shape == (1, 2, 5, DIM)
    assert ragged.valid[0, :, 0].tolist() == [[True, True, False, False, False], [True] * 5]


def test_bytes_are_the_kept_entries_and_the_appended_tail():
    storage = RaggedKV.pack(_rows([[3, 7], [6, 1]], length=20), [0, 0], append_start=20)
    per_entry = 2 * DIM * 4
    assert storage.nbytes()[0] == 17 * per_entry
    storage.append(torch.zeros(2, 2, 3, DIM), torch.zeros(2, 2, 3, DIM))
    assert storage.nbytes()[0] == (17 + 2 * 2 * 3) * per_entry
    assert storage.sequence_kv_bytes(0) == (10 + 2 * 3) * per_entry
    assert storage.sequence_kv_bytes(1) == (7 + 2 * 3) * per_entry
    assert storage.nbytes()[1] > 0


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="lengths must be"):
        positions = torch.zeros(3, dtype=torch.int32)
        RaggedKV(torch.zeros(3, DIM), torch.zeros(3, DIM), positions, torch.tensor([[1, 1]]), 3)
    storage = RaggedKV.pack(_rows([[2, 5]], length=10), [0], append_start=10)
    storage.append(torch.zeros(1, 2, 2, DIM), torch.zeros(1, 2, 2, DIM))
    for name in ("gather", "packed", "padded"):
        with pytest.raises(RuntimeError, match="track_positions"):
            create_backend(name, storage).attend(torch.zeros(1, 2, 2, DIM), 1.0, sliding_window=4)


def _with_tail(lengths, steps, length=20, seed=0, track=False):
    """A packed storage plus ``steps`` appended tokens, and its rows with the tail written out."""
    rows = _rows(lengths, length=length, seed=seed)
    storage = RaggedKV.pack(rows, [0] * len(lengths), append_start=length, track_positions=track)
    generator = torch.Generator().manual_seed(seed + 100)
    tail_keys = torch.randn(len(lengths), len(lengths[0]), steps, DIM, generator=generator)
    tail_values = torch.randn(len(lengths), len(lengths[0]), steps, DIM, generator=generator)
    if steps:
        storage.append(tail_keys, tail_values)
    full = [
        [
            (
                torch.cat([p, length + torch.arange(steps)]),
                torch.cat([k, tail_keys[b, h]]),
                torch.cat([v, tail_values[b, h]]),
            )
            for h, (p, k, v) in enumerate(heads)
        ]
        for b, heads in enumerate(rows)
    ]
    return storage, full


def _dense_reference_rows(full, query, scaling, next_position, sliding_window=None):
    batch, heads, q_len, _ = query.shape
    kv_heads = len(full[0])
    group = heads // kv_heads
    out = torch.zeros(batch, q_len, heads, DIM)
    for b in range(batch):
        for h in range(heads):
            positions, keys, values = full[b][h // group]
            for i in range(q_len):
                query_position = next_position - q_len + i
                visible = positions <= query_position
                if sliding_window:
                    visible &= query_position - positions < sliding_window
                logits = ((keys @ query[b, h, i]) * scaling).masked_fill(~visible, -math.inf)
                out[b, i, h] = torch.softmax(logits, dim=0) @ values
    return out


@pytest.mark.parametrize("steps", [0, 3])
def test_fold_moves_the_tail_into_the_rows_and_attention_is_unchanged(steps, path):
    storage, full = _with_tail([[3, 7], [6, 1]], steps, track=True)
    folded = storage.fold()
    assert folded.steps == 0 and folded.append_start == 20 + steps
    assert folded.lengths.tolist() == [[3 + steps, 7 + steps], [6 + steps, 1 + steps]]
    for b in range(2):
        for h in range(2):
            positions, keys, values = folded.row(b, h)
            assert torch.equal(positions.long(), full[b][h][0]) and torch.equal(keys, full[b][h][1])
    query = torch.randn(2, 4, 1, DIM, generator=torch.Generator().manual_seed(1))
    folded.append(torch.zeros(2, 2, 1, DIM), torch.zeros(2, 2, 1, DIM))
    storage.append(torch.zeros(2, 2, 1, DIM), torch.zeros(2, 2, 1, DIM))
    torch.testing.assert_close(
        create_backend(path, folded).attend(query, 0.3, 9),
        create_backend("gather", storage).attend(query, 0.3, 9),
        rtol=1e-5,
        atol=1e-6,
    )


def test_concat_aligns_timelines_and_keeps_every_row(path):
    first, first_rows = _with_tail([[3, 7]], 2, length=20, seed=1)
    second, second_rows = _with_tail([[5, 2], [1, 4]], 4, length=12, seed=2)
    joined = RaggedKV.concat([first, second])
    assert joined.batch == 3 and joined.append_start + joined.steps == 22
    shifted = [[(p + 6, k, v) for p, k, v in heads] for heads in second_rows]
    full = first_rows + shifted
    for b in range(3):
        for h in range(2):
            positions, keys, _ = joined.full_row(b, h)
            assert torch.equal(positions.long(), full[b][h][0]) and torch.equal(keys, full[b][h][1])
    query = torch.randn(3, 2, 1, DIM, generator=torch.Generator().manual_seed(2))
    new_keys = torch.randn(3, 2, 1, DIM, generator=torch.Generator().manual_seed(3))
    joined.append(new_keys, new_keys)
    grown = [
        [
            (torch.cat([p, torch.tensor([22])]), torch.cat([k, new_keys[b, h]]), torch.cat([v, new_keys[b, h]]))
            for h, (p, k, v) in enumerate(heads)
        ]
        for b, heads in enumerate(full)
    ]
    expected = _dense_reference_rows(grown, query, 0.4, 23)
    torch.testing.assert_close(create_backend(path, joined).attend(query, 0.4), expected, rtol=1e-5, atol=1e-5)
    same = RaggedKV.concat([first, first.clone()])
    assert same.steps == 2 and same.batch == 2


def test_keep_select_repeat_and_clone():
    storage, full = _with_tail([[3, 7], [6, 1]], 2)
    chosen = [[torch.tensor([0, 4]), torch.tensor([1, 2, 8])], [torch.tensor([7]), torch.tensor([0, 1, 2])]]
    kept = storage.keep(chosen)
    assert kept.lengths.tolist() == [[2, 3], [1, 3]] and kept.steps == 0
    for b in range(2):
        for h in range(2):
            positions, keys, _ = kept.row(b, h)
            assert torch.equal(positions.long(), full[b][h][0][chosen[b][h]])
            assert torch.equal(keys, full[b][h][1][chosen[b][h]])
    picked = storage.select([1, 1, 0])
    assert picked.lengths.tolist() == [[6, 1], [6, 1], [3, 7]]
    assert torch.equal(picked.full_row(0, 0)[1], storage.full_row(1, 0)[1])
    assert torch.equal(storage.repeat_interleave(2).lengths, torch.tensor([[3, 7], [3, 7], [6, 1], [6, 1]]))
    copy = storage.clone()
    copy.append(torch.ones(2, 2, 1, DIM), torch.ones(2, 2, 1, DIM))
    assert storage.steps == 2 and copy.steps == 3
    assert storage.count_before([21, 0]).tolist() == [[4, 8], [0, 0]]
    restored = RaggedKV.from_tensors(storage.tensors(), storage.append_start, False)
    assert torch.equal(restored.full_row(1, 0)[1], storage.full_row(1, 0)[1])
    with pytest.raises(ValueError, match="incomplete"):
        RaggedKV.from_tensors({"keys": storage.keys}, 20, False)
    with pytest.raises(IndexError, match="outside"):
        storage.select([2])


def test_appends_grow_a_buffer_geometrically_and_read_it_as_a_view():
    storage = RaggedKV.pack(_rows([[3, 5]], length=10), [0], append_start=10)
    generator = torch.Generator().manual_seed(4)
    steps = torch.randn(300, 1, 2, 1, DIM, generator=generator)
    buffers = set()
    for step in steps:
        storage.append(step, -step)
        buffers.add(storage._tail_keys.data_ptr())
        assert storage.appended_keys.data_ptr() == storage._tail_keys.data_ptr()
    assert storage.steps == 300
    assert len(buffers) <= 1 + math.ceil(math.log2(300 / 64))
    expected = torch.cat(list(steps), dim=2)
    assert torch.equal(storage.appended_keys, expected) and torch.equal(storage.appended_values, -expected)
    capacity = storage._tail_keys.shape[2]
    assert storage.reserved_bytes() == (capacity - 300) * 2 * 2 * DIM * 4
    used, _ = storage.nbytes()
    assert used == (8 + 2 * 300) * 2 * DIM * 4


def test_a_buffer_made_in_inference_mode_takes_appends_outside_it():
    storage = RaggedKV.pack(_rows([[2, 2]], length=6), [0], append_start=6)
    with torch.inference_mode():
        storage.append(torch.ones(1, 2, 1, DIM), torch.ones(1, 2, 1, DIM))
    with torch.no_grad():
        storage.append(torch.zeros(1, 2, 1, DIM), torch.zeros(1, 2, 1, DIM))
    assert storage.steps == 2 and storage.appended_keys[0, 0, :, 0].tolist() == [1.0, 0.0]


def test_flex_block_mask_is_built_once_per_query_shape(path):
    storage, full = _with_tail([[3, 7], [6, 1]], 2)
    query = torch.randn(2, 4, 1, DIM, generator=torch.Generator().manual_seed(5))
    backend = create_backend(path, storage)
    first = backend.attend(query, 0.3)
    storage.append(torch.ones(2, 2, 1, DIM), torch.ones(2, 2, 1, DIM))
    second = backend.attend(query, 0.3)
    assert len(getattr(backend, "_block_masks", {})) == (1 if path == "flex" else 0)
    expected = [_dense_reference_rows(full, query, 0.3, 22)]
    full = [
        [
            (torch.cat([p, torch.tensor([22])]), torch.cat([k, torch.ones(1, DIM)]), torch.cat([v, torch.ones(1, DIM)]))
            for p, k, v in heads
        ]
        for heads in full
    ]
    expected.append(_dense_reference_rows(full, query, 0.3, 23))
    torch.testing.assert_close(first, expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, expected[1], rtol=1e-5, atol=1e-5)


def test_an_unknown_attention_backend_is_refused():
    storage, _ = _with_tail([[3, 7]], 1)
    with pytest.raises(ValueError, match="unknown attention backend 'dense'.*gather, packed, padded, flex"):
        create_backend("dense", storage)


@pytest.mark.parametrize("path", ["gather", "packed", "padded", "bucketed"])
def test_ragged_rows_with_a_tail_attend_exactly_across_buffer_growth(path, monkeypatch):
    monkeypatch.setattr(backends, "BUCKET_CALL_ENTRIES", 1)
    rows = _rows([[3, 7], [6, 1]], length=12, seed=5)
    storage = RaggedKV.pack(rows, [0, 0], append_start=12)
    backend = create_backend(path, storage)
    generator = torch.Generator().manual_seed(6)
    appended = torch.randn(2, 2, 2, 150, DIM, generator=generator)
    for step in range(150):
        storage.append(appended[0, :, :, step : step + 1], appended[1, :, :, step : step + 1])
        if step + 1 in (1, 64, 65, 130, 150):
            query = torch.randn(2, 4, 1, DIM, generator=generator)
            expected = _dense_reference(
                rows, appended[0, :, :, : step + 1], appended[1, :, :, : step + 1], query, 0.3, append_start=12
            )
            torch.testing.assert_close(backend.attend(query, 0.3), expected)
    assert storage.appended_keys.data_ptr() == storage._tail_keys.data_ptr()
    for sequence, heads in enumerate(rows):
        for head, (positions, keys, values) in enumerate(heads):
            held_positions, held_keys, held_values = storage.row(sequence, head)
            assert torch.equal(held_positions, positions.to(torch.int32))
            assert torch.equal(held_keys, keys) and torch.equal(held_values, values)
    used, _ = storage.nbytes()
    assert used == (17 + 4 * 150) * 2 * DIM * 4


def test_width_buckets_group_rows_of_similar_length_and_cover_every_row_once():
    lengths = [900, 100, 120, 880, 110, 95]
    groups = width_buckets(lengths, call_entries=200)
    assert groups == [[1, 2, 4, 5], [0, 3]]
    assert width_buckets(lengths, call_entries=10**6) == [list(range(6))]
    assert sorted(u for g in width_buckets(lengths, call_entries=0) for u in g) == list(range(6))


def test_bucketed_attention_counts_its_copies_and_serves_prompt_queries(monkeypatch):
    monkeypatch.setattr(backends, "BUCKET_CALL_ENTRIES", 1)
    rows = _rows([[2, 9], [9, 3]], length=12, seed=8)
    storage = RaggedKV.pack(rows, [0, 0], append_start=12)
    backend = create_backend("bucketed", storage)
    generator = torch.Generator().manual_seed(9)
    appended = torch.randn(2, 2, 2, 4, DIM, generator=generator)
    storage.append(appended[0, :, :, :3], appended[1, :, :, :3])
    query = torch.randn(2, 2, 3, DIM, generator=generator)
    expected = _dense_reference(rows, appended[0, :, :, :3], appended[1, :, :, :3], query, 0.4, append_start=12)
    torch.testing.assert_close(backend.attend(query, 0.4), expected)
    slot_index_bytes = 2 * 8 * storage.batch * storage.kv_heads * storage.longest
    assert backend.nbytes() <= slot_index_bytes, "a prompt query may hold slot indices, never a copy of the rows"
    storage.append(appended[0, :, :, 3:], appended[1, :, :, 3:])
    query = torch.randn(2, 2, 1, DIM, generator=generator)
    expected = _dense_reference(rows, appended[0], appended[1], query, 0.4, append_start=12)
    torch.testing.assert_close(backend.attend(query, 0.4), expected)
    assert len(backend._buckets) == 2
    assert backend.nbytes() >= 2 * (2 * 3 + 2 * 9) * DIM * 4


def test_packed_reads_one_sequences_uneven_rows_in_place_and_matches_attention_exactly():
    rows = _rows([[2, 9, 5]], length=12, seed=8)
    storage = RaggedKV.pack(rows, [0], append_start=12)
    backend = create_backend("packed", storage)
    generator = torch.Generator().manual_seed(9)
    appended = torch.randn(2, 1, 3, 40, DIM, generator=generator)
    keys_before = storage.keys.data_ptr()
    for step in range(40):
        storage.append(appended[0, :, :, step : step + 1], appended[1, :, :, step : step + 1])
        query = torch.randn(1, 6, 1, DIM, generator=generator)
        expected = _dense_reference(
            rows, appended[0, :, :, : step + 1], appended[1, :, :, : step + 1], query, 0.3, append_start=12
        )
        torch.testing.assert_close(backend.attend(query, 0.3), expected)
    assert storage.keys.data_ptr() == keys_before
    assert backend.nbytes() == 6 * 16 * 4
