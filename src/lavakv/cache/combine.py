"""Copying and stacking compressed caches: the per-layer and per-sequence state carried over, nothing recomputed."""

from __future__ import annotations

import copy as _copy

import torch

from ..cachefile import model_identity
from ..ragged import RaggedKV
from .history import TokenHistory
from .layer import CompressedLayer, LayerState


def copy_cache(source):
    """An independent cache holding the same entries and history (:meth:`CompressedCache.copy`)."""
    source._check_ready("copy")
    states = [
        (
            None if layer.recent_queries is None else layer.recent_queries.clone(),
            list(layer.recent_counts),
            layer.scaling,
            None if layer.decode_targets is None else list(layer.decode_targets),
        )
        for layer in source.layers
    ]
    storages = [layer.storage.clone() for layer in source.layers]
    return derived_cache(source, storages, source.infos, source.padding, source.history.known_rows(), states)


def stack_caches(caches: list, mixed_methods: bool = False):
    """One cache whose batch is every cache's sequences in order (:meth:`CompressedCache.stack`)."""
    if not caches:
        raise ValueError("stack needs at least one cache")
    first = caches[0]
    for cache in caches:
        check_stackable(first, cache, mixed_methods)
    end = max(cache.get_seq_length() for cache in caches)
    padding = [pad + end - cache.get_seq_length() for cache in caches for pad in cache.padding]
    storages = [RaggedKV.concat([cache.layers[i].storage for cache in caches]) for i in range(first.num_layers)]
    rows = [cache.history.known_rows() for cache in caches]
    history = None if any(r is None for r in rows) else [row for cache_rows in rows for row in cache_rows]
    states = [_stacked_state([cache.layers[i] for cache in caches]) for i in range(first.num_layers)]
    infos = [info for cache in caches for info in cache.infos]
    stacked = derived_cache(first, storages, infos, padding, history, states)
    stacked.peak_prefill_bytes = max(cache.peak_prefill_bytes for cache in caches)
    return stacked


def check_stackable(source, cache, mixed_methods: bool) -> None:
    cache._check_ready("stack")
    if mixed_methods and cache.decode_budget is not None:
        raise ValueError(
            f"caches of mixed methods are stacked to decode without further compression; this one has "
            f"decode_budget={cache.decode_budget}"
        )
    theirs, ours = stack_identity(cache), stack_identity(source)
    shared = ("model", "prompt_format") if mixed_methods else tuple(ours)
    differ = [f"{name} {theirs[name]!r} vs {ours[name]!r}" for name in shared if theirs[name] != ours[name]]
    if differ:
        what = (
            "model and prompt format" if mixed_methods else "model, method, budget, decode settings and prompt format"
        )
        raise ValueError(f"caches to stack must share {what}; they differ in {', '.join(differ)}")


def stack_identity(source) -> dict:
    """What caches stacked into one batch must share."""
    return {
        "model": model_identity(source.model_config, None)["config_fingerprint"][:12],
        "method": source.method.spec,
        "budget": source.budget,
        "decode_budget": source.decode_budget,
        "decode_interval": source.decode_interval,
        "prompt_format": source.prompt_format,
    }


def derived_cache(source, storages, infos, padding, history, states: list[LayerState]):
    """A cache with this one's settings holding ``storages`` and the given per-sequence and per-layer state."""
    derived = type(source)(source.model_config, settings=source.settings)
    for layer, storage, (recent, counts, scaling, targets) in zip(derived.layers, storages, states):
        layer.set_storage(storage)
        layer.recent_queries, layer.recent_counts, layer.scaling = recent, list(counts), scaling
        layer.decode_targets = None if targets is None else list(targets)
    derived.infos = list(infos)
    derived.groups = []
    derived.padding = list(padding)
    derived.prompt_length = max(pad + info.length for pad, info in zip(padding, infos))
    derived.peak_prefill_bytes = source.peak_prefill_bytes
    derived.clock = _copy.deepcopy(source.clock)
    if derived.eviction is not None:
        derived.eviction.clock = derived.clock
    derived.decode_evictions = source.decode_evictions
    derived.history = TokenHistory(None if history is None else [list(row) for row in history], history is not None)
    derived.weights_fingerprint = source.weights_fingerprint
    derived._model = source._model
    derived.prompt_format = source.prompt_format
    return derived


def _stacked_state(layers: list[CompressedLayer]) -> LayerState:
    """One layer's decode state over the stacked batch: queries right-aligned to the longest, rows in order."""
    queries = [layer.recent_queries for layer in layers]
    targets = None
    if all(layer.decode_targets is not None for layer in layers):
        targets = [target for layer in layers for target in layer.decode_targets]
    if any(q is None for q in queries):
        return None, [], layers[0].scaling, targets
    longest = max(q.shape[2] for q in queries)
    counts = [count for layer in layers for count in layer.recent_counts]
    return torch.cat([_left_pad(q, longest) for q in queries]), counts, layers[0].scaling, targets


def _left_pad(queries: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, H, w, d]`` queries right-aligned in ``width`` slots (zeros before them: not counted as real)."""
    missing = width - queries.shape[2]
    if missing == 0:
        return queries
    return torch.cat([queries.new_zeros(*queries.shape[:2], missing, queries.shape[3]), queries], dim=2)
