"""The compressed KV cache: per layer and KV head, only the kept entries, really stored.

:class:`CompressedCache` is a transformers ``Cache`` that speaks lavakv's cache protocol
(:class:`lavakv.attention.CompressingCache`): during the prefill each layer's queries, keys and
values go to one :class:`~lavakv.selection.SequenceCompression` per sequence, which decides what
is kept; a layer whose selection is final is packed into :class:`~lavakv.ragged.RaggedKV` storage
(kept entries only, no padding); decode steps append to it and attend exactly over each head's
entries. Nothing outside the cache reads its tensors: :meth:`CompressedCache.stats` reports
bytes, entries, budgets and kept positions.

The cache reports the original sequence length to transformers, so RoPE positions and masks
continue from the uncompressed prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from .attention import hand_off, prepare_model, prompt_lengths
from .methods import Budget, Method, resolve_method
from .ragged import RaggedKV, Row
from .selection import PhaseClock, SequenceCompression

NOT_SUPPORTED = "lavakv's CompressedCache does not support {what}; use greedy or sampling with one sequence per prompt"


class CompressedLayer(CacheLayerMixin):
    """One layer of a :class:`CompressedCache`: its ragged storage once the prompt is compressed."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, layer_idx: int, sliding_window: int | None):
        super().__init__()
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.storage: RaggedKV | None = None
        self.prompt_length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Prefill: pass the prompt through (attention runs over it in full); decode: append to every head."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.storage is not None:
            self.storage.append(key_states, value_states)
        return key_states, value_states

    def pack(self, rows: list[list[Row]], padding: list[int], prompt_length: int) -> None:
        """Store each (sequence, head)'s kept ``(positions, keys, values)``; positions are per prompt."""
        tracked = bool(self.sliding_window)
        self.storage = RaggedKV.pack(rows, padding, append_start=prompt_length, track_positions=tracked)
        self.prompt_length = prompt_length

    def attend(self, query: torch.Tensor, scaling: float, sliding_window: int | None) -> torch.Tensor:
        """Exact attention of ``query[B, H, q, d]`` over each head's kept entries; returns ``[B, q, H, d]``."""
        return self.storage.attend(query, scaling, sliding_window)

    def get_seq_length(self) -> int:
        return self.prompt_length + (self.storage.steps if self.storage is not None else 0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError("a CompressedCache holds one prefill; build a new cache instead of resetting it")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError(NOT_SUPPORTED.format(what="beam search"))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(NOT_SUPPORTED.format(what="cropping (assisted or speculative decoding)"))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise NotImplementedError(NOT_SUPPORTED.format(what="num_return_sequences > 1 or beam search"))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError(NOT_SUPPORTED.format(what="batch selection (contrastive search)"))


@dataclass
class SequenceStats:
    """What compression did to one sequence of the batch, and what the cache holds for it now.

    ``kept_entries`` prompt entries are kept out of ``full_entries`` (``prompt_length * kv_heads``
    per layer, the window's length on a sliding-window layer); ``kv_bytes`` are the key/value bytes
    held for this sequence (kept entries plus ``appended_tokens`` decode tokens in every head) and
    ``full_kv_bytes`` what an uncompressed cache would hold; ``index_bytes`` its share of the
    bookkeeping tensors. ``kept_positions[layer][kv_head]`` lists the prompt positions kept (empty
    when ``stats(positions=False)``); ``head_budgets[layer][kv_head]`` their count and
    ``layer_budgets[layer]`` the mean per head.
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
    kept_positions: list[list[list[int]]] = field(repr=False)
    head_budgets: list[list[int]] = field(repr=False)
    layer_budgets: list[float] = field(repr=False)


@dataclass
class CacheStats:
    """The whole cache: totals over its sequences, the peak during prefill, compression time, per sequence.

    ``appended_tokens`` is the number of decode tokens appended to every sequence (each sequence
    holds that many in each KV head of each layer).

    ``kept_entry_bytes`` is what the kept prompt entries take by themselves (``kept_entries * 2 *
    head_dim * element_size``), against which ``kv_bytes`` shows the storage's own overhead (none:
    the storage is packed). ``compression_seconds`` splits what compression added to the prefill into ``score``,
    ``allocate`` and ``total`` (selection, copies and packing included).
    """

    method: str
    kv_bytes: int
    index_bytes: int
    kept_entries: int
    full_entries: int
    full_kv_bytes: int
    kept_entry_bytes: int
    appended_tokens: int
    peak_prefill_bytes: int
    compression_seconds: dict[str, float]
    sequences: list[SequenceStats]


class CompressedCache(Cache):
    """A transformers ``Cache`` that compresses the prompt during prefill with a lavakv method.

    >>> cache = CompressedCache(model, method="lava", budget=128)
    >>> model.generate(input_ids, cache=cache, max_new_tokens=32)

    ``method`` is a :class:`~lavakv.Method` or a method spec (``"lava"``, ``"lava:heads=uniform"``);
    ``options`` are routed to its parts. ``budget`` is the average number of prompt tokens kept per
    KV head per layer, window included; ``ratio`` gives it as a fraction of each prompt instead;
    a :class:`~lavakv.methods.Budget` may be passed as ``budget``. Passing a model (not only its
    config) switches it to lavakv's attention function, which wraps the model's own. ``progressive``
    (default: on for dynamic layer budgets) compresses layer by layer during the prefill so that
    peak memory stays bounded. ``score_memo`` (a dict shared by caches derived from one
    :class:`~lavakv.recording.PrefillRecord`) lets them compute each layer's scores once per
    score configuration.
    """

    def __init__(
        self,
        model_or_config,
        method: str | Method = "lava",
        budget: int | Budget | None = None,
        ratio: float | None = None,
        progressive: bool | None = None,
        score_memo: dict | None = None,
        **options,
    ):
        config = getattr(model_or_config, "config", model_or_config)
        if hasattr(model_or_config, "config"):
            prepare_model(model_or_config)
        config = config.get_text_config()
        self.method = resolve_method(method, **options)
        self.budget = check_budget(self.method, budget, ratio)
        self.progressive = self.method.progressive if progressive is None else bool(progressive)
        self.num_layers = config.num_hidden_layers
        _, layer_kwargs = get_layer_types_and_kwargs(config)
        self.sliding_windows = [kwargs.get("sliding_window") for kwargs in layer_kwargs]
        super().__init__(layers=[CompressedLayer(index, window) for index, window in enumerate(self.sliding_windows)])
        self.sequences: list[SequenceCompression] | None = None
        self.padding: list[int] = []
        self.prompt_length = 0
        self.peak_prefill_bytes = 0
        self.score_memo = score_memo
        self.clock = PhaseClock()
        self._prefilling: int | None = None

    # transformers' side

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if layer.storage is None:
            if layer_idx == 0 and self.sequences is not None:
                raise RuntimeError("this CompressedCache already holds a prompt being compressed; use a new cache")
            self._prefilling = layer_idx
        return hand_off(self, layer_idx, *layer.update(key_states, value_states))

    @property
    def batch_size(self) -> int:
        return len(self.sequences) if self.sequences is not None else -1

    # lavakv's side: the cache protocol of lavakv.attention

    def is_prefilling(self, layer_idx: int) -> bool:
        return self._prefilling == layer_idx

    def compress_layer(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
    ) -> None:
        """Hand one layer's prefill to each sequence's compression and store what is final."""
        self._prefilling = None
        with self.clock.phase("total"):
            self._compress_layer(layer_idx, query, key, value, attention_mask, scaling)

    def _compress_layer(self, layer_idx, query, key, value, attention_mask, scaling) -> None:
        batch, _, length, _ = key.shape
        if layer_idx == 0:
            self._start(prompt_lengths(attention_mask, batch, length), length)
        window = self.sliding_windows[layer_idx]
        visible_from = max(0, length - window) if window else 0
        for sample, sequence in enumerate(self.sequences):
            start = max(self.padding[sample], visible_from)
            sequence.add_layer(
                layer_idx, query[sample, :, start:], key[sample, :, start:], value[sample, :, start:], scaling
            )
        held = self.kv_bytes() + sum(s.nbytes for s in self.sequences) + key.nbytes + value.nbytes
        self.peak_prefill_bytes = max(self.peak_prefill_bytes, held)
        for index in range(layer_idx + 1):
            if self.layers[index].storage is None and all(s.is_final(index) for s in self.sequences):
                rows = [sequence.release(index) for sequence in self.sequences]
                self.layers[index].pack(rows, self.padding, self.prompt_length)

    def _start(self, lengths: list[int], length: int) -> None:
        self.prompt_length = length
        self.padding = [length - n for n in lengths]
        self.sequences = []
        for n in lengths:
            if n < 1:
                raise ValueError("a prompt of the batch has no tokens")
            visible = [min(n, window) if window else n for window in self.sliding_windows]
            tokens = n if self.budget is None else self.budget.tokens_for(n)
            window = self.method.window if self.budget is None else self.budget.window_for(self.method.window, tokens)
            memo = None if self.score_memo is None else self.score_memo.setdefault(len(self.sequences), {})
            self.sequences.append(
                SequenceCompression(self.method, n, tokens, visible, self.progressive, memo, self.clock, window=window)
            )

    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float, sliding_window: int | None) -> torch.Tensor:
        layer = self.layers[layer_idx]
        if layer.storage is None:
            raise RuntimeError(f"layer {layer_idx} has no compressed prompt; the prefill did not reach it")
        return layer.attend(query, scaling, sliding_window)

    # the read API

    def kv_bytes(self) -> int:
        """Bytes of the key and value tensors the cache holds now."""
        return sum(layer.storage.nbytes()[0] for layer in self.layers if layer.storage is not None)

    def kept_kv(self, layer_idx: int, sequence: int = 0) -> list[Row]:
        """Per KV head, the ``(positions, keys, values)`` one sequence kept in a layer (positions in its prompt).

        Copies, so that the cache's own tensors stay its own.
        """
        storage = self._storage(layer_idx)
        rows = []
        for head in range(storage.kv_heads):
            positions, keys, values = storage.row(sequence, head)
            rows.append((positions.long() - self.padding[sequence], keys.clone(), values.clone()))
        return rows

    def stats(self, positions: bool = True) -> CacheStats:
        """Totals and per-sequence figures: bytes, entries, budgets, appended tokens, kept positions.

        ``positions=False`` leaves ``kept_positions`` empty (cheaper for long prompts).
        """
        if self.sequences is None:
            raise RuntimeError("nothing has been prefilled into this cache yet")
        storages = [self._storage(index) for index in range(self.num_layers)]
        kv_bytes = index_bytes = kept_entry_bytes = 0
        for storage in storages:
            kv, index = storage.nbytes()
            kv_bytes += kv
            index_bytes += index
            kept_entry_bytes += int(storage.lengths.sum()) * 2 * storage.keys.shape[-1] * storage.keys.element_size()
        steps = storages[0].steps
        sequences = [
            self._sequence_stats(sample, sequence, storages, steps, index_bytes, positions)
            for sample, sequence in enumerate(self.sequences)
        ]
        return CacheStats(
            method=self.method.spec,
            kv_bytes=kv_bytes,
            index_bytes=index_bytes,
            kept_entries=sum(s.kept_entries for s in sequences),
            full_entries=sum(s.full_entries for s in sequences),
            full_kv_bytes=sum(s.full_kv_bytes for s in sequences),
            kept_entry_bytes=kept_entry_bytes,
            appended_tokens=steps,
            peak_prefill_bytes=self.peak_prefill_bytes,
            compression_seconds=dict(self.clock.seconds),
            sequences=sequences,
        )

    def _sequence_stats(self, sample, sequence, storages, steps, index_bytes, positions) -> SequenceStats:
        kept, head_budgets, full_kv_bytes = [], [], 0
        for layer, storage in enumerate(storages):
            head_budgets.append(storage.lengths[sample].tolist())
            if positions:
                kept.append(
                    [(storage.row(sample, h)[0] - self.padding[sample]).tolist() for h in range(storage.kv_heads)]
                )
            entry = 2 * storage.keys.shape[-1] * storage.keys.element_size()
            full_kv_bytes += (sequence.visible_lengths[layer] + steps) * storage.kv_heads * entry
        kv_heads = len(head_budgets[0])
        return SequenceStats(
            prompt_length=sequence.length,
            budget=min(sequence.budget, sequence.length),
            window=sequence.window,
            kept_entries=sum(sum(heads) for heads in head_budgets),
            full_entries=sum(sequence.visible_lengths) * kv_heads,
            appended_tokens=steps,
            kv_bytes=sum(storage.sequence_kv_bytes(sample) for storage in storages),
            full_kv_bytes=full_kv_bytes,
            index_bytes=index_bytes // len(self.sequences),
            kept_positions=kept,
            head_budgets=head_budgets,
            layer_budgets=[sum(heads) / kv_heads for heads in head_budgets],
        )

    def _storage(self, layer_idx: int) -> RaggedKV:
        storage = self.layers[layer_idx].storage
        if storage is None:
            raise RuntimeError(f"layer {layer_idx} holds no compressed prompt yet")
        return storage


def check_budget(method: Method, budget: int | Budget | None, ratio: float | None) -> Budget | None:
    """The :class:`Budget` of ``budget`` / ``ratio`` for ``method``, or a clear error.

    A compressing method needs exactly one of them; a method that keeps everything takes none.
    """
    resolved = Budget.of(budget, ratio)
    if not method.compresses:
        if resolved is not None:
            raise ValueError(f"method {method.spec!r} keeps every entry and takes no budget or ratio, got {resolved}")
        return None
    if resolved is None:
        raise ValueError(f"method {method.spec!r} needs a budget (tokens per KV head per layer) or a ratio in (0, 1]")
    resolved.check_window(method.window)
    return resolved
