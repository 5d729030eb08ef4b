"""One layer of a compressed cache: its ragged storage, its decode attention backend and its decode state."""

from __future__ import annotations

import time

import torch
from transformers.cache_utils import CacheLayerMixin

from ..backends import AttentionBackend, create_backend, resolve_backend
from ..ragged import RaggedKV

LayerState = tuple[torch.Tensor | None, list[int], float | None, list[int] | None]
"""A layer's decode state as copies carry it: ``(recent_queries, recent_counts, scaling, decode_targets)``."""

NOT_SUPPORTED = "lavakv's CompressedCache does not support {what}; use greedy or sampling with one sequence per prompt"


class CompressedLayer(CacheLayerMixin):
    """One layer of a :class:`~lavakv.cache.CompressedCache`, holding everything that is per layer.

    ``storage`` is the layer's kept entries once its prompt is compressed; ``backend`` the decode
    attention over it (rebuilt whenever the storage is replaced, so its state never outlives the
    layout it was derived from). For a decode budget, the layer also keeps its latest queries
    (``recent_queries`` ``[batch, heads, w, d]``, right-aligned, ``recent_counts`` real ones per
    row), the attention ``scaling`` its prefill used and each row's ``decode_targets``.
    """

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
        self.recent_queries: torch.Tensor | None = None
        self.recent_counts: list[int] = []
        self.scaling: float | None = None
        self.decode_targets: list[int] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.attention_path = resolve_backend(self.requested_path, self.device)
        self.is_initialized = True

    def set_storage(self, storage: RaggedKV | None) -> None:
        """Hold ``storage`` (``None`` lets go of it); the backend is rebuilt for it on the next decode step."""
        self.storage = storage
        self.backend = None
        if storage is not None and not self.is_initialized:
            self.dtype, self.device = storage.keys.dtype, storage.keys.device
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
        positions, first = [], 0
        for group_positions, _, _, lengths in groups:
            positions.append(group_positions + padding[first])
            first += lengths.shape[0]
        keys, values = (torch.cat([group[i] for group in groups]) if len(groups) > 1 else groups[0][i] for i in (1, 2))
        storage = RaggedKV(
            keys,
            values,
            torch.cat(positions).to(torch.int32),
            torch.cat([group[3] for group in groups]),
            append_start=prompt_length,
            track_positions=bool(self.sliding_window),
        )
        self.set_storage(storage)

    def attend(self, query: torch.Tensor, scaling: float, sliding_window: int | None) -> torch.Tensor:
        """Exact attention of ``query[B, H, q, d]`` over each head's kept entries; returns ``[B, q, H, d]``."""
        if self.attention_path is None:
            self.attention_path = resolve_backend(self.requested_path, query.device)
        if self.backend is None or self.backend.storage is not self.storage:
            self.backend = create_backend(self.attention_path, self.storage)
        return self.backend.attend(query, scaling, sliding_window)

    def backend_bytes(self) -> int:
        """Bytes the decode attention backend holds for the current storage (a padded copy, masks)."""
        if self.backend is None or self.backend.storage is not self.storage:
            return 0
        return self.backend.nbytes()

    def remember_queries(self, query: torch.Tensor, counts: list[int], window: int) -> None:
        """Keep the latest ``window`` queries (right-aligned) and how many are real in each row."""
        recent = query if self.recent_queries is None else torch.cat([self.recent_queries, query], dim=2)
        self.recent_queries = recent[:, :, -window:]
        self.recent_counts = [min(window, count) for count in counts]

    def select_rows(self, rows: list[int]) -> None:
        """Keep the given sequences, in that order (copies where one is taken twice)."""
        if self.storage is not None:
            self.set_storage(self.storage.select(rows))
        if self.recent_queries is not None:
            index = torch.tensor(rows, device=self.recent_queries.device)
            self.recent_queries = self.recent_queries.index_select(0, index)
        if self.recent_counts:
            self.recent_counts = [self.recent_counts[row] for row in rows]
        if self.decode_targets is not None:
            self.decode_targets = [self.decode_targets[row] for row in rows]

    def release(self) -> None:
        """Let go of every tensor the layer holds."""
        self.set_storage(None)
        self.recent_queries = None

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
            self.select_rows([s for s in range(self.storage.batch) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(torch.as_tensor(indices).reshape(-1).tolist())


def layer_devices(model, num_layers: int) -> list[torch.device]:
    """The device of each decoder layer's weights (the model's device where the layers cannot be found)."""
    try:
        layers = model.get_decoder().layers
        return [next(layers[index].parameters()).device for index in range(num_layers)]
    except (AttributeError, IndexError, StopIteration, TypeError):
        return [model.device] * num_layers
