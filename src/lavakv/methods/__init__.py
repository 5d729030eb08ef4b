"""Compression methods built from registered parts: scores, head allocations, layer allocations."""

from . import heads, layers, scores  # noqa: F401  (registers the built-in parts)
from .config import OPTION_NAMES, PRESETS, Method, resolve_method
from .registry import (
    HEAD_ALLOCATIONS,
    LAYER_ALLOCATIONS,
    SCORES,
    LayerInput,
    register_head_allocation,
    register_layer_allocation,
    register_score,
)

__all__ = [
    "HEAD_ALLOCATIONS",
    "LAYER_ALLOCATIONS",
    "OPTION_NAMES",
    "PRESETS",
    "SCORES",
    "LayerInput",
    "Method",
    "register_head_allocation",
    "register_layer_allocation",
    "register_score",
    "resolve_method",
]
