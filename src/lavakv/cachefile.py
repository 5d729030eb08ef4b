"""The ``.lkv`` file of a compressed context: safetensors tensors plus a JSON header, checked on load.

A compressed context is only meaningful for the model that produced it, in the dtype it ran in,
and for the exact prompt it holds, so the header records all three: the model's identity (its
architecture and shapes, a fingerprint of that configuration and one of its weights), the dtype,
and per sequence the prompt length and a hash of the token ids. A checksum over every tensor's
bytes catches a truncated or corrupted file that safetensors alone would still open. This module
knows the file format only; :meth:`lavakv.CompressedCache.save` and ``load`` decide what goes in.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "lavakv-compressed-cache"
FORMAT_VERSION = 1
IDENTITY_FIELDS = (
    "model_type",
    "architectures",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_size",
    "vocab_size",
    "max_position_embeddings",
    "rope_theta",
    "rope_parameters",
    "sliding_window",
    "layer_types",
)
"""Configuration fields that decide what a layer's keys and values mean."""
FINGERPRINT_SLICE = 256


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def ids_hash(ids: list[int]) -> str:
    """SHA-256 of a token-id sequence."""
    return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()


def weights_fingerprint(model) -> str:
    """A cheap fingerprint of a model's weights: every parameter's name and shape, and a slice of a few of them.

    Parameters not materialized (on the ``meta`` device, as offloading leaves them) are left out.
    """
    digest = hashlib.sha256()
    parameters = [(name, p) for name, p in model.named_parameters() if p.device.type != "meta"]
    for name, parameter in parameters:
        digest.update(f"{name}:{tuple(parameter.shape)};".encode())
    if parameters:
        for index in sorted({0, len(parameters) // 2, len(parameters) - 1}):
            flat = parameters[index][1].detach().reshape(-1)[:FINGERPRINT_SLICE]
            digest.update(flat.to(device="cpu", dtype=torch.float32).numpy().tobytes())
    return digest.hexdigest()


def head_identity(model_or_config) -> dict:
    """What a per-head profile is checked against: the model's name, its layer and KV-head counts, its weights.

    ``fingerprint`` is :func:`weights_fingerprint` for a model and ``None`` for a bare config.
    """
    config = getattr(model_or_config, "config", model_or_config)
    text = config.get_text_config()
    name = getattr(config, "_name_or_path", "") or type(config).__name__
    fingerprint = weights_fingerprint(model_or_config) if hasattr(model_or_config, "named_parameters") else None
    return {
        "name": os.path.basename(str(name).rstrip("/")) or str(name),
        "num_layers": text.num_hidden_layers,
        "num_kv_heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        "fingerprint": fingerprint,
    }


def model_identity(config, weights: str | None) -> dict:
    """What a compressed context depends on: the text config's :data:`IDENTITY_FIELDS`, their hash, the weights'."""
    text = config.get_text_config()
    fields = {}
    for name in IDENTITY_FIELDS:
        value = getattr(text, name, None)
        if value is None:
            value = getattr(config, name, None)
        fields[name] = json.loads(json.dumps(value, default=str))
    fingerprint = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return {"config": fields, "config_fingerprint": fingerprint, "weights_fingerprint": weights}


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def write_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], header: dict, identity: dict) -> int:
    """Write ``tensors`` with ``header`` and ``identity`` to ``path`` atomically; returns the file's size in bytes."""
    path = Path(path)
    full = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lavakv_version": _version("lavakv"),
        "transformers_version": _version("transformers"),
        "torch_version": torch.__version__,
        "model": identity,
        "checksum": _checksum(tensors),
        **header,
    }
    cpu = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    handle, staging = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.")
    os.close(handle)
    try:
        save_file(cpu, staging, metadata={"lavakv": json.dumps(full)})
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return path.stat().st_size


def read_file(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(header, tensors)`` of a file :func:`write_file` wrote; ``ValueError`` otherwise.

    Refused, each with what is wrong: a file that is missing, not safetensors, truncated or
    corrupted (checksum), or of another format or a newer format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"compressed cache file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise ValueError(f"{path}: not a readable lavakv cache file (truncated or corrupt?): {error}") from error
    try:
        header = json.loads(stored["lavakv"])
    except (KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: a safetensors file without a lavakv header; not a compressed cache") from error
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: format {header.get('format')!r} is not {FORMAT!r}")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {version!r} is newer than this lavakv reads ({FORMAT_VERSION}); "
            f"written by lavakv {header.get('lavakv_version')}: upgrade lavakv"
        )
    if header.get("checksum") != _checksum(tensors):
        raise ValueError(f"{path}: the tensors do not match the file's checksum (corrupt or truncated)")
    return header, tensors


def check_identity(path: str | os.PathLike, header: dict, current: dict) -> None:
    """Refuse a file saved for another model than ``current`` (:func:`model_identity`), naming what differs."""
    saved = header.get("model", {})
    saved_fields, current_fields = saved.get("config", {}), current["config"]
    differ = [
        f"{name}: file {saved_fields.get(name)!r}, model {current_fields.get(name)!r}"
        for name in IDENTITY_FIELDS
        if saved_fields.get(name) != current_fields.get(name)
    ]
    if differ:
        raise ValueError(f"{path}: saved for another model ({'; '.join(differ)})")
    if saved.get("weights_fingerprint") and current.get("weights_fingerprint"):
        if saved["weights_fingerprint"] != current["weights_fingerprint"]:
            raise ValueError(
                f"{path}: saved for a model of the same shape but other weights (weights fingerprint "
                f"{saved['weights_fingerprint'][:12]}, model's {current['weights_fingerprint'][:12]})"
            )
