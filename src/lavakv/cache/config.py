"""What a compressed cache is asked to do, decided and validated once: :class:`CacheConfig`."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..backends import BACKENDS
from ..methods import Budget, Method, resolve_method

DEFAULT_DECODE_INTERVAL = 32
"""Decode steps' worth of entries per head a layer may grow beyond its decode budget before it is compressed."""


@dataclass(frozen=True)
class CacheConfig:
    """The settings of a :class:`~lavakv.cache.CompressedCache`, validated together.

    ``method`` and ``budget`` say what the prefill keeps (``budget`` is ``None`` exactly for a
    method that keeps everything); ``progressive`` whether layers are compressed while the prefill
    runs (bounded peak memory); ``decode_budget`` and ``decode_interval`` bound the cache while
    generating; ``attention_path`` names the decode attention backend (``"auto"`` or one of
    :data:`lavakv.backends.BACKENDS`). Every place that builds caches passes one of these, so
    defaults live here alone. Build one with :meth:`build` from the user-facing arguments.
    """

    method: Method
    budget: Budget | None
    progressive: bool
    decode_budget: int | None = None
    decode_interval: int = DEFAULT_DECODE_INTERVAL
    attention_path: str = "auto"

    def __post_init__(self) -> None:
        check_attention_path(self.attention_path)
        check_decode_budget(self.method, self.decode_budget, self.decode_interval)

    @classmethod
    def build(
        cls,
        method: str | Method = "lava",
        budget: int | Budget | None = None,
        ratio: float | None = None,
        progressive: bool | None = None,
        decode_budget: int | None = None,
        decode_interval: int | None = None,
        attention_path: str = "auto",
        **options,
    ) -> CacheConfig:
        """The config of a method spec (or :class:`Method`) with its ``options``, a budget or ratio, and the rest.

        ``progressive=None`` follows the method (on for dynamic layer budgets); ``decode_interval=None``
        is :data:`DEFAULT_DECODE_INTERVAL`.
        """
        check_attention_path(attention_path)
        resolved = resolve_method(method, **options)
        interval = DEFAULT_DECODE_INTERVAL if decode_interval is None else decode_interval
        return cls(
            method=resolved,
            budget=check_budget(resolved, budget, ratio),
            progressive=resolved.progressive if progressive is None else bool(progressive),
            decode_budget=decode_budget,
            decode_interval=interval,
            attention_path=attention_path,
        )

    def with_attention_path(self, attention_path: str) -> CacheConfig:
        """The same config decoding with another backend."""
        return replace(self, attention_path=attention_path)


def check_attention_path(attention_path: str) -> None:
    """Refuse a decode attention backend that is not registered (naming the valid ones)."""
    if attention_path != "auto" and attention_path not in BACKENDS:
        raise ValueError(f"attention_path must be 'auto' or one of {', '.join(BACKENDS)}, got {attention_path!r}")


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
    score = method.score
    if method.needs_scoring_pass:
        raise ValueError(
            f"method {method.spec!r} cannot evict while decoding: its {score.name} score reads a reconstruction "
            "pass over the prompt; use no decode_budget, or a method that scores by window attention"
        )
    if method.reads_profile:
        raise ValueError(
            f"method {method.spec!r} cannot evict while decoding: its budgets come from a per-head profile of the "
            "prefill's layers; use no decode_budget, or a method without a profile"
        )
    if score.needs_layer_weights or score.two_stage:
        reason = (
            "reads the layer's weights, handed over at prefill only"
            if score.needs_layer_weights
            else ("ranks entries by budget in two stages")
        )
        raise ValueError(
            f"method {method.spec!r} cannot evict while decoding: its {score.name} score {reason}; use no "
            "decode_budget, or a method that scores by window attention (snapkv, lava, ...)"
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
