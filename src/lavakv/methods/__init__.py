"""Compression methods built from registered parts: scores, head allocations, layer allocations.

Tensor code on plain tensors: this package imports torch and nothing of transformers.
"""

from . import heads, layers, scores  # noqa: F401  (registers the built-in parts)
from .budget import WINDOW_POLICIES, Budget
from .method import PART_KINDS, PRESETS, Method, parse_spec, resolve_method, split_specs
from .registry import (
    HEAD_ALLOCATIONS,
    LAYER_ALLOCATIONS,
    SCORES,
    HeadAllocation,
    LayerAllocation,
    LayerInput,
    OptionError,
    Part,
    Score,
    register_head_allocation,
    register_layer_allocation,
    register_score,
)

__all__ = [
    "HEAD_ALLOCATIONS",
    "LAYER_ALLOCATIONS",
    "PART_KINDS",
    "PRESETS",
    "SCORES",
    "WINDOW_POLICIES",
    "Budget",
    "HeadAllocation",
    "LayerAllocation",
    "LayerInput",
    "Method",
    "OptionError",
    "Part",
    "Score",
    "parse_spec",
    "register_head_allocation",
    "register_layer_allocation",
    "register_score",
    "resolve_method",
    "split_specs",
]
