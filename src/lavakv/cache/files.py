"""Saving a compressed cache to a ``.lkv`` file and loading it back (the format itself is :mod:`lavakv.cachefile`)."""

from __future__ import annotations

import os
from dataclasses import asdict

import torch
from transformers.cache_utils import Cache

from ..cachefile import check_identity, ids_hash, model_identity, read_file, weights_fingerprint, write_file
from ..methods import Budget
from ..ragged import RaggedKV
from .layer import LayerState, layer_devices
from .stats import SequenceInfo


def save_cache(cache: Cache, path: str | os.PathLike) -> int:
    """Write a :class:`~lavakv.cache.CompressedCache` to ``path``; returns the file's bytes (see its ``save``)."""
    cache._check_ready("save")
    history = cache.history.flush()
    if not cache.history.known or history is None:
        raise RuntimeError("cannot save a cache whose token ids are unknown (it was fed inputs_embeds)")
    tensors = {}
    for index, layer in enumerate(cache.layers):
        for name, tensor in layer.storage.tensors().items():
            tensors[f"layers.{index}.{name}"] = tensor
        if layer.recent_queries is not None:
            tensors[f"layers.{index}.recent_queries"] = layer.recent_queries.contiguous()
    for row, ids in enumerate(history):
        tensors[f"sequences.{row}.token_ids"] = torch.tensor(ids, dtype=torch.long)
    targets = None
    if cache.decode_budget is not None:
        targets = [[layer.decode_targets[row] for layer in cache.layers] for row in range(cache.batch_size)]
    header = {
        "method": cache.method.spec,
        "budget": None if cache.budget is None else asdict(cache.budget),
        "decode_budget": cache.decode_budget,
        "decode_interval": cache.decode_interval,
        "decode_targets": targets,
        "decode_evictions": cache.decode_evictions,
        "recent_counts": [list(layer.recent_counts) for layer in cache.layers],
        "scalings": [layer.scaling for layer in cache.layers],
        "prompt_format": cache.prompt_format,
        "dtype": str(cache.layers[0].storage.keys.dtype).removeprefix("torch."),
        "padding": cache.padding,
        "append_start": [layer.storage.append_start for layer in cache.layers],
        "peak_prefill_bytes": cache.peak_prefill_bytes,
        "sequences": [
            {**asdict(info), "token_ids_sha256": ids_hash(ids), "tokens": len(ids)}
            for info, ids in zip(cache.infos, history)
        ],
    }
    return write_file(path, tensors, header, model_identity(cache.model_config, cache._fingerprint()))


def load_cache(cls: type[Cache], path: str | os.PathLike, model) -> Cache:
    """The cache (of class ``cls``) that :func:`save_cache` wrote to ``path``, for ``model``."""
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
        history = _token_ids(header, tensors)
        storages, states = _layers(cache, header, tensors, layer_devices(model, cache.num_layers), model.dtype, infos)
        if len(set(header["append_start"])) != 1 or len(header["padding"]) != len(infos):
            raise ValueError("the layers' timelines or the padding do not agree")
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: not a valid lavakv cache file ({error})") from error
    cache.prompt_format = header["prompt_format"]
    loaded = cache._derived(storages, infos, header["padding"], history, states)
    loaded.peak_prefill_bytes = header["peak_prefill_bytes"]
    loaded.decode_evictions = header["decode_evictions"]
    return loaded


def _token_ids(header: dict, tensors: dict) -> list[list[int]]:
    history = []
    for row, sequence in enumerate(header["sequences"]):
        ids = tensors.pop(f"sequences.{row}.token_ids").tolist()
        if ids_hash(ids) != sequence["token_ids_sha256"]:
            raise ValueError(f"the token ids of sequence {row} do not match their hash")
        history.append(ids)
    return history


def _layers(cache, header, tensors, devices, dtype, infos) -> tuple[list[RaggedKV], list[LayerState]]:
    counts, scalings, targets = header["recent_counts"], header["scalings"], header["decode_targets"]
    if len(counts) != cache.num_layers or len(scalings) != cache.num_layers:
        raise ValueError("the decode state does not have one entry per layer")
    storages, states = [], []
    for index, layer in enumerate(cache.layers):
        prefix = f"layers.{index}."
        named = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        queries = named.pop("recent_queries", None)
        lengths = named.pop("lengths")
        named = {name: tensor.to(devices[index]) for name, tensor in named.items()}
        named["lengths"] = lengths
        storage = RaggedKV.from_tensors(
            named, header["append_start"][index], track_positions=bool(layer.sliding_window)
        )
        if storage.batch != len(infos) or storage.keys.dtype != dtype:
            raise ValueError(f"layer {index} holds {storage.batch} sequences in {storage.keys.dtype}")
        storages.append(storage)
        layer_targets = None if targets is None else [row[index] for row in targets]
        recent = None if queries is None else queries.to(devices[index])
        states.append((recent, list(counts[index]), scalings[index], layer_targets))
    return storages, states
