"""The compressed KV cache and its parts (see :mod:`lavakv.cache.compressed` for how they fit together)."""

from .compressed import CompressedCache
from .config import DEFAULT_DECODE_INTERVAL, CacheConfig, check_budget, check_decode_budget
from .history import ContinuationError, TokenHistory
from .layer import CompressedLayer, layer_devices
from .stats import CacheStats, SequenceInfo, SequenceStats

__all__ = [
    "DEFAULT_DECODE_INTERVAL",
    "CacheConfig",
    "CacheStats",
    "CompressedCache",
    "CompressedLayer",
    "ContinuationError",
    "SequenceInfo",
    "SequenceStats",
    "TokenHistory",
    "check_budget",
    "check_decode_budget",
    "layer_devices",
]
