"""The compressed KV cache: per layer and KV head, only the kept entries, really stored.

:class:`CompressedCache` is a transformers ``Cache`` that speaks lavakv's cache protocol
(:class:`lavakv.attention.CompressingCache`): during the prefill each layer's queries, keys and
values go to :class:`~lavakv.selection.GroupCompression` (one per run of equal prompt lengths:
the whole batch when nothing is padded), which decides what is kept in tensor operations; a
layer whose selection is final is packed into :class:`~lavakv.ragged.RaggedKV` storage (kept
entries only, no padding); decode steps append to it and attend exactly over each head's
entries. Nothing outside the cache reads its tensors: :meth:`CompressedCache.stats` reports
bytes, entries, budgets and kept positions.

The cache reports the original sequence length to transformers, so RoPE positions and masks
continue from the uncompressed prompt. It remembers the token ids it has been fed (prompt and
generated), so that a later call can continue the conversation through it and a call about
another prompt is refused instead of answered from the wrong context. :meth:`CompressedCache.copy`
gives an independent cache, :meth:`CompressedCache.stack` joins caches into one batch,
:meth:`CompressedCache.save` and :meth:`CompressedCache.load` keep a compressed context on disk,
and ``decode_budget`` keeps a long generation's cache bounded by evicting while decoding.
"""

from __future__ import annotations

import copy as _copy
import logging
import os
import time
import weakref
from dataclasses import asdict, dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from .attention import hand_off, prepare_model, prompt_lengths
from .backends import BACKENDS, AttentionBackend, create_backend, resolve_backend
from .cachefile import check_identity, ids_hash, model_identity, read_file, weights_fingerprint, write_file
from .methods import Budget, Method, resolve_method
from .methods.registry import round_to_total
from .ragged import RaggedKV, Row
from .selection import GroupCompression, PhaseClock, select_while_decoding

logger = logging.getLogger(__name__)

NOT_SUPPORTED = "lavakv's CompressedCache does not support {what}; use greedy or sampling with one sequence per prompt"


class CompressedLayer(CacheLayerMixin):
    """One layer of a :class:`CompressedCache`: its ragged storage once the prompt is compressed."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, layer_idx: int, sliding_window: int | None, attention_path: str = "auto"):
        super().__init__()
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.storage: RaggedKV | None = None
        self.append_seconds = 0.0
        self.requested_path = attention_path
        self.attention_path: str | None = None
        self.backend: AttentionBackend | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.attention_path = resolve_backend(self.requested_path, self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Prefill: pass the prompt through (attention runs over it in full); decode: append to every head."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.storage is not None:
            start = time.perf_counter()
            self.storage.append(key_states, value_states)
            self.append_seconds += time.perf_counter() - start
        return key_states, value_states

    def pack(self, groups: list[tuple], padding: list[int], prompt_length: int) -> None:
        """Store each compression group's packed ``(positions, keys, values, lengths)``, in batch order.

        Positions count from each sequence's own prompt start and are shifted by its left ``padding``
        (one prompt length, so one padding, per group).
        """
        tracked = bool(self.sliding_window)
        positions, first = [], 0
        for group_positions, _, _, lengths in groups:
            positions.append(group_positions + padding[first])
            first += lengths.shape[0]
        keys, values = (torch.cat([group[i] for group in groups]) if len(groups) > 1 else groups[0][i] for i in (1, 2))
        self.storage = RaggedKV(
            keys,
            values,
            torch.cat(positions).to(torch.int32),
            torch.cat([group[3] for group in groups]),
            append_start=prompt_length,
            track_positions=tracked,
        )

    def attend(self, query: torch.Tensor, scaling: float, sliding_window: int | None) -> torch.Tensor:
        """Exact attention of ``query[B, H, q, d]`` over each head's kept entries; returns ``[B, q, H, d]``."""
        if self.attention_path is None:
            self.attention_path = resolve_backend(self.requested_path, query.device)
        if self.backend is None or self.backend.storage is not self.storage or self.backend.name != self.attention_path:
            self.backend = create_backend(self.attention_path, self.storage)
        return self.backend.attend(query, scaling, sliding_window)

    def backend_bytes(self) -> int:
        """Bytes the decode attention backend holds for the current storage (a padded copy, masks)."""
        if self.backend is None or self.backend.storage is not self.storage:
            return 0
        return self.backend.nbytes()

    def get_seq_length(self) -> int:
        return 0 if self.storage is None else self.storage.append_start + self.storage.steps

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
        if self.storage is not None:
            self.storage = self.storage.repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.storage is not None:
            self.storage = self.storage.select(torch.as_tensor(indices).tolist())


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


class ContinuationError(ValueError):
    """Inputs that do not continue what a :class:`CompressedCache` holds."""


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

    ``decode_budget`` (tokens per KV head per layer on average, off by default) bounds the cache
    while generating: whenever a layer holds ``decode_interval`` entries per head beyond its share
    of that budget, it is compressed back to it over prompt and generated entries alike, scored by
    the method's own score from the latest generated queries and split among heads by its own head
    allocation; each layer's share is the one the prefill gave it. The cache then never holds more
    than ``decode_budget + decode_interval`` entries per head on average.
    """

    def __init__(
        self,
        model_or_config,
        method: str | Method = "lava",
        budget: int | Budget | None = None,
        ratio: float | None = None,
        progressive: bool | None = None,
        score_memo: dict | None = None,
        decode_budget: int | None = None,
        decode_interval: int = 32,
        attention_path: str = "auto",
        **options,
    ):
        if attention_path != "auto" and attention_path not in BACKENDS:
            raise ValueError(f"attention_path must be 'auto' or one of {', '.join(BACKENDS)}, got {attention_path!r}")
        self.attention_path = attention_path
        config = getattr(model_or_config, "config", model_or_config)
        self.weights_fingerprint: str | None = None
        self._model = None
        if hasattr(model_or_config, "config"):
            prepare_model(model_or_config)
            self._model = weakref.ref(model_or_config)
        self.model_config = config
        config = config.get_text_config()
        self.method = resolve_method(method, **options)
        self.budget = check_budget(self.method, budget, ratio)
        self.decode_budget, self.decode_interval = check_decode_budget(self.method, decode_budget, decode_interval)
        self.progressive = self.method.progressive if progressive is None else bool(progressive)
        self.num_layers = config.num_hidden_layers
        _, layer_kwargs = get_layer_types_and_kwargs(config)
        self.sliding_windows = [kwargs.get("sliding_window") for kwargs in layer_kwargs]
        super().__init__(
            layers=[CompressedLayer(index, window, attention_path) for index, window in enumerate(self.sliding_windows)]
        )
        self.groups: list[GroupCompression] | None = None
        self.infos: list[SequenceInfo] | None = None
        self.padding: list[int] = []
        self.prompt_length = 0
        self.peak_prefill_bytes = 0
        self.score_memo = score_memo
        self.clock = PhaseClock()
        self._prefilling: int | None = None
        self._history: list[list[int]] | None = None
        self._pending: list[torch.Tensor] = []
        self._staged: torch.Tensor | None = None
        self._staged_mask: torch.Tensor | None = None
        self._observed = False
        self._ids_known = True
        self.prompt_format: str | None = None
        self._recent_queries: list[torch.Tensor | None] = [None] * self.num_layers
        self._recent_counts: list[list[int]] = [[] for _ in range(self.num_layers)]
        self._decode_targets: list[list[int]] | None = None
        self._scalings: list[float | None] = [None] * self.num_layers
        self.decode_evictions = 0

    # transformers' side

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if layer_idx == 0:
            self._commit_inputs()
        if layer.storage is None:
            if layer_idx == 0 and self.groups is not None:
                raise RuntimeError("this CompressedCache already holds a prompt being compressed; use a new cache")
            self._prefilling = layer_idx
        return hand_off(self, layer_idx, *layer.update(key_states, value_states))

    @property
    def batch_size(self) -> int:
        return len(self.infos) if self.infos is not None else -1

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Every sequence ``repeats`` times in a row, each an independent copy (``num_return_sequences``)."""
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
        self.batch_select_indices([row for row in range(max(self.batch_size, 0)) for _ in range(repeats)])

    def batch_select_indices(self, indices) -> None:
        """Keep the given sequences of the batch, in that order (copies where one is taken twice)."""
        if self.infos is None:
            return
        self._check_ready("select sequences of")
        rows = [int(i) for i in torch.as_tensor(indices).reshape(-1).tolist()]
        for row in rows:
            if not 0 <= row < self.batch_size:
                raise IndexError(f"sequence {row} is outside this cache's batch of {self.batch_size}")
        history = self._flush_history()
        for layer in self.layers:
            layer.batch_select_indices(torch.tensor(rows))
        self.infos = [self.infos[row] for row in rows]
        self.padding = [self.padding[row] for row in rows]
        self._history = None if history is None else [list(history[row]) for row in rows]
        if self._decode_targets is not None:
            self._decode_targets = [list(self._decode_targets[row]) for row in rows]
        index = torch.tensor(rows)
        self._recent_queries = [
            None if q is None else q.index_select(0, index.to(q.device)) for q in self._recent_queries
        ]
        self._recent_counts = [[counts[row] for row in rows] if counts else [] for counts in self._recent_counts]

    # lavakv's side: the cache protocol of lavakv.attention

    def observe_inputs(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> None:
        """See a forward pass's inputs before it runs: refuse inputs that do not continue this cache, stage the ids.

        Called before every forward (see :func:`lavakv.attention.prepare_model`). The first call is
        the prompt; later ones must continue what the cache holds: as many sequences, an attention
        mask (when given) spanning the held tokens plus the new ones, and positions following each
        sequence's held ones. The ids join the history once the forward reaches the cache.
        """
        self._observed = True
        if self.infos is None and self.groups is None:
            self._staged = None if input_ids is None else input_ids.detach()
            self._staged_mask = attention_mask
            return
        held = self.get_seq_length()
        new = None if input_ids is None else input_ids.shape[-1]
        if input_ids is not None and self.infos is not None and input_ids.shape[0] != self.batch_size:
            raise ContinuationError(
                f"these inputs hold {input_ids.shape[0]} sequences, but this CompressedCache holds {self.batch_size}; "
                "cache.batch_repeat_interleave(n) or batch_select_indices([...]) reshapes it first"
            )
        if new == 0:
            raise ContinuationError(
                f"no new tokens to feed: the inputs are not longer than the {held} tokens this CompressedCache holds, "
                f"so they cannot continue it. {FRESH_START}"
            )
        if attention_mask is not None and attention_mask.dim() == 2 and new is not None:
            if attention_mask.shape[-1] != held + new:
                raise ContinuationError(
                    f"this CompressedCache holds {held} tokens of a prompt, but these inputs ({new} new tokens with an "
                    f"attention mask over {attention_mask.shape[-1]}) continue a history of "
                    f"{attention_mask.shape[-1] - new} tokens: it holds another prompt. {FRESH_START}"
                )
        if position_ids is not None and new is not None and 1 < new <= position_ids.shape[-1] and self.infos:
            first = position_ids.reshape(-1, position_ids.shape[-1])[:, -new].tolist()
            expected = [held - pad for pad in self.padding]
            if len(first) == len(expected) and first != expected:
                raise ContinuationError(
                    f"these inputs start at positions {first}, but this CompressedCache holds tokens up to "
                    f"positions {expected}: they do not continue what it holds. {FRESH_START}"
                )
        self._staged = None if input_ids is None else input_ids.detach()
        if input_ids is None:
            self._ids_known = False

    def check_history(self, input_ids: torch.Tensor) -> None:
        """Refuse a whole history (``model.generate``'s ``input_ids``) that does not start with the held tokens."""
        if self.infos is None or not self._ids_known or self._history is None:
            return
        held = self.get_seq_length()
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size or input_ids.shape[1] <= held:
            return
        rows = input_ids[:, :held].tolist()
        for row, (ids, history, pad) in enumerate(zip(rows, self._flush_history(), self.padding)):
            given = ids[pad:]
            differ = next((i for i, (a, b) in enumerate(zip(history, given)) if a != b), None)
            if differ is not None:
                which = f" (sequence {row})" if self.batch_size > 1 else ""
                raise ContinuationError(
                    f"this CompressedCache holds another prompt{which}: the inputs differ from its {len(history)} held "
                    f"tokens at token {differ} (id {given[differ]} instead of {history[differ]}). {FRESH_START}"
                )

    def _commit_inputs(self) -> None:
        """The forward reached the cache: the staged ids join the history (unobserved inputs make it unknown)."""
        staged, self._staged = self._staged, None
        if not self._observed:
            self._ids_known = False
        self._observed = False
        if staged is None:
            return
        if self.infos is None and self.groups is None:
            ids, mask = staged.cpu(), self._staged_mask
            if mask is not None and mask.dim() == 2 and mask.shape == ids.shape:
                real = mask.detach().cpu().bool()
                self._history = [row[keep].tolist() for row, keep in zip(ids, real)]
            else:
                self._history = ids.tolist()
            self._pending = []
        elif self._history is not None:
            self._pending.append(staged)

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
            if self._staged is not None:
                self._commit_inputs()
            self._start(prompt_lengths(attention_mask, batch, length), length)
        self._scalings[layer_idx] = scaling
        if self.decode_budget is not None:
            lengths = [length - pad for pad in self.padding]
            self._remember_queries(layer_idx, query[:, :, -self.method.window :], lengths)
        window = self.sliding_windows[layer_idx]
        visible_from = max(0, length - window) if window else 0
        first = 0
        for group in self.groups:
            rows = slice(first, first + group.size)
            start = max(self.padding[first], visible_from)
            group.add_layer(layer_idx, query[rows, :, start:], key[rows, :, start:], value[rows, :, start:], scaling)
            first += group.size
        held = self.kv_bytes() + sum(g.nbytes for g in self.groups) + key.nbytes + value.nbytes
        self.peak_prefill_bytes = max(self.peak_prefill_bytes, held)
        for index in range(layer_idx + 1):
            if self.layers[index].storage is None and all(g.is_final(index) for g in self.groups):
                self.layers[index].pack(
                    [group.release(index) for group in self.groups], self.padding, self.prompt_length
                )
        if all(layer.storage is not None for layer in self.layers):
            members = [group for group in self.groups for _ in range(group.size)]
            self.infos = [SequenceInfo(g.length, g.budget, g.window, tuple(g.visible_lengths)) for g in members]
            self._recent_counts = [
                [min(count, g.window) if g.window else count for count, g in zip(counts, members)]
                for counts in self._recent_counts
            ]
            self.groups = []
            if self.decode_budget is not None:
                self._start_decode_budget()

    def _start(self, lengths: list[int], length: int) -> None:
        """One compression group per run of equal prompt lengths (the whole batch when nothing is padded)."""
        self.prompt_length = length
        self.padding = [length - n for n in lengths]
        self.groups = []
        first = 0
        while first < len(lengths):
            n = lengths[first]
            if n < 1:
                raise ValueError("a prompt of the batch has no tokens")
            size = 1
            while first + size < len(lengths) and lengths[first + size] == n:
                size += 1
            visible = [min(n, window) if window else n for window in self.sliding_windows]
            tokens = n if self.budget is None else self.budget.tokens_for(n)
            window = self.method.window if self.budget is None else self.budget.window_for(self.method.window, tokens)
            memo = None if self.score_memo is None else self.score_memo.setdefault((first, size), {})
            group = GroupCompression(
                self.method, n, tokens, visible, self.progressive, memo, self.clock, window=window, size=size
            )
            self.groups.append(group)
            first += size

    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float, sliding_window: int | None) -> torch.Tensor:
        layer = self.layers[layer_idx]
        if layer.storage is None:
            raise RuntimeError(f"layer {layer_idx} has no compressed prompt; the prefill did not reach it")
        output = layer.attend(query, scaling, sliding_window)
        if self.decode_budget is not None:
            self._after_decode_step(layer_idx, query)
        return output

    # compressing while decoding

    def _remember_queries(self, layer_idx: int, query: torch.Tensor, counts: list[int]) -> None:
        """Keep the latest ``window`` queries of a layer (right-aligned) and how many are real in each row."""
        window = self.method.window
        recent = self._recent_queries[layer_idx]
        recent = query if recent is None else torch.cat([recent, query], dim=2)
        self._recent_queries[layer_idx] = recent[:, :, -window:]
        self._recent_counts[layer_idx] = [min(window, count) for count in counts]

    def _start_decode_budget(self) -> None:
        """At the end of the prefill: each layer's target, then every layer already above it evicts at once."""
        self._decode_targets = self._layer_targets()
        for layer_idx in range(self.num_layers):
            self._evict_if_due(layer_idx)

    def _after_decode_step(self, layer_idx: int, query: torch.Tensor) -> None:
        steps = query.shape[2]
        self._remember_queries(layer_idx, query, [count + steps for count in self._recent_counts[layer_idx]])
        self._evict_if_due(layer_idx)

    def _layer_targets(self) -> list[list[int]]:
        """Per sequence and layer, the entries per head the decode budget gives it (at least 1; exact total).

        A decode budget at or above what the prefill kept adds the same room to every layer on top of
        its prefill budget (so a budget above the total length never evicts); a smaller one shrinks
        every layer in proportion to its prefill budget.
        """
        storages = [self._storage(index) for index in range(self.num_layers)]
        bounds = [pad + info.length for pad, info in zip(self.padding, self.infos)]
        kept = [storage.count_before(bounds).float().mean(dim=-1).tolist() for storage in storages]
        total = self.decode_budget * self.num_layers
        targets = []
        for row in range(self.batch_size):
            shares = [layer[row] for layer in kept]
            mean = sum(shares) / self.num_layers
            if self.decode_budget >= mean:
                wanted = [share + self.decode_budget - mean for share in shares]
            else:
                wanted = [share * self.decode_budget / max(mean, 1e-9) for share in shares]
            spare = total - self.num_layers
            rounded = round_to_total([max(0.0, w - 1) for w in wanted], spare, [spare] * self.num_layers)
            targets.append([1 + count for count in rounded])
        return targets

    def _evict_if_due(self, layer_idx: int) -> None:
        """Compress the rows of a layer that hold ``decode_interval`` entries per head beyond their target."""
        storage = self.layers[layer_idx].storage
        held = storage.row_lengths().float().mean(dim=-1).tolist()
        due = [mean >= row[layer_idx] + self.decode_interval for mean, row in zip(held, self._decode_targets)]
        if not any(due):
            return
        with self.clock.phase("decode"):
            self._evict(layer_idx, due)

    def _evict(self, layer_idx: int, due: list[bool]) -> None:
        storage = self.layers[layer_idx].storage
        recent, counts = self._recent_queries[layer_idx], list(self._recent_counts[layer_idx])
        next_position = storage.append_start + storage.steps
        chosen = []
        for row in range(storage.batch):
            lengths = storage.row_lengths()[row].tolist()
            if not due[row]:
                chosen.append([torch.arange(count) for count in lengths])
                continue
            heads = [storage.full_row(row, head) for head in range(storage.kv_heads)]
            queries = recent[row, :, recent.shape[2] - counts[row] :]
            indices, kept_window = select_while_decoding(
                self.method,
                heads,
                queries,
                self._scalings[layer_idx],
                self._decode_targets[row][layer_idx],
                next_position,
                self.sliding_windows[layer_idx],
            )
            chosen.append(indices)
            counts[row] = min(counts[row], kept_window)
        self.layers[layer_idx].storage = storage.keep(chosen)
        self._recent_counts[layer_idx] = counts
        self.decode_evictions += 1

    # the read API

    def kv_bytes(self) -> int:
        """Bytes of the key and value tensors the cache holds now."""
        return sum(layer.storage.nbytes()[0] for layer in self.layers if layer.storage is not None)

    def kept_kv(self, layer_idx: int, sequence: int = 0) -> list[Row]:
        """Per KV head, the ``(positions, keys, values)`` one sequence holds in a layer (positions in its own
        sequence: the prompt's from 0, then the tokens fed after it), as copies.
        """
        storage = self._storage(layer_idx)
        rows = []
        for head in range(storage.kv_heads):
            positions, keys, values = storage.full_row(sequence, head)
            rows.append((positions.long() - self.padding[sequence], keys.clone(), values.clone()))
        return rows

    def token_ids(self, sequence: int = 0) -> list[int]:
        """The token ids this cache has been fed for one sequence: its prompt, then every token after it.

        The last generated token is not among them until it is fed (transformers' convention: the
        next call passes the whole history, and only the tokens the cache does not hold are fed).
        """
        if not self._ids_known or self._history is None:
            raise RuntimeError(
                "this cache's token ids are unknown: it was fed inputs_embeds, or by a call that bypassed the "
                "model's forward"
            )
        return list(self._flush_history()[sequence])

    def continuation(self, ids: list[int], sequence: int = 0) -> list[int]:
        """The tokens of ``ids`` after what the cache holds, or a :class:`ContinuationError` if ``ids`` do not
        start with the held tokens (the cache holds another prompt)."""
        held = self.token_ids(sequence)
        differ = next((i for i, (a, b) in enumerate(zip(held, ids)) if a != b), None)
        if differ is None and len(ids) <= len(held):
            raise ContinuationError(
                f"the inputs ({len(ids)} tokens) add nothing to the {len(held)} tokens this CompressedCache holds; "
                "pass the whole history followed by new tokens"
            )
        if differ is not None:
            raise ContinuationError(
                f"this CompressedCache holds another prompt: the inputs differ from its {len(held)} held tokens at "
                f"token {differ} (id {ids[differ]} instead of {held[differ]}). {FRESH_START}"
            )
        return list(ids[len(held) :])

    def stats(self, positions: bool = True) -> CacheStats:
        """Totals and per-sequence figures: bytes, entries, budgets, appended tokens, kept positions.

        ``positions=False`` leaves ``kept_positions`` empty (cheaper for long prompts).
        """
        if self.infos is None:
            raise RuntimeError("nothing has been prefilled into this cache yet")
        storages = [self._storage(index) for index in range(self.num_layers)]
        kv_bytes = index_bytes = kept_entry_bytes = 0
        bounds = [pad + info.length for pad, info in zip(self.padding, self.infos)]
        prompt_counts = [storage.count_before(bounds) for storage in storages]
        for layer, storage, counts in zip(self.layers, storages, prompt_counts):
            kv, index = storage.nbytes()
            kv_bytes += kv
            index_bytes += index + layer.backend_bytes()
            kept_entry_bytes += int(counts.sum()) * 2 * storage.keys.shape[-1] * storage.keys.element_size()
        sequences = [
            self._sequence_stats(sample, info, storages, prompt_counts, bounds[sample], index_bytes, positions)
            for sample, info in enumerate(self.infos)
        ]
        return CacheStats(
            method=self.method.spec,
            kv_bytes=kv_bytes,
            index_bytes=index_bytes,
            kept_entries=sum(s.kept_entries for s in sequences),
            full_entries=sum(s.full_entries for s in sequences),
            full_kv_bytes=sum(s.full_kv_bytes for s in sequences),
            kept_entry_bytes=kept_entry_bytes,
            reserved_kv_bytes=sum(storage.reserved_bytes() for storage in storages),
            append_seconds=sum(layer.append_seconds for layer in self.layers),
            appended_tokens=max(s.appended_tokens for s in sequences),
            held_entries=sum(s.held_entries for s in sequences),
            peak_prefill_bytes=self.peak_prefill_bytes,
            compression_seconds=dict(self.clock.seconds),
            decode_evictions=self.decode_evictions,
            attention_paths=sorted({layer.attention_path or "unset" for layer in self.layers}),
            sequences=sequences,
        )

    def _sequence_stats(self, sample, info, storages, prompt_counts, bound, index_bytes, positions) -> SequenceStats:
        kept, head_budgets, full_kv_bytes, held = [], [], 0, 0
        appended = self.get_seq_length() - bound
        for layer, (storage, counts) in enumerate(zip(storages, prompt_counts)):
            head_budgets.append(counts[sample].tolist())
            held += int(storage.row_lengths()[sample].sum())
            if positions:
                rows = [storage.row(sample, h)[0] for h in range(storage.kv_heads)]
                kept.append([(row[row < bound] - self.padding[sample]).tolist() for row in rows])
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
            index_bytes=index_bytes // len(self.infos),
            held_entries=held,
            kept_positions=kept,
            head_budgets=head_budgets,
            layer_budgets=[sum(heads) / kv_heads for heads in head_budgets],
        )

    def _storage(self, layer_idx: int) -> RaggedKV:
        storage = self.layers[layer_idx].storage
        if storage is None:
            raise RuntimeError(f"layer {layer_idx} holds no compressed prompt yet")
        return storage

    def _check_ready(self, action: str) -> None:
        if self.infos is None:
            raise RuntimeError(f"cannot {action} a CompressedCache before its prompt has been prefilled and compressed")

    def _flush_history(self) -> list[list[int]] | None:
        if self._history is not None and self._pending:
            fed = torch.cat([chunk.cpu() for chunk in self._pending], dim=-1).tolist()
            for row, ids in zip(self._history, fed):
                row.extend(ids)
            self._pending = []
        return self._history

    # copies, batches, files

    def copy(self) -> CompressedCache:
        """An independent cache holding the same entries and history: decoding one leaves the other unchanged."""
        self._check_ready("copy")
        return self._derived(
            [layer.storage.clone() for layer in self.layers],
            self.infos,
            self.padding,
            self._flush_history() if self._ids_known else None,
            [None if q is None else q.clone() for q in self._recent_queries],
            self._recent_counts,
            self._decode_targets,
        )

    @classmethod
    def stack(cls, caches: list[CompressedCache], mixed_methods: bool = False) -> CompressedCache:
        """One cache whose batch is every cache's sequences in order, each holding exactly what it held.

        The caches must share the model, method, budget, decode settings and prompt format.
        Sequences that hold fewer tokens are left-padded, as in a batch of prompts; each row's
        positions continue its own.

        ``mixed_methods=True`` stacks caches compressed by different methods and budgets, to decode
        them together (the evaluation decodes every way of compressing one sample as one batch).
        Decoding never compresses again there, so none may have a ``decode_budget``; each row
        keeps what its own method kept and reports it in ``stats().sequences``, while the stacked
        cache's ``method`` and ``budget`` are the first cache's.
        """
        if not caches:
            raise ValueError("stack needs at least one cache")
        first = caches[0]
        shared = ("model", "prompt_format") if mixed_methods else tuple(first._settings())
        for cache in caches:
            cache._check_ready("stack")
            if mixed_methods and cache.decode_budget is not None:
                raise ValueError(
                    f"caches of mixed methods are stacked to decode without further compression; this one has "
                    f"decode_budget={cache.decode_budget}"
                )
            theirs_all, ours_all = cache._settings(), first._settings()
            differ = [
                f"{name} {theirs_all[name]!r} vs {ours_all[name]!r}"
                for name in shared
                if theirs_all[name] != ours_all[name]
            ]
            if differ:
                what = (
                    "model and prompt format"
                    if mixed_methods
                    else "model, method, budget, decode settings and prompt format"
                )
                raise ValueError(f"caches to stack must share {what}; they differ in {', '.join(differ)}")
        end = max(cache.get_seq_length() for cache in caches)
        padding = [pad + end - cache.get_seq_length() for cache in caches for pad in cache.padding]
        storages = [RaggedKV.concat([cache.layers[i].storage for cache in caches]) for i in range(first.num_layers)]
        known = all(cache._ids_known and cache._history is not None for cache in caches)
        history = [list(row) for cache in caches for row in cache._flush_history()] if known else None
        recent, counts = [], []
        for layer in range(first.num_layers):
            queries = [cache._recent_queries[layer] for cache in caches]
            if any(q is None for q in queries):
                recent.append(None)
                counts.append([])
                continue
            longest = max(q.shape[2] for q in queries)
            recent.append(torch.cat([_left_pad(q, longest) for q in queries]))
            counts.append([count for cache in caches for count in cache._recent_counts[layer]])
        targets = None
        if first.decode_budget is not None:
            targets = [row for cache in caches for row in cache._decode_targets]
        infos = [info for cache in caches for info in cache.infos]
        stacked = first._derived(storages, infos, padding, history, recent, counts, targets)
        stacked.peak_prefill_bytes = max(cache.peak_prefill_bytes for cache in caches)
        return stacked

    def _settings(self) -> dict:
        return {
            "model": model_identity(self.model_config, None)["config_fingerprint"][:12],
            "method": self.method.spec,
            "budget": self.budget,
            "decode_budget": self.decode_budget,
            "decode_interval": self.decode_interval,
            "prompt_format": self.prompt_format,
        }

    def _derived(self, storages, infos, padding, history, recent, counts, targets) -> CompressedCache:
        derived = CompressedCache(
            self.model_config,
            method=self.method,
            budget=self.budget,
            progressive=self.progressive,
            decode_budget=self.decode_budget,
            decode_interval=self.decode_interval,
            attention_path=self.attention_path,
        )
        for layer, storage in zip(derived.layers, storages):
            layer.storage = storage
            layer.dtype, layer.device = storage.keys.dtype, storage.keys.device
            layer.attention_path = resolve_backend(layer.requested_path, layer.device)
            layer.is_initialized = True
        derived.infos = list(infos)
        derived.groups = []
        derived.padding = list(padding)
        derived.prompt_length = max(pad + info.length for pad, info in zip(padding, infos))
        derived.peak_prefill_bytes = self.peak_prefill_bytes
        derived.clock = _copy.deepcopy(self.clock)
        derived._history = None if history is None else [list(row) for row in history]
        derived._ids_known = history is not None
        derived._recent_queries = list(recent)
        derived._recent_counts = [list(row) for row in counts]
        derived._decode_targets = None if targets is None else [list(row) for row in targets]
        derived._scalings = list(self._scalings)
        derived.decode_evictions = self.decode_evictions
        derived.weights_fingerprint = self.weights_fingerprint
        derived._model = self._model
        derived.prompt_format = self.prompt_format
        return derived

    def release(self) -> None:
        """Let go of every tensor this cache holds (it cannot be used afterwards), e.g. once stacked into a batch."""
        for layer in self.layers:
            layer.storage = None
        self._recent_queries = [None] * self.num_layers
        self.infos = None
        self.groups = []

    def _fingerprint(self) -> str | None:
        model = self._model() if self._model is not None else None
        if model is not None:
            self.weights_fingerprint = weights_fingerprint(model)
        return self.weights_fingerprint

    def save(self, path: str | os.PathLike) -> int:
        """Write the compressed context to ``path`` (safetensors with a JSON header); returns the file's bytes.

        The header records the format version, lavakv's and transformers' versions, the model's
        identity, the method, the budget, the decode settings and state, the dtype, the prompt
        format, and each sequence's prompt length and token-id hash, so that :meth:`load` can refuse
        a file that does not fit the model it is given and resume exactly where this cache is.
        """
        self._check_ready("save")
        history = self._flush_history()
        if not self._ids_known or history is None:
            raise RuntimeError("cannot save a cache whose token ids are unknown (it was fed inputs_embeds)")
        tensors = {}
        for index, layer in enumerate(self.layers):
            for name, tensor in layer.storage.tensors().items():
                tensors[f"layers.{index}.{name}"] = tensor
            if self._recent_queries[index] is not None:
                tensors[f"layers.{index}.recent_queries"] = self._recent_queries[index].contiguous()
        for row, ids in enumerate(history):
            tensors[f"sequences.{row}.token_ids"] = torch.tensor(ids, dtype=torch.long)
        header = {
            "method": self.method.spec,
            "budget": None if self.budget is None else asdict(self.budget),
            "decode_budget": self.decode_budget,
            "decode_interval": self.decode_interval,
            "decode_targets": self._decode_targets,
            "decode_evictions": self.decode_evictions,
            "recent_counts": self._recent_counts,
            "scalings": self._scalings,
            "prompt_format": self.prompt_format,
            "dtype": str(self.layers[0].storage.keys.dtype).removeprefix("torch."),
            "padding": self.padding,
            "append_start": [layer.storage.append_start for layer in self.layers],
            "peak_prefill_bytes": self.peak_prefill_bytes,
            "sequences": [
                {**asdict(info), "token_ids_sha256": ids_hash(ids), "tokens": len(ids)}
                for info, ids in zip(self.infos, history)
            ],
        }
        return write_file(path, tensors, header, model_identity(self.model_config, self._fingerprint()))

    @classmethod
    def load(cls, path: str | os.PathLike, model) -> CompressedCache:
        """The cache :meth:`save` wrote to ``path``, for ``model`` (which it prepares, as the constructor does).

        Each layer's tensors go to the device of that layer's weights (``device_map`` placements
        included). A file for another model (architecture, shapes or weights), another dtype, a
        newer format, or a truncated or corrupt file is a ``ValueError`` naming what differs;
        nothing half-loaded is returned.
        """
        header, tensors = read_file(path)
        dtype = str(model.dtype).removeprefix("torch.")
        if header.get("dtype") != dtype:
            raise ValueError(
                f"{path}: the cache was saved in {header.get('dtype')}, but the model runs in {dtype}; load the model "
                f"with dtype={header.get('dtype')}"
            )
        check_identity(path, header, model_identity(model.config, weights_fingerprint(model)))
        try:
            budget = None if header["budget"] is None else Budget(**header["budget"])
            cache = cls(
                model,
                method=header["method"],
                budget=budget,
                decode_budget=header["decode_budget"],
                decode_interval=header["decode_interval"],
            )
            infos = [
                SequenceInfo(s["length"], s["budget"], s["window"], tuple(s["visible_lengths"]))
                for s in header["sequences"]
            ]
            history = []
            for row, sequence in enumerate(header["sequences"]):
                ids = tensors.pop(f"sequences.{row}.token_ids").tolist()
                if ids_hash(ids) != sequence["token_ids_sha256"]:
                    raise ValueError(f"the token ids of sequence {row} do not match their hash")
                history.append(ids)
            storages, recent = [], []
            devices = layer_devices(model, cache.num_layers)
            for index, layer in enumerate(cache.layers):
                prefix = f"layers.{index}."
                named = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
                queries = named.pop("recent_queries", None)
                recent.append(None if queries is None else queries.to(devices[index]))
                lengths = named.pop("lengths")
                named = {name: tensor.to(devices[index]) for name, tensor in named.items()}
                named["lengths"] = lengths
                storage = RaggedKV.from_tensors(
                    named, header["append_start"][index], track_positions=bool(layer.sliding_window)
                )
                if storage.batch != len(infos) or storage.keys.dtype != model.dtype:
                    raise ValueError(f"layer {index} holds {storage.batch} sequences in {storage.keys.dtype}")
                storages.append(storage)
            if len(set(header["append_start"])) != 1 or len(header["padding"]) != len(infos):
                raise ValueError("the layers' timelines or the padding do not agree")
            counts = header["recent_counts"]
            if len(counts) != cache.num_layers or len(header["scalings"]) != cache.num_layers:
                raise ValueError("the decode state does not have one entry per layer")
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: not a valid lavakv cache file ({error})") from error
        cache._scalings = list(header["scalings"])
        cache.prompt_format = header["prompt_format"]
        loaded = cache._derived(storages, infos, header["padding"], history, recent, counts, header["decode_targets"])
        loaded.peak_prefill_bytes = header["peak_prefill_bytes"]
        loaded.decode_evictions = header["decode_evictions"]
        return loaded


def _left_pad(queries: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, H, w, d]`` queries right-aligned in ``width`` slots (zeros before them: not counted as real)."""
    missing = width - queries.shape[2]
    if missing == 0:
        return queries
    return torch.cat([queries.new_zeros(*queries.shape[:2], missing, queries.shape[3]), queries], dim=2)


def layer_devices(model, num_layers: int) -> list[torch.device]:
    """The device of each decoder layer's weights (the model's device where the layers cannot be found)."""
    try:
        layers = model.get_decoder().layers
        return [next(layers[index].parameters()).device for index in range(num_layers)]
    except (AttributeError, IndexError, StopIteration, TypeError):
        return [model.device] * num_layers


FRESH_START = (
    "Pass the whole history (the ids it holds, see cache.token_ids(), then the new ones), or start afresh with a new "
    "CompressedCache; cache.copy() keeps a compressed context to reuse for another question."
)


def check_decode_budget(method: Method, decode_budget: int | None, decode_interval: int) -> tuple[int | None, int]:
    """``(decode_budget, decode_interval)`` validated for ``method``, or a clear error."""
    if isinstance(decode_interval, bool) or not isinstance(decode_interval, int) or decode_interval < 1:
        raise ValueError(
            f"decode_interval must be an integer >= 1 (decode steps between evictions), got {decode_interval!r}"
        )
    if decode_budget is None:
        return None, decode_interval
    if not method.compresses:
        raise ValueError(
            f"method {method.spec!r} keeps every entry and has no score to evict with; a decode_budget needs a "
            "compressing method"
        )
    if isinstance(decode_budget, bool) or not isinstance(decode_budget, int) or decode_budget <= method.window:
        raise ValueError(
            f"decode_budget must be an integer greater than the method's window ({method.window}) in tokens per KV "
            f"head per layer, got {decode_budget!r}"
        )
    problem = method.budget_problem(decode_budget, method.window)
    if problem is not None:
        raise ValueError(f"decode_budget {decode_budget}: {problem}")
    return decode_budget, decode_interval


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
    method.check_budget(resolved)
    return resolved
