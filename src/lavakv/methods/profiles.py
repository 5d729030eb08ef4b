"""Per-head profiles: numbers per (layer, KV head) measured once on a model, read by HeadKV and DuoAttention.

``lavakv calibrate`` writes a profile file (JSON) for one model: the model it was measured on
(name, layer and KV-head counts, a fingerprint of its weights), how it was measured, and one
``[num_layers][num_kv_heads]`` table per kind (``"headkv"``: retrieval importance; ``"duo"``: how
much a head's output changes when it only sees sinks and recent tokens). A method names the file
in its spec (``headkv:profile=PATH``); the cache checks the profile against the model it runs on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

PROFILE_FORMAT = "lavakv-head-profile/1"
PROFILE_KINDS = ("headkv", "duo")


class ProfileError(ValueError):
    """A profile file that cannot be used: missing, malformed, or measured on another model."""


@dataclass(frozen=True)
class HeadProfile:
    """One model's per-head tables (``[num_layers, num_kv_heads]`` float tensors) and what they were measured on."""

    path: str
    model: dict
    tables: dict[str, torch.Tensor]

    def table(self, kind: str) -> torch.Tensor:
        if kind not in self.tables:
            raise ProfileError(f"profile {self.path} has no {kind!r} table; it holds {', '.join(self.tables)}")
        return self.tables[kind]

    def check_model(self, identity: dict) -> None:
        """Refuse a model other than the one the profile was measured on (one line naming both)."""
        ours = self.model
        shape = (identity.get("num_layers"), identity.get("num_kv_heads"))
        if shape != (ours["num_layers"], ours["num_kv_heads"]):
            raise ProfileError(
                f"profile {self.path} was measured on {ours['name']} ({ours['num_layers']} layers x "
                f"{ours['num_kv_heads']} KV heads), not on this model {identity.get('name')} ({shape[0]} layers x "
                f"{shape[1]} KV heads); run lavakv calibrate on this model"
            )
        fingerprint = identity.get("fingerprint")
        if fingerprint is not None and fingerprint != ours["fingerprint"]:
            raise ProfileError(
                f"profile {self.path} was measured on {ours['name']} (weights {ours['fingerprint'][:12]}), not on this "
                f"model {identity.get('name')} (weights {fingerprint[:12]}); run lavakv calibrate on this model"
            )


_LOADED: dict[tuple[str, float], HeadProfile] = {}


def load_profile(path: str) -> HeadProfile:
    """The profile at ``path`` (read once per file version), or a one-line :class:`ProfileError`."""
    if not path:
        raise ProfileError(
            "this method needs a per-head profile: give profile=PATH, a file written by lavakv calibrate"
        )
    try:
        stamp = os.path.getmtime(path)
    except OSError:
        raise ProfileError(
            f"profile file {path!r} does not exist; write one with lavakv calibrate --out {path}"
        ) from None
    key = (os.path.abspath(path), stamp)
    if key not in _LOADED:
        _LOADED[key] = _parse(path)
    return _LOADED[key]


def _parse(path: str) -> HeadProfile:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProfileError(f"profile file {path!r} is not readable JSON ({error})") from None
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ProfileError(
            f"profile file {path!r} is not a lavakv head profile (format {found!r}, expected {PROFILE_FORMAT})"
        )
    model = data.get("model")
    keys = ("name", "num_layers", "num_kv_heads", "fingerprint")
    if not isinstance(model, dict) or any(key not in model for key in keys):
        raise ProfileError(
            f"profile file {path!r} does not say which model it was measured on (model: {', '.join(keys)})"
        )
    tables = {}
    for kind in PROFILE_KINDS:
        if kind not in data:
            continue
        table = data[kind]
        try:
            tensor = torch.tensor(table, dtype=torch.float64)
        except (TypeError, ValueError):
            raise ProfileError(f"profile file {path!r}: {kind} is not a table of numbers") from None
        expected = (model["num_layers"], model["num_kv_heads"])
        if tuple(tensor.shape) != expected or not bool(torch.isfinite(tensor).all()) or bool((tensor < 0).any()):
            raise ProfileError(
                f"profile file {path!r}: {kind} must be {expected[0]} x {expected[1]} finite numbers >= 0, "
                f"got shape {tuple(tensor.shape)}"
            )
        tables[kind] = tensor
    if not tables:
        raise ProfileError(f"profile file {path!r} holds no table ({', '.join(PROFILE_KINDS)})")
    return HeadProfile(path, model, tables)
