"""The compressed KV cache: per layer and KV head, only the kept entries, really stored.

:class:`CompressedCache` is a transformers ``Cache`` that speaks lavakv's cache protocol
(:class:`lavakv.attention.CompressingCache`): during the prefill each layer's queries, keys and
values go to :class:`~lavakv.selection.GroupCompression` (one per run of equal prompt lengths:
the whole batch when nothing is padded), which decides what is kept in tensor operations; a
layer whose selection is final is packed into :class:`~lavakv.ragged.RaggedKV` storage (kept
entries only, no padding) on its :class:`~lavakv.cache.layer.CompressedLayer`; decode steps
append to it and attend exactly over each head's entries through the layer's attention backend.
Nothing outside the cache reads its tensors: :meth:`CompressedCache.stats` reports bytes,
entries, budgets and kept positions, :meth:`CompressedCache.kept_kv` gives copies.

The cache reports the original sequence length to transformers, so RoPE positions and masks
continue from the uncompressed prompt. Its collaborators each do one job: the
:class:`~lavakv.cache.config.CacheConfig` says what it was asked, the
:class:`~lavakv.cache.history.TokenHistory` remembers the token ids fed (so a later call can
continue a conversation and a call about another prompt is refused), the
:class:`~lavakv.cache.eviction.DecodeEviction` keeps a long generation within ``decode_budget``,
and :mod:`lavakv.cache.files` saves and loads it.
"""

from __future__ import annotations

import logging
import os
import weakref

import torch
from transformers.cache_utils import Cache, get_layer_types_and_kwargs

from ..attention import hand_off, prepare_model, prompt_lengths
from ..cachefile import head_identity, weights_fingerprint
from ..methods import Budget, LayerWeights, Method
from ..ragged import RaggedKV, Row
from ..selection import GroupCompression, PhaseClock
from .combine import copy_cache, stack_caches
from .config import CacheConfig
from .eviction import DecodeEviction
from .files import load_cache, save_cache
from .history import TokenHistory, check_continues
from .layer import CompressedLayer
from .stats import CacheStats, SequenceInfo, cache_stats

logger = logging.getLogger(__name__)


class CompressedCache(Cache):
    """A transformers ``Cache`` that compresses the prompt during prefill with a lavakv method.

    >>> cache = CompressedCache(model, method="lava", budget=128)
    >>> model.generate(input_ids, cache=cache, max_new_tokens=32)

    The keyword arguments are those of :meth:`CacheConfig.build`: ``method`` (a
    :class:`~lavakv.Method` or a spec such as ``"lava:heads=uniform"``, with ``options`` routed to
    its parts), ``budget`` (prompt tokens kept per KV head per layer on average, window included;
    or a :class:`~lavakv.methods.Budget`) or ``ratio``, ``progressive`` (compress layer by layer
    during the prefill, bounding peak memory; on by default for dynamic layer budgets),
    ``decode_budget`` / ``decode_interval`` (bound the cache while generating: whenever a layer
    holds ``decode_interval`` entries per head beyond its share, it is compressed back with the
    method's own score and head allocation), ``attention_path`` (the decode attention backend).
    ``settings=`` passes a ready :class:`CacheConfig` instead. Passing a model (not only its
    config) switches it to lavakv's attention function, which wraps the model's own.
    ``score_memo`` (a dict shared by caches derived from one
    :class:`~lavakv.recording.PrefillRecord`) lets them compute each layer's scores once.
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
        decode_interval: int | None = None,
        attention_path: str = "auto",
        settings: CacheConfig | None = None,
        **options,
    ):
        if settings is None:
            settings = CacheConfig.build(
                method, budget, ratio, progressive, decode_budget, decode_interval, attention_path, **options
            )
        self.settings = settings
        config = getattr(model_or_config, "config", model_or_config)
        self.weights_fingerprint: str | None = None
        self._model = None
        if hasattr(model_or_config, "config"):
            prepare_model(model_or_config)
            self._model = weakref.ref(model_or_config)
        self.model_config = config
        if settings.method.reads_profile:
            settings.method.check_model(head_identity(model_or_config))
        config = config.get_text_config()
        self.num_layers = config.num_hidden_layers
        _, layer_kwargs = get_layer_types_and_kwargs(config)
        self.sliding_windows = [kwargs.get("sliding_window") for kwargs in layer_kwargs]
        super().__init__(
            layers=[
                CompressedLayer(index, window, settings.attention_path)
                for index, window in enumerate(self.sliding_windows)
            ]
        )
        self.groups: list[GroupCompression] | None = None
        self.infos: list[SequenceInfo] | None = None
        self.padding: list[int] = []
        self.prompt_length = 0
        self.peak_prefill_bytes = 0
        self.score_memo = score_memo
        self.clock = PhaseClock()
        self._prefilling: int | None = None
        self.history = TokenHistory()
        self.prompt_format: str | None = None
        self.eviction = None
        if settings.decode_budget is not None:
            self.eviction = DecodeEviction(
                settings.method, settings.decode_budget, settings.decode_interval, self.clock
            )

    # the settings, read-only

    @property
    def method(self) -> Method:
        return self.settings.method

    @property
    def budget(self) -> Budget | None:
        return self.settings.budget

    @property
    def progressive(self) -> bool:
        return self.settings.progressive

    @property
    def decode_budget(self) -> int | None:
        return self.settings.decode_budget

    @property
    def decode_interval(self) -> int:
        return self.settings.decode_interval

    @property
    def attention_path(self) -> str:
        return self.settings.attention_path

    @property
    def decode_evictions(self) -> int:
        """How many times a layer was compressed while decoding (``decode_budget``)."""
        return 0 if self.eviction is None else self.eviction.evictions

    @decode_evictions.setter
    def decode_evictions(self, count: int) -> None:
        if self.eviction is not None:
            self.eviction.evictions = count

    # transformers' side

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if layer_idx == 0:
            self.history.commit(prompt=self.infos is None and self.groups is None)
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
        self.history.select(rows)
        for layer in self.layers:
            layer.select_rows(rows)
        self.infos = [self.infos[row] for row in rows]
        self.padding = [self.padding[row] for row in rows]

    # lavakv's side: the cache protocol of lavakv.attention

    def observe_inputs(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> None:
        """See a forward pass's inputs before it runs: refuse inputs that do not continue this cache, stage the ids.

        Called before every forward (see :func:`lavakv.attention.prepare_model`). The first call is
        the prompt; later ones must continue what the cache holds (see
        :func:`~lavakv.cache.history.check_continues`). The ids join the history once the forward
        reaches the cache.
        """
        if self.infos is not None or self.groups is not None:
            padding = self.padding if self.infos is not None else []
            check_continues(input_ids, attention_mask, position_ids, self.get_seq_length(), padding)
            attention_mask = None
        self.history.stage(input_ids, attention_mask)

    def check_history(self, input_ids: torch.Tensor) -> None:
        """Refuse a whole history (``model.generate``'s ``input_ids``) that does not start with the held tokens."""
        if self.infos is not None:
            self.history.check_prefix(input_ids, self.get_seq_length(), self.padding)

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
        weights: tuple | None = None,
        scoring_pass: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Hand one layer's prefill to each sequence's compression and store what is final.

        ``weights`` is the attention's ``(output projection weight, rotary)`` of the layer;
        ``scoring_pass`` the layer's ``(queries, keys)`` of a scoring pass over the prompt, for
        scores that read one (see :meth:`lavakv.recording.PrefillRecord.reconstruct`).
        """
        self._prefilling = None
        if self.method.needs_scoring_pass and scoring_pass is None:
            raise ValueError(
                f"method {self.method.spec!r} scores from a reconstruction pass over the prompt, which a "
                "compressing prefill cannot run; use lavakv.generate, lavakv eval or PrefillRecord.reconstruct"
            )
        weights = None if weights is None else LayerWeights(*weights)
        with self.clock.phase("total"):
            self._compress_layer(layer_idx, query, key, value, attention_mask, scaling, weights, scoring_pass)

    def _compress_layer(self, layer_idx, query, key, value, attention_mask, scaling, weights, scoring_pass) -> None:
        batch, _, length, _ = key.shape
        layer = self.layers[layer_idx]
        if layer_idx == 0:
            if self.history.staged is not None:
                self.history.commit(prompt=True)
            self._start(prompt_lengths(attention_mask, batch, length), length)
        layer.scaling = scaling
        if self.decode_budget is not None:
            counts = [length - pad for pad in self.padding]
            layer.remember_queries(query[:, :, -self.method.window :], counts, self.method.window)
        window = self.sliding_windows[layer_idx]
        visible_from = max(0, length - window) if window else 0
        first = 0
        for group in self.groups:
            rows = slice(first, first + group.size)
            start = max(self.padding[first], visible_from)
            passed = None if scoring_pass is None else tuple(t[rows] for t in scoring_pass)
            group.add_layer(
                layer_idx,
                query[rows, :, start:],
                key[rows, :, start:],
                value[rows, :, start:],
                scaling,
                weights,
                passed,
            )
            first += group.size
        held = self.kv_bytes() + sum(g.nbytes for g in self.groups) + key.nbytes + value.nbytes
        self.peak_prefill_bytes = max(self.peak_prefill_bytes, held)
        for index in range(layer_idx + 1):
            if self.layers[index].storage is None and all(g.is_final(index) for g in self.groups):
                self.layers[index].pack(
                    [group.release(index) for group in self.groups], self.padding, self.prompt_length
                )
        if all(layer.storage is not None for layer in self.layers):
            self._finish_prefill()

    def _finish_prefill(self) -> None:
        """Every layer is packed: record each sequence's outcome and start the decode budget."""
        members = [group for group in self.groups for _ in range(group.size)]
        self.infos = [SequenceInfo(g.length, g.budget, g.window, tuple(g.visible_lengths)) for g in members]
        for layer in self.layers:
            layer.recent_counts = [
                min(count, g.window) if g.window else count for count, g in zip(layer.recent_counts, members)
            ]
        self.groups = []
        if self.eviction is not None:
            self.eviction.start(self.layers, self.prompt_bounds())

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
        if self.eviction is not None:
            self.eviction.after_step(layer, query)
        return output

    # the read API

    def kv_bytes(self) -> int:
        """Bytes of the key and value tensors the cache holds now."""
        return sum(layer.storage.nbytes()[0] for layer in self.layers if layer.storage is not None)

    def kept_kv(self, layer_idx: int, sequence: int = 0) -> list[Row]:
        """Per KV head, the ``(positions, keys, values)`` one sequence holds in a layer (positions in its own
        sequence: the prompt's from 0, then the tokens fed after it), as copies.
        """
        storage = self.layer_storage(layer_idx)
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
        return self.history.token_ids(sequence)

    def continuation(self, ids: list[int], sequence: int = 0) -> list[int]:
        """The tokens of ``ids`` after what the cache holds, or a :class:`ContinuationError` if ``ids`` do not
        start with the held tokens (the cache holds another prompt)."""
        return self.history.continuation(ids, sequence)

    def stats(self, positions: bool = True) -> CacheStats:
        """Totals and per-sequence figures: bytes, entries, budgets, appended tokens, kept positions.

        ``positions=False`` leaves ``kept_positions`` empty (cheaper for long prompts).
        """
        if self.infos is None:
            raise RuntimeError("nothing has been prefilled into this cache yet")
        return cache_stats(self, positions)

    def layer_storage(self, layer_idx: int) -> RaggedKV:
        """The packed storage of one layer (for the cache's own readers: stats, files, eviction)."""
        storage = self.layers[layer_idx].storage
        if storage is None:
            raise RuntimeError(f"layer {layer_idx} holds no compressed prompt yet")
        return storage

    def prompt_bounds(self) -> list[int]:
        """Per sequence, the first position after its prompt on the cache's (left-padded) timeline."""
        return [pad + info.length for pad, info in zip(self.padding, self.infos)]

    def _check_ready(self, action: str) -> None:
        if self.infos is None:
            raise RuntimeError(f"cannot {action} a CompressedCache before its prompt has been prefilled and compressed")

    # copies, batches, files

    def copy(self) -> CompressedCache:
        """An independent cache holding the same entries and history: decoding one leaves the other unchanged."""
        return copy_cache(self)

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
        return stack_caches(caches, mixed_methods)

    def release(self) -> None:
        """Let go of every tensor this cache holds (it cannot be used afterwards), e.g. once stacked into a batch."""
        for layer in self.layers:
            layer.release()
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
        return save_cache(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, model) -> CompressedCache:
        """The cache :meth:`save` wrote to ``path``, for ``model`` (which it prepares, as the constructor does).

        Each layer's tensors go to the device of that layer's weights (``device_map`` placements
        included). A file for another model (architecture, shapes or weights), another dtype, a
        newer format, or a truncated or corrupt file is a ``ValueError`` naming what differs;
        nothing half-loaded is returned.
        """
        return load_cache(cls, path, model)
