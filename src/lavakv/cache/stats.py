"""What a compressed cache holds, read through its read API: :class:`CacheStats` and :class:`SequenceStats`."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers.cache_utils import Cache

from ..ragged import RaggedKV


@dataclass
class SequenceStats:
    """What compression did to one sequence of the batch, and what the cache holds for it now.

    ``kept_entries`` prompt entries are kept out of ``full_entries`` (``prompt_length * kv_heads``
    per layer, the window's length on a sliding-window layer); ``kv_bytes`` are the key/value bytes
    held for this sequence (kept entries plus ``appended_tokens`` decode tokens in every head) and
    ``full_kv_bytes`` what an uncompressed cache would hold; ``index_bytes`` its share of the
    bookkeeping tensors (the storage's index tensors and the decode attention backend's state,
    a padded copy included). ``kept_positions[layer][kv_head]`` lists the prompt positions kept (empty
    when ``stats(positions=False)``); ``head_budgets[layer][kv_head]`` their count and
    ``layer_budgets[layer]`` the mean per head. ``appended_tokens`` counts the tokens fed after
    the prompt (a question, generated tokens); ``held_entries`` every entry held, prompt and
    appended (with a ``decode_budget`` some of both are evicted).
    """

    prompt_length: int
    budget: int
    window: int
    kept_entries: int
    full_entries: int
    appended_tokens: int
    kv_bytes: int
    full_kv_bytes: int
    index_bytes: int
    held_entries: int
    kept_positions: list[list[list[int]]] = field(repr=False)
    head_budgets: list[list[int]] = field(repr=False)
    layer_budgets: list[float] = field(repr=False)


@dataclass
class CacheStats:
    """The whole cache: totals over its sequences, the peak during prefill, compression time, per sequence.

    ``appended_tokens`` is the most tokens fed after any sequence's prompt; ``held_entries`` every
    entry the cache holds; ``decode_evictions`` how many times a layer was compressed while
    decoding (``decode_budget``).

    ``kept_entry_bytes`` is what the kept prompt entries take by themselves (``kept_entries * 2 *
    head_dim * element_size``), against which ``kv_bytes`` shows the storage's own overhead (none:
    the storage is packed). ``reserved_kv_bytes`` is memory held on top of ``kv_bytes``: decode
    slots the append buffers have reserved but not used yet (they grow geometrically);
    ``append_seconds`` the time spent appending decode tokens to them. ``compression_seconds``
    splits what compression added to the prefill into ``score``, ``allocate`` and ``total``
    (selection, copies and packing included), and gives the decode budget's evictions as ``decode``.
    ``attention_paths`` names the decode attention the layers run (see :func:`lavakv.backends.resolve_backend`).
    """

    method: str
    kv_bytes: int
    index_bytes: int
    kept_entries: int
    full_entries: int
    full_kv_bytes: int
    kept_entry_bytes: int
    reserved_kv_bytes: int
    append_seconds: float
    appended_tokens: int
    held_entries: int
    peak_prefill_bytes: int
    compression_seconds: dict[str, float]
    decode_evictions: int
    attention_paths: list[str]
    sequences: list[SequenceStats]


@dataclass(frozen=True)
class SequenceInfo:
    """What the prefill decided for one sequence: prompt length, budget and window, visible positions per layer."""

    length: int
    budget: int
    window: int
    visible_lengths: tuple[int, ...]


def cache_stats(cache: Cache, positions: bool = True) -> CacheStats:
    """Totals and per-sequence figures of a :class:`~lavakv.cache.CompressedCache` (see its ``stats``)."""
    storages = [cache.layer_storage(index) for index in range(cache.num_layers)]
    kv_bytes = index_bytes = kept_entry_bytes = 0
    bounds = cache.prompt_bounds()
    prompt_counts = [storage.count_before(bounds) for storage in storages]
    for layer, storage, counts in zip(cache.layers, storages, prompt_counts):
        kv, index = storage.nbytes()
        kv_bytes += kv
        index_bytes += index + layer.backend_bytes()
        kept_entry_bytes += int(counts.sum()) * 2 * storage.keys.shape[-1] * storage.keys.element_size()
    appended = [cache.get_seq_length() - bound for bound in bounds]
    sequences = [
        _sequence_stats(sample, info, storages, prompt_counts, bounds[sample], cache.padding[sample], appended[sample])
        for sample, info in enumerate(cache.infos)
    ]
    for sample, sequence in enumerate(sequences):
        sequence.index_bytes = index_bytes // len(sequences)
        if positions:
            sequence.kept_positions = _kept_positions(storages, sample, bounds[sample], cache.padding[sample])
    return CacheStats(
        method=cache.method.spec,
        kv_bytes=kv_bytes,
        index_bytes=index_bytes,
        kept_entries=sum(s.kept_entries for s in sequences),
        full_entries=sum(s.full_entries for s in sequences),
        full_kv_bytes=sum(s.full_kv_bytes for s in sequences),
        kept_entry_bytes=kept_entry_bytes,
        reserved_kv_bytes=sum(storage.reserved_bytes() for storage in storages),
        append_seconds=sum(layer.append_seconds for layer in cache.layers),
        appended_tokens=max(s.appended_tokens for s in sequences),
        held_entries=sum(s.held_entries for s in sequences),
        peak_prefill_bytes=cache.peak_prefill_bytes,
        compression_seconds=dict(cache.clock.seconds),
        decode_evictions=cache.decode_evictions,
        attention_paths=sorted({layer.attention_path or "unset" for layer in cache.layers}),
        sequences=sequences,
    )


def _sequence_stats(
    sample: int,
    info: SequenceInfo,
    storages: list[RaggedKV],
    prompt_counts: list,
    bound: int,
    padding: int,
    appended: int,
) -> SequenceStats:
    head_budgets, full_kv_bytes, held = [], 0, 0
    for layer, (storage, counts) in enumerate(zip(storages, prompt_counts)):
        head_budgets.append(counts[sample].tolist())
        held += int(storage.row_lengths()[sample].sum())
        entry = 2 * storage.keys.shape[-1] * storage.keys.element_size()
        full_kv_bytes += (info.visible_lengths[layer] + appended) * storage.kv_heads * entry
    kv_heads = len(head_budgets[0])
    return SequenceStats(
        prompt_length=info.length,
        budget=min(info.budget, info.length),
        window=info.window,
        kept_entries=sum(sum(heads) for heads in head_budgets),
        full_entries=sum(info.visible_lengths) * kv_heads,
        appended_tokens=appended,
        kv_bytes=sum(storage.sequence_kv_bytes(sample) for storage in storages),
        full_kv_bytes=full_kv_bytes,
        index_bytes=0,
        held_entries=held,
        kept_positions=[],
        head_budgets=head_budgets,
        layer_budgets=[sum(heads) / kv_heads for heads in head_budgets],
    )


def _kept_positions(storages: list[RaggedKV], sample: int, bound: int, padding: int) -> list[list[list[int]]]:
    """``[layer][kv_head]`` prompt positions one sequence keeps, counted from its own prompt start."""
    kept = []
    for storage in storages:
        rows = [storage.row(sample, head)[0] for head in range(storage.kv_heads)]
        kept.append([(row[row < bound] - padding).tolist() for row in rows])
    return kept
