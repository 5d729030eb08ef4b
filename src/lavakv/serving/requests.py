"""A request's compression: the server's default, overridden by the request's own options.

The server sets its default with ``--additional-config '{"lavakv": {"method": "lava", "budget": 128}}'``;
a request overrides it through the OpenAI API's extra body, ``vllm_xargs`` (flat keys:
``{"lavakv_method": "snapkv", "lavakv_budget": 256}``), which vLLM hands to the engine as the
request's ``SamplingParams.extra_args``. Every bad value raises a ``ValueError`` that names it, so
the server answers HTTP 400 and keeps serving.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..cache.config import check_budget
from ..methods import Method, resolve_method

OPTION_KEYS = {"lavakv_method": "method", "lavakv_budget": "budget"}
"""The per-request keys of ``vllm_xargs`` and the setting each sets."""

SERVER_KEYS = ("method", "budget")
"""The keys of the server's ``additional_config["lavakv"]``."""


@dataclass(frozen=True)
class RequestCompression:
    """How one request's prompt KV is compressed after its prefill: a method and a budget per KV head per layer."""

    method: Method
    budget: int | None

    @property
    def compresses(self) -> bool:
        """Whether anything is evicted (the ``full`` method keeps every entry)."""
        return self.method.compresses and self.budget is not None

    @property
    def ragged(self) -> bool:
        """Whether heads or layers may keep different numbers of rows (anything but uniform heads and layers)."""
        return not (self.method.heads.name == "uniform" and self.method.layers.name == "uniform")

    @property
    def spec(self) -> str:
        """The method's canonical spec string."""
        return self.method.spec


def _settings(method: Any, budget: Any, where: str, explicit_budget: bool = True) -> RequestCompression:
    if not isinstance(method, str) or not method.strip():
        raise ValueError(f"{where} method must be a lavakv method spec such as 'lava' or 'snapkv', got {method!r}")
    try:
        resolved = resolve_method(method)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{where} method {method!r}: {error}") from None
    if not resolved.compresses and not explicit_budget:
        return RequestCompression(resolved, None)
    if resolved.compresses and budget is None:
        raise ValueError(f"{where} method {method!r} needs a budget (tokens per KV head per layer)")
    try:
        checked = check_budget(resolved, budget, None)
    except ValueError as error:
        raise ValueError(f"{where} budget {budget!r}: {error}") from None
    return RequestCompression(resolved, None if checked is None else checked.tokens)


def server_compression(additional_config: Mapping[str, Any] | None) -> RequestCompression | None:
    """The server's default from vLLM's ``additional_config`` (its ``"lavakv"`` entry), or ``None``."""
    if not additional_config or "lavakv" not in additional_config:
        return None
    settings = additional_config["lavakv"]
    if not isinstance(settings, Mapping):
        raise ValueError(f"additional_config['lavakv'] must be a mapping with {SERVER_KEYS}, got {settings!r}")
    unknown = sorted(set(settings) - set(SERVER_KEYS))
    if unknown:
        raise ValueError(f"additional_config['lavakv'] has unknown key(s) {unknown}; valid: {', '.join(SERVER_KEYS)}")
    if "method" not in settings:
        raise ValueError("additional_config['lavakv'] needs a 'method' (a lavakv method spec)")
    return _settings(settings["method"], settings.get("budget"), "the server's lavakv", "budget" in settings)


def compression_of_request(
    extra_args: Mapping[str, Any] | None, default: RequestCompression | None
) -> RequestCompression | None:
    """A request's compression: its ``lavakv_*`` extra args over the server's ``default``; ``None`` keeps all."""
    given = {key: value for key, value in (extra_args or {}).items() if key.startswith("lavakv")}
    unknown = sorted(set(given) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(f"unknown lavakv request option(s) {unknown}; valid: {', '.join(OPTION_KEYS)}")
    if not given:
        return default
    if "lavakv_method" in given:
        method = given["lavakv_method"]
    elif default is not None:
        method = default.spec
    else:
        raise ValueError("lavakv_budget was given without lavakv_method, and the server sets no default method")
    budget = given.get("lavakv_budget", default.budget if default is not None else None)
    return _settings(method, budget, "the request's lavakv", "lavakv_budget" in given)
