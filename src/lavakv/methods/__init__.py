"""Compression methods built from registered parts: scores, head allocations, layer allocations.

Tensor code on plain tensors: this package imports torch and nothing of transformers.
"""

from . import heads, layers, scores  # noqa: F401, I001  (registers the built-in parts)
from . import criticalkv, defensivekv, duo_attention, expected_attention, headkv, keydiff, knorm, kvzip, tova  # noqa: F401, I001
from .budget import WINDOW_POLICIES, Budget
from .method import PAPER_METHODS, PART_KINDS, PRESETS, Method, parse_spec, register_preset, resolve_method, split_specs
from .plugins import ENTRY_POINT_GROUP, load_plugins
from .registry import (
    HEAD_ALLOCATIONS,
    LAYER_ALLOCATIONS,
    SCORES,
    HeadAllocation,
    LayerAllocation,
    LayerInput,
    LayerWeights,
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
    "ENTRY_POINT_GROUP",
    "PAPER_METHODS",
    "PART_KINDS",
    "PRESETS",
    "SCORES",
    "WINDOW_POLICIES",
    "Budget",
    "HeadAllocation",
    "LayerAllocation",
    "LayerInput",
    "LayerWeights",
    "Method",
    "OptionError",
    "Part",
    "Score",
    "load_plugins",
    "parse_spec",
    "register_head_allocation",
    "register_layer_allocation",
    "register_preset",
    "register_score",
    "resolve_method",
    "split_specs",
]
